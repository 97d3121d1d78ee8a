"""A config file that loads a training run's own config: `--config=<this file>:RUN`, where RUN
is the run's workdir or its config.json (`config_lib.from_run`). The commands put it in for
you: `--config=WORKDIR/config.json` (or `--config=WORKDIR`), and for `tok1d sample` /
`tok1d evaluate` without `--config`, the `--checkpoint` run's config; `--config.KEY=VALUE`
overrides apply on top as usual."""

from tok1d.train import config_lib


def get_config(run: str):
    return config_lib.from_run(run)
