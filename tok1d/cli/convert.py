r"""Converts official PyTorch checkpoints into tok1d pretrained directories.

    tok1d convert titok --checkpoint=tokenizer_titok_l32.bin --out=titok_l32/
    tok1d convert titok --checkpoint=model.safetensors --out=titok_bl64/ \
        --official_config=config.json
    tok1d convert maskgit_vqgan --checkpoint=maskgit-vqgan-imagenet-f16-256.bin --out=maskgit_vqgan/
    tok1d convert gigatok --checkpoint=GigaTok_BL256.pt --out=gigatok_b_l/ --preset=b_l
    tok1d convert gigatok --checkpoint=ckpt.pt --out=out/ --official_config=VQ_BL256.yaml
    tok1d convert dinov2 --checkpoint=dinov2_vitb14_pretrain.pth --out=dinov2_b/ --pos_grid=16
    tok1d convert maskgit --checkpoint=generator_titok_l32.bin --out=maskgit_l32/   # TiTok's
    tok1d convert gpt --checkpoint=GPT_B_256.pt --out=gpt_b/ [--size=B] [--weights=ema]   # GigaTok
    tok1d convert inception_fid --checkpoint=pt_inception-2015-12-05-6726825d.pth \
        --out=inception_fid/
    tok1d convert lpips --vgg=vgg16-397923af.pth --checkpoint=vgg.pth --out=perceptual/
    tok1d convert convnext_s --checkpoint=convnext_small-0c510722.pth --out=perceptual/

Every tensor is checked against the model: a mismatch fails with the full list of missing,
unexpected and mismatched keys, and nothing is written. Load the result with
`tok1d.weights.pretrained.load_pretrained(DIR)`. The perceptual networks (lpips: LPIPS-VGG, the
linear layers of `lpips/weights/v0.1/vgg.pth` + torchvision's VGG16; convnext_s: torchvision's
ConvNeXt-S) are written as OUT/<name>.npz, the files `tok1d.objectives.perceptual` reads.
Reading .bin / .pt / .pth files needs PyTorch (`pip install 'tok1d[convert]'`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from absl import flags

from tok1d import errors
from tok1d import models
from tok1d.cli import app
from tok1d.models.generators.maskgit import MaskGITUViT
from tok1d.models.tokenizers.vqgan import MaskGITVQGAN
from tok1d.weights import pretrained
from tok1d.weights.convert import (common, dinov2, gigatok, gpt, inception, maskgit, perceptual,
                                   titok, vqgan)

KINDS = ("titok", "maskgit_vqgan", "gigatok", "dinov2", "maskgit", "gpt", "inception_fid",
         "lpips", "convnext_s")
USAGE = "KIND --checkpoint=FILE --out=DIR [flags]     (KIND: " + " | ".join(KINDS) + ")"
CONFIG = None
REQUIRED = ("checkpoint", "out")
POSITIONAL = "KIND"


def _model_kwargs(model) -> dict:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}


def _find_init_args(cfg):
    """The dict holding GigaTok's `init_args` anywhere inside an official YAML/JSON config."""
    if isinstance(cfg, dict):
        if "codebook_size" in cfg and "z_channels" in cfg:
            return cfg
        for value in cfg.values():
            found = _find_init_args(value)
            if found is not None:
                return found
    return None


def _gigatok(checkpoint: str, config: str | None, preset: str | None, image_size: int | None):
    if (config is None) == (preset is None):
        raise ValueError("gigatok needs exactly one of --preset=NAME or --official_config=FILE")
    if preset is not None:
        model = models.create("gigatok", preset=preset, image_size=image_size or 256)
    else:
        cfg = titok._read_config(config)
        init_args = _find_init_args(cfg)
        if init_args is None:
            raise common.ConversionError(f"{config}: no GigaTok init_args (codebook_size, "
                                         "z_channels, ...) found")
        kwargs = gigatok.kwargs_from_official(
            init_args, cfg.get("size_tables_added"), cfg.get("ctor_patches"),
            image_size=image_size or cfg.get("image_size", 256),
            layout=cfg.get("variant") or gigatok.layout_from_config(cfg))
        model = models.create("gigatok", **kwargs)
    return model, gigatok.convert_gigatok(common.load_state_dict(checkpoint), model,
                                          what=checkpoint)


def convert(kind: str, checkpoint: str, out: str, config: str | None = None,
            image_size: int | None = None, preset: str | None = None,
            pos_grid: int | None = None, size: str | None = None,
            weights: str = "model", num_heads: int | None = None,
            vgg: str | None = None) -> str:
    """Converts `checkpoint` (an official file of `kind`) into the pretrained directory `out`
    (lpips / convnext_s: OUT/<name>.npz); returns what it wrote."""
    if kind == "lpips":
        return perceptual.convert_files(kind, out, vgg=vgg, lpips=checkpoint)
    if kind == "convnext_s":
        return perceptual.convert_files(kind, out, weights=checkpoint)
    if kind == "titok":
        model, params = titok.convert_file(checkpoint, config=config, image_size=image_size)
    elif kind == "maskgit_vqgan":
        model = MaskGITVQGAN()
        params = vqgan.convert_maskgit_vqgan(common.load_state_dict(checkpoint), model)
    elif kind == "gigatok":
        model, params = _gigatok(checkpoint, config, preset, image_size)
    elif kind == "dinov2":
        model, params = dinov2.convert_file(checkpoint, pos_grid=pos_grid)
    elif kind == "maskgit":
        model, params = maskgit.convert_file(checkpoint, config=config)
    elif kind == "gpt":
        model, params = gpt.convert_file(checkpoint, size=size, weights=weights,
                                         num_heads=num_heads)
    elif kind == "inception_fid":  # pytorch-fid's FID InceptionV3 (+ IS fc head)
        model, params = inception.convert_file(checkpoint)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    kwargs = _model_kwargs(model)
    if kind == "maskgit":  # the registry picks the class by arch
        kwargs["arch"] = "uvit" if isinstance(model, MaskGITUViT) else "vit"
    for key in ("dtype", "param_dtype"):
        kwargs.pop(key, None)
    return pretrained.save_pretrained(out, kind, kwargs, params, source=checkpoint)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "The official file: .bin / .pt / .pth / "
                        ".safetensors / .npz state_dict (lpips: the LPIPS linear layers, "
                        "vgg.pth).", flag_values=fv)
    flags.DEFINE_string("out", None, "The new pretrained directory.", flag_values=fv)
    flags.DEFINE_string("official_config", None, "titok, gigatok, maskgit: the official config "
                        "(JSON / YAML); default: sizes from the tensor shapes.", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Input resolution (default: from the positional "
                         "embeddings).", flag_values=fv)
    flags.DEFINE_string("preset", None, "gigatok: released size (s_s, s_b, b_l, xl_xxl, s_s_2d, "
                        "s_b_2d, b_l_2d).", flag_values=fv)
    flags.DEFINE_integer("pos_grid", None, "dinov2: resample the position table to this grid "
                         "(GigaTok's teacher: 16, i.e. 224 px inputs).", flag_values=fv)
    flags.DEFINE_string("size", None, "gpt: size name (B, L, XL, XXL, XXXL) fixing the head "
                        "count (default: from the width).", flag_values=fv)
    flags.DEFINE_enum("weights", "model", ["model", "ema"], "gpt: which weights of a training "
                      "checkpoint (model, as the official sampler).", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "gpt: attention heads, for a width that is not a "
                         "released size.", flag_values=fv)
    flags.DEFINE_string("vgg", None, "lpips: torchvision's VGG16 state_dict "
                        "(vgg16-397923af.pth), unless --checkpoint holds the whole LPIPS module.",
                        flag_values=fv)


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    kind = args[0]
    if kind not in KINDS:
        raise errors.UserError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}.")
    out = convert(kind, fv.checkpoint, fv.out, fv.official_config, fv.image_size, fv.preset,
                  fv.pos_grid, fv.size, fv.weights, fv.num_heads, fv.vgg)
    print(f"wrote {out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
