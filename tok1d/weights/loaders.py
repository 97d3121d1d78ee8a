"""One family of weight loaders: every place that reads weights goes through these.

Three kinds of source (the layout of the first two is `tok1d.weights.layout`):

  (a) a converted pretrained directory   `load_pretrained(DIR)` -> (model, params)
  (b) a training workdir                 the latest checkpoint's EMA params (the plain params
                                         when the run had no EMA); `load_training_state(WORKDIR)`
                                         gives the whole host state
  (c) an official file, converted on     `load_official(kind, FILE, **options)` -> (model,
      the fly                            params) (what `tok1d.cli.convert` saves)

(a) or (b) by path: `load_params(PATH)`, `load_tokenizer(PATH)` -> (model, params) (the model
rebuilt from tok1d_model.json or config.json), `describe_tokenizer(PATH)`, and
`load_checked(PATH, shapes, what)` (a model built elsewhere, e.g. a generator from its config).

Built on them, what training, tokenize, sample and evaluate need: `load_teacher`,
`load_perceptual`, `load_disc_trunk`, `load_initial_params`, `load_inception`.

(d) Released weights by name (`tok1d.weights.registry`): every loader here also takes a
registry name ("titok_l32", "rar_b", "lpips_vgg", ...), fetched, checked and converted once into
the cache (`tok1d.weights.download.cache_root`) by `resolve`; `load(NAME_OR_SOURCE)` -> (model,
params) also takes `hf://owner/repo/file`, a URL or a local official file (with `kind`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import flax.traverse_util as tu
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tok1d import errors, models
from tok1d.layers import transformer
from tok1d.models import interfaces
from tok1d.models.dino_disc import DinoDiscriminator
from tok1d.models.frozen import inception as inception_lib
from tok1d.models.frozen import perceptual as perceptual_nets
from tok1d.weights import download, layout, pretrained, registry
from tok1d.weights import perceptual as perceptual_files
from tok1d.weights.convert import common as convert_common
from tok1d.weights.convert import dino_disc as convert_dino_disc
from tok1d.weights.convert import dinov2 as convert_dinov2
from tok1d.weights.convert import gigatok as convert_gigatok
from tok1d.weights.convert import gpt as convert_gpt
from tok1d.weights.convert import inception as convert_inception
from tok1d.weights.convert import maskgit as convert_maskgit
from tok1d.weights.convert import perceptual as perceptual_convert
from tok1d.weights.convert import rar as convert_rar
from tok1d.weights.convert import titok as convert_titok
from tok1d.weights.convert import vqgan as convert_vqgan

# Official checkpoints `load_official` converts (the registry names they load as).
OFFICIAL_KINDS = ("titok", "maskgit_vqgan", "gigatok", "dinov2", "maskgit", "gpt", "rar",
                  "inception_fid")
TEACHERS = ("maskgit_vqgan", "dinov2")
TOKENIZER_KINDS = ("titok", "maskgit_vqgan", "gigatok")  # (converter kinds = model names)
GENERATOR_KINDS = ("maskgit", "gpt", "rar")
# The kinds each converter option applies to (its `tok1d convert` flag where named otherwise):
# an option given for another kind is refused, not ignored.
OPTION_KINDS = {
    "config": ("titok", "gigatok", "maskgit"), "image_size": ("titok", "gigatok"),
    "preset": ("gigatok",), "pos_grid": ("dinov2",), "size": ("gpt", "rar"),
    "weights": ("gpt",), "num_heads": ("gpt",), "model_kwargs": ("maskgit_vqgan",),
    "vgg": ("lpips",)}
OPTION_FLAGS = {"config": "official_config"}


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """A UserError naming the first option given (not None; `weights` other than "model")
    that `kind`'s converter does not take, and the kinds that take it."""
    for name, value in options.items():
        if value is None or (name, value) == ("weights", "model"):
            continue
        kinds = OPTION_KINDS.get(name, ())
        if kind not in kinds:
            raise errors.UserError(
                f"--{OPTION_FLAGS.get(name, name)} ({name}=) does not apply to {kind}: "
                + (f"only {' and '.join(kinds)} take it." if kinds else "no converter takes it."))


# --------------------------------------------------------------------------- (a) and (b)

class _NoStepMetadataWarning(logging.Filter):
    """Drops orbax's "Metadata file does not exist: .../state/_CHECKPOINT_METADATA", logged
    for every item read directly (a train state's item folder has none: the step folder holds
    it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


def _restore_numpy(path: str) -> dict[str, Any]:
    """Restores an orbax pytree checkpoint as host NumPy arrays, whatever devices wrote it; a
    damaged or incomplete one is a UserError naming it."""
    quiet = _NoStepMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _restore_numpy_item(path)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _restore_numpy_item(path: str) -> dict[str, Any]:
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(path)
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            tree, error = None, errors.brief(e)
        else:
            error = "it holds no array metadata"
        if tree is None:
            raise _damaged(path, error)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        try:
            return ckptr.restore(path, restore_args=restore_args)
        except (OSError, ValueError) as e:  # an array file missing or cut short
            raise _damaged(path, errors.brief(errors.innermost(e), 300)) from None


def _damaged(state: str, why: str) -> errors.UserError:
    """The error for a checkpoint's state item `state` that cannot be read (`why`), naming the
    run's other checkpoints where there are some."""
    return errors.UserError(f"{state} is not a readable checkpoint ({why}): its files are "
                            f"damaged or incomplete{_other_checkpoints(state)}.")


def _other_checkpoints(state: str) -> str:
    """"; the run's other checkpoints are at steps ... (e.g. --checkpoint=...)" for the state
    item of a training workdir's checkpoint with others beside it; "" otherwise."""
    found = layout.step_folder(os.path.dirname(state))
    if found is None:
        return ""
    workdir, step = found
    others = [s for s in layout.checkpoint_steps(workdir) if s != step]
    if not others:
        return ""
    folder = os.path.join(layout.checkpoint_dir(workdir), str(max(others)))
    return (f"; the run's other checkpoints are at steps {', '.join(map(str, others))} "
            f"(e.g. --checkpoint={folder})")


def load_training_state(workdir: str, step: Optional[int] = None) -> dict[str, Any]:
    """The train state (params, ema_params, opt_state, ...) of checkpoint `step` (default: the
    latest) of a training workdir (or of its checkpoints/ folder), as host NumPy arrays."""
    return _restore_numpy(layout.state_path(os.path.abspath(workdir), step))


def checkpoint_step(path: str) -> Optional[int]:
    """The step `load_params(path)` reads: the latest checkpoint of a training workdir (or of
    its checkpoints/ folder), the step of one checkpoint's folder (`layout.step_folder`); None
    for a pretrained directory, a released name or a path that is not there."""
    if not os.path.isdir(path) or layout.read_model_spec(path) is not None:
        return None
    found = layout.step_folder(path)
    return found[1] if found is not None else layout.latest_step(path)


def load_params(path: str, use_ema: bool = True, step: Optional[int] = None
                ) -> dict[str, Any]:
    """Params of a pretrained directory, or of checkpoint `step` (default: the latest) of a
    training workdir (or of its checkpoints/ folder), or of one checkpoint's folder
    (`WORKDIR/checkpoints/<step>`): the EMA params unless `use_ema` is False or the run had
    none. A released name (`resolve`) loads its converted directory."""
    path = os.path.abspath(resolve(path))
    found = layout.step_folder(path)
    if not os.path.exists(path):
        if found is not None and os.path.isdir(found[0]):
            steps = layout.checkpoint_steps(found[0])
            raise registry.UnknownName(
                f"{found[0]} has no checkpoint at step {found[1]} (its steps: "
                f"{', '.join(map(str, steps)) or 'none'})")
        raise registry.UnknownName(f"weights not found: {path} (a training workdir, a "
                                   "pretrained directory or a released name)")
    if layout.read_model_spec(path) is not None:
        return _restore_numpy(layout.params_dir(path))
    if found is not None:
        path, step = found
    state = load_training_state(path, step)
    if use_ema and state.get("ema_params") is not None:
        return state["ema_params"]
    return state["params"]


def params_fingerprint(params: Any) -> Optional[str]:
    """A short hash of the parameter tree (paths, shapes, sums, first values): tokens_info.json's
    `tokenizer_fingerprint`, which detects tokens written (or a tokenize run resumed) with other
    weights. None when the params are not all readable on this host."""
    h = hashlib.sha1()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(repr((a.shape, str(a.dtype))).encode())
        h.update(np.float64(np.sum(a, dtype=np.float64)).tobytes())
        h.update(np.asarray(a.reshape(-1)[:16], np.float64).tobytes())
    return h.hexdigest()[:16]


def load_pretrained(directory: str, **model_overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(model, params) of a pretrained directory (or a released name); `model_overrides` e.g.
    dtype="bfloat16"."""
    directory = resolve(directory)
    spec = layout.read_model_spec(directory)
    if spec is None and os.path.isfile(layout.config_path(layout.run_dir(directory))):
        raise FileNotFoundError(f"{directory} is a training workdir, not a pretrained "
                                f"directory ({layout.MODEL_FILE}): load it with "
                                "tok1d.weights.load(DIR) or loaders.load_tokenizer(DIR)")
    if spec is None:
        raise FileNotFoundError(f"{directory} has no {layout.MODEL_FILE}; convert or export "
                                "weights with `tok1d convert` first")
    if layout.lacks_weights(directory):
        raise errors.UserError(f"{directory} has no complete params (a conversion that was "
                               "interrupted?): run the same `tok1d convert` again, it "
                               "completes the directory.")
    kwargs = dict(spec["kwargs"], **model_overrides)
    return models.create(spec["name"], **kwargs), load_params(directory)


def _model_spec(path: str, what: str = "tokenizer") -> tuple[str, str, dict[str, Any]]:
    """("pretrained" | "workdir", model name, model kwargs) of a weights directory (of a
    `what`, for the message of a missing one)."""
    if not os.path.isdir(path):
        raise errors.missing_directory(what.capitalize(), path)
    spec = layout.read_model_spec(path)
    if spec is not None:
        return "pretrained", spec["name"], dict(spec["kwargs"])
    run = layout.run_dir(path)  # (of a checkpoints/ folder or one checkpoint's folder too)
    if not os.path.isfile(layout.config_path(run)):
        raise FileNotFoundError(
            f"{path} is neither a pretrained directory ({layout.MODEL_FILE} + "
            f"{layout.PARAMS_DIR}/) nor a training workdir ({layout.CONFIG_FILE} + "
            f"{layout.CHECKPOINTS_DIR}/).")
    config = ml_collections.ConfigDict(layout.read_config(run))
    return "workdir", config.model.name, layout.model_kwargs(config)


def load_tokenizer(path: str, use_ema: bool = True, **model_overrides: Any
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """(model, host params) of a pretrained directory or a training workdir (the latest
    checkpoint's EMA params, its plain params without `use_ema` or when the run had no EMA; a
    checkpoint's own folder, WORKDIR/checkpoints/STEP, for another step; the model rebuilt
    from the workdir's config.json), or of a released name (`resolve`). `model_overrides`
    replace model arguments (dtype="bfloat16"). Another model's directory (a generator's) is
    a UserError that says so."""
    return _load_directory(path, "tokenizer", model_overrides, use_ema)


def load_generator(path: str, use_ema: bool = True, **model_overrides: Any
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """(model, host params) of a generator, as `load_tokenizer` loads a tokenizer; a
    tokenizer's directory or name is a UserError that says so."""
    return _load_directory(path, "generator", model_overrides, use_ema)


# What `_load_directory` may be asked for: the released kinds and the interface check.
_WANTED = {"tokenizer": (TOKENIZER_KINDS, interfaces.check_tokenizer),
           "generator": (GENERATOR_KINDS, interfaces.check_generator)}


def _load_directory(path: str, wanted: Optional[str], model_overrides: dict[str, Any],
                    use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """`load_tokenizer` / `load_generator` (`wanted`); with `wanted` None, a pretrained
    directory or training workdir of either loads (`load`)."""
    if wanted and is_released(path):  # (a directory: `_check_is` below)
        check_kind(path, _WANTED[wanted][0], f"a {wanted}")
    path = os.path.abspath(resolve(path))
    kind, name, kwargs = _model_spec(path, wanted or "weights")
    if kind == "pretrained":
        model, params = load_pretrained(path, **model_overrides)
        _check_is(model, path, wanted)
        return model, params
    model = models.create(name, **dict(kwargs, **model_overrides))
    _check_is(model, path, wanted)
    # Shapes alone, whatever mesh and logical rules the caller is under (a generator's trainer
    # loads its sample decoder's tokenizer inside its own).
    with jax.set_mesh(None), nn.logical_axis_rules(()):
        shapes = nn.unbox(convert_common.abstract_variables(
            model, *_init_inputs(model, path))["params"])
    return model, merge_checked(shapes, load_params(path, use_ema),
                                f"The checkpoint's weights in {path}",
                                f"the model of its {layout.CONFIG_FILE}")


def _init_inputs(model: nn.Module, path: str) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The inputs a workdir's model is initialised with: a tokenizer's image (at any size where
    the params do not depend on it), a generator's codes and labels."""
    try:
        interfaces.check_tokenizer(model)
        size = model.input_size or 256
        return (jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),)
    except TypeError:
        pass
    try:
        interfaces.check_generator(model)
    except TypeError:
        raise errors.UserError(f"{path} holds a {type(model).__name__}, neither a tokenizer nor "
                               "a generator.") from None
    return jax.eval_shape(lambda: interfaces.generator_inputs(model, 1))  # (hashable specs)


def check_kind(path: str, kinds: Sequence[str], what: str) -> None:
    """A UserError when `path`, a released name or a pretrained directory, holds a model of
    another kind than `kinds` (`what`, e.g. "a tokenizer"): for a name, before it is
    downloaded and converted (GBs, only to be refused then)."""
    if is_released(path):
        entry = registry.get(path)
        if entry.kind in kinds:
            return
        names = [n for n, e in registry.RELEASED.items() if e.kind in kinds]
        raise errors.UserError(f"{path} is not {what} but a {entry.description}: give "
                               f"{what} ({', '.join(names)}, or a pretrained directory or "
                               "training workdir).")
    spec = layout.read_model_spec(path) if os.path.isdir(path) else None
    if spec is not None and spec["name"] not in kinds:
        raise errors.UserError(f"{path} holds a {spec['name']} model, not {what}.")


def _check_is(model: nn.Module, path: str, wanted: Optional[str]) -> None:
    if wanted is None:
        return
    try:
        _WANTED[wanted][1](model)
    except TypeError:
        raise errors.UserError(
            f"{path} holds a {type(model).__name__}, not a {wanted}: give a {wanted}'s "
            "pretrained directory or training workdir.") from None


def describe_tokenizer(path: str) -> dict[str, Any]:
    """What `load_tokenizer(path)` loads, for tokens_info.json (cheap: reads no weights)."""
    path = os.path.abspath(resolve(path))
    kind, name, kwargs = _model_spec(path)
    desc = {"kind": kind, "path": path, "name": name, "kwargs": pretrained.jsonable(kwargs)}
    if kind == "workdir":
        desc.update(step=checkpoint_step(path), params="ema if the run had EMA")
    else:
        desc["source"] = layout.read_model_spec(path).get("source", "")
    return desc


def merge_into(params: Mapping[str, Any], loaded: Mapping[str, Any],
               mapping: Optional[Mapping[str, str]] = None) -> tuple[dict[str, Any], list[str],
                                                                     list[str]]:
    """Copies the leaves of `loaded` into `params` where the path and shape agree.

    `mapping` renames top-level groups of `loaded` first (e.g. {"decoder": "pixel_decoder"}).
    Layer stacks are matched across layouts (scanned `blocks` / `layers` vs unrolled
    `blocks_{i}` / `layer_{i}`: `transformer.match_stack_layout`), so a converted release or a
    run of either layout loads into a model of the other.
    Returns (new params, loaded paths, problems) where problems lists shape mismatches and the
    layers of a deeper model's stack (refused, not truncated: `transformer.extra_layers`).
    """
    if mapping:
        loaded = {mapping[k]: v for k, v in loaded.items() if k in mapping}
    flat = tu.flatten_dict(dict(params))
    flat_loaded = tu.flatten_dict(dict(loaded))
    sources = transformer.stack_layout_sources(flat_loaded, flat)
    src = transformer.match_stack_layout(flat_loaded, flat, sources)
    extra = transformer.extra_layers(flat_loaded, sources)
    done, problems = [], []
    if extra:
        problems.append(f"{len(extra)} layer arrays beyond the model's depth, from a deeper "
                        f"model (e.g. {', '.join(extra[:3])})")
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


def load_checked(path: str, shapes: Mapping[str, Any], what: str, step: Optional[int] = None
                 ) -> dict[str, Any]:
    """Params of `path` (pretrained directory or training workdir: its checkpoint `step`,
    default the latest) that must match `shapes` (the model's abstract params) exactly: every
    array present with its shape, else a ValueError naming what differs."""
    return merge_checked(shapes, load_params(path, step=step), f"Weights {path}", what)


SHOWN_PROBLEMS = 4  # arrays of other shapes named in a mismatch error (the rest counted)


def merge_checked(shapes: Mapping[str, Any], loaded: Mapping[str, Any], source: str,
                  what: str) -> dict[str, Any]:
    """`loaded` laid out as `shapes` (`merge_into`: either layer-stack layout), which it must
    match exactly: every array present with its shape and none left over (a deeper model's
    weights do not load into a shallower one), else a ValueError naming what differs."""
    merged, done, problems = merge_into(shapes, loaded)
    flat, target = tu.flatten_dict(dict(loaded)), tu.flatten_dict(dict(shapes))
    missing = len(target) - len(done)
    sources = transformer.stack_layout_sources(flat, target)
    extra = set(transformer.extra_layers(flat, sources))  # named by merge_into's problems
    unused = [u for u in transformer.unused_by_layout(flat, sources) if u not in extra]
    if problems or missing or unused:
        mismatched = len(problems) - (1 if extra else 0)  # arrays of other shapes
        missing -= mismatched
        shown = problems[:SHOWN_PROBLEMS] + ([f"{len(problems) - SHOWN_PROBLEMS} more arrays of "
                                              "other shapes"]
                                             if len(problems) > SHOWN_PROBLEMS else [])
        raise ValueError(f"{source} do not match {what}: " + "; ".join(
            shown + ([f"{missing} parameter arrays missing"] if missing else [])
            + ([f"{len(unused)} arrays not in the model (e.g. {', '.join(unused[:3])})"]
               if unused else [])))
    return merged


# --------------------------------------------------------------------------- (c)

def _find_init_args(cfg: Any) -> Optional[dict[str, Any]]:
    """The dict holding GigaTok's `init_args` anywhere inside an official YAML/JSON config."""
    if isinstance(cfg, dict):
        if "codebook_size" in cfg and "z_channels" in cfg:
            return cfg
        for value in cfg.values():
            found = _find_init_args(value)
            if found is not None:
                return found
    return None


def _official_gigatok(path: str, config: Optional[str], preset: Optional[str],
                      image_size: Optional[int]) -> tuple[nn.Module, dict[str, Any]]:
    if (config is None) == (preset is None):
        raise ValueError("gigatok needs exactly one of --preset NAME or --official_config FILE "
                         "(in Python: preset= or config=)")
    if preset is not None:
        model = models.create("gigatok", preset=preset, image_size=image_size or 256)
    else:
        cfg = convert_titok.read_config(config)
        init_args = _find_init_args(cfg)
        if init_args is None:
            raise convert_common.ConversionError(f"{config}: no GigaTok init_args "
                                                 "(codebook_size, z_channels, ...) found")
        kwargs = convert_gigatok.kwargs_from_official(
            init_args, cfg.get("size_tables_added"), cfg.get("ctor_patches"),
            image_size=image_size or cfg.get("image_size", 256),
            layout=cfg.get("variant") or convert_gigatok.layout_from_config(cfg))
        model = models.create("gigatok", **kwargs)
    return model, convert_gigatok.convert_gigatok(convert_common.load_state_dict(path), model,
                                                  what=path)


def load_official(kind: str, path: str, *, config: Optional[str] = None,
                  image_size: Optional[int] = None, preset: Optional[str] = None,
                  pos_grid: Optional[int] = None, size: Optional[str] = None,
                  weights: str = "model", num_heads: Optional[int] = None,
                  model_kwargs: Optional[Mapping[str, Any]] = None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """(model, params) of an official PyTorch checkpoint of `kind` (`OFFICIAL_KINDS`), through
    its converter (every tensor checked; a mismatch raises one ConversionError listing all).
    Options as `tok1d convert` (`check_options`: refused for other kinds): `config` (official
    YAML / JSON; titok, gigatok, maskgit), `image_size`, `preset` (gigatok), `pos_grid`
    (dinov2), `size` / `weights` / `num_heads` (gpt), `size` (rar); `model_kwargs` build the
    maskgit_vqgan model (default: the released MaskGIT-VQGAN)."""
    if kind in OFFICIAL_KINDS:  # (an unknown kind: the error below)
        check_options(kind, dict(config=config, image_size=image_size, preset=preset,
                                 pos_grid=pos_grid, size=size, weights=weights,
                                 num_heads=num_heads, model_kwargs=model_kwargs))
    if kind == "titok":
        return convert_titok.convert_file(path, config=config, image_size=image_size)
    if kind == "maskgit_vqgan":
        model = models.create("maskgit_vqgan", **dict(model_kwargs or {}))
        return model, convert_vqgan.convert_maskgit_vqgan(convert_common.load_state_dict(path),
                                                          model)
    if kind == "gigatok":
        return _official_gigatok(path, config, preset, image_size)
    if kind == "dinov2":
        return convert_dinov2.convert_file(path, pos_grid=pos_grid)
    if kind == "maskgit":
        return convert_maskgit.convert_file(path, config=config)
    if kind == "gpt":
        return convert_gpt.convert_file(path, size=size, weights=weights, num_heads=num_heads)
    if kind == "rar":
        return convert_rar.convert_file(path, size=size)
    if kind == "inception_fid":  # pytorch-fid's FID InceptionV3 (+ IS fc head)
        return convert_inception.convert_file(path)
    raise ValueError(f"unknown kind {kind!r}; expected one of {OFFICIAL_KINDS}")


# --------------------------------------------------------------------------- users

def load_teacher(name: str, weights: str, model_kwargs: Mapping[str, Any], *, precision: str,
                 grid: Optional[int] = None, image_size: int = 256,
                 seed: int = 0) -> tuple[nn.Module, Any]:
    """A frozen teacher (`TEACHERS`) as (model, params), from a pretrained directory, an
    official file, or (empty `weights`) a random init (tests):
      maskgit_vqgan  TiTok stage 1's proxy-code teacher (run in float32);
      dinov2         GigaTok's semantic-regularisation target, with its position table
                     resampled to the student's decoder `grid` (16x16 for 256 px, i.e. 224 px
                     teacher inputs) as the official code does; run at `precision` (the official
                     code uses fp16 autocast)."""
    kwargs = dict(model_kwargs)
    # A released name: DINOv2's official file (its table is resampled to `grid` below), the
    # other teachers' converted directory.
    weights = resolve_file(weights) if name == "dinov2" else resolve(weights)
    if name == "dinov2":
        if "embed_dim" not in kwargs:
            kwargs.setdefault("size", "vitb14")
        if grid:
            kwargs.setdefault("pos_grid", grid)
        kwargs.setdefault("dtype", precision)
    if weights and os.path.isdir(weights):
        return _with_layout(*load_pretrained(
            weights, **{k: kwargs[k] for k in ("dtype",) if k in kwargs}), kwargs.get("scan"))
    if weights and name == "dinov2":
        teacher, params = load_official(name, weights, pos_grid=kwargs.get("pos_grid"))
        return _with_layout(teacher.clone(dtype=models.dtype_from_name(kwargs["dtype"])),
                            params, kwargs.get("scan"))
    if weights:
        return load_official(name, weights, model_kwargs=kwargs)
    teacher = models.create(name, **kwargs)
    size = image_size
    if name == "dinov2":
        size = teacher.patch_size * (kwargs.get("pos_grid") or teacher.table_grid)
    params = nn.unbox(teacher.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"])
    return teacher, params


def _with_layout(model: nn.Module, params: Any, scan: Optional[bool]) -> tuple[nn.Module, Any]:
    """A loaded DINOv2 teacher with its blocks scanned or unrolled as asked (`scan` None, or a
    teacher without the option: as loaded); converted weights are stored unrolled."""
    if scan is None or getattr(model, "scan", scan) == scan:
        return model, params
    model = model.clone(scan=bool(scan))
    return model, merge_checked(nn.unbox(convert_dinov2.abstract_params(model)), params,
                                "The teacher's weights", f"DINOv2 with scan={bool(scan)}")


def load_perceptual(components: Iterable[str], weights: Optional[str],
                    allow_random_init: bool = False, seed: int = 0,
                    lpips_channels: Sequence[int] = ()) -> dict[str, Any]:
    """{component: params} of perceptual networks ("lpips", "convnext_s") from converted files
    (`weights`: a directory written by `tok1d convert lpips|convnext_s`, a single .npz, or
    several joined by a comma), each checked against its network. Without `weights` this raises
    `MissingPerceptualWeights` (saying which files are needed and how to convert them) unless
    `allow_random_init` (tests), which draws random stand-ins (LPIPS' of VGG16 block widths
    `lpips_channels` when given)."""
    components = tuple(components)
    if not weights:
        if not allow_random_init:
            raise perceptual_files.MissingPerceptualWeights(
                f"The perceptual networks {list(components)} need pretrained weights but none "
                "were given. " + perceptual_files.how_to_convert(components)
                + "; then pass the name(s) or DIR as the perceptual weights path.")
        return {c: perceptual_nets.random_params(
            c, perceptual_nets.build_module(c, lpips_channels=lpips_channels), seed=seed)
            for c in components}
    files = perceptual_files.resolve_weight_files(resolve_each(weights), components)
    return {c: perceptual_files.load_params(files[c], c) for c in components}


def disc_needs_trunk(disc: nn.Module) -> bool:
    """Whether a discriminator has pretrained frozen parts (`load_disc_trunk`)."""
    return isinstance(disc, DinoDiscriminator)


def load_disc_trunk(weights: str, disc: nn.Module) -> Optional[dict[str, Any]]:
    """Converted frozen trunk params of the DINO discriminator from the official
    `dino_deitsmall16_pretrain.pth` (or .safetensors / .npz with its keys); None for the other
    discriminators and when `weights` is empty (a random trunk)."""
    if not (disc_needs_trunk(disc) and weights):
        return None
    return convert_dino_disc.convert_file(resolve_file(weights), disc)


def load_initial_params(params: Mapping[str, Any], checkpoint: str = "",
                        pixel_decoder: str = "",
                        log: Callable[[str], None] = lambda _: None) -> dict[tuple, np.ndarray]:
    """Host arrays that initialise `params` (a tree of arrays or ShapeDtypeStructs) from
    `checkpoint` (path + shape match) and `pixel_decoder` (its decoder / quantize groups as
    pixel_decoder / pixel_quantize), both pretrained directories, training workdirs or released
    names (`resolve`):
    {flat path: array}. A source that matches no parameter, or one of a wrong shape, is a
    ValueError."""
    sources = [(p, m) for p, m in ((checkpoint, None), (pixel_decoder, {
        "decoder": "pixel_decoder", "quantize": "pixel_quantize"})) if p]
    if not sources:
        return {}
    shapes = tu.unflatten_dict({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                for k, v in tu.flatten_dict(dict(params)).items()})
    out = {}
    for path, mapping in sources:
        loaded = load_params(path)
        merged, done, problems = merge_into(shapes, loaded, mapping)
        if problems:
            raise ValueError(f"init weights {path} do not match the model: " + "; ".join(problems))
        if not done:
            raise ValueError(f"init weights {path}: no parameter matched the model (groups in the "
                             f"file: {sorted(loaded)}; in the model: {sorted(params)}).")
        new_flat = tu.flatten_dict(merged)
        out.update({tuple(key.split("/")): new_flat[tuple(key.split("/"))] for key in done})
        groups = sorted({d.split("/")[0] for d in done})
        log(f"Initialised {len(done)} parameter arrays ({', '.join(groups)}) from {path}.")
    return out


def load_inception(path: str, **model_overrides: Any
                   ) -> tuple[inception_lib.FIDInceptionV3, dict[str, Any]]:
    """(model, params) of the FID Inception from a directory written by `python -m
    tok1d.cli.convert inception_fid`, or of the released name "inception_fid" (fetched and
    converted once); FileNotFoundError (saying how to make one) when there is none."""
    new_dir = path if path and not os.path.exists(path) else "DIR"  # never a used one
    how = (f"Pass the released name {inception_lib.REGISTRY_NAME!r} (downloaded and converted "
           f"once), or download pytorch-fid's FID Inception weights "
           f"{inception_lib.FID_WEIGHTS_FILE} ({inception_lib.FID_WEIGHTS_URL}) and convert them: "
           f"`tok1d convert {inception_lib.REGISTRY_NAME} "
           f"--checkpoint={inception_lib.FID_WEIGHTS_FILE} --out={new_dir}`.")
    path = resolve(path)
    spec = layout.read_model_spec(path) if path and os.path.isdir(path) else None
    if spec is None:
        raise FileNotFoundError(f"No converted FID Inception weights at {path!r}. {how}")
    if spec.get("name") != inception_lib.REGISTRY_NAME:
        raise ValueError(f"{path} holds a {spec.get('name')!r} model, not the FID Inception "
                         f"({inception_lib.REGISTRY_NAME!r}). {how}")
    return load_pretrained(path, **model_overrides)


# --------------------------------------------------------------------------- (d) released weights

PERCEPTUAL_KINDS = tuple(perceptual_files.WEIGHT_FILES)  # converted to OUT/<file>.npz
CONVERT_KINDS = OFFICIAL_KINDS + PERCEPTUAL_KINDS

# The converters' output version. Bump it when a converter's output changes (a fixed key map, a
# new layout): every cached conversion of an older version is converted again on first use. A
# cached directory records it in CONVERSION_FILE; one without (tok1d before the file) is 1.
CONVERSION_VERSION = 1
CONVERSION_FILE = ".tok1d_conversion.json"


def check_expected(model: nn.Module, kind: str, expect: Mapping[str, Any], what: str) -> None:
    """ConversionError when the converted model lacks the arguments a released name promises
    (e.g. a TiTok-B-64 file fetched as titok_l32: num_latent_tokens 64, not 32)."""
    kwargs = pretrained.registry_kwargs(kind, model)
    wrong = [f"{k}={kwargs.get(k)!r} (expected {v!r})" for k, v in expect.items()
             if kwargs.get(k) != v]
    if wrong:
        raise convert_common.ConversionError(f"{what} is not what its name says: "
                                             + ", ".join(wrong))


def convert_official(kind: str, checkpoint: str, out: str, *, vgg: Optional[str] = None,
                     expect: Optional[Mapping[str, Any]] = None, source: str = "",
                     **options: Any) -> str:
    """Converts the official file(s) of `kind` (`CONVERT_KINDS`) into `out`: a pretrained
    directory, or for the perceptual networks OUT/<name>.npz (lpips: `checkpoint` holds the
    linear layers, `vgg` torchvision's VGG16). `options` as `load_official`; `expect` as
    `check_expected`. Returns what it wrote."""
    check_options(kind, dict(options, vgg=vgg))
    if kind not in ("lpips", "convnext_s"):
        pretrained.check_target(out)  # (before the conversion's minutes)
    if kind == "lpips":
        return perceptual_convert.convert_files(kind, out, vgg=vgg, lpips=checkpoint)
    if kind == "convnext_s":
        return perceptual_convert.convert_files(kind, out, weights=checkpoint)
    model, params = load_official(kind, checkpoint, **options)
    check_expected(model, kind, expect or {}, source or checkpoint)
    return pretrained.save_pretrained(out, kind, pretrained.registry_kwargs(kind, model), params,
                                      source=source or checkpoint)


def recorded_path(path: str) -> str:
    """`path` as a result record (a report, sampling.json) keeps it: absolute, or a released
    name, hf:// or URL as it is (its absolute form named a folder that does not exist)."""
    return (path if is_released(path) or download.is_remote(path)
            else os.path.abspath(path))


def is_released(source: str) -> bool:
    """Whether `source` is a released name (an existing path of that name wins)."""
    return source in registry.RELEASED and not os.path.exists(source)


def fetch_released(name: str, cache_dir: Optional[str] = None) -> dict[str, str]:
    """{input: local path} of a released name's official files, fetched and checked."""
    entry = registry.get(name)
    return {role: download.fetch(f, cache_dir) for role, f in entry.files.items()}


def resolve_file(source: str, cache_dir: Optional[str] = None,
                 downloaded: Optional[list[str]] = None) -> str:
    """The official checkpoint file of `source` (a released name, hf:// or a URL), fetched and
    checked (a URL of the table with its recorded sha256); a local path or "" unchanged.
    `downloaded` as `download.fetch`."""
    if source and is_released(source):
        return download.fetch(registry.get(source).files["checkpoint"], cache_dir, downloaded)
    if download.is_remote(source):
        return download.fetch(registry.file_of(source), cache_dir, downloaded)
    _refuse_unknown_name(source)
    return source


def _refuse_unknown_name(source: str) -> None:
    if registry.looks_like_a_name(source) and not os.path.exists(source):
        registry.get(source)  # UnknownName, with the closest names


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def resolve(source: str, kind: Optional[str] = None, cache_dir: Optional[str] = None,
            converted: Optional[list[str]] = None, **options: Any) -> str:
    """A local weights path for `source`: an existing path (or "") unchanged; a released name
    (or `hf://owner/repo/file` / a URL with the converter `kind`) -> its converted tok1d
    directory in the cache (`download.cache_root`), fetched, checked and converted on first
    use; later calls read the cache and never touch the network. `options` are the
    converter's (`load_official`; `vgg`: torchvision's VGG16 file for lpips); with a released
    name they override the entry's, and a conversion with other options than the entry's is
    cached as NAME-<key of those options>. A released file used as it is (dino_vits16)
    resolves to the checked file. The directory is written under a temporary name and renamed
    when complete: nothing half-written is ever read. A directory converted now is appended
    to `converted` (a cached one is not)."""
    if not source or os.path.exists(source):
        return source
    vgg = options.pop("vgg", None)
    if download.is_remote(source):
        if source.startswith(download.HF_SCHEME):
            download.split_hub(source)  # its format first: hf://OWNER/REPO/FILE
        if kind not in CONVERT_KINDS:
            raise errors.UserError(f"{source}: say which converter reads it (kind: "
                                   f"{' | '.join(CONVERT_KINDS)}).")
        dirname = f"{kind}-{_key(source, kind, dict(options, vgg=vgg) if vgg else options)}"
        expect, sources = {}, {"checkpoint": registry.file_of(source)}
        chosen = f"the converter (kind={kind!r})" + (f" and its options {options}" if options
                                                      else "")
    elif registry.looks_like_a_name(source):
        entry = registry.get(source)
        if entry.kind is None:
            if options or vgg:
                raise errors.UserError(f"{source} is a file used as it is ({entry.description})"
                                       f": it takes no converter options.")
            return fetch_released(source, cache_dir)["checkpoint"]
        changed = {k: v for k, v in options.items() if entry.options.get(k) != v}
        if vgg:
            changed["vgg"] = vgg
        dirname = entry.name + (f"-{_key(changed)}" if changed else "")
        chosen = f"the options {changed}" if changed else ""
        kind, expect, sources = entry.kind, entry.expect, dict(entry.files)
        options = dict(entry.options, **options)
    else:
        return source  # a path that does not exist: the caller's error names it
    check_options(kind, dict(options, vgg=vgg))  # before anything is downloaded
    root = download.cache_root(cache_dir)
    final = os.path.join(root, dirname)
    if _complete_everywhere(final):
        return final
    # An existing `final` (left without weights by an older tok1d on a pod, or an older
    # converter's output) stays until the new conversion is complete, then is replaced.
    downloaded: list[str] = []
    try:
        files = {role: download.fetch(f, cache_dir, downloaded) for role, f in sources.items()}
        if vgg:
            files["vgg"] = resolve_file(vgg, cache_dir, downloaded)
    except errors.UserError as e:
        raise _outdated(final, _naming_the_converter(e, kind, options, vgg)) from None
    os.makedirs(root, exist_ok=True)
    download.remove_stale(root)
    tmp = tempfile.mkdtemp(prefix=download.work_prefix(".tmp-", dirname), dir=root)
    try:
        try:
            convert_official(kind, files["checkpoint"], tmp, vgg=files.get("vgg"),
                             expect=expect, source=source, **options)
        except convert_common.ConversionError as e:
            raise _rejected(e, downloaded, [files[role] for role, f in sources.items()
                                            if not f.sha256], root, chosen) from None
        with open(os.path.join(tmp, CONVERSION_FILE), "w", encoding="utf-8") as f:
            json.dump({"version": CONVERSION_VERSION, "kind": kind, "source": source}, f)
        if not layout.lacks_weights(tmp):
            if os.path.isdir(final) and not _complete(final):
                download.discard_dir(final)
            path = _all_agree(download.replace_dir(tmp, final), source)
            if converted is not None:
                converted.append(path)
            return path
        # On a pod every process converts (orbax's save is collective) but only process 0's
        # copy holds the arrays: the others use process 0's, from a cache they share.
        try:
            _wait_for_process_0(final, source)
        except errors.UserError as e:
            _all_agree(None, source, e)
        return _all_agree(final, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete_everywhere(final: str) -> bool:
    """Whether every process finds a usable conversion at `final`. Where one does and another
    does not (a cache on each host's disk, one filled earlier), they all convert: the one
    that used its cache restored it while the other saved a conversion, and both crashed in
    the mismatched collectives."""
    complete = _complete(final)
    if jax.process_count() > 1:
        return bool(np.all(multihost_utils.process_allgather(np.asarray(complete, np.int32))))
    return complete


def _all_agree(path: Optional[str], source: str,
               error: Optional[errors.UserError] = None) -> str:
    """`path` once every process has its conversion (None here: `error`); else each raises
    (`error`, or a line naming the processes without it). On a pod the weights are read next
    with a collective restore: a process that raised alone left the others blocked in it, and
    itself blocked at exit in JAX's shutdown barrier."""
    if jax.process_count() > 1:
        ok = multihost_utils.process_allgather(np.asarray(path is not None, np.int32))
        if error is None and not np.all(ok):
            failed = ", ".join(str(i) for i in np.flatnonzero(np.asarray(ok) == 0))
            error = errors.UserError(f"{source}: process(es) {failed} could not use the "
                                     "conversion (see their error line).")
    if error is not None:
        raise error
    return path


def _rejected(error: convert_common.ConversionError, downloaded: list[str],
              unchecked: list[str], root: str, chosen: str = ""
              ) -> convert_common.ConversionError:
    """`error` (the converter rejected the files) saying what becomes of them: those
    `downloaded` now without a published digest (`unchecked`) are removed (the next run
    downloads them again; a file that matched its digest is the official one, and kept); a
    file without a digest found in the cache (fetched earlier, or put there by hand) is named,
    to be removed or replaced by the official file. Where the user `chosen` the converter or
    its options and the file was readable, those may be what is wrong, not the file: it is
    kept, and they are named."""
    if chosen and not isinstance(error, convert_common.UnreadableCheckpoint):
        return type(error)(f"{chosen} may not fit the file (it is kept): {error}")
    unchecked = [os.path.abspath(p) for p in unchecked]
    downloaded = [p for p in downloaded if os.path.abspath(p) in unchecked]
    download.forget(downloaded)
    if downloaded:
        note = "refused: the download is not kept"
    else:
        cached = [p for p in unchecked if os.path.abspath(p).startswith(root + os.sep)]
        if not cached:
            return error
        note = (f"refused: remove {', '.join(cached)} (or put the official file there) and run "
                "again")
    return type(error)(f"{str(error).rstrip('.')} ({note}).")


def _naming_the_converter(error: errors.UserError, kind: str, options: dict[str, Any],
                          vgg: Optional[str]) -> errors.UserError:
    """`error` (a file could not be fetched) with the converter and options that read it in its
    hint where it had the generic one (`KIND`), e.g. `tok1d convert gigatok
    --checkpoint=FILE --preset=b_l --out=DIR`."""
    text = str(error)
    if download.CONVERT_ANY not in text:
        return error
    given = {k: v for k, v in options.items()  # (model_kwargs: no flag; --weights=model: default)
             if v is not None and k != "model_kwargs" and (k, v) != ("weights", "model")}
    flags = "".join(f" --{OPTION_FLAGS.get(k, k)}={v}" for k, v in given.items())
    if kind in PERCEPTUAL_KINDS:  # (a directory of its own, `tok1d convert` only)
        command = (f"tok1d convert {kind}" + (" --vgg=VGG16_FILE" if kind == "lpips" else "")
                   + f" --checkpoint=FILE{flags} --out=DIR")
    else:
        arguments = "".join(f", {k}={v!r}" for k, v in given.items())
        command = (f"tok1d convert {kind} --checkpoint=FILE{flags} --out=DIR (in Python: "
                   f"tok1d.weights.load(FILE, kind={kind!r}{arguments}))")
    return type(error)(text.replace(download.CONVERT_ANY, command))


def _outdated(final: str, error: errors.UserError) -> errors.UserError:
    """`error` (the file to convert from could not be fetched), naming a cached conversion of
    older converters where there is one: it is kept, and not used (older converters' output
    may differ from what this tok1d's models expect), but its path can be passed as it is."""
    version = _conversion_version(final)
    if version is None or version == CONVERSION_VERSION:
        return error
    return type(error)(f"{final} was converted by other converters (version {version}; this "
                       f"tok1d's: {CONVERSION_VERSION}) and the file to convert it again from "
                       f"cannot be fetched: {str(error).rstrip('.')}. The cached conversion is "
                       "kept, not used: "
                       f"pass {final} itself to use it as it is.")


def _complete(final: str) -> bool:
    """A cached conversion that can be used: there, not without its weights (checked in this
    order: process 0 may be setting a directory without weights aside meanwhile), and made by
    this tok1d's converters (`CONVERSION_VERSION`)."""
    return (not layout.lacks_weights(final) and os.path.isdir(final)
            and _conversion_version(final) == CONVERSION_VERSION)


def _conversion_version(final: str) -> Optional[int]:
    """The converters' version a cached directory records (1 without the file); None when it
    cannot be read (being set aside, damaged)."""
    path = os.path.join(final, CONVERSION_FILE)
    if not os.path.exists(path):
        return 1 if os.path.isdir(final) else None
    try:
        return layout.read_json(path).get("version")
    except (OSError, errors.UserError, AttributeError):
        return None


WAIT_FOR_PROCESS_0_S = 120.0  # how long a process waits for process 0's conversion


def _wait_for_process_0(final: str, source: str, timeout_s: Optional[float] = None) -> str:
    """`final` once process 0 has moved its conversion there (seconds after this process's own
    collective save); a clear error where this host cannot see it (a cache on each host's disk)."""
    deadline = time.monotonic() + (WAIT_FOR_PROCESS_0_S if timeout_s is None else timeout_s)
    while not _complete(final):
        if time.monotonic() > deadline:
            raise errors.UserError(
                f"{source}: process {jax.process_index()} does not see the conversion process 0 "
                f"wrote to {final} (orbax writes host arrays from process 0 only, so a cache on "
                "each host's own disk leaves the other hosts without weights). Put TOK1D_CACHE "
                "(or --cache_dir) on storage every host shares, or convert once with `tok1d "
                "convert --from NAME --out DIR` into such storage and pass DIR.")
        time.sleep(0.5)
    return final


def resolve_each(weights: str, cache_dir: Optional[str] = None) -> str:
    """`resolve` on each part of a comma-separated list (the perceptual weights)."""
    return ",".join(resolve(p.strip(), cache_dir=cache_dir) for p in str(weights).split(",")
                    if p.strip())


def load(source: str, kind: Optional[str] = None, cache_dir: Optional[str] = None,
         **options: Any) -> tuple[nn.Module, Any]:
    """(model, params) of released weights in one line:

        model, params = tok1d.weights.load("titok_l32")

    `source`: a released name (`tok1d.weights.registry.RELEASED`), `hf://owner/repo/file` or a
    URL (with the converter `kind` and its `options`, e.g. kind="rar", size="B"), a local
    official file (with `kind`: converted, not cached), a converted directory or a training
    workdir. Downloads and conversions are cached (see `resolve`)."""
    if os.path.isfile(source):
        if kind not in OFFICIAL_KINDS:
            raise errors.UserError(f"{source}: say which converter reads it (kind: "
                                   f"{' | '.join(OFFICIAL_KINDS)}).")
        return load_official(kind, source, **options)
    path = resolve(source, kind, cache_dir, **options)
    if os.path.isfile(path):
        raise errors.UserError(f"{source} is a file another network reads (fetched to {path}): "
                               "e.g. the DINO discriminator's trunk, --config.discriminator.weights="
                               f"{source}.")
    for component, filename in perceptual_files.WEIGHT_FILES.items():
        npz = os.path.join(path, filename)
        if layout.read_model_spec(path) is None and os.path.isfile(npz):
            return (perceptual_nets.build_module(component),
                    perceptual_files.load_params(npz, component))
    return _load_directory(path, None, {})
