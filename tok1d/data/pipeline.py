"""grain input pipelines: augmentation, per-host slicing of global batches, eval padding.

Determinism contract: the global batch at step k (and each example's augmentation) depends
only on the seed, the source and the global batch size, not on how many hosts read it. The
global stream is shuffled and repeated once; host h loads only rows [start, stop) of each global
batch (its devices' share, see `tok1d.parallel.host_batch_slice`), and every example's random
crop/flip is seeded by its position in the global stream. So a 2-host run sees exactly the
batches of a 1-host run, and a resumed run (its batches start at its step: `start_batch`) sees
exactly the batches it would have seen, on any number of hosts and workers.

Images leave the host as uint8 crops (4x fewer bytes to batch, pass between processes and copy
to the device than float32); `tok1d.data.feeding.Feeder` scales them to [0, 1] on the device.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Optional

import grain
import numpy as np
from PIL import Image

from tok1d.data import shared_batches
from tok1d.data.records import (CorruptImageError, decode_image, load_rgb, name_record,
                                open_image)


# ----------------------------------------------------------------------------------------------
# Augmentations. The recipes' crops are written twice on purpose, sharing their random draws:
# plainly on decoded uint8 HxWx3 arrays (resize the whole image, then crop: the definition, as
# the official loaders do it), and as `crop`, the pipeline's fast path, which draws the same
# window from the image's header alone, decodes a JPEG at a reduced size (`Image.draft`) when
# the window shrinks by 2x or more anyway, and resizes only the window (one PIL resize with a
# source box). Without reduced decoding `crop` equals the plain path up to the fixed-point
# rounding of PIL's two resize passes (at most 2 levels of 255; almost no pixel differs when
# the window is cut along the width, about 15% by one level when cut along the height). With
# it, within what DCT-domain downscaling changes: on photos a mean absolute difference under
# 2 levels and a 99th percentile under 12 (measured: 0.2-0.8 and 2-6 where the image is well
# over twice the crop, 1.5 and 12 where it is barely twice; tests/test_input_pipeline.py),
# about the error of the quality-90 JPEG compression itself.
# ----------------------------------------------------------------------------------------------

def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


# How a recipe's loader rounds the resized sides and the center crop's offsets:
#   "adm"          ADM's `center_crop_arr` / `random_crop_arr` (LlamaGen, GigaTok, RAR's
#                  pretokenization): sides round(side * scale), center offsets floored;
#   "torchvision"  torchvision's `Resize(size)` + `CenterCrop` / `RandomCrop` (TiTok's loaders):
#                  the long side int(size * long / short) (truncated), center offsets
#                  int(round(d / 2)) (half to even).
# They differ by a pixel of size or offset on many ImageNet shapes (500 x 332, 500 x 300, ...).
RESIZE_RULES = ("adm", "torchvision")


def resize_rule_of(data_config) -> str:
    """A config's `data.resize_rule` ("adm" for configs written before it existed)."""
    return data_config.get("resize_rule", RESIZE_RULES[0])


def shorter_side_size(height: int, width: int, size: int, rule: str = "adm"
                      ) -> tuple[int, int]:
    """(height, width) of an image resized so that its shorter side is `size` (`rule`: see
    RESIZE_RULES)."""
    if rule == "torchvision":
        long = int(size * max(height, width) / min(height, width))
        return (size, long) if height < width else (long, size)
    if rule != "adm":
        raise ValueError(f"resize rule {rule!r} is not one of {RESIZE_RULES}.")
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def center_offsets(height: int, width: int, size: int, rule: str = "adm") -> tuple[int, int]:
    """(top, left) of the center `size` square of a `height` x `width` image."""
    if rule == "torchvision":
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return (height - size) // 2, (width - size) // 2


def resize_shorter(img: np.ndarray, size: int, rule: str = "adm") -> np.ndarray:
    return _resize(img, *shorter_side_size(*img.shape[:2], size, rule))


def center_crop(img: np.ndarray, size: int, rule: str = "adm") -> np.ndarray:
    img = resize_shorter(img, size, rule)
    top, left = center_offsets(*img.shape[:2], size, rule)
    return img[top:top + size, left:left + size]


def _square_offsets(height: int, width: int, size: int, rng: np.random.Generator
                    ) -> tuple[int, int]:
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left


def _random_square(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top, left = _square_offsets(*img.shape[:2], size, rng)
    return img[top:top + size, left:left + size]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                rule: str = "adm") -> np.ndarray:
    """Resize the shorter side to `size`, then a random `size` x `size` crop (TiTok's recipe)."""
    return _random_square(resize_shorter(img, size, rule), size, rng)


def _adm_shorter(size: int, min_crop_frac: float, rng: np.random.Generator) -> int:
    return int(rng.integers(size, math.ceil(size / min_crop_frac) + 1))


def adm_random_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, rule: str = "adm") -> np.ndarray:
    """ADM's `random_crop_arr` (GigaTok, LlamaGen): resize the shorter side to a random integer
    in [size, ceil(size / min_crop_frac)] (256..320 for 256 px), then a random square crop."""
    shorter = _adm_shorter(size, min_crop_frac, rng)
    return _random_square(resize_shorter(img, shorter, rule), size, rng)


def adm_center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's `center_crop_arr` (guided-diffusion; LlamaGen's and GigaTok's code extraction and
    evaluation): halve with a BOX filter while the shorter side is at least 2 x `size`, resize
    the shorter side to `size` (bicubic, sizes rounded), cut the center square (offsets
    floored)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    height, width = shorter_side_size(image.height, image.width, size, "adm")
    image = image.resize((width, height), resample=Image.BICUBIC)
    top, left = center_offsets(height, width, size, "adm")
    return image.crop((left, top, left + size, top + size))


def ten_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `TenCrop(size)` of an H x W x C array: the top-left, top-right,
    bottom-left, bottom-right and center crops (center offsets rounded half to even, as
    `center_crop`), then the same five of the mirrored image: (10, size, size, C)."""
    h, w = img.shape[:2]
    if min(h, w) < size:
        raise ValueError(f"ten_crop: a {h}x{w} image is smaller than the {size} px crops.")
    top, left = center_offsets(h, w, size, "torchvision")

    def five(a):
        return [a[:size, :size], a[:size, w - size:], a[h - size:, :size],
                a[h - size:, w - size:], a[top:top + size, left:left + size]]

    return np.stack(five(img) + five(img[:, ::-1]))


def _inception_window(height: int, width: int, rng: np.random.Generator, min_scale: float,
                      ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style crop (torchvision's
    `RandomResizedCrop.get_params`): when ten draws find none, the central crop with the
    aspect ratio clamped into `ratio` (squashed to a square by the resize, as torchvision)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return top, left, ch, cw
    if width / height < min(ratio):
        cw, ch = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        cw, ch = int(round(height * max(ratio))), height
    else:
        cw, ch = width, height
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        min_scale: float = 0.08, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop: area fraction in [min_scale, 1], log-uniform aspect ratio."""
    top, left, ch, cw = _inception_window(*img.shape[:2], rng, min_scale, ratio)
    return _resize(img[top:top + ch, left:left + cw], size, size)


def crop_plan(height: int, width: int, *, image_size: int, augment: str, min_scale: float,
              rng: np.random.Generator | None, resize_rule: str = "adm"
              ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The crop a recipe takes of a `height` x `width` image, drawn from `rng` exactly as the
    plain functions above draw it: ((H, W), (top, left, h, w)) = resize the whole image to
    H x W, take the window [top, top + h) x [left, left + w) of it, and resize that window to
    `image_size` (a no-op unless `augment` is "random_resized_crop"). `resize_rule`: how the
    sizes and center offsets round (RESIZE_RULES)."""
    size = image_size
    if augment == "center_crop" or rng is None:
        resized = shorter_side_size(height, width, size, resize_rule)
        return resized, (*center_offsets(*resized, size, resize_rule), size, size)
    if augment == "random_crop":
        resized = shorter_side_size(height, width, size, resize_rule)
    elif augment == "adm_random_crop":
        resized = shorter_side_size(height, width, _adm_shorter(size, min_scale, rng),
                                    resize_rule)
    elif augment == "random_resized_crop":
        return (height, width), _inception_window(height, width, rng, min_scale)
    else:
        raise ValueError(f"Unknown augmentation {augment!r}.")
    return resized, (*_square_offsets(*resized, size, rng), size, size)


def _plan(image: Any, *, image_size: int, augment: str, min_scale: float,
          rng: np.random.Generator | None, resize_rule: str = "adm"):
    """The decoded image and where the recipe's crop lies in it: (pil, box, bounds). `pil` is
    RGB, decoded at 1/2, 1/4 or 1/8 size when the window shrinks by 2x or more anyway (a JPEG);
    `box` = (x0, y0, x1, y1), the window in its pixels, to resize to `image_size` square;
    `bounds` = (left, top, right, bottom), the pixels the resize filter may read (the whole
    image for resize-then-crop recipes; the window's whole pixels for crop-then-resize, whose
    filter stops at the crop's edges as in the plain path). Draws from `rng` what
    `crop_plan` draws."""
    pil = open_image(image)
    width, height = pil.size
    (rh, rw), (top, left, ch, cw) = crop_plan(height, width, image_size=image_size,
                                              augment=augment, min_scale=min_scale, rng=rng,
                                              resize_rule=resize_rule)
    # The window in source pixels, and how many source pixels each output pixel spans.
    sx, sy = width / rw, height / rh
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    shrink = min((box[2] - box[0]) / image_size, (box[3] - box[1]) / image_size)
    dx = dy = 1.0
    if shrink >= 2 and pil.format == "JPEG":  # DCT-domain downscaling by 2, 4 or 8
        drafted = pil.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
        if drafted is not None:  # the exact scale (W/s, H/s), not the rounded-up pixel size
            _, (_, _, scaled_w, scaled_h) = drafted
            dx, dy = scaled_w / width, scaled_h / height
    pil = load_rgb(pil)
    box = (box[0] * dx, box[1] * dy, box[2] * dx, box[3] * dy)
    if (rh, rw) != (height, width):  # resize-then-crop recipes
        bounds = (0, 0, pil.width, pil.height)
    else:  # crop-then-resize
        bounds = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    return pil, box, bounds


def _flips(flip: bool, rng: np.random.Generator | None) -> bool:
    return bool(flip and rng is not None and rng.random() < 0.5)


def _resize_on_host(pil: Image.Image, box, bounds, image_size: int) -> Image.Image:
    if bounds == (0, 0, pil.width, pil.height):
        return pil.resize((image_size, image_size), Image.BICUBIC, box=box)
    out = pil.crop(bounds)
    inner = (box[0] - bounds[0], box[1] - bounds[1], box[2] - bounds[0], box[3] - bounds[1])
    if inner != (0, 0, image_size, image_size):
        out = out.resize((image_size, image_size), Image.BICUBIC, box=inner)
    return out


def crop(image: Any, *, image_size: int, augment: str, flip: bool, min_scale: float,
         rng: np.random.Generator | None, resize_rule: str = "adm") -> np.ndarray:
    """Encoded/decoded image -> the recipe's uint8 (image_size, image_size, 3) crop: the
    pipeline's fast path (see the section comment; the plain path is `preprocess_plain`)."""
    pil, box, bounds = _plan(image, image_size=image_size, augment=augment,
                             min_scale=min_scale, rng=rng, resize_rule=resize_rule)
    out = _resize_on_host(pil, box, bounds, image_size)
    if _flips(flip, rng):
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------
# Resizing on the device (`data.resize_on="device"`). The host decodes (at a reduced size where
# `crop` would) and ships the window's pixels, with the few pixels around it that PIL's bicubic
# filter reads, in a fixed-size uint8 canvas; `tok1d.data.feeding.resize_windows` resizes them
# on the device with PIL's filter weights. The host then does the decode and little else (the
# resize was about 55% of `crop`'s time on ImageNet-sized JPEGs, benchmarks/RESULTS.md); the
# device pays ~0.6 GFLOP per 256-px image. Same draws, same windows, PIL's weights and its
# rounding and clipping between the two passes: pixels within 2 levels of `crop` (PIL's weights
# are fixed point), except that Pillow picks the order of its passes per image and the device
# always runs the horizontal pass first, so where the bicubic overshoot is clipped between the
# passes a few pixels in 1e5 of crop-then-resize windows differ by up to ~6
# (tests/test_input_pipeline.py).
# ----------------------------------------------------------------------------------------------

CANVAS_MARGINS = 16  # room for `filter_margin` on both sides of a window under 2x the crop


def canvas_size(image_size: int) -> int:
    """Side of the canvas that carries a window to the device: a window that shrinks by 2x or
    more is decoded smaller first, so a square window is under 2 x `image_size` wide, plus
    the filter's margin (`filter_margin`) on each side."""
    return 2 * image_size + CANVAS_MARGINS


def image_size_of_canvas(side: int) -> int:
    """The crop size whose windows travel in canvases of side `side` (`canvas_size`'s inverse)."""
    return (side - CANVAS_MARGINS) // 2


def filter_margin(scale: float) -> int:
    """Pixels beyond a window's edge that PIL's bicubic resize (support 2, widened by the
    scale when shrinking) may read when each output pixel spans `scale` input pixels."""
    return math.ceil(1.5 * max(scale, 1.0)) + 2


def window(image: Any, *, image_size: int, augment: str, flip: bool, min_scale: float,
           rng: np.random.Generator | None, resize_rule: str = "adm") -> dict[str, np.ndarray]:
    """`crop`'s work up to the resize, for `feeding.resize_windows` to finish on the device:
    "image" uint8 (h, w, 3), the pixels the filter reads (h, w <= C = `canvas_size`; batching
    puts them at the top left of a (C, C, 3) canvas, `shared_batches.place`), "window_box"
    float32 (x0, y0, x1, y1) in those pixels, "window_size" int32 (h, w), "window_flip" bool.
    A window too large for the canvas (an image that cannot be decoded at a reduced size) is
    resized here, as `crop` does, and shipped as an identity window."""
    side = canvas_size(image_size)
    pil, box, bounds = _plan(image, image_size=image_size, augment=augment,
                             min_scale=min_scale, rng=rng, resize_rule=resize_rule)
    flipped = _flips(flip, rng)
    margin = filter_margin(max(box[2] - box[0], box[3] - box[1]) / image_size)
    region = (max(bounds[0], math.floor(box[0]) - margin),
              max(bounds[1], math.floor(box[1]) - margin),
              min(bounds[2], math.ceil(box[2]) + margin),
              min(bounds[3], math.ceil(box[3]) + margin))
    h, w = region[3] - region[1], region[2] - region[0]
    if h <= side and w <= side:
        # A slice of the whole decoded image: one copy out of PIL, none for the crop.
        pixels = np.asarray(pil)[region[1]:region[3], region[0]:region[2]]
        shipped = (box[0] - region[0], box[1] - region[1], box[2] - region[0],
                   box[3] - region[1])
    else:
        h = w = image_size
        pixels = np.asarray(_resize_on_host(pil, box, bounds, image_size))
        shipped = (0.0, 0.0, float(image_size), float(image_size))
    return {"image": pixels, "window_box": np.asarray(shipped, np.float32),
            "window_size": np.asarray((h, w), np.int32), "window_flip": np.bool_(flipped)}


def preprocess_plain(image: Any, *, image_size: int, augment: str, flip: bool,
                     min_scale: float, rng: np.random.Generator | None,
                     resize_rule: str = "adm") -> np.ndarray:
    """`crop` the plain way: decode at full size, resize the whole image, crop (uint8)."""
    img = decode_image(image)
    if augment == "center_crop" or rng is None:
        img = center_crop(img, image_size, resize_rule)
    elif augment == "random_crop":
        img = random_crop(img, image_size, rng, resize_rule)
    elif augment == "random_resized_crop":
        img = random_resized_crop(img, image_size, rng, min_scale=min_scale)
    elif augment == "adm_random_crop":
        img = adm_random_crop(img, image_size, rng, min_crop_frac=min_scale, rule=resize_rule)
    else:
        raise ValueError(f"Unknown augmentation {augment!r}.")
    if flip and rng is not None and rng.random() < 0.5:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def preprocess(image: Any, *, image_size: int, augment: str, flip: bool, min_scale: float,
               rng: np.random.Generator | None, resize_rule: str = "adm") -> np.ndarray:
    """Decoded/encoded image -> float32 (image_size, image_size, 3) in [0, 1] (`crop` / 255;
    the pipelines themselves yield the uint8 crops, normalised on the device by
    `tok1d.data.feeding.Feeder`)."""
    return np.asarray(crop(image, image_size=image_size, augment=augment, flip=flip,
                           min_scale=min_scale, rng=rng, resize_rule=resize_rule),
                      np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# Per-host slicing of global batches.
# ----------------------------------------------------------------------------------------------

class HostSlice(grain.MapDataset):
    """Keeps rows [start, stop) of every consecutive block of `global_batch` elements."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, start: int, stop: int):
        super().__init__(parent)
        if not 0 <= start < stop <= global_batch:
            raise ValueError(f"Bad host slice [{start}, {stop}) of a batch of {global_batch}.")
        self._global, self._start, self._size = global_batch, start, stop - start

    def __len__(self) -> int:
        return (len(self._parent) // self._global) * self._size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        block, offset = divmod(index, self._size)
        return self._parent[block * self._global + self._start + offset]

    def __str__(self) -> str:
        return f"HostSlice(global_batch={self._global}, start={self._start}, size={self._size})"


RESIZE_ON = ("host", "device")


class _Preprocess(grain.transforms.Map):
    def __init__(self, seed: int | None, resize_on: str = "host", **kwargs):
        if resize_on not in RESIZE_ON:
            raise ValueError(f"resize_on={resize_on!r} is not one of {RESIZE_ON}.")
        self._seed, self._kwargs = seed, kwargs
        self._fn = window if resize_on == "device" else crop

    def map(self, element):
        global_index, record = element
        rng = None if self._seed is None else np.random.default_rng([self._seed, global_index])
        try:
            out = self._fn(record["image"], rng=rng, **self._kwargs)
        except CorruptImageError as e:  # name the record: one line the user can act on
            raise name_record(e, record, f"element {global_index} of the stream") from None
        out = out if isinstance(out, dict) else {"image": out}
        out.update(label=np.int32(record.get("label", 0)),
                   mask=np.bool_(record.get("mask", True)))
        return out


MAX_AUTO_WORKERS = 16


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int) -> int:
    """`data.num_workers`: >= 0 as given (0: decode in the main process); -1 (auto): one grain
    worker process per core but one (left to the training loop), at most MAX_AUTO_WORKERS
    (past that a host's input rate is far above any recipe's need, see benchmarks/RESULTS.md),
    and 0 on a single core."""
    if num_workers >= 0:
        return num_workers
    return min(MAX_AUTO_WORKERS, available_cores() - 1)


# What the pipelines return: an iterable of host batches (a grain IterDataset in this process,
# `shared_batches.SharedBatches` with worker processes; iterate it, nothing more).
Batches = Iterable[dict[str, np.ndarray]]


def _batched(ds: grain.MapDataset, rows: int, *, num_workers: int, image_shape: tuple,
             start_batch: int = 0) -> Batches:
    """`ds`'s examples in batches of `rows` from batch `start_batch` on, their images stacked
    into uint8 (rows, *image_shape) arrays (`shared_batches.Stack`: a window's pixels at the
    top left of its canvas), read by threads in this process or by grain worker processes
    whose batches' images come through reused shared memory (`shared_batches`)."""
    num_workers = resolve_num_workers(num_workers)

    def make(batch_fn) -> grain.MapDataset:
        batches = ds.batch(rows, drop_remainder=True, batch_fn=batch_fn)
        return batches[start_batch:] if start_batch else batches

    if num_workers == 0:
        # Threads overlap reading with decoding (PIL releases the GIL while it decodes and
        # resizes).
        return shared_batches.iterate_batches(make(shared_batches.Stack(image_shape)),
                                              num_threads=min(8, available_cores()))
    # With worker processes doing the work, each needs only a couple of threads.
    return shared_batches.SharedBatches(make, rows=rows, image_shape=image_shape,
                                        num_workers=num_workers, num_threads=2)


def _image_shape(image_size: int, resize_on: str) -> tuple[int, int, int]:
    """The uint8 image of one example as `_Preprocess` yields it."""
    side = canvas_size(image_size) if resize_on == "device" else image_size
    return side, side, 3


def training_order(source, seed: int) -> grain.MapDataset:
    """`source`'s records in the order the training stream reads them: shuffled with `seed`,
    a new order each epoch, without end (before each host keeps its rows)."""
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)


def train_dataset(source, *, global_batch: int, host_start: int, host_stop: int, seed: int,
                  image_size: int, augment: str, flip: bool, min_scale: float,
                  num_workers: int = 0, resize_on: str = "host",
                  start_batch: int = 0, resize_rule: str = "adm") -> Batches:
    """Infinite, shuffled, augmented batches of this host's rows of each global batch: "image"
    uint8 (rows, image_size, image_size, 3) (see `crop`), "label" int32, "mask" bool. With
    `resize_on="device"`, "image" holds `window` canvases and the batch their "window_*"
    geometry, which `feeding.Feeder` resizes on the device.

    Each global batch depends only on its index (the seed, the epoch's shuffle, each
    example's position): `start_batch` starts at that one, e.g. a resumed run's step, on
    any number of hosts and worker processes."""
    if len(source) < global_batch:
        raise ValueError(f"The training split has {len(source)} examples, fewer than one global "
                         f"batch ({global_batch}).")
    ds = training_order(source, seed).map_with_index(lambda i, record: (i, record))
    ds = HostSlice(ds, global_batch, host_start, host_stop)
    ds = ds.map(_Preprocess(seed, resize_on, image_size=image_size, augment=augment, flip=flip,
                            min_scale=min_scale, resize_rule=resize_rule))
    return _batched(ds, host_stop - host_start, num_workers=num_workers,
                    image_shape=_image_shape(image_size, resize_on), start_batch=start_batch)


def recipe_train_dataset(source, data_config, *, global_batch: int, host_start: int,
                         host_stop: int, seed: int, start_batch: int = 0) -> Batches:
    """`train_dataset` with the crop, flip, resizing and workers of a config's `data` section."""
    d = data_config
    return train_dataset(source, global_batch=global_batch, host_start=host_start,
                         host_stop=host_stop, seed=seed, image_size=d.image_size,
                         augment=d.augment, flip=d.flip, min_scale=d.min_scale,
                         num_workers=d.num_workers, resize_on=d.resize_on,
                         start_batch=start_batch, resize_rule=resize_rule_of(d))


def recipe_eval_dataset(source, data_config, *, global_batch: int, host_start: int,
                        host_stop: int, num_examples: Optional[int] = None
                        ) -> tuple[Batches, int]:
    """`eval_dataset` of the first `num_examples` (default `data.eval_examples`; -1: all) with
    a config's `data` section."""
    d = data_config
    return eval_dataset(source, global_batch=global_batch, host_start=host_start,
                        host_stop=host_stop, image_size=d.image_size,
                        num_examples=d.eval_examples if num_examples is None else num_examples,
                        num_workers=d.num_workers,
                        resize_on=d.resize_on, resize_rule=resize_rule_of(d))


class _Padded(grain.MapDataset):
    """The first `num_examples` of a source, padded with masked copies of element 0."""

    def __init__(self, parent: grain.MapDataset, num_examples: int, padded_length: int):
        super().__init__(parent)
        self._n, self._len = num_examples, padded_length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if index < self._n:
            return index, dict(self._parent[index], mask=True)
        return index, dict(self._parent[0], mask=False)

    def __str__(self) -> str:
        return f"Padded({self._n} -> {self._len})"


def eval_dataset(source, *, global_batch: int, host_start: int, host_stop: int,
                 image_size: int, num_examples: int = -1, num_workers: int = 0,
                 resize_on: str = "host", resize_rule: str = "adm"
                 ) -> tuple[Batches, int]:
    """One pass over the first `num_examples` (all if -1), center-cropped (uint8 like
    `train_dataset`), padded to whole global batches with `mask=False` rows so every host
    runs the same number of steps.

    Returns (dataset, number of global batches)."""
    n = len(source) if num_examples < 0 else min(num_examples, len(source))
    if n == 0:
        raise ValueError("The evaluation split is empty.")
    num_batches = -(-n // global_batch)
    ds = _Padded(grain.MapDataset.source(source), n, num_batches * global_batch)
    ds = HostSlice(ds, global_batch, host_start, host_stop)
    ds = ds.map(_Preprocess(None, resize_on, image_size=image_size, augment="center_crop",
                            flip=False, min_scale=1.0, resize_rule=resize_rule))
    return _batched(ds, host_stop - host_start, num_workers=num_workers,
                    image_shape=_image_shape(image_size, resize_on)), num_batches

