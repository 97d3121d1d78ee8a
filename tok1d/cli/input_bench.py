r"""`tok1d bench --workload=input`: images per second per CPU core of a recipe's input pipeline,
and of the official loader of the same recipe on the same files.

    tok1d bench --workload=input --config=configs/titok.py:l32_stage1 [--images=256]
        [--batch_size=32] [--steps=10] [--repeats=3] [--workers=0] [--image_folder=DIR]

The files: `--image_folder` (class subfolders of images), or `--images` ImageNet-like JPEGs
written to a temporary folder (`tok1d.data.sources.imagenet_like_jpegs`: photos bundled with
scikit-image at ImageNet's sizes and quality 90). tok1d reads them as `tok1d prepare` writes
them (ArrayRecord) through `tok1d.data.pipeline.train_dataset` (record read, JPEG decode, the
recipe's crop / resize / flip, batching: uint8 batches) with the config's `data.image_size`,
`augment`, `flip`, `min_scale`, `resize_on` (the ImageNet recipes' "device": the host ships
decoded windows and the accelerator resizes them; the table then adds the resize's
milliseconds per image on this process's first device, which the host's rate leaves out;
`--config.data.resize_on=host` measures the host-resizing path); the official loader is
torchvision's `ImageFolder` with the recipe's official transform in a torch `DataLoader`
(`tok1d.official.loaders`; float32 batches, as the official trainers get them), reading the
same files in the same order as tok1d's shuffled stream. Both also run the evaluation
transform (center crop) unless the recipe's own is that.

`--workers=0` (default) runs each pipeline in this process (grain's reading threads; torch
with one intra-op thread, as in a DataLoader worker): "img/s per core" is images / CPU seconds
of the process, which stays meaningful on a loaded machine. `--workers=N` uses N worker
processes (grain `mp_prefetch` / DataLoader workers; -1: `data.num_workers`' auto count, one
per core but one, at most 16) and adds the workers'
CPU time (read from /proc). "wall img/s" is the elapsed-time rate (it depends on the load).
Each measurement runs `--repeats` times after `warmup` batches, from a full prefetch buffer to
a full one (`time_batches`: the rate does not depend on `--steps`); the table gives the run
with the least CPU time. Files of `--image_folder` that cannot be decoded are refused (named),
as the official loader would fail on them. The 1-minute load average is recorded beside the numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from tok1d import errors, summary
from tok1d.data import feeding, pipeline, records, sources
from tok1d.data.prepare import prepare
from tok1d.official import loaders
from tok1d.train import config_lib

CENTER = "center_crop"
SEED = 0  # tok1d's shuffle, whose order the official loader then follows


def write_image_folder(root: str, count: int, seed: int = 0) -> str:
    """`count` ImageNet-like JPEGs in class subfolders of `root` (created); returns `root`."""
    for i, (label, data) in enumerate(sources.imagenet_like_jpegs(count, seed)):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
    return root


def _descendants(pid: int) -> list[int]:
    """Live descendant processes of `pid` (Linux /proc; [] elsewhere)."""
    parents = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (fields := summary.proc_stat(entry)):
                parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def cpu_seconds(pids: Optional[Sequence[int]] = None) -> float:
    """CPU seconds (user + system) of this process, its finished children and its live
    descendants (or the processes `pids`, found once by the caller: the scan of /proc costs
    this process CPU time, ~1 ms per hundred processes on the host)."""
    total = time.process_time()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += child.ru_utime + child.ru_stime
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in _descendants(os.getpid()) if pids is None else pids:
        if fields := summary.proc_stat(pid):
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def device_resize_ms(batch: dict[str, np.ndarray], repeats: int = 3) -> float:
    """Milliseconds per image of `feeding.resize_windows` on this process's first device for one
    host batch of `data.resize_on="device"` windows (best of `repeats` after a compile)."""
    size = pipeline.image_size_of_canvas(batch["image"].shape[1])
    args = [jax.device_put(batch[k]) for k in ("image", "window_box", "window_size",
                                                "window_flip")]
    feeding.resize_windows(*args, out_size=size).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        feeding.resize_windows(*args, out_size=size).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(batch["image"])


class _Poller:
    """The pipeline's CPU seconds (`cpu_seconds` of this process and the worker processes
    `pids`), less what reading them cost this thread: the poller's own CPU is not the
    pipeline's, and would keep it from ever looking idle on a host with many processes."""

    def __init__(self, pids: Sequence[int]):
        self.pids, self.polling = list(pids), 0.0

    def cpu(self) -> float:
        start = time.thread_time()
        total = cpu_seconds(self.pids)
        self.polling += time.thread_time() - start
        return total - self.polling


def wait_idle(poller: _Poller, poll_s: float = 0.05, busy_share: float = 0.1,
              timeout_s: float = 30.0) -> tuple[float, float]:
    """Waits until the pipeline uses less than `busy_share` of a core over `poll_s` (its
    prefetch buffers are full), at most `timeout_s` (then with a warning: the rate includes
    idle time); returns (`poller.cpu()`, `time.perf_counter()` when it was last seen busy)."""
    cpu, busy = poller.cpu(), time.perf_counter()
    deadline = busy + timeout_s
    while True:
        time.sleep(poll_s)
        now_cpu, now = poller.cpu(), time.perf_counter()
        if now_cpu - cpu < busy_share * poll_s:
            return now_cpu, busy
        if now > deadline:
            logging.warning("The input pipeline did not go idle within %.0f s: this rate "
                            "includes time it was not working for the batches timed.",
                            timeout_s)
            return now_cpu, now
        cpu, busy = now_cpu, now


def time_batches(make_batches: Callable[[], Iterator[Any]], batch_size: int, steps: int,
                 warmup: int = 1) -> dict[str, float]:
    """Wall and CPU seconds of `steps` batches of a fresh iterator after `warmup` ones.

    The window runs from a full prefetch buffer to a full one: after the warm-up the pipeline
    is left to fill its buffers, then the clocks start, `steps` batches are taken, and the
    clocks stop when the buffers are full again (the time it was last busy). So the window
    holds the work of exactly `steps` batches, however many the buffers hold: images decoded
    ahead before it would otherwise count for free (a rate that grows as `steps` shrinks)."""
    batches = iter(make_batches())
    for _ in range(warmup):
        next(batches)
    poller = _Poller(_descendants(os.getpid()))  # the worker processes, started by now
    cpu0, _ = wait_idle(poller)
    wall0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    cpu1, wall1 = wait_idle(poller)
    del batches
    return dict(images=batch_size * steps, wall_s=max(wall1 - wall0, 1e-9), cpu_s=cpu1 - cpu0)


@contextlib.contextmanager
def _torch_threads(count: int):
    import torch  # Local import: optional dependency.
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _naming(pipeline_name: str, folder: str):
    """Names the official loader in the errors it raises on `folder`'s files (torch's own
    messages name neither the loader nor that tok1d's side is not at fault)."""
    if pipeline_name != "official":
        yield
        return
    try:
        yield
    except (OSError, ValueError) as e:
        raise errors.UserError(f"The official loader (torchvision's ImageFolder) failed on "
                               f"{folder}: {errors.brief(e)}") from None


def run(config, *, images: int = 256, batch_size: int = 32, steps: int = 10,
        repeats: int = 3, workers: int = 0, image_folder: str = "", official: bool = True,
        warmup: int = 1, log=print) -> list[dict[str, Any]]:
    """Measures tok1d's and the official input pipelines of `config`'s recipe (see the module
    doc); returns (and logs as a table) one row per pipeline and transform."""
    data = config.data
    problems = config_lib.data_problems(data)
    if problems:
        raise config_lib.ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
    if official:  # (before minutes of writing and preparing images)
        try:
            loaders.import_torchvision()
        except ModuleNotFoundError as e:
            raise errors.UserError(f"the official loader needs {e.name} (pip install -e "
                                   "'.[bench]' in tok1d's checkout); --noofficial times "
                                   "tok1d's pipeline alone.") from None
    resize_on = data.resize_on
    augments = [data.augment] + ([CENTER] if data.augment != CENTER else [])
    num_workers = pipeline.resolve_num_workers(workers)
    with tempfile.TemporaryDirectory(prefix="tok1d_input_bench_") as tmp:
        folder = image_folder or write_image_folder(os.path.join(tmp, "jpegs"), images)
        prepared = prepare(folder, os.path.join(tmp, "records"), workers=1)
        skipped = [item for st in prepared["splits"].values() for item in st["skipped"]]
        if skipped:  # tok1d would time the others, torchvision's ImageFolder fail on them
            path, reason = skipped[0]
            raise errors.UserError(
                f"--image_folder={image_folder}: {len(skipped)} file(s) cannot be decoded (e.g. "
                f"{path}: {reason}); both pipelines must time the same files: remove them "
                "(`tok1d prepare` lists them all in OUT/skipped_train.txt).")
        source = records.ArrayRecordImageSource(os.path.join(tmp, "records"), "train")
        if len(source) < batch_size:
            raise ValueError(f"{len(source)} images, fewer than one batch of {batch_size}.")
        # The official loader reads the files tok1d reads, in the same order (a folder's
        # files differ in size, and so in cost).
        stream = pipeline.training_order(source, seed=SEED)
        order = [stream[k]["filename"]
                 for k in range(batch_size * (warmup + steps + 4 + 2 * num_workers))]
        rows = []
        for augment in augments:
            # The evaluation transform (center crop) never flips, in tok1d as upstream.
            kwargs = dict(image_size=data.image_size, augment=augment,
                          flip=data.flip and augment != CENTER, min_scale=data.min_scale)

            def tok1d_batches():
                return pipeline.train_dataset(source, global_batch=batch_size, host_start=0,
                                              host_stop=batch_size, seed=SEED,
                                              num_workers=num_workers, resize_on=resize_on,
                                              **kwargs)
            makers = [("tok1d", tok1d_batches)]
            if official:
                def official_batches():
                    return loaders.official_loader(folder, batch_size=batch_size,
                                                   num_workers=num_workers, order=order,
                                                   **kwargs)
                makers.append(("official", official_batches))
            for name, make in makers:
                threads = _torch_threads(1) if name == "official" and num_workers == 0 else (
                    contextlib.nullcontext())
                with threads, _naming(name, folder):
                    runs = [time_batches(make, batch_size, steps, warmup)
                            for _ in range(repeats)]
                best = min(runs, key=lambda r: r["cpu_s"])
                rows.append(dict(pipeline=name, augment=augment, image_size=data.image_size,
                                 batch=batch_size, workers=num_workers,
                                 images=best["images"], repeats=repeats,
                                 per_core=best["images"] / best["cpu_s"],
                                 wall=best["images"] / best["wall_s"],
                                 load=os.getloadavg()[0], files=len(source),
                                 resize_on=resize_on if name == "tok1d" else "host"))
                if name == "tok1d" and resize_on == "device":
                    rows[-1]["device_ms"] = device_resize_ms(next(iter(make())))
    log(format_rows(rows))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table; "x official" is tok1d's per-core rate over the official one's."""
    official = {r["augment"]: r["per_core"] for r in rows if r["pipeline"] == "official"}
    lines = ["| pipeline | transform | size | batch | workers | img/s per core | wall img/s "
             "| x official | load | resize on | device ms/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['per_core'] / official[r['augment']]:.2f}"
                 if r["pipeline"] == "tok1d" and r["augment"] in official else "")
        lines.append(f"| {r['pipeline']} | {r['augment']} | {r['image_size']} | {r['batch']} | "
                     f"{r['workers']} | {r['per_core']:.0f} | {r['wall']:.0f} | {ratio} | "
                     f"{r['load']:.1f} | {r['resize_on']} | "
                     + (f"{r['device_ms']:.2f}" if "device_ms" in r else "") + " |")
    return "\n".join(lines)
