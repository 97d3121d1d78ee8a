"""A pod plan on paper (issue 20 C) from `tok1d bench --compile_only` rows.

    python benchmarks/pod_plan.py ROWS.jsonl [--recipes titok.py:l32_stage1,...] [--chips 32]

ROWS.jsonl: lines written by `tok1d bench --workload=train --compile_only --out=...` (or
benchmarks/compile_times.sh's compile.jsonl, which adds the `recipe` each row measured). From
each recipe's row (any batch: the step's FLOPs and saved activations scale with it) and its
config (`total_steps` x `batch_size` images) it prints, per accelerator and MFU:

* FLOPs per image: the train step's matmul + conv FLOPs (tok1d's traced counter, remat
  recomputation included) / batch;
* step time at the config's global batch on `--chips` chips, chips x days for the recipe,
  days on `--chips` chips, the images per second one host has to feed (4 chips per v5p host, 8
  GPUs per GPU host);
* memory per chip under FSDP over `--chips`: the train state (params, optimizer state, EMA,
  discriminator; float32, split evenly) plus what autodiff saves for the backward pass at the
  per-chip batch. XLA's temporaries and workspace come on top (a compile on the target gives
  them: `tok1d bench --compile_only` there);
* the checkpoint (the whole train state) and its save time at `--write_gbps` per host, all
  hosts writing their shards at once (an assumption, not a measurement).

Peak dense bf16 rates: TPU v5p 459 TFLOP/s per chip, H100 / H200 SXM 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tok1d.train import config_lib  # noqa: E402

ACCELERATORS = {"TPU v5p": (459e12, 4), "H100 / H200": (989e12, 8)}  # (peak, chips per host)
DAY = 86400.0


def plan(row: dict, config, chips: int, mfus=(0.4, 0.5), write_gbps: float = 1.0) -> list[dict]:
    batch, images = config.batch_size, config.total_steps * config.batch_size
    flops_per_image = row["tflop_per_step"] * 1e12 / row["batch"]
    saved_per_image = row["saved_activations_gib"] / row["batch"]
    per_chip = batch / chips
    state = row["state_gib"]  # one device holds all of it in the bench's 1-device compile
    out = []
    for name, (peak, per_host) in ACCELERATORS.items():
        for mfu in mfus:
            rate = mfu * peak  # FLOP/s per chip
            step = per_chip * flops_per_image / rate
            hosts = max(1, chips // per_host)
            out.append(dict(
                accelerator=name, mfu=mfu, flops_per_image=flops_per_image,
                step_s=step, chip_days=images * flops_per_image / rate / DAY,
                days=images * flops_per_image / rate / DAY / chips,
                host_images_per_s=per_chip * min(per_host, chips) / step,
                memory_gib=state / chips + saved_per_image * per_chip,
                checkpoint_gib=state, save_s=state * 2 ** 30 / 1e9 / write_gbps / hosts,
                images=images, batch=batch, chips=chips))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows")
    parser.add_argument("--recipes", default="gigatok.py:xl_xxl,titok.py:l32_stage1,"
                        "titok.py:l32_stage2")
    parser.add_argument("--chips", type=int, default=32)
    parser.add_argument("--write_gbps", type=float, default=1.0,
                        help="checkpoint write rate per host, GB/s (assumed)")
    args = parser.parse_args(argv)
    rows = {}
    with open(args.rows, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("workload") == "train" and r.get("state_gib") is not None:
                rows.setdefault(r.get("recipe"), r)  # the first (cold) row of each recipe
    print("| recipe | images | accelerator | MFU | GFLOP / image | step s (global batch) | "
          "chip-days | days on chips | images/s per host | GiB per chip (state + saved) | "
          "checkpoint GiB | save s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        if recipe not in rows:
            print(f"| {recipe} | no compile-only row in {args.rows} |")
            continue
        config = config_lib.load(os.path.join(REPO, "configs", recipe))
        for p in plan(rows[recipe], config, args.chips, write_gbps=args.write_gbps):
            print(f"| {recipe} | {p['images'] / 1e6:.0f}M ({p['batch']}/step) | "
                  f"{p['accelerator']} | {p['mfu']:.0%} | {p['flops_per_image'] / 1e9:.0f} | "
                  f"{p['step_s']:.3f} | {p['chip_days']:.0f} | {p['days']:.1f} on "
                  f"{p['chips']} | {p['host_images_per_s']:.0f} | {p['memory_gib']:.1f} | "
                  f"{p['checkpoint_gib']:.1f} | {p['save_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
