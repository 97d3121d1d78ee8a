r"""Encodes an image dataset with a trained tokenizer into a token dataset (`tok1d.data.tokens`).

    tok1d tokenize --tokenizer=DIR --data=NAME_OR_DIR --split=train --out=OUT \
        [--image_size=256] [--batch_size=256] [--flip] [--crop=center|resize|ten_crop] \
        [--crop_range=1.1] [--num_shards=0] [--prefix_tokens=0] [--dtype=float32]

--tokenizer  a pretrained directory (`tok1d.weights.layout`: tok1d_model.json + params/) or a
             training workdir (config.json + checkpoints/): the latest checkpoint's EMA params
             (plain params when the run had no EMA), the model rebuilt from config.json.
--data       any name `tok1d.data.sources.get_source` knows ("tfds:imagenet2012", "demo",
             "digits", "array_record:DIR") or a directory prepared by `tok1d prepare`.
--crop       "center": resize the shorter side, center crop (the eval crop; LlamaGen's
             `center_crop_arr` up to the resize filter); "resize": squash to a square;
             "ten_crop": the code extraction of LlamaGen / GigaTok (`extract_codes_c2i.py
             --ten-crop --crop-range 1.1`): ADM's center crop to --crop_range x the size, then
             the four corner and the center crops and their mirror images, 10 variants per
             example (the GPT recipes' training tokens).
--flip       also encode the horizontally mirrored images (variant 1, LlamaGen's flip
             augmentation for the generator).
--prefix_tokens  store only the first k tokens of every image (0: all): for ordered 1D tokens
             (a tokenizer trained with model.nested_dropout), whose prefixes decode
             (`decode_codes` takes (B, k) codes); a generator trained on them samples k tokens.
             k counts codes like num_tokens (residual VQ: a multiple of its depth); a 1D
             tokenizer only (TiTok, GigaTok 1D).
--dtype      the encoder's compute dtype: float32 (default) as the official code extraction,
             which encodes outside any autocast, and as the generator trainer's
             token_source="images"; a tok1d-trained tokenizer's own (empty) is its run's
             precision, bf16 in the recipes, which changes a few percent of the codes.

Encoding is one jitted function over all devices (batch split over the mesh's data axes);
every host loads only its rows of each global batch, the codes are gathered and process 0 writes.
The split is cut into contiguous shards, each written to a temporary file and renamed when
complete: a restarted run skips the shards that exist (with the same settings; anything else is
an error) and rewrites the rest. `tokens_info.json` is written when the split is complete.
Run it once per split into the same --out (e.g. train with --flip, then validation).

From Python (the demo does this)::

    model, params = loaders.load_tokenizer("runs/tokenizer")   # tok1d.weights.loaders
    tokenize_dataset(model, params, get_source("digits", "train"), "runs/tokens", flip=True)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from tok1d import errors
from tok1d import parallel
from tok1d.cli import app
from tok1d.data import feeding, pipeline, records, sources, tokens
from tok1d.models import interfaces
from tok1d.models.tokenizers import nested
from tok1d.weights import loaders

EXAMPLES_PER_SHARD = 10_000  # the auto shard size: the unit of work redone after a crash
CROPS = ("center", "resize", "ten_crop")
# The variants a crop stores per example (before --flip's mirrored copy): torchvision's TenCrop
# order for "ten_crop".
TEN_CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "hflip_top_left", "hflip_top_right", "hflip_bottom_left",
                  "hflip_bottom_right", "hflip_center")


# ----------------------------------------------------------------------------------------------
# Loading the data.
# ----------------------------------------------------------------------------------------------

def resolve_source(data: str, split: str, *, data_dir: str = "", image_size: int = 0):
    """The image source of `--data`: a prepared ArrayRecord directory, or a `get_source` name."""
    if os.path.isdir(data):
        if not os.path.isfile(os.path.join(data, records.INFO_FILENAME)):
            raise FileNotFoundError(f"{data} is a directory without {records.INFO_FILENAME}; "
                                    "prepare it with `tok1d prepare` first.")
        return records.ArrayRecordImageSource(data, split)
    known = data in ("demo", "digits") or data.startswith(("tfds:", "array_record:"))
    if not known and (os.sep in data or data.startswith(".")):
        raise errors.missing_directory("Data", data)
    return sources.get_source(data, split, data_dir=data_dir, image_size=image_size)


def load_pixels(image: Any, image_size: int, crop: str = "center") -> np.ndarray:
    """An encoded or decoded image -> uint8 (image_size, image_size, 3). "center" is the
    pipelines' fast path (`tok1d.data.pipeline.crop`: the same center crop as the evaluation
    data, a JPEG decoded at a reduced size when it is 2x or more the crop)."""
    if crop == "center":
        return np.asarray(pipeline.crop(image, image_size=image_size, augment="center_crop",
                                        flip=False, min_scale=1.0, rng=None))
    img = records.decode_image(image)
    if crop == "resize":
        if img.shape[:2] != (image_size, image_size):
            img = np.asarray(Image.fromarray(img).resize((image_size, image_size),
                                                         Image.BICUBIC))
    else:
        raise ValueError(f"Unknown crop {crop!r}; expected one of {CROPS}.")
    return np.asarray(img, np.uint8)


def load_image(image: Any, image_size: int, crop: str = "center") -> np.ndarray:
    """`load_pixels` as float32 in [0, 1] (what the encoder reads)."""
    return load_pixels(image, image_size, crop).astype(np.float32) / 255.0


def load_views(image: Any, image_size: int, crop: str = "center",
               crop_range: float = 1.1) -> np.ndarray:
    """An encoded or decoded image -> the views a crop stores, uint8 (V, image_size,
    image_size, 3): one for "center" / "resize" (`load_pixels`); for "ten_crop" LlamaGen's /
    GigaTok's `extract_codes_c2i.py --ten-crop`: ADM's center crop to int(image_size *
    crop_range) px, then torchvision's TenCrop (`pipeline.ten_crop`). The encoder scales them
    to [0, 1] on the device, exactly as on the host (`feeding.unit_float`)."""
    if crop != "ten_crop":
        return load_pixels(image, image_size, crop)[None]
    big = pipeline.adm_center_crop_arr(records.load_rgb(records.open_image(image)),
                                       int(image_size * crop_range))
    return np.asarray(pipeline.ten_crop(np.asarray(big), image_size), np.uint8)


def variant_names(crop: str, flip: bool) -> list[str]:
    """What each stored variant of an example is (tokens_info.json's "variants")."""
    names = list(TEN_CROP_NAMES) if crop == "ten_crop" else [tokens.VARIANT_NAMES[0]]
    return names + ([tokens.VARIANT_NAMES[1]] if flip else [])


# ----------------------------------------------------------------------------------------------
# The sharded encoder.
# ----------------------------------------------------------------------------------------------

def require_codes(model) -> None:
    """A ValueError unless `model` has discrete codes to write (any quantizer but the KL
    bottleneck)."""
    if not model.num_codes:
        raise ValueError(f"{type(model).__name__} has no discrete codes (a continuous KL "
                         "bottleneck); only a tokenizer with a quantizer (VQ, FSQ, LFQ, BSQ, "
                         "...) produces tokens.")


def make_encoder(model, params, *, flip: bool, batch_size: int, prefix_tokens: int = 0):
    """Builds the jitted, all-device encoder.

    Returns (encode, global_batch, (host_start, host_stop)): `encode(local_images, local_labels)`
    takes this host's rows of a global batch (uint8 pixels, or float32 images in [0, 1], of
    shape (rows, S, S, 3) or (rows, views, S, S, 3)) and returns the codes (global_batch, V, N)
    int32 (V = views, twice that with `flip`; N = prefix_tokens when > 0: the first tokens
    only) and labels (global_batch,) of the whole batch on every host.
    `global_batch` is `batch_size` rounded up to a multiple of the device count."""
    mesh = parallel.create_mesh({"data": -1})
    rules = parallel.DEFAULT_RULES
    batch_sh = parallel.batch_sharding(mesh, rules)
    global_batch = -(-batch_size // mesh.size) * mesh.size
    host_rows = parallel.host_batch_slice(batch_sh, global_batch)
    replicated = NamedSharding(mesh, P())
    params = nn.unbox(params)
    if all(not isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
        params = parallel.replicate(params, mesh)  # host trees (pretrained / checkpoint loads)
    else:  # device arrays, e.g. a training state sharded on another mesh
        params = jax.device_put(params, replicated)

    require_codes(model)
    nested.check_code_prefix(model, prefix_tokens, "--prefix_tokens")

    def fn(p, images, labels):
        if images.dtype == jnp.uint8:  # (4x fewer bytes to the device than float32)
            images = feeding.unit_float(images, exact=True)
        if images.ndim == 4:
            images = images[:, None]
        b, v = images.shape[:2]
        x = images.reshape((b * v,) + images.shape[2:])
        views = [x, jnp.flip(x, axis=2)] if flip else [x]
        variants = [interfaces.encode_images(model, p, view, prefix_tokens) for view in views]
        return jnp.concatenate([c.reshape(b, v, -1) for c in variants], axis=1), labels

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jitted = jax.jit(fn, out_shardings=(replicated, replicated))

    def encode(local_images: np.ndarray, local_labels: np.ndarray):
        batch = parallel.global_batch({"image": local_images, "label": local_labels}, batch_sh,
                                      global_batch)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(params, batch["image"], batch["label"])

    return encode, global_batch, host_rows


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------

def _shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    return [(k * n // num_shards, (k + 1) * n // num_shards) for k in range(num_shards)]


def _describe(source) -> str:
    """The dataset a source reads, for error messages."""
    if isinstance(source, records.ArrayRecordImageSource):
        return f"split {source.split!r} of {source.directory}"
    return "the data"


def _host_batches(source, lo: int, hi: int, global_batch: int, host_rows: tuple[int, int],
                  image_size: int, crop: str, num_threads: int, crop_range: float = 1.1):
    """This host's rows of the padded global batches covering examples [lo, hi): an iterator of
    {"image": (rows, views, S, S, 3) uint8, "label": (rows,) int32}. Padding rows repeat
    `lo`."""
    start, stop = host_rows
    num_batches = -(-(hi - lo) // global_batch)
    positions = [lo + j * global_batch + r for j in range(num_batches) for r in range(start, stop)]

    def load(i):
        p = positions[i] if positions[i] < hi else lo
        record = source[p]
        try:
            views = load_views(record["image"], image_size, crop, crop_range)
        except records.CorruptImageError as e:  # name the record: one line the user can act on
            raise records.name_record(e, record, f"record {p} of {_describe(source)}",
                                      always_position=True) from None
        return {"image": views, "label": np.int32(record.get("label", 0))}

    # The threads prefetch examples, two batches' worth, batched on top (a buffer of
    # 2 x rows whole batches of float32 views held gigabytes once the encoder fell behind;
    # the views are uint8 now, scaled on the device).
    ds = grain.MapDataset.range(len(positions)).map(load).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * (stop - start)))
    return iter(ds.batch(stop - start))


def _encode_range(encode, batches, lo: int, hi: int, global_batch: int):
    """Yields (codes (b, V, N) numpy, labels (b,), first index) per global batch, dropping the
    padding; one batch is kept in flight so loading overlaps the device work."""
    pending, offset = None, lo
    for batch in batches:
        out = encode(batch["image"], batch["label"])
        if pending is not None:
            yield pending
        valid = min(global_batch, hi - offset)
        pending = (out, valid, offset)
        offset += global_batch
    if pending is not None:
        yield pending


def _write_shard(path: str, items, dtype: str, histogram: np.ndarray) -> int:
    """Writes the encoded examples to `path` via a temporary file; returns the count."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    count = 0
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
        for (codes, labels), valid, first in items:
            codes, labels = np.asarray(codes)[:valid], np.asarray(labels)[:valid]
            histogram += np.bincount(codes.reshape(-1), minlength=len(histogram))[:len(histogram)]
            for i in range(valid):
                writer.write(tokens.encode_token_record(codes[i], labels[i], first + i, dtype))
            count += valid
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def _drain(items) -> int:
    """Non-writing hosts: run the collective encodes, keep nothing."""
    return sum(valid for _, valid, _ in items)


def _read_histogram(path: str, shape: tuple[int, int], dtype: str,
                    histogram: np.ndarray) -> int:
    """Adds the codes of an existing shard to `histogram`; returns its number of records. A
    damaged shard is a UserError naming it."""
    try:
        src = grain.sources.ArrayRecordDataSource([path])
        for i in range(len(src)):
            codes = tokens.decode_token_record(src[i], *shape, dtype)["codes"]
            histogram += np.bincount(codes.reshape(-1),
                                     minlength=len(histogram))[:len(histogram)]
    except (RuntimeError, ValueError) as e:  # (ArrayRecord's reader: RuntimeError)
        raise errors.UserError(f"{path} is damaged ({errors.brief(e)}): remove it and run "
                               "again to have it written again.") from None
    return len(src)


def _shard_complete(path: str, num_records: int) -> bool:
    """Whether an existing shard opens and holds `num_records` records; one that does not (a
    file cut short by a full disk, a damaged copy) is removed, to be written again."""
    if not os.path.isfile(path):
        return False
    try:
        found = len(grain.sources.ArrayRecordDataSource([path]))
    except (RuntimeError, ValueError) as e:
        problem = f"unreadable: {errors.brief(e)}"
    else:
        if found == num_records:
            return True
        problem = f"{found} records, {num_records} expected"
    print(f"{path} is damaged ({problem}): written again.", flush=True)
    os.remove(path)
    return False


def code_usage(histogram: np.ndarray) -> dict[str, float]:
    """Distinct codes, their fraction of the codebook, and the perplexity exp(H) of the code
    distribution (equals the codebook size when every code is equally used)."""
    total = histogram.sum()
    p = histogram[histogram > 0] / max(total, 1)
    return {"distinct_codes": int((histogram > 0).sum()),
            "usage": float((histogram > 0).mean()) if len(histogram) else 0.0,
            "perplexity": float(np.exp(-(p * np.log(p)).sum())) if total else 0.0}


# ----------------------------------------------------------------------------------------------
# Plan (what a split is tokenized with) and resumption.
# ----------------------------------------------------------------------------------------------

_GLOBAL_KEYS = ("num_tokens", "codebook_size", "codes_dtype", "tokenizer_fingerprint")


class OtherTokenizerError(ValueError):
    """The output directory holds tokens written by another tokenizer (or another state of
    it: a tokenizer run that trained on)."""


def _plan_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f".{split}.tokenize_plan.json")


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], keys) -> list[str]:
    return [f"{k}: {old.get(k)!r} there vs {new.get(k)!r} now" for k in keys
            if old.get(k) != new.get(k)]


def _check_plan(out_dir: str, split: str, plan: dict[str, Any]) -> None:
    """Fails if `out_dir` holds this split (finished or in progress) or other splits made with
    different settings, a prepared image dataset, or shards of this split that no tokenize run
    started; nothing there is overwritten or deleted in those cases."""
    if os.path.isfile(os.path.join(out_dir, records.INFO_FILENAME)):
        raise ValueError(f"{out_dir} holds a prepared image dataset ({records.INFO_FILENAME}): "
                         "its shards are named like the token shards; write the tokens to "
                         "another --out.")
    info = (tokens.read_info(out_dir)
            if os.path.isfile(os.path.join(out_dir, tokens.INFO_FILENAME)) else None)
    path = _plan_path(out_dir, split)
    started = os.path.isfile(path) or (info is not None and split in info.get("splits", {}))
    pattern = _shard_pattern(split)
    strangers = sorted(n for n in os.listdir(out_dir) if pattern.match(n))
    if strangers and not started:
        raise ValueError(f"{out_dir} holds {len(strangers)} shard(s) of split {split!r} (e.g. "
                         f"{strangers[0]}) that no tokenize run started; use another --out or "
                         "remove them.")
    if info is not None:
        diff = _differences(info, plan, _GLOBAL_KEYS)
        if diff and _differences(info, plan, set(_GLOBAL_KEYS) - {"num_tokens"}) == []:
            raise OtherTokenizerError(
                f"{out_dir} holds {info['num_tokens']} tokens per example of this tokenizer, "
                f"this run keeps {plan['num_tokens']} (another --prefix_tokens); use another "
                "--out.")
        if diff:
            raise OtherTokenizerError(f"{out_dir} holds tokens of another tokenizer "
                                      f"({'; '.join(diff)}); use another --out.")
        done = info["splits"].get(split)
        if done is not None and _as_now(done.get("plan") or {}, plan) != plan:
            raise ValueError(f"{out_dir} already holds split {split!r} tokenized with other "
                             f"settings ({'; '.join(_plan_diff(done.get('plan') or {}, plan))}); "
                             "use another --out or delete that split's files.")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError:
                old = None  # A torn plan file cannot happen (atomic), but be lenient.
        if old is not None and _as_now(old, plan) != plan:
            raise ValueError(f"{out_dir} holds an unfinished tokenization of split {split!r} with "
                             f"other settings ({'; '.join(_plan_diff(old, plan))}); rerun it "
                             f"with those settings, or delete {path} and the split's shards.")


def _dtype_name(model: nn.Module) -> str:
    dtype = getattr(model, "dtype", None)
    return "" if dtype is None else jnp.dtype(dtype).name


def _as_now(old: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, Any]:
    """A plan of an earlier tok1d, with the keys it did not record (the encoder's dtype)
    taken as this run's: such a run is resumed as before."""
    return {**{k: plan[k] for k in ("encoder_dtype",) if k in plan}, **old}


def _plan_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return _differences(old, new, sorted(set(old) | set(new))) or ["unknown"]


def _shard_pattern(split: str) -> re.Pattern:
    """The names of a split's shards (`tokens.shard_name`), of any count."""
    return re.compile(re.escape(split) + r"\.array_record-\d{5}-of-\d{5}$")


def _remove_stale(out_dir: str, split: str, keep: list[str]) -> None:
    """Deletes leftovers of an interrupted run (`_check_plan` passed: a tokenize run started
    this split here): temporary files and shards of another count."""
    pattern = _shard_pattern(split)
    for name in os.listdir(out_dir):
        tmp = name.startswith(f".{split}.array_record-") and ".tmp-" in name
        if tmp or (pattern.match(name) and name not in keep):
            os.remove(os.path.join(out_dir, name))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# Main entry point.
# ----------------------------------------------------------------------------------------------

def _model_image_size(model, image_size: int) -> int:
    native = model.input_size
    if image_size and native and image_size != native:
        raise ValueError(f"Image size mismatch: {image_size} px requested but the tokenizer "
                         f"{type(model).__name__} takes {native} px images.")
    if not (image_size or native):
        raise ValueError(f"{type(model).__name__} does not fix an image size; pass image_size.")
    return int(image_size or native)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def tokenize_dataset(model, params, source, out_dir: str, *, split: str = "train",
                     batch_size: int = 256, flip: bool = False, num_shards: int = 0,
                     image_size: int = 0, crop: str = "center", crop_range: float = 1.1,
                     num_examples: int = -1,
                     prefix_tokens: int = 0, num_classes: Optional[int] = None,
                     tokenizer_info: Optional[Mapping[str, Any]] = None,
                     data_info: Optional[Mapping[str, Any]] = None, num_threads: int = 16,
                     log: Callable[[str], None] = print,
                     progress_every_s: float = 30.0) -> dict[str, Any]:
    """Encodes the first `num_examples` (-1: all) of `source` into split `split` of `out_dir`.

    Args:
        model, params: A VQ tokenizer (`tok1d.models.interfaces.Tokenizer`) and its params (host
            NumPy trees or jax.Arrays of any sharding; replicated over all devices).
        source: Random-access images {"image": encoded bytes or uint8 array, "label": int}.
        out_dir: The token dataset directory (created; other splits there are kept).
        batch_size: Global batch, rounded up to a multiple of the device count.
        flip: Also store the codes of the horizontally mirrored images (variant 1).
        num_shards: Shards of the split; 0 gives about EXAMPLES_PER_SHARD examples per shard.
        image_size: 0 takes the model's; anything else must equal it.
        crop: "center" (resize shorter side + center crop), "resize" (squash) or "ten_crop"
            (LlamaGen's / GigaTok's code extraction: ADM's center crop to image_size x
            `crop_range`, then the 4 corner + center crops and their mirror images: 10
            variants, of which the generator's token pipeline draws one per example; encodes
            10 images per example, so a smaller `batch_size` may be needed).
        crop_range: "ten_crop"'s enlargement (the official --crop-range, 1.1).
        prefix_tokens: Store the first k tokens only (0: all), e.g. of ordered 1D tokens.
        num_classes: Default: `source.num_classes`, else max label + 1 of this split.
        tokenizer_info, data_info: Descriptions stored in tokens_info.json (default for the
            tokenizer: its class name; see `loaders.describe_tokenizer`).
        log: Progress / summary printer (process 0 only).

    Returns:
        A summary: examples, shards written / skipped, images per second, code usage.
    """
    start_time = time.time()
    chief = jax.process_index() == 0
    say = log if chief else (lambda _msg: None)
    if crop not in CROPS:
        raise ValueError(f"Unknown crop {crop!r}; expected one of {CROPS}.")
    if crop == "ten_crop" and flip:
        raise ValueError("--flip with --crop=ten_crop: the ten crops already hold the mirrored "
                         "ones (torchvision's TenCrop, as the official --ten-crop).")
    if crop == "ten_crop" and not crop_range >= 1.0:
        raise ValueError(f"crop_range={crop_range}: the ten crops are cut from a center crop "
                         "crop_range times the image size; expected >= 1.")
    image_size = _model_image_size(model, image_size)
    codebook_size = model.num_codes
    require_codes(model)
    n = len(source) if num_examples < 0 else min(num_examples, len(source))
    if n == 0:
        raise ValueError(f"Split {split!r} has no examples to tokenize.")
    num_shards = max(1, min(num_shards or math.ceil(n / EXAMPLES_PER_SHARD), n))

    encode, global_batch, host_rows = make_encoder(model, params, flip=flip,
                                                   batch_size=batch_size,
                                                   prefix_tokens=prefix_tokens)
    warning = prefix_tokens and nested.unordered_warning(
        model, f"--prefix_tokens={prefix_tokens} keeps the first of {model.num_tokens} tokens")
    if warning:
        say("Warning: " + warning)
    views = len(variant_names(crop, False))
    probe = np.zeros((host_rows[1] - host_rows[0], views, image_size, image_size, 3),
                     np.uint8)  # (the batches' dtype: one compilation)
    num_variants, num_tokens = (int(d) for d in np.asarray(
        encode(probe, np.zeros(len(probe), np.int32))[0]).shape[1:])
    shape = (num_variants, num_tokens)
    dtype = tokens.codes_dtype_for(int(codebook_size))
    plan = {"num_examples": n, "num_shards": num_shards, "num_variants": num_variants,
            "num_tokens": num_tokens, "codebook_size": int(codebook_size),
            "codes_dtype": dtype, "image_size": image_size, "crop": crop,
            "tokenizer_fingerprint": loaders.params_fingerprint(params),
            "source_size": len(source), "encoder_dtype": _dtype_name(model)}
    if crop == "ten_crop":
        plan["crop_range"] = crop_range
    names = [tokens.shard_name(split, k, num_shards) for k in range(num_shards)]
    paths = [os.path.join(out_dir, name) for name in names]
    bounds = _shard_bounds(n, num_shards)
    exists = _start_split(out_dir, split, plan, names, [hi - lo for lo, hi in bounds], chief)

    progress = _Progress(sum(hi - lo for (lo, hi), e in zip(bounds, exists) if not e),
                         progress_every_s, say)
    say(f"Tokenizing {n} examples of {split!r} -> {out_dir}: {num_shards} shard(s), "
        f"{sum(exists)} already done; {num_variants} variant(s) x {num_tokens} tokens, global "
        f"batch {global_batch} on {jax.device_count()} device(s).")
    histogram = np.zeros(int(codebook_size), np.int64)
    for k, ((lo, hi), done) in enumerate(zip(bounds, exists)):
        if done:
            continue
        batches = _host_batches(source, lo, hi, global_batch, host_rows, image_size, crop,
                                num_threads, crop_range)
        items = progress.wrap(_encode_range(encode, batches, lo, hi, global_batch),
                              f"shard {k + 1}/{num_shards}")
        if chief:
            _write_shard(paths[k], items, dtype, histogram)
        else:
            _drain(items)
        progress.report(f"shard {k + 1}/{num_shards} done")

    summary = {"split": split, "num_examples": n, "num_shards": num_shards,
               "shards_written": num_shards - sum(exists), "shards_skipped": sum(exists),
               "num_variants": num_variants, "num_tokens": num_tokens,
               "codebook_size": int(codebook_size), "images_per_s": progress.rate(),
               "out_dir": out_dir}
    if chief:
        for path, done in zip(paths, exists):
            if done:
                _read_histogram(path, shape, dtype, histogram)
        classes = _num_classes(source, paths, shape, dtype, num_classes)
        usage = code_usage(histogram)
        _write_final_info(out_dir, split, plan, names, classes,
                          tokenizer_info or {"model": type(model).__name__}, data_info, usage,
                          variant_names(crop, flip))
        os.remove(_plan_path(out_dir, split))
        summary.update(usage)
    summary["elapsed_s"] = time.time() - start_time
    _sync("tok1d.cli.tokenize.done")
    say(format_summary(summary))
    return summary


def _start_split(out_dir: str, split: str, plan: dict[str, Any], names: list[str],
                 sizes: list[int], chief: bool) -> list[bool]:
    """Checks `out_dir` against the plan, clears leftovers, records the plan (process 0);
    returns which shards (of `sizes` records) are already complete, as process 0 sees it, on
    every process."""
    problem = None
    if chief:
        try:
            os.makedirs(out_dir, exist_ok=True)
            _check_plan(out_dir, split, plan)
        except (OSError, ValueError) as e:
            problem = e
        else:
            _remove_stale(out_dir, split, names)
            tokens.atomic_write_json(_plan_path(out_dir, split), plan)
    if not parallel.process_0_view([problem is None])[0]:
        raise problem or ValueError(f"Process 0 cannot write {out_dir} (see its log).")
    exists = parallel.process_0_view([
        chief and _shard_complete(os.path.join(out_dir, name), size)
        for name, size in zip(names, sizes)])
    _sync("tok1d.cli.tokenize.plan")
    return exists


class _Progress:
    """Counts encoded images; prints rate and ETA every `every_s` seconds and on request."""

    def __init__(self, total: int, every_s: float, say: Callable[[str], None]):
        self.total, self.every_s, self.say = total, every_s, say
        self.done, self.start, self.last = 0, time.time(), time.time()

    def rate(self) -> float:
        return self.done / max(time.time() - self.start, 1e-9)

    def report(self, what: str) -> None:
        self.last = time.time()
        eta = (self.total - self.done) / max(self.rate(), 1e-9)
        self.say(f"  {what}: {self.done}/{self.total} images, {self.rate():.1f} images/s, "
                 f"ETA {_format_eta(eta)}")

    def wrap(self, items, what: str):
        for item in items:
            yield item
            self.done += item[1]
            if time.time() - self.last >= self.every_s:
                self.report(what)


def _num_classes(source, paths: list[str], shape: tuple[int, int], dtype: str,
                 given: Optional[int]) -> int:
    """`given`, else `source.num_classes`, else the largest label in the written split + 1."""
    if given is not None:
        return int(given)
    attr = getattr(source, "num_classes", None)
    if attr:
        return int(attr)
    src = grain.sources.ArrayRecordDataSource(paths)
    return 1 + max(tokens.decode_token_record(src[i], *shape, dtype)["label"]
                   for i in range(len(src)))


def _write_final_info(out_dir: str, split: str, plan: dict[str, Any], names: list[str],
                      num_classes: int, tokenizer_info, data_info,
                      usage: Mapping[str, Any], variants: list[str]) -> None:
    info_path = os.path.join(out_dir, tokens.INFO_FILENAME)
    old = tokens.read_info(out_dir) if os.path.isfile(info_path) else {"splits": {}}
    info = {"format": tokens.FORMAT_VERSION, **{k: plan[k] for k in _GLOBAL_KEYS},
            "num_classes": max(int(old.get("num_classes", 0)), num_classes),
            "tokenizer": dict(tokenizer_info or old.get("tokenizer") or {}),
            "splits": dict(old["splits"])}
    info["splits"][split] = {
        "num_examples": plan["num_examples"], "num_variants": plan["num_variants"],
        "variants": variants, "shards": names,
        "data": dict(data_info or {}), "code_usage": dict(usage), "plan": plan}
    info["splits"] = dict(sorted(info["splits"].items()))
    tokens.write_info(out_dir, info)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The end-of-run report."""
    lines = [f"Tokenized {summary['num_examples']} examples of {summary['split']!r} -> "
             f"{summary['out_dir']} ({summary['shards_written']} shard(s) written, "
             f"{summary['shards_skipped']} already done)",
             f"  {summary['num_variants']} variant(s) x {summary['num_tokens']} tokens, codebook "
             f"{summary['codebook_size']}",
             (f"  {summary['images_per_s']:.1f} images/s, {summary['elapsed_s']:.1f} s"
              if summary["shards_written"] else
              f"  nothing to encode: every shard was done, {summary['elapsed_s']:.1f} s")]
    if "distinct_codes" in summary:
        lines.append(f"  code usage: {summary['distinct_codes']}/{summary['codebook_size']} "
                     f"distinct ({100 * summary['usage']:.1f}%), perplexity "
                     f"{summary['perplexity']:.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (`tok1d tokenize`, see `tok1d.cli.app`).
# ----------------------------------------------------------------------------------------------

USAGE = "--tokenizer=DIR --data=NAME_OR_DIR --out=DIR [--split=train] [flags]"
CONFIG = None
REQUIRED = ("tokenizer", "data", "out")
POSITIONAL = ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("tokenizer", None, "Pretrained directory or training workdir.",
                        flag_values=fv)
    flags.DEFINE_string("data", None, "Dataset name (demo, digits, tfds:NAME, array_record:DIR) "
                        "or a directory written by tok1d prepare.", flag_values=fv)
    flags.DEFINE_string("split", "train", "Split to tokenize.", flag_values=fv)
    flags.DEFINE_string("out", None, "Token dataset directory.", flag_values=fv)
    flags.DEFINE_integer("image_size", 0, "Image size (0: the tokenizer's).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Global batch (rounded up to a multiple of the "
                         "devices).", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("flip", False, "Also encode horizontally flipped images (variant 1).",
                      flag_values=fv)
    flags.DEFINE_enum("crop", "center", list(CROPS), "How images become squares.",
                      flag_values=fv)
    flags.DEFINE_float("crop_range", 1.1, "--crop=ten_crop: the ten crops are cut from a "
                       "center crop of crop_range x the image size.", flag_values=fv)
    flags.DEFINE_integer("num_shards", 0, f"Shards (0: ~{EXAMPLES_PER_SHARD} examples each).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("prefix_tokens", 0, "Store the first k tokens of each image only (0: "
                         "all; ordered 1D tokens).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("num_examples", -1, "Tokenize only the first N examples (-1: all).",
                         flag_values=fv)
    flags.register_validator("num_examples", lambda n: n == -1 or n >= 1,
                             "-1 (all) or a positive number", flag_values=fv)
    flags.DEFINE_string("data_dir", "", "TFDS data_dir.", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Compute dtype of the encoder: float32 as the "
                        "official code extraction (extract_codes_c2i.py encodes outside any "
                        "autocast; a tok1d-trained tokenizer's own dtype is its run's, bf16 in "
                        "the recipes), bfloat16 for speed, empty for the tokenizer's own.",
                        flag_values=fv)
    flags.DEFINE_integer("threads", 16, "Image loading threads per host.",
                         lower_bound=1, flag_values=fv)
    app.define_distributed_flags(fv)


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    errors.check_output_dir(fv.out, "--out")
    if os.path.isdir(fv.tokenizer) and os.path.realpath(fv.out) == os.path.realpath(
            fv.tokenizer):
        raise errors.UserError(f"--out={fv.out} is the tokenizer's own folder: write the "
                               "tokens to another one.")
    app.setup_process(fv, paths=("tokenizer",))

    def open_source(image_size: int) -> Any:
        try:
            return resolve_source(fv.data, fv.split, data_dir=fv.data_dir,
                                  image_size=image_size)
        except KeyError as e:  # an unknown split of a prepared directory
            raise errors.UserError(e.args[0] if e.args else str(e)) from None

    # The data first: a wrong name fails before a large checkpoint is read. A host that lacks
    # the data (or the tokenizer: `setup_process`) stops every host (it stopped alone; the
    # others hung).
    source = parallel.everywhere(lambda: open_source(fv.image_size), f"--data={fv.data}")
    overrides = {"dtype": fv.dtype} if fv.dtype else {}
    model, params = loaders.load_tokenizer(fv.tokenizer, **overrides)
    desc = loaders.describe_tokenizer(fv.tokenizer)
    desc["kwargs"] = dict(desc["kwargs"], **overrides)  # (what encoded: --dtype's)
    native = model.input_size
    if not fv.image_size and native:
        # Opened again at the tokenizer's size: synthetic sources ("digits") render at it
        # directly (stored images ignore it and are cropped by `load_image`).
        source = parallel.everywhere(lambda: open_source(native), f"--data={fv.data}")
    try:
        tokenize_dataset(model, params, source, fv.out, split=fv.split,
                         batch_size=fv.batch_size, flip=fv.flip, num_shards=fv.num_shards,
                         image_size=fv.image_size, crop=fv.crop, crop_range=fv.crop_range,
                         num_examples=fv.num_examples, prefix_tokens=fv.prefix_tokens,
                         tokenizer_info=desc, data_info={"data": fv.data, "split": fv.split},
                         num_threads=fv.threads)
    except KeyboardInterrupt:
        print(f"The shards written are kept in {fv.out}: the same command resumes at the "
              "first one not written.", file=sys.stderr)
        raise


def main(argv: Optional[list[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    app.exit_process(main())
