"""The README's demo, shortened: trains, then writes the grid, metrics, TensorBoard logs and a
checkpoint into the workdir; the loss goes down."""

import glob
import json
import os
import subprocess

from conftest import main_command, subprocess_env


def test_shortened_demo_writes_all_outputs_and_learns(tmp_path):
    workdir = str(tmp_path / "demo")
    cmd = main_command("configs/demo.py", workdir, "--config.total_steps=60",
                       "--config.log_every_steps=10", "--config.eval_every_steps=1000",
                       "--config.checkpoint.every_steps=1000", "--config.data.eval_examples=64",
                       "--config.batch_size=16", "--config.optim.warmup_steps=10")
    run = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "img/s" in run.stdout and "ETA" in run.stdout

    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["step"] == 60 and metrics["num_examples"] == 64
    for key in ("psnr", "l2", "codebook_usage", "codebook_perplexity"):
        assert key in metrics
    assert 0 < metrics["codebook_usage"] <= 1
    assert os.path.getsize(os.path.join(workdir, "reconstructions.png")) > 1000
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "60"))

    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(train) == 6
    assert train[-1] < 0.7 * train[0], train
