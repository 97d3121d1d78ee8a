"""FID and Inception Score statistics, in float64 on the host.

The numbers follow the standard evaluators (pytorch-fid, the ADM evaluator):

  FID  = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with S the unbiased feature
         covariance (ddof 1, as `np.cov(features, rowvar=False)`); when the product is singular
         `eps` is added to both diagonals, and a tiny imaginary part of sqrtm is dropped.
  IS   = exp(E_x KL(p(y|x) || p(y))), per split of the predictions; mean and std over splits.

`FeatureStats` accumulates sums and outer products batch by batch (and shard by shard: two
stats merge exactly), so the statistics of 50k images never need all features in memory and
come out the same however the images were split over devices and hosts. Reference statistics
come from an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: keys "mu", "sigma") or
from a `.npz` written by `FeatureStats.save`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import numpy as np
from scipy import linalg


@dataclasses.dataclass
class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors (float64)."""

    dim: int
    count: int = 0
    total: Optional[np.ndarray] = None
    outer: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> "FeatureStats":
        x = np.asarray(features, np.float64).reshape(-1, self.dim)
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge feature stats of dims {self.dim} and {other.dim}.")
        return FeatureStats(self.dim, self.count + other.count, self.total + other.total,
                            self.outer + other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance; needs at least two features."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}.")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma

    def save(self, path: str) -> None:
        mu, sigma = self.mean_cov()
        np.savez(path, mu=mu, sigma=sigma, count=self.count)


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference: an ADM reference batch or a `FeatureStats.save` file."""
    with np.load(path) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: no {missing} arrays (found {sorted(z.files)}); expected "
                             "an ADM reference batch or a file written by FeatureStats.save.")
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: sigma {sigma.shape} does not match mu {mu.shape}.")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between two Gaussians (float64, scipy's matrix square root)."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}.")
    diff = mu1 - mu2
    covmean = _quiet_sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _quiet_sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part "
                             f"({np.max(np.abs(covmean.imag)):.3g}); the statistics are broken.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _quiet_sqrtm(a: np.ndarray) -> np.ndarray:
    """`scipy.linalg.sqrtm` without its singular-matrix warning (pytorch-fid passes
    `disp=False`, which SciPy 1.18 removed; the caller handles a singular product)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal consecutive parts of the class probabilities (N, C)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"Inception score needs (N >= splits={splits}, classes) probabilities, "
                         f"got shape {p.shape}.")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        kl = np.sum(part * (np.log(part + 1e-12) - np.log(marginal + 1e-12)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
