"""Official LlamaGen / GigaTok GPT checkpoints (`gpt_1d.Transformer`, c2i) -> `models.gpt.GPT`.

Official keys (per layer i):
  tok_embeddings.weight (V, W)                   -> tok_embeddings/embedding
  cls_embedding.embedding_table.weight (C+1, W)  -> cls_embedding/embedding
  positional_embedding (N+1, W)                  -> positional_embedding   (absent with 2D RoPE)
  layers.i.attention.wqkv.weight (3W, W)         -> transformer/blocks/attn/{query,key,value}
  layers.i.attention.wo.weight (W, W)            -> transformer/blocks/attn/out
  layers.i.feed_forward.w1 / w3 / w2.weight      -> transformer/blocks/mlp/gate / up / fc2
  layers.i.attention_norm / ffn_norm.weight      -> transformer/blocks/ln_1 / ln_2
  norm.weight, output.weight (V, W)              -> norm/scale, output/kernel

Training checkpoints are {"model", "optimizer", "steps", "args"[, "ema"]}; the official sampling
scripts load "model" (EMA is optional and unused by the released scripts), FSDP consolidated
files may be a bare state_dict. `torch.compile` / DDP prefixes (`_orig_mod.`, `module.`) are
stripped.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from tok1d.weights.convert import common
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict
from tok1d.models.generators.gpt import GPT, GPT_SIZES, size_kwargs

def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return common.shape_of(sd, key, "LlamaGen GPT")


def infer_kwargs(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                 num_tokens: Optional[int] = None) -> dict[str, Any]:
    """`GPT` arguments from tensor shapes: vocab_size, width, depth, mlp_dim, num_classes,
    num_tokens (positional_embedding rows - 1; must be given for 2D-RoPE checkpoints, which
    store no positions) and rope. Heads are not in the shapes: taken from GPT_SIZES by width
    unless given."""
    sd = common.strip_prefixes(state_dict)
    vocab, width = _shape(sd, "tok_embeddings.weight")
    classes = _shape(sd, "cls_embedding.embedding_table.weight")[0] - 1
    depth = len({m.group(1) for k in sd
                 if (m := re.match(r"layers\.(\d+)\.attention\.wqkv\.weight$", k))})
    if depth == 0:
        raise ConversionError("not a LlamaGen GPT state_dict: no layers.*.attention.wqkv.weight")
    mlp_dim = _shape(sd, "layers.0.feed_forward.w1.weight")[0]
    rope = "positional_embedding" not in sd
    if not rope:
        inferred = _shape(sd, "positional_embedding")[0] - 1
        if num_tokens is not None and num_tokens != inferred:
            raise ConversionError(f"num_tokens={num_tokens} given, but positional_embedding "
                                  f"has {inferred + 1} rows (= 1 class + {inferred} tokens)")
        num_tokens = inferred
    elif num_tokens is None:
        raise ConversionError("the checkpoint has no positional_embedding (2D RoPE GPT): give "
                              "num_tokens (the tokenizer's codes per image)")
    if num_heads is None:
        by_width = {s["width"]: s["num_heads"] for s in GPT_SIZES.values()}
        if width not in by_width:
            raise ConversionError(f"width {width} is not in GPT_SIZES "
                                  f"({sorted(by_width)}): give num_heads")
        num_heads = by_width[width]
    return dict(vocab_size=vocab, num_tokens=num_tokens, num_classes=classes, width=width,
                depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, rope=rope)


def _block(sd: StateDict, src: str, num_heads: int) -> dict[str, Any]:
    wqkv = sd.take(f"{src}.attention.wqkv.weight")
    attn: dict[str, Any] = {}
    if wqkv is not None:
        # Rows [q; k; v] like nn.MultiheadAttention's in_proj (n_kv_head == n_head).
        attn.update(common.split_in_proj(wqkv, None, num_heads))
    wo = sd.take(f"{src}.attention.wo.weight")
    if wo is not None:
        attn["out"] = common.out_proj(wo, None, num_heads)
    return {"ln_1": common.norm(sd, f"{src}.attention_norm", bias=False),
            "ln_2": common.norm(sd, f"{src}.ffn_norm", bias=False),
            "attn": attn,
            "mlp": {"gate": common.dense(sd, f"{src}.feed_forward.w1", bias=False),
                    "up": common.dense(sd, f"{src}.feed_forward.w3", bias=False),
                    "fc2": common.dense(sd, f"{src}.feed_forward.w2", bias=False)}}


def convert_gpt(state_dict: Mapping[str, Any], model: GPT) -> dict[str, Any]:
    """Official GPT state_dict -> `model`'s params; every tensor is checked (one
    ConversionError lists all missing / unexpected / mis-shaped keys)."""
    sd = StateDict(common.strip_prefixes(state_dict), what="GPT checkpoint")
    sd.ignore("freqs_cis")  # a non-persistent table in some LlamaGen versions
    out = ParamTree()
    out.set("tok_embeddings/embedding", sd.take("tok_embeddings.weight"), "tok_embeddings.weight")
    key = "cls_embedding.embedding_table.weight"
    out.set("cls_embedding/embedding", sd.take(key), key)
    if not model.rope:
        out.set("positional_embedding", sd.take("positional_embedding"), "positional_embedding")
    common.put_layers(sd, out, "layers", "transformer", model.depth, model.scan,
                      lambda layer: _block(sd, layer, model.num_heads))
    out.set("norm/scale", sd.take("norm.weight"), "norm.weight")
    w = sd.take("output.weight")
    out.set("output/kernel", None if w is None else common.linear(w), "output.weight")

    codes = jax.ShapeDtypeStruct((1, model.num_tokens), jnp.int32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    abstract = common.abstract_variables(model, codes, labels)["params"]
    return common.finish(sd, out, abstract)


def _torch_state_dict(path: str, weights: str) -> dict[str, Any]:
    obj = common.read_torch(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict, got {type(obj).__name__}")
    if any(hasattr(v, "shape") for v in obj.values()):
        if weights == "ema":
            raise ConversionError(f"{path} is a bare state_dict (no 'ema' entry)")
        sd = obj
    elif weights in obj:
        sd = obj[weights]
    elif weights == "model" and ("module" in obj or "state_dict" in obj):
        sd = obj["module" if "module" in obj else "state_dict"]
    else:
        raise ConversionError(f"{path}: no {weights!r} entry; entries: {sorted(obj)}")
    return {k: common._to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def convert_file(path: str, size: Optional[str] = None, weights: str = "model",
                 num_heads: Optional[int] = None, num_tokens: Optional[int] = None,
                 **model_kwargs: Any) -> tuple[GPT, dict[str, Any]]:
    """Reads an official checkpoint (.pt/.pth/.bin torch pickle, or .safetensors / .npz) and
    returns (model, params). `weights` picks "model" (what the official samplers load) or
    "ema"; `size` ("B", "L", ...) fixes the head count (else inferred from the width);
    `model_kwargs` (dtype, scan, remat, ...) go to `GPT`."""
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext in common.TORCH_EXTENSIONS:
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        sd = _torch_state_dict(path, weights)
    elif weights == "ema":
        raise ConversionError(f"{path} holds one state_dict: weights='ema' (--weights=ema) "
                              "picks the 'ema' entry of a training checkpoint (.pt).")
    else:
        sd = common.load_state_dict(path)
    preset = None
    if size is not None:
        preset = size_kwargs(size)
        num_heads = preset["num_heads"] if num_heads is None else num_heads
    kwargs = infer_kwargs(sd, num_heads=num_heads, num_tokens=num_tokens)
    if preset is not None and (kwargs["width"], kwargs["depth"]) != (preset["width"],
                                                                      preset["depth"]):
        raise ConversionError(f"{path}: size {size!r} is width {preset['width']}, depth "
                              f"{preset['depth']}; the checkpoint has width {kwargs['width']}, "
                              f"depth {kwargs['depth']}")
    kwargs.update(model_kwargs)
    model = GPT(**kwargs)
    return model, convert_gpt(sd, model)
