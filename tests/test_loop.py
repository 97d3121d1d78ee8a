"""The shared training loop's host-side parts: the logged means of the step scalars (jitted
clu averages, equal to the eager collection), single-process checkpoints that write each array
whole (compressed or not), and a run's start: the train step compiled beside the state's
restore."""

import gc
import json
import logging
import os
import signal as signal_lib
import subprocess
import sys
import threading
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tok1d import errors
from tok1d.train import checkpoint, loop, programs
from tok1d.train import state as state_lib


def _replicated_steps(num_steps):
    """Step scalars as a train step returns them: replicated over a mesh of every device."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    rng = np.random.default_rng(0)
    return [{"loss": put(jnp.float32(rng.normal())), "lr": put(jnp.float32(rng.random())),
             "dead_codes": put(jnp.int32(rng.integers(0, 64)))} for _ in range(num_steps)]


def test_scalar_means_equal_the_eager_clu_average_and_compile_once():
    steps = _replicated_steps(5)
    means = loop.ScalarMeans()
    for scalars in steps[:3]:
        means.add(scalars)
    first = means.pop()
    for scalars in steps[3:]:
        means.add(scalars)
    second = means.pop()

    cls = loop.average_collection(sorted(steps[0]))
    for got, window in ((first, steps[:3]), (second, steps[3:])):
        acc = None
        for scalars in window:  # the eager way the loop used to average
            update = cls.single_from_model_output(**scalars)
            acc = update if acc is None else acc.merge(update)
        want = {k: float(v) for k, v in acc.compute().items()}
        assert got == want  # bit for bit
        for k in got:
            assert np.isclose(got[k], np.mean([float(s[k]) for s in window]), rtol=1e-6)
    # one program each for the first step, the merges and the division, whatever the steps
    assert means._merge._cache_size() == means._first._cache_size() == 1


def test_single_process_checkpoints_write_each_array_whole(tmp_path):
    checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=1, async_save=False)
    assert jax.process_count() == 1
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoints_are_uncompressed_unless_asked_and_restore_either_way(tmp_path):
    """`checkpoint.compress` (default off): zstd on or off for the arrays written; a checkpoint
    of either kind restores (values and shardings) through a Checkpointer of the other kind."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec())
    state = {"w": jax.device_put(jnp.zeros((256, 1024), jnp.float32), sharding),  # 1 MiB
             "b": jax.device_put(jnp.arange(8, dtype=jnp.int32), sharding)}
    abstract = checkpoint.abstract_with_shardings(state, jax.tree.map(lambda x: x.sharding, state))
    sizes = {}
    for compress in (False, True):
        ckpt = checkpoint.Checkpointer(str(tmp_path / str(compress)), every_steps=1, keep=1,
                                       async_save=False, compress=compress)
        assert ckpt.save(1, state, force=True)
        ckpt.close()
        sizes[compress] = _dir_bytes(tmp_path / str(compress))
        other = checkpoint.Checkpointer(str(tmp_path / str(compress)), every_steps=1, keep=1,
                                        async_save=False, compress=not compress)
        restored = other.restore(1, abstract)
        other.close()
        for k in state:
            np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
            assert restored[k].sharding == sharding
    assert sizes[False] > 2 ** 20 > 50 * sizes[True]  # zeros: raw bytes vs a few kB of zstd


def test_checkpoint_saved_is_logged_once_the_save_is_complete(tmp_path):
    """An async save's "checkpoint saved at step N" comes when the step's folder is complete
    on storage, once per save, in order (it was logged when the save started: a run killed
    then had said "saved" for a step it did not have); a save that left no folder (orbax only
    logs a failed background save) is a warning."""
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            step = int(record.getMessage().split("step ")[1].split()[0])
            seen.append((record.levelname, step,
                         os.path.isdir(tmp_path / str(step) / "state")))

    handler = Seen()
    logger = logging.getLogger("tok1d.train.checkpoint")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=2, keep=2, async_save=True)
        state = {"w": jnp.ones((256, 256), jnp.float32)}
        for step in range(1, 6):
            ckpt.save(step, state)  # saves 1 (the first), 2, 4
        assert ckpt.save(5, state, force=True)
        ckpt.wait()
        ckpt._pending.append(6)  # as a background save that failed: no folder
        ckpt.close()
        # A wait that a second Ctrl-C interrupted (orbax returned from it): the save is
        # completed by the manager's close, and then reported as saved, not as lost.
        other = checkpoint.Checkpointer(str(tmp_path / "other"), every_steps=1, keep=2,
                                        async_save=True)
        close = other.manager.close

        def completing_close():
            close()
            os.makedirs(tmp_path / "other" / "7" / "state")

        other.manager.close = completing_close
        other._pending.append(7)
        other.wait()
        assert seen[-1][1] == 6  # (nothing said of 7 yet)
        other.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen[:5] == [("INFO", 1, True), ("INFO", 2, True), ("INFO", 4, True),
                        ("INFO", 5, True), ("WARNING", 6, False)]
    assert seen[5][:2] == ("INFO", 7) and len(seen) == 6
    assert sorted(os.listdir(tmp_path)) == ["4", "5", "other"]  # keep=2: reported first

    # A background save that failed (orbax re-raises its error at the next wait): one error
    # naming the step and what to do, at the next save or at the end.
    failing = checkpoint.Checkpointer(str(tmp_path / "failing"), every_steps=1, keep=1,
                                      async_save=True)
    assert failing.save(1, state, force=True)
    wait = failing.manager.wait_until_finished

    def no_space():
        wait()
        raise OSError(28, "No space left on device")

    failing.manager.wait_until_finished = no_space
    with pytest.raises(OSError, match=r"Checkpoint \S+/1 could not be saved \(OSError: .*No "
                       r"space left.*check the storage"):
        failing.save(2, state, force=True)
    failing.manager.wait_until_finished = wait
    failing.close()


def test_a_partial_checkpoint_of_a_killed_save_is_found(tmp_path):
    """`kill -9` during a save leaves N.orbax-checkpoint-tmp-*: the next run resumed from the
    last complete checkpoint without a word about the one it dropped (start_or_resume now
    warns of `partial_saves`)."""
    state = {"w": jnp.ones((4,), jnp.float32)}
    first = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2, async_save=False)
    first.save(4, state, force=True)
    first.close()
    assert first.partial_saves() == []
    (tmp_path / "8.orbax-checkpoint-tmp-1765000000").mkdir()
    again = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2, async_save=False)
    assert again.latest_step() == 4
    assert again.partial_saves() == ["8.orbax-checkpoint-tmp-1765000000"]
    again.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_refused_with_its_step(tmp_path):
    """A checkpoint whose files are damaged (its tree metadata junk, its array index empty, an
    array's data cut short): one error naming the step and what to do, never "does
    not match this config" (said before for all but the first) nor orbax's bare Exception."""
    state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64),
             "b": jnp.zeros((4,), jnp.float32)}
    abstract = checkpoint.abstract_with_shardings(state, jax.tree.map(lambda x: x.sharding,
                                                                      state))

    def junk_metadata(state_dir):
        (state_dir / "_METADATA").write_text("junk")

    def empty_index(state_dir):
        (state_dir / "manifest.ocdbt").write_bytes(b"")

    def cut_data(state_dir):
        data = max((p for p in state_dir.rglob("*") if p.is_file() and "/d/" in str(p)),
                   key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:10])

    for damage in (junk_metadata, empty_index, cut_data):
        where = tmp_path / damage.__name__
        ckpt = checkpoint.Checkpointer(str(where), every_steps=1, keep=1, async_save=False)
        assert ckpt.save(3, state, force=True)
        damage(where / "3" / "state")
        with pytest.raises(ValueError, match=r"Checkpoint \S+/3 cannot be read .* damaged or "
                           "incomplete .* Move that step's folder aside") as failed:
            ckpt.restore(3, abstract)
        # the innermost error's words: orbax's own said "See full TensorStore details: <bound
        # method pybind11_detail_... spec of TensorStore({...", with no word of what failed
        assert "<bound method" not in str(failed.value), failed.value
        if damage is cut_data:
            assert "Error reading \"b/" in str(failed.value) or "Error reading \"w/" in str(
                failed.value), failed.value
        ckpt.close()
    # orbax's abandoned read coroutines raise when they are collected, at its next restore:
    # here (the warning filtered), not in the next test.
    good = checkpoint.Checkpointer(str(tmp_path / "good"), every_steps=1, keep=1,
                                   async_save=False)
    assert good.save(3, state, force=True)
    good.restore(3, abstract)
    # A failure that is not the files' (out of memory, a bug) comes as it is: a good checkpoint
    # must not be called damaged (the advice is to move it aside).

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 7.0 GiB")

    good.manager.restore = out_of_memory
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        good.restore(3, abstract)
    good.close()
    gc.collect()


def test_checkpoint_with_the_other_stack_layout_restores_relaid(tmp_path):
    """A run resumed with `model.scan` flipped: a checkpoint of a Transformer with unrolled
    blocks (`blocks_{i}`; params, AdamW moments, step) restores into the scanned model's state
    (`blocks`, a leading layer axis, sharded over the mesh) with every value in place, and
    back; a deeper model's checkpoint fails with the clear error instead of losing layers (as
    does one that differs otherwise: test_resume.py's
    `test_mismatched_checkpoint_fails_clearly`)."""
    import optax
    from tok1d.layers.transformer import Transformer

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    x = jnp.ones((1, 4, 16))
    tx = optax.adamw(1e-3)

    def state_of(scan, depth=3):
        model = Transformer(depth=depth, num_heads=2, mlp_dim=32, scan=scan, name="t")
        params = model.init(jax.random.key(0), x)["params"]
        params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape),
                              jax.tree.map(lambda b: b.unbox() if hasattr(b, "unbox") else b,
                                           params, is_leaf=lambda b: hasattr(b, "unbox")))
        opt = tx.init(params)
        _, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)  # mu, nu != 0
        return {"step": jnp.int32(7), "params": params, "opt_state": opt}

    def sharded(state):  # the leading axis over the mesh where it divides, else replicated
        def spec(a):
            split = a.ndim and a.shape[0] % jax.device_count() == 0
            return NamedSharding(mesh, PartitionSpec("data") if split else PartitionSpec())
        return jax.tree.map(spec, state)

    unrolled, scanned = state_of(False), state_of(True)
    assert "blocks_2" in unrolled["params"] and "blocks" in scanned["params"]
    for saved, wanted in ((unrolled, scanned), (scanned, unrolled)):
        ckpt = checkpoint.Checkpointer(str(tmp_path / f"{len(saved['params'])}"), every_steps=1,
                                       keep=1, async_save=False)
        assert ckpt.save(7, saved, force=True)
        target = checkpoint.abstract_with_shardings(wanted, sharded(wanted))
        got = ckpt.restore(7, target)
        for path, value in ocp.tree.to_flat_dict(got).items():
            want = ocp.tree.to_flat_dict(target)[path]
            assert value.shape == want.shape and value.sharding == want.sharding, path
        flat_saved = ocp.tree.to_flat_dict(jax.tree.map(np.asarray, saved))
        for path, value in ocp.tree.to_flat_dict(got).items():  # the same numbers, moved
            names = [k for k in path if k.startswith("blocks")]
            if not names:
                np.testing.assert_array_equal(value, flat_saved[path])
                continue
            i = path.index(names[0])
            for layer in range(3):
                if names[0] == "blocks":   # scanned target: layer i of the stack
                    src = flat_saved[path[:i] + (f"blocks_{layer}",) + path[i + 1:]]
                    np.testing.assert_array_equal(np.asarray(value)[layer], src)
                elif names[0] == f"blocks_{layer}":
                    src = flat_saved[path[:i] + ("blocks",) + path[i + 1:]][layer]
                    np.testing.assert_array_equal(value, src)
        ckpt.close()
    shallow = state_of(False, depth=2)  # a deeper run's checkpoint: refused, not truncated
    ckpt = checkpoint.Checkpointer(str(tmp_path / "deeper"), every_steps=1, keep=1,
                                   async_save=False)
    assert ckpt.save(7, scanned, force=True)
    with pytest.raises(ValueError, match="does not match"):
        ckpt.restore(7, checkpoint.abstract_with_shardings(shallow, sharded(shallow)))
    ckpt.close()


def test_a_same_layout_restore_reads_only_the_tree_metadata_file(tmp_path, monkeypatch):
    """The usual resume (the checkpoint's array paths are the target's) decides from orbax's
    small `_METADATA` file and restores straight away: `manager.item_metadata`, which opens
    every array's store for its shape (~10 s for a GigaTok B-L state), is not called. Empty
    nodes (None, optax's EmptyState) are no arrays on either side."""
    import optax
    from tok1d.train.state import TrainState

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    params = {"a": {"w": jnp.arange(16.0).reshape(8, 2)}, "b": jnp.ones((3,))}
    state = TrainState(step=jnp.int32(5), params=params, opt_state=tx.init(params),
                       ema_params=None, extras={"q": {"s": jnp.ones(2)}, "n": None})
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    assert ckpt.save(5, state, force=True)
    rep = NamedSharding(mesh, PartitionSpec())
    target = checkpoint.abstract_with_shardings(state, jax.tree.map(lambda _: rep, state))
    assert ckpt._saved_array_paths(5) == set(ocp.tree.to_flat_dict(target))

    def refuse(*args, **kwargs):
        raise AssertionError("item_metadata opened every array")

    monkeypatch.setattr(ckpt.manager, "item_metadata", refuse)
    got = ckpt.restore(5, target)
    np.testing.assert_array_equal(got.params["a"]["w"], params["a"]["w"])
    assert int(got.step) == 5
    ckpt.close()


def test_relayout_reads_each_array_sharded_like_its_targets_and_refuses_a_deeper_model():
    """The re-layout's read plan (`checkpoint.relayout_reads`): a scanned stack to be sliced is
    read with its layer axis whole and the rest sharded like one target layer, unrolled layers
    to be stacked sharded like one layer of the target stack, other arrays as the target has
    them; so each process reads only its shards. A checkpoint with more layers than the target
    (a stack partly used, or layers left over) gets no plan: the restore takes the straight
    path and its clear error."""
    from tok1d.layers import transformer

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    n = jax.device_count()
    sds = lambda shape, spec=None: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.float32, sharding=None if spec is None else NamedSharding(mesh, spec))
    scanned = {("t", "blocks", "w"): sds((3, n, 4)), ("t", "norm"): sds((n,))}
    unrolled = {("t", f"blocks_{i}", "w"): sds((n, 4)) for i in range(3)}
    unrolled[("t", "norm")] = sds((n,))

    target = {p: sds(x.shape, PartitionSpec("data")) for p, x in unrolled.items()}
    reads = checkpoint.relayout_reads(transformer.stack_layout_sources(scanned, target),
                                      scanned, target)
    assert reads[("t", "blocks", "w")].sharding.spec == PartitionSpec(None, "data")
    assert reads[("t", "blocks", "w")].shape == (3, n, 4)
    assert reads[("t", "norm")].sharding.spec == PartitionSpec("data")

    target = {("t", "blocks", "w"): sds((3, n, 4), PartitionSpec(None, "data")),
              ("t", "norm"): sds((n,), PartitionSpec("data"))}
    reads = checkpoint.relayout_reads(transformer.stack_layout_sources(unrolled, target),
                                      unrolled, target)
    assert all(reads[("t", f"blocks_{i}", "w")].sharding.spec == PartitionSpec("data")
               for i in range(3))

    shallow = {p: sds(x.shape, PartitionSpec()) for p, x in unrolled.items()
               if "blocks_2" not in p}
    assert checkpoint.relayout_reads(transformer.stack_layout_sources(scanned, shallow),
                                     scanned, shallow) is None       # stack layer 2 unused
    shallow = {("t", "blocks", "w"): sds((2, n, 4), PartitionSpec()),
               ("t", "norm"): sds((n,), PartitionSpec())}
    assert checkpoint.relayout_reads(transformer.stack_layout_sources(unrolled, shallow),
                                     unrolled, shallow) is None      # blocks_2 left over


def test_init_weights_of_a_deeper_model_are_refused_in_every_layout(monkeypatch):
    """`config.init.checkpoint` (`loaders.load_initial_params`) may load part of a model (groups
    it does not hold stay as initialised), but a deeper model's layer stack is refused, not
    cut to the first layers: scanned or unrolled, into scanned or unrolled."""
    from tok1d.weights import loaders

    scanned = lambda depth: {"t": {"blocks": {"w": np.ones((depth, 3), np.float32)}}}  # noqa
    unrolled = lambda depth: {"t": {f"blocks_{i}": {"w": np.full((3,), i, np.float32)}  # noqa
                                    for i in range(depth)}}
    for target in (scanned(2), unrolled(2)):
        target = dict(target, head={"b": np.zeros((2,), np.float32)})
        for deep in (scanned(4), unrolled(4)):
            monkeypatch.setattr(loaders, "load_params", lambda path, deep=deep: deep)
            with pytest.raises(ValueError, match="beyond the model's depth|model .2, 3. vs"):
                loaders.load_initial_params(target, checkpoint="ckpt")
        for same in (scanned(2), unrolled(2)):  # the same depth, without the head: loads
            monkeypatch.setattr(loaders, "load_params", lambda path, same=same: same)
            assert len(loaders.load_initial_params(target, checkpoint="ckpt")) in (1, 2)


def _start_pieces(tmp_path):
    """A checkpointer, a jitted step (state donated) and batches from a step (batch k holds
    k)."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    rep = NamedSharding(mesh, PartitionSpec())
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    shardings = {"w": rep}
    init = jax.jit(lambda rng: {"w": jax.random.normal(rng, (4, 4))}, out_shardings=shardings)
    step = jax.jit(lambda s, b: ({"w": s["w"] + b["x"].sum()}, s["w"].sum()),
                   in_shardings=(shardings, rep), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    data = grain.MapDataset.range(100).map(lambda i: {"x": np.full((2,), i, np.float32)})

    def batches_from(k):
        return (jax.device_put(b, rep) for b in data[k:].to_iter_dataset())
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=1,
                                   async_save=False)
    return ckpt, abstract, shardings, init, step, batches_from, mesh


def test_start_or_resume_compiles_the_step_beside_the_restore(tmp_path, caplog):
    """state.start_or_resume: a fresh start initialises; a resume starts the batches at its step
    (the next batch is the one the stopped run would have drawn) and restores the state; either way the
    step is compiled in a background thread and the jitted step's first call reuses it."""
    ckpt, abstract, shardings, init, step, batches_from, mesh = _start_pieces(tmp_path)
    start = state_lib.start_or_resume(ckpt, abstract, shardings, init, jax.random.key(0),
                                      batches_from, programs.PhasedStep.single(step), mesh, ())
    t = start.times
    assert start.step == 0 and not t.resumed
    assert 0 < t.lower_s < t.compile_s and t.state_s > 0
    line = loop.started_message(1, t, 0.25, 9.0)
    assert line.startswith(f"step 1 started: train step traced and compiled (or loaded from the "
                           f"compilation cache) in {t.compile_s:.1f} s beside creating or "
                           "restoring the state (trace + lowering ")
    assert "; state initialised in " in line and line.endswith(
        "; first call 0.2 s), 9.0 s after the process started")
    state = start.state
    for _ in range(3):
        batch = next(start.batches)
        state, _ = step(state, batch)
    assert float(batch["x"][0]) == 2  # the first batch was put back in front
    ckpt.save(3, state, force=True)
    want = np.asarray(state["w"])
    ckpt.close()

    ckpt, abstract, shardings, init, step, batches_from, mesh = _start_pieces(tmp_path)
    start = state_lib.start_or_resume(ckpt, abstract, shardings, init, jax.random.key(1),
                                      batches_from, programs.PhasedStep.single(step), mesh, ())
    assert start.step == 3 and start.times.resumed and start.times.state_s > 0
    assert "; state restored in " in loop.started_message(4, start.times, 0.0, None)
    np.testing.assert_array_equal(np.asarray(start.state["w"]), want)
    batch = next(start.batches)
    assert float(batch["x"][0]) == 3
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("DEBUG"), jax.set_mesh(mesh):  # as the training loop runs it
            step(start.state, batch)
    finally:
        jax.config.update("jax_log_compiles", False)
    assert not [r for r in caplog.records if "ompil" in r.getMessage()
                and "<lambda>" in r.getMessage()], [r.getMessage() for r in caplog.records]
    ckpt.close()


def test_start_or_resume_raises_the_compile_error(tmp_path):
    ckpt, abstract, shardings, init, _, batches_from, mesh = _start_pieces(tmp_path)

    def broken(state, batch):
        raise ValueError("no such op")
    with pytest.raises(ValueError, match="no such op"):
        state_lib.start_or_resume(ckpt, abstract, shardings, init, jax.random.key(0),
                                  batches_from, programs.PhasedStep.single(jax.jit(broken)),
                                  mesh, ())
    ckpt.close()


def test_a_phased_step_makes_one_program_per_phase_and_finds_the_next_switch():
    made = []

    def make(phase):
        made.append(phase)
        return jax.jit(lambda x: x + {"a": 1, "b": 10}[phase])

    steps = programs.PhasedStep(make, lambda s: "a" if s < 5 or s >= 9 else "b", (5, 9, 12))
    assert [steps.next_change(s) for s in (0, 4, 5, 8, 9, 20)] == [5, 5, 9, 9, None, None]
    assert steps.at(0) is steps.at(4) is steps.at(9) and steps.at(5) is steps.at(8)
    assert made == ["a", "b"]
    single = programs.PhasedStep.single(steps.at(0))
    assert single.at(7) is steps.at(0) and single.next_change(0) is None


def test_a_background_compile_is_reused_by_the_call_and_raises_its_error():
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    fn = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, PartitionSpec("data")))
    compiling = programs.BackgroundCompile(fn, programs.abstract_like((x,)), mesh, [])
    compiling.wait()
    assert compiling.seconds > 0
    compiles = []

    def listen(event, secs, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with jax.set_mesh(mesh):  # the same context as the compile's
            np.testing.assert_allclose(fn(x), 2 * np.sin(1.0) * np.ones((8, 4)), rtol=1e-6)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not compiles  # the call ran the executable compiled in the background
    bad = programs.BackgroundCompile(jax.jit(lambda x: x @ x), (x,), mesh, [])
    with pytest.raises(TypeError):
        bad.wait()



@pytest.mark.skipif(not hasattr(signal_lib, "pthread_kill"), reason="needs pthread_kill")
def test_waiting_for_a_background_compile_runs_a_signal_handed_to_another_thread():
    """A Ctrl-C that the kernel hands to a thread other than the main one (the process has
    many: the compile's, JAX's) ran its handler only when the compile ended: the main
    thread's join waited on a lock that only its own signals interrupt. A later `wait()`
    still waits for the compile and raises its error."""

    class Slow:  # a program whose lowering takes 5 s
        def lower(self, *args):
            time.sleep(5)
            raise RuntimeError("not compiled")

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    compiling = programs.BackgroundCompile(Slow(), (), mesh, [])
    other = threading.Thread(target=lambda: (time.sleep(0.3), signal_lib.pthread_kill(
        compiling._thread.ident, signal_lib.SIGUSR1)))

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal_lib.signal(signal_lib.SIGUSR1, handler)
    start = time.monotonic()
    try:
        other.start()
        with pytest.raises(KeyboardInterrupt):
            compiling.wait()
    finally:
        signal_lib.signal(signal_lib.SIGUSR1, previous)
        other.join()
    assert time.monotonic() - start < 3
    with pytest.raises(RuntimeError, match="not compiled"):
        compiling.wait()


_EXIT_DURING_COMPILE = """
import jax, jax.numpy as jnp, sys, time
from jax.sharding import AxisType
from tok1d.train import programs
from tok1d.cli import app

def f(x):
    for i in range(60):
        x = jnp.tanh(x @ x.T + i) @ x
    return x

mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
programs.BackgroundCompile(jax.jit(f), (jnp.ones((32, 32)),), mesh, [])
time.sleep(0.2)
assert programs.compiling()
if sys.argv[1] == "cli":
    app.exit_process(3)
"""


@pytest.mark.parametrize("how, status", [("library", 0), ("cli", 3)])
def test_a_process_ends_cleanly_while_a_step_compiles_in_the_background(how, status):
    """Interpreter exit under a running XLA compile aborts (status 134): a library user's
    process waits for the compile at exit, the command line ends at once with its status."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", _EXIT_DURING_COMPILE, how], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stderr[-2000:]
    assert "terminate called" not in done.stderr


class _MemoryCheckpoints:
    """A Checkpointer stand-in for `train_loop`: the saved steps, in memory."""

    def __init__(self):
        self.saved = []

    def save(self, step, state, force=False):  # noqa: ARG002
        self.saved.append(step)
        return True

    def reached_preemption(self, step):  # noqa: ARG002
        return False

    def report_saved(self):
        pass

    def wait(self):
        pass

    def close(self):
        pass


class _Rows:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, values):
        self.rows.append((step, values["train/x"]))

    def flush(self):
        pass


def _run_loop(tmp_path, *, total, log_every, eval_every, ckpt_every, run_eval=None,
              signal_at=None, ckpt=None, eval_periods=(), first_step=0, input_dies_at=None):
    """`train_loop` over a one-number state whose step k has the scalar x = k; the input
    fails as a dead input worker does at batch `input_dies_at`."""
    import ml_collections

    from tok1d.train.state import StartTimes, TrainState

    config = ml_collections.ConfigDict(dict(
        total_steps=total, batch_size=1, log_every_steps=log_every,
        eval_every_steps=eval_every, checkpoint=dict(every_steps=ckpt_every)))

    def input_batches():
        for k in range(1, total + 1):
            if k == input_dies_at:
                raise errors.InputWorkerDied("an input worker process died (killed).")
            yield {"x": jnp.float32(k)}

    batches = input_batches()
    step = jax.jit(lambda s, b: (s.replace(step=s.step + 1, params=s.params + b["x"]),
                                 {"x": b["x"]}, jnp.bool_(True)))

    def fn(state, batch):
        if signal_at is not None and int(batch["x"]) == signal_at:
            os.kill(os.getpid(), signal_lib.SIGTERM)
        return step(state, batch)

    ckpt, rows, evals = ckpt or _MemoryCheckpoints(), _Rows(), []
    run_eval = run_eval or (lambda s, k: evals.append(k) or {})
    result = loop.train_loop(config, str(tmp_path), TrainState(jnp.int32(0), jnp.float32(0), None),
                             first_step, programs.PhasedStep.single(fn), batches, ckpt, rows,
                             run_eval, StartTimes(0.0, 0.0, 0.0, False),
                             eval_periods=eval_periods)
    return result, rows.rows, evals, ckpt.saved


def test_a_failing_eval_comes_after_its_steps_checkpoint(tmp_path):
    """A periodic eval that fails (a missing FID reference, out of memory) comes after the
    checkpoint of its step: a rerun resumes there instead of training the interval again."""
    ckpt, seen = _MemoryCheckpoints(), []

    def failing_eval(state, step):  # noqa: ARG001
        seen.append(list(ckpt.saved))
        raise RuntimeError("eval failed")

    with pytest.raises(RuntimeError, match="eval failed"):
        _run_loop(tmp_path, total=8, log_every=2, eval_every=4, ckpt_every=4,
                  run_eval=failing_eval, ckpt=ckpt)
    assert seen == [[4]]


def test_a_dead_input_worker_stops_the_run_with_its_step_saved(tmp_path):
    """An input worker process that dies (out of memory) stopped the run with a traceback
    and lost the steps since the last checkpoint; the state is intact (the input failed, not
    the step): it is saved and the error says where the same command resumes. The same for
    an eval whose input fails (a damaged shard of its split)."""
    with pytest.raises(errors.InputWorkerDied) as raised:
        _run_loop(tmp_path, total=12, log_every=4, eval_every=0, ckpt_every=4,
                  input_dies_at=7)
    assert str(raised.value) == ("an input worker process died (killed). The run stopped at "
                                 "step 6. Checkpoint at step 6 saved: the same command "
                                 "resumes there.")

    def failing_eval(state, step):  # noqa: ARG001 (an eval split's damaged shard)
        raise errors.DamagedRecord("Shard 'x' of split 'validation' is damaged.")

    ckpt = _MemoryCheckpoints()
    with pytest.raises(errors.DamagedRecord, match="The run stopped at step 6. Checkpoint at "
                                                   "step 6 saved"):
        _run_loop(tmp_path, total=12, log_every=4, eval_every=6, ckpt_every=4,
                  run_eval=failing_eval, ckpt=ckpt)
    assert ckpt.saved == [4, 6]
    ckpt = _MemoryCheckpoints()
    with pytest.raises(errors.InputWorkerDied, match="stopped at step 0. No checkpoint"):
        _run_loop(tmp_path, total=12, log_every=4, eval_every=0, ckpt_every=4,
                  input_dies_at=1, ckpt=ckpt)
    assert ckpt.saved == []


def test_a_preempted_run_logs_its_last_partial_window(tmp_path):
    """A preemption at step 6 of windows of 4 logs the mean of steps 5-6 at step 6 (they were
    dropped) and saves step 6; periods of 0 mean only at the end (they divided by zero)."""
    result, rows, evals, saved = _run_loop(tmp_path, total=12, log_every=4, eval_every=4,
                                           ckpt_every=4, signal_at=6)
    assert result == {"step": 6, "preempted": True}
    assert rows == [(4, 2.5), (6, 5.5)] and saved == [4, 6] and evals == [4]
    result, rows, evals, saved = _run_loop(tmp_path, total=6, log_every=3, eval_every=0,
                                           ckpt_every=0)
    assert result["step"] == 6 and rows == [(3, 2.0), (6, 5.0)]
    assert evals == [6] and saved == [6]


def test_a_signal_during_an_eval_stops_at_its_step(tmp_path):
    """A preemption signal that comes during an eval (FID can take minutes) stops the run at
    that step, saved: it trained one more step first (and waited for the next phase's
    compile, when one came), which a grace period may not cover."""
    def signalling_eval(state, step):  # noqa: ARG001
        os.kill(os.getpid(), signal_lib.SIGTERM)
        return {}

    result, rows, _, saved = _run_loop(tmp_path, total=12, log_every=4, eval_every=4,
                                       ckpt_every=0, run_eval=signalling_eval)
    assert result == {"step": 4, "preempted": True}
    assert rows == [(4, 2.5)] and saved == [4]


def test_the_evals_own_periods_run_it_between_the_evals(tmp_path):
    """`evaluation.fid_every_steps` / `ar_probe.every_steps` not multiples of
    `eval_every_steps` ran only at common multiples (FID every 3 with evals every 4: at 12);
    each period now calls the eval at its own steps, and 0 adds none."""
    _, _, evals, _ = _run_loop(tmp_path, total=14, log_every=7, eval_every=4, ckpt_every=0,
                               eval_periods=(3, 0))
    assert evals == [3, 4, 6, 8, 9, 12, 14]
    _, _, evals, _ = _run_loop(tmp_path, total=6, log_every=3, eval_every=0, ckpt_every=0,
                               eval_periods=(0, 5))
    assert evals == [5, 6]


def test_a_complete_run_rerun_keeps_its_final_metrics(tmp_path, capsys):
    """Rerunning a complete run evaluated it again (a generator's 50k-sample gFID); its
    metrics.json now stands, and deleting it asks for the final eval again."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"step": 6, "gfid": 3.5}))
    result, rows, evals, saved = _run_loop(tmp_path, total=6, log_every=3, eval_every=0,
                                           ckpt_every=0, first_step=6)
    assert result == {"step": 6, "gfid": 3.5} and evals == [] and rows == [] and saved == []
    assert "final metrics are in" in capsys.readouterr().out
    metrics.write_text(json.dumps({"step": 4, "gfid": 9.0}))  # another step's: evaluated
    result, _, evals, _ = _run_loop(tmp_path, total=6, log_every=3, eval_every=0,
                                    ckpt_every=0, first_step=6)
    assert evals == [6] and result == {"step": 6}
    assert json.loads(metrics.read_text()) == {"step": 6}


def test_a_resume_on_other_training_data_is_named(tmp_path):
    """A run resumed with another data source than its checkpoints were trained on (the GPT
    recipe's default went from a token dataset to encoding the images) says so; a config.json
    written before generator.token_source counts as "dataset"; a fresh run says nothing."""
    from tok1d.train import config_lib
    config = config_lib.base_config("generator")
    config.generator.tokens = "/tokens"
    wd = str(tmp_path)
    assert loop.changed_data_settings(config, wd) == []  # no checkpoint: a fresh run
    os.makedirs(os.path.join(wd, "checkpoints", "8"))
    old = config.to_dict()
    del old["generator"]["token_source"]
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(old, f)
    assert loop.changed_data_settings(config, wd) == []
    config.data.name = "tfds:imagenet2012"  # the recipe's data, unread on a token dataset
    assert loop.changed_data_settings(config, wd) == []
    config.generator.token_source, config.generator.tokens = "images", ""
    config.generator.tokenizer = "/other_tokenizer"  # what encodes the images it trains on
    assert loop.changed_data_settings(config, wd) == [
        "data.name: 'demo' there, 'tfds:imagenet2012' now",
        "generator.token_source: 'dataset' there, 'images' now",
        "generator.tokens: '/tokens' there, '' now",
        f"generator.tokenizer: {old['generator']['tokenizer']!r} there, '/other_tokenizer' now"]
    tokenizer_config = config_lib.base_config("tokenizer")  # no generator section: data.name
    tokenizer_config.data.name = "digits"
    assert loop.changed_data_settings(tokenizer_config, wd) == [
        "data.name: 'demo' there, 'digits' now"]


def test_a_resume_on_a_dataset_prepared_again_is_named(tmp_path, capsys):
    """A dataset re-prepared under the same name is other data for a resumed run (its
    batches are not those of an uninterrupted run): the run records the size and content
    fingerprints of its splits in data.json and a resume names a change, also one of the
    same size (other images: it resumed without a word) and of the eval split (its evals
    then mix two validation sets)."""
    from tok1d.train import config_lib
    config = config_lib.base_config("tokenizer")
    wd = str(tmp_path)

    def data(n, train="a", evals="e", eval_split="/d/validation"):
        return {"train_examples": n, "train_split": "/d/train", "train_fingerprint": train,
                "eval_split": eval_split, "eval_fingerprint": evals}

    loop.start_writing(config, wd, 0, data(10)).close()  # a fresh run: recorded
    assert json.loads((tmp_path / loop.DATA_FILE).read_text()) == data(10)
    assert "Warning" not in capsys.readouterr().out
    os.makedirs(os.path.join(wd, "checkpoints", "8"))
    assert loop.changed_data(wd, data(10)) == ([], False)
    assert loop.changed_data(wd, None) == ([], False)
    assert loop.changed_data(wd, data(10, None, None)) == ([], False)  # (not known now)
    loop.start_writing(config, wd, 8, data(16)).close()
    out = capsys.readouterr().out
    assert ("Warning: resuming on other training data than the checkpoints were trained on "
            "(the training split: 10 examples there, 16 now); the data stream resumes at the "
            "same batch count, in the new data's order.") in out
    assert json.loads((tmp_path / loop.DATA_FILE).read_text()) == data(16)
    loop.start_writing(config, wd, 8, data(16, "b", "f")).close()
    out = capsys.readouterr().out
    assert ("(the training split: prepared again, as many examples (other images, order or "
            "preprocessing)); ") in out
    assert (f"Warning: the eval split {config.data.eval_split!r} was prepared again since the "
            "run's last start") in out
    # another eval split (`--config.data.eval_split`) is not the same split prepared again
    assert loop.changed_data(wd, data(16, "b", "g", "/d/test")) == ([], False)
    (tmp_path / loop.DATA_FILE).write_text('{"train_examples": 16}')  # an older run's
    assert loop.changed_data(wd, data(16, "c", "g")) == ([], False)
    (tmp_path / loop.DATA_FILE).write_text("{junk")  # unreadable: nothing known to differ
    assert loop.changed_data(wd, data(3)) == ([], False)


def test_prepare_fingerprints_the_content_of_each_split(tmp_path):
    """`tok1d prepare` records a digest of each split's records: the same images prepared
    again give the same one, other images (as many) another."""
    from PIL import Image
    from tok1d.data import prepare, records

    def prepared(name, shade):
        root = tmp_path / name
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), shade + i, np.uint8)).save(
                    root / label / f"{i}.png")
        prepare.prepare(str(root), str(tmp_path / f"{name}_out"), workers=1)
        return records.ArrayRecordImageSource(str(tmp_path / f"{name}_out"), "train")

    one, same, other = prepared("one", 10), prepared("same", 10), prepared("other", 50)
    assert len(one.fingerprint) == 16 and one.fingerprint == same.fingerprint
    assert other.fingerprint != one.fingerprint and len(other) == len(one)
    assert loop.data_record(one, other) == {
        "train_examples": 6, "train_split": str(tmp_path / "one_out" / "train"),
        "train_fingerprint": one.fingerprint,
        "eval_split": str(tmp_path / "other_out" / "train"),
        "eval_fingerprint": other.fingerprint}


def test_a_resume_with_other_schedule_settings_is_named(tmp_path):
    """A run extended with more steps (or another LR) follows another schedule from the
    resumed step on: the resume names what changed. Keys tok1d added after the run started
    (absent from its config.json) and tuples saved as JSON lists are not changes."""
    from tok1d.train import config_lib
    config = config_lib.base_config("tokenizer")
    config.total_steps = 300
    wd = str(tmp_path)
    assert loop.changed_schedule_settings(config, wd) == []  # a fresh run
    os.makedirs(os.path.join(wd, "checkpoints", "300"))
    old = json.loads(json.dumps(config.to_dict()))  # as config.json holds it: lists
    key = sorted(old["optim"])[0]
    del old["optim"][key]
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(old, f)
    assert loop.changed_schedule_settings(config, wd) == []
    config.total_steps, config.optim.lr = 1500, config.optim.lr * 2
    config.batch_size = old["batch_size"] * 2
    assert loop.changed_schedule_settings(config, wd) == [
        "total_steps: 300 there, 1500 now",
        f"batch_size: {old['batch_size']} there, {config.batch_size} now",
        f"optim.lr: {old['optim']['lr']!r} there, {config.optim.lr!r} now"]



def test_a_resume_with_other_training_settings_is_named(tmp_path):
    """A GAN's start step, the discriminator's learning rate, a loss weight, the EMA decay or
    the seed changed on a resume trained on silently (a started discriminator switched off
    again). They are named; where and how often the run logs, evaluates or saves is not."""
    from tok1d.train import config_lib
    config = config_lib.base_config("tokenizer")
    config.discriminator.start_step = 3
    wd = str(tmp_path)
    assert loop.changed_training_settings(config, wd) == []  # a fresh run
    os.makedirs(os.path.join(wd, "checkpoints", "4"))
    old = json.loads(json.dumps(config.to_dict()))
    old["key_of_an_older_tok1d"] = 1
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(old, f)
    config.checkpoint.every_steps += 1
    config.log_every_steps += 1
    config.evaluation.num_samples += 1
    config.optim.lr *= 2  # (the schedule's warning names it)
    assert loop.changed_training_settings(config, wd) == []
    config.discriminator.start_step = 8
    config.disc_optim.lr *= 2
    config.ema_decay = 0.5
    config.seed += 1
    assert loop.changed_training_settings(config, wd) == [
        f"disc_optim.lr: {old['disc_optim']['lr']!r} there, {config.disc_optim.lr!r} now",
        "discriminator.start_step: 3 there, 8 now",
        f"ema_decay: {old['ema_decay']!r} there, 0.5 now",
        f"seed: {old['seed']!r} there, {config.seed!r} now"]
