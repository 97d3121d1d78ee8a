"""Classifier-free guidance scale schedules shared by the samplers."""

from __future__ import annotations

import math

import numpy as np


def power_cosine(num_steps: int, guidance_scale: float, guidance_pow: float) -> np.ndarray:
    """The power-cosine guidance of bytedance/1d-tokenizer (MaskGIT's `generate` with
    `guidance_decay="power-cosine"`, RAR's `generate`; after MDT), step i = 0..T-1:
    1 + (g - 1)·(1 - cos(pi·(i/T)^pow))/2, computed in float32 as torch does (the power and the
    cosine on float32 tensors): 1 at step 0 for pow > 0, g throughout for pow = 0 (0^0 = 1)."""
    f32 = np.float32
    x = (np.arange(num_steps) / num_steps).astype(f32) ** f32(guidance_pow)
    step = (f32(1) - np.cos(x * f32(math.pi))) * f32(1) / f32(2)
    return (f32(guidance_scale - 1) * step + f32(1)).astype(np.float32)
