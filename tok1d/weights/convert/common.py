"""Shared machinery of the PyTorch -> tok1d checkpoint converters.

A converter reads an official state_dict through `StateDict` (which records every key it
consumes), writes tok1d parameters into a `ParamTree` (which records where each array came
from), and ends with `finish(...)`: it fails with one `ConversionError` listing every missing,
unexpected and shape-mismatched tensor, checked against the model's own parameter shapes.

Layout rules (PyTorch -> Flax, NHWC):
  Linear (out, in)            -> Dense kernel (in, out)                 `linear`
  Conv2d (O, I, kh, kw)       -> Conv kernel (kh, kw, I, O)             `conv`
  1x1 Conv2d used per token   -> Dense kernel (I, O)                    `conv1x1_as_dense`
  packed MHA in_proj (3W, W)  -> q/k/v kernels (W, heads, head_dim)     `split_in_proj`
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import flax.core
import jax
import numpy as np
from flax import linen as nn

from tok1d import errors

Array = np.ndarray


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted for."""


class UnreadableCheckpoint(ConversionError):
    """The file is no checkpoint a reader takes (damaged, cut short, a web page, a pickle of
    other objects): the file is at fault, whatever it was to be converted into."""


# --------------------------------------------------------------------------- reading files

def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):  # torch.Tensor (bf16 has no NumPy dtype: go through f32)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return value


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
    """Finds the flat name -> tensor dict inside common checkpoint wrappers."""
    # "ema" first: GigaTok's trainer saves {"model", "ema", "optimizer", ...} and its loaders
    # prefer the EMA weights.
    for key in ("ema", "state_dict", "model", "module", "params"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            if not any(hasattr(v, "shape") for v in obj.values()):
                if len([k for k, v in obj.items() if isinstance(v, Mapping)]) > 1:
                    logging.info("%s: converting its %r weights (of %s).", path, key,
                                 ", ".join(sorted(map(str, obj))))
                return _unwrap(obj[key], path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state_dict (a dict of tensors), got "
                              f"{type(obj).__name__}.")
    return dict(obj)


def _read(load: Callable[[str], Any], path: str) -> Any:
    """`load(path)`; what a damaged or foreign file makes a format's reader raise (each has its
    own error types: pickle, zip, safetensors, torch) is a ConversionError naming the file."""
    try:
        return load(path)
    except (ImportError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        pickled = re.search(r"GLOBAL (\S+)", str(e))  # torch's weights-only load refusing it
        if pickled:
            raise UnreadableCheckpoint(
                f"{path} pickles {pickled.group(1)} beside its tensors, which a weights-only "
                "load refuses: save its state_dict alone (or as .safetensors) and convert "
                "that.") from e
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint "
                                   f"({_why_unreadable(e, path)})") from e


def _why_unreadable(error: Exception, path: str) -> str:
    """What a reader's error says about the file, without torch's advice to load it with
    weights_only=False (which runs whatever code the file pickles)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError:
        head = b""
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML or XML page, not a checkpoint: check the URL or the file"
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text,
                      re.S)
    if found:
        return f"{type(error).__name__}: {' '.join(found.group(1).split())}"
    if "weights_only" in text:
        return f"{type(error).__name__}: torch's weights-only load refused it"
    return errors.brief(error, 500)


TORCH_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt")
# Key prefixes that wrappers add to every key of a saved model (torch.compile, DDP).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`state_dict` with the leading WRAPPER_PREFIXES removed from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def read_torch(path: str) -> Any:
    """What a torch pickle holds, read weights-only (a training checkpoint's argparse
    Namespace of its arguments is allowed: GigaTok's and LlamaGen's trainers pickle one under
    "args"); a damaged or foreign file is a ConversionError (`_read`)."""
    try:
        import torch  # Local import: optional dependency.
    except ImportError as e:
        raise ImportError(f"Reading {os.path.splitext(path)[1]} checkpoints needs PyTorch: "
                          "`pip install -e '.[convert]'` in tok1d's checkout (or convert the "
                          "file to .safetensors elsewhere).") from e

    def load(p: str) -> Any:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    return _read(load, path)


def _npz(path: str, prefix: str) -> dict[str, Array]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(prefix)}


def load_state_dict(path: str, prefix: str = "") -> dict[str, Array]:
    """Reads a state_dict as NumPy arrays from .safetensors, .npz or .bin/.pt/.pth/.ckpt.

    .safetensors and .npz need only NumPy (and `safetensors`); torch pickles need torch
    (`pip install -e '.[convert]'` in tok1d's checkout). With `prefix`, only keys starting
    with it are kept, with the prefix removed (e.g. prefix="vq_legacy/sd/" for the golden
    fixtures).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise ConversionError(f"{path} is a directory: give the official checkpoint file "
                              "(.safetensors, .npz, .bin, .pt, .pth or .ckpt).")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Reading .safetensors needs `pip install safetensors`.") from e
        sd = _read(load_file, path)
    elif ext == ".npz":
        sd = _read(lambda p: _npz(p, prefix), path)
    elif ext in TORCH_EXTENSIONS:
        sd = _unwrap(read_torch(path), path)
    else:
        raise ConversionError(f"{path}: unknown checkpoint format {ext!r}; expected "
                              ".safetensors, .npz, .bin, .pt, .pth or .ckpt.")
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        value = _to_numpy(value)
        if hasattr(value, "shape"):
            out[key[len(prefix):]] = np.asarray(value)
    return strip_prefixes(out)


# --------------------------------------------------------------------------- layout helpers

def linear(w: Array) -> Array:
    return np.ascontiguousarray(w.T)


def conv(w: Array) -> Array:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv1x1_as_dense(w: Array) -> Array:
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ConversionError(f"expected a 1x1 conv weight (O, I, 1, 1), got {w.shape}")
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def split_in_proj(w: Array, b: Optional[Array], num_heads: int) -> dict[str, dict[str, Array]]:
    """Packed `nn.MultiheadAttention` in_proj (rows [q; k; v]) -> {query, key, value} params."""
    three_w, width = w.shape
    if three_w != 3 * width or width % num_heads:
        raise ConversionError(f"in_proj_weight {w.shape} does not fit width {width} with "
                              f"{num_heads} heads")
    head_dim = width // num_heads
    out = {}
    for i, name in enumerate(("query", "key", "value")):
        rows = w[i * width:(i + 1) * width]                       # (out=W, in=W)
        out[name] = {"kernel": rows.T.reshape(width, num_heads, head_dim)}
        if b is not None:
            out[name]["bias"] = b[i * width:(i + 1) * width].reshape(num_heads, head_dim)
    return out


def out_proj(w: Array, b: Optional[Array], num_heads: int) -> dict[str, Array]:
    """Linear (W, W) over concatenated heads -> HeadProjection kernel (heads, head_dim, W)."""
    width = w.shape[0]
    out = {"kernel": w.T.reshape(num_heads, width // num_heads, width)}
    if b is not None:
        out["bias"] = b
    return out


def shape_of(sd: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    """The shape of `sd[key]`; a ConversionError "not a {what} state_dict" when it is missing
    (the first check of a converter's `infer_kwargs`)."""
    if key not in sd:
        raise ConversionError(f"not a {what} state_dict: {key!r} is missing")
    return tuple(np.shape(sd[key]))


# --------------------------------------------------------------------------- bookkeeping

class StateDict:
    """Read-only view of a state_dict that records which keys were consumed."""

    def __init__(self, sd: Mapping[str, Array], what: str = "checkpoint"):
        self._sd = dict(sd)
        self.what = what
        self.used: set[str] = set()
        self.missing: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def keys(self) -> Iterable[str]:
        return self._sd.keys()

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self._sd)

    def take(self, key: str, dtype=np.float32) -> Optional[Array]:
        """The array under `key` (cast to `dtype`), or None (recorded as missing)."""
        if key not in self._sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        value = np.asarray(self._sd[key])
        return value.astype(dtype, copy=False) if dtype is not None else value

    def ignore(self, *keys: str) -> None:
        """Marks keys as consumed without using them (buffers such as `position_ids`)."""
        self.used.update(k for k in keys if k in self._sd)

    def unused(self) -> list[str]:
        return sorted(set(self._sd) - self.used)


class ParamTree:
    """Nested dict of converted params; remembers the source key(s) of every leaf."""

    def __init__(self):
        self.tree: dict[str, Any] = {}
        self.sources: dict[tuple[str, ...], str] = {}

    def set(self, path: str, value: Optional[Array], source: str) -> None:
        """`path` is slash-separated ("encoder/trunk/ln_pre/norm/scale"). None is skipped (the
        source key was missing and has been recorded as such)."""
        if value is None:
            return
        keys = tuple(path.split("/"))
        node = self.tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        self.sources[keys] = source

    def set_tree(self, path: str, subtree: Mapping[str, Any], source: str) -> None:
        for key, value in subtree.items():
            if isinstance(value, Mapping):
                self.set_tree(f"{path}/{key}", value, source)
            else:
                self.set(f"{path}/{key}", value, source)


def stack_layers(trees: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer param dicts -> one dict with a leading layers axis (for `scan=True` models)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


@functools.lru_cache(maxsize=32)
def abstract_variables(model: nn.Module, *inputs: jax.ShapeDtypeStruct) -> Any:
    """`jax.eval_shape(model.init, key, *inputs)`: the (boxed) variable shapes of `model` for
    inputs of these shapes. Cached per (model, input shapes) -- Linen modules hash by their
    fields -- so converting many state dicts of one model (the train-step tests check each
    stored step's tensors) traces its init once. Read-only: the cache hands out one tree."""
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)


def finish(sd: StateDict, params: ParamTree, abstract_params: Mapping[str, Any],
           allow_unused: Iterable[str] = ()) -> dict[str, Any]:
    """Checks the conversion against the model; returns the param tree or raises one error
    listing every problem. `abstract_params` is `jax.eval_shape(model.init, ...)["params"]`
    (boxed or not)."""
    abstract = nn.unbox(flax.core.unfreeze(abstract_params))
    want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
    got = flatten(params.tree)
    allow = tuple(allow_unused)
    unexpected_src = [k for k in sd.unused() if not k.startswith(allow) or not allow]
    problems = []
    if sd.missing:
        problems.append(f"missing in the checkpoint ({len(sd.missing)}): " + ", ".join(sd.missing))
    if unexpected_src:
        problems.append(f"unexpected in the checkpoint ({len(unexpected_src)}): "
                        + ", ".join(unexpected_src))
    mismatched = []
    for path, value in got.items():
        name = "/".join(path)
        if path not in want:
            mismatched.append(f"{name} (from {params.sources.get(path)}) has no place in the "
                              "model")
        elif tuple(value.shape) != want[path]:
            mismatched.append(f"{name}: model expects {want[path]}, {params.sources.get(path)} "
                              f"gives {tuple(value.shape)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    not_filled = sorted("/".join(p) for p in want if p not in got)
    if not_filled and not sd.missing:
        problems.append(f"model parameters not filled ({len(not_filled)}): "
                        + ", ".join(not_filled))
    if problems:
        raise ConversionError(f"{sd.what} does not match the model:\n  " + "\n  ".join(problems))
    dtypes = {k: v.dtype for k, v in flatten(abstract).items()}

    def cast(tree, prefix=()):
        return {k: cast(v, prefix + (k,)) if isinstance(v, Mapping)
                else np.asarray(v, dtype=dtypes[prefix + (k,)]) for k, v in tree.items()}

    return cast(params.tree)


# --------------------------------------------------------------------------- shared blocks

# Key names of an open_clip-style `ResidualAttentionBlock` (TiTok, GigaTok ViTs).
OPEN_CLIP_BLOCK = dict(ln_1="ln_1", ln_2="ln_2", attn="attn", fc1="mlp.c_fc", fc2="mlp.c_proj")


def _weight_and_bias(sd: StateDict, src: str, weight_name: str, transform, bias: bool
                     ) -> dict[str, Array]:
    """`{src}.weight` (transformed) and optionally `{src}.bias`; missing keys are left out
    (they are recorded by `sd.take`)."""
    w = sd.take(f"{src}.weight")
    out = {weight_name: transform(w) if w is not None else None}
    if bias:
        out["bias"] = sd.take(f"{src}.bias")
    return {k: v for k, v in out.items() if v is not None}


def norm(sd: StateDict, src: str, bias: bool = True) -> dict[str, Array]:
    """LayerNorm / GroupNorm `weight`, `bias` -> {scale, bias}."""
    return _weight_and_bias(sd, src, "scale", lambda w: w, bias)


def dense(sd: StateDict, src: str, bias: bool = True) -> dict[str, Array]:
    """nn.Linear -> Dense {kernel (in, out), bias}."""
    return _weight_and_bias(sd, src, "kernel", linear, bias)


def conv1x1_dense(sd: StateDict, src: str, bias: bool = True) -> dict[str, Array]:
    """1x1 nn.Conv2d applied per token / position -> Dense {kernel (in, out), bias}."""
    return _weight_and_bias(sd, src, "kernel", conv1x1_as_dense, bias)


def conv_params(sd: StateDict, src: str, bias: bool = True) -> dict[str, Array]:
    """nn.Conv2d -> Conv {kernel (kh, kw, in, out), bias}."""
    return _weight_and_bias(sd, src, "kernel", conv, bias)


def attention_block(sd: StateDict, src: str, num_heads: int,
                    names: Mapping[str, str] = OPEN_CLIP_BLOCK) -> dict[str, Any]:
    """One pre-norm block with a packed `nn.MultiheadAttention` -> `layers.Block` params."""
    in_w = sd.take(f"{src}.{names['attn']}.in_proj_weight")
    in_b = sd.take(f"{src}.{names['attn']}.in_proj_bias")
    out_w = sd.take(f"{src}.{names['attn']}.out_proj.weight")
    out_b = sd.take(f"{src}.{names['attn']}.out_proj.bias")
    attn = {}
    if in_w is not None:
        attn.update(split_in_proj(in_w, in_b, num_heads))
    if out_w is not None:
        attn["out"] = out_proj(out_w, out_b, num_heads)
    return {"ln_1": {"norm": norm(sd, f"{src}.{names['ln_1']}")}, "attn": attn,
            "ln_2": {"norm": norm(sd, f"{src}.{names['ln_2']}")},
            "mlp": {"fc1": dense(sd, f"{src}.{names['fc1']}"),
                    "fc2": dense(sd, f"{src}.{names['fc2']}")}}


def transformer(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int, num_heads: int,
                scan: bool, names: Mapping[str, str] = OPEN_CLIP_BLOCK) -> None:
    """`{src}.{i}.*` for i < depth -> `layers.Transformer` params at `dst` (stacked along a
    leading layers axis under `blocks` when the model scans, else `blocks_{i}`)."""
    put_layers(sd, out, src, dst, depth, scan,
               lambda layer: attention_block(sd, layer, num_heads, names))


def put_layers(sd: StateDict, out: ParamTree, src: str, dst: Optional[str], depth: int,
               scan: bool, convert_layer: Callable[[str], dict[str, Any]],
               stacked: str = "blocks", unrolled: str = "blocks_{}") -> None:
    """Converts `{src}.{i}` with `convert_layer` for i < depth into a layer stack at `dst`
    (None: the top level of the tree):
    for a scanned stack stacked along a leading layers axis under `stacked` (only when every
    layer converted; missing keys are already reported), else each as `unrolled.format(i)`.
    The defaults are a `layers.Transformer`'s names."""
    missing_before = len(sd.missing)
    blocks = [convert_layer(f"{src}.{i}") for i in range(depth)]
    at = (lambda name: name) if dst is None else (lambda name: f"{dst}/{name}")
    if not scan:
        for i, block in enumerate(blocks):
            out.set_tree(at(unrolled.format(i)), block, f"{src}.{i}")
        return
    if len(sd.missing) > missing_before:
        return
    try:
        stacked_tree = stack_layers(blocks)
    except ValueError as e:
        raise ConversionError(f"{src}.*: the layers have different shapes ({e})") from e
    out.set_tree(at(stacked), stacked_tree, f"{src}.{{0..{depth - 1}}}")
