"""GigaTok CNN encoder / decoder PyTorch keys -> tok1d `GigaTokCNNEncoder` / `GigaTokCNNDecoder`
params (see `tok1d.models.tokenizers.gigatok_cnn` for the Flax layout).

The functions write into a shared `ParamTree` so the full GigaTok converter can call them with
`src="encoder."`, `dst="encoder"` and `src="decoder."`, `dst="decoder"`:

  conv_in / conv_out / norm_out / mid.{j}             -> conv_in / conv_out / norm_out / mid_{j}
  conv_blocks.{i}.res.{j}.*                           -> conv_blocks_{i}/res_{j}/*
  conv_blocks.{i}.downsample.conv                     -> conv_blocks_{i}/downsample/conv
  conv_blocks.{i}.upsample.conv1 (d2s) / .conv (nearest) -> conv_blocks_{i}/upsample/conv1 / conv
  adaptive.{i}.gamma / .beta (Linear)                 -> adaptive_{i}/gamma / beta (Dense)
  Conv2d (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear (O, I) -> kernel (I, O);
  GroupNorm weight/bias -> scale/bias.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict, conv_params, dense, finish, norm
from tok1d.models.tokenizers.gigatok_cnn import GigaTokCNNDecoder, GigaTokCNNEncoder, init_shapes

__all__ = ["ConversionError", "convert_cnn_decoder", "convert_cnn_encoder",
           "convert_cnn_decoder_only", "convert_cnn_encoder_only"]


def _resnet_block(sd: StateDict, out: ParamTree, src: str, dst: str, shortcut: bool) -> None:
    """One ResnetBlock (`src` without a trailing dot). All convs have biases; `nin_shortcut`
    exists only when the block changes the channel count."""
    for name in ("norm1", "norm2"):
        out.set_tree(f"{dst}/{name}", norm(sd, f"{src}.{name}"), f"{src}.{name}")
    names = ("conv1", "conv2") + (("nin_shortcut",) if shortcut else ())
    for name in names:
        out.set_tree(f"{dst}/{name}", conv_params(sd, f"{src}.{name}"), f"{src}.{name}")


def convert_cnn_encoder(sd: StateDict, out: ParamTree, src: str, dst: str,
                        ch_mult: Sequence[int], num_res_blocks: int) -> None:
    """Official `blocks.Encoder` keys under `src` ("encoder.") -> params under `dst`
    ("encoder"). Level i's block 0 has a `nin_shortcut` when ch_mult[i] differs from the previous
    level's multiplier (1 before level 0)."""
    mult = tuple(int(m) for m in ch_mult)
    out.set_tree(f"{dst}/conv_in", conv_params(sd, src + "conv_in"), src + "conv_in")
    prev = 1
    for i, m in enumerate(mult):
        for j in range(num_res_blocks):
            _resnet_block(sd, out, f"{src}conv_blocks.{i}.res.{j}",
                          f"{dst}/conv_blocks_{i}/res_{j}", shortcut=(j == 0 and m != prev))
        if i != len(mult) - 1:
            key = f"{src}conv_blocks.{i}.downsample.conv"
            out.set_tree(f"{dst}/conv_blocks_{i}/downsample/conv", conv_params(sd, key), key)
        prev = m
    for j in range(2):
        _resnet_block(sd, out, f"{src}mid.{j}", f"{dst}/mid_{j}", shortcut=False)
    out.set_tree(f"{dst}/norm_out", norm(sd, src + "norm_out"), src + "norm_out")
    out.set_tree(f"{dst}/conv_out", conv_params(sd, src + "conv_out"), src + "conv_out")


def convert_cnn_decoder(sd: StateDict, out: ParamTree, src: str, dst: str,
                        ch_mult: Sequence[int], num_res_blocks: int, adaptive_gn: bool = True,
                        d2s_up: bool = True) -> None:
    """Official `blocks.Decoder` keys under `src` ("decoder.") -> params under `dst`
    ("decoder"). `conv_blocks.k` is official level i = L-1-k; its block 0 has a `nin_shortcut`
    when ch_mult[i] differs from the level above (ch_mult[i + 1], or ch_mult[-1] at k = 0); each
    level has num_res_blocks + 1 blocks."""
    mult = tuple(int(m) for m in ch_mult)
    levels = len(mult)
    out.set_tree(f"{dst}/conv_in", conv_params(sd, src + "conv_in"), src + "conv_in")
    for j in range(2):
        _resnet_block(sd, out, f"{src}mid.{j}", f"{dst}/mid_{j}", shortcut=False)
    for k in range(levels):
        i_level = levels - 1 - k
        above = mult[i_level + 1] if i_level + 1 < levels else mult[-1]
        if adaptive_gn:
            for name in ("gamma", "beta"):
                key = f"{src}adaptive.{k}.{name}"
                out.set_tree(f"{dst}/adaptive_{k}/{name}", dense(sd, key), key)
        for j in range(num_res_blocks + 1):
            _resnet_block(sd, out, f"{src}conv_blocks.{k}.res.{j}",
                          f"{dst}/conv_blocks_{k}/res_{j}",
                          shortcut=(j == 0 and mult[i_level] != above))
        if i_level != 0:
            name = "conv1" if d2s_up else "conv"
            key = f"{src}conv_blocks.{k}.upsample.{name}"
            out.set_tree(f"{dst}/conv_blocks_{k}/upsample/{name}", conv_params(sd, key), key)
    out.set_tree(f"{dst}/norm_out", norm(sd, src + "norm_out"), src + "norm_out")
    out.set_tree(f"{dst}/conv_out", conv_params(sd, src + "conv_out"), src + "conv_out")


def _only(state_dict, src: str, model, spatial: int, in_channels: int, convert, **kw
          ) -> dict[str, Any]:
    sd = StateDict({k: v for k, v in state_dict.items() if k.startswith(src)},
                   what=f"GigaTok CNN ({src}*) weights")
    out = ParamTree()
    convert(sd, out, src, "m", tuple(model.ch_mult), model.num_res_blocks, **kw)
    abstract = {"m": init_shapes(model, spatial, in_channels)["params"]}
    return finish(sd, out, abstract)["m"]


def convert_cnn_encoder_only(state_dict: dict[str, np.ndarray], model: GigaTokCNNEncoder,
                             src: str = "encoder.") -> dict[str, Any]:
    """Only the `src*` keys of `state_dict` -> the `params` of a standalone encoder."""
    return _only(state_dict, src, model, model.downsample_factor, 3, convert_cnn_encoder)


def convert_cnn_decoder_only(state_dict: dict[str, np.ndarray], model: GigaTokCNNDecoder,
                             src: str = "decoder.") -> dict[str, Any]:
    """Only the `src*` keys of `state_dict` -> the `params` of a standalone decoder."""
    return _only(state_dict, src, model, 1, model.z_channels, convert_cnn_decoder,
                 adaptive_gn=model.adaptive_gn, d2s_up=model.d2s_up)
