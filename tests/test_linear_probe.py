"""GigaTok's AR linear probe (tok1d.evaluation.linear_probe): truncated GPT stacks against the
full model's intermediate activations (scanned and unrolled), null-class mean-pooled features
(padded batches, 1 vs 8 devices), the probe's BatchNorm, MAE's LARS and lr schedule against
hand-written references, and that the probe learns separable classes, stays at chance on
random labels and finds the class in the codes through a random tiny GPT."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tok1d import parallel
from tok1d.evaluation import linear_probe as lp
from tok1d.layers import transformer
from tok1d.models.generators.gpt import GPT

VOCAB, TOKENS, CLASSES, WIDTH, DEPTH = 16, 16, 4, 32, 4


def _model(**kw) -> GPT:
    kw = {"vocab_size": VOCAB, "num_tokens": TOKENS, "num_classes": CLASSES, "width": WIDTH,
          "depth": DEPTH, "num_heads": 2, "mlp_dim": 64, **kw}
    return GPT(**kw)


def _params(model: GPT, seed: int = 0, perturb: float = 0.5):
    """GPT-like random weights drawn with NumPy (no compiled init: fast on a shared CPU): norm
    scales 1, positions N(0, width^-0.5), the rest N(0, 0.02); then, unless `perturb` is 0,
    every tensor perturbed by N(0, perturb) so that each block changes the residual stream."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, TOKENS), jnp.int32),
                                     jnp.zeros((1,), jnp.int32)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = np.ones(leaf.shape)
        else:
            std = WIDTH ** -0.5 if "positional_embedding" in name else 0.02
            x = std * rng.normal(size=leaf.shape)
        return (x + perturb * rng.normal(size=leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _stack(unrolled_params):
    """Unrolled (`blocks_i`) parameters -> the scanned layout (leading "layers" axis)."""
    params = dict(unrolled_params)
    blocks = [params["transformer"][f"blocks_{i}"] for i in range(DEPTH)]
    params["transformer"] = {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def _codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, TOKENS)).astype(np.int32)


# ---------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("scan", [True, False])
def test_truncation_matches_intermediate_activation(scan):
    unrolled = _model(scan=False)
    p_unrolled = _params(unrolled)
    model, params = (_model(scan=True), _stack(p_unrolled)) if scan else (unrolled, p_unrolled)
    codes = jnp.asarray(_codes(3))
    labels = jnp.asarray([0, 3, CLASSES], jnp.int32)

    # The full (unrolled) model's block outputs, captured on the way to its logits.
    logits, state = jax.jit(lambda p: unrolled.apply(
        {"params": p}, codes, labels, capture_intermediates=True,
        mutable=["intermediates"]))(p_unrolled)
    inter = state["intermediates"]["transformer"]
    after = [np.asarray(inter[f"blocks_{i}"]["__call__"][0]) for i in range(DEPTH)]
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, codes, labels), logits,
                               rtol=0, atol=1e-5 * float(np.abs(logits).max()))

    for n in (1, 2, DEPTH):
        sub, sub_params = lp.truncate(model, params, n)
        assert sub.depth == n and sub.scan == scan
        if scan:
            assert all(x.shape[0] == n for x in jax.tree.leaves(sub_params["transformer"]))
        else:
            assert sorted(sub_params["transformer"]) == [f"blocks_{i}" for i in range(n)]
        h = jax.jit(lambda p: sub.apply({"params": p}, codes, labels,
                                        method="hidden_states"))(sub_params)
        assert h.shape == (3, TOKENS, WIDTH) and h.dtype == jnp.float32
        np.testing.assert_allclose(h, after[n - 1], rtol=0,
                                   atol=1e-6 * float(np.abs(after[n - 1]).max()))
        if n < DEPTH:  # discriminative: the next block changes the stream
            assert np.abs(after[n] - after[n - 1]).max() > 0.1 * np.abs(after[n - 1]).max()

    # All blocks: the final RMSNorm and the head of the hidden states are the logits.
    h = jax.jit(lambda p: model.apply({"params": p}, codes, labels,
                                      method="hidden_states"))(params)
    normed = transformer.RMSNorm(model.norm_eps).apply({"params": params["norm"]}, h)
    np.testing.assert_allclose(normed @ np.asarray(params["output"]["kernel"]), logits, rtol=0,
                               atol=1e-5 * float(np.abs(logits).max()))
    with pytest.raises(ValueError):
        lp.truncate(model, params, DEPTH + 1)


# ---------------------------------------------------------------------------- features


def test_probe_features_null_label_mean_and_devices():
    model = _model(scan=True)
    params = _params(model)
    codes = _codes(70)  # batches of 64: the second one is padded

    feats = lp.probe_features(model, params, codes, batch_size=64)
    assert feats.shape == (70, WIDTH) and feats.dtype == np.float32

    sub, sub_params = lp.truncate(model, params, DEPTH // 2)
    hidden = jax.jit(lambda p, c, y: sub.apply({"params": p}, c, y, method="hidden_states"))
    null = np.full((70,), model.null_label, np.int32)
    want = np.asarray(hidden(sub_params, codes, null)).mean(axis=1)
    np.testing.assert_allclose(feats, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # The null class: any real label would give other features (there are no labels to pass).
    real = np.asarray(hidden(sub_params, codes, np.zeros((70,), np.int32))).mean(axis=1)
    assert np.abs(real - feats).max() > 1e-2 * np.abs(feats).max()
    # Default layer depth // 2; other layers differ.
    np.testing.assert_array_equal(lp.probe_features(model, params, codes, layer=2,
                                                    batch_size=64), feats)
    assert np.abs(lp.probe_features(model, params, codes, layer=3, batch_size=64)
                  - feats).max() > 1e-2 * np.abs(feats).max()

    # Sharded over 8 devices (8 rows each) or on a 1-device mesh: bit for bit the same. (On
    # the CPU backend, 1-3 rows per device take another matmul path whose rounding differs by
    # ~1 ulp; rows never interact, so that is the only way the device count can show.)
    mesh8 = parallel.create_mesh({"data": -1})
    assert mesh8.size == 8
    np.testing.assert_array_equal(lp.probe_features(model, params, codes, batch_size=64,
                                                    mesh=mesh8), feats)
    mesh1 = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
    np.testing.assert_array_equal(lp.probe_features(model, params, codes, batch_size=64,
                                                    mesh=mesh1), feats)


# ---------------------------------------------------------------------------- probe pieces


def test_linear_probe_batchnorm_train_and_eval():
    probe = lp.LinearProbe(num_classes=5)
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(64, 40))).astype(np.float32)
    variables = probe.init(jax.random.key(0), x[:2])
    assert set(variables["params"]) == {"head"}  # BatchNorm without scale / bias
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    assert kernel.shape == (40, 5) and abs(kernel.std() - 0.01) < 0.002
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], 0.0)
    # Give the head a non-zero bias so that it shows in the comparisons.
    variables = {"params": {"head": {"kernel": kernel, "bias": np.arange(5.0, dtype=np.float32)}},
                 "batch_stats": variables["batch_stats"]}

    out, new = probe.apply(variables, x, train=True, mutable=["batch_stats"])
    mean, var = x.mean(0), x.var(0)  # biased batch variance, like torch's normalisation
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-6) @ kernel + np.arange(5.0),
                               rtol=1e-4, atol=1e-4)
    stats = new["batch_stats"]["bn"]  # torch momentum 0.1 from mean 0, var 1
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)

    evaluated = probe.apply({**variables, "batch_stats": new["batch_stats"]}, x[:3])
    np.testing.assert_allclose(
        evaluated, (x[:3] - stats["mean"]) / np.sqrt(stats["var"] + 1e-6) @ kernel
        + np.arange(5.0), rtol=1e-4, atol=1e-4)


def test_mae_schedule():
    peak, per_epoch, epochs, warmup = 0.4, 10, 20, 5
    schedule = lp.mae_schedule(peak, per_epoch, epochs, warmup)

    def mae(step):  # MAE util/lr_sched.py adjust_learning_rate at epoch = step / per_epoch
        e = step / per_epoch
        if e < warmup:
            return peak * e / warmup
        return peak * 0.5 * (1.0 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))

    for step in (0, 1, 7, 49, 50, 51, 123, 150, 199, 200):
        assert float(schedule(step)) == pytest.approx(mae(step), rel=1e-5, abs=1e-7), step
    assert float(schedule(0)) == 0.0 and float(schedule(50)) == pytest.approx(peak)
    assert float(schedule(200)) == pytest.approx(0.0, abs=1e-7)


def test_mae_lars_matches_reference():
    rng = np.random.default_rng(0)
    params = {"head": {"kernel": rng.normal(size=(6, 3)).astype(np.float32),
                       "bias": rng.normal(size=(3,)).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(4)]
    lrs = [0.0, 0.5, 1.5, 0.7]
    wd, momentum, trust = 0.05, 0.9, 0.001
    tx = lp.mae_lars(lambda step: jnp.asarray(lrs)[step], weight_decay=wd)

    state, got = tx.init(params), params
    want = jax.tree.map(lambda p: p.astype(np.float64), params)
    mu = jax.tree.map(np.zeros_like, want)
    for lr, g in zip(lrs, grads):
        updates, state = tx.update(g, state, got)
        got = jax.tree.map(lambda p, u: p + u, got, updates)
        # misc.py LARS.step: decay and trust ratio for ndim > 1, mu = m * mu + dp, p -= lr * mu
        for name in ("kernel", "bias"):
            p, dp = want["head"][name], np.asarray(g["head"][name], np.float64)
            if p.ndim > 1:
                dp = dp + wd * p
                dp = dp * trust * np.linalg.norm(p) / np.linalg.norm(dp)
            mu["head"][name] = momentum * mu["head"][name] + dp
            want["head"][name] = p - lr * mu["head"][name]
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(got["head"][name], want["head"][name], rtol=1e-5)
        assert not np.allclose(got["head"][name], params["head"][name])


# ---------------------------------------------------------------------------- training


def _gaussian_classes(rng, n, means, noise=1.0):
    y = rng.integers(0, len(means), n)
    return (means[y] + noise * rng.normal(size=(n, means.shape[1]))).astype(np.float32), y


def test_probe_learns_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    dim = 16
    means = 2.0 * rng.normal(size=(CLASSES, dim))
    x, y = _gaussian_classes(rng, 512, means)
    xv, yv = _gaussian_classes(rng, 256, means)
    offset, scale = 5.0, 3.0  # far from BatchNorm's initial statistics
    x, xv = offset + scale * x, offset + scale * xv
    # Two variants per example: the features and a slightly noisier copy.
    x2 = np.stack([x, x + 0.3 * rng.normal(size=x.shape).astype(np.float32)])
    # LARS moves the weight by at most ~lr * 1e-3 * |w| * 10 a step: a few hundred steps need
    # a larger lr than ImageNet's thousands.
    kw = dict(epochs=30, batch_size=64, base_lr=10.0, warmup_epochs=3, seed=0)
    logs = []
    out = lp.train_linear_probe(x2, y, xv, yv, CLASSES, log_fn=logs.append, **kw)
    assert out["val_accuracy"] > 0.9 and out["train_accuracy"] > 0.85
    assert out["train_loss"] < 1.0 and out["steps"] == 30 * 8
    assert out["lr"] == pytest.approx(10.0 * 64 / 256) and len(logs) == 31

    # Evaluation uses the running statistics, which track the training features' moments.
    stats = out["variables"]["batch_stats"]["bn"]
    np.testing.assert_allclose(stats["mean"], x.mean(0), atol=0.5)
    np.testing.assert_allclose(stats["var"], x.var(0), rtol=0.25)
    head = out["variables"]["params"]["head"]
    manual = ((xv - stats["mean"]) / np.sqrt(stats["var"] + 1e-6) @ head["kernel"]
              + head["bias"]).argmax(-1)
    assert out["val_accuracy"] == pytest.approx(np.mean(manual == yv))

    # Deterministic given the seed.
    again = lp.train_linear_probe(x2, y, xv, yv, CLASSES, **kw)
    assert again["val_accuracy"] == out["val_accuracy"]
    assert again["train_loss"] == out["train_loss"]

    # Labels independent of the features: nothing to learn, validation stays at chance (0.25,
    # std 0.027 over 256 examples).
    noise, noise_val = (rng.normal(size=(n, dim)).astype(np.float32) for n in (512, 256))
    chance = lp.train_linear_probe(noise, rng.integers(0, CLASSES, 512), noise_val,
                                   rng.integers(0, CLASSES, 256), CLASSES, **kw)
    assert abs(chance["val_accuracy"] - 0.25) < 0.1


def test_run_linear_probe_end_to_end():
    """Class c draws 70% of its codes from {4c, ..., 4c + 3}: a random tiny GPT's mean-pooled
    middle features carry the class."""
    model = _model(scan=True)
    params = _params(model, perturb=0.0)
    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, CLASSES, n)
        own = 4 * y[:, None] + rng.integers(0, 4, (n, TOKENS))
        codes = np.where(rng.random((n, TOKENS)) < 0.7, own, rng.integers(0, VOCAB, (n, TOKENS)))
        return codes.astype(np.int32), y

    codes, y = sample(256)
    val_codes, val_y = sample(128)
    # (N, V, T) like the token dataset: the codes and a reversed copy as a second variant.
    train_codes = np.stack([codes, codes[:, ::-1]], axis=1)
    out = lp.run_linear_probe(model, params, train_codes, y, val_codes, val_y,
                              feature_batch_size=128, epochs=20, batch_size=32, base_lr=10.0,
                              warmup_epochs=2)
    assert out["layer"] == DEPTH // 2 and out["feature_dim"] == WIDTH
    assert out["val_accuracy"] > 0.7, out  # chance: 0.25


def test_the_evaluate_job_refuses_a_probe_it_cannot_run_before_sampling(tmp_path):
    """The evaluate job checks that the probe can read its data before it samples (it used to
    sample 50k images, compute gFID, then fail and write nothing): the GPT recipe probes on
    `data`'s images by default (here ImageNet, not prepared on this machine); on tokens it
    needs generator.tokens."""
    import os
    from conftest import REPO
    from tok1d.cli import evaluate
    from tok1d.train import config_lib
    config = config_lib.load(os.path.join(REPO, "configs", "gpt_gigatok.py:b"))
    config.evaluation.linear_probe_epochs = 90
    assert evaluate.linear_probe_source(config) == "images"
    with pytest.raises(FileNotFoundError, match="has no prepared split 'train'"):
        evaluate.evaluate_generator(config, str(tmp_path / "no_checkpoint"), "no_tokenizer/",
                                    str(tmp_path / "out"))
    config.evaluation.linear_probe_source = "tokens"
    with pytest.raises(ValueError, match="reads its codes from a token dataset"):
        evaluate.evaluate_generator(config, str(tmp_path / "no_checkpoint"), "no_tokenizer/",
                                    str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    config.evaluation.linear_probe_source = "pixels"
    with pytest.raises(config_lib.ConfigError, match="linear_probe_source='pixels'"):
        config_lib.validate(config)
    config.evaluation.linear_probe_source = ""
    config.generator.tokens = str(tmp_path / "tokens")
    assert evaluate.linear_probe_source(config) == "tokens"
    config.model.name = "maskgit"
    with pytest.raises(ValueError, match="needs a GPT generator"):
        evaluate._check_linear_probe(config)


# ---------------------------------------------------------------------------- in every step


def test_the_online_trainer_is_the_scanned_one_on_the_same_batches():
    """`train_linear_probe_online` (features computed inside every step, upstream's loop)
    trains the probe exactly like `train_linear_probe` (features precomputed, epochs scanned)
    when it is fed the same rows in the same order: here the "codes" carry each row's index
    and the feature function looks the row up."""
    rng = np.random.default_rng(0)
    dim, n, batch, epochs, seed = 8, 96, 32, 4, 3
    means = 2.0 * rng.normal(size=(CLASSES, dim))
    x, y = _gaussian_classes(rng, n, means)
    xv, yv = _gaussian_classes(rng, 40, means)
    kw = dict(epochs=epochs, batch_size=batch, base_lr=5.0, warmup_epochs=1, seed=seed)
    scanned = lp.train_linear_probe(x, y, xv, yv, CLASSES, **kw)

    order = np.random.default_rng(seed)  # train_linear_probe's per-epoch shuffles

    def batches():
        for _ in range(epochs):
            rows = order.permutation(n)[:n // batch * batch].reshape(-1, batch)
            for r in rows:
                yield {"codes": jnp.asarray(r[:, None]), "label": jnp.asarray(y[r])}

    table = jnp.asarray(x)
    lookup = lambda p, tok_p, b, rng: p[b["codes"][:, 0]]  # noqa: E731
    logs = []
    online = lp.train_linear_probe_online(lookup, table, None, batches(), n, xv, yv, CLASSES,
                                          log_fn=logs.append, **kw)
    for k in ("val_accuracy", "lr", "steps"):
        assert online[k] == scanned[k], k
    assert online["train_loss"] == pytest.approx(scanned["train_loss"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 online["variables"], scanned["variables"])
    assert len(logs) == epochs + 1


def test_features_over_the_device_budget_train_the_same_from_the_host():
    """Training features larger than `device_bytes` stay on the host and go to the device a
    piece of an epoch at a time (here 3 batches, the last piece of each epoch shorter): the
    probe takes the same steps as with the features copied to the device whole."""
    rng = np.random.default_rng(4)
    dim, n, batch = 8, 256, 32
    means = 2.0 * rng.normal(size=(CLASSES, dim))
    x, y = _gaussian_classes(rng, n, means)
    x = np.stack([x, x + 0.1 * rng.normal(size=x.shape).astype(np.float32)])  # (V, N, D)
    xv, yv = _gaussian_classes(rng, 40, means)
    kw = dict(epochs=3, batch_size=batch, base_lr=5.0, warmup_epochs=1, seed=1)
    whole = lp.train_linear_probe(x, y, xv, yv, CLASSES, **kw)
    logs = []
    pieces = lp.train_linear_probe(x, y, xv, yv, CLASSES, log_fn=logs.append,
                                   device_bytes=3 * batch * dim * 4, **kw)
    assert "features stay on the host" in logs[0] and "3 batches are sent at a time" in logs[0]
    assert pieces["val_accuracy"] == whole["val_accuracy"] and pieces["steps"] == whole["steps"]
    assert pieces["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 pieces["variables"], whole["variables"])


def test_code_batches_visit_every_example_once_per_epoch():
    codes = np.arange(10 * 2 * 3).reshape(10, 2, 3)  # (N, V, T): row i's variants 6i.., 6i+3..
    labels = np.arange(10) % CLASSES
    it = lp.code_batches(codes, labels, batch_size=4, seed=0)
    for _ in range(3):  # epochs: 2 whole batches of 4 (the last 2 examples dropped)
        rows = []
        for _ in range(2):
            b = next(it)
            row = np.asarray(b["codes"])[:, 0] // 6
            assert np.all(np.asarray(b["codes"])[:, 0] % 3 == 0)  # one whole variant per row
            np.testing.assert_array_equal(np.asarray(b["label"]), labels[row])
            rows += list(row)
        assert len(set(rows)) == 8
    variants = {int(np.asarray(next(it)["codes"])[0, 0]) % 6 for _ in range(40)}
    assert variants == {0, 3}  # both variants drawn


def test_dropout_features_and_the_probe_with_dropout_on_devices():
    """hidden_states(train=True) applies the GPT's dropout (different per rng; eval mode when
    the rates are 0), and `run_linear_probe(dropout=True)` (upstream's train-mode features in
    every step, the batch sharded over 8 devices) still finds the class in the codes."""
    model = _model(scan=True, token_dropout=0.1, dropout_rate=0.1)
    params = _params(model, perturb=0.0)
    codes = _codes(8)
    sub, sub_params = lp.truncate(model, params, 2)
    clean = lp.feature_fn(sub)(sub_params, None, {"codes": codes}, None)
    noisy = lp.feature_fn(sub, train=True)
    a, b = (noisy(sub_params, None, {"codes": codes}, jax.random.key(k)) for k in (0, 1))
    assert not np.allclose(a, clean) and not np.allclose(a, b)
    quiet, _ = lp.truncate(model.clone(token_dropout=0.0, dropout_rate=0.0), params, 2)
    np.testing.assert_allclose(
        lp.feature_fn(quiet, train=True)(sub_params, None, {"codes": codes}, jax.random.key(0)),
        clean, rtol=1e-5, atol=1e-6)

    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, CLASSES, n)
        own = 4 * y[:, None] + rng.integers(0, 4, (n, TOKENS))
        return np.where(rng.random((n, TOKENS)) < 0.7, own,
                        rng.integers(0, VOCAB, (n, TOKENS))).astype(np.int32), y

    (codes, y), (val_codes, val_y) = sample(256), sample(128)
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    kw = dict(mesh=mesh, feature_batch_size=128, epochs=20, batch_size=32, base_lr=10.0,
              warmup_epochs=2)
    logs = []
    noisy = lp.run_linear_probe(model, params, codes, y, val_codes, val_y, dropout=True,
                                log_fn=logs.append, **kw)
    assert "with dropout in every step" in logs[0] and noisy["steps"] == 20 * 8
    once = lp.run_linear_probe(model, params, codes, y, val_codes, val_y, **kw)
    assert once["val_accuracy"] > 0.7, once
    # With the GPT's dropout (0.1) the features of this tiny random GPT are much noisier:
    # upstream's training features (measured 0.53 here against 0.91 clean; chance 0.25).
    assert 0.35 < noisy["val_accuracy"] < once["val_accuracy"], noisy
    # A GPT without dropout: the same clean path (the features do not change per step).
    quiet = model.clone(token_dropout=0.0, dropout_rate=0.0)
    logs = []
    same = lp.run_linear_probe(quiet, params, codes, y, val_codes, val_y, dropout=True,
                               log_fn=logs.append, **kw)
    assert "with dropout" not in logs[0] and same["val_accuracy"] == once["val_accuracy"]

    class Options:  # evaluation.linear_probe_*
        linear_probe_epochs, linear_probe_batch_size, linear_probe_lr = 90, 256, 0.1
    assert lp.probe_options(Options, 100, shards=8)["batch_size"] == 96  # the set is smaller
    assert lp.probe_options(Options, 10_000, shards=8)["batch_size"] == 256
    Options.linear_probe_batch_size = 36
    with pytest.raises(ValueError, match="36 is not a multiple of the mesh's 8 batch shards"):
        lp.probe_options(Options, 10_000, shards=8)


# ---------------------------------------------------------------------------- tokenizer probe

GIGATOK = dict(image_size=32, encoder_ch=32, decoder_ch=32, encoder_ch_mult=(1, 1, 1),
               decoder_ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, encoder_width=32,
               encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=2,
               decoder_heads=2, num_latent_tokens=16, codebook_size=64, distill_depth=1,
               out_inner_dim=32)


def test_the_tokenizer_probe_of_a_gigatok_in_the_evaluate_job(tmp_path):
    """GigaTok's tokenizer linear probe (evaluation.tokenizer_probe) in `tok1d evaluate` of a
    tokenizer, beside its reconstruction metrics: every step encodes the next batch of digit
    images (ADM random crop + flip) and trains the probe on the mean of the tap's features; a
    random GigaTok's encoder features carry the digit (chance 0.1). What cannot run is refused
    before the reconstruction metrics are computed, and nothing is written."""
    import json
    import os
    from tok1d import models
    from tok1d.cli import evaluate
    from tok1d.models import interfaces
    from tok1d.train import config_lib
    from tok1d.weights import pretrained
    model = models.create("gigatok", **GIGATOK)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0),
                                          jnp.zeros((1, 32, 32, 3), jnp.float32)))["params"]
    tok_dir = str(tmp_path / "gigatok")
    pretrained.save_pretrained(tok_dir, "gigatok", GIGATOK, jax.tree.map(np.asarray, params))
    c = config_lib.base_config()
    c.model = dict(name="gigatok", **GIGATOK)
    c.eval_batch_size = 64
    c.precision, c.evaluation.tokenizer_precision = "bfloat16", "float32"  # as the recipes
    c.data.name, c.data.image_size, c.data.eval_examples = "digits", 32, 128
    c.data.augment, c.data.flip, c.data.resize_rule, c.data.min_scale = (
        "adm_random_crop", True, "adm", 0.8)  # recipes.imagenet_adm, as lin_probe.py trains
    e = c.evaluation
    e.tokenizer_probe = "encoder"
    e.linear_probe_batch_size, e.linear_probe_lr = 64, 30.0
    with pytest.raises(ValueError, match="set them"):  # epochs 0
        evaluate.evaluate_tokenizer(c, tok_dir, str(tmp_path / "out"))
    e.tokenizer_probe = "pixels"  # a mistyped tap is named first (not "set the epochs")
    with pytest.raises(ValueError, match="no probe tap 'pixels'"):
        evaluate.evaluate_tokenizer(c, tok_dir, str(tmp_path / "out"))
    e.linear_probe_epochs = 6
    with pytest.raises(ValueError, match="no probe tap 'pixels'"):
        evaluate.evaluate_tokenizer(c, tok_dir, str(tmp_path / "out"))
    e.tokenizer_probe, e.linear_probe_batch_size = "encoder", 36  # the 8 devices cannot split it
    with pytest.raises(ValueError, match="36 is not a multiple of the mesh's 8 batch shards"):
        evaluate.evaluate_tokenizer(c, tok_dir, str(tmp_path / "out"))
    e.linear_probe_batch_size = 64
    assert not os.path.exists(tmp_path / "out")
    plain = models.create("gigatok", **dict(GIGATOK, distill_depth=0))  # no semantic head
    assert plain.probe_taps == ("encoder", "encoder_tokens")
    with pytest.raises(ValueError, match="distill_depth > 0"):
        jax.eval_shape(lambda x: plain.init_with_output(jax.random.key(0), x, "decoder",
                                                        method="probe_features"),
                       jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="has no features to probe"):
        interfaces.check_probed(models.create("maskgit_vqgan", image_size=32,
                                              hidden_channels=32, channel_mult=(1, 1, 1),
                                              num_res_blocks=1, z_channels=32,
                                              codebook_size=64))

    e.tokenizer_probe = "encoder"
    logs = []
    metrics = evaluate.evaluate_tokenizer(c, tok_dir, str(tmp_path / "out"), logs.append)
    assert any("the tokenizer's 'encoder' features of images encoded in every step" in line
               for line in logs), logs
    assert sum("linear probe epoch" in line for line in logs) == 6
    assert 0.25 < metrics["tokenizer_probe_accuracy"] <= 1.0, metrics  # measured 0.35
    assert "psnr" in metrics  # the reconstruction metrics too
    written = json.load(open(tmp_path / "out" / "metrics.json"))
    assert written["metrics"]["tokenizer_probe_accuracy"] == metrics["tokenizer_probe_accuracy"]
    assert written["details"]["tokenizer_precision"] == "float32"  # GigaTok's, over the run's
    report = open(tmp_path / "out" / "report.md").read()
    assert "tokenizer's own features" in report
    assert "encoder features on train, 6 epochs" in report

    c.evaluation.tokenizer_precision = "fp16"
    with pytest.raises(config_lib.ConfigError, match="tokenizer_precision='fp16' is not one"):
        config_lib.validate(c)
    c.evaluation.tokenizer_precision = "float32"
    c.trainer = "generator"
    with pytest.raises(config_lib.ConfigError, match="tokenizer_probe='encoder' probes"):
        config_lib.validate(c)
