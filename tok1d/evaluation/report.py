"""Evaluation results as files people read: `metrics.json`, TensorBoard scalars and images, and a
short `report.md` with a metric table (each number explained) and the PNG grids beside it."""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tok1d import images as images_lib
from tok1d import errors, parallel, summary

# What each metric is, for the report (lower / higher is better).
METRIC_DOCS = {
    "rfid": "rFID: Frechet Inception distance of the reconstructions to their inputs (lower is "
            "better)",
    "gfid": "gFID: Frechet Inception distance of the samples to the reference (lower is better)",
    "fid": "Frechet Inception distance (lower is better)",
    "sfid": "sFID: Frechet distance of ADM's spatial Inception features (mixed_6/conv, 7 "
            "channels; lower is better)",
    "inception_score": "Inception Score (higher is better)",
    "inception_score_std": "std of the Inception Score over the splits",
    "precision": "precision, k=3 manifolds of the feature network's features (higher is better)",
    "recall": "recall, k=3 manifolds of the feature network's features (higher is better)",
    "psnr": "PSNR in dB of the reconstructions (higher is better)",
    "ssim": "SSIM of the reconstructions (Gaussian 11x11, sigma 1.5; higher is better)",
    "lpips": "LPIPS-VGG v0.1 distance of the reconstructions (lower is better)",
    "l2": "mean squared error of the reconstructions in [0, 1]",
    "codebook_usage": "fraction of the codebook used on this split",
    "codebook_perplexity": "perplexity of the code distribution (effective number of codes)",
    "codebook_dead": "codebook entries never used on this split",
    "proxy_accuracy": "stage 1: accuracy of the predicted proxy codes",
    "num_examples": "images evaluated",
    "num_images": "images evaluated",
    "rfid_digits": "Frechet distance of the reconstructions to the held-out digits on the demo's "
                   "digit-classifier features (a demo metric, not Inception FID; lower is better)",
    "gfid_digits": "Frechet distance of the samples to the held-out digits on the digit-"
                   "classifier features (a demo metric, not Inception FID; lower is better)",
    "diversity": "mean pairwise feature distance between samples of one class (0: copies)",
    "real_diversity": "the same for the real held-out digits (what diversity should reach)",
    "feature_net_accuracy": "digit CNN accuracy on the real held-out digits",
    "sample_class_accuracy": "fraction of samples the digit CNN sees as the requested class",
    "reconstruction_class_accuracy": "digit CNN accuracy on the reconstructions",
    "linear_probe_accuracy": "linear probe top-1 accuracy of the AR features (higher is better)",
    "linear_probe_train_accuracy": "the linear probe's accuracy on its last epoch's training "
                                   "batches",
    "linear_probe_layer": "the block whose features the linear probe reads (1 = the first)",
    "tokenizer_probe_accuracy": "linear probe top-1 accuracy of the tokenizer's own features "
                                "(GigaTok: does not follow generation quality)",
    "tokenizer_probe_train_accuracy": "the tokenizer probe's accuracy on its last epoch's "
                                      "training batches",
}


def meaning(name: str) -> str:
    """The report's description of a metric (`{metric}_k{k}`: of the first k tokens)."""
    if name in METRIC_DOCS:
        return METRIC_DOCS[name]
    base, _, k = name.rpartition("_k")
    if base in METRIC_DOCS and k.isdigit():
        return f"{METRIC_DOCS[base]}, first {k} tokens decoded"
    return ""


def format_value(value: Any, name: str = "") -> str:
    """A metric as reports and consoles print it (integers whole, with thousands separators;
    so is a count or an index, a metric `name`d num_* or *_layer, kept as a float:
    num_images 40, not 40.0000)."""
    whole = isinstance(value, (float, np.floating)) and float(value).is_integer()
    counted = name.startswith("num_") or name.endswith("_layer")
    if isinstance(value, (int, np.integer)) or (whole and (abs(value) >= 100 or counted)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def markdown(title: str, metrics: Mapping[str, Any], grids: Sequence[str] = (),
             details: Optional[Mapping[str, Any]] = None, notes: Sequence[str] = (),
             sections: Sequence[str] = ()) -> str:
    """The text of report.md (grids: PNG file names next to it; sections: markdown blocks
    after the metric table)."""
    lines = [f"# {title}", "", "| metric | value | meaning |", "|---|---|---|"]
    for name, value in metrics.items():
        lines.append(f"| {name} | {format_value(value, name)} | {meaning(name)} |")
    for section in sections:
        lines += ["", section.rstrip("\n")]
    for grid in grids:
        lines += ["", f"![{grid}]({grid})"]
    if details:
        lines += ["", "## Setup", ""]
        lines += [f"- **{k}**: {v}" for k, v in details.items()]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# What `write_report` leaves in its directory that a later report would replace or append to.
REPORT_FILES = ("report.md", "metrics.json", "metrics.jsonl")


def refuse_earlier_results(out_dir: str, names: Sequence[str] = REPORT_FILES,
                           flag: str = "--out") -> None:
    """A UserError when `out_dir` already holds one of `names` (an earlier run's results,
    kept: nothing is replaced or appended to). Process 0 writes, so its view decides on every
    host. Call it before any work."""
    held = parallel.process_0_view([os.path.exists(os.path.join(out_dir, n)) for n in names])
    found = [n for n, h in zip(names, held) if h]
    if found:
        raise errors.UserError(f"{flag}={out_dir} already holds {' and '.join(found)}; choose "
                               f"another {flag} (or delete it).")


def write_report(out_dir: str, title: str, metrics: Mapping[str, Any],
                 grids: Optional[Mapping[str, np.ndarray]] = None,
                 details: Optional[Mapping[str, Any]] = None, notes: Sequence[str] = (),
                 step: Optional[int] = None, enabled: bool = True,
                 sections: Sequence[str] = ()) -> str:
    """Writes metrics.json, one PNG per grid, report.md and TensorBoard events (scalars under
    "eval/", images) to `out_dir`; returns the report path. `step`: the training step of the
    weights evaluated (None: not a training checkpoint's; TensorBoard's events at step 0).
    `enabled=False` on non-chief hosts."""
    path = os.path.join(out_dir, "report.md")
    if not enabled:
        return path
    os.makedirs(out_dir, exist_ok=True)
    grids = dict(grids or {})
    for name, grid in grids.items():
        images_lib.save_png(os.path.join(out_dir, f"{name}.png"), grid)
    record = {"title": title, "metrics": {k: summary._json_value(v) for k, v in metrics.items()},
              "details": {k: summary._json_value(v) for k, v in (details or {}).items()},
              "notes": list(notes), "step": step,
              "written": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(title, metrics, [f"{n}.png" for n in grids], details, notes,
                         sections))
    with summary.MetricWriter(out_dir) as writer:
        writer.write_scalars(step or 0, {f"eval/{k}": float(v) for k, v in metrics.items()
                                    if isinstance(v, (int, float, np.number))})
        if grids:
            writer.write_images(step or 0, {f"eval/{k}": v for k, v in grids.items()})
    return path


def curve_table(x_name: str, rows: Mapping[int, Mapping[str, float]]) -> str:
    """A markdown table with one row per x (e.g. the prefix length k) and one column per
    metric of `rows[x]`."""
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = [f"| {x_name} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for x, r in rows.items():
        cells = (format_value(r.get(n, float("nan")), n) for n in names)
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(x_name: str, rows: Mapping[int, Mapping[str, float]], title: str = ""
                ) -> Optional[np.ndarray]:
    """One panel per metric of `rows` ({x: {metric: value}}) against x on a log2 axis, as an
    RGB uint8 image; None when matplotlib (optional) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    xs = sorted(rows)
    names = [n for n in dict.fromkeys(k for r in rows.values() for k in r)
             if any(math.isfinite(float(rows[x].get(n, float("nan")))) for x in xs)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(xs, [rows[x].get(name, float("nan")) for x in xs], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(x_name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
