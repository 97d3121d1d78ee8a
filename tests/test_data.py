"""Sources, augmentations and eval padding of the grain pipelines."""

import gc
import glob
import io
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import skimage.data
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, JpegImagePlugin

from tok1d.data import pipeline, records, shared_batches, sources
from tok1d.data.prepare import prepare


def test_demo_source_is_deterministic_and_holds_out_eval_photos():
    train = sources.DemoSource("train", size=32)
    again = sources.DemoSource("train", size=32)
    for i in (0, 5, 31):
        a, b = train[i], again[i]
        assert a["image"].dtype == np.uint8 and a["image"].ndim == 3 and a["image"].shape[2] == 3
        np.testing.assert_array_equal(a["image"], b["image"])
    # Eval crops come from the held-out bottom strip of each photo: never from training pixels.
    photo = sources._load_photo(sources.DEMO_PHOTOS[0])
    cut = int(photo.shape[0] * (1 - sources.DEMO_EVAL_FRACTION))
    assert sources._demo_region(sources.DEMO_PHOTOS[0], 0).shape[0] == cut
    assert sources._demo_region(sources.DEMO_PHOTOS[0], 1).shape[0] == photo.shape[0] - cut
    assert sources.DemoSource("validation", size=4)[1]["label"] == 1
    with pytest.raises(IndexError):
        train[32]


def test_unknown_source_names_fail_clearly():
    with pytest.raises(ValueError, match="Unknown data source 'imagenet'"):
        sources.get_source("imagenet", "train")
    with pytest.raises(ValueError, match="splits 'train' and 'validation'"):
        sources.get_source("demo", "test2")


@pytest.mark.parametrize("augment", ["random_resized_crop", "random_crop", "adm_random_crop",
                                     "center_crop"])
def test_augmentations_give_the_requested_size_and_range(augment):
    img = (np.random.default_rng(0).uniform(size=(40, 70, 3)) * 255).astype(np.uint8)
    rng = np.random.default_rng(1)
    out = pipeline.preprocess(img, image_size=24, augment=augment, flip=True, min_scale=0.3,
                              rng=rng)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_adm_random_crop_draws_the_shorter_side_in_its_range(monkeypatch):
    seen = []
    real = pipeline.resize_shorter
    monkeypatch.setattr(pipeline, "resize_shorter",
                        lambda img, s, rule="adm": seen.append(s) or real(img, s, rule))
    img = np.zeros((40, 70, 3), np.uint8)
    for seed in range(40):
        pipeline.adm_random_crop(img, 16, np.random.default_rng(seed), min_crop_frac=0.8)
    assert len(seen) == 40  # one resize per crop: the crop keeps the drawn scale
    sizes = set(seen)
    assert sizes <= set(range(16, 21)) and len(sizes) >= 4  # 16..ceil(16 / 0.8) = 20


def test_center_crop_is_exact_when_no_resize_is_needed():
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    out = pipeline.preprocess(img, image_size=6, augment="center_crop", flip=False,
                              min_scale=1.0, rng=None)
    np.testing.assert_array_equal(out * 255.0, img[:, 1:7].astype(np.float32))


def test_train_batches_are_seeded_and_shuffled():
    src = sources.DemoSource("train", size=32)
    kw = dict(global_batch=8, host_start=0, host_stop=8, image_size=16, augment="random_crop",
              flip=True, min_scale=0.5)
    a = next(iter(pipeline.train_dataset(src, seed=0, **kw)))
    b = next(iter(pipeline.train_dataset(src, seed=0, **kw)))
    c = next(iter(pipeline.train_dataset(src, seed=1, **kw)))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (8, 16, 16, 3) and a["label"].shape == (8,)


class _CountingSource:
    """A DemoSource that counts the records read."""

    def __init__(self, size: int):
        self._source, self.reads = sources.DemoSource("train", size=size), []

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        self.reads.append(index)  # (list.append is atomic under the GIL: threads read)
        return self._source[index]


def test_the_pipeline_reads_a_few_batches_ahead_not_64():
    """A consumer slower than the input (training) leaves the reading threads
    PREFETCH_PER_THREAD batches each ahead: the buffer counted 64 batches (1.7 GB of 256-px
    canvases per process at batch 32), meant as 64 examples."""
    src = _CountingSource(64)
    it = iter(pipeline.train_dataset(src, global_batch=4, host_start=0, host_stop=4, seed=0,
                                     image_size=16, augment="random_crop", flip=False,
                                     min_scale=1.0))
    next(it)
    time.sleep(1.0)  # the threads fill their buffer
    threads = min(8, pipeline.available_cores())
    ahead = -(-len(src.reads) // 4) - 1
    assert 1 <= ahead <= shared_batches.PREFETCH_PER_THREAD * threads, ahead
    del it


def test_eval_pass_is_padded_to_whole_batches_with_a_mask():
    src = sources.DemoSource("validation", size=10)
    ds, num_batches = pipeline.eval_dataset(src, global_batch=4, host_start=0, host_stop=4,
                                            image_size=16, num_examples=-1)
    batches = list(ds)
    assert num_batches == 3 and len(batches) == 3
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.tolist() == [True] * 10 + [False] * 2
    half, _ = pipeline.eval_dataset(src, global_batch=4, host_start=2, host_stop=4,
                                    image_size=16, num_examples=-1)
    np.testing.assert_array_equal(next(iter(half))["image"], batches[0]["image"][2:])


def test_too_small_training_split_is_reported():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.train_dataset(sources.DemoSource("train", size=4), global_batch=8,
                               host_start=0, host_stop=8, seed=0, image_size=16,
                               augment="center_crop", flip=False, min_scale=1.0)


def test_prepared_folder_trains_through_the_same_pipeline(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.uniform(size=(20, 30, 3)) * 255).astype(np.uint8)).save(
                root / c / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    summary = prepare(str(root), str(tmp_path / "out"), workers=1)
    src = sources.get_source(f"array_record:{tmp_path / 'out'}", "train")
    assert len(src) == 12
    batch = next(iter(pipeline.train_dataset(src, global_batch=4, host_start=0, host_stop=4,
                                             seed=0, image_size=16, augment="random_crop",
                                             flip=True, min_scale=1.0)))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert set(batch["label"].tolist()) <= {0, 1}
    # No validation split (prepare's --val_fraction defaults to 0): one line naming the fix,
    # not a KeyError's traceback; still a KeyError for callers that look splits up.
    from tok1d import errors
    from tok1d.cli import app
    with pytest.raises(KeyError) as e:
        sources.get_source(f"array_record:{tmp_path / 'out'}", "validation")
    assert isinstance(e.value, errors.UserError)
    assert app.user_error_message(e.value) == (
        f"Unknown split 'validation' in '{tmp_path / 'out'}'; available splits: train. "
        "`tok1d prepare --val_fraction=F` (or --split) writes another; or use one it has "
        "(--split, or --config.data.train_split / eval_split).")
    assert "broken" in str(summary)


def _tfds_imagenet(data_dir, jpegs, labels) -> None:
    """A TFDS imagenet2012 train split in array_record format under `data_dir`, as `tfds build`
    writes it (tf.Example records of the JPEG bytes, label and file name; dataset_info.json),
    made without TensorFlow (tfds' own copy of the Example proto)."""
    import tensorflow_datasets as tfds  # (slow: only here)
    from tensorflow_datasets.proto import tf_example_pb2
    with sources.tfds_scratch_removed():
        builder = tfds.builder("imagenet2012", data_dir=str(data_dir),
                               file_format="array_record")
    os.makedirs(builder.data_dir)
    path = os.path.join(builder.data_dir, "imagenet2012-train.array_record-00000-of-00001")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i, (jpeg, label) in enumerate(zip(jpegs, labels)):
        example = tf_example_pb2.Example()
        feature = example.features.feature
        feature["image"].bytes_list.value.append(jpeg)
        feature["label"].int64_list.value.append(label)
        feature["file_name"].bytes_list.value.append(f"n{i:08d}.JPEG".encode())
        writer.write(example.SerializeToString())
    writer.close()
    builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name="train", shard_lengths=[len(jpegs)], num_bytes=os.path.getsize(path),
        filename_template=None)]))
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_imagenet_source_without_tensorflow(tmp_path, monkeypatch):
    """tfds:imagenet2012 (array_record) reads without TensorFlow, and its JPEGs reach the
    pipeline as their bytes, decoded there at a reduced size where the crop shrinks them (as a
    `tok1d prepare` folder's): the same batch as the folder's, not tfds' full-size decode."""
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    jpegs = []
    for photo in photos:
        out = io.BytesIO()
        Image.fromarray(photo).save(out, "JPEG", quality=90)
        jpegs.append(out.getvalue())
    _tfds_imagenet(tmp_path / "tfds", jpegs, [3, 1, 4])
    src = sources.get_source("tfds:imagenet2012", "train", data_dir=str(tmp_path / "tfds"))
    assert len(src) == 3 and src.num_classes == 1000
    assert [src[i]["image"] for i in range(3)] == jpegs
    assert [src[i]["label"] for i in range(3)] == [3, 1, 4]

    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real(self, mode, size))

    class Decoded:  # the same images, decoded in full first (what tfds' decode would give)
        def __len__(self):
            return len(src)

        def __getitem__(self, i):
            return dict(src[i], image=records.decode_image(src[i]["image"]))

    def batch(source):
        dataset, _ = pipeline.eval_dataset(source, global_batch=3, host_start=0, host_stop=3,
                                           image_size=64)
        return next(iter(dataset))
    fast, full = batch(src), batch(Decoded())
    assert len(drafts) == 3  # every JPEG decoded at a reduced size
    assert fast["image"].shape == (3, 64, 64, 3) and fast["label"].tolist() == [3, 1, 4]
    diff = np.abs(fast["image"].astype(int) - full["image"].astype(int))
    assert diff.mean() < 2.0  # the reduced-size decode's documented bound (pipeline.py)
    assert "tensorflow" not in sys.modules


def test_tfds_dataset_not_prepared_is_one_line(tmp_path):
    """The recipes' default data (tfds:imagenet2012) where nothing was prepared, and a dataset
    TFDS does not know: a FileNotFoundError that the command line prints as one line, and no
    empty scratch folder of tfds' left in the temp dir."""
    from tok1d.cli import app
    scratch = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(scratch))
    cases = [("tfds:imagenet2012", "has no prepared split 'train'", "tok1d prepare",
              "--config.data.data_dir; tok1d tokenize: --data_dir"),
             ("tfds:no_such_dataset_xyz", "TFDS knows no dataset", "no_such_dataset_xyz")]
    for name, *expected in cases:
        with pytest.raises(FileNotFoundError) as e:
            sources.get_source(name, "train", data_dir=str(tmp_path))
        line = app.user_error_message(e.value)
        assert line is not None and "\n" not in line, line
        assert all(part in line for part in expected) and str(tmp_path) in line, line
    assert set(glob.glob(scratch)) <= before


def _batches(ds, count):
    it = iter(ds)
    out = [next(it) for _ in range(count)]
    del it
    return out


@pytest.mark.parametrize("resize_on", ["host", "device"])
def test_worker_processes_give_the_batches_of_one_process(resize_on):
    """Worker processes (their images through reused shared memory, `shared_batches`) yield
    exactly the batches of the main process, from any start batch; a resumed run and a
    single-process run see the same stream. The small arrays (labels, masks, geometry) come
    through grain's queue, not in a shared-memory segment each (~0.25 ms apiece)."""
    src = sources.DemoSource("train", size=24)
    kw = dict(global_batch=4, host_start=0, host_stop=4, seed=3, image_size=16,
              augment="random_crop", flip=True, min_scale=1.0, resize_on=resize_on)
    plain = _batches(pipeline.train_dataset(src, num_workers=0, **kw), 9)
    workers = _batches(pipeline.train_dataset(src, num_workers=2, **kw), 9)
    resumed = _batches(pipeline.train_dataset(src, num_workers=2, start_batch=5, **kw), 4)
    for want, got in zip(plain, workers):
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
            assert type(got[key]) is np.ndarray, (key, type(got[key]))
    for want, got in zip(plain[5:], resumed):
        np.testing.assert_array_equal(got["image"], want["image"])
    evals = [list(pipeline.eval_dataset(src, global_batch=4, host_start=0, host_stop=4,
                                        image_size=16, num_examples=10, num_workers=n,
                                        resize_on=resize_on)[0]) for n in (0, 2)]
    assert len(evals[1]) == 3
    for want, got in zip(*evals):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["mask"], want["mask"])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm")
def test_shared_rings_are_reused_and_removed_with_their_iterator(monkeypatch):
    """A worker writes each batch into the lowest free slot of its ring (so a slot's pages are
    allocated once, not per batch; the main process frees a slot as it takes the batch) and
    the rings leave /dev/shm with their iterator."""
    slots_used, names = [], []
    real_take, real_init = shared_batches._Rings.take, shared_batches._Rings.__init__

    def take(self, batch):
        slots_used.append(int(batch[shared_batches.TICKET][1]))
        return real_take(self, batch)

    def init(self, *args):
        real_init(self, *args)
        names.extend(self.names)
    monkeypatch.setattr(shared_batches._Rings, "take", take)
    monkeypatch.setattr(shared_batches._Rings, "__init__", init)
    src = sources.DemoSource("train", size=24)
    it = iter(pipeline.train_dataset(src, global_batch=4, host_start=0, host_stop=4, seed=0,
                                     image_size=16, augment="random_crop", flip=False,
                                     min_scale=1.0, num_workers=1))
    for _ in range(16):
        batch = next(it)
        assert batch["image"].shape == (4, 16, 16, 3) and shared_batches.TICKET not in batch
    assert len(names) == 1 and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    held = 2 * shared_batches.PREFETCH_PER_THREAD * 2  # the worker's threads' buffers, twice
    assert len(slots_used) == 16 and max(slots_used) < held, slots_used
    # grain's set_state would drop batches whose slots then stay taken (a hang): refused
    with pytest.raises(NotImplementedError, match="start_batch"):
        it.set_state(it.get_state())
    del it
    gc.collect()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


def test_workers_fall_back_to_grains_segments_without_room_in_dev_shm(monkeypatch, caplog):
    """A /dev/shm too small for the rings (a container's 64 MB; here 1 MB): the batches come
    through grain's own segments, the same batches, with a warning that says how to give it
    room."""
    monkeypatch.setattr(shared_batches, "shm_free_bytes", lambda: 1 << 20)
    monkeypatch.setattr(shared_batches, "_Rings", None)  # (never made)
    src = sources.DemoSource("train", size=24)
    kw = dict(global_batch=4, host_start=0, host_stop=4, seed=0, image_size=64,
              augment="random_crop", flip=False, min_scale=1.0, resize_on="device")
    with caplog.at_level("WARNING"):
        got = _batches(pipeline.train_dataset(src, num_workers=2, **kw), 3)
    assert "--shm-size" in caplog.text and "/dev/shm" in caplog.text
    for want, batch in zip(_batches(pipeline.train_dataset(src, num_workers=0, **kw), 3), got):
        np.testing.assert_array_equal(batch["image"], want["image"])


def test_live_rings_keep_their_room_in_dev_shm(monkeypatch, caplog):
    """A ring's pages come on first use: a second pipeline (the eval stream beside training's)
    counts the room the first one's rings may still fill, and takes grain's way when the rest
    is too little (it would have died later of SIGBUS in a full /dev/shm)."""
    src = sources.DemoSource("train", size=24)
    kw = dict(global_batch=4, host_start=0, host_stop=4, seed=0, image_size=64,
              augment="random_crop", flip=False, min_scale=1.0, num_workers=1)
    one_ring = (shared_batches.HEADER_BYTES + (2 * shared_batches.PREFETCH_PER_THREAD * 2
                                              + shared_batches.EXTRA_SLOTS) * 4 * 64 * 64 * 3)
    monkeypatch.setattr(shared_batches, "shm_free_bytes", lambda: int(1.5 * one_ring))
    with caplog.at_level("WARNING"):
        first = iter(pipeline.train_dataset(src, **kw))
        assert "--shm-size" not in caplog.text
        second = iter(pipeline.train_dataset(src, **kw))
        assert "--shm-size" in caplog.text
        np.testing.assert_array_equal(next(first)["image"], next(second)["image"])
    del first, second
    gc.collect()
    assert shared_batches._reserved[0] == 0


_KILLED_PARENT = r"""
import multiprocessing, os, signal, sys, threading, time
from absl import flags
flags.FLAGS.mark_as_parsed()
from tok1d.data import pipeline, sources
src = sources.DemoSource("train", size=24)
it = iter(pipeline.train_dataset(src, global_batch=4, host_start=0, host_stop=4, seed=0,
                                 image_size=16, augment="random_crop", flip=False,
                                 min_scale=1.0, num_workers=2))
if sys.argv[1] == "after_first_batch":
    next(it)
else:  # while the workers start: before any of them reached its init
    threading.Thread(target=next, args=(it,), daemon=True).start()
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.001)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # (a zombie is gone, only not yet reaped)
    except FileNotFoundError:
        return False


def test_a_killed_input_worker_is_one_error_naming_the_signal():
    """An input worker killed alone (the out-of-memory killer's pick): grain's RuntimeError
    (a traceback) becomes one error naming the signal and the remedy, and any other error
    of the input passes through as itself."""
    import multiprocessing
    import signal

    import jax

    from tok1d import errors
    from tok1d.data import feeding
    src = sources.DemoSource("train", size=24)
    ds = pipeline.train_dataset(src, global_batch=4, host_start=0, host_stop=4, seed=0,
                                image_size=16, augment="random_crop", flip=False,
                                min_scale=1.0, num_workers=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    feeder = feeding.Feeder(iter(ds), sharding, 4)
    next(feeder)
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(errors.InputWorkerDied) as raised:
        for _ in range(100):  # (the batches already made come first)
            next(feeder)
    assert "killed by SIGKILL" in str(raised.value) and "dmesg" in str(raised.value)
    assert "--config.data.num_workers" in str(raised.value)
    assert feeding.worker_died(RuntimeError("bad record")) is None
    assert "exit code 3" in str(feeding.worker_died(RuntimeError(
        "Worker process was terminated unexpectedly with exit code 3")))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("when", ["after_first_batch", "while_workers_start"])
def test_input_workers_end_when_the_training_process_is_killed(when):
    """`kill -9` of a run with input worker processes: its workers lived on (holding their
    memory, /dev/shm and the dead run's output pipes: a `| tee` waited for them); they now
    end within seconds of their parent, also one killed before a worker had started (CI's
    loaded machine: the worker then read init's pid as its parent's and lived on)."""
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, when], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    proc.wait(timeout=120)
    assert len(workers) >= 2 and proc.returncode == -9
    # (a worker may still be importing when its parent dies)
    deadline = time.monotonic() + 3 * shared_batches.PARENT_POLL_S + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, "input workers outlived the killed training process"
