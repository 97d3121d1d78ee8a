"""Pretrained weights on disk: one format for converted official checkpoints, exported training
runs and frozen helper networks (teachers, perceptual nets).

A pretrained directory holds
    tok1d_model.json   {"name": <registry name in tok1d.models>, "kwargs": {...}, "source": ...}
    params/            an orbax checkpoint of the parameter tree (host NumPy arrays)

    model, params = load_pretrained("titok_l32/")      # rebuilds the model from the registry
    params = load_params("titok_l32/")                 # just the tree

`load_params` also accepts a training workdir (or its checkpoints/ folder): then the EMA params
of the latest checkpoint are read (the plain params when the run had no EMA).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

MODEL_FILE = "tok1d_model.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "dtype") and not isinstance(value, np.ndarray):  # a jnp dtype class
        return np.dtype(value).name
    return value


def save_pretrained(directory: str, name: str, kwargs: Mapping[str, Any],
                    params: Mapping[str, Any], source: str = "") -> str:
    """Writes params (+ how to rebuild the model) to `directory` (created; must not exist)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, "params")):
        raise FileExistsError(f"{directory} already holds pretrained params; choose a new "
                              "directory (nothing was overwritten).")
    os.makedirs(directory, exist_ok=True)
    from flax import linen as nn

    host = _to_host(nn.unbox(params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), host)
    with open(os.path.join(directory, MODEL_FILE), "w", encoding="utf-8") as f:
        json.dump({"name": name, "kwargs": _jsonable(dict(kwargs)), "source": source}, f,
                  indent=2)
    return directory


def _to_host(tree: Any) -> Any:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if isinstance(tree, Mapping):
        return {k: _to_host(v) for k, v in tree.items()}
    return np.asarray(tree)


def _restore_numpy(path: str) -> dict[str, Any]:
    """Restores an orbax pytree checkpoint as host NumPy arrays, whatever devices wrote it."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, restore_args=restore_args)


def read_model_spec(directory: str) -> Optional[dict[str, Any]]:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _latest_training_state(directory: str) -> str:
    ckpt_dir = directory
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        ckpt_dir = os.path.join(directory, "checkpoints")
    steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{directory}: neither a pretrained directory ({MODEL_FILE} + "
                                "params/) nor a training workdir with checkpoints")
    return os.path.join(ckpt_dir, str(steps[0]), "state")


def load_params(directory: str, use_ema: bool = True) -> dict[str, Any]:
    """Params of a pretrained directory, or of the latest checkpoint of a training workdir."""
    directory = os.path.abspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"pretrained weights {directory} do not exist")
    if read_model_spec(directory) is not None:
        return _restore_numpy(os.path.join(directory, "params"))
    state = _restore_numpy(_latest_training_state(directory))
    if use_ema and state.get("ema_params") is not None:
        return state["ema_params"]
    return state["params"]


def load_pretrained(directory: str, **model_overrides: Any):
    """(model, params) of a pretrained directory; `model_overrides` e.g. dtype="bfloat16"."""
    from tok1d import models

    spec = read_model_spec(directory)
    if spec is None:
        raise FileNotFoundError(f"{directory} has no {MODEL_FILE}; convert or export weights "
                                "with `python -m tok1d.cli.convert` first")
    kwargs = dict(spec["kwargs"], **model_overrides)
    return models.create(spec["name"], **kwargs), load_params(directory)


def load_checked(path: str, shapes: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Params of `path` (pretrained directory or training workdir) that must match `shapes` (the
    model's abstract params) exactly: every array present with its shape, else a ValueError
    naming what differs."""
    import flax.traverse_util as tu

    merged, done, problems = merge_into(shapes, load_params(path))
    missing = len(tu.flatten_dict(dict(shapes))) - len(done)
    if problems or missing:
        raise ValueError(f"Weights {path} do not match {what}: "
                         + "; ".join(problems + ([f"{missing} parameter arrays missing"]
                                                 if missing else [])))
    return merged


def merge_into(params: Mapping[str, Any], loaded: Mapping[str, Any],
               mapping: Optional[Mapping[str, str]] = None) -> tuple[dict[str, Any], list[str],
                                                                     list[str]]:
    """Copies the leaves of `loaded` into `params` where the path and shape agree.

    `mapping` renames top-level groups of `loaded` first (e.g. {"decoder": "pixel_decoder"}).
    Returns (new params, loaded paths, problems) where problems lists shape mismatches.
    """
    import flax.traverse_util as tu

    if mapping:
        loaded = {mapping[k]: v for k, v in loaded.items() if k in mapping}
    flat = tu.flatten_dict(dict(params))
    src = tu.flatten_dict(dict(loaded))
    done, problems = [], []
    for path, value in src.items():
        if path not in flat:
            continue
        if tuple(np.shape(value)) != tuple(flat[path].shape):
            problems.append(f"{'/'.join(path)}: model {tuple(flat[path].shape)} vs weights "
                            f"{tuple(np.shape(value))}")
            continue
        flat[path] = np.asarray(value, dtype=flat[path].dtype)
        done.append("/".join(path))
    return tu.unflatten_dict(flat), done, problems
