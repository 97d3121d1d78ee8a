"""Launch scripts: argument handling and the commands their dry-run mode prints."""

import os
import subprocess

from conftest import REPO

TPU = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM = os.path.join(REPO, "launch", "slurm.sbatch")


def sh(*args, env=None):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_tpu_run_starts_the_same_command_on_all_workers():
    out = sh(TPU, "--dry-run", "run", "pod", "us-central2-b", "configs/demo.py", "/gcs/b/w",
             "--config.total_steps=10")
    assert out.returncode == 0, out.stderr
    line = out.stdout.replace("\\", "")
    assert line.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b")
    assert "--worker=all" in line and "TOK1D_DISTRIBUTED=1" in line
    assert "python -m tok1d.main --config=configs/demo.py --workdir=/gcs/b/w" in line
    assert "--config.total_steps=10" in line and "TOK1D_COMPILATION_CACHE" in line


def test_tpu_run_without_overrides_and_dry_run_anywhere():
    """`run` with no overrides passes no empty argument (tok1d.main refused it: "unexpected
    arguments"), and --dry-run after the command still only prints (it ran gcloud)."""
    out = sh(TPU, "run", "--dry-run", "pod", "z", "configs/demo.py", "/gcs/b/w")
    assert out.returncode == 0, out.stderr
    line = out.stdout.replace("\\", "")
    assert "--workdir=/gcs/b/w  > $HOME/tok1d.log" in line and "''" not in line


def test_tpu_lifecycle_commands():
    create = sh(TPU, "--dry-run", "create", "pod", "z", "v4-32", "--spot").stdout
    assert "tpu-vm create pod --zone z" in create and "--accelerator-type v4-32" in create
    assert "--spot" in create
    setup = sh(TPU, "--dry-run", "setup", "pod", "z").stdout.replace("\\", "")
    assert "tpu-vm scp --recurse" in setup and "--worker=all" in setup
    assert "pip install -e '.[tpu]'" in setup
    assert "tpu-vm delete pod --zone z" in sh(TPU, "--dry-run", "delete", "pod", "z").stdout
    assert "--worker=3" in sh(TPU, "--dry-run", "tail", "pod", "z", "3").stdout


def test_tpu_bad_usage_fails_with_help():
    out = sh(TPU, "--dry-run", "run", "pod")
    assert out.returncode != 0 and "Cloud TPU VM" in out.stdout + out.stderr
    out = sh(TPU, "frobnicate")
    assert out.returncode != 0 and "unknown command" in out.stderr


def test_slurm_dry_run_prints_srun_command(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    out = sh(SLURM, "configs/demo.py", "/shared/w", "--config.seed=1",
             env={"TOK1D_DRY_RUN": "1", "TOK1D_VENV": str(tmp_path / "venv")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("srun python -m tok1d.main --config=configs/demo.py "
                                  "--workdir=/shared/w --config.seed=1")
