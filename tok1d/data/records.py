"""On-disk record format for image datasets prepared by tok1d.

A prepared dataset is a directory holding ArrayRecord shards plus a
``dataset_info.json`` file, written by ``tok1d prepare`` (`tok1d.cli.prepare`)::

    OUTPUT/
        dataset_info.json
        train.array_record-00000-of-00002
        train.array_record-00001-of-00002
        validation.array_record-00000-of-00001
        skipped_train.txt

Each record is ``msgpack.packb({"image": bytes, "label": int,
"filename": str})``: ``image`` holds the *encoded* image file (JPEG, PNG,
...) and ``filename`` is the source path relative to the input root.
Decoding to pixels is left to the training pipeline (see `decode_image`).

``dataset_info.json`` looks like::

    {
        "format": "tok1d.array_record.v1",
        "class_names": ["cat", "dog"],
        "splits": {
            "train": {
                "num_examples": 10,
                "shards": ["train.array_record-00000-of-00001"],
                "num_skipped": 1
            }
        }
    }

A ``validation`` split written by ``tok1d prepare --val_fraction=F`` also records
``"split_off_from"`` (the split it was taken from) and ``"val_fraction"``. File names that
are not valid UTF-8 are stored with ``\\xNN`` escapes (`tok1d.data.prepare.text_name`).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence, Union

from array_record.python import array_record_module
import grain
import msgpack
import numpy as np
from PIL import Image

from tok1d import errors

FORMAT_VERSION = "tok1d.array_record.v1"
INFO_FILENAME = "dataset_info.json"

ImageLike = Union[bytes, bytearray, memoryview, np.ndarray]


class CorruptImageError(ValueError):
    """Raised when encoded image bytes cannot be decoded."""


# -----------------------------------------------------------------------------
# Records.
# -----------------------------------------------------------------------------


def encode_record(image_bytes: bytes, label: int, filename: str) -> bytes:
    """Serialises one example.

    Args:
        image_bytes: The encoded image file (JPEG, PNG, ...), stored verbatim.
        label: Integer class label.
        filename: Path of the source file relative to the input root.

    Returns:
        The msgpack-encoded record.
    """
    record = {
        "image": bytes(image_bytes),
        "label": int(label),
        "filename": str(filename),
    }
    return msgpack.packb(record, use_bin_type=True)


def decode_record(raw: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`.

    Args:
        raw: Bytes of one record as stored in an ArrayRecord shard.

    Returns:
        A dict with keys ``image`` (bytes, still encoded), ``label`` (int)
        and ``filename`` (str).

    Raises:
        ValueError: If ``raw`` is not such a record.
    """
    try:
        record = msgpack.unpackb(raw, raw=False)
        return {
            "image": bytes(record["image"]),
            "label": int(record["label"]),
            "filename": str(record["filename"]),
        }
    except Exception as e:  # msgpack and the field look-ups raise many kinds of errors.
        raise ValueError(f"not a tok1d image record ({errors.brief(e)})") from None


def name_record(error: BaseException, record: dict[str, Any], position: str,
                always_position: bool = False) -> CorruptImageError:
    """A `CorruptImageError` for a record whose image fails to decode, naming the record: its
    ``filename`` and, when it has none or ``always_position``, ``position`` (where it is, e.g.
    "record 7 of ...")."""
    where = [f"file {record['filename']!r}"] if record.get("filename") else []
    if always_position or not where:
        where.append(position)
    return CorruptImageError(f"{error} ({', '.join(where)})")


# -----------------------------------------------------------------------------
# Images.
# -----------------------------------------------------------------------------


def describe_image_error(error: BaseException) -> str:
    """One-line, human-readable reason for a failed image decode."""
    if isinstance(error, Image.UnidentifiedImageError):
        # PIL's message embeds the repr of an in-memory file object; drop it.
        return "UnidentifiedImageError: not a recognised image format"
    return " ".join(f"{type(error).__name__}: {error}".split())


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Converts an already decoded uint8 array to HxWx3."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"Expected a uint8 image array, got dtype {array.dtype}.")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "Expected an image array of shape HxW, HxWx1, HxWx3 or HxWx4, "
            f"got {array.shape}.")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def open_image(data: ImageLike, name: str | None = None) -> Image.Image:
    """The image as a PIL image whose pixels are not decoded yet.

    Encoded bytes are opened lazily (only the header is read), so the caller can still ask a
    JPEG for reduced-size decoding with `Image.draft` before `load_rgb` decodes it; a decoded
    array (see `decode_image` for the accepted shapes) becomes an RGB image.

    Raises:
        CorruptImageError: If ``data`` are bytes that are not a readable image.
        ValueError: If ``data`` is an array of unsupported dtype or shape.
        TypeError: If ``data`` is neither bytes nor an array.
    """
    if isinstance(data, np.ndarray):
        return Image.fromarray(_array_to_rgb(data))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"decode_image expects bytes or a numpy array, got {type(data)}.")
    where = f" {name!r}" if name else ""
    if len(data) == 0:
        raise CorruptImageError(f"Cannot decode image{where}: empty data.")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many kinds of errors on bad input.
        raise CorruptImageError(
            f"Cannot decode image{where}: {describe_image_error(e)}") from e


# PIL modes of 16-bit gray images (PNG, TIFF; "I" is how some Pillow versions open them): their
# top 8 bits are the 8-bit levels (PIL's own convert("RGB") clips them at 255: a white image).
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(image: Image.Image, name: str | None = None) -> Image.Image:
    """Decodes an image from `open_image` to RGB pixels (palette, CMYK, 16-bit color, ...
    through PIL's ``convert("RGB")``; 16-bit gray by its top 8 bits; floating-point images
    refused).

    Raises:
        CorruptImageError: If the pixels cannot be decoded.
    """
    try:
        image.load()
        if image.mode in WIDE_GRAY_MODES:  # 16-bit / 32-bit gray: PIL's convert clips to 255
            wide = np.asarray(image).astype(np.int64)
            if image.mode != "I" or wide.max() > 255:  # ("I" holding 8-bit levels: as they are)
                wide = wide >> 8
            image = Image.fromarray(np.clip(wide, 0, 255).astype(np.uint8), "L")
        elif image.mode == "F":
            raise ValueError("a floating-point image (mode F) has no defined 8-bit levels; "
                             "convert it to 8 or 16 bits")
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:  # PIL raises many kinds of errors on bad input.
        where = f" {name!r}" if name else ""
        raise CorruptImageError(
            f"Cannot decode image{where}: {describe_image_error(e)}") from e


def decode_image(data: ImageLike, name: str | None = None) -> np.ndarray:
    """Decodes an image to an RGB uint8 array of shape HxWx3.

    Args:
        data: Encoded image bytes in any format PIL can read, or an already
            decoded uint8 array of shape HxW, HxWx1, HxWx3 or HxWx4.
            Grayscale is repeated over the 3 channels, alpha is dropped, and
            other modes (palette, CMYK, 16-bit, ...) are converted with PIL's
            ``convert("RGB")``.
        name: Optional file name, used in error messages only.

    Returns:
        A ``np.uint8`` array of shape (H, W, 3).

    Raises:
        CorruptImageError: If ``data`` are bytes that cannot be decoded.
        ValueError: If ``data`` is an array of unsupported dtype or shape.
        TypeError: If ``data`` is neither bytes nor an array.
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)
    with open_image(data, name) as image:
        return np.asarray(load_rgb(image, name), dtype=np.uint8)


# -----------------------------------------------------------------------------
# Data source.
# -----------------------------------------------------------------------------


def read_format_json(directory: str, filename: str, expected_format: str, what: str,
                     written_by: str) -> dict[str, Any]:
    """Loads `directory/filename` and checks its "format" field; the errors name the file and
    the command that writes it (shared by image and token datasets).

    Raises:
        FileNotFoundError: If the directory or the file does not exist.
        ValueError: Malformed JSON or another format.
    """
    if not os.path.isdir(directory):
        raise errors.missing_directory(what, directory)
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {filename} in {directory!r}; is this a {what.lower()} "
                                f"written by `{written_by}` (and did it finish)?")
    with open(path, "r", encoding="utf-8") as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Malformed {path!r}: {e}") from e
    found = info.get("format") if isinstance(info, dict) else None
    if found != expected_format:
        raise ValueError(f"{path!r} has format {found!r}, expected {expected_format!r}.")
    return info


def read_info(directory: str) -> dict[str, Any]:
    """Reads and checks ``directory/dataset_info.json`` (written by ``tok1d.data.prepare``).

    Raises:
        FileNotFoundError: If the directory or the info file does not exist.
        ValueError: If the info file is not a tok1d dataset description.
    """
    info = read_format_json(directory, INFO_FILENAME, FORMAT_VERSION, "Dataset",
                            "tok1d prepare")
    if "class_names" not in info or "splits" not in info:
        path = os.path.join(directory, INFO_FILENAME)
        raise ValueError(f"{path!r} lacks 'class_names' or 'splits'.")
    return info


def open_shards(paths: Sequence[str], split: str, directory: str
                ) -> grain.sources.ArrayRecordDataSource:
    """grain's source over the ArrayRecord shards `paths` of `split` of `directory`; a shard
    the reader cannot open (damaged, or another format) is one UserError."""
    try:
        return grain.sources.ArrayRecordDataSource(paths)
    except RuntimeError as e:  # array_record's reader on a damaged or foreign file
        raise errors.UserError(f"Split {split!r} of {directory!r}: a shard is not a "
                               f"readable ArrayRecord file ({errors.brief(e)}).") from None


def damaged_record(paths: Sequence[str], index: int, error: BaseException, what: str,
                   remedy: str) -> errors.DamagedRecord:
    """The error for record `index` of the ArrayRecord shards `paths` (of `what`, e.g. "split
    'train'") that the reader failed on with `error`: names the shard (the reader's own error
    names no file) and the `remedy`."""
    end, path = 0, paths[-1]
    for shard in paths:
        try:
            reader = array_record_module.ArrayRecordReader(shard)
            end += reader.num_records()
            reader.close()
        except RuntimeError:  # (damaged where the reader starts)
            path = shard
            break
        if index < end:
            path = shard
            break
    return errors.DamagedRecord(
        f"Shard {path!r} of {what} is damaged: record {index} cannot be read "
        f"({errors.brief(error)}); {remedy} or restore the file.")


class ArrayRecordImageSource:
    """Random-access source over one split of a prepared dataset.

    Records are dicts ``{"image": bytes, "label": int, "filename": str}``;
    the image stays encoded (decode it with `decode_image`).

    Example::

        source = ArrayRecordImageSource("/data/imagenet", "train")
        record = source[0]
        pixels = decode_image(record["image"])
    """

    def __init__(self, directory: str, split: str):
        """Opens one split of a prepared dataset.

        Args:
            directory: Dataset directory containing ``dataset_info.json``.
            split: Split name, e.g. ``"train"`` or ``"validation"``.

        Raises:
            FileNotFoundError: Missing directory, info file or shard files.
            errors.UnknownSplit: Unknown split (a KeyError; the message lists the available
                ones).
            ValueError: Malformed info file, or shards that do not match it.
        """
        self._directory = directory
        self._split = split
        self._info = read_info(directory)
        splits = self._info["splits"]
        if split not in splits:
            available = ", ".join(sorted(splits)) or "<none>"
            raise errors.UnknownSplit(
                f"Unknown split {split!r} in {directory!r}; available splits: {available}. "
                "`tok1d prepare --val_fraction=F` (or --split) writes another; or use one "
                "it has (--split, or --config.data.train_split / eval_split).")
        split_info = splits[split]
        self._fingerprint = split_info.get("fingerprint")
        self._paths = [os.path.join(directory, s) for s in split_info["shards"]]
        if not self._paths:
            raise errors.UserError(f"Split {split!r} of {directory!r} has no shards (its "
                                   f"{INFO_FILENAME} lists none): prepare it again.")
        missing = [p for p in self._paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"Split {split!r} of {directory!r} is missing shard files: "
                f"{missing}")
        self._source = open_shards(self._paths, split, directory)
        expected = split_info.get("num_examples")
        if expected is not None and expected != len(self._source):
            raise ValueError(
                f"Split {split!r} of {directory!r}: {INFO_FILENAME} says "
                f"{expected} examples but the shards hold "
                f"{len(self._source)}.")

    @property
    def directory(self) -> str:
        """The dataset directory."""
        return self._directory

    @property
    def split(self) -> str:
        """The split name."""
        return self._split

    @property
    def paths(self) -> list[str]:
        """Paths of the shard files, in order."""
        return list(self._paths)

    @property
    def fingerprint(self) -> str | None:
        """A digest of the split's records, written by `tok1d prepare` (None in datasets
        prepared before it was): another one means the split was prepared again from other
        images."""
        return self._fingerprint

    @property
    def class_names(self) -> list[str]:
        """Class names; ``class_names[label]`` names a label."""
        return list(self._info["class_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._info["class_names"])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns record ``index`` (negative indices count from the end)."""
        index = int(index)
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"Index {index} out of range for {size} records.")
        try:
            raw = self._source[index]
        except RuntimeError as e:  # array_record's reader on a damaged shard
            raise damaged_record(self._paths, index, e, f"split {self._split!r}",
                                 "prepare the split again (`tok1d prepare --replace`)") from None
        return self._decode(index, raw)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Reads several records at once (used by grain when available)."""
        indices = [int(i) for i in indices]
        try:
            raws = self._source.__getitems__(indices)
        except RuntimeError:  # a damaged shard (one by one: named) or a transient failure
            return [self[index] for index in indices]
        return [self._decode(index, raw) for index, raw in zip(indices, raws)]

    def _decode(self, index: int, raw: bytes) -> dict[str, Any]:
        try:
            return decode_record(raw)
        except ValueError as e:
            raise ValueError(f"Record {index} of split {self._split!r} of "
                             f"{self._directory!r}: {e}") from None

    def __repr__(self) -> str:
        return (
            f"ArrayRecordImageSource(directory={self._directory!r}, "
            f"split={self._split!r}, num_records={len(self)}, "
            f"num_shards={len(self._paths)})")
