"""FID / IS arithmetic against independent float64 references (eigenvalues instead of sqrtm;
a direct loop for IS); streaming statistics equal np.cov however the data is split."""

import os

import numpy as np
import pytest

from tok1d.evaluation import fid


def _features(rng, n, d, shift=0.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _reference_fid(x, y):
    """tr(sqrtm(S1 S2)) as the sum of square roots of the (real, non-negative) eigenvalues of
    S1 S2, a product of two PSD matrices."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None))))


def test_frechet_distance_matches_an_independent_reference():
    rng = np.random.default_rng(0)
    x, y = _features(rng, 500, 16), _features(rng, 400, 16, shift=0.3)
    got = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                               np.cov(y, rowvar=False))
    want = _reference_fid(x, y)
    assert abs(got - want) <= 1e-6 * abs(want)
    same = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), x.mean(0),
                                np.cov(x, rowvar=False))
    assert abs(same) < 1e-8


@pytest.mark.parametrize("n", [400, 10])  # full rank, and fewer samples than dimensions
def test_both_methods_agree_with_the_reference_and_each_other(n):
    """The eigendecomposition route and pytorch-fid's sqrtm give the same number; on a
    rank-deficient pair (sqrtm's eps fallback territory) they still agree closely."""
    rng = np.random.default_rng(3)
    x, y = _features(rng, n, 24), _features(rng, n, 24, shift=0.2)
    stats = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    eigh, sqrtm = (fid.frechet_distance(*stats, method=m) for m in ("eigh", "sqrtm"))
    want = _reference_fid(x, y)
    tol = 1e-9 if n > 24 else 1e-5
    assert abs(eigh - want) <= tol * abs(want) and abs(sqrtm - want) <= tol * abs(want)
    # A set against itself: 0 up to the square roots of rounding-level eigenvalues
    # (~sqrt(machine eps) x scale each) where the covariance is singular.
    for method in fid.FID_METHODS:
        same = fid.frechet_distance(*stats[:2], *stats[:2], method=method)
        assert abs(same) <= (1e-10 if n > 24 else 1e-6) * np.trace(stats[1]), (method, same)


def test_large_means_and_tiny_spreads_lose_digits_but_not_the_answer():
    """Features like an untrained network's (mean ~10, spread ~1e-3), streamed: the
    covariance loses digits to cancellation and has slightly negative eigenvalues; FID is
    still ~0 against itself and agrees between the methods."""
    rng = np.random.default_rng(4)
    x, y = (10.0 + 1e-3 * _features(rng, 12, 24, shift=s) for s in (0.0, 0.5))
    a, b = fid.FeatureStats(24).update(x), fid.FeatureStats(24).update(y)
    assert np.linalg.eigvalsh(a.mean_cov()[1]).min() < 0  # rounding, as in the real case
    scale = np.trace(a.mean_cov()[1])
    assert abs(fid.frechet_distance(*a.mean_cov(), *a.mean_cov())) < 1e-3 * scale
    eigh, sqrtm = (fid.frechet_distance(*a.mean_cov(), *b.mean_cov(), method=m)
                   for m in fid.FID_METHODS)
    assert eigh == pytest.approx(sqrtm, rel=1e-3)


def test_streaming_stats_equal_numpy_for_any_split(tmp_path):
    rng = np.random.default_rng(1)
    x = _features(rng, 333, 12)
    whole = fid.FeatureStats(12).update(x)
    parts = [fid.FeatureStats(12).update(chunk) for chunk in np.array_split(x, 8)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    for stats in (whole, merged):
        mu, sigma = stats.mean_cov()
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    path = str(tmp_path / "ref.npz")
    fid.save_statistics(path, *whole.mean_cov(), meta={"count": whole.count})
    mu, sigma = fid.load_reference(path)
    assert fid.frechet_distance(mu, sigma, *merged.mean_cov()) == pytest.approx(0, abs=1e-8)
    assert fid.load_meta(path) == {"count": 333} and fid.load_spatial_reference(path) is None
    assert os.listdir(tmp_path) == ["ref.npz"]  # no temporary file left


def test_inception_score_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(100, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mean, std = fid.inception_score(p, splits=4)
    scores = []
    for k in range(4):
        part = p[25 * k:25 * (k + 1)]
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    assert mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    uniform = np.full((20, 5), 0.2)
    assert fid.inception_score(uniform, splits=2)[0] == pytest.approx(1.0)


def test_inception_score_in_adms_parts():
    """split_size: ADM's evaluator (`compute_inception_score(activations, split_size=5000)`),
    written out: consecutive parts of split_size rows, the last one shorter, mean of the
    parts' scores; at a multiple of split_size the same as that many equal splits."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(23, 6)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), 10):  # ADM's loop: parts of 10, 10, 3
        part = p[i:i + 10]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert fid.inception_score(p, split_size=10)[0] == pytest.approx(np.mean(scores), rel=1e-9)
    assert fid.inception_score(p[:20], split_size=10) == pytest.approx(
        fid.inception_score(p[:20], splits=2), rel=1e-12)
    assert fid.inception_score(p[:3], split_size=10)[1] == 0.0  # one part


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.FeatureStats(4).update(np.ones((1, 4))).mean_cov()
    with pytest.raises(ValueError, match="differ in shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    for method in fid.FID_METHODS:  # NaN features: the cause named, not a LinAlgError
        nan = fid.FeatureStats(3).update(np.full((4, 3), np.nan)).mean_cov()
        with pytest.raises(ValueError, match="The first FID statistics are not finite"):
            fid.frechet_distance(*nan, np.zeros(3), np.eye(3), method=method)
        with pytest.raises(ValueError, match="The second FID statistics are not finite"):
            fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.full((3, 3), np.inf),
                                 method=method)
    with pytest.raises(ValueError, match="Unknown FID method 'svd'"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")
    path = str(tmp_path / "bad.npz")
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no \\['mu', 'sigma'\\] arrays"):
        fid.load_reference(path)
