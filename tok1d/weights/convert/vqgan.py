"""MaskGIT-VQGAN PyTorch state_dict -> tok1d `MaskGITVQGAN` params.

The official teacher file (`maskgit-vqgan-imagenet-f16-256.bin`, HF `fun-research/TiTok`) holds
`encoder.*`, `decoder.*` and `quantize.embedding.weight`; TiTok stage-2 checkpoints carry the
same decoder under `pixel_decoder.*` (and the codebook as `pixel_quantize.embedding.weight`),
which `convert_decoder(sd, out, "pixel_decoder.", "pixel_decoder", ...)` handles.

Mapping (PyTorch -> Flax, see `tok1d.models.tokenizers.vqgan` for the layout):
  {enc,dec}.conv_in / conv_out / down.i.block.j.* / mid.j.* / up.i.block.j.* / up.i.upsample_conv
      -> conv_in / conv_out / down_i/block_j/* / mid_j/* / up_i/block_j/* / up_i/upsample_conv
  Conv2d weight (O, I, kh, kw) -> kernel (kh, kw, I, O); GroupNorm weight/bias -> scale/bias.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict, conv, finish
from tok1d.models.tokenizers.vqgan import MASKGIT_VQGAN_F16_256, MaskGITVQGAN, init_shapes

__all__ = ["ConversionError", "convert_decoder", "convert_encoder", "convert_maskgit_vqgan",
           "kwargs_from_official"]


def _take_conv(sd: StateDict, out: ParamTree, src: str, dst: str, bias: bool) -> None:
    w = sd.take(src + ".weight")
    out.set(dst + "/kernel", None if w is None else conv(w), src + ".weight")
    if bias:
        out.set(dst + "/bias", sd.take(src + ".bias"), src + ".bias")


def _take_norm(sd: StateDict, out: ParamTree, src: str, dst: str) -> None:
    out.set(dst + "/scale", sd.take(src + ".weight"), src + ".weight")
    out.set(dst + "/bias", sd.take(src + ".bias"), src + ".bias")


def _resnet_block(sd: StateDict, out: ParamTree, src: str, dst: str, shortcut: bool) -> None:
    """One ResnetBlock (`src` ends without a dot). Its convs have no bias; `nin_shortcut` exists
    only in blocks that change the channel count."""
    _take_norm(sd, out, src + ".norm1", dst + "/norm1")
    _take_conv(sd, out, src + ".conv1", dst + "/conv1", bias=False)
    _take_norm(sd, out, src + ".norm2", dst + "/norm2")
    _take_conv(sd, out, src + ".conv2", dst + "/conv2", bias=False)
    if shortcut:
        _take_conv(sd, out, src + ".nin_shortcut", dst + "/nin_shortcut", bias=False)


def convert_encoder(sd: StateDict, out: ParamTree, src: str, dst: str,
                    channel_mult: Sequence[int], num_res_blocks: int) -> None:
    """Official `Encoder` keys under `src` (e.g. "encoder.") -> params under `dst` ("encoder").
    Which blocks have a `nin_shortcut` follows from `channel_mult` (the channel count changes in
    block 0 of level i when channel_mult[i] differs from the previous level's, starting from 1)."""
    mult = tuple(channel_mult)
    _take_conv(sd, out, src + "conv_in", dst + "/conv_in", bias=False)
    prev = 1
    for i, m in enumerate(mult):
        for j in range(num_res_blocks):
            _resnet_block(sd, out, f"{src}down.{i}.block.{j}", f"{dst}/down_{i}/block_{j}",
                          shortcut=(j == 0 and m != prev))
        prev = m
    for j in range(num_res_blocks):
        _resnet_block(sd, out, f"{src}mid.{j}", f"{dst}/mid_{j}", shortcut=False)
    _take_norm(sd, out, src + "norm_out", dst + "/norm_out")
    _take_conv(sd, out, src + "conv_out", dst + "/conv_out", bias=True)


def convert_decoder(sd: StateDict, out: ParamTree, src: str, dst: str,
                    channel_mult: Sequence[int], num_res_blocks: int) -> None:
    """Official `Decoder` keys under `src` ("decoder." or "pixel_decoder.") -> params under
    `dst`. Level i's block 0 changes channels when channel_mult[i] differs from the level above
    (channel_mult[i + 1], or channel_mult[-1] for the deepest level)."""
    mult = tuple(channel_mult)
    levels = len(mult)
    _take_conv(sd, out, src + "conv_in", dst + "/conv_in", bias=True)
    for j in range(num_res_blocks):
        _resnet_block(sd, out, f"{src}mid.{j}", f"{dst}/mid_{j}", shortcut=False)
    for i in range(levels):
        above = mult[i + 1] if i + 1 < levels else mult[-1]
        for j in range(num_res_blocks):
            _resnet_block(sd, out, f"{src}up.{i}.block.{j}", f"{dst}/up_{i}/block_{j}",
                          shortcut=(j == 0 and mult[i] != above))
        if i != 0:
            _take_conv(sd, out, f"{src}up.{i}.upsample_conv", f"{dst}/up_{i}/upsample_conv",
                       bias=True)
    _take_norm(sd, out, src + "norm_out", dst + "/norm_out")
    _take_conv(sd, out, src + "conv_out", dst + "/conv_out", bias=True)


def kwargs_from_official(cfg: Optional[dict]) -> dict[str, Any]:
    """Official config -> `MaskGITVQGAN` kwargs.

    Accepts {"vqgan": {hidden_channels, channel_mult, num_res_blocks, z_channels, ...},
    "num_embeddings": K, ...} (the fixture / `modeling.modules.maskgit_vqgan` form) or the inner
    dict alone; `None` or missing fields give the released f16-256 model."""
    kwargs = dict(MASKGIT_VQGAN_F16_256)
    if not cfg:
        return kwargs
    inner = cfg.get("vqgan", cfg)
    for key in ("hidden_channels", "num_res_blocks", "z_channels"):
        if inner.get(key) is not None:
            kwargs[key] = int(inner[key])
    if inner.get("channel_mult") is not None:
        kwargs["channel_mult"] = tuple(int(m) for m in inner["channel_mult"])
    levels = inner.get("num_resolutions")
    if levels is not None and int(levels) != len(kwargs["channel_mult"]):
        raise ValueError(f"num_resolutions={levels} does not match channel_mult "
                         f"{kwargs['channel_mult']}.")
    if inner.get("num_channels", 3) != 3:
        raise ValueError(f"Only 3-channel images are supported, got num_channels="
                         f"{inner['num_channels']}.")
    for key in ("num_embeddings", "codebook_size"):
        if cfg.get(key) is not None:
            kwargs["codebook_size"] = int(cfg[key])
    return kwargs


def convert_maskgit_vqgan(state_dict: dict[str, np.ndarray], model: MaskGITVQGAN
                          ) -> dict[str, Any]:
    """Full teacher conversion (`encoder.*`, `decoder.*`, `quantize.embedding.weight`) into the
    params of `model` (returned as the inner `params` dict; apply with {"params": ...}).
    Raises `ConversionError` listing every missing / unexpected / mismatched tensor."""
    sd = StateDict(state_dict, what="MaskGIT-VQGAN checkpoint")
    out = ParamTree()
    convert_encoder(sd, out, "encoder.", "encoder", model.channel_mult, model.num_res_blocks)
    convert_decoder(sd, out, "decoder.", "decoder", model.channel_mult, model.num_res_blocks)
    out.set("quantize/embedding", sd.take("quantize.embedding.weight"),
            "quantize.embedding.weight")
    return finish(sd, out, init_shapes(model)["params"])
