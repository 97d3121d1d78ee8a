"""VGG16 convolutional trunk (torchvision `vgg16().features`) returning the five LPIPS taps.

The trunk is 13 3x3 convolutions (padding 1, with bias) each followed by ReLU, in five blocks of
2, 2, 3, 3, 3 convolutions; blocks 1-4 end in a 2x2 / stride-2 max pool (floor, i.e. "VALID").
`VGG16Features` returns the activations after the last ReLU of every block (relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3) -- what LPIPS compares. The pool after block 5 and the classifier are
not part of it.

Parameters are named `conv{block}_{i}` (Caffe / paper naming); `TORCHVISION_INDEX` maps each
name to its index in torchvision's `features` Sequential (`features.{index}.weight`), which the
converter in `tok1d.weights.convert.perceptual` uses.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.transformer import logical

Dtype = Any

# (name, output channels) per block.
VGG16_BLOCKS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("conv1_1", 64), ("conv1_2", 64)),
    (("conv2_1", 128), ("conv2_2", 128)),
    (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
    (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
    (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = tuple(block[-1][1] for block in VGG16_BLOCKS)  # (64, 128, 256, 512, 512)


def _torchvision_indices() -> dict[str, int]:
    # In `features` every conv is followed by its ReLU (2 entries per conv) and every block
    # by a MaxPool (1 entry; the trunk here stops before the last one).
    index, out = 0, {}
    for block in VGG16_BLOCKS:
        for name, _ in block:
            out[name] = index
            index += 2
        index += 1
    return out


TORCHVISION_INDEX: dict[str, int] = _torchvision_indices()  # conv1_1 -> 0, ..., conv5_3 -> 28

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), zero bias.
_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class VGG16Features(nn.Module):
    """NHWC images (already normalised as the caller's network expects) -> the 5 ReLU taps.
    `widths`: the output channels of each block's convolutions (VGG16's `TAP_CHANNELS`; other
    widths only for random stand-ins in tests and smoke runs)."""

    widths: Sequence[int] = TAP_CHANNELS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = x.astype(self.dtype)
        taps = []
        if len(self.widths) != len(VGG16_BLOCKS):
            raise ValueError(f"VGG16 widths {tuple(self.widths)}: expected one per block "
                             f"({len(VGG16_BLOCKS)})")
        for b, (block, width) in enumerate(zip(VGG16_BLOCKS, self.widths)):
            if b:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for name, _ in block:
                x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            kernel_init=logical(_kernel_init,
                                                ("conv_h", "conv_w", "conv_in", "conv_out")),
                            bias_init=logical(nn.initializers.zeros, ("conv_out",)),
                            name=name)(x)
                x = nn.relu(x)
            taps.append(x)
        return tuple(taps)
