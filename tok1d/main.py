"""Entry point: `python -m tok1d.main --config=configs/NAME.py --workdir=DIR [--config.a.b=v]`.

Starts multi-host JAX when asked (`--config.distributed.coordinator_address=...`, or
TOK1D_DISTRIBUTED=1 for auto-detection on TPU pods / SLURM), validates the config, and runs the
trainer named by `config.trainer`.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def trainers():
    from tok1d.cli import demo
    from tok1d.probes import ar
    from tok1d.train import generator
    from tok1d.train import tokenizer
    return {"tokenizer": lambda c, w: tokenizer.train_and_evaluate(c, w,
                                                                   ar_probe=ar.make_ar_probe),
            "generator": generator.train_and_evaluate,
            "demo": demo.train_and_evaluate}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    import jax
    from tok1d import parallel
    dist = config.distributed
    parallel.setup_process(dist.coordinator_address, dist.num_processes, dist.process_id)
    logging.getLogger().setLevel(logging.INFO)
    logging.info("JAX %s, process %d/%d, %d devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.device_count(),
                 jax.devices()[0].platform)
    from tok1d.train import config_lib
    table = trainers()
    if config.trainer not in table:
        print(f"Unknown trainer {config.trainer!r}; known: {sorted(table)}.", file=sys.stderr)
        sys.exit(2)
    try:  # Every trainer validates the config before it touches the workdir.
        table[config.trainer](config, FLAGS.workdir)
    except config_lib.ConfigError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
