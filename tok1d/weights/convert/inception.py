r"""pytorch-fid's FID Inception weights -> `tok1d.models.frozen.inception.FIDInceptionV3` params.

    tok1d convert inception_fid --checkpoint=pt_inception-2015-12-05-6726825d.pth \
        --out=inception_fid/

The source is pytorch-fid's release file `pt_inception-2015-12-05-6726825d.pth`
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/...), the state dict of
`pytorch_fid.inception.fid_inception_v3()`: `Conv2d_1a_3x3.conv.weight`,
`Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var[,num_batches_tracked]}`, ...,
`Mixed_7c.branch_pool.*`, `fc.weight` (1008, 2048), `fc.bias`. Since the Flax modules carry the
official names, every parameter maps by name:

  <module path>.conv.weight (O, I, kh, kw)   -> <module path>/conv/kernel (kh, kw, I, O)
  <module path>.bn.weight / bias             -> <module path>/bn/scale / bias
  <module path>.bn.running_mean / _var       -> <module path>/bn/mean / var
  fc.weight (1008, 2048) / fc.bias           -> fc/kernel (2048, 1008) / fc/bias

(`num_batches_tracked` is ignored.) The state dict of pytorch-fid's `InceptionV3` *wrapper*
(`blocks.{b}.{i}.…`) is accepted too: its names are mapped back to the official ones
(`rename_wrapper_keys`); it has no `fc`, so only `modules=` subsets of it convert.

torchvision's ImageNet classifier `inception_v3_google-*.pth` has the same convolution shapes but
different weights and 1000 classes (plus `AuxLogits.*`); FID computed with it is not comparable
to published numbers, so it is refused with a message saying so.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from tok1d.weights.convert import common
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict, conv, linear
from tok1d.models.frozen import inception as inc

# Flax leaf name under a BasicConv2d's `bn` -> PyTorch BatchNorm2d buffer / parameter name.
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

_HOW_TO_GET = (f"FID needs pytorch-fid's TF-2015 Inception weights {inc.FID_WEIGHTS_FILE} "
               f"({inc.FID_WEIGHTS_URL}).")


@functools.lru_cache(maxsize=None)
def _full_abstract() -> dict[str, Any]:
    return inc.abstract_params(inc.FIDInceptionV3(resize_input=False))


def _source_key(path: tuple[str, ...]) -> tuple[str, Any]:
    """Official state-dict key of a Flax param path, and the layout transform."""
    *modules, layer, leaf = path
    prefix = ".".join(modules + [layer])
    if layer == "conv" and leaf == "kernel":
        return f"{prefix}.weight", conv
    if layer == "bn" and leaf in _BN_NAMES:
        return f"{prefix}.{_BN_NAMES[leaf]}", None
    if layer == "fc" and leaf == "kernel":
        return f"{prefix}.weight", linear
    if layer == "fc" and leaf == "bias":
        return f"{prefix}.bias", None
    raise ValueError(f"no PyTorch name for parameter {'/'.join(path)}")  # pragma: no cover


def _convert_tree(state_dict: Mapping[str, np.ndarray], abstract: Mapping[str, Any],
                  what: str) -> dict[str, Any]:
    """Fills every param of `abstract` from its official key; one error lists all problems."""
    sd = StateDict(state_dict, what)
    out = ParamTree()
    shapes = {p: tuple(v.shape) for p, v in common.flatten(nn.unbox(dict(abstract))).items()}
    for path, shape in shapes.items():
        key, transform = _source_key(path)
        value = sd.take(key)
        # A tensor of the wrong rank is passed on as it is: `finish` lists it as mismatched.
        if value is not None and transform is not None and value.ndim == len(shape):
            value = transform(value)
        out.set("/".join(path), value, key)
        if path[-2] == "bn":
            sd.ignore(key.rsplit(".", 1)[0] + ".num_batches_tracked")
    return common.finish(sd, out, abstract)


def rename_wrapper_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid `InceptionV3` wrapper names (`blocks.{b}.{i}.rest`) -> official names
    (`Conv2d_1a_3x3.rest`, ..., `Mixed_7c.rest`); other keys are kept as they are."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
            b, i = int(parts[1]), int(parts[2])
            if b < len(inc.BLOCK_MODULES) and i < len(inc.BLOCK_MODULES[b]):
                key = ".".join([inc.BLOCK_MODULES[b][i]] + parts[3:])
        out[key] = value
    return out


def diagnose(state_dict: Mapping[str, Any], what: str = "state dict") -> None:
    """Raises a ConversionError naming the problem when `state_dict` is recognisably not the
    FID Inception weight file (torchvision's ImageNet classifier, an unrelated network)."""
    keys = list(state_dict)
    fc = state_dict.get("fc.weight")
    fc_shape = tuple(np.shape(fc)) if fc is not None else None
    if any(k.startswith("AuxLogits.") for k in keys) or (fc_shape is not None
                                                          and fc_shape[0] == 1000):
        raise ConversionError(
            f"{what} is torchvision's ImageNet Inception-v3 classifier (inception_v3_google-*.pth:"
            f" AuxLogits.* keys, fc.weight {fc_shape}), not the FID Inception network: its "
            "weights (and the pooling of its Mixed blocks) differ, so FID / IS values computed "
            f"with it are not comparable to published numbers. {_HOW_TO_GET}")
    if not any(k.startswith(("Conv2d_1a_3x3.", "Mixed_")) for k in keys):
        head = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise ConversionError(
            f"{what} is not an Inception-v3 state dict (no Conv2d_1a_3x3.* / Mixed_* keys; it "
            f"has {len(keys)} keys: {head or 'none'}). {_HOW_TO_GET}")


def convert_inception(state_dict: Mapping[str, np.ndarray], what: str = "state dict",
                      modules: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """`fid_inception_v3()` state dict (pt_inception-2015-12-05-6726825d.pth) ->
    FIDInceptionV3 params. With `modules` (top-level names, e.g.
    `inception.BLOCK_MODULES[0] + inception.BLOCK_MODULES[1]`) only those are converted and
    required. Wrapper names (`blocks.*`) are mapped to the official ones first."""
    state_dict = rename_wrapper_keys(state_dict)
    diagnose(state_dict, what)
    abstract = _full_abstract()
    if modules is not None:
        unknown = sorted(set(modules) - set(abstract))
        if unknown:
            raise ValueError(f"unknown Inception module(s) {unknown}; known: {list(abstract)}")
        abstract = {k: v for k, v in abstract.items() if k in modules}
    try:
        return _convert_tree(state_dict, abstract, what)
    except ConversionError as e:
        if modules is None and "fc.weight" not in state_dict and any(
                k.startswith("Mixed_7c.") for k in state_dict):
            raise ConversionError(f"{e}\n  (no fc head: pytorch-fid's InceptionV3 wrapper "
                                  "state dict lacks it; convert the weight file itself. "
                                  f"{_HOW_TO_GET})") from e
        raise


def convert_block(state_dict: Mapping[str, np.ndarray], block: nn.Module, in_channels: int,
                  what: str = "state dict") -> dict[str, Any]:
    """One Mixed block's state dict (keys relative to the block, e.g. `branch1x1.conv.weight`)
    -> params of `block` (an `inception.InceptionA` ... `InceptionE`) for `in_channels` input
    channels."""
    abstract = inc.abstract_params(block, image_size=9, in_channels=in_channels)
    return _convert_tree(state_dict, abstract, what)


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse mapping: FIDInceptionV3 (or block) params -> a state dict under the official
    names (with `num_batches_tracked` = 0), as the weight file would hold it."""
    out = {}
    for path, value in common.flatten(nn.unbox(dict(params))).items():
        key, transform = _source_key(path)
        value = np.asarray(value, np.float32)
        if transform is conv:
            value = value.transpose(3, 2, 0, 1)
        elif transform is linear:
            value = value.T
        out[key] = np.ascontiguousarray(value)
        if path[-2] == "bn" and path[-1] == "scale":
            out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


def convert_file(path: str, **model_overrides: Any) -> tuple[inc.FIDInceptionV3, dict[str, Any]]:
    """Reads pt_inception-2015-12-05-6726825d.pth (or .safetensors / .npz) -> (model, params)."""
    params = convert_inception(common.load_state_dict(path), what=path)
    return inc.FIDInceptionV3(**model_overrides), params
