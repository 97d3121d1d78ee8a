"""The input pipeline's fast path against the plain one, uint8 batches normalised on the device,
worker counts from the core count, and `tok1d bench --workload=input` on a few JPEGs."""

import functools
import importlib.util
import io
import itertools
import json
import os
import re
import sys
import time

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import REPO
from tok1d import errors, parallel
from tok1d.cli import bench, input_bench, tokenize
from tok1d.data import feeding, pipeline, shared_batches, sources

AUGMENTS = ("center_crop", "random_crop", "adm_random_crop", "random_resized_crop")
# Reduced-size (DCT-domain) JPEG decoding against full decoding + PIL's bicubic downscale, on
# photos, in levels of 255: the bound documented in tok1d/data/pipeline.py. (Measured: mean
# 0.2-0.8, 99th percentile 2-6; 1.5 / 12 where the image is barely 2x the target.)
MEAN_BOUND, P99_BOUND = 2.0, 12
needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None,
    reason="the official loaders need torch and torchvision (pip install -e '.[bench]')")


@functools.lru_cache(maxsize=None)
def _jpeg(photo: str, width: int, height: int) -> bytes:
    image = Image.fromarray(getattr(skimage.data, photo)()).resize((width, height),
                                                                   Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _both(data, augment, seed, size=256, rule="adm"):
    kw = dict(image_size=size, augment=augment, flip=True, min_scale=0.5, resize_rule=rule)
    fast = pipeline.crop(data, rng=np.random.default_rng(seed), **kw)
    plain = pipeline.preprocess_plain(data, rng=np.random.default_rng(seed), **kw)
    assert fast.dtype == plain.dtype == np.uint8 and fast.shape == plain.shape == (size, size, 3)
    return np.abs(fast.astype(np.int16) - plain)


@pytest.mark.parametrize("rule", pipeline.RESIZE_RULES)
@pytest.mark.parametrize("augment", AUGMENTS)
def test_fast_crop_equals_plain_crop_without_reduced_decoding(augment, rule):
    # ImageNet-sized (no 2x shrink: full decoding) and an array source: same windows, same
    # flips, the same pixels up to PIL's fixed-point rounding of the two resize passes. (500 x
    # 332: the two rules resize it to 385 / 386 px wide.)
    for data in (_jpeg("coffee", 500, 375), _jpeg("chelsea", 333, 500),
                 _jpeg("coffee", 500, 332), np.asarray(skimage.data.astronaut())[:300, :420]):
        for seed in range(4):
            diff = _both(data, augment, seed, rule=rule)
            assert diff.max() <= 2 and diff.mean() < 0.2


def test_random_resized_crop_falls_back_as_torchvision():
    """Ten failed draws (a 10 x 400 strip, area >= 90%): torchvision's fallback, the central
    crop with the aspect ratio clamped to 4/3 (13 x 10 px), then squashed to the square; the
    fast path takes the same window."""
    rng = np.random.default_rng(0)
    assert pipeline._inception_window(10, 400, rng, 0.9) == (0, 193, 10, 13)
    assert pipeline._inception_window(400, 10, rng, 0.9) == (193, 0, 13, 10)  # 10 / (3/4)
    strip = np.asarray(skimage.data.astronaut())[200:210, :400]
    kw = dict(image_size=32, augment="random_resized_crop", flip=False, min_scale=0.9)
    plain = pipeline.preprocess_plain(strip, rng=np.random.default_rng(1), **kw)
    want = np.asarray(Image.fromarray(strip[:, 193:206]).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(plain, want)
    fast = pipeline.crop(strip, rng=np.random.default_rng(1), **kw)
    assert np.abs(fast.astype(int) - plain).max() <= 2


def test_the_resize_rules_round_as_adm_and_as_torchvision():
    """"adm": round(side * scale), floored center offsets (ADM's crops); "torchvision":
    Resize's int(size * long / short) and CenterCrop's int(round(d / 2)) (half to even)."""
    assert pipeline.shorter_side_size(332, 500, 256, "adm") == (256, 386)  # 385.54
    assert pipeline.shorter_side_size(332, 500, 256, "torchvision") == (256, 385)
    assert pipeline.shorter_side_size(500, 300, 256, "adm") == (427, 256)  # 426.67
    assert pipeline.shorter_side_size(500, 300, 256, "torchvision") == (426, 256)
    assert pipeline.shorter_side_size(300, 300, 256, "torchvision") == (256, 256)
    assert pipeline.center_offsets(256, 385, 256, "adm") == (0, 64)  # 64.5
    assert pipeline.center_offsets(256, 385, 256, "torchvision") == (0, 64)
    assert pipeline.center_offsets(256, 387, 256, "adm") == (0, 65)  # 65.5
    assert pipeline.center_offsets(256, 387, 256, "torchvision") == (0, 66)  # half to even
    data = _jpeg("coffee", 500, 332)
    kw = dict(image_size=256, augment="center_crop", flip=False, min_scale=1.0, rng=None)
    adm = pipeline.crop(data, resize_rule="adm", **kw)
    tv = pipeline.crop(data, resize_rule="torchvision", **kw)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((385, 256),
                                                                        Image.BICUBIC))
    assert np.abs(tv.astype(int) - want[:, 64:320]).max() <= 2
    assert np.abs(adm.astype(int) - tv).mean() > 1  # another resize: other pixels
    with pytest.raises(ValueError, match="resize rule"):
        pipeline.shorter_side_size(332, 500, 256, "pil")


@pytest.mark.parametrize("augment", AUGMENTS)
def test_reduced_size_decoding_stays_within_the_documented_bound(augment):
    # (1013 x 763 at 128 px: a scale-4 decode of a size that 4 does not divide, whose reduced
    # image Pillow rounds up: the window maps through the exact scale, not the rounded size.)
    for data, size in ((_jpeg("astronaut", 1024, 768), 256), (_jpeg("rocket", 600, 900), 256),
                       (_jpeg("coffee", 530, 520), 256), (_jpeg("astronaut", 1013, 763), 128)):
        diff = np.stack([_both(data, augment, seed, size) for seed in range(3)])
        # A different window or flip would differ by tens of levels on average.
        assert diff.mean() <= MEAN_BOUND and np.percentile(diff, 99) <= P99_BOUND


def test_reduced_decoding_is_used_when_the_image_shrinks_2x(monkeypatch):
    from PIL import JpegImagePlugin
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real(self, mode, size))
    kw = dict(image_size=256, augment="center_crop", flip=False, min_scale=1.0, rng=None)
    pipeline.crop(_jpeg("coffee", 500, 375), **kw)
    assert drafts == []
    pipeline.crop(_jpeg("coffee", 1024, 768), **kw)
    assert len(drafts) == 1


def test_tokenize_reads_images_as_the_evaluation_data_does():
    """`tok1d tokenize`'s center crops are the evaluation pipeline's (the fast path, reduced
    decoding included): codes of the eval split are codes of the images evaluation sees."""
    for data in (_jpeg("astronaut", 1024, 768), _jpeg("coffee", 500, 375)):
        ours = tokenize.load_image(data, 128)
        assert ours.dtype == np.float32 and ours.shape == (128, 128, 3)
        np.testing.assert_array_equal(ours, pipeline.preprocess(
            data, image_size=128, augment="center_crop", flip=False, min_scale=1.0, rng=None))


def test_ten_crop_is_torchvisions_and_adm_s_center_crop_halves_with_a_box_filter():
    """`tok1d tokenize --crop=ten_crop` (LlamaGen / GigaTok `extract_codes_c2i.py --ten-crop`):
    ADM's `center_crop_arr` (BOX halving while the shorter side is >= 2x, bicubic to the
    size, floored center offsets), then torchvision's TenCrop order and offsets (the center
    crop's rounded half to even: (7 - 4) / 2 -> 2, (9 - 4) / 2 -> 2)."""
    img = np.arange(7 * 9).reshape(7, 9, 1)
    crops = pipeline.ten_crop(img, 4)
    assert crops.shape == (10, 4, 4, 1)
    mirror = img[:, ::-1]
    for k, a in enumerate((img, mirror)):
        for j, want in enumerate((a[:4, :4], a[:4, 5:], a[3:, :4], a[3:, 5:], a[2:6, 2:6])):
            np.testing.assert_array_equal(crops[5 * k + j], want)
    with pytest.raises(ValueError, match="smaller than"):
        pipeline.ten_crop(img, 8)

    photo = Image.fromarray(skimage.data.astronaut()).resize((700, 600), Image.BICUBIC)
    # ADM's rule written out: 600 >= 2 x 281, so one BOX halving to 350 x 300, then bicubic
    # to round(350 * 281 / 300) = 328 x 281, then the floored center offsets (23, 0).
    half = photo.resize((350, 300), resample=Image.BOX)
    want = np.asarray(half.resize((328, 281), resample=Image.BICUBIC))[0:281, 23:304]
    got = np.asarray(pipeline.adm_center_crop_arr(photo, 281))
    np.testing.assert_array_equal(got, want)
    out = io.BytesIO()
    photo.save(out, "PNG")
    views = tokenize.load_views(out.getvalue(), 256, "ten_crop", 1.1)  # int(256 * 1.1) = 281
    assert views.dtype == np.uint8 and views.shape == (10, 256, 256, 3)
    np.testing.assert_array_equal(views, pipeline.ten_crop(want, 256))


def test_exact_unit_float_is_the_hosts_division():
    """`unit_float(exact=True)` (tokenize's: the official extraction scales on the host) gives
    np.float32(x) / 255 bit for bit; the plain one (XLA's reciprocal) is within one ulp."""
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    host = x.astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(np.asarray(feeding.unit_float(x, exact=True)), host)
    fast = np.asarray(feeding.unit_float(x))
    assert fast.dtype == np.float32 and np.all(np.abs(fast - host) <= np.spacing(host))


def test_batches_are_uint8_and_the_feeder_normalises_them_on_device():
    src = sources.DemoSource("train", size=16)
    ds = pipeline.train_dataset(src, global_batch=8, host_start=0, host_stop=8, seed=0,
                                image_size=16, augment="random_crop", flip=True, min_scale=1.0)
    host = next(iter(ds))
    assert host["image"].dtype == np.uint8 and host["image"].shape == (8, 16, 16, 3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = next(feeding.Feeder(iter(ds), sharding, 8))
    assert batch["image"].dtype == np.float32
    assert batch["image"].sharding.spec[0] == "data"
    np.testing.assert_allclose(parallel.host_array(batch["image"]),
                               host["image"].astype(np.float32) / 255.0, rtol=2e-7, atol=0)
    # preprocess keeps its float [0, 1] contract (the same crop).
    image = src[3]["image"]
    kw = dict(image_size=16, augment="random_crop", flip=True, min_scale=1.0)
    np.testing.assert_array_equal(
        pipeline.preprocess(image, rng=np.random.default_rng(5), **kw),
        pipeline.crop(image, rng=np.random.default_rng(5), **kw) / np.float32(255.0))


def test_resize_weights_are_pils_bicubic():
    """The device resize's weights against PIL's own resize of float ("F") images, which uses
    the same weights in double precision without fixed-point rounding: random boxes, shrinking
    and enlarging, taps cut at the data's ends."""
    rng = np.random.default_rng(0)
    side = 128
    for _ in range(12):
        h, w = rng.integers(20, 120, 2)
        out = int(rng.integers(8, 64))
        x0, y0 = rng.uniform(0, w / 3), rng.uniform(0, h / 3)
        box = (x0, y0, rng.uniform(x0 + 1, w), rng.uniform(y0 + 1, h))
        img = rng.integers(0, 256, (h, w)).astype(np.float32)
        want = np.asarray(Image.fromarray(img, mode="F").resize((out, out), Image.BICUBIC,
                                                                box=box))
        canvas = np.zeros((side, side), np.float32)
        canvas[:h, :w] = img
        wy, wx = (feeding.resize_weights(np.float32(a), np.float32(b), np.int32(n), out, side)
                  for a, b, n in ((box[1], box[3], h), (box[0], box[2], w)))
        got = np.asarray(wy) @ canvas.astype(np.float64) @ np.asarray(wx).T
        assert np.abs(got - want).max() < 5e-3


def _on_device(windows, size):
    side = pipeline.canvas_size(size)
    assert all(w["image"].shape[0] <= side and w["image"].shape[1] <= side for w in windows)
    stack = shared_batches.Stack((side, side, 3))(windows)
    out = feeding.resize_windows(stack["image"], stack["window_box"], stack["window_size"],
                                 stack["window_flip"], out_size=size)
    return np.round(np.asarray(out) * 255).astype(np.int16)


@pytest.mark.parametrize("augment", AUGMENTS)
def test_device_resize_equals_the_host_crop(augment):
    """`data.resize_on="device"`: the same windows and flips as `crop`, the pixels within PIL's
    fixed-point rounding, for
    full-size and reduced-size decoding and for an array image too large for the canvas
    (resized on the host, shipped as an identity window)."""
    for data, size in ((_jpeg("coffee", 500, 375), 256), (_jpeg("astronaut", 1024, 768), 128),
                       (_jpeg("chelsea", 333, 500), 96),
                       (np.asarray(skimage.data.astronaut())[:300, :420], 64)):
        kw = dict(image_size=size, augment=augment, flip=True, min_scale=0.5)
        host = np.stack([pipeline.crop(data, rng=np.random.default_rng(s), **kw)
                         for s in range(4)])
        device = _on_device([pipeline.window(data, rng=np.random.default_rng(s), **kw)
                             for s in range(4)], size)
        diff = np.abs(device - host)
        assert np.percentile(diff, 99.9) <= 1 and diff.mean() < 0.3, (size, diff.mean())
        # Pillow picks the order of its passes per image, the device runs horizontal first:
        # where the overshoot is clipped between the passes (a few pixels in 1e5 of these
        # crop-then-resize windows), up to ~6 levels.
        assert diff.max() <= (8 if augment == "random_resized_crop" else 2), (size, diff.max())


def test_device_resize_through_the_pipeline_and_the_feeder():
    src = sources.DemoSource("train", size=16)
    kw = dict(global_batch=8, host_start=0, host_stop=8, seed=0, image_size=16,
              augment="random_crop", flip=True, min_scale=1.0)
    host = next(iter(pipeline.train_dataset(src, **kw)))
    ds = pipeline.train_dataset(src, resize_on="device", **kw)
    windows = next(iter(ds))
    assert windows["image"].shape == (8, pipeline.canvas_size(16), pipeline.canvas_size(16), 3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = next(feeding.Feeder(iter(ds), sharding, 8))
    assert set(batch) == {"image", "label", "mask"} and batch["image"].dtype == np.float32
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].sharding.spec[0] == "data"
    got = np.round(parallel.host_array(batch["image"]) * 255)
    assert np.abs(got - host["image"]).max() <= 2
    np.testing.assert_array_equal(parallel.host_array(batch["label"]), host["label"])
    with pytest.raises(ValueError, match="resize_on='gpu'"):
        pipeline.train_dataset(src, resize_on="gpu", **kw)


def test_worker_count_follows_the_cores(monkeypatch):
    assert pipeline.resolve_num_workers(3) == 3 and pipeline.resolve_num_workers(0) == 0
    for cores, workers in ((1, 0), (2, 1), (8, 7), (208, pipeline.MAX_AUTO_WORKERS)):
        monkeypatch.setattr(pipeline, "available_cores", lambda c=cores: c)
        assert pipeline.resolve_num_workers(-1) == workers


def test_imagenet_like_jpegs_are_realistic():
    files = list(sources.imagenet_like_jpegs(6, seed=1))
    assert [label for label, _ in files] == [0, 1, 2, 3, 4, 5]
    for _, data in files:
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size in [s for s, _ in sources.IMAGENET_LIKE_SIZES]
        assert 0.1 < len(data) / (image.size[0] * image.size[1]) < 2.0  # bytes per pixel


@needs_torchvision
def test_input_benchmark_runs_both_pipelines(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    status = bench.main(["--workload=input", f"--config={REPO}/configs/titok.py:l32_stage1",
                         "--config.data.image_size=32", "--images=8", "--batch_size=4",
                         "--steps=1", "--repeats=1", f"--out={out}"])
    assert status == 0
    table = capsys.readouterr().out
    assert "| tok1d | random_crop | 32 | 4 | 0 |" in table
    assert "| official | center_crop | 32 | 4 | 0 |" in table
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["pipeline"], r["augment"]) for r in rows] == [
        ("tok1d", "random_crop"), ("official", "random_crop"),
        ("tok1d", "center_crop"), ("official", "center_crop")]
    assert all(r["per_core"] > 0 and r["wall"] > 0 and r["images"] == 4 for r in rows)
    assert all(r["command"].startswith("python -m tok1d.cli.bench") for r in rows)


@needs_torchvision
def test_the_official_loader_is_endless_as_tok1d_s_stream(tmp_path):
    """It runs past its epochs: a loader that stopped after the batches a benchmark takes left
    the batches its workers had prefetched undone, and looked cheaper per image than it is."""
    folder = input_bench.write_image_folder(str(tmp_path / "jpegs"), 4)
    loader = input_bench.loaders.official_loader(
        folder, augment="center_crop", image_size=16, flip=False, min_scale=1.0,
        batch_size=3, num_workers=0)
    batches = itertools.islice(iter(loader), 5)  # 15 images of 4: four epochs
    labels = [list(labels.numpy()) for _, labels in batches]
    assert len(labels) == 5 and all(len(row) == 3 for row in labels)


@needs_torchvision
def test_the_official_loader_reads_the_files_in_the_order_given(tmp_path, caplog):
    """The benchmark's two sides read the same files in the same order (tok1d's shuffle):
    a folder's files differ in size, and so in cost. Names it cannot find: its own shuffle,
    with a warning."""
    folder = input_bench.write_image_folder(str(tmp_path / "jpegs"), 6)
    names = sorted(os.path.relpath(os.path.join(root, f), folder)
                   for root, _, files in os.walk(folder) for f in files)
    order = names[::-1] + names[:2]
    loader = input_bench.loaders.official_loader(
        folder, augment="center_crop", image_size=16, flip=False, min_scale=1.0,
        batch_size=4, num_workers=0, order=order)
    labels = [int(x) for _, batch in itertools.islice(iter(loader), 3) for x in batch]
    classes = sorted({name.split("/")[0] for name in names})
    want = [classes.index(name.split("/")[0]) for name in order]
    assert labels == want + want[:4]  # then the order again
    with caplog.at_level("WARNING"):
        input_bench.loaders.official_loader(
            folder, augment="center_crop", image_size=16, flip=False, min_scale=1.0,
            batch_size=4, num_workers=0, order=["nowhere/x.jpg"])
    assert "own shuffle" in caplog.text


@needs_torchvision
def test_official_transforms_match_the_recipes_crops():
    data = _jpeg("coffee", 500, 375)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    for augment, low in (("random_crop", 0.0), ("adm_random_crop", -1.0), ("center_crop", 0.0)):
        t = input_bench.loaders.official_transform(augment, 64, flip=True, min_scale=0.8)
        x = t(image).numpy()
        assert x.shape == (3, 64, 64) and x.dtype == np.float32
        assert low <= x.min() and x.max() <= 1.0
    # The official center crop and tok1d's (no reduced decoding at this size): the same pixels
    # up to rounding.
    # TiTok's (torchvision's Resize + CenterCrop: tok1d's resize_rule "torchvision"), also on
    # a shape where the rules differ.
    for data in (data, _jpeg("coffee", 500, 332), _jpeg("coffee", 500, 300)):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        t = input_bench.loaders.official_transform("center_crop", 256)
        official = np.round(t(image).numpy().transpose(1, 2, 0) * 255)
        ours = pipeline.crop(data, image_size=256, augment="center_crop", flip=False,
                             min_scale=1.0, rng=None, resize_rule="torchvision")
        assert np.abs(official - ours).max() <= 2


def test_image_folder_for_the_benchmark(tmp_path):
    root = input_bench.write_image_folder(str(tmp_path / "jpegs"), 9)
    names = sorted(os.listdir(root))
    assert names == [f"class_{i}" for i in range(7)]
    assert sum(len(os.listdir(os.path.join(root, n))) for n in names) == 9


def test_input_benchmark_without_the_official_loaders(capsys):
    status = bench.main(["--workload=input", f"--config={REPO}/configs/gigatok_b_l.py",
                         "--config.data.image_size=32", "--images=4", "--batch_size=2",
                         "--steps=1", "--repeats=1", "--noofficial"])
    assert status == 0
    table = capsys.readouterr().out
    assert "| tok1d | adm_random_crop | 32 | 2 | 0 |" in table and "official" not in table.split(
        "\n", 2)[2]


def test_input_benchmark_without_torchvision_stops_before_preparing(monkeypatch, capsys):
    """No torchvision (the `bench` extra not installed): one line at once, naming the extra
    and --noofficial; it came after minutes of writing and preparing the images."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # (import raises ImportError)
    monkeypatch.setattr(input_bench, "write_image_folder", _never_called)
    status = bench.main(["--workload=input", f"--config={REPO}/configs/gigatok_b_l.py",
                         "--config.data.image_size=32", "--images=4", "--batch_size=2",
                         "--steps=1", "--repeats=1"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(r"error: the official loader needs torch(vision)? \(pip install -e "
                        r"'\.\[bench\]' in tok1d's checkout\); --noofficial times tok1d's "
                        r"pipeline alone\.", err), err


def _never_called(*args, **kwargs):
    raise AssertionError("the images were written before the dependency was checked")


def _prefetching_batches(cost_s: float, buffer: int, warmup_s: float):
    """A fake pipeline: a thread that spends `cost_s` CPU seconds per batch and runs up to
    `buffer` batches ahead of the consumer; the first batch comes after `warmup_s` (a slow
    start, as grain's, during which the buffer fills)."""
    import queue
    import threading
    import time
    ready, stop = queue.Queue(maxsize=buffer), threading.Event()

    def produce():
        while not stop.is_set():
            start = time.process_time()
            while time.process_time() - start < cost_s:  # (process CPU time: this thread's)
                pass
            while not stop.is_set():
                try:
                    ready.put(0, timeout=0.05)
                    break
                except queue.Full:
                    pass

    threading.Thread(target=produce, daemon=True).start()
    try:
        time.sleep(warmup_s)
        while True:
            yield ready.get()
    finally:
        stop.set()


def test_the_input_benchmark_times_from_a_full_buffer_to_a_full_one():
    """Batches decoded ahead before the clocks start are not counted for free: the CPU per batch
    is the pipeline's cost at 1 step as at 6 (it was ~1/8 of it at 1 step)."""
    make = functools.partial(_prefetching_batches, cost_s=0.04, buffer=8, warmup_s=0.5)
    per_batch = {}
    for steps in (1, 6):
        r = input_bench.time_batches(make, batch_size=1, steps=steps, warmup=1)
        per_batch[steps] = r["cpu_s"] / steps
        assert r["wall_s"] > 0
    assert 0.03 < per_batch[1] < 0.08 and 0.03 < per_batch[6] < 0.06, per_batch



def test_the_input_benchmarks_own_polling_is_not_the_pipelines(monkeypatch):
    """Reading the CPU time scans /proc, which costs the benchmark process CPU (11 ms per scan
    with 450 processes on the host): that is not counted as the pipeline's, so an idle
    pipeline is seen idle however costly the scan (it waited out the 30 s deadline)."""
    real = input_bench.cpu_seconds

    def costly(pids=None):  # a scan of a host with many processes
        start = time.thread_time()
        while time.thread_time() - start < 0.02:
            pass
        return real(pids)
    monkeypatch.setattr(input_bench, "cpu_seconds", costly)
    poller = input_bench._Poller([])
    start = time.perf_counter()
    cpu0, _ = input_bench.wait_idle(poller, timeout_s=5.0)
    assert time.perf_counter() - start < 2.0  # idle at the first polls
    assert poller.polling >= 0.02 and abs(poller.cpu() - cpu0) < 0.01


def test_input_benchmark_refuses_bad_inputs_in_one_line(tmp_path, capsys):
    """Undecodable files in --image_folder (tok1d's side dropped them silently, torchvision's
    failed on them), an image size of 0 (a ZeroDivisionError at the first batch) and an --out
    that is a directory (refused only after the whole run): each one `error:` line, up front."""
    folder = input_bench.write_image_folder(str(tmp_path / "jpegs"), 4)
    with open(os.path.join(folder, "class_0", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    common = ["--workload=input", f"--config={REPO}/configs/gigatok_b_l.py", "--batch_size=2",
              "--steps=1", "--repeats=1", "--noofficial"]
    cases = [([f"--image_folder={folder}", "--config.data.image_size=32"],
              "1 file(s) cannot be decoded (e.g. class_0/broken.jpg: "),
             (["--images=4", "--config.data.image_size=0"], "data.image_size=0 must be positive"),
             (["--images=4", "--config.data.image_size=32", f"--out={tmp_path}"],
              "is a directory")]
    for extra, text in cases:
        status = bench.main(common + extra)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (after prepare's progress bar)
        assert status == 2 and last.startswith("error: ") and text in last, err
        assert "Traceback" not in err
        assert "--out" not in extra[-1] or "train:" not in err  # refused before any work
    # An error of torchvision's loader itself (e.g. a file it lists that tok1d ignores) says
    # whose it is.
    with pytest.raises(errors.UserError, match=r"official loader \(torchvision's ImageFolder\) "
                                               r"failed on d: FileNotFoundError: gone"):
        with input_bench._naming("official", "d"):
            raise FileNotFoundError("gone")
