"""Token datasets: tokenizing with a tiny TiTok on 8 fake devices, resuming, reading them back
through TokenSource / token_dataset, and the embedded digits source."""

import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from configs import tiny_test
from conftest import assert_damage_is_named, damage_records

from tok1d import errors, models, parallel, weights
from tok1d.cli import tokenize
from tok1d.data import records, sources, tokens
from tok1d.train import config_lib
from tok1d.train import generator as gen_trainer
from tok1d.weights import layout, loaders, pretrained

TINY = dict(image_size=32, patch_size=8, num_latent_tokens=8, encoder_size="nano",
            decoder_size="nano", codebook_size=64, token_dim=8)
NUM = 100  # digits tokenized by the shared run


@pytest.fixture(scope="module")
def tiny():
    """A tiny random TiTok whose encoder weights are scaled up so that different images (and
    their mirrors) get different codes."""
    model = models.create("titok", **TINY)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    params = nn.unbox(variables)
    scale = lambda path, x: x * 10 if "encoder" in jax.tree_util.keystr(path) and x.ndim >= 2 \
        else x  # noqa: E731
    params = jax.tree_util.tree_map_with_path(scale, jax.tree.map(np.asarray, params["params"]))
    return model, params


@pytest.fixture(scope="module")
def tokenized(tiny, tmp_path_factory):
    model, params = tiny
    out = str(tmp_path_factory.mktemp("tokens") / "digits")
    summary = tokenize.tokenize_dataset(
        model, params, sources.DigitsSource("train"), out, split="train", batch_size=20,
        flip=True, num_shards=3, num_examples=NUM, tokenizer_info={"name": "tiny"},
        log=lambda _: None)
    return out, summary


def _encode(model, params, images):
    """Plain single-device encoding (jitted only to skip op-by-op dispatch)."""
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    return np.asarray(fn(params, images))


def test_codes_equal_the_unsharded_encoder_and_flip_is_the_mirror(tiny, tokenized):
    model, params = tiny
    out, summary = tokenized
    assert summary["shards_written"] == 3 and summary["num_examples"] == NUM
    assert 1 < summary["distinct_codes"] <= 64 and summary["perplexity"] > 1
    src = sources.DigitsSource("train")
    images = np.stack([tokenize.load_image(src[i]["image"], 32) for i in range(NUM)])
    ts = tokens.TokenSource(out, "train")
    records = [ts[i] for i in range(NUM)]
    got = np.stack([r["codes"] for r in records])
    assert got.shape == (NUM, 2, 8) and got.dtype == np.int32
    np.testing.assert_array_equal(got[:, 0], _encode(model, params, images))
    np.testing.assert_array_equal(got[:, 1], _encode(model, params, images[:, :, ::-1]))
    assert (got[:, 0] != got[:, 1]).any()  # the mirror is a real second variant
    assert [r["label"] for r in records] == [src[i]["label"] for i in range(NUM)]
    assert [r["index"] for r in records] == list(range(NUM))
    info = tokens.read_info(out)
    assert (info["num_tokens"], info["codebook_size"], info["num_classes"]) == (8, 64, 10)
    assert info["codes_dtype"] == "int16" and info["tokenizer"] == {"name": "tiny"}
    split = info["splits"]["train"]
    assert (split["num_examples"], split["num_variants"], len(split["shards"])) == (NUM, 2, 3)
    assert (ts.num_tokens, ts.num_variants, ts.codebook_size, ts.num_classes) == (8, 2, 64, 10)
    assert ts.plain_variant == 0
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no tmp / plan files left


def test_resume_rewrites_only_the_missing_shard(tiny, tokenized, tmp_path):
    model, params = tiny
    out = str(tmp_path / "copy")
    shutil.copytree(tokenized[0], out)
    shards = sorted(f for f in os.listdir(out) if ".array_record-" in f)
    before = {f: open(os.path.join(out, f), "rb").read() for f in shards}
    stats = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards}
    os.remove(os.path.join(out, shards[1]))
    summary = tokenize.tokenize_dataset(
        model, params, sources.DigitsSource("train"), out, split="train", batch_size=20,
        flip=True, num_shards=3, num_examples=NUM, log=lambda _: None)
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    for f in shards:
        assert open(os.path.join(out, f), "rb").read() == before[f]
    assert os.stat(os.path.join(out, shards[0])).st_mtime_ns == stats[shards[0]]
    assert os.stat(os.path.join(out, shards[2])).st_mtime_ns == stats[shards[2]]
    assert summary["distinct_codes"] == tokenized[1]["distinct_codes"]  # read back the others
    # A damaged shard (cut short, e.g. by a full disk) is written again, not read (a traceback).
    with open(os.path.join(out, shards[2]), "r+b") as f:
        f.truncate(5000)
    summary = tokenize.tokenize_dataset(
        model, params, sources.DigitsSource("train"), out, split="train", batch_size=20,
        flip=True, num_shards=3, num_examples=NUM, log=lambda _: None)
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    assert open(os.path.join(out, shards[2]), "rb").read() == before[shards[2]]
    again = tokenize.tokenize_dataset(
        model, params, sources.DigitsSource("train"), out, split="train", batch_size=20,
        flip=True, num_shards=3, num_examples=NUM, log=lambda _: None)
    assert "nothing to encode: every shard was done" in tokenize.format_summary(again)
    # Other settings or other weights never mix into an existing split.
    with pytest.raises(ValueError, match="other settings.*num_variants"):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource("train"), out,
                                  batch_size=20, flip=False, num_shards=3, num_examples=NUM,
                                  log=lambda _: None)
    other = jax.tree.map(lambda x: x + 1.0, params)
    with pytest.raises(ValueError, match="another tokenizer"):
        tokenize.tokenize_dataset(model, other, sources.DigitsSource("validation"), out,
                                  split="validation", batch_size=8, log=lambda _: None)


def test_ten_crop_stores_the_ten_views_of_the_official_code_extraction(tiny, tmp_path):
    """--crop=ten_crop: 10 variants per example, each the codes of one of the ten views
    (`load_views`), named in tokens_info.json; the crop range is part of the plan; with
    --flip it is refused (the ten crops hold the mirrored ones)."""
    model, params = tiny
    out, n = str(tmp_path / "ten"), 12
    summary = tokenize.tokenize_dataset(
        model, params, sources.DigitsSource("train"), out, split="train", batch_size=8,
        crop="ten_crop", num_examples=n, log=lambda _: None)
    assert summary["num_variants"] == 10
    src = sources.DigitsSource("train")
    views = np.stack([tokenize.load_views(src[i]["image"], 32, "ten_crop")
                      for i in range(n)]).astype(np.float32) / np.float32(255.0)
    ts = tokens.TokenSource(out, "train")
    got = np.stack([ts[i]["codes"] for i in range(n)])
    want = _encode(model, params, views.reshape((-1, 32, 32, 3))).reshape(n, 10, -1)
    np.testing.assert_array_equal(got, want)
    assert len({tuple(v) for v in got[0]}) > 1  # the views are different images
    split = tokens.read_info(out)["splits"]["train"]
    assert split["variants"] == list(tokenize.TEN_CROP_NAMES)
    assert ts.plain_variant == 4  # the center crop: what the generator's eval loss reads
    assert split["plan"]["crop_range"] == 1.1
    with pytest.raises(ValueError, match="--flip with --crop=ten_crop"):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource("train"),
                                  str(tmp_path / "bad"), crop="ten_crop", flip=True,
                                  log=lambda _: None)


def test_token_dataset_batches_are_seeded_resumable_and_host_sliced():
    n, num_tokens = 40, 4
    index = np.arange(n)
    codes = np.stack([np.repeat(index[:, None], num_tokens, 1),
                      np.repeat(index[:, None] + 1000, num_tokens, 1)], axis=1)
    src = tokens.ArrayTokenSource(codes, index % 10)
    assert (src.num_variants, src.num_tokens, src.codebook_size, src.num_classes) == \
        (2, 4, 1040, 10)
    kw = dict(global_batch=8, host_start=0, host_stop=8)
    it = iter(tokens.token_dataset(src, seed=0, **kw))
    first = [next(it) for _ in range(10)]  # 2 epochs
    b = first[0]
    assert b["codes"].shape == (8, 4) and b["codes"].dtype == np.int32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    all_codes = np.concatenate([x["codes"] for x in first])
    idx, variant = all_codes[:, 0] % 1000, all_codes[:, 0] // 1000
    assert (all_codes == all_codes[:, :1]).all()
    np.testing.assert_array_equal(np.concatenate([x["label"] for x in first]), idx % 10)
    assert set(variant.tolist()) == {0, 1}
    assert sorted(idx[:40].tolist()) == list(range(40))  # one epoch = a permutation
    assert idx[:40].tolist() != idx[40:].tolist()  # reshuffled each epoch
    again = iter(tokens.token_dataset(src, seed=0, **kw))
    np.testing.assert_array_equal(next(again)["codes"], b["codes"])
    other = next(iter(tokens.token_dataset(src, seed=1, **kw)))
    assert not np.array_equal(other["codes"], b["codes"])
    # A resumed run starts at its step: the same batches, across the epoch boundary.
    resumed = iter(tokens.token_dataset(src, seed=0, start_batch=3, **kw))
    for want in first[3:7]:
        np.testing.assert_array_equal(next(resumed)["codes"], want["codes"])
    # Two hosts' rows make up the single-host batch.
    lo = next(iter(tokens.token_dataset(src, seed=0, global_batch=8, host_start=0, host_stop=3)))
    hi = next(iter(tokens.token_dataset(src, seed=0, global_batch=8, host_start=3, host_stop=8)))
    np.testing.assert_array_equal(np.concatenate([lo["codes"], hi["codes"]]), b["codes"])
    fixed = next(iter(tokens.token_dataset(src, seed=0, variant=1, **kw)))
    assert (fixed["codes"] >= 1000).all()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        tokens.token_dataset(src, seed=0, global_batch=64, host_start=0, host_stop=64)


def test_token_source_on_disk_feeds_the_pipeline(tokenized):
    ts = tokens.TokenSource(tokenized[0], "train")
    batch = next(iter(tokens.token_dataset(ts, global_batch=16, host_start=0, host_stop=16,
                                           seed=0)))
    assert batch["codes"].shape == (16, 8) and batch["codes"].dtype == np.int32
    assert batch["codes"].min() >= 0 and batch["codes"].max() < 64
    assert batch["label"].dtype == np.int32 and set(batch["label"].tolist()) <= set(range(10))


def _write_info(directory, info):
    with open(os.path.join(directory, tokens.INFO_FILENAME), "w") as f:
        json.dump(info, f)


def test_corrupt_or_mismatched_datasets_fail_clearly(tokenized, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        tokens.TokenSource(str(tmp_path / "nope"), "train")
    with pytest.raises(FileNotFoundError, match="tokens_info.json"):
        tokens.TokenSource(str(tmp_path), "train")
    out = str(tmp_path / "copy")
    shutil.copytree(tokenized[0], out)
    info = tokens.read_info(out)
    with pytest.raises(KeyError, match="Unknown split 'test'.*train"):
        tokens.TokenSource(out, "test")
    with open(os.path.join(out, tokens.INFO_FILENAME), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="Malformed"):
        tokens.TokenSource(out, "train")
    _write_info(out, dict(info, format="tok1d.array_record.v1"))
    with pytest.raises(ValueError, match="format"):
        tokens.TokenSource(out, "train")
    _write_info(out, dict(info, num_tokens=9))
    with pytest.raises(ValueError, match="holds 16 codes.*2 variant.*9 tokens"):
        tokens.TokenSource(out, "train")
    bad = json.loads(json.dumps(info))
    bad["splits"]["train"]["num_examples"] = 7
    _write_info(out, bad)
    with pytest.raises(ValueError, match="says 7 examples but the shards hold 100"):
        tokens.TokenSource(out, "train")
    _write_info(out, info)
    os.remove(os.path.join(out, info["splits"]["train"]["shards"][0]))
    with pytest.raises(FileNotFoundError, match="missing shard files"):
        tokens.TokenSource(out, "train")


def test_a_damaged_token_shard_is_named(tokenized, tmp_path):
    """Bytes overwritten inside a token shard: the reader's error (a traceback mid-run that
    names no file) becomes one line naming the shard, the kind of error the training loop
    saves its state on (`errors.InputFailed`)."""
    out = str(tmp_path / "copy")
    shutil.copytree(tokenized[0], out)
    shards = tokens.read_info(out)["splits"]["train"]["shards"]
    shard = os.path.join(out, shards[1])
    damage_records(shard)
    assert issubclass(errors.DamagedRecord, errors.InputFailed)
    assert_damage_is_named(tokens.TokenSource(out, "train"),
                           f"Shard '{shard}' of split 'train' of the tokens is damaged: record "
                           r"\d+ cannot be read .*; tokenize the split again")


def test_clear_errors_for_tokenizer_data_and_image_size(tiny, tmp_path, capsys):
    model, params = tiny
    with pytest.raises(FileNotFoundError, match="Tokenizer directory not found"):
        loaders.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither a pretrained directory"):
        loaders.load_tokenizer(str(tmp_path))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotFoundError, match="Tokenizer directory expected, but .* is a file"):
        loaders.load_tokenizer(str(tmp_path / "a_file"))
    with pytest.raises(FileNotFoundError, match="Data directory expected, but .* is a file"):
        tokenize.resolve_source(str(tmp_path / "a_file"), "train")
    with pytest.raises(FileNotFoundError, match="Tokenizer directory not found"):
        loaders.describe_tokenizer(str(tmp_path / "missing"))
    # A generator's directory (or run) given as the tokenizer: one clear line, no traceback.
    gpt = dict(vocab_size=16, num_tokens=4, num_classes=2, width=16, depth=1, num_heads=2,
               mlp_dim=32)
    gpt_params = nn.unbox(models.create("gpt", **gpt).init(
        jax.random.key(0), np.zeros((1, 4), np.int32), np.zeros((1,), np.int32)))["params"]
    pretrained.save_pretrained(str(tmp_path / "gpt"), "gpt", gpt, gpt_params)
    with pytest.raises(errors.UserError, match="holds a GPT, not a tokenizer"):
        loaders.load_tokenizer(str(tmp_path / "gpt"))
    model_, gpt_loaded = loaders.load_generator(str(tmp_path / "gpt"))
    assert type(model_).__name__ == "GPT" and gpt_loaded.keys() == gpt_params.keys()
    pretrained.save_pretrained(str(tmp_path / "tok"), "titok",
                               pretrained.registry_kwargs("titok", model), params)
    with pytest.raises(errors.UserError, match="holds a TiTok, not a generator"):
        loaders.load_generator(str(tmp_path / "tok"))  # (the notebook's GENERATOR)
    from tok1d.cli import app
    assert app.run(tokenize, [f"--tokenizer={tmp_path / 'gpt'}", "--data=digits",
                              f"--out={tmp_path / 'gpt'}"]) == 2  # (its own folder: refused)
    assert "is the tokenizer's own folder" in capsys.readouterr().err
    assert not (tmp_path / "gpt" / tokens.INFO_FILENAME).exists()
    with pytest.raises(ValueError, match="Unknown data source 'imagenet'"):
        tokenize.resolve_source("imagenet", "train")
    with pytest.raises(FileNotFoundError, match="Data directory not found"):
        tokenize.resolve_source(str(tmp_path / "no_such_dir"), "train")
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        tokenize.resolve_source(str(tmp_path), "train")
    with pytest.raises(ValueError, match="Image size mismatch: 64 px.*32 px"):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource("train"),
                                  str(tmp_path / "o"), image_size=64)
    # --out at a prepared image dataset (its shards are named like token shards: they were
    # deleted as leftovers), or at shards no tokenize run started: refused, nothing removed.
    run = lambda out: tokenize.tokenize_dataset(  # noqa: E731
        model, params, sources.DigitsSource("train"), str(out), split="train", batch_size=20,
        num_shards=2, num_examples=20, log=lambda _: None)
    for folder, extra in (("prepared", records.INFO_FILENAME), ("strangers", None)):
        out = tmp_path / folder
        out.mkdir()
        shards = [tokens.shard_name("train", i, 3) for i in range(3)]
        for name in shards + [extra] * (extra is not None):
            (out / name).write_text("")
        with pytest.raises(ValueError, match="prepared image dataset|no tokenize run started"):
            run(out)
        assert set(shards) <= set(os.listdir(out))


def _workdir(path, config, seed=0):
    """A training workdir of `config` (config.json, checkpoints/1/state) with random params;
    returns them."""
    model = models.create(config.model.name, **layout.model_kwargs(config))
    if config.trainer == "generator":
        params = gen_trainer.init_generator(model, 1)(jax.random.key(seed))
    else:
        size = config.data.image_size
        params = model.init(jax.random.key(seed), np.zeros((1, size, size, 3)))["params"]
    params = jax.tree.map(np.asarray, nn.unbox(params))
    (path / "checkpoints" / "1").mkdir(parents=True)
    with open(path / "config.json", "w") as f:
        json.dump(config.to_dict(), f)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(path / "checkpoints" / "1" / "state"), {"params": params})
    return params


def test_a_run_with_quantizer_options_and_a_generator_run_load(tmp_path):
    """A tokenizer run whose model has `quantizer_options` (every configs/quantizers.py
    variant; a ConfigDict in the config) loads for tokenize / a generator's trainer: its module
    hashes (it used to fail in the shape cache) and its description is JSON (tokens_info.json); `tok1d.weights.load` takes a generator's
    training workdir (it used to say "not a tokenizer"), `load_tokenizer` still refuses it."""
    config = tiny_test.get_config()
    config.model.update(quantizer="fsq", token_dim=4, quantizer_options={"levels": [8, 5, 5, 5]})
    params = _workdir(tmp_path / "fsq", config)
    model, loaded = loaders.load_tokenizer(str(tmp_path / "fsq"))
    assert model.quantizer_options["levels"] == (8, 5, 5, 5) and hash(model)
    images = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    codes = _encode(model, loaded, images)
    np.testing.assert_array_equal(codes, _encode(model, params, images))
    assert codes.max() < 8 * 5 * 5 * 5
    # tokens_info.json's record of it (tok1d tokenize wrote the codes, then failed here)
    described = json.loads(json.dumps(loaders.describe_tokenizer(str(tmp_path / "fsq"))))
    assert described["kwargs"]["quantizer_options"] == {"levels": [8, 5, 5, 5]}

    gen = config_lib.base_config("generator")
    gen.model = dict(name="maskgit", arch="vit", codebook_size=64, num_tokens=8, num_classes=10,
                     width=32, depth=1, num_heads=2, mlp_dim=64)
    params = _workdir(tmp_path / "gen", gen)
    model, loaded = weights.load(str(tmp_path / "gen"))
    assert type(model).__name__ == "MaskGITBert" and model.num_tokens == 8
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(errors.UserError, match="holds a MaskGITBert, not a tokenizer"):
        loaders.load_tokenizer(str(tmp_path / "gen"))


def test_load_tokenizer_from_pretrained_dir_and_training_workdir(tiny, tmp_path, caplog):
    import orbax.checkpoint as ocp
    from configs import tiny_test
    from tok1d.weights import pretrained

    model, params = tiny
    kwargs = {k: v for k, v in TINY.items()}
    pretrained.save_pretrained(str(tmp_path / "pre"), "titok", kwargs, params)
    m, p = loaders.load_tokenizer(str(tmp_path / "pre"))
    desc = loaders.describe_tokenizer(str(tmp_path / "pre"))
    assert desc["kind"] == "pretrained" and m.num_latent_tokens == 8
    np.testing.assert_array_equal(p["latent_tokens"], params["latent_tokens"])
    # A training workdir: config.json + checkpoints/<step>/state; EMA params are preferred.
    work = tmp_path / "work"
    (work / "checkpoints" / "4").mkdir(parents=True)
    with open(work / "config.json", "w") as f:
        json.dump(tiny_test.get_config().to_dict(), f)
    ema = jax.tree.map(lambda x: x + 1.0, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(work / "checkpoints" / "4" / "state"), {"params": params, "ema_params": ema})
    # As a run's CheckpointManager lays it out: the step folder holds the step's metadata;
    # reading the item alone logs no orbax "Metadata file does not exist" warning.
    os.replace(work / "checkpoints" / "4" / "state" / "_CHECKPOINT_METADATA",
               work / "checkpoints" / "4" / "_CHECKPOINT_METADATA")
    with caplog.at_level(logging.WARNING):
        m, p = loaders.load_tokenizer(str(work))
    assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]
    desc = loaders.describe_tokenizer(str(work))
    assert desc["kind"] == "workdir" and desc["step"] == 4 and m.codebook_size == 64
    np.testing.assert_array_equal(p["latent_tokens"], ema["latent_tokens"])
    _, plain = loaders.load_tokenizer(str(work), use_ema=False)  # (the raw weights)
    np.testing.assert_array_equal(plain["latent_tokens"], params["latent_tokens"])
    # Inside a generator trainer's mesh and rules (it loads its sample decoder's tokenizer
    # there): the same params.
    mesh, rules, _ = parallel.mesh_from_config(config_lib.base_config("generator"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, under_mesh = loaders.load_tokenizer(str(work))
    np.testing.assert_array_equal(under_mesh["latent_tokens"], ema["latent_tokens"])
    # A config.json that no longer describes the checkpoint: one error naming what differs.
    other = tiny_test.get_config()
    other.model.token_dim = 16
    with open(work / "config.json", "w") as f:
        json.dump(other.to_dict(), f)
    with pytest.raises(ValueError, match=r"weights in .* do not match the model of its "
                       r"config.json: .*quantize/embedding: model \(64, 16\) vs weights \(64, 8\)"):
        loaders.load_tokenizer(str(work))
    (work / "config.json").write_text('{"trainer": "tok')  # damaged files: named
    with pytest.raises(errors.UserError, match="config.json is not valid JSON"):
        loaders.load_tokenizer(str(work))
    with open(work / "config.json", "w") as f:
        json.dump(tiny_test.get_config().to_dict(), f)
    data = max((p for p in (work / "checkpoints" / "4" / "state").rglob("*")
                if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])  # an array file cut short: orbax's raw error was
    with pytest.raises(errors.UserError, match=r"4/state is not a readable checkpoint \(.*Error "
                       r"reading .*\): its files are damaged or incomplete"):
        loaders.load_tokenizer(str(work))
    (work / "checkpoints" / "2").mkdir()  # an earlier checkpoint: named as the way on
    with pytest.raises(errors.UserError, match=r"incomplete; the run's other checkpoints are "
                       r"at steps 2 \(e.g. --checkpoint=\S+/checkpoints/2\)\.$"):
        loaders.load_tokenizer(str(work))
    (work / "checkpoints" / "2").rmdir()
    (work / "checkpoints" / "4" / "state" / "_METADATA").write_text("junk")
    with pytest.raises(errors.UserError, match="4/state is not a readable checkpoint"):
        loaders.load_tokenizer(str(work))


def test_digits_source_splits_labels_and_determinism():
    train, val = sources.DigitsSource("train"), sources.get_source("digits", "validation")
    assert len(train) + len(val) == 1797 and 170 <= len(val) <= 190
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sources.DigitsSource("test").indices.tolist() == val.indices.tolist()
    item = train[0]
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    assert item["image"].max() > 200 and item["image"][0, 0].tolist() == [0, 0, 0]
    labels = [val[i]["label"] for i in range(len(val))]
    assert sorted(set(labels)) == list(range(10))
    assert min(np.bincount(labels)) >= 17  # ~10% of every class is held out
    np.testing.assert_array_equal(sources.DigitsSource("train")[5]["image"], train[5]["image"])
    big = sources.get_source("digits", "train", image_size=64)[0]["image"]
    assert big.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="splits 'train' and 'validation'"):
        sources.DigitsSource("holdout")
    with pytest.raises(IndexError):
        train[len(train)]


def test_a_fully_convolutional_tokenizer_tokenizes_at_the_size_asked(tmp_path):
    """MaskGIT-VQGAN (`input_size` None) encodes any size: its `image_size` field (the size of
    its 256-token layout) does not refuse 32 px, and the token count follows the size asked."""
    model = models.create("maskgit_vqgan", hidden_channels=32, channel_mult=(1, 1, 2),
                          num_res_blocks=1, z_channels=32, codebook_size=16)
    assert model.input_size is None and model.image_size == 256
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    params = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
    with pytest.raises(ValueError, match="does not fix an image size; pass image_size"):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource("train"),
                                  str(tmp_path / "none"), log=lambda _: None)
    summary = tokenize.tokenize_dataset(
        model, params, sources.DigitsSource("train", image_size=32), str(tmp_path / "out"),
        image_size=32, batch_size=8, num_examples=16, log=lambda _: None)
    assert summary["num_examples"] == 16 and summary["num_tokens"] == (32 // 4) ** 2


def test_the_command_encodes_in_float32_unless_told(tiny, tmp_path, capsys):
    """`tok1d tokenize` computes in float32 by default, as the official code extraction (no
    autocast), also for a tokenizer saved in bfloat16 (a tok1d run's precision); --dtype=
    (empty) keeps the tokenizer's own."""
    from tok1d.cli import app
    from tok1d.weights import pretrained
    model, params = tiny
    tok_dir = str(tmp_path / "bf16_tokenizer")
    pretrained.save_pretrained(tok_dir, "titok", dict(TINY, dtype="bfloat16"), params)
    assert np.dtype(loaders.load_tokenizer(tok_dir)[0].dtype) == np.dtype("bfloat16")
    codes = {}
    for name, extra in (("default", []), ("own", ["--dtype="])):
        out = str(tmp_path / name)
        assert app.run(tokenize, [f"--tokenizer={tok_dir}", "--data=digits", "--split=train",
                                  f"--out={out}", "--num_examples=40", "--batch_size=40",
                                  *extra]) == 0
        source = tokens.TokenSource(out, "train")
        codes[name] = np.stack([np.asarray(source[i]["codes"]).reshape(-1) for i in range(40)])
    images = np.stack([tokenize.load_image(sources.DigitsSource("train", image_size=32)[i]
                                           ["image"], 32) for i in range(40)])
    np.testing.assert_array_equal(codes["default"], _encode(model, params, images))
    bf16 = model.clone(dtype="bfloat16")
    np.testing.assert_array_equal(codes["own"], _encode(bf16, params, images))
    assert (codes["default"] != codes["own"]).any()  # ~1% of this tiny model's codes
    info = json.load(open(os.path.join(str(tmp_path / "default"), tokens.INFO_FILENAME)))
    assert info["tokenizer"]["kwargs"]["dtype"] == "float32"  # what encoded, not the file's
    # A run in another dtype would mix shards of both in one split: refused.
    assert app.run(tokenize, [f"--tokenizer={tok_dir}", "--data=digits", "--split=train",
                              f"--out={tmp_path / 'default'}", "--num_examples=40",
                              "--batch_size=40", "--dtype=bfloat16"]) == 2
    assert "encoder_dtype: 'float32' there" in capsys.readouterr().err


def test_a_continuous_tokenizer_has_no_tokens_to_write(tmp_path):
    """The KL bottleneck is refused in one message naming what does produce tokens."""
    model = models.create("titok", **dict(TINY, quantizer="vae", token_dim=4))
    with pytest.raises(ValueError, match="no discrete codes .* FSQ, LFQ, BSQ"):
        tokenize.tokenize_dataset(model, {}, sources.DigitsSource("train"),
                                  str(tmp_path / "t"), split="train", batch_size=4,
                                  log=lambda _: None)
    assert not (tmp_path / "t").exists()


def test_an_undecodable_record_is_named_with_its_file_and_index(tiny, tmp_path):
    """A record whose image does not decode fails in one line naming the source file, the record
    index and the dataset (the decoder's own message names neither)."""
    import io
    from array_record.python import array_record_module
    from PIL import Image
    model, params = tiny
    data = tmp_path / "data"
    data.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    good = buf.getvalue()
    writer = array_record_module.ArrayRecordWriter(
        str(data / "train.array_record-00000-of-00001"), "group_size:1")
    for i, (image, name) in enumerate([(good, "a/0.jpg"), (good[:len(good) // 2], "a/cut.jpg"),
                                       (good, "a/2.jpg")]):
        writer.write(records.encode_record(image, 0, name))
    writer.close()
    (data / records.INFO_FILENAME).write_text(json.dumps({
        "format": records.FORMAT_VERSION, "class_names": ["a"],
        "splits": {"train": {"num_examples": 3,
                             "shards": ["train.array_record-00000-of-00001"]}}}))
    source = tokenize.resolve_source(str(data), "train")
    with pytest.raises(records.CorruptImageError,
                       match=f"file 'a/cut.jpg', record 1 of split 'train' of {data}"):
        tokenize.tokenize_dataset(model, params, source, str(tmp_path / "out"), split="train",
                                  batch_size=8, num_shards=1, log=lambda _: None)
