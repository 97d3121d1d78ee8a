"""The demo's feature network (tok1d.evaluation.digit_features): a LeNet-style CNN that learns
the training digits in seconds, and Frechet distance / precision / recall / diversity on its
features through the evaluator that otherwise runs the Inception."""

import time

import jax
import numpy as np
import pytest

from tok1d import parallel
from tok1d.data import sources
from tok1d.evaluation import digit_features, evaluator, fid
from tok1d.evaluation.precision_recall import intra_class_diversity
from tok1d.train import config_lib


@pytest.fixture(scope="module")
def digits():
    train = digit_features.source_arrays(sources.get_source("digits", "train", image_size=32))
    val = digit_features.source_arrays(sources.get_source("digits", "validation", image_size=32))
    t0 = time.time()
    net = digit_features.train_digit_net(*train, steps=300, seed=0)
    return train, val, net, time.time() - t0


def test_feature_net_learns_the_digits_in_seconds(digits):
    (train_x, train_y), (val_x, val_y), net, seconds = digits
    assert seconds < 60, seconds
    assert net.accuracy(val_x, val_y) > 0.93
    feats = net.apply(val_x[:5])["features"]
    assert feats.shape == (5, 64) and np.isfinite(feats).all()


def test_frechet_distance_of_real_vs_real_is_small_and_vs_noise_large(digits):
    (train_x, _), (val_x, _), net, _ = digits

    def stats(x):
        return fid.FeatureStats(64).update(net.apply(x)["features"]).mean_cov()

    real = fid.frechet_distance(*stats(train_x), *stats(val_x))
    noise_x = np.random.default_rng(0).integers(0, 256, val_x.shape, dtype=np.uint8)
    noise = fid.frechet_distance(*stats(noise_x), *stats(val_x))
    assert real < 0.05 * noise, (real, noise)


def test_evaluator_runs_on_the_digit_features(digits):
    (train_x, train_y), (val_x, val_y), net, _ = digits
    nets = net.metric_nets()
    cfg = config_lib.base_config("generator")
    mesh, _, sharding = parallel.mesh_from_config(cfg)
    ecfg = cfg.evaluation
    with jax.set_mesh(mesh):
        ref = evaluator.reference_from_batches(
            nets, mesh, evaluator.numpy_batches(val_x, 64, sharding), ecfg)
        real, _ = evaluator.generation_metrics(
            nets, mesh, ref, evaluator.numpy_batches(train_x[:200], 64, sharding), ecfg,
            labels=train_y[:200])
        # ten copies of one image per class: precision fine, recall and diversity collapse
        copies = np.concatenate([np.repeat(train_x[train_y == c][:1], 20, 0) for c in range(10)])
        copy_y = np.repeat(np.arange(10), 20)
        same, _ = evaluator.generation_metrics(
            nets, mesh, ref, evaluator.numpy_batches(copies, 64, sharding), ecfg, labels=copy_y)
    assert real["class_accuracy"] > 0.95 and same["class_accuracy"] > 0.8
    assert same["diversity"] < 1e-3 < real["diversity"]
    assert same["recall"] < real["recall"] and real["gfid"] < same["gfid"]
    assert intra_class_diversity(net.apply(val_x)["features"], val_y) == pytest.approx(
        real["diversity"], rel=0.3)



def test_jitted_once_per_net(digits):
    (_, _), (val_x, val_y), net, _ = digits
    net.apply(val_x[:8])
    compiled = net._forward._cache_size()  # one entry per batch shape seen
    net.apply(val_x[8:16])
    net.accuracy(val_x[:8], val_y[:8])
    assert net._forward._cache_size() == compiled


def test_digit_reference_without_precision_recall(monkeypatch):
    """`tok1d sample --sweep --sweep_features=digits` with evaluation.precision_recall off (the
    reference keeps no features): the real digits' diversity still comes out, and the
    config's demo.feature_net options are used."""
    from tok1d.cli import sample as sample_lib
    cfg = config_lib.base_config("generator")
    cfg.data.update(dict(name="digits", image_size=32, train_split="train",
                         eval_split="validation"))
    cfg.evaluation.precision_recall = False
    cfg.demo = dict(feature_net=dict(steps=20, feature_dim=16))
    nets, reference, real = sample_lib.sweep_reference(cfg, "digits", log=lambda m: None)
    assert reference.features is None and nets.feature_dim == 16
    assert real["diversity"] > 0 and 0 <= real["class_accuracy"] <= 1
