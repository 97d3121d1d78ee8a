"""TiTok model, transformer layers and the vector quantizer."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

from tok1d import models
from tok1d.train import config_lib
from tok1d.train import state as state_lib
from tok1d.train import tokenizer
from tok1d.layers import cnn, transformer
from tok1d.models.quantizers import VectorQuantizer
from tok1d.models.tokenizers.titok import depth_to_space

TINY = dict(image_size=32, patch_size=8, encoder_size="nano", decoder_size="nano",
            codebook_size=64, token_dim=8)


def images(b=2, size=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(b, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("num_tokens", [4, 16])
def test_titok_shapes_for_any_number_of_tokens(num_tokens):
    model = models.create("titok", num_latent_tokens=num_tokens, **TINY)
    x = images()
    variables = model.init(jax.random.key(0), x)
    recon, aux = model.apply(variables, x)
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    assert aux.codes.shape == (2, num_tokens) and aux.codes.dtype == jnp.int32
    params = nn.unbox(variables)["params"]
    assert params["latent_tokens"].shape == (num_tokens, 32)
    assert params["quantize"]["embedding"].shape == (64, 8)


def test_decode_codes_matches_the_training_forward():
    model = models.create("titok", num_latent_tokens=8, **TINY)
    x = images()
    variables = model.init(jax.random.key(1), x)
    recon, aux = model.apply(variables, x)
    again = model.apply(variables, aux.codes, method="decode_codes")
    np.testing.assert_allclose(again, recon, rtol=1e-5, atol=1e-5)


def test_presets_sizes_and_official_parameter_count():
    # TiTok-L-32 encoder+decoder transformer widths follow the official table.
    model = models.create("titok", image_size=256, patch_size=16, num_latent_tokens=32,
                          encoder_size="large", decoder_size="large", decoder_head="logits",
                          legacy_reshape=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))
    # Official TiTok-L-32 stage-1 state_dict: 610.31M without the pixel decoder / pixel codebook.
    assert abs(count / 1e6 - 610.31) < 0.01, count


def test_remat_and_scan_do_not_change_the_function():
    x = images()
    base = models.create("titok", num_latent_tokens=8, scan=True, remat="none", **TINY)
    variables = base.init(jax.random.key(2), x)

    def loss(model, p):
        recon, aux = model.apply(p, x)
        return jnp.mean((recon - x) ** 2) + aux.losses["quantizer"]

    g1 = jax.grad(lambda p: loss(base, p))(variables)
    for policy in ("full", "dots"):  # the recipes use "dots"
        remat = models.create("titok", num_latent_tokens=8, scan=True, remat=policy, **TINY)
        g2 = jax.grad(lambda p, remat=remat: loss(remat, p))(variables)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    unscanned = models.create("titok", num_latent_tokens=8, scan=False, **TINY)
    v2 = unscanned.init(jax.random.key(2), x)
    assert "blocks_0" in str(jax.tree_util.tree_structure(nn.unbox(v2)))
    assert unscanned.apply(v2, x)[0].shape == x.shape


@pytest.mark.parametrize("kind", ["vqgan", "gigatok"])
def test_cnn_remat_keeps_the_function_and_cuts_the_saved_activations(kind):
    """`remat="full"` on the CNN decoders (TiTok's pixel decoder, GigaTok's CNN halves: the
    models' `cnn_remat`) keeps the parameter tree and gradients; what autodiff saves for the
    backward pass (the VJP's residuals, backend-independent) shrinks to block inputs."""
    from tok1d.models.tokenizers.gigatok_cnn import GigaTokCNNDecoder
    from tok1d.models.tokenizers.vqgan import VQGANDecoder
    if kind == "vqgan":
        cls, kw = VQGANDecoder, dict(hidden_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                                     z_channels=8)
    else:
        cls, kw = GigaTokCNNDecoder, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)
    z = jax.random.normal(jax.random.key(0), (2, 32, 32, 8))
    grads, saved = {}, {}
    params = cls(**kw).init(jax.random.key(1), z)["params"]
    for remat in ("none", "full"):
        model = cls(remat=remat, **kw)
        assert jax.tree.structure(model.init(jax.random.key(1), z)["params"]) == \
            jax.tree.structure(params)

        def loss(p, model=model):
            return jnp.mean(model.apply({"params": p}, z) ** 2)
        grads[remat] = jax.jit(jax.grad(loss))(params)
        residuals = jax.eval_shape(lambda p, loss=loss: jax.vjp(loss, p)[1], params)
        saved[remat] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert saved["full"] < 0.4 * saved["none"]


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = models.create("titok", num_latent_tokens=8, dtype="bfloat16", **TINY)
    x = images()
    variables = model.init(jax.random.key(3), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    recon, aux = model.apply(variables, x)
    assert recon.dtype == jnp.float32 and np.isfinite(np.asarray(recon)).all()


def test_wrong_image_size_is_a_clear_error():
    model = models.create("titok", num_latent_tokens=8, **TINY)
    variables = model.init(jax.random.key(0), images())
    with pytest.raises(ValueError,
                       match=r"expects float images of shape \(B, 32, 32, 3\) in \[0, 1\]; got sh"):
        model.apply(variables, images(size=64))


def test_unknown_model_and_size_names():
    with pytest.raises(ValueError, match="Unknown model 'titik'"):
        models.create("titik")
    with pytest.raises(ValueError, match="Unknown ViT size 'huge'"):
        models.create("titok", encoder_size="huge")


def test_vector_quantizer_matches_numpy_reference():
    vq = VectorQuantizer(codebook_size=16, code_dim=4, l2_norm=True, commitment_cost=0.25)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)
    variables = vq.init(jax.random.key(0), z)
    (z_q, aux) = vq.apply(variables, z)
    e = np.asarray(nn.unbox(variables)["params"]["embedding"], np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    zn = np.asarray(z, np.float64)
    zn /= np.linalg.norm(zn, axis=-1, keepdims=True)
    expected = np.argmin(((zn[..., None, :] - e) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(aux["codes"], expected)
    np.testing.assert_allclose(z_q, e[expected], rtol=1e-5, atol=1e-6)
    mse = np.mean((e[expected] - zn) ** 2)
    np.testing.assert_allclose(aux["commitment_loss"], 0.25 * mse, rtol=1e-4)
    np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-4)
    np.testing.assert_allclose(aux["quantizer_loss"], 1.25 * mse, rtol=1e-4)


def test_straight_through_gradient_is_identity_to_the_inputs():
    vq = VectorQuantizer(codebook_size=8, code_dim=3, l2_norm=False)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    variables = vq.init(jax.random.key(0), z)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
    grad = jax.grad(lambda z_: jnp.sum(vq.apply(variables, z_)[0] * w))(z)
    np.testing.assert_allclose(grad, w, rtol=1e-6)


def test_legacy_reshape_reinterprets_memory_like_the_official_code():
    enc_kwargs = dict(image_size=16, patch_size=8, width=8, depth=1, num_heads=2, mlp_dim=16,
                      num_latent_tokens=4, out_dim=3)
    from tok1d.models.tokenizers.titok import TiTokEncoder
    x = images(b=1, size=16)
    latents = jnp.ones((4, 8))
    legacy = TiTokEncoder(legacy_reshape=True, **enc_kwargs)
    clean = TiTokEncoder(legacy_reshape=False, **enc_kwargs)
    variables = legacy.init(jax.random.key(0), x, latents)
    out_legacy = legacy.apply(variables, x, latents)
    out_clean = clean.apply(variables, x, latents)
    assert not np.allclose(out_legacy, out_clean)
    # Reference: the (B, N, W) ln_post output reshaped in C order to (B, W, N), 1x1 conv.
    params = nn.unbox(variables)["params"]
    captured = legacy.apply(variables, x, latents, capture_intermediates=True,
                            mutable=["intermediates"])[1]["intermediates"]
    feats = np.asarray(captured["trunk"]["__call__"][0])  # (1, 4, 8)
    k, b = np.asarray(params["conv_out"]["kernel"]), np.asarray(params["conv_out"]["bias"])
    ref = np.einsum("bwn,wc->bnc", feats.reshape(1, 8, 4), k) + b
    np.testing.assert_allclose(out_legacy, ref, rtol=1e-5, atol=1e-6)


def test_depth_to_space_channel_order():
    p, c = 2, 3
    x = np.arange(1 * 2 * 2 * p * p * c, dtype=np.float32).reshape(1, 2, 2, p * p * c)
    y = np.asarray(depth_to_space(jnp.asarray(x), p, c))
    for h in range(2):
        for w in range(2):
            for p1 in range(p):
                for p2 in range(p):
                    for ch in range(c):
                        assert y[0, h * p + p1, w * p + p2, ch] == x[0, h, w, (p1 * p + p2) * c + ch]


@pytest.mark.parametrize("size,k,stride,pad", [(9, 7, 1, (3, 3)), (8, 4, 2, (1, 1)),
                                               (7, 4, 2, (1, 2)), (6, 3, 1, (0, 2))])
def test_depthwise_conv_forms_agree_with_a_direct_sum(size, k, stride, pad):
    """Both forms of `depthwise_conv` (the fused shifted sum XLA:CPU runs fast, the grouped
    convolution of GPU / TPU) equal the definition, and so do their gradients."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, size, size + 1, 5)).astype(np.float32)
    w = rng.normal(size=(k, k, 1, 5)).astype(np.float32)
    pads = (pad, pad)
    xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    oh, ow = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    ref = np.zeros((2, oh, ow, 5))
    for i in range(oh):
        for j in range(ow):
            ref[:, i, j] = np.einsum("bhwc,hwc->bc", xp[:, stride * i:stride * i + k,
                                                        stride * j:stride * j + k], w[:, :, 0])
    grads = {}
    for impl in ("conv", "shifts"):
        f = lambda x, w: cnn.depthwise_conv(x, w, (stride, stride), pads, impl)  # noqa: E731
        np.testing.assert_allclose(f(x, w), ref, rtol=1e-5, atol=1e-5)
        grads[impl] = jax.grad(lambda x, w: (f(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(grads["conv"], grads["shifts"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # the module form keeps nn.Conv(feature_group_count=C)'s parameters and values
    mod = cnn.DepthwiseConv((k, k), padding=pads, strides=(stride, stride))
    ref_mod = nn.Conv(5, (k, k), strides=(stride, stride), padding=pads, feature_group_count=5)
    params = ref_mod.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, mod.init(jax.random.key(0), x)) == \
        jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(mod.apply(params, x), ref_mod.apply(params, x), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="impl="):
        cnn.depthwise_conv(x, w, impl="fast")


def test_attention_matches_a_plain_softmax_reference():
    attn = transformer.Attention(num_heads=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    variables = attn.init(jax.random.key(0), x)
    p = nn.unbox(variables)["params"]
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"]) + p["value"]["bias"]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v)
    ref = np.einsum("bqhd,hde->bqe", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(attn.apply(variables, x), ref, rtol=1e-5, atol=1e-5)



def test_padded_attention_is_the_unpadded_attention_with_its_gradients():
    """What `attend` runs for cuDNN (whose fused attention cannot train on odd lengths such as
    TiTok's 289): queries and keys / values zero-padded to a multiple, the padding masked by
    sequence lengths and cut off; checked here with XLA's attention, self and cross. A decoding
    step's cache mask given as filled lengths is the boolean mask."""
    rng = np.random.default_rng(0)
    for t, s in [(17, 17), (17, 13), (16, 16)]:
        q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for n in (t, s, s))

        def loss(fn):
            return lambda *x: jnp.sum(jnp.sin(fn(*x)))
        with jax.default_matmul_precision("highest"):
            want = jax.nn.dot_product_attention(q, k, v)
            got = transformer.padded_attention(q, k, v, 8)
            grads = [jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (
                jax.nn.dot_product_attention, lambda *x: transformer.padded_attention(*x, 8))]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        for g_want, g_got in zip(*grads):
            np.testing.assert_allclose(g_got, g_want, rtol=0, atol=1e-5)
    mask = jnp.tril(jnp.ones((16, 16), bool))[None, None]  # a mask: XLA's attention as given
    np.testing.assert_array_equal(transformer.attend(q, q, q, mask),
                                  jax.nn.dot_product_attention(q, q, q, mask=mask))
    # a decoding step: one query over a cache of which the first kv_lengths[b] are filled
    filled = jnp.asarray([5, 11])
    by_mask = jnp.arange(16)[None, None, None, :] < filled[:, None, None, None]
    np.testing.assert_allclose(transformer.attend(q[:, :1], k[:, :16], v[:, :16],
                                                  kv_lengths=filled),
                               jax.nn.dot_product_attention(q[:, :1], k[:, :16], v[:, :16],
                                                            mask=by_mask), rtol=0, atol=1e-6)

def test_entropy_loss_matches_numpy_reference():
    from tok1d.models.quantizers import entropy_loss
    a = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    t = 0.5
    logits = a.astype(np.float64) / t
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sample = -np.mean(np.sum(p * np.log(p), axis=1))
    avg = p.mean(0)
    expected = sample + np.sum(avg * np.log(avg + 1e-5))
    np.testing.assert_allclose(entropy_loss(jnp.asarray(a), t), expected, rtol=1e-5)
    # Confident tokens spread over distinct codes -> close to -log(K); all on one code -> ~0.
    spread = jnp.asarray(np.eye(5, dtype=np.float32) * 50)
    assert float(entropy_loss(spread, 1.0)) < -np.log(5) + 1e-3
    same = jnp.asarray(np.tile(np.eye(5, dtype=np.float32)[:1] * 50, (5, 1)))
    assert abs(float(entropy_loss(same, 1.0))) < 1e-3


def test_loss_weights_switch_terms_on_and_off():
    from tok1d.objectives import losses
    recon, target = jnp.zeros((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3))
    aux = dict(quantizer=jnp.float32(2.0), entropy=jnp.float32(-1.0))
    total, terms = losses.combine(dict(l2=1.0, quantizer=0.5, entropy=0.0), recon, target, aux)
    assert set(terms) == {"l2", "quantizer"} and float(total) == 2.0
    total, terms = losses.combine(dict(l2=1.0, quantizer=0.5, entropy=0.1), recon, target, aux)
    assert set(terms) == {"l2", "quantizer", "entropy"}
    np.testing.assert_allclose(float(total), 1.9, rtol=1e-6)
    with pytest.raises(ValueError, match="Loss term 'lpips'"):
        losses.combine(dict(lpips=1.0), recon, target, aux)


def test_gradient_accumulation_matches_the_full_batch_step():
    import importlib.util
    import os
    from conftest import REPO
    from tok1d.train import optim
    from tok1d.train import state as state_lib
    from tok1d.train import tokenizer
    spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs/tiny_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.optim.warmup_steps = 0
    model = tokenizer.build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    x = images(b=8)
    params = nn.unbox(model.init(jax.random.key(0), x))["params"]
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params), ema_params=None)
    outs = []
    for accum in (1, 2):
        config.optim.grad_accum_steps = accum
        step = jax.jit(tokenizer.make_train_step(model, tx, schedule, config))
        outs.append(step(state, {"image": x}, {}))
    (s1, m1, _), (s2, m2, _) = outs
    np.testing.assert_allclose(m1["loss_l2"], m2["loss_l2"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-3)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _tiny_config():
    """configs/tiny_test.py's config."""
    return config_lib.load(os.path.join(REPO, "configs/tiny_test.py"))


def test_lecam_emas_advance_microbatch_after_microbatch_as_upstream():
    """With grad_accum_steps=2 each microbatch's D loss sees the LeCam EMAs the previous one
    advanced (upstream updates them in every forward under `accelerator.accumulate`): the step
    equals two one-microbatch steps whose optimizers change nothing (G: a zero update; D: lr
    0), and its D loss is their mean. (It used to advance them once, by the mean logits.)"""
    config = _tiny_config()
    config.ema_decay = 0.0
    config.losses.gan = 0.1
    config.discriminator.update(name="titok", lecam=0.001, start_step=0)
    config.discriminator.model = dict(hidden_channels=8, num_groups=4)
    config.disc_optim.lr = 0.0
    model = tokenizer.build_model(config)
    x = images(b=4)
    gan = tokenizer.build_gan(config, model, x[:2])
    params = nn.unbox(model.init(jax.random.key(0), x))["params"]
    tx, schedule = optax.set_to_zero(), lambda step: 0.0
    gan_state = gan.init(jax.random.key(1))
    gan_state = gan_state.replace(lecam=jax.tree.map(lambda v: v + 0.3, gan_state.lecam))
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params), ema_params=None,
                                 extras={"gan": gan_state})
    config.optim.grad_accum_steps = 2
    accumulated, scalars, _ = jax.jit(tokenizer.make_train_step(
        model, tx, schedule, config, gan=gan))(state, {"image": x}, {})
    config.optim.grad_accum_steps = 1
    one = jax.jit(tokenizer.make_train_step(model, tx, schedule, config, gan=gan))
    first, s1, _ = one(state, {"image": x[0::2]}, {})
    second, s2, _ = one(first, {"image": x[1::2]}, {})
    for k, v in second.extras["gan"].lecam.items():
        np.testing.assert_allclose(accumulated.extras["gan"].lecam[k], v, rtol=1e-6)
        assert not np.allclose(first.extras["gan"].lecam[k], v, rtol=1e-6)
    np.testing.assert_allclose(scalars["d_loss"], (s1["d_loss"] + s2["d_loss"]) / 2, rtol=1e-5)


def test_gigatok_lecam_form_is_upstreams_ema_losses():
    """discriminator.lecam_form="gigatok" (lecam-gan's code as GigaTok's vq_loss.py runs it):
    each D loss first advances the EMAs by its batch-mean logits (decay 0 until 1000 steps
    after D's 1-based start, then 0.99; twice in an overlap step, the second time by the
    shortcut's fake logits), then adds lecam_weight x the per-logit regulariser from the step
    after D's start. Checked against a NumPy transcription of upstream's arithmetic."""
    config = _tiny_config()
    config.losses.gan = 0.1
    start = 5  # tok1d's 0-based start: upstream's disc_start is 6
    config.discriminator.update(name="titok", lecam=0.002, lecam_form="gigatok",
                                lecam_decay=0.99, start_step=start, d_weight=0.5)
    config.discriminator.model = dict(hidden_channels=8, num_groups=4)
    model = tokenizer.build_model(config)
    real, fake, direct = images(b=2, seed=1), images(b=2, seed=2), images(b=2, seed=3)
    gan = tokenizer.build_gan(config, model, real)
    state = gan.init(jax.random.key(1))
    rng = jax.random.key(2)

    def logits(x):
        return np.asarray(gan.apply(state.params, state.collections, x, rng, None, "d")[0],
                          np.float64)
    lr, lf, ld = logits(real), logits(fake), logits(direct)
    hinge = 0.5 * (np.mean(np.maximum(1 - lr, 0)) + np.mean(np.maximum(1 + lf, 0)))

    def upstream(step, ema, overlap=False):
        """vq_loss.py at global_step = step + 1: ema_losses.update, then lecam_reg."""
        g, disc_start = step + 1, start + 1
        decay = 0.0 if g < disc_start + 1000 else 0.99
        ema = dict(ema)
        for f in ([lf, ld] if overlap else [lf]):
            ema["fake"] = ema["fake"] * decay + f.mean() * (1 - decay)
            ema["real"] = ema["real"] * decay + lr.mean() * (1 - decay)
        reg = (np.mean(np.maximum(lr - ema["fake"], 0) ** 2)
               + np.mean(np.maximum(ema["real"] - lf, 0) ** 2)) if g > disc_start else 0.0
        return ema, reg

    prev = {"real": 0.7, "fake": -0.4}
    for step, overlap in [(start, False), (start + 1, False), (start + 999, False),
                          (start + 1000, False), (start + 1500, True)]:
        lecam = {"ema_real_logits_mean": jnp.float32(prev["real"]),
                 "ema_fake_logits_mean": jnp.float32(prev["fake"])}
        loss, (means, _) = gan.d_loss(state.params, state.collections, lecam, real, fake, rng,
                                      direct if overlap else None, float(overlap), None,
                                      jnp.int32(step))
        want_ema, want_reg = upstream(step, prev, overlap)
        np.testing.assert_allclose(means["lecam"], want_reg, rtol=2e-5, atol=1e-7)
        if not overlap:
            np.testing.assert_allclose(loss, 0.5 * hinge + 0.002 * want_reg, rtol=2e-5)
        ema = gan.advance_lecam(lecam, means, jnp.int32(step), float(overlap))
        np.testing.assert_allclose(ema["ema_real_logits_mean"], want_ema["real"], rtol=2e-6)
        np.testing.assert_allclose(ema["ema_fake_logits_mean"], want_ema["fake"], rtol=2e-6)
    assert upstream(start, prev)[1] == 0.0 and upstream(start + 1, prev)[1] > 0
    with pytest.raises(ValueError, match="lecam_form='lecam'"):
        config.discriminator.lecam_form = "lecam"
        tokenizer.build_gan(config, model, real)


def test_frozen_groups_get_no_gradient_and_leave_the_logged_norm():
    """`optim.freeze`: the frozen groups are autodiff constants (no backward pass for them), so
    the logged grad_norm is the trained groups' (torch's `clip_grad_norm_` over the params with
    gradients): the norms of two complementary freezes add up to the unfrozen step's."""
    import importlib.util
    import os
    from conftest import REPO
    from tok1d.train import optim
    from tok1d.train import state as state_lib
    from tok1d.train import tokenizer
    spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs/tiny_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    model = tokenizer.build_model(config)
    x = images(b=4)
    params = nn.unbox(model.init(jax.random.key(0), x))["params"]
    groups = sorted(params)
    assert len(groups) >= 2, groups
    norms = {}
    for frozen in ("", groups[0], ",".join(groups[1:])):
        config.optim.freeze = frozen
        tx, schedule = optim.make_optimizer(config.optim, config.total_steps, params)
        state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                     opt_state=tx.init(params), ema_params=None)
        new, scalars, _ = jax.jit(tokenizer.make_train_step(model, tx, schedule, config))(
            state, {"image": x}, {})
        norms[frozen] = float(scalars["grad_norm"])
        for group in optim.frozen_groups(config.optim):
            for a, b in zip(jax.tree.leaves(new.params[group]), jax.tree.leaves(params[group])):
                np.testing.assert_array_equal(a, b)
    parts = [norms[groups[0]], norms[",".join(groups[1:])]]
    assert min(parts) > 0
    np.testing.assert_allclose(parts[0] ** 2 + parts[1] ** 2, norms[""] ** 2, rtol=1e-4)
