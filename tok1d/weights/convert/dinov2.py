"""Official DINOv2 state_dicts (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, i.e. what
`torch.hub.load("facebookresearch/dinov2", ...)` loads strictly) -> `tok1d.models.frozen.dinov2.DinoV2`.

Key map (i = block index; block_chunks must be 0, as in every released checkpoint):
  cls_token (1,1,D)              -> cls_token (1,D)
  register_tokens (1,R,D)        -> register_tokens (R,D)
  pos_embed (1,1+M*M,D)          -> pos_embed (1+g*g,D); resampled (timm-style antialiased
                                    bicubic, as GigaTok does at load time) when the model's
                                    pos_grid g differs from M
  patch_embed.proj.{weight,bias} -> patch_embed/{kernel (14,14,3,D), bias}
  blocks.i.norm{1,2}             -> blocks_i/norm{1,2}/norm/{scale,bias}
  blocks.i.attn.qkv (3D,D)       -> blocks_i/attn/{query,key,value} (rows [q; k; v])
  blocks.i.attn.proj             -> blocks_i/attn/out
  blocks.i.ls{1,2}.gamma         -> blocks_i/ls{1,2}/gamma
  blocks.i.mlp.fc{1,2}           -> blocks_i/mlp/fc{1,2}                (GELU MLP)
  blocks.i.mlp.w12 (2H,D), w3    -> blocks_i/mlp/{gate = rows[:H], up = rows[H:]}, fc2  (SwiGLU)
  norm                           -> norm/norm/{scale,bias}
A `scan=True` model gets the blocks stacked along a leading axis under `blocks` instead.

`mask_token` is skipped: it only replaces masked patch embeddings in iBOT training
(`prepare_tokens_with_masks(x, masks)`); the inference forward never reads it. Any other key
that the model does not use is an error.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.weights.convert import common
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict
from tok1d.models.frozen.dinov2 import DinoV2, resample_pos_embed, swiglu_hidden_dim

# Keys of the official model that the inference forward does not use.
UNUSED_OFFICIAL_KEYS = ("mask_token",)

# Every released DINOv2 model has 64-wide heads (384/6, 768/12, 1024/16, 1536/24).
OFFICIAL_HEAD_DIM = 64


def _check_chunks(state_dict: Mapping[str, Any]) -> None:
    chunked = sorted(k for k in state_dict if re.match(r"blocks\.\d+\.\d+\.", k))
    if chunked:
        raise ConversionError(
            f"state_dict uses block_chunks > 0 (e.g. {chunked[0]!r}); only the flat "
            "`blocks.{i}.*` layout of the released checkpoints (block_chunks=0) is supported.")


def kwargs_from_state_dict(state_dict: Mapping[str, np.ndarray], num_heads: Optional[int] = None,
                           pos_grid: Optional[int] = None, **overrides: Any) -> dict[str, Any]:
    """`DinoV2` kwargs inferred from an official state_dict's shapes.

    The head count is not visible in the shapes: by default embed_dim // 64 (true for every
    released model); pass `num_heads` otherwise. Register checkpoints get the hub's register
    settings (antialiased interpolation, offset 0). `pos_grid` (e.g. 16, GigaTok) makes the
    converter resample the position table to that grid."""
    _check_chunks(state_dict)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight"):
        if key not in state_dict:
            raise ConversionError(f"not a DINOv2 state_dict: {key!r} is missing")
    d = int(state_dict["cls_token"].shape[-1])
    patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
    n = int(state_dict["pos_embed"].shape[-2]) - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ConversionError(f"pos_embed has {n} patch rows, not a square grid")
    depth = 0
    while f"blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    if num_heads is None:
        if d % OFFICIAL_HEAD_DIM:
            raise ConversionError(f"embed_dim {d} is not a multiple of 64; pass num_heads")
        num_heads = d // OFFICIAL_HEAD_DIM
    kw: dict[str, Any] = dict(embed_dim=d, depth=depth, num_heads=num_heads, patch_size=patch,
                              img_size=m * patch)
    if "blocks.0.mlp.w12.weight" in state_dict:
        hidden = int(state_dict["blocks.0.mlp.w12.weight"].shape[0]) // 2
        if hidden != swiglu_hidden_dim(d, 4):
            raise ConversionError(f"SwiGLU hidden width {hidden} does not follow the official "
                                  f"rule for mlp_ratio 4 ({swiglu_hidden_dim(d, 4)})")
        kw.update(ffn="swiglu", mlp_ratio=4)
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
        kw.update(ffn="mlp", mlp_ratio=hidden / d if hidden % d else hidden // d)
    else:
        raise ConversionError("blocks.0.mlp has neither fc1 (MLP) nor w12 (SwiGLU) weights")
    kw["layer_scale_init"] = 1.0 if "blocks.0.ls1.gamma" in state_dict else None
    if "register_tokens" in state_dict:
        kw.update(num_register_tokens=int(state_dict["register_tokens"].shape[-2]),
                  interpolate_antialias=True, interpolate_offset=0.0)
    if pos_grid is not None:
        kw["pos_grid"] = pos_grid
    kw.update(overrides)
    return kw


def abstract_params(model: DinoV2) -> Any:
    g = model.table_grid * model.patch_size
    images = jax.ShapeDtypeStruct((1, g, g, 3), jnp.float32)
    return common.abstract_variables(model, images)["params"]


def _block(sd: StateDict, src: str, model: DinoV2) -> dict[str, Any]:
    out: dict[str, Any] = {"norm1": {"norm": common.norm(sd, f"{src}.norm1")},
                           "norm2": {"norm": common.norm(sd, f"{src}.norm2")}}
    attn: dict[str, Any] = {}
    qkv_w = sd.take(f"{src}.attn.qkv.weight")
    qkv_b = sd.take(f"{src}.attn.qkv.bias") if model.qkv_bias else None
    if qkv_w is not None:
        attn.update(common.split_in_proj(qkv_w, qkv_b, model.num_heads))
    proj_w = sd.take(f"{src}.attn.proj.weight")
    proj_b = sd.take(f"{src}.attn.proj.bias")
    if proj_w is not None:
        attn["out"] = common.out_proj(proj_w, proj_b, model.num_heads)
    out["attn"] = attn
    if model.layer_scale_init is not None:
        for ls in ("ls1", "ls2"):
            gamma = sd.take(f"{src}.{ls}.gamma")
            if gamma is not None:
                out[ls] = {"gamma": gamma}
    if model.ffn == "swiglu":
        w12 = sd.take(f"{src}.mlp.w12.weight")
        b12 = sd.take(f"{src}.mlp.w12.bias")
        mlp: dict[str, Any] = {"fc2": common.dense(sd, f"{src}.mlp.w3")}
        if w12 is not None and b12 is not None:
            h = w12.shape[0] // 2
            mlp["gate"] = {"kernel": common.linear(w12[:h]), "bias": b12[:h]}
            mlp["up"] = {"kernel": common.linear(w12[h:]), "bias": b12[h:]}
    else:
        mlp = {"fc1": common.dense(sd, f"{src}.mlp.fc1"), "fc2": common.dense(sd, f"{src}.mlp.fc2")}
    out["mlp"] = mlp
    return out


def convert_dinov2(state_dict: Mapping[str, np.ndarray], model: DinoV2,
                   what: str = "DINOv2 checkpoint") -> dict[str, Any]:
    """Official DINOv2 state_dict -> params of `model`; raises one ConversionError listing every
    missing, unexpected or mismatched tensor."""
    _check_chunks(state_dict)
    sd = StateDict(state_dict, what)
    sd.ignore(*UNUSED_OFFICIAL_KEYS)
    out = ParamTree()
    cls = sd.take("cls_token")
    out.set("cls_token", None if cls is None else cls.reshape(-1, cls.shape[-1]), "cls_token")
    if model.num_register_tokens:
        reg = sd.take("register_tokens")
        out.set("register_tokens", None if reg is None else reg.reshape(-1, reg.shape[-1]),
                "register_tokens")
    pos = sd.take("pos_embed")
    if pos is not None:
        pos = pos.reshape(-1, pos.shape[-1])
        m = int(round((pos.shape[0] - 1) ** 0.5))
        g = model.table_grid
        src = "pos_embed"
        if m * m == pos.shape[0] - 1 and m != g:
            pos, src = resample_pos_embed(pos, (g, g), antialias=True), \
                f"pos_embed (resampled {m}x{m} -> {g}x{g})"
        out.set("pos_embed", pos, src)
    out.set_tree("patch_embed", common.conv_params(sd, "patch_embed.proj"), "patch_embed.proj")
    common.put_layers(sd, out, "blocks", None, model.depth, model.scan,
                      lambda layer: _block(sd, layer, model))
    out.set_tree("norm/norm", common.norm(sd, "norm"), "norm")
    return common.finish(sd, out, abstract_params(model))


def convert_file(path: str, num_heads: Optional[int] = None, pos_grid: Optional[int] = None,
                 **model_overrides: Any) -> tuple[DinoV2, dict[str, Any]]:
    """Reads `dinov2_vit*14*_pretrain.pth` (or .safetensors / .npz) -> (model, params).
    `pos_grid=16` gives GigaTok's teacher (table resampled to 16x16 for 224 px inputs)."""
    state_dict = common.load_state_dict(path)
    kwargs = kwargs_from_state_dict(state_dict, num_heads=num_heads, pos_grid=pos_grid)
    kwargs.update(model_overrides)
    model = DinoV2(**kwargs)
    return model, convert_dinov2(state_dict, model, what=path)
