"""grain input pipelines: augmentation, per-host slicing of global batches, eval padding.

Determinism contract: the global batch at step k (and each example's augmentation) depends
only on the seed, the source and the global batch size, not on how many hosts read it. The
global stream is shuffled and repeated once; host h loads only rows [start, stop) of each global
batch (its devices' share, see `tok1d.parallel.host_batch_slice`), and every example's random
crop/flip is seeded by its position in the global stream. So a 2-host run sees exactly the
batches of a 1-host run, and a resumed run (the iterator state is checkpointed) sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from tok1d.data.records import decode_image


# ----------------------------------------------------------------------------------------------
# Augmentations (host-side numpy / PIL). Images come in as uint8 HxWx3, leave as float32 [0, 1].
# ----------------------------------------------------------------------------------------------

def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / min(h, w)
    return _resize(img, max(size, round(h * scale)), max(size, round(w * scale)))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    img = resize_shorter(img, size)
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def _random_square(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return img[top:top + size, left:left + size]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Resize the shorter side to `size`, then a random `size` x `size` crop (TiTok's recipe)."""
    return _random_square(resize_shorter(img, size), size, rng)


def adm_random_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8) -> np.ndarray:
    """ADM's `random_crop_arr` (GigaTok, LlamaGen): resize the shorter side to a random integer
    in [size, ceil(size / min_crop_frac)] (256..320 for 256 px), then a random square crop."""
    shorter = int(rng.integers(size, math.ceil(size / min_crop_frac) + 1))
    return _random_square(resize_shorter(img, shorter), size, rng)


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        min_scale: float = 0.08, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop: area fraction in [min_scale, 1], log-uniform aspect ratio."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return _resize(img[top:top + ch, left:left + cw], size, size)
    return center_crop(img, size)


def preprocess(image: Any, *, image_size: int, augment: str, flip: bool, min_scale: float,
               rng: np.random.Generator | None) -> np.ndarray:
    """Decoded/encoded image -> float32 (image_size, image_size, 3) in [0, 1]."""
    img = decode_image(image)
    if augment == "center_crop" or rng is None:
        img = center_crop(img, image_size)
    elif augment == "random_crop":
        img = random_crop(img, image_size, rng)
    elif augment == "random_resized_crop":
        img = random_resized_crop(img, image_size, rng, min_scale=min_scale)
    elif augment == "adm_random_crop":
        img = adm_random_crop(img, image_size, rng, min_crop_frac=min_scale)
    else:
        raise ValueError(f"Unknown augmentation {augment!r}.")
    if flip and rng is not None and rng.random() < 0.5:
        img = img[:, ::-1]
    return np.asarray(img, np.float32) / 255.0


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


class _Preprocess(grain.transforms.Map):
    def __init__(self, seed: int | None, **kwargs):
        self._seed, self._kwargs = seed, kwargs

    def map(self, element):
        global_index, record = element
        rng = None if self._seed is None else np.random.default_rng([self._seed, global_index])
        out = {"image": preprocess(record["image"], rng=rng, **self._kwargs),
               "label": np.int32(record.get("label", 0)),
               "mask": np.bool_(record.get("mask", True))}
        return out


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=64))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def train_dataset(source, *, global_batch: int, host_start: int, host_stop: int, seed: int,
                  image_size: int, augment: str, flip: bool, min_scale: float,
                  num_workers: int = 0) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches of this host's rows of each global batch."""
    if len(source) < global_batch:
        raise ValueError(f"The training split has {len(source)} examples, fewer than one global "
                         f"batch ({global_batch}).")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.map_with_index(lambda i, record: (i, record))
    ds = HostSlice(ds, global_batch, host_start, host_stop)
    ds = ds.map(_Preprocess(seed, image_size=image_size, augment=augment, flip=flip,
                            min_scale=min_scale))
    ds = ds.batch(host_stop - host_start, drop_remainder=True)
    return _to_iter(ds, num_workers)


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
                 image_size: int, num_examples: int = -1, num_workers: int = 0
                 ) -> tuple[grain.IterDataset, int]:
    """One pass over the first `num_examples` (all if -1), center-cropped, padded to whole global
    batches with `mask=False` rows so every host runs the same number of steps.

    Returns (dataset, number of global batches)."""
    n = len(source) if num_examples < 0 else min(num_examples, len(source))
    if n == 0:
        raise ValueError("The evaluation split is empty.")
    num_batches = -(-n // global_batch)
    ds = _Padded(grain.MapDataset.source(source), n, num_batches * global_batch)
    ds = HostSlice(ds, global_batch, host_start, host_stop)
    ds = ds.map(_Preprocess(None, image_size=image_size, augment="center_crop", flip=False,
                            min_scale=1.0))
    ds = ds.batch(host_stop - host_start, drop_remainder=True)
    return _to_iter(ds, num_workers), num_batches

