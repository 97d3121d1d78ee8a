"""Converted perceptual-network weight files: one uncompressed .npz per component (float32
arrays under "params/<path>" + a JSON "meta" with the format, the component and the sources),
written by `tok1d convert lpips|convnext_s` (`tok1d.weights.convert.perceptual`) and read back here, checked against the network
of `tok1d.models.frozen.perceptual`.

  resolve_weight_files("DIR", ("lpips",))   # {"lpips": "DIR/lpips_vgg16.npz"}
  params = load_params(path, "lpips")         # checked against the LPIPS module's shapes

`tok1d.weights.loaders.load_perceptual` is the loader the trainer and the metrics use.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import flax.traverse_util as tu
import jax.numpy as jnp
import numpy as np

from tok1d.models.frozen import perceptual as nets

WEIGHT_FILES = {"lpips": "lpips_vgg16.npz", "convnext_s": "convnext_small.npz"}
FORMAT = "tok1d-perceptual-v1"

_HOW_TO_CONVERT = {
    "lpips": (
        "LPIPS needs the released name lpips_vgg (downloaded and converted once), or "
        "torchvision's ImageNet VGG16 weights (vgg16-397923af.pth, the file "
        "torchvision.models.vgg16(weights='IMAGENET1K_V1') downloads) and the LPIPS v0.1 linear "
        "layers (lpips/weights/v0.1/vgg.pth inside the `lpips` pip package). Convert them once: "
        "`tok1d convert lpips --vgg=vgg16-397923af.pth --checkpoint=vgg.pth "
        "--out=DIR`"),
    "convnext_s": (
        "The ConvNeXt loss needs the released name convnext_s (downloaded and converted once), "
        "or torchvision's convnext_small IMAGENET1K_V1 weights "
        "(convnext_small-0c510722.pth, the file torchvision.models.convnext_small("
        "weights='IMAGENET1K_V1') downloads). Convert them once: `tok1d convert "
        "convnext_s --checkpoint=convnext_small-0c510722.pth --out=DIR`"),
}


class MissingPerceptualWeights(FileNotFoundError):
    """The pretrained weights a perceptual loss needs were not given or not found."""


def how_to_convert(components: Sequence[str]) -> str:
    """What to download and the command converting it, for each component."""
    return " ".join(_HOW_TO_CONVERT[c] for c in components)


def save_params(path: str, component: str, params: Mapping[str, Any],
                meta: Optional[Mapping[str, Any]] = None) -> None:
    """Writes converted params as an uncompressed .npz (float32 arrays + a JSON "meta")."""
    flat = {f"params/{k}": np.asarray(v, np.float32)
            for k, v in tu.flatten_dict(dict(params), sep="/").items()}
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
    module = nets.build_module(component) if module is None else module
    want = tu.flatten_dict(dict(nn.unbox(nets.abstract_variables(component, module))), sep="/")
    with np.load(path, allow_pickle=False) as z:
        got = {k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: file {got[k].shape} vs model {tuple(want[k].shape)}"
                 for k in sorted(set(got) & set(want)) if got[k].shape != tuple(want[k].shape)]
    if problems:
        raise ValueError(f"{path} does not match the {component} model: " + "; ".join(problems))
    return tu.unflatten_dict({k: jnp.asarray(v, dtype=want[k].dtype) for k, v in got.items()},
                            sep="/")


def resolve_weight_files(weights: str, components: Sequence[str]) -> dict[str, str]:
    """Maps each needed component to its converted file: `weights` is a directory written by
    the converter, a single converted .npz, or several paths joined by a comma."""
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
                             + how_to_convert(components))
        found.setdefault(read_meta(path).get("component"), path)
    missing = [c for c in components if c not in found]
    if missing:
        raise MissingPerceptualWeights(
            f"no converted {' / '.join(WEIGHT_FILES[c] for c in missing)} in {weights!r}. "
            + how_to_convert(missing))
    return found
