"""Metric writing and progress reporting without TensorFlow.

`MetricWriter` writes TensorBoard event files using only the `tensorboard`
package (protos + record framing) and mirrors scalars to a JSON-lines file.
Event files are written by a small synchronous writer instead of
`EventFileWriter`, because the latter resolves `tensorboard.compat.tf`, which
imports TensorFlow whenever it is installed.

`ProgressReporter` prints compact one-line progress reports with steps/s,
images/s and ETA, excluding time spent in pauses (eval, checkpointing).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from tok1d import images as image_lib

__all__ = ["MetricWriter", "ProgressReporter", "flatten", "format_duration", "format_number",
           "format_rate"]

_file_uid = itertools.count()


# ---------------------------------------------------------------------------
# Value conversion helpers.
# ---------------------------------------------------------------------------


def _json_float(value: Any) -> float | str:
    """float(value), with non-finite values as "nan" / "inf" / "-inf"."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _json_value(value: Any) -> Any:
    """Makes a hyperparameter value JSON-serialisable (else str(value))."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return _json_float(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        try:
            json.dumps(items, allow_nan=False)
            return items
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested mappings into a single dict with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=name + "."))
        else:
            flat[name] = _json_value(value)
    return flat


def _markdown_table(flat: Mapping[str, Any]) -> str:
    """Renders a flat mapping as a two-column Markdown table."""

    def cell(x: Any) -> str:
        text = x if isinstance(x, str) else json.dumps(x)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| name | value |", "|---|---|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in flat.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# TensorBoard event file.
# ---------------------------------------------------------------------------


class _EventFile:
    """Synchronous TensorBoard event file writer (no TensorFlow needed)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = "events.out.tfevents.%010d.%s.%s.%s" % (
            time.time(),
            socket.gethostname(),
            os.getpid(),
            next(_file_uid),
        )
        self.path = os.path.join(logdir, name)
        self._writer = RecordWriter(open(self.path, "wb"))
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())

    def add_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        summary = summary_pb2.Summary(value=values)
        self.add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if not self._writer.closed:
            self._writer.close()


# ---------------------------------------------------------------------------
# MetricWriter.
# ---------------------------------------------------------------------------


def _jsonl_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line that is not a whole record."""
    try:
        return int(json.loads(line)["step"]) if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


class MetricWriter:
    """Writes scalars, images, texts and hparams to TensorBoard + JSON files.

    Files written under `logdir`:
      * `events.out.tfevents.*`: TensorBoard summaries.
      * `metrics.jsonl` (`jsonl_name`): one JSON object per `write_scalars`
        call, e.g. `{"step": 10, "loss": 0.1}`; non-finite values are the
        strings "nan", "inf", "-inf".
      * `hparams.json`: flat (dotted keys) hyperparameters.

    With `enabled=False` (e.g. on JAX processes other than 0) every method is
    a no-op and nothing is created on disk.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True, jsonl_name: str = "metrics.jsonl"):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self.jsonl_path = os.path.join(self.logdir, jsonl_name)
        self._events = _EventFile(self.logdir) if enabled else None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes scalar summaries and appends one line to the JSONL file."""
        if self._events is None:
            return
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        self._events.add_summary(step, values)
        record = {"step": int(step)}
        record.update({tag: _json_float(v) for tag, v in scalars.items()})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def resume_at(self, step: int) -> None:
        """A run (re)starting from its checkpoint at `step` (0: none): the records of later
        steps, written before the run stopped (a hard kill after its last checkpoint), are
        dropped from the JSONL file (with a line cut short by the kill) and, for TensorBoard,
        purged by a session-start event at step + 1 (TensorBoard's loader drops the events of
        steps from there on, except at the first start event it sees: so every run writes
        one, and a resume two, for runs whose first session wrote none); the run writes those
        steps again."""
        if self._events is None:
            return
        for _ in range(2 if step else 1):
            self._events.add(event_pb2.Event(
                wall_time=time.time(), step=int(step) + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        if not os.path.exists(self.jsonl_path):
            return
        with open(self.jsonl_path, encoding="utf-8") as f:
            lines = f.readlines()
        steps = [_jsonl_step(line) for line in lines]  # (each line parsed once)
        kept = [line for line, s in zip(lines, steps) if s is not None and s <= step]
        if len(kept) < len(lines):
            tmp = f"{self.jsonl_path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.jsonl_path)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes PNG image summaries.

        Each image is HxWxC (C in 1, 3, 4) or HxW, uint8 or float in [0, 1].
        """
        if self._events is None:
            return
        values = []
        for tag, image in images.items():
            image = image_lib.to_uint8(image)
            if image.ndim == 2:
                image = image[:, :, None]
            height, width, channels = image.shape
            proto = summary_pb2.Summary.Image(
                height=height,
                width=width,
                colorspace=channels,
                encoded_image_string=image_lib.encode_png(image),
            )
            values.append(summary_pb2.Summary.Value(tag=tag, image=proto))
        self._events.add_summary(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes text summaries (rendered as Markdown by TensorBoard)."""
        if self._events is None:
            return
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        values = []
        for tag, text in texts.items():
            tensor = tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                string_val=[str(text).encode("utf-8")],
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),  # scalar
            )
            values.append(summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))
        self._events.add_summary(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes `hparams.json` (flat, dotted keys) and an "hparams" text table."""
        if self._events is None:
            return
        flat = flatten(hparams)
        with open(os.path.join(self.logdir, "hparams.json"), "w") as f:
            json.dump(flat, f, indent=2, allow_nan=False)
            f.write("\n")
        self.write_texts(0, {"hparams": _markdown_table(flat)})

    def flush(self) -> None:
        """Flushes pending events to disk."""
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """Flushes and closes the event file; later writes are ignored."""
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Progress reporting.
# ---------------------------------------------------------------------------


def proc_stat(pid: int | str = "self") -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 on: state, ppid, ...;
    Linux), [] where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_age() -> float | None:
    """Seconds since this process started, interpreter start and imports included (Linux:
    /proc/self/stat's start time against /proc/uptime), None where that cannot be read."""
    try:
        started = float(proc_stat()[19])  # field 22: starttime, in clock ticks after boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def format_duration(secs: float) -> str:
    """Formats seconds compactly: "45s", "11m20s", "1h02m" ("?" if unknown)."""
    if secs is None or not math.isfinite(secs):
        return "?"
    secs = max(0, int(round(secs)))
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def format_number(x: float) -> str:
    """Formats a metric with 4 significant digits: "21.30", "1.234e-02"."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) < 0.1:
        return f"{x:.3e}"
    return f"{x:#.4g}".rstrip(".")


def format_rate(x: float) -> str:
    """Formats a rate (img/s, steps/s): one decimal, two significant digits under 1 ("0.021",
    where "0.0" said nothing on a slow machine)."""
    return f"{x:.1f}" if x >= 1 or x == 0 else f"{x:.2g}"


class ProgressReporter:
    """Prints one-line progress reports with throughput and ETA.

    Rates are measured between consecutive reports (the first interval starts
    at construction, at `first_step`), excluding time spent paused via
    `pause()`/`resume()` or `timed_pause()`. "elapsed" is wall time since
    construction, pauses included.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        batch_size: int,
        every_steps: int = 0,
        every_secs: float = 30.0,
        print_fn: Callable[[str], Any] = print,
        first_step: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = int(total_steps)
        self.batch_size = int(batch_size)
        self.every_steps = int(every_steps)
        self.every_secs = float(every_secs)
        self.print_fn = print_fn
        self._clock = clock
        self._start_time = clock()
        self._last_time = self._start_time
        self._last_step = int(first_step)
        self._paused_secs = 0.0  # Paused time since the last report.
        self._pause_depth = 0
        self._pause_start = 0.0

    # -- pausing ------------------------------------------------------------

    def pause(self) -> None:
        """Stops counting time (nested calls need matching `resume()`s)."""
        if self._pause_depth == 0:
            self._pause_start = self._clock()
        self._pause_depth += 1

    def resume(self) -> None:
        """Resumes counting time after `pause()`."""
        if self._pause_depth == 0:
            raise RuntimeError("resume() called without pause()")
        self._pause_depth -= 1
        if self._pause_depth == 0:
            self._paused_secs += self._clock() - self._pause_start

    @contextlib.contextmanager
    def timed_pause(self) -> Iterator[None]:
        """Context manager excluding its body's time from the rates."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    # -- reporting ----------------------------------------------------------

    def _is_due(self, step: int, now: float) -> bool:
        if step == self.total_steps:
            return True
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        return self.every_secs > 0 and now - self._last_time >= self.every_secs

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> dict[str, float] | None:
        """Prints a report if one is due; returns its rates or None.

        Returns a dict with `steps_per_sec`, `images_per_sec` and `eta_secs`
        when a line was printed.
        """
        step = int(step)
        now = self._clock()
        if step <= self._last_step or not self._is_due(step, now):
            return None
        paused = self._paused_secs
        if self._pause_depth:
            paused += now - self._pause_start
        active_secs = now - self._last_time - paused
        steps = step - self._last_step
        steps_per_sec = steps / active_secs if active_secs > 0 else math.nan
        eta_secs = max(self.total_steps - step, 0) / steps_per_sec if steps_per_sec > 0 else math.nan
        result = {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.batch_size,
            "eta_secs": eta_secs,
        }

        width = len(str(self.total_steps))
        percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
        parts = [f"step {step:>{width}d}/{self.total_steps} ({percent:.1f}%)"]
        parts += [f"{name} {format_number(value)}" for name, value in (metrics or {}).items()]
        parts += [
            f"{result['steps_per_sec']:.4g} steps/s",
            f"{result['images_per_sec']:.4g} img/s",
            f"ETA {format_duration(eta_secs)}",
            f"elapsed {format_duration(now - self._start_time)}",
        ]
        self.print_fn(" | ".join(parts))

        self._last_time = now
        self._last_step = step
        self._paused_secs = 0.0
        if self._pause_depth:
            self._pause_start = now
        return result
