"""MaskGIT generator parity with the official ImageBert / UViTBert (golden fixtures, titok.npz).

Each generator is built from the official config stored in the fixture, its weights are
converted with `tok1d.convert.maskgit`, and the conditional / unconditional logits (float32
bound) and the deterministic samples of the three guidance schedules (exactly) are reproduced.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.convert import common, maskgit as maskgit_convert
from tok1d.generation import maskgit as gen
from tok1d.models import maskgit

TRANSFORMER_TOL = 2e-5
MODELS = ("gen_vit", "gen_uvit")
SCHEDULES = ("constant", "linear", "power-cosine")


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


@pytest.mark.parametrize("name,overrides", [("gen_vit", {}), ("gen_vit", {"scan": False}),
                                            ("gen_uvit", {})])
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


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_samples(npz, name):
    z, model, params = build(npz, name)
    _, labels = inputs(z, name)
    settings = json.loads(str(z[f"{name}/sampling"]))
    common_settings = settings["common"]
    assert common_settings["randomize_temperature"] == 0.0  # rng is irrelevant
    for schedule in SCHEDULES:
        s = settings[schedule]
        with jax.default_matmul_precision("highest"):
            ids = gen.sample(model, params, labels, jax.random.key(123),
                             num_steps=common_settings["num_sample_steps"],
                             guidance_scale=s["guidance_scale"], guidance_schedule=schedule,
                             guidance_pow=s.get("guidance_scale_pow", 3.0),
                             randomize_temperature=common_settings["randomize_temperature"],
                             softmax_annealing=common_settings["softmax_temperature_annealing"])
        assert ids.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(ids), z[f"{name}/out/generate_T0_{schedule}"],
                                      err_msg=f"{name} {schedule}")


@pytest.mark.parametrize("name", MODELS)
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
    sd["model.embeddings.position_ids"] = np.arange(33)[None]  # old transformers: ignored
    sd["model.extra_thing"] = sd.pop("model.encoder.layer.1.output.LayerNorm.bias")
    sd["model.lm_head.weight"] = sd["model.lm_head.weight"][:100]
    with pytest.raises(common.ConversionError) as e:
        maskgit_convert.convert_maskgit(sd, model)
    msg = str(e.value)
    assert "model.encoder.layer.1.output.LayerNorm.bias" in msg and "model.extra_thing" in msg
    assert "lm_head/kernel" in msg and "(64, 100)" in msg
    assert "position_ids" not in msg

    config = json.loads(str(z["gen_uvit/config"]))
    model = maskgit.build(**maskgit_convert.kwargs_from_official(config))
    sd = common.load_state_dict(path, prefix="gen_uvit/sd/")
    del sd["out_blocks.0.skip_linear.bias"]
    with pytest.raises(common.ConversionError, match="out_blocks.0.skip_linear.bias"):
        maskgit_convert.convert_maskgit(sd, model)
    with pytest.raises(common.ConversionError, match="neither ImageBert"):
        maskgit_convert.infer_kwargs({"foo": np.zeros(3)})
