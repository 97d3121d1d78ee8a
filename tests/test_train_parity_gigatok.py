"""Train-step parity of GigaTok tokenizer training with the official vq_train.py step
(`train_gigatok*.npz`, fixture README section 8.3).

For every fixture file with the PatchGAN discriminator: the config comes from the official
config stored in the file (`tok1d.official.gigatok.config_from_fixture_meta`), the initial
official tokenizer / discriminator (BatchNorm running statistics included) / DINOv2 teacher /
LPIPS weights are converted with tok1d's converters, and the stored batches run through the
tokenizer trainer's own jitted train step (`tokenizer.build_training`), the official LPIPS
dropout masks replayed through `batch["draws"]` ("lpips_keep/rec/lin{k}",
"lpips_keep/shortcut/lin{k}"). Compared: per step the LRs (G and D), every value of the
official log (`official.official_log`), the G and D gradient norms before clipping, the codes,
reconstructions and step-1 teacher / semantic features; after step 1, the discriminator's
first update and at the end: the params, EMA, discriminator params and running statistics, the
recorded AdamW moments; the weight-decay groups. Files with another discriminator
(`disc_type`) are skipped here with the reason: the DINO-discriminator variant runs in
tests/test_train_parity_gigatok_dino.py, which reuses this module's helpers (`build`,
`tokenizer_weights`, `batches`, `run_steps`, `compare_steps`, `compare_tokenizer_state`).

Two runs of the same step:

* float32 (the port as used; `check_fixture(path, FLOAT32)`): step 1 at the README's tight
  bounds. After step 1 the float32 trajectory is chaotic: the LPIPS gradient is very sensitive
  to the reconstruction (VGG ReLU / max-pool switching: a 1e-5 change of the pixels moves the
  perceptual gradient by up to 1e-3), float32 rounding of the pixels (6.7e-6 here vs 3.5e-6 in
  torch's float32) changes step 1's gradient by 5.7e-5 (torch float32 vs float64: 2.3e-6), and
  AdamW's sign-like first steps turn gradient elements near zero into +-lr moves. Later steps
  are therefore compared with bounds measured on this trajectory (`FLOAT32`, about 3x the
  measured error), and the discriminator's first update per element with 2 x lr (a sign flip).
* float64 (`test_float64_run_matches_official_at_the_floors`): the same trainer step with every
  float32 of tok1d / Flax / optax computing in float64 (a subprocess with jax x64 that rebinds
  `jnp.float32` before anything is imported). It lands on the official float32 step within the
  file's own float32-vs-float64 floors on every quantity, all steps (`FLOAT64`, the README's
  bounds), which checks the semantics exactly.
"""

import copy
import dataclasses
import functools
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

import train_parity as tp
import train_parity_generators as tpg
from tok1d import parallel
from tok1d.train import optim
from tok1d.weights.convert import dinov2 as convert_dinov2
from tok1d.weights.convert import gigatok as convert_gigatok
from tok1d.weights.convert import discriminator as convert_disc
from tok1d.weights.convert import perceptual as convert_perceptual
from tok1d.models.frozen.dinov2 import preprocess_gigatok
from tok1d.official import gigatok as official
from tok1d.train import tokenizer

SUPPORTED_DISC = "patchgan"
PIXELS_REL = 3e-4        # README 0: GigaTok training pixels (rotation-trick latents)
FEATURES_REL = 2e-5      # transformer outputs
ZERO_REF_ABS = 1e-6      # moments / logs whose official value is exactly 0 (float32 noise here)
# An AdamW step moves an element by at most lr, so a sign flip is at most 2 lr (README 8.3's
# bound for zero-gradient tensors, 2 x sum(lr)); 1% on top for the rounding of the params.
FLIP_MARGIN = 1.01


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Relative bounds of one run (README 8 / 8.3 unless noted)."""

    name: str
    step1_loss: float = 1e-5          # losses and every logged value, step 1
    later_loss: float = 1e-4          # ... later steps
    step1_grad: float = 1e-4          # G and D grad norms, step 1 / D's first step
    later_grad_floor: float = 10.0    # later G grad norms: x the file's per-step floor ...
    later_grad_min: float = 1e-4      # ... at least this
    later_disc_grad: float = 1e-4     # later D grad norms
    step1_moments: tuple = (1e-4, 2e-4)   # exp_avg, exp_avg_sq after step 1
    later_moments: float = 1e-3
    disc_sign_flips: bool = False     # D params: abs 2 x sum(lr_D) instead of 10 x floor
    disc_stats: float = 0.0           # D running stats (0: 10 x the D params floor)
    disc_moments: tuple = (1e-4, 2e-4)    # D exp_avg, exp_avg_sq after its first update
    disc_later_moments: float = 1e-3
    later_pixels_floor: float = 0.0   # later pixels: max(PIXELS_REL, this x the per-step floor)


FLOAT64 = Bounds("float64 run")
# float32: README at step 1 (Adam moments at README 8.3's 1e-3); later steps ~3x the measured
# errors on train_gigatok.npz (losses 4.8e-4, G grad norm 7.7e-3, D grad norm 1.5e-3, moments
# 1.7e-2, D running stats 8.5e-4, D moments 2.6e-2), see the module docstring.
FLOAT32 = Bounds("float32 run", later_loss=1.5e-3, later_grad_floor=0.0, later_grad_min=2.5e-2,
                 later_disc_grad=5e-3, step1_moments=(1e-3, 1e-3), later_moments=5e-2,
                 disc_sign_flips=True, disc_stats=3e-3, disc_moments=(1e-1, 1e-1),
                 disc_later_moments=1e-1)


def disc_type(z: tp.Fixture) -> str:
    return z.meta["config"]["loss"]["params"].get("disc_type", "patchgan")


def nchw_to_nhwc(x) -> np.ndarray:
    return np.moveaxis(np.asarray(x, np.float32), -3, -1)


def lpips_draws(z: tp.Fixture, step: int, batch: int) -> dict[str, np.ndarray]:
    """The LPIPS dropout keep masks of one step (1-based) as the step's named draws: call c of
    `lpips_keep_u/call_step` / `call_is_direct` keeps where u >= 0.5. Steps without a shortcut
    call get all-ones shortcut masks (never read: the warm-up branch is off), so every step has
    the same draws and the step compiles once."""
    calls = np.asarray(z["lpips_keep_u/call_step"])
    direct = np.asarray(z["lpips_keep_u/call_is_direct"])
    layers = sorted(k.rsplit("lin", 1)[1] for k in z if k.startswith("lpips_keep_u/lin"))
    draws = {}
    for k in layers:
        u = z[f"lpips_keep_u/lin{k}"]
        for call, is_direct in (("rec", 0), ("shortcut", 1)):
            hit = np.flatnonzero((calls == step) & (direct == is_direct))
            if hit.size:
                draws[f"lpips_keep/{call}/lin{k}"] = nchw_to_nhwc(u[hit[0]] >= 0.5) > 0
            else:
                shape = nchw_to_nhwc(u[0]).shape
                draws[f"lpips_keep/{call}/lin{k}"] = np.ones(shape, bool)
        assert draws[f"lpips_keep/rec/lin{k}"].shape[0] == batch
    return draws


def compare_value(report: tp.Report, name: str, got: float, want: float, rel: float) -> None:
    """NaN (no D step) must stay NaN; an exactly-zero official value gets an absolute bound."""
    if np.isnan(want):
        report.check(f"{name} (nan: no update)", float(not np.isnan(got)), 0.0, "mismatches")
    elif want == 0:
        report.abs(name, got, want, ZERO_REF_ABS)
    else:
        report.rel(name, got, want, rel)


def moments(report: tp.Report, z: tp.Fixture, prefix: str, kind: str, tmap: tp.TensorMap,
            opt_state, bounds: tuple[float, float]) -> None:
    """`<prefix>/<kind>/<p>/{exp_avg,exp_avg_sq}` against the AdamW mu / nu of `opt_state`."""
    for name, which, bound in zip(("exp_avg", "exp_avg_sq"), ("mu", "nu"), bounds):
        head, tail = f"{prefix}/{kind}/", "/" + name
        official_m = {k[len(head):-len(tail)]: z[k] for k in z
                      if k.startswith(head) and k.endswith(tail)}
        assert official_m, f"no {head}*{tail} in {z.path}"
        tree = tpg.adam_moment(types.SimpleNamespace(opt_state=opt_state), which)
        for key, (want, got) in tmap.pairs(official_m, tree).items():
            if not np.any(want):
                report.abs(f"{prefix}/{kind}/{name}[{key}] (zero)", got, want, ZERO_REF_ABS)
            else:
                report.rel(f"{prefix}/{kind}/{name}[{key}]", got, want, bound)


def decay_groups(report: tp.Report, tag: str, tmap: tp.TensorMap, names, optim_cfg,
                 params) -> None:
    """The optimizer's weight-decay mask selects exactly the tok1d leaves of the official
    (single, decayed) parameter group."""
    want = set()
    for key in names:
        for path, m in jax.tree_util.tree_flatten_with_path(
                tmap.masks[key], is_leaf=lambda x: x is None)[0]:
            if m is not None:
                want.add("/".join(str(getattr(p, "key", p)) for p in path))
    flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask_of(optim_cfg, params))[0]
    decayed = {"/".join(str(getattr(p, "key", p)) for p in path) for path, on in flat if on}
    report.check(f"{tag} decay group (tok1d leaves decayed xor official)",
                 len(decayed ^ want), 0.0, "mismatches")


def state_dicts(z: tp.Fixture, prefix: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f" else np.int64)
            for k, v in z.sub(prefix).items()}


def put(host_tree, like):
    """Host arrays -> device arrays with the dtypes and shardings of `like` (float64 in the
    float64 run)."""
    return jax.tree.map(lambda v, ref: jax.device_put(np.asarray(v, ref.dtype), ref.sharding),
                        host_tree, like)


def compare_steps(report: tp.Report, z: tp.Fixture, config, scalars, fwd, bounds: Bounds,
                  extra_names=()) -> None:
    """Per step (scalars of the trainer's step, the forward `fwd[k]` = (pixels, aux) it ran):
    LRs, losses, every official log value and `extra_names` (official_log names stored as
    `step/<name>`), grad norms, codes, reconstructions; step 1's semantic features."""
    aux_on = np.asarray(z["step/aux_on"])
    grad_floor = np.asarray(z["check/f32_vs_f64_rel_per_step/grad_norm"], np.float64)
    for k, s in enumerate(scalars):
        tag = f"[step {k + 1}]"
        log = official.official_log(s, config)
        loss_rel = bounds.step1_loss if k == 0 else bounds.later_loss
        compare_value(report, f"lr{tag}", log["lr"], z["step/lr"][k], tpg.LR_REL)
        compare_value(report, f"lr_disc{tag}", log["lr_disc"], z["step/lr_disc"][k], tpg.LR_REL)
        for name in ("loss_gen", "loss_disc", "feature_rec_loss", *extra_names):
            compare_value(report, f"{name}{tag}", log[name], z[f"step/{name}"][k], loss_rel)
        for key in z:
            if not key.startswith("step/log/"):
                continue
            name = key[len("step/log/"):]
            if name == "(Generator)codebook_usage":
                continue  # not reproduced (see tok1d.official.gigatok)
            got = log["loss_gen"] + log["loss_disc"] if name == "train_loss" else log[name]
            compare_value(report, f"{name}{tag}", got, z[key][k], loss_rel)
        grad_rel = (bounds.step1_grad if k == 0 else
                    max(bounds.later_grad_floor * grad_floor[k], bounds.later_grad_min))
        compare_value(report, f"grad_norm{tag}", log["grad_norm"], z["step/grad_norm"][k],
                      grad_rel)
        compare_value(report, f"grad_norm_disc{tag}", log["grad_norm_disc"],
                      z["step/grad_norm_disc"][k],
                      bounds.step1_grad if k == 0 else bounds.later_disc_grad)
        pixels, aux = fwd[k]
        batch = pixels.shape[0]
        pix_rel = PIXELS_REL
        if k and bounds.later_pixels_floor:
            floor = float(z["check/f32_vs_f64_rel_per_step/recons"][k])
            pix_rel = max(PIXELS_REL, bounds.later_pixels_floor * floor)
        report.exact(f"codes{tag}", np.asarray(aux.codes).reshape(batch, -1),
                     np.asarray(z["step/codes"][k]).reshape(batch, -1))
        report.rel(f"recons_img0{tag}", pixels[0], nchw_to_nhwc(z["step/recons_img0"][k]),
                   pix_rel)
        if aux_on[k] and k < len(z["step/direct_recons_img0"]):
            report.rel(f"direct_recons_img0{tag}", aux.features["shortcut_pixels"][0],
                       nchw_to_nhwc(z["step/direct_recons_img0"][k]), pix_rel)
    report.rel("step1_inner_feat", fwd[0][1].features["semantic_features"], z["step1/inner_feat"],
               FEATURES_REL)


def compare_tokenizer_state(report: tp.Report, z: tp.Fixture, config, sd, convert, params0,
                            states, bounds: Bounds) -> None:
    """Tokenizer params after step 1 and at the end, the final EMA, the recorded AdamW moments
    (zero-gradient tensors of `meta.zero_grad_params` within 2 x sum(lr)) and the decay group."""
    meta = z.meta
    lrs = np.asarray(z["step/lr"], np.float64)
    steps = len(lrs)
    zero = tuple(meta.get("zero_grad_params", ()))
    keys = [k for k in sd if k != "quantize.codebook_used"]  # a logging buffer, not a param
    tmap = tp.TensorMap(convert, sd, keys)
    param_sd = lambda prefix: {k: v for k, v in state_dicts(z, prefix).items()  # noqa: E731
                               if k in keys}
    for tag, n in (("step1", 1), ("final", steps)):
        floor = float(z[f"check/f32_vs_f64_maxrel/{tag}_params"])
        tpg.check_state(report, f"{tag}_params", tmap, param_sd(f"{tag}/sd/"),
                        states[tag].params, tpg.STATE_FLOOR_FACTOR * max(floor, 1e-6), zero,
                        FLIP_MARGIN * tpg.zero_grad_bound(lrs, n))
    if config.ema_decay:
        floor = float(z["check/f32_vs_f64_maxrel/final_ema"])
        tpg.check_state(report, "final_ema", tmap, state_dicts(z, "final/ema/"),
                        states["final"].ema_params, tpg.STATE_FLOOR_FACTOR * max(floor, 1e-7),
                        zero, FLIP_MARGIN * tpg.zero_grad_bound(lrs, steps))
    moments(report, z, "step1", "adam", tmap, states["step1"].opt_state, bounds.step1_moments)
    moments(report, z, "final", "adam", tmap, states["final"].opt_state,
            (bounds.later_moments,) * 2)
    decay_groups(report, "tokenizer", tmap, meta["param_groups"]["all"], config.optim, params0)
    # GigaTok's FSDP trainer (the XL-XXL recipe's "no_norm"): decay where the official
    # parameter name lacks "norm" (its `ln_pre` / `ln_post` are decayed)
    fsdp = config.optim.copy_and_resolve_references()
    fsdp.decay_mask = "no_norm"
    decay_groups(report, "tokenizer, FSDP trainer's rule", tmap,
                 [k for k in meta["param_groups"]["all"] if "norm" not in k], fsdp, params0)


def build(z: tp.Fixture, phase_programs: bool = True):
    """(config, mesh, rules, Training) of a fixture: the config through
    `official.config_from_fixture_meta`, random stand-ins for the frozen networks (replaced by
    the converted fixture weights); `phase_programs`: one step per phase (the trainer's
    default) or one for every step."""
    config = official.config_from_fixture_meta(z.meta)
    config.phase_programs = phase_programs
    assert config.precision == "float32", "the fixtures run the official step in float32"
    config.teacher.allow_random_init = config.perceptual.allow_random_init = True
    config.discriminator.allow_random_init = True
    mesh, rules = tp.one_device_mesh()
    t = tokenizer.build_training(config, mesh, rules, parallel.batch_sharding(mesh, rules))
    return config, mesh, rules, t


def tokenizer_weights(z: tp.Fixture, t):
    """(initial official state dict, its converter, converted params, frozen teacher + LPIPS
    params on the devices)."""
    sd = state_dicts(z, "init/sd/")
    convert = functools.partial(convert_gigatok.convert_gigatok, model=t.model)
    teacher = convert_dinov2.convert_dinov2(state_dicts(z, "teacher/sd/"), t.nets.teacher)
    lpips = convert_perceptual.convert_lpips(None, state_dicts(z, "lpips/sd/"))
    frozen = put({"teacher": teacher, "perceptual": {"lpips": lpips}}, t.frozen)
    return sd, convert, convert(sd), frozen


def batches(z: tp.Fixture, draws=lambda step: {}):
    """(images NHWC in [-1, 1], the step batches in [0, 1] with their LPIPS draws and
    `draws(step)` (1-based), index of D's first step)."""
    images = nchw_to_nhwc(z["images"])                      # [-1, 1], k/128 grid
    steps, batch = images.shape[0], images.shape[1]
    data = [{"image": (images[k] + 1.0) / 2.0,              # the trainer's [0, 1] (exact)
             "draws": {**lpips_draws(z, k + 1, batch), **draws(k + 1)}} for k in range(steps)]
    gan_on = np.asarray(z["step/gan_on"])
    first_d = int(np.flatnonzero(gan_on)[0]) if gan_on.any() else None
    return images, data, first_d


def run_steps(t, config, mesh, rules, frozen, data, images, first_d, load):
    """The trainer's jitted step over the stored batches from `load(fresh state)` (the converted
    official weights), float32 matmuls at "highest". Returns (scalars per step, host states
    {"step1", "disc_first" (after D's first update), "final"}, the forward (pixels, aux) each
    step ran (params before the step), step 1's teacher features)."""
    scalars, before, states = [], [], {}
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh), \
            nn.logical_axis_rules(rules):
        state = load(t.init(jax.random.key(config.seed)))
        for k, b in enumerate(data):
            before.append(jax.device_get(state.params))
            state, out, finite = t.steps.at(k)(state, b, frozen)
            assert bool(finite), f"step {k + 1} was not finite"
            scalars.append({n: np.asarray(v) for n, v in out.items()})
            if k == 0:
                states["step1"] = jax.device_get(state)
            if k == first_d:
                states["disc_first"] = jax.device_get(state)
        states["final"] = jax.device_get(state)
        forward = jax.jit(lambda p, x: t.model.apply({"params": p}, x, train=True))
        teach = jax.jit(lambda p, x: t.nets.teacher.apply(
            {"params": p}, preprocess_gigatok(x, 224))["patch_tokens"])
        fwd = [jax.device_get(forward(before[k], images[k])) for k in range(len(data))]
        teacher_feat = np.asarray(teach(frozen["teacher"], images[0]))
    return scalars, states, fwd, teacher_feat


CASES = tp.fixture_params("train_gigatok*.npz")


@pytest.mark.parametrize("path", CASES)
def test_the_mapping_crops_images_as_the_official_loader(path):
    """GigaTok's random_crop_arr / center_crop_arr: ADM's rounding."""
    config = official.config_from_fixture_meta(tp.load(path).meta)
    assert (config.data.augment, config.data.resize_rule) == ("adm_random_crop", "adm")


@pytest.mark.parametrize("path", CASES)
def test_the_mapping_takes_lecam_in_gigatoks_form(path):
    """`lecam: True` (off in every released config) maps to the "gigatok" LeCam form with
    `lecam_weight` and ema_losses' decay 0.99; off, the weight is 0."""
    meta = tp.load(path).meta
    config = official.config_from_fixture_meta(meta)
    assert config.discriminator.lecam == 0.0
    meta = copy.deepcopy(meta)
    meta["config"]["loss"]["params"].update(lecam=True, lecam_weight=0.002)
    d = official.config_from_fixture_meta(meta).discriminator
    assert (d.lecam, d.lecam_form, d.lecam_decay) == (0.002, "gigatok", 0.99)


@pytest.mark.parametrize("path", CASES)
def test_train_step_matches_official(path):
    check_fixture(path, FLOAT32)


def check_float64(path: str) -> None:
    """`check_fixture` with the float64 bounds (called by `tp.run_in_float64`)."""
    check_fixture(path, FLOAT64)


@pytest.mark.parametrize("path", CASES)
def test_float64_run_matches_official_at_the_floors(path):
    """The same trainer step computing in float64 (see the module docstring) against the
    README's bounds on every step."""
    if disc_type(tp.load(path)) != SUPPORTED_DISC:
        pytest.skip(f"{path}: disc_type={disc_type(tp.load(path))!r}; this test covers the "
                    f"{SUPPORTED_DISC!r} discriminator recipe")
    tp.run_in_float64("test_train_parity_gigatok", "check_float64", path)


def check_fixture(path: str, bounds: Bounds) -> None:
    z = tp.load(path)
    meta = z.meta
    if disc_type(z) != SUPPORTED_DISC:
        pytest.skip(f"{path}: disc_type={disc_type(z)!r}; this test covers the "
                    f"{SUPPORTED_DISC!r} discriminator recipe")
    # the float32 run steps the trainer's default, one program per phase (warm-up, then GAN);
    # the float64 run one program for every step (config.phase_programs=False)
    config, mesh, rules, t = build(z, phase_programs=bounds is not FLOAT64)
    report = tp.Report(f"gigatok ({bounds.name})", path)
    sd, convert, params0, frozen = tokenizer_weights(z, t)
    disc_sd = state_dicts(z, "init/disc_sd/")
    convert_d = functools.partial(convert_disc.convert_patchgan_discriminator, model=t.gan.disc)
    disc0 = convert_d(disc_sd)
    stats0 = convert_disc.convert_patchgan_batch_stats(disc_sd, t.gan.disc)
    images, data, first_d = batches(z)
    steps = images.shape[0]
    scalars, states, fwd, teacher_feat = run_steps(
        t, config, mesh, rules, frozen, data, images, first_d,
        lambda state: state.replace(
            params=put(params0, state.params),
            ema_params=None if state.ema_params is None else put(params0, state.ema_params),
            extras={"gan": state.extras["gan"].replace(
                params=put(disc0, state.extras["gan"].params),
                collections=put({"batch_stats": stats0}, state.extras["gan"].collections))}))

    # ------------------------------------------------------------ per step
    compare_steps(report, z, config, scalars, fwd, bounds)
    report.rel("step1_teacher_feat", teacher_feat, z["step1/teacher_feat"], FEATURES_REL)
    compare_tokenizer_state(report, z, config, sd, convert, params0, states, bounds)

    # ------------------------------------------------------------ discriminator
    d_keys = [k for k in disc_sd if "running_" not in k and "num_batches" not in k]
    dmap = tp.TensorMap(convert_d, disc_sd, d_keys)
    lrs_d = np.nan_to_num(np.asarray(z["step/lr_disc"], np.float64))
    for tag, floor_key in (("disc_first", "disc_first_params"), ("final", "final_disc_params")):
        if tag not in states or f"{tag}/disc_sd/main.0.weight" not in z:
            continue
        n = first_d + 1 if tag == "disc_first" else steps
        want_sd = state_dicts(z, f"{tag}/disc_sd/")
        bound = tpg.STATE_FLOOR_FACTOR * max(float(z[f"check/f32_vs_f64_maxrel/{floor_key}"]),
                                             1e-6)
        if bounds.disc_sign_flips:  # every element within one AdamW sign flip per D step
            for key, (want, got) in dmap.pairs({k: want_sd[k] for k in d_keys},
                                               states[tag].extras["gan"].params).items():
                report.abs(f"{tag}_disc_params[{key}] (<= sign flips)", got, want,
                           FLIP_MARGIN * tpg.zero_grad_bound(lrs_d, n))
        else:
            tpg.check_state(report, f"{tag}_disc_params", dmap,
                            {k: want_sd[k] for k in d_keys}, states[tag].extras["gan"].params, bound)
        got_stats = states[tag].extras["gan"].collections["batch_stats"]
        for layer, stats in convert_disc.convert_patchgan_batch_stats(want_sd, t.gan.disc).items():
            for name in ("mean", "var"):
                report.rel(f"{tag}_disc_running_{name}[{layer}]", got_stats[layer][name],
                           stats[name], bounds.disc_stats or bound)
            report.exact(f"{tag}_disc_num_batches_tracked[{layer}]", got_stats[layer]["count"],
                         stats["count"])
        moments(report, z, tag, "disc_adam", dmap, states[tag].extras["gan"].opt_state,
                bounds.disc_moments if tag == "disc_first" else (bounds.disc_later_moments,) * 2)
    decay_groups(report, "discriminator", dmap, meta["param_groups"]["disc"], config.disc_optim,
                 disc0)
    report.finish()
