"""Parity of RAR with the official PyTorch code (`rar.npz`, fixture README section "rar.npz,
train_rar.npz"): the model is built from the file's stored official config
(`tok1d.official.rar.model_kwargs`), its official weights converted
(`tok1d.weights.convert.rar`); compared are the condition ids after the label drop, the
teacher-forced logits under the raster order and under the stored permutations, the official
AR loss and accuracy through the real loss function (with the official draws replayed), and
the deterministic CFG sampling (official `generate` with its KV cache) under the four released
schedules and the README demo's, each with three injected samplers: inverse-CDF uniforms and
Gumbel noise replayed through the sampler's draws, and greedy decoding. Sampled ids must be
equal (the fixture stores float64 margins of every decision)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import train_parity as tp
from conftest import rel_err
from tok1d.generation import autoregressive as ar
from tok1d.models.generators.rar import RAR
from tok1d.objectives import tokens as token_obj
from tok1d.official import rar as official
from tok1d.weights.convert import rar as convert_rar

LOGITS_REL = 2e-5   # README: logits 2e-5 relative, losses 1e-5, cfg scale 1e-6
LOSS_REL = 1e-5
SCALE_REL = 1e-6
SETTINGS = ("rar_b", "rar_l", "rar_xl", "rar_xxl", "demo")
VARIANTS = ("icdf", "gumbel", "greedy")
PATHS = tp.fixture_params("rar.npz")


@pytest.fixture(scope="module", params=PATHS)
def fixture(request):
    """(file, model, converted params, official config) of one rar.npz."""
    z = tp.load(request.param)
    config = json.loads(str(z["rar/config"]))
    model = RAR(**official.model_kwargs(config))
    sd = {k: np.asarray(v, np.float32) for k, v in z.sub("rar/sd/").items()}
    return z, model, convert_rar.convert_rar(sd, model, what=request.param), config


def _labels(z, model):
    """Class labels after the official label drop (dropped -> the null label)."""
    return np.where(z["rar/in/drop_labels"] == 1, model.null_label, z["rar/in/labels"])


def test_condition_ids_and_teacher_forced_logits(fixture):
    z, model, params, _ = fixture
    n = model.num_tokens
    labels = _labels(z, model)
    np.testing.assert_array_equal(labels + model.vocab_size + 1, z["rar/in/condition_ids"])
    tokens = jnp.asarray(z["rar/in/tokens"], jnp.int32)
    apply = jax.jit(model.apply)
    with jax.default_matmul_precision("highest"):
        raster = apply({"params": params}, tokens, jnp.asarray(labels))
        perm = apply({"params": params}, tokens, jnp.asarray(labels),
                     orders=jnp.asarray(z["rar/in/orders"], jnp.int32))
    for name, got in (("raster", raster), ("perm", perm)):
        want = z[f"rar/out/logits_{name}"][:, :n]  # upstream's last output is never used
        assert rel_err(got, want) < LOGITS_REL, name
        np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))


def test_loss_through_the_loss_function_with_the_official_draws(fixture):
    """The generator loss (`make_loss_fn`, objective "permuted_next_token") at a step where the
    anneal gives the file's random ratio, with the official label-drop and order draws
    replayed, is the official `ARLoss` of the permuted forward; evaluation reads raster order."""
    z, model, params, _ = fixture
    ratio = float(z["rar/in/random_ratio"])
    gcfg = ml_collections.ConfigDict(dict(label_dropout=0.1, randomness_anneal_start=0,
                                          randomness_anneal_end=4))
    step = round(4 * (1 - ratio))
    assert token_obj.random_ratio(step, 0, 4) == ratio
    perms = np.asarray(z["rar/in/orders"])  # the permuted rows are the randperm draws
    batch = {"codes": z["rar/in/tokens"], "label": z["rar/in/labels"],
             "draws": {"drop_rand_u": z["rar/in/drop_rand_u"],
                       "order_rand_u": np.asarray(z["rar/in/order_u"], np.float32),
                       "order_perms": perms}}
    orders = token_obj.random_orders(jax.random.key(0), *perms.shape, ratio,
                                     draw=lambda name, f: batch["draws"].get(name, f()))
    np.testing.assert_array_equal(orders, z["rar/in/orders"])
    loss_fn = token_obj.make_loss_fn(model, gcfg)
    with jax.default_matmul_precision("highest"):
        loss, metrics = jax.jit(loss_fn, static_argnums=(3,))(params, batch, jax.random.key(0),
                                                              True, step)
        raster, raster_metrics = jax.jit(loss_fn, static_argnums=(3,))(
            params, {**batch, "label": _labels(z, model)}, jax.random.key(0), False)
    assert rel_err(loss, z["rar/out/loss_perm"]) < LOSS_REL
    assert float(metrics["accuracy"]) == float(z["rar/out/correct_tokens_perm"])
    assert float(metrics["random_ratio"]) == ratio
    assert rel_err(raster, z["rar/out/loss_raster"]) < LOSS_REL
    assert float(raster_metrics["accuracy"]) == float(z["rar/out/correct_tokens_raster"])


@pytest.mark.parametrize("setting", SETTINGS)
def test_guidance_schedule(fixture, setting):
    z, model, _, _ = fixture
    params = json.loads(str(z[f"sample/{setting}/gumbel/params"]))
    scales, guide, cfg = ar.rar_guidance_plan(model.num_tokens, params["guidance_scale"],
                                              params["guidance_scale_pow"])
    assert cfg and guide.all()
    assert rel_err(scales, z[f"sample/{setting}/gumbel/cfg_scale"]) < SCALE_REL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_cfg_sampling_is_exact(fixture, setting, variant):
    """The jitted sampler (KV cache, one program) with the official noise replayed gives the
    official ids; teacher forcing on them gives every step's conditional and unconditional
    logits."""
    z, model, params, _ = fixture
    pre = f"sample/{setting}/{variant}/"
    opts = json.loads(str(z[pre + "params"]))
    labels = jnp.asarray(z["sample/labels"], jnp.int32)
    sampler = ar.make_rar_sampler(model, guidance_scale=opts["guidance_scale"],
                                  guidance_scale_pow=opts["guidance_scale_pow"],
                                  randomize_temperature=opts["randomize_temperature"],
                                  greedy=variant == "greedy")
    draws = ({"uniform": jnp.asarray(z[pre + "uniform"])} if variant == "icdf" else
             {"gumbel": jnp.asarray(z[pre + "gumbel"])} if variant == "gumbel" else None)
    with jax.default_matmul_precision("highest"):
        ids = sampler(params, labels, jax.random.key(0), draws)
        apply = jax.jit(model.apply)
        cond = apply({"params": params}, ids, labels)
        uncond = apply({"params": params}, ids, jnp.full_like(labels, model.null_label))
    np.testing.assert_array_equal(np.asarray(ids), z[pre + "ids"])
    assert rel_err(np.swapaxes(cond, 0, 1), z[pre + "cond_logits"]) < LOGITS_REL
    assert rel_err(np.swapaxes(uncond, 0, 1), z[pre + "uncond_logits"]) < LOGITS_REL
