"""DINOv2 teacher: parity with the official code (golden fixture dinov2.npz), parameter counts of
the released sizes, resampling vs torch, converter errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.weights.convert import dinov2 as conv
from tok1d.weights.convert.common import ConversionError
from tok1d.models.frozen import dinov2 as dm

BOUND = 2e-5  # README §0: transformer outputs (f32-vs-f64 floor here 4e-7 .. 4.7e-6)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    path = os.path.join(fixtures_dir, "dinov2.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    sd = {k[3:]: v.astype(np.float32) for k, v in data.items() if k.startswith("sd/")}
    return data, sd, json.loads(str(data["meta_json"]))


def _one_key(z, prefix):
    """The single stored key starting with `prefix` (key names carry sizes, e.g. the grid)."""
    keys = [k for k in z if k.startswith(prefix)]
    assert len(keys) == 1, (prefix, keys)
    return keys[0]


def _grid(table):
    """Side of the square patch grid of a (1, 1 + g*g, D) position table."""
    g = int(round((table.shape[-2] - 1) ** 0.5))
    assert g * g == table.shape[-2] - 1, table.shape
    return g


def test_fixture_parity(fixture):
    z, sd, meta = fixture
    hub = meta["hub_kwargs"]
    images = jnp.asarray(z["input/images"].astype(np.float32).transpose(0, 2, 3, 1))
    teacher_size = z["out/preprocessed_img0"].shape[-1]
    pre = dm.preprocess_gigatok(images, teacher_size)
    errs = {"preprocessed_img0": rel_err(np.asarray(pre[:1]).transpose(0, 3, 1, 2),
                                        z["out/preprocessed_img0"])}

    # Official table with DINOv2's own on-the-fly interpolation (interpolate_offset).
    kw = dm.kwargs_from_fixture_meta(meta)
    assert kw == {**conv.kwargs_from_state_dict(sd, num_heads=meta["num_heads"]),
                  "num_register_tokens": hub["num_register_tokens"],
                  "interpolate_antialias": hub["interpolate_antialias"],
                  "interpolate_offset": hub["interpolate_offset"],
                  "norm_eps": meta.get("layer_norm_eps", 1e-6)}
    native = dm.DinoV2(**kw)
    params = conv.convert_dinov2(sd, native)
    out = jax.jit(native.apply)({"params": params}, pre)
    errs["native_x_norm_patchtokens"] = rel_err(out["patch_tokens"],
                                               z["out/native_x_norm_patchtokens"])
    errs["native_x_norm_clstoken"] = rel_err(out["cls"], z["out/native_x_norm_clstoken"])
    native_key = _one_key(z, "out/pos_embed_native_interp_")
    g = _grid(z[native_key])
    assert g == teacher_size // hub["patch_size"], (g, teacher_size)
    interp = dm.interpolate_pos_embed(jnp.asarray(params["pos_embed"]), g, g,
                                      hub["interpolate_offset"], hub["interpolate_antialias"])
    errs[native_key] = rel_err(interp[None], z[native_key])

    # GigaTok: table resampled once to the teacher's grid (timm, antialiased) at conversion time.
    resampled_key = _one_key(z, "out/pos_embed_resampled_")
    giga = dm.DinoV2(**conv.kwargs_from_state_dict(sd, num_heads=meta["num_heads"],
                                                   pos_grid=_grid(z[resampled_key])))
    gparams = conv.convert_dinov2(sd, giga)
    errs[resampled_key] = rel_err(gparams["pos_embed"][None], z[resampled_key])
    out = jax.jit(giga.apply)({"params": gparams}, pre)
    assert out["registers"].shape == (images.shape[0], hub["num_register_tokens"],
                                      meta["embed_dim"])
    errs["x_norm_patchtokens"] = rel_err(out["patch_tokens"], z["out/x_norm_patchtokens"])
    errs["x_norm_clstoken"] = rel_err(out["cls"], z["out/x_norm_clstoken"])
    errs["x_prenorm_img0"] = rel_err(out["prenorm"][:1], z["out/x_prenorm_img0"])
    for i in range(meta["depth"]):
        errs[f"blocks.{i}_img0"] = rel_err(out["hidden_states"][i][:1], z[f"hook/blocks.{i}_img0"])
    print(errs)
    bad = {k: v for k, v in errs.items() if not v < BOUND}
    assert not bad, bad


def _count(model):
    return sum(x.size for x in jax.tree.leaves(conv.abstract_params(model)))


@pytest.mark.parametrize("name,official", [
    # sum(p.numel()) of the official hub models, minus mask_token (D), which is not ported.
    ("vitb14", 86_580_480 - 768),
    ("vitg14", 1_136_480_768 - 1536),
])
def test_param_count(name, official):
    assert _count(dm.DinoV2(**dm.dinov2_kwargs(name))) == official


def test_bicubic_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 37, 30)).astype(np.float32)
    cases = [(dict(size=(16, 45), antialias=True), (16, 45), None, True),
             (dict(size=(16, 45), antialias=False), (16, 45), None, False),
             (dict(scale_factor=(16.1 / 37, 23.1 / 30)), (16, 23), (37 / 16.1, 30 / 23.1), False),
             (dict(scale_factor=(0.7, 1.3), antialias=True), (25, 39), (1 / 0.7, 1 / 1.3), True)]
    for kwargs, size, scales, aa in cases:
        ref = F.interpolate(torch.from_numpy(x), mode="bicubic", align_corners=False,
                            **kwargs).numpy()
        assert ref.shape[2:] == size
        s = scales or (None, None)
        mh = dm.bicubic_matrix(37, size[0], s[0], aa)
        mw = dm.bicubic_matrix(30, size[1], s[1], aa)
        port = np.einsum("oh,nchw,pw->ncop", mh, x.astype(np.float64), mw)
        assert rel_err(port, ref) < 1e-5, kwargs


def _tiny_sd(seed=0, d=32, depth=2):
    model = dm.DinoV2(embed_dim=d, depth=depth, num_heads=2)
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + 37 * 37, d), "mask_token": r(1, d),
          "patch_embed.proj.weight": r(d, 3, 14, 14), "patch_embed.proj.bias": r(d),
          "norm.weight": r(d), "norm.bias": r(d)}
    for i in range(depth):
        for n in ("norm1", "norm2"):
            sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"] = r(d), r(d)
        sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"] = r(3 * d, d), r(3 * d)
        sd[f"blocks.{i}.attn.proj.weight"], sd[f"blocks.{i}.attn.proj.bias"] = r(d, d), r(d)
        sd[f"blocks.{i}.mlp.fc1.weight"], sd[f"blocks.{i}.mlp.fc1.bias"] = r(4 * d, d), r(4 * d)
        sd[f"blocks.{i}.mlp.fc2.weight"], sd[f"blocks.{i}.mlp.fc2.bias"] = r(d, 4 * d), r(d)
        sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = r(d), r(d)
    return model, sd


def test_converter_errors():
    model, sd = _tiny_sd()
    assert conv.kwargs_from_state_dict(sd, num_heads=2)["depth"] == 2
    conv.convert_dinov2(sd, model)  # complete state_dict (mask_token is skipped) converts
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    bad["register_tokens"] = np.zeros((1, 4, 32), np.float32)
    bad["blocks.0.mlp.fc1.weight"] = np.zeros((96, 32), np.float32)
    with pytest.raises(ConversionError) as e:
        conv.convert_dinov2(bad, model)
    msg = str(e.value)
    assert "blocks.1.ls2.gamma" in msg and "register_tokens" in msg
    assert "blocks_0/mlp/fc1/kernel: model expects (32, 128)" in msg
    chunked = {k.replace("blocks.0.", "blocks.0.0."): v for k, v in sd.items()}
    with pytest.raises(ConversionError, match="block_chunks"):
        conv.convert_dinov2(chunked, model)
    with pytest.raises(ConversionError, match="num_heads"):
        conv.kwargs_from_state_dict({**sd, "cls_token": np.zeros((1, 1, 40), np.float32)})


def test_gigatok_teacher_from_the_official_file_or_a_converted_directory(tmp_path):
    """`teacher.weights` may be the official checkpoint or `python -m tok1d.cli.convert dinov2`
    output; both give the same params with the table resampled to the student's grid."""
    from conftest import REPO
    from tok1d.train import config_lib
    from tok1d.cli.convert import main as convert_main
    from tok1d.train import tokenizer

    _, sd = _tiny_sd(d=64, depth=1)  # 64 wide: one 64-dim head, as every released model
    path = str(tmp_path / "dinov2_tiny_pretrain.npz")
    np.savez(path, **sd)
    out = str(tmp_path / "dinov2_dir")
    assert convert_main(["dinov2", "--checkpoint", path, "--out", out, "--pos_grid", "8"]) == 0
    config = config_lib.load(os.path.join(REPO, "configs/gigatok.py:s_s"))
    config.data.image_size = 128  # GigaTok S-S at 128 px: an 8x8 decoder grid
    student = tokenizer.build_model(config)
    params = {}
    for weights in (path, out):
        config.teacher.weights = weights
        teacher, params[weights] = tokenizer.build_teacher(config, student)
        assert teacher.pos_grid == 8 and teacher.embed_dim == 64
        assert teacher.dtype == jnp.bfloat16  # the compute precision (official: fp16 autocast)
        assert teacher.scan and "blocks" in params[weights]  # the recipe scans the teacher
    assert params[path]["pos_embed"].shape == (1 + 64, 64)
    jax.tree.map(np.testing.assert_array_equal, params[path], params[out])


def test_scanned_blocks_equal_the_unrolled_ones():
    """`scan=True` (the GigaTok recipes' teacher): the converter stacks the official blocks under
    `blocks`, `loaders.merge_checked` moves between the layouts both ways, and the scanned model
    gives the unrolled one's outputs and hidden states."""
    import flax.linen as nn
    from tok1d.weights import loaders

    model, sd = _tiny_sd(depth=3)
    scanned = model.clone(scan=True)
    unrolled_p = conv.convert_dinov2(sd, model)
    scanned_p = conv.convert_dinov2(sd, scanned)
    assert sorted(k for k in scanned_p if k.startswith("blocks")) == ["blocks"]
    assert scanned_p["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 32, 128)
    relaid = lambda m, p: loaders.merge_checked(  # noqa: E731
        nn.unbox(conv.abstract_params(m)), p, "the weights", "the model")
    jax.tree.map(np.testing.assert_array_equal, relaid(scanned, unrolled_p), scanned_p)
    jax.tree.map(np.testing.assert_array_equal, relaid(model, scanned_p), unrolled_p)
    images = jax.random.normal(jax.random.key(0), (2, 28, 42, 3))
    run = jax.jit(lambda m, p, x: m.apply({"params": p}, x), static_argnums=0)
    want, got = run(model, unrolled_p, images), run(scanned, scanned_p, images)
    assert isinstance(got["hidden_states"], jax.Array) and got["hidden_states"].shape[0] == 3
    for key in ("cls", "patch_tokens", "prenorm", "embeddings"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for i in range(3):
        np.testing.assert_allclose(got["hidden_states"][i], want["hidden_states"][i],
                                   rtol=1e-5, atol=1e-5)
