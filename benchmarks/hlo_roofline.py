"""Where a GPU program's time should go, read from its optimised HLO (no GPU needed): a roofline
estimate per kernel, summed by kind and by part of the model.

    python benchmarks/hlo_roofline.py PROGRAM.hlo.txt [--bandwidth 4e12] [--top 20]

PROGRAM.hlo.txt is the text of a compiled GPU executable (`compiled.as_text()`, e.g. written by
benchmarks/gpu_aot.py on a machine without a GPU). Every instruction that launches work
(fusions, cuBLAS / cuDNN custom calls, copies; not parameters, tuples, bitcasts, constants) is
one kernel; a while loop's body counts `known_trip_count` times, a conditional its costliest
branch. Per kernel:

  bytes   its operands and outputs, except what XLA does in place or reads in part: a fused
          dynamic-update-slice writes only its update; an operand that a fusion reads only
          through dynamic-slices costs those slices (a scanned layer stack's weights or saved
          activations)
  FLOPs   gemms (cuBLAS or Triton fusions) 2·M·N·K; cuDNN convolutions 2·(output)·(kernel window x input channels);
          cuDNN fused attention 4·B·H·T·S·D forward, 2.5x that backward (at 60% of peak)
  time    max(bytes / bandwidth, FLOPs / peak) + a launch cost

It is an estimate: fusions that re-read operands, kernels too small to fill the GPU and the
autotuner's choices are not modelled (RESULTS.md compares it with measured steps). Kinds come
from the kernel (gemm, conv, fused attention, pad, transpose, in-place slices) or from the
jax op names XLA keeps in its metadata (attention, norms, converts); parts from the model's
module path (frozen teacher, loss networks such as the discriminator and perceptual nets,
encoder, decoder, rest) and whether it is the backward pass.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
from typing import Iterator

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
             "partition-id", "replica-id"}
# Achievable dense FLOP/s: an 8192^3 bf16 matmul ran at 622-690 TFLOP/s on the H200 of
# 2026-12-04 (RESULTS.md); f32 matmuls and convolutions run as TF32, at half that.
PEAK = {"bf16": 660e12, "f16": 660e12, "f32": 330e12}
SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z\-]*)\((.*)$")


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str
    part: str
    calls: int          # launches per program call (trip counts multiplied in)
    bytes: float        # per program call
    flops: float
    seconds: float
    op_name: str


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in `text` (a shape or a tuple of shapes)."""
    total = 0
    for dtype, dims in SHAPE.findall(text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def first_shape(text: str) -> tuple[str, list[int]]:
    m = SHAPE.search(text)
    if not m:
        return "", []
    return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def computations(text: str) -> tuple[dict[str, list[str]], str]:
    """Instruction lines of each computation, and the entry computation's name."""
    comps, current, entry = {}, None, ""
    for line in text.splitlines():
        m = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if m:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current and line.strip().startswith(("%", "ROOT")):
            comps[current].append(line.strip())
    return comps, entry


def _operands(args: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", args.split(")")[0])


class Roofline:
    def __init__(self, text: str, bandwidth: float = 4.0e12, launch: float = 3e-6):
        self.comps, self.entry = computations(text)
        self.bandwidth, self.launch = bandwidth, launch
        self._fused: dict[str, tuple[dict[int, int], set[int], int]] = {}

    def kernels(self) -> list[Kernel]:
        return list(self._walk(self.entry, 1))

    def _instructions(self, comp: str) -> Iterator[tuple[str, str, str, str, str, dict]]:
        """(name, shape, op, args, line, shapes) of each instruction of `comp`; `shapes` maps
        every instruction defined so far to its shape text."""
        shapes = {}
        for line in self.comps[comp]:
            m = INSTRUCTION.match(line)
            if m:
                name, shape, op, args = m.groups()
                shapes[name] = shape
                yield name, shape, op, args, line, shapes

    def _fused_io(self, name: str) -> tuple[dict[int, int], set[int], int]:
        """For a fused computation: parameter -> bytes read where every use is a dynamic-slice
        (or the buffer of a dynamic-update-slice: 0), parameters updated in place, and the
        bytes those updates write."""
        if name in self._fused:
            return self._fused[name]
        params, uses = {}, collections.defaultdict(list)
        in_place, written = set(), 0
        for out, shape, op, args, _, shapes in self._instructions(name):
            if op == "parameter":
                params[out] = int(re.match(r"(\d+)", args).group(1))
                continue
            ops = _operands(args)
            for position, operand in enumerate(ops):
                uses[operand].append((op, position, shape))
            if op == "dynamic-update-slice" and ops and ops[0] in params:
                in_place.add(params[ops[0]])
                written += shape_bytes(shapes.get(ops[1], ""))
        reads = {}
        for param, index in params.items():
            found = uses.get(param, [])
            if found and all(op == "dynamic-slice" and pos == 0 for op, pos, _ in found):
                reads[index] = sum(shape_bytes(s) for _, _, s in found)
            elif found and all(op == "dynamic-update-slice" and pos == 0 for op, pos, _ in found):
                reads[index] = 0
        self._fused[name] = (reads, in_place, written)
        return self._fused[name]

    def _fused_dot_flops(self, name: str) -> tuple[float, str]:
        """FLOPs and operand dtype of the dot inside a gemm fusion."""
        for _, shape, op, args, line, shapes in self._instructions(name):
            if op == "dot":
                dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
                return _gemm(shape, shapes.get(_operands(args)[0], ""),
                             dims.group(1) if dims else "")
        return 0.0, "bf16"

    def _walk(self, comp: str, times: int) -> Iterator[Kernel]:
        for name, shape, op, args, line, shapes in self._instructions(comp):
            if op in NO_KERNEL:
                continue
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
                yield from self._walk(body, times * (int(trips.group(1)) if trips else 1))
                continue
            if op in ("conditional", "call"):  # a conditional: its costliest branch
                branches = [list(self._walk(callee, times))
                            for callee in re.findall(r"%([\w.\-]+)", line.split(")", 1)[1])
                            if callee in self.comps]
                if branches:
                    yield from max(branches, key=lambda ks: sum(k.seconds for k in ks))
                continue
            yield self._kernel(line, name, shape, op, args, shapes, times)

    def _kernel(self, line, name, shape, op, args, shapes, times) -> Kernel:
        operands = _operands(args)
        in_bytes = [shape_bytes(shapes.get(o, "")) for o in operands]
        library = op == "custom-call"
        out_bytes = shape_bytes(shape.split(" s8[")[0].split(", s8[")[0] if library else shape)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if op == "fusion" and called and called.group(1) in self.comps:
            reads, in_place, written = self._fused_io(called.group(1))
            read = sum(reads.get(i, b) for i, b in enumerate(in_bytes) if i not in in_place)
            if in_place:
                out_bytes = max(0, out_bytes - sum(in_bytes[i] for i in in_place
                                                   if i < len(in_bytes))) + written
            total = read + out_bytes
        else:
            total = sum(in_bytes) + out_bytes
        flops, dtype, efficiency = 0.0, "bf16", 1.0
        target = re.search(r'custom_call_target="([^"]+)"', line)
        target = target.group(1) if target else ""
        if op == "fusion" and called and ("gemm" in called.group(1)):  # Triton gemm fusion
            flops, dtype = self._fused_dot_flops(called.group(1))
        elif "cublas" in target:
            contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
            flops, dtype = _gemm(shape, shapes.get(operands[0], ""),
                                 contracting.group(1).replace('"', "") if contracting else "")
        elif "cudnn$conv" in target:
            labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line).groups()
            if "BackwardFilter" in target or "bw-filter" in name:
                grad_dtype, grad = first_shape(shapes.get(operands[1], ""))
                _, kernel = first_shape(shape)
                dtype = grad_dtype
                flops = 2.0 * math.prod(grad) * math.prod(kernel) / kernel[labels[1].index("o")]
            else:
                dtype, kernel = first_shape(shapes.get(operands[1], ""))
                flops = (2.0 * math.prod(first_shape(shape)[1]) * math.prod(kernel)
                         / kernel[labels[1].index("o")])
        elif "fmha" in target:
            dtype, q = first_shape(shapes.get(operands[0], ""))
            _, k = first_shape(shapes.get(operands[1], ""))
            flops = 4.0 * q[0] * q[2] * q[1] * k[1] * q[3] * (2.5 if "Backward" in target else 1)
            efficiency = 0.6
        peak = PEAK.get(dtype, PEAK["f32"]) * efficiency
        seconds = max(total / self.bandwidth, flops / peak) + self.launch
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else ""
        return Kernel(name, _kind(op, target, line, op_name), _part(op_name), times,
                      total * times, flops * times, seconds * times, op_name)


def _gemm(out: str, lhs: str, contracting: str) -> tuple[float, str]:
    """2 * (output elements) * K and the lhs dtype of a matmul: `out` and `lhs` are shape texts,
    `contracting` the lhs's contracting dimensions as "i,j" (none: K = 1)."""
    dtype, dims = first_shape(lhs)
    k = math.prod(dims[int(i)] for i in contracting.split(",") if i)
    return 2.0 * math.prod(first_shape(out)[1]) * k, dtype


def _kind(op: str, target: str, line: str, op_name: str) -> str:
    callee = line.split("calls=")[-1][:60] if "calls=" in line else ""
    if "fmha" in target:
        return "attention (fused)"
    if "conv" in target:
        return "conv"
    if "cublas" in target or "gemm_fusion" in callee or "triton_gemm" in callee:
        return "attention matmul" if ("BTNH" in op_name or "BNTS" in op_name) else "gemm"
    if "BTNH" in op_name or "BNTS" in op_name or "/attn/vmap" in op_name:
        return "attention (rest)"
    if "dynamic_update_slice" in callee or "dynamic_slice" in callee:
        return "slices (stacks, caches)"
    for word in ("pad", "transpose"):
        if word in callee:
            return word
    if "norm" in op_name.lower():
        return "norms"
    if "convert" in callee:
        return "convert"
    return "elementwise / reduce"


# jax op-name fragments -> the part of a training step they belong to (first match)
PARTS = (("MaskGITVQGAN", "teacher"), ("DinoV2", "teacher"), ("Discriminator", "loss nets"),
         ("LPIPS", "loss nets"), ("ConvNeXt", "loss nets"), ("decoder", "decoder"),
         ("encoder", "encoder"))


def _part(op_name: str) -> str:
    backward = "transpose(" in op_name
    who = next((part for key, part in PARTS if key in op_name), "rest")
    return f"{who} {'bwd' if backward else 'fwd'}"


def summarize(kernels: list[Kernel], top: int = 0) -> str:
    seconds = sum(k.seconds for k in kernels)
    lines = [f"estimated {seconds * 1e3:.1f} ms per call: {sum(k.calls for k in kernels)} "
             f"kernels, {sum(k.bytes for k in kernels) / 1e9:.1f} GB, "
             f"{sum(k.flops for k in kernels) / 1e12:.1f} TFLOP in gemms / convs / attention"]
    for title, key in (("by kind", lambda k: k.kind), ("by part", lambda k: k.part)):
        groups = collections.defaultdict(lambda: [0.0, 0.0, 0])
        for k in kernels:
            g = groups[key(k)]
            g[0] += k.seconds
            g[1] += k.bytes
            g[2] += k.calls
        lines.append(f"{title}:")
        for name, (s, b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {name:26s} {s * 1e3:8.1f} ms {b / 1e9:8.1f} GB {n:7d} kernels")
    if top:
        lines.append(f"top {top} kernels:")
        for k in sorted(kernels, key=lambda k: -k.seconds)[:top]:
            lines.append(f"  {k.seconds * 1e3:7.2f} ms x{k.calls:<4d} {k.kind:22s} "
                         f"{k.op_name[-90:]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hlo", help="compiled GPU HLO text")
    parser.add_argument("--bandwidth", type=float, default=4.0e12,
                        help="achievable memory bandwidth, B/s (H200: 4.8e12 peak)")
    parser.add_argument("--launch", type=float, default=3e-6, help="seconds per kernel")
    parser.add_argument("--top", type=int, default=0, help="also list the N slowest kernels")
    args = parser.parse_args()
    try:
        with open(args.hlo, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        parser.error(f"cannot read {args.hlo}: {e.strerror}")
    roofline = Roofline(text, args.bandwidth, args.launch)
    print(summarize(roofline.kernels(), args.top))


if __name__ == "__main__":
    main()
