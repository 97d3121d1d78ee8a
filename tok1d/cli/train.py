"""Trains the tokenizer or generator of a config (`config.trainer`), resuming from the
workdir's latest checkpoint.

    tok1d train --config=configs/NAME.py --workdir=DIR [--config.key.sub=value ...]
    python -m tok1d.main --config=configs/NAME.py --workdir=DIR [...]     (the same)

Starts multi-host JAX when asked (`--config.distributed.coordinator_address=...`, or
TOK1D_DISTRIBUTED=1 for auto-detection on TPU pods / SLURM), validates the config, and runs the
trainer named by `config.trainer` ("tokenizer", "generator" or "demo").
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import jax
from absl import flags

from tok1d import errors
from tok1d import parallel
from tok1d.cli import app, demo
from tok1d.probes import ar
from tok1d.train import generator, loop, tokenizer

USAGE = "--config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...] [flags]"
CONFIG = ("Config file (get_config()); FILE:ARG passes ARG to get_config. A run's "
          "config.json (or its workdir) gives the config that run was started with.")
REQUIRED = ("config", "workdir")
POSITIONAL = ""
TRAINERS = {"tokenizer": functools.partial(tokenizer.train_and_evaluate,
                                          ar_probe=ar.make_ar_probe),
            "generator": generator.train_and_evaluate,
            "demo": demo.train_and_evaluate}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (a "
                        "rerun resumes from it).", flag_values=fv)


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    config = fv.config
    errors.check_output_dir(fv.workdir, "--workdir")
    if config.trainer not in TRAINERS:
        raise errors.UserError(f"unknown trainer {config.trainer!r} (config.trainer); "
                               f"known: {', '.join(sorted(TRAINERS))}.")
    dist = config.distributed
    parallel.setup_process(dist.coordinator_address, dist.num_processes, dist.process_id)
    app.check_same_command(config)
    # Every process says who it is (the launch logs of a multi-host job show each one joined).
    logging.info("JAX %s, process %d/%d, %d devices (%s).", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform,
                 extra={parallel.EVERY_PROCESS: True})
    made = first_missing(fv.workdir)  # None: the workdir exists
    try:
        os.makedirs(fv.workdir, exist_ok=True)
        with loop.workdir_lock(fv.workdir):  # one run at a time in a workdir
            TRAINERS[config.trainer](config, fv.workdir)  # validates the config first
    except errors.WorkdirInUse:
        raise  # (the folder is the other run's, even if it was made a moment ago)
    except BaseException:
        if made is not None:  # a fresh run that stopped before writing anything leaves no
            remove_empty(fv.workdir, made)  # empty folders (the workdir and those above)
        raise


def first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def remove_empty(directory: str, up_to: str) -> None:
    """Removes `directory` and its parents up to `up_to` while they are empty."""
    directory = os.path.abspath(directory)
    while True:
        try:
            os.rmdir(directory)  # only removes an empty directory
        except OSError:
            return
        if directory == up_to or len(directory) <= len(up_to):
            return
        directory = os.path.dirname(directory)


if __name__ == "__main__":
    app.exit_process(app.run(sys.modules[__name__]))
