"""Weights of GigaTok's DINO discriminator (`tok1d.models.dino_disc.DinoDiscriminator`).

Trunk: the official DINO (v1) ViT-S/16 backbone, `dino_deitsmall16_pretrain.pth` (what
`DinoDisc` fetches with `torch.hub.load_state_dict_from_url`), keys

  cls_token (1,1,384)  pos_embed (1,197,384)  patch_embed.proj.{weight (384,3,16,16), bias}
  blocks.i.{norm1, attn.qkv (1152,384), attn.proj, norm2, mlp.fc1 (1536,384), mlp.fc2}.*
  norm.{weight, bias}

-> params["trunk"] (a `DinoV2` tree without LayerScale; key map as `tok1d.weights.convert.dinov2`).
As the official loader does, the key third of every `attn.qkv.bias` is set to zero (softmax is
invariant to it, so this changes nothing but is kept for fidelity). The position table is used
as stored (no resampling): its grid must equal img_size / patch_size of the model. A DINOv2
checkpoint (LayerScale, mask or register tokens, patch 14) is rejected with a ConversionError.

Heads (optional, to resume from an official run): the official discriminator state_dict
(`checkpoint["discriminator"]`, keys heads.t.{0.0, 1.fn.0, 2}.{weight_orig, bias, weight_u,
weight_v} and heads.t.{0.1, 1.fn.1}.{weight, bias}) -> (params heads_t/..., "spectral"
collection; stacked under "heads" for a model with `scan_heads`). Conv1d weights (out, in, k)
become kernels (k, in, out); u, v are copied as they are.

Usage: `model, variables = tok1d.models.dino_disc.build_dino_discriminator(
convert_file("dino_deitsmall16_pretrain.pth"))` (the converted trunk, heads initialised), or in
training `tok1d.weights.loaders.load_disc_trunk`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.weights.convert import common
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict
from tok1d.weights.convert.dinov2 import convert_dinov2
from tok1d.models.dino_disc import HEADS, SPECTRAL, TRUNK, DinoDiscriminator
from tok1d.models.frozen.dinov2 import DinoV2

# Keys whose presence marks a DINOv2 (not DINO v1) checkpoint.
_DINOV2_MARKERS = ("mask_token", "register_tokens", r"blocks\.\d+\.ls[12]\.gamma")


def zero_key_bias(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Copy of `state_dict` (NumPy) with the middle (key) third of every `.attn.qkv.bias`
    zeroed, as the official `DinoDisc.__init__` does."""
    out = {}
    for k, v in state_dict.items():
        v = np.array(common._to_numpy(v), copy=True)
        if k.endswith(".attn.qkv.bias"):
            c = v.shape[0] // 3
            v[c:2 * c] = 0
        out[k] = v
    return out


def convert_trunk(state_dict: Mapping[str, Any], model: Optional[DinoDiscriminator] = None,
                  what: str = "DINO v1 checkpoint") -> dict[str, Any]:
    """Official DINO v1 ViT state_dict -> params["trunk"] of `model` (default: the official
    ViT-S/16 discriminator). Raises one ConversionError naming every problem."""
    model = model or DinoDiscriminator()
    found = sorted(k for k in state_dict if any(re.fullmatch(m, k) for m in _DINOV2_MARKERS))
    if found:
        raise ConversionError(f"{what} looks like a DINOv2 checkpoint ({', '.join(found[:3])}"
                              f"{', ...' if len(found) > 3 else ''}); the DINO discriminator "
                              "needs the DINO v1 ViT-S/16 backbone (dino_deitsmall16_pretrain.pth)")
    if "pos_embed" in state_dict:
        n = int(np.prod(np.shape(state_dict["pos_embed"])[:-1])) - 1
        grid = model.img_size // model.patch_size
        if n != grid * grid:
            raise ConversionError(f"{what}: pos_embed has {n} patch rows, the model's "
                                  f"{model.img_size} px / patch {model.patch_size} grid needs "
                                  f"{grid}x{grid} = {grid * grid}")
    trunk = DinoV2(**model.trunk_kwargs())
    return convert_dinov2(zero_key_bias(state_dict), trunk, what=what)


def convert_file(path: str, model: Optional[DinoDiscriminator] = None) -> dict[str, Any]:
    """`dino_deitsmall16_pretrain.pth` (or .safetensors / .npz with the same keys) -> trunk
    params (NumPy)."""
    return convert_trunk(common.load_state_dict(path), model, what=path)


def _abstract_variables(model: DinoDiscriminator) -> Any:
    images = jax.ShapeDtypeStruct(
        (model.virtual_batch_size, model.img_size, model.img_size, 3), jnp.float32)
    return common.abstract_variables(model, images)


def _strip_wrapper(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops `discriminator.` / `module.` style prefixes in front of `heads.`."""
    for key in state_dict:
        m = re.match(r"(.*?)heads\.\d+\.", key)
        if m:
            prefix = m.group(1)
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _conv1d(sd: StateDict, params: ParamTree, spectral: ParamTree, src: str, dst: str) -> None:
    w = sd.take(f"{src}.weight_orig")
    params.set(f"{dst}/kernel", None if w is None else np.ascontiguousarray(w.transpose(2, 1, 0)),
               f"{src}.weight_orig")
    params.set(f"{dst}/bias", sd.take(f"{src}.bias"), f"{src}.bias")
    spectral.set(f"{dst}/u", sd.take(f"{src}.weight_u"), f"{src}.weight_u")
    spectral.set(f"{dst}/v", sd.take(f"{src}.weight_v"), f"{src}.weight_v")


def convert_heads(state_dict: Mapping[str, Any], model: Optional[DinoDiscriminator] = None,
                  what: str = "DINO discriminator state_dict"
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Official `DinoDisc` state_dict (heads only; the trunk is not part of it) -> (params
    without "trunk", spectral collection), with the heads stacked under "heads" for a model
    with `scan_heads`."""
    model = model or DinoDiscriminator()
    stacked, model = model.scan_heads, model.clone(scan_heads=False)
    raw = {k: common._to_numpy(v) for k, v in _strip_wrapper(state_dict).items()}
    sd = StateDict(raw, what)
    params, spectral = ParamTree(), ParamTree()
    for t in range(len(model.taps) + 1):
        src, dst = f"heads.{t}", f"{HEADS}_{t}"
        for s, d in ((f"{src}.0", f"{dst}/block_in"), (f"{src}.1.fn", f"{dst}/block_res")):
            _conv1d(sd, params, spectral, f"{s}.0", f"{d}/conv")
            params.set_tree(f"{d}/norm", common.norm(sd, f"{s}.1"), f"{s}.1")
        _conv1d(sd, params, spectral, f"{src}.2", f"{dst}/logits")
    abstract = _abstract_variables(model)
    heads_abstract = {k: v for k, v in abstract["params"].items() if k != TRUNK}
    out_params = common.finish(sd, params, heads_abstract)
    out_spectral = common.finish(StateDict({}, what), spectral, abstract[SPECTRAL])
    if stacked:
        n = len(model.taps) + 1
        out_params, out_spectral = (
            {**{k: v for k, v in tree.items() if not k.startswith(f"{HEADS}_")},
             HEADS: common.stack_layers([tree[f"{HEADS}_{t}"] for t in range(n)])}
            for tree in (out_params, out_spectral))
    return out_params, out_spectral
