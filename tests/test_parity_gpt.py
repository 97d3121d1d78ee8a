"""GigaTok's LlamaGen GPT (`gpt_1d.Transformer`, c2i) against the official module: built from
the config stored in the fixture, official weights converted; teacher-forced logits, the eval
cross-entropy and every greedy CFG generation the file stores (KV cache; the runs and their
settings are read from the file's `meta_json["gpt"]["runs"]`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import params_from_fixture, rel_err
from tok1d.weights.convert import common
from tok1d.weights.convert import gpt as convert_gpt
from tok1d.generation import autoregressive
from tok1d.models.generators.gpt import GPT


@pytest.fixture(scope="module")
def built(fixtures_dir):
    path = os.path.join(fixtures_dir, "gigatok_1d.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    z = np.load(path)
    cfg = json.loads(str(z["meta_json"]))["gpt"]
    sd = common.load_state_dict(path, prefix="gpt_sd/")
    kwargs = convert_gpt.infer_kwargs(sd, num_heads=cfg["n_head"])
    assert (kwargs["width"], kwargs["depth"], kwargs["vocab_size"], kwargs["num_tokens"],
            kwargs["rope"]) == (cfg["dim"], cfg["n_layer"], cfg["vocab"], cfg["block_size"],
                                cfg["rope"])
    assert cfg["cls_token_num"] == 1
    model = GPT(**kwargs)
    return z, cfg, sd, model, convert_gpt.convert_gpt(sd, model)


def test_teacher_forced_logits_and_loss(built):
    z, cfg, sd, model, params = built
    codes = jnp.asarray(z["gpt/input_codes"], jnp.int32)
    labels = jnp.asarray(z["gpt/labels"], jnp.int32)
    with jax.default_matmul_precision("highest"):
        logits = model.apply({"params": params}, codes, labels)
    want = z["gpt/logits_teacher_forced"]
    err = rel_err(logits, want)
    print(f"gpt logits rel_err {err:.2e}")
    assert err < 2e-5
    lg = np.asarray(logits, np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    ce = -np.mean(np.take_along_axis(logp, np.asarray(codes)[..., None], axis=-1))
    err = rel_err(ce, z["gpt/ce_loss_eval"])
    print(f"gpt CE rel_err {err:.2e}")
    assert err < 1e-5


# gpt/* arrays that are inputs / teacher-forced outputs, not generation runs.
NOT_RUNS = ("labels", "input_codes", "logits_teacher_forced", "ce_loss_eval")


def stored_runs(z):
    """The generation runs of a gigatok_1d-format file: those its `meta_json["gpt"]["runs"]`
    lists, then any stored integer (B, N) `gpt/<run>` array without settings there (its test
    fails and names it, rather than leaving it untested)."""
    runs = list(json.loads(str(z["meta_json"])).get("gpt", {}).get("runs", {}))
    for key in z.files:
        name = key[len("gpt/"):]
        if (key.startswith("gpt/") and "/" not in name and name not in NOT_RUNS
                and name not in runs):
            value = z[key]
            if value.dtype.kind in "iu" and value.ndim == 2:
                runs.append(name)
    return runs


@pytest.mark.parametrize("run", params_from_fixture("gigatok_1d.npz", stored_runs))
def test_greedy_cfg_generation_is_exact(built, run):
    z, cfg, sd, model, params = built
    runs = cfg.get("runs", {})
    assert run in runs, f"gpt/{run} is stored but meta_json['gpt']['runs'] has no settings for it"
    assert f"gpt/{run}" in z.files, f"meta_json['gpt']['runs'] lists {run!r}; gpt/{run} is absent"
    spec = runs[run]
    if not spec.get("greedy", cfg.get("greedy", True)):
        pytest.skip(f"{run}: a sampled (non-greedy) run draws PyTorch random numbers; only "
                    "greedy runs are reproducible")
    optional = {k: spec[k] for k in ("cfg_interval", "temperature", "top_k", "top_p")
                if k in spec}
    labels = jnp.asarray(z["gpt/labels"], jnp.int32)
    with jax.default_matmul_precision("highest"):
        codes = autoregressive.sample(
            model, params, labels, jax.random.key(0), cfg_scale=spec["cfg_scale"],
            cfg_schedule=spec["schedule"], cfg_kwargs=spec.get("schedule_kwargs") or {},
            greedy=True, **optional)
    np.testing.assert_array_equal(np.asarray(codes), z[f"gpt/{run}"], err_msg=run)


def test_converter_errors_name_the_keys(built):
    z, cfg, sd, model, params = built
    bad = dict(sd)
    missing = f"layers.{cfg['n_layer'] - 1}.feed_forward.w3.weight"  # the last layer's
    del bad[missing]
    bad["layers.0.extra.weight"] = np.zeros(3, np.float32)
    bad["norm.weight"] = np.zeros(cfg["dim"] + 1, np.float32)
    with pytest.raises(common.ConversionError) as e:
        convert_gpt.convert_gpt(bad, model)
    msg = str(e.value)
    assert missing in msg
    assert "layers.0.extra.weight" in msg
    assert "norm.weight" in msg and str((cfg["dim"] + 1,)) in msg


def test_torch_compile_prefix_and_unscanned_model(built):
    z, cfg, sd, model, params = built
    prefixed = {f"_orig_mod.{k}": v for k, v in sd.items()}
    flat = model.clone(scan=False)
    unscanned = convert_gpt.convert_gpt(prefixed, flat)
    codes = jnp.asarray(z["gpt/input_codes"], jnp.int32)
    labels = jnp.asarray(z["gpt/labels"], jnp.int32)
    with jax.default_matmul_precision("highest"):
        a = model.apply({"params": params}, codes, labels)
        b = flat.apply({"params": unscanned}, codes, labels)
    assert rel_err(b, a) < 1e-6


def test_convert_file_reads_training_checkpoints(built, tmp_path):
    """Official training checkpoints: {"model", "optimizer", "steps", "args" (a Namespace)
    [, "ema"]}, weights saved from the torch.compile'd module (`_orig_mod.` keys)."""
    torch = pytest.importorskip("torch")
    import argparse
    z, cfg, sd, model, params = built
    weights = {f"_orig_mod.{k}": torch.from_numpy(np.asarray(v, np.float32))
               for k, v in sd.items()}
    ema = {k: v * 0 for k, v in weights.items()}
    path = str(tmp_path / "0250000.pt")
    torch.save({"model": weights, "ema": ema, "optimizer": {}, "steps": 250000,
                "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    loaded, converted = convert_gpt.convert_file(path, num_heads=cfg["n_head"])
    assert loaded == model
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    _, from_ema = convert_gpt.convert_file(path, num_heads=cfg["n_head"], weights="ema")
    assert all(not np.any(x) for x in jax.tree.leaves(from_ema))
    # A released size that does not fit the file's model is refused.
    from tok1d.models.generators.gpt import GPT_SIZES
    size = next(k for k, v in GPT_SIZES.items()
                if (v["width"], v["depth"]) != (cfg["dim"], cfg["n_layer"]))
    with pytest.raises(common.ConversionError, match="width"):
        convert_gpt.convert_file(path, size=size)
