"""Official GigaTok checkpoints (SilentView/GigaTok) -> tok1d parameters: the transformer halves.

`convert_qformer_encoder` / `convert_qformer_decoder` write the 1D `s2to1encoder.*` /
`s1to2decoder.*` tensors, `convert_vit2d` the 2D `s2dencoder.*` / `s2ddecoder.*` ones (either
block type) into a `ParamTree`; the CNN halves are in `convert.gigatok_cnn`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.models.tokenizers.gigatok import LAYER_TYPES_2D, VIT_SIZES
from tok1d.weights.convert import common, gigatok_cnn
from tok1d.weights.convert.common import ParamTree, StateDict


def _positions(sd: StateDict, key: str):
    """Official position tables are stored (L, 1, W)."""
    value = sd.take(key)
    return None if value is None else value.reshape(value.shape[0], value.shape[-1])


def qformer_layer(sd: StateDict, src: str, num_heads: int) -> dict:
    def attention(name):
        w = sd.take(f"{src}.{name}.in_proj_weight")
        b = sd.take(f"{src}.{name}.in_proj_bias")
        ow = sd.take(f"{src}.{name}.out_proj.weight")
        ob = sd.take(f"{src}.{name}.out_proj.bias")
        out = common.split_in_proj(w, b, num_heads) if w is not None else {}
        if ow is not None:
            out["out"] = common.out_proj(ow, ob, num_heads)
        return out

    return {"norm1": {"norm": common.norm(sd, f"{src}.norm1")},
            "norm2": {"norm": common.norm(sd, f"{src}.norm2")},
            "norm3": {"norm": common.norm(sd, f"{src}.norm3")},
            "self_attn": attention("self_attn"), "cross_attn": attention("multihead_attn"),
            "mlp": {"fc1": common.dense(sd, f"{src}.linear1"),
                    "fc2": common.dense(sd, f"{src}.linear2")}}


# Key names of GigaTok's plain `TransformerLayer` (the 2D tokenizers).
TRANSFORMER_LAYER = dict(ln_1="norm1", ln_2="norm2", attn="self_attn", fc1="linear1",
                         fc2="linear2")


def _convert_half(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int,
                  num_heads: int, layer: str, part: str, distill: bool,
                  one_d: bool = False, scan: bool = False) -> None:
    """One transformer half: `layer` "detr" (TransformerDecoderLayer) or "vit"
    (TransformerLayer); `part` "encoder" (encoder_embed, 1x1 conv_out) or "decoder"
    (decoder_embed, 3x3 conv_out, optional distill MLP); `one_d` adds the 1D Q-Former's
    latent-token positions (and the encoder's global_proj); `scan`: the layers stacked under
    `layers` (a `scan=True` model) or unrolled as `layer_{i}` (the default)."""
    if layer not in ("detr", "vit"):
        raise common.ConversionError(f"unknown GigaTok layer type {layer!r}")
    names = ["positional_embedding"]
    if one_d:
        names.append("latent_token_positional_embedding")
    for name in names:
        out.set(f"{dst}/{name}", _positions(sd, f"{src}.{name}"), f"{src}.{name}")
    embed = f"{part}_embed"
    out.set_tree(f"{dst}/ln_pre/norm", common.norm(sd, f"{src}.ln_pre"), f"{src}.ln_pre")
    out.set_tree(f"{dst}/{embed}", common.dense(sd, f"{src}.{embed}"), f"{src}.{embed}")
    if one_d and part == "encoder":
        out.set_tree(f"{dst}/global_proj", common.dense(sd, f"{src}.global_proj"),
                     f"{src}.global_proj")
    common.put_layers(sd, out, f"{src}.transformer", dst, depth, scan,
                      lambda key: (qformer_layer(sd, key, num_heads) if layer == "detr"
                                   else common.attention_block(sd, key, num_heads,
                                                               TRANSFORMER_LAYER)),
                      stacked="layers", unrolled="layer_{}")
    out.set_tree(f"{dst}/ln_post/norm", common.norm(sd, f"{src}.ln_post"), f"{src}.ln_post")
    head = common.conv1x1_dense if part == "encoder" else common.conv_params
    out.set_tree(f"{dst}/conv_out", head(sd, f"{src}.conv_out"), f"{src}.conv_out")
    if distill:
        for ours, theirs in (("fc_0", 0), ("fc_1", 2), ("fc_2", 4)):
            out.set_tree(f"{dst}/distill_mlp/{ours}",
                         common.dense(sd, f"{src}.distill_mlp.{theirs}"),
                         f"{src}.distill_mlp.{theirs}")


def convert_qformer_encoder(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int,
                            num_heads: int, scan: bool = False) -> None:
    _convert_half(sd, out, src, dst, depth, num_heads, "detr", "encoder", False, one_d=True,
                  scan=scan)


def convert_qformer_decoder(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int,
                            num_heads: int, distill: bool, scan: bool = False) -> None:
    _convert_half(sd, out, src, dst, depth, num_heads, "detr", "decoder", distill, one_d=True,
                  scan=scan)


def convert_vit2d(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int, num_heads: int,
                  part: str, distill: bool = False, layer_type: str = "vit",
                  scan: bool = False) -> None:
    """`s2dencoder.*` (part="encoder") or `s2ddecoder.*` (part="decoder") -> ViT2D params;
    `layer_type` "vit" (TransformerLayer: ln_1/attn/ln_2/mlp names) or "detr"
    (TransformerDecoderLayer: norm1-3, self_attn, multihead_attn, linear1/2)."""
    _convert_half(sd, out, src, dst, depth, num_heads, layer_type, part, distill, scan=scan)


MODEL_CLASSES = {"VQVitModelPlus": "1d", "VQVitModel2DPlus": "2d"}


def layout_from_config(cfg) -> str | None:
    """The layout of an official config from its `model_cls` (searched anywhere in the nested
    dict); None when there is none. Needed for VQ_SS256_2d, whose init_args alone do not show
    that it is 2D."""
    if isinstance(cfg, dict):
        cls = cfg.get("model_cls")
        if cls is not None:
            if cls not in MODEL_CLASSES:
                raise common.ConversionError(f"unsupported GigaTok model_cls {cls!r}; supported: "
                                             f"{sorted(MODEL_CLASSES)}")
            return MODEL_CLASSES[cls]
        for value in cfg.values():
            found = layout_from_config(value)
            if found is not None:
                return found
    return None


def kwargs_from_official(init_args: dict, size_tables: dict | None = None,
                         ctor_patches: dict | None = None, image_size: int = 256,
                         layout: str | None = None) -> dict:
    """Official GigaTok `init_args` (configs/vq/*.yaml) -> `GigaTok` keyword arguments.

    `size_tables` adds ViT size names ({name: {width, num_layers, num_heads}});
    `ctor_patches` are constructor defaults that are not config fields upstream
    ({"Encoder.ch": .., "Decoder.ch": .., "Encoder.num_res_blocks": .., "Decoder.num_res_blocks":
    ..}, as the golden fixtures record them; the two halves must share num_res_blocks). `layout`:
    "1d" / "2d" (see `layout_from_config`); None guesses "2d" only when init_args name a
    `transformer_layer_type`. A 2D config without that field gets the official default,
    TransformerDecoderLayer ("detr")."""
    sizes = {k: dict(width=v["width"], num_layers=v["depth"], num_heads=v["num_heads"])
             for k, v in VIT_SIZES.items()}
    sizes.update(size_tables or {})
    a, patches = init_args, ctor_patches or {}
    if layout is None:
        layout = "2d" if "transformer_layer_type" in a else "1d"
    layer_type = "vit"
    if layout == "2d":
        # The VQVitModel2DPlusArgs default applies when the yaml omits the field (VQ_SS256_2d).
        official = a.get("transformer_layer_type") or "TransformerDecoderLayer"
        if official not in LAYER_TYPES_2D:
            raise common.ConversionError(f"unsupported 2D transformer_layer_type {official!r}; "
                                         f"supported: {sorted(LAYER_TYPES_2D)}")
        layer_type = LAYER_TYPES_2D[official]
    kw = dict(layout=layout, layer_type=layer_type, image_size=image_size,
              encoder_ch=patches.get("Encoder.ch", 128), decoder_ch=patches.get("Decoder.ch", 128),
              encoder_ch_mult=tuple(a["encoder_ch_mult"]),
              decoder_ch_mult=tuple(a["decoder_ch_mult"]), z_channels=a["z_channels"],
              codebook_size=a["codebook_size"], code_dim=a["codebook_embed_dim"],
              l2_norm=a.get("codebook_l2_norm", True),
              commitment_cost=a.get("commit_loss_beta", 0.25), rotation_trick=a.get("rot", False),
              adaptive_gn=a.get("adaptive_gn", False), d2s_up=a.get("d2s_up", False),
              distill_depth=a.get("distill_depth") or 0,
              out_inner_dim=a.get("out_inner_dim", 768))
    blocks = {patches.get(f"{half}.num_res_blocks", 2) for half in ("Encoder", "Decoder")}
    if len(blocks) != 1:
        raise common.ConversionError(f"Encoder / Decoder num_res_blocks differ ({patches}); "
                                     "tok1d's GigaTok shares one num_res_blocks")
    kw["num_res_blocks"] = blocks.pop()
    if a.get("use_attn"):
        raise common.ConversionError("use_attn=True (CNN attention blocks) is not supported")
    for prefix, key in (("encoder", "encoder_size"), ("decoder", "decoder_size")):
        name = a.get(key) or a.get("model_size")
        if name not in sizes:
            raise common.ConversionError(f"unknown GigaTok ViT size {name!r}; known: "
                                         f"{sorted(sizes)}")
        s = sizes[name]
        kw.update({f"{prefix}_width": s["width"], f"{prefix}_depth": s["num_layers"],
                   f"{prefix}_heads": s["num_heads"]})
    if layout == "1d":
        kw.update(num_latent_tokens=a["num_latent_tokens"],
                  multi_level_query_init=a.get("multi_level_query_init", False))
    return kw


# The transformer halves' key prefixes in the official state_dicts, by layout.
HALVES = {"1d": ("s2to1encoder", "s1to2decoder"), "2d": ("s2dencoder", "s2ddecoder")}


def file_sizes(state_dict: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The layout and the transformer halves' widths and depths of an official GigaTok
    state_dict, from its keys and shapes; None where it has no GigaTok halves."""
    for layout, halves in HALVES.items():
        if all(f"{h}.ln_post.weight" in state_dict for h in halves):
            sizes: dict[str, Any] = {"layout": layout}
            for part, half in zip(("encoder", "decoder"), halves):
                layer = re.compile(re.escape(half) + r"\.transformer\.(\d+)\.")
                sizes[f"{part}_width"] = int(np.shape(state_dict[f"{half}.ln_post.weight"])[0])
                sizes[f"{part}_depth"] = len({m.group(1) for m in map(layer.match, state_dict)
                                              if m})
            return sizes
    return None


def convert_gigatok(state_dict, model, what: str = "GigaTok checkpoint") -> dict:
    """Official GigaTok state_dict (VQVitModelPlus / VQVitModel2DPlus) -> params of `model`. A
    checkpoint of another size is one ConversionError naming `what` and both sizes."""
    found = file_sizes(state_dict)
    wanted = {"layout": model.layout, **{k: getattr(model, k) for k in (
        "encoder_width", "encoder_depth", "decoder_width", "decoder_depth")}}
    if found is not None and found != wanted:
        def describe(s):
            return (f"{s['layout'].upper()}, encoder width {s['encoder_width']} depth "
                    f"{s['encoder_depth']}, decoder width {s['decoder_width']} depth "
                    f"{s['decoder_depth']}")
        raise common.ConversionError(f"{what} is a GigaTok of another size: the file's is "
                                     f"{describe(found)}; the model's (its preset or config) "
                                     f"{describe(wanted)}.")
    try:
        return _convert_gigatok(state_dict, model, what)
    except common.ConversionError as e:
        if str(e).startswith(what):
            raise
        raise common.ConversionError(
            f"{what} does not fit the model (its preset or config: encoder width "
            f"{model.encoder_width}, depth {model.encoder_depth}, {model.encoder_heads} heads; "
            f"decoder width {model.decoder_width}, depth {model.decoder_depth}, "
            f"{model.decoder_heads} heads): {e}") from None


def _convert_gigatok(state_dict, model, what: str) -> dict:
    sd = StateDict(state_dict, what)
    sd.ignore("quantize.codebook_used")  # usage-logging buffer
    out = ParamTree()
    gigatok_cnn.convert_cnn_encoder(sd, out, "encoder.", "encoder", model.encoder_ch_mult,
                                    model.num_res_blocks)
    gigatok_cnn.convert_cnn_decoder(sd, out, "decoder.", "decoder", model.decoder_ch_mult,
                                    model.num_res_blocks, adaptive_gn=model.adaptive_gn,
                                    d2s_up=model.d2s_up)
    distill = model.distill_depth > 0
    if model.layout == "1d":
        convert_qformer_encoder(sd, out, "s2to1encoder", "vit_encoder", model.encoder_depth,
                                model.encoder_heads, scan=model.scan)
        convert_qformer_decoder(sd, out, "s1to2decoder", "vit_decoder", model.decoder_depth,
                                model.decoder_heads, distill, scan=model.scan)
    else:
        convert_vit2d(sd, out, "s2dencoder", "vit_encoder", model.encoder_depth,
                      model.encoder_heads, "encoder", layer_type=model.layer_type,
                      scan=model.scan)
        convert_vit2d(sd, out, "s2ddecoder", "vit_decoder", model.decoder_depth,
                      model.decoder_heads, "decoder", distill, layer_type=model.layer_type,
                      scan=model.scan)
    for name in ("quant_conv", "post_quant_conv"):
        out.set_tree(name, common.conv1x1_dense(sd, name), name)
    out.set("quantize/embedding", sd.take("quantize.embedding.weight"),
            "quantize.embedding.weight")
    return common.finish(sd, out, abstract_params(model))


def abstract_params(model):
    """The (boxed) parameter shapes of a GigaTok module."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    return common.abstract_variables(model, images)["params"]
