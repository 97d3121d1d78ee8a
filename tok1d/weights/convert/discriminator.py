"""Official discriminator state dicts -> params of `tok1d.models.discriminator`.

`convert_titok_discriminator` / `convert_patchgan_discriminator` turn official PyTorch state
dicts (a bare discriminator, TiTok's loss-module state dict with its `discriminator.` prefix, or
GigaTok's `checkpoint["discriminator"]`) into params for `TiTokDiscriminator` /
`PatchGANDiscriminator`; `convert_patchgan_batch_stats` turns the BatchNorm running statistics
into the "batch_stats" collection of a PatchGAN with `track_running_stats=True`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.models.discriminator import PatchGANDiscriminator, TiTokDiscriminator
from tok1d.weights.convert import common


def _strip_prefix(state_dict: Mapping[str, Any], anchor: str) -> dict[str, Any]:
    """Keeps the sub-dict whose keys end in `anchor...` (drops `discriminator.`, `module.` and
    other wrappers, and unrelated entries such as TiTok's LeCam EMA buffers)."""
    for key in state_dict:
        pos = key.find(anchor)
        if pos >= 0 and (pos == 0 or key[pos - 1] == "."):
            prefix = key[:pos]
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _abstract_params(model: nn.Module, size: int = 64) -> Any:
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return common.abstract_variables(model, x)["params"]


def convert_titok_discriminator(state_dict: Mapping[str, Any],
                                model: Optional[TiTokDiscriminator] = None) -> dict[str, Any]:
    """Official TiTok / MaskBit `NLayerDiscriminator` state dict -> `TiTokDiscriminator` params
    (NumPy). Blur-kernel buffers are checked to be the expected (1,3,3,1) kernel and dropped."""
    model = model or TiTokDiscriminator()
    raw = {k: common._to_numpy(v) for k, v in _strip_prefix(state_dict, "block_in.").items()}
    sd = common.StateDict(raw, "TiTok discriminator state_dict")
    out = common.ParamTree()
    out.set_tree("conv_in", common.conv_params(sd, "block_in.0"), "block_in.0")
    for i in range(model.num_stages):
        out.set_tree(f"stage_{i}_conv", common.conv_params(sd, f"blocks.{i}.0"), f"blocks.{i}.0")
        out.set_tree(f"stage_{i}_norm", common.norm(sd, f"blocks.{i}.2"), f"blocks.{i}.2")
        key = f"blocks.{i}.1.kernel"
        if key in sd and model.blur_kernel is not None:
            a = np.asarray(model.blur_kernel, np.float64)
            want = np.outer(a, a) / np.outer(a, a).sum()
            got = sd.take(key)
            if got.reshape(-1).shape != want.reshape(-1).shape or not np.allclose(
                    got.reshape(want.shape), want, atol=1e-6):
                raise common.ConversionError(f"{key} is not the blur kernel {model.blur_kernel}")
    out.set_tree("logits_hidden", common.conv_params(sd, "to_logits.0"), "to_logits.0")
    out.set_tree("logits_out", common.conv_params(sd, "to_logits.2"), "to_logits.2")
    return common.finish(sd, out, _abstract_params(model))


def convert_patchgan_discriminator(state_dict: Mapping[str, Any],
                                   model: Optional[PatchGANDiscriminator] = None
                                   ) -> dict[str, Any]:
    """Official LlamaGen / GigaTok PatchGAN `NLayerDiscriminator` state dict (`main.*` keys) ->
    `PatchGANDiscriminator` params (NumPy). BatchNorm running statistics are dropped (the
    official trainers never read them, see the module docstring)."""
    model = model or PatchGANDiscriminator()
    if model.norm != "batch":
        raise ValueError("the official PatchGAN checkpoints use norm='batch'")
    raw = {k: common._to_numpy(v) for k, v in _strip_prefix(state_dict, "main.").items()}
    sd = common.StateDict(raw, "PatchGAN discriminator state_dict")
    out = common.ParamTree()
    out.set_tree("conv_0", common.conv_params(sd, "main.0"), "main.0")
    for n in range(1, model.num_layers + 1):
        idx = 2 + 3 * (n - 1)
        out.set_tree(f"conv_{n}", common.conv_params(sd, f"main.{idx}", bias=False),
                     f"main.{idx}")
        out.set_tree(f"norm_{n}", common.norm(sd, f"main.{idx + 1}"), f"main.{idx + 1}")
        sd.ignore(*(f"main.{idx + 1}.{b}" for b in
                    ("running_mean", "running_var", "num_batches_tracked")))
    last = 2 + 3 * model.num_layers
    out.set_tree("conv_out", common.conv_params(sd, f"main.{last}"), f"main.{last}")
    return common.finish(sd, out, _abstract_params(model))


def convert_patchgan_batch_stats(state_dict: Mapping[str, Any],
                                 model: Optional[PatchGANDiscriminator] = None) -> dict[str, Any]:
    """The BatchNorm running statistics of an official PatchGAN state dict (`main.{i}.running_mean
    / running_var / num_batches_tracked`) -> the "batch_stats" collection of a
    `PatchGANDiscriminator(track_running_stats=True)`: {"norm_{n}": {"mean", "var", "count"}}."""
    model = model or PatchGANDiscriminator(track_running_stats=True)
    raw = {k: common._to_numpy(v) for k, v in _strip_prefix(state_dict, "main.").items()}
    out, missing = {}, []
    for n in range(1, model.num_layers + 1):
        src = f"main.{2 + 3 * (n - 1) + 1}"
        names = {"mean": "running_mean", "var": "running_var", "count": "num_batches_tracked"}
        missing += [f"{src}.{b}" for b in names.values() if f"{src}.{b}" not in raw]
        if not missing:
            out[f"norm_{n}"] = {
                "mean": np.asarray(raw[f"{src}.running_mean"], np.float32),
                "var": np.asarray(raw[f"{src}.running_var"], np.float32),
                "count": np.asarray(raw[f"{src}.num_batches_tracked"], np.int32).reshape(())}
    if missing:
        raise common.ConversionError(f"PatchGAN state_dict lacks BatchNorm statistics: {missing}")
    return out
