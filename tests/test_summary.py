"""Tests for tok1d.summary and tok1d.images."""

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tok1d import images, summary


class FakeClock:
    """Manually advanced clock for ProgressReporter tests."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, secs: float) -> None:
        self.t += secs


def _load_events(logdir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(logdir),
        size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------
# MetricWriter
# ---------------------------------------------------------------------------


def test_metric_writer_roundtrip(tmp_path):
    with summary.MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"loss": 0.5, "psnr": np.float32(20.0)})
        writer.write_scalars(10, {"loss": np.float64(0.25), "psnr": float("nan")})
        writer.write_scalars(20, {"loss": 0.125, "psnr": float("inf")})
        writer.write_images(10, {"recon": np.zeros((6, 8, 3), np.uint8), "gray": np.full((5, 7, 1), 0.5)})
        writer.write_hparams({"lr": 1e-3, "model": {"depth": 4, "dims": (1, 2)}, "obj": object, "seed": np.int64(3)})

    acc = _load_events(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"loss", "psnr"}
    assert set(tags["images"]) == {"recon", "gray"}
    assert "hparams" in tags["tensors"]

    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 10, 20]
    assert [e.value for e in loss] == [0.5, 0.25, 0.125]
    psnr = acc.Scalars("psnr")
    assert psnr[0].value == 20.0 and math.isnan(psnr[1].value) and math.isinf(psnr[2].value)

    (recon,) = acc.Images("recon")
    assert (recon.step, recon.width, recon.height) == (10, 8, 6)
    (gray,) = acc.Images("gray")
    assert (gray.width, gray.height) == (7, 5)

    (text,) = acc.Tensors("hparams")
    table = text.tensor_proto.string_val[0].decode()
    assert "| model.depth | 4 |" in table

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 0.5, "psnr": 20.0},
        {"step": 10, "loss": 0.25, "psnr": "nan"},
        {"step": 20, "loss": 0.125, "psnr": "inf"},
    ]

    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams == {"lr": 1e-3, "model.depth": 4, "model.dims": [1, 2], "obj": str(object), "seed": 3}

    assert "tensorflow" not in sys.modules


def test_a_resumed_writer_drops_the_steps_after_its_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 20 had logged steps 30 and 40 (and half a
    line): resumed at 20, those are dropped from metrics.jsonl and purged for TensorBoard, so
    the redone steps appear once (they appeared twice)."""
    with summary.MetricWriter(tmp_path) as first:
        first.resume_at(0)  # (what a fresh run does)
        for step in (10, 20, 30, 40):
            first.write_scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "lo')  # cut short by the kill
    time.sleep(1.1)  # (event file names carry the second they were made)
    with summary.MetricWriter(tmp_path) as resumed:
        resumed.resume_at(20)
        for step in (30, 40):
            resumed.write_scalars(step, {"loss": step + 0.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 10, "loss": 10.0}, {"step": 20, "loss": 20.0},
                     {"step": 30, "loss": 30.5}, {"step": 40, "loss": 40.5}]
    assert [(e.step, e.value) for e in _load_events(tmp_path).Scalars("loss")] == [
        (10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]
    # TensorBoard's own loader (the server's) ignores the first start event of a run: the
    # same steps once, also for a run whose first session wrote no start event (older runs).
    from tensorboard.backend.event_processing import plugin_event_accumulator
    for fresh_start in (True, False):
        logdir = tmp_path / f"tb_{fresh_start}"
        with summary.MetricWriter(logdir) as first:
            if fresh_start:
                first.resume_at(0)
            for step in (10, 20, 30, 40):
                first.write_scalars(step, {"loss": float(step)})
        time.sleep(1.1)
        with summary.MetricWriter(logdir) as resumed:
            resumed.resume_at(20)
            for step in (30, 40):
                resumed.write_scalars(step, {"loss": step + 0.5})
        acc = plugin_event_accumulator.EventAccumulator(str(logdir))
        acc.Reload()
        assert [(e.step, float(np.asarray(e.tensor_proto.float_val[0])))
                for e in acc.Tensors("loss")] == [(10, 10.0), (20, 20.0), (30, 30.5),
                                                  (40, 40.5)], fresh_start


def test_metric_writer_disabled(tmp_path):
    logdir = tmp_path / "logs"
    writer = summary.MetricWriter(logdir, enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    writer.write_hparams({"a": 1})
    writer.flush()
    writer.close()
    assert not logdir.exists()


def test_close_is_idempotent(tmp_path):
    writer = summary.MetricWriter(tmp_path)
    writer.close()
    writer.close()
    writer.write_scalars(1, {"loss": 1.0})  # Ignored after close.
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------
# ProgressReporter / formatting
# ---------------------------------------------------------------------------


def test_process_age_counts_from_the_process_start():
    """`process_age` (the "s after the process started" of a run's first-step line) is the
    process's own age: a fresh interpreter is seconds old, and it grows with the clock."""
    fresh = subprocess.run([sys.executable, "-c", "from tok1d import summary; "
                            "print(summary.process_age())"], capture_output=True, text=True,
                           check=True)
    assert 0 < float(fresh.stdout) < 60, fresh.stdout
    first = summary.process_age()
    time.sleep(0.2)
    assert 0.15 < summary.process_age() - first < 5


def test_format_duration():
    assert summary.format_duration(45.2) == "45s"
    assert summary.format_duration(680) == "11m20s"
    assert summary.format_duration(3720) == "1h02m"
    assert summary.format_duration(float("nan")) == "?"


def test_format_number():
    assert summary.format_number(0.01234) == "1.234e-02"
    assert summary.format_number(21.3) == "21.30"
    assert summary.format_number(1234.0) == "1234"
    assert summary.format_number(7) == "7"


def test_progress_reporter_rates_and_pauses():
    clock = FakeClock()
    lines = []
    reporter = summary.ProgressReporter(
        1000, batch_size=32, every_steps=100, every_secs=0, print_fn=lines.append, clock=clock
    )
    clock.advance(10.0)
    assert reporter.update(50, {"loss": 1.0}) is None  # Not due.
    assert lines == []

    clock.advance(10.0)
    out = reporter.update(100, {"loss": 0.01234, "psnr": 21.3})
    assert out == {"steps_per_sec": 5.0, "images_per_sec": 160.0, "eta_secs": 180.0}
    assert lines == ["step  100/1000 (10.0%) | loss 1.234e-02 | psnr 21.30 | 5 steps/s | 160 img/s | ETA 3m00s | elapsed 20s"]

    # 100 steps in 10 active seconds; 30 paused seconds are excluded.
    clock.advance(5.0)
    with reporter.timed_pause():
        clock.advance(30.0)
    clock.advance(5.0)
    out = reporter.update(200)
    assert out == {"steps_per_sec": 10.0, "images_per_sec": 320.0, "eta_secs": 80.0}
    assert lines[-1].endswith("| 10 steps/s | 320 img/s | ETA 1m20s | elapsed 1m00s")

    # The final step always reports.
    clock.advance(80.0)
    out = reporter.update(1000)
    assert out["eta_secs"] == 0.0 and out["steps_per_sec"] == 10.0
    assert len(lines) == 3


def test_progress_reporter_every_secs_and_resume():
    clock = FakeClock()
    lines = []
    reporter = summary.ProgressReporter(
        3000, batch_size=8, every_secs=30.0, print_fn=lines.append, first_step=500, clock=clock
    )
    clock.advance(20.0)
    assert reporter.update(540) is None
    clock.advance(10.0)
    out = reporter.update(560)  # 60 steps since first_step in 30s.
    assert out == {"steps_per_sec": 2.0, "images_per_sec": 16.0, "eta_secs": 1220.0}
    assert "ETA 20m20s" in lines[0]

    # A pause still open at report time is excluded too.
    reporter.pause()
    clock.advance(40.0)
    out = reporter.update(570)
    assert math.isnan(out["steps_per_sec"])
    reporter.resume()
    clock.advance(5.0)
    assert reporter.update(580) is None  # Only 5s since last report.
    with pytest.raises(RuntimeError):
        reporter.resume()


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


def test_to_uint8():
    x = np.array([-0.5, 0.0, 0.5 / 255, 0.6 / 255, 0.5, 1.0, 2.0, np.nan], np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 0, 1, 128, 255, 255, 0])
    u = np.arange(5, dtype=np.uint8)
    assert images.to_uint8(u) is u

    import jax.numpy as jnp

    b = images.to_uint8(jnp.array([0.0, 1.0, 0.25], jnp.bfloat16))
    assert b.dtype == np.uint8
    np.testing.assert_array_equal(b, [0, 255, 64])


def test_make_grid():
    a = np.zeros((3, 4, 5, 3), np.uint8)
    b = np.ones((2, 4, 5, 3), np.float32)
    grid = images.make_grid([a, b], pad=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # Border.
    assert (grid[2:6, 2:7] == 0).all()  # First tile.
    assert (grid[8:12, 2:7] == 255).all()  # Float ones -> 255.
    assert (grid[8:12, 16:21] == 255).all()  # Blank tile (pad_value).

    gray = images.make_grid([np.zeros((2, 3, 3, 1), np.uint8)], pad=1, pad_value=100)
    assert gray.shape == (5, 9, 1)
    assert gray[0, 0, 0] == 100 and gray[1, 1, 0] == 0

    with pytest.raises(ValueError):
        images.make_grid([a, np.zeros((1, 4, 6, 3), np.uint8)])


def test_interleave_pairs():
    a = np.arange(5)[:, None, None, None] * np.ones((5, 2, 2, 1))
    b = a + 100
    rows = images.interleave_pairs(a, b, per_row=2)
    firsts = [row[:, 0, 0, 0].tolist() for row in rows]
    assert firsts == [[0, 1], [100, 101], [2, 3], [102, 103], [4], [104]]


def test_save_png_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "dir" / "x.png"
    images.save_png(path, rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)

    gray = rng.random((4, 5, 1))
    images.save_png(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), images.to_uint8(gray)[..., 0])


def test_read_rgb_gives_photos_upright_and_in_rgb_whatever_their_mode(tmp_path):
    """`np.asarray(Image.open(p))` (the notebook's) gave palette indices as grey levels, CMYK
    as 4 channels and a phone photo's pixels sideways (EXIF orientation 6)."""
    from PIL import Image
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[:, :5] = (200, 30, 10)
    rgb[:, 5:] = (10, 40, 220)
    Image.fromarray(rgb).quantize(colors=2).save(tmp_path / "palette.png")
    np.testing.assert_array_equal(images.read_rgb(tmp_path / "palette.png"), rgb)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert np.abs(images.read_rgb(tmp_path / "cmyk.tif").astype(int) - rgb).max() <= 2
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown turned clockwise
    Image.fromarray(rgb).save(tmp_path / "phone.png", exif=exif)
    np.testing.assert_array_equal(images.read_rgb(tmp_path / "phone.png"), np.rot90(rgb, -1))
    ramp = np.linspace(0, 4000, 12, dtype=np.uint16).reshape(3, 4)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = images.read_rgb(tmp_path / "grey16.png")
    assert grey.dtype == np.uint8 and grey.shape == (3, 4, 3)
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255 and (grey[..., 0] == grey[..., 2]).all()
    Image.fromarray(np.dstack([rgb, np.full((6, 10), 7, np.uint8)])).save(tmp_path / "a.png")
    np.testing.assert_array_equal(images.read_rgb(tmp_path / "a.png"), rgb)
