"""A guidance x temperature sweep of a generator's sampler, as a table, a plot and a choice.

The sampling happens in `tok1d sample --sweep` (tok1d.cli.sample.sweep); this module names the
settings, picks the best one and writes the results:

    settings = grid(sampling, model_name, guidance_scales=(0, 1, 2), temperatures=(1, 2, 4))
    rows = [row(setting, generation_metrics, inception) for setting in settings]  # gfid, sfid...
    write(out_dir, rows, choose(rows))  # sweep.json, sweep.md, sweep.png (with matplotlib)

The sampler's option names differ: MaskGIT and RAR take `guidance_scale` and
`randomize_temperature` (MaskGIT: the Gumbel temperature of its token draws and re-masking, 1 at
the first step falling to 0; RAR: a plain softmax temperature), GPT `cfg_scale` and
`temperature`. `best` is the lowest gFID (FID balances fidelity and diversity), among the
settings whose class accuracy, when measured, is at least `min_class_accuracy`; `choose` falls
back to the most class-accurate setting (and says so) when none is accurate enough. A row
carries the Inception Score only when the features are the Inception's (on another classifier,
e.g. the demo's digit CNN, that number is not the IS).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

GPT_NAMES = ("gpt", "llamagen")
COLUMNS = ("gfid", "sfid", "precision", "recall", "diversity", "class_accuracy",
           "inception_score")
INCEPTION_ONLY = ("inception_score",)
# What `write` leaves in its directory (a later sweep there is refused: `tok1d sample --sweep`).
FILES = ("sweep.json", "sweep.md", "sweep.png")
DIVERSITY_NOTE = ("diversity is NaN: every class has fewer than 2 images (intra-class diversity "
                  "compares images of one class); sample at least 2 per class (--num_images >= "
                  "2 x the classes).")


def sampler_keys(sampling: Mapping[str, Any], model_name: str) -> tuple[str, str]:
    """(guidance key, temperature key) of a sampler's options."""
    gpt = model_name in GPT_NAMES
    guidance = "cfg_scale" if ("cfg_scale" in sampling or gpt) else "guidance_scale"
    temperature = "temperature" if ("temperature" in sampling or gpt) else "randomize_temperature"
    return guidance, temperature


def grid(sampling: Mapping[str, Any], model_name: str, guidance_scales: Sequence[float],
         temperatures: Sequence[float]) -> list[dict[str, float]]:
    """One sampler override per (guidance, temperature), guidance-major. An empty list keeps the
    config's value."""
    g_key, t_key = sampler_keys(sampling, model_name)
    scales = list(guidance_scales) or [sampling.get(g_key, 0.0)]
    temps = list(temperatures) or [sampling.get(t_key, 1.0)]
    return [{g_key: float(g), t_key: float(t)} for g in scales for t in temps]


def best(rows: Sequence[Mapping[str, Any]], min_class_accuracy: float = 0.0
         ) -> Optional[Mapping[str, Any]]:
    """The row of lowest finite gFID among those with class_accuracy >= min_class_accuracy
    (rows without a class accuracy always qualify); None if no row has a gFID."""
    ok = [r for r in rows if _finite(r.get("gfid"))
          and r.get("class_accuracy", 1.0) >= min_class_accuracy]
    return min(ok, key=lambda r: r["gfid"]) if ok else None


def choose(rows: Sequence[Mapping[str, Any]], min_class_accuracy: float = 0.0,
           log=None) -> Optional[Mapping[str, Any]]:
    """`best`; when no setting qualifies, the one of highest class accuracy (the first row when
    none is measured), logged; None only without rows."""
    chosen = best(rows, min_class_accuracy)
    if chosen is not None or not rows:
        return chosen
    accuracy = [r.get("class_accuracy") for r in rows]
    chosen = max(rows, key=lambda r: r["class_accuracy"] if _finite(r.get("class_accuracy"))
                 else -math.inf)
    if log is not None:
        log(f"sweep: no setting has a gFID with class accuracy >= {min_class_accuracy:g} "
            f"(measured: {', '.join(_fmt(a) for a in accuracy)}); taking the most accurate, "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in chosen.items()) + ".")
    return chosen


def row(setting: Mapping[str, float], metrics: Mapping[str, Any], inception: bool = True
        ) -> dict[str, Any]:
    """A table row: the setting and its metrics of COLUMNS (and num_images); the Inception
    Score only when `inception` (the features are the Inception's)."""
    keep = tuple(c for c in COLUMNS if inception or c not in INCEPTION_ONLY) + ("num_images",)
    return dict(setting, **{k: float(v) for k, v in metrics.items() if k in keep})


def markdown(rows: Sequence[Mapping[str, Any]], chosen: Optional[Mapping[str, Any]],
             reference: Optional[Mapping[str, float]] = None) -> str:
    """A markdown table, one row per setting (the best marked), then the choice."""
    keys = [k for k in rows[0] if k not in COLUMNS and k != "num_images"] if rows else []
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(keys + cols) + " | best |",
             "|" + "---|" * (len(keys) + len(cols) + 1)]
    for r in rows:
        cells = [_fmt(r.get(k)) for k in keys + cols]
        lines.append("| " + " | ".join(cells) + f" | {'**best**' if r is chosen else ''} |")
    if reference:
        lines += ["", "Real held-out images: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in reference.items()) + "."]
    if notes(rows):
        lines += [""] + notes(rows)
    if chosen is not None:
        lines += ["", "Best (lowest gFID): " + ", ".join(f"{k}={chosen[k]:g}" for k in keys)
                  + f" (gFID {chosen['gfid']:.2f})."]
    return "\n".join(lines) + "\n"


def write(out_dir: str, rows: Sequence[Mapping[str, Any]], chosen: Optional[Mapping[str, Any]],
          reference: Optional[Mapping[str, float]] = None, log=print) -> dict[str, str]:
    """OUT/sweep.json (strict JSON: a non-finite number is null), OUT/sweep.md and (matplotlib
    installed) OUT/sweep.png; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "sweep.json"), "md": os.path.join(out_dir, "sweep.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_strict({"rows": list(rows), "best": chosen, "reference": reference}), f,
                  indent=2, allow_nan=False)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(rows, chosen, reference))
    if plot(rows, os.path.join(out_dir, "sweep.png"), chosen, reference):
        paths["png"] = os.path.join(out_dir, "sweep.png")
    else:
        log("matplotlib is not installed: no sweep.png (pip install matplotlib).")
    return paths


def plot(rows: Sequence[Mapping[str, Any]], path: str, chosen=None,
         reference: Optional[Mapping[str, float]] = None) -> bool:
    """gFID, precision / recall and diversity against the guidance scale, one line per
    temperature; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        return False
    g_key, t_key = [k for k in rows[0] if k not in COLUMNS and k != "num_images"][:2]
    panels = [("gfid", "gFID (lower is better)"), ("precision", "precision (—) / recall (--)"),
              ("diversity", "intra-class diversity"), ("class_accuracy", "class accuracy")]
    panels = [p for p in panels if any(p[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    temps = sorted({r[t_key] for r in rows})
    for ax, (key, title) in zip(axes[0], panels):
        for i, t in enumerate(temps):
            sub = sorted((r for r in rows if r[t_key] == t), key=lambda r: r[g_key])
            color = f"C{i}"
            ax.plot([r[g_key] for r in sub], [r.get(key, math.nan) for r in sub], "o-",
                    color=color, label=f"{t_key}={t:g}")
            if key == "precision":
                ax.plot([r[g_key] for r in sub], [r.get("recall", math.nan) for r in sub], "s--",
                        color=color)
        if reference and key in reference:
            ax.axhline(reference[key], color="k", lw=1, ls=":", label="real images")
        if chosen is not None and key in chosen:
            ax.plot([chosen[g_key]], [chosen[key]], "*", ms=16, color="gold", mec="k",
                    label="best")
        ax.set_xlabel(g_key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a reader of the table needs to read its NaNs (a diversity without two images of a
    class)."""
    if any("diversity" in r and not _finite(r["diversity"]) for r in rows):
        return [DIVERSITY_NOTE]
    return []


def _strict(value: Any) -> Any:
    """`value` with every non-finite float as None (JSON null)."""
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)
