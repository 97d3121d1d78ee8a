"""Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator computes them.

The feature manifold of a set is the union of balls around its features, each with the radius
to the feature's k-th nearest neighbour within the set (k = 3 in the ADM evaluator,
`ManifoldEstimator(nhood_sizes=(3,))`, on Inception pool features). Then

  precision = fraction of generated features inside the real manifold,
  recall    = fraction of real features inside the generated manifold,

"inside" meaning squared distance <= squared radius of at least one ball. As in the ADM
evaluator, everything works on squared Euclidean distances max(|a|^2 - 2 a.b + |b|^2, 0), and
a radius is the (k+1)-th smallest entry of a feature's row of distances to its own set, the
row including the feature itself (distance ~0).

Arithmetic: float32 by default (matmuls at highest precision, so no TF32 / bf16 on
accelerators). The ADM evaluator itself (its `DistanceBlock`) computes each 10000 x 10000
block of distances in float16 - inputs, norms, the product and the sum rounded to half - and
falls back to float32 only for a block with a non-finite entry. `adm_float16=True` emulates
that (rounding to half after each step with `lax.reduce_precision`; sums and the matmul
accumulate in float32, as TF's GPU kernels do by default, up to summation order; the fall-back
is decided per tile of `block` x `block`): use it to compare with published ADM numbers, which
carry the half-precision rounding (squared distances on a grid of 0.25 between 256 and 512,
0.5 up to 1024, ...). Float32 is the more accurate measurement.

Ties and duplicates, as in ADM: a duplicate of a feature is a neighbour at distance ~0 like
any other (the self-distance is not removed by index, only counted as one of the k + 1
smallest), so a feature with k or more exact copies in its set has radius ~0 and its ball
holds only itself and its copies - whether a third set's copy of it falls inside is then up
to rounding. Comparisons are `<=`, so a point exactly on a boundary is inside; ties on the
boundary are common with adm_float16 (coarse distances) and rare in float32. The expansion
|a|^2 - 2 a.b + |b|^2 rounds (relative error ~1e-7 of |a|^2 in float32), so pairs within that
of a boundary can fall either way, as in ADM.

Scaling: the N x M distance matrix is never held. Features are padded to whole blocks of
`block` rows (fewer for small sets) once and kept on the device with their squared norms; one
jitted kernel per (block, block) tile computes that tile's distances and either merges the
k + 1 smallest per row into a running list (radii) or ORs the ball memberships (precision /
recall). Padded rows and columns are masked (infinite distance for radii, radius -inf for
memberships). Memory is O(block^2 + (N + M) dim): 50k x 50k x 2048 with block 10000 (ADM's
batch) holds ~0.4 GB of distances per tile. The kernels compile once per (block, dim, k).
The k + 1 smallest of a row are exact selections of the same distances whatever the tiling,
so in float32 the results do not depend on `block` (short of the matmul rounding one pair's
dot product differently).

`intra_class_diversity`: the mean pairwise feature distance within each class, averaged over
the classes (0 for copies) - what precision / recall of a whole set cannot see when every class
collapses onto its own typical image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 10000
_BLOCK_QUANTUM = 256  # small sets use a block of their size rounded up to this


def _block_size(block: int, *counts: int) -> int:
    """`block`, or less for small sets: their largest count rounded up to a multiple of 256
    (so 64 features are not padded to 10000, and few shapes compile)."""
    if block < 1:
        raise ValueError(f"block must be positive, got {block}.")
    return min(block, -(-max(counts) // _BLOCK_QUANTUM) * _BLOCK_QUANTUM)


def _half(x: jax.Array) -> jax.Array:
    """Round float32 values to float16 (overflow -> inf), keeping the float32 dtype."""
    return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)


@jax.jit
def _sq_norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Squared norms in float32 and as ADM's half path forms them (squares and sum rounded)."""
    return (jnp.sum(jnp.square(x), axis=-1),
            _half(jnp.sum(_half(jnp.square(_half(x))), axis=-1)))


def _blocks(features, block: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array], int]:
    """Device array (num_blocks, block, dim) of the zero-padded features, their squared norms
    (float32 and half, each (num_blocks, block)), and the number of real rows."""
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"Features must be a non-empty (count, dim) array, got shape {x.shape}.")
    n = len(x)
    num_blocks = -(-n // block)
    padded = np.zeros((num_blocks * block, x.shape[1]), np.float32)
    padded[:n] = x
    padded = jnp.asarray(padded).reshape(num_blocks, block, x.shape[1])
    return padded, _sq_norms(padded), n


def _sq_dists(a: jax.Array, a_sq: tuple[jax.Array, jax.Array], b: jax.Array,
              b_sq: tuple[jax.Array, jax.Array], adm_float16: bool) -> jax.Array:
    """(len(a), len(b)) squared distances max(|a|^2 - 2 a.b + |b|^2, 0), float32 result."""

    def full(_=None):
        ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
        return jnp.maximum(a_sq[0][:, None] - 2.0 * ab + b_sq[0][None, :], 0.0)

    if not adm_float16:
        return full()
    # Products of half values are exact in float32; the dot accumulates in float32.
    ab = _half(jnp.dot(_half(a), _half(b).T, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32))
    d = jnp.maximum(_half(_half(a_sq[1][:, None] - 2.0 * ab) + b_sq[1][None, :]), 0.0)
    return jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda _: d, full, None)


@functools.partial(jax.jit, static_argnames=("k", "adm_float16"), donate_argnums=0)
def _smallest_tile(best, rows, rows_sq, cols, cols_sq, cols_valid, k: int, adm_float16: bool):
    """Merge one tile's distances into the running k + 1 smallest per row (ascending)."""
    d = _sq_dists(rows, rows_sq, cols, cols_sq, adm_float16)
    d = jnp.where(cols_valid[None, :], d, jnp.inf)
    tile_best = -jax.lax.top_k(-d, min(k + 1, d.shape[1]))[0]
    return -jax.lax.top_k(-jnp.concatenate([best, tile_best], axis=1), k + 1)[0]


@functools.partial(jax.jit, static_argnames="adm_float16", donate_argnums=(0, 1))
def _membership_tile(a_in, b_in, a, a_sq, a_radii, b, b_sq, b_radii, adm_float16: bool):
    """OR into a_in whether each row of a lies in a ball of b, and into b_in the converse."""
    d = _sq_dists(a, a_sq, b, b_sq, adm_float16)
    return (a_in | jnp.any(d <= b_radii[None, :], axis=1),
            b_in | jnp.any(d <= a_radii[:, None], axis=0))


def _tile(sq: tuple[jax.Array, jax.Array], i: int) -> tuple[jax.Array, jax.Array]:
    return sq[0][i], sq[1][i]


def _squared_radii(blocks: jax.Array, sq: tuple[jax.Array, jax.Array], n: int, k: int,
                   adm_float16: bool) -> jax.Array:
    """(num_blocks, block) squared radii on the device; padded rows get -inf."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    if n < k + 1:
        raise ValueError(f"Radii with k={k} need at least {k + 1} features, got {n}.")
    num_blocks, block = blocks.shape[:2]
    valid = (jnp.arange(num_blocks * block) < n).reshape(num_blocks, block)
    out = []
    for i in range(num_blocks):
        best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
        for j in range(num_blocks):
            best = _smallest_tile(best, blocks[i], _tile(sq, i), blocks[j], _tile(sq, j),
                                  valid[j], k=k, adm_float16=adm_float16)
        out.append(jnp.where(valid[i], best[:, k], -jnp.inf))
    return jnp.stack(out)


def radii(features, k: int = 3, block: int = DEFAULT_BLOCK, squared: bool = False,
          adm_float16: bool = False) -> np.ndarray:
    """(N,) float32 distance of each feature to its k-th nearest neighbour in the set (the
    (k+1)-th smallest distance counting the feature itself); squared=True gives the squared
    distances that ADM's `manifold_radii` returns and `precision_recall` compares."""
    blocks, sq, n = _blocks(features, _block_size(block, len(features)))
    r = np.asarray(_squared_radii(blocks, sq, n, k, adm_float16)).reshape(-1)[:n]
    return r if squared else np.sqrt(r)


def precision_recall(real, fake, k: int = 3, block: int = DEFAULT_BLOCK,
                     adm_float16: bool = False) -> dict[str, float]:
    """{"precision", "recall"} of generated features `fake` (M, dim) against `real` (N, dim),
    as the ADM evaluator's `compute_prec_recall` (its reference batch is `real`)."""
    block = _block_size(block, len(real), len(fake))
    real_b, real_sq, n_real = _blocks(real, block)
    fake_b, fake_sq, n_fake = _blocks(fake, block)
    if real_b.shape[-1] != fake_b.shape[-1]:
        raise ValueError(f"Feature dims differ: real {real_b.shape[-1]}, fake "
                         f"{fake_b.shape[-1]}.")
    real_r = _squared_radii(real_b, real_sq, n_real, k, adm_float16)
    fake_r = _squared_radii(fake_b, fake_sq, n_fake, k, adm_float16)
    real_in = [jnp.zeros((block,), bool) for _ in range(len(real_b))]
    fake_in = [jnp.zeros((block,), bool) for _ in range(len(fake_b))]
    for i in range(len(real_b)):
        for j in range(len(fake_b)):
            real_in[i], fake_in[j] = _membership_tile(
                real_in[i], fake_in[j], real_b[i], _tile(real_sq, i), real_r[i], fake_b[j],
                _tile(fake_sq, j), fake_r[j], adm_float16=adm_float16)
    recall = np.asarray(jnp.concatenate(real_in))[:n_real].mean()
    precision = np.asarray(jnp.concatenate(fake_in))[:n_fake].mean()
    return {"precision": float(precision), "recall": float(recall)}


def intra_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise Euclidean feature distance within each class (classes with >= 2 images),
    averaged over the classes; 0 for a set of copies."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    per_class = []
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) < 2:
            continue
        sq = np.sum(f * f, 1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0))
        per_class.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(per_class)) if per_class else float("nan")
