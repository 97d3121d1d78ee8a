"""Entry point: `python -m tok1d.main --config=configs/NAME.py --workdir=DIR [--config.a.b=v]`.

The same as `tok1d train ...` (`tok1d.cli.train`): trains the tokenizer or generator of the
config, resuming from the workdir's latest checkpoint.
"""

from tok1d.cli import app
from tok1d.cli import train

if __name__ == "__main__":
    app.exit_process(app.run(train, prog="python -m tok1d.main"))
