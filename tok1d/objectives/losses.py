"""Tokenizer losses: each term is a function; a weights table (`config.losses`) composes them.

Reconstruction terms work on images in [0, 1]; `proxy_code_ce` is TiTok stage 1's objective;
model-provided terms (quantizer, entropy, kl) come from the model's aux outputs; the perceptual
networks live in `tok1d.objectives.perceptual` and the GAN losses in `tok1d.objectives.gan`. A term whose weight is 0
is never computed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from tok1d.models.quantizers import l2_normalize  # F.normalize: x / max(|x|, 1e-12)


def l2_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(recon.astype(jnp.float32) - target.astype(jnp.float32)))


def l1_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(recon.astype(jnp.float32) - target.astype(jnp.float32)))


def proxy_code_ce(logits: jax.Array, codes: jax.Array) -> jax.Array:
    """Mean cross-entropy of (..., K) logits against integer codes (...): TiTok stage 1, where
    the decoder predicts the frozen MaskGIT-VQGAN's code at every grid position."""
    if logits.shape[:-1] != codes.shape:
        raise ValueError(f"proxy-code logits {logits.shape} do not match the teacher's code grid "
                         f"{codes.shape}: the teacher's downsampling factor must equal the "
                         "TiTok patch size.")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, codes[..., None].astype(jnp.int32), axis=-1))


def semantic_cosine(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """GigaTok / REPA alignment: mean over tokens and images of -cos(student, sg(teacher)).
    Both are (B, N, D) with the same N tokens in the same (raster) order."""
    if student.shape != teacher.shape:
        raise ValueError(f"semantic features {student.shape} do not match the teacher's "
                         f"{teacher.shape}: the tokenizer's decoder grid must equal the teacher's "
                         "patch grid and model.out_inner_dim its width.")
    s = l2_normalize(student.astype(jnp.float32))
    t = l2_normalize(jax.lax.stop_gradient(teacher.astype(jnp.float32)))
    return -jnp.mean(jnp.sum(s * t, -1))


def weighted_sum(weights: Mapping[str, float], terms: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.asarray(sum(weights[name] * value for name, value in terms.items()), jnp.float32)


GATE_IMPLS = ("cond", "select")


def gated(on: jax.Array | bool, on_fn: Callable[[], Any], off_fn: Callable[[], Any],
          impl: str = "auto") -> Any:
    """`on_fn()` where the scalar predicate `on` holds, else `off_fn()` (the same tree of shapes
    and dtypes): a term that is computed only in some steps (GigaTok's warm-up shortcut, the
    discriminator's overlap-step call). A Python bool `on` (a step compiled for one phase,
    `tok1d.train.programs.PhasedStep`) picks the side while tracing: the other is not traced
    and not in the program. Each side is traced once.

    `impl` "cond" is `lax.cond`: only the taken branch runs, so a step saves the term's compute
    when it is off. "select" runs both and picks with `jnp.where`; "auto" takes it on the CPU
    backend, where XLA leaves the gradient convolutions of a differentiated `lax.cond` branch in
    their non-canonical form (dim_labels f01b_i01o->01bf) and runs them on its slow generic path:
    a 6-conv net's gradient through a cond took 1.9 s against 0.06 s outside (2 cores), a tiny
    GigaTok warm-up step 2.4 s against 0.3 s. Both give the same values and gradients; an off
    branch gets exactly zero gradient unless its own values are non-finite (0 x inf)."""
    static = static_flag(on)
    if static is not None:
        return on_fn() if static else off_fn()
    if impl == "auto":
        impl = "select" if jax.default_backend() == "cpu" else "cond"
    if impl not in GATE_IMPLS:
        raise ValueError(f"gated impl {impl!r}: expected 'auto' or one of {GATE_IMPLS}")
    if impl == "cond":
        return jax.lax.cond(on, on_fn, off_fn)
    return jax.tree.map(lambda a, b: jnp.where(on, a, b), on_fn(), off_fn())


# Terms computed from (reconstruction, target); model-provided terms (e.g. "quantizer") come
# from the model's own losses (`TokenizerAux.losses`, by term name).
RECONSTRUCTION_TERMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "l2": l2_loss,
    "l1": l1_loss,
}


def combine(weights: Mapping[str, float], recon: jax.Array, target: jax.Array,
            model_losses: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the enabled terms. Returns (total, {term: unweighted value})."""
    terms: dict[str, jax.Array] = {}
    for name, weight in weights.items():
        if not weight:
            continue
        if name in RECONSTRUCTION_TERMS:
            terms[name] = RECONSTRUCTION_TERMS[name](recon, target)
        elif name in model_losses:
            terms[name] = model_losses[name]
        else:
            raise ValueError(f"Loss term {name!r} is neither a reconstruction term "
                             f"{sorted(RECONSTRUCTION_TERMS)} nor provided by the model "
                             f"({sorted(model_losses)}).")
    total = sum(weights[name] * value for name, value in terms.items())
    return jnp.asarray(total, jnp.float32), terms


def static_flag(flag: Any) -> bool | None:
    """A phase flag's value while tracing: True / False for a Python number or bool (a step
    compiled for one phase: a term it switches off is left out of the program, gradient paths
    included), None for a traced 0/1 float (decided at run time)."""
    return bool(flag) if isinstance(flag, (bool, int, float)) else None
