"""MaskGIT generator parity with the official ImageBert / UViTBert (golden fixtures, titok.npz).

Each generator is built from the official config stored in the fixture, its weights are
converted with `tok1d.weights.convert.maskgit`, and the conditional / unconditional logits (float32
bound) and the deterministic samples of every guidance schedule the file stores (exactly) are
reproduced. The generators and schedules are read from the file.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import params_from_fixture, rel_err
from tok1d.weights.convert import common
from tok1d.weights.convert import maskgit as maskgit_convert
from tok1d.generation import maskgit as gen
from tok1d.models.generators import maskgit

TRANSFORMER_TOL = 2e-5
SAMPLES = "/out/generate_T0_"  # <m>/out/generate_T0_<schedule>: deterministic (T=0) samples


def generators(z):
    """Names of the MaskGIT generators a titok.npz-format file holds (`<m>/config` with a
    `model.generator`)."""
    return [key[:-len("/config")] for key in z.files
            if key.endswith("/config") and key.count("/") == 1
            and "generator" in json.loads(str(z[key])).get("model", {})]


def logit_cases(z):
    """Every generator; ImageBert (arch "vit") also unscanned."""
    cases = []
    for name in generators(z):
        cases.append(pytest.param(name, {}, id=name))
        config = json.loads(str(z[f"{name}/config"]))
        if maskgit_convert.kwargs_from_official(config)["arch"] == "vit":
            cases.append(pytest.param(name, {"scan": False}, id=f"{name}-unscanned"))
    return cases


def sample_cases(z):
    """(generator, schedule) for every schedule in `<m>/sampling` and every stored sample (one
    without settings fails and names itself)."""
    cases = []
    for name in generators(z):
        key = f"{name}/sampling"
        settings = json.loads(str(z[key])) if key in z.files else {}
        schedules = [k for k in settings if k != "common"]
        prefix = name + SAMPLES
        schedules += [k[len(prefix):] for k in z.files
                      if k.startswith(prefix) and k[len(prefix):] not in schedules]
        cases += [pytest.param(name, s, id=f"{name}-{s}") for s in schedules]
    return cases


@pytest.fixture(scope="module")
def npz(fixtures_dir):
    path = os.path.join(fixtures_dir, "titok.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return np.load(path), path


def build(npz, name, **overrides):
    z, path = npz
    config = json.loads(str(z[f"{name}/config"]))
    kwargs = maskgit_convert.kwargs_from_official(config)
    kwargs.update(overrides)
    model = maskgit.build(**kwargs)
    sd = common.load_state_dict(path, prefix=f"{name}/sd/")
    return z, model, maskgit_convert.convert_maskgit(sd, model)


def inputs(z, name):
    return (jnp.asarray(z[f"{name}/in/input_ids"], jnp.int32),
            jnp.asarray(z[f"{name}/in/labels"], jnp.int32))


@pytest.mark.parametrize("name,overrides", params_from_fixture("titok.npz", logit_cases, 2))
def test_logits(npz, name, overrides):
    z, model, params = build(npz, name, **overrides)
    ids, labels = inputs(z, name)
    null = jnp.full_like(labels, model.null_label)
    with jax.default_matmul_precision("highest"):
        cond = model.apply({"params": params}, ids, labels)
        uncond = model.apply({"params": params}, ids, null)
    assert cond.dtype == jnp.float32
    e_cond = rel_err(cond, z[f"{name}/out/logits_cond"])
    e_uncond = rel_err(uncond, z[f"{name}/out/logits_uncond"])
    print(f"{name} {overrides}: logits_cond {e_cond:.2e}, logits_uncond {e_uncond:.2e}")
    assert e_cond < TRANSFORMER_TOL and e_uncond < TRANSFORMER_TOL


@pytest.fixture(scope="module")
def built(npz):
    """One converted generator per name (shared by its schedules)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(npz, name)
        return cache[name]
    return get


@pytest.mark.parametrize("name,schedule", params_from_fixture("titok.npz", sample_cases, 2))
def test_deterministic_samples(built, name, schedule):
    z, model, params = built(name)
    _, labels = inputs(z, name)
    settings = (json.loads(str(z[f"{name}/sampling"])) if f"{name}/sampling" in z.files
                else {})
    assert schedule in settings, f"{name}{SAMPLES}{schedule} is stored without settings"
    assert f"{name}{SAMPLES}{schedule}" in z.files, f"no stored samples for {name} {schedule}"
    common_settings = settings["common"]
    assert common_settings["randomize_temperature"] == 0.0  # rng is irrelevant
    s = {**common_settings, **settings[schedule]}
    with jax.default_matmul_precision("highest"):
        ids = gen.sample(model, params, labels, jax.random.key(123),
                         num_steps=s["num_sample_steps"],
                         guidance_scale=s["guidance_scale"], guidance_schedule=schedule,
                         guidance_pow=s.get("guidance_scale_pow", 3.0),
                         randomize_temperature=s["randomize_temperature"],
                         softmax_annealing=s["softmax_temperature_annealing"])
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), z[f"{name}{SAMPLES}{schedule}"],
                                  err_msg=f"{name} {schedule}")


@pytest.mark.parametrize("name", params_from_fixture("titok.npz", generators))
def test_infer_kwargs_recovers_the_config(npz, name):
    z, path = npz
    config = json.loads(str(z[f"{name}/config"]))
    sd = common.load_state_dict(path, prefix=f"{name}/sd/")
    assert maskgit_convert.infer_kwargs(sd, config) == maskgit_convert.kwargs_from_official(config)
    # Without a config everything but the heads (default 16, as released) comes from the shapes.
    inferred = maskgit_convert.infer_kwargs(sd)
    from_config = maskgit_convert.kwargs_from_official(config)
    assert inferred["num_heads"] == 16
    for key in ("arch", "codebook_size", "num_tokens", "num_classes", "width", "depth", "mlp_dim"):
        assert inferred[key] == from_config[key], key


def test_conversion_errors_name_every_problem(npz):
    z, path = npz
    config = json.loads(str(z["gen_vit/config"]))
    model = maskgit.build(**maskgit_convert.kwargs_from_official(config))
    sd = common.load_state_dict(path, prefix="gen_vit/sd/")
    positions = sd["model.embeddings.position_embeddings.weight"].shape[0]
    sd["model.embeddings.position_ids"] = np.arange(positions)[None]  # old transformers: ignored
    last = config["model"]["generator"]["num_hidden_layers"] - 1
    dropped = f"model.encoder.layer.{last}.output.LayerNorm.bias"
    sd["model.extra_thing"] = sd.pop(dropped)
    codes, width = sd["model.lm_head.weight"].shape
    sd["model.lm_head.weight"] = sd["model.lm_head.weight"][:codes - 1]
    with pytest.raises(common.ConversionError) as e:
        maskgit_convert.convert_maskgit(sd, model)
    msg = str(e.value)
    assert dropped in msg and "model.extra_thing" in msg
    assert (f"lm_head/kernel: model expects {(width, codes)}" in msg
            and f"gives {(width, codes - 1)}" in msg), msg
    assert "position_ids" not in msg

    config = json.loads(str(z["gen_uvit/config"]))
    model = maskgit.build(**maskgit_convert.kwargs_from_official(config))
    sd = common.load_state_dict(path, prefix="gen_uvit/sd/")
    dropped = sorted(k for k in sd if k.endswith(".skip_linear.bias"))[0]
    del sd[dropped]
    with pytest.raises(common.ConversionError, match=re.escape(dropped)):
        maskgit_convert.convert_maskgit(sd, model)
    with pytest.raises(common.ConversionError, match="neither ImageBert"):
        maskgit_convert.infer_kwargs({"foo": np.zeros(3)})
