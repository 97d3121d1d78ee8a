"""Sampling throughput of the generators on one accelerator, random weights (the speed does
not depend on the values), images/s after warm-up, median of repeats, peak device memory.

    python benchmarks/generation_speed.py [--workload titok_l32|gpt_b|all] [--repeats 5]

  titok_l32  MaskGIT-L32 generator, 8 steps, linear CFG 4.5 (doubled batch), randomize
             temperature 9.5, softmax annealing, then TiTok-L-32 decode (MaskGIT-VQGAN pixel
             decoder) to 256x256 pixels; batch 125 (the official baseline's setting).
  gpt_b      GPT-B, 256 tokens, CFG 1.75 with the step schedule (doubled batch), KV cache,
             then GigaTok B-L decode to 256x256 pixels; batch 64.
Both run as one jitted program per batch (sampling + decoding), compute in bfloat16.
Results are printed as a table and as JSON lines (--out FILE appends them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _init(model, *args):
    import flax.linen as nn
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), *args))["params"]


def titok_l32(dtype, attention_impl, scan=True):
    from tok1d import models
    from tok1d.generation import common
    from tok1d.train import config_lib
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    kw = config_lib.load(os.path.join(repo, "configs", "titok.py:l32_stage2")).model.to_dict()
    kw.pop("name")
    kw["remat"] = "none"
    tok = models.create("titok", **kw, dtype=dtype)
    tok_params = _init(tok, jnp.zeros((1, 256, 256, 3)))
    gen = models.create("maskgit", size="l32", dtype=dtype, attention_impl=attention_impl,
                        scan=scan)
    gen_params = _init(gen, jnp.zeros((1, 32), jnp.int32), jnp.zeros((1,), jnp.int32))
    sampler = common.make_sampler(gen, num_steps=8, guidance_scale=4.5,
                                  guidance_schedule="linear", randomize_temperature=9.5,
                                  softmax_annealing=True)
    return tok, tok_params, gen_params, sampler, 125


def gpt_b(dtype, attention_impl, scan=True):
    from tok1d import models
    from tok1d.generation import common
    tok = models.create("gigatok", preset="b_l", dtype=dtype)
    tok_params = _init(tok, jnp.zeros((1, 256, 256, 3)))
    gen = models.create("gpt", size="B", vocab_size=16384, num_tokens=256, dtype=dtype,
                        attention_impl=attention_impl, scan=scan)
    gen_params = _init(gen, jnp.zeros((1, 256), jnp.int32), jnp.zeros((1,), jnp.int32))
    sampler = common.make_sampler(gen, cfg_scale=1.75, cfg_schedule="step",
                                  cfg_kwargs=dict(window_start=0.18), temperature=1.0)
    return tok, tok_params, gen_params, sampler, 64


WORKLOADS = {"titok_l32": titok_l32, "gpt_b": gpt_b}


def _median_time(fn, repeats: int) -> float:
    """Median seconds of `fn(rng)` over `repeats` calls after a warm-up call."""
    jax.block_until_ready(fn(jax.random.key(0)))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(r + 1)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, repeats: int, dtype, attention_impl, scan: bool = True) -> dict:
    tok, tok_params, gen_params, sampler, batch = WORKLOADS[name](dtype, attention_impl, scan)

    @jax.jit
    def run(gen_params, tok_params, labels, rng):
        codes = sampler(gen_params, labels, rng)
        pixels = tok.apply({"params": tok_params}, codes, method=tok.decode_codes)
        return codes, pixels

    labels = jnp.arange(batch, dtype=jnp.int32) % 1000
    t0 = time.perf_counter()
    jax.block_until_ready(run(gen_params, tok_params, labels, jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        codes, pixels = jax.block_until_ready(run(gen_params, tok_params, labels,
                                                  jax.random.key(r + 1)))
        times.append(time.perf_counter() - t0)
    sample_fn = jax.jit(sampler)
    sample_s = _median_time(lambda k: sample_fn(gen_params, labels, k), repeats)
    decode = jax.jit(lambda p, c: tok.apply({"params": p}, c, method=tok.decode_codes))
    decode_s = _median_time(lambda k: decode(tok_params, codes), repeats)
    stats = jax.devices()[0].memory_stats() or {}
    med = statistics.median(times)
    return dict(workload=name, batch=batch, images_per_s=batch / med, seconds_per_batch=med,
                sampling_only_images_per_s=batch / sample_s,
                decode_only_images_per_s=batch / decode_s, scan=scan,
                first_call_s=compile_s, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                dtype=str(jnp.dtype(dtype)), attention_impl=attention_impl or "xla",
                codes_in_range=bool((np.asarray(codes) >= 0).all()),
                pixels_shape=list(pixels.shape), device=jax.devices()[0].device_kind,
                jax=jax.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention_impl", default="", help="'' (XLA) or 'cudnn'")
    parser.add_argument("--no_scan", action="store_true",
                        help="unrolled generator layers instead of a scanned stack")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for name in names:
        r = measure(name, args.repeats, jnp.dtype(args.dtype), args.attention_impl or None,
                    scan=not args.no_scan)
        print(f"{r['workload']:10s} batch {r['batch']:4d}  {r['images_per_s']:8.1f} img/s  "
              f"{r['seconds_per_batch'] * 1e3:8.1f} ms/batch  first call {r['first_call_s']:.1f} s"
              f"  peak {r['peak_gib']:.1f} GiB  (sampling alone "
              f"{r['sampling_only_images_per_s']:.1f} img/s, decoding alone "
              f"{r['decode_only_images_per_s']:.1f} img/s; {r['device']}, "
              f"{r['attention_impl']}, scan={r['scan']})",
              flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
