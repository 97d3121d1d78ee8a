"""Token datasets: the discrete codes of a trained tokenizer, with class labels, for training
generators without running the tokenizer in the loop.

Written by ``python -m tok1d.cli.tokenize`` (see `tok1d.cli.tokenize`); a directory holds::

    OUT/
        tokens_info.json
        train.array_record-00000-of-00004
        ...
        validation.array_record-00000-of-00001

Each record is ``msgpack.packb({"codes": bytes, "label": int, "index": int})``: ``codes`` are
the raw bytes of a C-ordered array of shape ``(num_variants, num_tokens)`` and dtype
``codes_dtype`` (int16 when the codebook fits, else int32); ``index`` is the example's position
in the source split. Variant 0 encodes the image itself; with flip augmentation variant 1
encodes its horizontal mirror (LlamaGen's ``extract_codes``: the mirrored image's codes are a
separate, equally valid training example). ``tok1d tokenize --crop=ten_crop`` stores the ten
crops of LlamaGen's / GigaTok's code extraction instead (the split's "variants" name them; the
un-augmented one, what evaluation reads, is `plain_variant`'s "center").

``tokens_info.json`` looks like::

    {
      "format": "tok1d.tokens.v1",
      "num_tokens": 32, "codebook_size": 4096, "num_classes": 1000, "codes_dtype": "int16",
      "tokenizer": {"kind": "pretrained", "path": "...", "name": "titok", ...},
      "splits": {
        "train": {"num_examples": 1281167, "num_variants": 2, "variants": ["image", "hflip"],
                  "shards": ["train.array_record-00000-of-00129", ...], ...}
      }
    }

Readers: `TokenSource` (one split on disk, random access), `ArrayTokenSource` (in memory, for
tests and demos) and `token_dataset` (the grain training pipeline: shuffled, repeated, one
random variant per example, host-sliced global batches that start at any step).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Mapping, Optional, Sequence

import grain
import msgpack
import numpy as np

from tok1d import errors
from tok1d.data import pipeline, records, shared_batches

FORMAT_VERSION = "tok1d.tokens.v1"
INFO_FILENAME = "tokens_info.json"
VARIANT_NAMES = ("image", "hflip")
# The un-augmented view of an example among a split's variants: "image" (--crop=center /
# resize), or the center crop of `tok1d tokenize --crop=ten_crop`.
PLAIN_VARIANTS = ("image", "center")

_REQUIRED_KEYS = ("num_tokens", "codebook_size", "num_classes", "codes_dtype", "splits")
_SPLIT_KEYS = ("num_examples", "num_variants", "shards")


def plain_variant(variants: Optional[Sequence[str]]) -> int:
    """The index of the un-augmented variant in a split's "variants" names (0 without names)."""
    for i, name in enumerate(variants or ()):
        if name in PLAIN_VARIANTS:
            return i
    return 0


# ----------------------------------------------------------------------------------------------
# Records and files.
# ----------------------------------------------------------------------------------------------

def codes_dtype_for(codebook_size: int) -> str:
    """The narrowest stored dtype for codes in [0, codebook_size): "int16" or "int32"."""
    return "int16" if codebook_size <= np.iinfo(np.int16).max + 1 else "int32"


def shard_name(split: str, index: int, num_shards: int) -> str:
    """File name of shard `index` of `num_shards` of a split (as `tok1d.data.prepare`)."""
    return f"{split}.array_record-{index:05d}-of-{num_shards:05d}"


def encode_token_record(codes: np.ndarray, label: int, index: int, dtype: str) -> bytes:
    """Serialises one example; `codes` has shape (num_variants, num_tokens)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (num_variants, num_tokens), got {codes.shape}.")
    return msgpack.packb({"codes": np.ascontiguousarray(codes, dtype).tobytes(),
                          "label": int(label), "index": int(index)}, use_bin_type=True)


def decode_token_record(raw: bytes, num_variants: int, num_tokens: int,
                        dtype: str) -> dict[str, Any]:
    """Inverse of `encode_token_record`: {"codes": (V, N) int32, "label": int, "index": int}."""
    record = msgpack.unpackb(raw, raw=False)
    flat = np.frombuffer(record["codes"], dtype=dtype)
    if flat.size != num_variants * num_tokens:
        raise ValueError(f"A token record holds {flat.size} codes but {INFO_FILENAME} says "
                         f"{num_variants} variant(s) x {num_tokens} tokens.")
    return {"codes": flat.reshape(num_variants, num_tokens).astype(np.int32),
            "label": int(record["label"]), "index": int(record["index"])}


def atomic_write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes JSON through a temporary file + rename (never a half-written file)."""
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_info(directory: str, info: Mapping[str, Any]) -> None:
    """Atomically writes `directory/tokens_info.json`."""
    atomic_write_json(os.path.join(directory, INFO_FILENAME), dict(info))


def read_info(directory: str) -> dict[str, Any]:
    """Reads and checks `directory/tokens_info.json`.

    Raises:
        FileNotFoundError: Missing directory or info file.
        ValueError: Malformed JSON, another format, or missing keys.
    """
    info = records.read_format_json(directory, INFO_FILENAME, FORMAT_VERSION, "Token dataset",
                            "python -m tok1d.cli.tokenize")
    path = os.path.join(directory, INFO_FILENAME)
    missing = [k for k in _REQUIRED_KEYS if k not in info]
    if missing:
        raise ValueError(f"{path!r} lacks {missing}.")
    for name, split in info["splits"].items():
        lacking = [k for k in _SPLIT_KEYS if k not in split]
        if lacking:
            raise ValueError(f"{path!r}: split {name!r} lacks {lacking}.")
    return info


# ----------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------

class TokenSource:
    """Random access to one split of a token dataset on disk.

    Items are {"codes": (num_variants, num_tokens) int32, "label": int, "index": int}; the
    training pipeline (`token_dataset`) picks one variant per example.

        src = TokenSource("/data/imagenet_titok_l32", "train")
        src.num_tokens, src.codebook_size, src.num_classes, src.num_variants
        src[0]["codes"].shape   # (2, 32)
    """

    def __init__(self, directory: str, split: str):
        """Opens `split` of the token dataset in `directory`.

        Raises:
            FileNotFoundError: Missing directory, info file or shard files.
            errors.UnknownSplit: Unknown split (a KeyError; the message lists the available
                ones).
            ValueError: Malformed info, or shards that do not match it.
        """
        self._directory, self._split = directory, split
        self._info = read_info(directory)
        splits = self._info["splits"]
        if split not in splits:
            raise errors.UnknownSplit(
                f"Unknown split {split!r} in token dataset {directory!r}; available: "
                f"{', '.join(sorted(splits)) or '<none>'}.")
        self._split_info = splits[split]
        self._paths = [os.path.join(directory, s) for s in self._split_info["shards"]]
        missing = [p for p in self._paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"Split {split!r} of {directory!r} is missing shard files: "
                                    f"{missing}")
        self._source = records.open_shards(self._paths, split, directory)
        expected = int(self._split_info["num_examples"])
        if expected != len(self._source):
            raise ValueError(f"Split {split!r} of {directory!r}: {INFO_FILENAME} says {expected} "
                             f"examples but the shards hold {len(self._source)}.")
        self._shape = (int(self._split_info["num_variants"]), int(self._info["num_tokens"]))
        self._dtype = str(self._info["codes_dtype"])
        if len(self) > 0:
            self[0]  # Fails early (and clearly) if the records do not match the info.

    @property
    def info(self) -> dict[str, Any]:
        """The parsed tokens_info.json."""
        return self._info

    @property
    def split(self) -> str:
        return self._split

    @property
    def num_tokens(self) -> int:
        return self._shape[1]

    @property
    def num_variants(self) -> int:
        return self._shape[0]

    @property
    def plain_variant(self) -> int:
        """The variant that is the un-augmented image (what evaluation reads)."""
        return plain_variant(self._split_info.get("variants"))

    @property
    def codebook_size(self) -> int:
        return int(self._info["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self._info["num_classes"])

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for {len(self)} records.")
        try:
            raw = self._source[index]
        except RuntimeError as e:  # array_record's reader on a damaged shard
            raise records.damaged_record(
                self._paths, index, e, f"split {self._split!r} of the tokens",
                "tokenize the split again (`tok1d tokenize`, into a new --out)") from None
        return decode_token_record(raw, *self._shape, self._dtype)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        try:
            raws = self._source.__getitems__(indices)
        except RuntimeError:  # a damaged shard (one by one: named) or a transient failure
            return [self[index] for index in indices]
        return [decode_token_record(raw, *self._shape, self._dtype) for raw in raws]

    def __repr__(self) -> str:
        return (f"TokenSource(directory={self._directory!r}, split={self._split!r}, "
                f"num_records={len(self)}, shape={self._shape})")


class ArrayTokenSource:
    """In-memory token source with the interface of `TokenSource` (tests, demos).

    `codes` is (n, num_tokens) or (n, num_variants, num_tokens) integers, `labels` (n,).
    `codebook_size` / `num_classes` default to max + 1 of the data.
    """

    def __init__(self, codes: np.ndarray, labels: np.ndarray, *,
                 codebook_size: Optional[int] = None, num_classes: Optional[int] = None):
        codes = np.asarray(codes)
        if codes.ndim == 2:
            codes = codes[:, None]
        labels = np.asarray(labels).reshape(-1)
        if codes.ndim != 3 or len(codes) != len(labels):
            raise ValueError(f"Expected codes (n, N) or (n, V, N) and labels (n,); got "
                             f"{codes.shape} and {labels.shape}.")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got {codes.dtype}.")
        self._codes, self._labels = codes.astype(np.int32), labels.astype(np.int64)
        n = len(labels)
        self.codebook_size = int(codebook_size if codebook_size is not None
                                 else (codes.max() + 1 if n else 0))
        self.num_classes = int(num_classes if num_classes is not None
                               else (labels.max() + 1 if n else 0))

    @property
    def num_variants(self) -> int:
        return self._codes.shape[1]

    @property
    def num_tokens(self) -> int:
        return self._codes.shape[2]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {"codes": self._codes[index], "label": int(self._labels[index]), "index": index}


class PrefixTokenSource:
    """The first `num_tokens` tokens of every record of a token source (`TokenSource`,
    `ArrayTokenSource`): ordered 1D tokens, whose prefixes decode, for a generator trained on
    k-token prefixes. Other attributes are the wrapped source's."""

    def __init__(self, source, num_tokens: int):
        if not 1 <= num_tokens <= source.num_tokens:
            raise ValueError(f"A prefix of {num_tokens} tokens: expected 1..{source.num_tokens} "
                             "(the tokens per image of the dataset).")
        self._source, self._k = source, int(num_tokens)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pickle / copy look these up before __dict__ is restored
            raise AttributeError(name)
        return getattr(self._source, name)

    @property
    def num_tokens(self) -> int:
        return self._k

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._source.info, num_tokens=self._k)

    def __len__(self) -> int:
        return len(self._source)

    def _cut(self, item: dict[str, Any]) -> dict[str, Any]:
        return dict(item, codes=np.asarray(item["codes"])[..., :self._k])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._cut(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items = (self._source.__getitems__(indices) if hasattr(self._source, "__getitems__")
                 else [self._source[i] for i in indices])
        return [self._cut(item) for item in items]


def prefix_source(source, num_tokens: int):
    """`source` cut to its first `num_tokens` tokens (0: unchanged)."""
    return PrefixTokenSource(source, num_tokens) if num_tokens else source


# ----------------------------------------------------------------------------------------------
# Training pipeline.
# ----------------------------------------------------------------------------------------------

def pick_variant(seed: int, global_index: int, num_variants: int) -> int:
    """The variant used for the element at `global_index` of the shuffled, repeated stream: a
    uniform draw from a generator seeded by (seed, global_index), so it depends on neither the
    number of hosts nor the resumption point, and differs between epochs."""
    if num_variants == 1:
        return 0
    return int(np.random.default_rng([seed, global_index]).integers(num_variants))


def _pick(seed: int, variant: Optional[int]):
    def fn(global_index, record):
        codes = np.asarray(record["codes"])
        if codes.ndim == 1:  # A source that already picked a variant.
            chosen = codes
        else:
            v = variant if variant is not None else pick_variant(seed, global_index,
                                                                 codes.shape[0])
            chosen = codes[v]
        return {"codes": chosen.astype(np.int32), "label": np.int32(record["label"])}
    return fn


def token_dataset(source, *, global_batch: int, host_start: int, host_stop: int, seed: int,
                  num_epochs: Optional[int] = None, variant: Optional[int] = None,
                  shuffle: bool = True, num_threads: int = 8, num_workers: int = 0,
                  start_batch: int = 0):
    """Training batches {"codes": (b, N) int32, "label": (b,) int32} of this host's rows.

    The global stream is the source shuffled with `seed` (a new order each epoch) and repeated
    `num_epochs` times (None: forever); host rows [host_start, host_stop) of each global batch of
    `global_batch` are kept (see `tok1d.parallel.host_batch_slice`), and each element takes the
    variant `pick_variant(seed, position)` (or the fixed `variant`): a multi-host run sees the
    batches of a single-host run. Each global batch depends only on its index: `start_batch`
    starts at that one (a resumed run's step, on any number of hosts and workers). Returns a
    grain IterDataset.
    """
    if len(source) < global_batch:
        raise ValueError(f"The token split has {len(source)} examples, fewer than one global "
                         f"batch ({global_batch}).")
    num_variants = getattr(source, "num_variants", 1)
    if variant is not None and not 0 <= variant < num_variants:
        raise ValueError(f"variant={variant} but the source has {num_variants} variant(s).")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_pick(seed, variant))
    ds = pipeline.HostSlice(ds, global_batch, host_start, host_stop)
    ds = ds.batch(host_stop - host_start, drop_remainder=True)
    if start_batch:
        ds = ds[start_batch:]
    return shared_batches.iterate_batches(ds, num_threads=num_threads, num_workers=num_workers)
