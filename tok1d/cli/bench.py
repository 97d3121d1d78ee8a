r"""Speed, memory and MFU of any config's real programs, with random weights.

    tok1d bench --config=configs/titok.py:l32_stage1 --workload=train [--batch_size=64]
    tok1d bench --config=configs/gigatok_b_l.py --workload=encode --batch_size=64
    tok1d bench --config=configs/gigatok_b_l.py --workload=decode --batch_size=64
    tok1d bench --config=configs/gpt_gigatok.py:b --workload=sample --batch_size=64 \
        --tokenizer_config=configs/gigatok_b_l.py
    tok1d bench --config=configs/maskgit_titok.py:l32 --workload=train

Workloads:
  train   the trainer's own jitted step (tokenizer configs: with the teacher, perceptual network,
          discriminator and EMA the config asks for, the step of the run's last phase, i.e.
          after any warm-up terms and with the discriminator on, `config.phase_programs`;
          generator configs: the generator step) on synthetic batches of `--batch_size`
          (default: the config's global batch);
  encode  tokenizer: images -> codes;   decode: codes -> pixels (tokenizer configs);
  sample  generator config: class-conditional sampling with `config.sampling`, then decoding by
          a random tokenizer built from `--tokenizer_config` (one jitted program per batch);
  input   the recipe's input pipeline beside the official loader, images/s per CPU core
          (`tok1d.cli.input_bench`; `--images`, `--workers`, `--repeats`, `--image_folder`).
Frozen networks (teacher, LPIPS / ConvNeXt, DINO discriminator trunk) use random weights unless
the config names weight files: the speed does not depend on the values.

After `--warmup` calls (compilation included in the first), `--steps` calls are timed one by one
(`block_until_ready`); the table gives the median step time, images/s, the first call's time,
peak device memory (the allocator's high-water mark, where the backend reports it), the matmul
and convolution FLOPs of one step over all devices (counted on the traced program, loops times
their length: XLA's own cost analysis counts a scanned layer stack's body once), and MFU: those
FLOPs / step time / (devices x the device's bf16 matmul rate, measured here on a large matmul,
or `--peak_tflops`). Remat recomputation counts as work done. `--out FILE` appends the result
as a JSON line (record device, versions and command with it, e.g. in benchmarks/RESULTS.md).
`--profile DIR` writes a `jax.profiler` trace of the timed calls (kernels, launches, memory
copies) for TensorBoard's profile tab or Perfetto (`perfetto_trace.json.gz`), and prints what
it says per call (`trace_summary`): the device's busy time against the call's span, the ops and
launches, and the ops and op kinds that took the most time: profile before optimising.

`--compile_only` runs nothing: with the state and params as shapes only it compiles the
workload's programs, times that (tracing + lowering, XLA's compile, and the whole command from
its start to the programs being ready: the start-up a run pays before its first step, less
the state's initialisation or restore; a second run loads from the persistent compilation
cache, `parallel.compilation_cache_dir`) and reports the per-device memory XLA plans for the
largest of them (arguments + outputs - donated buffers + temporaries; "planned GiB"), to
check that a batch fits before a job is queued. Run it on the target backend: the plan depends on the compiler's
fusion and scheduling decisions, so a CPU plan only approximates a GPU's or TPU's. For training
it also gives two backend-independent parts per device: the train state (params, optimizer
state, EMA, discriminator) and the activations autodiff saves for the backward pass (the
loss's VJP residuals for one microbatch; `model.remat` / `model.cnn_remat` shrink them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.extend import core as jex_core

from tok1d import errors
from tok1d import images as images_lib
from tok1d import parallel, summary
from tok1d.cli import app
from tok1d.cli import input_bench, trace_summary
from tok1d.layers import cnn
from tok1d.objectives import tokenizer_loss
from tok1d.train import checkpoint as ckpt_lib
from tok1d.train import config_lib
from tok1d.train import generator as gen_trainer
from tok1d.train import tokenizer as tok_trainer
from tok1d.objectives import tokens
from tok1d.generation.decode import SampleDecoder

WORKLOADS = ("train", "encode", "decode", "sample", "input")
USAGE = "--config=FILE --workload=train|encode|decode|sample|input [--batch_size=N] [flags]"
CONFIG = "Config file (get_config()) whose programs are measured."
REQUIRED = ("config",)
POSITIONAL = ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("workload", "train", WORKLOADS, "What to measure.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's batch_size; "
                         "--workload=input: 32, a rate per image that does not depend on it).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("steps", 10, "Timed calls.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first one compiles).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_string("tokenizer_config", "", "sample: tokenizer config file (random "
                        "weights) that decodes the samples.", flag_values=fv)
    flags.DEFINE_float("peak_tflops", 0.0, "Device bf16 peak for MFU (0: measure a matmul).",
                       lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("compile_only", False, "Compile without running: FLOPs and the memory "
                      "XLA plans per device (does the batch fit?), no timing.", flag_values=fv)
    flags.DEFINE_string("profile", "", "Write a jax.profiler trace of the timed calls to this "
                        "directory (open it in TensorBoard's profile tab or Perfetto) and "
                        "print where the device's time went.",
                        flag_values=fv)
    flags.DEFINE_string("out", "", "Append the result as a JSON line to this file.",
                        flag_values=fv)
    # --workload=input (tok1d.cli.input_bench): the recipe's input pipeline beside the official.
    flags.DEFINE_integer("images", 256, "input: ImageNet-like JPEGs to write and read.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("image_folder", "", "input: read this folder of class subfolders of "
                        "images instead.", flag_values=fv)
    flags.DEFINE_integer("workers", 0, "input: worker processes (0: in this process, rates per "
                         "CPU core; -1: one per core but one, at most 16).",
                         lower_bound=-1, flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "input: runs of each pipeline (the least CPU time "
                         "counts).", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("official", True, "input: also run the official loader (torchvision).",
                      flag_values=fv)
    app.define_distributed_flags(fv)


# ---------------------------------------------------------------------------- measurement


def time_calls(call: Callable[[], Any], warmup: int, steps: int, profile: str = ""
               ) -> tuple[list[float], float]:
    """(seconds of each timed call, seconds of the first call incl. compilation); with
    `profile`, the timed calls run under `jax.profiler.trace(profile)`."""
    first = None
    for i in range(max(warmup, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    tracing = (jax.profiler.trace(profile, create_perfetto_trace=True) if profile
               else contextlib.nullcontext())
    with tracing:
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
    return times, first


def _sub_jaxprs(value):
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, jex_core.ClosedJaxpr):
            yield item.jaxpr
        elif isinstance(item, jex_core.Jaxpr):
            yield item


def _mul_elements(jaxpr) -> float:
    """Elements produced by the `mul`s of a jaxpr (its calls included, once)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "mul":
            total += math.prod(eqn.outvars[0].aval.shape)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += _mul_elements(sub)
    return total


def jaxpr_flops(jaxpr) -> float:
    """Matmul + convolution FLOPs (2 per multiply-add) of a jaxpr, loops counted `length` times
    (`scan`; a `while` body once, a `cond` by its most expensive branch). Elementwise work is
    not counted: these are the FLOPs MFU is quoted in. The depthwise convs' shifted-sum form
    (`layers.cnn.depthwise_shifts`, XLA:CPU's choice) counts as the convolution it computes:
    2 FLOPs per multiply of a tap (forward, and each gradient its derivatives compute)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            total += 2.0 * math.prod(out) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        elif eqn.params.get("name") == cnn.depthwise_shifts.__name__:
            total += 2.0 * _mul_elements(eqn.params["jaxpr"].jaxpr)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
        else:  # pjit, remat, custom_jvp / vjp, while, shard_map, ...: their inner jaxprs once
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += jaxpr_flops(sub)
    return total


def traced_flops(fn, *args) -> Optional[float]:
    """Global matmul FLOPs of one call of `fn(*args)` (see `jaxpr_flops`)."""
    try:
        return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr) or None
    except Exception:  # noqa: BLE001 - a primitive this walker does not know
        return None


def matmul_tflops(size: int = 0, repeats: int = 5) -> float:
    """The device's measured bf16 matmul rate in TFLOP/s (median of `repeats`)."""
    size = size or (1024 if jax.devices()[0].platform == "cpu" else 8192)
    x = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    times, _ = time_calls(lambda: mm(x, x), 2, repeats)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def peak_memory_gib() -> Optional[float]:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2 ** 30 if peak is not None else None


# ---------------------------------------------------------------------------- workloads


def _random_frozen(config) -> None:
    """Frozen helper networks without weight files get random weights (speed only)."""
    with config.unlocked():
        if not config.teacher.weights:
            config.teacher.allow_random_init = True
        if not config.perceptual.weights:
            config.perceptual.allow_random_init = True
        if not config.discriminator.weights:
            config.discriminator.allow_random_init = True


def _global(local: dict, sharding, batch: int, abstract: bool = False) -> dict:
    """The global batch of which `local` holds every row: placed on the mesh, or (`abstract`)
    its shapes with their sharding (nothing placed: compiling for devices this process cannot
    run on, e.g. benchmarks/gpu_aot.py)."""
    if abstract:
        return {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype,
                                        sharding=parallel.rows_sharding(sharding, v.ndim))
                for k, v in local.items()}
    start, stop = parallel.host_batch_slice(sharding, batch)
    return parallel.global_batch({k: v[start:stop] for k, v in local.items()}, sharding, batch)


def _tokenizer_and_params(config, abstract: bool = False):
    """The config's tokenizer and its random params (shapes only with `abstract`)."""
    model = tok_trainer.build_model(config)
    size = config.data.image_size
    init = functools.partial(model.init, jax.random.key(0),
                             jnp.zeros((1, size, size, 3), jnp.float32))
    params = jax.eval_shape(init) if abstract else jax.jit(init)()
    return model, nn.unbox(params)["params"]


def _replicated(tree, mesh, abstract: bool):
    """`tree` replicated on `mesh`: placed there, or as ShapeDtypeStructs carrying that sharding."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if abstract:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)
    return jax.device_put(tree, sharding)


@dataclasses.dataclass
class Workload:
    """One benchmark: `call()` runs a timed unit of work (after `prepare()`), `programs` are the
    jitted functions it runs with arguments to lower them with (concrete or abstract), and
    `context()` enters the mesh and logical-axis rules they need."""
    call: Callable[[], Any]
    programs: list
    context: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None
    memory_parts: Callable[[], dict] = dict  # backend-independent parts of the memory plan

    def flops(self) -> Optional[float]:
        """Traced matmul + conv FLOPs of one call (see `jaxpr_flops`)."""
        with self.context():
            counts = [traced_flops(fn, *args) for fn, args in self.programs]
        return None if None in counts else sum(counts)

    def compile(self) -> dict[str, Optional[float]]:
        """Compiles the programs without running anything: `lower_s` (tracing + lowering to
        StableHLO, Python-side), `compile_s` (XLA's passes and code generation, or loading
        from the persistent compilation cache) summed over the programs, the same in CPU
        seconds of this process (`lower_cpu_s`, `compile_cpu_s`: steadier than wall time on a
        shared machine), and
        `memory_plan_gib`, the per-device memory XLA plans for the largest of them: arguments
        + outputs - donated aliases + temporaries, from the compiled program's memory analysis
        (None where the backend gives none)."""
        wall, cpu = [0.0, 0.0], [0.0, 0.0]  # (lower, compile)
        totals = []
        with self.context():
            for fn, args in self.programs:
                t0, c0 = time.perf_counter(), time.process_time()
                lowered = fn.lower(*args)
                t1, c1 = time.perf_counter(), time.process_time()
                m = lowered.compile().memory_analysis()
                wall[0], wall[1] = wall[0] + t1 - t0, wall[1] + time.perf_counter() - t1
                cpu[0], cpu[1] = cpu[0] + c1 - c0, cpu[1] + time.process_time() - c1
                totals.append(None if m is None else
                              m.argument_size_in_bytes + m.output_size_in_bytes
                              - m.alias_size_in_bytes + m.temp_size_in_bytes)
        plan = None if None in totals else max(totals) / 2 ** 30
        return dict(lower_s=wall[0], compile_s=wall[1], lower_cpu_s=cpu[0], compile_cpu_s=cpu[1],
                    memory_plan_gib=plan)


def _context(mesh, rules):

    @contextlib.contextmanager
    def context():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            yield
    return context


def bench_train(config, batch: int, abstract: bool = False, log=print) -> Workload:
    """The trainer's jitted step on a synthetic batch (the state is created by `prepare`; with
    `abstract` only its shapes are used, for compiling); a tokenizer's is the step of its last
    phase (`config.phase_programs`: what most of a run trains with); a generator's with
    generator.token_source "images" encodes the images first (with generator.tokenizer)."""
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    context = _context(mesh, rules)
    rng = np.random.default_rng(0)
    with config.unlocked():
        config.batch_size = batch
    if config.trainer == "generator":
        model = gen_trainer.build_generator(config)
        frozen_tokenizer = None
        if gen_trainer.encodes_images(config) and not config.generator.tokenizer:
            log("generator.token_source='images' without generator.tokenizer: timing the "
                "step on codes (give --config.generator.tokenizer=DIR to include the encode)")
            with config.unlocked():
                config.generator.token_source = "dataset"
        elif gen_trainer.encodes_images(config):
            frozen_tokenizer = gen_trainer.load_frozen_tokenizer(config, mesh, rules)
            # The trainer's checks of the pair (the image size, the codes the generator takes)
            info = gen_trainer.tokenizer_info(frozen_tokenizer.module,
                                              frozen_tokenizer.encode_params,
                                              config.generator.prefix_tokens,
                                              config.data.image_size, model.num_classes)
            gen_trainer.check_tokens_match(model, info)
        abstract_state, shardings, init, step_fn = gen_trainer.build_training(
            config, model, mesh, rules, batch_sh, frozen_tokenizer)
        labels = rng.integers(0, model.num_classes, (batch,), dtype=np.int32)
        codes = rng.integers(0, model.vocab_size, (batch, model.num_tokens), dtype=np.int32)
        if frozen_tokenizer is None:
            local, extra = {"codes": codes, "label": labels}, ()
        else:
            size = config.data.image_size
            local = {"image": rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32),
                     "label": labels}
            extra = (frozen_tokenizer.encode_params,)
    else:
        _random_frozen(config)
        t = tok_trainer.build_training(config, mesh, rules, batch_sh)
        # the step of the last phase: what a long run trains with (after the warm-up, with D)
        abstract_state, shardings, init = t.abstract, t.shardings, t.init
        step_fn = t.steps.at(config.total_steps - 1)
        size = config.data.image_size
        local = {"image": rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)}
        extra = (t.frozen,)
    with context():
        data = _global(local, batch_sh, batch, abstract)
    shapes = ckpt_lib.abstract_with_shardings(abstract_state, shardings)
    state = {}

    def prepare():
        with context():
            state["s"] = init(jax.random.key(0))

    def call():
        with context():
            state["s"], scalars, _ = step_fn(state["s"], data, *extra)
        return scalars

    def memory_parts():
        with context():
            if config.trainer == "generator":  # the loss on codes (the encode keeps none)
                saved = _generator_saved_bytes(config, model, shapes, {
                    "codes": jax.ShapeDtypeStruct(codes.shape, jnp.int32),
                    "label": data["label"]})
            else:
                saved = _tokenizer_saved_bytes(config, t, shapes, data["image"])
        return dict(state_gib=_per_device_bytes(shapes) / 2 ** 30,
                    saved_activations_gib=saved / jax.device_count() / 2 ** 30)
    return Workload(call, [(step_fn, (shapes, data, *extra))], context, prepare, memory_parts)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def _residual_bytes(loss, params, *args) -> int:
    """Bytes of what autodiff keeps from `loss(params, *args) -> (value, aux)` for the backward
    pass (the VJP's residuals, from shapes only), over all devices. Backend-independent: XLA
    fuses some of it away and may rematerialise more when memory runs short, but this is what
    a training step holds at its peak besides the state; `model.remat` / `model.cnn_remat`
    shrink it."""

    def residuals(params, *args):
        return jax.vjp(lambda p: loss(p, *args), params, has_aux=True)[1]
    res = jax.eval_shape(residuals, params, *args)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(res))


def _microbatch(x, config):
    rows = x.shape[0] // config.optim.grad_accum_steps
    return jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype)


def _tokenizer_saved_bytes(config, t, shapes, images) -> int:
    """Saved activations of the tokenizer's generator loss for one microbatch, every term on
    (GAN and warm-up losses)."""
    g_loss = tokenizer_loss.make_loss_fn(t.model, config.losses, t.nets, t.gan)
    one = jnp.float32(1)
    gan_state = shapes.extras["gan"] if t.gan is not None else None

    def loss(params, images, frozen, gan_state, collections):
        return g_loss(params, images, frozen, gan_state, collections, one, one,
                      jax.random.key(0))
    return _residual_bytes(loss, shapes.params, _microbatch(images, config), t.frozen,
                           gan_state, gan_state.collections if gan_state is not None else None)


def _generator_saved_bytes(config, model, shapes, batch) -> int:
    """Saved activations of the generator's training loss for one microbatch."""
    loss_fn = tokens.make_loss_fn(model, config.generator)

    def loss(params, batch):
        return loss_fn(params, batch, jax.random.key(0), True)
    return _residual_bytes(loss, shapes.params,
                           {k: _microbatch(v, config) for k, v in batch.items()})


def bench_codec(config, batch: int, workload: str, abstract: bool = False) -> Workload:
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    context = _context(mesh, rules)
    model, params = _tokenizer_and_params(config, abstract)
    to_model, _ = images_lib.range_converters(model.pixel_range)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, to_model(x), method=model.encode))
    with context():
        images = _global({"image": rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)},
                         batch_sh, batch, abstract)["image"]
        params = _replicated(params, mesh, abstract)
        if workload == "encode":
            fn, args = encode, (params, images)
        else:
            codes = (jax.eval_shape(encode, params, images) if abstract
                     else encode(params, images))
            fn = jax.jit(lambda p, c: model.apply({"params": p}, c, method=model.decode_codes))
            args = (params, codes)

    def call():
        with context():
            return fn(*args)
    return Workload(call, [(fn, args)], context)


def bench_sample(config, batch: int, tokenizer_config, abstract: bool = False) -> Workload:
    """Sampling then decoding (two jitted programs, as `tok1d.cli.sample` runs them)."""
    if tokenizer_config is None:
        raise ValueError("--workload=sample needs --tokenizer_config (the tokenizer config "
                         "whose random-weight model decodes the samples).")
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    context = _context(mesh, rules)
    model = gen_trainer.build_generator(config)
    init = gen_trainer.init_generator(model, 1)
    params = nn.unbox(jax.eval_shape(init, jax.random.key(0)) if abstract
                      else init(jax.random.key(0)))
    tokenizer, tok_params = _tokenizer_and_params(tokenizer_config, abstract)
    labels = (np.arange(batch) % model.num_classes).astype(np.int32)
    with context():
        params = _replicated(params, mesh, abstract)
        tok_params = _replicated(tok_params, mesh, abstract)
        decoder = SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params,
                                batch_sh, config.sampling_precision)
        global_labels = _global({"label": labels}, batch_sh, batch, abstract)["label"]
        key = (_replicated(jax.eval_shape(lambda: jax.random.key(0)), mesh, True) if abstract
               else jax.random.key(0))
        codes = jax.eval_shape(decoder.sampler, params, global_labels, key)
    counter = {"i": 0}

    def call():
        counter["i"] += 1
        with context():
            return decoder(params, labels, jax.random.key(counter["i"]))[1]
    return Workload(call, [(decoder.sampler, (params, global_labels, key)),
                           (decoder.decode, (tok_params, codes))], context)


def run(config, workload: str, batch_size: int = 0, steps: int = 10, warmup: int = 2,
        tokenizer_config=None, peak_tflops: float = 0.0, compile_only: bool = False,
        profile: str = "", log=print) -> dict[str, Any]:
    """Measures `workload` of `config`; returns (and logs) the result row. `compile_only`:
    nothing runs (the state and params are shapes only); the row gives the FLOPs and the
    memory XLA plans per device (`memory_plan_gib`), e.g. to see whether a batch fits."""
    if workload not in WORKLOADS:
        raise ValueError(f"Unknown workload {workload!r}; expected one of {WORKLOADS}.")
    is_generator = config.trainer == "generator"
    if workload in ("encode", "decode") and is_generator:
        raise ValueError(f"--workload={workload} needs a tokenizer config; "
                         f"{config.model.name!r} is a generator.")
    if workload == "sample" and not is_generator:
        raise ValueError("--workload=sample needs a generator config (and --tokenizer_config).")
    if tokenizer_config is not None and tokenizer_config.trainer == "generator":
        raise ValueError(f"--tokenizer_config names a generator ({tokenizer_config.model.name!r})"
                         "; give the tokenizer config whose model decodes the samples.")
    if peak_tflops < 0:
        raise ValueError(f"--peak_tflops={peak_tflops:g}: give the device's bf16 peak in "
                         "TFLOP/s, or 0 to measure it.")
    batch = batch_size or config.batch_size
    if batch != config.batch_size:  # validate the batch that runs (divisible over the mesh)
        config = copy.deepcopy(config)
        with config.unlocked():
            config.batch_size = batch
    config_lib.validate(config)
    log(f"{workload}: {config.model.name} at batch {batch} on {jax.device_count()} device(s): "
        + ("compiling (nothing runs)..." if compile_only else
           f"compiling, {warmup} warm-up call(s), then {steps} timed..."))
    if workload == "train":
        work = bench_train(config, batch, compile_only, log)
    elif workload == "sample":
        work = bench_sample(config, batch, tokenizer_config, compile_only)
    else:
        work = bench_codec(config, batch, workload, compile_only)
    device = jax.devices()[0]
    row = dict(workload=workload, model=config.model.name, batch=batch,
               devices=f"{jax.device_count()} x {device.device_kind}", step_ms=None,
               images_per_s=None, first_call_s=None, peak_memory_gib=None,
               memory_plan_gib=None, tflop_per_step=None, mfu=None, device_bf16_tflops=None,
               jax=jax.__version__, steps=0 if compile_only else steps,
               compilation_cache=jax.config.jax_compilation_cache_dir,
               xla_flags=os.environ.get("XLA_FLAGS", ""))
    if compile_only:
        row.update(work.compile())
        row["first_call_s"] = row["lower_s"] + row["compile_s"]  # compilation only
        row["startup_s"] = summary.process_age()  # command start -> programs ready to run
        row["startup_cpu_s"] = time.process_time()  # the same in CPU seconds (all threads)
    flops = work.flops()
    row["tflop_per_step"] = None if flops is None else flops / 1e12
    if compile_only:
        row.update(work.memory_parts())
    else:
        work.prepare()
        times, first = time_calls(work.call, warmup, steps, profile)
        step = statistics.median(times)
        memory = peak_memory_gib()  # before the peak-FLOPs matmul adds its 384 MiB
        if not peak_tflops:
            log("measuring the device's bf16 matmul peak for MFU (--peak_tflops=X skips it)...")
        peak = peak_tflops or matmul_tflops()
        row.update(step_ms=1e3 * step, images_per_s=batch / step, first_call_s=first,
                   peak_memory_gib=memory, device_bf16_tflops=peak,
                   mfu=None if flops is None else flops / step / (peak * 1e12
                                                                 * jax.device_count()))
    log(format_row(row))
    if (row["mfu"] or 0) > 1:
        log(f"note: MFU over 100%: --peak_tflops={peak_tflops:g} is below what this device "
            "ran; leave it out to measure the peak.")
    if profile and not compile_only:
        found = trace_summary.summarize(profile, steps)
        if found is None:
            log(f"profile: no device op events found in a trace under {profile}")
        else:
            row["profile"] = found
            log(trace_summary.format_summary(found))
    return row


def format_row(row: dict[str, Any]) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)
    header = ("| workload | model | batch | devices | step ms | images/s | first call s | "
              "peak GiB | planned GiB | TFLOP/step | MFU |")
    line = (f"| {row['workload']} | {row['model']} | {row['batch']} | {row['devices']} | "
            f"{fmt(row['step_ms'], '.1f')} | {fmt(row['images_per_s'], '.1f')} | "
            f"{fmt(row['first_call_s'], '.1f')} | {fmt(row['peak_memory_gib'], '.1f')} | "
            f"{fmt(row['memory_plan_gib'], '.2f')} | {fmt(row['tflop_per_step'], '.3f')} | "
            f"{fmt(row['mfu'], '.1%')} |")
    table = header + "\n|---|---|---|---|---|---|---|---|---|---|---|\n" + line
    parts = [f"{name[:-4].replace('_', ' ')} {row[name]:.2f} GiB" for name in
             ("state_gib", "saved_activations_gib") if row.get(name) is not None]
    if parts:
        table += "\nper device: " + ", ".join(parts)
    if row.get("compile_s") is not None:
        table += (f"\ncompile: trace + lower {row['lower_s']:.1f} s, XLA {row['compile_s']:.1f} s"
                  f"; command start to compiled {fmt(row.get('startup_s'), '.1f')} s, "
                  f"{fmt(row.get('startup_cpu_s'), '.1f')} CPU s "
                  f"(compilation cache: {row.get('compilation_cache') or 'off'})")
    return table


def check_out_file(path: str) -> None:
    """A UserError, before anything runs, for an `--out` file the result cannot be appended to:
    a remote path, a directory, or a file in a missing or unwritable folder. An empty `path`
    passes."""
    if not path:
        return
    errors.check_local(path, "--out")
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise errors.UserError(f"--out={path} is a directory; give the file to append the JSON "
                               "lines to.")
    if not os.path.isdir(folder):
        raise errors.UserError(f"--out={path}: the folder {folder} does not exist.")
    existed = os.path.exists(full)
    try:  # (os.access passes read-only files for root, and knows nothing of /proc)
        with open(full, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise errors.UserError(f"--out={path} cannot be written: {errors.brief(e)}") from None
    if not existed:
        os.remove(full)


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    check_out_file(fv.out)
    if fv.workload == "input":
        unused = [f"--{name}" for name, on in (("compile_only", fv.compile_only),
                                                ("profile", fv.profile),
                                                ("tokenizer_config", fv.tokenizer_config)) if on]
        if unused:
            raise errors.UserError(f"{', '.join(unused)}: not used by --workload=input (it "
                                   "times the input pipelines only).")
        rows = input_bench.run(fv.config, images=fv.images, batch_size=fv.batch_size or 32,
                               steps=fv.steps, repeats=fv.repeats, workers=fv.workers,
                               image_folder=fv.image_folder, official=fv.official,
                               warmup=max(fv.warmup, 1))
        if fv.out:
            with open(fv.out, "a", encoding="utf-8") as f:
                command = " ".join(app.command_line())
                f.writelines(json.dumps(dict(row, command=command)) + "\n" for row in rows)
        return
    unused = [f"--{name}" for name, on in (
        ("profile (nothing runs with --compile_only)", fv.profile and fv.compile_only),
        ("tokenizer_config (used by --workload=sample)",
         fv.tokenizer_config and fv.workload != "sample")) if on]
    if unused:
        raise errors.UserError(f"not used here: {'; '.join(unused)}.")
    errors.check_output_dir(fv.profile, "--profile")  # (jax.profiler fails after the run)
    app.setup_process(fv)
    tok_cfg = app.load_config_file(fv.tokenizer_config) if fv.tokenizer_config else None
    row = run(fv.config, fv.workload, fv.batch_size, fv.steps, fv.warmup, tok_cfg,
              fv.peak_tflops, fv.compile_only, fv.profile)
    if fv.out:
        with open(fv.out, "a", encoding="utf-8") as f:
            command = " ".join(app.command_line())
            f.write(json.dumps(dict(row, command=command)) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    app.exit_process(main())
