"""The README's demo, shortened: tokenizer -> tokens -> generator -> samples judged by a
classifier and by the digit CNN's features (FID-digits, precision / recall, diversity) at the
setting a two-point sweep picked, all stages writing their outputs; both losses go down;
rerunning is a no-op; training the tokenizer on makes the later stages stale: one clear line."""

import glob
import json
import os
import subprocess

import pytest

from conftest import main_command, subprocess_env


def test_shortened_demo_runs_every_stage_and_learns(tmp_path):
    workdir = str(tmp_path / "demo")
    cmd = main_command(
        "configs/demo.py", workdir, "--config.total_steps=60", "--config.log_every_steps=10",
        "--config.eval_every_steps=1000", "--config.checkpoint.every_steps=1000",
        "--config.optim.warmup_steps=10", "--config.demo.generator.total_steps=40",
        "--config.demo.generator.log_every_steps=10",
        "--config.demo.generator.eval_every_steps=1000",
        "--config.demo.generator.optim.warmup_steps=10", "--config.demo.samples_per_class=4",
        # the evaluation suite with random Inception / LPIPS weights at the Inception's
        # smallest input (the real weights cannot be downloaded here)
        "--config.evaluation.allow_random_init=True", "--config.evaluation.inception_size=75",
        "--config.evaluation.is_splits=2",
        # a short digit CNN and a two-setting sweep at the 4 samples per class
        "--config.demo.feature_net.steps=100", "--config.demo.sweep.guidance_scales=(2.0,)",
        "--config.demo.sweep.temperatures=(1.0,3.0)", "--config.demo.sweep.samples_per_class=4")
    run = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "img/s" in run.stdout and "ETA" in run.stdout
    assert "Classifier accuracy" in run.stdout and "Digit features: rFID-digits" in run.stdout

    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    tok, gen, clf = metrics["tokenizer"], metrics["generator"], metrics["classifier"]
    assert tok["step"] == 60 and tok["num_examples"] == 179
    assert 0 < tok["codebook_usage"] <= 1 and tok["psnr"] > 5
    assert gen["step"] == 40 and gen["num_examples"] == 128 and gen["loss"] > 0
    assert clf["real_accuracy"] > 0.9 and clf["num_samples"] == 40
    assert 0 <= clf["sample_accuracy"] <= 1 and 0 <= clf["reconstruction_accuracy"] <= 1
    for path in ("tokenizer/reconstructions.png", "generator/samples.png",
                 "samples_per_class.png"):
        assert os.path.getsize(os.path.join(workdir, path)) > 500, path
    assert glob.glob(os.path.join(workdir, "tokenizer", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(workdir, "generator", "events.out.tfevents.*"))
    rec, gen_eval = metrics["evaluation"]["reconstruction"], metrics["evaluation"]["generation"]
    for key in ("psnr", "ssim", "lpips", "rfid", "inception_score", "precision", "recall",
                "codebook_usage"):
        assert key in rec and rec[key] == rec[key], key
    assert rec["psnr"] == pytest.approx(tok["psnr"], rel=1e-5)
    assert gen_eval["num_images"] == 40 and gen_eval["gfid"] > 0
    report = open(os.path.join(workdir, "report.md")).read()
    assert "rFID" in report and "gFID" in report and "samples_per_class.png" in report
    digits, sweep = metrics["digits"], metrics["sweep"]
    assert digits["feature_net_accuracy"] > 0.8 and digits["num_samples"] == 40
    assert digits["rfid_digits"] > 0 and digits["gfid_digits"] > 0
    assert 0 <= digits["precision"] <= 1 and 0 <= digits["recall"] <= 1
    assert digits["diversity"] > 0 and digits["real_diversity"] > 0
    assert 0 <= digits["sample_class_accuracy"] <= 1
    assert [(r["guidance_scale"], r["randomize_temperature"]) for r in sweep["rows"]] == [
        (2.0, 1.0), (2.0, 3.0)]
    assert sweep["best"] in sweep["rows"] and all(r["num_images"] == 40 for r in sweep["rows"])
    assert digits["chosen_randomize_temperature"] == sweep["best"]["randomize_temperature"]
    for text in ("rfid_digits", "gfid_digits", "real_diversity", "NOT comparable",
                 "sweep/sweep.png", "**best**"):
        assert text in report, text
    assert os.path.getsize(os.path.join(workdir, "sweep", "sweep.png")) > 1000
    assert os.path.exists(os.path.join(workdir, "eval", "report.md"))
    gen_config = json.load(open(os.path.join(workdir, "generator", "config.json")))
    assert (gen_config["data"]["name"], gen_config["data"]["image_size"]) == ("digits", 32)
    info = json.load(open(os.path.join(workdir, "tokens", "tokens_info.json")))
    assert info["num_tokens"] == 16 and set(info["splits"]) == {"train", "validation"}

    for stage in ("tokenizer", "generator"):
        lines = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        train = [line["train/loss"] for line in lines if "train/loss" in line]
        assert train[-1] < 0.7 * train[0], (stage, train)

    # Rerunning resumes every stage from its outputs: nothing is trained again.
    again = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("Nothing to do") == 2
    assert "Samples and report are up to date" in again.stdout

    # Training the tokenizer on (more steps) makes the tokens and the generator stale: one
    # clear line that says what to delete, nothing removed.
    longer = [a if a != "--config.total_steps=60" else "--config.total_steps=64" for a in cmd]
    stale = subprocess.run(longer, env=subprocess_env(1), capture_output=True, text=True,
                           timeout=900)
    assert stale.returncode == 2, stale.stderr[-3000:]
    last = stale.stderr.strip().splitlines()[-1]
    assert "changed since" in last and "stale" in last and "Traceback" not in stale.stderr
    assert os.path.isdir(os.path.join(workdir, "generator"))
