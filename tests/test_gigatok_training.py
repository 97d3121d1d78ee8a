"""GigaTok training on the embedded data with a tiny model and tiny frozen networks: every loss
term (L2, LPIPS, VQ, entropy, semantic vs DINOv2, warm-up feature-reconstruction and shortcut
terms, PatchGAN) is finite and the learnable ones drop; switching the semantic or the entropy
loss off removes exactly that term; the DINOv2 teacher is frozen (no gradient, no optimizer
state); the warm-up terms stop at aux_loss_end_step; every GigaTok config validates."""

import contextlib
import io
import json
import os

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO

from tok1d import parallel
from tok1d.train import checkpoint, config_lib
from tok1d.objectives import adversarial, losses, tokenizer_loss
from tok1d.weights import loaders
from tok1d.data import pipeline, sources
from tok1d.train import tokenizer

# Tiny GigaTok: 32 px, CNN 32 channels down to an 8x8 map (64 decoder tokens), 16 latent tokens.
TINY_MODEL = dict(encoder_ch=32, decoder_ch=32, encoder_ch_mult=(1, 1, 1),
                  decoder_ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32,
                  encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=32,
                  decoder_depth=2, decoder_heads=2, num_latent_tokens=16, codebook_size=64,
                  distill_depth=1, out_inner_dim=32, remat="none")
# Tiny DINOv2 teacher (patch 14, width 32): 8x8 patches at 112 px.
TINY_TEACHER = dict(embed_dim=32, depth=1, num_heads=2)
# A narrow random LPIPS (VGG16 block widths): the released widths cost 3/4 of a step's FLOPs.
TINY_LPIPS = (8, 16, 32, 32, 32)


def tiny(config, steps, aux_end=0, gan_start=None):
    config.total_steps = steps
    config.batch_size = config.eval_batch_size = 16
    config.precision = config.loss_precision = "float32"
    config.model = dict(name="gigatok", **TINY_MODEL)
    # random_crop, not the recipe's adm_random_crop: at 32 px the scale jitter tips this tiny
    # codebook into collapse even with the entropy term (seen in CI), which says nothing about
    # the recipe.
    config.data.update(name="demo", image_size=32, eval_examples=16, demo_size=512,
                       num_workers=0, augment="random_crop")
    config.aux_loss_end_step = aux_end
    if not aux_end:
        config.losses.update(fea_rec=0.0, shortcut=0.0)
    config.teacher.model = dict(TINY_TEACHER)
    config.teacher.allow_random_init = True
    config.perceptual.allow_random_init = True
    # Eval-mode LPIPS: the recipe's training-mode dropout (official) makes this 20-step run's
    # code usage a matter of luck (it collapses with this seed).
    config.perceptual.lpips_dropout = 0.0
    config.perceptual.lpips_channels = TINY_LPIPS
    config.discriminator.model = dict(base_channels=16, num_layers=2)
    config.discriminator.start_step = steps if gan_start is None else gan_start
    for o in (config.optim, config.disc_optim):
        # "before": the first update runs at the warm-up's lr / 100. The recipe's official
        # "after_call" stepping runs it at the full lr, which at 5e-4 collapses this tiny
        # codebook onto one code in one step (the official quirk is checked by
        # tests/test_train_parity_gigatok.py).
        o.update(lr=5e-4, warmup_steps=2, schedule_step="before")
    config.mesh.update(data=-1, fsdp=1)
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint.update(every_steps=1000, keep=1, async_save=False)
    config.num_grid_images = 4
    return config


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train/loss"' in line]


def series(workdir, key):
    return [r[f"train/{key}"] for r in rows(workdir) if f"train/{key}" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """B-L recipe with every term on (plus the entropy term, which B-L leaves at 0 and which
    keeps this tiny codebook from collapsing): 40 steps, warm-up terms until step 20, GAN from
    step 20 (with the narrow LPIPS a step takes about 0.5 s on 2 cores): two phases, each
    with its own train step, the second compiled in the background."""
    config = tiny(config_lib.load(os.path.join(REPO, "configs/gigatok.py:b_l")), steps=40,
                  aux_end=20, gan_start=20)
    config.losses.entropy = 0.1
    workdir = str(tmp_path_factory.mktemp("gigatok_full"))
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        result = tokenizer.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "console.txt"), "w") as f:
        f.write(console.getvalue())
    return config, workdir, result


def test_every_term_is_finite_and_the_learned_ones_drop(full_run):
    config, workdir, result = full_run
    steps, aux_end, gan_start = (config.total_steps, config.aux_loss_end_step,
                                 config.discriminator.start_step)
    for term in ("l2", "perceptual", "quantizer", "entropy", "semantic", "fea_rec", "shortcut",
                 "gan"):
        values = series(workdir, f"loss_{term}")
        assert len(values) == steps and np.all(np.isfinite(values)), (term, values)
    assert np.all(np.isfinite(series(workdir, "d_loss")))
    # The entropy term swings widely over the first steps from the random codebook (e.g.
    # -1.0, -1.3, -0.4), so it is compared with its first half's mean, the others with
    # their first three steps.
    for term, stop, head in (("l2", gan_start, 3), ("perceptual", gan_start, 3),
                             ("semantic", gan_start, 3), ("quantizer", gan_start, 3),
                             ("entropy", steps, steps // 2), ("fea_rec", aux_end, 3),
                             ("shortcut", aux_end, 3)):
        v = series(workdir, f"loss_{term}")[:stop]  # before the GAN / the warm-up end
        assert np.mean(v[-3:]) < np.mean(v[:head]), (term, v)
    assert np.isfinite(result["psnr"]) and 0 < result["codebook_usage"] <= 1


def test_warmup_terms_and_the_gan_start_on_schedule(full_run):
    config, workdir, _ = full_run
    steps, aux_end, gan_start = (config.total_steps, config.aux_loss_end_step,
                                 config.discriminator.start_step)
    assert series(workdir, "warmup_losses_active") == [1.0] * aux_end + [0.0] * (steps - aux_end)
    for term in ("shortcut", "fea_rec"):  # the later program computes neither (fea_rec was
        values = series(workdir, f"loss_{term}")  # still computed and logged)
        assert all(v > 0 for v in values[:aux_end]) and all(v == 0 for v in values[aux_end:])
    assert series(workdir, "gan_active") == [0.0] * gan_start + [1.0] * (steps - gan_start)
    with open(os.path.join(workdir, "console.txt")) as f:
        switches = [line for line in f if "this phase's train step" in line]
    assert len(switches) == 1 and switches[0].startswith(
        f"step {aux_end + 1}: warm-up terms off, discriminator on; this phase's train step "
        "compiled in the background"), switches


def test_only_the_tokenizer_is_optimized(full_run):
    _, workdir, _ = full_run
    state = loaders.load_training_state(workdir)
    assert set(state["params"]) == {"encoder", "decoder", "vit_encoder", "vit_decoder",
                                    "quant_conv", "post_quant_conv", "quantize"}
    params = tu.flatten_dict(state["params"])
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert len(moments) == 2 * len(params)  # Adam mu and nu per tokenizer param, nothing else


@pytest.fixture(scope="module")
def loss_setup():
    """The generator objective of the tiny B-L recipe, with every term on, on demo images."""
    config = tiny(config_lib.load(os.path.join(REPO, "configs/gigatok.py:b_l")), steps=4, aux_end=2, gan_start=0)
    config.losses.entropy = 0.05
    model = tokenizer.build_model(config)
    nets, frozen = tokenizer.build_frozen(config, model)
    src = sources.get_source("demo", "train", demo_size=8)
    images = jnp.asarray(np.stack([pipeline.preprocess(src[i]["image"], image_size=32,
                                                       augment="center_crop", flip=False,
                                                       min_scale=1.0, rng=None)
                                   for i in range(4)]))
    params = model.init(jax.random.key(0), images)["params"]
    gan = tokenizer.build_gan(config, model, images)
    gan_state = adversarial.GANState(params=gan.disc.init(jax.random.key(1), images)["params"],
                                     opt_state=None, lecam=None)
    return config, model, nets, gan, frozen, params, gan_state, images


def objective(setup, **weights):
    config, model, nets, gan, frozen, params, gan_state, images = setup
    config = ml_collections.ConfigDict(config.to_dict())
    config.losses.update(weights)
    fn = tokenizer_loss.make_loss_fn(model, config.losses, nets,
                                     gan if config.losses.gan else None)
    return jax.jit(lambda p, f: fn(p, images, f, gan_state, None, 1.0, 1.0,
                                    jax.random.key(2))), \
        params, frozen


def test_switching_a_term_off_removes_exactly_that_term(loss_setup):
    fn, params, frozen = objective(loss_setup)
    total, (terms, _, _, _) = fn(params, frozen)
    weights = loss_setup[0].losses
    assert set(terms) == {"l2", "perceptual", "quantizer", "entropy", "semantic", "fea_rec",
                          "shortcut", "gan"}
    for term in ("semantic", "entropy"):
        fn_off, _, _ = objective(loss_setup, **{term: 0.0})
        total_off, (terms_off, _, _, _) = fn_off(params, frozen)
        assert set(terms_off) == set(terms) - {term}
        np.testing.assert_allclose(total_off, total - weights[term] * terms[term], rtol=1e-5,
                                   atol=1e-6)
        for name in terms_off:
            np.testing.assert_allclose(terms_off[name], terms[name], rtol=1e-6)


def test_the_frozen_networks_get_no_gradient(loss_setup):
    fn, params, frozen = objective(loss_setup)
    g_params, g_frozen = jax.grad(lambda p, f: fn(p, f)[0], argnums=(0, 1))(params, frozen)
    assert set(g_frozen) == {"teacher", "perceptual"}
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_frozen))
    # ... while the tokenizer, including the semantic head, does get one.
    head = g_params["vit_decoder"]["distill_mlp"]
    assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(head))
    teacher = loss_setup[2].teacher
    assert teacher.embed_dim == 32 and teacher.pos_grid == 8  # the decoder's 8x8 grid


def test_loss_networks_compute_at_loss_precision(loss_setup):
    """`loss_precision` sets the perceptual net's and the discriminator's compute dtype (the
    GigaTok recipes: bf16, as the official VQLoss inside the autocast); their values stay
    within bf16 rounding of the float32 nets'."""
    config, model, nets, gan, frozen, _, gan_state, images = loss_setup
    assert config.loss_precision == "float32"  # tiny(): a float32 test run
    disc = gan.disc
    assert disc.dtype == jnp.float32
    config = ml_collections.ConfigDict(config.to_dict())
    config.loss_precision = "bfloat16"
    nets_bf, frozen_bf = tokenizer.build_frozen(config, model)
    disc_bf = tokenizer.build_discriminator(config)
    assert disc_bf.dtype == jnp.bfloat16
    other = jnp.clip(images[::-1] * 0.9 + 0.05, 0.0, 1.0)
    p32 = nets.perceptual.apply(frozen["perceptual"], images, other)
    p16 = nets_bf.perceptual.apply(frozen_bf["perceptual"], images, other)
    assert p16.dtype == jnp.float32 and float(p32) > 0 and float(p16) != float(p32)
    np.testing.assert_allclose(p16, p32, rtol=3e-2)
    variables = {"params": gan_state.params}
    l32 = disc.apply(variables, images)
    l16 = disc_bf.apply(variables, images)
    assert not np.array_equal(l16, l32)  # bf16 convolutions, float32 logits
    np.testing.assert_allclose(np.asarray(l16, np.float32), l32, rtol=0.1, atol=0.05)
    config.loss_precision = "fp8"
    with pytest.raises(config_lib.ConfigError, match="loss_precision='fp8'"):
        config_lib.validate(config)


def test_semantic_loss_is_mean_negative_cosine():
    s = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
    t = np.random.default_rng(1).normal(size=(3, 5, 4)).astype(np.float32)
    cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(losses.semantic_cosine(jnp.asarray(s), jnp.asarray(t)),
                               -cos.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="teacher's patch grid"):
        losses.semantic_cosine(jnp.asarray(s), jnp.asarray(t[:, :4]))


def test_missing_teacher_weights_fail_with_the_download_hint():
    config = config_lib.load(os.path.join(REPO, "configs/gigatok.py:s_s"))
    with pytest.raises(config_lib.ConfigError, match="dinov2_vitb14_pretrain.pth"):
        tokenizer.build_teacher(config)


def test_semantic_loss_without_the_dinov2_teacher_is_a_config_error():
    config = config_lib.load(os.path.join(REPO, "configs/gigatok.py:s_s"))
    config.teacher.name = "maskgit_vqgan"
    with pytest.raises(config_lib.ConfigError, match="losses.semantic=0.5 needs "
                                                     "teacher.name='dinov2'"):
        config_lib.validate(config, num_devices=8)


GIGATOK_CONFIGS = ["gigatok.py:s_s", "gigatok.py:s_b", "gigatok.py:b_l", "gigatok.py:xl_xxl",
                   "gigatok.py:s_s_2d", "gigatok.py:s_b_2d", "gigatok.py:b_l_2d",
                   "gigatok.py:b_l_dino_disc"]


@pytest.mark.parametrize("name", GIGATOK_CONFIGS)
def test_gigatok_configs_validate_on_a_pod(name):
    config = config_lib.load(os.path.join(REPO, "configs", name))
    config_lib.validate(config, num_devices=64)  # e.g. a v5p-128 slice (64 chips)
    assert config.batch_size * config.total_steps in (128 * 1_000_000, 128 * 2_000_000,
                                                      256 * 1_000_000, 256 * 1_500_000)
    assert config.optim.b2 == 0.95 and config.optim.grad_clip == 10.0
    assert config.losses.semantic == 0.5 and config.teacher.name == "dinov2"
    # the official step computes its loss inside the model's autocast
    assert config.loss_precision == config.precision == "bfloat16"
    # reconstruction_ddp.py's PSNR / SSIM, ADM's evaluator's Inception Score
    assert config.evaluation.pixel_metrics == "gigatok"
    assert config.evaluation.tokenizer_precision == "float32"  # reconstruction_ddp.py: no autocast
    assert config.evaluation.is_split_size == 5000


def test_schedules_are_cosine_v2_and_the_disc_follows_the_global_step():
    """GigaTok's `cosine_v2`: lr * (t/w + (1 - t/w)/100) during warm-up, then
    end + (lr - end)/2 * (1 + cos(pi * (t - w)/(T - w))); scheduler_disc(train_steps)."""
    from tok1d.train import optim
    config = config_lib.load(os.path.join(REPO, "configs/gigatok.py:xl_xxl"))
    o, total = config.optim, config.total_steps
    _, schedule = optim.make_optimizer(o, total)
    w, lr, end = o.warmup_steps, o.lr, o.end_lr

    def official(t):
        if t < w:
            return lr * (t / w + (1 - t / w) / 100)
        return end + 0.5 * (lr - end) * (1 + np.cos(np.pi * (t - w) / (total - w)))

    # The scheduler is called after optimizer.step() with the 0-based step t: update t + 1
    # (0-based count c = t + 1) runs at official(t); the first update at the base lr.
    assert config.optim.schedule_step == "after_call"
    assert float(schedule(0)) == pytest.approx(lr, rel=1e-6)
    for t in (0, 1, 2500, 4999, 5000, 100_000, 750_000, total - 2):
        assert float(schedule(t + 1)) == pytest.approx(official(t), rel=1e-5)
    start = config.discriminator.start_step
    _, d_schedule = optim.make_optimizer(config.disc_optim, total, step_offset=start)
    # D's update c (0-based) runs at 0-based global step start + c: the first at the
    # construction lr, then official(start + c - 1) (scheduler_disc(train_steps) after it).
    assert float(d_schedule(0)) == pytest.approx(lr, rel=1e-6)
    for count in (1, 1000, 500_000):
        assert float(d_schedule(count)) == pytest.approx(official(start + count - 1), rel=1e-5)



def test_each_phase_gets_its_own_program_without_what_is_off():
    """`config.phase_programs`: the phases of a recipe with warm-up terms and a GAN, where they
    change, and the last phase's step lowered without the finished warm-up's shortcut decoder
    (the one program of `phase_programs=False` keeps it). Values: the next test (the overlap
    phase), the GigaTok / TiTok train-step parity tests (phase programs) and `full_run`'s
    schedule checks."""
    config = tiny(config_lib.load(os.path.join(REPO, "configs/gigatok.py:b_l")), steps=6,
                  aux_end=2, gan_start=1)
    phase_at, bounds = tokenizer.phase_schedule(config)
    assert [(p.warmup, p.gan) for p in map(phase_at, range(4))] == [
        (True, False), (True, True), (False, True), (False, True)]
    assert sorted(bounds) == [1, 2]
    assert str(phase_at(2)) == "warm-up terms off, discriminator on"
    plain = tiny(config_lib.load(os.path.join(REPO, "configs/gigatok.py:b_l")), steps=6,
                 aux_end=2, gan_start=1)
    plain.losses.update(fea_rec=0.0, shortcut=0.0)  # a run without warm-up terms (TiTok's)
    assert str(tokenizer.phase_schedule(plain)[0](3)) == "discriminator on"
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    t = tokenizer.build_training(config, mesh, rules, batch_sh)
    assert (t.steps.next_change(0), t.steps.next_change(1), t.steps.next_change(2)) == (1, 2, None)
    assert t.steps.at(3) is t.steps.at(2) and t.steps.at(0) is not t.steps.at(1)
    with config.unlocked():
        config.phase_programs = False
    single = tokenizer.build_training(config, mesh, rules, batch_sh)
    assert single.steps.next_change(0) is None and single.steps.at(0) is single.steps.at(5)
    shapes = checkpoint.abstract_with_shardings(t.abstract, t.shardings)
    batch = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32, sharding=batch_sh)
    convs = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for name, fn in (("last", t.steps.at(5)), ("single", single.steps.at(5))):
            hlo = fn.lower(shapes, {"image": batch}, t.frozen).as_text()
            convs[name] = hlo.count("stablehlo.convolution")
    assert convs["last"] < 0.8 * convs["single"], convs
    # Before D's start no discriminator is called (upstream skips D's step and logs its
    # generator term 0): phase 0's program has the convolutions of a run without a GAN.
    with config.unlocked():
        config.phase_programs = True
        config.losses.gan = 0.0
    no_gan = tokenizer.build_training(config, mesh, rules, batch_sh)
    shapes_no_gan = checkpoint.abstract_with_shardings(no_gan.abstract, no_gan.shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        before = t.steps.at(0).lower(shapes, {"image": batch}, t.frozen).as_text()
        without = no_gan.steps.at(0).lower(shapes_no_gan, {"image": batch}, t.frozen).as_text()
    assert before.count("stablehlo.convolution") == without.count("stablehlo.convolution")


def test_the_overlap_phase_program_steps_like_the_single_program():
    """The step compiled for the overlap phase (warm-up terms and the discriminator both on;
    step 1 here) gives the single program's logged scalars and new state, on the same state
    and batch. The other phases step through the golden GigaTok fixture with phase programs
    (tests/test_train_parity_gigatok.py); this one has no fixture run through them (the
    DINO-disc parity test runs one program), so this is its check.

    Adam's first update moves each parameter by about lr * sign(gradient), so a leaf whose
    gradient is rounding noise may move either way in two programs that fuse differently (seen
    at step 0: an adaptive norm's bias in the tiny decoder, first moment 1e-9 against a
    largest 0.3). Leaves whose first moment is below 1e-7 of the largest are left out of the
    state comparison, and only they: in exact arithmetic their gradient is zero (attention key
    biases; here also the biases of the convolutions before a group norm of one channel per
    group), so they say nothing about the programs."""
    config = tiny(config_lib.load(os.path.join(REPO, "configs/gigatok.py:b_l")), steps=4,
                  aux_end=2, gan_start=1)
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    phased = tokenizer.build_training(config, mesh, rules, batch_sh)
    with config.unlocked():
        config.phase_programs = False
    single = tokenizer.build_training(config, mesh, rules, batch_sh)
    step = 1
    phase = phased.steps.phase_at(step)
    assert phase.warmup and phase.gan
    images = jax.device_put(jax.random.uniform(jax.random.key(3), (16, 32, 32, 3)), batch_sh)

    def param_key(path):  # the parameter a leaf of params / ema / mu / nu belongs to
        text = jax.tree_util.keystr(path)
        return text[text.find("['"):]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start = phased.init(jax.random.key(0))
        runs = [t.steps.at(step)(  # a copy each: the step donates its state
            jax.tree.map(jnp.copy, start).replace(step=jnp.asarray(step, start.step.dtype)),
            {"image": images}, phased.frozen) for t in (phased, single)]
    (new_p, scalars_p, finite_p), (new_s, scalars_s, finite_s) = runs
    assert bool(finite_p) and bool(finite_s)
    assert set(scalars_p) == set(scalars_s)
    assert float(scalars_s["warmup_losses_active"]) == 1 and float(scalars_s["gan_active"]) == 1
    for name in scalars_s:
        np.testing.assert_allclose(scalars_p[name], scalars_s[name], rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    mu = optax.tree_utils.tree_get(new_s.opt_state, "mu")
    top = {param_key(p): np.abs(np.asarray(m)).max()
           for p, m in jax.tree_util.tree_leaves_with_path(mu)}
    noise = {k for k, v in top.items() if v < 1e-7 * max(top.values())}
    assert len(noise) < 0.2 * len(top), noise  # not a way to skip real differences
    compared = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new_p), jax.tree.leaves(new_s)):
        if param_key(path) not in noise:
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))
            compared += 1
    assert compared > 0.8 * len(jax.tree.leaves(new_s))
