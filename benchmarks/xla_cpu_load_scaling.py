"""How long XLA:CPU takes to load a compiled executable, against the program's size.

A warm start (the persistent compilation cache) deserialises the executable. On XLA:CPU each
YNNPACK fusion finds its HLO instruction again by a scan over every instruction of the module,
so the load grows with (YNN fusions) x (instructions). This script holds the number of YNN
reductions fixed (K arrays, each reduced once) and grows the elementwise chain before each
reduction (L ops), which adds instructions but no YNN fusion:

    python benchmarks/xla_cpu_load_scaling.py --arrays 800 --chains 1 8 32

prints per L: YNN fusions, HLO instructions, compile seconds, load seconds (best of 3).
Add XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce to see the same programs without
YNN reductions. Results: benchmarks/RESULTS.md ("XLA:CPU's cache load is quadratic").
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax.experimental import serialize_executable


def program(chain: int):
    def f(xs):
        out = []
        for x in xs:
            for j in range(chain):
                x = jnp.sin(x) * (1.0 + 0.01 * j)
            out.append(jnp.sum(x, axis=1))
        return out
    return f


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=800, help="reductions (K)")
    parser.add_argument("--chains", type=int, nargs="+", default=[1, 8, 32],
                        help="elementwise ops before each reduction (L)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # Distinct widths: no two reductions are merged.
    xs = [jax.ShapeDtypeStruct((32, 64 + i), jnp.float32) for i in range(args.arrays)]
    print("| K arrays | L chain | YNN fusions | HLO instructions | compile s | load s |")
    print("|---|---|---|---|---|---|")
    for chain in args.chains:
        t0 = time.perf_counter()
        compiled = jax.jit(program(chain)).lower(xs).compile()
        compile_s = time.perf_counter() - t0
        text = compiled.as_text()
        ynn = text.count('"__ynn_fusion"')
        instructions = sum(1 for line in text.splitlines() if " = " in line)
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        load_s = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            load_s = min(load_s, time.perf_counter() - t0)
        print(f"| {args.arrays} | {chain} | {ynn} | {instructions} | {compile_s:.1f} | "
              f"{load_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
