r"""Converts a folder of images into tok1d ArrayRecord shards.

The input uses the usual class-subfolder layout (as for ImageNet)::

    INPUT/<class_name>/<any depth of image files>

Classes are the sorted names of the subfolders of ``INPUT`` (hidden ones,
starting with ".", excluded) and get labels ``0..C-1``. Every image file is
fully decoded once in a worker pool; files that cannot be decoded are
skipped and listed in ``OUTPUT/skipped_<split>.txt``, never silently
dropped. The encoded bytes are stored unchanged unless ``--resize_shorter``
is given. See `tok1d.data.records` for the output format.

The command line is `tok1d prepare` (`tok1d.cli.prepare`)::

    tok1d prepare --input=/data/imagenet/train --out=/data/imagenet_ar --split=train
    tok1d prepare --input=/data/imagenet/val --out=/data/imagenet_ar --split=validation
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
import tqdm

from array_record.python import array_record_module
from tok1d import errors, workfiles
from tok1d.data import records, tokens

_START_METHOD = ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                 else "spawn")

# torchvision's ImageFolder's (IMG_EXTENSIONS) and three more JPEG / GIF names it does not take.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
    ".jpe", ".jfif", ".gif",
})
VALIDATION_SPLIT = "validation"
TARGET_SHARD_BYTES = 1 << 30  # About 1 GB per shard when auto-sharding.
MAX_LISTED_SKIPPED = 20  # Skipped files listed in the printed summary.
_CHUNK_SIZE = 16  # Files per worker task.
_SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclasses.dataclass(frozen=True)
class _Example:
    """An input image file."""

    path: str  # Path to read from.
    relpath: str  # Path relative to the input root, "/"-separated.
    label: int
    size: int  # File size in bytes.


# -----------------------------------------------------------------------------
# Scanning and splitting.
# -----------------------------------------------------------------------------


def is_image_file(path: str) -> bool:
    """Whether ``path`` has a recognised image extension (case-insensitive)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def text_name(name: str) -> str:
    """``name`` as valid UTF-8 text, for storing and printing.

    Bytes of a file name that are not UTF-8 reach Python as lone surrogates
    (``os.listdir``'s "surrogateescape"), which cannot be written as UTF-8;
    each becomes a ``\\xNN`` escape, e.g. ``b"caf\\xe9.jpg"`` gives
    ``"caf\\xe9.jpg"``. Other names are returned unchanged.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_BROKEN_LINK = "a broken link"  # (an ignored name's reason)
_REASONS = ("unreadable: ", "a link into class ", _BROKEN_LINK)  # (those `scan_input` gives)


def scan_input(input_dir: str) -> tuple[list[str], list[_Example], list[str]]:
    """Lists the classes and image files of a class-subfolder tree.

    Args:
        input_dir: Root folder with one subfolder per class.

    Returns:
        ``(class_names, examples, ignored)``: sorted class names, the image
        files in deterministic (sorted) order, and the relative paths of
        ignored files (non-images, hidden files, files directly in the root)
        and folders (hidden ones, ending in "/"; unreadable ones and links into
        another class's folder, ending in "/ (why)").
        Class names and relative paths are passed through `text_name`; the
        examples' ``path`` is the name on disk.

    Raises:
        FileNotFoundError: If ``input_dir`` is not a directory.
        ValueError: If there are no class subfolders, no images at all, or class
            folders without images.

    Folder links are followed (as torchvision's ImageFolder does), each real folder once: a
    link back into the tree neither loops nor duplicates its images, and a folder inside a
    class folder belongs to that class only (ImageFolder reads it again under a link from
    another class, with that class's label). Hidden folders (".ipynb_checkpoints") are
    skipped; ImageFolder reads them, and takes one at the top as a class.
    """
    if not os.path.isdir(input_dir):
        raise errors.missing_directory("Input", input_dir)
    class_names, ignored = [], []
    for entry in sorted(os.listdir(input_dir)):
        if os.path.isdir(os.path.join(input_dir, entry)):
            if not entry.startswith("."):
                class_names.append(entry)
            else:
                ignored.append(text_name(entry) + "/")
        else:
            ignored.append(text_name(entry))
    if not class_names:
        raise ValueError(
            f"No class subfolders in {input_dir!r}: expected the layout "
            "INPUT/<class_name>/<image files>.")

    def relative(path: str) -> str:
        return text_name(os.path.relpath(path, input_dir).replace(os.sep, "/"))

    def unreadable(error: OSError) -> None:
        ignored.append(f"{relative(error.filename)}/ (unreadable: {error.strerror})")

    owners = {os.path.realpath(os.path.join(input_dir, name)): name for name in class_names}

    def owner(real: str) -> str | None:
        """The class whose folder holds `real` (None: outside every class folder)."""
        while real not in owners:
            parent = os.path.dirname(real)
            if parent == real:
                return None
            real = parent
        return owners[real]

    examples, visited = [], {os.path.realpath(input_dir)}
    for label, name in enumerate(class_names):
        class_dir = os.path.join(input_dir, name)
        class_names[label] = text_name(name)
        for root, dirs, files in os.walk(class_dir, onerror=unreadable, followlinks=True):
            real = os.path.realpath(root)
            if real in visited:  # a link to a folder read already (a cycle, or a second name)
                dirs[:] = []
                continue
            if owner(real) not in (name, None):
                ignored.append(f"{relative(root)}/ (a link into class {owner(real)})")
                dirs[:] = []
                continue
            visited.add(real)
            ignored.extend(relative(os.path.join(root, d)) + "/" for d in dirs
                           if d.startswith("."))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for filename in sorted(files):
                path = os.path.join(root, filename)
                relpath = relative(path)
                if filename.startswith(".") or not is_image_file(filename):
                    ignored.append(relpath)
                    continue
                if os.path.islink(path) and not os.path.exists(path):
                    ignored.append(f"{relpath} ({_BROKEN_LINK})")
                    continue
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = 0  # Unreadable: reported as skipped when loaded.
                examples.append(_Example(path, relpath, label, size))
    if not examples:
        raise ValueError(
            f"No image files found under {input_dir!r} ({len(class_names)} "
            f"class folders, {len(ignored)} non-image files). Recognised "
            f"extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}.")
    used = {e.label for e in examples}
    empty = [name for label, name in enumerate(class_names) if label not in used]
    if empty:
        why = {path.split("/")[0]: path for path in ignored
               if path.endswith(")") and path.count("/") == 1}  # the class folder itself
        shown = [f"{name}: {why[name]}" if name in why else name for name in empty[:5]]
        raise ValueError(
            f"{len(empty)} class folder(s) of {input_dir!r} hold no image files "
            f"({', '.join(shown)}{', ...' if len(empty) > 5 else ''}; a link to a folder "
            "read already counts as empty): their labels would never occur (torchvision's "
            "ImageFolder refuses them too); remove them or add images.")
    return class_names, examples, ignored


def _split_off_validation(
        examples: Sequence[_Example], val_fraction: float,
        rng: np.random.Generator) -> tuple[list[_Example], list[_Example]]:
    """Moves a random ``val_fraction`` of each class to a validation split.

    Every class with at least 2 files gives at least 1 file to validation
    and keeps at least 1; classes with a single file stay in the main split.
    """
    by_class = collections.defaultdict(list)
    for example in examples:
        by_class[example.label].append(example)
    main, val = [], []
    for label in sorted(by_class):
        files = by_class[label]
        n = len(files)
        num_val = int(round(val_fraction * n))
        if n >= 2:
            num_val = min(max(num_val, 1), n - 1)
        else:
            num_val = 0
        chosen = set(rng.permutation(n)[:num_val].tolist())
        for i, example in enumerate(files):
            (val if i in chosen else main).append(example)
    return main, val


def _shuffled(examples: Sequence[_Example],
              rng: np.random.Generator) -> list[_Example]:
    return [examples[i] for i in rng.permutation(len(examples))]


def _auto_num_shards(examples: Sequence[_Example]) -> int:
    total = sum(e.size for e in examples)
    return max(1, math.ceil(total / TARGET_SHARD_BYTES))


# -----------------------------------------------------------------------------
# Loading (runs in worker processes).
# -----------------------------------------------------------------------------


def load_image_file(path: str, resize_shorter: int = 0) -> bytes:
    """Reads an image file, checks that it decodes, optionally resizes it.

    Args:
        path: The file to read.
        resize_shorter: If > 0 and the image's shorter side exceeds it, the
            image is resized (bicubic, antialiased) so that its shorter side
            is ``resize_shorter`` and re-encoded (PNG if the source was PNG,
            JPEG quality 95 otherwise).

    Returns:
        The bytes to store: the original file unless it was resized.

    Raises:
        records.CorruptImageError: If the file is empty or does not decode.
        OSError: If the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise records.CorruptImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            source_format = image.format
            image.verify()
        # `verify` leaves the image unusable, so decode from a fresh handle, as the pipelines
        # will (16-bit gray by its top 8 bits, floating-point images refused).
        with Image.open(io.BytesIO(data)) as image:
            rgb = records.load_rgb(image)
    except records.CorruptImageError:
        raise
    except Exception as e:  # PIL raises many kinds of errors on bad input.
        raise records.CorruptImageError(records.describe_image_error(e)) from e

    width, height = rgb.size
    if resize_shorter <= 0 or min(width, height) <= resize_shorter:
        return data
    scale = resize_shorter / min(width, height)
    if width <= height:
        size = (resize_shorter, max(resize_shorter, round(height * scale)))
    else:
        size = (max(resize_shorter, round(width * scale)), resize_shorter)
    # Pillow's resize widens the filter support when downscaling (antialias).
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if source_format == "PNG":
        rgb.save(out, format="PNG")
    else:
        rgb.save(out, format="JPEG", quality=95)
    return out.getvalue()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _load_chunk(
        paths: Sequence[str],
        resize_shorter: int) -> list[tuple[bytes | None, str | None]]:
    """Loads several files; returns ``(data, None)`` or ``(None, reason)``."""
    results = []
    for path in paths:
        try:
            results.append((load_image_file(path, resize_shorter), None))
        except records.CorruptImageError as e:
            results.append((None, _one_line(e)))
        except OSError as e:
            results.append((None, _one_line(f"unreadable: {e}")))
    return results


def _get(future: concurrent.futures.Future) -> Any:
    """`future.result()`, waited for in slices. A wait without a timeout is a lock that only a
    signal delivered to this thread interrupts; a Ctrl-C or SIGTERM that the kernel hands to
    another thread of the process (the pool's, JAX's) leaves its Python handler pending until
    the wait ends, which may be never: a worker blocked on a file, or killed by the same
    signal (the hang of ~1 in 16 runs after a signal to the whole process group). With slices
    the handler runs within WAIT_SLICE_S."""
    while True:
        try:
            return future.result(timeout=WAIT_SLICE_S)
        except concurrent.futures.TimeoutError:
            continue
        except concurrent.futures.BrokenExecutor:
            raise errors.UserError(
                "a decoding worker process died (killed: the out-of-memory killer, or a "
                "signal to it alone); the output is left as it was. Run again, with fewer "
                "--workers if memory is short.") from None


WAIT_SLICE_S = 0.2


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any],
                 pool: concurrent.futures.Executor | None,
                 max_in_flight: int) -> Iterator[Any]:
    """Like ``pool.map`` but with at most ``max_in_flight`` pending tasks.

    Bounding the number of pending tasks bounds memory when the consumer
    (the writer) is slower than the workers.
    """
    if pool is None:
        yield from map(fn, items)
        return
    items = iter(items)
    pending = collections.deque(
        pool.submit(fn, item) for item in itertools.islice(items, max_in_flight))
    while pending:
        result = _get(pending.popleft())
        for item in itertools.islice(items, 1):
            pending.append(pool.submit(fn, item))
        yield result


# -----------------------------------------------------------------------------
# Writing.
# -----------------------------------------------------------------------------


def shard_name(split: str, index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards`` of a split."""
    return f"{split}.array_record-{index:05d}-of-{num_shards:05d}"


def _tmp_path(output_dir: str, name: str, token: str) -> str:
    return os.path.join(output_dir, f".{name}.tmp-{token}")


def _new_token() -> str:
    """The temporary files' tag of this run: it names this process (`workfiles`), so that a
    later run removes what a killed one left (a split's shards stay temporary until all are
    written: up to the whole split's size) and keeps a live one's."""
    return f"{workfiles.owner_tag()}{uuid.uuid4().hex[:12]}"


def _is_work_file(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _writing(call: Callable[..., Any], path: str, *args: Any) -> Any:
    """`call(*args)` of an ArrayRecord writer of `path`, whose failures (a full disk) are
    RuntimeErrors: as one line naming the file (its temporary files are removed)."""
    try:
        return call(*args)
    except RuntimeError as e:
        raise errors.UserError(
            f"could not write {path}: {e} (the output is left as it was).") from None


def _worker_signals() -> None:
    """A decoding worker's start: Ctrl-C reaches the whole process group; the parent alone
    handles it (it removes the temporary files, then stops the workers). SIGTERM keeps its
    default (a worker that it kills breaks the pool, which the parent sees)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


SHUTDOWN_WAIT_S = 10.0


def _shut_down(pool: concurrent.futures.ProcessPoolExecutor, finished: bool) -> None:
    """Ends the decoding pool. A run that `finished` waits for its idle workers to exit; any
    other (interrupted, failed) kills them first: they may be mid-way through a file that
    never ends (a FIFO, a hung network mount), and their work is not wanted. Given up after
    SHUTDOWN_WAIT_S (the pool's queues may be held by a killed worker)."""
    def shut() -> None:
        if not finished:
            # (the executor has no public way to stop running tasks before Python 3.14)
            for worker in list((getattr(pool, "_processes", None) or {}).values()):
                worker.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    thread = threading.Thread(target=shut, name="tok1d-pool-shutdown", daemon=True)
    thread.start()
    thread.join(SHUTDOWN_WAIT_S)
    if thread.is_alive():
        logging.warning("The decoding pool did not shut down within %.0f s.", SHUTDOWN_WAIT_S)


@contextlib.contextmanager
def _stop_on_signals(tmp_files: list[str]) -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `kill`) raises `errors.Terminated` meanwhile, a
    KeyboardInterrupt as Ctrl-C's, so that the temporary files are removed. Either also arms a
    watchdog: if the process has not ended 2 x SHUTDOWN_WAIT_S later (an interrupted pool can
    hang its shutdown, seen in CI runs), it removes `tmp_files` and exits (130, or 143 for
    SIGTERM). Only the main thread sets handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def watchdog(status: int) -> None:
        time.sleep(2 * SHUTDOWN_WAIT_S)
        for path in list(tmp_files):
            with contextlib.suppress(OSError):
                os.remove(path)
        print("interrupted (the decoding workers did not stop: exited)", file=sys.stderr,
              flush=True)
        os._exit(status)

    def interrupt(signum, frame):
        if not any(t.name == "tok1d-prepare-watchdog" for t in threading.enumerate()):
            threading.Thread(target=watchdog, args=(128 + signum,),
                             name="tok1d-prepare-watchdog", daemon=True).start()
        raise errors.Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt)
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` and syncs it to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: str, text: str, token: str) -> None:
    tmp = _tmp_path(os.path.dirname(path), os.path.basename(path), token)
    try:
        _write_text(tmp, text)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _write_info(output_dir: str, info: dict[str, Any], token: str) -> None:
    path = os.path.join(output_dir, records.INFO_FILENAME)
    _atomic_write_text(path, json.dumps(info, indent=2) + "\n", token)


def _write_split(split: str, examples: Sequence[_Example], num_shards: int,
                 output_dir: str, resize_shorter: int, pool: Any | None,
                 max_in_flight: int, token: str,
                 tmp_files: list[str]) -> dict[str, Any]:
    """Loads ``examples`` (already shuffled) and writes temporary shards.

    Shard ``k`` receives the contiguous block of examples
    ``[k * n // num_shards, (k + 1) * n // num_shards)``, minus the skipped
    ones. The temporary shard paths are appended to ``tmp_files`` as they
    are created so that the caller can clean them up on failure.

    Returns:
        A dict with the split's statistics; ``tmp_shards`` maps temporary
        paths to final shard names, ``labels`` holds the labels written.
    """
    n = len(examples)
    num_shards = max(1, min(num_shards, n))
    names = [shard_name(split, k, num_shards) for k in range(num_shards)]
    tmp_paths = [_tmp_path(output_dir, name, token) for name in names]
    shard_of = [i * num_shards // n for i in range(n)]  # Contiguous blocks.

    chunks = [examples[i:i + _CHUNK_SIZE] for i in range(0, n, _CHUNK_SIZE)]
    load = functools.partial(_load_chunk, resize_shorter=resize_shorter)
    results = _ordered_map(
        load, ([e.path for e in chunk] for chunk in chunks), pool,
        max_in_flight)

    skipped, num_written, index, labels = [], 0, 0, set()
    # The records written, in order: `fingerprint` (a CRC, 4x cheaper than a hash here: the
    # main thread writes every record; it detects changes, it does not authenticate them).
    content = content_bytes = 0
    writer, current = None, -1
    bar = tqdm.tqdm(total=n, desc=f"{split}", unit="img", file=sys.stderr,
                    dynamic_ncols=True)
    try:
        for chunk, chunk_results in zip(chunks, results):
            for example, (data, reason) in zip(chunk, chunk_results):
                if shard_of[index] != current:
                    if writer is not None:
                        _writing(writer.close, tmp_paths[current])
                    current = shard_of[index]
                    tmp_files.append(tmp_paths[current])
                    writer = _writing(array_record_module.ArrayRecordWriter,
                                      tmp_paths[current], tmp_paths[current], "group_size:1")
                index += 1
                if data is None:
                    skipped.append((example.relpath, reason))
                    continue
                record = records.encode_record(data, example.label, example.relpath)
                _writing(writer.write, tmp_paths[current], record)
                content, content_bytes = zlib.crc32(record, content), content_bytes + len(record)
                num_written += 1
                labels.add(example.label)
            bar.update(len(chunk))
            bar.set_postfix(skipped=len(skipped), refresh=False)
        if writer is not None:
            _writing(writer.close, tmp_paths[current])
            writer = None
    finally:
        bar.close()
        if writer is not None:  # (failing: its error is the one to report)
            try:
                writer.close()
            except RuntimeError:
                pass
    return {
        "num_examples": num_written,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": names,
        "tmp_shards": dict(zip(tmp_paths, names)),
        "labels": labels,
        "bytes_written": sum(os.path.getsize(p) for p in tmp_paths),
        "fingerprint": f"{content:08x}{content_bytes % (1 << 32):08x}",
    }


def _check_every_class_written(input_dir: str, class_names: Sequence[str],
                               stats: dict[str, dict[str, Any]]) -> None:
    """Fails if a class has no image that decoded in any split written.

    Such a label would never occur, which is why class folders without image
    files are refused too (`scan_input`).
    """
    written = set().union(*(st["labels"] for st in stats.values()))
    dead = [name for label, name in enumerate(class_names) if label not in written]
    if not dead:
        return
    skipped = [item for st in stats.values() for item in st["skipped"]]
    example = next((f"{path}: {reason}" for path, reason in skipped
                    if path.split("/")[0] == dead[0]), "")
    raise ValueError(
        f"{len(dead)} class folder(s) of {input_dir!r} hold no image that decodes "
        f"({_preview(dead)}; e.g. {example}): their labels would never occur; remove them "
        "or replace their images. Nothing was written.")


def _read_existing_info(output_dir: str,
                        class_names: list[str]) -> dict[str, Any] | None:
    """Returns the existing info (or None) after checking it is compatible."""
    path = os.path.join(output_dir, records.INFO_FILENAME)
    if not os.path.exists(path):
        return None
    info = records.read_info(output_dir)
    if list(info["class_names"]) != list(class_names):
        old, new = info["class_names"], class_names
        raise ValueError(
            f"{path!r} already describes a dataset with different classes "
            f"({len(old)} classes: {_preview(old)}) than the input "
            f"({len(new)} classes: {_preview(new)}); use another --out.")
    return info


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _remove_stale_shards(output_dir: str, split: str,
                         keep: Sequence[str]) -> None:
    """Deletes ``<split>.array_record-*`` files not listed in ``keep``."""
    pattern = re.compile(
        re.escape(split) + r"\.array_record-\d{5}-of-\d{5}$")
    for name in os.listdir(output_dir):
        if pattern.match(name) and name not in keep:
            os.remove(os.path.join(output_dir, name))


# -----------------------------------------------------------------------------
# Main entry points.
# -----------------------------------------------------------------------------


def prepare(input_dir: str,
            output_dir: str,
            split: str = "train",
            val_fraction: float = 0.0,
            num_shards: int = 0,
            resize_shorter: int = 0,
            workers: int | None = None,
            seed: int = 0,
            replace: bool = False) -> dict[str, Any]:
    """Converts a class-subfolder image tree into ArrayRecord shards.

    Args:
        input_dir: Root with one subfolder per class.
        output_dir: Where to write shards, ``dataset_info.json`` and
            ``skipped_<split>.txt``. Created if needed; other splits already
            described there are kept (the class names must match).
        split: Name of the split to write.
        val_fraction: If > 0, this fraction of each class goes to a second
            split named ``validation`` (at least 1 file per class with >= 2
            files), the rest to ``split``; ``dataset_info.json`` records it
            (``split_off_from``, ``val_fraction``).
        num_shards: Number of shards of ``split``; 0 picks about 1 GB per
            shard. The validation split is always sharded automatically.
        resize_shorter: If > 0, images whose shorter side exceeds it are
            downscaled to that shorter side and re-encoded.
        workers: Number of decoding processes; ``None`` uses all CPUs,
            values <= 1 decode in this process.
        seed: Seed for the validation selection and the example shuffling.
        replace: Write a split the output already holds again (its old shards
            are removed once the new ones are in place); without it, such a
            split is refused before any image is decoded or shard written.

    Returns:
        A summary dict (see `format_summary`), with per-split statistics
        under ``"splits"``.

    Raises:
        FileNotFoundError: If ``input_dir`` does not exist.
        ValueError: For invalid arguments, an input without class folders or
            images, incompatible existing output (other classes, a token
            dataset), a split whose images all fail to decode, a class none
            of whose images decode, or, without ``val_fraction``, the split a
            validation split of the output was taken from (its images would
            be in both).
    """
    start = time.time()
    if not _SPLIT_NAME_RE.match(split):
        raise ValueError(
            f"Invalid split name {split!r}: use letters, digits, '_' or '-'.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if val_fraction > 0 and split == VALIDATION_SPLIT:
        raise ValueError(
            f"--val_fraction writes a {VALIDATION_SPLIT!r} split, so --split "
            f"must be another name (got {split!r}).")
    if num_shards < 0 or resize_shorter < 0:
        raise ValueError("num_shards and resize_shorter must be >= 0.")
    if workers is None:
        workers = os.cpu_count() or 1

    input_real = os.path.realpath(input_dir)
    output_real = os.path.realpath(output_dir)
    if os.path.commonpath([input_real, output_real]) == input_real:
        raise ValueError(
            f"The output {output_dir!r} must not be inside the input "
            f"{input_dir!r} (it would be taken for a class folder).")

    if os.path.isfile(os.path.join(output_dir, tokens.INFO_FILENAME)):
        raise ValueError(f"{output_dir!r} holds a token dataset ({tokens.INFO_FILENAME}, "
                         "written by `tok1d tokenize`): its shards are named like the image "
                         "shards; write the images to another --out.")
    class_names, examples, ignored = scan_input(input_dir)
    created = not os.path.exists(output_dir)  # (removed again if nothing is written)
    os.makedirs(output_dir, exist_ok=True)
    existing = _read_existing_info(output_dir, class_names)  # Fail early if incompatible.
    writes = [split] + ([VALIDATION_SPLIT] if val_fraction > 0 else [])
    held = [name for name in writes if existing and name in existing.get("splits", {})]
    if held and not replace:
        counts = ", ".join(f"{name!r} ({existing['splits'][name].get('num_examples', '?')} "
                           "examples)" for name in held)
        raise ValueError(
            f"{output_dir!r} already holds split{'s' if len(held) > 1 else ''} {counts}; pass "
            "--replace to write it again, or choose another --split or --out.")

    carved = (existing or {}).get("splits", {}).get(VALIDATION_SPLIT, {})
    if val_fraction == 0 and carved.get("split_off_from") == split:
        raise ValueError(
            f"The {VALIDATION_SPLIT!r} split of {output_dir!r} was taken from {split!r} by "
            f"--val_fraction={carved.get('val_fraction')}: writing {split!r} again without "
            f"--val_fraction would put its images in both splits; pass --val_fraction again "
            f"(both splits are written anew), or choose another --split or --out.")

    rng = np.random.default_rng(seed)
    if val_fraction > 0:
        main_examples, val_examples = _split_off_validation(
            examples, val_fraction, rng)
        if not val_examples:
            raise ValueError(
                "val_fraction > 0 but no file can go to validation: every "
                "class has a single image file.")
        plan = {split: main_examples, VALIDATION_SPLIT: val_examples}
    else:
        plan = {split: list(examples)}
    plan = {name: _shuffled(exs, rng) for name, exs in plan.items()}
    shard_counts = {name: _auto_num_shards(exs) for name, exs in plan.items()}
    if num_shards > 0:
        shard_counts[split] = num_shards

    removed = workfiles.remove_stale(output_dir, _is_work_file)
    if removed:
        logging.info("Removed the temporary files of a killed run in %s: %s", output_dir,
                     _preview(removed))
    token = _new_token()
    tmp_files: list[str] = []
    stats: dict[str, dict[str, Any]] = {}
    pool, finished = None, False
    with _stop_on_signals(tmp_files):
        try:
            if workers > 1:
                # not fork: the parent has usually imported JAX, whose threads a fork copies
                # in whatever state they are (Python warns; a held lock would hang a worker)
                pool = concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context(_START_METHOD),
                    initializer=_worker_signals)
            for name, exs in plan.items():
                stats[name] = _write_split(
                    name, exs, shard_counts[name], output_dir, resize_shorter,
                    pool, 4 * max(workers, 1), token, tmp_files)
                if stats[name]["num_examples"] == 0:
                    raise ValueError(
                        f"None of the {len(exs)} images of split {name!r} could "
                        f"be decoded; e.g. {stats[name]['skipped'][0]}.")
            _check_every_class_written(input_dir, class_names, stats)
            if val_fraction > 0:
                stats[VALIDATION_SPLIT]["split_off_from"] = split
                stats[VALIDATION_SPLIT]["val_fraction"] = val_fraction
            _commit(output_dir, class_names, stats, token, tmp_files)
            finished = True
        finally:  # the files first: a second Ctrl-C during the pool's shutdown keeps nothing
            for path in tmp_files:
                if os.path.exists(path):
                    os.remove(path)
            if pool is not None:
                _shut_down(pool, finished)
            if created and not finished:
                with contextlib.suppress(OSError):  # (only if empty)
                    os.rmdir(output_dir)

    elapsed = time.time() - start
    for name, st in stats.items():
        del st["tmp_shards"], st["labels"]
        st["skipped_file"] = os.path.join(output_dir, f"skipped_{name}.txt")
    total_written = sum(st["num_examples"] for st in stats.values())
    return {
        "input_dir": input_dir,
        "output_dir": output_dir,
        "class_names": class_names,
        "num_classes": len(class_names),
        "splits": stats,
        "num_ignored": len(ignored),
        "ignored": ignored,
        "num_skipped": sum(st["num_skipped"] for st in stats.values()),
        "bytes_written": sum(st["bytes_written"] for st in stats.values()),
        "elapsed_s": elapsed,
        "images_per_s": total_written / max(elapsed, 1e-9),
    }


def _commit(output_dir: str, class_names: list[str],
            stats: dict[str, dict[str, Any]], token: str,
            tmp_files: list[str]) -> None:
    """Moves temporary shards and skipped lists into place and updates
    ``dataset_info.json``.

    Order matters for crash safety: everything that can fail on the content
    (the skipped lists) is written to temporary files first, so a failure
    there leaves the output as it was; then splits being replaced are removed
    from the info file, files are renamed, and the new info is written. At
    no point does the info file list a partial shard.
    """
    info = _read_existing_info(output_dir, class_names) or {
        "format": records.FORMAT_VERSION,
        "class_names": class_names,
        "splits": {},
    }
    skipped_tmp = {}
    for name, st in stats.items():
        skipped_path = os.path.join(output_dir, f"skipped_{name}.txt")
        tmp = _tmp_path(output_dir, os.path.basename(skipped_path), token)
        tmp_files.append(tmp)
        lines = "".join(f"{path}\t{reason}\n" for path, reason in st["skipped"])
        _write_text(tmp, lines)
        skipped_tmp[name] = (tmp, skipped_path)
    if any(name in info["splits"] for name in stats):
        for name in stats:
            info["splits"].pop(name, None)
        _write_info(output_dir, info, token)
    for name, st in stats.items():
        for tmp, final in st["tmp_shards"].items():
            os.replace(tmp, os.path.join(output_dir, final))
        os.replace(*skipped_tmp[name])
        info["splits"][name] = {
            "num_examples": st["num_examples"],
            "shards": st["shards"],
            "num_skipped": st["num_skipped"],
            # its content: a run resumed on a split prepared again (other images, the same
            # count) says so (`tok1d.train.loop.changed_data`)
            "fingerprint": st["fingerprint"],
        }
        if "split_off_from" in st:
            info["splits"][name]["split_off_from"] = st["split_off_from"]
            info["splits"][name]["val_fraction"] = st["val_fraction"]
    info["splits"] = dict(sorted(info["splits"].items()))
    _write_info(output_dir, info, token)
    for name, st in stats.items():
        _remove_stale_shards(output_dir, name, st["shards"])


def _format_bytes(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num < 1000 or unit == "TB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1000
    return f"{num:.1f} TB"


def format_summary(summary: dict[str, Any]) -> str:
    """Formats the dict returned by `prepare` for humans."""
    lines = [f"Prepared {summary['input_dir']} -> {summary['output_dir']}"]
    names = summary["class_names"]
    lines.append(f"  classes: {len(names)} ({_preview(names, 10)})")
    for name, st in summary["splits"].items():
        lines.append(
            f"  {name}: {st['num_examples']} examples written in "
            f"{len(st['shards'])} shard(s), {st['num_skipped']} skipped")
    lines.append(f"  skipped (could not decode): {summary['num_skipped']}")
    for name, st in summary["splits"].items():
        if not st["skipped"]:
            continue
        lines.append(f"    [{name}]")
        for path, reason in st["skipped"][:MAX_LISTED_SKIPPED]:
            lines.append(f"    {path}\t{reason}")
        more = len(st["skipped"]) - MAX_LISTED_SKIPPED
        if more > 0:
            lines.append(f"    ... and {more} more")
        lines.append(f"    full list: {st['skipped_file']}")
    lines.append(f"  ignored (not images, hidden, unreadable, or outside class folders): "
                 f"{summary['num_ignored']}")
    ignored = summary.get("ignored", ())
    kinds = {
        "image files directly in the input folder, not in a class folder":
            [p for p in ignored if "/" not in p and is_image_file(p)],
        "unreadable folders (their images are not in the output)":
            [p for p in ignored if "/ (unreadable: " in p],
        "hidden folders, not read (torchvision's ImageFolder reads them)":
            [p for p in ignored if p.endswith("/")],
        "links into another class's folder, not read twice":
            [p for p in ignored if "/ (a link into class " in p],
        "broken links":
            [p for p in ignored if p.endswith(f" ({_BROKEN_LINK})")]}
    for kind, paths in kinds.items():
        if paths:
            lines.append(f"    of which {kind}: {len(paths)} (e.g. {paths[0]})")
    other = collections.Counter(
        os.path.splitext(p)[1].lower() or "no extension" for p in ignored
        if "/" in p and not p.endswith("/") and not p.rsplit("/", 1)[1].startswith(".")
        and not any(f" ({why}" in p for why in _REASONS))
    if other:
        counts = ", ".join(f"{ext} {n}" for ext, n in other.most_common(8))
        lines.append(f"    of which files of other types, by extension: {counts}"
                     f"{', ...' if len(other) > 8 else ''} (images take "
                     f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    lines.append(f"  bytes written: {_format_bytes(summary['bytes_written'])}")
    lines.append(
        f"  elapsed: {summary['elapsed_s']:.1f} s "
        f"({summary['images_per_s']:.1f} images/s)")
    return "\n".join(lines)

