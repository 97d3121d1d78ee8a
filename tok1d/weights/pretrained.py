"""Writing pretrained directories (`tok1d.weights.layout`): converted official checkpoints,
exported training runs and frozen helper networks share one format, read back by
`tok1d.weights.loaders.load_pretrained`.

    save_pretrained("titok_l32/", "titok", registry_kwargs("titok", model), params)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tok1d.models.generators.maskgit import MaskGITUViT
from tok1d.weights import layout


def jsonable(value: Any) -> Any:
    """`value` with tuples as lists, ConfigDicts as dicts and dtypes as their names
    (JSON-serialisable kwargs)."""
    if isinstance(value, ml_collections.ConfigDict):  # e.g. a run's quantizer_options
        value = value.to_dict()
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if hasattr(value, "dtype") and not isinstance(value, np.ndarray):  # a jnp dtype class
        return np.dtype(value).name
    return value


def registry_kwargs(kind: str, model: nn.Module) -> dict[str, Any]:
    """The `tok1d.models.create(kind, ...)` arguments that rebuild `model`: its fields without
    the compute / parameter dtypes (chosen when loading)."""
    kwargs = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name", "dtype", "param_dtype")}
    if kind == "maskgit":  # the registry picks the class by arch
        kwargs["arch"] = "uvit" if isinstance(model, MaskGITUViT) else "vit"
    return kwargs


def check_target(directory: str) -> None:
    """A FileExistsError for a directory that a pretrained directory must not be written to:
    one that holds params already, or a training workdir (its config.json or checkpoints/):
    the loaders read a pretrained directory first, so the run's own model would be hidden
    behind the converted one, without a word."""
    directory = os.path.abspath(directory)
    if os.path.exists(layout.params_dir(directory)):
        raise FileExistsError(f"{directory} already holds pretrained params; choose a new "
                              "directory (nothing was overwritten).")
    if (os.path.exists(layout.config_path(directory))
            or os.path.exists(layout.checkpoint_dir(directory))):
        raise FileExistsError(f"{directory} is a training workdir ({layout.CONFIG_FILE}, "
                              f"{layout.CHECKPOINTS_DIR}/): converted weights there would hide "
                              "the run's own; choose a new directory (nothing was written).")


def save_pretrained(directory: str, name: str, kwargs: Mapping[str, Any],
                    params: Mapping[str, Any], source: str = "") -> str:
    """Writes params (+ how to rebuild the model) to `directory` (created; refused where it
    already holds params). The model file comes first and the params last (orbax renames them
    into place when complete): an interrupted write leaves a directory that loaders call
    incomplete (`layout.lacks_weights`) and that the same command completes."""
    directory = os.path.abspath(directory)
    check_target(directory)
    os.makedirs(directory, exist_ok=True)
    layout.write_model_spec(directory, name, jsonable(dict(kwargs)), source)
    host = _to_host(nn.unbox(params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(layout.params_dir(directory), host)
    return directory


def _to_host(tree: Any) -> Any:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if isinstance(tree, Mapping):
        return {k: _to_host(v) for k, v in tree.items()}
    return np.asarray(tree)
