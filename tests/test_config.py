"""Config loading and start-up validation."""

import glob
import importlib.util
import os
import subprocess

import pytest

from conftest import REPO, main_command, subprocess_env
from tok1d.train import config_lib


def load_config(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_validates_and_documents_its_command(path):
    config = load_config(path)
    config_lib.validate(config, num_devices=8)
    mod_doc = open(path).read().split('"""')[1]
    assert "python -m tok1d.main" in mod_doc and os.path.basename(path) in mod_doc


def test_unknown_key_in_config_file_is_named_with_suggestion():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.optim.warmup_step = 5
    with pytest.raises(config_lib.ConfigError, match=r"optim\.warmup_step.*optim\.warmup_steps"):
        config_lib.validate(config, num_devices=8)


def test_unknown_model_argument_is_named_with_suggestion():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.model.num_latnt_tokens = 4
    with pytest.raises(config_lib.ConfigError, match="num_latnt_tokens.*num_latent_tokens"):
        config_lib.validate(config, num_devices=8)


def test_impossible_shapes_fail_with_clear_messages():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.data.image_size = 36          # patch size 8
    config.batch_size = 12               # 8 devices on the data axis
    config.mesh.fsdp = 3                 # does not divide 8 devices
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, num_devices=8)
    msg = str(e.value)
    assert "image_size=36 is not divisible by model.patch_size=8" in msg
    assert "mesh" in msg and "does not fit 8 devices" in msg

    config.mesh.fsdp = 2
    with pytest.raises(config_lib.ConfigError, match=r"batch_size=12 is not divisible by the "
                       r"data-parallel size 8"):
        config_lib.validate(config, num_devices=8)


def test_grad_accumulation_must_divide_the_per_step_batch():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.optim.grad_accum_steps = 3
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=3"):
        config_lib.validate(config, num_devices=8)


def test_cli_rejects_mistyped_override_and_bad_shapes(tmp_path):
    env = subprocess_env(8)
    bad_key = subprocess.run(main_command("configs/tiny_test.py", str(tmp_path / "a"),
                                          "--config.optim.lrr=0.1"),
                             env=env, capture_output=True, text=True, timeout=120)
    assert bad_key.returncode != 0
    assert "lrr" in bad_key.stderr
    bad_shape = subprocess.run(main_command("configs/tiny_test.py", str(tmp_path / "b"),
                                            "--config.data.image_size=36"),
                               env=env, capture_output=True, text=True, timeout=120)
    assert bad_shape.returncode == 2, bad_shape.stderr[-2000:]
    assert "not divisible by model.patch_size" in bad_shape.stderr
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_exit_status_of_command_line_jobs(capsys):
    from tok1d.train.config_lib import ConfigError, exit_status
    assert exit_status(lambda: None) == 0

    def bad():
        raise ConfigError("model.size='huge' is unknown")
    assert exit_status(bad) == 2
    assert "error: model.size='huge' is unknown" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # real failures keep their traceback
        exit_status(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
