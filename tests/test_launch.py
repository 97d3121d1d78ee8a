"""Launch scripts: argument handling and the commands their dry-run mode prints."""

import os
import shutil
import subprocess
import tarfile

from conftest import REPO

TPU = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM = os.path.join(REPO, "launch", "slurm.sbatch")


def fake_tools(tmp_path, **scripts: str) -> str:
    """Executables named as the keywords, with those scripts, in tmp_path/bin; returns a PATH
    that finds them first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in scripts.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def sh(*args, env=None):
    inherited = {k: v for k, v in os.environ.items() if k != "TOK1D_COMPILATION_CACHE"}
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=30,
                          env={**inherited, **(env or {})})


def test_tpu_run_starts_the_same_command_on_all_workers():
    out = sh(TPU, "--dry-run", "run", "pod", "us-central2-b", "configs/demo.py", "/gcs/b/w",
             "--config.total_steps=10")
    assert out.returncode == 0, out.stderr
    line = out.stdout.replace("\\", "")
    assert line.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b")
    assert "--worker=all" in line and "TOK1D_DISTRIBUTED=1" in line
    assert "python -m tok1d.main --config=configs/demo.py --workdir=/gcs/b/w" in line
    assert "--config.total_steps=10" in line


def test_tpu_run_without_overrides_and_dry_run_anywhere():
    """`run` with no overrides passes no empty argument (tok1d.main refused it: "unexpected
    arguments"), and --dry-run after the command still only prints (it ran gcloud)."""
    out = sh(TPU, "run", "--dry-run", "pod", "z", "configs/demo.py", "/gcs/b/w")
    assert out.returncode == 0, out.stderr
    line = out.stdout.replace("\\", "")
    assert "--workdir=/gcs/b/w  >> $HOME/tok1d.log" in line and "''" not in line


def test_tpu_run_returns_at_once_and_refuses_a_second_run(tmp_path):
    """With a fake gcloud that runs --command on a local "worker": `run` returns while the run
    goes on (it waited for the run to end, and exited 0 whatever happened), refuses a second
    run while one is going (it took over the first one's coordinator: both died), and names
    a worker without `setup`. (The worker's pgrep sees this test's processes only: other
    tests run tok1d.main beside it.)"""
    home, workdir = tmp_path / "home", str(tmp_path / "w")
    # The worker's "python -m tok1d.main": sleeps, so that a run is going.
    fake_bin = home / "tok1d" / ".venv" / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "activate").write_text(f'PATH="{fake_bin}:$PATH"\n')
    (fake_bin / "python").write_text('#!/bin/bash\nexec -a "python $*" sleep 30\n')
    (fake_bin / "python").chmod(0o755)
    path = fake_tools(
        tmp_path,
        gcloud='#!/bin/bash\nwhile [[ $# -gt 0 ]]; do [[ "$1" == --command ]] && c=$2; shift; '
               'done\ncd "$HOME" && bash -c "$c"\n',
        pgrep=f'#!/bin/bash\nexec {shutil.which("pgrep")} -f -- "$2.*{workdir}"\n')
    env = {"PATH": path, "HOME": str(home)}
    try:
        first = sh(TPU, "run", "pod", "z", "configs/demo.py", workdir, env=env)
        assert first.returncode == 0, first.stderr
        second = sh(TPU, "run", "pod", "z", "configs/demo.py", workdir, env=env)
        assert second.returncode == 1 and "a tok1d run is going" in second.stderr
        log = (home / "tok1d.log").read_text()
        assert log.startswith("=== ") and f"--workdir={workdir}" in log
    finally:
        subprocess.run(["pkill", "-f", f"[p]ython -m tok1d.main .*{workdir}"])
    (fake_bin / "activate").unlink()
    out = sh(TPU, "run", "pod", "z", "configs/demo.py", workdir, env=env)
    assert out.returncode == 1 and "run launch/tpu_vm.sh setup first" in out.stderr


def test_tpu_lifecycle_commands():
    create = sh(TPU, "--dry-run", "create", "pod", "z", "v4-32", "--spot").stdout
    assert "tpu-vm create pod --zone z" in create and "--accelerator-type v4-32" in create
    assert "--spot" in create
    setup = sh(TPU, "--dry-run", "setup", "pod", "z").stdout.replace("\\", "")
    assert "tpu-vm scp" in setup and "--worker=all" in setup and "--recurse" not in setup
    assert "tar -xzf tok1d-src.tar.gz -C tok1d" in setup and "pip install -e '.[tpu]'" in setup
    assert "sys.version_info < (3, 11)" in setup and "python3.11-venv" in setup
    assert "tpu-vm delete pod --zone z" in sh(TPU, "--dry-run", "delete", "pod", "z").stdout
    assert "--worker=3" in sh(TPU, "--dry-run", "tail", "pod", "z", "3").stdout


def test_tpu_bad_usage_fails_with_help():
    """A line naming what is wrong, then the usage, on stderr (a typo such as --spto made an
    on-demand VM without a word)."""
    out = sh(TPU, "--dry-run", "run", "pod")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("tpu_vm.sh: run needs NAME ZONE CONFIG WORKDIR")
    assert "Cloud TPU VM" in out.stderr
    out = sh(TPU, "frobnicate")
    assert out.returncode == 2 and out.stderr.startswith("tpu_vm.sh: unknown command")
    out = sh(TPU, "--dry-run", "create", "pod", "z", "v4-32", "--spto")
    assert out.returncode == 2 and "unknown argument(s) --spto" in out.stderr
    assert out.stdout == ""


def test_tpu_setup_copies_the_source_without_venv_or_git(tmp_path):
    """`setup` ships git's tracked and not-ignored files as one archive unpacked into
    ~/tok1d (it copied the whole checkout, .venv and .git included, with scp --recurse, which
    lands in tok1d/main/ the second time). Runs the real archive step with a fake gcloud."""
    path = fake_tools(tmp_path, gcloud='#!/bin/sh\necho "$@" >> "$GCLOUD_LOG"\n'
                      'case "$4" in scp) cp "$5" "$GCLOUD_LOG.tar.gz";; esac\n')
    log = tmp_path / "gcloud.log"
    out = sh(TPU, "setup", "pod", "z", env={"PATH": path, "TMPDIR": str(tmp_path),
                                            "GCLOUD_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    archive = tmp_path / "tok1d-src-pod.tar.gz"
    assert not archive.exists()  # removed once copied
    with tarfile.open(f"{log}.tar.gz") as tar:
        names = tar.getnames()
    assert "tok1d/__init__.py" in names and "launch/tpu_vm.sh" in names and "setup.py" in names
    assert not [n for n in names if n.split("/")[0] in (".venv", ".git") or "__pycache__" in n]
    calls = log.read_text().splitlines()
    assert calls[0].startswith(f"compute tpus tpu-vm scp {archive} pod:tok1d-src.tar.gz")
    assert "tar -xzf tok1d-src.tar.gz -C tok1d" in calls[1]


def test_slurm_dry_run_prints_srun_command(tmp_path):
    out = sh(SLURM, "configs/demo.py", "/shared/w", "--config.seed=1",
             env={"TOK1D_DRY_RUN": "1", "TOK1D_VENV": str(tmp_path / "venv"),
                  "TOK1D_REPO": REPO, "SLURM_CPUS_PER_TASK": "32"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"cd {REPO} && . {tmp_path}/venv/bin/activate && export TOK1D_DISTRIBUTED=1 "
        "TOK1D_COMPILATION_CACHE=/shared/w/jax_cache XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
        "SRUN_CPUS_PER_TASK=32 && srun --kill-on-bad-exit=1 python -m tok1d.main "
        "--config=configs/demo.py --workdir=/shared/w --config.seed=1")


def test_slurm_dry_run_command_starts_the_multi_host_run(tmp_path):
    """The printed command, run as it is, joins one run (it left out the exports: each task
    ran alone as process 0 of 1, all in one workdir): a fake srun records the environment
    and the arguments its tasks get."""
    path = fake_tools(tmp_path, srun='#!/bin/sh\necho "$TOK1D_DISTRIBUTED $SRUN_CPUS_PER_TASK '
                      '$*" > "$SRUN_LOG"\n')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    env = {"TOK1D_DRY_RUN": "1", "TOK1D_VENV": str(venv), "TOK1D_REPO": REPO,
           "SLURM_CPUS_PER_TASK": "8"}
    printed = sh(SLURM, "configs/demo.py", "/shared/w", env=env).stdout
    log = tmp_path / "srun.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOK1D_", "SRUN_"))}
    ran = subprocess.run(["bash", "-c", printed], capture_output=True, text=True, timeout=30,
                         env={**clean, "PATH": path, "SRUN_LOG": str(log)})
    assert ran.returncode == 0, ran.stderr
    assert log.read_text().split() == [
        "1", "8", "--kill-on-bad-exit=1", "python", "-m", "tok1d.main",
        "--config=configs/demo.py", "--workdir=/shared/w"]


def test_slurm_bad_usage_is_one_line(tmp_path):
    """No arguments: a usage line (it was bash's "1: config file"); submitted from outside a
    checkout without TOK1D_REPO, or without an environment: one line naming the setting."""
    out = sh(SLURM)
    assert out.returncode == 2 and out.stderr.startswith("usage: sbatch")
    env = {k: v for k, v in os.environ.items() if k not in ("TOK1D_REPO", "SLURM_SUBMIT_DIR")}
    out = subprocess.run(["bash", SLURM, "c.py", "/w"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=30)
    assert out.returncode == 2 and "not a tok1d checkout" in out.stderr
    assert "TOK1D_REPO" in out.stderr
    out = sh(SLURM, "c.py", "/w", env={"SLURM_SUBMIT_DIR": REPO,
                                      "TOK1D_VENV": str(tmp_path / "none")})
    assert out.returncode == 2 and "no environment at" in out.stderr
