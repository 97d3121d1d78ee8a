"""Official TiTok MaskGIT generators (`generator_titok_{l32,b64,s128}.bin`) -> tok1d params.

    model, params = convert_file("generator_titok_l32.bin")                # sizes from shapes
    model, params = convert_file("generator_titok_s128.bin", config="titok_s128.yaml")

`ImageBert` checkpoints (keys `model.embeddings.*`, `model.encoder.layer.*`, `model.lm_head.*`)
become `MaskGITBert`, `UViTBert` ones (`embeddings.weight`, `in_blocks.*`, ...) `MaskGITUViT`; the
key mapping is in the `tok1d.models.generators.maskgit` docstring. Every tensor must be used and every
parameter filled (`common.finish`), except the `position_ids` / `token_type_ids` buffers that
some transformers versions save.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.weights.convert import common
from tok1d.weights.convert import titok as convert_titok
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict
from tok1d.models.generators import maskgit

# Heads cannot be read from the shapes; every released generator has 16.
DEFAULT_HEADS = 16
BERT_BUFFERS = ("model.embeddings.position_ids", "model.embeddings.token_type_ids")


def _generator_section(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    model = config.get("model", config)
    return model.get("generator", {}), model.get("vq_model", {})


def kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official config (YAML / HF `config.json`, `model.generator` + `model.vq_model`) ->
    `maskgit.build` keyword arguments (incl. `arch`)."""
    gen, vq = _generator_section(config)
    if not gen:
        raise ConversionError("config has no model.generator section")
    model_type = gen.get("model_type", "ViT")
    arch = {"ViT": "vit", "UViT": "uvit"}.get(model_type)
    if arch is None:
        raise ConversionError(f"unknown generator model_type {model_type!r} (ViT or UViT)")
    num_tokens = gen.get("image_seq_len", vq.get("num_latent_tokens"))
    kw = dict(arch=arch, codebook_size=int(vq.get("codebook_size", 4096)),
              num_tokens=int(num_tokens), num_classes=int(gen.get("condition_num_classes", 1000)),
              width=int(gen["hidden_size"]), depth=int(gen["num_hidden_layers"]),
              num_heads=int(gen["num_attention_heads"]), mlp_dim=int(gen["intermediate_size"]))
    if arch == "vit":  # UViTBert ignores the config's dropout (its blocks use 0)
        kw["dropout_rate"] = float(gen.get("dropout", 0.1))
        kw["attention_dropout"] = float(gen.get("attn_drop", 0.1))
    return kw


def sampling_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling settings of an official inference config -> `generation.maskgit.sample`
    keyword arguments (softmax annealing is an argument of the official eval script, on there)."""
    gen, _ = _generator_section(config)
    return dict(num_steps=int(gen.get("num_steps", 8)),
                guidance_scale=float(gen.get("guidance_scale", 0.0)),
                guidance_schedule=gen.get("guidance_decay", "constant"),
                guidance_pow=float(gen.get("guidance_scale_pow", 3.0)),
                randomize_temperature=float(gen.get("randomize_temperature", 0.0)),
                softmax_annealing=True)


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_kwargs(state_dict: Mapping[str, np.ndarray],
                 config: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Reads arch and sizes from the tensor shapes; the number of heads comes from `config`
    (`model.generator.num_attention_heads`) when given, else the released value 16."""
    sd = state_dict
    heads = DEFAULT_HEADS
    if config is not None:
        heads = int(_generator_section(config)[0].get("num_attention_heads", DEFAULT_HEADS))
    try:
        if "model.embeddings.word_embeddings.weight" in sd:
            vocab, width = sd["model.embeddings.word_embeddings.weight"].shape
            k = sd["model.lm_head.weight"].shape[0]
            kw = dict(arch="vit", num_tokens=sd["model.embeddings.position_embeddings.weight"]
                      .shape[0] - 1, depth=_count(sd, "model.encoder.layer."),
                      mlp_dim=sd["model.encoder.layer.0.intermediate.dense.weight"].shape[0])
        elif "in_blocks.0.attn.qkv.weight" in sd or "mid_block.attn.qkv.weight" in sd:
            vocab, width = sd["embeddings.weight"].shape
            k = sd["lm_head.weight"].shape[0]
            kw = dict(arch="uvit", num_tokens=sd["pos_embed"].shape[1] - 1,
                      depth=2 * _count(sd, "in_blocks."),
                      mlp_dim=sd["mid_block.mlp.fc1.weight"].shape[0])
        else:
            raise ConversionError("not a TiTok generator checkpoint: neither ImageBert "
                                  "(model.embeddings.*) nor UViTBert (in_blocks.*) keys found")
    except KeyError as e:
        raise ConversionError(f"not a TiTok generator checkpoint: key {e} is missing") from e
    kw.update(codebook_size=k, num_classes=vocab - k - 2, width=width, num_heads=heads)
    if config is not None and kw["arch"] == "vit":
        gen = _generator_section(config)[0]
        kw["dropout_rate"] = float(gen.get("dropout", 0.1))
        kw["attention_dropout"] = float(gen.get("attn_drop", 0.1))
    return kw


def _bert_layer(sd: StateDict, src: str, num_heads: int) -> dict[str, Any]:
    """One HF `BertLayer` -> `layers.Block` (pre_norm=False) params."""
    attn: dict[str, Any] = {}
    for name in ("query", "key", "value"):
        w = sd.take(f"{src}.attention.self.{name}.weight")
        b = sd.take(f"{src}.attention.self.{name}.bias")
        if w is None or b is None:
            continue
        width = w.shape[1]
        if width % num_heads:
            raise ConversionError(f"{src}: width {width} is not divisible by {num_heads} heads")
        attn[name] = {"kernel": common.linear(w).reshape(width, num_heads, -1),
                      "bias": b.reshape(num_heads, -1)}
    out_w = sd.take(f"{src}.attention.output.dense.weight")
    out_b = sd.take(f"{src}.attention.output.dense.bias")
    if out_w is not None:
        attn["out"] = common.out_proj(out_w, out_b, num_heads)
    return {"attn": attn,
            "ln_1": {"norm": common.norm(sd, f"{src}.attention.output.LayerNorm")},
            "mlp": {"fc1": common.dense(sd, f"{src}.intermediate.dense"),
                    "fc2": common.dense(sd, f"{src}.output.dense")},
            "ln_2": {"norm": common.norm(sd, f"{src}.output.LayerNorm")}}


def _convert_bert(sd: StateDict, model: maskgit.MaskGITBert, out: ParamTree) -> None:
    sd.ignore(*BERT_BUFFERS)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        key = f"model.embeddings.{name}.weight"
        out.set(name, sd.take(key), key)
    out.set_tree("embed_ln/norm", common.norm(sd, "model.embeddings.LayerNorm"),
                 "model.embeddings.LayerNorm")
    common.put_layers(sd, out, "model.encoder.layer", "transformer", model.depth, model.scan,
                      lambda layer: _bert_layer(sd, layer, model.num_heads))
    out.set_tree("lm_head", common.dense(sd, "model.lm_head"), "model.lm_head")


def _uvit_block(sd: StateDict, src: str, num_heads: int) -> dict[str, Any]:
    """One `UViTBlock` (without its skip_linear) -> `layers.Block` (qkv_bias=False) params."""
    attn: dict[str, Any] = {}
    qkv = sd.take(f"{src}.attn.qkv.weight")
    if qkv is not None:
        attn.update(common.split_in_proj(qkv, None, num_heads))
    proj_w, proj_b = sd.take(f"{src}.attn.proj.weight"), sd.take(f"{src}.attn.proj.bias")
    if proj_w is not None:
        attn["out"] = common.out_proj(proj_w, proj_b, num_heads)
    return {"ln_1": {"norm": common.norm(sd, f"{src}.norm1")}, "attn": attn,
            "ln_2": {"norm": common.norm(sd, f"{src}.norm2")},
            "mlp": {"fc1": common.dense(sd, f"{src}.mlp.fc1"),
                    "fc2": common.dense(sd, f"{src}.mlp.fc2")}}


def _convert_uvit(sd: StateDict, model: maskgit.MaskGITUViT, out: ParamTree) -> None:
    out.set("embeddings", sd.take("embeddings.weight"), "embeddings.weight")
    pos = sd.take("pos_embed")
    if pos is not None:
        if pos.ndim != 3 or pos.shape[0] != 1:
            raise ConversionError(f"pos_embed: expected (1, N+1, W), got {pos.shape}")
        out.set("pos_embed", pos[0], "pos_embed")
    heads = model.num_heads
    for i in range(model.depth // 2):
        out.set_tree(f"in_blocks_{i}", _uvit_block(sd, f"in_blocks.{i}", heads), f"in_blocks.{i}")
        out.set_tree(f"out_blocks_{i}", _uvit_block(sd, f"out_blocks.{i}", heads),
                     f"out_blocks.{i}")
        out.set_tree(f"skip_linear_{i}", common.dense(sd, f"out_blocks.{i}.skip_linear"),
                     f"out_blocks.{i}.skip_linear")
    out.set_tree("mid_block", _uvit_block(sd, "mid_block", heads), "mid_block")
    out.set_tree("norm/norm", common.norm(sd, "norm"), "norm")
    out.set_tree("lm_head", common.dense(sd, "lm_head"), "lm_head")


def abstract_params(model: Any) -> Any:
    tokens = jax.ShapeDtypeStruct((1, model.num_tokens), jnp.int32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    return common.abstract_variables(model, tokens, labels)["params"]


def convert_maskgit(state_dict: Mapping[str, np.ndarray], model: Any,
                    what: str = "MaskGIT generator checkpoint") -> dict[str, Any]:
    """Official ImageBert / UViTBert state_dict -> params of `model` (a `MaskGITBert` or
    `MaskGITUViT`); raises ConversionError listing every missing, unexpected or mismatched
    tensor."""
    sd = StateDict(state_dict, what)
    out = ParamTree()
    if isinstance(model, maskgit.MaskGITBert):
        _convert_bert(sd, model, out)
    elif isinstance(model, maskgit.MaskGITUViT):
        _convert_uvit(sd, model, out)
    else:
        raise TypeError(f"expected a MaskGITBert or MaskGITUViT, got {type(model).__name__}")
    return common.finish(sd, out, abstract_params(model))


def convert_file(path: str, config: Optional[str | Mapping[str, Any]] = None,
                 **model_overrides: Any) -> tuple[Any, dict[str, Any]]:
    """Reads an official generator checkpoint and returns (model, params). `config` (path or
    dict of the official config) supplies the number of heads; the rest is read from the
    shapes. `model_overrides` (scan=False, dtype=jnp.bfloat16, ...) change how the tok1d model
    is built, not what it computes."""
    state_dict = common.load_state_dict(path)
    if isinstance(config, str):
        config = convert_titok.read_config(config)
    kwargs = infer_kwargs(state_dict, config)
    kwargs.update(model_overrides)
    model = maskgit.build(**kwargs)
    return model, convert_maskgit(state_dict, model, what=path)
