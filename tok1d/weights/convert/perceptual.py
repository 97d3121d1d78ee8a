r"""Converters for the perceptual-loss networks: torchvision VGG16 + LPIPS linear layers -> LPIPS
params, torchvision convnext_small -> ConvNeXt params, written by `convert_files` (the command
`tok1d convert lpips|convnext_s`) in the format `tok1d.weights.perceptual` reads (an .npz of
float32 arrays + JSON meta).

  tok1d convert lpips --vgg=vgg16-397923af.pth --checkpoint=vgg.pth --out=DIR
  tok1d convert convnext_s --checkpoint=convnext_small-0c510722.pth --out=DIR

Sources (the user supplies the files; nothing is downloaded):
  * VGG16: torchvision's `vgg16(weights="IMAGENET1K_V1")` state_dict (`vgg16-397923af.pth`), keys
    `features.{i}.weight/bias` (`classifier.*` is ignored). Alternatively a whole LPIPS module
    state_dict that contains the trunk as `net.slice{s}.{i}.weight/bias` (e.g. TiTok's
    `vgg_lpips.pth`) can be given as --lpips alone.
  * LPIPS linear layers: `lpips/weights/v0.1/vgg.pth` from the `lpips` package, keys
    `lin{k}.model.1.weight` (1, C, 1, 1) (`model.0` when built without dropout; `lins.{k}.*`
    aliases and the ScalingLayer buffers are accepted and checked / ignored).
  * ConvNeXt-S: torchvision's `convnext_small(weights="IMAGENET1K_V1")` state_dict
    (`convnext_small-0c510722.pth`).
Reading .pth files needs PyTorch (`pip install -e '.[convert]'` in tok1d's checkout);
.safetensors / .npz do not.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Optional

import numpy as np

from tok1d.weights.convert import common
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict, conv, linear
from tok1d.models.frozen import perceptual as nets
from tok1d.models.frozen.convnext import ConvNeXt
from tok1d.models.frozen.vgg import TAP_CHANNELS, TORCHVISION_INDEX
from tok1d.weights import perceptual as files

# torchvision `features` index -> LPIPS `net.slice{s}` (slices end after relu1_2 ... relu5_3).
_SLICE_ENDS = (3, 8, 15, 22, 29)


def _lpips_slice(index: int) -> int:
    return next(s + 1 for s, end in enumerate(_SLICE_ENDS) if index <= end)


# --------------------------------------------------------------------------- LPIPS

def _convert_vgg_trunk(sd: StateDict, out: ParamTree, lpips_layout: bool) -> None:
    for name, index in TORCHVISION_INDEX.items():
        key = (f"net.slice{_lpips_slice(index)}.{index}" if lpips_layout
               else f"features.{index}")
        w = sd.take(f"{key}.weight")
        out.set(f"net/{name}/kernel", None if w is None else conv(w), f"{key}.weight")
        out.set(f"net/{name}/bias", sd.take(f"{key}.bias"), f"{key}.bias")


def _convert_lpips_lins(sd: StateDict, out: ParamTree) -> None:
    for k, channels in enumerate(TAP_CHANNELS):
        key = next((f"lin{k}.model.{i}.weight" for i in (1, 0)
                    if f"lin{k}.model.{i}.weight" in sd), f"lin{k}.model.1.weight")
        w = sd.take(key)
        if w is not None:
            if w.shape != (1, channels, 1, 1):
                raise ConversionError(f"{sd.what}: {key} has shape {w.shape}, expected "
                                      f"(1, {channels}, 1, 1)")
            out.set(f"head/lin{k}", w.reshape(channels), key)
        alias = key.replace(f"lin{k}.", f"lins.{k}.")
        if alias in sd:  # nn.ModuleList alias of the same tensor in LPIPS().state_dict()
            if w is not None and not np.array_equal(sd.take(alias), w):
                raise ConversionError(f"{sd.what}: {alias} differs from {key}")
            sd.ignore(alias)
    for name, want in (("shift", nets.LPIPS_SHIFT), ("scale", nets.LPIPS_SCALE)):
        key = f"scaling_layer.{name}"
        if key in sd:
            got = sd.take(key).reshape(-1)
            if not np.allclose(got, np.asarray(want, np.float32), rtol=0, atol=1e-7):
                raise ConversionError(f"{sd.what}: {key} = {got.tolist()} is not LPIPS' "
                                      f"{list(want)}")


def convert_lpips(vgg_state_dict: Optional[Mapping[str, np.ndarray]],
                  lpips_state_dict: Mapping[str, np.ndarray],
                  what: str = "LPIPS checkpoints") -> dict[str, Any]:
    """torchvision vgg16 state_dict + lpips `vgg.pth` -> params of
    `tok1d.models.frozen.perceptual.LPIPS`.

    With `vgg_state_dict=None` the trunk is read from `net.slice{s}.{i}.*` keys of the LPIPS
    state_dict. Raises `ConversionError` listing every missing / unexpected / mismatched tensor.
    """
    merged = dict(lpips_state_dict)
    lpips_layout = vgg_state_dict is None
    if vgg_state_dict is not None:
        clash = sorted(set(merged) & set(vgg_state_dict))
        if clash:
            raise ConversionError(f"{what}: the VGG and LPIPS files share keys {clash[:5]}")
        if any(k.startswith("net.") for k in merged):
            raise ConversionError(f"{what}: the LPIPS file already holds a VGG trunk (net.*); "
                                  "give it alone, without a separate VGG16 file.")
        merged.update(vgg_state_dict)
    elif not any(k.startswith("net.slice") for k in merged):
        raise ConversionError(f"{what}: no VGG16 trunk: give torchvision's vgg16 state_dict "
                              "(vgg16-397923af.pth) as well as the LPIPS linear layers.")
    sd = StateDict(merged, what)
    out = ParamTree()
    _convert_vgg_trunk(sd, out, lpips_layout)
    _convert_lpips_lins(sd, out)
    sd.ignore(*(k for k in sd.keys() if k.startswith("classifier.")))
    return common.finish(sd, out, nets.abstract_variables("lpips"))


# --------------------------------------------------------------------------- ConvNeXt

def _block_params(sd: StateDict, key: str) -> Optional[dict[str, Any]]:
    dw = sd.take(f"{key}.block.0.weight")
    fc1, fc2 = sd.take(f"{key}.block.3.weight"), sd.take(f"{key}.block.5.weight")
    gamma = sd.take(f"{key}.layer_scale")
    tree = {
        "dwconv": {"kernel": None if dw is None else conv(dw),
                   "bias": sd.take(f"{key}.block.0.bias")},
        "norm": {"scale": sd.take(f"{key}.block.2.weight"), "bias": sd.take(f"{key}.block.2.bias")},
        "fc1": {"kernel": None if fc1 is None else linear(fc1),
                "bias": sd.take(f"{key}.block.3.bias")},
        "fc2": {"kernel": None if fc2 is None else linear(fc2),
                "bias": sd.take(f"{key}.block.5.bias")},
        "layer_scale": None if gamma is None else gamma.reshape(-1),
    }
    ok = all(v is not None for sub in tree.values()
             for v in (sub.values() if isinstance(sub, dict) else [sub]))
    return tree if ok else None


def convert_convnext(state_dict: Mapping[str, np.ndarray], model: Optional[ConvNeXt] = None,
                     what: str = "ConvNeXt checkpoint") -> dict[str, Any]:
    """torchvision ConvNeXt state_dict -> params of `model` (default: convnext_small)."""
    model = nets.convnext_small() if model is None else model
    sd = StateDict(state_dict, what)
    out = ParamTree()

    def conv_(path: str, key: str) -> None:
        w = sd.take(f"{key}.weight")
        out.set(f"{path}/kernel", None if w is None else conv(w), f"{key}.weight")
        out.set(f"{path}/bias", sd.take(f"{key}.bias"), f"{key}.bias")

    def norm_(path: str, key: str) -> None:
        out.set(f"{path}/scale", sd.take(f"{key}.weight"), f"{key}.weight")
        out.set(f"{path}/bias", sd.take(f"{key}.bias"), f"{key}.bias")

    conv_("stem_conv", "features.0.0")
    norm_("stem_norm", "features.0.1")
    for i, depth in enumerate(model.depths):
        if i:
            norm_(f"downsample{i}_norm", f"features.{2 * i}.0")
            conv_(f"downsample{i}_conv", f"features.{2 * i}.1")
        stage = f"features.{2 * i + 1}"
        blocks = [_block_params(sd, f"{stage}.{j}") for j in range(depth)]
        extra = [k for k in sd.keys() if k.startswith(f"{stage}.")
                 and k[len(stage) + 1:].split(".")[0].isdigit()
                 and int(k[len(stage) + 1:].split(".")[0]) >= depth]
        if extra:
            raise ConversionError(f"{what}: stage {i} ({stage}) has more than {depth} blocks "
                                  f"({extra[0]}); is this convnext_small?")
        if any(b is None for b in blocks):
            continue  # the missing keys are recorded; finish() reports them
        if model.scan:
            out.set_tree(f"stage{i}", common.stack_layers(blocks), f"{stage}.*")
        else:
            for j, b in enumerate(blocks):
                out.set_tree(f"stage{i}_block{j}", b, f"{stage}.{j}.*")
    norm_("head_norm", "classifier.0")
    w = sd.take("classifier.2.weight")
    out.set("head/kernel", None if w is None else linear(w), "classifier.2.weight")
    out.set("head/bias", sd.take("classifier.2.bias"), "classifier.2.bias")
    return common.finish(sd, out, nets.abstract_variables("convnext_s", model))


# --------------------------------------------------------------------------- files / CLI

def _file_info(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path),
            "sha256": h.hexdigest()}


def convert_files(kind: str, out_dir: str, vgg: Optional[str] = None, lpips: Optional[str] = None,
                  weights: Optional[str] = None) -> str:
    """Converts the official files of one component and writes OUT_DIR/<standard name>.npz."""
    if kind == "lpips":
        if lpips is None:
            raise ValueError("--kind lpips needs --lpips (lpips/weights/v0.1/vgg.pth) and "
                             "--vgg (torchvision vgg16-397923af.pth).")
        sources = [p for p in (vgg, lpips) if p]
        params = convert_lpips(None if vgg is None else common.load_state_dict(vgg),
                               common.load_state_dict(lpips), what=" + ".join(sources))
    elif kind == "convnext_s":
        if weights is None:
            raise ValueError("--kind convnext_s needs --weights (torchvision "
                             "convnext_small-0c510722.pth).")
        sources = [weights]
        params = convert_convnext(common.load_state_dict(weights), what=weights)
    else:
        raise ValueError(f"--kind must be 'lpips' or 'convnext_s', got {kind!r}")
    path = os.path.join(out_dir, files.WEIGHT_FILES[kind])
    files.save_params(path, kind, params,
                           meta={"sources": [_file_info(p) for p in sources]})
    return path

