"""The guidance x temperature sweep's bookkeeping (tok1d.evaluation.sweep): the sampler's option
names, one table row per setting, the best named (lowest gFID among the accurate enough), the
files written. The sampling itself runs in the demo (tests/test_demo.py)."""

import gc
import json
import os
import weakref

import ml_collections
import numpy as np
import pytest

from tok1d import errors
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
    metrics = [dict(gfid=30.0, sfid=40.0, precision=0.5, recall=0.6, diversity=12.0,
                    class_accuracy=0.7),
               dict(gfid=20.0, precision=0.6, recall=0.7, diversity=14.0, class_accuracy=0.8),
               dict(gfid=25.0, precision=0.8, recall=0.4, diversity=9.0, class_accuracy=0.99),
               dict(gfid=22.0, precision=0.8, recall=0.6, diversity=13.0, class_accuracy=0.95)]
    rows = [sweep.row(s, dict(m, num_images=100.0, lpips=0.1)) for s, m in zip(settings, metrics)]
    assert set(rows[0]) == {"guidance_scale", "randomize_temperature", "gfid", "sfid", "precision",
                            "recall", "diversity", "class_accuracy", "num_images"}
    assert sweep.best(rows) is rows[1]
    chosen = sweep.best(rows, min_class_accuracy=0.9)
    assert chosen is rows[3]
    assert sweep.best([dict(settings[0], gfid=float("nan"))]) is None

    paths = sweep.write(str(tmp_path), rows, chosen, {"diversity": 15.0}, log=lambda m: None)
    table = open(paths["md"]).read().splitlines()
    assert table[0] == ("| guidance_scale | randomize_temperature | gfid | sfid | precision | "
                        "recall | diversity | class_accuracy | best |")
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
    said = []
    with pytest.raises(ValueError, match="needs a feature network"):
        sample_lib.sweep_reference(cfg, "inception", log=said.append)
    assert said == []  # (the metric nets' note on the missing Inception came before the error)
    with pytest.raises(ValueError, match="data.name='digits'"):
        sample_lib.sweep_reference(cfg, "digits", log=lambda m: None)


def test_choose_falls_back_to_the_most_accurate_setting_and_says_so():
    settings = sweep.grid({}, "maskgit", (0, 1, 2), (1,))
    rows = [dict(s, gfid=g, class_accuracy=a)
            for s, g, a in zip(settings, (20.0, 25.0, 30.0), (0.5, 0.8, 0.7))]
    assert sweep.best(rows, min_class_accuracy=0.9) is None
    said = []
    assert sweep.choose(rows, 0.9, said.append) is rows[1]
    assert len(said) == 1 and "most accurate" in said[0] and "0.9" in said[0]
    assert sweep.choose(rows, 0.6) is rows[1] and sweep.choose(rows) is rows[0]


def test_sweep_keeps_only_the_chosen_settings_samples_and_no_digit_is(monkeypatch):
    """sample.sweep holds one setting's samples (the chosen one's), not every setting's; on a
    feature net that is not the Inception its softmax 'IS' is not reported as the IS."""
    from tok1d.evaluation import evaluator
    from tok1d.train import config_lib
    cfg = config_lib.base_config("generator")
    cfg.lock()  # as the command line hands it over: a setting's new key still applies
    settings = sweep.grid(cfg.sampling.to_dict(), cfg.model.name, (0, 1, 2), (1,))
    assert any(key not in cfg.sampling for key in settings[0])
    metrics = iter([dict(gfid=30.0, class_accuracy=0.99, inception_score=5.0, num_images=4.0),
                    dict(gfid=20.0, class_accuracy=0.5, inception_score=6.0, num_images=4.0),
                    dict(gfid=25.0, class_accuracy=0.95, inception_score=7.0, num_images=4.0)])
    drawn = []

    def fake_sample(cfg, *args, **kwargs):
        assert all(cfg.sampling[k] == v for k, v in settings[len(drawn)].items())
        images = np.full((4, 2, 2, 3), len(drawn), np.uint8)
        drawn.append(weakref.ref(images))
        return images, np.arange(4) % 2

    monkeypatch.setattr(sample_lib, "sample_images", fake_sample)
    monkeypatch.setattr(evaluator, "generation_metrics", lambda *a, **k: (next(metrics), {}))
    rows, kept = sample_lib.sweep(cfg, None, None, None, None, evaluator.MetricNets(), None,
                                  settings, 4, log=lambda m: None, min_class_accuracy=0.9)
    gc.collect()
    assert rows[2] is sweep.choose(rows, 0.9) and int(kept[0][0, 0, 0, 0]) == 2
    assert [ref() is None for ref in drawn] == [True, True, False]
    assert all("inception_score" not in r for r in rows) and rows[0]["gfid"] == 30.0
    assert "inception_score" in sweep.row(settings[0], dict(gfid=1.0, inception_score=2.0))


def test_demo_report_shows_this_runs_sweep_plot_only(tmp_path):
    from tok1d.cli import demo
    config = ml_collections.ConfigDict(dict(data=dict(name="digits", image_size=32)))
    rows = [dict(guidance_scale=0.0, randomize_temperature=1.0, gfid=3.0, num_images=4.0)]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.png").write_bytes(b"stale")  # an older run's plot
    result = {"digits": {"gfid_digits": 3.0}, "sweep": dict(rows=rows, best=rows[0],
                                                            reference=None)}
    demo.write_demo_report(str(tmp_path), result, config)
    assert "![sweep]" not in (tmp_path / "report.md").read_text()
    result["sweep"]["plot"] = "sweep/sweep.png"
    demo.write_demo_report(str(tmp_path), result, config)
    assert "![sweep](sweep/sweep.png)" in (tmp_path / "report.md").read_text()


def test_sweep_json_is_strict_and_a_nan_diversity_is_explained(tmp_path):
    """Non-finite metrics are null in sweep.json (strict JSON, as metrics.json); a diversity
    that is NaN (one image per class) gets a note in sweep.md."""
    settings = sweep.grid({}, "maskgit", (0, 2), (1,))
    rows = [sweep.row(settings[0], dict(gfid=float("inf"), diversity=float("nan"))),
            sweep.row(settings[1], dict(gfid=20.0, diversity=float("nan")))]
    paths = sweep.write(str(tmp_path), rows, sweep.best(rows), log=lambda m: None)

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    saved = json.loads(open(paths["json"]).read(), parse_constant=refuse)
    assert saved["rows"][0]["gfid"] is None and saved["rows"][0]["diversity"] is None
    assert saved["best"]["gfid"] == 20.0
    assert sweep.DIVERSITY_NOTE in open(paths["md"]).read()
    assert "diversity is NaN: every class has fewer than 2 images" in sweep.DIVERSITY_NOTE
    assert sweep.DIVERSITY_NOTE not in sweep.markdown(
        [sweep.row(settings[0], dict(gfid=1.0, diversity=3.0))], None)


def test_an_out_holding_a_sweep_is_refused_before_any_work(tmp_path):
    (tmp_path / "sweep.json").write_text('{"rows": [1, 2, 3, 4]}')
    with pytest.raises(errors.UserError, match=f"--out={tmp_path} already holds "
                       "sweep.json; choose another --out \\(or delete it\\)"):
        # (nothing is read: the config and checkpoint are never looked at)
        sample_lib.run_sweep(None, "no_such_checkpoint", "", 4, str(tmp_path), ["1"], ["1"])
    assert (tmp_path / "sweep.json").read_text() == '{"rows": [1, 2, 3, 4]}'


def test_sweep_numbers_must_be_finite():
    assert sample_lib._numbers(["0", "1.5", "3"])
    for bad in (["1e400"], ["inf"], ["nan"], ["-1"], ["x"]):
        assert not sample_lib._numbers(bad), bad
