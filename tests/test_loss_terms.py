"""The loss-term registry (`tok1d.objectives.terms`): adding a term is one registered function
plus one config weight, and start-up validation reads the same registry."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from tok1d.objectives import losses, terms, tokenizer_loss
from tok1d.train import config_lib, tokenizer


def tiny_config():
    spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs/tiny_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture
def toy_term():
    """A toy term: total variation of the reconstruction, registered for one test."""
    @terms.register("toy_tv", needs=("pixels",))
    def toy_tv(ctx: terms.Context) -> jax.Array:
        """Mean absolute horizontal difference of the reconstruction."""
        return jnp.mean(jnp.abs(jnp.diff(ctx.out, axis=2)))

    yield toy_tv
    del terms.TERMS["toy_tv"]


def test_a_registered_term_trains_with_one_config_weight(toy_term):
    config = tiny_config()
    model = tokenizer.build_model(config)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    params = model.init(jax.random.key(1), x)["params"]
    rng = jax.random.key(2)

    def run(**weights):
        losses = dict(config.losses.to_dict(), **weights)
        fn = tokenizer_loss.make_loss_fn(model, losses, terms.FrozenNets())
        return fn(params, x, {}, None, None, 0.0, 1.0, rng)

    base_total, (base_terms, _, outputs, _) = run()
    total, (got, _, _, _) = run(toy_tv=0.5)
    want = float(jnp.mean(jnp.abs(jnp.diff(outputs["pixels"], axis=2))))
    assert "toy_tv" not in base_terms
    np.testing.assert_allclose(float(got["toy_tv"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(total), float(base_total) + 0.5 * want, rtol=1e-5)
    # ...and its gradient reaches the tokenizer.
    grads = jax.grad(lambda p: tokenizer_loss.make_loss_fn(
        model, {"toy_tv": 1.0}, terms.FrozenNets())(p, x, {}, None, None, 0.0, 1.0, rng)[0])(
        params)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0


def test_validation_reads_the_registry(toy_term):
    assert terms.problems({"toy_tv": 1.0, "l2": 1.0}, "", 0) == []
    problems = terms.problems({"toy_tvv": 1.0, "semantic": 0.5, "fea_rec": 1.0,
                               "proxy_ce": 0.0}, "maskgit_vqgan", 0)
    assert len(problems) == 3, problems
    assert "toy_tvv" in problems[0] and "toy_tv" in problems[0]  # lists the registered terms
    assert "teacher.name='dinov2'" in problems[1]
    assert "warm-up term" in problems[2]


def test_every_term_is_documented_with_its_needs():
    for name, term in terms.TERMS.items():
        assert term.doc, name
        for need in term.needs:
            assert need.split(":")[0] in ("pixels", "teacher", "perceptual", "discriminator",
                                          "model", "shortcut"), (name, need)
    assert {k for k, t in terms.TERMS.items() if t.warmup} == {"fea_rec", "shortcut"}
    # Every weight of the default table is a registered term.
    assert set(config_lib.base_config().losses) <= set(terms.TERMS)


def test_a_term_registered_wrong_or_needing_what_the_model_lacks_is_one_line(toy_term):
    """A misspelt need ("pixel") skipped the check it names; a cell run again in a notebook
    registers twice; losses.shortcut on a TiTok passed validation, then KeyError 'cnn_map'."""
    with pytest.raises(ValueError, match=r"'bad': needs \['pixel'\] unknown \(known: pixels"):
        terms.register("bad", needs=("pixel",))
    with pytest.raises(ValueError, match=r"registered twice .*del tok1d.objectives.terms."
                                         r"TERMS\['toy_tv'\]"):
        terms.register("toy_tv", needs=("pixels",))(lambda ctx: 0.0)
    model = tokenizer.build_model(tiny_config())
    with pytest.raises(ValueError, match="losses.shortcut needs GigaTok's direct CNN decode"):
        tokenizer_loss.make_loss_fn(model, {"l2": 1.0, "shortcut": 1.0}, terms.FrozenNets())


def _conv_loss(kernel, x):
    for _ in range(2):
        x = jax.nn.relu(jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.mean(jnp.square(x)), x


@pytest.mark.parametrize("on", [True, False])
def test_gated_cond_and_select_agree_in_values_and_gradients(on):
    """`losses.gated` (a term computed only in some steps) gives the same value, tree and
    gradient as `lax.cond` with its "select" form, which CPU programs use: no conditional is
    left in them (XLA:CPU runs a differentiated cond's gradient convolutions on its slow path).
    The term is traced once per form; the off branch gets its shapes."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    kernel = 0.3 * jax.random.normal(jax.random.key(1), (3, 3, 4, 4))

    traces = []

    def on_fn(kernel):
        traces.append(1)
        return _conv_loss(kernel, x)

    def zeros():
        return jnp.zeros((), jnp.float32), jnp.zeros(x.shape, x.dtype)

    def f(kernel, flag, impl):
        value, feats = losses.gated(flag, lambda: on_fn(kernel), zeros, impl)
        return value + 0.1 * jnp.mean(feats), value

    flag = jnp.asarray(on)
    (v_cond, g_cond), (v_sel, g_sel) = [
        jax.jit(jax.grad(f, has_aux=True), static_argnums=2)(kernel, flag, impl)[::-1]
        for impl in ("cond", "select")]
    assert len(traces) == 2, "each form traces the term once"
    np.testing.assert_allclose(v_sel, v_cond, rtol=1e-6)
    np.testing.assert_allclose(g_sel, g_cond, rtol=1e-5, atol=1e-7)
    if on:
        assert float(v_cond) > 0 and float(jnp.max(jnp.abs(g_cond))) > 0
    else:
        assert float(v_sel) == 0 and not np.any(np.asarray(g_sel))
    program = jax.jit(jax.grad(f, has_aux=True), static_argnums=2).lower(
        kernel, flag, "auto").as_text()
    assert ("stablehlo.case" in program) == (jax.default_backend() != "cpu")
    with pytest.raises(ValueError, match="gated impl 'scan'"):
        losses.gated(flag, lambda: 1.0, lambda: 0.0, "scan")
