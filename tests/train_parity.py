"""Helpers of the train-step parity tests (`tests/test_train_parity_*.py`).

The fixtures are `train_*.npz` files of the official training step (see the fixture README,
section 8): found in `$TOK1D_FIXTURES` (default ../shared/fixtures) and in `tests/fixtures`
(fixtures made by this project, same format). Compact files (a `__recipe__` entry whose
tensors are NumPy recipes, format "tok1d-compact-npz/1") are expanded in memory.

Errors are measured as the README does: max|port - ref| / max|ref| per tensor. Every
comparison goes through `Report.check`, which asserts the bound and records the measured
value; with `TOK1D_PARITY_REPORT=FILE` the records are appended to FILE as JSON lines (the
numbers of the README's "Reproducing the official recipes" table and of closing notes).
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import subprocess
import sys
import zlib
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pytest

from conftest import REPO

RECIPE_KEY = "__recipe__"
COMPACT_FORMAT = "tok1d-compact-npz/1"
LOCAL_FIXTURES = os.path.join(REPO, "tests", "fixtures")


def fixture_dirs() -> list[str]:
    shared = os.environ.get("TOK1D_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))
    return [d for d in (shared, LOCAL_FIXTURES) if os.path.isdir(d)]


def fixture_params(pattern: str) -> list:
    """pytest params, one per fixture file matching `pattern` (e.g. "train_gpt*.npz") in every
    fixture directory; a single skipping param when there is none."""
    paths = []
    for d in fixture_dirs():
        paths += sorted(glob.glob(os.path.join(d, pattern)))
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no {pattern} in {fixture_dirs() or 'any fixture directory'} "
                   "(set TOK1D_FIXTURES)"))]
    return [pytest.param(p, id=os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p))
            for p in paths]


# ----------------------------------------------------------------------------- compact files


def _draw(rec: Mapping[str, Any]) -> np.ndarray:
    shape = tuple(int(s) for s in rec["shape"])
    n = math.prod(shape)
    g = np.random.Generator(np.random.PCG64(int(rec["seed"])))
    if rec["dist"] == "normal":
        v = float(rec.get("loc", 0.0)) + float(rec["scale"]) * g.standard_normal(n, np.float64)
    elif rec["dist"] == "uniform":
        lo, hi = float(rec["low"]), float(rec["high"])
        v = lo + (hi - lo) * g.random(n, np.float64)
    else:
        raise ValueError(f"{rec['key']}: unknown recipe distribution {rec['dist']!r}")
    if rec.get("round") == "float16":
        v = v.astype(np.float16)
    elif rec.get("round") not in (None, "none"):
        raise ValueError(f"{rec['key']}: unknown rounding {rec['round']!r}")
    out = v.astype(np.dtype(rec["dtype"])).reshape(shape)
    crc = "%08x" % (zlib.crc32(np.ascontiguousarray(out).astype(
        out.dtype.newbyteorder("<")).tobytes()) & 0xFFFFFFFF)
    if rec.get("crc32") and crc != rec["crc32"]:
        raise ValueError(f"{rec['key']}: regenerated tensor has crc32 {crc}, the recipe says "
                         f"{rec['crc32']} (a NumPy with different random streams?)")
    return out


class Fixture(Mapping):
    """Read-only mapping key -> array of one fixture file (compact recipes drawn lazily)."""

    def __init__(self, path: str):
        self.path = path
        self._npz = np.load(path, allow_pickle=False)
        self._recipes = {}
        if RECIPE_KEY in self._npz.files:
            recipe = json.loads(str(self._npz[RECIPE_KEY]))
            if recipe.get("format") != COMPACT_FORMAT:
                raise ValueError(f"{path}: unknown compact format {recipe.get('format')!r}")
            self._recipes = {t["key"]: t for t in recipe["tensors"]}
            self._keys = list(recipe["keys"])
        else:
            self._keys = list(self._npz.files)
        self._cache: dict[str, np.ndarray] = {}
        self.meta = json.loads(str(self["meta"])) if "meta" in self._keys else {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._recipes:
            if key not in self._cache:
                self._cache[key] = _draw(self._recipes[key])
            return self._cache[key]
        if key not in self._keys:
            raise KeyError(key)
        return self._npz[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def sub(self, prefix: str) -> dict[str, np.ndarray]:
        """{key without prefix: array} of every key starting with `prefix` (a state dict)."""
        return {k[len(prefix):]: self[k] for k in self._keys if k.startswith(prefix)}

    def steps(self) -> int:
        return len(np.asarray(self["step/lr"]))


@functools.lru_cache(maxsize=4)
def load(path: str) -> Fixture:
    return Fixture(path)


# ----------------------------------------------------------------------------- provenance


def provenance(convert: Callable[[dict], Any], state_dict: Mapping[str, np.ndarray],
               key: str) -> Any:
    """Which elements of the converted (tok1d) tree come from official tensor `key`: a tree of
    boolean masks (None for leaves it does not touch). Found by converting twice, the second
    time with `key` shifted by a marker (converters are linear per tensor)."""
    import jax
    base = convert(dict(state_dict))
    marked = dict(state_dict)
    marked[key] = np.asarray(state_dict[key], np.float32) + 1.0
    other = convert(marked)
    masks = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), base, other)
    return jax.tree.map(lambda m: m if m.any() else None, masks)


def tensor_in_tok1d(convert: Callable[[dict], Any], state_dict: Mapping[str, np.ndarray],
                    key: str, value: np.ndarray, tok1d_tree: Any) -> tuple[np.ndarray, np.ndarray]:
    """(official `value` laid out as tok1d lays out tensor `key`, the same elements of
    `tok1d_tree`), both flattened: compares an official per-tensor quantity (an Adam moment,
    an EMA shadow) with tok1d's tree of the same quantity."""
    import jax
    masks = provenance(convert, state_dict, key)
    sd = dict(state_dict)
    sd[key] = np.asarray(value, np.float32)
    converted = convert(sd)
    want, got = [], []
    for m, w, g in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None),
                       jax.tree.leaves(converted), jax.tree.leaves(tok1d_tree)):
        if m is None:
            continue
        want.append(np.asarray(w, np.float64)[m])
        got.append(np.asarray(g, np.float64)[m])
    if not want:
        raise KeyError(f"official tensor {key} reaches no tok1d parameter")
    return np.concatenate(want), np.concatenate(got)


def tok1d_keys(convert: Callable[[dict], Any], state_dict: Mapping[str, np.ndarray],
               keys) -> set:
    """The '/'-joined tok1d parameter paths that official tensors `keys` convert into."""
    import jax
    out = set()
    for key in keys:
        masks = provenance(convert, state_dict, key)
        for path, m in jax.tree_util.tree_flatten_with_path(
                masks, is_leaf=lambda x: x is None)[0]:
            if m is not None:
                out.add("/".join(str(getattr(p, "key", p)) for p in path))
    return out


# ----------------------------------------------------------------------------- comparisons


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def abs_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want))) if got.size else 0.0


class Report:
    """Collects (quantity, measured error, bound) of one fixture; `check` asserts lazily so
    one run reports every failing quantity at once (`finish` raises with all of them)."""

    def __init__(self, recipe: str, path: str):
        self.recipe, self.path = recipe, path
        self.rows: list[dict[str, Any]] = []

    def check(self, quantity: str, err: float, bound: float, kind: str = "rel") -> float:
        self.rows.append(dict(recipe=self.recipe, fixture=os.path.basename(self.path),
                              quantity=quantity, error=float(err), bound=float(bound),
                              kind=kind, ok=bool(err <= bound)))
        return err

    def rel(self, quantity: str, got, want, bound: float) -> float:
        return self.check(quantity, rel_err(got, want), bound, "rel")

    def abs(self, quantity: str, got, want, bound: float) -> float:
        return self.check(quantity, abs_err(got, want), bound, "abs")

    def exact(self, quantity: str, got, want) -> None:
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape, (quantity, got.shape, want.shape)
        self.check(quantity, float(np.sum(got != want)), 0.0, "mismatches")

    def finish(self) -> None:
        out = os.environ.get("TOK1D_PARITY_REPORT")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                for row in self.rows:
                    f.write(json.dumps(row) + "\n")
        bad = [r for r in self.rows if not r["ok"]]
        worst = {}
        for r in self.rows:  # the worst row per quantity family, for the failure message
            fam = r["quantity"].split("[")[0]
            if fam not in worst or r["error"] / max(r["bound"], 1e-30) > \
                    worst[fam]["error"] / max(worst[fam]["bound"], 1e-30):
                worst[fam] = r
        if bad:
            lines = [f"{r['quantity']}: {r['kind']} error {r['error']:.3g} > {r['bound']:.3g}"
                     for r in bad]
            raise AssertionError(f"{self.recipe} ({self.path}): {len(bad)} of {len(self.rows)} "
                                 "checks out of bounds:\n  " + "\n  ".join(lines))


def summarize(path: str) -> str:
    """Markdown table (recipe, quantity family, worst error, bound) of a report file."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    worst: dict[tuple, dict] = {}
    for r in rows:
        key = (r["recipe"], r["fixture"], r["quantity"].split("[")[0])
        ratio = r["error"] / max(r["bound"], 1e-30)
        if key not in worst or ratio > worst[key]["error"] / max(worst[key]["bound"], 1e-30):
            worst[key] = r
    lines = ["| recipe | fixture | quantity | max error | bound |", "|---|---|---|---|---|"]
    for (recipe, fixture, q), r in sorted(worst.items()):
        lines.append(f"| {recipe} | {fixture} | {q} | {r['error']:.2g} ({r['kind']}) | "
                     f"{r['bound']:.2g} |")
    return "\n".join(lines)


def nhwc(images_nchw) -> np.ndarray:
    """(…, B, 3, H, W) float16-exact fixture images -> float32 (…, B, H, W, 3)."""
    x = np.asarray(images_nchw, np.float32)
    return np.moveaxis(x, -3, -1)


def one_device_mesh():
    """A (1, 1, 1) (data, fsdp, tensor) mesh on the first device and the default rules."""
    import jax
    from jax.sharding import AxisType
    from tok1d import parallel
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(AxisType.Auto,) * 3)
    return mesh, parallel.DEFAULT_RULES


def optional(z: Fixture, key: str) -> Optional[np.ndarray]:
    return z[key] if key in z else None


class TensorMap:
    """Where every official tensor of `state_dict` lands in the converted tok1d tree (its
    `provenance`, computed once per key), to compare many official states (params after step 1
    and at the end, EMA, Adam moments) with tok1d trees per official tensor: one conversion per
    compared state instead of `tensor_in_tok1d`'s three per tensor."""

    def __init__(self, convert: Callable[[dict], Any], state_dict: Mapping[str, np.ndarray],
                 keys=None):
        self.convert, self.base = convert, dict(state_dict)
        self.masks = {k: provenance(convert, state_dict, k)
                      for k in (state_dict if keys is None else keys)}

    def pairs(self, official: Mapping[str, np.ndarray], tok1d_tree: Any
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{key: (official value laid out as tok1d, the same elements of `tok1d_tree`)},
        flattened, for every key of `official` (a full or partial state dict of the same
        model: missing tensors are taken from the base state dict)."""
        import jax
        sd = dict(self.base)
        sd.update({k: np.asarray(v, np.float32) for k, v in official.items()})
        converted = jax.tree.leaves(self.convert(sd))
        tree = jax.tree.leaves(tok1d_tree)
        out = {}
        for key in official:
            want, got = [], []
            for m, w, g in zip(jax.tree.leaves(self.masks[key], is_leaf=lambda x: x is None),
                               converted, tree):
                if m is not None:
                    want.append(np.asarray(w, np.float64)[m])
                    got.append(np.asarray(g, np.float64)[m])
            if not want:
                raise KeyError(f"official tensor {key} reaches no tok1d parameter")
            out[key] = (np.concatenate(want), np.concatenate(got))
        return out


# ----------------------------------------------------------------------------- float64 runs

_FLOAT64_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # XLA flags and the compilation cache, before JAX starts
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
jnp.float32 = jnp.float64  # every float32 of tok1d / Flax / optax (imported below): float64
import importlib
getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(*sys.argv[3:])
"""


def run_in_float64(module: str, function: str, *args: str, timeout: int = 1800) -> None:
    """Runs `tests/<module>.py: function(*args)` (string arguments) in a subprocess where JAX
    computes in float64: x64 on and `jnp.float32` rebound to float64 before tok1d, Flax and
    optax are imported, so the trainer's real jitted step runs in float64. Its results must
    land on the official float32 run within the fixture's own float32-vs-float64 floors: this
    checks the step's semantics past the steps where float32 rounding noise (amplified by
    ReLU / max-pool / LeakyReLU kinks and AdamW's sign-like first updates) makes a float32
    port drift. Asserts that the subprocess succeeded (its output in the message)."""
    script = _FLOAT64_SCRIPT.format(tests=os.path.join(REPO, "tests"))
    run = subprocess.run([sys.executable, "-c", script, module, function, *args],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ),
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
