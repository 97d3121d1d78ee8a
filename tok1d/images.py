"""Small image helpers: dtype conversion, grids and PNG output.

All functions accept numpy arrays (or anything `np.asarray` understands,
including JAX arrays) laid out as HxWxC, or NHWC for batches.  Float images
are expected in [0, 1]; uint8 images in [0, 255].
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = ["to_uint8", "make_grid", "interleave_pairs", "save_png", "encode_png", "read_rgb"]

# PIL modes of one channel of more than 8 bits (16-bit PNGs, 32-bit integer or float TIFFs).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_uint8(x) -> np.ndarray:
    """Converts an image (or batch) to uint8.

    uint8 input is returned unchanged.  Other integer dtypes are clipped to
    [0, 255].  Anything else (float16/32/64, bfloat16, bool) is treated as a
    float image in [0, 1]: NaNs become 0, values are clipped, scaled by 255
    and rounded to the nearest integer.
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        return np.clip(x, 0, 255).astype(np.uint8)
    x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_hwc(image) -> np.ndarray:
    """Returns `image` as a uint8 HxWxC array (HxW gets C=1)."""
    image = to_uint8(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC image with C in (1, 3, 4), got shape {image.shape}")
    return image


def make_grid(rows: Sequence[np.ndarray], *, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles batches into one image, one batch per grid row.

    Args:
      rows: batches of shape NHWC (or NHW), uint8 or float in [0, 1].  All
        rows share H, W and C but may differ in N; short rows are filled
        with blank tiles of `pad_value`.
      pad: pixels between tiles and around the border.
      pad_value: fill value of the padding and of blank tiles.

    Returns:
      A uint8 array of shape
      (R * (H + pad) + pad, N_max * (W + pad) + pad, C).
    """
    batches = []
    for row in rows:
        row = to_uint8(row)
        if row.ndim == 3:
            row = row[..., None]
        if row.ndim != 4:
            raise ValueError(f"each row must be NHWC or NHW, got shape {row.shape}")
        batches.append(row)
    if not batches:
        raise ValueError("make_grid needs at least one row")
    tile_shape = batches[0].shape[1:]
    for row in batches:
        if row.shape[1:] != tile_shape:
            raise ValueError(f"rows differ in HWC: {row.shape[1:]} vs {tile_shape}")
    height, width, channels = tile_shape
    ncols = max(row.shape[0] for row in batches)
    if ncols == 0:
        raise ValueError("make_grid needs at least one image")

    grid = np.full(
        (len(batches) * (height + pad) + pad, ncols * (width + pad) + pad, channels),
        pad_value,
        dtype=np.uint8,
    )
    for r, row in enumerate(batches):
        top = pad + r * (height + pad)
        for c, tile in enumerate(row):
            left = pad + c * (width + pad)
            grid[top : top + height, left : left + width] = tile
    return grid


def interleave_pairs(a, b, per_row: int = 8) -> list[np.ndarray]:
    """Rows alternating chunks of `a` and `b` for side-by-side comparison.

    Returns `[a[0:k], b[0:k], a[k:2k], b[k:2k], ...]` with `k = per_row`, so
    that in `make_grid(interleave_pairs(x, recon))` every original sits
    directly above its reconstruction.
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same batch size, got {len(a)} and {len(b)}")
    if per_row <= 0:
        raise ValueError(f"per_row must be positive, got {per_row}")
    rows = []
    for i in range(0, len(a), per_row):
        rows.append(a[i : i + per_row])
        rows.append(b[i : i + per_row])
    return rows


def _to_pil(image) -> Image.Image:
    """Converts an HxW / HxWxC image to a PIL image (L, RGB or RGBA)."""
    image = _as_hwc(image)
    if image.shape[-1] == 1:
        image = image[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(image))  # infers L / RGB / RGBA


def encode_png(image) -> bytes:
    """Encodes an HxW / HxWxC image (uint8 or float in [0, 1]) as PNG bytes."""
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | os.PathLike, image) -> None:
    """Writes an HxW / HxWxC image to `path` as PNG, creating parent dirs."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode_png(image))


UNIT_RANGE = (0.0, 1.0)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A photo file as uint8 RGB (H, W, 3), upright as a viewer shows it: turned by its EXIF
    orientation, palette, CMYK, greyscale and alpha images converted to RGB (alpha dropped),
    one channel of 16 or 32 bits scaled to 8 by its own maximum. (`np.asarray(Image.open(p))`
    gave palette indices as grey levels, CMYK as RGBA and rotated phone photos sideways.)"""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in _WIDE_MODES:
            x = np.asarray(image, np.float64)
            x = np.clip(x * (255.0 / max(float(x.max()), 1.0)), 0.0, 255.0)
            image = Image.fromarray(np.round(x).astype(np.uint8))
        return np.asarray(image.convert("RGB"))


def range_converters(pixel_range: tuple[float, float] = UNIT_RANGE):
    """(to_range, to_unit): images in [0, 1] <-> images in `pixel_range` (GigaTok works in
    [-1, 1]); the identity for [0, 1]. Works on NumPy and JAX arrays."""
    lo, hi = pixel_range
    if (lo, hi) == UNIT_RANGE:
        return (lambda x: x), (lambda y: y)
    return (lambda x: x * (hi - lo) + lo), (lambda y: (y - lo) / (hi - lo))
