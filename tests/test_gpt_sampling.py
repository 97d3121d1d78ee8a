"""LlamaGen GPT with tiny random weights: KV-cache decoding vs full recomputation, the jitted
sampler vs a slow uncached reference loop, CFG schedules, top-k / top-p filtering, a few
training steps, and the size table's parameter counts."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import step_by_step_logits
from flax import linen as nn

from tok1d import models, parallel
from tok1d.generation import autoregressive as ar
from tok1d.generation import decode
from tok1d.models.generators import gpt as gpt_lib
from tok1d.layers import transformer
from tok1d.layers.transformer import init_cache
from tok1d.models.generators.gpt import GPT

VOCAB, TOKENS = 37, 9


def _model(**kw):
    kw = {"vocab_size": VOCAB, "num_tokens": TOKENS, "num_classes": 10, "width": 32,
          "depth": 2, "num_heads": 4, **kw}
    return GPT(**kw)


def _params(model, seed=0):
    """Random init with the zero-initialised head (and every other tensor) perturbed, so the
    logits depend on everything."""
    codes = jnp.zeros((1, model.num_tokens), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), codes,
                                          jnp.zeros((1,), jnp.int32)))
    leaves, tree = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("kw", [{}, {"rope": True, "scan": False, "remat": "full"}])
def test_cached_decoding_matches_full_recomputation(kw):
    model = _model(**kw)
    params = _params(model)
    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(0, VOCAB, (3, TOKENS)), jnp.int32)
    labels = jnp.asarray([1, 7, model.null_label], jnp.int32)
    prefill = jax.jit(lambda v, *a: model.apply(v, *a, method=GPT.prefill, mutable=["cache"]))
    with jax.default_matmul_precision("highest"):
        full = jax.jit(model.apply)({"params": params}, codes, labels)
        got, _ = step_by_step_logits(model, params, codes, labels)
        cache = jax.jit(init_cache, static_argnums=(0, 2))(model, params, 3)
        # A prefix prefill (class token + 4 codes) continues the same way.
        prefix, state = prefill({"params": params, "cache": cache}, labels, codes[:, :4])
    assert got.shape == full.shape == (3, TOKENS, VOCAB)
    np.testing.assert_allclose(got, full, rtol=0, atol=2e-5 * float(np.abs(full).max()))
    np.testing.assert_allclose(prefix, full[:, 4], rtol=0, atol=2e-5 * float(np.abs(full).max()))
    assert int(state["cache"]["position"]) == 5


def _reference_sample(model, params, labels, rng, cfg_scale, schedule, cfg_kwargs, **pick):
    """Slow upstream-style loop without a cache: the full teacher-forced forward on the codes
    so far (zero-padded) at every position."""
    b, n = labels.shape[0], model.num_tokens
    cfg = cfg_scale > 1.0
    lab = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)]) if cfg else labels
    keys = jax.random.split(rng, n)
    codes = np.zeros((b, n), np.int32)
    forward = jax.jit(model.apply)
    for t in range(n):
        inputs = np.concatenate([codes, codes]) if cfg else codes
        logits = forward({"params": params}, jnp.asarray(inputs), lab)[:, t]
        if cfg:
            scale = cfg_scale if t == 0 else ar.cfg_scale_at(schedule, cfg_scale, t - 1, n - 1,
                                                             **cfg_kwargs)
            c, u = logits[:b], logits[b:]
            logits = u + (c - u) * np.float32(scale) if scale > 1.0 else c
        codes[:, t] = np.asarray(ar.next_code(logits, keys[t], **pick))
    return codes


@pytest.mark.parametrize("settings", [
    dict(cfg_scale=1.0, temperature=1.0),
    dict(cfg_scale=2.5, temperature=0.8, top_k=10, cache_chunk=3),   # 3 loops: cache 3, 6, 9
    dict(cfg_scale=3.0, cfg_schedule="linear", top_p=0.7, cache_chunk=1),  # one per step
    dict(cfg_scale=2.0, cfg_schedule="step", cfg_kwargs={"window_start": 0.5}, top_k=20,
         top_p=0.9, temperature=1.3, cache_chunk=0),                  # one loop, whole cache
])
def test_jitted_sampler_matches_uncached_reference(settings):
    model = _model()
    params = _params(model, seed=3)
    labels = jnp.asarray([0, 4, 9], jnp.int32)
    s = dict(settings)
    cfg_scale = s.pop("cfg_scale")
    schedule = s.pop("cfg_schedule", "constant")
    cfg_kwargs = s.pop("cfg_kwargs", {})
    chunk = s.pop("cache_chunk", ar.CACHE_CHUNK)
    with jax.default_matmul_precision("highest"):
        for seed in (0, 1):
            rng = jax.random.key(seed)
            got = ar.sample(model, params, labels, rng, cfg_scale=cfg_scale,
                            cfg_schedule=schedule, cfg_kwargs=cfg_kwargs, cache_chunk=chunk,
                            **s)
            want = _reference_sample(model, params, labels, rng, cfg_scale, schedule,
                                     cfg_kwargs, **s)
            assert got.dtype == jnp.int32 and got.shape == (3, TOKENS)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_cache_chunks_cover_every_step_with_the_positions_it_writes():
    for prefix, steps, chunk in [(1, 255, 32), (2, 256, 32), (1, 8, 3), (2, 8, 1), (1, 8, 0),
                                 (1, 8, 100)]:
        chunks = ar.cache_chunks(prefix, steps, chunk)
        assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]]   # contiguous
        assert chunks[-1][1] == steps and chunks[-1][2] == prefix + steps   # all, whole cache
        for start, stop, length in chunks:
            assert start < stop and prefix + stop <= length   # each step's position fits
            assert length == prefix + steps or length % chunk == 0
    lengths = [c[2] for c in ar.cache_chunks(1, 255, 32)]
    assert lengths == [32, 64, 96, 128, 160, 192, 224, 256]   # GPT-B: 8 loops
    lengths = [c[2] for c in ar.cache_chunks(2, 255, 32)]
    assert lengths == [32, 64, 96, 128, 160, 192, 224, 257]   # RAR-B: no 1-step 9th loop
    read = sum((stop - start) * length for start, stop, length in ar.cache_chunks(1, 255, 32))
    assert 0.56 < read / (255 * 256) < 0.57
    assert ar.cache_chunks(1, 8, 0) == [(0, 8, 9)] and ar.cache_chunks(2, 0, 4) == []


def test_resize_cache_cuts_and_pads_the_position_axis():
    key = jnp.arange(2 * 3 * 5 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 5, 2, 4)  # scanned
    cache = {"blocks": {"attn": {"cached_key": key, "cached_value": key + 1,
                                 "cache_index": jnp.int32(3)}}, "position": jnp.int32(3)}
    short = transformer.resize_cache(cache, 3)
    assert transformer.cache_length(short) == 3 and short["position"] == 3
    np.testing.assert_array_equal(short["blocks"]["attn"]["cached_value"], key[:, :, :3] + 1)
    longer = transformer.resize_cache(short, 6)["blocks"]["attn"]["cached_key"]
    assert longer.shape == (2, 3, 6, 2, 4)
    np.testing.assert_array_equal(longer[:, :, :3], key[:, :, :3])
    assert not np.any(longer[:, :, 3:])
    with pytest.raises(ValueError, match="no `cached_key`"):
        transformer.cache_length({"position": jnp.int32(0)})


@pytest.mark.parametrize("scan", [True, False])
def test_compute_params_leaves_bf16_outputs_bitwise_unchanged(scan):
    """The sampler casts the weights to the compute dtype once, before its token loop: kernels
    and tables become bfloat16, the RMSNorm scales (perturbed away from 1 here) stay float32, and
    the logits are bitwise those of the float32 params."""
    model = _model(dtype=jnp.bfloat16, scan=scan)
    params = _params(model)
    cast = gpt_lib.compute_params(model, params)
    dtypes = {"/".join(str(getattr(k, "key", k)) for k in path): x.dtype
              for path, x in jax.tree_util.tree_leaves_with_path(cast)}
    assert dtypes["norm/scale"] == jnp.float32 and dtypes["output/kernel"] == jnp.bfloat16
    assert dtypes["tok_embeddings/embedding"] == dtypes["positional_embedding"] == jnp.bfloat16
    assert {d for n, d in dtypes.items() if "ln_" in n} == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(0, VOCAB, (3, TOKENS)), jnp.int32)
    labels = jnp.asarray([1, 7, model.null_label], jnp.int32)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": cast}, codes, labels),
                                  apply({"params": params}, codes, labels))
    sampler = ar.make_sampler(model, cfg_scale=2.0)
    np.testing.assert_array_equal(sampler(params, labels[:2], jax.random.key(3)),
                                  sampler(cast, labels[:2], jax.random.key(3)))


def test_cfg_changes_samples_and_top_k_1_is_greedy():
    model = _model()
    params = _params(model, seed=5)
    labels = jnp.arange(6, dtype=jnp.int32)
    rng = jax.random.key(0)
    plain = ar.sample(model, params, labels, rng, greedy=True)
    guided = ar.sample(model, params, labels, rng, cfg_scale=4.0, greedy=True)
    assert np.any(np.asarray(plain) != np.asarray(guided))
    for cfg_scale in (1.0, 4.0):
        greedy = ar.sample(model, params, labels, rng, cfg_scale=cfg_scale, greedy=True)
        top1 = ar.sample(model, params, labels, jax.random.key(7), cfg_scale=cfg_scale, top_k=1)
        np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 50)).astype(np.float32) * 2
    for p in (0.05, 0.3, 0.75, 0.95):
        got = np.asarray(ar.top_p_filter(jnp.asarray(logits), p))
        for row, out in zip(logits, got):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            count = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
            keep = np.zeros(row.shape, bool)
            keep[order[:count]] = True
            np.testing.assert_array_equal(np.isfinite(out), keep)
            np.testing.assert_array_equal(out[keep], row[keep])
    kept = np.isfinite(np.asarray(ar.top_k_filter(jnp.asarray(logits), 5)))
    assert np.all(kept.sum(-1) == 5)
    np.testing.assert_array_equal(np.asarray(ar.top_k_filter(jnp.asarray(logits), 0)), logits)


def test_cfg_schedules():
    at = ar.cfg_scale_at
    assert at("constant", 3.0, 0, 10) == 3.0
    assert at("linear", 3.0, 4, 10) == pytest.approx(1 + 2 * 0.5 + 1e-4)
    assert at("linear_re", 3.0, 4, 10) == pytest.approx(1 + 2 * 0.5 + 1e-4)
    assert at("triangular", 3.0, 1, 10) == pytest.approx(1 + 2 * 0.4 + 1e-4)
    assert at("triangular", 3.0, 7, 10) == pytest.approx(1 + 2 * 0.4 + 1e-4)
    assert at("rectangular", 3.0, 0, 100) == 1.0 + 1e-4
    assert at("rectangular", 3.0, 4, 100) == 3.0
    assert at("step", 1.75, 16, 100, window_start=0.18) == 1.0 + 1e-4
    assert at("step", 1.75, 17, 100, window_start=0.18) == 1.75
    assert at("cosine", 3.0, 9, 10) == pytest.approx(1.0)
    assert at("cosine", 3.0, 4, 10) == pytest.approx(1 + 2 * 0.5 * (1 + math.cos(math.pi / 2)))
    with pytest.raises(ValueError, match="window_start"):
        at("step", 2.0, 0, 10)
    with pytest.raises(ValueError, match="sigmoid"):
        at("sigmoid", 2.0, 0, 10)
    scales, guide = ar.guidance_plan(5, 2.0, "cosine", cfg_interval=1)
    assert scales.shape == guide.shape == (4,)
    assert guide.tolist() == [True, True, False, False]  # off after cfg_interval, and at s = 1


def test_training_steps_reduce_cross_entropy():
    model = _model(num_tokens=16, vocab_size=64)
    codes = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), codes, labels))["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss_fn(p, rng, train):
        logits = model.apply({"params": p}, codes, labels, train=train, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()

    train_loss = jax.jit(lambda p, rng: loss_fn(p, rng, True))
    eval_loss = jax.jit(lambda p: loss_fn(p, jax.random.key(0), False))

    @jax.jit
    def steps(p, s):
        def one(carry, rng):
            p, s = carry
            grads = jax.grad(loss_fn)(p, rng, True)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None
        return jax.lax.scan(one, (p, s), jax.random.split(jax.random.key(0), 30))[0]

    before = float(eval_loss(params))
    assert before == pytest.approx(math.log(64), rel=1e-5)  # zero-initialised head
    params, state = steps(params, state)
    after = float(eval_loss(params))
    assert after < before - 0.5
    # Dropout is active only with train=True.
    assert float(train_loss(params, jax.random.key(1))) != after


# research/gigatok.md section 4.1 (vocab 16384, 256 tokens), in millions.
SIZE_PARAMS = {"B": 111.1, "L": 343.2, "XL": 775.0, "XXL": 1411.4, "XXXL": 3893.7}


@pytest.mark.parametrize("size", sorted(SIZE_PARAMS))
def test_size_table_parameter_counts(size):
    model = gpt_lib.build(size, vocab_size=16384, num_tokens=256)
    assert model.hidden_dim == {"B": 2048, "L": 2816, "XL": 3584, "XXL": 4096,
                                "XXXL": 6912}[size]
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256), jnp.int32),
                            jnp.zeros((1,), jnp.int32))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
    assert round(count / 1e6, 1) == SIZE_PARAMS[size]


def test_build_validates_arguments():
    with pytest.raises(ValueError, match="widht"):
        gpt_lib.build("B", vocab_size=8, num_tokens=4, widht=3)
    with pytest.raises(ValueError, match="num_tokens"):
        gpt_lib.build("B", vocab_size=8)
    with pytest.raises(ValueError, match="Unknown GPT size"):
        gpt_lib.build("M", vocab_size=8, num_tokens=4)
    assert gpt_lib.build("GPT-L", vocab_size=8, num_tokens=4).width == 1024
    assert gpt_lib.build(vocab_size=8, num_tokens=4).null_label == 1000


def test_sampling_precision_float32_samples_and_decodes_as_float32_builds(caplog):
    """sampling_precision="float32" (the official gFID protocols: the generator and the
    tokenizer in fp32, TF32 matmuls) runs a bf16 run's GPT and tokenizer as their float32
    builds, to the bit, their matmuls at HIGH precision (TF32 on GPUs, 3-pass bf16 on TPUs);
    "" keeps the run's bf16; cuDNN attention gives way to XLA's; a bad value is refused."""
    tok_kw = dict(image_size=16, patch_size=8, encoder_size="nano", decoder_size="nano",
                  num_latent_tokens=TOKENS, codebook_size=VOCAB, token_dim=8)
    mesh = parallel.create_mesh({"data": -1})
    rules = parallel.DEFAULT_RULES
    sharding = parallel.batch_sharding(mesh, rules)
    labels = np.arange(2 * jax.device_count()) % 10
    params = _params(_model())
    tok = models.create("titok", **tok_kw)
    tok_params = nn.unbox(tok.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]

    def run(precision, dtype):
        gen = _model(dtype=dtype)
        t = models.create("titok", **dict(tok_kw, dtype=dtype))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            d = decode.SampleDecoder(gen, {"cfg_scale": 2.0}, t, tok_params, sharding,
                                     precision)
            codes, pixels = d(params, labels, jax.random.key(3))
            hlo = d.sampler.lower(params, jnp.asarray(labels, jnp.int32),
                                  jax.random.key(3)).as_text()
        return np.asarray(codes), np.asarray(pixels), hlo

    codes32, pixels32, hlo_plain = run("", jnp.float32)
    codes, pixels, hlo = run("float32", jnp.bfloat16)
    np.testing.assert_array_equal(codes, codes32)
    np.testing.assert_array_equal(pixels, pixels32)
    assert "precision = [HIGH, HIGH]" in hlo and "DEFAULT" not in hlo
    assert "precision = [DEFAULT, DEFAULT]" in hlo_plain
    codes16, _, hlo16 = run("", jnp.bfloat16)
    assert "bf16" in hlo16 and "bf16" not in hlo
    assert codes16.shape == codes.shape

    with caplog.at_level(logging.WARNING):
        gen, t = decode.at_precision("float32", _model(attention_impl="cudnn",
                                                       dtype=jnp.bfloat16), tok)
    assert gen.attention_impl == "xla" and gen.dtype == jnp.float32
    assert "attends with XLA's attention" in caplog.text
    (same,) = decode.at_precision("", tok)
    assert same is tok
    with pytest.raises(ValueError, match="sampling_precision='fp32' is not one of"):
        decode.at_precision("fp32", tok)
