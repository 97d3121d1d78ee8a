"""Converts a folder of images in class subfolders (INPUT/<class>/<images>, as ImageNet's)
into tok1d ArrayRecord shards (`tok1d.data.prepare`; the format: `tok1d.data.records`).

    tok1d prepare --input=/data/imagenet/train --out=/data/imagenet_ar --split=train
    tok1d prepare --input=/data/imagenet/val --out=/data/imagenet_ar --split=validation

Files that cannot be decoded are skipped and listed in OUT/skipped_<split>.txt.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import flags

from tok1d import errors
from tok1d.cli import app
from tok1d.data import prepare

USAGE = "--input=DIR --out=DIR [--split=train] [flags]"
CONFIG = None
REQUIRED = ("input", "out")
POSITIONAL = ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("input", None, "Input root: INPUT/<class>/<images>.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_string("split", "train", "Name of the split to write.", flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.0, f"Fraction of each class written to a "
                       f"{prepare.VALIDATION_SPLIT!r} split.",
                       lower_bound=0, upper_bound=1, flag_values=fv)
    flags.DEFINE_integer("num_shards", 0, "Shards of --split; 0 = about 1 GB per shard.",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("resize_shorter", 0, "If > 0, downscale images whose shorter side "
                         "exceeds this.", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("workers", None, "Decoding processes (default: all CPUs).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed for splitting and shuffling.", flag_values=fv)
    flags.DEFINE_bool("replace", False, "Write a split that --out already holds again "
                      "(without it, that is refused).", flag_values=fv)


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    errors.check_output_dir(fv.out, "--out")
    summary = prepare.prepare(input_dir=fv.input, output_dir=fv.out, split=fv.split,
                              val_fraction=fv.val_fraction, num_shards=fv.num_shards,
                              resize_shorter=fv.resize_shorter, workers=fv.workers,
                              seed=fv.seed, replace=fv.replace)
    print(prepare.format_summary(summary))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    app.exit_process(main())
