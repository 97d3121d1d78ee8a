"""FID's matrix square root: time and agreement of `evaluation.fid_method` "eigh" and "sqrtm".

    python benchmarks/fid_methods.py [--dim 2048] [--samples 200,5000] [--repeats 3]

For each sample count N, two sets of N random correlated features of `--dim` dimensions give
two Gaussians (mean, unbiased covariance); both methods of `tok1d.evaluation.fid` compute
their Frechet distance. Printed: seconds per call (the least of the repeats) and the
relative difference. N < dim gives rank-deficient covariances (where pytorch-fid's sqrtm
falls back to adding eps to the diagonals); N > dim full-rank ones, as with 50k samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from tok1d.evaluation import fid  # noqa: E402


def _stats(rng: np.random.Generator, n: int, dim: int, shift: float):
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    x = rng.normal(size=(n, dim)) @ mix + shift
    return x.mean(0), np.cov(x, rowvar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", default="200,5000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| N | dim | eigh s | sqrtm s | speed-up | FID | relative difference |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.samples.split(",")):
        stats = (*_stats(rng, n, args.dim, 0.0), *_stats(rng, n, args.dim, 0.1))
        seconds, values = {}, {}
        for method in fid.FID_METHODS:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                values[method] = fid.frechet_distance(*stats, method=method)
                times.append(time.perf_counter() - start)
            seconds[method] = min(times)
        rel = abs(values["eigh"] - values["sqrtm"]) / abs(values["sqrtm"])
        print(f"| {n} | {args.dim} | {seconds['eigh']:.2f} | {seconds['sqrtm']:.2f} | "
              f"{seconds['sqrtm'] / seconds['eigh']:.1f}x | {values['sqrtm']:.6g} | {rel:.1e} |")


if __name__ == "__main__":
    main()
