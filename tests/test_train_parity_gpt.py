"""Train-step parity of GigaTok's / LlamaGen's class-conditional GPT with the official training
step (`train_gpt*.npz`, fixture README section 8.2).

For every fixture file: the config comes from the `ModelArgs` and train_c2i arguments stored in
the file (`tok1d.official.gpt.config_from_official`), the initial official weights are
converted (`tok1d.weights.convert.gpt`), and the stored batches run through the generator trainer's own
jitted train step with the official class-dropout outcome replayed through `batch["draws"]`
("drop_labels"). Compared: per step the LR, the loss, the grad norm; after step 1 and at the end
the params, the final EMA, the recorded AdamW moments; the weight-decay groups.
"""

import functools

import numpy as np
import pytest

import train_parity as tp
import train_parity_generators as tpg
from tok1d.weights.convert import gpt as convert_gpt
from tok1d.official import gpt as official
from tok1d.train import generator


def train_args(meta) -> dict:
    """train_c2i.py's arguments (argparse dest names) of the run, from the fixture's
    `meta.params` (README 8.2: its lr / end_lr / wd / betas / max_grad_norm / batch / total /
    warmup / scheduler, and fract_decay for a wsd run) and `meta.ema`; the fixture runs in
    float32 ("none")."""
    p = meta["params"]
    args = dict(lr=p["lr"], end_lr=p["end_lr"], weight_decay=p["wd"], beta1=p["betas"][0],
                beta2=p["betas"][1], max_grad_norm=p["max_grad_norm"],
                global_batch_size=p["batch"], iterations=p["total"], warmup=p["warmup"],
                lr_scheduler=p["scheduler"], ema="ema" in meta, mixed_precision="none",
                global_seed=meta.get("seed", 0),
                dataset="imagenet_code")  # the fixture stores the codes of each step
    if "fract_decay" in p:  # the wsd scheduler's decay fraction
        args["fract_decay"] = p["fract_decay"]
    return args


def batches(z: tp.Fixture) -> list[dict]:
    return [{"codes": np.asarray(z["codes"][k], np.int32),
             "label": np.asarray(z["labels"][k], np.int32),
             "draws": {"drop_labels": np.asarray(z["drop_labels"][k]).astype(bool)}}
            for k in range(z.steps())]


@pytest.mark.parametrize("path", tp.fixture_params("train_gpt*.npz"))
def test_train_step_matches_official(path):
    z = tp.load(path)
    meta = z.meta
    config = official.config_from_official(meta["model_args"], train_args(meta))
    if "ema" in meta:
        assert config.ema_decay == meta["ema"]["decay"]
    model = generator.build_generator(config)
    sd = {k: np.asarray(v, np.float32) for k, v in z.sub("init/sd/").items()}
    convert = functools.partial(convert_gpt.convert_gpt, model=model)
    params0 = convert(sd)
    report = tp.Report("gpt", path)

    scalars, state1, final = tpg.run_steps(config, model, params0, batches(z))
    for k, s in enumerate(scalars):
        for log_name, name in official.LOG_NAMES.items():
            report.rel(f"{log_name}[step {k + 1}]", s[name], z[f"step/{log_name}"][k],
                       tpg.LOSS_REL)
    # LR, grad norm; state after step 1 and at the end per official tensor; decay groups.
    tpg.check_run(report, z, config, convert, sd, params0, scalars, state1, final)
    report.finish()
