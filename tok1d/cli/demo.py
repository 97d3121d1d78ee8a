"""The end-to-end demo (`config.trainer == "demo"`, configs/demo.py): tokenizer -> tokens ->
class-conditional generator -> samples judged by a classifier of the real images.

Runs in WORKDIR:
  tokenizer/   the tokenizer run (tokenizer trainer: reconstructions.png, metrics.json, ...)
  tokens/      the train and validation splits encoded by it (`tok1d tokenize`)
  generator/   the generator run (generator trainer: samples.png, metrics.json, ...)
  samples_per_class.png   `demo.samples_per_class` samples for every class, one row each
  sweep/                  the guidance x temperature sweep (digits): sweep.md, sweep.json,
                          sweep.png (tok1d.evaluation.sweep)
  eval/                   the tokenizer's evaluation (tok1d evaluate: PSNR, SSIM, LPIPS, codebook
                          usage, rFID ...; metrics.json, report.md, reconstructions.png)
  metrics.json            tokenizer, generator, evaluation and classifier numbers together
  report.md               all of them in one page with the pictures
Every stage resumes or is skipped when its outputs exist, so rerunning the command continues
(the last stage, samples and report, is skipped when metrics.json was written by the same config).

The classifier: multinomial logistic regression on the real training images reduced to the
dataset's native 8x8 grey levels (scikit-learn); its accuracy on the real validation images,
on their reconstructions and, for the generated images, the fraction recognised as the class
they were asked for.

On the digits the demo also trains a LeNet-style CNN on the real training digits (a few seconds,
tok1d.evaluation.digit_features) and feeds its 64-d penultimate features to the evaluation code
of the FID Inception: rFID-digits of the reconstructions and gFID-digits, precision / recall,
intra-class diversity (mean pairwise feature distance within a class; the real held-out digits'
value beside it) and class accuracy of the samples, all against the 179 held-out digits. These
are demo metrics, NOT comparable with Inception FID. The sampling settings (guidance scale x
MaskGIT temperature, `demo.sweep`) are picked by a sweep (tok1d.cli.sample.sweep): the lowest
gFID-digits among the settings whose samples the CNN recognises as the requested class at least
`demo.sweep.min_class_accuracy` of the time.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from tok1d import errors, images
from tok1d import parallel
from tok1d.cli import evaluate as evaluate_lib
from tok1d.cli import sample as sample_lib
from tok1d.cli import tokenize as tokenize_lib
from tok1d.data import sources
from tok1d.evaluation import digit_features, evaluator, report
from tok1d.evaluation import sweep as sweep_lib
from tok1d.train import config_lib
from tok1d.train import generator as gen_trainer
from tok1d.train import loop
from tok1d.train import tokenizer as tok_trainer
from tok1d.probes import ar
from tok1d.weights import loaders


def generator_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The generator stage's config: defaults + `config.demo.generator`, on the tokens and
    tokenizer written by the earlier stages, with the demo's data (the images its tokens and
    its gFID reference come from), mesh, seed and precision."""
    gen = config_lib.base_config("generator")
    gen.seed, gen.precision = config.seed, config.precision
    gen.mesh = copy.deepcopy(config.mesh)
    gen.data = copy.deepcopy(config.data)
    gen.data.train_split, gen.data.eval_split = "train", "validation"
    _update(gen, config.demo.generator.to_dict(), "demo.generator")
    gen.generator.tokens = os.path.join(workdir, "tokens")
    gen.generator.tokenizer = os.path.join(workdir, "tokenizer")
    return gen


def _update(cfg: ml_collections.ConfigDict, values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if key not in cfg:
            raise config_lib.ConfigError(f"{where}.{key} is not a config key.")
        if isinstance(value, dict) and isinstance(cfg[key], ml_collections.ConfigDict) \
                and key not in ("model", "sampling"):
            _update(cfg[key], value, f"{where}.{key}")
        else:
            cfg[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def native_digits(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1] -> (N, 64) features: grey level averaged over 8x8 cells,
    on the 0..16 scale of the original digits."""
    n, h, w, _ = pixels.shape
    grey = pixels.mean(-1)
    cells = grey.reshape(n, 8, h // 8, 8, w // 8).mean((2, 4))
    return cells.reshape(n, 64) * 16.0


def fit_classifier(train_src) -> Any:
    from sklearn.linear_model import LogisticRegression
    x = native_digits(np.stack([train_src[i]["image"] for i in range(len(train_src))]) / 255.0)
    y = np.asarray([train_src[i]["label"] for i in range(len(train_src))])
    # newton-cg: 0.34 s on the demo digits, where the default lbfgs took 7.8 s (2-core CPU)
    return LogisticRegression(solver="newton-cg", max_iter=2000, C=1.0).fit(x, y)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    log = loop.log_fn()
    dcfg = config.data

    # ---------------------------------------------------------------- 1. tokenizer
    tok_cfg = config_lib.for_trainer(config, "tokenizer")
    log("== 1/4 tokenizer")
    tok_metrics = tok_trainer.train_and_evaluate(tok_cfg, os.path.join(workdir, "tokenizer"),
                                                 ar_probe=ar.make_ar_probe)

    # ---------------------------------------------------------------- 2. tokens
    log("== 2/4 tokens")
    tokenizer, tok_params = loaders.load_tokenizer(os.path.join(workdir, "tokenizer"))
    token_dir = os.path.join(workdir, "tokens")
    for split in (dcfg.train_split, dcfg.eval_split):
        src = sources.get_source(dcfg.name, split, data_dir=dcfg.data_dir,
                                 demo_size=dcfg.demo_size, image_size=dcfg.image_size)
        try:
            tokenize_lib.tokenize_dataset(tokenizer, tok_params, src, token_dir, split=split,
                                          batch_size=config.eval_batch_size,
                                          image_size=dcfg.image_size, flip=False, log=log)
        except tokenize_lib.OtherTokenizerError:  # the tokenizer run went on since
            raise errors.UserError(
                f"The tokenizer in {workdir}/tokenizer changed since {token_dir} was written "
                "(its run trained on), so the tokens and the generator trained on them are "
                f"stale: delete {token_dir}, {workdir}/generator and {workdir}/metrics.json "
                "to redo stages 2-4 with it (or use another --workdir).") from None

    # ---------------------------------------------------------------- 3. generator
    log("== 3/4 generator")
    gen_cfg = generator_config(config, workdir)
    gen_dir = os.path.join(workdir, "generator")
    gen_metrics = gen_trainer.train_and_evaluate(gen_cfg, gen_dir)

    # ---------------------------------------------------------------- 4. judge the samples
    log("== 4/4 samples and classifier")
    fingerprint = config.to_json_best_effort(sort_keys=True)
    done = _read_json(os.path.join(workdir, "metrics.json"))
    if done.get("config") == fingerprint and os.path.exists(os.path.join(workdir, "report.md")):
        log(f"Samples and report are up to date ({workdir}/metrics.json has this config; "
            "delete it to redo them).")
        return done
    model, params = sample_lib.load_generator(gen_cfg, gen_dir)
    num_classes = min(model.num_classes, 10)
    per_class = config.demo.samples_per_class
    result: dict[str, Any] = dict(
        tokenizer={k: v for k, v in tok_metrics.items() if isinstance(v, (int, float))},
        generator={k: v for k, v in gen_metrics.items() if isinstance(v, (int, float))})
    if dcfg.name == "digits":
        samples, labels = _digit_metrics(config, gen_cfg, model, params, tokenizer, tok_params,
                                         workdir, result, per_class * num_classes, log)
    else:
        samples, labels = sample_lib.sample_images(
            gen_cfg, model, params, tokenizer, tok_params, per_class * num_classes,
            batch_size=0, seed=config.seed, log=lambda msg: None)
    if jax.process_index() == 0:
        images.save_png(os.path.join(workdir, "samples_per_class.png"),
                        sample_lib.class_grid(samples, labels, num_classes, per_row=per_class))
    if dcfg.name == "digits":
        train_src = sources.get_source("digits", dcfg.train_split, image_size=dcfg.image_size)
        eval_src = sources.get_source("digits", dcfg.eval_split, image_size=dcfg.image_size)
        clf = fit_classifier(train_src)
        real = np.stack([eval_src[i]["image"] for i in range(len(eval_src))]) / 255.0
        real_y = np.asarray([eval_src[i]["label"] for i in range(len(eval_src))])
        recon = _reconstruct(tokenizer, tok_params, real)
        result["classifier"] = dict(
            real_accuracy=float(np.mean(clf.predict(native_digits(real)) == real_y)),
            reconstruction_accuracy=float(np.mean(clf.predict(native_digits(recon)) == real_y)),
            sample_accuracy=float(np.mean(clf.predict(native_digits(samples / 255.0)) == labels)),
            num_samples=int(len(labels)))
        c = result["classifier"]
        log(f"Classifier accuracy: real {c['real_accuracy']:.3f}, reconstructions "
            f"{c['reconstruction_accuracy']:.3f}, samples of the requested class "
            f"{c['sample_accuracy']:.3f} ({c['num_samples']} samples; chance 0.1).")
    result["evaluation"] = evaluate_demo(config, tok_cfg, workdir, samples, labels, log)
    result["config"] = fingerprint
    loop.write_json(os.path.join(workdir, "metrics.json"), result)
    write_demo_report(workdir, result, config)
    return result


def _digit_metrics(config, gen_cfg, model, params, tokenizer, tok_params, workdir: str,
                   result: dict[str, Any], num_samples: int, log) -> tuple[np.ndarray, np.ndarray]:
    """The digit classifier's metrics (result["digits"]) and the sweep (result["sweep"],
    WORKDIR/sweep/); returns `num_samples` samples (and labels) at the chosen setting."""
    scfg = config.demo.sweep
    ref = digit_features.digit_reference(config, config.demo.feature_net)
    nets, reference, held, real = ref.nets, ref.reference, ref.held, ref.real
    mesh, _, sharding = parallel.mesh_from_config(config)
    batch = config.eval_batch_size
    ecfg = config.evaluation
    with jax.set_mesh(mesh):
        recon = images.to_uint8(_reconstruct(tokenizer, tok_params, held[0] / 255.0))
        rec, _ = evaluator.generation_metrics(
            nets, mesh, reference, evaluator.numpy_batches(recon, batch, sharding), ecfg,
            labels=held[1])
    settings = sweep_lib.grid(gen_cfg.sampling.to_dict(), gen_cfg.model.name,
                              scfg.guidance_scales, scfg.temperatures)
    per_setting = scfg.samples_per_class * min(model.num_classes, 10)
    rows, (samples, labels) = sample_lib.sweep(
        gen_cfg, model, params, tokenizer, tok_params, nets, reference, settings,
        max(per_setting, num_samples), seed=config.seed, log=log,
        min_class_accuracy=scfg.min_class_accuracy)
    chosen = sweep_lib.choose(rows, scfg.min_class_accuracy, log)
    index = rows.index(chosen)
    files = {}
    if jax.process_index() == 0:
        files = sweep_lib.write(os.path.join(workdir, "sweep"), rows, chosen, real, log)
    result["sweep"] = dict(rows=rows, best=chosen, reference=real)
    if "png" in files:
        result["sweep"]["plot"] = os.path.relpath(files["png"], workdir)
    result["digits"] = dict(
        feature_net_accuracy=real["class_accuracy"], rfid_digits=rec["gfid"],
        reconstruction_class_accuracy=rec["class_accuracy"],
        gfid_digits=chosen["gfid"], precision=chosen.get("precision", float("nan")),
        recall=chosen.get("recall", float("nan")), diversity=chosen["diversity"],
        real_diversity=real["diversity"], sample_class_accuracy=chosen["class_accuracy"],
        num_samples=int(chosen["num_images"]),
        **{f"chosen_{k}": v for k, v in settings[index].items()})
    d = result["digits"]
    log(f"Digit features: rFID-digits {d['rfid_digits']:.2f}; at "
        + ", ".join(f"{k} {v:g}" for k, v in settings[index].items())
        + f": gFID-digits {d['gfid_digits']:.2f}, precision {d['precision']:.3f}, recall "
        f"{d['recall']:.3f}, diversity {d['diversity']:.2f} (real digits "
        f"{d['real_diversity']:.2f}), class accuracy {d['sample_class_accuracy']:.3f}.")
    return samples[:num_samples], labels[:num_samples]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def evaluate_demo(config, tok_cfg, workdir: str, samples: np.ndarray, labels: np.ndarray,
                  log) -> dict[str, Any]:
    """The evaluation suite on the demo's own data: reconstruction metrics of the tokenizer on
    the eval split (tok1d.cli.evaluate), and FID / IS / precision-recall of the samples against
    the real eval images when `evaluation.inception` is given."""
    out = {"reconstruction": evaluate_lib.evaluate_tokenizer(
        tok_cfg, os.path.join(workdir, "tokenizer"), os.path.join(workdir, "eval"), log)}
    ecfg = config.evaluation
    nets = evaluator.load_metric_nets(ecfg, "", lambda msg: None, lpips=False)
    if nets.inception is not None:
        mesh, _, sharding = parallel.mesh_from_config(config)
        batch = config.eval_batch_size
        with jax.set_mesh(mesh):
            reference = evaluator.reference_from_data(config.data, nets, mesh, sharding, batch,
                                                      ecfg)
            gen, _ = evaluator.generation_metrics(
                nets, mesh, reference, evaluator.numpy_batches(samples, batch, sharding), ecfg)
        out["generation"] = gen
    return out


def write_demo_report(workdir: str, result: dict[str, Any], config) -> None:
    """WORKDIR/report.md: every number of the demo with the pictures it is about."""
    if jax.process_index() != 0:
        return
    lines = ["# tok1d demo", "",
             f"Data: {config.data.name} at {config.data.image_size} px. Pictures: "
             "validation inputs above their reconstructions, then samples (one row per class).",
             "", "![reconstructions](tokenizer/reconstructions.png)", "",
             "![samples](samples_per_class.png)", ""]
    if "digits" in result:
        lines += [report.markdown("Digit-classifier features (demo metrics: NOT comparable with "
                                  "Inception FID)", result["digits"]).replace("# ", "## ", 1),
                  "", "### Sampling sweep (guidance x temperature; the samples above use the "
                  "best)", "", sweep_lib.markdown(result["sweep"]["rows"],
                                                  result["sweep"]["best"],
                                                  result["sweep"]["reference"])]
        if result["sweep"].get("plot"):  # this run's plot (needs matplotlib)
            lines += [f"![sweep]({result['sweep']['plot']})", ""]
    evaluation = result.get("evaluation", {})
    sections = [("Tokenizer (eval split)", evaluation.get("reconstruction", {})),
                ("Generator", result.get("generator", {})),
                ("Samples vs the real eval images", evaluation.get("generation", {})),
                ("Classifier of the real digits", result.get("classifier", {}))]
    for title, metrics in sections:
        if metrics:
            lines += [report.markdown(title, metrics).replace("# ", "## ", 1)]
    if "generation" not in evaluation:
        lines += ["FID / IS / precision-recall of the samples need the FID Inception: "
                  "--config.evaluation.inception=DIR (tok1d convert inception_fid ...).", ""]
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _reconstruct(tokenizer, tok_params, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    if not tokenizer.outputs_pixels:
        raise ValueError("The demo's tokenizer must output pixels (not proxy-code logits).")
    to_model, to_unit = images.range_converters(tokenizer.pixel_range)

    @jax.jit
    def run(x):
        out, _ = tokenizer.apply({"params": tok_params}, to_model(x))
        return jax.numpy.clip(to_unit(out), 0.0, 1.0)

    return np.concatenate([np.asarray(run(pixels[i:i + batch].astype(np.float32)))
                           for i in range(0, len(pixels), batch)])
