"""The perceptual-loss networks: LPIPS v0.1 (VGG16 trunk + linear head) and ConvNeXt-S.

  `LPIPS`       NHWC images in [0, 1] -> (B,) distances, as PyPI `lpips` 0.1.4 computes it with
                `normalize=True` and net="vgg": x -> 2x - 1 -> ScalingLayer ((x - shift) / scale)
                -> torchvision VGG16 `features` taps relu1_2 ... relu5_3 -> per-position
                unit-normalisation over channels (f / (||f|| + 1e-10)) -> squared difference
                -> 1x1 linear layers lin0..lin4 (no bias) -> spatial mean -> sum over layers.
                One difference from PyTorch, in gradients only: where all channels of a tap are
                exactly 0 the official normalisation has gradient 0 * inf = NaN; here it is 0.
  `LPIPSHead`   everything after the trunk, with the optional training-mode Dropout of the
                linear layers (`keep` masks, see `KeepFn`).
  `convnext_small`  torchvision `convnext_small` (`tok1d.models.frozen.convnext`).

`build_module(component)` builds either by component name ("lpips", "convnext_s");
`abstract_variables` gives its boxed abstract params and `random_params` a random stand-in (tests
and smoke runs). The losses built on them are in `tok1d.objectives.perceptual`; their converted
weights are read by `tok1d.weights.loaders.load_perceptual`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.layers.transformer import logical
from tok1d.models.frozen.convnext import CONVNEXT_SMALL, ConvNeXt
from tok1d.models.frozen.vgg import TAP_CHANNELS, VGG16Features

Dtype = Any

# LPIPS ScalingLayer buffers (for inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10


def lpips_scaling(x: jax.Array) -> jax.Array:
    """LPIPS ScalingLayer on NHWC images in [-1, 1]."""
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    return (x.astype(jnp.float32) - shift) / scale


def unit_normalize(f: jax.Array, eps: float = LPIPS_EPS) -> jax.Array:
    """f / (sqrt(sum_c f^2) + eps) over the last axis, with a finite gradient at f = 0."""
    f = f.astype(jnp.float32)
    ss = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = ss > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, ss, 1.0)), 0.0)
    return f / (norm + eps)


# keep(k, shape) -> keep mask of the LPIPS Dropout before linear layer `lin{k}`: shape
# (B, H_k, W_k, C_k) of that layer's squared feature difference, bool or 0/1 values.
KeepFn = Callable[[int, tuple], jax.Array]


class LPIPSHead(nn.Module):
    """Everything after the trunk: two lists of taps -> (B, n_layers) per-layer distances.

    `keep` (optional): the LPIPS `NetLinLayer` Dropout in training mode, as GigaTok trains
    (`lin{k}.model` = Dropout(0.5) -> 1x1 conv): the squared difference of layer k becomes
    `d * keep(k, d.shape) / (1 - dropout_rate)` before the linear layer."""

    channels: Sequence[int] = TAP_CHANNELS
    dropout_rate: float = 0.5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats0: Sequence[jax.Array], feats1: Sequence[jax.Array],
                 keep: Optional[KeepFn] = None) -> jax.Array:
        if not len(feats0) == len(feats1) == len(self.channels):
            raise ValueError(f"expected {len(self.channels)} taps per image, got {len(feats0)} "
                             f"and {len(feats1)}")
        out = []
        for k, (f0, f1) in enumerate(zip(feats0, feats1)):
            w = self.param(f"lin{k}", logical(_lpips_lin_init, ("conv_in",)),
                           (self.channels[k],), self.param_dtype)
            d = jnp.square(unit_normalize(f0) - unit_normalize(f1))
            if keep is not None:
                mask = jnp.asarray(keep(k, d.shape))
                if mask.shape != d.shape:
                    raise ValueError(f"LPIPS dropout keep mask of lin{k} has shape {mask.shape}, "
                                     f"expected {d.shape} (B, H, W, C)")
                d = d * (mask.astype(jnp.float32) * jnp.float32(1.0 / (1.0 - self.dropout_rate)))
            d = jnp.einsum("bhwc,c->bhw", d, w.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
            out.append(jnp.mean(d, axis=(1, 2)))
        return jnp.stack(out, axis=-1)


def _lpips_lin_init(key, shape, dtype=jnp.float32):
    # The trained layers are non-negative; a random stand-in keeps that property.
    return jnp.abs(jax.random.normal(key, shape, dtype)) * 0.1


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16): NHWC images in [0, 1] -> (B,) float32 distances. `keep`: the
    training-mode dropout of the linear layers (see `LPIPSHead`); None: eval mode. `channels`:
    the VGG16 block widths (the released weights have `TAP_CHANNELS`; narrower ones make cheap
    random stand-ins for tests)."""

    dropout_rate: float = 0.5
    channels: Sequence[int] = TAP_CHANNELS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def trunk_input(self, x: jax.Array) -> jax.Array:
        return lpips_scaling(2.0 * x.astype(jnp.float32) - 1.0)

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array, keep: Optional[KeepFn] = None) -> jax.Array:
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {x0.shape} vs {x1.shape}")
        # Two calls rather than one on the concatenated batch: the backward pass then runs
        # through the recon images only (B, not 2B).
        net = VGG16Features(widths=tuple(self.channels), dtype=self.dtype,
                            param_dtype=self.param_dtype, name="net")
        taps0, taps1 = net(self.trunk_input(x0)), net(self.trunk_input(x1))
        per_layer = LPIPSHead(channels=tuple(self.channels), dropout_rate=self.dropout_rate,
                              param_dtype=self.param_dtype, name="head")(taps0, taps1, keep)
        return jnp.sum(per_layer, axis=-1)


def convnext_small(dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                   remat: str = "none") -> ConvNeXt:
    return ConvNeXt(**CONVNEXT_SMALL, num_classes=1000, dtype=dtype, param_dtype=param_dtype,
                    remat=remat)


def build_module(component: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: str = "none", lpips_dropout: float = 0.0,
                 lpips_channels: Sequence[int] = ()) -> nn.Module:
    """The module of a component; `lpips_channels` (LPIPS only): VGG16 block widths other than
    the released ones, for random stand-ins (empty: `TAP_CHANNELS`)."""
    if component == "lpips":
        rate = {"dropout_rate": lpips_dropout} if lpips_dropout else {}
        return LPIPS(channels=tuple(lpips_channels) or TAP_CHANNELS, dtype=dtype,
                     param_dtype=param_dtype, **rate)
    if component == "convnext_s":
        return convnext_small(dtype=dtype, param_dtype=param_dtype, remat=remat)
    raise ValueError(f"Unknown perceptual component {component!r}; expected 'lpips' or "
                     "'convnext_s'.")


def lpips_channels_of(params: Mapping[str, Any]) -> tuple[int, ...]:
    """The VGG16 block widths of LPIPS params (from the head's linear layers)."""
    return tuple(int(params["head"][f"lin{k}"].shape[0]) for k in range(len(TAP_CHANNELS)))


def abstract_variables(component: str, module: Optional[nn.Module] = None) -> Any:
    """Boxed (logically partitioned) abstract params of a component's module."""
    module = build_module(component) if module is None else module
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    args = (x, x) if component == "lpips" else (x,)
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def random_params(component: str, module: Optional[nn.Module] = None, seed: int = 0) -> Any:
    """Random stand-in params of a component (tests / smoke runs only), drawn with NumPy (fast,
    no compile): kernels N(0, 2 / fan_in), biases N(0, 0.05^2), norm scales 1 + N(0, 0.05^2),
    ConvNeXt layer scales 0.1 + N(0, 0.01^2), LPIPS linear layers |N(0, 0.1^2)|. Unlike the
    official inits (zero biases, unit scales, layer scale 1e-6) every parameter matters."""
    module = build_module(component) if module is None else module
    boxed = abstract_variables(component, module)
    specs = _flatten(nn.get_partition_spec(boxed))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in _flatten(nn.unbox(boxed)).items():
        shape, name = tuple(leaf.shape), path.rsplit("/", 1)[-1]
        spec = tuple(specs[path])
        core = shape[1:] if spec[:1] == ("layers",) else shape
        noise = rng.standard_normal(shape, dtype=np.float32)
        if name == "kernel":
            value = noise * np.float32(np.sqrt(2.0 / max(1, int(np.prod(core[:-1])))))
        elif name == "scale":
            value = 1.0 + 0.05 * noise
        elif name == "layer_scale":
            value = 0.1 + 0.01 * noise
        elif name.startswith("lin"):
            value = 0.1 * np.abs(noise)
        else:
            value = 0.05 * noise
        out[path] = jnp.asarray(value, dtype=leaf.dtype)
    return _unflatten(out)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
