"""Where tok1d keeps weights on disk, written down once.

A pretrained directory (converted official checkpoints, exported runs, frozen helper networks):

    DIR/tok1d_model.json     {"name": registry name in tok1d.models, "kwargs": {...}, "source": ...}
    DIR/params/              an orbax checkpoint of the parameter tree

A training workdir (what `python -m tok1d.main --workdir=WORKDIR` writes):

    WORKDIR/config.json                        the run's config (the model is rebuilt from it)
    WORKDIR/checkpoints/<step>/state/          orbax item: the train state (params, ema_params,
                                               opt_state, ...)
    WORKDIR/checkpoints/<step>/data_iter/      (earlier versions) the grain iterator state,
                                               not read: batches restart at the step

Wherever weights are read, a workdir means its latest checkpoint and `WORKDIR/checkpoints/<step>`
that step's (`step_folder`, `run_dir`).

The trainers' checkpointer (`tok1d.train.checkpoint`) writes the items named here; the loaders
(`tok1d.weights.loaders`) read them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from tok1d import errors

MODEL_FILE = "tok1d_model.json"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"


# --------------------------------------------------------------------------- pretrained directory

def params_dir(directory: str) -> str:
    return os.path.join(directory, PARAMS_DIR)


def lacks_weights(directory: str) -> bool:
    """True for a pretrained directory whose model file has no finished params checkpoint
    beside it (orbax writes `_CHECKPOINT_METADATA` last); False for any other directory (the
    perceptual networks' .npz files)."""
    return (os.path.isfile(os.path.join(directory, MODEL_FILE))
            and not os.path.isfile(os.path.join(params_dir(directory), "_CHECKPOINT_METADATA")))


def read_model_spec(directory: str) -> Optional[dict[str, Any]]:
    """{"name", "kwargs", "source"} of a pretrained directory; None when it is not one."""
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        return None
    return read_json(path)


def write_model_spec(directory: str, name: str, kwargs: Mapping[str, Any], source: str) -> None:
    with open(os.path.join(directory, MODEL_FILE), "w", encoding="utf-8") as f:
        json.dump({"name": name, "kwargs": dict(kwargs), "source": source}, f, indent=2)


# --------------------------------------------------------------------------- training workdir

def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINTS_DIR)


def step_folder(path: str) -> Optional[tuple[str, int]]:
    """(workdir, step) of one checkpoint's folder `WORKDIR/checkpoints/<step>` (there or not);
    None for any other path."""
    path = os.path.normpath(os.path.abspath(path))
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.basename(parent) == CHECKPOINTS_DIR:
        return os.path.dirname(parent), int(name)
    return None


def run_dir(path: str) -> str:
    """The training workdir `path` belongs to: the workdir of one checkpoint's folder or of a
    checkpoints/ folder; `path` itself otherwise."""
    found = step_folder(path)
    if found is not None:
        return found[0]
    path = os.path.normpath(os.path.abspath(path))
    if os.path.basename(path) == CHECKPOINTS_DIR and not os.path.isfile(config_path(path)):
        return os.path.dirname(path)
    return path


def checkpoint_steps(path: str) -> list[int]:
    """Steps with a checkpoint, ascending; `path` is a workdir or its checkpoints/ folder."""
    ckpt = checkpoint_dir(path) if os.path.isdir(checkpoint_dir(path)) else path
    if not os.path.isdir(ckpt):
        return []
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def latest_step(path: str) -> Optional[int]:
    """The newest checkpoint step of a workdir (or of its checkpoints/ folder), None if none."""
    steps = checkpoint_steps(path)
    return steps[-1] if steps else None


def state_path(path: str, step: Optional[int] = None) -> str:
    """The train-state item of checkpoint `step` (default: the latest) of a workdir (or of its
    checkpoints/ folder); FileNotFoundError when there is none."""
    step = latest_step(path) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: neither a pretrained directory ({MODEL_FILE} + "
                                f"{PARAMS_DIR}/) nor a training workdir with checkpoints")
    ckpt = checkpoint_dir(path) if os.path.isdir(checkpoint_dir(path)) else path
    if not os.path.isdir(os.path.join(ckpt, str(step))):
        raise FileNotFoundError(f"{ckpt} has no checkpoint at step {step} (its steps: "
                                f"{', '.join(map(str, checkpoint_steps(ckpt))) or 'none'})")
    return os.path.join(ckpt, str(step), STATE_ITEM)


def read_config(workdir: str) -> dict[str, Any]:
    """The config a training workdir was run with (its config.json as a dict)."""
    return read_json(config_path(workdir))


def read_json(path: str) -> Any:
    """A JSON file tok1d wrote; a damaged one is a UserError naming it."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise errors.UserError(f"{path} is not valid JSON ({e}): it is damaged or was not "
                                   "written by tok1d.") from None


def model_kwargs(config: Any) -> dict[str, Any]:
    """Keyword arguments for `tok1d.models.create(config.model.name, ...)` of a run's config (a
    ConfigDict or a workdir's config.json loaded as one): the model dict plus the data's image
    size and the compute / parameter dtypes."""
    kwargs = dict(config.model)
    kwargs.pop("name", None)
    if config.trainer != "generator":  # generators see codes, not images
        kwargs.setdefault("image_size", config.data.image_size)
    kwargs["dtype"] = config.precision
    kwargs["param_dtype"] = "float32"
    return kwargs
