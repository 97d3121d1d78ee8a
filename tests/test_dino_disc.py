"""GigaTok's DINO discriminator: trunk + converter vs a NumPy reimplementation on an official-layout
state_dict, heads vs a PyTorch reference (torch spectral_norm, BatchNormLocal), spectral-norm state
handling, frozen trunk, DiffAugment, converter errors. Tiny sizes throughout (parity with the
official code itself at full size is recorded in `tok1d.models.dino_disc`'s docstring)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.objectives import augment
from tok1d.weights.convert import dino_disc as conv
from tok1d.weights.convert.common import ConversionError
from tok1d.models import dino_disc as dd
from tok1d.weights import loaders

torch = pytest.importorskip("torch", reason="the references are torch modules")
F = torch.nn.functional

D, DEPTH, HEADS, PATCH, IMG = 32, 3, 2, 8, 32
KEY_DEPTHS = (0, 2, 7)          # 7 >= depth: dropped, as upstream
TINY = dict(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, img_size=IMG,
            key_depths=KEY_DEPTHS, kernel_size=3)
N = (IMG // PATCH) ** 2         # tokens per tap
B = 8


def official_trunk_state_dict(seed=0):
    """Random DINO v1 ViT state_dict with the official key names and layout."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=0.1, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {"cls_token": rn(1, 1, D, std=0.5), "pos_embed": rn(1, N + 1, D, std=0.5),
          "patch_embed.proj.weight": rn(D, 3, PATCH, PATCH, std=0.05),
          "patch_embed.proj.bias": rn(D), "norm.weight": rn(D, mean=1.0), "norm.bias": rn(D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": rn(D, mean=1.0), p + "norm1.bias": rn(D),
                   p + "attn.qkv.weight": rn(3 * D, D, std=0.2), p + "attn.qkv.bias": rn(3 * D),
                   p + "attn.proj.weight": rn(D, D), p + "attn.proj.bias": rn(D),
                   p + "norm2.weight": rn(D, mean=1.0), p + "norm2.bias": rn(D),
                   p + "mlp.fc1.weight": rn(4 * D, D), p + "mlp.fc1.bias": rn(4 * D),
                   p + "mlp.fc2.weight": rn(D, 4 * D), p + "mlp.fc2.bias": rn(D)})
    return sd


def numpy_taps(sd, images_nhwc):
    """Straightforward float64 NumPy forward of the official trunk (key biases NOT zeroed: the
    zeroing must not matter), returning the readouts (B, N, D)."""
    s = {k: v.double().numpy() for k, v in sd.items()}
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((np.asarray(images_nhwc, np.float64) + 1) / 2 - mean) / std
    b, h, w, _ = x.shape
    gh, gw = h // PATCH, w // PATCH
    patches = x.reshape(b, gh, PATCH, gw, PATCH, 3).transpose(0, 1, 3, 5, 2, 4)
    patches = patches.reshape(b, gh * gw, 3 * PATCH * PATCH)
    wpe = s["patch_embed.proj.weight"].reshape(D, -1)
    t = patches @ wpe.T + s["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(s["cls_token"], (b, 1, D)), t], 1) + s["pos_embed"]

    def ln(z, p):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-6) * s[p + ".weight"] + s[p + ".bias"]

    def gelu_tanh(z):
        return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))

    taps = [t[:, 1:] + t[:, :1]]
    hd = D // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = ln(t, p + "norm1") @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, -1, 3, HEADS, hd).transpose(2, 0, 3, 1, 4)
        a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, D)
        t = t + o @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        hmid = gelu_tanh(ln(t, p + "norm2") @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        t = t + hmid @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
        if i in KEY_DEPTHS:
            taps.append(t[:, 1:] + t[:, :1])
    return taps


@functools.partial(jax.jit, static_argnames=("model", "train", "return_taps", "mutable"))
def apply(model, variables, images, rngs=None, train=False, return_taps=False, mutable=False):
    """Jitted `model.apply` (eager Flax applies are slow)."""
    return model.apply(variables, images, rngs=rngs, train=train, return_taps=return_taps,
                       mutable=mutable)


SPEC = (dd.SPECTRAL,)
aug = jax.jit(augment.diff_augment, static_argnames=("prob", "cutout"))
aug_u = jax.jit(augment.diff_augment_with_uniforms, static_argnames=("prob", "cutout"))
preprocess = jax.jit(dd.preprocess, static_argnums=1)


# ----------------------------------------------------------------------------- torch heads

class TorchBatchNormLocal(torch.nn.Module):
    def __init__(self, c, vbs=8, eps=1e-6):
        super().__init__()
        self.vbs, self.eps = vbs, eps
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))

    def forward(self, x):
        groups = -(-x.shape[0] // self.vbs)
        y = x.reshape(groups, -1, x.shape[1], x.shape[2])
        mean = y.mean([1, 3], keepdim=True)
        var = y.var([1, 3], keepdim=True, unbiased=False)
        y = (y - mean) / torch.sqrt(var + self.eps)
        return (y * self.weight[None, :, None] + self.bias[None, :, None]).reshape(x.shape)


class TorchResidual(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


def torch_heads(num, c, k, seed=0):
    torch.manual_seed(seed)

    def sn_conv(cin, cout, ks):
        return torch.nn.utils.spectral_norm(
            torch.nn.Conv1d(cin, cout, ks, padding=ks // 2, padding_mode="circular"))

    def block(ks):
        return torch.nn.Sequential(sn_conv(c, c, ks), TorchBatchNormLocal(c),
                                   torch.nn.LeakyReLU(0.2))

    m = torch.nn.Module()
    m.heads = torch.nn.ModuleList([
        torch.nn.Sequential(block(1), TorchResidual(block(k)), sn_conv(c, 1, 1))
        for _ in range(num)])
    with torch.no_grad():  # non-trivial norm affine, to check the mapping
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith(("0.1.weight", "0.1.bias", "fn.1.weight",
                                              "fn.1.bias")):
                p.add_(0.2 * torch.randn(p.shape))
    return m


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny():
    sd = official_trunk_state_dict()
    model = dd.DinoDiscriminator(**TINY)
    trunk = conv.convert_trunk(sd, model)
    model, variables = dd.build_dino_discriminator(trunk, jax.random.key(1), **TINY)
    return sd, model, variables


def _images(seed, size, batch=B):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), jnp.float32, -1, 1)


# ----------------------------------------------------------------------------- model

def test_shapes_collections_and_default_size(tiny):
    _, model, variables = tiny
    assert set(variables) == {"params", dd.SPECTRAL}
    # init_variables builds the same tree as model.init
    want = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, IMG, IMG, 3))))
    shape_of = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
    assert shape_of(want) == shape_of(variables)
    random_trunk = jax.eval_shape(lambda k: dd.init_variables(model, k), jax.random.key(0))
    assert shape_of(want) == shape_of(random_trunk)
    assert sorted(variables["params"]) == ["heads_0", "heads_1", "heads_2", dd.TRUNK]
    sp = variables[dd.SPECTRAL]["heads_1"]
    assert sp["block_in"]["conv"]["u"].shape == (D,)
    assert sp["block_res"]["conv"]["v"].shape == (D * 3,)
    assert sp["logits"]["u"].shape == (1,) and sp["logits"]["v"].shape == (D,)
    assert np.allclose(np.linalg.norm(sp["block_res"]["conv"]["v"]), 1.0, atol=1e-6)
    out = apply(model, variables, _images(0, 40), rngs={"crop": jax.random.key(1)})
    assert out.shape == (B, 3 * N) and out.dtype == jnp.float32
    labels = dd.trunk_frozen_labels(variables["params"])
    assert set(jax.tree.leaves(labels["trunk"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["heads_0"])) == {"trainable"}

    # Official size: 7.39M trainable head params (the number the official script prints), a
    # 21.7M ViT-S/16 trunk, 5 x 196 logits for 256 px inputs.
    full = dd.DinoDiscriminator()
    shapes = nn.unbox(jax.eval_shape(
        lambda k: full.init({"params": k}, jnp.zeros((8, 224, 224, 3))), jax.random.key(0)))
    count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    assert count({k: v for k, v in shapes["params"].items() if k != "trunk"}) == 7_386_245
    assert count(shapes["params"]["trunk"]) == 21_665_664
    out = jax.eval_shape(lambda v, x: full.apply(v, x, rngs={"crop": jax.random.key(0)}),
                         shapes, jax.ShapeDtypeStruct((8, 256, 256, 3), jnp.float32))
    assert out.shape == (8, 5 * 196)


def test_trunk_and_converter_match_numpy(tiny):
    sd, model, variables = tiny
    images = _images(2, IMG)
    _, taps = apply(model, variables, images, return_taps=True)
    want = numpy_taps(sd, images)
    assert len(taps) == len(want) == 3
    for got, ref in zip(taps, want):
        assert rel_err(got, ref) < 2e-5
    # the key third of every qkv bias is zeroed, the rest kept
    attn = variables["params"]["trunk"]["blocks_1"]["attn"]
    assert np.all(np.asarray(attn["key"]["bias"]) == 0)
    np.testing.assert_array_equal(np.asarray(attn["query"]["bias"]).reshape(-1),
                                  sd["blocks.1.attn.qkv.bias"][:D].numpy())


def test_resize_and_crop_match_torch():
    m = torch.tensor((0.485, 0.456, 0.406)).reshape(1, 3, 1, 1)
    s = torch.tensor((0.229, 0.224, 0.225)).reshape(1, 3, 1, 1)
    for size, mode in ((45, "area"), (24, "bicubic")):
        x = _images(3, size, batch=2)
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        ref = F.interpolate((0.5 / s) * xt + (0.5 - m) / s, size=(IMG, IMG), mode=mode)
        got = preprocess(x, IMG, None)
        assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), ref.numpy()) < 2e-6
    # the random path: a coin per call between area resize and one crop for the whole batch
    x = _images(4, 40, batch=2)
    area = np.asarray(preprocess(x, IMG, None))
    norm = (np.asarray(x) + 1) / 2
    norm = (norm - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    seen = set()
    for seed in range(8):
        y = np.asarray(preprocess(x, IMG, jax.random.key(seed)))
        if np.allclose(y, area):
            seen.add("area")
            continue
        offsets = [(i, j) for i in range(9) for j in range(9)
                   if np.allclose(y, norm[:, i:i + IMG, j:j + IMG], atol=1e-6)]
        assert len(offsets) == 1, seed
        seen.add("crop")
    assert seen == {"area", "crop"}


def test_crop_draw_is_a_fair_coin_and_uniform_offsets():
    """torchvision's RandomCrop draws every offset with equal probability; the one-draw form
    must too (4000 keys: every offset of a 5 x 9 range appears, each near its expected count,
    and about half the calls crop)."""
    keys = jax.random.split(jax.random.key(0), 4000)
    use, top, left = jax.vmap(lambda k: dd.crop_draw(k, 36, 40, 32))(keys)
    assert top.dtype == left.dtype == jnp.int32 and use.dtype == jnp.bool_
    assert abs(float(use.mean()) - 0.5) < 0.03
    for offsets, n in ((np.asarray(top), 5), (np.asarray(left), 9)):
        counts = np.bincount(offsets, minlength=n)
        assert len(counts) == n and counts.min() > 0
        expected = len(offsets) / n
        assert np.abs(counts - expected).max() < 5 * np.sqrt(expected), counts


def test_heads_match_torch_spectral_norm(tiny):
    _, model, variables = tiny
    ref = torch_heads(3, D, 3)
    params, spectral = conv.convert_heads(ref.state_dict(), model)
    variables = {"params": {**variables["params"], **params}, dd.SPECTRAL: spectral}
    images = _images(5, IMG, batch=16)  # two BatchNormLocal groups
    (out, taps), upd = apply(model, variables, images, train=True, return_taps=True,
                             mutable=SPEC)
    ref.train()
    with torch.no_grad():
        want = torch.cat([h(torch.from_numpy(np.asarray(t).transpose(0, 2, 1).copy()))[:, 0]
                          for h, t in zip(ref.heads, taps)], 1)
    assert rel_err(out, want.numpy()) < 1e-5
    state = ref.state_dict()
    new = upd[dd.SPECTRAL]
    for t in range(3):
        for src, path in ((f"heads.{t}.0.0", ("block_in", "conv")),
                          (f"heads.{t}.1.fn.0", ("block_res", "conv")),
                          (f"heads.{t}.2", ("logits",))):
            node = new[f"heads_{t}"]
            for p in path:
                node = node[p]
            assert rel_err(node["u"], state[src + ".weight_u"].numpy()) < 1e-5
            assert rel_err(node["v"], state[src + ".weight_v"].numpy()) < 1e-5
    # eval mode: stored u, v as they are, nothing written
    ref.eval()
    variables = {"params": variables["params"], dd.SPECTRAL: new}
    out, upd = apply(model, variables, images, train=False, mutable=SPEC)
    with torch.no_grad():
        want = torch.cat([h(torch.from_numpy(np.asarray(t).transpose(0, 2, 1).copy()))[:, 0]
                          for h, t in zip(ref.heads, taps)], 1)
    assert rel_err(out, want.numpy()) < 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(upd[dd.SPECTRAL]),
                                                      jax.tree.leaves(new)))


def test_spectral_state_batch_groups_and_frozen_trunk(tiny):
    _, model, variables = tiny
    x = _images(6, IMG, batch=16)
    _, upd = apply(model, variables, x, train=True, return_taps=True, mutable=SPEC)
    before, after = jax.tree.leaves(variables[dd.SPECTRAL]), jax.tree.leaves(upd[dd.SPECTRAL])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    full, same = apply(model, variables, x, train=False, mutable=SPEC)
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(same[dd.SPECTRAL])))
    with pytest.raises(ValueError, match="mutable"):
        jax.eval_shape(functools.partial(model.apply, train=True), variables, x)

    # BatchNormLocal: groups of B / ceil(B / 8) images are normalised independently
    assert [dd.virtual_group_size(b, 8) for b in (4, 8, 12, 16)] == [4, 8, 6, 8]
    with pytest.raises(ValueError, match="equal"):
        dd.virtual_group_size(9, 8)
    changed, _ = apply(model, variables, x.at[:8].multiply(-0.5), train=False, mutable=SPEC)
    np.testing.assert_array_equal(changed[8:], full[8:])
    assert not np.allclose(changed[:8], full[:8])

    # frozen trunk: zero gradients for its params, gradients reach the images
    def loss(params, images):
        return jnp.mean(jax.nn.relu(1.0 - model.apply(
            {"params": params, dd.SPECTRAL: variables[dd.SPECTRAL]}, images)))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(gp["trunk"])) == 0.0
    assert float(jnp.abs(gx).max()) > 0
    assert float(jnp.abs(gp["heads_2"]["block_res"]["conv"]["kernel"]).max()) > 0


# ----------------------------------------------------------------------------- DiffAugment

def test_diff_augment_semantics():
    x = _images(7, 32, batch=16)
    a = aug(jax.random.key(0), x)
    assert a.shape == x.shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, aug(jax.random.key(0), x))
    assert not np.allclose(a, aug(jax.random.key(1), x))
    np.testing.assert_array_equal(aug(jax.random.key(0), x, prob=0.0), x)
    g = jax.grad(lambda t: jnp.sum(aug(jax.random.key(0), t) ** 2))(x)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0

    # translation only (flags above prob switch the others off): a zero-filled shift
    r = np.full((7, 16), 0.5, np.float32)
    r[0, 0], r[1, 0] = 0.0, 0.99  # d = round(32 / 8) = 4: shift rows by -4, columns by +4
    off = jnp.asarray([0.0, 2.0, 2.0])
    y = np.asarray(aug_u(x, off, jnp.asarray(r)))
    xn = np.asarray(x)
    np.testing.assert_array_equal(y[0, 4:, :-4], xn[0, :-4, 4:])
    assert np.all(y[0, :4] == 0) and np.all(y[0, :, -4:] == 0)
    np.testing.assert_array_equal(y[1], xn[1])  # r = 0.5: no shift

    # colour only
    r = np.random.default_rng(0).random((7, 16)).astype(np.float32)
    y = np.asarray(aug_u(x, jnp.asarray([2.0, 0.0, 2.0]),
                                                      jnp.asarray(r)))
    z = xn + (r[2] - 0.5)[:, None, None, None]
    m = z.mean(-1, keepdims=True)
    z = (z - m) * (2 * r[3])[:, None, None, None] + m
    m = z.mean((1, 2, 3), keepdims=True)
    z = (z - m) * (r[4] + 0.5)[:, None, None, None] + m
    np.testing.assert_allclose(y, z, rtol=1e-5, atol=1e-5)

    # cutout only: a round(0.2 * 32) = 6 square (cutout is 20% of each side, 3.5% of the area)
    ones = jnp.ones((16, 32, 32, 3))
    r[5:] = np.linspace(0.2, 0.8, 16)
    y = np.asarray(aug_u(ones, jnp.asarray([2.0, 2.0, 0.0]),
                                                      jnp.asarray(r)))
    assert np.all((y == 0).sum((1, 2, 3)) == 36 * 3)
    # the random API: only cutout leaves exact zeros; about 0.2^2 of the area, less at edges
    zeros = [float((np.asarray(aug(jax.random.key(s), ones))[..., 0] == 0)
                   .mean()) for s in range(4)]
    assert 0.02 < np.mean(zeros) <= 36 / 1024


# ----------------------------------------------------------------------------- converter

def test_converter_file_round_trip_and_errors(tiny, tmp_path):
    sd, model, variables = tiny
    path = str(tmp_path / "dino_tiny.pth")
    torch.save(sd, path)
    trunk = conv.convert_file(path, model)
    np.testing.assert_array_equal(trunk["patch_embed"]["kernel"],
                                  sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(trunk["pos_embed"], sd["pos_embed"].numpy()[0])
    np.testing.assert_array_equal(trunk["blocks_2"]["mlp"]["fc1"]["kernel"],
                                  sd["blocks.2.mlp.fc1.weight"].numpy().T)
    _, built = dd.build_dino_discriminator(loaders.load_disc_trunk(path, model),
                                           jax.random.key(1), **TINY)
    for a, b in zip(jax.tree.leaves(built["params"]["trunk"]), jax.tree.leaves(trunk)):
        np.testing.assert_array_equal(a, b)
    assert sd["blocks.0.attn.qkv.bias"][D:2 * D].abs().sum() > 0  # caller's dict untouched

    bad = dict(sd)
    del bad["blocks.1.attn.proj.weight"]
    bad["head.weight"] = torch.zeros(3, D)
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.proj\.weight[\s\S]*head\.weight"):
        conv.convert_trunk(bad, model)
    v2 = {**sd, "mask_token": torch.zeros(1, D), "blocks.0.ls1.gamma": torch.ones(D)}
    with pytest.raises(ConversionError, match="DINOv2"):
        conv.convert_trunk(v2, model)
    with pytest.raises(ConversionError, match="pos_embed"):
        conv.convert_trunk(sd, dd.DinoDiscriminator(**{**TINY, "img_size": 48}))

    heads = torch_heads(3, D, 3).state_dict()
    wrapped = {f"discriminator.{k}": v for k, v in heads.items()}
    params, spectral = conv.convert_heads(wrapped, model)
    np.testing.assert_array_equal(params["heads_2"]["block_res"]["conv"]["kernel"],
                                  heads["heads.2.1.fn.0.weight_orig"].numpy().transpose(2, 1, 0))
    np.testing.assert_array_equal(spectral["heads_0"]["logits"]["v"],
                                  heads["heads.0.2.weight_v"].numpy())
    del heads["heads.1.0.1.bias"]
    with pytest.raises(ConversionError, match=r"heads\.1\.0\.1\.bias"):
        conv.convert_heads(heads, model)


def test_trainer_trains_the_heads_and_keeps_the_trunk(tmp_path):
    """The tokenizer trainer with discriminator.name="dino": the trunk comes from the official
    file and stays bit-identical (no update, no Adam state), the heads train from start_step,
    the spectral vectors advance, DiffAugment runs on both inputs, the losses are finite. The
    trunk scans its blocks, as the b_l_dino_disc recipe does."""
    import importlib.util
    import json
    import os

    import flax.traverse_util as tu
    from conftest import REPO
    from tok1d.train import tokenizer

    path = str(tmp_path / "dino_trunk.npz")
    np.savez(path, **{k: v.numpy() for k, v in official_trunk_state_dict(seed=3).items()})
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs",
                                                                      "tiny_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.total_steps, config.log_every_steps = 4, 1
    config.checkpoint.update(every_steps=1000, async_save=False)
    config.losses.gan = 0.5
    d = config.discriminator
    d.update(name="dino", weights=path, start_step=2, diffaug_prob=1.0, d_weight=0.5,
             global_schedule=True, model=dict(TINY, scan=True, scan_heads=True))  # as the recipe
    config.disc_optim.update(freeze="trunk", decay_mask="all", lr=1e-3)
    config.phase_programs = False  # one program with the GAN switch traced (the option's run)
    workdir = str(tmp_path / "run")
    tokenizer.train_and_evaluate(config, workdir)

    state = loaders.load_training_state(workdir)
    model = dd.DinoDiscriminator(**TINY, scan=True, scan_heads=True)
    want = tu.flatten_dict(conv.convert_file(path, model))
    assert ("blocks", "mlp", "fc1", "kernel") in want  # the blocks stacked
    got = tu.flatten_dict(state["extras"]["gan"]["params"]["trunk"])
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    heads = tu.flatten_dict({k: v for k, v in state["extras"]["gan"]["params"].items() if k != "trunk"})
    assert {k[0] for k in heads} == {dd.HEADS}  # the heads stacked
    moments = [x for x in jax.tree.leaves(state["extras"]["gan"]["opt_state"]) if np.ndim(x) > 0]
    assert len(moments) == 2 * len(heads)  # Adam state for the heads only
    counts = [int(x) for x in jax.tree.leaves(state["extras"]["gan"]["opt_state"])
              if np.asarray(x).dtype == np.int32 and np.ndim(x) == 0]
    assert counts and set(counts) == {2}  # D updated at steps 3 and 4 only
    assert set(state["extras"]["gan"]["collections"]) == {dd.SPECTRAL}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"train/loss"' in line]
    assert [r["train/gan_active"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all(np.isfinite(r["train/d_loss"]) and np.isfinite(r["train/loss_gan"])
               for r in rows)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_image_grad(model, variables, images):
    """d mean(logits^2) / d images, (logits, advanced spectral state): one train-mode call."""
    def loss(x):
        logits, upd = model.apply(variables, x, rngs={"crop": jax.random.key(3)}, train=True,
                                  mutable=[dd.SPECTRAL])
        return jnp.mean(jnp.square(logits)), (logits, upd)
    return jax.grad(loss, has_aux=True)(images)


def test_scanned_heads_equal_the_unrolled_ones(tiny):
    """`scan_heads=True` (the b_l_dino_disc recipe): the heads' params and spectral state are
    the unrolled ones stacked (init, the converter, and `merge_checked` both ways), and the
    logits, the advanced spectral state and the image gradients equal the unrolled heads'."""
    sd, model, variables = tiny
    scanned = model.clone(scan_heads=True)
    s_vars = dd.init_variables(scanned, jax.random.key(1), variables["params"][dd.TRUNK])
    n = len(model.taps) + 1
    for col in ("params", dd.SPECTRAL):
        assert set(s_vars[col]) - {dd.TRUNK} == {dd.HEADS}
        for t in range(n):
            jax.tree.map(np.testing.assert_array_equal,
                         jax.tree.map(lambda x, t=t: x[t], s_vars[col][dd.HEADS]),
                         variables[col][f"heads_{t}"])
    abstract = jax.eval_shape(lambda k: scanned.init({"params": k, "crop": k}, _images(0, 40)),
                              jax.random.key(0))
    assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(s_vars)

    g_want, (l_want, u_want) = _loss_and_image_grad(model, variables, _images(5, 40))
    g_got, (l_got, u_got) = _loss_and_image_grad(scanned, s_vars, _images(5, 40))
    np.testing.assert_allclose(l_got, l_want, rtol=1e-5, atol=1e-6)
    for t in range(n):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     jax.tree.map(lambda x, t=t: x[t], u_got[dd.SPECTRAL][dd.HEADS]),
                     u_want[dd.SPECTRAL][f"heads_{t}"])
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-6)

    heads = torch_heads(3, D, 3).state_dict()
    p_unrolled, s_unrolled = conv.convert_heads(heads, model)
    p_stacked, s_stacked = conv.convert_heads(heads, scanned)
    for stacked, unrolled in ((p_stacked, p_unrolled), (s_stacked, s_unrolled)):
        shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        jax.tree.map(np.testing.assert_array_equal, stacked,
                     loaders.merge_checked(shapes(stacked), unrolled, "heads", "stacked"))
        jax.tree.map(np.testing.assert_array_equal, unrolled,
                     loaders.merge_checked(shapes(unrolled), stacked, "heads", "unrolled"))


def test_scanned_trunk_equals_the_unrolled_one(tiny):
    """`scan=True` (the b_l_dino_disc recipe): the converter stacks the trunk's blocks, and the
    logits, the advanced spectral state and the image gradients equal the unrolled trunk's."""
    sd, model, variables = tiny
    scanned = model.clone(scan=True)
    trunk = conv.convert_trunk(sd, scanned)
    assert trunk["blocks"]["attn"]["key"]["bias"].shape[0] == model.depth
    s_vars = {**variables, "params": {**variables["params"], dd.TRUNK: trunk}}
    images = _images(5, 40)
    g_want, (l_want, u_want) = _loss_and_image_grad(model, variables, images)
    g_got, (l_got, u_got) = _loss_and_image_grad(scanned, s_vars, images)
    np.testing.assert_allclose(l_got, l_want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 u_got, u_want)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-6)
