"""The guidance x temperature sweep's bookkeeping (tok1d.evaluation.sweep): the sampler's option
names, one table row per setting, the best named (lowest gFID among the accurate enough), the
files written. The sampling itself runs in the demo (tests/test_demo.py)."""

import json
import os

import pytest

from tok1d.cli import sample as sample_lib
from tok1d.evaluation import sweep


def test_grid_uses_each_samplers_option_names():
    assert sweep.grid({"guidance_scale": 2.0}, "maskgit", (0, 1), (1, 2)) == [
        {"guidance_scale": 0.0, "randomize_temperature": 1.0},
        {"guidance_scale": 0.0, "randomize_temperature": 2.0},
        {"guidance_scale": 1.0, "randomize_temperature": 1.0},
        {"guidance_scale": 1.0, "randomize_temperature": 2.0}]
    assert sweep.grid({}, "gpt", (1.5,), ()) == [{"cfg_scale": 1.5, "temperature": 1.0}]
    assert sweep.grid({"guidance_scale": 8.0, "randomize_temperature": 1.02}, "rar", (), ()) == [
        {"guidance_scale": 8.0, "randomize_temperature": 1.02}]


def test_sweep_table_has_one_row_per_setting_and_names_the_best(tmp_path):
    settings = sweep.grid({}, "maskgit", (0, 2), (1, 3))
    metrics = [dict(gfid=30.0, precision=0.5, recall=0.6, diversity=12.0, class_accuracy=0.7),
               dict(gfid=20.0, precision=0.6, recall=0.7, diversity=14.0, class_accuracy=0.8),
               dict(gfid=25.0, precision=0.8, recall=0.4, diversity=9.0, class_accuracy=0.99),
               dict(gfid=22.0, precision=0.8, recall=0.6, diversity=13.0, class_accuracy=0.95)]
    rows = [dict(s, num_images=100.0, **m) for s, m in zip(settings, metrics)]
    assert sweep.best(rows) is rows[1]
    chosen = sweep.best(rows, min_class_accuracy=0.9)
    assert chosen is rows[3]
    assert sweep.best([dict(settings[0], gfid=float("nan"))]) is None

    paths = sweep.write(str(tmp_path), rows, chosen, {"diversity": 15.0}, log=lambda m: None)
    table = open(paths["md"]).read().splitlines()
    body = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == 4 and sum("**best**" in line for line in body) == 1
    assert "**best**" in body[3]
    assert "Best (lowest gFID): guidance_scale=2, randomize_temperature=3 (gFID 22.00)." in table
    saved = json.load(open(paths["json"]))
    assert len(saved["rows"]) == 4 and saved["best"] == chosen
    pytest.importorskip("matplotlib")
    assert os.path.getsize(paths["png"]) > 1000


def test_sweep_without_a_feature_network_is_one_clear_error(tmp_path):
    from tok1d.train import config_lib
    cfg = config_lib.base_config("generator")
    with pytest.raises(ValueError, match="needs a feature network"):
        sample_lib.sweep_reference(cfg, "inception", log=lambda m: None)
    with pytest.raises(ValueError, match="data.name='digits'"):
        sample_lib.sweep_reference(cfg, "digits", log=lambda m: None)
