"""Converts official PyTorch checkpoints into tok1d pretrained directories.

    python -m tok1d.cli.convert titok tokenizer_titok_l32.bin titok_l32/
    python -m tok1d.cli.convert titok model.safetensors titok_bl64/ --config config.json
    python -m tok1d.cli.convert maskgit_vqgan maskgit-vqgan-imagenet-f16-256.bin maskgit_vqgan/
    python -m tok1d.cli.convert gigatok GigaTok_BL256.pt gigatok_b_l/ --preset b_l
    python -m tok1d.cli.convert gigatok ckpt.pt out/ --config VQ_BL256.yaml   # any official config
    python -m tok1d.cli.convert dinov2 dinov2_vitb14_pretrain.pth dinov2_b/ --pos_grid 16  # GigaTok
    python -m tok1d.cli.convert maskgit generator_titok_l32.bin maskgit_l32/   # TiTok generators
    python -m tok1d.cli.convert gpt GPT_B_256.pt gpt_b/ [--size B] [--weights ema]   # GigaTok AR
    python -m tok1d.cli.convert inception_fid pt_inception-2015-12-05-6726825d.pth inception_fid/

Every tensor is checked against the model: a mismatch fails with the full list of missing,
unexpected and mismatched keys, and nothing is written. Load the result with
`tok1d.weights.pretrained.load_pretrained(DIR)`. Perceptual networks (LPIPS-VGG, ConvNeXt-S) have their
own command: `python -m tok1d.cli.convert.perceptual --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tok1d.weights import pretrained
from tok1d.weights.convert.common import ConversionError

KINDS = ("titok", "maskgit_vqgan", "gigatok", "dinov2", "maskgit", "gpt", "inception_fid")


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
    from tok1d import models
    from tok1d.weights.convert import common
    from tok1d.weights.convert import gigatok
    from tok1d.weights.convert import titok
    if (config is None) == (preset is None):
        raise ValueError("gigatok needs exactly one of --preset NAME or --config FILE")
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
            weights: str = "model", num_heads: int | None = None) -> str:
    if kind == "titok":
        from tok1d.weights.convert import titok
        model, params = titok.convert_file(checkpoint, config=config, image_size=image_size)
    elif kind == "maskgit_vqgan":
        from tok1d.weights.convert import common
        from tok1d.weights.convert import vqgan
        from tok1d.models.tokenizers.vqgan import MaskGITVQGAN
        model = MaskGITVQGAN()
        params = vqgan.convert_maskgit_vqgan(common.load_state_dict(checkpoint), model)
    elif kind == "gigatok":
        model, params = _gigatok(checkpoint, config, preset, image_size)
    elif kind == "dinov2":
        from tok1d.weights.convert import dinov2
        model, params = dinov2.convert_file(checkpoint, pos_grid=pos_grid)
    elif kind == "maskgit":
        from tok1d.weights.convert import maskgit
        model, params = maskgit.convert_file(checkpoint, config=config)
    elif kind == "gpt":
        from tok1d.weights.convert import gpt
        model, params = gpt.convert_file(checkpoint, size=size, weights=weights,
                                         num_heads=num_heads)
    elif kind == "inception_fid":  # pytorch-fid's FID InceptionV3 (+ IS fc head)
        from tok1d.weights.convert import inception
        model, params = inception.convert_file(checkpoint)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    kwargs = _model_kwargs(model)
    if kind == "maskgit":  # the registry picks the class by arch
        from tok1d.models.generators.maskgit import MaskGITUViT
        kwargs["arch"] = "uvit" if isinstance(model, MaskGITUViT) else "vit"
    for key in ("dtype", "param_dtype"):
        kwargs.pop(key, None)
    return pretrained.save_pretrained(out, kind, kwargs, params, source=checkpoint)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tok1d.cli.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("checkpoint", help=".bin / .pt / .safetensors / .npz state_dict")
    parser.add_argument("out", help="new pretrained directory")
    parser.add_argument("--config", help="official config (JSON/YAML); default: read sizes "
                        "from the tensor shapes")
    parser.add_argument("--image_size", type=int, help="input resolution (default: from the "
                        "positional embeddings)")
    parser.add_argument("--preset", help="gigatok: released size name (s_s, s_b, b_l, xl_xxl, "
                        "s_s_2d, s_b_2d, b_l_2d)")
    parser.add_argument("--pos_grid", type=int, help="dinov2: resample the position table to "
                        "this grid (GigaTok's teacher: 16, i.e. 224 px inputs)")
    parser.add_argument("--size", help="gpt: size name (B, L, XL, XXL, XXXL) fixing the head "
                        "count (default: from the width)")
    parser.add_argument("--weights", default="model", choices=("model", "ema"),
                        help="gpt: which weights of a training checkpoint (default: model, as "
                        "the official sampler)")
    parser.add_argument("--num_heads", type=int, help="gpt: attention heads, for a width that "
                        "is not a released size")
    args = parser.parse_args(argv)
    try:
        out = convert(args.kind, args.checkpoint, args.out, args.config, args.image_size,
                      args.preset, args.pos_grid, args.size, args.weights, args.num_heads)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
