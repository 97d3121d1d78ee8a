"""Samples of any generator decoded to images by any tokenizer (through the generator and
tokenizer interfaces of `tok1d.models.interfaces`), batch by batch over the mesh."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d import errors, images, parallel, summary
from tok1d.generation import common
from tok1d.models.tokenizers import nested

# sampling_precision: the compute dtype of the sampler and of the tokenizer's decode. "" keeps
# each model's own (the generator's is its run's `precision`); "float32" is the official gFID
# protocols' (TiTok's / RAR's sample_imagenet_*.py and GigaTok's PRECISION="none" run the
# generator and the tokenizer in fp32 with TF32 matmuls), its matmuls and convolutions at
# `FLOAT32_MATMULS` ("tensorfloat32": TF32 on NVIDIA GPUs, 3-pass bf16 on TPUs, whose default
# would be 1-pass bf16); "bfloat16" is the official speed baselines'.
SAMPLING_PRECISIONS = ("", "float32", "bfloat16")
FLOAT32_MATMULS = "tensorfloat32"


def check_pair(model: nn.Module, tokenizer: nn.Module, log=None) -> None:
    """Raises UserError when `tokenizer` cannot decode what generator `model` samples: a
    continuous tokenizer, another number of codes than the generator predicts, another number
    of tokens per image (fewer is a prefix, which a 1D tokenizer decodes: logged as a warning
    unless it was trained with nested dropout; a fully convolutional tokenizer decodes any
    square grid). A generator that predicts more codes than the tokenizer has is refused too:
    sampling draws every code with some probability, and a code beyond the codebook decodes
    to NaN pixels (black images, then a failed FID). Every official pair predicts exactly the
    tokenizer's codebook (MaskGIT's [MASK] id is an input id beyond `vocab_size`, not a
    predicted code; LlamaGen's and RAR's `vocab_size` is the VQ's `codebook_size`). A warning
    goes to `log` as a "Warning: ..." line (None: this module's logger)."""
    problems = []
    if tokenizer.num_codes is None:
        problems.append("the tokenizer is continuous (it has no codebook)")
    elif tokenizer.num_codes > model.vocab_size:
        problems.append(f"the tokenizer has {tokenizer.num_codes} codes but the generator "
                        f"predicts {model.vocab_size}")
    elif model.vocab_size > tokenizer.num_codes:
        problems.append(f"the generator predicts {model.vocab_size} codes but the tokenizer "
                        f"has {tokenizer.num_codes} (a sampled code beyond them decodes to "
                        "NaN pixels): give the tokenizer the generator was trained on")
    n, m = model.num_tokens, tokenizer.num_tokens
    if tokenizer.input_size is None:  # fully convolutional: any square grid, at any size
        if math.isqrt(n) ** 2 != n:
            problems.append(f"the generator samples {n} tokens per image, not a square grid "
                            "for the tokenizer")
    elif n > m or (n < m and not tokenizer.decodes_prefixes):
        problems.append(f"the generator samples {n} tokens per image but the tokenizer "
                        f"decodes {m}")
    if problems:
        raise errors.UserError("The generator and the tokenizer do not match: "
                               + "; ".join(problems) + ".")
    warning = (nested.unordered_warning(tokenizer, f"The generator samples {n} of the "
                                        f"tokenizer's {m} tokens per image")
               if tokenizer.input_size is not None and n < m else None)
    if warning:
        if log is None:
            logging.getLogger(__name__).warning(warning)
        else:
            log("Warning: " + warning[0].lower() + warning[1:])


def at_precision(precision: str, *modules: nn.Module) -> tuple[nn.Module, ...]:
    """`modules` computing in `precision` (SAMPLING_PRECISIONS; "" leaves them as they are);
    their params keep their dtype. Under float32, a module on cuDNN's fused attention (bf16 /
    fp16 only) attends with XLA's, logged. A bad value is a ValueError."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"sampling_precision={precision!r} is not one of "
                         f"{SAMPLING_PRECISIONS}.")
    if not precision:
        return modules
    out = []
    for m in modules:
        changes = dict(dtype=jnp.dtype(precision))
        if precision == "float32" and getattr(m, "attention_impl", None) == "cudnn":
            changes["attention_impl"] = "xla"
            logging.getLogger(__name__).warning(
                "Computing in float32, the %s attends with XLA's attention (cuDNN's fused "
                "attention computes in bf16 / fp16 only).", type(m).__name__)
        out.append(m.clone(**changes))
    return tuple(out)


def matmuls_at(precision: str) -> contextlib.AbstractContextManager:
    """The matmul precision a program of `precision` traces under (`FLOAT32_MATMULS` for
    float32, else the backend's default)."""
    if precision == "float32":
        return jax.default_matmul_precision(FLOAT32_MATMULS)
    return contextlib.nullcontext()


class SampleDecoder:
    """Samples codes with the configured sampler and decodes them to [0, 1] images with the
    tokenizer; jitted once, sharded over the batch axis of the mesh. `sampling`: the sampler's
    options (config.sampling); `precision`: what both the sampler and the decode compute in
    (SAMPLING_PRECISIONS; config.sampling_precision); `log`: where `check_pair`'s warnings go
    (None: the logger)."""

    def __init__(self, model: nn.Module, sampling: dict[str, Any], tokenizer, tok_params,
                 sharding, precision: str = "", log=None):
        check_pair(model, tokenizer, log)
        model, tokenizer = at_precision(precision, model, tokenizer)
        self.sharding = sharding
        sampler = common.make_sampler(model, **sampling)

        def sample(params, labels, rng):
            with matmuls_at(precision):
                return sampler(params, labels, rng)
        self.sampler = jax.jit(sample) if precision == "float32" else sampler
        self.tokenizer, self.tok_params = tokenizer, tok_params
        _, to_unit = images.range_converters(tokenizer.pixel_range)

        def decode(tok_params, codes):
            with matmuls_at(precision):
                pixels = tokenizer.apply({"params": tok_params}, codes,
                                         method=tokenizer.decode_codes)
            return jnp.clip(to_unit(pixels), 0.0, 1.0)
        self.decode = jax.jit(decode)

    @contextlib.contextmanager
    def decoding_with(self, tok_params):
        """Inside, decodes with `tok_params` (e.g. a copy put on the devices for an evaluation,
        where the decoder's params are otherwise kept in host memory)."""
        saved, self.tok_params = self.tok_params, tok_params
        try:
            yield self
        finally:
            self.tok_params = saved

    def __call__(self, params, labels: np.ndarray, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        global_labels = parallel.global_batch({"label": labels[self._host_rows(len(labels))]},
                                              self.sharding, len(labels))["label"]
        codes = self.sampler(params, global_labels, rng)
        return codes, self.decode(self.tok_params, codes)

    def batches(self, params, labels: np.ndarray, batch_size: int, seed: int, log=None
                ) -> Iterator[tuple[jax.Array, np.ndarray]]:
        """Samples images for every label, `batch_size` at a time (the last batch repeats
        labels); yields (global [0, 1] pixels of the whole batch, its valid-row mask) and
        prints progress (images/s, ETA) through `log`."""
        t0 = time.time()
        for b, start in enumerate(range(0, len(labels), batch_size)):
            batch = labels[start:start + batch_size]
            padded = np.resize(batch, batch_size)
            _, pixels = self(params, padded, jax.random.fold_in(jax.random.key(seed), b))
            yield pixels, np.arange(batch_size) < len(batch)
            done = start + len(batch)
            if log is not None:
                rate = done / max(time.time() - t0, 1e-9)
                log(f"{done}/{len(labels)} images, {summary.format_rate(rate)} img/s, "
                    f"ETA {(len(labels) - done) / max(rate, 1e-9):.0f} s")

    def _host_rows(self, n: int) -> slice:
        start, stop = parallel.host_batch_slice(self.sharding, n)
        return slice(start, stop)
