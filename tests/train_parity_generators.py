"""What the generator train-step parity tests (tests/test_train_parity_{maskgit,gpt}.py) share:
running the generator trainer's own jitted step from converted official weights over the
stored batches, and the per-tensor state comparisons of the fixture README (section 8)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from optax import tree_utils

import train_parity as tp
from tok1d import parallel
from tok1d.train import optim
from tok1d.train import generator

# Fixture README section 8 (port in float32, highest matmul precision).
LOSS_REL = 1e-5          # per-step losses and grad norms
EXP_AVG_REL = 1e-4       # AdamW moments per tensor
EXP_AVG_SQ_REL = 2e-4
STATE_FLOOR_FACTOR = 10  # params / EMA: <= 10x the file's f32-vs-f64 floor
DELTA_REL = 1e-2         # the parameter change (final - init), loosely (sign flips)
# The step computes its LR in float32 (jax without x64); the official LR is Python float64
# arithmetic: a few float32 ulps of the base LR.
LR_REL = 1e-6


def run_steps(config, model: nn.Module, params0: Any, batches: Sequence[Mapping[str, Any]]
              ) -> tuple[list[dict[str, np.ndarray]], Any, Any]:
    """Runs `generator.build_training`'s jitted train step (one compilation) from `params0`
    (params and EMA; fresh optimizer state) over `batches` on one device, in float32 with
    highest-precision matmuls. Returns (per-step scalars, host state after step 1, final host
    state)."""
    mesh, rules = tp.one_device_mesh()
    batch_sh = parallel.batch_sharding(mesh, rules)
    _, shardings, init, step = generator.build_training(config, model, mesh, rules, batch_sh)
    scalars, after_first = [], None
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh), \
            nn.logical_axis_rules(rules):
        state = init(jax.random.key(config.seed))
        state = state.replace(
            params=jax.device_put(params0, shardings.params),
            ema_params=(None if state.ema_params is None
                        else jax.device_put(params0, shardings.ema_params)))
        for k, batch in enumerate(batches):
            state, out, finite = step(state, batch)
            assert bool(finite), f"step {k + 1} was not finite"
            scalars.append({name: np.asarray(v) for name, v in out.items()})
            if k == 0:
                after_first = jax.device_get(state)
        final = jax.device_get(state)
    return scalars, after_first, final


def adam_moment(state, which: str) -> Any:
    """The AdamW first ("mu") or second ("nu") moment tree of a train state."""
    found = tree_utils.tree_get(state.opt_state, which)
    assert found is not None, f"no {which} in the optimizer state"
    return found


def zero_grad_bound(lrs: Sequence[float], steps: int) -> float:
    """Absolute bound for tensors whose exact gradient is zero (float32 rounding noise that
    AdamW turns into moves of up to ~lr per step): 2 x the sum of the LRs used so far."""
    return 2.0 * float(np.sum(np.asarray(lrs, np.float64)[:steps]))


def check_state(report: tp.Report, tag: str, tmap: tp.TensorMap,
                official: Mapping[str, np.ndarray], tree: Any, bound: float,
                zero_grad: Sequence[str] = (), zero_bound: float = 0.0) -> None:
    """Per official tensor: max|tok1d - official| / max|official| <= bound; tensors in
    `zero_grad` are compared with the absolute `zero_bound`."""
    for key, (want, got) in tmap.pairs(official, tree).items():
        if key in zero_grad:
            report.abs(f"{tag}_zero_grad[{key}]", got, want, zero_bound)
        else:
            report.rel(f"{tag}[{key}]", got, want, bound)


def check_delta(report: tp.Report, tmap: tp.TensorMap, init: Mapping[str, np.ndarray],
                final: Mapping[str, np.ndarray], final_tree: Any, init_tree: Any,
                z: tp.Fixture, skip: Sequence[str] = ()) -> None:
    """The parameter change (final - init) per tensor, with the README's loose bound (1e-2 of
    its max) or 10x the official float32 noise of the change when that is larger: the file's
    `final_params_delta` floor, else its `final_params` floor (relative to max|p|) expressed
    relative to the tensor's max change."""
    delta_floor = tp.optional(z, "check/f32_vs_f64_maxrel/final_params_delta")
    params_floor = float(z["check/f32_vs_f64_maxrel/final_params"])
    got_final = tmap.pairs(final, final_tree)
    got_init = tmap.pairs(init, init_tree)
    for key, (want, got) in got_final.items():
        if key in skip:
            continue
        w0, g0 = got_init[key]
        change = np.max(np.abs(want - w0))
        if change == 0:  # a tensor the official step leaves unchanged
            report.abs(f"param_delta_unchanged[{key}]", got - g0, want - w0, 0.0)
            continue
        floor = (float(delta_floor) if delta_floor is not None
                 else params_floor * np.max(np.abs(want)) / change)
        report.rel(f"param_delta[{key}]", got - g0, want - w0,
                   max(DELTA_REL, STATE_FLOOR_FACTOR * floor))


def check_moments(report: tp.Report, z: tp.Fixture, prefix: str, tmap: tp.TensorMap,
                  state) -> None:
    """`<prefix>/adam/<p>/{exp_avg, exp_avg_sq}` against tok1d's AdamW mu / nu."""
    for name, tok1d_name, bound in (("exp_avg", "mu", EXP_AVG_REL),
                                    ("exp_avg_sq", "nu", EXP_AVG_SQ_REL)):
        official = {k[len(prefix) + 6:-len(name) - 1]: z[k] for k in z
                    if k.startswith(prefix + "/adam/") and k.endswith("/" + name)}
        assert official, f"no {prefix}/adam/*/{name} in {z.path}"
        moment = adam_moment(state, tok1d_name)
        for key, (want, got) in tmap.pairs(official, moment).items():
            report.rel(f"{prefix}/{name}[{key}]", got, want, bound)


def check_decay_groups(report: tp.Report, convert: Callable[[dict], Any],
                       sd: Mapping[str, np.ndarray], optim_cfg, params: Any,
                       groups: Mapping[str, Sequence[str]]) -> None:
    """The weight-decay mask the optimizer applies (`optim.decay_mask_of`) selects exactly the
    tok1d parameters of the official decay group (`meta.param_groups`), none of the no-decay
    group."""
    flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask_of(optim_cfg, params))[0]
    decayed = {"/".join(str(getattr(p, "key", p)) for p in path)
               for path, on in flat if on}
    want = tp.tok1d_keys(convert, sd, groups["decay"])
    no = tp.tok1d_keys(convert, sd, groups["no_decay"])
    report.check("decay_groups (tok1d leaves decayed but not official, or the reverse, "
                 "or shared by both groups)",
                 len(decayed ^ want) + len(want & no), 0.0, "mismatches")


def check_lrs(report: tp.Report, scalars: Sequence[Mapping[str, np.ndarray]], lrs: np.ndarray,
              base_lr: float) -> None:
    """The LR each step used, |tok1d - official| / base LR <= LR_REL (float32 schedule
    arithmetic: a few ulps of the base LR, also where the schedule is far below it)."""
    for k, (s, lr) in enumerate(zip(scalars, lrs)):
        err = abs(float(s["lr"]) - float(lr)) / base_lr
        report.check(f"lr[step {k + 1}]", err, LR_REL, "rel to base lr")


def check_run(report: tp.Report, z: tp.Fixture, config, convert: Callable[[dict], Any],
              sd: Mapping[str, np.ndarray], params0: Any, scalars, state1, final) -> None:
    """Everything but the loss terms of a `run_steps` run against the fixture: per step the LR
    and the grad norm; the params after step 1 and at the end, the final EMA (when stored) and
    the parameter change per official tensor (zero-gradient tensors of `meta.zero_grad_params`
    with the absolute bound); the recorded AdamW moments; the weight-decay groups."""
    meta = z.meta
    lrs = np.asarray(z["step/lr"], np.float64)
    check_lrs(report, scalars, lrs, config.optim.lr)
    for k, s in enumerate(scalars):
        report.rel(f"grad_norm[step {k + 1}]", s["grad_norm"], z["step/grad_norm"][k], LOSS_REL)

    tmap = tp.TensorMap(convert, sd)
    zero = tuple(meta.get("zero_grad_params", ()))
    steps = z.steps()

    def floor(name: str) -> float:
        return STATE_FLOOR_FACTOR * max(float(z[f"check/f32_vs_f64_maxrel/{name}"]), 1e-6)

    check_state(report, "step1_params", tmap, z.sub("step1/sd/"), state1.params,
                floor("final_params"), zero, zero_grad_bound(lrs, 1))
    check_state(report, "final_params", tmap, z.sub("final/sd/"), final.params,
                floor("final_params"), zero, zero_grad_bound(lrs, steps))
    ema = z.sub("final/ema/")
    if ema:
        check_state(report, "final_ema", tmap, ema, final.ema_params, floor("final_ema"), zero,
                    zero_grad_bound(lrs, steps))
    check_delta(report, tmap, sd, z.sub("final/sd/"), final.params, params0, z, skip=zero)
    check_moments(report, z, "step1", tmap, state1)
    check_moments(report, z, "final", tmap, final)
    check_decay_groups(report, convert, sd, config.optim, params0, meta["param_groups"])
