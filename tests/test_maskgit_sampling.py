"""MaskGIT sampling, masking and loss on tiny random generators (no fixtures needed).

The jitted sampler (one `fori_loop` program) is checked against a step-by-step Python loop
written from the official `ImageBert.generate` (separate conditional / unconditional passes,
NumPy bookkeeping), with the same per-step noise keys.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tok1d.generation import maskgit as gen
from tok1d.models.generators import maskgit
from tok1d.objectives import tokens as token_obj

K, N, C = 64, 16, 10


def tiny(arch, seed=0, scale=6.0):
    """A tiny generator; matrices scaled so logits are far from uniform and labels matter."""
    model = maskgit.build(arch, size="tiny", codebook_size=K, num_tokens=N, num_classes=C)
    params = model.init(jax.random.key(seed), jnp.zeros((1, N), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, params)
    return model, params


def reference_sample(model, params, labels, rng, num_steps, guidance_scale, schedule,
                     guidance_pow, randomize_temperature, softmax_annealing):
    """The official generate loop, one Python iteration (and model call) per step."""
    apply = jax.jit(model.apply)  # one model call per step; jitted only to keep the test fast

    def forward(ids, lab):
        return np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(lab)))

    def gumbel(key, shape):
        u = np.asarray(jax.random.uniform(key, shape, jnp.float32))
        return -np.log(np.maximum(-np.log(np.maximum(u, 1e-20)), 1e-20))

    labels = np.asarray(labels)
    ids = np.full((labels.shape[0], N), K, np.int32)
    cfg = guidance_scale if schedule == "constant" else 0.0
    for step in range(num_steps):
        ratio = (step + 1) / num_steps
        temp = np.float32(randomize_temperature * (1.0 - ratio))
        is_mask = ids == K
        if schedule == "power-cosine":
            s = (1 - math.cos(((step / num_steps) ** guidance_pow) * math.pi)) / 2
            cfg = (guidance_scale - 1) * s + 1
        if cfg != 0:
            c = forward(ids, labels)
            u = forward(ids, np.full_like(labels, C))
            logits = (u + (c - u) * np.float32(cfg) if schedule == "power-cosine"
                      else c + (c - u) * np.float32(cfg))
        else:
            logits = forward(ids, labels)
        if softmax_annealing:
            logits = logits / np.float32(0.5 + 0.8 * (1 - ratio))
        k_ids, k_conf = jax.random.split(jax.random.fold_in(rng, step))
        sampled = np.argmax(logits + temp * gumbel(k_ids, logits.shape), -1).astype(np.int32)
        sampled_logits = np.take_along_axis(logits, sampled[..., None], -1)[..., 0]
        sampled = np.where(is_mask, sampled, ids)
        sampled_logits = np.where(is_mask, sampled_logits, np.inf).astype(np.float32)
        mask_len = math.floor(N * (np.arccos(ratio) / (math.pi * 0.5)))
        mask_len = max(1, min(int(is_mask[0].sum()) - 1, mask_len))
        confidence = sampled_logits + temp * gumbel(k_conf, sampled_logits.shape)
        cut_off = np.sort(confidence, -1)[:, mask_len - 1:mask_len]
        if step == num_steps - 1:
            ids = sampled
        else:
            ids = np.where(confidence <= cut_off, K, sampled)
        if schedule == "linear":
            cfg = ratio * guidance_scale
    return ids


@pytest.mark.parametrize("arch,schedule,g,temp", [
    ("vit", "linear", 3.0, 2.0),
    ("vit", "constant", 0.0, 1.0),
    ("uvit", "power-cosine", 4.0, 1.5),
])
def test_jitted_sampler_matches_python_loop(arch, schedule, g, temp):
    model, params = tiny(arch)
    labels = jnp.array([0, 3, 7, C], jnp.int32)  # the last one is the null class
    settings = dict(num_steps=6, guidance_scale=g, guidance_schedule=schedule, guidance_pow=3.0,
                    randomize_temperature=temp, softmax_annealing=True)
    for seed in (0, 1):
        rng = jax.random.key(seed)
        got = np.asarray(gen.sample(model, params, labels, rng, **settings))
        want = reference_sample(model, params, labels, rng, settings["num_steps"], g, schedule,
                                3.0, temp, True)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32 and got.min() >= 0 and got.max() < K  # no [MASK] left
    if schedule == "constant":  # make_sampler: the same program with the settings bound
        fn = gen.make_sampler(model, **settings)
        np.testing.assert_array_equal(np.asarray(fn(params, labels, jax.random.key(1))), want)


def test_guidance_changes_samples_and_ids_are_codes():
    model, params = tiny("vit", seed=1)
    labels = jnp.arange(8, dtype=jnp.int32) % C
    rng = jax.random.key(0)
    plain = np.asarray(gen.sample(model, params, labels, rng, num_steps=8))
    guided = np.asarray(gen.sample(model, params, labels, rng, num_steps=8, guidance_scale=4.0))
    assert (plain != guided).any()
    for ids in (plain, guided):
        assert ids.shape == (8, N) and ids.min() >= 0 and ids.max() < K
    with pytest.raises(ValueError, match="guidance schedule"):
        gen.make_sampler(model, guidance_schedule="cosine-ish")
    with pytest.raises(ValueError, match="Unknown sampler argument"):
        gen.make_sampler(model, temperature=1.0)


@pytest.mark.parametrize("schedule", ["arccos", "cosine", "linear", "square", "cubic", "sqrt"])
def test_mask_ratio_schedules(schedule):
    r = np.linspace(0.0, 1.0, 101)
    ratio = token_obj.mask_ratio(schedule, r)
    np.testing.assert_allclose([ratio[0], ratio[-1]], [1.0, 0.0], atol=1e-12)
    assert np.all(np.diff(ratio) < 0)
    np.testing.assert_allclose(
        np.asarray(token_obj.mask_ratio(schedule, jnp.asarray(r, jnp.float32))), ratio, atol=1e-6)


@pytest.mark.parametrize("schedule,mean", [("arccos", 2 / math.pi), ("linear", 0.5)])
def test_random_mask_statistics(schedule, mean):
    b = 4096
    codes = jax.random.randint(jax.random.key(0), (b, N), 0, K)
    rng = jax.random.key(1)
    tokens, masked = jax.jit(token_obj.random_mask, static_argnums=(2, 3))(rng, codes, K,
                                                                           schedule)
    tokens, masked, codes = map(np.asarray, (tokens, masked, codes))
    np.testing.assert_array_equal(tokens, np.where(masked, K, codes))
    counts = masked.sum(1)
    assert counts.min() >= 1 and counts.max() <= N
    # The count of every sample is round(N * clip(schedule(t), 1e-6, 1)) with its own t.
    t = np.asarray(jax.random.uniform(jax.random.split(rng)[0], (b,)), np.float64)
    want = np.maximum(np.round(N * np.clip(token_obj.mask_ratio(schedule, t), 1e-6, 1.0)), 1)
    assert np.mean(counts == want) > 0.99  # float32 vs float64 rounding at .5 boundaries
    assert abs(counts.mean() / N - mean) < 0.02
    # Masked positions are uniform over the sequence.
    per_position = masked.mean(0)
    assert np.abs(per_position - per_position.mean()).max() < 0.05


def test_token_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, N, K)).astype(np.float32) * 3
    targets = rng.integers(0, K, size=(3, N))
    masked = rng.random((3, N)) < 0.5
    targets[0, masked[0]] = np.argmax(logits[0, masked[0]], -1)  # some correct predictions
    loss, metrics = token_obj.masked_token_loss(jnp.asarray(logits), jnp.asarray(targets),
                                                jnp.asarray(masked), label_smoothing=0.1,
                                                unmasked_weight=0.1)
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    smooth = np.full_like(logp, 0.1 / K)
    np.put_along_axis(smooth, targets[..., None], 0.9 + 0.1 / K, -1)
    ce = -(smooth * logp).sum(-1)
    w = np.where(masked, 1.0, 0.1)
    want = (ce * w).sum() / w.sum()
    acc = ((np.argmax(x, -1) == targets) * masked).sum(1) / masked.sum(1)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["masked_accuracy"]), acc.mean(), rtol=1e-5)
    assert acc.mean() > 0.3


def test_tiny_generator_learns():
    model = maskgit.build("vit", width=32, depth=2, num_heads=2, mlp_dim=64, codebook_size=K,
                          num_tokens=N, num_classes=C)
    data_rng = np.random.default_rng(0)
    codes = jnp.asarray(data_rng.integers(0, K, size=(16, N)), jnp.int32)
    labels = jnp.asarray(np.arange(16) % C, jnp.int32)
    params = model.init(jax.random.key(0), codes, labels)["params"]
    tx = optax.adam(5e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        k_mask, k_drop = jax.random.split(rng)
        tokens, masked = token_obj.random_mask(k_mask, codes, model.mask_id)

        def loss_fn(p):
            logits = model.apply({"params": p}, tokens, labels, train=True,
                                 rngs={"dropout": k_drop})
            return token_obj.masked_token_loss(logits, codes, masked)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(50):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("size,count", [("l32", 177_202_432), ("b64", 177_227_008),
                                        ("s128", 294_990_848)])
def test_released_sizes_parameter_counts(size, count):
    """The released generators' sizes (177.2M ImageBert, 295.0M UViTBert state_dicts)."""
    from flax import linen as nn
    from tok1d.weights.convert.maskgit import abstract_params
    params = nn.unbox(abstract_params(maskgit.build(size=size)))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count
