"""FID InceptionV3 (pytorch-fid 0.3.0) in Flax: golden fixtures, resize, converter and CLI.

Always on (with ../shared/fixtures): every Mixed block (FID A, B, FID C, D, FID E_1 / E_2) and
the stem against the official outputs of `inception_fid_blocks.npz`, the 299-px bilinear resize,
the converter CLI round trip and its refusal of wrong weight files. The resize is also checked
against an independent NumPy transcription of PyTorch's rule and, when torch imports, against
`torch.nn.functional.interpolate` itself. With `inception_fid.npz` in the fixture directory
(the complete network with random weights; not in the shared pack): full-network parity.
"""

import os
import re

import jax
import numpy as np
import pytest

from conftest import rel_err
from tok1d import models
from tok1d.weights import layout, loaders
from tok1d.weights.convert import inception as CI
from tok1d.cli.convert import main as convert_main
from tok1d.weights.convert.common import ConversionError
from tok1d.models.frozen import inception as I

BLOCKS_FILE = "inception_fid_blocks.npz"
FULL_FILE = "inception_fid.npz"


def nhwc(x):
    return np.transpose(np.asarray(x, np.float32), (0, 2, 3, 1))


def prefixed(z, prefix):
    return {k[len(prefix):]: z[k] for k in z if k.startswith(prefix)}


def _load(fixtures_dir, name, why):
    path = os.path.join(fixtures_dir, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found: {why}")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def blocks(fixtures_dir):
    return _load(fixtures_dir, BLOCKS_FILE, "the block-by-block FID Inception fixture is "
                 "part of the shared fixture pack")


@pytest.fixture(scope="module")
def model_and_random_params():
    return I.FIDInceptionV3(), I.random_params(seed=1)


@pytest.fixture(scope="module")
def forward():
    """One jitted forward of the full network (one compile per input shape)."""
    model = I.FIDInceptionV3(input_convention="pytorch_fid")  # the fixtures' (pytorch-fid's)
    return jax.jit(lambda params, images: model.apply({"params": params}, images))


# --------------------------------------------------------------------------- blocks

def _out_channels(sd, conv):
    return sd[f"{conv}.conv.weight"].shape[0]


# The blocks' own width arguments (FIDInceptionA's pool_features, FIDInceptionC's
# channels_7x7) are read from the stored weights.
BLOCK_CASES = {
    "A": ("mixed_a", lambda sd: I.InceptionA(pool_features=_out_channels(sd, "branch_pool")),
          "out"),
    "B": ("mixed_b", lambda sd: I.InceptionB(), "out"),
    "C": ("mixed_c", lambda sd: I.InceptionC(channels_7x7=_out_channels(sd, "branch7x7_1")),
          "out"),
    "D": ("mixed_d", lambda sd: I.InceptionD(), "out"),
    "E_1": ("mixed_e", lambda sd: I.InceptionE(pool="avg"), "out_E_1"),
    "E_2": ("mixed_e", lambda sd: I.InceptionE(pool="max"), "out_E_2"),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_mixed_block_matches_official(blocks, case):
    key, make, out = BLOCK_CASES[case]
    block = make(prefixed(blocks, f"{key}/sd/"))
    x = nhwc(blocks[f"{key}/in"])
    params = CI.convert_block(prefixed(blocks, f"{key}/sd/"), block, x.shape[-1], what=key)
    y = jax.jit(block.apply)({"params": params}, x)
    e = rel_err(y, nhwc(blocks[f"{key}/{out}"]))
    assert e <= 1e-4, (case, e)


def test_stem_matches_official(blocks):
    """`stem/sd` uses the wrapper's names (blocks.0.0 ...): they map to Conv2d_1a_3x3 ...;
    the converter fills just the five stem convolutions."""
    sd = prefixed(blocks, "stem/sd/")
    assert any(k.startswith("blocks.0.0.") for k in sd)
    stem = I.BLOCK_MODULES[0] + I.BLOCK_MODULES[1]
    params = CI.convert_inception(sd, what="stem", modules=stem)
    assert sorted(params) == sorted(stem)
    model = I.FIDInceptionV3(resize_input=False, input_convention="pytorch_fid")

    def run(m, images):
        b0 = m.block0(m.preprocess(images))
        return b0, m.block1(b0)

    b0, b1 = jax.jit(lambda p, x: model.apply({"params": p}, x, method=run))(
        params, nhwc(blocks["stem/in_images01"]))
    e0 = rel_err(b0, nhwc(blocks["stem/out_block0"]))
    e1 = rel_err(b1, nhwc(blocks["stem/out_block1"]))
    assert e0 <= 1e-4 and e1 <= 1e-4, (e0, e1)


# --------------------------------------------------------------------------- resize

def resize_reference(x, out_h, out_w, torch_rounding=True):
    """Independent transcription of PyTorch's bilinear rule (align_corners=False), in
    float64: source coordinate (dst + 0.5) * in / out - 0.5 clamped at 0, neighbours floor(src)
    and min(floor(src) + 1, in - 1). With `torch_rounding` the scale in / out and the source
    coordinate are rounded to float32 as torch's kernel does (up to 6e-5 of the output for
    512-1024 px inputs; the mathematically exact coordinates are what `False` gives)."""
    x = np.asarray(x, np.float64)
    _, h, w, _ = x.shape

    def source(dst, size_in, size_out):
        if torch_rounding:
            scale = float(np.float32(size_in) / np.float32(size_out))
            src = float(np.float32(scale * (dst + 0.5) - 0.5))
        else:
            src = (dst + 0.5) * size_in / size_out - 0.5
        src = max(src, 0.0)
        i0 = int(np.floor(src))
        return i0, min(i0 + 1, size_in - 1), src - i0

    y0, y1, ly = map(np.array, zip(*(source(o, h, out_h) for o in range(out_h))))
    x0, x1, lx = map(np.array, zip(*(source(o, w, out_w) for o in range(out_w))))
    ly, lx = ly[None, :, None, None], lx[None, None, :, None]
    top = (1 - lx) * x[:, y0][:, :, x0] + lx * x[:, y0][:, :, x1]
    bottom = (1 - lx) * x[:, y1][:, :, x0] + lx * x[:, y1][:, :, x1]
    return (1 - ly) * top + ly * bottom


RESIZE_KEY = re.compile(r"resize/out_(\d+)_ch(\d+)_rows(\d+)to(\d+)$")


def test_resize_matches_official_fixture(blocks):
    """Every stored slice `resize/out_<size>_ch<c>_rows<first>to<last>` of the official resize."""
    x = nhwc(blocks["resize/in_images01"])
    slices = [(k, *map(int, m.groups())) for k in blocks for m in [RESIZE_KEY.match(k)] if m]
    assert slices
    errors = {}
    for key, size, channel, first, last in slices:
        r = np.asarray(I.resize_bilinear(x, size))
        assert r.shape == (x.shape[0], size, size, x.shape[-1]) and r.dtype == np.float32
        errors[key] = rel_err(r[:, first:last + 1, :, channel:channel + 1], nhwc(blocks[key]))
    assert all(e <= 1e-6 for e in errors.values()), errors


@pytest.mark.parametrize("in_hw", [(512, 400), (300, 301), (37, 53)])
def test_resize_vs_numpy_and_torch(in_hw):
    """Down- and upsampling (no antialiasing) against the NumPy transcription; against
    torch.nn.functional.interpolate too when torch is importable."""
    rng = np.random.default_rng(sum(in_hw))
    x = rng.uniform(size=(1, *in_hw, 2)).astype(np.float32)
    got = np.asarray(I.resize_bilinear(x, 299))
    e = rel_err(got, resize_reference(x, 299, 299))
    assert e <= 1e-6, e
    e = rel_err(got, resize_reference(x, 299, 299, torch_rounding=False))
    assert e <= 1e-4, e  # only the float32 source coordinates differ
    try:
        import torch
    except ImportError:
        return
    want = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(
        x.transpose(0, 3, 1, 2))), size=(299, 299), mode="bilinear", align_corners=False)
    e = rel_err(got, nhwc(want.numpy()))
    assert e <= 1e-6, e


def test_tf1_input_convention_resizes_and_scales_like_the_tf_graph():
    """input_convention="tf1": TF1's resize_bilinear (src = dst * in / out, no half-pixel
    centres; what ADM's evaluator and torch-fidelity feed the Inception) of the 0-255 values,
    then (x - 128) / 128; "pytorch_fid" (pytorch-fid's) differs."""
    x = np.array([0.0, 10.0], np.float32).reshape(1, 1, 2, 1).repeat(2, axis=1)
    tf1 = np.asarray(I.resize_bilinear(x, 4, half_pixel=False))[0, 0, :, 0]
    np.testing.assert_allclose(tf1, [0.0, 5.0, 10.0, 10.0])
    torch_like = np.asarray(I.resize_bilinear(x, 4))[0, 0, :, 0]
    np.testing.assert_allclose(torch_like, [0.0, 2.5, 7.5, 10.0])
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(1, 37, 53, 3)).astype(np.float32)
    # TF1's rule written out: rows then columns of the 0-255 image (separable, linear).
    def taps(n_in, n_out):
        src = np.arange(n_out) * (n_in / n_out)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), i0] += 1 - (src - i0)
        m[np.arange(n_out), i1] += src - i0
        return m
    want = np.einsum("yh,bhwc,xw->byxc", taps(37, 75), img * 255.0, taps(53, 75))
    got = I.FIDInceptionV3(input_size=75, input_convention="tf1").apply(
        {}, img, method=I.FIDInceptionV3.preprocess)
    np.testing.assert_allclose(np.asarray(got), (want - 128.0) / 128.0, atol=2e-5)
    edges = I.FIDInceptionV3(resize_input=False, input_convention="tf1").apply(
        {}, np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1),
        method=I.FIDInceptionV3.preprocess)
    np.testing.assert_allclose(np.asarray(edges).ravel(), [-1.0, 127.0 / 128.0])
    assert I.FIDInceptionV3().input_convention == "tf1"  # as config.evaluation.inception_input
    with pytest.raises(ValueError, match="input_convention='tf2'"):
        I.FIDInceptionV3(input_convention="tf2").apply({}, img, method=I.FIDInceptionV3.preprocess)


# --------------------------------------------------------------------------- full network

def test_full_network_matches_official_fixture(fixtures_dir, forward):
    z = _load(fixtures_dir, FULL_FILE, "the complete 23.9M-parameter network is not in the "
              "shared pack (see its README); point TOK1D_FIXTURES at a directory holding it")
    params = CI.convert_inception(prefixed(z, "sd/"), what=FULL_FILE)
    images = nhwc(z["input/images01"])
    out = forward(params, images)
    errors = {
        "resize": rel_err(I.resize_bilinear(images[:1], 299), nhwc(z["out/resized299_img0"])),
        "block0": rel_err(out["block0"][:1], nhwc(z["out/block0_maxpool1_img0"])),
        "block1": rel_err(out["block1"][:1], nhwc(z["out/block1_maxpool2_img0"])),
        "block2": rel_err(out["block2"][:1], nhwc(z["out/block2_mixed6e_img0"])),
        "block2_mean": rel_err(np.mean(np.asarray(out["block2"]), axis=(1, 2)),
                               z["out/block2_mixed6e_channel_mean"]),
        "pool3": rel_err(out["pool3"], z["out/pool3"].reshape(len(images), -1)),
        "fc_logits": rel_err(out["logits"], z["out/fc_logits"]),
    }
    bounds = dict(resize=2e-5, block0=2e-5, block1=2e-5, block2=1e-3, block2_mean=1e-3,
                  pool3=1e-3, fc_logits=1e-3)
    bad = {k: v for k, v in errors.items() if v > bounds[k]}
    assert not bad, errors


# --------------------------------------------------------------------------- converter

def _save_state_dict(sd, path_stem):
    """torch.save when torch imports (the real file's format), else .npz."""
    try:
        import torch
    except ImportError:
        path = f"{path_stem}.npz"
        np.savez(path, **sd)
        return path
    path = f"{path_stem}.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return path


def test_cli_roundtrip_random_weights(model_and_random_params, forward, tmp_path):
    model, params = model_and_random_params
    sd = CI.to_state_dict(params)
    assert len(sd) == 566 and sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    path = _save_state_dict(sd, str(tmp_path / "pt_inception-2015-12-05-6726825d"))
    out = tmp_path / "inception_fid"
    assert convert_main(["inception_fid", "--checkpoint", path, "--out", str(out)]) == 0
    loaded_model, loaded = loaders.load_inception(str(out))
    assert isinstance(loaded_model, I.FIDInceptionV3) and loaded_model.resize_input
    assert layout.read_model_spec(str(out))["name"] == "inception_fid"
    direct = CI.convert_inception(sd)
    flat_direct = jax.tree_util.tree_leaves_with_path(direct)
    flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
    flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(flat_direct) == len(flat_loaded) == len(flat_params)
    for path_, value in flat_direct:
        np.testing.assert_array_equal(flat_loaded[path_], value)
        np.testing.assert_array_equal(flat_params[path_], value)  # exact inverse mapping
    assert isinstance(models.create("inception_fid", resize_input=False), I.FIDInceptionV3)

    # Random weights give finite, image-dependent outputs of the documented shapes.
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 64, 48, 3)).astype(np.float32)
    result = forward(loaded, images)
    shapes = {k: tuple(v.shape) for k, v in result.items()}
    assert shapes == {"block0": (2, 73, 73, 64), "block1": (2, 35, 35, 192),
                      "block2": (2, 17, 17, 768), "pool3": (2, 2048), "logits": (2, 1008),
                      "logits_unbiased": (2, 1008), "spatial": (2, 17 * 17 * 7)}
    np.testing.assert_allclose(result["logits"] - loaded["fc"]["bias"],
                               result["logits_unbiased"], atol=1e-4)
    pool3 = np.asarray(result["pool3"])
    assert result["pool3"].dtype == np.float32 and result["logits"].dtype == np.float32
    assert np.all(np.isfinite(pool3)) and np.all(np.isfinite(np.asarray(result["logits"])))
    assert np.max(pool3) > 0
    assert np.max(np.abs(pool3[0] - pool3[1])) > 1e-3 * np.max(np.abs(pool3))


def test_wrong_weight_files_are_refused(model_and_random_params, tmp_path, capsys):
    _, params = model_and_random_params
    good = CI.to_state_dict(params)

    # torchvision's ImageNet classifier: AuxLogits.* and a 1000-way fc.
    torchvision_like = dict(good)
    torchvision_like["fc.weight"] = np.zeros((1000, 2048), np.float32)
    torchvision_like["fc.bias"] = np.zeros((1000,), np.float32)
    torchvision_like["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    torchvision_like["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    path = _save_state_dict(torchvision_like, str(tmp_path / "inception_v3_google-0cc3c7bd"))
    out = tmp_path / "out_tv"
    assert convert_main(["inception_fid", "--checkpoint", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for needle in ("torchvision", "AuxLogits", "not the FID Inception",
                   "pt_inception-2015-12-05-6726825d.pth", "github.com/mseitzer/pytorch-fid"):
        assert needle in err, (needle, err)
    assert not out.exists()

    # Truncated: a whole block and one statistic missing, one shape wrong; all are listed.
    truncated = {k: v for k, v in good.items() if not k.startswith("Mixed_6c.")}
    del truncated["Mixed_7b.branch_pool.bn.running_var"]
    truncated["fc.bias"] = np.zeros((10,), np.float32)
    with pytest.raises(ConversionError) as e:
        CI.convert_inception(truncated, what="truncated.pth")
    msg = str(e.value)
    for needle in ("truncated.pth does not match", "missing in the checkpoint",
                   "Mixed_6c.branch1x1.conv.weight", "Mixed_7b.branch_pool.bn.running_var",
                   "fc/bias: model expects (1008,)"):
        assert needle in msg, (needle, msg)
    path = _save_state_dict(truncated, str(tmp_path / "truncated"))
    assert convert_main(["inception_fid", "--checkpoint", path,
                         "--out", str(tmp_path / "out_trunc")]) == 2
    assert "Mixed_6c.branch1x1.conv.weight" in capsys.readouterr().err
    assert not (tmp_path / "out_trunc").exists()

    # Extra keys are reported as unexpected.
    extra = dict(good, **{"Mixed_8a.conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected in the checkpoint \(1\): "
                       r"Mixed_8a\.conv\.weight"):
        CI.convert_inception(extra)

    # An unrelated network.
    vgg = {"features.0.weight": np.zeros((64, 3, 3, 3), np.float32),
           "features.0.bias": np.zeros((64,), np.float32)}
    path = _save_state_dict(vgg, str(tmp_path / "vgg16"))
    assert convert_main(["inception_fid", "--checkpoint", path,
                         "--out", str(tmp_path / "out_vgg")]) == 2
    err = capsys.readouterr().err
    assert "not an Inception-v3 state dict" in err and "features.0.weight" in err
    assert not (tmp_path / "out_vgg").exists()


def test_load_inception_without_weights_says_how(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        loaders.load_inception(str(tmp_path / "nothing_here"))
    msg = str(e.value)
    for needle in ("pt_inception-2015-12-05-6726825d.pth", I.FID_WEIGHTS_URL,
                   "tok1d convert inception_fid"):
        assert needle in msg, (needle, msg)
