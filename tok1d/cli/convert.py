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
`tok1d.weights.loaders.load_pretrained(DIR)`. Perceptual networks (LPIPS-VGG, ConvNeXt-S) have their
own command: `python -m tok1d.cli.convert.perceptual --help`.
"""

from __future__ import annotations

import argparse
import sys

from tok1d.weights import loaders, pretrained
from tok1d.weights.convert.common import ConversionError


def convert(kind: str, checkpoint: str, out: str, config: str | None = None,
            image_size: int | None = None, preset: str | None = None,
            pos_grid: int | None = None, size: str | None = None,
            weights: str = "model", num_heads: int | None = None) -> str:
    model, params = loaders.load_official(kind, checkpoint, config=config, image_size=image_size,
                                          preset=preset, pos_grid=pos_grid, size=size,
                                          weights=weights, num_heads=num_heads)
    return pretrained.save_pretrained(out, kind, pretrained.registry_kwargs(kind, model), params,
                                      source=checkpoint)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tok1d.cli.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=loaders.OFFICIAL_KINDS)
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
