r"""Converts official PyTorch checkpoints into tok1d pretrained directories.

Released weights by name (`tok1d.weights.registry`): fetched (Hugging Face Hub or URL), checked
(sha256 where published), converted once into the cache (--cache_dir, $TOK1D_CACHE or
~/.cache/tok1d) and read from there afterwards, offline too:

    tok1d convert --from titok_l32                  # prints the cached directory
    tok1d convert --from rar_b --out rar_b/         # and copies it to --out
    tok1d convert --from dinov2_vitb14 --pos_grid=16   # options override the entry's (cached
                                                    # apart: dinov2_vitb14-<key>)
    tok1d convert rar --from hf://yucornetto/RAR/rar_b.bin --size=B
    tok1d convert inception_fid --from https://github.com/.../pt_inception-2015-12-05-6726825d.pth

A local official file, by kind:

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
Reading .bin / .pt / .pth files needs PyTorch (`pip install -e '.[convert]'` in the checkout).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

from absl import flags

from tok1d import errors, workfiles
from tok1d.cli import app
from tok1d.weights import download, loaders, registry

KINDS = loaders.CONVERT_KINDS
USAGE = ("[KIND] (--from=NAME|hf://OWNER/REPO/FILE|URL | --checkpoint=FILE --out=DIR) [flags]"
         "     (KIND: " + " | ".join(KINDS) + ")")
CONFIG = None
REQUIRED = ()
POSITIONAL = "[KIND]"


def convert(kind: str, checkpoint: str, out: str, config: str | None = None,
            image_size: int | None = None, preset: str | None = None,
            pos_grid: int | None = None, size: str | None = None,
            weights: str = "model", num_heads: int | None = None,
            vgg: str | None = None) -> str:
    """Converts `checkpoint` (an official file of `kind`) into the pretrained directory `out`
    (lpips / convnext_s: OUT/<name>.npz); returns what it wrote."""
    return loaders.convert_official(kind, checkpoint, out, vgg=vgg,
                                    **_options(config=config, image_size=image_size,
                                               preset=preset, pos_grid=pos_grid, size=size,
                                               weights=weights, num_heads=num_heads))


def _options(**options: Any) -> dict[str, Any]:
    """The converter options that were given (a released name brings its own; these
    override them)."""
    return {k: v for k, v in options.items() if v is not None and (k, v) != ("weights", "model")}


COPY_PREFIX = ".tmp-convert"  # (+host+pid+: `tok1d.workfiles`) a copy to --out being made


def convert_from(source: str, kind: Optional[str] = None, out: Optional[str] = None,
                 cache_dir: Optional[str] = None, converted: Optional[list[str]] = None,
                 **options: Any) -> str:
    """`tok1d convert --from SOURCE`: a released name, hf://OWNER/REPO/FILE or a URL (with
    `kind`) -> its converted directory in the cache (copied to `out` when given); a local file
    -> `convert` into `out`. Returns the directory; one converted into the cache now is
    appended to `converted` (`loaders.resolve`)."""
    if os.path.isfile(source):
        if kind is None or not out:
            raise errors.UserError(f"--from={source} is a local file: give its KIND and --out.")
        return convert(kind, source, out, **options)
    if os.path.isdir(source):  # (resolve would return it as it is: nothing converted)
        raise errors.UserError(f"--from={source} is a local folder: --from takes a released "
                               "name, hf://OWNER/REPO/FILE, a URL or a checkpoint file.")
    if loaders.is_released(source):
        entry = registry.get(source)
        if kind is not None and kind != entry.kind:
            what = (f"a {entry.kind} checkpoint" if entry.kind else
                    f"a file used as it is ({entry.description})")
            raise errors.UserError(f"{source} is {what}, not a {kind} checkpoint.")
        kind = entry.kind
    cached = loaders.resolve(source, kind, cache_dir, converted, **_options(**options))
    if not os.path.exists(cached):
        raise errors.UserError(f"--from={source}: no such file, released name or URL.")
    if not out:
        return cached
    if os.path.exists(out):
        raise errors.UserError(f"--out={out} already exists; choose a new directory (the "
                               f"converted weights are in {cached}).")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # (a copy killed midway, kill -9, is removed by the next copy into the same folder)
    workfiles.remove_stale(parent, lambda name: name.startswith(COPY_PREFIX))
    tmp = tempfile.mkdtemp(prefix=download.work_prefix(COPY_PREFIX), dir=parent)
    try:
        copy = os.path.join(tmp, "copy")
        if os.path.isdir(cached):
            shutil.copytree(cached, copy)
        else:
            shutil.copy2(cached, copy)
        return download.replace_dir(copy, os.path.abspath(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("from", None, "Released weights: a name (" + ", ".join(
        sorted(registry.RELEASED)) + "), hf://OWNER/REPO/FILE or a URL (with KIND), or a local "
        "official file (with KIND and --out); fetched, checked and converted once into the "
        "cache.", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, "Where fetched and converted weights are kept "
                        f"(default: ${download.CACHE_ENV} or ~/.cache/tok1d).", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "The official file: .bin / .pt / .pth / "
                        ".safetensors / .npz state_dict (lpips: the LPIPS linear layers, "
                        "vgg.pth).", flag_values=fv)
    flags.DEFINE_string("out", None, "The new pretrained directory (with --from: a copy of "
                        "the cached one; default: none).", flag_values=fv)
    flags.DEFINE_string("official_config", None, "titok, gigatok, maskgit: the official config "
                        "(JSON / YAML); default: sizes from the tensor shapes.", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Input resolution (default: from the positional "
                         "embeddings).", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("preset", None, "gigatok: released size (s_s, s_b, b_l, xl_xxl, s_s_2d, "
                        "s_b_2d, b_l_2d).", flag_values=fv)
    flags.DEFINE_integer("pos_grid", None, "dinov2: resample the position table to this grid "
                         "(GigaTok's teacher: 16, i.e. 224 px inputs).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("size", None, "gpt: size name (B, L, XL, XXL, XXXL) fixing the head "
                        "count (default: from the width); rar: the released size (B, L, XL, "
                        "XXL) the file must be (default: sizes from the shapes).",
                        flag_values=fv)
    flags.DEFINE_enum("weights", "model", ["model", "ema"], "gpt: which weights of a training "
                      "checkpoint (model, as the official sampler).", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "gpt: attention heads, for a width that is not a "
                         "released size.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("vgg", None, "lpips: torchvision's VGG16 state_dict "
                        "(vgg16-397923af.pth), unless --checkpoint holds the whole LPIPS module.",
                        flag_values=fv)


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    errors.check_output_dir(fv.out, "--out")
    kind = args[0] if args else None
    if kind is not None and kind not in KINDS:
        raise errors.UserError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}.")
    options = dict(config=fv.official_config, image_size=fv.image_size, preset=fv.preset,
                   pos_grid=fv.pos_grid, size=fv.size, weights=fv.weights,
                   num_heads=fv.num_heads, vgg=fv.vgg)
    source = fv["from"].value
    if source:
        if fv.checkpoint:
            raise errors.UserError("give --from or --checkpoint, not both.")
        converted: list[str] = []
        out = convert_from(source, kind, fv.out, fv.cache_dir, converted, **options)
        if not fv.out and not converted:  # nothing written
            print(f"already converted: {out}" if os.path.isdir(out) else
                  f"an official file used as it is: {out}")
            return
    else:
        for name, value in (("KIND", kind), ("--checkpoint", fv.checkpoint), ("--out", fv.out)):
            if not value:
                raise errors.UserError(f"{name} is required without --from (see --help).")
        out = convert(kind, fv.checkpoint, fv.out, **options)
    print(f"wrote {out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    app.exit_process(main())
