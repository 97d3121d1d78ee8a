"""Save and restore time of tok1d's checkpoints, zstd-compressed or not (`checkpoint.compress`),
on weight-like float32 arrays (N(0, 0.02), what trained weights and AdamW moments look like
to a compressor), through `tok1d.train.checkpoint.Checkpointer` itself:

    python benchmarks/checkpoint_speed.py [--gib 2] [--repeats 3] [--dir /tmp/ckpt_speed]

Each repeat saves once (synchronously) and restores twice per setting, the settings
alternating; prints one line per repeat and setting: save s, size on disk, both restores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tok1d.train import checkpoint  # noqa: E402


def state_of(gib: float, seed: int = 0) -> dict[str, jax.Array]:
    """Arrays of 128 MiB, `gib` GiB in all, drawn from N(0, 0.02)."""
    rng = np.random.default_rng(seed)
    count = max(1, round(gib * 8))
    return {f"w{i}": jax.numpy.asarray(0.02 * rng.standard_normal((64, 1024, 512), np.float32))
            for i in range(count)}


def measure(directory: str, state, compress: bool) -> tuple[float, int, list[float]]:
    shutil.rmtree(directory, ignore_errors=True)
    ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=1, async_save=False,
                                   compress=compress)
    t0 = time.perf_counter()
    ckpt.save(1, state, force=True)
    ckpt.wait()
    save_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory)
               for f in files)
    abstract = checkpoint.abstract_with_shardings(state, jax.tree.map(lambda x: x.sharding, state))
    restores = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(ckpt.restore(1, abstract))
        restores.append(time.perf_counter() - t0)
    ckpt.close()
    shutil.rmtree(directory, ignore_errors=True)
    return save_s, size, restores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/ckpt_speed")
    args = parser.parse_args()
    state = state_of(args.gib)
    gib = sum(x.nbytes for x in state.values()) / 2 ** 30
    print(f"{gib:.2f} GiB of float32 arrays, {os.cpu_count()} CPUs, jax {jax.__version__}")
    for repeat in range(args.repeats):
        for compress in (True, False):
            save_s, size, restores = measure(args.dir, state, compress)
            print(f"repeat {repeat} compress={compress}: save {save_s:.1f} s, on disk "
                  f"{size / 2 ** 30:.2f} GiB, restore {restores[0]:.1f} / {restores[1]:.1f} s")


if __name__ == "__main__":
    main()
