"""`python -m tok1d.cli.bench`: every workload runs the real programs of a tiny config and reports
step time, images/s, FLOPs and MFU; bad combinations are refused."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, subprocess_env
from tok1d import parallel
from tok1d.cli import bench
from tok1d.layers import cnn
from tok1d.train import config_lib


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                      name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _generator_config():
    c = config_lib.base_config("generator")
    c.precision, c.ema_decay = "float32", 0.99
    c.batch_size = 16
    c.model = dict(name="maskgit", arch="vit", codebook_size=64, num_tokens=8, num_classes=10,
                   width=32, depth=2, num_heads=2, mlp_dim=64)
    c.sampling = dict(num_steps=2, guidance_scale=1.5)
    return c


def _check(row, workload, batch):
    assert row["workload"] == workload and row["batch"] == batch
    assert row["step_ms"] > 0 and row["images_per_s"] == pytest.approx(
        batch / (row["step_ms"] / 1e3))
    assert row["device_bf16_tflops"] > 0
    assert row["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # rows of flag variants differ


@pytest.mark.parametrize("workload", ["train", "encode", "decode"])
def test_tokenizer_workloads(workload):
    row = bench.run(_config("tiny_test"), workload, batch_size=16, steps=2, warmup=1,
                    log=lambda _: None)
    _check(row, workload, 16)
    if workload == "train":  # XLA's cost analysis of the step on CPU
        assert row["tflop_per_step"] > 0 and 0 < row["mfu"]


def test_generator_train_and_sample():
    row = bench.run(_generator_config(), "train", steps=2, warmup=1, log=lambda _: None)
    _check(row, "train", 16)
    row = bench.run(_generator_config(), "sample", batch_size=8, steps=1, warmup=1,
                    tokenizer_config=_config("tiny_test"), log=lambda _: None)
    _check(row, "sample", 8)
    with pytest.raises(ValueError, match="needs --tokenizer_config"):
        bench.run(_generator_config(), "sample", steps=1, warmup=1)
    with pytest.raises(ValueError, match="needs a tokenizer config"):
        bench.run(_generator_config(), "encode", steps=1, warmup=1)


@pytest.mark.parametrize("workload", ["train", "decode"])
def test_compile_only_plans_memory_without_running(workload):
    """Nothing is initialised or run: the state / params are shapes; the plan grows with the
    batch and the FLOPs equal those of the timed run."""
    rows = [bench.run(_config("tiny_test"), workload, batch_size=b, compile_only=True,
                      log=lambda _: None) for b in (8, 32)]
    for row in rows:
        assert row["step_ms"] is None and row["steps"] == 0 and row["memory_plan_gib"] > 0
        assert row["tflop_per_step"] > 0
        # start-up: tracing + lowering and XLA's compile, within the command's time so far
        assert row["lower_s"] > 0 and row["compile_s"] > 0
        assert row["first_call_s"] == pytest.approx(row["lower_s"] + row["compile_s"])
        assert row["startup_s"] >= row["first_call_s"]
    assert "compile: trace + lower" in bench.format_row(rows[0])
    assert rows[1]["memory_plan_gib"] > rows[0]["memory_plan_gib"]
    if workload == "train":  # state independent of the batch, saved activations grow with it
        assert rows[0]["state_gib"] == rows[1]["state_gib"] > 0
        assert rows[1]["saved_activations_gib"] == pytest.approx(
            4 * rows[0]["saved_activations_gib"], rel=0.1)
        assert "per device: state" in bench.format_row(rows[0])
    assert rows[1]["tflop_per_step"] == pytest.approx(4 * rows[0]["tflop_per_step"], rel=0.05)
    timed = bench.run(_config("tiny_test"), workload, batch_size=8, steps=1, warmup=1,
                      log=lambda _: None)
    assert timed["tflop_per_step"] == pytest.approx(rows[0]["tflop_per_step"])
    assert "n/a" in bench.format_row(rows[0])


def test_compile_only_generator_train_counts_state_and_saved_activations():
    row = bench.run(_generator_config(), "train", compile_only=True, log=lambda _: None)
    assert row["memory_plan_gib"] > 0 and row["state_gib"] > 0
    assert row["saved_activations_gib"] > 0


def test_compile_only_sample_plans_both_programs():
    row = bench.run(_generator_config(), "sample", batch_size=8, compile_only=True,
                    tokenizer_config=_config("tiny_test"), log=lambda _: None)
    assert row["memory_plan_gib"] > 0 and row["tflop_per_step"] > 0


def test_cli_prints_the_table_and_appends_json(tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "tok1d.cli.bench", f"--config={REPO}/configs/tiny_test.py",
           "--workload=encode", "--batch_size=8", "--steps=2", "--warmup=1",
           "--peak_tflops=1.0", f"--out={out}", f"--profile={tmp_path / 'trace'}"]
    run = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| workload | model | batch |" in run.stdout and "| encode | titok | 8 |" in run.stdout
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["device_bf16_tflops"] == 1.0 and "tok1d.cli.bench" in row["command"]
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # the profiler trace
    assert "profile (2 calls, " in run.stdout and "| op kind | ms per call |" in run.stdout
    assert row["profile"]["ops"] > 0 and row["profile"]["busy_ms"] > 0


def test_flop_count_multiplies_loops():
    """XLA's cost analysis counts a loop body once; the traced count multiplies by the length
    and matches the closed forms for dense and conv layers."""
    import jax
    import jax.numpy as jnp
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    looped = lambda x, w: jax.lax.fori_loop(0, 10, lambda i, y: y @ w, x)  # noqa: E731
    assert bench.traced_flops(looped, x, w) == 10 * 2 * 8 * 64 * 64
    scanned = lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=7)[0]  # noqa
    assert bench.traced_flops(jax.jit(scanned), x, w) == 7 * 2 * 8 * 64 * 64
    img = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 32), jnp.float32)
    conv = lambda a, k: jax.lax.conv_general_dilated(  # noqa: E731
        a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert bench.traced_flops(conv, img, kernel) == 2 * (2 * 16 * 16 * 32) * (3 * 3 * 3)
    # through jax.grad: the forward matmul and the weight-gradient matmul
    loss = lambda w, x: jnp.sum(x @ w)  # noqa: E731
    assert bench.traced_flops(jax.grad(loss), w, x) == 2 * (2 * 8 * 64 * 64)


def test_flop_count_sees_the_depthwise_shifted_sum():
    """The depthwise conv's shifted-sum form (elementwise ops, XLA:CPU's choice) counts as the
    grouped convolution it replaces: 2 * out * kh * kw forward, the same per gradient, equal to
    the count of the "conv" form through jax.grad."""
    x = jax.ShapeDtypeStruct((2, 12, 12, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((7, 7, 1, 8), jnp.float32)
    pad = ((3, 3), (3, 3))
    forms = {impl: (lambda a, w, impl=impl: cnn.depthwise_conv(a, w, (1, 1), pad, impl).sum())
             for impl in ("conv", "shifts")}
    one = 2 * (2 * 12 * 12 * 8) * (7 * 7)
    for impl, f in forms.items():
        assert bench.traced_flops(f, x, k) == one, impl
        assert bench.traced_flops(jax.grad(f), x, k) == 2 * one, impl  # forward + input grad
        assert bench.traced_flops(jax.grad(f, (0, 1)), x, k) == 3 * one, impl
        assert bench.traced_flops(jax.grad(jax.checkpoint(f)), x, k) >= 2 * one, impl
    # stride 2, asymmetric padding: the output is 4 x 4, both forms
    for impl in ("conv", "shifts"):
        strided = lambda a, w, impl=impl: cnn.depthwise_conv(  # noqa: E731
            a, w, (2, 2), ((0, 1), (1, 1)), impl)
        assert bench.traced_flops(strided, x, k) == 2 * (2 * 4 * 4 * 8) * 49, impl


def test_targets_script_names_real_configs(tmp_path):
    """benchmarks/targets.sh (run with PYTHON=echo): every target is a tok1d.cli.bench command on a
    config that exists; TARGETS picks a subset; extra flags reach every command."""
    script = os.path.join(REPO, "benchmarks", "targets.sh")
    env = dict(os.environ, PYTHON="echo", TOK1D_BENCH_FLAGS="--compile_only")
    run = subprocess.run(["bash", script, str(tmp_path / "all")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    logs = sorted((tmp_path / "all").glob("*.log"))
    assert len(logs) == 15  # 10 targets, 5 variants
    for log in logs:
        words = log.read_text().split()
        assert words[:2] == ["-m", "tok1d.cli.bench"] and "--compile_only" in words
        for word in words:
            if word.startswith(("--config=", "--tokenizer_config=")):
                path = word.split("=", 1)[1].partition(":")[0]  # configs/FAMILY.py:ARG
                assert os.path.exists(os.path.join(REPO, path)), word
        config = config_lib.load(os.path.join(
            REPO, next(w for w in words if w.startswith("--config=")).split("=", 1)[1]))
        for word in words:  # overrides name fields the config has (else the run fails)
            if word.startswith("--config."):
                *parents, last = word[len("--config."):].split("=", 1)[0].split(".")
                node = config
                for part in parents:
                    node = node[part]
                assert last in node, word
    env["TARGETS"] = "gpt_b_sample"
    subprocess.run(["bash", script, str(tmp_path / "one")], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=60)
    assert [p.name for p in (tmp_path / "one").glob("*.log")] == ["gpt_b_sample.log"]


def test_targets_script_compiles_first_then_times(tmp_path):
    """benchmarks/targets.sh with WARM=1: every selected target is compiled (--compile_only,
    JOBS at a time) before any is timed; DEADLINE skips the timing once it has passed."""
    fake = tmp_path / "python"  # logs its start and end, so the order can be checked
    fake.write_text('#!/bin/bash\necho "start $(date +%s.%N) $*" >> "$ORDER"\nsleep 0.3\n'
                    'echo "end $(date +%s.%N)" >> "$ORDER"\necho "$@"\n')
    fake.chmod(0o755)
    order = tmp_path / "order"
    env = dict(os.environ, PYTHON=str(fake), WARM="1", JOBS="2", ORDER=str(order),
               TARGETS="titok_s1_b64 gigatok_b16 gigatok_encode")
    out = tmp_path / "out"
    subprocess.run(["bash", os.path.join(REPO, "benchmarks", "targets.sh"), str(out)], cwd=REPO,
                   env=env, check=True, capture_output=True, timeout=60)
    events = [line.split() for line in order.read_text().splitlines()]
    starts = [e for e in events if e[0] == "start"]
    assert ["--compile_only" in e for e in starts] == [True] * 3 + [False] * 3
    running = peak = 0
    for e in sorted(events, key=lambda e: float(e[1])):
        running += 1 if e[0] == "start" else -1
        peak = max(peak, running)
    assert peak == 2  # JOBS compiles at once, the timed runs one by one
    assert sorted(p.name for p in out.glob("*.compile.log")) == [
        "gigatok_b16.compile.log", "gigatok_encode.compile.log", "titok_s1_b64.compile.log"]
    env["DEADLINE"] = "0"
    run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "targets.sh"),
                          str(tmp_path / "late")], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.count("skipped (DEADLINE=0 s passed)") == 3


def test_gpu_session_times_gpt_sampling_with_and_without_graphs_of_its_loop(tmp_path):
    """benchmarks/gpu_session.sh's cmdbuf part (with a fake Python that writes each bench row
    with the XLA_FLAGS it saw): GPT-B sampling timed three times: as it decodes by default, on
    cuDNN's attention, and with while loops and conditionals in XLA's command buffers; the
    rows in OUT/cmdbuf.jsonl and every log kept."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nfor a in "$@"; do case $a in --out=*) out=${a#--out=};; '
                    'esac; done\n[[ -n ${out:-} ]] && echo "{\\"args\\": \\"$*\\", '
                    '\\"xla_flags\\": \\"${XLA_FLAGS:-}\\"}" >> "$out"\necho "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), XLA_FLAGS="--xla_dump_to=/tmp/x")
    run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_session.sh"), str(out),
                          "cmdbuf"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (out / "cmdbuf.jsonl").read_text().splitlines()]
    assert [r["xla_flags"] for r in rows] == ["--xla_dump_to=/tmp/x"] * 2 + [
        "--xla_dump_to=/tmp/x --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"]
    assert all("--config=configs/gpt_gigatok.py:b --workload=sample" in r["args"] for r in rows)
    assert ["attention_impl=cudnn" in r["args"] for r in rows] == [False, True, False]
    logs = subprocess.run(["tar", "tzf", str(out / "logs.tgz")], capture_output=True, text=True,
                          check=True).stdout.split()
    assert {"./cmdbuf/gpt_b_sample.log", "./cmdbuf/gpt_b_cudnn.log",
            "./cmdbuf/graphs/gpt_b_sample.log"} <= set(logs)
    assert not (out / "bench.jsonl").exists()  # no other part ran


def test_cli_refuses_a_bad_combination_with_a_message():
    cmd = [sys.executable, "-m", "tok1d.cli.bench", f"--config={REPO}/configs/tiny_test.py",
           "--workload=sample"]
    run = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "error: --workload=sample needs a generator config" in \
        run.stderr and "Traceback" not in run.stderr


def test_compile_times_script_measures_a_cold_and_a_warm_start(tmp_path):
    """benchmarks/compile_times.sh on the tiny config: one compile-only start with an empty
    persistent compilation cache, one with the cache it filled (XLA's work is then a load),
    and the markdown table of benchmarks/RESULTS.md."""
    env = dict(subprocess_env(1), PYTHON=sys.executable, RECIPES="tiny_test.py", BATCH="8")
    run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "compile_times.sh"),
                          str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["cache"]: r for r in map(json.loads, (tmp_path / "compile.jsonl").read_text()
                                       .splitlines())}
    assert set(rows) == {"cold", "warm"}
    for row in rows.values():
        assert row["recipe"] == "tiny_test.py" and row["batch"] == 8
        assert row["compilation_cache"] == str(tmp_path / "cache" / "tiny_test.py")
        assert 0 < row["first_call_s"] <= row["startup_s"] <= row["process_s"]
    assert rows["warm"]["compile_s"] < rows["cold"]["compile_s"]
    assert "| tiny_test.py | 8 |" in run.stdout


def test_resume_times_script_measures_a_start_and_a_resume(tmp_path):
    """benchmarks/resume_times.sh on the tiny config: the real command started, stopped by
    SIGTERM once its first step has started, and run again, which resumes from the checkpoint
    with a warm cache; the table takes both runs' "step N started" lines (the compile, its
    trace + lowering and XLA parts, the state's creation or restore beside it)."""
    env = dict(subprocess_env(1), PYTHON=sys.executable, RECIPES="tiny_test.py", RUNS="2")
    run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "resume_times.sh"),
                          str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()
            if line.startswith("| tiny_test.py |")]
    assert [r[1].strip() for r in rows] == ["0 (start)", "1 (resume)"], run.stdout
    for _, _, step_s, trace_s, xla_s, state_s, age_s in rows:
        assert 0 < float(step_s) < float(age_s) and float(state_s) > 0
        assert float(trace_s) + float(xla_s) == pytest.approx(float(step_s), abs=0.11)
    assert float(rows[1][4]) < float(rows[0][4])  # the resume loads what the start compiled
    assert "Resuming from" in (tmp_path / "tiny_test.1.log").read_text()


def test_compilation_cache_is_on_by_default(monkeypatch, tmp_path):
    from tok1d import parallel
    monkeypatch.delenv("TOK1D_COMPILATION_CACHE", raising=False)
    # A directory the user already gave JAX is kept (the suite's conftest sets one).
    kept, size = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    assert kept and parallel.compilation_cache_dir() == kept
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert parallel.compilation_cache_dir() == str(tmp_path / "tok1d" / "jax")
        # tok1d's default directory is capped (least recently used entries evicted).
        parallel.setup_process()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "tok1d" / "jax")
        assert jax.config.jax_compilation_cache_max_size == parallel.DEFAULT_CACHE_MAX_BYTES
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path))
        assert parallel.compilation_cache_dir() == str(tmp_path / ".cache" / "tok1d" / "jax")
        monkeypatch.setenv("TOK1D_COMPILATION_CACHE", "gs://bucket/cache")
        assert parallel.compilation_cache_dir() == "gs://bucket/cache"
        for off in ("", "off"):
            monkeypatch.setenv("TOK1D_COMPILATION_CACHE", off)
            assert parallel.compilation_cache_dir() is None
        # A multi-process CPU run: off (its other processes got other keys than process 0
        # and compiled while it loaded: a warm restart timed out in its first collective)
        monkeypatch.setenv("TOK1D_COMPILATION_CACHE", str(tmp_path / "shared"))
        monkeypatch.setattr(parallel.jax_distributed.global_state, "num_processes", 2)
        jax.config.update("jax_compilation_cache_dir", None)
        parallel.setup_process()
        assert not jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", kept)
        jax.config.update("jax_compilation_cache_max_size", size)


def test_pod_plan_arithmetic():
    """benchmarks/pod_plan.py: FLOPs per image from a compile-only row, step time at an MFU on
    the config's global batch, chip-days for its images, FSDP memory per chip."""
    spec = importlib.util.spec_from_file_location(
        "pod_plan", os.path.join(REPO, "benchmarks", "pod_plan.py"))
    pod_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pod_plan)
    config = config_lib.load(os.path.join(REPO, "configs", "titok.py:l32_stage1"))
    row = dict(batch=8, tflop_per_step=8.0, state_gib=32.0, saved_activations_gib=4.0)
    plans = pod_plan.plan(row, config, chips=32)
    v5p = next(p for p in plans if p["accelerator"] == "TPU v5p" and p["mfu"] == 0.4)
    assert v5p["flops_per_image"] == 1e12
    assert v5p["step_s"] == pytest.approx(8 * 1e12 / (0.4 * 459e12))  # 256 images / 32 chips
    assert v5p["chip_days"] == pytest.approx(256e6 * 1e12 / (0.4 * 459e12) / 86400)
    assert v5p["memory_gib"] == pytest.approx(32 / 32 + 0.5 * 8)
    assert v5p["host_images_per_s"] == pytest.approx(4 * 8 / v5p["step_s"])


def test_checkpoint_speed_script_times_both_settings(tmp_path):
    """benchmarks/checkpoint_speed.py on 128 MiB: one save and two restores per setting."""
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "checkpoint_speed.py"),
                          "--gib=0.125", "--repeats=1", f"--dir={tmp_path / 'ckpt'}"],
                         env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("repeat 0 compress=")]
    assert [line.split(":")[0] for line in lines] == ["repeat 0 compress=True",
                                                       "repeat 0 compress=False"]
    sizes = [float(line.split("on disk ")[1].split(" GiB")[0]) for line in lines]
    assert 0 < sizes[0] < sizes[1]  # zstd saves some bytes of N(0, 0.02) floats
    assert not (tmp_path / "ckpt").exists()


def test_gpu_session_script_runs_its_plan_and_returns_few_files(tmp_path):
    """benchmarks/gpu_session.sh (a fake python): the default plan times GigaTok B-L training
    at 16 alone, GPT-B sampling three ways, then compiles and times TiTok with cuDNN's
    attention (stages 2 and 1) and stage 1 with XLA's; the second call's plan ("profile")
    passes --profile and runs its targets in its order (GPT-B first); OUT holds a handful of
    files (a lent machine returns at most 8), every target's log in logs.tgz."""
    import tarfile
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), BUDGET="180")
    logs = {}
    for name, plan in (("first", []), ("second", ["profile"])):
        out = tmp_path / name
        run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_session.sh"),
                              str(out), *plan], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert {p.name for p in out.iterdir()} == {"env.txt", "session.log", "logs.tgz"}
        assert "== done in" in (out / "session.log").read_text()
        with tarfile.open(out / "logs.tgz") as tar:
            logs[name] = {os.path.normpath(m.name): tar.extractfile(m).read().decode()
                          for m in tar.getmembers() if m.isfile()}
    first, second = logs["first"], logs["second"]
    assert set(first) == {"gigatok_b16.log",
                          "cmdbuf/gpt_b_sample.log", "cmdbuf/gpt_b_cudnn.log",
                          "cmdbuf/graphs/gpt_b_sample.log",
                          "titok_s1_b64.compile.log", "titok_s1_cudnn.compile.log",
                          "titok_s2_cudnn.compile.log", "titok_s1_b64.log",
                          "titok_s1_cudnn.log", "titok_s2_cudnn.log"}
    for name in ("titok_s1_cudnn", "titok_s2_cudnn", "cmdbuf/gpt_b_cudnn"):
        assert "--config.model.attention_impl=cudnn" in first[f"{name}.log"]
    assert "--config.model.attention_impl" not in first["titok_s1_b64.log"]
    assert "--compile_only" in first["titok_s2_cudnn.compile.log"]
    assert set(second) == {"titok_s2_b32.log", "gpt_b_sample.log"}
    assert "--profile=" in second["gpt_b_sample.log"] and "--steps=3" in second["gpt_b_sample.log"]
    session = (tmp_path / "second" / "session.log").read_text()
    assert session.index("== gpt_b_sample") < session.index("== titok_s2_b32")


def test_a_part_cut_by_its_timeout_leaves_no_target_running(tmp_path):
    """targets.sh's per-target timeout runs in the foreground, so gpu_session.sh's timeout of
    a part takes the running target with it (before, the target kept the device busy while
    the next part measured)."""
    fake = tmp_path / "slow_python"
    fake.write_text("#!/bin/bash\nsleep 30\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), TARGETS="gpt_b_sample", TARGET_TIMEOUT="60")
    run = subprocess.run(["timeout", "2", "bash", os.path.join(REPO, "benchmarks", "targets.sh"),
                          str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                         timeout=60)
    assert run.returncode == 124
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(fake)], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


def test_roofline_counts_loop_kernels_gemm_flops_and_in_place_bytes():
    """benchmarks/hlo_roofline.py on a small scheduled GPU-style HLO (tests/fixtures): a while
    loop's body counts its known trip count; a cuBLAS gemm's FLOPs are 2·M·N·K; a fused
    dynamic-update-slice moves its update, not the stacked buffer; a fusion that reads a stack
    through a dynamic-slice reads one layer; time is max(bytes / bandwidth, FLOPs / peak) plus
    the launch; parts come from the op names (encoder / decoder, transpose( = backward)."""
    spec = importlib.util.spec_from_file_location(
        "hlo_roofline", os.path.join(REPO, "benchmarks", "hlo_roofline.py"))
    roofline = importlib.util.module_from_spec(spec)
    sys.modules["hlo_roofline"] = roofline  # its dataclass looks its module up
    spec.loader.exec_module(roofline)
    with open(os.path.join(REPO, "tests", "fixtures", "roofline_loop.hlo.txt")) as f:
        kernels = {k.name: k for k in roofline.Roofline(f.read(), bandwidth=1e9,
                                                         launch=1e-6).kernels()}
    assert sorted(kernels) == ["copy", "gemm", "layer", "next", "updated"]
    assert kernels["copy"].calls == 1 and kernels["gemm"].calls == 4   # trip count 4
    layer_bytes = 1 * 8 * 16 * 2
    assert kernels["gemm"].flops == 4 * 2 * 8 * 16 * 32
    assert kernels["gemm"].bytes == 4 * (8 * 32 * 4 + 32 * 16 * 4 + 8 * 16 * 4)
    assert kernels["gemm"].seconds == pytest.approx(4 * (kernels["gemm"].bytes / 4 / 1e9 + 1e-6))
    assert kernels["updated"].bytes == 4 * (layer_bytes + 4 + layer_bytes)  # update in and out
    assert kernels["layer"].bytes == 4 * (layer_bytes + 4 + layer_bytes)    # one layer read
    assert kernels["copy"].bytes == 2 * 4 * layer_bytes
    assert (kernels["gemm"].kind, kernels["updated"].kind) == ("gemm", "slices (stacks, caches)")
    assert (kernels["gemm"].part, kernels["updated"].part) == ("encoder fwd", "decoder bwd")
    text = roofline.summarize(list(kernels.values()), top=2)
    assert text.startswith("estimated 0.0 ms per call: 17 kernels")
    assert "top 2 kernels:" in text and "encoder/mlp/dot_general" in text


def test_gpu_aot_builds_a_workload_with_nothing_placed(monkeypatch):
    """benchmarks/gpu_aot.py's preparation, on this CPU's devices instead of a GPU topology
    (which needs jax's CUDA plugin): config overrides typed as literals; meshes on the given
    devices; the trainer's frozen networks and the batch as shapes only, and the step compiles
    from them."""
    monkeypatch.setattr(parallel, "create_mesh", parallel.create_mesh)  # restored afterwards
    monkeypatch.setattr(parallel, "replicate", parallel.replicate)
    spec = importlib.util.spec_from_file_location(
        "gpu_aot", os.path.join(REPO, "benchmarks", "gpu_aot.py"))
    gpu_aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_aot)
    config = _config("tiny_test")
    gpu_aot.override(config, ["model.remat=full", "optim.lr=0.5", "model.attention_impl=cudnn"])
    assert (config.model.remat, config.optim.lr) == ("full", 0.5)
    assert config.model.attention_impl == "cudnn"
    gpu_aot.override(config, ["model.attention_impl=xla"])
    devices = jax.devices()[:1]
    gpu_aot.place_nothing(devices)
    assert list(parallel.create_mesh({"data": -1}).devices.flat) == devices
    work = bench.bench_train(config, 4, abstract=True)
    (fn, args), = work.programs
    leaves = jax.tree.leaves(args)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    with work.context():
        fn.lower(*args).compile()


def test_bench_refuses_bad_inputs_before_running(tmp_path, capsys):
    """Each in one line, before anything compiles or runs (these failed after the timed calls,
    losing the result, or crashed inside the model): a generator given as the tokenizer
    config, a negative --peak_tflops, a --batch_size the mesh does not divide, a --profile that
    is a file, --profile with --compile_only, --tokenizer_config with another workload, an
    --out that cannot be written."""
    with pytest.raises(ValueError, match="--tokenizer_config names a generator"):
        bench.run(_generator_config(), "sample", tokenizer_config=_generator_config())
    with pytest.raises(ValueError, match="--peak_tflops=-1"):
        bench.run(_config("tiny_test"), "encode", peak_tflops=-1.0)
    if jax.device_count() > 1:
        with pytest.raises(ValueError, match="batch_size=3 is not divisible"):
            bench.run(_config("tiny_test"), "encode", batch_size=3)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    base = [f"--config={REPO}/configs/tiny_test.py", "--workload=encode"]
    for flags, message in (([f"--profile={afile}"], "is a file"),
                           (["--compile_only", f"--profile={tmp_path}"], "--compile_only"),
                           ([f"--tokenizer_config={REPO}/configs/tiny_test.py"],
                            "used by --workload=sample"),
                           (["--out=/proc/tok1d_bench.jsonl"], "cannot be written")):
        assert bench.main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    assert afile.read_text() == "x"
