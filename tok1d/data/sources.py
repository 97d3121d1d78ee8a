"""Random-access image sources: TFDS array_record, tok1d-prepared folders, embedded demo data.

A source has `__len__` and `__getitem__(i) -> {"image": bytes | uint8 array, "label": int}`;
images are decoded (and augmented) later, in the grain pipeline, on the host that needs them.

  "demo"                 crops of the photos bundled with scikit-image (no download)
  "digits"               scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
                         upscaled to RGB: a tiny class-labelled set for generator demos
  "tfds:<name>"          a TFDS dataset prepared in array_record format, read with
                         `tfds.data_source` (no TensorFlow): ImageNet-1k is "tfds:imagenet2012"
  "array_record:<dir>"   a folder prepared by `tok1d prepare`
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import importlib.util
import io
import os
import tempfile
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from tok1d.data import records

# Colour photos and textures that ship inside scikit-image (loaded without network access).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
               "hubble_deep_field", "retina", "camera", "grass", "gravel", "brick", "moon",
               "coins", "cell")
DEMO_EVAL_FRACTION = 0.25  # the bottom quarter of every photo is never used for training


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
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

    num_classes = len(DEMO_PHOTOS)  # the label is the photo's index

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


DIGITS_FILE = os.path.join("datasets", "data", "digits.csv.gz")  # inside the sklearn package
DIGITS_EVAL_FRACTION = 0.1  # held out per class (fixed draw), never used for training
DIGITS_SPLIT_SEED = 0
DIGITS_DEFAULT_SIZE = 32


@functools.lru_cache(maxsize=None)
def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images (1797, 8, 8) uint8 in 0..16, labels (1797,) int64).

    Reads the CSV bundled inside the installed scikit-learn package directly (no network, and
    scikit-learn itself is not imported); falls back to `sklearn.datasets.load_digits`."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("The 'digits' dataset ships with scikit-learn; "
                          "install it with `pip install scikit-learn`.")
    for root in spec.submodule_search_locations or ():
        path = os.path.join(root, DIGITS_FILE)
        if os.path.isfile(path):
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            break
    else:  # Unusual install layout: let scikit-learn find its own file.
        from sklearn.datasets import load_digits
        bunch = load_digits()
        table = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"Unexpected digits table of shape {table.shape}; expected (N, 65).")
    images = table[:, :64].reshape(-1, 8, 8).astype(np.uint8)
    return images, table[:, 64].astype(np.int64)


def digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of `split`: per class, a fixed random DIGITS_EVAL_FRACTION (rounded, at
    least one) is held out for "validation" (= "eval" = "test"); the rest is "train"."""
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(DIGITS_EVAL_FRACTION * len(members))))
        held.append(rng.permutation(members)[:k])
    held = np.sort(np.concatenate(held))
    if split == "train":
        return np.setdiff1d(np.arange(len(labels)), held)
    return held


def upscale_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit in 0..16 -> (size, size, 3) uint8, white on black: a 1-pixel black margin
    is added (so strokes touching the border are not cut), then a bicubic resize of the
    float image (smooth strokes), clipped to 0..255."""
    padded = np.pad(digit.astype(np.float32) * (255.0 / 16.0), 1)
    big = Image.fromarray(padded).resize((size, size), Image.BICUBIC)
    gray = np.clip(np.rint(np.asarray(big)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


class DigitsSource:
    """scikit-learn's handwritten digits (UCI optdigits test set: 1797 8x8 images, labels 0..9)
    as RGB images of `image_size` pixels, white digits on black.

    Splits: "train" (1618 images) and "validation" (alias "eval", "test"; 179 images), a
    fixed draw of 10% of every class; the two are disjoint and the same in every run. Items
    are {"image": (image_size, image_size, 3) uint8, "label": int} in the order of the
    original file.
    """

    num_classes = 10
    class_names = [str(d) for d in range(10)]

    def __init__(self, split: str, image_size: int = DIGITS_DEFAULT_SIZE):
        if split not in ("train", "validation", "eval", "test"):
            raise ValueError(f"Digits data has splits 'train' and 'validation' (alias 'eval', "
                             f"'test'), not {split!r}.")
        if image_size < 8:
            raise ValueError(f"Digits image_size must be >= 8, got {image_size}.")
        images, labels = load_digits_array()
        self.split, self.image_size = split, int(image_size)
        self.indices = digits_split_indices(labels, split)
        self._digits, self._labels = images, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self.indices):
            raise IndexError(index)
        i = self.indices[index]
        return {"image": upscale_digit(self._digits[i], self.image_size),
                "label": int(self._labels[i])}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, image_size={self.image_size}, n={len(self)})"


@contextlib.contextmanager
def tfds_scratch_removed():
    """Removes the empty `tmpXXXXtfds` folders tfds left in the temp dir inside the block: it
    makes one, and never removes it, whenever it builds the info of a dataset not prepared in
    its data_dir (`DatasetInfo.initialize_from_bucket`). Only new, empty ones go."""
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            try:
                os.rmdir(path)
            except OSError:  # not empty (tfds copied files into it), or already gone
                pass


class TfdsSource:
    """A TFDS dataset in array_record format through `tfds.data_source` (no TensorFlow). An
    encoded "image" feature (tfds.features.Image: imagenet2012's JPEGs) comes out as its
    stored bytes, which the pipeline decodes, at a reduced size where the recipe resizes down
    (as it does a `tok1d prepare` folder's); tfds' own decode would be full size."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # Local import: slow, only needed here.
        where = (repr(data_dir) if data_dir else
                 "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
        try:
            with tfds_scratch_removed():
                self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                                download=False)
        except tfds.core.DatasetNotFoundError as e:
            raise FileNotFoundError(f"TFDS knows no dataset {name!r} (data.name=tfds:{name}) "
                                    f"and none is prepared under that name in {where}") from e
        # tfds' errors for a registered dataset never prepared there: KeyError (no splits),
        # NotImplementedError (no dataset_info.json in a data_dir without it)
        except (KeyError, NotImplementedError) as e:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} has no prepared split {split!r} in {where}: prepare it "
                "in array_record format there (`tfds build`, which needs TensorFlow) and give "
                "that data_dir (--config.data.data_dir; tok1d tokenize: --data_dir), or convert "
                "an image folder with `tok1d prepare` and use the data name array_record:DIR "
                "(--config.data.name=...; tok1d tokenize: --data=...)") from e
        features = self._source.dataset_info.features
        if "image" in features and isinstance(features["image"], tfds.features.Image):
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                            download=False,
                                            decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the "label" feature (None if the dataset has none)."""
        try:
            return int(self._source.dataset_info.features["label"].num_classes)
        except (AttributeError, KeyError, TypeError):
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": record["image"], "label": int(record.get("label", 0))}


def get_source(name: str, split: str, *, data_dir: str = "", demo_size: int = 4096,
               image_size: int = 0):
    """Builds the source named by `config.data.name` for one split. `image_size` is the native
    size of the "digits" images (0: DIGITS_DEFAULT_SIZE); the other sources ignore it."""
    if name == "demo":
        return DemoSource(split, size=demo_size)
    if name == "digits":
        return DigitsSource(split, image_size=image_size or DIGITS_DEFAULT_SIZE)
    if name.startswith("tfds:"):
        return TfdsSource(name[len("tfds:"):], split, data_dir)
    if name.startswith("array_record:"):
        return records.ArrayRecordImageSource(name[len("array_record:"):], split)
    raise ValueError(f"Unknown data source {name!r}; use 'demo', 'digits', 'tfds:<name>' or "
                     "'array_record:<dir>'.")


def source_of(data_config, split: str):
    """The source of one split of a config's `data` section (name, data_dir, demo_size,
    image_size)."""
    return get_source(data_config.name, split, data_dir=data_config.data_dir,
                      demo_size=data_config.demo_size, image_size=data_config.image_size)


# ImageNet-like sizes (width, height) and how often `imagenet_like_jpegs` draws them: most
# ImageNet photos are 500 px on the longer side (4:3, 3:2, square), some are smaller, a few
# much larger (the ones reduced-size decoding speeds up).
IMAGENET_LIKE_SIZES = (((500, 375), 0.3), ((375, 500), 0.15), ((500, 333), 0.15),
                       ((333, 500), 0.05), ((500, 500), 0.1), ((400, 300), 0.1),
                       ((800, 600), 0.05), ((1024, 768), 0.05), ((1600, 1200), 0.05))
IMAGENET_LIKE_QUALITY = 90


def imagenet_like_jpegs(count: int, seed: int = 0):
    """`count` realistic JPEG files as (label, bytes): a random window of one of the bundled
    colour photos (label = its index in DEMO_PHOTOS' first seven), resized to a size drawn
    from IMAGENET_LIKE_SIZES, randomly mirrored, with a random gain and camera-like noise
    (sigma 4-8 levels), saved at quality 90 with 4:2:0 chroma subsampling: about ImageNet's
    bytes per pixel, for input-pipeline benchmarks (`tok1d bench --workload=input`)."""
    photos = DEMO_PHOTOS[:7]  # the colour photos: astronaut .. retina
    sizes = [s for s, _ in IMAGENET_LIKE_SIZES]
    weights = np.array([p for _, p in IMAGENET_LIKE_SIZES])
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % len(photos)
        photo = _load_photo(photos[label])
        w, h = sizes[rng.choice(len(sizes), p=weights / weights.sum())]
        ph, pw = photo.shape[:2]
        cw = min(pw, int(ph * w / h) if ph * w / h <= pw else pw)
        cw = int(cw * rng.uniform(0.7, 1.0))
        ch = min(ph, round(cw * h / w))
        top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        window = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((w, h),
                                                                            Image.BICUBIC)
        pixels = np.asarray(window, np.float32) * rng.uniform(0.8, 1.2)
        pixels += rng.uniform(4.0, 8.0) * rng.standard_normal(pixels.shape, np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            out, "JPEG", quality=IMAGENET_LIKE_QUALITY, subsampling="4:2:0")
        yield label, out.getvalue()
