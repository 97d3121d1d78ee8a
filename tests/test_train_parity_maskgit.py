"""Train-step parity of the MaskGIT generator (TiTok's ImageBert + MLMLoss) with the official
training step (`train_maskgit*.npz`, fixture README section 8.4).

For every fixture file: the config comes from the official config stored in the file
(`tok1d.official.maskgit.config_from_official(meta["config"])`), the initial official weights
are converted (`tok1d.weights.convert.maskgit`), and the stored batches run through the generator
trainer's own jitted train step with the official random draws replayed through
`batch["draws"]` (masking draws "mask_timesteps_u" / "mask_rand_u", class-dropout draw
"drop_rand_u"). Compared: per step the LR, the official loss log values, the grad norm; the
masks, model input ids and step-1 logits / argmax; after step 1 and at the end the params, the
final EMA, the recorded AdamW moments; the weight-decay groups.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_parity as tp
import train_parity_generators as tpg
from tok1d.weights.convert import maskgit as convert_maskgit
from tok1d.official import maskgit as official
from tok1d.objectives import draws as draws_lib
from tok1d.objectives import tokens as token_obj
from tok1d.train import generator

# The official random draws the step replays (README 8.4; `tok1d.objectives.tokens.make_loss_fn`).
DRAWS = ("mask_timesteps_u", "mask_rand_u", "drop_rand_u")


def batches(z: tp.Fixture) -> list[dict]:
    out = []
    for k in range(z.steps()):
        draws = {name: np.asarray(z[name][k]) for name in DRAWS if name in z}
        if "drop_rand_u" not in draws:  # a file with only the outcome of the label drop
            draws["drop_labels"] = np.asarray(z["drop_labels"][k])
        out.append({"codes": np.asarray(z["tokens"][k], np.int32),
                    "label": np.asarray(z["labels"][k], np.int32), "draws": draws})
    return out


def step_inputs(model, gcfg, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask, masked tokens, labels after the class dropout, BERT input ids) of a batch, as the
    train step derives them (the library functions it calls, with the batch's draws)."""
    draw = draws_lib.drawer(draws_lib.of_batch(batch))
    codes = jnp.asarray(batch["codes"])
    labels = jnp.asarray(batch["label"])
    tokens, mask = token_obj.random_mask(jax.random.key(0), codes, model.mask_id,
                                         gcfg.mask_schedule, draw=draw)
    dropped = token_obj.drop_labels(jax.random.key(1), labels, gcfg.label_dropout,
                                    model.null_label, draw=draw)
    ids = model._input_ids(tokens, dropped)
    return np.asarray(mask), np.asarray(tokens), np.asarray(dropped), np.asarray(ids)


@pytest.mark.parametrize("path", tp.fixture_params("train_maskgit*.npz"))
def test_train_step_matches_official(path):
    z = tp.load(path)
    meta = z.meta
    config = official.config_from_official(meta["config"])
    assert config.precision == "float32", "the fixtures run the official step in float32"
    model = generator.build_generator(config)
    sd = {k: np.asarray(v, np.float32) for k, v in z.sub("init/sd/").items()}
    convert = functools.partial(convert_maskgit.convert_maskgit, model=model)
    params0 = convert(sd)
    report = tp.Report("maskgit", path)

    # Inputs the step derives from the draws: masks, masked tokens, dropped labels, input ids.
    data = batches(z)
    for k, batch in enumerate(data):
        mask, tokens, labels, ids = step_inputs(model, config.generator, batch)
        report.exact(f"masks[step {k + 1}]", mask, z["masks"][k])
        report.exact(f"masked_tokens[step {k + 1}]", tokens, z["masked_tokens"][k])
        report.exact(f"drop_labels[step {k + 1}]",
                     (labels == model.null_label).astype(np.int64), z["drop_labels"][k])
        report.exact(f"input_ids[step {k + 1}]", ids, z["step/input_ids"][k])
        if k == 0:
            with jax.default_matmul_precision("highest"):
                logits = np.asarray(model.apply({"params": params0}, tokens, labels))
            want = z["step1/logits"]
            report.rel("step1_logits", logits, want, 2e-5)
            report.exact("step1_argmax[masked]", np.argmax(logits, -1)[mask],
                         np.argmax(want, -1)[mask])

    # The trainer's own step over the stored batches.
    scalars, state1, final = tpg.run_steps(config, model, params0, data)
    for k, s in enumerate(scalars):
        for log_name, name in official.LOG_NAMES.items():
            want = z[f"step/{log_name}"][k]
            if log_name == "train/correct_tokens":  # an accuracy: README bound 1e-6 absolute
                report.abs(f"{log_name}[step {k + 1}]", s[name], want, 1e-6)
            else:
                report.rel(f"{log_name}[step {k + 1}]", s[name], want, tpg.LOSS_REL)
    # LR, grad norm; state after step 1 and at the end per official tensor; decay groups.
    tpg.check_run(report, z, config, convert, sd, params0, scalars, state1, final)
    report.finish()
