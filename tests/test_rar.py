"""RAR with tiny random weights: KV-cache decoding vs full recomputation, the permuted forward vs
the raster forward of a model with permuted tables, the jitted sampler vs a slow uncached
reference loop, the power-cosine guidance and CFG, the randomness annealing, the real train
step learning the digits as tokens, the converter (official key names, the command line, the
released key lists) and the sampling benchmark."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, step_by_step_logits
from tok1d import models, parallel
from tok1d.cli import bench
from tok1d.cli.convert import main as convert_main
from tok1d.data import sources
from tok1d.generation import autoregressive as ar
from tok1d.generation import common
from tok1d.generation import guidance
from tok1d.layers.transformer import Attention, cast_params
from tok1d.models.generators import rar as rar_lib
from tok1d.models.generators.rar import RAR
from tok1d.objectives import tokens as token_obj
from tok1d.train import config_lib, generator
from tok1d.weights import loaders
from tok1d.weights.convert import rar as convert_rar

VOCAB, TOKENS, CLASSES = 19, 7, 5
KEY_LISTS = os.path.join(REPO, "tests", "fixtures")


def _model(**kw):
    kw = {"vocab_size": VOCAB, "num_tokens": TOKENS, "num_classes": CLASSES, "width": 32,
          "depth": 2, "num_heads": 4, "mlp_dim": 64, **kw}
    return RAR(**kw)


def _params(model, seed=0, scale=0.5):
    """Random init with every tensor perturbed (the adaLN modulations and the cls token start
    at zero), so the logits depend on everything."""
    codes = jnp.zeros((1, model.num_tokens), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), codes,
                                          jnp.zeros((1,), jnp.int32)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _codes(seed=0, batch=3):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, TOKENS)), jnp.int32)


def test_cached_decoding_matches_full_recomputation():
    """(The sampler decodes with the stack unrolled: the reference-loop tests cover that.)"""
    model = _model()
    params = _params(model)
    codes = _codes()
    labels = jnp.asarray([1, 4, model.null_label], jnp.int32)
    with jax.default_matmul_precision("highest"):
        full = jax.jit(model.apply)({"params": params}, codes, labels)
        got, state = step_by_step_logits(model, params, codes, labels)
    assert got.shape == full.shape == (3, TOKENS, VOCAB)
    np.testing.assert_allclose(got, full, rtol=0, atol=2e-5 * float(np.abs(full).max()))
    assert int(state["cache"]["position"]) == TOKENS + 1


def test_compute_leaves_cast_leaves_bf16_outputs_bitwise_unchanged():
    """The sampler casts RAR's kernels and tables to the compute dtype once before its loop:
    the logits are bitwise those of the float32 params; the norms stay float32."""
    model = _model(dtype=jnp.bfloat16)
    params = _params(model)
    cast = cast_params(params, model.dtype, model.compute_leaves)
    assert cast["pos_embed"].dtype == cast["cls_token"].dtype == jnp.bfloat16
    assert cast["transformer"]["blocks"]["ln_1"]["norm"]["scale"].dtype == jnp.float32
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": cast}, _codes(), jnp.asarray([0, 1, 2])),
                                  apply({"params": params}, _codes(), jnp.asarray([0, 1, 2])))


def test_explicit_attention_with_dropout_is_the_fused_attention():
    """Attention dropout computes the attention explicitly (softmax in float32, the causal mask):
    at a vanishing rate it equals the fused kernel; at a real rate, train mode drops."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    layer = Attention(4, qk_norm=True, dropout_rate=1e-12)
    params = layer.init(jax.random.key(1), x, mask)
    rngs = {"dropout": jax.random.key(2)}
    with jax.default_matmul_precision("highest"):
        fused = layer.apply(params, x, mask)
        explicit = layer.apply(params, x, mask, deterministic=False, rngs=rngs)
        dropped = layer.clone(dropout_rate=0.5).apply(params, x, mask, deterministic=False,
                                                      rngs=rngs)
    np.testing.assert_allclose(explicit, fused, rtol=0, atol=1e-6)
    assert not np.allclose(dropped, fused)


def test_permuted_forward_is_a_raster_forward_with_permuted_tables():
    """Reading a sequence in the order o is reading the permuted codes in raster order with the
    position rows of the image positions o: pos_embed row 2 + o[i] for code i, the target-aware
    row o[i] where code i is predicted; the logits of position i predict code o[i]."""
    model = _model()
    params = _params(model, seed=2)
    codes = _codes(seed=1, batch=2)
    labels = jnp.asarray([0, 3], jnp.int32)
    orders = np.stack([np.random.default_rng(s).permutation(TOKENS) for s in (5, 6)])
    apply = jax.jit(model.apply)
    with jax.default_matmul_precision("highest"):
        got = apply({"params": params}, codes, labels, orders=jnp.asarray(orders))
        identity = apply({"params": params}, codes, labels,
                         orders=jnp.asarray(np.tile(np.arange(TOKENS), (2, 1))))
        np.testing.assert_array_equal(identity, apply({"params": params}, codes, labels))
        for b in range(2):
            o = orders[b]
            moved = dict(params)
            moved["pos_embed"] = params["pos_embed"].at[2:].set(params["pos_embed"][2 + o])
            moved["target_aware_pos_embed"] = params["target_aware_pos_embed"][o]
            want = apply({"params": moved}, codes[b:b + 1, o], labels[b:b + 1])[0]
            np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert not np.allclose(got, identity)


def _reference_sample(model, params, labels, rng, guidance_scale, guidance_pow, **pick):
    """Slow upstream-style loop without a cache: the full teacher-forced forward on the codes
    so far (zero-padded) at every step; CFG u + (c - u)·s_t with the power-cosine s_t written
    out in float64."""
    b, n = labels.shape[0], model.num_tokens
    cfg = guidance_scale != 0
    lab = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)]) if cfg else labels
    keys = jax.random.split(rng, n)
    codes = np.zeros((b, n), np.int32)
    forward = jax.jit(model.apply)
    for t in range(n):
        inputs = np.concatenate([codes, codes]) if cfg else codes
        logits = forward({"params": params}, jnp.asarray(inputs), lab)[:, t]
        if cfg:
            s = 1 + (guidance_scale - 1) * (1 - math.cos(math.pi * (t / n) ** guidance_pow)) / 2
            c, u = logits[:b], logits[b:]
            logits = u + (c - u) * np.float32(s)
        codes[:, t] = np.asarray(ar.next_code(logits, keys[t], **pick))
    return codes


@pytest.mark.parametrize("settings", [
    dict(guidance_scale=0.0),
    dict(guidance_scale=16.0, guidance_scale_pow=2.75, cache_chunk=4),  # RAR-B's settings
    dict(guidance_scale=6.9, guidance_scale_pow=1.5, randomize_temperature=1.02, top_k=8,
         top_p=0.9, cache_chunk=0),
])
def test_jitted_sampler_matches_uncached_reference(settings):
    model = _model()
    params = _params(model, seed=3)
    labels = jnp.asarray([0, 2, 4], jnp.int32)
    s = dict(settings)
    g, p = s.pop("guidance_scale"), s.pop("guidance_scale_pow", 0.0)
    temperature = s.pop("randomize_temperature", 1.0)
    chunk = s.pop("cache_chunk", ar.CACHE_CHUNK)
    with jax.default_matmul_precision("highest"):
        for seed in (0, 1):
            rng = jax.random.key(seed)
            got = ar.sample_rar(model, params, labels, rng, guidance_scale=g,
                                guidance_scale_pow=p, randomize_temperature=temperature,
                                cache_chunk=chunk, **s)
            want = _reference_sample(model, params, labels, rng, g, p, temperature=temperature,
                                     **s)
            assert got.dtype == jnp.int32 and got.shape == (3, TOKENS)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_replayed_draws_and_cfg():
    """Gumbel noise replayed through `draws` is the fresh draw's rule (bitwise); the
    inverse-CDF rule of a replayed uniform; guidance changes the samples (same noise)."""
    model = _model()
    params = _params(model, seed=5, scale=1.0)
    labels = jnp.arange(CLASSES, dtype=jnp.int32)
    sampler = ar.make_rar_sampler(model, guidance_scale=3.0, guidance_scale_pow=1.0)
    rng = jax.random.key(4)
    keys = jax.random.split(rng, TOKENS)
    gumbel = jnp.stack([jax.random.gumbel(k, (CLASSES, VOCAB), jnp.float32) for k in keys])
    guided = sampler(params, labels, rng)
    np.testing.assert_array_equal(sampler(params, labels, rng, {"gumbel": gumbel}), guided)
    plain = ar.make_rar_sampler(model)(params, labels, rng)
    assert np.any(np.asarray(plain) != np.asarray(guided))
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 4))
    u = jnp.asarray([0.05, 0.15, 0.35, 0.65])
    picked = ar.next_code(logits, None, draw=lambda name, f: u if name == "uniform" else f())
    np.testing.assert_array_equal(picked, [0, 1, 2, 3])


def test_power_cosine_guidance():
    n, g = 256, 16.0
    for p in (2.75, 1.2, 0.5):
        s = guidance.power_cosine(n, g, p)
        want = [1 + (g - 1) * (1 - math.cos(math.pi * (t / n) ** p)) / 2 for t in range(n)]
        np.testing.assert_allclose(s, want, rtol=2e-6)
        assert s[0] == 1.0 and np.all(np.diff(s) >= 0) and s[-1] < g
    np.testing.assert_array_equal(guidance.power_cosine(n, 4.0, 0.0), np.full(n, 4.0, np.float32))
    scales, guide, cfg = ar.rar_guidance_plan(n, 0.0, 2.0)
    assert not cfg and not guide.any()


def test_randomness_anneal_and_orders():
    ratio = token_obj.random_ratio
    assert [ratio(s, 125_000, 187_500) for s in (0, 124_999, 125_000)] == [1.0, 1.0, 1.0]
    assert ratio(156_250, 125_000, 187_500) == pytest.approx(0.5)
    assert [ratio(s, 125_000, 187_500) for s in (187_500, 187_501, 250_000)] == [0.0, 0.0, 0.0]
    steps = jnp.asarray([0, 3, 6, 9, 12, 20])
    np.testing.assert_allclose(ratio(steps, 3, 9), [1, 1, 0.5, 0, 0, 0])
    np.testing.assert_array_equal(ratio(steps, 6, 6), [1, 1, 0, 0, 0, 0])  # a step change
    # in float32 too, the last steps' ratios are upstream's (float64) to float32 rounding
    last = ratio(jnp.asarray([187_498, 187_499], jnp.int32), 125_000, 187_500)
    np.testing.assert_allclose(last, [2 / 62_500, 1 / 62_500], rtol=1e-7)
    rng = jax.random.key(0)
    always = np.asarray(token_obj.random_orders(rng, 64, 16, 1.0))
    never = np.asarray(token_obj.random_orders(rng, 64, 16, 0.0))
    np.testing.assert_array_equal(np.sort(always, axis=1), np.tile(np.arange(16), (64, 1)))
    assert (always != np.arange(16)).any(axis=1).all()
    np.testing.assert_array_equal(never, np.tile(np.arange(16), (64, 1)))
    half = np.asarray(token_obj.random_orders(rng, 400, 16, 0.5))
    assert 0.4 < (half != np.arange(16)).any(axis=1).mean() < 0.6
    # Replayed: the outcome, or the uniforms and permutations.
    perms = np.stack([np.roll(np.arange(16), k) for k in range(1, 5)])
    draws = {"order_rand_u": jnp.asarray([0.1, 0.9, 0.49, 0.51]), "order_perms": perms}
    got = token_obj.random_orders(rng, 4, 16, 0.5, draw=lambda n, f: draws.get(n, f()))
    np.testing.assert_array_equal(got, np.where([[1], [0], [1], [0]], perms, np.arange(16)))


def _digit_tokens():
    """The embedded digits as token sequences: 8x8 images in 0..16, 2x2-pooled to 16 codes."""
    images, labels = sources.load_digits_array()
    pooled = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    return np.rint(pooled).astype(np.int32).reshape(-1, 16), labels.astype(np.int32)


def test_tiny_rar_learns_the_digits_through_the_real_train_step():
    """The generator trainer's jitted step on digit tokens: the permutation probability follows
    the anneal (1 until step 10, linearly to 0 at step 30), the training loss drops, and the
    raster-order validation loss ends well below the uniform log K."""
    codes, labels = _digit_tokens()
    c = config_lib.base_config("generator")
    c.total_steps, c.batch_size, c.precision, c.ema_decay = 40, 64, "float32", 0.0
    c.model = dict(name="rar", vocab_size=17, num_tokens=16, num_classes=10, width=48, depth=2,
                   num_heads=4, mlp_dim=96, dropout_rate=0.0, attention_dropout=0.0)
    c.generator.label_dropout = 0.1
    c.generator.randomness_anneal_start, c.generator.randomness_anneal_end = 10, 30
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 5, "constant"
    config_lib.validate(c, num_devices=8)
    model = generator.build_generator(c)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = parallel.DEFAULT_RULES
    batch_sh = parallel.batch_sharding(mesh, rules)
    _, _, init, step = generator.build_training(c, model, mesh, rules, batch_sh)
    rng = np.random.default_rng(0)
    ratios, losses = [], []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init(jax.random.key(0))
        for _ in range(c.total_steps):
            rows = rng.choice(len(codes) - 200, c.batch_size, replace=False)
            state, scalars, finite = step(state, {"codes": codes[rows], "label": labels[rows]})
            assert bool(finite)
            ratios.append(float(scalars["random_ratio"]))
            losses.append(float(scalars["loss"]))
        evaluate = jax.jit(generator.make_eval_step(model, c.generator))
        val, metrics = evaluate(state.params, {"codes": codes[-200:], "label": labels[-200:]},
                                jax.random.key(0))
    want = [1.0 if s < 10 else max(0.0, 1 - (s - 10) / 20) for s in range(40)]
    np.testing.assert_allclose(ratios, want, atol=1e-6)
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses
    assert float(val) < 0.7 * math.log(17) and "random_ratio" not in metrics


# --------------------------------------------------------------------------- conversion


def _official_state_dict(model, seed=0):
    """Random float32 tensors under the official key names and shapes."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32)
            for k, s in convert_rar.official_shapes(model).items()}


def test_converter_round_trip_and_errors(tmp_path, capsys):
    """Official-layout random weights written as a torch .bin convert through the command line;
    every tok1d tensor is the official one laid out (the tables cut to the rows RAR reads, the
    packed qkv split by heads); a wrong size, a missing and a mis-shaped key are refused with one
    error line and nothing written."""
    torch = pytest.importorskip("torch")
    model = _model(scan=True)
    sd = _official_state_dict(model)
    path = tmp_path / "rar_tiny.bin"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    out = str(tmp_path / "rar_tiny")
    assert convert_main(["rar", "--checkpoint", str(path), "--out", out]) == 0
    loaded, params = loaders.load_pretrained(out)
    assert loaded == model.clone(dtype=loaded.dtype)
    n, w, h = TOKENS, 32, 4
    d = w // h
    np.testing.assert_array_equal(params["cls_token"], sd["cls_token"][0])
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"][0, :n + 2])
    np.testing.assert_array_equal(params["target_aware_pos_embed"],
                                  sd["target_aware_pos_embed"][0, 2:n + 2])
    np.testing.assert_array_equal(params["timesteps_embeddings"],
                                  sd["timesteps_embeddings"][0, :n + 1])
    blocks = params["transformer"]["blocks"]
    for i in range(2):
        qkv_w, qkv_b = sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(blocks["attn"][name]["kernel"][i],
                                          qkv_w[j * w:(j + 1) * w].T.reshape(w, h, d))
            np.testing.assert_array_equal(blocks["attn"][name]["bias"][i],
                                          qkv_b[j * w:(j + 1) * w].reshape(h, d))
        np.testing.assert_array_equal(blocks["attn"]["q_norm"]["norm"]["scale"][i],
                                      sd[f"blocks.{i}.attn.q_norm.weight"])
        np.testing.assert_array_equal(blocks["adaLN_modulation"]["kernel"][i],
                                      sd[f"blocks.{i}.adaLN_modulation.1.weight"].T)
        np.testing.assert_array_equal(blocks["mlp"]["fc2"]["bias"][i],
                                      sd[f"blocks.{i}.mlp.fc2.bias"])
    np.testing.assert_array_equal(params["adaln_before_head"]["adaLN_modulation"]["kernel"],
                                  sd["adaln_before_head.adaLN_modulation.1.weight"].T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    # Unrolled: the same tensors under blocks_{i}.
    unrolled = convert_rar.convert_rar(sd, model.clone(scan=False))
    np.testing.assert_array_equal(unrolled["transformer"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  sd["blocks.1.mlp.fc1.weight"].T)

    capsys.readouterr()
    assert convert_main(["rar", "--checkpoint", str(path), "--out", str(tmp_path / "b"),
                         "--size", "B"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "size 'B'" in err and len(err.strip().splitlines()) == 1
    bad = dict(sd)
    del bad["blocks.1.mlp.fc1.bias"]
    bad["pos_embed"] = bad["pos_embed"][:, :-1]
    torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, tmp_path / "bad.bin")
    assert convert_main(["rar", "--checkpoint", str(tmp_path / "bad.bin"), "--out",
                         str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "blocks.1.mlp.fc1.bias" in err and "pos_embed" in err
    np.savez(tmp_path / "other.npz", **{"tok_embeddings.weight": np.zeros((4, 8), np.float32)})
    assert convert_main(["rar", "--checkpoint", str(tmp_path / "other.npz"), "--out",
                         str(tmp_path / "d")]) == 2
    assert "not a RAR state_dict" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / x) for x in "bcd")


def _read_key_list(path):
    shapes, numel = {}, {}
    for line in open(path, encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        key, shape, count = line.rstrip("\n").split("\t")
        shapes[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        numel[key] = int(count)
    return shapes, numel


@pytest.mark.parametrize("size", ["B", "L", "XL", "XXL"])
def test_released_key_lists_convert(size):
    """The state_dict layout of the official class at each released size (key lists dumped from
    `modeling.rar.RAR` by the fixture generator; the weights cannot be downloaded here): the
    sizes are inferred from the shapes and the layout is `official_shapes` of that model, key
    for key in order. RAR-B converts completely (zero-stride arrays): every key used, every
    parameter filled, the parameters upstream's minus the table rows upstream never reads."""
    path = os.path.join(KEY_LISTS, f"rar_{size.lower()}_keys.txt")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found (the released key lists of the fixture generator)")
    shapes, numel = _read_key_list(path)
    assert sum(numel.values()) == {"B": 260_923_648, "L": 461_668_352, "XL": 955_425_024,
                                   "XXL": 1_498_520_704}[size]  # the paper: 261M ... 1499M
    sd = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
    kwargs = convert_rar.infer_kwargs(sd)
    assert {k: kwargs[k] for k in rar_lib.RAR_SIZES[size]} == rar_lib.RAR_SIZES[size]
    assert (kwargs["vocab_size"], kwargs["num_tokens"], kwargs["num_classes"]) == (1024, 256, 1000)
    model = RAR(**kwargs, scan=False)
    assert list(convert_rar.official_shapes(model).items()) == list(shapes.items())
    if size != "B":  # the same code path; spare the memory of the large ones
        return
    params = convert_rar.convert_rar(sd, model, what=size)
    total = sum(x.size for x in jax.tree.leaves(params))
    unread = ((1024 - 2) + 1024 + (100 - 1)) * model.width  # pos, target-aware, timesteps
    assert total == sum(numel.values()) - unread


def test_size_table_build_and_sampler_options():
    for size, table in rar_lib.RAR_SIZES.items():
        model = models.create("rar", size=size, vocab_size=1024, num_tokens=256)
        assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (
            table["width"], table["depth"], table["num_heads"], table["mlp_dim"])
        assert model.null_label == 1000
    assert rar_lib.build("rar_xl", vocab_size=8, num_tokens=4).width == 1280
    with pytest.raises(ValueError, match="Unknown RAR size"):
        rar_lib.build("M", vocab_size=8, num_tokens=4)
    with pytest.raises(ValueError, match="num_tokens"):
        rar_lib.build("B", vocab_size=8)
    with pytest.raises(ValueError, match=r"Unknown sampler argument\(s\) \['cfg_scale'\]"):
        common.make_sampler(_model(), cfg_scale=2.0)  # GPT's option name


def test_recipes_validate_and_bench_plans_the_sampler():
    """configs/rar.py's four variants validate on a pod; `tok1d bench --workload=sample` compiles a
    RAR's sampler and the tokenizer's decoder."""
    for arg in ("b", "l", "xl", "xxl"):
        config = config_lib.load(os.path.join(REPO, "configs", f"rar.py:{arg}"))
        config_lib.validate(config, num_devices=64)
        assert config.model.name == "rar" and config.optim.decay_mask == "matrices"
    c = config_lib.base_config("generator")
    c.precision, c.batch_size = "float32", 8
    c.model = dict(name="rar", vocab_size=64, num_tokens=8, num_classes=10, width=32, depth=2,
                   num_heads=2, mlp_dim=64)
    c.sampling = dict(guidance_scale=4.0, guidance_scale_pow=1.0)
    tokenizer = config_lib.load(os.path.join(REPO, "configs", "tiny_test.py"))
    row = bench.run(c, "sample", batch_size=8, compile_only=True, tokenizer_config=tokenizer,
                    log=lambda _: None)
    assert row["memory_plan_gib"] > 0 and row["tflop_per_step"] > 0


def test_a_negative_guidance_power_is_refused_where_the_sampler_is_set_up():
    """guidance_scale_pow < 0 makes the power-cosine scale of code 0 infinite (0 ** -1):
    refused with one line naming the option (RAR's and MaskGIT's power-cosine)."""
    from tok1d.generation import maskgit as maskgit_sampling
    model = _model()
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="sampling.guidance_scale_pow must be a finite "
                           "number >= 0"):
            ar.make_rar_sampler(model, guidance_scale=2.0, guidance_scale_pow=bad)
        with pytest.raises(ValueError, match="sampling.guidance_pow must be a finite number >= 0"):
            maskgit_sampling.step_tables(8, 4, 2.0, "power-cosine", bad, 1.0, False, "arccos")
    ar.make_rar_sampler(model, guidance_scale=2.0, guidance_scale_pow=0.0)
