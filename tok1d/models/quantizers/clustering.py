"""Clustering VQ: `VectorQuantizer` whose rarely used codes are re-anchored onto the batch's
features during training (TiTok's `clustering_vq`, used by TA-TiTok and MaskGen; after
CVQ-VAE). Each training forward:

    p      <- decay * p + (1 - decay) * (fraction of the batch's tokens assigned to each code)
    f_k     = the (un-normalised) input vector nearest to code k (same distance as the lookup)
    a_k     = exp(-p_k * K * 10 / (1 - decay) - 1e-3)           per code, in (0, 1)
    e_k    <- (1 - a_k) * e_k + a_k * f_k

so a code used by a fair share of the batch keeps its vector (a ~ 0) and a dead one jumps onto
the nearest feature (a ~ 1). Upstream writes the codebook in place after the forward (its
losses use the old codebook; the optimizer then steps from the re-anchored one). Here the
forward with `train=True` and the collections "quantizer_state" (the usage EMA `embed_prob`)
and "param_updates" mutable stores the new usage and the re-anchored `embedding` under the
param's own path; `merge_param_updates` writes those into the params (the trainer does it
before the optimizer step, as upstream). Without those collections mutable nothing changes.
The batch is the global batch (upstream gathers it over all devices). With gradient
accumulation each microbatch's forward re-anchors in turn and the next one sees its codes and
usage, as upstream's in-place writes under `accelerator.accumulate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from tok1d.models.quantizers.vq import VectorQuantizer

STATE = "quantizer_state"
UPDATES = "param_updates"


class ClusteringVectorQuantizer(VectorQuantizer):
    """See the module docstring. `decay` is upstream's 0.99."""

    decay: float = 0.99

    def setup(self):
        super().setup()
        # Absent (params only, e.g. evaluation) the usage EMA is not needed: no variable.
        self.embed_prob = (self.variable(STATE, "embed_prob", jnp.zeros, (self.codebook_size,),
                                         jnp.float32)
                           if self.has_variable(STATE, "embed_prob")
                           or self.is_mutable_collection(STATE) else None)

    def __call__(self, z: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        prob = self.embed_prob
        z_st, aux, dist = self.quantize(z)
        if train and self.is_mutable_collection(STATE) and not self.is_initializing():
            flat = jax.lax.stop_gradient(z.astype(jnp.float32).reshape(-1, self.code_dim))
            dist = jax.lax.stop_gradient(dist)
            counts = jnp.zeros((self.codebook_size,), jnp.float32).at[
                aux["codes"].reshape(-1)].add(1.0)
            new_prob = self.decay * prob.value + (1.0 - self.decay) * counts / flat.shape[0]
            nearest = jnp.take(flat, jnp.argmin(dist, axis=0), axis=0)
            a = jnp.exp(-(new_prob * self.codebook_size * 10.0) / (1.0 - self.decay) - 1e-3)
            e = self.embedding.astype(jnp.float32)
            anchored = e * (1.0 - a[:, None]) + nearest * a[:, None]
            prob.value = new_prob
            if self.is_mutable_collection(UPDATES):
                self.put_variable(UPDATES, "embedding", anchored.astype(self.param_dtype))
        return z_st, aux


def codebooks_of(params, state):
    """The codebooks (`embedding` params) of the clustering quantizers whose usage EMAs `state`
    (the collection "quantizer_state") holds: a tree mirroring part of `params`, the shape of
    their "param_updates"."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        key[:-1] + ("embedding",): flat[key[:-1] + ("embedding",)]
        for key in traverse_util.flatten_dict(state)})


def merge_param_updates(params, updates):
    """`params` with every leaf of `updates` (a tree mirroring part of `params`, the collection
    "param_updates") written over it."""
    if not updates:
        return params
    flat = traverse_util.flatten_dict(params)
    for key, value in traverse_util.flatten_dict(updates).items():
        if key not in flat:
            raise KeyError(f"param update {'/'.join(key)} names no parameter")
        flat[key] = value.astype(flat[key].dtype)
    return traverse_util.unflatten_dict(flat)
