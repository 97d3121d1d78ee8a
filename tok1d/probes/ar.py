"""GigaTok's AR probe, shortened: during a tokenizer run, encode training images and the eval
split with the current tokenizer, train a small GPT from scratch on those codes
(`tok1d.train.generator.fit`) and report its train and validation loss (how learnable the
tokens are for an AR model) and, with `evaluation.linear_probe_epochs` > 0, the linear probe
of its features (`tok1d.evaluation.linear_probe`).

    probe = make_ar_probe(config, encode, num_codes, ...)    # None when config.ar_probe is off
    metrics = probe(params)                                  # every ar_probe.every_steps

`make_ar_probe` is the factory `tok1d.train.tokenizer.train_and_evaluate` takes as `ar_probe=`.
"""

from __future__ import annotations

from typing import Callable, Optional

import ml_collections
import numpy as np

from tok1d import parallel
from tok1d.data import feeding, pipeline
from tok1d.evaluation import linear_probe
from tok1d.train import config_lib
from tok1d.train import generator as gen_trainer

Probe = Callable[[object], dict[str, float]]


def probe_config(probe_cfg, vocab: int, num_tokens: int, num_classes: int, mesh_cfg,
                 seed: int) -> ml_collections.ConfigDict:
    """The generator config of an AR probe (`config.ar_probe` of a tokenizer run): a small GPT
    over the tokenizer's codes, AdamW at a constant lr after a short warm-up, no dropout."""
    c = config_lib.base_config("generator")
    c.seed, c.precision, c.ema_decay = seed, "float32", 0.0
    c.total_steps, c.batch_size, c.eval_batch_size = (probe_cfg.steps, probe_cfg.batch_size,
                                                      probe_cfg.batch_size)
    c.mesh = mesh_cfg
    c.model = dict(name="gpt", vocab_size=vocab, num_tokens=num_tokens, num_classes=num_classes,
                   token_dropout=0.0, dropout_rate=0.0, **probe_cfg.model.to_dict())
    o = c.optim
    o.lr, o.warmup_steps, o.schedule, o.b2, o.weight_decay, o.decay_mask = (
        probe_cfg.lr, min(50, probe_cfg.steps // 10), "constant", 0.95, 0.05, "matrices")
    return c


def fit_probe(config, codes: np.ndarray, labels: np.ndarray, val_codes: np.ndarray,
              val_labels: np.ndarray, mesh, rules, ecfg=None) -> dict[str, float]:
    """Trains the probe GPT of `config` (`probe_config`) from scratch on (codes, labels) and
    returns its "train_loss", "val_loss", "val_accuracy" and, when `ecfg` (config.evaluation)
    asks for it, the linear probe of its features ("linear_probe_*")."""
    model, params, out = gen_trainer.fit(config, codes, labels, val_codes, val_labels, mesh,
                                         rules)
    if ecfg is not None and ecfg.linear_probe_epochs > 0:
        out.update(linear_probe.probe_from_config(model, params, (codes, labels),
                                                  (val_codes, val_labels), ecfg, mesh, rules,
                                                  seed=config.seed))
    return out


def make_ar_probe(config, encode: Callable, num_codes: Optional[int], train_src, eval_ds,
                  eval_batches: int, feeder_args, mesh, rules, host_start: int, host_stop: int
                  ) -> Optional[Probe]:
    """`probe(params) -> metrics` for `config.ar_probe` of a tokenizer run (None when off or
    the tokenizer has no codes, `num_codes` None): encodes the first `train_examples` training
    images of `train_src` (center crops) and the `eval_batches` batches of `eval_ds` with
    `encode(params, images in [0, 1]) -> codes` (jitted), then fits a fresh probe GPT on those
    codes (`fit_probe`). `feeder_args`: (batch sharding, global eval batch); this host reads
    rows [host_start, host_stop) of every global batch."""
    pcfg = config.ar_probe
    if pcfg.every_steps <= 0 or not num_codes:
        return None
    batch_sh, eval_batch = feeder_args
    train_ds, train_batches = pipeline.eval_dataset(
        train_src, global_batch=eval_batch, host_start=host_start, host_stop=host_stop,
        image_size=config.data.image_size, num_examples=pcfg.train_examples,
        resize_on=config.data.resize_on, resize_rule=pipeline.resize_rule_of(config.data))

    def codes_of(params, ds, num_batches):
        feeder = feeding.Feeder(iter(ds), batch_sh, eval_batch)
        codes, labels = [], []
        for _ in range(num_batches):
            batch = next(feeder)
            c = parallel.host_array(encode(params, batch["image"]))
            keep = parallel.host_array(batch["mask"])
            codes.append(c.reshape(len(c), -1)[keep])
            labels.append(parallel.host_array(batch["label"])[keep])
        return np.concatenate(codes).astype(np.int32), np.concatenate(labels).astype(np.int32)

    def probe(params):
        codes, labels = codes_of(params, train_ds, train_batches)
        val_codes, val_labels = codes_of(params, eval_ds, eval_batches)
        num_classes = int(getattr(train_src, "num_classes", 0) or labels.max() + 1)
        gcfg = probe_config(pcfg, num_codes, codes.shape[1], num_classes, config.mesh,
                            config.seed)
        return fit_probe(gcfg, codes, labels, val_codes, val_labels, mesh, rules,
                         config.evaluation)

    return probe
