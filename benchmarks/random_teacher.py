"""Writes the frozen teacher of a recipe with random weights as a converted directory, so that
a benchmark run loads it the way a real run loads the converted teacher (a few hundred MB
read from disk) instead of drawing it at random (`teacher.allow_random_init`: seconds of
initialisation a real run never pays). Prints the flag to pass, or nothing when the recipe has
no teacher:

    python benchmarks/random_teacher.py configs/titok.py:l32_stage1 OUT_DIR
    # --config.teacher.weights=OUT_DIR/maskgit_vqgan
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tok1d.cli import app  # noqa: E402
from tok1d.train import tokenizer as tok_trainer  # noqa: E402
from tok1d.weights import pretrained  # noqa: E402


def main(spec: str, out_dir: str) -> str:
    config = app.load_config_file(spec)
    name = config.teacher.name
    if not name:
        return ""
    directory = os.path.join(os.path.abspath(out_dir), name)
    if not os.path.exists(directory):
        with config.unlocked():
            config.teacher.weights = ""
            config.teacher.allow_random_init = True
        teacher, params = tok_trainer.build_teacher(config, tok_trainer.build_model(config))
        pretrained.save_pretrained(directory, name, pretrained.registry_kwargs(name, teacher),
                                   params)
    return f"--config.teacher.weights={directory}"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    print(main(*sys.argv[1:3]))
