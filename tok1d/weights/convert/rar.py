"""Official RAR checkpoints (bytedance/1d-tokenizer `modeling/rar.py`; the released
`rar_{b,l,xl,xxl}.bin`, a bare state_dict) -> `models.generators.rar.RAR`.

    model, params = convert_file("rar_b.bin")                # sizes from the shapes
    model, params = convert_file("rar_xl.bin", size="XL")    # ... checked against RAR_SIZES

Official keys (per block i; N tokens, K codes, C classes, W width, M MLP width, d head width):
  cls_token (1, 1, W)                          -> cls_token (1, W)
  embeddings.weight (K + 1 + C + 1, W)         -> embeddings/embedding
  pos_embed (1, N + 1024, W)                   -> pos_embed: rows 0 .. N+1
  target_aware_pos_embed (1, N + 1024, W)      -> target_aware_pos_embed: rows 2 .. N+1
  timesteps_embeddings (1, N + 100, W)         -> timesteps_embeddings: rows 0 .. N
  blocks.i.norm1 / norm2.{weight,bias} (W)     -> transformer/blocks/ln_1 / ln_2
  blocks.i.attn.qkv.{weight (3W, W),bias}      -> transformer/blocks/attn/{query,key,value}
  blocks.i.attn.q_norm / k_norm.{weight,bias} (d) -> transformer/blocks/attn/q_norm / k_norm
  blocks.i.attn.proj.{weight,bias}             -> transformer/blocks/attn/out
  blocks.i.mlp.fc1 / fc2.{weight,bias}         -> transformer/blocks/mlp/fc1 / fc2
  blocks.i.adaLN_modulation.1.{weight (6W, W),bias} -> transformer/blocks/adaLN_modulation
  adaln_before_head.adaLN_modulation.1.{weight (2W, W),bias} -> adaln_before_head/adaLN_modulation
  lm_head.{weight (K, W),bias}                 -> lm_head
(`blocks` carries a leading layer axis when the model scans, else `blocks_{i}`.) The table rows
upstream never reads (see the `tok1d.models.generators.rar` docstring) are checked for their
shape and dropped. Every key must be consumed and every parameter filled (`common.finish`);
DDP / torch.compile prefixes (`module.`, `_orig_mod.`) are stripped.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from tok1d.weights.convert import common
from tok1d.weights.convert.common import ConversionError, ParamTree, StateDict
from tok1d.models.generators.rar import RAR, size_kwargs

# Rows of the official tables beyond the N tokens (`RAR.__init__`).
POS_EXTRA_ROWS = 1024
TIMESTEP_EXTRA_ROWS = 100


def official_shapes(model: RAR) -> dict[str, tuple[int, ...]]:
    """The official state_dict layout (key -> shape, in `RAR.state_dict()` order) of the
    upstream model `model` converts from (tests check it against the key lists of the
    official class, tests/fixtures/rar_*_keys.txt)."""
    n, k, c, w, m = (model.num_tokens, model.vocab_size, model.num_classes, model.width,
                     model.mlp_dim)
    d = w // model.num_heads
    out: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, w), "pos_embed": (1, n + POS_EXTRA_ROWS, w),
        "target_aware_pos_embed": (1, n + POS_EXTRA_ROWS, w),
        "timesteps_embeddings": (1, n + TIMESTEP_EXTRA_ROWS, w)}
    for i in range(model.depth):
        b = f"blocks.{i}"
        out.update({f"{b}.norm1.weight": (w,), f"{b}.norm1.bias": (w,),
                    f"{b}.attn.qkv.weight": (3 * w, w), f"{b}.attn.qkv.bias": (3 * w,),
                    f"{b}.attn.q_norm.weight": (d,), f"{b}.attn.q_norm.bias": (d,),
                    f"{b}.attn.k_norm.weight": (d,), f"{b}.attn.k_norm.bias": (d,),
                    f"{b}.attn.proj.weight": (w, w), f"{b}.attn.proj.bias": (w,),
                    f"{b}.norm2.weight": (w,), f"{b}.norm2.bias": (w,),
                    f"{b}.mlp.fc1.weight": (m, w), f"{b}.mlp.fc1.bias": (m,),
                    f"{b}.mlp.fc2.weight": (w, m), f"{b}.mlp.fc2.bias": (w,),
                    f"{b}.adaLN_modulation.1.weight": (6 * w, w),
                    f"{b}.adaLN_modulation.1.bias": (6 * w,)})
    out.update({"embeddings.weight": (k + 1 + c + 1, w),
                "adaln_before_head.adaLN_modulation.1.weight": (2 * w, w),
                "adaln_before_head.adaLN_modulation.1.bias": (2 * w,),
                "lm_head.weight": (k, w), "lm_head.bias": (k,)})
    return out


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return common.shape_of(sd, key, "RAR")


def infer_kwargs(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`RAR` arguments from tensor shapes: vocab_size (lm_head rows), num_tokens (timestep
    table rows - 100), num_classes (embedding rows - K - 2), width, depth, num_heads (width /
    the q_norm width) and mlp_dim."""
    sd = common.strip_prefixes(state_dict)
    vocab, width = _shape(sd, "lm_head.weight")
    rows = _shape(sd, "embeddings.weight")[0]
    depth = len({m.group(1) for k in sd
                 if (m := re.match(r"blocks\.(\d+)\.attn\.qkv\.weight$", k))})
    if depth == 0:
        raise ConversionError("not a RAR state_dict: no blocks.*.attn.qkv.weight")
    head_dim = _shape(sd, "blocks.0.attn.q_norm.weight")[0]
    if width % head_dim:
        raise ConversionError(f"q_norm width {head_dim} does not divide the width {width}")
    num_tokens = _shape(sd, "timesteps_embeddings")[-2] - TIMESTEP_EXTRA_ROWS
    return dict(vocab_size=vocab, num_tokens=num_tokens, num_classes=rows - vocab - 2,
                width=width, depth=depth, num_heads=width // head_dim,
                mlp_dim=_shape(sd, "blocks.0.mlp.fc1.weight")[0])


def _rows(sd: StateDict, key: str, rows: int, first: int, count: int, width: int):
    """Rows first .. first + count - 1 of an official (1, rows, W) table; a table of another
    shape is passed on whole (`common.finish` reports it with the other mismatches)."""
    value = sd.take(key)
    if value is None or value.shape != (1, rows, width):
        return value
    return value[0, first:first + count]


def _block(sd: StateDict, src: str, num_heads: int) -> dict[str, Any]:
    attn: dict[str, Any] = {}
    w, b = sd.take(f"{src}.attn.qkv.weight"), sd.take(f"{src}.attn.qkv.bias")
    if w is not None and b is not None:
        attn.update(common.split_in_proj(w, b, num_heads))
    w, b = sd.take(f"{src}.attn.proj.weight"), sd.take(f"{src}.attn.proj.bias")
    if w is not None and b is not None:
        attn["out"] = common.out_proj(w, b, num_heads)
    for name in ("q_norm", "k_norm"):
        attn[name] = {"norm": common.norm(sd, f"{src}.attn.{name}")}
    return {"ln_1": {"norm": common.norm(sd, f"{src}.norm1")},
            "ln_2": {"norm": common.norm(sd, f"{src}.norm2")},
            "attn": attn,
            "mlp": {"fc1": common.dense(sd, f"{src}.mlp.fc1"),
                    "fc2": common.dense(sd, f"{src}.mlp.fc2")},
            "adaLN_modulation": common.dense(sd, f"{src}.adaLN_modulation.1")}


def convert_rar(state_dict: Mapping[str, Any], model: RAR, what: str = "RAR checkpoint"
                ) -> dict[str, Any]:
    """Official RAR state_dict -> `model`'s params; every tensor is checked (one
    ConversionError lists all missing / unexpected / mis-shaped keys)."""
    sd = StateDict(common.strip_prefixes(state_dict), what=what)
    n, width = model.num_tokens, model.width
    out = ParamTree()
    cls = sd.take("cls_token")
    out.set("cls_token", None if cls is None else cls.reshape(-1, cls.shape[-1]), "cls_token")
    out.set("embeddings/embedding", sd.take("embeddings.weight"), "embeddings.weight")
    pos_rows = n + POS_EXTRA_ROWS
    out.set("pos_embed", _rows(sd, "pos_embed", pos_rows, 0, n + 2, width), "pos_embed")
    out.set("target_aware_pos_embed",
            _rows(sd, "target_aware_pos_embed", pos_rows, 2, n, width), "target_aware_pos_embed")
    out.set("timesteps_embeddings",
            _rows(sd, "timesteps_embeddings", n + TIMESTEP_EXTRA_ROWS, 0, n + 1, width),
            "timesteps_embeddings")
    common.put_layers(sd, out, "blocks", "transformer", model.depth, model.scan,
                      lambda layer: _block(sd, layer, model.num_heads))
    out.set_tree("adaln_before_head/adaLN_modulation",
                 common.dense(sd, "adaln_before_head.adaLN_modulation.1"),
                 "adaln_before_head.adaLN_modulation.1")
    out.set_tree("lm_head", common.dense(sd, "lm_head"), "lm_head")

    codes = jax.ShapeDtypeStruct((1, model.num_tokens), jnp.int32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    abstract = common.abstract_variables(model, codes, labels)["params"]
    return common.finish(sd, out, abstract)


def convert_file(path: str, size: Optional[str] = None, **model_kwargs: Any
                 ) -> tuple[RAR, dict[str, Any]]:
    """Reads an official checkpoint (.bin / .pt torch pickle, or .safetensors / .npz) and
    returns (model, params). `size` ("B", "L", "XL", "XXL") checks the file is that released
    size; `model_kwargs` (dtype, scan, remat, ...) go to `RAR`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sd = common.load_state_dict(path)
    kwargs = infer_kwargs(sd)
    if size is not None:
        want = size_kwargs(size)
        got = {k: kwargs[k] for k in want}
        if got != want:
            raise ConversionError(f"{path}: size {size!r} is {want}; the checkpoint has {got}")
    kwargs.update(model_kwargs)
    model = RAR(**kwargs)
    return model, convert_rar(sd, model, what=path)
