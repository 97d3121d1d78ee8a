"""Model size tables: sizes are data, not classes.

`VIT_SIZES` are TiTok's encoder/decoder presets (official `small`/`base`/`large`) plus tiny ones
for tests and the CPU demo. `check_kwargs` checks plain keyword arguments against a module's
fields (the registry `tok1d.models.create` and the generators' `build` use it);
`build_generator` is the AR generators' `build` (a size name and/or explicit arguments).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, Callable, Optional

from flax.core import FrozenDict

VIT_SIZES: dict[str, dict[str, int]] = {
    # name:   width, depth, heads, MLP hidden (4x width, head dim 64 for the official sizes)
    "nano": dict(width=32, depth=1, num_heads=2, mlp_dim=128),
    "tiny": dict(width=128, depth=2, num_heads=4, mlp_dim=512),
    "mini": dict(width=192, depth=4, num_heads=3, mlp_dim=768),
    "small": dict(width=512, depth=8, num_heads=8, mlp_dim=2048),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def vit_size(name: str) -> dict[str, int]:
    if name not in VIT_SIZES:
        raise ValueError(f"Unknown ViT size {name!r}; known sizes: {sorted(VIT_SIZES)}.")
    return dict(VIT_SIZES[name])


# GigaTok's released tokenizers (configs/vq/*.yaml): encoder size, decoder size, layout, 2D
# block type (`layer_type`, default "vit"; S-S 2D's yaml leaves `transformer_layer_type` at the
# official default TransformerDecoderLayer = "detr"), entropy loss ratio, rotation trick. All:
# 16384 x 8 l2 codebook, 256 tokens, z 256, CNN ch 128 with ch_mult (1, 1, 2, 2, 4), AdaGN +
# depth-to-space, distill MLP after decoder layer 3 -> 768.
# Parameter counts (official, with the distill MLP): s_s 136.07M, s_b 232.40M, b_l 621.64M,
# xl_xxl 2893.97M, s_s_2d 135.55M (135,548,427), s_b_2d 197.13M, b_l_2d 491.41M
# (tests/test_gigatok_presets.py).
GIGATOK_PRESETS: dict[str, dict] = {
    "s_s": dict(encoder_size="small", decoder_size="small", layout="1d", entropy=0.0, rot=True),
    "s_b": dict(encoder_size="small", decoder_size="base", layout="1d", entropy=0.0, rot=True),
    "b_l": dict(encoder_size="base", decoder_size="large", layout="1d", entropy=0.0, rot=True),
    "xl_xxl": dict(encoder_size="xl", decoder_size="xxl", layout="1d", entropy=0.005, rot=True),
    "s_s_2d": dict(encoder_size="small", decoder_size="small", layout="2d", layer_type="detr",
                   entropy=0.0, rot=True),
    "s_b_2d": dict(encoder_size="small", decoder_size="base", layout="2d", entropy=0.0, rot=True),
    "b_l_2d": dict(encoder_size="base", decoder_size="large", layout="2d", entropy=0.005,
                   rot=True),
}


def check_kwargs(cls, kwargs: dict[str, Any], what: str) -> None:
    """Raises a ValueError naming every unknown keyword (with close matches)."""
    fields = {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"Unknown argument(s) for {what}: {', '.join(hints)}. "
                         f"Valid: {sorted(fields)}.")


def build_generator(cls, name: str, size_kwargs: Callable[[str], dict[str, Any]],
                    size: Optional[str], kwargs: dict[str, Any]) -> Any:
    """`cls(**kwargs)` of an AR generator (model `name` of the registry): the entries of its
    size table for `size` (`size_kwargs(size)`) fill the arguments not given; unknown arguments
    fail (`check_kwargs`), and `vocab_size` and `num_tokens` are required."""
    if size is not None:
        for key, value in size_kwargs(size).items():
            kwargs.setdefault(key, value)
    check_kwargs(cls, kwargs, f"model {name!r} (plus size)")
    missing = [k for k in ("vocab_size", "num_tokens") if k not in kwargs]
    if missing:
        raise ValueError(f"model {name!r} needs {missing} (the tokenizer's codebook size and "
                         "codes per image).")
    return cls(**kwargs)


def hashable(value: Any) -> Any:
    """`value` with its mappings (a ConfigDict's too) as FrozenDicts and lists as tuples, at
    every depth: a Linen module's fields must hash (jit's static arguments, caches)."""
    if hasattr(value, "to_dict") and not isinstance(value, Mapping):  # a ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return FrozenDict({k: hashable(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    return value
