"""`python -m tok1d.cli.convert maskgit|gpt`: the fixture generators' official weights, written as
checkpoint files, convert through the command line into pretrained directories that reproduce
the official logits when loaded with `loaders.load_pretrained`."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import rel_err
from tok1d.weights import loaders
from tok1d.cli.convert import main as convert_main


def _npz(fixtures_dir, name):
    path = os.path.join(fixtures_dir, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return np.load(path)


def _write_sd(z, prefix, path):
    np.savez(path, **{k[len(prefix):]: z[k].astype(np.float32) for k in z.files
                      if k.startswith(prefix)})


@pytest.mark.parametrize("name", ["gen_vit", "gen_uvit"])
def test_maskgit_cli_round_trip(fixtures_dir, tmp_path, name):
    z = _npz(fixtures_dir, "titok.npz")
    ckpt, cfg, out = tmp_path / "gen.npz", tmp_path / "config.json", str(tmp_path / "out")
    _write_sd(z, f"{name}/sd/", ckpt)
    cfg.write_text(str(z[f"{name}/config"]))
    assert convert_main(["maskgit", "--checkpoint", str(ckpt), "--out", out,
                         "--official_config", str(cfg)]) == 0
    model, params = loaders.load_pretrained(out)
    with jax.default_matmul_precision("highest"):
        logits = model.apply({"params": params}, z[f"{name}/in/input_ids"].astype(np.int32),
                             z[f"{name}/in/labels"].astype(np.int32))
    assert rel_err(logits, z[f"{name}/out/logits_cond"]) < 2e-5
    assert type(model).__name__ == ("MaskGITUViT" if name == "gen_uvit" else "MaskGITBert")


def test_gpt_cli_round_trip_and_errors(fixtures_dir, tmp_path, capsys):
    z = _npz(fixtures_dir, "gigatok_1d.npz")
    heads = json.loads(str(z["meta_json"]))["gpt"]["n_head"]
    ckpt, out = tmp_path / "gpt.npz", str(tmp_path / "out")
    _write_sd(z, "gpt_sd/", ckpt)
    assert convert_main(["gpt", "--checkpoint", str(ckpt), "--out", out,
                         "--num_heads", str(heads)]) == 0
    model, params = loaders.load_pretrained(out)
    with jax.default_matmul_precision("highest"):
        logits = model.apply({"params": params}, z["gpt/input_codes"].astype(np.int32),
                             z["gpt/labels"].astype(np.int32))
    assert rel_err(logits, z["gpt/logits_teacher_forced"]) < 2e-5
    # A released size name that does not fit the checkpoint is refused, nothing is written.
    assert convert_main(["gpt", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"),
                         "--size", "B"]) == 2
    assert "size 'B'" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")
