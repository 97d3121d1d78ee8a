"""FID and Inception Score statistics, in float64 on the host.

The numbers follow the standard evaluators (pytorch-fid, the ADM evaluator):

  FID  = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with S the unbiased feature
         covariance (ddof 1, as `np.cov(features, rowvar=False)`).

tr(sqrtm(S1 S2)) is computed one of two ways (`frechet_distance(method=...)`, the config's
`evaluation.fid_method`):
  "eigh"   (default) the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a
           symmetric PSD matrix with the eigenvalues of S1 S2; two symmetric eigen-
           decompositions. At 2048 Inception features it takes 2 s instead of sqrtm's 12 s (two
           CPU cores) and agrees with sqrtm to ~1e-13 relative on full-rank statistics (5000
           images) and ~3e-8 on rank-deficient ones (200 images, where sqrtm needs `eps`).
  "sqrtm"  pytorch-fid's and the ADM evaluator's algorithm, step for step: scipy's sqrtm of
           S1 S2; when the product is singular `eps` is added to both diagonals, and a tiny
           imaginary part is dropped.
  IS   = exp(E_x KL(p(y|x) || p(y))), per split of the predictions; mean and std over splits.

`FeatureStats` accumulates sums and outer products batch by batch (and shard by shard: two
stats merge exactly), so the statistics of 50k images never need all features in memory and
come out the same however the images were split over devices and hosts. Reference statistics
come from an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: keys "mu", "sigma", and
"mu_s", "sigma_s" for sFID) or from a `.npz` written by `save_statistics` (the same keys, and
optionally the pool "features" of precision / recall and a JSON "meta" record; `tok1d evaluate
--save_reference`).
"""

from __future__ import annotations

import dataclasses
import json
import os
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


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, *,
                    spatial: Optional[tuple[np.ndarray, np.ndarray]] = None,
                    features: Optional[np.ndarray] = None, meta: Optional[dict] = None) -> None:
    """Reference statistics to a new file `path` (.npz) in the ADM reference batch's keys ("mu",
    "sigma"; "mu_s", "sigma_s" with `spatial`), plus "features" (float32 pool features) and
    "meta" (a JSON string) when given. An existing `path` is an error (nothing is replaced);
    the arrays go to a temporary file that is then linked as `path`, so an interrupted write
    leaves no partial file there."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = (np.asarray(a, np.float64) for a in spatial)
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if meta is not None:
        arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    exists = ValueError(f"{path} exists; remove it or choose another name (it is not "
                        "overwritten).")
    tmp = f"{path}.tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, **arrays)
        try:  # fails if `path` exists, e.g. made by another job since the caller's checks
            os.link(tmp, path)
        except FileExistsError:
            raise exists from None
        except OSError:  # a file system without hard links (e.g. gcsfuse): rename instead
            if os.path.exists(path):
                raise exists from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_meta(path: str) -> dict:
    """The "meta" record of a `save_statistics` file ({} for a file without one)."""
    with np.load(path) as z:
        if "meta" not in z.files:
            return {}
        try:
            meta = json.loads(str(z["meta"][()]))
        except (ValueError, TypeError):
            raise ValueError(f"{path}: its 'meta' entry is not a JSON record.") from None
    count = meta.get("count", 0) if isinstance(meta, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{path}: its 'meta' entry is not a JSON record with a count of "
                         "images.")
    return meta


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference: an ADM reference batch or a `save_statistics` file."""
    with np.load(path) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: no {missing} arrays (found {sorted(z.files)}); expected "
                             "an ADM reference batch or a file written by save_statistics "
                             "(tok1d evaluate --save_reference).")
        return _statistics(z, path, "mu", "sigma")


def load_spatial_reference(path: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(mu_s, sigma_s), the spatial statistics of ADM's sFID in an ADM reference batch, or
    None when the file has none."""
    with np.load(path) as z:
        if not {"mu_s", "sigma_s"} <= set(z.files):
            return None
        return _statistics(z, path, "mu_s", "sigma_s")


def _statistics(z, path: str, mu_key: str, sigma_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 from the open .npz `z`; a ValueError when their shapes disagree."""
    mu, sigma = np.asarray(z[mu_key], np.float64), np.asarray(z[sigma_key], np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: {sigma_key} {sigma.shape} does not match {mu_key} "
                         f"{mu.shape}.")
    return mu, sigma


FID_METHODS = ("eigh", "sqrtm")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """Frechet distance between two Gaussians, in float64 (`method`: see the module docstring)."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}.")
    for which, arrays in (("first", (mu1, sigma1)), ("second", (mu2, sigma2))):
        if not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"The {which} FID statistics are not finite (NaN or inf features: "
                             "e.g. images with NaN pixels, from a tokenizer decoding codes it "
                             "does not have, or a diverged model).")
    if method == "eigh":
        trace_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        trace_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"Unknown FID method {method!r} (expected one of {FID_METHODS}).")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) = sum of sqrt(eig(S1^1/2 S2 S1^1/2)) for symmetric PSD S1, S2.

    Eigenvalues that rounding leaves slightly negative count as 0: covariances of features
    with large means and tiny spreads (e.g. an untrained network's) lose many digits to
    cancellation, so no relative bound on them would be safe."""
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = root1 @ ((sigma2 + sigma2.T) / 2) @ root1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """pytorch-fid's tr(sqrtm(S1 S2)): scipy's sqrtm, eps on the diagonals if singular."""
    covmean = _quiet_sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _quiet_sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part "
                             f"({np.max(np.abs(covmean.imag)):.3g}); the statistics are broken.")
        covmean = covmean.real
    return float(np.trace(covmean))


def _quiet_sqrtm(a: np.ndarray) -> np.ndarray:
    """`scipy.linalg.sqrtm` without its singular-matrix warning (pytorch-fid passes
    `disp=False`, which SciPy 1.18 removed; the caller handles a singular product)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def inception_score(probs, splits: int = 10, split_size: int = 0) -> tuple[float, float]:
    """(mean, std) of the scores of consecutive parts of the class probabilities (N, C):
    `splits` parts of (nearly) equal size (torch-fidelity), or with `split_size` > 0 parts of
    `split_size` rows, the last one shorter when N is not a multiple (ADM's evaluator:
    split_size 5000; the same as 10 splits at 50k, not at other counts)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < (1 if split_size > 0 else splits):
        raise ValueError(f"Inception score needs (N >= splits={splits}, classes) probabilities, "
                         f"got shape {p.shape}.")
    parts = ([p[i:i + split_size] for i in range(0, len(p), split_size)] if split_size > 0
             else np.array_split(p, splits))
    scores = []
    for part in parts:
        marginal = part.mean(0, keepdims=True)
        kl = np.sum(part * (np.log(part + 1e-12) - np.log(marginal + 1e-12)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
