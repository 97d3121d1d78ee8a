"""The quantizers (`tok1d.models.quantizers`): each one's defining property, straight-through
gradients, parity with the official LFQ / FSQ / SimVQ (GigaTok) and clustering VQ (TiTok) on
tests/fixtures/quantizers.npz, and every tokenizer family taking each quantizer."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.models import quantizers as Q
from tok1d.models.tokenizers.gigatok import GigaTok
from tok1d.models.tokenizers.titok import TiTok

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "quantizers.npz")
MUTABLE = [Q.STATE, Q.UPDATES]


def init(module, *args):
    return nn.unbox(module.init(jax.random.key(0), *args))


# --------------------------------------------------------------------- defining properties

def test_fsq_codes_and_values_are_a_bijection_over_the_implicit_codebook():
    fsq = Q.FSQ(levels=(8, 5, 5, 3))
    n = fsq.num_codes
    codes = jnp.arange(n, dtype=jnp.int32)
    values = fsq.apply({}, codes, method=fsq.lookup)
    assert len({tuple(v) for v in np.asarray(values).tolist()}) == n
    # A pre-image of every value: invert the bound, then quantize -> the same code and value.
    levels = jnp.asarray(fsq.levels, jnp.float32)
    half = (levels - 1) * (1 + fsq.eps) / 2
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    target = values * (levels // 2)
    z = jnp.arctanh((target + offset) / half) - jnp.arctanh(offset / half)
    z_q, aux = fsq.apply({}, z)
    np.testing.assert_array_equal(aux["codes"], codes)
    np.testing.assert_allclose(z_q, values, atol=1e-6)


@pytest.mark.parametrize("cls", [Q.LFQ, Q.BSQ])
def test_binary_codes_and_values_are_a_bijection(cls):
    module = cls(code_dim=7)
    codes = jnp.arange(module.num_codes, dtype=jnp.int32)
    values = module.apply({}, codes, method=module.lookup)
    assert len({tuple(v) for v in np.asarray(values).tolist()}) == 2 ** 7
    z_q, aux = module.apply({}, values * 3.0)
    np.testing.assert_array_equal(aux["codes"], codes)
    np.testing.assert_allclose(z_q, values, atol=1e-6)
    if cls is Q.BSQ:
        np.testing.assert_allclose(jnp.linalg.norm(values, axis=-1), 1.0, atol=1e-6)


def test_residual_error_falls_with_depth():
    rvq = Q.ResidualVQ(codebook_size=32, code_dim=4, depth=4)
    z = jax.random.normal(jax.random.key(1), (64, 4))
    params = init(rvq, z)["params"]
    residual, rng = z, jax.random.key(2)
    for d in range(4):  # each level's codebook: samples of what the previous levels leave
        rng, key = jax.random.split(rng)
        book = residual[jax.random.choice(key, 64, (32,), replace=False)]
        params[f"level_{d}"]["embedding"] = book
        _, aux = rvq.apply({"params": params}, z, depth=d + 1)
        residual = z - rvq.apply({"params": params}, aux["codes"], method=rvq.lookup)
    errors = []
    for d in range(5):
        approx = (jnp.zeros_like(z) if d == 0 else
                  rvq.apply({"params": params}, z, depth=d)[0])
        errors.append(float(jnp.mean(jnp.square(z - approx))))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert rvq.apply({"params": params}, z)[1]["codes"].shape == (64, 4)


def test_simvq_every_code_gets_gradient_where_plain_vq_does_not():
    z = jax.random.normal(jax.random.key(3), (3, 6))  # 3 vectors: at most 3 codes used
    for cls, moved_all in ((Q.SimVQ, True), (Q.VectorQuantizer, False)):
        vq = cls(codebook_size=16, code_dim=6)
        params = init(vq, z)["params"]

        def loss(p):
            return vq.apply({"params": p}, z)[1]["quantizer_loss"]

        grads = jax.grad(loss)(params)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        before = vq.apply({"params": params}, method=vq.codebook)
        after = vq.apply({"params": new}, method=vq.codebook)
        moved = jnp.any(jnp.abs(after - before) > 0, axis=-1)
        assert bool(jnp.all(moved)) == moved_all, (cls.__name__, moved)
    assert float(jnp.abs(grads["embedding"]).sum()) > 0
    sim = Q.SimVQ(codebook_size=16, code_dim=6)
    g = jax.grad(lambda p: sim.apply({"params": p}, z)[1]["quantizer_loss"])(
        init(sim, z)["params"])
    assert float(jnp.abs(g["embedding"]).sum()) == 0.0  # frozen base codebook


def test_clustering_vq_reanchors_a_dead_code():
    vq = Q.ClusteringVectorQuantizer(codebook_size=8, code_dim=4)
    z = jax.random.normal(jax.random.key(4), (2, 16, 4)) + jnp.array([2.0, 0, 0, 0])
    variables = init(vq, z)
    params = variables["params"]
    params["embedding"] = params["embedding"].at[3].set(jnp.array([-5.0, 0, 0, 0]))  # dead
    (_, aux), new = vq.apply({"params": params, Q.STATE: variables[Q.STATE]}, z, train=True,
                             mutable=MUTABLE)
    assert 3 not in np.asarray(aux["codes"])
    anchored = new[Q.UPDATES]["embedding"]
    flat = z.reshape(-1, 4)
    counts = np.bincount(np.asarray(aux["codes"]).ravel(), minlength=8) / 32
    np.testing.assert_allclose(new[Q.STATE]["embed_prob"], 0.01 * counts, rtol=1e-6)
    # Every code moves towards its nearest feature by a = exp(-p K 10 / (1 - decay) - 1e-3):
    # a dead code (p = 0) almost all the way, a used one a little (this first step: p is small).
    a = np.exp(-(0.01 * counts * 8 * 10) / 0.01 - 1e-3)[:, None]
    sim = Q.l2_normalize(params["embedding"]) @ Q.l2_normalize(flat).T
    nearest = flat[jnp.argmax(sim, axis=1)]
    np.testing.assert_allclose(anchored, (1 - a) * params["embedding"] + a * nearest,
                               rtol=1e-5, atol=1e-6)
    assert a[3, 0] > 0.99 and float(jnp.linalg.norm(anchored[3] - nearest[3])) < 0.01
    merged = Q.merge_param_updates({"quantize": params}, {"quantize": new[Q.UPDATES]})
    np.testing.assert_array_equal(merged["quantize"]["embedding"], anchored)
    # Evaluation (params only, nothing mutable) leaves everything alone.
    out, aux_eval = vq.apply({"params": params}, z)
    np.testing.assert_array_equal(aux_eval["codes"], aux["codes"])


@pytest.mark.parametrize("name,options,exact", [
    ("vq", {"l2_norm": False}, True), ("residual_vq", {"depth": 2}, True),
    ("lfq", {}, True), ("fsq", {"levels": (7, 5, 5, 5, 5, 5)}, False),
    ("bsq", {}, False), ("simvq", {"l2_norm": False}, True), ("clustering_vq", {}, False)])
def test_straight_through_gradient(name, options, exact):
    q = Q.build(name, options, detached=True, codebook_size=16, code_dim=6)
    z = jax.random.normal(jax.random.key(5), (2, 3, 6))
    g = jax.random.normal(jax.random.key(6), z.shape)
    variables = init(q, z)
    grad = jax.grad(lambda x: jnp.sum(q.apply(variables, x)[0] * g))(z)
    if exact:  # the identity: the incoming gradient reaches the input unchanged
        np.testing.assert_allclose(grad, g, rtol=1e-6, atol=1e-7)
    elif name == "fsq":  # through the bound, rounding skipped
        want = g * jax.vmap(jax.vmap(jax.grad(lambda x: jnp.sum(q.bound(x)))))(z) / jnp.asarray(
            [3, 2, 2, 2, 2, 2], jnp.float32)
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    else:  # through the l2 normalisation only
        unit_grad = jax.grad(lambda x: jnp.sum(Q.l2_normalize(x) * g))(z)
        np.testing.assert_allclose(grad, unit_grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- official parity

@pytest.fixture(scope="module")
def fx():
    if not os.path.exists(FIXTURE):
        pytest.skip(f"{FIXTURE} not found: the official-quantizer parity fixture (see "
                    "tests/fixtures/README.md) is absent")
    with np.load(FIXTURE) as z:
        fx = {k: z[k] for k in z.files}
    settings = json.loads(str(fx["meta"])).get("settings")
    if settings is None:
        pytest.skip(f"{FIXTURE} stores no meta.settings (an older format): regenerate it")
    fx["settings"] = settings
    return fx


def nhwc(x):
    return jnp.asarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def test_lfq_matches_gigatok(fx):
    s = fx["settings"]["lfq"]
    lfq = Q.LFQ(code_dim=s["code_dim"], commitment_cost=s["beta"],
                entropy_temperature=s["entropy_temperature"])
    ratio = s["entropy_loss_ratio"]  # the official module scales its entropy term; tok1d's loss
    z, g = nhwc(fx["lfq/z"]), nhwc(fx["lfq/g"])  # registry does, so the test scales ours

    def total(x):
        q, aux = lfq.apply({}, x)
        return jnp.sum(q * g) + aux["commitment_loss"] + ratio * aux["entropy_loss"], (q, aux)

    with jax.default_matmul_precision("highest"):
        (_, (q, aux)), grad = jax.value_and_grad(total, has_aux=True)(z)
    np.testing.assert_array_equal(aux["codes"], fx["lfq/codes"])
    np.testing.assert_array_equal(q, nhwc(fx["lfq/quantized"]))
    assert rel_err(ratio * aux["entropy_loss"], fx["lfq/entropy_loss"]) < 1e-4
    for ours, theirs in (("commitment_loss", "commitment_loss"),
                         ("per_sample_entropy_loss", "per_sample_entropy"),
                         ("codebook_entropy_loss", "codebook_entropy")):
        assert rel_err(aux[ours], fx[f"lfq/{theirs}"]) < 1e-4, ours
    assert rel_err(grad, nhwc(fx["lfq/z_grad"])) < 1e-4


def test_fsq_matches_gigatok(fx):
    levels = tuple(fx["settings"]["fsq"]["levels"])
    fsq = Q.FSQ(levels=levels)
    z = nhwc(fx["fsq/z"])
    q, aux = fsq.apply({}, z)
    np.testing.assert_array_equal(aux["codes"], fx["fsq/codes"])
    assert rel_err(q, nhwc(fx["fsq/quantized"])) < 1e-6
    grad = jax.grad(lambda x: jnp.sum(fsq.apply({}, x)[0] * nhwc(fx["fsq/g"])))(z)
    assert rel_err(grad, nhwc(fx["fsq/z_grad"])) < 1e-5
    assert fsq.num_codes == len(fx["fsq/implicit_codebook"]) == int(np.prod(levels))
    values = fsq.apply({}, jnp.arange(fsq.num_codes), method=fsq.lookup)
    np.testing.assert_allclose(values, fx["fsq/implicit_codebook"], atol=1e-7)


def test_simvq_matches_gigatok(fx):
    s = fx["settings"]["simvq"]
    sim = Q.SimVQ(codebook_size=s["codebook_size"], code_dim=s["code_dim"], l2_norm=s["l2_norm"],
                  commitment_cost=s["beta"], entropy_temperature=s["entropy_temperature"])
    ratio = s["entropy_loss_ratio"]
    params = {"embedding": jnp.asarray(fx["simvq/embedding"], jnp.float32),
              "codebook_transform": jnp.asarray(fx["simvq/transform_weight"], jnp.float32).T}
    z, g = nhwc(fx["simvq/z"]), nhwc(fx["simvq/g"])

    def total(p, x):
        q, aux = sim.apply({"params": p}, x)
        loss = jnp.sum(q * g) + aux["codebook_loss"] + aux["commitment_loss"]
        return loss + ratio * aux["entropy_loss"], (q, aux)

    with jax.default_matmul_precision("highest"):
        (_, (q, aux)), (gp, gz) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
            params, z)
    np.testing.assert_array_equal(aux["codes"], fx["simvq/codes"])
    assert rel_err(q, nhwc(fx["simvq/quantized"])) < 1e-5
    for name in ("codebook_loss", "commitment_loss"):
        assert rel_err(aux[name], fx[f"simvq/{name}"]) < 1e-4, name
    assert rel_err(ratio * aux["entropy_loss"], fx["simvq/entropy_loss"]) < 1e-4
    assert rel_err(gz, nhwc(fx["simvq/z_grad"])) < 1e-4
    assert rel_err(gp["codebook_transform"].T, fx["simvq/transform_grad"]) < 1e-4


def test_clustering_vq_matches_titok(fx):
    s = fx["settings"]["clustering"]
    vq = Q.ClusteringVectorQuantizer(codebook_size=s["codebook_size"], code_dim=s["token_size"],
                                     l2_norm=s["l2_norm"], commitment_cost=s["commitment_cost"])
    params = {"embedding": jnp.asarray(fx["clustering/embedding0"], jnp.float32)}
    state = {"embed_prob": jnp.zeros((s["codebook_size"],), jnp.float32)}
    for step in range(s["steps"]):
        z = nhwc(fx[f"clustering/step{step}/z"])
        with jax.default_matmul_precision("highest"):
            (q, aux), new = vq.apply({"params": params, Q.STATE: state}, z, train=True,
                                     mutable=MUTABLE)
        np.testing.assert_array_equal(aux["codes"], fx[f"clustering/step{step}/codes"])
        assert rel_err(q, nhwc(fx[f"clustering/step{step}/quantized"])) < 1e-5
        assert rel_err(aux["quantizer_loss"], fx[f"clustering/step{step}/quantizer_loss"]) < 1e-5
        state = new[Q.STATE]
        params = Q.merge_param_updates(params, new[Q.UPDATES])
        assert rel_err(state["embed_prob"], fx[f"clustering/step{step}/embed_prob"]) < 1e-6
        assert rel_err(params["embedding"], fx[f"clustering/step{step}/embedding"]) < 1e-5


# --------------------------------------------------------------------- tokenizers

TINY_TITOK = dict(image_size=16, patch_size=8, num_latent_tokens=4, encoder_width=32,
                  encoder_depth=1, encoder_heads=2, encoder_mlp_dim=64, decoder_width=32,
                  decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, codebook_size=16,
                  token_dim=6)
CASES = [("vq", None, 16, 1), ("clustering_vq", None, 16, 1), ("simvq", None, 16, 1),
         ("residual_vq", {"depth": 3}, 16, 3), ("fsq", {"levels": [4, 4, 3, 3, 2, 2]}, 576, 1),
         ("lfq", None, 64, 1), ("bsq", None, 64, 1)]


@pytest.mark.parametrize("name,options,num_codes,per_token", CASES)
def test_titok_takes_every_quantizer(name, options, num_codes, per_token):
    model = TiTok(quantizer=name, quantizer_options=options, **TINY_TITOK)
    assert model.num_codes == num_codes and model.num_tokens == 4 * per_token
    images = jax.random.uniform(jax.random.key(7), (2, 16, 16, 3))
    variables = init(model, images)
    out, aux = model.apply({"params": variables["params"]}, images, train=True)
    assert "quantizer" in aux.losses and out.shape == images.shape
    codes = model.apply(variables, images, method=model.encode)
    assert codes.shape == (2, model.num_tokens) and int(codes.max()) < num_codes
    recon = model.apply(variables, codes, method=model.decode_codes)
    np.testing.assert_allclose(recon, out, atol=1e-5)
    # built here with plain dict / list options, the module hashes (a jit static argument)
    from tok1d.models import interfaces
    np.testing.assert_array_equal(jax.jit(interfaces.encode_images, static_argnums=0)(
        model, variables["params"], images), codes)


def test_gigatok_takes_a_quantizer_by_name():
    kw = dict(image_size=16, encoder_ch=32, decoder_ch=32, encoder_ch_mult=(1, 2),
              decoder_ch_mult=(1, 2), num_res_blocks=1, z_channels=32, encoder_width=16,
              encoder_depth=1, encoder_heads=2, decoder_width=16, decoder_depth=1,
              decoder_heads=2, num_latent_tokens=4, code_dim=4)
    images = jax.random.uniform(jax.random.key(8), (1, 16, 16, 3), minval=-1.0)
    for name, options, per_token, layout in (
            ("fsq", {"levels": [5, 5, 5, 5]}, 1, "1d"),
            ("residual_vq", {"depth": 2, "codebook_size": 8}, 2, "1d"),
            ("residual_vq", {"depth": 2, "codebook_size": 8}, 2, "2d")):  # 8x8 grid
        model = GigaTok(quantizer=name, quantizer_options=options, layout=layout, **kw)
        assert model.num_tokens == (4 if layout == "1d" else 64) * per_token
        variables = init(model, images)
        out, aux = model.apply(variables, images, train=True)
        codes = model.apply(variables, images, method=model.encode)
        assert codes.shape == (1, model.num_tokens) and aux.codes is not None
        np.testing.assert_allclose(model.apply(variables, codes, method=model.decode_codes),
                                   out, atol=1e-5)


def test_a_wrong_quantizer_size_is_one_clear_error():
    with pytest.raises(ValueError, match="set the tokenizer's code size to 4"):
        Q.build("fsq", {"levels": [5, 5, 5, 5]}, detached=True, code_dim=6)
    with pytest.raises(ValueError, match="Unknown quantizer"):
        Q.build("pq", detached=True)
    with pytest.raises(ValueError, match="did you mean 'levels'"):
        Q.build("fsq", {"level": [5]}, detached=True)


def test_clustering_vq_reanchors_microbatch_after_microbatch_as_upstream():
    """With grad_accum_steps=2 each microbatch re-anchors in turn and the next one sees its
    codebook and usage (upstream writes both in place inside `accelerator.accumulate`): the
    step equals two one-microbatch steps that change nothing else (a zero optimizer), and its
    loss is their mean. (It used to average two re-anchorings of the same codebook.)"""
    import importlib.util
    import optax
    from conftest import REPO
    from tok1d.train import config_lib, state as state_lib, tokenizer
    spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs/tiny_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.model.update(quantizer="clustering_vq")
    config.ema_decay = 0.0
    config.optim.grad_accum_steps = 2
    config_lib.validate(config, num_devices=1)
    model = tokenizer.build_model(config)
    tx, schedule = optax.set_to_zero(), lambda step: 0.0
    x = jax.random.uniform(jax.random.key(9), (4, 32, 32, 3))
    variables = init(model, x)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                 opt_state=tx.init(variables["params"]),
                                 extras={"quantizer": variables[Q.STATE]})
    accumulated, scalars, _ = jax.jit(tokenizer.make_train_step(model, tx, schedule, config))(
        state, {"image": x}, {})
    config.optim.grad_accum_steps = 1
    one = jax.jit(tokenizer.make_train_step(model, tx, schedule, config))
    first, s1, _ = one(state, {"image": x[0::2]}, {})  # microbatch m: rows m, m + 2
    second, s2, _ = one(first, {"image": x[1::2]}, {})
    codebook = lambda s: s.params["quantize"]["embedding"]  # noqa: E731
    assert not np.allclose(codebook(first), codebook(second), atol=1e-4)  # both re-anchor
    np.testing.assert_allclose(codebook(accumulated), codebook(second), atol=1e-6)
    np.testing.assert_allclose(accumulated.extras["quantizer"]["quantize"]["embed_prob"],
                               second.extras["quantizer"]["quantize"]["embed_prob"], atol=1e-7)
    np.testing.assert_allclose(scalars["loss"], (s1["loss"] + s2["loss"]) / 2, rtol=1e-5)
    # A state built by hand from model.init's params alone trained on as a plain VQ, silently
    with pytest.raises(ValueError, match="clustering_vq trains with its codes' usage EMA"):
        one(state.replace(extras=None), {"image": x[0::2]}, {})


def test_a_skipped_non_finite_step_keeps_the_clustering_vq_codebook():
    """A NaN batch makes the step non-finite: the trainer keeps the previous params and
    quantizer state (the re-anchored codebook of that step is dropped with the rest)."""
    import importlib.util
    from conftest import REPO
    from tok1d.train import optim, state as state_lib, tokenizer
    spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs/tiny_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.model.update(quantizer="clustering_vq")
    config.ema_decay = 0.0
    model = tokenizer.build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    x = jax.random.uniform(jax.random.key(9), (2, 32, 32, 3))
    variables = init(model, x)
    params = variables["params"]
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params),
                                 extras={"quantizer": variables[Q.STATE]})
    step = jax.jit(tokenizer.make_train_step(model, tx, schedule, config))
    good, _, finite = step(state, {"image": x}, {})
    assert bool(finite) and not np.array_equal(good.extras["quantizer"]["quantize"]["embed_prob"],
                                               state.extras["quantizer"]["quantize"]["embed_prob"])
    bad, _, finite = step(state, {"image": x.at[0, 0, 0, 0].set(jnp.nan)}, {})
    assert not bool(finite)
    for a, b in zip(jax.tree.leaves((state.params, state.extras)),
                    jax.tree.leaves((bad.params, bad.extras))):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_vq_settings_configure_the_vq_family_only():
    """codebook_size / code size go to every quantizer, the VQ settings (l2_norm,
    entropy_temperature, ...) to vq / clustering_vq / simvq only: the others keep their own
    defaults unless quantizer_options set them, and a changed VQ setting is an error for them
    (GigaTok's rotation_trick, on by default, just does not apply)."""
    tiny = dict(TINY_TITOK, token_dim=6)
    quantizer = lambda **kw: TiTok(**dict(tiny, **kw))._quantizer(detached=True)  # noqa: E731
    assert quantizer(quantizer="bsq").entropy_temperature == 1.0
    assert quantizer(quantizer="bsq", quantizer_options={"entropy_temperature": 0.5}
                     ).entropy_temperature == 0.5
    assert quantizer(quantizer="residual_vq").l2_norm is False
    assert quantizer(quantizer="vq", l2_norm=False, entropy_temperature=0.1).l2_norm is False
    assert quantizer(quantizer="simvq", entropy_temperature=0.1).entropy_temperature == 0.1
    for name, key, value in (("fsq", "l2_norm", False), ("bsq", "entropy_temperature", 0.1),
                             ("residual_vq", "commitment_cost", 0.5)):
        options = {"levels": [4, 4, 3, 3, 2, 2]} if name == "fsq" else None
        with pytest.raises(ValueError, match=f"{key}=.*quantizer '{name}'.*quantizer_options"):
            quantizer(quantizer=name, quantizer_options=options, **{key: value})
    giga = GigaTok(quantizer="lfq", code_dim=6, rotation_trick=True)._quantizer(detached=True)
    assert isinstance(giga, Q.LFQ) and giga.entropy_temperature == 0.01


def test_finetune_decoder_does_not_reanchor_the_clustering_vq():
    """TiTok stage 2 (finetune_decoder) runs its frozen quantizer in eval mode, as upstream:
    the training forward leaves the clustering VQ's codebook and usage EMA alone."""
    images = jax.random.uniform(jax.random.key(10), (2, 16, 16, 3))
    for finetune in (False, True):
        model = TiTok(quantizer="clustering_vq", finetune_decoder=finetune, **TINY_TITOK)
        variables = init(model, images)
        _, new = model.apply(variables, images, train=True, mutable=MUTABLE)
        prob = new[Q.STATE]["quantize"]["embed_prob"]
        assert bool(jnp.any(prob != 0)) == (not finetune)
        assert ("quantize" in new.get(Q.UPDATES, {})) == (not finetune)


def test_the_objective_logs_every_quantizer_loss_part():
    """quantizer_<part> for every part the quantizer reports whose term is weighted: LFQ's
    commitment with losses.quantizer, its two entropies with losses.entropy."""
    from tok1d.objectives import terms, tokenizer_loss
    model = TiTok(quantizer="lfq", **TINY_TITOK)
    images = jax.random.uniform(jax.random.key(11), (2, 16, 16, 3))
    params = init(model, images)["params"]
    for weights, logged in (
            ({"l2": 1.0, "quantizer": 1.0}, {"commitment"}),
            ({"l2": 1.0, "quantizer": 1.0, "entropy": 0.1},
             {"commitment", "per_sample_entropy", "codebook_entropy"})):
        loss_fn = tokenizer_loss.make_loss_fn(model, weights, terms.FrozenNets())
        extras = loss_fn(params, images, {}, None, {}, 0.0, 0.0, jax.random.key(0))[1][1]
        assert {k for k in extras if k.startswith("quantizer_")} == {
            f"quantizer_{p}" for p in logged}, extras


def test_residual_codebook_statistics_are_per_level():
    """Each residual level has its own codebook: one histogram per level, usage / perplexity
    averaged over the levels, dead codes summed (a collapsed level shows)."""
    from tok1d.evaluation import codebook
    from tok1d.train import tokenizer
    codes = jnp.array([[[0, 0], [0, 1]]])  # 1 image, 2 tokens x 2 levels
    hist = codebook.code_histogram(codes, 4, levels=2)
    np.testing.assert_array_equal(hist, [[2, 0, 0, 0], [1, 1, 0, 0]])
    assert float(codebook.usage(hist)) == 0.375 and int(codebook.dead_codes(hist)) == 5
    np.testing.assert_allclose(float(codebook.perplexity(hist)), 1.5, rtol=1e-6)
    np.testing.assert_array_equal(codebook.code_histogram(codes[..., 0], 4), [2, 0, 0, 0])
    model = TiTok(quantizer="residual_vq", quantizer_options={"depth": 3}, **TINY_TITOK)
    images = jax.random.uniform(jax.random.key(12), (2, 16, 16, 3))
    sums, _ = tokenizer.make_eval_step(model)(
        init(model, images)["params"], {"image": images, "mask": jnp.ones(2)}, {})
    assert sums["hist"].shape == (3, 16) and float(sums["hist"].sum()) == 2 * 4 * 3
