"""Two JAX processes on 127.0.0.1 (4 fake CPU devices each) train like one process with 8.

Cross-process CPU collectives go through gloo (`tok1d.main` selects it before
`jax.distributed.initialize`). Process 0 alone writes metrics.jsonl into the shared workdir.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

try:
    from conftest import free_port, main_command, subprocess_env
except ImportError:  # pragma: no cover
    import conftest
    free_port, main_command, subprocess_env = (conftest.free_port, conftest.main_command,
                                               conftest.subprocess_env)

CONFIG = "configs/tiny_test.py"
STEPS = 4
COMMON = (f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=100",
          "--config.mesh.data=-1")
TIMEOUT_S = 240

try:  # pytest-timeout is optional; the subprocess timeouts below bound the test anyway.
    import pytest_timeout  # noqa: F401
    _timeout_mark = pytest.mark.timeout(TIMEOUT_S + 120)
except ImportError:  # pragma: no cover
    def _timeout_mark(f):
        return f


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_records(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "train/loss" in r}


def _eval_record(records: list[dict]) -> dict:
    evals = [r for r in records if "eval/psnr" in r]
    return evals[-1] if evals else {}


def _wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, tuple]:
    """Waits for every process until `deadline`; kills the stragglers (ours only)."""
    outputs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            for other in procs.values():
                if other.poll() is None:
                    other.kill()
            out, err = proc.communicate()
            err += f"\n*** {name} killed after the {TIMEOUT_S}s timeout ***"
        outputs[name] = (proc.returncode, out, err)
    return outputs


def _report(outputs: dict[str, tuple]) -> str:
    parts = []
    for name, (rc, out, err) in outputs.items():
        parts.append(f"===== {name}: exit {rc}\n--- stdout (tail)\n{out[-4000:]}\n"
                     f"--- stderr (tail)\n{err[-8000:]}")
    return "\n".join(parts)


_PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_process(workdir: str, *args: str) -> subprocess.Popen:
    """`tok1d.main` on the tiny config, one process with 8 CPU devices."""
    return subprocess.Popen(main_command(CONFIG, workdir, *args), env=subprocess_env(8),
                            **_PIPES)


def _two_processes(name: str, workdir: str, *args: str) -> dict[str, subprocess.Popen]:
    """{name0, name1}: the same run as two processes with 4 CPU devices each."""
    dist = (f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            "--config.distributed.num_processes=2")
    return {f"{name}{pid}": subprocess.Popen(
        main_command(CONFIG, workdir, *args, *dist, f"--config.distributed.process_id={pid}"),
        env=subprocess_env(4), **_PIPES) for pid in (0, 1)}


@_timeout_mark
def test_two_processes_match_one(tmp_path):
    wd1, wd2 = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    # All three start together: the reference shares no state with the pair.
    procs = {"reference": _one_process(wd1, *COMMON), **_two_processes("process", wd2, *COMMON)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    for name, (rc, _, _) in outputs.items():
        assert rc == 0, f"{name} exited with {rc}\n{report}"

    # Both processes joined one 2-process, 8-device job.
    for pid in (0, 1):
        _, out, err = outputs[f"process{pid}"]
        log = out + err
        assert f"process {pid}/2" in log, report
        assert f"Joining 2 processes at 127.0.0.1:" in out and f"as process {pid}" in out, report
        assert "8 devices" in log, report
    _, out0, err0 = outputs["process0"]
    assert "over 8 devices (2 processes)" in out0 + err0, report
    # tok1d's progress lines come once, from process 0 (every process printed its Mesh,
    # Model and Resuming lines); each process's JAX / devices line stays.
    _, out1, err1 = outputs["process1"]
    assert "Mesh " not in out1 + err1 and "parameters; starting at step" not in out1, report
    assert "parameters; starting at step" in out0, report
    _, ref_out, ref_err = outputs["reference"]
    assert "process 0/1" in ref_out + ref_err, report

    ref = _read_jsonl(os.path.join(wd1, "metrics.jsonl"))
    got = _read_jsonl(os.path.join(wd2, "metrics.jsonl"))
    ref_train, got_train = _train_records(ref), _train_records(got)
    assert sorted(ref_train) == list(range(1, STEPS + 1)), ref
    assert sorted(got_train) == sorted(ref_train), got
    # Only process 0 writes: one line per step, one TensorBoard event file.
    assert len(got) == len(ref), got
    assert len(glob.glob(os.path.join(wd2, "events.out.tfevents.*"))) == 1
    for step in ref_train:
        for key in ("train/loss", "train/loss_l2", "train/loss_quantizer", "train/grad_norm"):
            np.testing.assert_allclose(got_train[step][key], ref_train[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
        assert got_train[step]["train/lr"] == pytest.approx(ref_train[step]["train/lr"])
    # Training actually changed the loss (params were updated and kept in sync).
    assert ref_train[1]["train/loss"] != ref_train[STEPS]["train/loss"]

    ref_eval, got_eval = _eval_record(ref), _eval_record(got)
    assert ("eval/psnr" in ref_eval) == ("eval/psnr" in got_eval)
    if ref_eval:
        assert got_eval["step"] == ref_eval["step"] == STEPS
        np.testing.assert_allclose(got_eval["eval/psnr"], ref_eval["eval/psnr"], rtol=1e-5)
        assert got_eval["eval/num_examples"] == ref_eval["eval/num_examples"]

    with open(os.path.join(wd2, "metrics.json"), encoding="utf-8") as f:
        final = json.load(f)
    assert final["step"] == STEPS
    # Both runs saved their final checkpoint (process 0 and 1 cooperated on the save).
    assert os.path.isdir(os.path.join(wd2, "checkpoints", str(STEPS)))
    assert os.path.isdir(os.path.join(wd1, "checkpoints", str(STEPS)))

    # A pod that comes back with another number of hosts: each run goes on with the other
    # process count (the grain iterator state saved per process could not be restored: "File
    # .../process_0-of-1.json does not exist"). Both continue with the same batches and
    # states, so their next steps agree.
    more = tuple(a.replace(f"total_steps={STEPS}", f"total_steps={2 * STEPS}") for a in COMMON)
    procs = {"two_to_one": _one_process(wd2, *more), **_two_processes("one_to_two_", wd1, *more)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    for name, (rc, _, _) in outputs.items():
        assert rc == 0, f"{name} exited with {rc}\n{report}"
    for name in ("two_to_one", "one_to_two_0"):
        assert f"step {STEPS + 1} started" in outputs[name][1], report
        assert "state restored" in outputs[name][1], report
    one = _train_records(_read_jsonl(os.path.join(wd2, "metrics.jsonl")))
    two = _train_records(_read_jsonl(os.path.join(wd1, "metrics.jsonl")))
    assert sorted(one) == sorted(two) == list(range(1, 2 * STEPS + 1)), report
    for step in range(STEPS + 1, 2 * STEPS + 1):
        for key in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(one[step][key], two[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")


_PREEMPTED_HOST = r"""
import os, signal, sys, time
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from tok1d.train import checkpoint
flag = checkpoint.PreemptionFlag()  # what train_loop installs
ckpt = checkpoint.Checkpointer(directory, every_steps=100, keep=1)
for step in range(1, 200):
    if step == 3 and pid == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # the notice reaches one host
    time.sleep(0.05)
    if ckpt.reached_preemption(step):
        print(f"stopped at step {step}", flush=True)
        break
"""


@_timeout_mark
def test_a_preemption_notice_to_one_host_stops_every_host_at_one_step(tmp_path):
    """With several processes SIGTERM is left to JAX's preemption notifier (a Python handler
    replaced it, and no host ever stopped): the loop's `reached_preemption` poll then stops
    both hosts at the same step."""
    script = tmp_path / "host.py"
    script.write_text(_PREEMPTED_HOST)
    port = str(free_port())
    procs = {f"process {i}": subprocess.Popen(
        [sys.executable, str(script), str(i), port, str(tmp_path / "ckpt")],
        env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)}
    outputs = _wait_all(procs, time.monotonic() + 240)
    report = _report(outputs)
    stops = [out.strip().splitlines()[-1] if out.strip() else "" for _, out, _ in
             outputs.values()]
    assert all(rc == 0 for rc, _, _ in outputs.values()), report
    assert stops[0].startswith("stopped at step") and stops[0] == stops[1], report


@_timeout_mark
def test_processes_given_other_arguments_all_stop_at_the_start(tmp_path):
    """Every process of a run must get the same command but its process id: one process with
    another setting did its share of another job (another --seed or --tokenizer wrote rows of
    another sampler or tokenizer into the output) or hung in mismatched collectives. Both now
    stop at the start, each with one line; nothing is trained."""
    workdir = str(tmp_path / "run")
    dist = (f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            "--config.distributed.num_processes=2")
    procs = {f"p{pid}": subprocess.Popen(
        main_command(CONFIG, workdir, *COMMON, *dist, f"--config.distributed.process_id={pid}",
                     f"--config.seed={pid}"), env=subprocess_env(4), **_PIPES)
        for pid in (0, 1)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    assert all(rc == 2 for rc, _, _ in outputs.values()), report
    errs = {name: [line for line in err.splitlines() if line.startswith("error:")]
            for name, (_, _, err) in outputs.items()}
    assert errs["p1"] == ["error: process 1 was given other arguments than process 0: "
                          "--config.seed=1 here, --config.seed=0 there; every process of a run "
                          "takes the same command, all but its process id (--process_id, "
                          "--config.distributed.process_id)."], report
    assert errs["p0"][0].startswith("error: process(es) 1 were given other arguments"), report
    assert not any("Traceback" in err for _, _, err in outputs.values()), report
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*")), report


def _prepared(images, out, per_class: int = 4) -> None:
    """A prepared dataset of 2 `per_class` images in two classes at `out` (their folder:
    `images`)."""
    from PIL import Image
    from tok1d.data import prepare
    if not images.exists():
        for label in ("a", "b"):
            (images / label).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((40, 40, 3), 60 * i % 256, np.uint8)).save(
                    images / label / f"{i}.png")
    prepare.prepare(str(images), str(out), workers=1)


def _hosts_apart(tmp_path, case: str) -> tuple[list[str], list[str]]:
    """(each process's working folder, the arguments both get) for a run whose two "hosts"
    see the same relative paths differently, with the `case` that differs."""
    homes = [tmp_path / "host0", tmp_path / "host1"]
    for home in homes:
        home.mkdir()
    shared = str(tmp_path / "shared_run")
    if case == "workdir":  # `--workdir=run`: each host's own folder
        return [str(h) for h in homes], ["--workdir=run"]
    if case == "data":  # a prepared folder on host 0 only
        _prepared(tmp_path / "images", homes[0] / "data")
        return [str(h) for h in homes], [f"--workdir={shared}",
                                         "--config.data.name=array_record:data",
                                         "--config.data.eval_split=train"]
    # "config": `--config=run.py` reads another batch size on host 1
    text = open(os.path.join(REPO_ROOT, CONFIG)).read()
    (homes[0] / "run.py").write_text(text)
    (homes[1] / "run.py").write_text(text.replace("config.batch_size = 16",
                                                  "config.batch_size = 32"))
    return [str(h) for h in homes], [f"--workdir={shared}", "--config=run.py"]


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@_timeout_mark
@pytest.mark.parametrize("case,line0,line1", [
    ("workdir", "error: the workdir {home0}/run is not one folder for every process: "
                "process(es) 1 do not see",
     "error: the workdir {home1}/run is not one folder for every process: process(es) 1"),
    ("data", "error: the data array_record:data: process(es) 1 failed (their own output "
             "says why).", "error: Dataset directory not found: data"),
    ("config", "error: process(es) 1 read another config than process 0",
     "error: process 1 read another config than process 0 from the same command "
     "(batch_size: 32 here, 16 there)"),
])
def test_hosts_that_see_the_run_differently_all_stop_at_the_start(tmp_path, case, line0,
                                                                    line1):
    """What each host reads from its own disk, the same command on every host: a workdir
    that is not shared (the first save waited forever for the other host's files), data on
    one host only (it stopped alone; the other waited in orbax's start-up barrier, with no
    deadline), a config file that differs (another batch size trained without a word). Each
    host now stops at the start with one line, and its exit does not abort."""
    homes, args = _hosts_apart(tmp_path, case)
    dist = (f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            "--config.distributed.num_processes=2")
    config = [] if case == "config" else [f"--config={os.path.join(REPO_ROOT, CONFIG)}"]
    procs = {f"p{pid}": subprocess.Popen(
        [sys.executable, "-m", "tok1d.main", *config, *args, *COMMON, *dist,
         f"--config.distributed.process_id={pid}"], cwd=homes[pid], env=subprocess_env(4),
        **_PIPES) for pid in (0, 1)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    assert all(rc == 2 for rc, _, _ in outputs.values()), report
    for pid, expected in enumerate((line0, line1)):
        _, _, err = outputs[f"p{pid}"]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        expected = expected.format(home0=homes[0], home1=homes[1])
        assert len(lines) == 1 and lines[0].startswith(expected), report
        assert "Traceback" not in err and "Fatal" not in err and "abort" not in err, report
    assert not glob.glob(os.path.join(str(tmp_path), "*", "checkpoints", "*")), report


@_timeout_mark
@pytest.mark.parametrize("failing", [0, 1])
def test_a_host_whose_input_fails_stops_every_host(tmp_path, failing):
    """Each host reads its own copy of the data; one copy has a damaged shard. That host
    stopped alone with its line once it read the damage, while the other waited in the
    train step's collective (silent, until JAX's heartbeat aborted it minutes later) and the
    stopped one's exit waited for it in JAX's shutdown barrier. Now the stopped process tells
    the others (`parallel.tell_others`): both stop within seconds, each with one line, and
    neither aborts, whichever process hosts the coordination service."""
    from conftest import damage_records
    homes = [tmp_path / "host0", tmp_path / "host1"]
    for home in homes:
        home.mkdir()
        _prepared(tmp_path / "images", home / "data", per_class=16)
    damage_records(glob.glob(str(homes[failing] / "data" / "train.array_record*"))[0])
    dist = (f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            "--config.distributed.num_processes=2")
    started = time.monotonic()
    procs = {f"p{pid}": subprocess.Popen(
        main_command(CONFIG, str(tmp_path / "run"), "--config.data.name=array_record:data",
                     "--config.data.eval_split=train", "--config.total_steps=50",
                     "--config.checkpoint.every_steps=100", "--config.mesh.data=-1", *dist,
                     f"--config.distributed.process_id={pid}"),
        cwd=str(homes[pid]), env=subprocess_env(4), **_PIPES) for pid in (0, 1)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    assert time.monotonic() - started < 100, report  # (JAX's heartbeat: 100 s)
    assert all(rc == 1 for rc, _, _ in outputs.values()), report
    damaged = "Shard 'data/train.array_record-00000-of-00001' of split 'train' is damaged"
    for pid in (0, 1):
        _, _, err = outputs[f"p{pid}"]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        start = (f"error: {damaged}" if pid == failing else
                 f"error: process {failing} stopped ({damaged}")
        assert len(lines) == 1 and lines[0].startswith(start), report
        if pid != failing:
            assert lines[0].endswith(f"): process {pid} stops too."), report
        assert "Traceback" not in err and "Fatal" not in err and "abort" not in err, report


@_timeout_mark
@pytest.mark.parametrize("missing", ["data", "tokenizer"])
def test_tokenize_stops_every_host_when_one_lacks_the_data_or_the_tokenizer(tmp_path, missing):
    """`tok1d tokenize` on two hosts, where one host lacks the data folder or the tokenizer
    (the same relative path, each host its own folder): that host stopped alone, the other
    hung in its first collective, then both aborted. Both now stop with one line."""
    import jax
    from tok1d import models
    from tok1d.weights import pretrained
    homes = [tmp_path / "host0", tmp_path / "host1"]
    kwargs = dict(image_size=32, patch_size=8, num_latent_tokens=8, encoder_size="nano",
                  decoder_size="nano", codebook_size=64, token_dim=8)
    model = models.create("titok", **kwargs)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    for k, home in enumerate(homes):
        home.mkdir()
        if k == 0 or missing != "data":
            _prepared(tmp_path / "images", home / "data")
        if k == 0 or missing != "tokenizer":
            pretrained.save_pretrained(str(home / "tok"), "titok", kwargs,
                                       jax.tree.map(np.asarray, params["params"]))
    port = free_port()
    procs = {f"p{pid}": subprocess.Popen(
        [sys.executable, "-m", "tok1d.cli.tokenize", "--tokenizer=tok", "--data=data",
         f"--out={tmp_path / 'tokens'}", "--batch_size=4",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={pid}"], cwd=str(homes[pid]), env=subprocess_env(2), **_PIPES)
        for pid in (0, 1)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    assert all(rc == 2 for rc, _, _ in outputs.values()), report
    flag = {"data": "--data=data", "tokenizer": "--tokenizer=tok"}[missing]
    for pid, (_, _, err) in enumerate(outputs.values()):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, report
        if pid == 0:
            assert lines[0].startswith(f"error: {flag}: process(es) 1 failed"), report
        assert "Traceback" not in err and "Fatal" not in err and "abort" not in err, report
    assert not glob.glob(str(tmp_path / "tokens" / "*.array_record*")), report


@_timeout_mark
@pytest.mark.parametrize("command, with_config", [("evaluate", False), ("evaluate", True),
                                                  ("sample", False)])
def test_a_checkpoint_folder_on_one_host_only_stops_every_host(tmp_path, command, with_config):
    """`tok1d evaluate` / `sample --checkpoint=run` where only host 0 has `run`. Without
    --config (the workdir's config.json is the config), host 1 stopped alone ("--config is
    required") while host 0 waited in the config comparison's collective, which host 1
    skipped without a config (sample: in JAX's start-up, host 1 stopped before it); with
    --config, host 1 stopped at the load and host 0 waited in its first collective. Both now
    stop with one line each."""
    from configs import tiny_test
    from test_generator_training import tiny_config
    homes = [tmp_path / "host0", tmp_path / "host1"]
    for home in homes:
        home.mkdir()
    (homes[0] / "run").mkdir()
    run_config = (tiny_test.get_config() if command == "evaluate"
                  else tiny_config("gpt", "tokens", "tok"))
    (homes[0] / "run" / "config.json").write_text(json.dumps(run_config.to_dict()))
    config = [f"--config={os.path.join(REPO_ROOT, CONFIG)}"] if with_config else []
    port = free_port()
    procs = {f"p{pid}": subprocess.Popen(
        [sys.executable, "-m", f"tok1d.cli.{command}", *config, "--checkpoint=run",
         f"--out={tmp_path / 'out'}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={pid}"], cwd=str(homes[pid]),
        env=subprocess_env(2), **_PIPES) for pid in (0, 1)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    assert all(rc == 2 for rc, _, _ in outputs.values()), report
    lines = {name: [line for line in err.splitlines() if line.startswith("error:")]
             for name, (_, _, err) in outputs.items()}
    if with_config:
        expected = {"p0": "error: --checkpoint=run: process(es) 1 failed (their own output "
                          "says why). (ValueError)",
                    "p1": "error: --checkpoint=run: no such file or folder on this host "
                          "(every host must see it)."}
    else:
        expected = {"p0": "error: process(es) 1 read another config than process 0 from the "
                          "same command (each says which settings): is the config file (or "
                          "the --checkpoint folder with its config.json) the same on every "
                          "host?",
                    "p1": "error: process 1 has no config, process 0 has one from the same "
                          "command: is the --checkpoint folder (with the run's config.json) "
                          "or the config file on every host?"}
    assert lines == {name: [line] for name, line in expected.items()}, report
    assert not any("Traceback" in err for _, _, err in outputs.values()), report


@_timeout_mark
@pytest.mark.parametrize("case", ["no_tokenizer", "other_codebook", "other_tokens"])
def test_a_generator_run_whose_hosts_see_other_tokens_or_no_tokenizer_stops_every_host(
        tmp_path, case):
    """A generator run on two hosts (each its own `tokens` / `tok` folders): host 1 without
    the tokenizer stopped alone while host 0 waited in the tokenizer load's collective;
    host 1's tokens of another codebook stopped it alone (host 0 waited in orbax's start);
    host 1's tokens of another tokenizer of the same sizes trained on, mixed into every
    batch, without a word. Both hosts now stop at the start with one line each."""
    import jax
    import flax.linen as nn
    from test_generator_training import TOKENIZER, tiny_config
    from tok1d import models
    from tok1d.cli import tokenize
    from tok1d.data import sources
    from tok1d.weights import pretrained

    def tokenizer(seed, codebook_size=64):
        kwargs = dict(TOKENIZER, codebook_size=codebook_size)
        model = models.create("titok", **kwargs)
        params = nn.unbox(jax.jit(model.init)(jax.random.key(seed),
                                              np.zeros((1, 32, 32, 3), np.float32)))["params"]
        return model, kwargs, jax.tree.map(np.asarray, params)

    homes = [tmp_path / "host0", tmp_path / "host1"]
    mine = tokenizer(0)
    other = {"other_codebook": tokenizer(0, 32), "other_tokens": tokenizer(1)}.get(case, mine)
    for k, home in enumerate(homes):
        home.mkdir()
        model, kwargs, params = other if k == 1 else mine
        for split in ("train", "validation"):
            tokenize.tokenize_dataset(model, params, sources.DigitsSource(split),
                                      str(home / "tokens"), split=split, batch_size=32,
                                      num_examples=32, log=lambda _: None)
        if k == 0 or case != "no_tokenizer":
            pretrained.save_pretrained(str(home / "tok"), "titok", mine[1], mine[2])
    config = tiny_config("gpt", "tokens", "tok", steps=4)
    (tmp_path / "gen.json").write_text(json.dumps(config.to_dict()))
    dist = (f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            "--config.distributed.num_processes=2")
    procs = {f"p{pid}": subprocess.Popen(
        [sys.executable, "-m", "tok1d.main", f"--config={tmp_path / 'gen.json'}",
         f"--workdir={tmp_path / 'run'}", *dist, f"--config.distributed.process_id={pid}"],
        cwd=str(homes[pid]), env=subprocess_env(4), **_PIPES) for pid in (0, 1)}
    outputs = _wait_all(procs, time.monotonic() + TIMEOUT_S)
    report = _report(outputs)
    assert all(rc == 2 for rc, _, _ in outputs.values()), report
    expected = {
        "no_tokenizer": ("error: the tokenizer tok: process(es) 1 failed",
                         "error: 'tok' is not a released checkpoint name nor an existing "
                         "path"),
        "other_codebook": ("error: the tokens tokens: process(es) 1 failed",
                           "error: Token dataset does not match the generator:"),
        "other_tokens": ("error: the tokens tokens: process(es) 1 see another one than "
                         "process 0", "error: the tokens tokens differ here from process 0's "
                         "(tokenizer_fingerprint)"),
    }[case]
    for pid, start in enumerate(expected):
        _, _, err = outputs[f"p{pid}"]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(start), report
        assert "Traceback" not in err and "Fatal" not in err and "abort" not in err, report
    assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*")), report
