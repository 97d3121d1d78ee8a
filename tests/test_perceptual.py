"""Perceptual losses (LPIPS-VGG16, ConvNeXt-S logits) and their converters.

Always on: the official LPIPS head fixture, the converter CLI round trip, shapes / zero loss /
finite gradients with random weights, the missing-weights error. With torch + torchvision (and
`lpips`) importable: parity of the VGG16 trunk, ConvNeXt-S logits, the full LPIPS and the
ConvNeXt resize + normalise path against the official modules with random weights.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.cli import convert as convert_cli
from tok1d.models.frozen import perceptual as N
from tok1d.models.frozen.convnext import ConvNeXt
from tok1d.objectives import perceptual as P
from tok1d.weights import loaders as L
from tok1d.weights import perceptual as PW
from tok1d.weights.convert import perceptual as CP
from tok1d.weights.convert.common import ConversionError
from tok1d.models.frozen.vgg import TAP_NAMES, TORCHVISION_INDEX, VGG16Features


# conftest compiles everything at -O0 (fast compiles); these CNN forward/backward passes are
# 5-10x slower to run that way than they are to compile optimised.
cnn_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 2, "xla_llvm_disable_expensive_passes": False})


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x, np.float32), (0, 2, 3, 1))


def fake_vgg16_state_dict(seed=0):
    """torchvision-layout vgg16 state_dict with random values (features + classifier)."""
    rng = np.random.default_rng(seed)
    sd, cin = {}, 3
    for name, index in TORCHVISION_INDEX.items():
        cout = {"1": 64, "2": 128, "3": 256, "4": 512, "5": 512}[name[4]]
        sd[f"features.{index}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) *
                                          np.sqrt(2 / (9 * cin))).astype(np.float32)
        sd[f"features.{index}.bias"] = (0.05 * rng.standard_normal(cout)).astype(np.float32)
        cin = cout
    sd["classifier.0.weight"] = np.zeros((8, 8), np.float32)  # ignored by the converter
    sd["classifier.0.bias"] = np.zeros((8,), np.float32)
    return sd


@pytest.fixture(scope="module")
def lpips_fixture(fixtures_dir):
    path = os.path.join(fixtures_dir, "lpips_head.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- always on

def test_lpips_head_matches_official_fixture(lpips_fixture):
    z = lpips_fixture
    lins = {k[3:]: v for k, v in z.items() if k.startswith("sd/")}
    params = CP.convert_lpips(fake_vgg16_state_dict(), lins)  # also checks aliases/ScalingLayer
    layers = len(TAP_NAMES)  # the VGG16 taps; the file holds one distance per tap
    assert {k for k in z if k.startswith("out/per_layer_")} == {
        f"out/per_layer_{k}" for k in range(layers)}
    for k in range(layers):
        np.testing.assert_array_equal(params["head"][f"lin{k}"],
                                      z[f"sd/lin{k}.model.1.weight"].reshape(-1))
    scaled = N.lpips_scaling(nchw_to_nhwc(z["input/in0"]))
    assert rel_err(scaled, nchw_to_nhwc(z["out/scaling_layer_in0"])) < 1e-6
    feats = [[jnp.asarray(nchw_to_nhwc(z[f"input/feat{i}_{t}"])) for t in TAP_NAMES]
             for i in (0, 1)]
    per_layer = N.LPIPSHead().apply({"params": params["head"]}, *feats)
    assert per_layer.shape == (z["input/in0"].shape[0], layers)
    for k in range(layers):
        e = rel_err(per_layer[:, k], z[f"out/per_layer_{k}"].reshape(-1))
        assert e < 1e-4, (k, e)
    e = rel_err(per_layer.sum(-1), z["out/lpips"].reshape(-1))
    assert e < 1e-4, e


def test_full_lpips_matches_official_fixture(fixtures_dir):
    """`lpips.npz` (complete LPIPS-VGG with a random trunk; other fixture directories may hold
    it): the converted network gives the official per-layer distances and LPIPS."""
    path = os.path.join(fixtures_dir, "lpips.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found (the complete-LPIPS fixture is not in this pack)")
    with np.load(path) as z:
        z = {k: z[k] for k in z.files}
    sd = {k[3:]: v.astype(np.float32) if v.dtype == np.float16 else v
          for k, v in z.items() if k.startswith("sd/")}
    params = CP.convert_lpips(None, sd)
    x0, x1 = ((nchw_to_nhwc(z[f"input/in{i}"]) + 1.0) / 2.0 for i in (0, 1))  # [-1,1] -> [0,1]
    model = N.LPIPS()
    got = cnn_jit(lambda p, a, b: model.apply({"params": p}, a, b))(params, x0, x1)
    assert rel_err(got, z["out/lpips"].reshape(-1)) < 1e-4


def test_lpips_converter_cli_roundtrip_and_errors(lpips_fixture, tmp_path):
    vgg = fake_vgg16_state_dict(1)
    lins = {k[3:]: v for k, v in lpips_fixture.items() if k.startswith("sd/lin")}
    np.savez(tmp_path / "vgg16.npz", **vgg)
    np.savez(tmp_path / "vgg.npz", **lins)
    out = tmp_path / "weights"
    assert convert_cli.main(["lpips", "--vgg", str(tmp_path / "vgg16.npz"),
                             "--checkpoint", str(tmp_path / "vgg.npz"), "--out", str(out)]) == 0
    meta = PW.read_meta(str(out / PW.WEIGHT_FILES["lpips"]))
    assert meta["component"] == "lpips" and len(meta["sources"]) == 2
    loss = P.make_perceptual("lpips", L.load_perceptual(("lpips",), str(out)))
    np.testing.assert_array_equal(loss.params["lpips"]["net"]["conv3_2"]["kernel"],
                                  vgg["features.12.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loss.params["lpips"]["net"]["conv5_3"]["bias"],
                                  vgg["features.28.bias"])
    # The combined kind needs the ConvNeXt file too: the error names it and the command.
    with pytest.raises(PW.MissingPerceptualWeights, match="convnext_small-0c510722.pth"):
        L.load_perceptual(P.parse_kind("lpips+convnext_s"), str(out))
    # Converter errors list the problems.
    broken = dict(vgg)
    del broken["features.5.weight"]
    broken["features.99.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"features\.5\.weight.*\n.*features\.99\.weight"):
        CP.convert_lpips(broken, lins)
    with pytest.raises(ConversionError, match="no VGG16 trunk"):
        CP.convert_lpips(None, lins)


def test_missing_weights_error_says_what_and_how():
    with pytest.raises(PW.MissingPerceptualWeights) as e:
        L.load_perceptual(P.parse_kind("lpips+convnext_s"), None)
    msg = str(e.value)
    for needle in ("vgg16-397923af.pth", "lpips/weights/v0.1/vgg.pth",
                   "convnext_small-0c510722.pth", "tok1d convert lpips",
                   "tok1d convert convnext_s"):
        assert needle in msg, needle
    with pytest.raises(ValueError, match="Unknown perceptual loss kind"):
        P.make_perceptual("vgg", {})
    assert P.parse_kind("lpips+convnext_s") == {"lpips": 1.0, "convnext_s": 0.1}
    assert P.parse_kind("lpips-convnext_s-1.0-0.1") == {"lpips": 1.0, "convnext_s": 0.1}


@pytest.mark.parametrize("channels", [(), (8, 16, 32, 32, 32)])
def test_lpips_random_init_shapes_zero_and_gradients(channels):
    """The released network's shapes, or a narrow random stand-in's (`lpips_channels`)."""
    loss = P.make_perceptual("lpips", L.load_perceptual(
        ("lpips",), None, allow_random_init=True, lpips_channels=channels))
    widths = channels or (64, 128, 256, 512, 512)
    assert set(loss.params) == {"lpips"}
    shapes = jax.tree.map(jnp.shape, loss.params["lpips"])
    assert shapes["net"]["conv1_1"]["kernel"] == (3, 3, 3, widths[0])
    assert shapes["net"]["conv4_3"]["kernel"] == (3, 3, widths[3], widths[3])
    assert shapes["head"]["lin4"] == (widths[4],)
    assert tuple(loss.logical_axes["lpips"]["net"]["conv2_1"]["kernel"]) == (
        "conv_h", "conv_w", "conv_in", "conv_out")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    y = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    # Pairs: different images, identical images, identical all-black images. (Identical
    # images give 0 up to float rounding: XLA may round the two trunk calls differently.)
    recon = jnp.asarray(np.stack([x[0], x[1], np.zeros_like(x[0])]))
    target = jnp.asarray(np.stack([y[0], x[1], np.zeros_like(x[0])]))
    per_image = cnn_jit(N.build_module("lpips", lpips_channels=channels).apply)(
        {"params": loss.params["lpips"]}, recon, target)
    assert per_image.shape == (3,) and float(per_image[0]) > 0
    assert abs(float(per_image[1])) < 1e-12 and abs(float(per_image[2])) < 1e-12
    value, grad = cnn_jit(jax.value_and_grad(loss.apply, argnums=1))(loss.params, recon, target)
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), float(per_image.mean()), rtol=1e-6)
    assert grad.shape == recon.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad[0]))) > 0
    # No gradient reaches the frozen params.
    gp = cnn_jit(jax.grad(loss.apply))(loss.params, recon, target)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(gp))
    # Channel normalisation: the official value, and a finite gradient where a tap is all 0
    # (the official f / (sqrt(sum f^2) + eps) has gradient NaN there).
    f = jnp.asarray(np.stack([np.zeros(8), rng.standard_normal(8)]), jnp.float32)
    naive = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
    np.testing.assert_array_equal(N.unit_normalize(f), naive)
    g = jax.grad(lambda t: jnp.sum(jnp.square(N.unit_normalize(t) - 0.3)))(f)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g[0]))) > 0


def test_convnext_and_combined_random_init():
    loss = P.make_perceptual("lpips+convnext_s", L.load_perceptual(
        ("lpips", "convnext_s"), None, allow_random_init=True), image_size=32)
    assert loss.component_weights == {"lpips": 1.0, "convnext_s": 0.1}
    shapes = jax.tree.map(jnp.shape, loss.params["convnext_s"])
    assert shapes["stem_conv"]["kernel"] == (4, 4, 3, 96)
    assert shapes["stage2"]["fc1"]["kernel"] == (27, 384, 1536)
    assert shapes["stage3"]["dwconv"]["kernel"] == (3, 7, 7, 1, 768)
    assert shapes["head"]["kernel"] == (768, 1000)
    n = sum(int(np.size(v)) for v in jax.tree.leaves(loss.params["convnext_s"]))
    assert n == 50_223_688  # torchvision convnext_small
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=(1, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(1, 16, 16, 3)), jnp.float32)
    # ConvNeXt part: finite, non-zero gradient w.r.t. recon (tiny sizes: plain -O0 jit).
    module = N.build_module("convnext_s")
    convnext = functools.partial(P.component_loss, "convnext_s", module, image_size=32)
    value, grad = jax.jit(jax.value_and_grad(convnext, argnums=1))(
        loss.params["convnext_s"], x, y)
    assert value.shape == () and float(value) > 0
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0
    # Combined kind = (1.0 * LPIPS + 0.1 * ConvNeXt) / 1.1; 0 for identical images.
    lpips = functools.partial(P.component_loss, "lpips", N.build_module("lpips"))
    lpips_value = jax.jit(lpips)(loss.params["lpips"], x, y)
    want = (1.0 * float(lpips_value) + 0.1 * float(value)) / 1.1
    combined = jax.jit(loss.apply)
    np.testing.assert_allclose(float(combined(loss.params, x, y)), want, rtol=1e-5)
    assert abs(float(combined(loss.params, x, x))) < 1e-12


# --------------------------------------------------------------------------- vs PyTorch

def _perturb_(model, torch, seed=0):
    """Official inits leave biases 0 and norm scales 1 (hiding converter errors): perturb every
    1-D parameter (and ConvNeXt layer scales) like the golden fixtures do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(0.3 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _vgg16_features(torch, tv):
    """torchvision's vgg16().features (same builder, without the 120M-parameter classifier,
    whose init alone takes seconds)."""
    from torchvision.models.vgg import cfgs, make_layers
    return make_layers(cfgs["D"]).eval()


def test_vgg16_trunk_matches_torchvision():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    features = _vgg16_features(torch, tv)
    _perturb_(features, torch)
    sd = {f"features.{k}": v.numpy() for k, v in features.state_dict().items()}
    lins = {f"lin{k}.model.1.weight": np.ones((1, c, 1, 1), np.float32)
            for k, c in enumerate((64, 128, 256, 512, 512))}
    params = CP.convert_lpips(sd, lins)
    x = np.random.default_rng(2).standard_normal((2, 3, 40, 40)).astype(np.float32)
    want, h = [], torch.from_numpy(x)
    with torch.no_grad():
        for i, layer in enumerate(features[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                want.append(h.numpy())
    got = cnn_jit(VGG16Features().apply)({"params": params["net"]}, nchw_to_nhwc(x))
    for name, g, w in zip(TAP_NAMES, got, want):
        assert g.shape == nchw_to_nhwc(w).shape
        e = rel_err(g, nchw_to_nhwc(w))
        assert e < 1e-4, (name, e)


def test_lpips_matches_lpips_package(monkeypatch):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    lpips = pytest.importorskip("lpips")
    import lpips.pretrained_networks as pn

    class _Vgg16:  # what lpips takes from tv.vgg16(pretrained=False): its `.features`
        def __init__(self, **_):
            self.features = _vgg16_features(torch, tv)

    monkeypatch.setattr(pn.tv, "vgg16", _Vgg16)
    torch.manual_seed(0)
    # Official linear layers from the wheel, random VGG16 trunk (pnet_rand: no download).
    ref = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    _perturb_(ref.net, torch)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = CP.convert_lpips(None, sd)  # trunk from net.slice*, lins + lins.* + ScalingLayer
    wheel = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    official = torch.load(wheel, map_location="cpu", weights_only=True)
    for k in range(5):
        np.testing.assert_array_equal(params["head"][f"lin{k}"],
                                      official[f"lin{k}.model.1.weight"].numpy().reshape(-1))
    rng = np.random.default_rng(3)
    x0 = rng.uniform(size=(3, 3, 48, 48)).astype(np.float32)
    x1 = np.clip(x0 + 0.2 * rng.standard_normal(x0.shape), 0, 1).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x0), torch.from_numpy(x1), normalize=True).numpy().reshape(-1)
    module = N.LPIPS()
    got = cnn_jit(module.apply)({"params": params}, nchw_to_nhwc(x0), nchw_to_nhwc(x1))
    e = rel_err(got, want)
    assert e < 1e-4, e
    loss = P.component_loss("lpips", module, params, jnp.asarray(nchw_to_nhwc(x0)),
                            jnp.asarray(nchw_to_nhwc(x1)))
    np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-4)


def test_convnext_small_logits_and_loss_match_torchvision(monkeypatch):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    F = torch.nn.functional
    torch.manual_seed(0)
    # trunc_normal_(std=0.02) of 50M weights takes seconds; a plain normal is as good here.
    def normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0):
        with torch.no_grad():
            return t.normal_(mean, std)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", normal_)
    ref = tv.models.convnext_small().eval()
    _perturb_(ref, torch)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = CP.convert_convnext(sd)
    module = N.convnext_small()
    rng = np.random.default_rng(4)
    # Logits on a small input straight into the network.
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = jax.jit(module.apply)({"params": params}, nchw_to_nhwc(x))
    assert got.shape == (2, 1000) and got.dtype == jnp.float32
    e_logits = rel_err(got, want)
    assert e_logits < 1e-4, e_logits
    # Unscanned layout from the same state_dict holds the same numbers.
    flat = CP.convert_convnext(sd, model=ConvNeXt(scan=False))
    np.testing.assert_array_equal(flat["stage2_block26"]["fc2"]["kernel"],
                                  params["stage2"]["fc2"]["kernel"][26])
    # The whole TiTok ConvNeXt loss: antialiased bilinear resize (to 64 here instead of 224, to
    # keep the test fast; 224 is a parameter), ImageNet mean/std, MSE of the logits.
    size = 64
    recon = rng.uniform(size=(1, 3, 96, 96)).astype(np.float32)
    target = rng.uniform(size=(1, 3, 96, 96)).astype(np.float32)
    mean = torch.tensor(P.IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(P.IMAGENET_STD)[None, :, None, None]
    with torch.no_grad():
        prep = [(F.interpolate(torch.from_numpy(t), size=size, mode="bilinear",
                               align_corners=False, antialias=True) - mean) / std
                for t in (recon, target)]
        want_loss = F.mse_loss(ref(prep[0]), ref(prep[1]), reduction="mean").item()
    got_loss = jax.jit(lambda p, a, b: P.component_loss("convnext_s", module, p, a, b, size))(
        params, nchw_to_nhwc(recon), nchw_to_nhwc(target))
    np.testing.assert_allclose(float(got_loss), want_loss, rtol=1e-4)


@pytest.mark.parametrize("size", [256, 96, 224])
def test_imagenet_preprocess_matches_torch_interpolate(size):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(size).uniform(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        y = F.interpolate(torch.from_numpy(x), size=224, mode="bilinear", align_corners=False,
                          antialias=True)
        want = ((y - torch.tensor(P.IMAGENET_MEAN)[None, :, None, None])
                / torch.tensor(P.IMAGENET_STD)[None, :, None, None]).numpy()
    got = P.imagenet_preprocess(jnp.asarray(nchw_to_nhwc(x)))
    assert got.shape == (2, 224, 224, 3)
    e = rel_err(got, nchw_to_nhwc(want))
    assert e < 1e-5, e
