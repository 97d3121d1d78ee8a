r"""Class-conditional sampling with a trained generator, decoded to pixels by its tokenizer.

    tok1d sample --config=configs/maskgit_titok.py:l32 --checkpoint=WORKDIR_OR_DIR \
        --tokenizer=titok_l32/ --num_images=50000 --out=samples_l32/ [--config.sampling.x=v]

`--checkpoint` is a generator training workdir (its latest checkpoint, EMA params when kept)
or a pretrained directory (`tok1d convert maskgit|gpt ...`); the model is built from
`--config` (default for a training workdir: the run's own config.json, so
`tok1d sample --checkpoint=RUN --out=DIR` is enough) and the sampler options come from
`config.sampling` (overridable on the command line). `--tokenizer` (default `config.generator.tokenizer`) is a pretrained directory or a
tokenizer training workdir. Labels cycle through the classes (image i gets class
i mod num_classes, so 50000 images = 50 per ImageNet class, as the ADM / LlamaGen evaluations).

Writes OUT/samples.npz in the ADM evaluator's format (`arr_0`: uint8 (N, H, W, 3); `arr_1`:
int labels), OUT/grid.png (one row per class for the first classes; none with --grid_classes=0)
and OUT/sampling.json. An OUT that holds an earlier run's samples.npz is refused (nothing is
replaced).
Batches are sharded over every device of every host; progress (images/s, ETA) is printed.

Guidance / temperature sweep (`--sweep`): samples `--num_images` for every setting of
`--sweep_guidance` x `--sweep_temperature` (the sampler's guidance scale and temperature,
tok1d.evaluation.sweep), measures gFID / precision / recall (and, with labels, intra-class
diversity; on the Inception also sFID and IS) against the reference of `config.evaluation` (the
FID Inception and `evaluation.reference` or the data's eval split; a metric the reference
cannot give is named on the console) - or, with `--sweep_features=digits`, against the
held-out digits on the demo's digit classifier (tok1d.evaluation.digit_features) - and writes
OUT/sweep.md, OUT/sweep.json and OUT/sweep.png naming the best (lowest gFID):

    tok1d sample --config=configs/maskgit_titok.py:l32 --checkpoint=... --tokenizer=... \
        --sweep --sweep_guidance=1,2,3,4.5 --sweep_temperature=1,2 --num_images=10000 --out=DIR

Measured on the demo (configs/demo.py: MaskGIT on 16 TiTok tokens of the digits; 300 samples
per setting, FID-digits on the digit CNN against the 179 held-out digits, whose intra-class
diversity is 15.7): the old default, guidance 2 at temperature 1, gives gFID-digits 28.2,
recall 0.07, diversity 3.4 (near copies) at class accuracy 1.00; the best of guidance 0..3 x
temperature 1, 2, 4 is guidance 0 at temperature 2: gFID-digits 20.1, precision 0.99, recall
0.40, diversity 9.4, class accuracy 0.98 (temperature 4: diversity 16.8 but class accuracy
0.71). The same generator through this command (`--sweep_features=digits`, guidance 0, 0.5 x
temperature 2.5, 3; the demo's generator config with --config.data.name=digits
--config.data.image_size=32) names guidance 0.5 at temperature 2.5 the best of those four:
gFID-digits 19.3, precision 0.98, recall 0.37, diversity 9.8, class accuracy 0.97 (guidance 0
at temperature 3: diversity 14.4, class accuracy 0.86).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from tok1d import images as images_lib
from tok1d import errors, parallel, summary
from tok1d.cli import app
from tok1d.evaluation import digit_features, evaluator, report
from tok1d.evaluation import sweep as sweep_lib
from tok1d.generation import common as gen_common
from tok1d.generation.decode import SampleDecoder
from tok1d.train import generator as gen_trainer
from tok1d.train import loop
from tok1d.weights import layout, loaders, registry

USAGE = "[--config=FILE] --checkpoint=DIR --out=DIR [--tokenizer=DIR] [flags]"
CONFIG = ("Generator config file (get_config()) or a run's config.json; default: the "
          "--checkpoint run's config.json. Its sampling section sets the sampler.")
REQUIRED = ("config", "checkpoint", "out")
POSITIONAL = ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "Generator training workdir or pretrained dir.",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "Tokenizer (pretrained dir or workdir); default: "
                        "config.generator.tokenizer.", flag_values=fv)
    flags.DEFINE_integer("num_images", 50_000, "Number of images to sample.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "Global batch per step (0: 32 per device).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("grid_classes", 10, "Classes (rows) in grid.png (0: no grid).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("sweep", False, "Sweep guidance x temperature (module docstring): "
                      "sweep.md / sweep.json / sweep.png instead of samples.npz.",
                      flag_values=fv)
    flags.DEFINE_list("sweep_guidance", [], "Guidance scales of the sweep (empty: the "
                      "config's).", flag_values=fv)
    flags.DEFINE_list("sweep_temperature", [], "Temperatures of the sweep (empty: the "
                      "config's).", flag_values=fv)
    flags.register_validator("sweep_guidance", lambda v: _numbers(v),
                             "guidance scales are comma-separated finite numbers >= 0",
                             flag_values=fv)
    flags.register_validator("sweep_temperature", lambda v: _numbers(v),
                             "temperatures are comma-separated finite numbers >= 0",
                             flag_values=fv)
    flags.DEFINE_enum("sweep_features", "inception", ["inception", "digits"],
                      "Feature network of the sweep's metrics: the FID Inception of "
                      "config.evaluation, or the demo's digit classifier trained on "
                      "data.train_split (digits only).", flag_values=fv)
    app.define_distributed_flags(fv)


def _numbers(values: Sequence[str]) -> bool:
    """Finite numbers >= 0 (1e400 is inf, not a guidance scale)."""
    try:
        return all(0 <= float(v) < float("inf") for v in values)
    except ValueError:
        return False


def load_generator(config, checkpoint: str, step: Optional[int] = None):
    """(model, params) with params read from `checkpoint` (a workdir's checkpoint `step`,
    default the latest) and checked against the model."""
    loaders.check_kind(checkpoint, loaders.GENERATOR_KINDS, "a generator")
    model = gen_trainer.build_generator(config)
    run = layout.run_dir(checkpoint)  # (of one checkpoint's folder too)
    if os.path.isfile(layout.config_path(run)):  # a training workdir: of a generator?
        try:
            trainer = layout.read_config(run).get("trainer")
        except errors.UserError:  # a damaged config.json: sampling does not read it
            trainer = None
        if trainer not in (None, "generator"):
            raise errors.UserError(f"{checkpoint} is of a {trainer} run, not of a generator: "
                                   "--checkpoint takes the generator's.")
    shapes = jax.eval_shape(gen_trainer.init_generator(model, 1), jax.random.key(0))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(shapes))
    return model, load_checked(config, checkpoint, shapes, "generator", step)


def load_checked(config, checkpoint: str, shapes, what: str, step: Optional[int] = None):
    """`loaders.load_checked` of the model of `config` (the `what` of it); a mismatch with a
    training run's weights whose config.json has other model settings says so (--config
    gave another model than the run's)."""
    try:
        return loaders.load_checked(checkpoint, shapes,
                                    f"the {what} of the config ({config.model.name})", step)
    except ValueError as e:
        run = layout.run_dir(checkpoint)
        try:
            trained = layout.read_config(run)
        except (OSError, errors.UserError):
            raise e from None
        differ = loop.differing_model_keys(config, trained)
        if not differ:
            raise
        raise ValueError(f"{e}. The run's {layout.CONFIG_FILE} has other model settings "
                         f"({', '.join(differ[:6])}): without --config, sample and evaluate "
                         "use it.") from None


def tokenizer_of(config, checkpoint: str, tokenizer_path: str, log=print) -> str:
    """The tokenizer decoding the samples of the generator at `checkpoint`: `tokenizer_path`,
    else config.generator.tokenizer, else a released generator's own (e.g. titok_l32 for
    maskgit_titok_l32)."""
    path = tokenizer_path or config.generator.tokenizer
    own = registry.RELEASED[checkpoint].tokenizer if loaders.is_released(checkpoint) else ""
    if not path and own:
        log(f"Tokenizer: {own} (the released tokenizer {checkpoint} was trained on).")
        return own
    if not path:
        raise ValueError("No tokenizer: pass --tokenizer=DIR (or a released name) or set "
                         "config.generator.tokenizer.")
    return path


def load_models(config, checkpoint: str, tokenizer_path: str, step: Optional[int] = None,
                log=print):
    """(generator, its params, tokenizer, its params, the tokenizer's path): the generator of
    `config` from `checkpoint` (its checkpoint `step`, default the latest), and the tokenizer
    at `tokenizer_path` (default: config.generator.tokenizer); `SampleDecoder` checks that
    they match, and a warning says when it is not the one that wrote the generator's tokens
    (`check_tokens_tokenizer`)."""
    gen_trainer.check_generator_config(config)  # before anything is read
    tokenizer_path = tokenizer_of(config, checkpoint, tokenizer_path, log)
    model, params = load_generator(config, checkpoint, step)
    tokenizer, tok_params = loaders.load_tokenizer(tokenizer_path)
    gen_trainer.check_tokens_tokenizer(config, tok_params, tokenizer_path, log)
    return model, params, tokenizer, tok_params, tokenizer_path


def sample_images(config, model, params, tokenizer, tok_params, num_images: int,
                  batch_size: int, seed: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and their labels, sampled batch by batch over the mesh."""
    mesh, rules, sharding = parallel.mesh_from_config(config)
    div = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = batch_size or 32 * jax.device_count()
    batch_size = -(-batch_size // div) * div
    labels = gen_common.cyclic_labels(num_images, model.num_classes)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh,
                                                                   jax.sharding.PartitionSpec()))
        decoder = SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params,
                                sharding, config.sampling_precision, log)
        for pixels, valid in decoder.batches(params, labels, batch_size, seed, log):
            out.append(images_lib.to_uint8(parallel.host_array(pixels))[valid])
    return np.concatenate(out), labels


def class_grid(samples: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10
               ) -> np.ndarray:
    rows = []
    for c in range(num_classes):
        picked = samples[labels == c][:per_row]
        if len(picked):
            rows.append(picked)
    return images_lib.make_grid(rows)


def run(config, checkpoint: str, tokenizer_path: str, num_images: int, out: str,
        batch_size: int = 0, seed: int = 0, grid_classes: int = 10, log=print) -> dict[str, Any]:
    report.refuse_earlier_results(out, ["samples.npz"])  # an earlier run's: kept
    step = loaders.checkpoint_step(checkpoint)  # (a run still training saves more)
    model, params, tokenizer, tok_params, tokenizer_path = load_models(config, checkpoint,
                                                                       tokenizer_path, step, log)
    t0 = time.time()
    samples, labels = sample_images(config, model, params, tokenizer, tok_params, num_images,
                                    batch_size, seed, log)
    seconds = time.time() - t0
    info = dict(num_images=int(num_images), seconds=seconds, images_per_second=num_images / seconds,
                checkpoint=loaders.recorded_path(checkpoint), step=step,
                tokenizer=loaders.recorded_path(tokenizer_path), seed=seed,
                model=config.model.to_dict(), sampling=config.sampling.to_dict(),
                sampling_precision=config.sampling_precision)
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "samples.npz"), arr_0=samples, arr_1=labels)
        with open(os.path.join(out, "sampling.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)
        if grid_classes > 0:
            images_lib.save_png(os.path.join(out, "grid.png"),
                                class_grid(samples, labels, min(grid_classes, model.num_classes)))
        log(f"Wrote {num_images} samples to {os.path.join(out, 'samples.npz')}"
            + (" and grid.png" if grid_classes > 0 else "")
            + f" ({summary.format_rate(info['images_per_second'])} img/s).")
    return info


def sweep(config, model, params, tokenizer, tok_params, nets: evaluator.MetricNets,
          reference: evaluator.Reference, settings: list[dict[str, float]], num_images: int,
          batch_size: int = 0, seed: int = 0, log=print, min_class_accuracy: Optional[float] = None
          ) -> tuple[list[dict[str, Any]], Optional[tuple[np.ndarray, np.ndarray]]]:
    """For every sampler override in `settings`: `num_images` samples (labels cycling through
    the classes, the same seed) and their generation metrics against `reference` with `nets`.
    Returns (rows: the setting plus its metrics, samples): with `min_class_accuracy`, samples
    are the (images, labels) of the setting `sweep_lib.choose(rows, min_class_accuracy)`
    picks - the only setting's samples kept (beside the one being measured) - else None."""
    mesh, _, sharding = parallel.mesh_from_config(config)
    rows, kept = [], None
    for i, setting in enumerate(settings):
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():  # e.g. a temperature the config's sampling section leaves default
            cfg.sampling.update(setting)
        images, labels = sample_images(cfg, model, params, tokenizer, tok_params, num_images,
                                       batch_size, seed, log=_warnings_only(log, first=i == 0))
        metric_batch = -(-min(256, num_images) // jax.device_count()) * jax.device_count()
        with jax.set_mesh(mesh):
            metrics, _ = evaluator.generation_metrics(
                nets, mesh, reference, evaluator.numpy_batches(images, metric_batch, sharding),
                config.evaluation, labels=labels)
        row = sweep_lib.row(setting, metrics, inception=nets.is_inception)
        rows.append(row)
        # The choice over the rows so far: the final choice is chosen when its row arrives.
        if (min_class_accuracy is not None
                and sweep_lib.choose(rows, min_class_accuracy) is row):
            kept = (images, labels)
        del images, labels
        log("sweep " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return rows, kept


def _warnings_only(log, first: bool):
    """A sweep setting's log: no progress lines; the generator / tokenizer pair's warnings,
    for the first setting only (every setting would repeat them)."""
    def quiet(message: str) -> None:
        if first and message.startswith("Warning:"):
            log(message)
    return quiet


def run_sweep(config, checkpoint: str, tokenizer_path: str, num_images: int, out: str,
              guidance_scales, temperatures, features: str = "inception", batch_size: int = 0,
              seed: int = 0, log=print) -> dict[str, Any]:
    """`tok1d sample --sweep`: the sweep of the module docstring, written to OUT (an OUT that
    holds an earlier sweep's results is refused before any work)."""
    report.refuse_earlier_results(out, sweep_lib.FILES)
    if (gen_trainer.build_generator(config).objective != "masked"
            and any(float(t) <= 0 for t in temperatures)):  # (RAR's came after some settings)
        raise errors.UserError("--sweep_temperature: this sampler's temperatures must be > 0 "
                               "(autoregressive: GPT, RAR; MaskGIT's randomize_temperature "
                               "may be 0).")
    model, params, tokenizer, tok_params, tokenizer_path = load_models(
        config, checkpoint, tokenizer_path, loaders.checkpoint_step(checkpoint), log)
    nets, reference, real = sweep_reference(config, features, log)
    settings = sweep_lib.grid(config.sampling.to_dict(), config.model.name,
                              [float(g) for g in guidance_scales],
                              [float(t) for t in temperatures])
    rows, _ = sweep(config, model, params, tokenizer, tok_params, nets, reference, settings,
                    num_images, batch_size, seed, log)
    chosen = sweep_lib.best(rows)
    if jax.process_index() == 0:
        paths = sweep_lib.write(out, rows, chosen, real, log)
        log(sweep_lib.markdown(rows, chosen, real))
        log(f"Wrote {', '.join(paths.values())}.")
    return {"rows": rows, "best": chosen, "reference": real}


def sweep_reference(config, features: str, log=print):
    """(nets, reference, real-image numbers) of a sweep: the Inception of config.evaluation
    with its reference, or the digit classifier (trained here, with the options of
    demo.feature_net when the config has them) on the held-out digits."""
    if features == "digits":
        ref = digit_features.digit_reference(config, config.get("demo", {}).get("feature_net"))
        return ref.nets, ref.reference, ref.real
    mesh, _, sharding = parallel.mesh_from_config(config)
    notes: list[str] = []  # (said once the sweep can go on: the error comes alone)
    nets = evaluator.load_metric_nets(config.evaluation, "", notes.append, lpips=False)
    if nets.inception is None:
        raise ValueError("The sweep needs a feature network: --config.evaluation.inception=DIR "
                         "(tok1d convert inception_fid ...) or --sweep_features=digits.")
    for note in notes:
        log(note)
    with jax.set_mesh(mesh):
        reference = evaluator.load_reference(config.evaluation, config.data, nets, mesh,
                                             sharding, config.eval_batch_size, log)
    for note in reference.notes(config.evaluation, nets):
        log(note)
    return nets, reference, None


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    errors.check_output_dir(fv.out, "--out")
    # multi-host (flags or TOK1D_DISTRIBUTED=1); the compilation cache. (A process without a
    # config, its --checkpoint run on another host only, stops there with the others.)
    app.setup_process(fv, paths=("checkpoint", "tokenizer" if fv.tokenizer
                                 else "config.generator.tokenizer"))
    trainer = fv.config.get("trainer")
    if trainer not in (None, "generator") and app.run_config_used():
        raise errors.UserError(
            f"--checkpoint={fv.checkpoint} is of a {trainer} run ({fv.config.model.name}), not "
            "of a generator: sample takes a generator's checkpoint (a tokenizer goes to "
            "--tokenizer).")
    if fv.sweep:
        run_sweep(fv.config, fv.checkpoint, fv.tokenizer, fv.num_images, fv.out,
                  fv.sweep_guidance, fv.sweep_temperature, fv.sweep_features, fv.batch_size,
                  fv.seed, log=loop.log_fn())  # (process 0 prints)
        return
    run(fv.config, fv.checkpoint, fv.tokenizer, fv.num_images, fv.out, fv.batch_size, fv.seed,
        fv.grid_classes, log=loop.log_fn())


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    app.exit_process(main())
