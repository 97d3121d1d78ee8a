"""The interfaces every tokenizer and every generator implements; trainers, tokenize, sample
and evaluation talk to these only.

Tokenizer (TiTok, GigaTok, MaskGIT-VQGAN), a Linen module with:
    pixel_range      (lo, hi): the pixel range it reads and writes ([0, 1]; GigaTok [-1, 1])
    num_codes        codebook size (None for a continuous VAE tokenizer)
    num_tokens       tokens per image
    outputs_pixels   False for TiTok stage 1 (its decoder predicts proxy-code logits)
    encode(images)   -> (quantized latents, aux): aux["codes"] the integer codes
    decode_codes(codes) -> the decoder's output (pixels, or logits for stage 1)
    __call__(images, train=False) -> (reconstruction, aux): the training forward; aux holds
                     "codes", the losses the tokenizer computes itself as "<name>_loss" (read by
                     the loss terms of `tok1d.objectives.terms`, e.g. quantizer, entropy, kl,
                     fea_rec) and its features ("semantic_features", "cnn_map", ...).
A tokenizer with a shortcut decoder (GigaTok's CNN decoder on the CNN-encoder map, the
"shortcut" warm-up term) also has `decode_cnn_map(cnn_map)`.

Generator (MaskGIT, GPT), a Linen module with:
    objective        "masked" (MaskGIT: fill masked tokens) | "next_token" (GPT)
    vocab_size       tokenizer codes it predicts
    num_tokens, num_classes, null_label (the class-free label of classifier-free guidance)
    __call__(tokens, labels, train=False) -> logits (B, num_tokens, vocab_size)
A "masked" generator also has `mask_id`, the input id of a masked token. The objective picks the
training loss (`tok1d.objectives.tokens`) and the sampler (`tok1d.generation.common`).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import jax

TOKENIZER_FIELDS = ("pixel_range", "num_codes", "num_tokens", "outputs_pixels", "encode",
                    "decode_codes")


@runtime_checkable
class Tokenizer(Protocol):
    pixel_range: tuple[float, float]
    num_codes: Optional[int]
    num_tokens: int
    outputs_pixels: bool

    def encode(self, images: jax.Array) -> tuple[jax.Array, dict[str, Any]]: ...

    def decode_codes(self, codes: jax.Array) -> jax.Array: ...

    def __call__(self, images: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, Any]]: ...


@runtime_checkable
class ShortcutTokenizer(Tokenizer, Protocol):
    def decode_cnn_map(self, cnn_map: jax.Array) -> jax.Array: ...


def check_tokenizer(model: Any) -> None:
    """Raises TypeError naming what `model` lacks of the tokenizer interface."""
    missing = [name for name in TOKENIZER_FIELDS if not hasattr(type(model), name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a tokenizer: it lacks {missing}.")


GENERATOR_FIELDS = ("objective", "vocab_size", "num_tokens", "num_classes", "null_label")
OBJECTIVES = ("masked", "next_token")


@runtime_checkable
class Generator(Protocol):
    objective: str
    vocab_size: int
    num_tokens: int
    num_classes: int
    null_label: int

    def __call__(self, tokens: jax.Array, labels: jax.Array, train: bool = False
                 ) -> jax.Array: ...


@runtime_checkable
class MaskedGenerator(Generator, Protocol):
    """A generator with objective "masked" also names the id of its [MASK] input token."""

    mask_id: int


def check_generator(model: Any) -> None:
    """Raises TypeError naming what `model` lacks of the generator interface (fields without a
    default live on the instance, so the instance is checked)."""
    fields = GENERATOR_FIELDS + (("mask_id",) if getattr(model, "objective", None) == "masked"
                                 else ())
    missing = [name for name in fields if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a generator: it lacks {missing}.")
    if model.objective not in OBJECTIVES:
        raise TypeError(f"{type(model).__name__}.objective={model.objective!r}: expected one "
                        f"of {OBJECTIVES}.")
