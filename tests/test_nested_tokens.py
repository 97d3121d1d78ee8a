"""Ordered variable-length 1D tokens (`tok1d.models.tokenizers.nested`): the tail of the tokens
has no influence under a prefix length, `decode_codes` takes a prefix, the schedules, the
training forward draws a prefix per example (through the tokenizer objective), `tokenize`
stores the first k tokens and a generator trained on them samples k decodable tokens, and a
tiny TiTok trained with nested dropout on the digits reconstructs better with more tokens."""

import copy as copy_lib
import json
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tok1d import models
from tok1d import errors
from tok1d.cli import evaluate, tokenize
from tok1d.data import sources, tokens
from tok1d.evaluation.image_metrics import psnr
from tok1d.models.tokenizers import nested
from tok1d.objectives import terms, tokenizer_loss
from tok1d.train import config_lib, generator
from tok1d.weights import pretrained

import test_interfaces as ti

SIZE = ti.SIZE
TITOK = ti.TITOK  # 8 tokens
GIGATOK = dict(ti.GIGATOK, num_latent_tokens=8)
KWARGS = {"titok": TITOK, "gigatok": GIGATOK}


def images(b=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(b, SIZE, SIZE, 3)),
                       jnp.float32)


def build(name, nested_dropout="uniform", **kw):
    model = models.create(name, nested_dropout=nested_dropout, **dict(KWARGS[name], **kw))
    x = images() * (2 if name == "gigatok" else 1) - (1 if name == "gigatok" else 0)
    return model, jax.jit(model.init)(jax.random.key(0), x), x


@pytest.mark.parametrize("name", ["titok", "gigatok"])
def test_tokens_beyond_k_have_no_influence(name):
    model, variables, x = build(name)
    assert "tail_mask" in variables["params"]
    z, _ = jax.jit(lambda v, x: model.apply(v, x, method="encode_latents"))(variables, x)
    dec = jax.jit(lambda v, z, k: model.apply(v, z, k, method="decode_latents"))
    lengths = jnp.array([1, 3])
    tail = jnp.arange(8)[None, :, None] >= lengths[:, None, None]
    other = jnp.where(tail, jax.random.normal(jax.random.key(1), z.shape), z)
    out = dec(variables, z, lengths)
    np.testing.assert_array_equal(out, dec(variables, other, lengths))
    full = jnp.full((2,), 8)
    assert float(jnp.max(jnp.abs(dec(variables, z, full) - dec(variables, other, full)))) > 1e-6
    # a (B, k) prefix decodes like the per-example length k (the rest is the mask vector)
    np.testing.assert_allclose(dec(variables, z[:, :3], None)[1], out[1], atol=1e-5)


@pytest.mark.parametrize("name", ["titok", "gigatok"])
@pytest.mark.parametrize("schedule", ["none", "pow2"])
def test_decode_codes_takes_a_prefix(name, schedule):
    model, variables, x = build(name, schedule)
    assert ("tail_mask" in variables["params"]) == (schedule != "none")
    codes = model.apply(variables, x, method="encode")
    dec = jax.jit(lambda v, c: model.apply(v, c, method="decode_codes"))
    for k in (1, 3):
        assert dec(variables, codes[:, :k]).shape == x.shape
        if schedule != "none":  # the forward's prefix_lengths=k is the same decode
            np.testing.assert_allclose(dec(variables, codes[:, :k]),
                                       model.apply(variables, x, prefix_lengths=k)[0],
                                       atol=1e-4)
    np.testing.assert_allclose(dec(variables, codes), model.apply(variables, x)[0], atol=1e-4)
    with pytest.raises(ValueError, match="9 latent tokens"):
        model.apply(variables, jnp.concatenate([codes, codes[:, :1]], 1), method="decode_codes")


def test_option_errors_and_schedules():
    with pytest.raises(ValueError, match="nested_dropout schedule"):
        build("titok", "linear")
    with pytest.raises(ValueError, match="1D layout only"):
        build("gigatok", "pow2", layout="2d")
    model, variables, x = build("gigatok", "none", layout="2d")
    codes = model.apply(variables, x, method="encode")
    with pytest.raises(ValueError, match="2D layout decodes all"):
        model.apply(variables, codes[:, :3], method="decode_codes")
    assert not nested.supports_prefix(model) and nested.supports_prefix(build("titok")[0])
    np.testing.assert_array_equal(nested.prefix_choices(8, "pow2"), [1, 2, 4, 8])
    np.testing.assert_array_equal(nested.prefix_choices(6, "pow2"), [1, 2, 4, 6])
    np.testing.assert_array_equal(nested.prefix_choices(4, "uniform"), [1, 2, 3, 4])
    ks = np.asarray(nested.sample_prefix_lengths(jax.random.key(0), 4000, 8, "pow2"))
    assert set(ks.tolist()) == {1, 2, 4, 8} and abs(np.mean(ks == 1) - 0.25) < 0.03


@pytest.mark.parametrize("schedule", ["none", "uniform"])
def test_the_objective_draws_a_prefix_per_example(schedule):
    """Through `tokenizer_loss` (the trainer's objective): with the option two rngs give two
    losses (their prefixes differ), without it the rng changes nothing."""
    model, variables, _ = build("titok", schedule)
    loss_fn = jax.jit(tokenizer_loss.make_loss_fn(model, {"l2": 1.0, "quantizer": 1.0},
                                                  terms.FrozenNets()))
    x = images(8)
    losses = [float(loss_fn(variables["params"], x, {}, None, {}, 0.0, 0.0,
                            jax.random.key(seed))[0]) for seed in (0, 1)]
    assert (losses[0] != losses[1]) == (schedule != "none"), losses


@pytest.fixture(scope="module")
def prefix_tokens(tmp_path_factory):
    """Digits tokenized by a tiny random TiTok (nested dropout; encoder weights scaled up so
    that images get different codes), the first 3 of 8 tokens stored; the tokenizer saved as a
    pretrained directory."""
    root = tmp_path_factory.mktemp("prefix")
    model, variables, _ = build("titok")
    scale = lambda path, x: x * 10 if "encoder" in jax.tree_util.keystr(path) and x.ndim >= 2 \
        else x  # noqa: E731
    params = jax.tree_util.tree_map_with_path(
        scale, jax.tree.map(np.asarray, nn.unbox(variables)["params"]))
    tok_dir = str(root / "tokenizer")
    pretrained.save_pretrained(tok_dir, "titok", dict(TITOK, nested_dropout="uniform"), params)
    out = str(root / "tokens")
    for split, n in (("train", 64), ("validation", 32)):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource(split), out, split=split,
                                  batch_size=32, num_examples=n, prefix_tokens=3,
                                  log=lambda _: None)
    return model, params, out, tok_dir


def test_tokenize_stores_the_first_k_tokens(prefix_tokens):
    model, params, out, _ = prefix_tokens
    with pytest.raises(tokenize.OtherTokenizerError, match=(
            "holds 3 tokens per example of this tokenizer, this run keeps 2 \\(another "
            "--prefix_tokens\\); use another --out.")):
        tokenize.tokenize_dataset(model, params, sources.DigitsSource("test"), out, split="test",
                                  batch_size=32, num_examples=8, prefix_tokens=2,
                                  log=lambda _: None)
    src = tokens.TokenSource(out, "validation")
    assert src.num_tokens == 3 and src.info["num_tokens"] == 3
    digits = sources.DigitsSource("validation")
    x = np.stack([tokenize.load_image(digits[i]["image"], SIZE) for i in range(32)])
    full = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
        params, x))
    np.testing.assert_array_equal(np.stack([src[i]["codes"][0] for i in range(32)]),
                                  full[:, :3])
    with pytest.raises(ValueError, match="prefix_tokens=9"):
        tokenize.make_encoder(model, params, flip=False, batch_size=8, prefix_tokens=9)
    # a dataset of all tokens cut to a prefix by the generator's reader
    cut = tokens.prefix_source(tokens.ArrayTokenSource(full, np.zeros(32, np.int64)), 2)
    assert cut.num_tokens == 2 and cut.num_variants == 1
    np.testing.assert_array_equal(cut[5]["codes"], full[5:6, :2])
    # picklable / copyable (grain's workers pickle the source)
    for copy in (pickle.loads(pickle.dumps(cut)), copy_lib.deepcopy(cut)):
        assert copy.num_tokens == 2
        np.testing.assert_array_equal(copy[5]["codes"], full[5:6, :2])


def test_generator_on_prefixes_samples_k_decodable_tokens(prefix_tokens, tmp_path):
    """A tiny GPT trained on 3-token prefixes of an 8-token TiTok (generator.prefix_tokens cut
    a full dataset the same way): its samples are 3 codes, decoded to images by decode_codes
    (the periodic sample grid)."""
    _, _, out, tok_dir = prefix_tokens
    c = config_lib.base_config("generator")
    c.total_steps, c.batch_size, c.eval_batch_size = 4, 32, 32
    c.precision, c.ema_decay = "float32", 0.0
    c.log_every_steps, c.eval_every_steps = 2, 1000
    c.checkpoint.every_steps, c.checkpoint.async_save = 1000, False
    c.num_grid_images = 8
    c.generator.tokens, c.generator.tokenizer = out, tok_dir
    c.generator.num_sample_classes = 2
    c.model = dict(name="gpt", vocab_size=64, token_dropout=0.0, dropout_rate=0.0, num_tokens=3,
                   num_classes=10, width=32, depth=1, num_heads=2, mlp_dim=64)
    c.sampling = dict(cfg_scale=1.0, temperature=1.0)
    workdir = str(tmp_path / "gpt")
    result = generator.train_and_evaluate(c, workdir)
    assert result["step"] == 4 and np.isfinite(result["loss"])
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 300
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any("train/loss" in line for line in lines)


def test_evaluate_prefixes_reports_quality_per_k(prefix_tokens, tmp_path):
    """`tok1d evaluate --prefixes`: PSNR / SSIM per k from the first k tokens (k = N is the
    plain evaluation; k = 2 is recomputed here from encode -> decode_codes of 2 tokens), the
    report with its table, curve plot and one grid row per k; bad k named in one line."""
    model, params, _, tok_dir = prefix_tokens
    c = config_lib.base_config("tokenizer")
    c.model = dict(name="titok", nested_dropout="uniform", **TITOK)
    c.data.name, c.data.image_size, c.data.eval_examples = "digits", SIZE, 16
    c.eval_batch_size, c.precision = 8, "float32"
    c.evaluation.num_report_images = 4
    out = tmp_path / "prefixes"
    m = evaluate.run(c, checkpoint=tok_dir, out=str(out), prefixes="1,2,8", log=lambda _: None)
    assert {f"{k}_k{n}" for k in ("psnr", "ssim") for n in (1, 2, 8)} <= set(m)
    assert len({m["psnr_k1"], m["psnr_k2"], m["psnr_k8"]}) == 3  # the prefix is what is decoded

    full = evaluate.run(c, checkpoint=tok_dir, out=str(tmp_path / "full"), log=lambda _: None)
    assert m["psnr_k8"] == pytest.approx(full["psnr"], rel=1e-5)
    assert m["ssim_k8"] == pytest.approx(full["ssim"], rel=1e-5)

    digits = sources.DigitsSource("validation")
    x = np.stack([tokenize.load_image(digits[i]["image"], SIZE) for i in range(16)])
    codes = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
    recon = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode_codes"))(
        params, codes[:, :2])
    assert m["psnr_k2"] == pytest.approx(float(jnp.mean(psnr(recon, x))), rel=1e-4)

    assert "Quality vs k" in (out / "report.md").read_text()
    record = json.load(open(out / "metrics.json"))
    assert record["metrics"]["psnr_k1"] == pytest.approx(m["psnr_k1"])
    assert os.path.exists(out / "prefix_reconstructions.png")
    with pytest.raises(errors.UserError, match=r"1\.\.8"):
        evaluate.run(c, checkpoint=tok_dir, out=str(tmp_path / "bad"), prefixes="0,9")


def test_tiny_titok_quality_rises_with_k():
    """Nested dropout on the embedded digits: a tiny TiTok (1-layer width-32 ViTs, 8 tokens,
    the continuous KL bottleneck: the 64-code VQ of this size needs far more steps than a unit
    test has to use its codes) trained 400 steps on L2 decodes the validation digits better
    from more leading tokens (up to the saturation of this tiny model)."""
    model = models.create("titok", nested_dropout="uniform",
                          **dict(TITOK, quantizer="vae", token_dim=4))
    digits = {split: sources.DigitsSource(split, image_size=SIZE)
              for split in ("train", "validation")}
    train, val = (np.stack([np.asarray(src[i]["image"], np.float32) / 255
                            for i in range(len(src))]) for src in digits.values())
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), train[:2]))["params"]
    tx = optax.adam(2e-3)

    def loss_fn(p, x, rng):
        out, aux = model.apply({"params": p}, x, train=True, rngs={"sample": rng})
        return jnp.mean(jnp.square(out - x)) + 1e-6 * aux.losses["kl"]

    @jax.jit
    def step(p, opt, x, rng):
        updates, opt = tx.update(jax.grad(loss_fn)(p, x, rng), opt, p)
        return optax.apply_updates(p, updates), opt

    # A Python loop over one jitted step, not a lax.scan: XLA:CPU runs the gradient of the
    # patch-embedding conv inside a loop body on a slow path (2x the whole run; RESULTS.md).
    order = np.random.default_rng(0).integers(0, len(train), (400, 64))
    opt = tx.init(params)
    for rows, rng in zip(order, jax.random.split(jax.random.key(1), 400)):
        params, opt = step(params, opt, train[rows], rng)
    decode = jax.jit(lambda p, k: jnp.mean(psnr(jnp.clip(
        model.apply({"params": p}, val, prefix_lengths=k)[0], 0, 1), val)),
        static_argnums=1)
    quality = {k: float(decode(params, k)) for k in (1, 2, 4, 8)}
    # measured: {1: 14.97, 2: 15.62, 4: 15.70, 8: 15.67}: the gain saturates at this size
    assert quality[1] < quality[2] < quality[4], quality
    assert quality[8] > quality[1] + 0.5 and quality[8] > max(quality.values()) - 0.1, quality


def test_residual_prefixes_count_codes_in_whole_tokens(tmp_path):
    """A prefix counts codes like num_tokens (residual VQ: tokens x depth): `--prefixes=all`
    steps by whole tokens, k = 4 codes of depth 2 decodes 2 latent tokens, and a k that is
    not whole tokens is one clear error (evaluate, decode_codes)."""
    model, variables, x = build("titok", quantizer="residual_vq",
                                quantizer_options={"depth": 2})
    assert model.num_tokens == 16 and model.codes_per_token == 2
    assert evaluate.parse_prefixes("all", 16, 2) == [2, 4, 8, 16]
    assert nested.prefix_tokens(model, 4) == 2
    codes = model.apply(variables, x, method="encode")
    np.testing.assert_allclose(model.apply(variables, codes[:, :4], method="decode_codes"),
                               model.apply(variables, x, prefix_lengths=2)[0], atol=1e-4)
    with pytest.raises(ValueError, match="not a whole number of tokens"):
        model.apply(variables, codes[:, :3], method="decode_codes")
    c = config_lib.base_config("tokenizer")
    c.model = dict(name="titok", nested_dropout="uniform", quantizer="residual_vq",
                   quantizer_options={"depth": 2}, **TITOK)
    with pytest.raises(errors.UserError, match="multiple of 2"):
        evaluate.run(c, checkpoint=str(tmp_path / "none"), out=str(tmp_path / "out"),
                     prefixes="2,3")


def test_tokenize_prefix_needs_a_1d_tokenizer():
    model, variables, _ = build("gigatok", "none", layout="2d")
    with pytest.raises(errors.UserError, match="--prefix_tokens needs a 1D tokenizer"):
        tokenize.make_encoder(model, variables["params"], flip=False, batch_size=8,
                              prefix_tokens=3)
    titok, tv, _ = build("titok", quantizer="residual_vq", quantizer_options={"depth": 2})
    with pytest.raises(ValueError, match="prefix_tokens=3: not a whole number of tokens"):
        tokenize.make_encoder(titok, tv["params"], flip=False, batch_size=8, prefix_tokens=3)


def test_prefixes_of_an_unordered_tokenizer_are_warned_of(tmp_path):
    """`tokenize --prefix_tokens` on a tokenizer trained without nested dropout says its
    prefixes may be poor images, as training and sampling a generator on them do; one
    trained with it does not."""
    for schedule in ("none", "uniform"):
        model, variables, _ = build("titok", schedule)
        said = []
        tokenize.tokenize_dataset(model, variables["params"], sources.DigitsSource("train"),
                                  str(tmp_path / schedule), batch_size=8, num_examples=8,
                                  prefix_tokens=2, log=said.append)
        warnings = [line for line in said if line.startswith("Warning:")]
        assert warnings == ([] if schedule == "uniform" else [
            "Warning: --prefix_tokens=2 keeps the first of 8 tokens, and the tokenizer was "
            "not trained with nested dropout: its decoded prefixes may be poor images."]), said
