"""The quantizer comparison: every quantizer on the same small TiTok (configs/quantizers.py),
same data (the embedded digits), same steps; eval PSNR, codebook usage, perplexity and
dead codes after training, and the validation loss of a small GPT fitted on each tokenizer's
codes (the AR probe of configs/quantizers.py). Writes a Markdown table and a plot.

    python benchmarks/quantizers.py --out DIR [--quantizers vq,fsq,...] [--steps N]

Each variant is one `python -m tok1d.main` run (workdir DIR/<name>); DIR/quantizers.md holds
the table, DIR/quantizers.png the plot (matplotlib, if installed), DIR/quantizers.json the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NAMES = ("vq", "clustering_vq", "simvq", "residual_vq", "fsq", "lfq", "bsq", "vae")


def run(name: str, out: str, steps: int | None) -> dict:
    workdir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "tok1d.main", f"--config=configs/quantizers.py:{name}",
           f"--workdir={workdir}"]
    if steps:
        cmd += [f"--config.total_steps={steps}", f"--config.eval_every_steps={steps}",
                f"--config.checkpoint.every_steps={steps}"]
    subprocess.run(cmd, cwd=REPO, check=True)
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def final_eval(metrics) -> dict:
    """The last evaluation's numbers of a run's metrics.json."""
    if isinstance(metrics, list):
        evals = [m for m in metrics if any(k.startswith("eval/") or k == "psnr" for k in m)]
        metrics = evals[-1] if evals else metrics[-1]
    return {k.split("/", 1)[-1]: v for k, v in metrics.items()}


def table(rows: dict) -> str:
    lines = ["| quantizer | PSNR (dB) | codebook usage | perplexity | dead codes "
             "| AR-probe val loss (nats/code) |", "|---|---|---|---|---|---|"]
    for name, m in rows.items():
        usage = m.get("codebook_usage")
        probe = m.get("ar_probe_val_loss")
        lines.append(
            f"| `{name}` | {m['psnr']:.2f} | "
            + (f"{usage:.3f} | {m['codebook_perplexity']:.1f} | {m['codebook_dead']:.0f} | "
               if usage is not None else "– | – | – | ")
            + (f"{probe:.3f} |" if probe is not None else "– (continuous) |"))
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].bar(names, [rows[n]["psnr"] for n in names])
    axes[0].set_ylabel("eval PSNR (dB)")
    axes[1].bar(names, [rows[n].get("codebook_perplexity", 0.0) for n in names])
    axes[1].set_ylabel("code perplexity (of 64)")
    axes[2].bar(names, [rows[n].get("ar_probe_val_loss", 0.0) for n in names])
    axes[2].set_ylabel("AR-probe val loss (nats/code)")
    fig.suptitle("Quantizers on one small TiTok (configs/quantizers.py), 32x32 digits, same steps "
                 "(0: not applicable)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quantizers", default=",".join(NAMES))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = {name: final_eval(run(name, args.out, args.steps))
            for name in args.quantizers.split(",")}
    with open(os.path.join(args.out, "quantizers.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = table(rows)
    with open(os.path.join(args.out, "quantizers.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.out, "quantizers.png"))
    print(text)


if __name__ == "__main__":
    main()
