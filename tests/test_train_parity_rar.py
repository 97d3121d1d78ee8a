"""Train-step parity of RAR with the official training step (`train_rar*.npz`, fixture README
section "rar.npz, train_rar.npz"; section 8 format).

For every fixture file: the config comes from the official config stored in the file
(`tok1d.official.rar.config_from_official(meta["config"])`), the initial official weights are
converted (`tok1d.weights.convert.rar`), and the stored batches run through the generator
trainer's own jitted train step with the official random draws replayed through
`batch["draws"]` (class-label drop "drop_rand_u", permute-or-not "order_rand_u" and the
permutations "order_perms"; the step itself decides from its randomness annealing which
sequences are permuted). Compared: per step the permutation probability, the orders, the LR,
the official loss log values, the grad norm; after step 1 and at the end the params, the
recorded AdamW moments, the parameter change; the weight-decay groups (with the official
name-matching quirks).
"""

import functools

import jax
import numpy as np
import pytest

import train_parity as tp
import train_parity_generators as tpg
from tok1d.objectives import draws as draws_lib
from tok1d.objectives import tokens as token_obj
from tok1d.official import rar as official
from tok1d.train import generator
from tok1d.weights.convert import rar as convert_rar

RATIO_ABS = 1e-7  # the step's float32 ratio vs Python's float64 2/3, 1/3


def batches(z: tp.Fixture) -> list[dict]:
    return [{"codes": np.asarray(z["tokens"][k], np.int32),
             "label": np.asarray(z["labels"][k], np.int32),
             "draws": {"drop_rand_u": np.asarray(z["drop_rand_u"][k], np.float32),
                       "order_rand_u": np.asarray(z["order_u"][k], np.float32),
                       "order_perms": np.asarray(z["perm_draws"][k], np.int32)}}
            for k in range(z.steps())]


@pytest.mark.parametrize("path", tp.fixture_params("train_rar*.npz"))
def test_train_step_matches_official(path):
    z = tp.load(path)
    meta = z.meta
    config = official.config_from_official(meta["config"])
    assert config.precision == "float32", "the fixtures run the official step in float32"
    # The official config's EMA switch maps onto ema_decay; `check_run` compares the EMA when
    # the file stores one (`final/ema/`), so a file recorded with use_ema on is checked too.
    assert (config.ema_decay > 0) == bool(z.sub("final/ema/")), \
        f"{path}: ema_decay={config.ema_decay} but the file {'lacks' if config.ema_decay else 'has'} final/ema/"
    model = generator.build_generator(config)
    sd = {k: np.asarray(v, np.float32) for k, v in z.sub("init/sd/").items()}
    convert = functools.partial(convert_rar.convert_rar, model=model)
    params0 = convert(sd)
    report = tp.Report("rar", path)

    # The orders the step derives from the draws at its annealed permutation probability.
    data = batches(z)
    g = config.generator
    for k, batch in enumerate(data):
        ratio = token_obj.random_ratio(k, g.randomness_anneal_start, g.randomness_anneal_end)
        report.abs(f"random_ratio[step {k + 1}]", ratio, z["step/random_ratio"][k], RATIO_ABS)
        orders = token_obj.random_orders(jax.random.key(0), *batch["codes"].shape, ratio,
                                         draw=draws_lib.drawer(batch["draws"]))
        report.exact(f"orders[step {k + 1}]", orders, z["orders"][k])
        report.exact(f"labels_shuffled[step {k + 1}]",
                     np.take_along_axis(batch["codes"], np.asarray(orders), 1),
                     z["step/labels_shuffled"][k])

    # The trainer's own step over the stored batches.
    scalars, state1, final = tpg.run_steps(config, model, params0, data)
    for k, s in enumerate(scalars):
        report.abs(f"step_random_ratio[step {k + 1}]", s["random_ratio"],
                   z["step/random_ratio"][k], RATIO_ABS)
        for log_name, name in official.LOG_NAMES.items():
            want = z[f"step/{log_name}"][k]
            if log_name == "train/correct_tokens":  # an accuracy: README bound exact / 1e-6
                report.abs(f"{log_name}[step {k + 1}]", s[name], want, 1e-6)
            else:
                report.rel(f"{log_name}[step {k + 1}]", s[name], want, tpg.LOSS_REL)
    # LR, grad norm; state after step 1 and at the end per official tensor; decay groups.
    tpg.check_run(report, z, config, convert, sd, params0, scalars, state1, final)
    report.finish()
