"""A config file that loads a training run's own config: `--config=<this file>:RUN`, where RUN
is the run's workdir or its config.json (`config_lib.from_run`); without RUN, the defaults
(`config_lib.base_config()`). The commands put it in for you: `--config=WORKDIR/config.json`
(or `--config=WORKDIR`); for `tok1d sample` / `tok1d evaluate` without `--config`, the
`--checkpoint` run's config; for `tok1d evaluate --samples=...` with `--config.KEY=VALUE`
overrides but no `--config`, the defaults. Overrides apply on top as usual."""

from tok1d.train import config_lib


def get_config(run: str = ""):
    return config_lib.from_run(run) if run else config_lib.base_config()
