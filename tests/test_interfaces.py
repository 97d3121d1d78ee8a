"""The tokenizer interface (`tok1d.models.interfaces`): every tokenizer is a `Tokenizer`, its
`encode` gives integer codes, `decode_codes` maps them back, and its training forward returns a
`TokenizerAux` whose losses are registered loss terms (or the quantizer's documented parts)."""

import functools
import logging
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tok1d import errors, models
from tok1d.generation import decode
from tok1d.models import interfaces
from tok1d.models import discriminator, dino_disc
from tok1d.models.interfaces import (Discriminator, SemanticTokenizer, ShortcutTokenizer,
                                     Tokenizer, TokenizerAux)
from tok1d.objectives.terms import TERMS

SIZE = 32
TITOK = dict(image_size=SIZE, patch_size=8, encoder_size="nano", decoder_size="nano",
             num_latent_tokens=8, codebook_size=64, token_dim=8)
GIGATOK = dict(image_size=SIZE, encoder_ch=32, decoder_ch=32, encoder_ch_mult=(1, 1, 1),
               decoder_ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, encoder_width=32,
               encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=2,
               decoder_heads=2, num_latent_tokens=16, codebook_size=64, distill_depth=1,
               out_inner_dim=32)
VQGAN = dict(image_size=SIZE, hidden_channels=32, channel_mult=(1, 1, 1), num_res_blocks=1,
             z_channels=32, codebook_size=64)

TOKENIZERS = {
    "titok_vq": ("titok", TITOK),
    "titok_vae": ("titok", dict(TITOK, quantizer="vae")),
    "gigatok_1d": ("gigatok", GIGATOK),
    "gigatok_2d": ("gigatok", dict(GIGATOK, layout="2d")),
    "maskgit_vqgan": ("maskgit_vqgan", VQGAN),
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def built(request):
    name, kwargs = TOKENIZERS[request.param]
    model = models.create(name, **kwargs)
    lo, hi = model.pixel_range
    x = jnp.asarray(np.random.default_rng(0).uniform(lo, hi, (2, SIZE, SIZE, 3)), jnp.float32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    return request.param, model, params, x


def test_every_tokenizer_implements_the_interface(built):
    name, model, _, _ = built
    assert isinstance(model, Tokenizer)
    interfaces.check_tokenizer(model)
    assert isinstance(model, ShortcutTokenizer) == name.startswith("gigatok")
    assert isinstance(model, SemanticTokenizer) == name.startswith("gigatok")
    # A fixed input size, except the fully convolutional MaskGIT-VQGAN.
    assert model.input_size == (None if name == "maskgit_vqgan" else SIZE)


def test_probe_taps_give_per_token_features(built):
    """`ProbedTokenizer` (the tokenizer linear probe): TiTok (VQ and VAE) and GigaTok (1D, 2D)
    give (B, L, D) features at each of their taps from [0, 1] images, and the probe's feature
    function averages them over L; MaskGIT-VQGAN has none."""
    from tok1d.evaluation import linear_probe
    name, model, params, x = built
    if name == "maskgit_vqgan":
        assert not isinstance(model, interfaces.ProbedTokenizer)
        return
    assert isinstance(model, interfaces.ProbedTokenizer)
    images01 = jnp.asarray(np.random.default_rng(1).uniform(0, 1, x.shape), jnp.float32)
    if name.startswith("gigatok"):
        sizes = {"encoder": model.encoder_width, "encoder_tokens": model.z_channels,
                 "decoder": model.decoder_width}
        positions = {"encoder": model.num_tokens, "encoder_tokens": model.num_tokens,
                     "decoder": model.grid_size ** 2}
    else:  # TiTok: a VAE's tokens before the quantizer are its posterior's mean and log-var
        sizes = {"encoder": model.encoder_width,
                 "encoder_tokens": model.token_dim * (2 if model.quantizer == "vae" else 1)}
        positions = dict.fromkeys(sizes, model.num_latent_tokens)
    assert set(model.probe_taps) == set(sizes)
    for tap in model.probe_taps:
        feats = interfaces.probe_features(model, params, images01, tap)
        assert feats.shape == (2, positions[tap], sizes[tap]), tap
        assert bool(jnp.all(jnp.isfinite(feats)))
        mean = linear_probe.tokenizer_feature_fn(model, tap)(params, None, {"image": images01},
                                                             None)
        np.testing.assert_allclose(mean, feats.mean(1), rtol=1e-5, atol=1e-6)


def test_encode_gives_codes_and_decode_codes_round_trips_shapes(built):
    name, model, params, x = built
    if model.num_codes is None:
        with pytest.raises(ValueError, match="no codes"):
            model.apply({"params": params}, x, method=model.encode)
        return
    codes = model.apply({"params": params}, x, method=model.encode)
    assert codes.dtype == jnp.int32
    if name == "maskgit_vqgan":  # the documented (B, h, w) grid
        side = int(round(model.num_tokens ** 0.5))
        assert codes.shape == (2, side, side)
    else:
        assert codes.shape == (2, model.num_tokens)
    assert 0 <= int(codes.min()) and int(codes.max()) < model.num_codes
    out = model.apply({"params": params}, codes, method=model.decode_codes)
    assert out.shape == x.shape


def test_images_that_are_not_a_float_batch_are_refused(built):
    """uint8 pixels were encoded as their values without a word (a [0, 1] TiTok read 0..255),
    an empty batch failed on a division by zero."""
    name, model, params, x = built
    with pytest.raises(ValueError, match=r"got uint8 pixels \(from uint8 ones: x / 255"):
        model.apply({"params": params}, (x * 255).astype(jnp.uint8), method=model.encode_latents)
    with pytest.raises(ValueError, match="got an empty batch"):
        model.apply({"params": params}, x[:0], method=model.encode_latents)
    with pytest.raises(ValueError, match=r"expects float images of shape \(B, "):
        model.apply({"params": params}, x[0], method=model.encode_latents)


def test_images_outside_the_pixel_range_are_refused_outside_jit(built):
    """[0, 255] float pixels (`np.asarray(image, np.float32)`) were encoded as such without a
    word, and so were [-1, 1] images by a [0, 1] tokenizer: refused where the values are
    known (an eager call), with the conversion. Inside jit nothing is checked, and a little
    overshoot (a resize's) passes."""
    name, model, params, x = built
    lo, hi = model.pixel_range
    unit = (x - lo) / (hi - lo)  # [0, 1] images, whatever the model's range
    encode = functools.partial(model.apply, {"params": params}, method=model.encode_latents)
    with pytest.raises(ValueError, match=r"got values from .* \(from \[0, 255\] pixels: "
                                         r"x / 255" + (r" \* 2 - 1" if lo < 0 else r"\)")):
        encode(unit * 255)
    if lo == 0:
        with pytest.raises(ValueError, match=r"\(from \[-1, 1\] pixels: \(x \+ 1\) / 2\)"):
            encode(unit * 2 - 1)
    encode(x + 0.05 * (hi - lo))  # a little over: passes
    jax.jit(encode)(unit * 255)  # inside jit: not checked


def _decode_with_bad_codes(model, params, codes):
    """The images of `codes` with code -1 in image 1 and code num_codes in image 2."""
    flat = codes.reshape(len(codes), -1)
    flat = flat.at[1, 2].set(-1).at[2, 0].set(model.num_codes)
    return np.asarray(model.apply({"params": params}, flat.reshape(codes.shape),
                                  method=model.decode_codes))


def test_codes_outside_the_codebook_decode_to_nan_images(built):
    """A code outside [0, num_codes) decodes to NaN pixels, only in its image: -1 decoded as
    the last code (another image, silently). Codes that are not integers, or not one row
    per image, are one clear error."""
    name, model, params, x = built
    if model.num_codes is None:
        return
    x3 = jnp.concatenate([x, x[:1]])
    codes = model.apply({"params": params}, x3, method=model.encode)
    out = _decode_with_bad_codes(model, params, codes)
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()
    with pytest.raises(TypeError, match="codes must be integers, got float32"):
        model.apply({"params": params}, codes.astype(jnp.float32), method=model.decode_codes)
    if name != "maskgit_vqgan":  # (a grid: its own shape check)
        with pytest.raises(ValueError, match=r"codes of shape \(B, k\).*got \(%d,\)"
                           % codes.shape[1]):
            model.apply({"params": params}, codes[0], method=model.decode_codes)


@pytest.mark.parametrize("quantizer, options, token_dim", [
    ("fsq", {"levels": (4, 4, 4)}, 3), ("bsq", {}, 6), ("residual_vq", {"depth": 2}, 8)])
def test_codes_outside_the_codebook_are_nan_with_every_quantizer(quantizer, options, token_dim):
    """FSQ's and the binary quantizers' arithmetic made latents of any integer; residual VQ
    reads `depth` codes per token."""
    model = models.create("titok", **dict(TITOK, quantizer=quantizer, token_dim=token_dim,
                                          quantizer_options=options))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, SIZE, SIZE, 3)), jnp.float32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    codes = model.apply({"params": params}, x, method=model.encode)
    out = _decode_with_bad_codes(model, params, codes)
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()


def test_encoding_reads_no_decoder_params(built):
    """`params_encode_reads` (generator.tokenizer_decoder "host"): the decoder's params are
    not read by the encode, and encoding with only the params it reads gives the same codes."""
    name, model, params, x = built
    if not model.num_codes:
        pytest.skip("a continuous tokenizer has no codes to encode")
    reads = interfaces.params_encode_reads(model, params, SIZE)
    paths = {jax.tree_util.keystr(k): v for k, v in
             jax.tree_util.tree_flatten_with_path(reads)[0]}
    unread = {k.split("]")[0][2:-1] for k, v in paths.items() if not v}  # top-level names
    decoder_side = {"decoder", "vit_decoder", "post_quant_conv"}  # GigaTok: all three
    assert "decoder" in unread and unread <= decoder_side, unread
    assert all(v for k, v in paths.items() if k.startswith("['encoder']")), paths

    def keep(tree, mask):
        if isinstance(tree, dict):
            out = {k: keep(tree[k], mask[k]) for k in tree}
            return {k: v for k, v in out.items()
                if v is not None and (not isinstance(v, dict) or v)}
        return tree if mask else None
    to_unit = lambda y: (y - model.pixel_range[0]) / (  # noqa: E731
        model.pixel_range[1] - model.pixel_range[0])
    full = interfaces.encode_images(model, params, to_unit(x))
    np.testing.assert_array_equal(
        interfaces.encode_images(model, keep(params, reads), to_unit(x)), full)


def test_training_forward_returns_a_typed_aux(built):
    name, model, params, x = built
    out, aux = model.apply({"params": params}, x, train=True, rngs={"sample": jax.random.key(1)})
    assert out.shape == x.shape and isinstance(aux, TokenizerAux)
    assert (aux.codes is None) == (model.num_codes is None)
    for key in aux.losses:
        assert key in TERMS or key in interfaces.LOSS_PARTS, key
        assert aux.losses[key].shape == ()
    assert set(aux.features) <= set(interfaces.FEATURES), aux.features.keys()
    if aux.codes is not None:
        np.testing.assert_array_equal(aux.codes,
                                      model.apply({"params": params}, x, method=model.encode))
        assert {"quantizer", "codebook", "commitment"} <= set(aux.losses)
    else:
        assert set(aux.losses) == {"kl"}
    if name.startswith("gigatok"):
        assert {"cnn_map", "semantic_features", "shortcut_pixels"} <= set(aux.features)
        assert "fea_rec" in aux.losses
    # The aux is a pytree: it crosses jit.
    leaves = jax.tree.leaves(jax.jit(lambda p: model.apply({"params": p}, x)[1])(params))
    assert leaves and all(isinstance(v, jax.Array) for v in leaves)


@pytest.mark.parametrize("disc, pixel_range", [
    (discriminator.TiTokDiscriminator(hidden_channels=8, num_groups=4), (0.0, 1.0)),
    (discriminator.PatchGANDiscriminator(base_channels=8, num_layers=2), (-1.0, 1.0)),
    (dino_disc.DinoDiscriminator(embed_dim=32, depth=2, num_heads=2, img_size=32,
                                 key_depths=(1,)), (-1.0, 1.0)),
])
def test_every_discriminator_implements_the_interface(disc, pixel_range):
    """The GAN objective reads `pixel_range` and always calls `train=True`."""
    assert isinstance(disc, Discriminator) and disc.pixel_range == pixel_range
    x = jnp.zeros((2, 32, 32, 3))
    variables = disc.init({"params": jax.random.key(0), "crop": jax.random.key(1)}, x)
    logits, _ = disc.apply(variables, x, train=True, rngs={"crop": jax.random.key(2)},
                           mutable=[k for k in variables if k != "params"])
    assert logits.dtype == jnp.float32 and logits.shape[0] == 2


def test_a_generator_and_a_tokenizer_that_do_not_match_are_refused(caplog):
    """What a generator samples must be decodable by the tokenizer it is paired with (sample,
    evaluate, the trainer's sample grids): an 8-token generator decoded by a 16-token
    tokenizer exited 0 with garbage images; codes beyond the tokenizer's codebook decoded to
    NaN (black) images after a warning."""
    titok = models.create("titok", **TITOK)  # 8 tokens of 64 codes
    nested = models.create("titok", **dict(TITOK, nested_dropout="uniform"))
    vqgan = models.create("maskgit_vqgan", **VQGAN)  # a 2D grid: no prefixes
    vae = models.create("titok", **dict(TITOK, quantizer="vae"))

    def gen(num_tokens, vocab_size):
        return types.SimpleNamespace(num_tokens=num_tokens, vocab_size=vocab_size)

    with caplog.at_level(logging.WARNING):
        decode.check_pair(gen(8, 64), titok)
        decode.check_pair(gen(4 * vqgan.num_tokens, 64), vqgan)  # a 2x larger image's grid
        assert not caplog.records
    with caplog.at_level(logging.WARNING):
        decode.check_pair(gen(4, 64), nested)  # a prefix of a nested tokenizer: fine
        assert not caplog.records
        decode.check_pair(gen(4, 64), titok)  # a prefix of one trained without: a warning
    assert "not trained with nested dropout" in caplog.text
    for generator, tokenizer, needle in [
            (gen(16, 64), titok, "samples 16 tokens per image but the tokenizer decodes 8"),
            (gen(8, 32), titok, "the tokenizer has 64 codes but the generator predicts 32"),
            (gen(8, 128), titok, "the generator predicts 128 codes but the tokenizer has 64"),
            (gen(8, 64), vae, "continuous"),
            (gen(vqgan.num_tokens // 2, 64), vqgan, "not a square grid")]:
        with pytest.raises(errors.UserError, match=needle):
            decode.check_pair(generator, tokenizer)
