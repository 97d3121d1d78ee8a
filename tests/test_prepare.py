"""Tests for tok1d.data.prepare and tok1d.data.records."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from conftest import assert_damage_is_named, damage_records

from tok1d import errors
from tok1d.data import prepare as prepare_lib
from tok1d.data import records

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "fish"]
BAD_FILES = {"cat/bad.jpg", "dog/truncated.jpg", "fish/empty.png"}


def _save(path, array: np.ndarray, fmt: str, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kwargs)


def _make_tree(root) -> dict[str, tuple[int, np.ndarray | None]]:
    """Writes a small class-subfolder tree.

    Returns:
        relpath -> (label, expected RGB pixels or None for lossy JPEG) for
        every good image.
    """
    rng = np.random.default_rng(0)
    good = {}

    def rand(h, w, c=3):
        shape = (h, w) if c == 1 else (h, w, c)
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    for label, name in enumerate(CLASSES):
        for i, (h, w) in enumerate([(8, 12), (16, 10)]):
            rel = f"{name}/png_{i}.png"
            array = rand(h, w)
            _save(os.path.join(root, rel), array, "PNG")
            good[rel] = (label, array)
        rel = f"{name}/sub/dir/photo.JPEG"  # Nested, upper-case extension.
        _save(os.path.join(root, rel), rand(20, 14), "JPEG", quality=90)
        good[rel] = (label, None)

    gray = rand(9, 7, c=1)
    _save(os.path.join(root, "cat/gray.png"), gray, "PNG")
    good["cat/gray.png"] = (0, np.repeat(gray[:, :, None], 3, axis=-1))
    rgba = rand(6, 11, c=4)
    _save(os.path.join(root, "dog/rgba.png"), rgba, "PNG")
    good["dog/rgba.png"] = (1, rgba[:, :, :3])

    # Bad files: random bytes, truncated JPEG, empty PNG; plus a non-image.
    with open(os.path.join(root, "cat/bad.jpg"), "wb") as f:
        f.write(rng.integers(0, 256, size=500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(rand(64, 64)).save(buf, format="JPEG")
    with open(os.path.join(root, "dog/truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    open(os.path.join(root, "fish/empty.png"), "wb").close()
    with open(os.path.join(root, "fish/notes.txt"), "w") as f:
        f.write("not an image\n")
    return good


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good = _make_tree(str(root))
    return str(root), good


def _read_all(directory, split):
    source = records.ArrayRecordImageSource(directory, split)
    return source, [source[i] for i in range(len(source))]


def _check_records(recs, good, root):
    for rec in recs:
        label, expected = good[rec["filename"]]
        assert rec["label"] == label
        assert rec["filename"].split("/")[0] == CLASSES[label]
        pixels = records.decode_image(rec["image"], name=rec["filename"])
        assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3
        if expected is not None:
            np.testing.assert_array_equal(pixels, expected)
        else:  # JPEG: stored bytes are the original file, unchanged.
            path = os.path.join(root, rec["filename"])
            with open(path, "rb") as f:
                assert f.read() == rec["image"]


def test_prepare_train(tree, tmp_path):
    root, good = tree
    out = str(tmp_path / "out")
    summary = prepare_lib.prepare(root, out, workers=2, num_shards=2)

    train = summary["splits"]["train"]
    assert train["num_examples"] == len(good)
    assert train["num_skipped"] == len(BAD_FILES)
    assert summary["num_ignored"] == 1
    assert summary["class_names"] == CLASSES

    with open(os.path.join(out, "skipped_train.txt")) as f:
        lines = [line.rstrip("\n").split("\t") for line in f]
    assert {line[0] for line in lines} == BAD_FILES
    assert all(len(line) == 2 and line[1] for line in lines)

    with open(os.path.join(out, "dataset_info.json")) as f:
        info = json.load(f)
    fingerprint = info["splits"]["train"].pop("fingerprint")  # (its own test: test_loop)
    assert isinstance(fingerprint, str) and len(fingerprint) == 16
    assert info == {
        "format": "tok1d.array_record.v1",
        "class_names": CLASSES,
        "splits": {"train": {
            "num_examples": len(good),
            "shards": ["train.array_record-00000-of-00002",
                       "train.array_record-00001-of-00002"],
            "num_skipped": len(BAD_FILES),
        }},
    }
    assert not _work_files(out)

    source, recs = _read_all(out, "train")
    assert len(source) == len(good)
    assert source.num_classes == 3 and source.class_names == CLASSES
    assert sorted(r["filename"] for r in recs) == sorted(good)
    # Shuffled: not in the sorted scan order.
    assert [r["filename"] for r in recs] != sorted(good)
    _check_records(recs, good, root)
    assert "skipped" in prepare_lib.format_summary(summary)


def test_val_fraction_and_merge(tree, tmp_path):
    root, good = tree
    out = str(tmp_path / "out")
    summary = prepare_lib.prepare(root, out, val_fraction=0.3, workers=1)
    _, train = _read_all(out, "train")
    _, val = _read_all(out, "validation")
    train_files = {r["filename"] for r in train}
    val_files = {r["filename"] for r in val}
    assert not train_files & val_files
    assert train_files | val_files == set(good)
    # Every class gives files to validation (some may be skipped bad ones).
    val_skipped = {p for p, _ in summary["splits"]["validation"]["skipped"]}
    train_skipped = {p for p, _ in summary["splits"]["train"]["skipped"]}
    assert val_skipped | train_skipped == BAD_FILES
    assert {f.split("/")[0] for f in val_files | val_skipped} == set(CLASSES)
    assert summary["splits"]["validation"]["num_examples"] == len(val)
    _check_records(train + val, good, root)

    # Same seed -> same result.
    out2 = str(tmp_path / "out2")
    prepare_lib.prepare(root, out2, val_fraction=0.3, workers=1)
    _, val2 = _read_all(out2, "validation")
    assert [r["filename"] for r in val2] == [r["filename"] for r in val]

    # Writing another split into the same output merges the info file.
    prepare_lib.prepare(root, out, split="extra", workers=1, resize_shorter=8)
    with open(os.path.join(out, "dataset_info.json")) as f:
        info = json.load(f)
    assert set(info["splits"]) == {"train", "validation", "extra"}
    _, extra = _read_all(out, "extra")
    assert len(extra) == len(good)
    for rec in extra:
        assert min(records.decode_image(rec["image"]).shape[:2]) <= 8
    # A split the output holds is not written again unless asked (`--replace`).
    with open(os.path.join(out, "dataset_info.json")) as f:
        before = f.read()
    with pytest.raises(ValueError, match="already holds split 'train' .* pass --replace"):
        prepare_lib.prepare(root, out, workers=1, seed=5)
    with pytest.raises(ValueError, match="already holds split 'extra'"):
        prepare_lib.prepare(root, out, split="extra", workers=1)
    with open(os.path.join(out, "dataset_info.json")) as f:
        assert f.read() == before
    prepare_lib.prepare(root, out, split="extra", workers=1, replace=True)
    _, extra = _read_all(out, "extra")
    assert min(records.decode_image(extra[0]["image"]).shape[:2]) > 8  # full size now


def test_class_mismatch_fails(tree, tmp_path):
    root, _ = tree
    out = str(tmp_path / "out")
    prepare_lib.prepare(root, out, workers=1)
    other = tmp_path / "other"
    _save(str(other / "zebra" / "a.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="different classes"):
        prepare_lib.prepare(str(other), out, split="zebra", workers=1)


def test_cli(tree, tmp_path):
    root, good = tree
    out = str(tmp_path / "cli_out")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tok1d.cli.prepare", f"--input={root}",
         f"--out={out}", "--workers=2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped (could not decode): {len(BAD_FILES)}" in proc.stdout
    assert f"train: {len(good)} examples" in proc.stdout
    assert "cat/bad.jpg" in proc.stdout


def test_missing_input_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="Input directory not found"):
        prepare_lib.prepare(str(tmp_path / "nope"), str(tmp_path / "out"))


def test_no_classes_or_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No class subfolders"):
        prepare_lib.prepare(str(tmp_path / "empty"), str(tmp_path / "o1"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="No image files"):
        prepare_lib.prepare(str(tmp_path / "noimg"), str(tmp_path / "o2"))


def test_source_errors(tree, tmp_path):
    root, _ = tree
    with pytest.raises(FileNotFoundError, match="not found"):
        records.ArrayRecordImageSource(str(tmp_path / "missing"), "train")
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        records.ArrayRecordImageSource(str(tmp_path), "train")
    out = str(tmp_path / "out")
    prepare_lib.prepare(root, out, workers=1)
    with pytest.raises(KeyError, match="available splits: train"):
        records.ArrayRecordImageSource(out, "test")
    shard = next(f for f in os.listdir(out) if ".array_record" in f)
    with open(os.path.join(out, shard), "wb") as f:  # damaged: not an ArrayRecord file
        f.write(b"junk" * 4)
    with pytest.raises(errors.UserError, match="a shard is not a readable ArrayRecord file"):
        records.ArrayRecordImageSource(out, "train")


def test_records_and_decode_image():
    raw = records.encode_record(b"\x01\x02", 7, "a/b.png")
    assert records.decode_record(raw) == {
        "image": b"\x01\x02", "label": 7, "filename": "a/b.png"}
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for array in (gray, gray[:, :, None]):
        out = records.decode_image(array)
        assert out.shape == (3, 4, 3)
        np.testing.assert_array_equal(out[:, :, 2], gray)
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert records.decode_image(rgba).shape == (2, 2, 3)
    buf = io.BytesIO()
    Image.fromarray(gray).convert("P").save(buf, format="PNG")
    np.testing.assert_array_equal(
        records.decode_image(buf.getvalue())[:, :, 0], gray)
    with pytest.raises(records.CorruptImageError, match="x.jpg"):
        records.decode_image(b"not an image", name="x.jpg")


def test_interrupted_run_leaves_dataset_intact(tree, tmp_path, monkeypatch):
    root, good = tree
    out = str(tmp_path / "out")
    prepare_lib.prepare(root, out, workers=1)
    with open(os.path.join(out, "dataset_info.json")) as f:
        before = f.read()

    calls = []

    def failing_encode(*args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt("simulated interruption")
        return records.encode_record(*args)

    monkeypatch.setattr(prepare_lib.records, "encode_record", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(root, out, workers=1, num_shards=3, seed=1, replace=True)
    monkeypatch.undo()
    with open(os.path.join(out, "dataset_info.json")) as f:
        assert f.read() == before
    assert not _work_files(out)
    assert len(records.ArrayRecordImageSource(out, "train")) == len(good)


def test_summary_truncates_skipped_list():
    skipped = [(f"c/{i}.jpg", "bad") for i in range(25)]
    summary = {
        "input_dir": "in", "output_dir": "out", "class_names": ["c"],
        "splits": {"train": {
            "num_examples": 1, "num_skipped": 25, "skipped": skipped,
            "shards": ["s"], "skipped_file": "out/skipped_train.txt"}},
        "num_skipped": 25, "num_ignored": 0, "bytes_written": 10,
        "elapsed_s": 1.0, "images_per_s": 1.0,
    }
    text = prepare_lib.format_summary(summary)
    assert "c/19.jpg" in text and "c/20.jpg" not in text
    assert "... and 5 more" in text and "out/skipped_train.txt" in text


def test_odd_inputs_are_read_right_or_refused_in_one_line(tmp_path):
    """16-bit gray images keep their levels (top 8 bits; PIL's convert clipped them to white),
    floating-point ones are skipped with a reason; a class folder without images is refused
    (labels that never occur, as ImageFolder refuses); a folder link back into the tree neither
    hangs nor duplicates images; image files outside the class folders are named."""
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    wide = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)
    Image.fromarray(wide).save(root / "a" / "gray16.png")  # mode I;16 (or I)
    Image.fromarray(np.full((6, 6), 0.5, np.float32)).save(root / "a" / "float.tif")
    _save(str(root / "b" / "x.png"), np.zeros((8, 8, 3), np.uint8), "PNG")
    os.symlink(root, root / "b" / "loop")  # back to the input folder: a cycle
    _save(str(root / "stray.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    summary = prepare_lib.prepare(str(root), str(tmp_path / "out"))
    source, recs = _read_all(str(tmp_path / "out"), "train")
    assert sorted(r["filename"] for r in recs) == ["a/gray16.png", "b/x.png"]
    gray = next(r for r in recs if r["filename"] == "a/gray16.png")
    pixels = records.decode_image(gray["image"])
    np.testing.assert_array_equal(pixels[..., 0], (wide >> 8).astype(np.uint8))
    skipped = dict(summary["splits"]["train"]["skipped"])
    assert "floating-point" in skipped["a/float.tif"]
    text = prepare_lib.format_summary(summary)
    assert "directly in the input folder, not in a class folder: 1 (e.g. stray.png)" in text
    (root / "c").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) .* hold no image files \(c;"):
        prepare_lib.prepare(str(root), str(tmp_path / "out2"))


def test_an_undecodable_record_in_training_names_its_file():
    from tok1d.data import pipeline
    src = [{"image": b"not an image", "label": 0, "filename": "cat/broken.jpg"}] * 4
    ds = pipeline.train_dataset(src, global_batch=2, host_start=0, host_stop=2, seed=0,
                                image_size=8, augment="random_crop", flip=False,
                                min_scale=1.0)
    with pytest.raises(records.CorruptImageError, match=r"file 'cat/broken.jpg'"):
        next(iter(ds))


def _png_bytes(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_names_that_are_not_utf8_are_stored_escaped(tmp_path):
    """A file name whose bytes are not UTF-8 (e.g. Latin-1 'é') is written as a \\xNN escape,
    to the records and to the skipped list, instead of failing the whole run."""
    root = os.fsencode(str(tmp_path / "in"))
    for folder in (b"cat", b"dog"):
        os.makedirs(os.path.join(root, folder))
    for name, data in ((b"cat/ok\xe9.png", _png_bytes()), (b"cat/bad\xe9.jpg", b"junk"),
                       (b"dog/x.png", _png_bytes(9))):
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    out = str(tmp_path / "out")
    prepare_lib.prepare(os.fsdecode(root), out, workers=1)
    _, recs = _read_all(out, "train")
    assert sorted(r["filename"] for r in recs) == ["cat/ok\\xe9.png", "dog/x.png"]
    with open(os.path.join(out, "skipped_train.txt"), encoding="utf-8") as f:
        assert f.read().startswith("cat/bad\\xe9.jpg\t")


def test_a_failed_commit_keeps_the_split_it_would_replace(tree, tmp_path, monkeypatch):
    root, good = tree
    out = str(tmp_path / "out")
    prepare_lib.prepare(root, out, workers=1)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}

    real = prepare_lib._write_text

    def failing(path, text):
        if "skipped_" in path:
            raise OSError("simulated: disk full")
        real(path, text)

    monkeypatch.setattr(prepare_lib, "_write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare_lib.prepare(root, out, workers=1, seed=1, replace=True)
    monkeypatch.undo()
    after = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert after == before  # the same files, unchanged: no temporary file left either
    assert len(records.ArrayRecordImageSource(out, "train")) == len(good)


def test_a_token_dataset_is_not_overwritten(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "tokens_info.json").write_text("{}")
    (out / "train.array_record-00000-of-00001").write_bytes(b"codes")
    with pytest.raises(ValueError, match="holds a token dataset .* another --out"):
        prepare_lib.prepare(root, str(out), workers=1)
    assert sorted(os.listdir(out)) == ["tokens_info.json", "train.array_record-00000-of-00001"]
    assert (out / "train.array_record-00000-of-00001").read_bytes() == b"codes"


def test_replacing_the_split_a_validation_split_was_taken_from(tree, tmp_path):
    """Writing 'train' again without --val_fraction would leave a 'validation' split whose
    images are in 'train' too: refused; with --val_fraction both are written anew."""
    root, good = tree
    out = str(tmp_path / "out")
    prepare_lib.prepare(root, out, val_fraction=0.3, workers=1)
    with open(os.path.join(out, "dataset_info.json")) as f:
        before = f.read()
    assert json.loads(before)["splits"]["validation"]["split_off_from"] == "train"
    with pytest.raises(ValueError, match=r"'validation' split .* was taken from 'train' by "
                                         r"--val_fraction=0.3: .* pass --val_fraction again"):
        prepare_lib.prepare(root, out, workers=1, replace=True)
    with open(os.path.join(out, "dataset_info.json")) as f:
        assert f.read() == before
    prepare_lib.prepare(root, out, val_fraction=0.5, workers=1, replace=True)
    _, train = _read_all(out, "train")
    _, val = _read_all(out, "validation")
    assert not {r["filename"] for r in train} & {r["filename"] for r in val}
    prepare_lib.prepare(root, out, split="extra", workers=1)  # another split: not concerned


def test_a_class_whose_images_all_fail_to_decode_is_refused(tmp_path):
    root = tmp_path / "in"
    _save(str(root / "a" / "x.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    (root / "b").mkdir()
    (root / "b" / "broken.jpg").write_bytes(b"junk")
    (root / "b" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 class folder\(s\) .* hold no image that decodes "
                                         r"\(b; e.g. b/(broken.jpg|empty.png): "
                                         r".*Nothing was written"):
        prepare_lib.prepare(str(root), str(out), workers=1)
    assert not out.exists()  # (created by the run, nothing written: removed)


def test_a_damaged_shard_is_named(tree, tmp_path):
    """Bytes overwritten in the middle of a shard: reading its records fails in one line that
    names the shard (the reader's own error names no file)."""
    root, good = tree
    out = str(tmp_path / "out")
    prepare_lib.prepare(root, out, workers=1)
    shard = os.path.join(out, "train.array_record-00000-of-00001")
    damage_records(shard)
    assert_damage_is_named(records.ArrayRecordImageSource(out, "train"),
                           f"Shard '{shard}' of split 'train' is damaged: record \\d+ cannot "
                           "be read")


def test_a_record_that_is_not_an_image_record_is_named(tmp_path):
    from array_record.python import array_record_module
    out = tmp_path / "out"
    out.mkdir()
    writer = array_record_module.ArrayRecordWriter(
        str(out / "train.array_record-00000-of-00001"), "group_size:1")
    writer.write(records.encode_record(_png_bytes(), 0, "a/x.png"))
    writer.write(b"\x01\x02not msgpack")
    writer.close()
    (out / "dataset_info.json").write_text(json.dumps({
        "format": records.FORMAT_VERSION, "class_names": ["a"],
        "splits": {"train": {"num_examples": 2,
                             "shards": ["train.array_record-00000-of-00001"]}}}))
    source = records.ArrayRecordImageSource(str(out), "train")
    assert source[0]["filename"] == "a/x.png"
    with pytest.raises(ValueError, match=r"Record 1 of split 'train' of .*: not a tok1d image "
                                         r"record \(ExtraData"):
        source[1]


def _work_files(out):
    """The temporary files in OUT (none where OUT was removed: a run that created it and
    wrote nothing)."""
    return [f for f in os.listdir(out) if ".tmp-" in f] if os.path.isdir(out) else []


def _small_tree(root, classes=("a", "b"), per_class=40):
    for name in classes:
        for i in range(per_class):
            _save(os.path.join(root, name, f"{i:03d}.png"),
                  np.full((8, 8, 3), i, np.uint8), "PNG")


def _interrupted_prepare(tmp_path, interrupt, ready=lambda proc: True):
    """(exit status, stderr, OUT) of `tok1d prepare` with two workers, `interrupt(proc)`
    mid-way: once its temporary shards exist and `ready(proc)`. A FIFO among the images blocks
    a worker, so the run is always mid-way then."""
    import signal
    import time
    root = tmp_path / "in"
    _small_tree(str(root))
    os.mkfifo(root / "b" / "zz_blocks.png")  # opened for reading: waits for a writer forever
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tok1d.cli.prepare", f"--input={root}", f"--out={out}",
         "--workers=2", "--seed=1"], env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and [f for f in os.listdir(out) if ".tmp-" in f]
                   and ready(proc)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # (the writer waits for the FIFO's chunk now)
        interrupt(proc)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            raise AssertionError(f"still running 60 s after the interruption:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err, out


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "killpg"),
                    reason="needs FIFOs and process groups")
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("to", ["parent", "group", "thread"])
def test_a_signal_stops_prepare_at_once_and_removes_its_temporary_files(tmp_path, signum, to):
    """SIGTERM (a scheduler's limit, `kill PID`) left the split's shards: they are all
    temporary until the last is written. SIGINT or SIGTERM now end the run at once (rc 130 or 143),
    its temporary files removed, sent to the parent, to the whole process group (a terminal's
    Ctrl-C, SLURM), or handed by the kernel to a thread other than the main one (`kill TID`
    of one of the parent's threads: the main thread waited on a lock that only a signal of
    its own interrupts, and hung; ~1 in 16 group signals did that)."""
    import signal
    if to == "thread" and not os.path.isdir(f"/proc/{os.getpid()}/task"):
        pytest.skip("needs /proc/PID/task to find a thread")
    number = getattr(signal, signum)

    def interrupt(proc):
        if to == "group":
            os.killpg(proc.pid, number)
        elif to == "thread":  # (the pool's threads are started by now)
            threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
            os.kill(max(t for t in threads if t != proc.pid), number)
        else:
            os.kill(proc.pid, number)

    rc, err, out = _interrupted_prepare(tmp_path, interrupt)
    assert rc == 128 + number, err  # (SIGTERM said it was Ctrl-C: 130)
    assert err.strip().splitlines()[-1].startswith("interrupted"), err  # (or its watchdog's)
    assert "Traceback" not in err, err
    assert not _work_files(out)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.isdir("/proc/self/task"),
                    reason="needs FIFOs and /proc")
def test_a_decoding_worker_killed_alone_stops_prepare_with_one_line(tmp_path):
    """A worker killed alone (the out-of-memory killer's choice: the biggest process) lost
    its task, and the run waited for it forever (multiprocessing.Pool does not notice). It
    now stops with one line, its temporary files removed, the output as it was."""
    import signal

    def workers(proc):  # the processes of the run's session that the parent did not start
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ppid, session = int(fields[1]), int(fields[3])
            if session == proc.pid and int(pid) != proc.pid and ppid != proc.pid:
                found.append(int(pid))
        return found

    rc, err, out = _interrupted_prepare(
        tmp_path, lambda proc: os.kill(workers(proc)[0], signal.SIGKILL),
        ready=lambda proc: len(workers(proc)) == 2)
    assert rc not in (0, 130), err
    assert "a decoding worker process died" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err, err
    assert not _work_files(out)
    assert not (out / "dataset_info.json").exists()


def test_temporary_files_of_a_killed_run_are_removed(tmp_path, caplog):
    """`kill -9` cannot clean up: a later run removes the temporary files of this host's
    exited processes and keeps a live one's (two runs into one OUT)."""
    import socket
    from tok1d import workfiles
    root, out = tmp_path / "in", tmp_path / "out"
    _small_tree(str(root), per_class=2)
    out.mkdir()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    dead = f".train.array_record-00000-of-00001.tmp-+{host}+{exited}+0123456789ab"
    live = f".train.array_record-00000-of-00001.tmp-+{host}+{os.getppid()}+0123456789ab"
    for name in (dead, live):
        (out / name).write_bytes(b"partial shard")
    with caplog.at_level("INFO"):
        prepare_lib.prepare(str(root), str(out), workers=1)
    assert (out / live).exists() and not (out / dead).exists()
    assert "temporary files of a killed run" in caplog.text and dead in caplog.text
    assert prepare_lib._new_token().startswith(workfiles.owner_tag())


def test_folders_that_are_not_read_are_named(tmp_path, monkeypatch):
    """An unreadable folder was dropped without a word (and an unreadable class folder was
    called empty); a link from one class into another's folder moved those images to the
    first class (whichever came first in the walk took them); hidden folders (which
    torchvision's ImageFolder reads) were skipped unnamed. ImageFolder's .ppm / .pgm count."""
    root = tmp_path / "in"
    _small_tree(str(root), classes=("a", "b", "c"), per_class=1)
    _save(str(root / "b" / "sub" / "in_b.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    os.symlink(root / "b" / "sub", root / "a" / "shortcut")
    _save(str(root / "a" / ".ipynb_checkpoints" / "x.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    (root / ".cache").mkdir()
    _save(str(root / "c" / "locked" / "y.png"), np.zeros((4, 4, 3), np.uint8), "PNG")
    _save(str(root / "c" / "z.ppm"), np.zeros((4, 4, 3), np.uint8), "PPM")
    real_scandir, locked = os.scandir, ["locked"]

    def scandir(path="."):
        if os.path.basename(str(path)) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # (root reads a chmod 000 folder anyway)
    summary = prepare_lib.prepare(str(root), str(tmp_path / "out"), workers=1)
    _, recs = _read_all(str(tmp_path / "out"), "train")
    labels = {r["filename"]: r["label"] for r in recs}
    assert labels["b/sub/in_b.png"] == 1 and "a/shortcut/in_b.png" not in labels
    assert labels["c/z.ppm"] == 2 and "c/locked/y.png" not in labels
    text = prepare_lib.format_summary(summary)
    assert "unreadable folders (their images are not in the output): 1 (e.g. c/locked/ " \
           "(unreadable: Permission denied))" in text
    assert "hidden folders, not read (torchvision's ImageFolder reads them): 2" in text
    assert "links into another class's folder, not read twice: 1 (e.g. a/shortcut/ (a link " \
           "into class b))" in text
    # an unreadable class folder is named as such, not as empty
    locked.append("c")
    with pytest.raises(ValueError, match=r"hold no image files \(c: c/ \(unreadable: "
                                         r"Permission denied\)"):
        prepare_lib.prepare(str(root), str(tmp_path / "out2"), workers=1)


def test_broken_links_and_files_of_other_types_are_named(tmp_path):
    """A broken link was a decoding failure ("No such file"); files of other types (.heic)
    were only counted."""
    root = tmp_path / "in"
    _small_tree(str(root), classes=("a", "b"), per_class=2)
    os.symlink(root / "gone.png", root / "b" / "dangling.png")
    os.symlink(root / "gone.png", root / "a" / "dangling.jpg")
    for name in ("x.heic", "y.HEIC", "notes"):
        (root / "a" / name).write_bytes(b"not an image")
    summary = prepare_lib.prepare(str(root), str(tmp_path / "out"), workers=1)
    assert summary["splits"]["train"]["num_examples"] == 4
    assert summary["num_skipped"] == 0
    text = prepare_lib.format_summary(summary)
    assert "broken links: 2 (e.g. a/dangling.jpg (a broken link))" in text
    assert "b/dangling.png (a broken link)" in summary["ignored"]
    assert "of which files of other types, by extension: .heic 2, no extension 1 (images " \
           "take .bmp, " in text


def test_a_full_disk_is_one_line_and_the_output_stays_as_it_was(tree, tmp_path, monkeypatch,
                                                               capsys):
    """The ArrayRecord writer's failure (a RuntimeError) came out as two tracebacks."""
    from tok1d.cli import prepare as prepare_cli
    root, good = tree
    out = tmp_path / "out"

    class Full:
        def __init__(self, path, options):
            open(path, "wb").close()

        def write(self, record):
            raise RuntimeError("write() failed: No space left on device")

        def close(self):
            raise RuntimeError("close() failed: No space left on device")

    monkeypatch.setattr(prepare_lib.array_record_module, "ArrayRecordWriter", Full)
    assert prepare_cli.main([f"--input={root}", f"--out={out}", "--workers=1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar)
    assert err.startswith("error: could not write ") and "Traceback" not in err
    assert err.endswith("No space left on device (the output is left as it was).")
    assert not _work_files(out)


def test_an_interrupted_pool_is_ended_at_once_and_a_finished_one_waits_for_its_workers():
    """An interrupted or failed run's workers may be mid-way through a file that never ends
    (a FIFO, a hung mount): they are killed, not waited for. A finished run's idle workers
    exit on their own."""
    import concurrent.futures
    import multiprocessing
    import time

    def pool():
        return concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context(prepare_lib._START_METHOD),
            initializer=prepare_lib._worker_signals)

    busy = pool()
    running = busy.submit(time.sleep, 600)
    while not running.running():
        time.sleep(0.05)
    workers = list(busy._processes.values())
    start = time.monotonic()
    prepare_lib._shut_down(busy, finished=False)
    assert time.monotonic() - start < prepare_lib.SHUTDOWN_WAIT_S
    assert not any(w.is_alive() for w in workers)
    idle = pool()
    assert idle.submit(abs, -3).result() == 3
    workers = list(idle._processes.values())
    prepare_lib._shut_down(idle, finished=True)
    assert not any(w.is_alive() for w in workers) and all(w.exitcode == 0 for w in workers)


def test_a_run_that_writes_nothing_leaves_no_output_folder(tmp_path):
    """No image decodes: the error, and no empty OUT folder left behind (an OUT that existed
    is kept)."""
    root, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="None of the 2 images of split .train. could be"):
        prepare_lib.prepare(str(root), str(out), workers=1)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ValueError):
        prepare_lib.prepare(str(root), str(out), workers=1)
    assert out.is_dir()


def test_a_split_without_shards_is_one_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "format": records.FORMAT_VERSION, "class_names": ["a"],
        "splits": {"train": {"num_examples": 0, "shards": []}}}))
    with pytest.raises(errors.UserError, match="Split 'train' of .* has no shards"):
        records.ArrayRecordImageSource(str(tmp_path), "train")
