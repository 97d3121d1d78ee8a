"""Train-step parity of TiTok stage 1 and stage 2 with the official training step
(bytedance/1d-tokenizer `train_one_epoch`; fixture README §8.1 `train_titok_stage1*.npz`, §8.5
`train_titok_stage2*.npz`, compact files included).

For every fixture file: the tok1d config comes from the fixture's official config through
`tok1d.official.titok.config_from_official`, the initial official weights (TiTok, and for stage
2 the discriminator, the LeCam buffers and the ConvNeXt-S of the perceptual loss) through
tok1d's converters, and the stored batches (with stage 1's proxy codes as the step's
"proxy_codes" draw) run through the tokenizer trainer's own jitted step
(`tokenizer.build_training`). Compared: per step the LRs, every official loss log value
(`official.log_values`), the grad norms before clipping, the codes (exactly), the LeCam EMAs and
image 0's reconstruction; after the snapshot steps the parameters (per official tensor), the
discriminator, the EMA, the recorded AdamW moments and step counts; the weight-decay groups.

Deviations from the README's bounds: the LRs are compared at float32 precision (1e-6
relative), not 1e-12: tok1d's schedule runs inside the jitted step in float32 (the value the
update uses), the official one in Python floats. A loss whose own float64-repeat floor is
above a quarter of the 1e-5 bound gets 4x its floor (stage 2's GAN terms: floors 5e-6).

Re-synchronisation (fixtures with a discriminator). With the GAN term the step is chaotic at
float32 noise level: the generator's gradient depends on which side of its kink each LeakyReLU
of the discriminator lies, and on step 2 of the shared stage-2 fixture the smallest margins
(1e-6 in D's first conv, 2e-6 after its GroupNorms) are far below the reconstruction's float32
noise (3e-5, the file's float64 repeat shows 3.9e-5). Run freely from the initial weights,
tok1d's step 1 matches (params within 7e-5 relative; the file's floor is 9.4e-4) but a unit
lands on the other side of its kink: step 2's G grad norm differs by 1.4e-3 (it jumps between
3.5721, 3.5770 and 3.5748 under random 1e-7 ... 1e-5 perturbations of the pixel codebook; the
official value is 3.5770) and the later steps drift apart (reconstruction 4% by step 4); with
the official step-1 tensors substituted, step 2 agrees to 1e-6. So with a discriminator,
after each stored snapshot the comparison continues from the official state stored there
(`Run.resync`: params, the EMA, the stored AdamW moments, the discriminator and the LeCam
buffers; tensors the file does not store keep tok1d's values): step 1 runs from the initial
state, steps 2-4 from the step-1 snapshot (D's first update from the initial D), D's later
updates from the first D snapshot. Stage 1 runs end to end.

Even from the official step-1 state, step 2's own gradients can flip a kink: which side a
1e-6 margin falls on depends on the CPU kernels' summation order. On an AVX-512 / AMX Xeon
(jax 0.10.2, YNNPACK fusions) step 2's G grad norm differs by 6e-4 and D's first update by
5e-3, and steps 3-4 drift (with `--xla_cpu_experimental_ynn_fusion_type=` only step 4 does);
the machines of earlier sessions landed on the official side. So in float32 the first GAN
step after a re-synchronisation is compared only up to its gradients (its losses, LeCam
EMAs, codes and reconstruction), and the steps after it, with the snapshots they reach, are
left to the float64 run below, which lands on the official run on every step.

Float64 run (`test_titok_stage2_float64_run_matches_official_at_the_floors`): the same trainer
step with every float32 of tok1d / Flax / optax computing in float64 (a subprocess with jax x64
that rebinds `jnp.float32` before anything is imported, as tests/test_train_parity_gigatok.py
does), free-running from the initial weights without re-synchronisation. The official float32
run lies on the float64 side of every kink (its float64 repeat agrees to the floors), so this
run lands on it within the file's float32-vs-float64 floors on every step: the semantics of
steps 2-4 are checked end to end.
"""

from __future__ import annotations

import pathlib

import numpy as np
import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import optax
import pytest

import train_parity as tp
from tok1d import parallel
from tok1d.objectives import gan
from tok1d.train import optim
from tok1d.models.frozen import perceptual as perceptual_nets
from tok1d.weights import perceptual as perceptual_files
from tok1d.weights.convert import discriminator as convert_disc
from tok1d.weights.convert import perceptual as convert_perceptual
from tok1d.weights.convert import titok as convert_titok
from tok1d.official import titok as official
from tok1d.train import tokenizer

LR_BOUND = 1e-6          # float32 schedule (see the module docstring)
LOSS_BOUND = 1e-5
PARAM_FLOOR_MULT = 10    # params / EMA / D: <= 10 x the fixture's float64-repeat floor
DELTA_BOUND = 1e-2       # parameter change (final - init), relative to its max


def _f32(sd):
    return {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
            for k, v in sd.items()}


def _floor(z, *names) -> float:
    for name in names:
        if name in z:
            return float(np.max(np.asarray(z[name])))
    raise KeyError(names)


def _step_bound(z, key: str, bound: float, i: int) -> float:
    """`bound`, or 4x the fixture's float64-repeat floor of log value `key` at step i where
    that is larger (per-step floors when stored, else the max over steps)."""
    floor = 0.0
    for name in (key, f"train/{key}"):
        if f"check/f32_vs_f64_rel_per_step/{name}" in z:
            floor = float(np.asarray(z[f"check/f32_vs_f64_rel_per_step/{name}"])[i])
        elif f"check/f32_vs_f64_maxrel/{name}" in z:
            floor = float(z[f"check/f32_vs_f64_maxrel/{name}"])
    return max(bound, 4 * float(np.nan_to_num(floor)))


def _rel_scalar(got, want) -> float:
    got, want = float(got), float(want)
    return abs(got - want) / abs(want) if want else abs(got - want)


def _dense(tree, like):
    """An optimizer-state tree with frozen (optax.MaskedNode) leaves filled with zeros."""
    return jax.tree.map(lambda p, m: np.zeros(p.shape, np.float32)
                        if isinstance(m, optax.MaskedNode) else np.asarray(m),
                        like, tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _adam(opt_state, params):
    """(mu, nu, count) of the AdamW in an optimizer state (frozen leaves as zeros)."""
    found = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "mu")]
    nus = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "nu")]
    counts = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if any(getattr(k, "tuple_name", None) == "ScaleByAdamState" for k in path)]
    assert len(found) == len(nus) == len(counts) == 1, "expected one AdamW state"
    return _dense(found[0], params), _dense(nus[0], params), int(counts[0])


def _put(tree, like, shardings):
    """Host tree -> device arrays with the dtypes of `like` (float64 in a float64 run)."""
    return jax.device_put(jax.tree.map(lambda x, r: np.asarray(x, r.dtype), tree, like),
                          shardings)


def _substitute(convert, sd0, stored, tree):
    """`tree` (a tok1d host tree) with the elements of every official tensor in `stored`
    replaced by the stored value (laid out through the converter)."""
    flat, treedef = jax.tree_util.tree_flatten(tree)
    flat = [np.array(x) for x in flat]
    for key, value in stored.items():
        masks = jax.tree.leaves(tp.provenance(convert, sd0, key), is_leaf=lambda x: x is None)
        sd = dict(sd0)
        sd[key] = np.asarray(value, np.float32)
        for i, (m, c) in enumerate(zip(masks, jax.tree.leaves(convert(sd)))):
            if m is not None:
                flat[i] = np.where(m, np.asarray(c, flat[i].dtype), flat[i])
    return jax.tree_util.tree_unflatten(treedef, flat)


def _set_adam(opt_state, params, convert, sd0, z, prefix):
    """The optimizer state with the stored official AdamW moments (`{prefix}<p>/exp_avg|
    exp_avg_sq`) substituted (frozen leaves stay optax.MaskedNode)."""
    keys = sorted({k[len(prefix):].rsplit("/", 1)[0] for k in z if k.startswith(prefix)})
    mu, nu, _ = _adam(opt_state, params)
    new = {}
    for name, moment, tree in (("mu", "exp_avg", mu), ("nu", "exp_avg_sq", nu)):
        dense = _substitute(convert, sd0, {k: z[f"{prefix}{k}/{moment}"] for k in keys}, tree)
        old = optax.tree_utils.tree_get(opt_state, name)
        new[name] = jax.tree.map(lambda o, d: o if isinstance(o, optax.MaskedNode) else d,
                                 old, dense, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return optax.tree_utils.tree_set(opt_state, **new)


class Run:
    """The tok1d side of one fixture: config, Training, converted initial state."""

    def __init__(self, path: str, tmp_path, phase_programs: bool = True):
        self.z = z = tp.load(path)
        self.meta = meta = z.meta
        self.config = config = official.config_from_official(
            meta["config"], size_tables=meta.get("size_tables_added"),
            pixel_decoder=meta.get("pixel_decoder_config"),
            discriminator=meta.get("discriminator_ctor"))
        config.phase_programs = phase_programs
        self.stage2 = bool(config.model.get("finetune_decoder"))
        if not self.stage2:
            # The fixture's teacher is a stand-in returning the stored codes; the step takes
            # them as its "proxy_codes" draw (the teacher network is not part of the file).
            config.teacher.name = ""
        if config.losses.perceptual:
            sd = z.sub("init/loss_sd/perceptual_loss.convnext.")
            module = perceptual_nets.convnext_small()
            params = convert_perceptual.convert_convnext(_f32(sd), module)
            weights = str(tmp_path / perceptual_files.WEIGHT_FILES["convnext_s"])
            perceptual_files.save_params(weights, "convnext_s", params)
            config.perceptual.weights = weights
        self.mesh, self.rules = tp.one_device_mesh()
        self.batch_sh = parallel.batch_sharding(self.mesh, self.rules)
        with jax.default_matmul_precision("highest"):
            self.t = tokenizer.build_training(config, self.mesh, self.rules, self.batch_sh)
            state = self.t.init(jax.random.key(0))
        self.sd0 = _f32(z.sub("init/sd/"))
        params = self.convert(self.sd0)
        sh = self.t.shardings
        state = state.replace(params=_put(params, state.params, sh.params),
                              ema_params=_put(params, state.params, sh.ema_params))
        if self.t.gan is not None:
            loss_sd = _f32(z.sub("init/loss_sd/"))
            self.dsd0 = {k: v for k, v in loss_sd.items() if k.startswith("discriminator.")}
            lecam = gan.lecam_init(loss_sd["ema_real_logits_mean"].item(),
                                   loss_sd["ema_fake_logits_mean"].item())
            g, g_sh = state.extras["gan"], sh.extras["gan"]
            state = state.replace(extras={**state.extras, "gan": g.replace(
                params=_put(self.convert_d(self.dsd0), g.params, g_sh.params),
                lecam=_put(lecam, g.lecam, g_sh.lecam))})
        self.state = state
        model = self.t.model
        self.forward = jax.jit(lambda p, x: (
            model.apply({"params": p}, x, method=model.encode),
            model.apply({"params": p}, x)[0]))

    def context(self):
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(jax.default_matmul_precision("highest"))
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def convert(self, sd):
        return convert_titok.convert_titok(sd, self.t.model)

    def convert_d(self, sd):
        return convert_disc.convert_titok_discriminator(sd, self.t.gan.disc)

    def batch(self, i: int) -> dict:
        images = tp.nhwc(self.z["images"][i])
        batch = {"image": images}
        if "proxy_codes" in self.z:
            batch["draws"] = {"proxy_codes": np.asarray(self.z["proxy_codes"][i], np.int32)}
        return jax.device_put(batch, self.batch_sh)

    def step(self, i: int):
        """Runs step i (0-based); returns (scalars, codes, reconstruction) on the host, the
        codes and reconstruction of the forward with the params the step starts from."""
        batch = self.batch(i)
        with self.context():
            codes, out = self.forward(self.state.params, batch["image"])
            codes, out = np.asarray(codes), np.asarray(out)
            self.state, scalars, finite = self.t.steps.at(i)(self.state, batch, self.t.frozen)
        assert bool(finite), f"step {i + 1} was not finite"
        return jax.device_get(scalars), codes, out

    def host_state(self):
        return jax.device_get(self.state)

    def resync(self, snap: str, step: int) -> None:
        """Continues from the official state stored at snapshot `snap` (after `step` steps):
        the stored params (and the EMA: where stored, and after a step whose EMA decay is 0
        it equals the params), AdamW moments, discriminator and LeCam buffers replace
        tok1d's; tensors the fixture does not store keep tok1d's values."""
        z, state = self.z, self.host_state()
        params = _substitute(self.convert, self.sd0, z.sub(f"{snap}/sd/"), state.params)
        ema = state.ema_params
        if ema is not None:
            decays = self.meta.get("ema", {}).get("decay_per_step", [])
            if step <= len(decays) and decays[step - 1] == 0:
                ema = params
            ema = _substitute(self.convert, self.sd0, z.sub(f"{snap}/ema/"), ema)
        opt = _set_adam(state.opt_state, params, self.convert, self.sd0, z, f"{snap}/adam/")
        state = state.replace(params=params, ema_params=ema, opt_state=opt)
        loss_sd = z.sub(f"{snap}/loss_sd/")
        if self.t.gan is not None and loss_sd:
            disc = {k: v for k, v in loss_sd.items() if k.startswith("discriminator.")}
            g = state.extras["gan"]
            d_params = _substitute(self.convert_d, self.dsd0, disc, g.params)
            d_opt = _set_adam(g.opt_state, d_params, self.convert_d, self.dsd0, z,
                              f"{snap}/disc_adam/")
            lecam = {k: np.asarray(loss_sd[k], g.lecam[k].dtype).reshape(())
                     for k in ("ema_real_logits_mean", "ema_fake_logits_mean")}
            state = state.replace(extras={**state.extras, "gan": g.replace(
                params=d_params, opt_state=d_opt, lecam=lecam)})
        self.state = jax.device_put(state, self.t.shardings)


def _check_tensors(report, name, convert, sd0, stored, tree, bound, kind_of=None):
    """Per official tensor of `stored` ({key: value}): rel error of tok1d's `tree` elements."""
    for key, value in stored.items():
        want, got = tp.tensor_in_tok1d(convert, sd0, key, value, tree)
        bound_k, kind = (bound, "rel") if kind_of is None else kind_of(key)
        if kind == "abs":
            report.abs(f"{name}[{key}]", got, want, bound_k)
        else:
            report.rel(f"{name}[{key}]", got, want, bound_k)


def _check_adam(report, name, convert, sd0, z, prefix, opt_state, params, counts, bound_mu,
                bound_nu):
    """The stored AdamW moments `{prefix}<p>/exp_avg|exp_avg_sq` and step counts."""
    mu, nu, count = _adam(opt_state, params)
    keys = sorted({k[len(prefix):].rsplit("/", 1)[0] for k in z if k.startswith(prefix)})
    for key in keys:
        for moment, tree, bound in (("exp_avg", mu, bound_mu), ("exp_avg_sq", nu, bound_nu)):
            want, got = tp.tensor_in_tok1d(convert, sd0, key, z[f"{prefix}{key}/{moment}"],
                                           tree)
            report.rel(f"{name}/{moment}[{key}]", got, want, bound)
        if key in counts:
            report.check(f"{name}/step_count[{key}]", abs(count - counts[key]), 0.0, "abs")


def _check_decay_groups(report, groups, params, convert, sd0, optim_cfg, name):
    """The weight-decay split tok1d's optimizer uses vs the official parameter groups."""
    mask = optim.decay_mask(params, optim_cfg.decay_mask,
                            optim.names_list(optim_cfg.no_decay_names))
    frozen = set(optim.frozen_groups(optim_cfg))
    flat = {"/".join(map(str, k)): bool(v)
            for k, v in traverse_util.flatten_dict(mask).items()
            if k[0] not in frozen}
    decayed = {k for k, v in flat.items() if v}
    want_decay = tp.tok1d_keys(convert, sd0, groups["decay"])
    want_no = tp.tok1d_keys(convert, sd0, groups["no_decay"])
    report.check(f"{name}/decayed_not_official", len(decayed - want_decay), 0.0, "mismatches")
    report.check(f"{name}/official_not_decayed", len(want_decay - decayed), 0.0, "mismatches")
    report.check(f"{name}/trainable_not_in_groups", len(set(flat) - want_decay - want_no), 0.0,
                 "mismatches")


def _check_snapshot(report, run, snap, state, params0, sum_lr):
    """Params, EMA, AdamW moments (and for GAN fixtures the discriminator, its moments and the
    LeCam buffers) stored at snapshot `snap`, against tok1d's host `state`."""
    z, meta = run.z, run.meta
    zero_grad = set(meta.get("zero_grad_params", ()))
    floor = _floor(z, f"check/f32_vs_f64_maxrel/{snap}_params",
                   "check/f32_vs_f64_maxrel/final_params")
    stored = z.sub(f"{snap}/sd/")
    kind_of = lambda key: ((2 * sum_lr, "abs") if key in zero_grad  # noqa: E731
                           else (PARAM_FLOOR_MULT * floor, "rel"))
    if stored:
        _check_tensors(report, f"{snap}/params", run.convert, run.sd0, stored, state.params,
                       None, kind_of)
    if snap == "final" and stored:  # the parameter change, loosely (README §8)
        bound = max(DELTA_BOUND, 2 * _floor(z, "check/f32_vs_f64_maxrel/final_params_delta"))
        delta = jax.tree.map(lambda a, b: a - b, state.params, params0)
        changed = {k: np.asarray(v) - run.sd0[k] for k, v in stored.items()
                   if k not in zero_grad and np.any(np.asarray(v) != run.sd0[k])}
        _check_tensors(report, "final/params_delta", run.convert,
                       {k: np.zeros_like(v) for k, v in run.sd0.items()}, changed, delta, bound)
    if snap == "step1" and state.ema_params is not None:  # EMA decay 0 at step 1
        err = max(tp.rel_err(e, p) for e, p in zip(jax.tree.leaves(state.ema_params),
                                                    jax.tree.leaves(state.params)))
        report.check("step1/ema_equals_params", err, 1e-6)
    if z.sub(f"{snap}/ema/"):
        bound = PARAM_FLOOR_MULT * _floor(z, "check/f32_vs_f64_maxrel/final_ema")
        _check_tensors(report, f"{snap}/ema", run.convert, run.sd0, z.sub(f"{snap}/ema/"),
                       state.ema_params, bound)
    _check_adam(report, f"{snap}/adam", run.convert, run.sd0, z, f"{snap}/adam/",
                state.opt_state, state.params, meta.get("adam_step_count", {}).get(snap, {}),
                1e-3 if run.stage2 else 1e-4, 1e-3 if run.stage2 else 2e-4)
    loss_sd = z.sub(f"{snap}/loss_sd/")
    if run.t.gan is not None and loss_sd:
        bound = PARAM_FLOOR_MULT * _floor(z, "check/f32_vs_f64_maxrel/final_discriminator")
        disc = {k: v for k, v in loss_sd.items() if k.startswith("discriminator.")}
        _check_tensors(report, f"{snap}/disc_params", run.convert_d, run.dsd0, disc,
                       state.extras["gan"].params, bound)
        for which in ("real", "fake"):
            key = f"ema_{which}_logits_mean"
            report.check(f"{snap}/{key}",
                         _rel_scalar(state.extras["gan"].lecam[key], loss_sd[key].item()),
                         LOSS_BOUND)
        _check_adam(report, f"{snap}/disc_adam", run.convert_d, run.dsd0, z,
                    f"{snap}/disc_adam/", state.extras["gan"].opt_state, state.extras["gan"].params,
                    meta.get("disc_adam_step_count", {}).get(snap, {}), 1e-3, 1e-3)


def _check_step(report, run, i, scalars, codes, out, names, norm_bound, *, gradients, gan):
    """Step i's official log values, codes, image 0's reconstruction and LeCam EMAs, and with
    `gradients` its grad norms (G, and D on a GAN step)."""
    z, config = run.z, run.config
    logged = official.log_values(scalars, config)
    for name in names:
        want = float(z[f"step/train/{name}"][i])
        if np.isnan(want):
            continue  # a D-step value of a step without D step
        assert name in logged, f"no tok1d value for the official log value {name}"
        report.check(f"step/train/{name}[{i + 1}]", _rel_scalar(logged[name], want),
                     _step_bound(z, name, LOSS_BOUND, i))
    report.exact(f"step/codes[{i + 1}]", codes, np.asarray(z["step/codes"][i])[:, 0])
    if "step/recons_img0" in z:
        bound = max(3e-4, PARAM_FLOOR_MULT * _floor(z, "check/f32_vs_f64_maxrel/recons_img0"))
        report.rel(f"step/recons_img0[{i + 1}]", out[0].transpose(2, 0, 1),
                   z["step/recons_img0"][i], bound)
    if "step/lecam_ema_real_after" in z:
        lecam = jax.device_get(run.state.extras["gan"].lecam)
        for which in ("real", "fake"):
            report.check(f"step/lecam_ema_{which}_after[{i + 1}]",
                         _rel_scalar(lecam[f"ema_{which}_logits_mean"],
                                     z[f"step/lecam_ema_{which}_after"][i]), LOSS_BOUND)
    if gradients:
        report.check(f"step/grad_norm[{i + 1}]",
                     _rel_scalar(scalars["grad_norm"], z["step/grad_norm"][i]), norm_bound)
        if gan:
            report.check(f"step/grad_norm_disc[{i + 1}]",
                         _rel_scalar(scalars["d_grad_norm"], z["step/grad_norm_disc"][i]),
                         norm_bound)


def _run(path, tmp_path, recipe, resync=True, phase_programs=True):
    run = Run(path, tmp_path, phase_programs)
    z, meta, config = run.z, run.meta, run.config
    report = tp.Report(recipe, path)
    steps = z.steps()
    snaps = meta.get("snapshot_steps", {"step1": 1, "final": steps})
    names = sorted(k[len("step/train/"):] for k in z if k.startswith("step/train/"))
    gan_on = np.asarray(z["step/gan_on"]) if "step/gan_on" in z else np.zeros(steps, int)
    norm_bound = 1e-4 if run.stage2 else 1e-5
    # With a discriminator the run is chaotic at float32 noise level (module docstring): after
    # each snapshot the comparison continues from the official state stored there.
    resync = resync and run.t.gan is not None
    lrs, d_lrs, lr_since_sync = [], [], 0.0

    params0 = jax.device_get(run.state.params)
    _check_decay_groups(report, meta["param_groups"], params0, run.convert, run.sd0,
                        config.optim, "decay_groups")
    if "param_groups_disc" in meta:
        _check_decay_groups(report, meta["param_groups_disc"],
                            jax.device_get(run.state.extras["gan"].params), run.convert_d, run.dsd0,
                            config.disc_optim, "disc_decay_groups")

    # Float32 with a discriminator (`resync`): a GAN step's gradients may flip a kink of D
    # (module docstring), so from the first GAN step after a re-synchronisation only the values
    # the step computes before its gradients (losses, LeCam EMAs, codes, reconstruction) are
    # compared, and nothing from the steps after it until a snapshot that stores G and D
    # replaces the state; the float64 run checks those steps.
    drifted = False
    for i in range(steps):
        scalars, codes, out = run.step(i)
        lrs.append(scalars["lr"])
        lr_since_sync += float(scalars["lr"])
        kinked = resync and bool(gan_on[i])  # this step's gradients may have flipped a kink
        if gan_on[i]:
            d_lrs.append((i, scalars["d_lr"]))
        else:
            assert float(scalars.get("gan_active", 0.0)) == 0.0
        if not drifted:
            _check_step(report, run, i, scalars, codes, out, names, norm_bound,
                        gradients=not kinked, gan=bool(gan_on[i]))
        drifted = drifted or kinked
        for snap, at in snaps.items():
            if at == i + 1:
                if not drifted:
                    _check_snapshot(report, run, snap, run.host_state(), params0, lr_since_sync)
                if resync and at < steps:
                    run.resync(snap, at)
                    lr_since_sync = 0.0
                    drifted = drifted and not (z.sub(f"{snap}/sd/") and z.sub(f"{snap}/loss_sd/"))

    report.rel("step/lr", lrs, z["step/lr"], LR_BOUND)
    if d_lrs:
        idx, got = zip(*d_lrs)
        report.rel("step/lr_disc", got, np.asarray(z["step/lr_disc"])[list(idx)], LR_BOUND)
    if run.stage2:  # frozen tensors never change
        final = run.host_state().params
        err = max(tp.abs_err(a, b) for g in optim.frozen_groups(config.optim)
                  for a, b in zip(jax.tree.leaves(final[g]), jax.tree.leaves(params0[g])))
        report.check("final/frozen_unchanged", err, 0.0, "abs")
    report.finish()
    return report


@pytest.mark.parametrize("path", tp.fixture_params("train_titok_stage*.npz"))
def test_the_mapping_crops_images_as_the_official_loader(path):
    """TiTok's webdataset loader: torchvision's Resize + RandomCrop / CenterCrop rounding."""
    meta = tp.load(path).meta
    config = official.config_from_official(
        meta["config"], size_tables=meta.get("size_tables_added"),
        pixel_decoder=meta.get("pixel_decoder_config"),
        discriminator=meta.get("discriminator_ctor"))
    assert config.data.resize_rule == "torchvision"


@pytest.mark.parametrize("path", tp.fixture_params("train_titok_stage1*.npz"))
def test_titok_stage1_train_step(path, tmp_path):
    _run(path, tmp_path, "titok_stage1")


@pytest.mark.parametrize("path", tp.fixture_params("train_titok_stage2*.npz"))
def test_titok_stage2_train_step(path, tmp_path):
    _run(path, tmp_path, "titok_stage2")


def run_float64(path: str, tmp_dir: str, name: str) -> None:
    """`_run` free-running in float64 (called by `tp.run_in_float64` in a subprocess)."""
    # the float32 runs step the trainer's default, one program per phase (D off, then on);
    # this one a single program for every step (config.phase_programs=False)
    _run(path, pathlib.Path(tmp_dir), name, resync=False, phase_programs=False)


@pytest.mark.parametrize("path", tp.fixture_params("train_titok_stage2*.npz"))
def test_titok_stage2_float64_run_matches_official_at_the_floors(path, tmp_path):
    """The same trainer step computing in float64, free-running from the initial weights (no
    re-synchronisation): it lands on the official float32 run within the file's own
    float32-vs-float64 floors on every step (the official float32 run is on the float64 side
    of every discriminator kink), which checks the semantics of steps 2-4 end to end."""
    tp.run_in_float64("test_train_parity_titok", "run_float64", path, str(tmp_path),
                      "titok_stage2 (float64)")
