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
    tok1d convert rar --checkpoint=rar_b.bin --out=rar_b/ [--size=B]     # B / L / XL / XXL
    tok1d convert inception_fid --checkpoint=pt_inception-2015-12-05-6726825d.pth \
        --out=inception_fid/
    tok1d convert lpips --vgg=vgg16-397923af.pth --checkpoint=vgg.pth --out=perceptual/
    tok1d convert convnext_s --checkpoint=convnext_small-0c510722.pth --out=perceptual/

Every tensor is checked against the model: a mismatch fails with the full list of missing,
unexpected and mismatched keys, and nothing is written. Load the result with
`tok1d.weights.loaders.load_pretrained(DIR)`. The perceptual networks (lpips: LPIPS-VGG, the
linear layers of `lpips/weights/v0.1/vgg.pth` + torchvision's VGG16; convnext_s: torchvision's
ConvNeXt-S) are written as OUT/<name>.npz, the files `tok1d.objectives.perceptual` reads.
Reading .bin / .pt / .pth files needs PyTorch (`pip install 'tok1d[convert]'`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import flags

from tok1d import errors
from tok1d.cli import app
from tok1d.weights import loaders, pretrained
from tok1d.weights.convert import perceptual

KINDS = loaders.OFFICIAL_KINDS + ("lpips", "convnext_s")
USAGE = "KIND --checkpoint=FILE --out=DIR [flags]     (KIND: " + " | ".join(KINDS) + ")"
CONFIG = None
REQUIRED = ("checkpoint", "out")
POSITIONAL = "KIND"


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
    model, params = loaders.load_official(kind, checkpoint, config=config, image_size=image_size,
                                          preset=preset, pos_grid=pos_grid, size=size,
                                          weights=weights, num_heads=num_heads)
    return pretrained.save_pretrained(out, kind, pretrained.registry_kwargs(kind, model), params,
                                      source=checkpoint)

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
                        "count (default: from the width); rar: the released size (B, L, XL, "
                        "XXL) the file must be (default: sizes from the shapes).",
                        flag_values=fv)
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
