"""Official TiTok checkpoints (bytedance/1d-tokenizer) -> tok1d `TiTok` parameters.

Covers every released tokenizer: the two-stage L-32 / B-64 / S-128 (legacy proxy-code head,
with the MaskGIT-VQGAN pixel decoder of stage 2 when present), the VQ-8k single-stage
BL-64 / BL-128 / SL-256 (pixel head) and the VAE LL-32 / BL-64 / BL-128 variants.

    model, params = convert_file("tokenizer_titok_l32.bin")          # sizes read from the weights
    model, params = convert_file("model.safetensors", config="config.json")

`kwargs_from_official` maps the official config (YAML / the HF `config.json`) to `TiTok`
arguments; without a config, `infer_kwargs` reads every size from the tensor shapes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.weights.convert import common, vqgan
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict
from tok1d.models.tokenizers.titok import TiTok

# Official ViT size names (width, layers, heads); the MLP is 4x the width.
OFFICIAL_SIZES = {
    "small": dict(width=512, num_layers=8, num_heads=8),
    "base": dict(width=768, num_layers=12, num_heads=12),
    "large": dict(width=1024, num_layers=24, num_heads=16),
}
# The fixed MaskGIT-VQGAN used as stage-2 pixel decoder by the released models.
RELEASED_PIXEL_DECODER = dict(pixel_channels=128, pixel_channel_mult=(1, 1, 2, 2, 4),
                              pixel_res_blocks=2, pixel_z_channels=256)


def _vq_model_config(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], Optional[int]]:
    """(model.vq_model section, crop size) of an official config in any of its shapes."""
    cfg = config
    for key in ("titok",):           # the fixture's stage-2 entry nests the TiTok config
        if key in cfg and "model" not in cfg:
            cfg = cfg[key]
    crop = cfg.get("dataset", {}).get("preprocessing", {}).get("crop_size")
    vq = cfg.get("model", {}).get("vq_model", cfg.get("vq_model", cfg))
    return vq, crop


def kwargs_from_official(config: Mapping[str, Any],
                         size_tables: Optional[Mapping[str, Mapping[str, int]]] = None,
                         image_size: Optional[int] = None) -> dict[str, Any]:
    """Official TiTok config -> `TiTok` keyword arguments.

    `size_tables` adds ViT size names beyond small/base/large ({name: {width, num_layers,
    num_heads}}), as the golden fixtures do. A stage-2 config may carry `pixel_decoder`
    ({hidden_channels, channel_mult, num_res_blocks, z_channels}) and `pixel_quantize`
    ([codes, dim]); otherwise the released MaskGIT-VQGAN sizes are used.
    """
    vq, crop = _vq_model_config(config)
    sizes = dict(OFFICIAL_SIZES, **(size_tables or {}))
    kw: dict[str, Any] = {}
    for prefix, key in (("encoder", "vit_enc_model_size"), ("decoder", "vit_dec_model_size")):
        name = vq.get(key, "large")
        if name not in sizes:
            raise ConversionError(f"unknown TiTok size {name!r} for {key}; known: "
                                  f"{sorted(sizes)}")
        s = sizes[name]
        kw.update({f"{prefix}_width": s["width"], f"{prefix}_depth": s["num_layers"],
                   f"{prefix}_heads": s["num_heads"], f"{prefix}_mlp_dim": 4 * s["width"]})
    patch = vq.get("vit_enc_patch_size", 16)
    if vq.get("vit_dec_patch_size", patch) != patch:
        raise ConversionError("encoder and decoder patch sizes differ; TiTok uses one grid")
    legacy = bool(vq.get("is_legacy", True))
    mode = vq.get("quantize_mode", "vq")
    kw.update(patch_size=patch, num_latent_tokens=vq.get("num_latent_tokens", 32),
              token_dim=vq.get("token_size", 12), legacy_reshape=legacy,
              decoder_head="logits" if legacy else "pixels",
              image_size=image_size or crop or 256)
    if mode == "vae":
        kw["quantizer"] = "vae"
    elif mode == "vq":
        kw.update(quantizer="vq", codebook_size=vq.get("codebook_size", 4096),
                  l2_norm=bool(vq.get("use_l2_norm", True)),
                  commitment_cost=float(vq.get("commitment_cost", 0.25)))
    else:
        raise ConversionError(f"quantize_mode {mode!r} is not supported (vq or vae)")
    if vq.get("finetune_decoder", False):
        if not legacy:
            raise ConversionError("finetune_decoder (stage 2) exists only for legacy models")
        kw.update(pixel_decoder=True, finetune_decoder=True, **RELEASED_PIXEL_DECODER)
        pix = config.get("pixel_decoder")
        if pix:
            kw.update(pixel_channels=pix["hidden_channels"],
                      pixel_channel_mult=tuple(pix["channel_mult"]),
                      pixel_res_blocks=pix["num_res_blocks"], pixel_z_channels=pix["z_channels"])
        if config.get("pixel_quantize"):
            codes, dim = config["pixel_quantize"]
            kw["num_proxy_codes"] = codes
            if dim != kw["pixel_z_channels"]:
                raise ConversionError(f"pixel_quantize dim {dim} != pixel decoder z "
                                      f"{kw['pixel_z_channels']}")
    return kw


def infer_kwargs(state_dict: Mapping[str, np.ndarray], image_size: Optional[int] = None
                 ) -> dict[str, Any]:
    """Reads every TiTok size from the tensor shapes (heads assume the official head dim 64)."""
    sd = state_dict
    try:
        kw: dict[str, Any] = {}
        for prefix in ("encoder", "decoder"):
            width = sd[f"{prefix}.positional_embedding"].shape[1]
            depth = 1 + max(int(k.split(".")[2]) for k in sd
                            if k.startswith(f"{prefix}.transformer."))
            kw.update({f"{prefix}_width": width, f"{prefix}_depth": depth,
                       f"{prefix}_heads": max(width // 64, 1),
                       f"{prefix}_mlp_dim": sd[f"{prefix}.transformer.0.mlp.c_fc.weight"].shape[0]})
        grid = math.isqrt(sd["encoder.positional_embedding"].shape[0] - 1)
        patch = sd["encoder.patch_embed.weight"].shape[-1]
        n_tok, _ = sd["latent_tokens"].shape
        out_ch = sd["encoder.conv_out.weight"].shape[0]
        legacy = "decoder.ffn.2.weight" in sd
        vae = "quantize.embedding.weight" not in sd
        kw.update(image_size=image_size or grid * patch, patch_size=patch, num_latent_tokens=n_tok,
                  legacy_reshape=legacy, decoder_head="logits" if legacy else "pixels")
        if vae:
            kw.update(quantizer="vae", token_dim=out_ch // 2)
        else:
            k, d = sd["quantize.embedding.weight"].shape
            # Only the legacy two-stage models were trained with the l2-normalised codebook.
            kw.update(quantizer="vq", token_dim=d, codebook_size=k, l2_norm=legacy)
        if legacy:
            kw["num_proxy_codes"] = sd["decoder.ffn.2.weight"].shape[0]
        if "pixel_quantize.embedding.weight" in sd:
            codes, dim = sd["pixel_quantize.embedding.weight"].shape
            ups = sorted({int(k.split(".")[2]) for k in sd if k.startswith("pixel_decoder.up.")})
            hidden = sd["pixel_decoder.conv_out.weight"].shape[1]
            mult = tuple(sd[f"pixel_decoder.up.{i}.block.0.conv2.weight"].shape[0] // hidden
                         for i in ups)
            blocks = 1 + max(int(k.split(".")[4]) for k in sd
                             if k.startswith("pixel_decoder.up.0.block."))
            kw.update(pixel_decoder=True, finetune_decoder=True, num_proxy_codes=codes,
                      pixel_channels=hidden, pixel_channel_mult=mult, pixel_res_blocks=blocks,
                      pixel_z_channels=dim)
    except KeyError as e:
        raise ConversionError(f"not a TiTok checkpoint: key {e} is missing") from e
    return kw


def _convert_into(sd: StateDict, model: TiTok, out: ParamTree) -> None:
    out.set("latent_tokens", sd.take("latent_tokens"), "latent_tokens")
    for part, heads, depth in (("encoder", model.encoder_heads, model.encoder_depth),
                               ("decoder", model.decoder_heads, model.decoder_depth)):
        names = ["class_embedding", "positional_embedding", "latent_token_positional_embedding"]
        if part == "decoder":
            names.append("mask_token")
        for name in names:
            out.set(f"{part}/{name}", sd.take(f"{part}.{name}"), f"{part}.{name}")
        out.set_tree(f"{part}/trunk/ln_pre/norm", common.norm(sd, f"{part}.ln_pre"),
                     f"{part}.ln_pre")
        out.set_tree(f"{part}/trunk/ln_post/norm", common.norm(sd, f"{part}.ln_post"),
                     f"{part}.ln_post")
        common.transformer(sd, out, f"{part}.transformer", f"{part}/trunk/transformer", depth,
                           heads, model.scan)
    out.set_tree("encoder/patch_embed", common.conv_params(sd, "encoder.patch_embed"),
                 "encoder.patch_embed")
    out.set_tree("encoder/conv_out", common.conv1x1_dense(sd, "encoder.conv_out"),
                 "encoder.conv_out")
    out.set_tree("decoder/decoder_embed", common.dense(sd, "decoder.decoder_embed"),
                 "decoder.decoder_embed")
    if model.decoder_head == "logits":
        out.set_tree("decoder/ffn_0", common.conv_params(sd, "decoder.ffn.0"), "decoder.ffn.0")
        out.set_tree("decoder/ffn_2", common.conv_params(sd, "decoder.ffn.2"), "decoder.ffn.2")
    else:
        out.set_tree("decoder/ffn", common.conv_params(sd, "decoder.ffn.0"), "decoder.ffn.0")
        out.set_tree("decoder/conv_out", common.conv_params(sd, "decoder.conv_out"),
                     "decoder.conv_out")
    if model.quantizer == "vq":
        out.set("quantize/embedding", sd.take("quantize.embedding.weight"),
                "quantize.embedding.weight")
    if model.pixel_decoder:
        out.set("pixel_quantize/embedding", sd.take("pixel_quantize.embedding.weight"),
                "pixel_quantize.embedding.weight")
        vqgan.convert_decoder(sd, out, "pixel_decoder.", "pixel_decoder",
                              tuple(model.pixel_channel_mult), model.pixel_res_blocks)


def abstract_params(model: TiTok) -> Any:
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    return common.abstract_variables(model, images)["params"]


def convert_titok(state_dict: Mapping[str, np.ndarray], model: TiTok,
                  what: str = "TiTok checkpoint") -> dict[str, Any]:
    """Official TiTok state_dict -> params of `model`; raises ConversionError listing every
    missing, unexpected or mismatched tensor."""
    sd = StateDict(state_dict, what)
    out = ParamTree()
    _convert_into(sd, model, out)
    return common.finish(sd, out, abstract_params(model))


def convert_file(path: str, config: Optional[str | Mapping[str, Any]] = None,
                 image_size: Optional[int] = None, **model_overrides: Any
                 ) -> tuple[TiTok, dict[str, Any]]:
    """Reads an official checkpoint (.bin / .safetensors / ...) and returns (model, params).

    `config`: the official config (path to its JSON/YAML, or a dict); without it the sizes are
    inferred from the tensor shapes. `model_overrides` (e.g. scan=False, dtype=jnp.bfloat16)
    change how the tok1d model is built, not what it computes.
    """
    state_dict = common.load_state_dict(path)
    if config is None:
        kwargs = infer_kwargs(state_dict, image_size)
    else:
        if isinstance(config, str):
            config = read_config(config)
        kwargs = kwargs_from_official(config, image_size=image_size)
    kwargs.update(model_overrides)
    model = TiTok(**kwargs)
    return model, convert_titok(state_dict, model, what=path)


def read_config(path: str) -> Mapping[str, Any]:
    """An official config file (YAML or the HF `config.json`) as a dict."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover
            raise ImportError("Reading YAML configs needs `pip install pyyaml`.") from e
        return yaml.safe_load(text)
    return json.loads(text)
