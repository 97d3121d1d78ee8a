"""Compile a `tok1d bench` workload for an NVIDIA GPU on a machine that has none, and estimate
where its time would go: XLA's deviceless compilation (a PJRT topology built from a GPU target
description, benchmarks/gpu_specs/) gives the program the GPU would run, its memory plan, and
its optimised HLO for benchmarks/hlo_roofline.py.

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \\
      python benchmarks/gpu_aot.py --config=configs/titok.py:l32_stage1 --workload=train \\
        --batch_size=64 [--set model.attention_impl=cudnn] [--out=DIR] [--top=20]

Needs jax's CUDA plugin of jaxlib's version beside tok1d (e.g. a separate virtualenv with
`pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')" -e .`, 5.5 GB)
but no GPU or driver: JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 skips the plugin's driver check. No
kernel is timed, so XLA does not autotune: Triton gemm fusions then fail to pick tile sizes for
large training steps (--xla_gpu_enable_triton_gemm=false uses cuBLAS; sampling loops compile
either way), and cuDNN kernels are checked only when a real GPU first runs them.

Nothing is placed on a device: the workload is built with `abstract=True`, its meshes on the
topology's devices, and the trainer's frozen networks (`parallel.replicate`) become shapes.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

import jax
import numpy as np
from jax.experimental import topologies

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlo_roofline  # noqa: E402

from tok1d import parallel  # noqa: E402
from tok1d.cli import bench  # noqa: E402
from tok1d.train import config_lib  # noqa: E402

SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")


def gpu_devices(spec: str) -> list:
    """Compile-only devices of one GPU described by the target config file `spec`."""
    with open(spec, encoding="utf-8") as f:
        target = f.read()
    try:
        return list(topologies.get_topology_desc("", "cuda", target_config=target,
                                                 topology="1x1x1").devices)
    except NotImplementedError:  # (jax without its CUDA plugin)
        sys.exit("error: gpu_aot.py compiles for a GPU without one, through jax's CUDA plugin: "
                 "install it (pip install \"jax[cuda12]\", see this file's docstring).")


def place_nothing(devices: list) -> None:
    """Meshes over `devices` by default, and replicated host trees as shapes on their mesh."""
    create_mesh = parallel.create_mesh

    def mesh_on(sizes, devices_=None):
        return create_mesh(sizes, devices if devices_ is None else devices_)

    def as_shapes(tree, mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                           sharding=sharding), tree)
    parallel.create_mesh = mesh_on
    parallel.replicate = as_shapes


def override(config, assignments: list[str]) -> None:
    """`--set a.b=value` (a Python literal, else a string) on the config."""
    for assignment in assignments:
        path, _, text = assignment.partition("=")
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        with config.unlocked():
            node[last] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument("--workload", default="train", choices=["train", "encode", "decode",
                                                                 "sample"])
    parser.add_argument("--batch_size", type=int, default=0)
    parser.add_argument("--tokenizer_config", default="", help="sample: the decoding tokenizer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.attention_impl=cudnn")
    parser.add_argument("--spec", default=os.path.join(SPECS, "h200_sxm.txtpb"),
                        help="GPU target description (benchmarks/gpu_specs/)")
    parser.add_argument("--out", default="", help="write each program's HLO here")
    parser.add_argument("--bandwidth", type=float, default=4.0e12, help="roofline B/s")
    parser.add_argument("--top", type=int, default=0, help="list the N slowest kernels")
    args = parser.parse_args()

    devices = gpu_devices(args.spec)
    place_nothing(devices)
    config = config_lib.load(args.config)
    override(config, args.set)
    batch = args.batch_size or config.batch_size
    if args.workload == "train":
        work = bench.bench_train(config, batch, abstract=True)
    elif args.workload == "sample":
        work = bench.bench_sample(config, batch, config_lib.load(args.tokenizer_config),
                                  abstract=True)
    else:
        work = bench.bench_codec(config, batch, args.workload, abstract=True)
    print(f"{args.config} {args.workload} batch {batch} {' '.join(args.set)} on "
          f"{devices[0].device_kind} (deviceless)")
    for i, (fn, fn_args) in enumerate(work.programs):
        start = time.perf_counter()
        with work.context():
            compiled = fn.lower(*fn_args).compile()
        memory = compiled.memory_analysis()
        text = compiled.as_text()
        print(f"program {i}: compiled in {time.perf_counter() - start:.1f} s; memory plan "
              f"{memory.argument_size_in_bytes / 2**30:.2f} GiB arguments, "
              f"{memory.output_size_in_bytes / 2**30:.2f} GiB outputs, "
              f"{memory.temp_size_in_bytes / 2**30:.2f} GiB temporaries")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"program_{i}.hlo.txt"), "w",
                      encoding="utf-8") as f:
                f.write(text)
        roofline = hlo_roofline.Roofline(text, bandwidth=args.bandwidth)
        print(hlo_roofline.summarize(roofline.kernels(), args.top))


if __name__ == "__main__":
    main()
