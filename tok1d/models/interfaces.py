"""The interfaces every tokenizer and every generator implements; trainers, tokenize, sample
and evaluation talk to these only.

Tokenizer (TiTok, GigaTok, MaskGIT-VQGAN), a Linen module with:
    pixel_range      (lo, hi): the pixel range it reads and writes ([0, 1]; GigaTok [-1, 1])
    num_codes        codebook size (None for a continuous VAE tokenizer)
    num_tokens       codes per image (latent tokens x codes_per_token)
    decodes_prefixes whether decode_codes takes a prefix of the codes (1D tokenizers: TiTok,
                     GigaTok 1D; see decode_codes)
    codes_per_token  codes per latent token: residual VQ's depth, else 1 (codebook statistics
                     are kept per level; a prefix is a whole number of tokens)
    outputs_pixels   False for TiTok stage 1 (its decoder predicts proxy-code logits)
    input_size       the image side it requires (TiTok, GigaTok: their image_size), or None
                     for a fully convolutional tokenizer that encodes any size (MaskGIT-VQGAN)
    encode(images)   -> integer codes: (B, num_tokens) for TiTok and GigaTok, the (B, h, w) grid
                     (h * w = num_tokens, row-major) for MaskGIT-VQGAN; a continuous (VAE)
                     tokenizer raises ValueError (it has no codes)
    decode_codes(codes) -> the decoder's output (pixels, or logits for stage 1; NaN for an
                     image with a code outside [0, num_codes), not another image). A 1D tokenizer
                     (TiTok, GigaTok 1D) also decodes a prefix: codes (B, k), k <= num_tokens,
                     are its first k tokens (ordered tokens: trained with `nested_dropout`, the
                     rest is the learned mask vector; `tok1d.models.tokenizers.nested`)
    __call__(images, *, train=False) -> (reconstruction, TokenizerAux): the training forward
                     (`train`: TiTok VAE draws its latents from the posterior, GigaTok adds its
                     shortcut reconstruction, `nested_dropout` draws a prefix length per
                     example); a 1D tokenizer also takes `prefix_lengths` (an int k: decode
                     the first k tokens; evaluation)
A tokenizer with a shortcut decoder (GigaTok's CNN decoder on the CNN-encoder map, the
"shortcut" warm-up term) also has `decode_cnn_map(cnn_map)` (`ShortcutTokenizer`). A tokenizer
whose decoder features a semantic loss aligns with a teacher's patch grid (GigaTok) names that
grid's side as `semantic_grid` (`SemanticTokenizer`; the DINOv2 teacher's position table is
resampled to it). A tokenizer whose inner features can be probed (GigaTok's tokenizer linear
probe, `tok1d.evaluation.linear_probe`) names its taps in `probe_taps` and returns a tap's
features (B, L, D) from `probe_features(images, tap)` (`ProbedTokenizer`).

The latent level, which the models use internally and the parity tests read:
    encode_latents(images) -> (latents, the quantizer's outputs: a dict with "codes" and
                     "<part>_loss" for VQ, the posterior and "kl_loss" for a VAE, plus GigaTok's
                     "cnn_map" and MaskGIT-VQGAN's "z")
    decode_latents(latents) -> the decoder's output

TokenizerAux (a pytree) of the training forward:
    codes     the integer codes of `encode` (None for a continuous VAE tokenizer)
    losses    the loss terms the tokenizer computes itself, unweighted, by the names of the
              registry `tok1d.objectives.terms.TERMS`:
                quantizer   VQ: codebook + commitment (TiTok VQ, GigaTok, MaskGIT-VQGAN)
                entropy     code-usage entropy loss (VQ: weighted in GigaTok; LFQ / BSQ: the
                            per-sample minus the batch entropy)
                kl          VAE KL divergence (TiTok VAE)
                fea_rec     GigaTok: MSE(transformer-decoder grid, sg(CNN-encoder map))
              and the quantizer's parts (LOSS_PARTS, logged, never weighted):
                codebook    MSE(z_q, sg(z));  commitment  commitment_cost * MSE(sg(z_q), z)
                per_sample_entropy, codebook_entropy   LFQ / BSQ's two entropy terms
    features  named features:
                cnn_map             GigaTok: the CNN encoder's map (B, h, w, C) (the shortcut's
                                    input, fea_rec's target)
                semantic_features   GigaTok with distill_depth > 0: the decoder features the
                                    semantic (DINOv2) loss aligns (B, N, D)
                shortcut_pixels     GigaTok, train=True: the CNN decoder on cnn_map (B, H, W, 3)
                encoder_map         MaskGIT-VQGAN: the unquantized encoder output (B, h, w, z)
                posterior_mean, posterior_logvar, posterior_std, kl_per_token
                                    TiTok VAE: the diagonal Gaussian posterior (B, N, C) and its
                                    per-image KL summed over channels (B, N)

Generator (MaskGIT, GPT, RAR), a Linen module with:
    objective        "masked" (MaskGIT: fill masked tokens) | "next_token" (GPT) |
                     "permuted_next_token" (RAR: next token in a per-sequence order, trained on
                     random permutations, sampled in raster order)
    vocab_size       tokenizer codes it predicts
    num_tokens, num_classes, null_label (the class-free label of classifier-free guidance)
    __call__(tokens, labels, train=False) -> logits (B, num_tokens, vocab_size)
A "masked" generator also has `mask_id`, the input id of a masked token; a
"permuted_next_token" generator's `__call__` also takes `orders` (B, num_tokens), the order in
which it reads and predicts each sequence (None: raster). The objective picks the training loss
(`tok1d.objectives.tokens`) and the sampler (`tok1d.generation.common`).

Discriminator (TiTok's NLayer, PatchGAN, GigaTok's DINO discriminator), a Linen module with:
    pixel_range      (lo, hi): the pixel range it reads (the GAN objective converts to it)
    __call__(images, *, train=False) -> logits: `train` advances its state collections (PatchGAN
                     BatchNorm running averages, DINO spectral-norm power iteration) when
                     applied with them mutable; the official trainers always call it in train
                     mode, and so does `tok1d.objectives.adversarial`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from tok1d import images as images_lib

TOKENIZER_FIELDS = ("pixel_range", "num_codes", "num_tokens", "codes_per_token",
                    "decodes_prefixes", "outputs_pixels", "input_size", "encode", "decode_codes")
# The quantizers' loss parts (logged, not weighted): VQ's codebook / commitment terms, LFQ /
# BSQ's per-sample and batch entropies (`tok1d.models.quantizers`).
LOSS_PARTS = ("codebook", "commitment", "per_sample_entropy", "codebook_entropy")
FEATURES = ("cnn_map", "semantic_features", "shortcut_pixels", "encoder_map", "posterior_mean",
            "posterior_logvar", "posterior_std", "kl_per_token")


@struct.dataclass
class TokenizerAux:
    """What the training forward returns beside the reconstruction (see the module docstring)."""
    codes: Optional[jax.Array] = None
    losses: dict[str, jax.Array] = struct.field(default_factory=dict)
    features: dict[str, jax.Array] = struct.field(default_factory=dict)


def vq_aux(quantized: Mapping[str, jax.Array], **features: jax.Array) -> TokenizerAux:
    """The TokenizerAux of a discrete quantizer's outputs (`tok1d.models.quantizers`: its
    codes, and every "<name>_loss" as the loss `name`) plus the model's `features`."""
    return TokenizerAux(
        codes=quantized["codes"],
        losses={name[:-5]: value for name, value in quantized.items()
                if name.endswith("_loss") and name[:-5] in ("quantizer", "entropy") + LOSS_PARTS},
        features=features)


def gaussian_aux(posterior: Mapping[str, jax.Array]) -> TokenizerAux:
    """The TokenizerAux of a `DiagonalGaussian`'s outputs (a continuous tokenizer: no codes)."""
    return TokenizerAux(
        codes=None, losses={"kl": posterior["kl_loss"]},
        features={"posterior_mean": posterior["mean"], "posterior_logvar": posterior["logvar"],
                  "posterior_std": posterior["std"], "kl_per_token": posterior["kl_per_token"]})


@runtime_checkable
class Tokenizer(Protocol):
    pixel_range: tuple[float, float]
    num_codes: Optional[int]
    num_tokens: int
    codes_per_token: int
    decodes_prefixes: bool
    outputs_pixels: bool
    input_size: Optional[int]

    def encode(self, images: jax.Array) -> jax.Array: ...

    def decode_codes(self, codes: jax.Array) -> jax.Array: ...

    def __call__(self, images: jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, TokenizerAux]: ...


@runtime_checkable
class ShortcutTokenizer(Tokenizer, Protocol):
    def decode_cnn_map(self, cnn_map: jax.Array) -> jax.Array: ...


@runtime_checkable
class SemanticTokenizer(Tokenizer, Protocol):
    semantic_grid: int


@runtime_checkable
class ProbedTokenizer(Tokenizer, Protocol):
    probe_taps: tuple[str, ...]

    def probe_features(self, images: jax.Array, tap: str) -> jax.Array: ...


def check_tokenizer(model: Any) -> None:
    """Raises TypeError naming what `model` lacks of the tokenizer interface."""
    missing = [name for name in TOKENIZER_FIELDS if not hasattr(type(model), name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a tokenizer: it lacks {missing}.")


def check_images(name: str, images: jax.Array, image_size: Optional[int],
                 pixel_range: tuple[float, float]) -> None:
    """A ValueError unless `images` is a batch of float images (B >= 1, image_size,
    image_size, 3) (image_size None: any height and width), what tokenizer `name` encodes (in
    `pixel_range`, which only the caller can know): uint8 pixels were encoded as their
    values, without a word, and an empty batch failed on a division by zero."""
    lo, hi = (f"{v:g}" for v in pixel_range)
    side = "H, W" if image_size is None else f"{image_size}, {image_size}"
    expected = f"float images of shape (B, {side}, 3) in [{lo}, {hi}]"
    if (images.ndim != 4 or images.shape[-1] != 3
            or (image_size is not None and tuple(images.shape[1:3]) != (image_size,) * 2)):
        raise ValueError(f"{name} expects {expected}; got shape {tuple(images.shape)}.")
    if not images.shape[0]:
        raise ValueError(f"{name} expects {expected}; got an empty batch.")
    to_range = " * 2 - 1" if pixel_range[0] < 0 else ""
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name} expects {expected}; got {images.dtype} pixels (from uint8 "
                         f"ones: x / 255{to_range}).")
    if (isinstance(images, jax.core.Tracer)  # (inside jit: the values are not known here)
            or not getattr(images, "is_fully_addressable", True)):  # (other hosts' rows)
        return
    # Outside jit (the Python API's eager calls) the values are: [0, 255] floats were
    # encoded as such, [-1, 1] images by a [0, 1] TiTok too. Half a range of slack: resizing
    # overshoots a little.
    with jax.ensure_compile_time_eval():  # (concrete images closed over by a traced call)
        low, high = float(jnp.min(images)), float(jnp.max(images))
    span = pixel_range[1] - pixel_range[0]
    if low < pixel_range[0] - span / 2 or high > pixel_range[1] + span / 2:
        hint = (f" (from [0, 255] pixels: x / 255{to_range})" if high > 2 * span + 1 else
                " (from [-1, 1] pixels: (x + 1) / 2)" if pixel_range[0] >= 0 > low else "")
        raise ValueError(f"{name} expects {expected}; got values from {low:.4g} to "
                         f"{high:.4g}{hint}.")


def encode_images(tokenizer: Any, params: Any, images: jax.Array, prefix_tokens: int = 0
                  ) -> jax.Array:
    """[0, 1] images (B, S, S, 3) -> `tokenizer`'s codes as sequences (B, num_tokens) int32
    (MaskGIT-VQGAN's grid row-major), or their first `prefix_tokens` codes when > 0 (see
    `tok1d.models.tokenizers.nested.check_code_prefix`); no gradient flows back."""
    to_model, _ = images_lib.range_converters(tokenizer.pixel_range)
    codes = tokenizer.apply({"params": params}, to_model(images), method=tokenizer.encode)
    codes = jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1).astype(jnp.int32))
    return codes[:, :prefix_tokens] if prefix_tokens else codes


def check_probed(tokenizer: Any) -> None:
    """A ValueError for a tokenizer without features to probe (not a `ProbedTokenizer`)."""
    if not isinstance(tokenizer, ProbedTokenizer):
        raise ValueError(f"{type(tokenizer).__name__} has no features to probe (GigaTok's "
                         "tokenizer linear probe needs a tokenizer with probe_taps: GigaTok, "
                         "TiTok).")


def probe_features(tokenizer: Any, params: Any, images: jax.Array, tap: str) -> jax.Array:
    """[0, 1] images (B, S, S, 3) -> the `ProbedTokenizer`'s features (B, L, D) at `tap`, as
    `encode_images` converts its input; no gradient flows back."""
    check_probed(tokenizer)
    to_model, _ = images_lib.range_converters(tokenizer.pixel_range)
    feats = tokenizer.apply({"params": params}, to_model(images), tap,
                            method=tokenizer.probe_features)
    return jax.lax.stop_gradient(feats)


def params_encode_reads(tokenizer: Any, params: Any, image_size: int) -> Any:
    """A tree like `params` of bools: whether `encode_images` of `image_size` images reads the
    leaf (from the traced program: a parameter no equation uses is not read). The others, the
    decoder's, need not be on the devices while only encoding."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda p, x: encode_images(
        tokenizer, jax.tree.unflatten(treedef, p), x))(leaves, images)
    jaxpr = closed.jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    used |= {id(v) for v in jaxpr.outvars}
    return jax.tree.unflatten(treedef, [id(v) in used for v in jaxpr.invars[:len(leaves)]])


@runtime_checkable
class Discriminator(Protocol):
    pixel_range: tuple[float, float]

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array: ...


GENERATOR_FIELDS = ("objective", "vocab_size", "num_tokens", "num_classes", "null_label")
OBJECTIVES = ("masked", "next_token", "permuted_next_token")


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


def generator_inputs(model: Generator, batch: int) -> tuple[jax.Array, jax.Array]:
    """What a generator is initialised with: zero codes (batch, num_tokens) and zero class
    labels (batch,), int32."""
    return (jnp.zeros((batch, model.num_tokens), jnp.int32), jnp.zeros((batch,), jnp.int32))
