"""End-to-end checkpoint / resume tests of `python -m tok1d.main` on configs/tiny_test.py.

All runs use 8 fake CPU devices (conftest). One uninterrupted 12-step run (`reference`, shared
by the module) is the ground truth; the other tests preempt, resume, blow up or mismatch runs
and compare against it. The last test checks the grain iterator's determinism in-process.

Exactness: a resumed run must reproduce the reference's per-step train metrics bit for bit
(== on the float32 values written to metrics.jsonl); no tolerance is used.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading

import numpy as np
import pytest

from conftest import REPO, main_command, subprocess_env

CONFIG = "configs/tiny_test.py"
TOTAL = 12
EVERY = 4
BASE = (f"--config.total_steps={TOTAL}", f"--config.checkpoint.every_steps={EVERY}")
RUN_TIMEOUT = 300  # seconds per subprocess (a cold compile on 2 CPU cores takes ~30 s)

PROGRESS_RE = re.compile(r"^step\s+(\d+)/(\d+)\b")
STARTED_RE = re.compile(r"^step (\d+) started: .* in ([\d.]+) s beside creating or restoring the "
                        r"state \(trace \+ lowering [\d.]+ s, XLA [\d.]+ s; state restored in "
                        r"[\d.]+ s; first call [\d.]+ s\), ([\d.]+) s after the process "
                        r"started$", re.M)
STOPPED_RE = re.compile(r"Stopped by a preemption signal at step (\d+)")
NONFINITE_RE = re.compile(r"NaN/Inf at step (\d+)")


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------

def run_main(workdir: str, *overrides: str, timeout: float = RUN_TIMEOUT
             ) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(CONFIG, workdir, *overrides), env=subprocess_env(8),
                          capture_output=True, text=True, timeout=timeout)


def describe(proc) -> str:
    """The tail of a finished process's output, for assertion messages."""
    out = getattr(proc, "stdout", "") or ""
    err = getattr(proc, "stderr", "") or ""
    return f"rc={proc.returncode}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"


def run_and_preempt(workdir: str, *overrides: str, at_step: int,
                    sig: int = signal.SIGTERM) -> tuple[int, str, str, list[int]]:
    """Starts a run, sends `sig` once a progress line shows step >= at_step.

    Returns (exit code, stdout, stderr, the steps of the progress lines seen)."""
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(main_command(CONFIG, workdir, *overrides), env=subprocess_env(8),
                                stdout=subprocess.PIPE, stderr=err_file, text=True, bufsize=1)
        watchdog = threading.Timer(RUN_TIMEOUT, proc.kill)
        watchdog.start()
        lines, steps, sent = [], [], False
        try:
            for line in proc.stdout:
                lines.append(line)
                m = PROGRESS_RE.match(line)
                if m:
                    steps.append(int(m.group(1)))
                    if not sent and int(m.group(1)) >= at_step:
                        proc.send_signal(sig)
                        sent = True
            rc = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err_file.seek(0)
        stderr = err_file.read()
    assert sent, f"never saw a progress line with step >= {at_step}:\n{''.join(lines)}\n{stderr[-3000:]}"
    return rc, "".join(lines), stderr, steps


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints (orbax's temporary directories excluded)."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def train_records(workdir: str) -> list[dict]:
    """The train lines of metrics.jsonl, in file order (eval lines have no train/loss)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "train/loss" in r]


def deterministic_values(record: dict) -> dict:
    """The train metrics that must be reproducible (timings excluded)."""
    return {k: v for k, v in record.items() if k.startswith("train/")
            and not k.startswith("train/perf/")}


def as_float(v) -> float:
    return float(v)  # non-finite values are written as the strings "nan" / "inf" / "-inf"


def by_step(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(int(r["step"]), []).append(r)
    return out


def copy_workdir(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def tree_listing(root: str) -> dict[str, int]:
    """Relative path -> size of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


# ----------------------------------------------------------------------------------------------
# The reference: one uninterrupted run.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("resume") / "reference")
    proc = run_main(wd, *BASE)
    assert proc.returncode == 0, describe(proc)
    records = train_records(wd)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, TOTAL + 1)), steps
    assert checkpoint_steps(wd) == [4, 8, 12]
    with open(os.path.join(wd, "metrics.json")) as f:
        final = json.load(f)
    return dict(workdir=wd, records={r["step"]: r for r in records}, final=final)


def assert_matches_reference(workdir: str, reference: dict, steps=range(1, TOTAL + 1)) -> None:
    got = by_step(train_records(workdir))
    for step in steps:
        assert step in got, f"step {step} never logged in {workdir}: {sorted(got)}"
        want = deterministic_values(reference["records"][step])
        for occurrence, rec in enumerate(got[step]):
            have = deterministic_values(rec)
            assert have.keys() == want.keys(), (step, sorted(have), sorted(want))
            for key in want:
                # Bitwise: the float32 values written by both runs must be identical.
                assert have[key] == want[key], (
                    f"step {step} (occurrence {occurrence}) {key}: resumed {have[key]!r} != "
                    f"uninterrupted {want[key]!r}")


# ----------------------------------------------------------------------------------------------
# 1. Exact resume after SIGTERM.
# ----------------------------------------------------------------------------------------------

def test_resume_after_sigterm_is_exact(reference, tmp_path):
    wd = str(tmp_path / "preempted")
    rc, out, err, seen = run_and_preempt(wd, *BASE, at_step=6)
    assert rc == 0, f"rc={rc}\n{out}\n{err[-3000:]}"
    m = STOPPED_RE.search(out)
    assert m, f"no preemption message:\n{out}\n{err[-3000:]}"
    stopped = int(m.group(1))
    assert 6 <= stopped <= TOTAL, stopped
    assert max(seen) == stopped, (seen, stopped)
    assert stopped in checkpoint_steps(wd), (stopped, checkpoint_steps(wd))
    assert not os.path.exists(os.path.join(wd, "metrics.json")), "a preempted run finished eval"
    assert [r["step"] for r in train_records(wd)] == list(range(1, stopped + 1))

    proc = run_main(wd, *BASE)
    assert proc.returncode == 0, describe(proc)
    assert not STOPPED_RE.search(proc.stdout), describe(proc)
    assert "re-laid out" not in proc.stdout + proc.stderr  # the straight restore
    assert "Warning: resuming" not in proc.stdout  # the same model settings
    resumed_steps = [int(m.group(1)) for m in map(PROGRESS_RE.match, proc.stdout.splitlines()) if m]
    if stopped < TOTAL:
        assert resumed_steps and resumed_steps[0] == stopped + 1, resumed_steps
        started = STARTED_RE.search(proc.stdout)
        assert started and int(started.group(1)) == stopped + 1, describe(proc)
        assert 0 < float(started.group(2)) < float(started.group(3)), started.group(0)
    assert checkpoint_steps(wd)[-1] == TOTAL

    assert_matches_reference(wd, reference)
    with open(os.path.join(wd, "metrics.json")) as f:
        final = json.load(f)
    assert final["step"] == reference["final"]["step"] == TOTAL
    assert final["psnr"] == reference["final"]["psnr"], (final, reference["final"])
    assert final["l2"] == reference["final"]["l2"], (final, reference["final"])


def test_sigterm_during_first_steps(tmp_path):
    """A SIGTERM at the very first logged step still saves a complete checkpoint (state and
    data iterator) and exits 0. (Restoring is covered by the test above; not repeated here to
    keep the module fast.)"""
    wd = str(tmp_path / "early")
    rc, out, err, _ = run_and_preempt(wd, *BASE, at_step=1)
    assert rc == 0, f"rc={rc}\n{out}\n{err[-3000:]}"
    m = STOPPED_RE.search(out)
    assert m, f"no preemption message:\n{out}\n{err[-3000:]}"
    stopped = int(m.group(1))
    assert 1 <= stopped < TOTAL, stopped
    assert checkpoint_steps(wd) == [stopped], checkpoint_steps(wd)
    items = os.listdir(os.path.join(wd, "checkpoints", str(stopped)))
    assert "state" in items, items
    assert [r["step"] for r in train_records(wd)] == list(range(1, stopped + 1))
    assert not os.path.exists(os.path.join(wd, "metrics.json"))


# ----------------------------------------------------------------------------------------------
# 2. Resuming a finished run is a no-op.
# ----------------------------------------------------------------------------------------------

def test_rerun_of_finished_run_trains_nothing(reference, tmp_path):
    wd = copy_workdir(reference["workdir"], str(tmp_path / "finished"))
    before = train_records(wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        logged = f.read()
    ckpts_before = checkpoint_steps(wd)
    proc = run_main(wd, *BASE)
    assert proc.returncode == 0, describe(proc)
    assert "Nothing to do" in proc.stdout, describe(proc)
    assert not any(PROGRESS_RE.match(line) for line in proc.stdout.splitlines()), describe(proc)
    assert train_records(wd) == before  # no new train lines at all
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert f.read() == logged  # nor the final eval again: its metrics.json stands
    assert checkpoint_steps(wd) == ckpts_before
    with open(os.path.join(wd, "metrics.json")) as f:
        final = json.load(f)
    assert final["step"] == TOTAL and final["psnr"] == reference["final"]["psnr"]


# ----------------------------------------------------------------------------------------------
# 3. Non-finite loss.
# ----------------------------------------------------------------------------------------------

def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(reference, tmp_path):
    """Resume the reference's step-4 checkpoint with lr=1e30: the step-5 update (~1e30 per
    element) has a non-finite float32 norm, so that very step is rejected and never applied.
    The run must fail naming the step, leave only checkpoints from before it, and the latest
    must restore and train on.
    """
    wd = copy_workdir(reference["workdir"], str(tmp_path / "nonfinite"))
    for step in checkpoint_steps(wd):
        if step > 4:
            shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
    for name in ("metrics.jsonl", "metrics.json"):
        os.remove(os.path.join(wd, name))
    assert checkpoint_steps(wd) == [4]

    proc = run_main(wd, *BASE, "--config.optim.lr=1e30")
    assert proc.returncode != 0, describe(proc)
    m = NONFINITE_RE.search(proc.stderr)
    assert m, describe(proc)
    bad = int(m.group(1))
    assert 5 <= bad <= TOTAL, bad
    assert "error: Loss or gradient norm became NaN/Inf" in proc.stderr, describe(proc)
    ckpts = checkpoint_steps(wd)
    assert ckpts and all(s < bad for s in ckpts), (bad, ckpts)
    latest = ckpts[-1]
    assert f"last good checkpoint (step {latest})" in proc.stderr, describe(proc)
    logged = train_records(wd)
    assert [r["step"] for r in logged] == list(range(5, bad)), (bad, logged)
    assert all(math.isfinite(as_float(r["train/loss"])) for r in logged), logged
    # The oversized update is caught at the step that makes it: nothing after the checkpoint.
    assert bad == 5 and ckpts == [4] and logged == [], (bad, ckpts, logged)

    if os.path.exists(os.path.join(wd, "metrics.jsonl")):
        os.remove(os.path.join(wd, "metrics.jsonl"))
    proc = run_main(wd, "--config.optim.lr=1e-3", f"--config.total_steps={latest + 2}",
                    f"--config.checkpoint.every_steps={EVERY}")
    assert proc.returncode == 0, describe(proc)
    logged = train_records(wd)
    assert [r["step"] for r in logged] == [latest + 1, latest + 2], logged
    first = as_float(logged[0]["train/loss"])
    assert math.isfinite(first), logged
    # The lr override changes later updates, not the loss of the restored params.
    assert logged[0]["train/loss"] == reference["records"][latest + 1]["train/loss"]
    assert all(math.isfinite(as_float(r["train/loss"])) for r in logged), logged


# ----------------------------------------------------------------------------------------------
# 4. Mismatched checkpoint.
# ----------------------------------------------------------------------------------------------

def test_mismatched_checkpoint_fails_clearly(reference, tmp_path):
    wd = copy_workdir(reference["workdir"], str(tmp_path / "mismatch"))
    ckpt_dir = os.path.join(wd, "checkpoints")
    before = tree_listing(ckpt_dir)
    recorded = {name: open(os.path.join(wd, name)).read() for name in ("config.json",
                                                                       "hparams.json")}
    listing = sorted(os.listdir(wd))
    proc = run_main(wd, *BASE, "--config.model.codebook_size=32")
    assert proc.returncode != 0, describe(proc)
    assert "ValueError" in proc.stderr, describe(proc)
    assert re.search(r"Checkpoint \S+/checkpoints/12 does not match the model/optimizer",
                     proc.stderr), describe(proc)
    assert "arrays of another shape, e.g. " in proc.stderr, describe(proc)  # not orbax's tree
    assert max(len(line) for line in proc.stderr.splitlines()) < 1000, describe(proc)
    for name, text in recorded.items():  # the workdir still describes its checkpoints
        assert open(os.path.join(wd, name)).read() == text, name
    assert sorted(os.listdir(wd)) == listing  # not even an empty TensorBoard events file
    assert os.path.isdir(os.path.join(ckpt_dir, "12"))
    assert tree_listing(ckpt_dir) == before  # nothing deleted, nothing written
    assert train_records(wd) == list(reference["records"].values())


def test_resume_with_the_other_layer_stack_layout(reference, tmp_path):
    """A run checkpointed with scanned blocks (TiTok's default), resumed with the blocks
    unrolled (`model.scan = False`): the checkpoint is re-laid out, not refused, and the run
    goes on from step 8 to the reference's losses (to float tolerance: scanned and unrolled
    blocks round differently)."""
    wd = copy_workdir(reference["workdir"], str(tmp_path / "unrolled"))
    shutil.rmtree(os.path.join(wd, "checkpoints", "12"))
    config = tmp_path / "unrolled.py"
    config.write_text(  # the test config with one key more (an override needs an existing key)
        "import runpy\n\n\ndef get_config(arg=''):\n"
        f"    config = runpy.run_path({os.path.join(REPO, CONFIG)!r})['get_config'](arg)\n"
        "    config.model.scan = False\n    return config\n")
    proc = subprocess.run(main_command(str(config), wd, *BASE), env=subprocess_env(8),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, describe(proc)
    assert "checkpoint 8: layer stacks re-laid out" in proc.stdout + proc.stderr, describe(proc)
    # A changed model setting is named (those that keep the shapes would resume silently).
    assert ("Warning: resuming with model settings other than the checkpoints were trained "
            "with (scan: None there, False now)") in proc.stdout, describe(proc)
    assert [int(m.group(1)) for m in STARTED_RE.finditer(proc.stdout + proc.stderr)] == [9], \
        describe(proc)
    assert checkpoint_steps(wd) == [4, 8, 12]
    got = by_step(train_records(wd))
    for step in range(9, TOTAL + 1):
        want = deterministic_values(reference["records"][step])
        have = deterministic_values(got[step][-1])
        assert have.keys() == want.keys()
        for key in want:
            assert math.isclose(as_float(have[key]), as_float(want[key]), rel_tol=1e-3,
                                abs_tol=1e-5), (step, key, have[key], want[key])


# ----------------------------------------------------------------------------------------------
# 5. Data-iterator determinism (in-process).
# ----------------------------------------------------------------------------------------------

def _train_ds(source, start: int, stop: int, **kwargs):
    from tok1d.data import pipeline
    return pipeline.train_dataset(source, global_batch=8, host_start=start, host_stop=stop,
                                  seed=0, image_size=16, augment="random_resized_crop",
                                  flip=True, min_scale=0.8, **kwargs)


def _assert_batches_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{what}: {k} differs"


def test_batches_from_a_step_and_host_slices():
    """A resumed run starts its batches at its step (`start_batch`): the same batches as the
    uninterrupted stream, whatever the number of data workers (a saved grain iterator state
    could not be restored with another process or worker count)."""
    from tok1d.data import sources
    source = sources.DemoSource("train", size=64)
    n = 12  # 8 batches per epoch: also crosses into the second (repeated) epoch

    it = iter(_train_ds(source, 0, 8))
    batches = [next(it) for _ in range(n)]
    assert batches[0]["image"].shape == (8, 16, 16, 3)
    assert batches[0]["image"].dtype == np.uint8  # scaled to [0, 1] on the device (Feeder)
    assert not np.array_equal(batches[0]["image"], batches[1]["image"])

    for workers in (0, 2):
        fresh = iter(_train_ds(source, 0, 8, start_batch=2, num_workers=workers))
        for i in range(2, n):
            _assert_batches_equal(next(fresh), batches[i], f"batch {i + 1}, {workers} workers")

    # A fresh iterator from scratch replays the same stream.
    again = iter(_train_ds(source, 0, 8))
    for i in range(3):
        _assert_batches_equal(next(again), batches[i], f"replayed batch {i + 1}")

    # Two hosts' slices concatenated are the single-host global batch.
    lo, hi = iter(_train_ds(source, 0, 4)), iter(_train_ds(source, 4, 8))
    for i in range(n):
        a, b = next(lo), next(hi)
        assert a["image"].shape[0] == b["image"].shape[0] == 4
        joined = {k: np.concatenate([a[k], b[k]]) for k in a}
        _assert_batches_equal(joined, batches[i], f"host-sliced batch {i + 1}")
