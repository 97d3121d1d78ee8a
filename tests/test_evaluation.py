"""The evaluation pipeline: streaming metrics over sharded batches, references, reports and the
`python -m tok1d.cli.evaluate` jobs (random Inception / LPIPS weights: no real weights here; the
networks themselves are checked against the official code in test_inception / test_perceptual).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from tok1d import errors, parallel
from tok1d.train import config_lib
from tok1d.weights import layout
from tok1d.evaluation import evaluator, fid as fid_lib, report
from tok1d.models.frozen import inception as inception_lib

SIZE = 32          # image size of the test data (digits)
INCEPTION = 75     # the smallest input the Inception takes: cheap on CPU


@pytest.fixture(scope="module")
def nets():
    model = inception_lib.FIDInceptionV3(input_size=INCEPTION)
    return evaluator.MetricNets(inception=(model, inception_lib.random_params(0)))


def _images(n, seed):
    """Smooth random colour images in [0, 1] (N, SIZE, SIZE, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3)).astype(np.float32)
    return np.clip(np.kron(coarse, np.ones((1, 8, 8, 1), np.float32))
                   + 0.05 * rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32), 0, 1)


def _mesh(num_devices):
    return parallel.create_mesh({"data": -1}, jax.devices()[:num_devices])


def _ecfg(**kw):
    ecfg = config_lib.base_config().evaluation
    ecfg.is_splits, ecfg.chunk_size = 2, 2
    ecfg.update(kw)
    return ecfg


def _run(nets, mesh, real, recon, batch=16, **ecfg):
    sharding = parallel.batch_sharding(mesh, parallel.DEFAULT_RULES)
    metrics = evaluator.ImageMetrics.from_config(nets, mesh, _ecfg(**ecfg))
    with jax.set_mesh(mesh):
        for (x, m), (y, _) in zip(evaluator.numpy_batches(real, batch, sharding),
                                  evaluator.numpy_batches(recon, batch, sharding)):
            metrics.add_pairs(x, y, m)
    return metrics


def test_metrics_identical_on_1_and_8_devices(nets):
    # Batches of 16: 8 chunks of 2 on one device, one chunk of 2 on each of 8 devices; the
    # 20 images make 1.25 batches, so the padded rows must not count.
    real = _images(20, 0)
    recon = np.clip(real + 0.1 * np.random.default_rng(1).standard_normal(real.shape), 0, 1)
    one = _run(nets, _mesh(1), real, recon).result()
    eight = _run(nets, _mesh(8), real, recon).result()
    assert set(one) >= {"psnr", "ssim", "fid", "inception_score", "precision", "recall"}
    assert one["num_images"] == 20
    assert one == eight, {k: (one[k], eight[k]) for k in one if one[k] != eight[k]}
    assert one["fid"] > 0 and 0 < one["ssim"] < 1


def test_inception_outputs_see_8_bit_images_and_the_unbiased_logits(nets):
    """The Inception Score takes the fc without its bias (ADM's evaluator, torch-fidelity's
    logits_unbiased), and the images are rounded to 8-bit levels first (as ADM's .npz of PNGs
    and TiTok's rounded reconstructions): float images within half a level of each other
    score alike."""
    model, params = nets.inception
    params = jax.tree.map(lambda x: x, params)
    params["fc"] = dict(params["fc"], bias=params["fc"]["bias"] + 3.0 * jnp.arange(
        params["fc"]["bias"].shape[0]) / params["fc"]["bias"].shape[0])
    fn = jax.jit(evaluator._inception_outputs(model))
    x = _images(2, 3)
    levels = np.round(x * 255.0) / 255.0
    feats, probs = (fn(params, jnp.asarray(x))[k] for k in ("pool", "probs"))
    feats_l, probs_l = (fn(params, jnp.asarray(np.clip(levels + 0.4 / 255.0 * (
        np.random.default_rng(0).uniform(size=x.shape) - 0.5), 0, 1)))[k]
        for k in ("pool", "probs"))
    np.testing.assert_array_equal(np.asarray(feats), np.asarray(feats_l))
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(probs_l))
    out = model.apply({"params": params}, jnp.asarray(levels))
    np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(
        out["pool3"] @ params["fc"]["kernel"])), rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(probs), np.asarray(jax.nn.softmax(out["logits"])),
                           rtol=1e-3)


def test_precision_recall_in_adms_float16_on_request(nets):
    """evaluation.precision_recall_float16: the ADM evaluator's half-precision distances (to
    compare with published numbers); float32 otherwise."""
    from tok1d.evaluation.precision_recall import precision_recall
    real = _images(12, 0)
    recon = np.clip(real + 0.2 * np.random.default_rng(1).standard_normal(real.shape), 0, 1)
    for half in (False, True):
        metrics = _run(nets, _mesh(1), real, recon, precision_recall_float16=half)
        got = metrics.result()
        want = precision_recall(np.concatenate(metrics._real_pool),
                                np.concatenate(metrics._fake_pool), k=3, adm_float16=half)
        assert (got["precision"], got["recall"]) == (float(want["precision"]),
                                                     float(want["recall"]))
        assert metrics.adm_float16 is half


def test_metric_networks_run_at_full_float32_precision(nets):
    """Every convolution and matmul of the metric networks asks for HIGHEST precision (TPUs
    default to one bf16 pass and recent GPUs to TF32: FIDs that depend on the chip)."""
    import re
    from jax.sharding import PartitionSpec
    model, params = nets.inception
    mesh = _mesh(1)
    fn = evaluator._chunked_fn("inception", model, mesh, PartitionSpec("data"), 2, 1)
    with jax.set_mesh(mesh):
        text = fn.lower(params, jnp.zeros((2, SIZE, SIZE, 3))).as_text()
    assert set(re.findall(r"#stablehlo<precision (\w+)>", text)) == {"HIGHEST"}


def test_fid_of_a_set_with_itself_and_against_references(nets, tmp_path):
    real = _images(16, 2)
    same = _run(nets, _mesh(8), real, real)
    r = same.result()
    # ~0 up to the square roots of rounding-level eigenvalues of a singular covariance
    # (16 images, 2048 features): |FID| << tr(sigma)
    trace = np.trace(same.real.mean_cov()[1])
    assert abs(r["fid"]) < 1e-5 * trace and r["precision"] == r["recall"] == 1.0
    assert r["ssim"] == pytest.approx(1.0, abs=1e-6)
    # The statistics are float64 sums: FID equals the direct computation from the features.
    mu, sigma = same.real.mean_cov()
    features = np.concatenate(same._real_pool).astype(np.float64)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-10)

    # A reference file: stats (ADM mu, sigma) plus images for recall.
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=mu, sigma=sigma, arr_0=(real * 255).round().astype(np.uint8))
    mesh = _mesh(8)
    sharding = parallel.batch_sharding(mesh, parallel.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        ref = evaluator.reference_from_file(str(stats), nets, mesh, sharding, 8, _ecfg())
        fake = _images(12, 3)
        gen, kept = evaluator.generation_metrics(
            nets, mesh, ref, evaluator.numpy_batches(fake, 8, sharding), _ecfg(),
            keep=np.arange(12) < 5)
    assert kept.shape == (5, SIZE, SIZE, 3) and kept.dtype == np.uint8
    assert ref.features.shape == (16, 2048)
    mu_f, sigma_f = fid_lib.FeatureStats(2048).update(
        np.concatenate(_run(nets, mesh, fake, fake)._real_pool)).mean_cov()
    assert gen["gfid"] == pytest.approx(fid_lib.frechet_distance(mu_f, sigma_f, mu, sigma),
                                        rel=1e-6)
    assert 0 <= gen["precision"] <= 1 and 0 <= gen["recall"] <= 1

    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="neither FID statistics"):
        evaluator.reference_from_file(str(bad), nets, mesh, sharding, 8, _ecfg())


def test_sfid_is_adms_spatial_frechet_distance(nets, tmp_path):
    """sFID (ADM's evaluator: `mixed_6/conv:0[..., :7]`, flattened): the Inception's "spatial"
    output is the first 7 channels of Mixed_6d's 1x1 branch; sFID is the Frechet distance of
    those features, against the real images or an ADM reference batch's mu_s / sigma_s."""
    model, params = nets.inception
    x = jnp.asarray(_images(3, 5))
    out, inter = model.apply({"params": params}, x, capture_intermediates=True,
                             mutable=["intermediates"])
    branch = inter["intermediates"]["Mixed_6d"]["branch1x1"]["__call__"][0]
    np.testing.assert_array_equal(np.asarray(out["spatial"]),
                                  np.asarray(branch[..., :7]).reshape(3, -1))

    real = _images(16, 2)
    fake = np.clip(real + 0.15 * np.random.default_rng(4).standard_normal(real.shape), 0, 1)
    got = _run(nets, _mesh(8), real, fake).result()
    fn = jax.jit(evaluator._inception_outputs(model))
    stats = [fid_lib.FeatureStats(out["spatial"].shape[-1]).update(
        np.asarray(fn(params, jnp.asarray(images))["spatial"])) for images in (real, fake)]
    (mu_r, sigma_r), (mu_f, sigma_f) = (st.mean_cov() for st in stats)
    assert got["sfid"] == pytest.approx(
        fid_lib.frechet_distance(mu_f, sigma_f, mu_r, sigma_r), rel=1e-5)  # other programs
    same = _run(nets, _mesh(8), real, real).result()
    assert abs(same["sfid"]) < 1e-5 * np.trace(sigma_r) < got["sfid"]
    off = _run(nets, _mesh(8), real, fake, sfid=False)  # evaluation.sfid: no spatial stats
    assert off.real_spatial is None and "sfid" not in off.result()
    assert off.result()["fid"] == pytest.approx(got["fid"], rel=1e-9)

    # An ADM reference batch's mu_s / sigma_s are used as they are (here: the fake set's own).
    path = tmp_path / "adm_ref.npz"
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=mu_f, sigma_s=sigma_f)
    mesh = _mesh(8)
    sharding = parallel.batch_sharding(mesh, parallel.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        ref = evaluator.reference_from_file(str(path), nets, mesh, sharding, 8,
                                            _ecfg(precision_recall=False))
        gen, _ = evaluator.generation_metrics(
            nets, mesh, ref, evaluator.numpy_batches(fake, 8, sharding),
            _ecfg(precision_recall=False))
    assert abs(gen["sfid"]) < 1e-5 * np.trace(sigma_f)
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=mu_f, sigma_s=sigma_f[:5])
    with pytest.raises(ValueError, match="sigma_s .* does not match mu_s"):
        evaluator.reference_from_file(str(path), nets, mesh, sharding, 8, _ecfg())


def test_a_saved_reference_is_checked_and_never_replaced(nets, tmp_path, monkeypatch):
    """`Reference.save` records what the statistics were computed with; loading them under
    another Inception input, size or random weights is an error (none without a feature
    network); an existing file is not replaced; a malformed record is one error; the report's
    notes say which metrics a reference cannot give."""
    ecfg = _ecfg()
    ecfg.allow_random_init = True
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((5, 2048)).astype(np.float32)
    ref = evaluator.Reference(feats.mean(0), np.eye(2048), feats, "digits:validation",
                              (np.zeros(63), np.eye(63)), 5)
    path = str(tmp_path / "ref.npz")
    ref.save(path, ecfg, nets)
    meta = fid_lib.load_meta(path)
    assert meta["random_weights"] is True and meta["count"] == 5
    evaluator.check_reference_file(path, ecfg, nets)  # the same settings pass
    params = nets.inception[1]
    for net, inception, message in (
            (nets.inception[0], "inception_fid", "random_weights=True"),
            (inception_lib.FIDInceptionV3(input_size=INCEPTION, input_convention="pytorch_fid"),
             "", "inception_input='tf1'"),
            (inception_lib.FIDInceptionV3(input_size=99), "", "inception_size=75")):
        other = evaluator.MetricNets(inception=(net, params))
        with pytest.raises(ValueError, match=f"computed with {message}; this evaluation"):
            evaluator.check_reference_file(path, _ecfg(inception=inception), other)
    evaluator.check_reference_file(path, ecfg, evaluator.MetricNets())  # no features: no check
    with pytest.raises(ValueError, match="ref.npz exists; remove it"):
        fid_lib.save_statistics(path, np.zeros(3), np.eye(3))
    assert fid_lib.load_meta(path)["count"] == 5 and sorted(os.listdir(tmp_path)) == ["ref.npz"]
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(3), meta=np.asarray('{"count": null}'))
    with pytest.raises(ValueError, match="bad.npz: its 'meta' entry is not a JSON record"):
        fid_lib.load_meta(bad)
    junk = tmp_path / "junk.npz"  # the check of a run's reference at its start reads it safely
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz is not a readable .npz"):
        evaluator.check_reference_file(str(junk), ecfg, nets)
    with pytest.raises(FileNotFoundError, match="FID reference not found"):
        evaluator.check_reference_file(str(tmp_path / "none.npz"), ecfg, nets)
    # Where the file system has no hard links, the write renames; a failed write leaves nothing.
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no")))
    fid_lib.save_statistics(str(tmp_path / "renamed.npz"), np.zeros(3), np.eye(3))
    assert fid_lib.load_reference(str(tmp_path / "renamed.npz"))[0].shape == (3,)
    with pytest.raises(ValueError, match="renamed.npz exists"):
        fid_lib.save_statistics(str(tmp_path / "renamed.npz"), np.zeros(3), np.eye(3))
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        fid_lib.save_statistics(str(tmp_path / "failed.npz"), np.zeros(3), np.eye(3))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "junk.npz", "ref.npz", "renamed.npz"]

    assert ref.notes(ecfg, nets) == []  # 63 spatial features: the 75-px Inception's
    plain = evaluator.Reference(ref.mu, ref.sigma, None, path)
    assert [n.split(":")[0] for n in plain.notes(ecfg, nets)] == [
        "No precision / recall", "No sFID"]
    big = evaluator.Reference(ref.mu, ref.sigma, feats, path, (np.zeros(2023), np.eye(2023)))
    assert "has 2023 spatial features; the Inception at evaluation.inception_size gives 63" in (
        big.notes(ecfg, nets)[0])
    assert plain.notes(_ecfg(precision_recall=False, sfid=False), nets) == []


def test_report_files(tmp_path):
    grid = np.zeros((10, 20, 3), np.uint8)
    path = report.write_report(str(tmp_path), "Reconstruction: x",
                               {"rfid": 1.25, "psnr": 20.0, "num_images": 40.0},
                               {"reconstructions": grid}, {"checkpoint": "x"}, ["a note"], step=7)
    text = open(path).read()
    assert "| rfid | 1.2500 | rFID" in text and "![reconstructions.png](reconstructions.png)" in text
    # a count is whole (it printed num_images 40.0000); a whole PSNR keeps its decimals
    assert "| num_images | 40 | images evaluated |" in text and "| psnr | 20.0000 |" in text
    assert report.format_value(40.0, "num_images") == "40" and report.format_value(1.0) == "1.0000"
    # the probe's block index is whole too (it printed 1.0000, with no meaning beside it)
    assert report.format_value(1.0, "linear_probe_layer") == "1"
    assert all(report.meaning(k) for k in ("linear_probe_layer", "linear_probe_train_accuracy"))
    assert "a note" in text
    record = json.load(open(tmp_path / "metrics.json"))
    assert record["metrics"] == {"rfid": 1.25, "psnr": 20.0, "num_images": 40.0}
    assert record["step"] == 7
    assert os.path.exists(tmp_path / "reconstructions.png")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def _tokenizer_config():
    c = config_lib.base_config()
    c.model = dict(name="titok", patch_size=8, num_latent_tokens=8, encoder_size="tiny",
                   decoder_size="tiny", codebook_size=64, token_dim=8)
    c.data.name, c.data.image_size, c.data.eval_examples = "digits", SIZE, 20
    c.eval_batch_size, c.precision = 8, "float32"
    c.evaluation.allow_random_init = True
    c.evaluation.inception_size = INCEPTION
    c.evaluation.is_splits = 2
    return c


def test_evaluate_job_tokenizer_and_samples(tmp_path):
    from tok1d import models
    from tok1d.cli import evaluate
    from tok1d.weights import pretrained
    config = _tokenizer_config()
    model = models.create("titok", **layout.model_kwargs(config))
    params = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
    kwargs = {k: v for k, v in layout.model_kwargs(config).items()
              if k not in ("dtype", "param_dtype")}
    ckpt = pretrained.save_pretrained(str(tmp_path / "tok"), "titok", kwargs, params)

    out = tmp_path / "eval"
    metrics = evaluate.run(config, checkpoint=ckpt, out=str(out), log=lambda m: None)
    for key in ("psnr", "ssim", "lpips", "rfid", "inception_score", "precision", "recall",
                "codebook_usage", "codebook_perplexity"):
        assert np.isfinite(metrics[key]), key
    assert metrics["num_examples"] == 20
    record = json.load(open(out / "metrics.json"))
    assert record["metrics"]["rfid"] == pytest.approx(metrics["rfid"])
    assert "RANDOM" in " ".join(record["notes"])
    assert record["step"] is None  # a pretrained directory's weights: no training step
    assert os.path.exists(out / "reconstructions.png") and os.path.exists(out / "report.md")

    # gFID of a samples .npz against the digits eval split.
    rng = np.random.default_rng(0)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8),
             arr_1=np.arange(12) % 3)
    gen = evaluate.run(config, samples=str(samples), out=str(tmp_path / "gen"),
                       log=lambda m: None)
    assert gen["num_images"] == 12 and gen["gfid"] > 0 and "inception_score" in gen
    assert os.path.exists(tmp_path / "gen" / "samples.png")
    # A second evaluation into an --out holding one's results is refused before any work:
    # nothing replaced or appended to.
    before = {n: (tmp_path / "gen" / n).read_bytes()
              for n in ("report.md", "metrics.json", "metrics.jsonl", "samples.png")}
    for kwargs in ({"samples": str(samples)}, {"checkpoint": ckpt}):
        with pytest.raises(errors.UserError, match=f"--out={tmp_path / 'gen'} already holds "
                           "report.md and metrics.json and metrics.jsonl; choose another "
                           "--out \\(or delete it\\)"):
            evaluate.run(config, out=str(tmp_path / "gen"), log=lambda m: None, **kwargs)
    assert before == {n: (tmp_path / "gen" / n).read_bytes() for n in before}
    # Flags that do not apply to the evaluation are refused, not dropped.
    for kwargs, message in (({"samples": str(samples), "prefixes": "1"},
                             "--prefixes evaluates a tokenizer's prefixes .* not --samples"),
                            ({"samples": str(samples), "tokenizer": ckpt},
                             "--tokenizer decodes a generator's samples .* --samples are "
                             "images already"),
                            ({"checkpoint": ckpt, "tokenizer": ckpt},
                             "--tokenizer decodes a generator's samples .* a tokenizer "
                             "evaluation decodes with --checkpoint itself"),
                            ({"samples": str(samples), "seed": 1},
                             "--seed is a generator's sampling seed; --samples are images"),
                            ({"checkpoint": ckpt, "seed": 0},
                             "--seed .* a tokenizer evaluation draws nothing")):
        with pytest.raises(errors.UserError, match=message):
            evaluate.run(config, out=str(tmp_path / "unused"), **kwargs)
    assert not (tmp_path / "unused").exists()

    # The eval split's statistics written once (--save_reference) give the same numbers as a
    # reference, without its images; one made with another Inception input is refused.
    saved = tmp_path / "digits_ref.npz"
    ref = evaluate.run(config, reference_out=str(saved), log=lambda m: None)
    assert ref.count == 20 and ref.features.shape == (20, 2048) and ref.spatial is not None
    with np.load(saved) as z:
        assert {"mu", "sigma", "mu_s", "sigma_s", "features", "meta"} <= set(z.files)
    with_file = _tokenizer_config()
    with_file.evaluation.reference = str(saved)
    again = evaluate.run(with_file, samples=str(samples), out=str(tmp_path / "gen_saved"),
                         log=lambda m: None)
    for key in ("gfid", "sfid", "precision", "recall", "inception_score"):
        assert again[key] == pytest.approx(gen[key], rel=1e-6, abs=1e-9), key
    details = json.load(open(tmp_path / "gen_saved" / "metrics.json"))["details"]
    assert details["reference"] == f"{saved} (20 images)"
    with_file.evaluation.inception_input = "pytorch_fid"
    with pytest.raises(ValueError, match="computed with inception_input='tf1'; this evaluation "
                       "uses 'pytorch_fid'"):
        evaluate.run(with_file, samples=str(samples), out=str(tmp_path / "gen_other"))
    for kwargs, message in (({"reference_out": str(saved)}, "exists; remove it"),
                            ({"reference_out": str(tmp_path / "r.txt")}, "must end in .npz"),
                            ({"reference_out": str(tmp_path / "no" / "r.npz")},
                             "not a writable folder"),
                            ({"reference_out": str(tmp_path / "r.npz"), "checkpoint": ckpt},
                             "a job of its own"),
                            ({"reference_out": str(tmp_path / "r.npz"), "seed": 3},
                             "a job of its own: .* or --seed"),
                            ({"samples": str(samples)}, "--out is required")):
        with pytest.raises(errors.UserError, match=message):
            evaluate.run(config, **kwargs)
    assert not (tmp_path / "r.npz").exists() and not (tmp_path / "gen_other").exists()

    # A reference without spatial statistics (pytorch-fid's, say): no sFID, and the report
    # says why.
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=ref.mu, sigma=ref.sigma)
    with_file.evaluation.inception_input, with_file.evaluation.reference = "tf1", str(plain)
    with_file.evaluation.precision_recall = False
    no_sfid = evaluate.run(with_file, samples=str(samples), out=str(tmp_path / "gen_plain"),
                           log=lambda m: None)
    assert "sfid" not in no_sfid and no_sfid["gfid"] == pytest.approx(gen["gfid"], rel=1e-6)
    notes = json.load(open(tmp_path / "gen_plain" / "metrics.json"))["notes"]
    assert any("No sFID" in note and "plain.npz" in note for note in notes), notes

    # A checkpoint of another model is refused, naming the mismatch; nothing is written.
    other = _tokenizer_config()
    other.model.codebook_size = 32
    with pytest.raises(ValueError, match="do not match the tokenizer"):
        evaluate.run(other, checkpoint=ckpt, out=str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")


def test_missing_inception_weights_are_explained(tmp_path):
    ecfg = config_lib.base_config().evaluation
    notes = []
    nets = evaluator.load_metric_nets(ecfg, "", notes.append)
    assert nets.inception is None and nets.lpips is None
    assert "tok1d convert inception_fid" in notes[0]
    # Generated images have no pairs: no LPIPS loaded, and no note about its weights.
    ecfg.allow_random_init = True
    notes = []
    nets = evaluator.load_metric_nets(ecfg, "", notes.append, lpips=False)
    assert nets.lpips is None and nets.inception is not None
    assert not any("LPIPS" in note for note in notes), notes
    ecfg.allow_random_init = False
    ecfg.inception = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        evaluator.load_metric_nets(ecfg)
    config = _tokenizer_config()
    config.evaluation.allow_random_init = False
    config.evaluation.fid_every_steps = 100
    with pytest.raises(config_lib.ConfigError, match="needs evaluation.inception"):
        config_lib.validate(config)


def test_samples_need_a_feature_network_and_come_alone(tmp_path):
    """`tok1d evaluate --samples` without an Inception says so (it said "FID statistics need at
    least 2 images, got 0"), and --samples with --checkpoint is refused, not half-ignored."""
    from tok1d.cli import evaluate
    config = config_lib.base_config()
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, SIZE, SIZE, 3), np.uint8))
    said = []
    with pytest.raises(errors.UserError, match="--samples: FID / IS / precision-recall need "
                       "the FID InceptionV3"):
        evaluate.run(config, samples=str(samples), out=str(tmp_path / "out"), log=said.append)
    assert said == []  # the error says it once (the same note was logged before it)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk" * 8)
    with pytest.raises(ValueError, match="junk.npz is not a readable .npz of images"):
        evaluator.load_npz_images(str(junk))
    whole = tmp_path / "whole.npz"  # a write cut short
    np.savez(whole, arr_0=np.zeros((4, SIZE, SIZE, 3), np.uint8))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cut.npz is not a readable .npz of images"):
        evaluator.load_npz_images(str(cut))
    ref = tmp_path / "ref.npy"  # a reference that is not an .npz, and a truncated one
    np.save(ref, np.zeros(3))
    for bad in (ref, cut):
        with pytest.raises(ValueError, match=f"FID reference {bad} is not a readable .npz"):
            evaluator.reference_from_file(str(bad), None, None, None, 2, None)
    with pytest.raises(errors.UserError, match="not both"):
        evaluate.run(config, checkpoint=str(tmp_path), samples=str(samples),
                     out=str(tmp_path / "out"))
    # A generator's checkpoint without an Inception (and no linear probe): refused before
    # anything is loaded or sampled (it sampled, then said "FID statistics need at least 2
    # images, got 0"); with a probe the report's other metrics go on, without a reference.
    gen = config_lib.load(os.path.join(REPO, "configs", "gpt_gigatok.py:b"))
    with pytest.raises(errors.UserError, match="Generator evaluation: FID / IS / "
                       "precision-recall need the FID InceptionV3"):
        evaluate.run(gen, checkpoint=str(tmp_path / "none"), tokenizer="none/",
                     out=str(tmp_path / "out"), log=said.append)
    assert said == []
    with pytest.raises(errors.UserError, match="--prefixes evaluates a tokenizer's prefixes .* "
                       "not a generator config"):  # (it ran gFID, ignoring --prefixes)
        evaluate.run(gen, checkpoint=str(tmp_path / "none"), prefixes="1,2",
                     out=str(tmp_path / "out"))
    nets = evaluator.load_metric_nets(gen.evaluation, "", lambda _: None, lpips=False)
    reference = evaluator.load_reference(gen.evaluation, gen.data, nets, None, None, 8)
    assert reference.mu is None and reference.notes(gen.evaluation, nets) == []
    assert not (tmp_path / "out").exists()


def test_gfid_without_a_reference_is_refused(tmp_path):
    from tok1d.cli import evaluate
    config = config_lib.base_config()  # data.name "demo": no real images to compare with
    config.evaluation.allow_random_init, config.evaluation.inception_size = True, INCEPTION
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match="gFID needs a reference"):
        evaluate.run(config, samples=str(samples), out=str(tmp_path / "out"))
    config.trainer = "generator"
    config.evaluation.fid_every_steps = 10
    with pytest.raises(config_lib.ConfigError, match="needs evaluation.reference"):
        config_lib.validate(config)
    # A tokenizer's rFID has its originals: a reference there was silently unused.
    config.trainer, config.evaluation.reference = "tokenizer", "ref.npz"
    with pytest.raises(config_lib.ConfigError, match="'ref.npz' is gFID's real side"):
        config_lib.validate(config)


def test_lpips_of_the_perceptual_weights_resolves_only_lpips_names(tmp_path, monkeypatch):
    """perceptual.weights="convnext_s,lpips_vgg": only lpips_vgg is resolved for the
    evaluation's LPIPS (no ConvNeXt-S download); a mistyped name is one clear error."""
    from tok1d.weights import loaders, registry
    resolved = []

    def fake_resolve(source, *args, **kwargs):
        resolved.append(source)
        return str(tmp_path)  # holds no converted LPIPS file

    monkeypatch.setattr(loaders, "resolve", fake_resolve)
    assert evaluator._lpips_file("convnext_s,lpips_vgg") == ""
    assert resolved == ["lpips_vgg"]
    with pytest.raises(registry.UnknownName, match="did you mean lpips_vgg"):
        evaluator._lpips_file("convnext_s,lpips_vg")
