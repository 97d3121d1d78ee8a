"""Where the device's time went, read from a `jax.profiler` trace: the text `tok1d bench
--profile DIR` prints after its table, so that a profile can be read on a machine without
TensorBoard, or brought back from a remote one as a few lines.

The trace is the Perfetto / Chrome JSON that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes (`DIR/plugins/profile/RUN/perfetto_trace.json.gz`). Its processes are the profiler's
planes: an accelerator's is named "/device:GPU:0" (or TPU), with one thread per line: "XLA Ops"
(one event per HLO op executed, fusions included), "XLA Modules", and one per CUDA stream
("Stream #N(...)", one event per kernel or copy). On the CPU backend the ops run on XLA's worker
threads of the host plane instead; they stand in for the device there.

`summarize(DIR, calls)` gives, per timed call: the device's busy time (the union of its op
events) against the span from the first to the last op, the number of ops (and of stream
events, i.e. launches, where there are streams), and the ops and op kinds that took the most
time, so that "launch-bound", "one fusion dominates" or "the device waits" can be read off."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Iterable, Optional

TRACE_FILE = "perfetto_trace.json.gz"
_HOST_BOOKKEEPING = ("ThreadpoolListener", "ThunkExecutor", "end: ")


def find_trace(log_dir: str) -> Optional[str]:
    """The newest Perfetto trace under `log_dir` (None if there is none)."""
    paths = glob.glob(os.path.join(log_dir, "**", TRACE_FILE), recursive=True)
    return max(paths, key=os.path.getmtime) if paths else None


def load_events(path: str) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def op_kind(name: str) -> str:
    """An op's kind: its HLO name without the instance number ("loop_add_fusion.12" ->
    "loop_add_fusion")."""
    return re.sub(r"[._]\d+$", "", name)


def _busy(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def lines(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(op events, stream events) of the trace: the accelerator planes' "XLA Ops" and stream
    lines, or, without an accelerator plane, the host's XLA worker threads (as ops)."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    if devices:
        ops = [e for e in complete if e["pid"] in devices
               and thread.get((e["pid"], e.get("tid")), "") == "XLA Ops"]
        streams = [e for e in complete if e["pid"] in devices
                   and thread.get((e["pid"], e.get("tid")), "").startswith("Stream")]
        if not ops:  # a plane without the derived op line: its kernels stand in
            ops = streams
        return ops, streams
    ops = [e for e in complete if "XLA" in thread.get((e["pid"], e.get("tid")), "")
           and not e["name"].startswith(_HOST_BOOKKEEPING)]
    return ops, []


def summarize(log_dir: str, calls: int, top: int = 12) -> Optional[dict[str, Any]]:
    """Per-call figures of the newest trace under `log_dir` that covers `calls` timed calls
    (None without a trace or without op events): `busy_ms`, `span_ms`, `ops`, `launches`
    (None without streams), `top_ops` and `top_kinds` as (name, ms per call, count per call)."""
    path = find_trace(log_dir)
    if path is None:
        return None
    ops, streams = lines(load_events(path))
    if not ops:
        return None
    calls = max(calls, 1)
    to_ms = 1e-3 / calls  # trace times are in microseconds
    start = min(e["ts"] for e in ops)
    end = max(e["ts"] + e["dur"] for e in ops)
    by_name, by_kind = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(
        lambda: [0.0, 0])
    for e in ops:
        for table, key in ((by_name, e["name"]), (by_kind, op_kind(e["name"]))):
            table[key][0] += e["dur"]
            table[key][1] += 1

    def ranked(table):
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:top]
        return [(name, d * to_ms, n / calls) for name, (d, n) in rows]
    return dict(trace=path, calls=calls,
                busy_ms=_busy((e["ts"], e["ts"] + e["dur"]) for e in ops) * to_ms,
                span_ms=(end - start) * to_ms, ops=len(ops) / calls,
                launches=len(streams) / calls if streams else None,
                top_ops=ranked(by_name), top_kinds=ranked(by_kind))


def format_summary(s: dict[str, Any]) -> str:
    busy = s["busy_ms"]
    head = (f"profile ({s['calls']} calls, {s['trace']}): per call the device was busy "
            f"{busy:.2f} ms of a {s['span_ms']:.2f} ms span ({busy / max(s['span_ms'], 1e-9):.0%}); "
            f"{s['ops']:.0f} ops")
    if s["launches"] is not None:
        head += f", {s['launches']:.0f} kernel launches and copies"
    out = [head]
    for title, rows in (("op", s["top_ops"]), ("op kind", s["top_kinds"])):
        out.append(f"| {title} | ms per call | share of busy | count per call |")
        out.append("|---|---|---|---|")
        out.extend(f"| {name} | {ms:.3f} | {ms / max(busy, 1e-9):.1%} | {n:g} |"
                   for name, ms, n in rows)
    return "\n".join(out)
