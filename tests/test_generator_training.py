"""Generator trainer on tokens made by a tiny tokenizer: MaskGIT, GPT and RAR losses drop, the
validation loss and sample grids are written, `tok1d.cli.sample` writes an ADM-style .npz, and a
token dataset that does not fit the generator is refused with a clear message."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from tok1d import errors, models, parallel
from tok1d.train import config_lib
from tok1d.weights import loaders, pretrained
from tok1d.cli import tokenize
from tok1d.cli import sample as sample_lib
from tok1d.data import sources
from tok1d.data import tokens as tokens_lib
from tok1d.train import generator

TOKENIZER = dict(image_size=32, patch_size=8, num_latent_tokens=8, encoder_size="nano",
                 decoder_size="nano", codebook_size=64, token_dim=8)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """Digits (train 256 + validation 64) tokenized by a tiny random TiTok (encoder weights
    scaled up so that images get different codes), saved as a pretrained directory too."""
    root = tmp_path_factory.mktemp("gen")
    model = models.create("titok", **TOKENIZER)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0),
                                          np.zeros((1, 32, 32, 3), np.float32)))["params"]
    scale = lambda path, x: x * 10 if "encoder" in jax.tree_util.keystr(path) and x.ndim >= 2 \
        else x  # noqa: E731
    params = jax.tree_util.tree_map_with_path(scale, jax.tree.map(np.asarray, params))
    tok_dir = str(root / "tokenizer")
    pretrained.save_pretrained(tok_dir, "titok", TOKENIZER, params)
    out = str(root / "tokens")
    for split, n in (("train", 256), ("validation", 64)):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource(split), out, split=split,
                                  batch_size=64, num_examples=n, log=lambda _: None)
    return out, tok_dir


def tiny_config(kind: str, tokens: str, tokenizer: str, steps: int = 24):
    c = config_lib.base_config("generator")
    c.total_steps, c.batch_size, c.eval_batch_size = steps, 32, 32
    c.precision, c.ema_decay = "float32", 0.0
    c.log_every_steps, c.eval_every_steps = 6, 1000
    c.checkpoint.every_steps, c.checkpoint.async_save = 1000, False
    c.num_grid_images = 16
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 4, "constant"
    c.generator.tokens, c.generator.tokenizer = tokens, tokenizer
    c.generator.num_sample_classes = 4
    common = dict(num_tokens=8, num_classes=10, width=32, depth=2, num_heads=2, mlp_dim=64)
    if kind == "maskgit":
        c.model = dict(name="maskgit", arch="vit", codebook_size=64, dropout_rate=0.0,
                       attention_dropout=0.0, **common)
        c.sampling = dict(num_steps=4, guidance_scale=1.0, randomize_temperature=1.0)
    elif kind == "rar":  # permuted until step 6, then less and less: raster from step 18
        c.model = dict(name="rar", vocab_size=64, dropout_rate=0.0, attention_dropout=0.0,
                       **common)
        c.generator.randomness_anneal_start, c.generator.randomness_anneal_end = 6, 18
        c.optim.decay_mask = "matrices"
        c.sampling = dict(guidance_scale=3.0, guidance_scale_pow=1.0, top_k=16)
    else:
        c.model = dict(name="gpt", vocab_size=64, token_dropout=0.0, dropout_rate=0.0,
                       **common)
        c.optim.schedule, c.optim.decay_mask = "wsd", "matrices"
        c.sampling = dict(cfg_scale=2.0, temperature=1.0, top_k=16)
    return c


@pytest.mark.parametrize("kind", ["maskgit", "gpt", "rar"])
def test_generator_learns_tokens_and_writes_samples(kind, token_data, tmp_path):
    tokens, tok_dir = token_data
    workdir = str(tmp_path / kind)
    result = generator.train_and_evaluate(tiny_config(kind, tokens, tok_dir), workdir)
    assert result["step"] == 24 and result["num_examples"] == 64
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(train) == 4 and train[-1] < 0.8 * train[0], train
    assert np.isfinite(result["loss"]) and result["loss"] < np.log(64)
    if kind == "rar":  # the permutation probability, averaged over each log window of 6 steps
        ratios = [line["train/random_ratio"] for line in lines if "train/random_ratio" in line]
        np.testing.assert_allclose(ratios, [1.0, 1 - 2.5 / 12, 1 - 8.5 / 12, 0.0], atol=1e-6)
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 500

    # tok1d.cli.sample: cyclic labels, uint8 images of the tokenizer's size, an ADM-style npz.
    config = tiny_config(kind, tokens, tok_dir)
    out = str(tmp_path / "samples")
    info = sample_lib.run(config, workdir, tok_dir, num_images=20, out=out, batch_size=16,
                          log=lambda _: None)
    data = np.load(os.path.join(out, "samples.npz"))
    assert data["arr_0"].shape == (20, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], np.arange(20) % 10)
    assert info["num_images"] == 20 and os.path.exists(os.path.join(out, "grid.png"))
    assert json.load(open(os.path.join(out, "sampling.json")))["step"] == 24  # the checkpoint's
    # --grid_classes=0 (allowed) failed after sampling, without sampling.json.
    out = str(tmp_path / "no_grid")
    said = []
    sample_lib.run(config, workdir, os.path.relpath(tok_dir), num_images=4, out=out,
                   batch_size=16, grid_classes=0, log=said.append)
    assert sorted(os.listdir(out)) == ["samples.npz", "sampling.json"]
    recorded = json.load(open(os.path.join(out, "sampling.json")))  # (paths made absolute)
    assert (recorded["tokenizer"], recorded["checkpoint"]) == (tok_dir, os.path.abspath(workdir))
    assert not any("Warning" in line for line in said)  # the tokenizer that wrote the tokens
    with pytest.raises(errors.UserError, match="already holds samples.npz"):  # not replaced
        sample_lib.run(config, workdir, tok_dir, num_images=2, out=out, log=lambda _: None)
    if kind != "maskgit":  # a temperature of 0: refused before any setting is sampled
        with pytest.raises(errors.UserError, match="must be > 0"):
            sample_lib.run_sweep(config, workdir, tok_dir, 4, str(tmp_path / "sweep"), [1.0],
                                 [1.0, 0.0], log=lambda _: None)


def test_a_tokenizer_other_than_the_tokens_one_is_named(token_data, tmp_path):
    """Decoding a generator's tokens with another tokenizer than the one that wrote them (its
    codes mean other images) is a warning naming both, from the fingerprint tokenize recorded
    in tokens_info.json (sampling, evaluation and generator training call this check)."""
    tokens, tok_dir = token_data
    config = tiny_config("gpt", tokens, tok_dir)
    tokenizer, params = loaders.load_tokenizer(tok_dir)
    said = []
    generator.check_tokens_tokenizer(config, params, tok_dir, said.append)
    assert said == []
    other = jax.tree.map(lambda x: x + 1.0, params)  # same shapes, other weights
    generator.check_tokens_tokenizer(config, other, "other/", said.append)
    assert len(said) == 1 and said[0].startswith("Warning: the tokenizer other/ is not the one "
                                                 f"that wrote the tokens {tokens}: its weights")
    info = dict(tokens_lib.read_info(tokens), tokenizer={"path": "/runs/tok", "step": 7})
    generator.check_tokens_tokenizer(config, other, "other/", said.append, info)
    assert f"the tokens {tokens} (/runs/tok at step 7): its weights" in said[1]
    config.generator.tokens = str(tmp_path)  # no tokens_info.json there: nothing to compare
    generator.check_tokens_tokenizer(config, other, "other/", said.append)
    assert len(said) == 2


def test_sampler_settings_change_the_samples(token_data, tmp_path):
    """Guidance changes the ids; the same seed gives the same ids (jitted, sharded)."""
    tokens, _ = token_data
    config = tiny_config("maskgit", tokens, "")
    model = generator.build_generator(config)
    params = nn.unbox(generator.init_generator(model, 2)(jax.random.key(1)))
    # Scaled up (as the fixtures' random generators) so the class visibly steers the logits.
    params = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, params)
    labels = np.arange(8, dtype=np.int32) % 10
    from tok1d.generation import common
    a = common.make_sampler(model, num_steps=4, guidance_scale=0.0)(params, labels,
                                                                    jax.random.key(0))
    b = common.make_sampler(model, num_steps=4, guidance_scale=3.0)(params, labels,
                                                                    jax.random.key(0))
    a2 = common.make_sampler(model, num_steps=4, guidance_scale=0.0)(params, labels,
                                                                     jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert (np.asarray(a) != np.asarray(b)).any()


def test_mismatched_tokens_are_refused(token_data, tmp_path):
    tokens, tok_dir = token_data
    config = tiny_config("gpt", tokens, tok_dir)
    config.model["num_tokens"] = 16
    with pytest.raises(config_lib.ConfigError, match="8 codes per image but model.num_tokens=16"):
        generator.train_and_evaluate(config, str(tmp_path / "bad"))
    config = tiny_config("gpt", tokens, tok_dir)
    config.model["vocab_size"] = 128  # codes no sample could be decoded from: refused too
    with pytest.raises(config_lib.ConfigError, match="the tokenizer has 64 codes but the "
                       "generator predicts 128 \\(give it 64"):
        generator.train_and_evaluate(config, str(tmp_path / "bad_vocab"))
    assert not os.path.exists(str(tmp_path / "bad_vocab" / "checkpoints"))
    config = tiny_config("gpt", "", tok_dir)
    with pytest.raises(config_lib.ConfigError, match="generator.tokens is empty"):
        generator.train_and_evaluate(config, str(tmp_path / "bad2"))


def test_tokens_without_the_eval_split_say_so_once_at_the_start(token_data, tmp_path, capsys):
    """data.eval_split absent from the tokens: training goes on, and says once, at its start,
    that there is no validation loss (it logged `eval @ step 2: ` with nothing after)."""
    tokens, _ = token_data
    config = tiny_config("gpt", tokens, "", steps=2)
    config.eval_every_steps, config.data.eval_split = 1, "test"
    result = generator.train_and_evaluate(config, str(tmp_path / "no_eval"))
    assert result["step"] == 2 and "loss" not in result
    said = [line for line in capsys.readouterr().out.splitlines() if "no validation loss" in line]
    assert said == [f"Warning: the tokens {tokens} have no 'test' split (data.eval_split; they "
                    "have: train, validation), so there is no validation loss. Tokenize that "
                    "split into them (tok1d tokenize --split=test) or name one they have "
                    "(--config.data.eval_split=...)."]


def images_config(tok_dir: str, steps: int = 16):
    """tiny_config("gpt") trained on digit images its tokenizer encodes in the step."""
    c = tiny_config("gpt", "", tok_dir, steps)
    c.generator.token_source = "images"
    c.data.name, c.data.image_size, c.data.augment, c.data.flip = "digits", 32, "center_crop", False
    c.data.eval_examples = 64
    return c


def test_the_images_step_is_the_token_step_on_the_encoded_images(token_data):
    """generator.token_source "images" (GigaTok's --dataset imagenet): the step that encodes a
    batch of images with the frozen tokenizer is exactly the step on that batch's codes (also
    with 2 microbatches); the tokenizer's params do not change."""
    from tok1d import parallel
    _, tok_dir = token_data
    mesh = parallel.create_mesh({"data": -1})
    rules = parallel.DEFAULT_RULES
    batch_sh = parallel.batch_sharding(mesh, rules)
    for accum, place in ((1, "device"), (2, "host")):
        config = images_config(tok_dir)
        config.optim.grad_accum_steps = accum
        config.generator.tokenizer_decoder = place
        model = generator.build_generator(config)
        frozen = generator.load_frozen_tokenizer(config, mesh, rules)
        tokenizer, tok_params = frozen.module, frozen.encode_params
        # "host": the decoder's params stay NumPy, the step gets only what encoding reads.
        assert frozen.keeps_host_params == (place == "host")
        assert ("decoder" in tok_params) == (place == "device")
        assert isinstance(frozen.params["decoder"], dict)
        on_devices = frozen.on_devices()
        assert not any(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_devices))
        images = sources.DigitsSource("train", image_size=32)
        local = {"image": np.stack([images[i]["image"] for i in range(32)]).astype(np.float32)
                 / 255.0, "label": np.asarray([images[i]["label"] for i in range(32)], np.int32),
                 "mask": np.ones(32, bool)}
        _, _, init, step_images = generator.build_training(config, model, mesh, rules,
                                                           batch_sh, frozen)
        config.generator.token_source = "dataset"
        _, _, _, step_codes = generator.build_training(config, model, mesh, rules, batch_sh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            codes = jax.jit(lambda p, x: models.interfaces.encode_images(tokenizer, p, x))(
                tok_params, local["image"])
            assert len(np.unique(np.asarray(codes))) > 8  # the images differ in codes
            before = jax.tree.map(np.asarray, tok_params)
            a, sa, _ = step_images(init(jax.random.key(0)),
                                   parallel.global_batch(local, batch_sh, 32), tok_params)
            b, sb, _ = step_codes(init(jax.random.key(0)), parallel.global_batch(
                {"codes": np.asarray(codes), "label": local["label"]}, batch_sh, 32))
        np.testing.assert_allclose(float(sa["loss"]), float(sb["loss"]), rtol=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                             rtol=1e-5, atol=1e-7),
                     a.params, b.params)
        jax.tree.map(np.testing.assert_array_equal, before,
                     jax.tree.map(np.asarray, tok_params))
    # On an fsdp mesh the frozen tokenizer is split like a trained model, not whole on every
    # device; it computes in float32 (upstream's encode runs outside the autocast).
    frozen = generator.load_frozen_tokenizer(images_config(tok_dir),
                                             parallel.create_mesh({"fsdp": -1}), rules)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(frozen.params))
    assert np.dtype(frozen.module.dtype) == np.float32


def test_the_codes_per_image_are_counted_at_the_datas_size():
    """A fully convolutional tokenizer (MaskGIT-VQGAN, input_size None) encodes a larger image
    into more codes than its num_tokens: the images path counts them at data.image_size (it
    trained a 64-token GPT on 256 codes into NaN before)."""
    from tok1d import parallel
    vqgan = models.create("maskgit_vqgan", image_size=16, hidden_channels=32,
                          channel_mult=(1, 1, 1), num_res_blocks=1, z_channels=32,
                          codebook_size=64, dtype="bfloat16")
    params = nn.unbox(vqgan.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
    assert vqgan.num_tokens == 16
    for size, tokens in ((16, 16), (32, 64)):
        info = generator.tokenizer_info(vqgan, params["params"], 0, size, 10)
        assert info == {"num_tokens": tokens, "codebook_size": 64, "num_classes": 10}


def test_a_generator_trains_on_images_it_encodes(token_data, tmp_path):
    """The trainer with token_source "images": digit images, encoded in every step; the loss
    drops, the validation loss runs on the encoded validation images, the grid is written, and
    a resumed run continues from its checkpoint. Without a tokenizer: one clear error."""
    _, tok_dir = token_data
    workdir = str(tmp_path / "gpt_images")
    config = images_config(tok_dir)
    config.checkpoint.every_steps = 8
    with config.unlocked():
        config.total_steps = 8
    first = generator.train_and_evaluate(config, workdir)
    assert first["step"] == 8 and first["num_examples"] == 64
    config = images_config(tok_dir)
    config.checkpoint.every_steps = 8
    config.generator.tokenizer_decoder = "host"  # the grid decodes with a copy on the devices
    os.remove(os.path.join(workdir, "samples.png"))
    result = generator.train_and_evaluate(config, workdir)
    assert result["step"] == 16 and np.isfinite(result["loss"])
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [line["train/loss"] for line in lines if "train/loss" in line]
    assert train[-1] < 0.8 * train[0], train
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 500
    with pytest.raises(config_lib.ConfigError, match="needs generator.tokenizer"):
        generator.train_and_evaluate(images_config(""), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")  # refused before the workdir is made

    # tok1d bench times the step with its encode (a tokenizer given), else on codes.
    from tok1d.cli import bench
    said = []
    row = bench.run(images_config(tok_dir), "train", batch_size=32, steps=2, warmup=1,
                    log=said.append)
    assert row["images_per_s"] > 0 and not any("timing the step on codes" in s for s in said)
    bench.run(images_config(""), "train", batch_size=32, compile_only=True, log=said.append)
    assert any("timing the step on codes" in s for s in said)
    config = images_config(tok_dir)
    config.model["num_tokens"] = 16
    with pytest.raises(config_lib.ConfigError, match="8 codes per image but model.num_tokens=16"):
        generator.train_and_evaluate(config, str(tmp_path / "bad2"))
    config = images_config(tok_dir)  # the digits' 10 classes (it trained into NaN before)
    config.model["num_classes"] = 5
    with pytest.raises(config_lib.ConfigError, match="10 classes but model.num_classes=5"):
        generator.train_and_evaluate(config, str(tmp_path / "bad3"))
    config = images_config(tok_dir)  # the GPT recipe's old command line: refused, not ignored
    config.generator.tokens = str(tmp_path / "tokens")
    with pytest.raises(config_lib.ConfigError, match="generator.tokens is set but"):
        generator.train_and_evaluate(config, str(tmp_path / "bad4"))


def test_the_linear_probe_on_images_it_encodes(token_data):
    """`tok1d evaluate`'s linear probe on images (evaluation.linear_probe_source "images", as
    GigaTok's lin_probe.py): every step encodes the next batch of augmented digit images with
    the frozen tokenizer and trains the probe on the GPT's features (dropout on); validation
    on the encoded center crops of the whole eval split. A random GPT's features still carry
    the digit (chance 0.1)."""
    from tok1d.cli import evaluate
    _, tok_dir = token_data
    config = images_config(tok_dir)
    config.data.augment, config.data.flip = "adm_random_crop", True  # recipes.imagenet_adm
    config.data.resize_rule, config.data.min_scale = "adm", 0.8
    e = config.evaluation
    e.linear_probe_epochs, e.linear_probe_batch_size, e.linear_probe_lr = 8, 32, 30.0
    e.linear_probe_source = "images"
    model = generator.build_generator(config)
    params = nn.unbox(generator.init_generator(model, 2)(jax.random.key(1)))
    tokenizer, tok_params = loaders.load_tokenizer(tok_dir)
    mesh, rules = parallel.mesh_from_config(config)[:2]
    logs = []
    metrics = evaluate._linear_probe(config, model, params, tokenizer, tok_params, mesh, rules,
                                     logs.append)
    assert any("encoded in every step (GPT dropout on)" in line for line in logs), logs
    assert sum("linear probe epoch" in line for line in logs) == 8
    source = sources.DigitsSource("validation")
    assert f"({len(source)}, 32) validation" in logs[0]  # the whole split, padding dropped
    assert 0.25 < metrics["linear_probe_accuracy"] <= 1.0, metrics  # measured 0.37
    assert metrics["linear_probe_layer"] == 1
    # A batch the 8 devices cannot split: refused by the check evaluate_generator runs
    # before it samples.
    e.linear_probe_batch_size = 36
    images = evaluate._probe_images(config, model, tokenizer, tok_params)
    with pytest.raises(ValueError, match="36 is not a multiple of the mesh's 8 batch shards"):
        evaluate._probe_options(config, model, mesh, rules, images)


def test_generator_configs_validate():
    """The released recipes build and validate on a 64-device pod (shapes only)."""
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("maskgit_titok.py:l32", "maskgit_titok.py:b64", "maskgit_titok.py:s128",
                 "gpt_gigatok.py:b", "gpt_gigatok.py:l", "gpt_gigatok.py:xl", "gpt_gigatok.py:xxl",
                 "rar.py:b", "rar.py:l", "rar.py:xl", "rar.py:xxl"):
        config = config_lib.load(os.path.join(root, name))
        config_lib.validate(config, num_devices=64)
        assert config.trainer == "generator"
        assert config.sampling_precision == "float32"  # the official sample scripts' fp32
        assert config.evaluation.is_split_size == 5000  # ADM's evaluator's Inception Score
    config.generator.tokenizer_decoder = "cpu"
    config.sampling_precision = "fp16"
    with pytest.raises(config_lib.ConfigError, match="tokenizer_decoder='cpu' is not one of"
                       r"(.|\n)*sampling_precision='fp16' is not one of"):
        config_lib.validate(config, num_devices=64)


def test_ar_probe_during_tokenizer_training(tmp_path):
    """config.ar_probe: the tokenizer run trains a fresh small GPT on its current codes and
    logs the probe's validation loss (below the uniform-code loss log K after a few steps)."""
    from tok1d.probes import ar
    from tok1d.train import tokenizer as tok_trainer
    c = config_lib.base_config()
    c.total_steps, c.batch_size, c.eval_batch_size = 4, 16, 16
    c.precision, c.ema_decay = "float32", 0.0
    c.log_every_steps, c.eval_every_steps, c.checkpoint.every_steps = 2, 1000, 1000
    c.checkpoint.async_save = False
    c.model = dict(name="titok", **{k: v for k, v in TOKENIZER.items() if k != "image_size"})
    c.data.name, c.data.image_size, c.data.augment, c.data.flip = "digits", 32, "center_crop", False
    c.data.eval_examples = 32
    c.ar_probe.every_steps, c.ar_probe.train_examples, c.ar_probe.steps = 4, 64, 20
    c.ar_probe.batch_size = 48  # more than the 32 validation examples (its val loss was left
    # out without a word): validated in batches of 32
    c.ar_probe.model = dict(width=32, depth=2, num_heads=2)
    # The evals inside training: rFID & co. (random Inception / LPIPS) and the linear probe of
    # the probe GPT's features.
    e = c.evaluation
    e.fid_every_steps, e.allow_random_init, e.inception_size, e.is_splits = 4, True, 75, 2
    e.linear_probe_epochs, e.linear_probe_batch_size, e.linear_probe_lr = 4, 16, 10.0
    result = tok_trainer.train_and_evaluate(c, str(tmp_path / "tok"), ar_probe=ar.make_ar_probe)
    for key in ("ar_probe_train_loss", "ar_probe_val_loss", "ar_probe_val_accuracy",
                "ar_probe_linear_probe_accuracy", "rfid", "ssim", "lpips", "inception_score",
                "precision", "recall"):
        assert np.isfinite(result[key]), (key, result)
    assert result["ar_probe_linear_probe_layer"] == 1
    assert result["ar_probe_val_loss"] < np.log(64)
    lines = [json.loads(line) for line in open(os.path.join(str(tmp_path / "tok"),
                                                            "metrics.jsonl"))]
    assert any("eval/ar_probe_val_loss" in line for line in lines)


def test_the_evaluate_job_on_a_rar_run(token_data, tmp_path):
    """`tok1d.cli.evaluate` samples a RAR run through its cached sampler and the tokenizer and
    reports gFID / IS (random Inception: smoke numbers), as for the other generators."""
    from tok1d.cli import evaluate
    tokens, tok_dir = token_data
    config = tiny_config("rar", tokens, tok_dir, steps=4)
    config.data.name, config.data.image_size, config.data.eval_examples = "digits", 32, 24
    e = config.evaluation
    e.allow_random_init, e.inception_size, e.is_splits = True, 75, 2
    e.num_samples, e.num_report_images = 16, 20
    workdir = str(tmp_path / "rar")
    generator.train_and_evaluate(config, workdir)
    out = tmp_path / "eval"
    metrics = evaluate.run(config, checkpoint=workdir, tokenizer=tok_dir, out=str(out),
                           log=lambda _: None)
    assert metrics["num_images"] == 16
    assert np.isfinite(metrics["gfid"]) and np.isfinite(metrics["inception_score"])
    assert "gFID" in open(out / "report.md").read()
    assert json.load(open(out / "metrics.json"))["step"] == 4  # the checkpoint's (was 0)


def test_gfid_in_training_and_the_evaluate_job(token_data, tmp_path):
    """A GPT run with evaluation.fid_every_steps logs gFID / IS / precision-recall of its samples
    against the digits eval split (random Inception: smoke numbers); `tok1d.cli.evaluate` on the
    run adds GigaTok's linear probe and writes the report."""
    from tok1d.cli import evaluate
    tokens, tok_dir = token_data
    config = tiny_config("gpt", tokens, tok_dir, steps=8)
    config.data.name, config.data.image_size, config.data.eval_examples = "digits", 32, 24
    e = config.evaluation
    e.fid_every_steps, e.allow_random_init, e.inception_size, e.is_splits = 8, True, 75, 2
    e.num_samples, e.num_report_images = 16, 20
    # A saved reference made at another Inception size is refused before training starts.
    from tok1d.evaluation import fid as fid_lib
    other = tmp_path / "other_ref.npz"
    fid_lib.save_statistics(str(other), np.zeros(2048), np.eye(2048),
                            meta={"inception_size": 299})
    e.reference = str(other)
    with pytest.raises(ValueError, match="computed with inception_size=299; this evaluation "
                       "uses 75"):
        generator.train_and_evaluate(config, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused" / "checkpoints")
    e.reference = ""
    workdir = str(tmp_path / "gpt")
    result = generator.train_and_evaluate(config, workdir)
    for key in ("gfid", "inception_score", "precision", "recall"):
        assert np.isfinite(result[key]), (key, result)
    e.linear_probe_epochs, e.linear_probe_batch_size, e.linear_probe_lr = 3, 32, 10.0
    out = tmp_path / "eval"
    metrics = evaluate.run(config, checkpoint=workdir, tokenizer=tok_dir, out=str(out),
                           log=lambda _: None)
    assert metrics["num_images"] == 16 and np.isfinite(metrics["gfid"])
    assert 0.0 <= metrics["linear_probe_accuracy"] <= 1.0
    assert metrics["linear_probe_layer"] == 1
    text = open(out / "report.md").read()
    assert "gFID" in text and "samples.png" in text and "linear_probe_accuracy" in text
    assert "3 epochs, batch 32, lr 10, source default, dropout on" in text  # the settings


def test_the_bench_checks_an_images_runs_tokenizer_as_the_trainer_does(token_data):
    """`tok1d bench --workload=train` of a generator that encodes images: an image size the
    tokenizer does not take is named as training names it (it was the model's shape error),
    and the step with its encode runs."""
    from tok1d.cli import bench
    _, tok_dir = token_data
    config = images_config(tok_dir)
    config.data.image_size = 64
    with pytest.raises(config_lib.ConfigError, match="encodes 32 px images but "
                       "data.image_size=64"):
        bench.run(config, "train", steps=1, warmup=1, log=lambda _: None)
    row = bench.run(images_config(tok_dir), "train", steps=1, warmup=1, log=lambda _: None)
    assert row["images_per_s"] > 0
