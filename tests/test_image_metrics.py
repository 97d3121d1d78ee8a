"""SSIM against scikit-image on real photos; improved precision / recall against a brute-force
float64 NumPy reference, known cases, block-size independence and the ADM float16 path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tok1d.evaluation import precision_recall as pr
from tok1d.evaluation.image_metrics import psnr, ssim

# ---------------------------------------------------------------------------------------- SSIM


def _photos():
    """astronaut / chelsea / coffee as float64 in [0, 1]: 64x64 resized, plus 48x80 crops."""
    data = pytest.importorskip("skimage.data")
    from skimage.transform import resize
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    square = np.stack([resize(p, (64, 64), anti_aliasing=True) for p in photos])
    crops = np.stack([p[100:148, 120:200] / 255.0 for p in photos])
    return square, crops


def _skimage_ssim(recon, target, max_value):
    from skimage.metrics import structural_similarity
    return np.array([structural_similarity(
        r, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=max_value, channel_axis=-1) for r, t in zip(recon, target)])


def _distorted(target, rng):
    from scipy import ndimage
    noisy = np.clip(target + rng.normal(0.0, 0.08, target.shape), 0.0, 1.0)
    blurred = np.stack([ndimage.gaussian_filter(t, (1.2, 1.2, 0)) for t in target])
    shifted = np.clip(0.8 * target + 0.15, 0.0, 1.0)   # luminance / contrast change
    return {"noisy": noisy, "blurred": blurred, "shifted": shifted}


def test_ssim_matches_skimage_on_photos():
    rng = np.random.default_rng(0)
    ssim_jit = jax.jit(ssim, static_argnames="max_value")
    worst = 0.0
    for target in _photos():
        grey = target.mean(-1, keepdims=True)
        for name, recon in _distorted(target, rng).items():
            for r, t, scale in ((recon, target, 1.0), (recon.mean(-1, keepdims=True), grey, 1.0),
                                (recon * 255.0, target * 255.0, 255.0)):
                got = np.asarray(ssim_jit(jnp.asarray(r, jnp.float32), jnp.asarray(t, jnp.float32),
                                          max_value=scale))
                want = _skimage_ssim(r, t, scale)
                assert got.shape == (len(t),) and got.dtype == np.float32
                err = float(np.max(np.abs(got - want)))
                worst = max(worst, err)
                assert err <= 1e-5, (name, r.shape, scale, got, want)
    print(f"max |ssim - skimage| = {worst:.2e}")


def test_box_ssim_is_skimages_default():
    """window="box": scikit-image's `structural_similarity` with nothing but data_range set
    (7x7 uniform window, sample covariance), at data range 1 and GigaTok's 2.0."""
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(2)
    box = jax.jit(ssim, static_argnames=("window", "data_range"))
    for target in _photos():
        for name, recon in _distorted(target, rng).items():
            for data_range in (1.0, 2.0):
                got = np.asarray(box(jnp.asarray(recon, jnp.float32),
                                     jnp.asarray(target, jnp.float32), window="box",
                                     data_range=data_range))
                want = np.array([structural_similarity(r, t, data_range=data_range,
                                                       channel_axis=-1)
                                 for r, t in zip(recon, target)])
                assert np.max(np.abs(got - want)) <= 1e-5, (name, data_range, got, want)
    with pytest.raises(ValueError, match="at least 7x7 pixels"):
        ssim(jnp.zeros((1, 6, 9, 3)), jnp.zeros((1, 6, 9, 3)), window="box")
    with pytest.raises(ValueError, match="'disc' is not"):
        ssim(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)), window="disc")


def test_gigatok_pixel_metrics_are_reconstruction_ddps():
    """evaluation.pixel_metrics="gigatok" gives the numbers of GigaTok's
    reconstruction_ddp.py, written out here as it computes them: the decoder output x in
    [-1, 1] saved as uint8(clamp(127.5 x + 128, 0, 255)), the input (x_in + 1) / 2 of the
    loader's normalised uint8 image, scikit-image's PSNR and its default SSIM with
    data_range=2.0; also through `ImageMetrics` (per-image means)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from tok1d.evaluation import evaluator
    from tok1d.evaluation.image_metrics import pixel_metrics
    rng = np.random.default_rng(3)
    square, _ = _photos()
    gt8 = np.round(square * 255).astype(np.uint8)
    x_in = (gt8.astype(np.float32) / 255.0 - 0.5) / 0.5          # the loader's Normalize
    decoded = np.float32(x_in + rng.normal(0.0, 0.15, x_in.shape))  # beyond [-1, 1] at places
    saved = np.clip(127.5 * decoded + 128.0, 0, 255).astype(np.uint8)  # torch .to(uint8)
    restored = saved.astype(np.float32) / 255.0
    rgb_gt = (x_in + 1.0) / 2.0
    want_psnr = [peak_signal_noise_ratio(r, g) for r, g in zip(restored, rgb_gt)]
    want_ssim = [structural_similarity(r, g, data_range=2.0, channel_axis=-1)
                 for r, g in zip(restored, rgb_gt)]
    recon = jnp.asarray((decoded + 1.0) / 2.0)  # tok1d's [0, 1] reconstruction, unclipped
    target = jnp.asarray(gt8 / 255.0, jnp.float32)
    got = pixel_metrics(recon, target, "gigatok")
    np.testing.assert_allclose(np.asarray(got["psnr"]), want_psnr, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["ssim"]), want_ssim, atol=1e-5)
    standard = pixel_metrics(recon, target)
    assert np.all(np.asarray(standard["ssim"]) < np.asarray(got["ssim"]) - 0.01)  # another scale

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])
    acc = evaluator.ImageMetrics(evaluator.MetricNets(), mesh, pixel_convention="gigatok")
    acc.add_pairs(target, recon)
    out = acc.result()
    assert out["psnr"] == pytest.approx(np.mean(want_psnr), rel=1e-5)
    assert out["ssim"] == pytest.approx(np.mean(want_ssim), abs=1e-5)
    with pytest.raises(ValueError, match="'adm' is not|expected one of"):
        pixel_metrics(recon, target, "adm")

    # LPIPS: GigaTok's reads the decoder output unclipped (here 30% of the values are outside
    # [0, 1]), the standard one clipped.
    from tok1d.models.frozen import perceptual as perceptual_nets
    from tok1d.weights import loaders
    lpips = (perceptual_nets.build_module("lpips"),
             loaders.load_perceptual(("lpips",), "", allow_random_init=True)["lpips"])
    small, small_t = recon[:, :32, :32], target[:, :32, :32]
    lpips_of = lambda x: np.asarray(lpips[0].apply({"params": lpips[1]}, x, small_t))  # noqa
    for convention, want in (("gigatok", lpips_of(small)),
                             ("standard", lpips_of(jnp.clip(small, 0.0, 1.0)))):
        acc = evaluator.ImageMetrics(evaluator.MetricNets(lpips=lpips), mesh,
                                     pixel_convention=convention)
        acc.add_pairs(small_t, small)
        assert acc.result()["lpips"] == pytest.approx(float(np.mean(want)), rel=1e-4)
    assert not np.allclose(lpips_of(small), lpips_of(jnp.clip(small, 0.0, 1.0)))


def test_ssim_identical_clipping_and_errors():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=(2, 16, 20, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ssim(x, x)), np.ones(2, np.float32))
    # recon is clipped to [0, max_value] first, as in psnr.
    wild = x + jnp.asarray(rng.normal(0.0, 1.0, x.shape), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ssim(wild, x)),
                                  np.asarray(ssim(jnp.clip(wild, 0.0, 1.0), x)))
    assert np.all(np.asarray(ssim(wild, x)) < 1.0)
    assert np.all(np.asarray(psnr(x, x)) == 100.0)  # psnr untouched: 1e-10 floor
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[:, :, :16])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :10], x[:, :10])
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        ssim(x[0], x[0])


# ------------------------------------------------------------------------ precision / recall


def _reference_pr(real, fake, k=3):
    """Brute force in float64: full distance matrices, sorted rows."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def sq_dists(a, b):
        return np.sum(np.square(a[:, None, :] - b[None, :, :]), axis=-1)

    r_real = np.sort(sq_dists(real, real), axis=1)[:, k]
    r_fake = np.sort(sq_dists(fake, fake), axis=1)[:, k]
    d = sq_dists(real, fake)
    precision = np.mean(np.any(d <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
    return precision, recall, r_real, r_fake


@pytest.mark.parametrize("dim", [16, 64])
def test_precision_recall_matches_brute_force_for_any_block(dim):
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(300, dim)).astype(np.float32)
    fake = (1.1 * rng.normal(size=(250, dim)) + 0.15).astype(np.float32)
    p, r, r_real, r_fake = _reference_pr(real, fake)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95   # a case that tests something
    # No pair lies within float32 rounding of a ball's boundary, so the fractions must agree.
    d = np.sum(np.square(real[:, None].astype(np.float64) - fake[None]), axis=-1)
    assert min(np.min(np.abs(d / r_real[:, None] - 1)), np.min(np.abs(d / r_fake - 1))) > 1e-5
    results = [pr.precision_recall(real, fake, block=b) for b in (64, 112)]  # neither divides
    assert results[0] == results[1] == {"precision": p, "recall": r}
    for block in (64, 112):
        got = pr.radii(real, block=block, squared=True)
        assert got.shape == (300,) and got.dtype == np.float32
        np.testing.assert_allclose(got, r_real, rtol=1e-5)
    np.testing.assert_allclose(pr.radii(fake, block=64), np.sqrt(r_fake), rtol=1e-5)


def test_precision_recall_known_cases():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    assert pr.precision_recall(x, x, block=64) == {"precision": 1.0, "recall": 1.0}
    far = x + 100.0
    assert pr.precision_recall(x, far, block=64) == {"precision": 0.0, "recall": 0.0}
    # Mode collapse: ten well separated modes in the real set, the fake set is one of them.
    centres = 20.0 * rng.normal(size=(10, 8))
    labels = np.arange(300) % 10
    real = (centres[labels] + rng.normal(size=(300, 8))).astype(np.float32)
    fake = real[labels == 0]
    assert pr._block_size(pr.DEFAULT_BLOCK, 300, 30) == 512   # small sets: no 10000-row pad
    got = pr.precision_recall(real, fake)
    assert got["precision"] == 1.0
    assert 0.1 <= got["recall"] < 0.15
    assert got == dict(zip(("precision", "recall"), _reference_pr(real, fake)[:2]))


def test_duplicates_and_errors():
    # Integer features: every float32 distance is exact. Row 0 has 3 copies, i.e. k neighbours
    # at distance 0, so its radius is 0 (ADM's behaviour: copies count as neighbours).
    rng = np.random.default_rng(4)
    x = rng.integers(-5, 6, size=(40, 6)).astype(np.float32)
    x[1:4] = x[0]
    got = pr.radii(x, block=16, squared=True)
    np.testing.assert_array_equal(got, _reference_pr(x, x)[2])
    assert np.all(got[:4] == 0.0) and np.all(got[4:] > 0.0)
    with pytest.raises(ValueError, match="at least 4 features"):
        pr.radii(x[:3], block=16)
    with pytest.raises(ValueError, match="dims differ"):
        pr.precision_recall(x, x[:, :5], block=16)


def _reference_adm_float16(real, fake, k=3):
    """NumPy version of ADM's half-precision distances (float32 accumulation)."""
    def sq_dists(a, b):
        a, b = a.astype(np.float16), b.astype(np.float16)
        na = np.sum(np.square(a).astype(np.float32), axis=1).astype(np.float16)
        nb = np.sum(np.square(b).astype(np.float32), axis=1).astype(np.float16)
        ab = (a.astype(np.float32) @ b.astype(np.float32).T).astype(np.float16)
        return np.maximum((na[:, None] - 2 * ab) + nb[None, :], 0).astype(np.float32)

    r_real = np.sort(sq_dists(real, real), axis=1)[:, k]
    r_fake = np.sort(sq_dists(fake, fake), axis=1)[:, k]
    d = sq_dists(real, fake)
    return (np.mean(np.any(d <= r_real[:, None], axis=0)),
            np.mean(np.any(d <= r_fake[None, :], axis=1)), r_real)


def test_adm_float16_path():
    rng = np.random.default_rng(5)
    # Inception-like: non-negative, |a|^2 ~ 300, where half rounding is visible.
    real = np.maximum(rng.normal(0.5, 0.8, size=(300, 256)), 0).astype(np.float32)
    fake = np.maximum(rng.normal(0.55, 0.8, size=(250, 256)), 0).astype(np.float32)
    r16 = pr.radii(real, block=112, squared=True, adm_float16=True)
    assert np.all(r16 == r16.astype(np.float16))   # distances on the half grid
    p, r, r_real = _reference_adm_float16(real, fake)
    assert np.mean(r16 == r_real) > 0.95 and np.max(np.abs(r16 - r_real)) <= 0.25
    got = pr.precision_recall(real, fake, block=112, adm_float16=True)
    assert abs(got["precision"] - p) <= 0.02 and abs(got["recall"] - r) <= 0.02
    # Overflowing half (|a|^2 > 65504) falls back to float32, as ADM does.
    big_real, big_fake = 20.0 * real, 20.0 * fake
    assert (pr.precision_recall(big_real, big_fake, block=112, adm_float16=True)
            == pr.precision_recall(big_real, big_fake, block=112))
