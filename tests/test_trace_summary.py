"""tok1d.cli.trace_summary: where a profiled call's device time went, from the Perfetto JSON
that jax.profiler writes (a GPU-shaped trace written here; the CPU backend's real trace is
read by test_bench's CLI test)."""

import gzip
import json

import pytest

from tok1d.cli import trace_summary


def _write(path, events):
    path.mkdir(parents=True)
    with gzip.open(path / trace_summary.TRACE_FILE, "wt", encoding="utf-8") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def _meta(pid, tid, process, thread):
    return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}]


def _op(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_gpu_trace_per_call_busy_time_launches_and_top_ops(tmp_path):
    events = (_meta(1, 1, "/device:GPU:0", "XLA Ops") + _meta(1, 2, "/device:GPU:0",
                                                               "Stream #7(Compute)")
              + _meta(9, 5, "/host:CPU", "python"))
    for call in range(2):  # two calls, 1000 us apart
        t = 1000.0 * call
        events += [_op(1, 1, "fusion.1", t, 100), _op(1, 1, "loop_add_fusion.3", t + 100, 50),
                   _op(1, 1, "loop_add_fusion.7", t + 300, 30),
                   _op(1, 1, "cublas-gemm.2", t + 250, 100)]  # overlaps the add: union counts once
        events += [_op(1, 2, "kernel", t + i * 10, 5) for i in range(6)]
    events.append(_op(9, 5, "PjitFunction(step)", 0, 2000))  # host events are not device time
    _write(tmp_path / "plugins" / "profile" / "run", events)
    s = trace_summary.summarize(str(tmp_path), calls=2, top=3)
    assert s["busy_ms"] == pytest.approx(0.15 + 0.1)  # [0,150) + [250,350) per call
    assert s["span_ms"] == pytest.approx((1350 - 0) / 2 / 1000)
    assert s["ops"] == 4 and s["launches"] == 6
    assert [name for name, _, _ in s["top_ops"]] == ["fusion.1", "cublas-gemm.2",
                                                     "loop_add_fusion.3"]
    assert s["top_kinds"][0] == ("fusion", pytest.approx(0.1), 1)
    assert ("loop_add_fusion", pytest.approx(0.08), 2) in s["top_kinds"]
    text = trace_summary.format_summary(s)
    assert "busy 0.25 ms" in text and "6 kernel launches" in text and "| fusion.1 | 0.100 |" in text


def test_no_trace_or_no_device_ops_gives_none(tmp_path):
    assert trace_summary.summarize(str(tmp_path), calls=1) is None
    _write(tmp_path / "run", _meta(9, 5, "/host:CPU", "python")
           + [_op(9, 5, "PjitFunction(step)", 0, 10)])
    assert trace_summary.summarize(str(tmp_path), calls=1) is None


def test_op_kind_drops_the_instance_number():
    assert trace_summary.op_kind("loop_add_fusion.12") == "loop_add_fusion"
    assert trace_summary.op_kind("ynn_fusion") == "ynn_fusion"
    assert trace_summary.op_kind("input_reduce_fusion_3") == "input_reduce_fusion"
