"""The demo's feature network: a LeNet-style CNN trained on the real training digits in seconds,
whose penultimate features replace the FID Inception's in the evaluation code.

    net = train_digit_net(train_images, train_labels)       # uint8 (N, H, W, 3), int (N,)
    net.accuracy(val_images, val_labels)                    # 0.978 on the 179 held-out digits
    nets = net.metric_nets()   # evaluator.MetricNets: FID / precision / recall / diversity
                               # on its 64-d features ("FID-digits")
    ref = digit_reference(config, config.demo.feature_net)   # all of it for a digits config:
                               # the net, its MetricNets, the held-out digits' Reference and
                               # their class accuracy / diversity (the demo and `tok1d sample
                               # --sweep --sweep_features=digits`)

FID-digits, precision / recall and diversity measured with it are demo metrics: they see what
the demo's pictures show (e.g. ten identical samples of a class), but are NOT comparable with
Inception FID or with numbers from another feature network (another seed or recipe).

Measured (scikit-learn digits at 32 px, seen at 16 px; 1618 training / 179 held-out images;
seed 0; 300 steps at batch 128): 7.8 s on a loaded 2-core CPU; held-out accuracy 0.978;
FID-digits of the 1618 training digits against the 179 held-out ones 4.1, of uniform noise
575 (tests/test_digit_features.py checks real < 0.05 x noise); intra-class diversity of the
held-out digits 15.7, of the training digits 15.4.

Diversity (`precision_recall.intra_class_diversity`, the evaluator's "diversity" when labels
are given) is the mean pairwise feature distance within a class: compare the samples' value with
the real digits'.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tok1d import parallel
from tok1d.data import sources
from tok1d.evaluation import evaluator
from tok1d.evaluation.precision_recall import intra_class_diversity
from tok1d.models.frozen.digits import DigitFeatureNet


@dataclasses.dataclass
class DigitNet:
    """A trained DigitFeatureNet and its parameters."""

    module: DigitFeatureNet
    params: Any

    @functools.cached_property
    def _forward(self):
        """The jitted forward pass (one per net: compiled once per batch shape)."""
        return jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def apply(self, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
        """{"features", "logits"} of uint8 or [0, 1] float images (N, H, W, 3), on the host."""
        outs = [self._forward(self.params, _unit(images[i:i + batch]))
                for i in range(0, len(images), batch)]
        return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in ("features",
                                                                              "logits")}

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.apply(images)["logits"].argmax(-1) == np.asarray(labels)))

    def metric_nets(self) -> evaluator.MetricNets:
        """The evaluator's networks with this net in the Inception's place (no LPIPS)."""
        return evaluator.MetricNets(
            inception=(self.module, self.params), feature_dim=self.module.feature_dim,
            labels_are_classes=True,
            notes=["FID / precision / recall on the demo's digit classifier features "
                   "(FID-digits): a demo metric, not comparable with Inception FID."])


def train_digit_net(images: np.ndarray, labels: np.ndarray, *, num_classes: int = 10,
                    feature_dim: int = 64, steps: int = 300, batch_size: int = 128,
                    learning_rate: float = 2e-3, seed: int = 0) -> DigitNet:
    """Adam on the softmax cross-entropy over random minibatches of (images, labels)."""
    x = _unit(images)
    y = np.asarray(labels, np.int32)
    module = DigitFeatureNet(num_classes=num_classes, feature_dim=feature_dim)
    key_init, _ = jax.random.split(jax.random.key(seed))  # (the measured numbers use this key)
    params = module.init(key_init, x[:1])["params"]
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = module.apply({"params": p}, xb)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    order = np.random.default_rng(seed).permutation
    rows = np.concatenate([order(len(x)) for _ in range(-(-steps * batch_size // len(x)))])
    for i in range(steps):
        idx = rows[i * batch_size:(i + 1) * batch_size]
        params, opt_state = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return DigitNet(module, jax.device_get(params))


@dataclasses.dataclass
class DigitReference:
    """What the digit metrics compare samples with: the trained `net`, its evaluator networks
    `nets`, the held-out digits' `reference` statistics, those digits `held` (images, labels)
    and their own numbers `real` (class_accuracy, diversity)."""

    net: DigitNet
    nets: evaluator.MetricNets
    reference: evaluator.Reference
    held: tuple[np.ndarray, np.ndarray]
    real: dict[str, float]


def digit_reference(config, feature_net: Optional[Mapping[str, Any]] = None) -> DigitReference:
    """The digit net trained on `config.data.train_split` (`train_digit_net` with the options
    `feature_net`, e.g. the demo's demo.feature_net, and config.seed) and the reference of the
    held-out `config.data.eval_split` under `config.evaluation`, on config's mesh. The real
    digits' diversity comes from the net's features directly (also with
    evaluation.precision_recall off, when the reference keeps no features)."""
    dcfg = config.data
    if dcfg.name != "digits":
        raise ValueError(f"The digit features (the demo's, --sweep_features=digits) need the "
                         f"digits data, data.name='digits', got {dcfg.name!r} (a generator "
                         "trained on tokens of the digits: add --config.data.name=digits).")
    train, held = (source_arrays(sources.get_source("digits", split,
                                                    image_size=dcfg.image_size))
                   for split in (dcfg.train_split, dcfg.eval_split))
    options = (feature_net.to_dict() if hasattr(feature_net, "to_dict")
               else dict(feature_net or {}))
    net = train_digit_net(*train, seed=config.seed, **options)
    nets = net.metric_nets()
    mesh, _, sharding = parallel.mesh_from_config(config)
    with jax.set_mesh(mesh):
        reference = evaluator.reference_from_batches(
            nets, mesh, evaluator.numpy_batches(held[0], config.eval_batch_size, sharding),
            config.evaluation, f"digits:{dcfg.eval_split}")
    out = net.apply(held[0])
    real = {"class_accuracy": float(np.mean(out["logits"].argmax(-1) == held[1])),
            "diversity": intra_class_diversity(out["features"], held[1])}
    return DigitReference(net, nets, reference, held, real)


def source_arrays(src) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, 3), labels (N,)) of a data source, in its order."""
    return (np.stack([src[i]["image"] for i in range(len(src))]),
            np.asarray([src[i]["label"] for i in range(len(src))]))


def _unit(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    return (images.astype(np.float32) / 255.0 if images.dtype == np.uint8
            else images.astype(np.float32))
