"""Random-access image sources: TFDS array_record, tok1d-prepared folders, embedded demo data.

A source has `__len__` and `__getitem__(i) -> {"image": bytes | uint8 array, "label": int}`;
images are decoded (and augmented) later, in the grain pipeline, on the host that needs them.

  "demo"                 crops of the photos bundled with scikit-image (no download)
  "tfds:<name>"          a TFDS dataset prepared in array_record format, read with
                         `tfds.data_source` (no TensorFlow): ImageNet-1k is "tfds:imagenet2012"
  "array_record:<dir>"   a folder prepared by `python -m tok1d.data.prepare`
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Colour photos and textures that ship inside scikit-image (loaded without network access).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
               "hubble_deep_field", "retina", "camera", "grass", "gravel", "brick", "moon",
               "coins", "cell")
DEMO_EVAL_FRACTION = 0.25  # the bottom quarter of every photo is never used for training


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
    import skimage.data  # Local import: only the demo needs scikit-image.
    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _demo_region(name: str, split_id: int) -> np.ndarray:
    photo = _load_photo(name)
    cut = int(photo.shape[0] * (1 - DEMO_EVAL_FRACTION))
    return photo[:cut] if split_id == 0 else photo[cut:]


class DemoSource:
    """Deterministic square crops of scikit-image's bundled photos.

    Item i is a crop of photo `i % len(DEMO_PHOTOS)` whose side (between `min_frac` and
    `max_frac` of the region's shorter side) and position are drawn from a generator seeded by
    (split, i). Training crops come from the top 75% of each photo, eval crops from the bottom
    25%: the eval pixels are never seen in training.
    """

    def __init__(self, split: str, size: int = 4096, min_frac: float = 0.35,
                 max_frac: float = 0.9):
        if split not in ("train", "validation", "eval", "test"):
            raise ValueError(f"Demo data has splits 'train' and 'validation', not {split!r}.")
        self._split_id = 0 if split == "train" else 1
        self.size, self.min_frac, self.max_frac = size, min_frac, max_frac

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % len(DEMO_PHOTOS)
        region = _demo_region(DEMO_PHOTOS[label], self._split_id)
        rng = np.random.default_rng([self._split_id, index])
        h, w = region.shape[:2]
        side = int(min(h, w) * rng.uniform(self.min_frac, self.max_frac))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        return {"image": region[top:top + side, left:left + side], "label": label}


class TfdsSource:
    """A TFDS dataset in array_record format through `tfds.data_source` (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # Local import: slow, only needed here.
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                        download=False)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": record["image"], "label": int(record.get("label", 0))}


def get_source(name: str, split: str, *, data_dir: str = "", demo_size: int = 4096):
    """Builds the source named by `config.data.name` for one split."""
    if name == "demo":
        return DemoSource(split, size=demo_size)
    if name.startswith("tfds:"):
        return TfdsSource(name[len("tfds:"):], split, data_dir)
    if name.startswith("array_record:"):
        from tok1d.data.records import ArrayRecordImageSource
        return ArrayRecordImageSource(name[len("array_record:"):], split)
    raise ValueError(f"Unknown data source {name!r}; use 'demo', 'tfds:<name>' or "
                     "'array_record:<dir>'.")
