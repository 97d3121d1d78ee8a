"""A LeNet-style classifier of small grey images: the demo's feature network.

The demo (tok1d.cli.demo) trains it on the real training digits in seconds
(tok1d.evaluation.digit_features) and feeds its penultimate features to the evaluation code that
otherwise runs on the FID Inception (Frechet distance, precision / recall, intra-class diversity)
- "FID-digits", a demo metric that is NOT comparable with Inception FID.

    x (N, H, W, 3) in [0, 1] -> grey (mean of the channels), resized to `input_size`
      -> conv 5x5 c1, ReLU, 2x2 max pool -> conv 5x5 c2, ReLU, 2x2 max pool
      -> flatten -> dense `feature_dim`, ReLU  ("features": what the metrics see)
      -> dense `num_classes`                   ("logits")

It returns {"features", "logits"}, the outputs the evaluator reads from a feature network (the
Inception's are {"pool3", "logits"}).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class DigitFeatureNet(nn.Module):
    """LeNet-style CNN: images in [0, 1] -> {"features": (N, feature_dim), "logits": (N, C)}."""

    num_classes: int = 10
    feature_dim: int = 64
    conv_channels: tuple[int, int] = (16, 32)
    input_size: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = jnp.asarray(x, self.dtype).mean(-1, keepdims=True)
        if x.shape[1:3] != (self.input_size, self.input_size):
            x = jax.image.resize(x, (x.shape[0], self.input_size, self.input_size, 1), "linear")
        for i, channels in enumerate(self.conv_channels):
            x = nn.Conv(channels, (5, 5), padding="SAME", dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(self.feature_dim, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name="fc")(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="head")(features)
        return {"features": features, "logits": logits}
