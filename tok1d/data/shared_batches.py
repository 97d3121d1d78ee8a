"""Image batches from grain's worker processes through reused shared memory.

grain's `mp_prefetch` hands every batch to the training process in a new shared-memory segment,
whose pages the kernel allocates and zeroes once per batch: for the 528-px window canvases of a
256-px recipe (27 MB a batch of 32) that is 0.6 ms of system time per image on a 2-core VM, a
fifth of a worker's whole cost, and what kept the worker processes from 2x the official loader
(benchmarks/RESULTS.md). Here the training process creates one ring of slots per worker before
the workers start; a worker stacks each batch's images straight into a free slot of its ring
(lowest first, so few slots are ever touched) and sends the slot's number in their place; the
training process copies the images out as the batch comes off grain's queue and frees the slot.
A slot's pages are allocated once, on its first use. Everything else in the batch (labels,
masks, window geometry) travels as grain sends it.

The rings are made for each iteration (`SharedBatches.__iter__`) and unlinked when its iterator
is collected; the resource tracker shared by the workers removes them if the process dies first.
Where SHM_DIR has too little room for the rings (a container's default 64 MB), or is not there
(not Linux), grain's own segments carry the batches. A worker finding every slot of its ring
taken waits for the training process to free one: its slots outnumber the batches it can hold
(its reading threads' buffers, grain's queues, the batch being taken).
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import threading
import time
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence

import grain
import numpy as np

TICKET = "_shared_slot"  # (worker, slot, *image shape) in place of the batch's "image"
HEADER_BYTES = 4096  # the slots' states (0 free, 1 written), then the slots, page aligned
EXTRA_SLOTS = 4  # beyond the reading threads' buffers: grain's queue, the batch being taken
_WAIT_S = 0.0005
SLOT_WAIT_LIMIT_S = 120.0
SHM_DIR = "/dev/shm"

PREFETCH_PER_THREAD = 2
# Arrays of a worker's batch below this size go through grain's queue, not a new shared-memory
# segment each: labels, masks, the crops' geometry, the ring's ticket (a segment costs ~0.25 ms
# to make, map and unlink; the queue carries 128 KiB as fast, measured in benchmarks/RESULTS.md).
MIN_SHM_BYTES = 128 << 10

_worker_index: int | None = None  # set in each grain worker process by `_set_worker`
_attached: dict[str, tuple[shared_memory.SharedMemory, np.ndarray]] = {}
_slot_lock = threading.Lock()


def iterate_batches(batches: grain.MapDataset, *, num_threads: int, num_workers: int = 0,
                    worker_init_fn: Callable[[int, int], None] | None = None
                    ) -> grain.IterDataset:
    """Iterates a MapDataset of whole batches with `num_threads` reading threads in each
    process (this one, or each of `num_workers` grain worker processes, which take every
    `num_workers`-th batch), each thread PREFETCH_PER_THREAD batches ahead. The buffer counts
    batches: the pipelines' earlier 64 (meant as examples) held 64 batches of 32 canvases, 1.7
    GB, in every process once training ran slower than the input (benchmarks/RESULTS.md).
    The workers end when the training process is gone (`_start_worker`)."""
    it = batches.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=PREFETCH_PER_THREAD * max(num_threads, 1)))
    if num_workers > 0:
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES))
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                            worker_init_fn=functools.partial(_start_worker,
                                                             then=worker_init_fn))
    return it


PARENT_POLL_S = 1.0


def _start_worker(index: int, count: int,
                  then: Callable[[int, int], None] | None = None) -> None:
    """A grain worker's start: a thread that ends the worker once the process that started it
    is gone (killed, `kill -9`: its workers lived on, holding their memory, the shared-memory
    segments and the dead run's output pipes, which kept e.g. `| tee` waiting), then `then`."""
    # The parent's end of a pipe closes when it dies, also if that was before this worker got
    # here (the parent's pid, read now, is then init's: a worker that started slowly lived on).
    parent = multiprocessing.parent_process()
    sentinels = [] if parent is None else [parent.sentinel]
    first = os.getppid()

    def watch() -> None:
        while (not multiprocessing.connection.wait(sentinels, timeout=PARENT_POLL_S)
               and os.getppid() == first):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="tok1d-parent-watch", daemon=True).start()
    if then is not None:
        then(index, count)


def shm_free_bytes() -> int | None:
    """Free bytes in SHM_DIR, where POSIX shared memory lives on Linux (None elsewhere)."""
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None


def _set_worker(index: int, count: int) -> None:
    del count
    global _worker_index
    _worker_index = index


def _attach(name: str, slots: int) -> tuple[shared_memory.SharedMemory, np.ndarray]:
    with _slot_lock:  # (the worker's reading threads)
        if name not in _attached:
            shm = shared_memory.SharedMemory(name)
            _attached[name] = shm, np.ndarray((slots,), np.uint8, buffer=shm.buf)
        return _attached[name]


def place(images: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Stacks `images` into `out` (n, H, W, C): each at the top left of its row, the rest of
    the row zero (`pipeline.window`'s pixels in their canvas; an image of the full shape is
    simply copied)."""
    for row, image in zip(out, images):
        h, w = image.shape[:2]
        row[:h, :w] = image
        row[h:] = 0
        row[:h, w:] = 0
    return out


class Stack:
    """grain's `batch_fn` of the image pipelines: labels, masks and window geometry stacked as
    grain's default does, "image" (uint8 examples of at most `image_shape`, see `place`)
    stacked into a (rows, *image_shape) array: in a grain worker process given `rings` (the
    names of `_Rings`, `slots` each), in a free slot of its ring, replaced by the slot's
    ticket; elsewhere in memory of its own."""

    def __init__(self, image_shape: Sequence[int], names: Sequence[str] = (), slots: int = 0):
        self.image_shape, self.names, self.slots = tuple(image_shape), list(names), slots

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = {key: np.stack([e[key] for e in elements])
                 for key in elements[0] if key != "image"}
        shape = (len(elements),) + self.image_shape
        images = [e["image"] for e in elements]
        if _worker_index is None or not self.names:
            batch["image"] = place(images, np.empty(shape, np.uint8))
            return batch
        shm, states = _attach(self.names[_worker_index], self.slots)
        slot = self._take(states)
        slot_bytes = _slot_bytes(len(elements), self.image_shape)
        place(images, np.ndarray(shape, np.uint8, buffer=shm.buf,
                                 offset=HEADER_BYTES + slot * slot_bytes))
        batch[TICKET] = np.asarray((_worker_index, slot) + shape, np.int64)
        return batch

    @staticmethod
    def _take(states: np.ndarray) -> int:
        deadline = time.monotonic() + SLOT_WAIT_LIMIT_S
        while True:
            with _slot_lock:  # this worker's reading threads share its ring
                free = np.flatnonzero(states == 0)
                if free.size:
                    states[free[0]] = 1
                    return int(free[0])
            if time.monotonic() > deadline:  # (never in use: at most 9 of 12 slots are held)
                raise RuntimeError(
                    "No free shared-memory slot for an input batch: batches were dropped "
                    "without being taken (grain's set_state?); restart the pipeline at a "
                    "batch with start_batch instead.")
            time.sleep(_WAIT_S)


def _slot_bytes(rows: int, image_shape: Sequence[int]) -> int:
    return rows * math.prod(image_shape)


def _ring_bytes(slots: int, rows: int, image_shape: Sequence[int]) -> int:
    """The size of one worker's ring: the slots' states, then `slots` batches."""
    return HEADER_BYTES + slots * _slot_bytes(rows, image_shape)


class _Rings:
    """The training process's side: one ring of `slots` batches of `rows` uint8 images of
    `image_shape` per worker; `take` copies a batch's images out of its slot and frees it."""

    def __init__(self, workers: int, slots: int, rows: int, image_shape: Sequence[int]):
        self.slots, self.slot_bytes = slots, _slot_bytes(rows, image_shape)
        size = _ring_bytes(slots, rows, image_shape)
        self.shms = [shared_memory.SharedMemory(create=True, size=size) for _ in range(workers)]
        self.states = [np.ndarray((slots,), np.uint8, buffer=s.buf) for s in self.shms]
        for states in self.states:
            states[:] = 0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.shms]

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        if TICKET not in batch:
            return batch
        ticket = [int(v) for v in batch.pop(TICKET)]
        worker, slot, shape = ticket[0], ticket[1], tuple(ticket[2:])
        view = np.ndarray(shape, np.uint8, buffer=self.shms[worker].buf,
                          offset=HEADER_BYTES + slot * self.slot_bytes)
        batch["image"] = view.copy()
        del view  # (the buffer cannot close while a view of it lives)
        self.states[worker][slot] = 0
        return batch


_reserved = [0]  # bytes of SHM_DIR the live rings may fill (their pages come on first use)


def _close(shms: list[shared_memory.SharedMemory], states: list[np.ndarray],
           reserved: int) -> None:
    _reserved[0] -= reserved
    states.clear()
    for shm in shms:
        try:
            shm.close()
        except BufferError:  # a view still lives; the name goes all the same
            pass
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class SharedBatches:
    """Iterates the MapDataset of whole batches that `make(batch_fn)` builds (batches of
    `rows` examples whose uint8 "image" is at most `image_shape`, `Stack`) with `num_workers`
    grain worker processes (`iterate_batches`' threads and buffers), the images through reused
    shared memory (see the module doc). Each iteration starts its own workers and rings, as a
    grain dataset does."""

    def __init__(self, make: Callable[[Callable[[Sequence[Any]], Any]], grain.MapDataset], *,
                 rows: int, image_shape: Sequence[int], num_workers: int, num_threads: int):
        self._make, self._rows, self._image_shape = make, rows, tuple(image_shape)
        self._workers, self._threads = num_workers, num_threads

    def __iter__(self):
        slots = 2 * PREFETCH_PER_THREAD * self._threads + EXTRA_SLOTS
        needed = self._workers * _ring_bytes(slots, self._rows, self._image_shape)
        free = shm_free_bytes()
        if free is not None:  # (other live rings' untouched pages are spoken for)
            free -= _reserved[0]
        if free is None or free < needed:
            if free is not None:
                logging.warning(
                    "The input workers' shared batches need %.1f GB of %s, which has %.1f GB "
                    "free: each batch goes through a new shared-memory segment instead (slower; "
                    "in a container, give it more, e.g. docker run --shm-size=16g).",
                    needed / 1e9, SHM_DIR, free / 1e9)
            return iter(iterate_batches(self._make(Stack(self._image_shape)),
                                        num_threads=self._threads, num_workers=self._workers))
        rings = _Rings(self._workers, slots, self._rows, self._image_shape)
        it = iterate_batches(self._make(Stack(self._image_shape, rings.names, slots)),
                             num_threads=self._threads, num_workers=self._workers,
                             worker_init_fn=_set_worker)
        iterator = iter(it.map(rings.take))
        _reserved[0] += needed
        weakref.finalize(iterator, _close, rings.shms, rings.states, needed)
        iterator.set_state = _no_set_state  # (batches it drops would keep their slots)
        return iterator


def _no_set_state(state) -> None:
    del state
    raise NotImplementedError("The input workers' iterator cannot be restored with set_state "
                              "(its shared-memory slots would stay taken); start the pipeline "
                              "at a batch with start_batch instead, as tok1d's resume does.")
