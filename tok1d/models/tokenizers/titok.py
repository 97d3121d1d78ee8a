"""TiTok: a 1D image tokenizer ("An Image is Worth 32 Tokens for Reconstruction and Generation").

    images -> patches + N learned latent tokens -> ViT encoder -> N latent vectors
           -> vector quantizer -> N codes
           -> ViT decoder over [cls, grid of mask tokens, N latents] -> pixels (or proxy-code logits)

Images are NHWC in [0, 1] (TiTok uses no mean/std normalisation). Sequence orders follow the
official code: encoder [cls, patches, latents], decoder [cls, mask tokens, latents].
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers import transformer
from tok1d.layers.transformer import logical
from tok1d.models import presets, quantizers
from tok1d.models.interfaces import TokenizerAux, check_images, gaussian_aux, vq_aux
from tok1d.models.quantizers import VectorQuantizer
from tok1d.models.tokenizers import nested
from tok1d.models.tokenizers.vqgan import VQGANDecoder

Dtype = Any


def depth_to_space(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """(B, h, w, p*p*c) -> (B, h*p, w*p, c), channel order (p1, p2, c) like einops
    `b (p1 p2 c) h w -> b c (h p1) (w p2)`."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch_size, w * patch_size, channels)


class _ViTTrunk(nn.Module):
    """ln_pre -> transformer -> (selection) -> ln_post, shared by the encoder and decoder."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    scan: bool = True
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, keep: slice) -> jax.Array:
        norm = dict(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
        x = transformer.LayerNorm(**norm, name="ln_pre")(x)
        x = transformer.Transformer(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True,
            norm_eps=1e-5, activation="gelu", scan=self.scan, remat=self.remat,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
            name="transformer")(x)
        return transformer.LayerNorm(**norm, name="ln_post")(x[:, keep])


# The features of TiTok's latent tokens a linear probe reads (`TiTok.probe_features`).
PROBE_TAPS = ("encoder", "encoder_tokens")


class TiTokEncoder(nn.Module):
    """Patches + latent tokens -> `num_latent_tokens` vectors of size `out_dim` (with
    `features=True` also the latent tokens after ln_post, (B, N, width), conv_out's input)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_latent_tokens: int
    out_dim: int
    legacy_reshape: bool = False
    scan: bool = True
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, latent_tokens: jax.Array, features: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        b = images.shape[0]
        grid = self.image_size // self.patch_size
        n, w = self.num_latent_tokens, self.width
        scale = w ** -0.5
        x = nn.Conv(w, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(transformer.default_kernel_init,
                                        ("conv_h", "conv_w", "conv_in", "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(images.astype(self.dtype))
        x = x.reshape(b, grid * grid, w)
        cls = transformer.embedding_param(self, "class_embedding", (1, w), (None, "embed"), scale,
                                     self.param_dtype)
        pos = transformer.embedding_param(self, "positional_embedding", (grid * grid + 1, w),
                                     ("length", "embed"), scale, self.param_dtype)
        lat_pos = transformer.embedding_param(self, "latent_token_positional_embedding", (n, w),
                                         ("length", "embed"), scale, self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        lat = (latent_tokens + lat_pos).astype(x.dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(lat, (b, n, w))], axis=1)
        x = transformer.constrain(x)
        x = _ViTTrunk(w, self.depth, self.num_heads, self.mlp_dim, scan=self.scan,
                      remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="trunk")(x, slice(-n, None))
        proj = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical(transformer.default_kernel_init, ("embed", "code_dim")),
                        bias_init=logical(nn.initializers.zeros, ("code_dim",)),
                        name="conv_out")
        if self.legacy_reshape:
            # Official released weights (is_legacy=True) apply the 1x1 conv to a raw C-order
            # reshape (B, N, W) -> (B, W, N): reproduce that memory reinterpretation.
            z = proj(x.reshape(b, w, n).transpose(0, 2, 1))
        else:
            z = proj(x)
        return (z, x) if features else z


class TiTokDecoder(nn.Module):
    """N latent vectors -> image (head="pixels") or proxy-code logits (head="logits")."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_latent_tokens: int
    head: str = "pixels"
    out_channels: int = 3
    num_logits: int = 1024
    scan: bool = True
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        b, n, _ = z.shape
        grid = self.image_size // self.patch_size
        w = self.width
        scale = w ** -0.5
        dense_init = logical(transformer.default_kernel_init, ("code_dim", "embed"))
        x = nn.Dense(w, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init,
                     bias_init=logical(nn.initializers.zeros, ("embed",)),
                     name="decoder_embed")(z.astype(self.dtype))
        cls = transformer.embedding_param(self, "class_embedding", (1, w), (None, "embed"), scale,
                                     self.param_dtype)
        mask = transformer.embedding_param(self, "mask_token", (1, 1, w), (None, None, "embed"),
                                      scale, self.param_dtype)
        pos = transformer.embedding_param(self, "positional_embedding", (grid * grid + 1, w),
                                     ("length", "embed"), scale, self.param_dtype)
        lat_pos = transformer.embedding_param(self, "latent_token_positional_embedding",
                                         (self.num_latent_tokens, w), ("length", "embed"),
                                         scale, self.param_dtype)
        seq = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)),
                               jnp.broadcast_to(mask, (b, grid * grid, w))], axis=1)
        seq = (seq + pos).astype(self.dtype)
        x = x + lat_pos[:n].astype(self.dtype)
        x = transformer.constrain(jnp.concatenate([seq, x], axis=1))
        x = _ViTTrunk(w, self.depth, self.num_heads, self.mlp_dim, scan=self.scan,
                      remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="trunk")(x, slice(1, 1 + grid * grid))
        x = x.reshape(b, grid, grid, w)
        conv = lambda feats, names, name, k=1: nn.Conv(  # noqa: E731
            feats, (k, k), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(transformer.default_kernel_init, ("conv_h", "conv_w") + names),
            bias_init=logical(nn.initializers.zeros, names[1:]), name=name)
        if self.head == "pixels":
            p, c = self.patch_size, self.out_channels
            x = conv(p * p * c, ("embed", "conv_out"), "ffn")(x)
            x = depth_to_space(x, p, c)
            x = conv(c, ("conv_in", "conv_out"), "conv_out", k=3)(x)
            return x.astype(jnp.float32)
        if self.head == "logits":
            x = jnp.tanh(conv(2 * w, ("embed", "mlp"), "ffn_0")(x))
            return conv(self.num_logits, ("mlp", "vocab"), "ffn_2")(x).astype(jnp.float32)
        raise ValueError(f"Unknown decoder head {self.head!r}; expected 'pixels' or 'logits'.")


class TiTok(nn.Module):
    """TiTok tokenizer (`tok1d.models.interfaces.Tokenizer`): `encode` (images -> codes),
    `decode_codes` (codes -> decoder output), `encode_latents` / `decode_latents` (the latent
    level), `__call__` (the training forward).

    quantizer   "vq" (codebook of `codebook_size` x `token_dim`), "vae" (KL bottleneck with
                `token_dim` channels; the encoder emits 2 * token_dim moments) or any name of
                `tok1d.models.quantizers.QUANTIZERS` ("clustering_vq", "simvq", "fsq", "lfq",
                "bsq", "residual_vq"), with `quantizer_options` (its own fields, e.g.
                {"levels": [8, 8, 8, 5, 5, 5]} for FSQ with token_dim 6, {"depth": 4} for
                residual VQ); codebook_size and token_dim size every quantizer, l2_norm,
                commitment_cost and entropy_temperature configure the VQ family only
                (`quantizers.for_tokenizer`).
    decoder_head  "pixels" (1x1 conv -> depth-to-space -> 3x3 conv) or "logits" (proxy-code
                logits over the `num_proxy_codes` MaskGIT-VQGAN codes: stage 1 of two-stage
                training).
    pixel_decoder  stage 2 of two-stage training (logits head only): softmax over the proxy-code
                logits mixes the rows of `pixel_quantize` (`num_proxy_codes` x `pixel_z_channels`)
                and a MaskGIT-VQGAN decoder (`pixel_*` sizes) turns that map into pixels.
    finetune_decoder  encoder, latent tokens and quantizer are frozen in the forward (stop
                gradient; their losses report 0; the quantizer in eval mode: a clustering VQ
                does not re-anchor), as in the official stage 2.
    legacy_reshape  the raw reshape of the two-stage models (`is_legacy`: the released
                checkpoints and the official two-stage training, whose YAMLs leave it True);
                False: the per-token projection of the single-stage models.
    nested_dropout  ordered variable-length tokens (`tok1d.models.tokenizers.nested`): the
                schedule of the random prefix length kept per example in the training forward
                ("none", "uniform", "pow2"); the rest of the tokens reach the decoder as a
                learned mask vector. Off ("none") by default.
    """

    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 32
    encoder_width: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    encoder_mlp_dim: int = 4096
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    decoder_mlp_dim: int = 4096
    quantizer: str = "vq"
    quantizer_options: Any = None     # a mapping of the quantizer's own fields
    codebook_size: int = 4096
    token_dim: int = 12
    l2_norm: bool = True
    commitment_cost: float = 0.25
    entropy_temperature: float = 0.01
    decoder_head: str = "pixels"
    num_proxy_codes: int = 1024
    legacy_reshape: bool = False
    finetune_decoder: bool = False
    nested_dropout: str = "none"
    pixel_decoder: bool = False
    pixel_channels: int = 128
    pixel_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    pixel_res_blocks: int = 2
    pixel_z_channels: int = 256
    scan: bool = True
    remat: str = "none"
    cnn_remat: str = "none"  # the stage-2 pixel decoder's ResnetBlocks (transformer.maybe_remat)
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        # A mapping of options built here ({"depth": 2}, as models.create gets them) hashes
        # as a Linen module's fields must (jit's static arguments): "Failed to hash" before.
        object.__setattr__(self, "quantizer_options", presets.hashable(self.quantizer_options))
        super().__post_init__()

    def setup(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}.")
        if self.pixel_decoder and self.decoder_head != "logits":
            raise ValueError("pixel_decoder=True (stage 2) needs decoder_head='logits'.")
        nested.check_schedule(self.nested_dropout)
        self.tail_mask = (nested.TailMask(self.num_latent_tokens, self.token_dim,
                                          param_dtype=self.param_dtype)
                          if self.nested_dropout != "none" else None)
        common = dict(image_size=self.image_size, patch_size=self.patch_size,
                      num_latent_tokens=self.num_latent_tokens, scan=self.scan,
                      remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        self.latent_tokens = transformer.embedding_param(
            self, "latent_tokens", (self.num_latent_tokens, self.encoder_width),
            ("length", "embed"), self.encoder_width ** -0.5, self.param_dtype)
        vae = self.quantizer == "vae"
        self.encoder = TiTokEncoder(
            width=self.encoder_width, depth=self.encoder_depth, num_heads=self.encoder_heads,
            mlp_dim=self.encoder_mlp_dim, out_dim=self.token_dim * (2 if vae else 1),
            legacy_reshape=self.legacy_reshape, **common)
        self.quantize = self._quantizer()
        self.decoder = TiTokDecoder(
            width=self.decoder_width, depth=self.decoder_depth, num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim, head=self.decoder_head,
            num_logits=self.num_proxy_codes, **common)
        if self.pixel_decoder:
            self.pixel_quantize = VectorQuantizer(
                self.num_proxy_codes, self.pixel_z_channels, l2_norm=False,
                param_dtype=self.param_dtype)
            self.pixel_decoder_net = VQGANDecoder(
                hidden_channels=self.pixel_channels, channel_mult=tuple(self.pixel_channel_mult),
                num_res_blocks=self.pixel_res_blocks, z_channels=self.pixel_z_channels,
                remat=self.cnn_remat, dtype=self.dtype, param_dtype=self.param_dtype,
                name="pixel_decoder")

    def _quantizer(self, detached: bool = False) -> nn.Module:
        return quantizers.for_tokenizer(self, self.token_dim, detached=detached)

    @property
    def num_codes(self) -> Optional[int]:
        """Vocabulary of the discrete tokens (None for the continuous VAE variant)."""
        return self._quantizer(detached=True).num_codes

    @property
    def outputs_pixels(self) -> bool:
        return self.decoder_head == "pixels" or self.pixel_decoder

    @property
    def codes_per_token(self) -> int:
        """The quantizer's codes per latent token (residual VQ: its depth; else 1)."""
        return self._quantizer(detached=True).codes_per_token

    @property
    def num_tokens(self) -> int:
        """Codes per image: latent tokens x the quantizer's codes per token."""
        return self.num_latent_tokens * self.codes_per_token

    @property
    def input_size(self) -> int:
        return self.image_size

    decodes_prefixes = True  # 1D tokens: decode_codes takes the first k (nested.py)

    @property
    def pixel_range(self) -> tuple[float, float]:
        return (0.0, 1.0)

    def check_images(self, images: jax.Array) -> None:
        check_images("TiTok", images, self.image_size, self.pixel_range)

    def encode_latents(self, images: jax.Array, sample: bool = False
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Images (B, H, W, 3) in [0, 1] -> (latents (B, N, D), the quantizer's outputs). VQ:
        `codes` (B, N) and the quantizer losses; VAE: the posterior and `kl_loss` (`sample=True`
        draws from the posterior with rng "sample", else its mean)."""
        self.check_images(images)
        z = self.encoder(images, self.latent_tokens)
        if self.quantizer == "vae":
            z_q, aux = self.quantize(z, sample=sample)
        else:  # stage 2 runs the frozen quantizer in eval mode (no clustering re-anchoring)
            z_q, aux = self.quantize(z, train=sample and not self.finetune_decoder)
        if self.finetune_decoder:
            z_q = jax.lax.stop_gradient(z_q)
            aux = {k: jnp.zeros_like(v) if k.endswith("_loss") else jax.lax.stop_gradient(v)
                   for k, v in aux.items()}
        return z_q, aux

    @property
    def probe_taps(self) -> tuple[str, ...]:
        """The features a tokenizer linear probe can read (`probe_features`)."""
        return PROBE_TAPS

    def probe_features(self, images: jax.Array, tap: str = "encoder") -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] -> features (B, N, D) of the latent tokens for a
        linear probe (GigaTok's tokenizer probe, `tok1d.evaluation.linear_probe`; TiTok's
        code has none): "encoder", after the encoder's ln_post (D = width), as GigaTok's
        default tap; "encoder_tokens", after its conv_out, before the quantizer (D = token_dim,
        a VAE's posterior mean and log-variance: twice that)."""
        if tap not in PROBE_TAPS:
            raise ValueError(f"TiTok has no probe tap {tap!r}; taps: {', '.join(PROBE_TAPS)}.")
        self.check_images(images)
        z, feat = self.encoder(images, self.latent_tokens, features=True)
        return feat if tap == "encoder" else z

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] -> codes (B, num_tokens) int32 (discrete quantizers;
        residual VQ's (B, N, depth) flattened token-major)."""
        if self.quantizer == "vae":
            raise ValueError("encode: this TiTok is a continuous (VAE) tokenizer; it has no "
                             "codes (encode_latents gives its latents).")
        codes = self.encode_latents(images)[1]["codes"]
        return codes.reshape(codes.shape[0], -1)

    def decode_latents(self, z_q: jax.Array, prefix_lengths: nested.PrefixLengths = None
                       ) -> jax.Array:
        """Latents (B, n, D) -> pixels (B, H, W, 3) (not clamped), or proxy-code logits
        (B, h, w, num_proxy_codes) for a stage-1 model. n <= N: a prefix of the tokens;
        `prefix_lengths` (an int, or (B,) per example) keeps fewer (`nested.apply_prefix`)."""
        z_q = nested.apply_prefix(z_q, prefix_lengths, self.num_latent_tokens, self.tail_mask)
        out = self.decoder(z_q)
        if not self.pixel_decoder:
            return out
        return self.decode_logits(out)

    def decode_logits(self, logits: jax.Array) -> jax.Array:
        """Stage 2: proxy-code logits -> softmax-weighted pixel codebook -> VQGAN decoder."""
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        e = self.pixel_quantize.codebook()
        z = jnp.einsum("bhwk,kd->bhwd", probs, e, precision=jax.lax.Precision.HIGHEST)
        return self.pixel_decoder_net(z).astype(jnp.float32)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Codes (B, k) int, k <= num_tokens (a prefix: the first k codes, whole tokens; residual
        VQ: a multiple of its depth) -> decoder output (see `decode_latents`)."""
        if self.quantizer == "vae":
            raise ValueError("decode_codes needs a discrete quantizer; this TiTok is a VAE (use "
                             "decode_latents).")
        return self.decode_latents(quantizers.lookup_codes(self.quantize, codes))

    def __call__(self, images: jax.Array, *, train: bool = False,
                 prefix_lengths: nested.PrefixLengths = None) -> tuple[jax.Array, TokenizerAux]:
        """The training forward: (decoder output, TokenizerAux); `train` draws the VAE
        variant's latents from its posterior and, with `nested_dropout`, the prefix lengths
        (rng "sample"); `prefix_lengths` decodes the first k tokens only (evaluation)."""
        z_q, quantized = self.encode_latents(images, sample=train)
        aux = gaussian_aux(quantized) if self.quantizer == "vae" else vq_aux(quantized)
        prefix_lengths = nested.forward_lengths(self, prefix_lengths, train, z_q.shape[0])
        return self.decode_latents(z_q, prefix_lengths), aux
