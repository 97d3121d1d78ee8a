"""Train-step parity of GigaTok tokenizer training with the DINO discriminator
(`train_gigatok*.npz` files with `disc_type: dinodisc`, tests/fixtures/README.md) against the
official vq_train.py step.

The shared machinery of tests/test_train_parity_gigatok.py (config through
`tok1d.official.gigatok.config_from_fixture_meta`, converted official weights, the trainer's
own jitted step `tokenizer.build_training`, per-step log / grad-norm / codes / pixels checks,
tokenizer state checks) runs with the DINO discriminator's parts:

* the heads (`init/disc_sd`, `tok1d.weights.convert.dino_disc.convert_heads`: params + spectral u / v
  as `disc_state`) and the frozen trunk checkpoint (`disc_trunk/sd`, `convert_trunk`, which
  zeroes the key third of the qkv biases as DinoDisc does);
* every DiffAugment call's stored uniforms replayed through `batch["draws"]` by the names of
  `adversarial.DISC_CALLS` ("diffaug/<call>/flags" (3,), "diffaug/<call>/rand01" (7, B)), fixture
  call kinds 0..4 = g/rec, g/direct, d/fake, d/real, d/direct; calls a step does not make get
  placeholder draws (never read) so that every step has the same draw names and the step
  compiles once;
* the unlogged direct terms of the aux + GAN overlap step (`direct_generator_adv_loss`,
  `d_d_adversarial_loss`, `direct_logits_fake`: `discriminator.direct_fake` "reconstruction");
* the heads after D's first update and at the end (each element within the AdamW sign-flip
  bound 2 x sum(lr_D), as the PatchGAN test; the 10 BatchNormLocal-cancelled conv biases of
  `meta.disc_zero_grad_params` are in that bound too), the spectral u / v after D's first
  step and at the end, D's AdamW moments and decay group (heads only: the trunk is frozen).

`test_disc_calls_match_official` checks the trainer's discriminator call alone on the official
inputs of every D call of the first two D steps (logits, sigma), free of the trajectory.

Bounds: float32 run, see `dino_bounds` (step 1 tight, later steps 10x the file's floors).
No float64 repeat here (suite time): the PatchGAN test's float64 run covers the shared step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_parity as tp
import test_train_parity_gigatok as tg
from tok1d.objectives import adversarial
from tok1d.weights.convert import dino_disc as convert_dino
from tok1d.official import gigatok as official
from tok1d.train import tokenizer

DISC_TYPE = "dinodisc"
DIRECT_TERMS = ("direct_generator_adv_loss", "d_d_adversarial_loss", "direct_logits_fake")

# Bounds of the float32 run (README-style): step 1 (no GAN) at the README's tight bounds (as
# the PatchGAN float32 run); later steps at 10x the file's own float32-vs-float64 floors, read
# from its `check/*` entries (loss_gen / logged terms / direct terms, G grad norm per step, D
# grad norm, pixels per step, spectral u / v): this trajectory follows the official one as
# closely as the official float32 run follows its float64 repeat (measured errors 0.3x-1x the
# floors). Not in the file (no floors documented), hence ~10x the measured errors: the AdamW
# moments after step 1 (README 8.3's 1e-3), at the end (measured 4.5e-3) and D's (measured
# 2.5e-3). The D heads: each element within one AdamW sign flip per D step (2 x sum(lr_D)),
# which also covers the BatchNormLocal-cancelled biases (README: absolute 2 x sum(lr_D)).
FLOOR_FACTOR = 10
LATER_MOMENTS = 5e-2
DISC_MOMENTS = 2.5e-2


def dino_bounds(z: tp.Fixture) -> tg.Bounds:
    loss_floors = [np.max(np.asarray(z[k])) for k in z
                   if (k.startswith("check/f32_vs_f64_maxrel/log/")
                       and not k.endswith("codebook_usage"))  # not compared
                   or k in ("check/f32_vs_f64_rel_per_step/loss_gen",
                            "check/f32_vs_f64_maxrel/loss_disc",
                            "check/f32_vs_f64_maxrel/feature_rec_loss",
                            *(f"check/f32_vs_f64_maxrel/{n}" for n in DIRECT_TERMS))]
    disc_grad = np.nanmax(np.asarray(z["check/f32_vs_f64_rel_per_step/grad_norm_disc"]))
    return dataclasses.replace(
        tg.FLOAT32, name="float32 run", later_loss=FLOOR_FACTOR * float(np.nanmax(loss_floors)),
        later_grad_floor=FLOOR_FACTOR, later_grad_min=1e-4,
        later_disc_grad=FLOOR_FACTOR * float(disc_grad), later_moments=LATER_MOMENTS,
        disc_sign_flips=True, disc_moments=(DISC_MOMENTS,) * 2, disc_later_moments=DISC_MOMENTS,
        later_pixels_floor=FLOOR_FACTOR)


def diffaug_draws(z: tp.Fixture, step: int) -> dict[str, np.ndarray]:
    """The DiffAugment draws of one step (1-based) by call name (see the module docstring)."""
    steps, kinds = np.asarray(z["diffaug/call_step"]), np.asarray(z["diffaug/call_kind"])
    flags, rand01 = np.asarray(z["diffaug/flags"]), np.asarray(z["diffaug/rand01"])
    draws = {}
    for kind, call in enumerate(adversarial.DISC_CALLS):
        hit = np.flatnonzero((steps == step) & (kinds == kind))
        i = int(hit[0]) if hit.size else None
        draws[f"diffaug/{call}/flags"] = (flags[i] if i is not None else
                                          np.zeros_like(flags[0])).astype(np.float32)
        draws[f"diffaug/{call}/rand01"] = (rand01[i] if i is not None else
                                           np.zeros_like(rand01[0])).astype(np.float32)
    return draws


@pytest.mark.parametrize("path", tg.CASES)
def test_train_step_matches_official(path):
    z = tp.load(path)
    if tg.disc_type(z) != DISC_TYPE:
        pytest.skip(f"{path}: disc_type={tg.disc_type(z)!r}; this test covers {DISC_TYPE!r}")
    check_fixture(z, dino_bounds(z))


def spectral_sigmas(params, spectral, modules) -> np.ndarray:
    """u . (W v) of every spectral conv (official module names, `meta.disc.spectral_modules`),
    W = the kernel as torch's (out, in * k) matrix."""
    where = {"0.0": ("block_in", "conv"), "1.fn.0": ("block_res", "conv"), "2": ("logits",)}
    out = []
    for name in modules:
        _, t, rest = name.split(".", 2)                          # heads.<t>.<rest>
        stacked = "heads" in params                               # `scan_heads`: one stack
        p, s = (params["heads"], spectral["heads"]) if stacked else (params[f"heads_{t}"],
                                                                     spectral[f"heads_{t}"])
        for k in where[rest]:
            p, s = p[k], s[k]
        p, s = jax.tree.map(lambda x: np.asarray(x)[int(t)] if stacked else x, (p, s))
        kernel = np.asarray(p["kernel"], np.float64)              # (k, in, out)
        w = np.transpose(kernel, (2, 1, 0)).reshape(kernel.shape[2], -1)
        out.append(np.asarray(s["u"], np.float64) @ w @ np.asarray(s["v"], np.float64))
    return np.asarray(out)


@pytest.mark.parametrize("path", tg.CASES)
def test_disc_calls_match_official(path):
    """The trainer's discriminator call (`GANObjective.apply`: DiffAugment from the
    injected draws, the frozen trunk, the spectral-norm heads in train mode) on the official
    inputs of every D call of the first two D steps (x_hat = `step/recons`, x = `images`), in
    order, threading the spectral-norm state from `init/disc_sd` (then `disc_first/disc_sd`):
    logits (all heads) and sigma after each call (README "suggested tests": the discriminator
    without the generator's trajectory; logits <= 1e-5 relative, sigma <= 1e-6)."""
    z = tp.load(path)
    if tg.disc_type(z) != DISC_TYPE:
        pytest.skip(f"{path}: disc_type={tg.disc_type(z)!r}; this test covers {DISC_TYPE!r}")
    config = official.config_from_fixture_meta(z.meta)
    config.discriminator.allow_random_init = True
    model = tokenizer.build_model(config)
    size = config.data.image_size
    gan = tokenizer.build_gan(config, model, jnp.zeros((1, size, size, 3), jnp.float32))
    disc = gan.disc
    apply = jax.jit(functools.partial(gan.apply, call="call"))
    trunk = convert_dino.convert_trunk(tg.state_dicts(z, "disc_trunk/sd/"), disc)
    modules = z.meta["disc"]["spectral_modules"]
    call_step, kinds = np.asarray(z["disc_call/step"]), np.asarray(z["diffaug/call_kind"])
    images, recons = tg.nchw_to_nhwc(z["images"]), tg.nchw_to_nhwc(z["step/recons"])
    d_steps = sorted(set(call_step.tolist()))[:2]
    report = tp.Report("gigatok dino disc (D calls on official inputs)", path)
    with jax.default_matmul_precision("highest"):
        for step, prefix in zip(d_steps, ("init/disc_sd/", "disc_first/disc_sd/")):
            heads, spectral = convert_dino.convert_heads(tg.state_dicts(z, prefix), disc)
            params, state = {**heads, "trunk": trunk}, {"spectral": spectral}
            for i in np.flatnonzero(call_step == step):
                x = images[step - 1] if kinds[i] == 3 else recons[step - 1]
                draws = {"diffaug/call/flags": np.asarray(z["diffaug/flags"][i], np.float32),
                         "diffaug/call/rand01": np.asarray(z["diffaug/rand01"][i], np.float32)}
                logits, state = apply(params, state, x, jax.random.key(0), draws)
                kind = adversarial.DISC_CALLS[kinds[i]]
                report.rel(f"disc_call_logits[{i}: step {step} {kind}]", np.asarray(logits),
                           z["disc_call/logits"][i], 1e-5)
                report.rel(f"disc_call_sigma[{i}: step {step} {kind}]",
                           spectral_sigmas(heads, jax.device_get(state["spectral"]), modules),
                           z["disc_call/sigma"][i], 1e-6)
    report.finish()


def check_fixture(z: tp.Fixture, bounds: tg.Bounds) -> None:
    meta = z.meta
    # one program for every step (config.phase_programs=False): the gigatok parity test runs
    # the trainer's default, one per phase
    config, mesh, rules, t = tg.build(z, phase_programs=False)
    assert config.discriminator.direct_fake == "reconstruction"
    report = tp.Report(f"gigatok dino disc ({bounds.name})", z.path)
    sd, convert, params0, frozen = tg.tokenizer_weights(z, t)
    disc_sd = tg.state_dicts(z, "init/disc_sd/")
    heads0, spectral0 = convert_dino.convert_heads(disc_sd, t.gan.disc)
    trunk = convert_dino.convert_trunk(tg.state_dicts(z, "disc_trunk/sd/"), t.gan.disc)
    images, data, first_d = tg.batches(z, functools.partial(diffaug_draws, z))
    steps = images.shape[0]
    scalars, states, fwd, teacher_feat = tg.run_steps(
        t, config, mesh, rules, frozen, data, images, first_d,
        lambda state: state.replace(
            params=tg.put(params0, state.params),
            ema_params=None if state.ema_params is None else tg.put(params0, state.ema_params),
            extras={"gan": state.extras["gan"].replace(
                params=tg.put({**heads0, "trunk": trunk}, state.extras["gan"].params),
                collections=tg.put({"spectral": spectral0}, state.extras["gan"].collections))}))

    # ------------------------------------------------------------ tokenizer
    tg.compare_steps(report, z, config, scalars, fwd, bounds, extra_names=DIRECT_TERMS)
    report.rel("step1_teacher_feat", teacher_feat, z["step1/teacher_feat"], tg.FEATURES_REL)
    tg.compare_tokenizer_state(report, z, config, sd, convert, params0, states, bounds)

    # ------------------------------------------------------------ discriminator
    heads = lambda tree: {k: v for k, v in tree.items() if k != "trunk"}  # noqa: E731
    uv = ("weight_u", "weight_v")
    d_keys = [k for k in disc_sd if not k.endswith(uv)]
    s_keys = [k for k in disc_sd if k.endswith(uv)]
    dmap = tp.TensorMap(lambda s: convert_dino.convert_heads(s, t.gan.disc)[0], disc_sd, d_keys)
    smap = tp.TensorMap(lambda s: convert_dino.convert_heads(s, t.gan.disc)[1], disc_sd, s_keys)
    lrs_d = np.nan_to_num(np.asarray(z["step/lr_disc"], np.float64))
    for tag in ("disc_first", "final"):
        n = first_d + 1 if tag == "disc_first" else steps
        rel = FLOOR_FACTOR * float(z[f"check/f32_vs_f64_maxrel/{tag}_spectral_uv"])
        want_sd = tg.state_dicts(z, f"{tag}/disc_sd/")
        for key, (want, got) in dmap.pairs({k: want_sd[k] for k in d_keys},
                                           heads(states[tag].extras["gan"].params)).items():
            report.abs(f"{tag}_disc_params[{key}] (<= sign flips)", got, want,
                       tg.FLIP_MARGIN * tg.tpg.zero_grad_bound(lrs_d, n))
        for key, (want, got) in smap.pairs({k: want_sd[k] for k in s_keys},
                                           states[tag].extras["gan"].collections["spectral"]).items():
            report.rel(f"{tag}_disc_spectral[{key}]", got, want, rel)
        tg.moments(report, z, tag, "disc_adam", dmap,
                   states[tag].extras["gan"].opt_state,
                   bounds.disc_moments if tag == "disc_first"
                   else (bounds.disc_later_moments,) * 2)
    tg.decay_groups(report, "discriminator", dmap, meta["param_groups"]["disc"],
                    config.disc_optim, heads0)
    report.finish()
