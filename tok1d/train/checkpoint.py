"""Checkpoints: orbax CheckpointManager over the train state, plus preemption.

- The item of a step (the train state) is named in `tok1d.weights.layout`.
- Async saves every `every_steps`, the last `keep` kept. The data needs no state of its own:
  each global batch depends only on its index, so a resumed run starts its batches at the
  restored step (`tok1d.train.state.start_or_resume`) and sees exactly the batches it would
  have seen, on any number of hosts and data workers. (Checkpoints of earlier versions also
  hold the grain iterator's per-process state, `layout.DATA_ITER_ITEM`; it is not read.)
- Restores go straight into the *current* shardings (abstract target tree). A checkpoint whose
  layer stacks have the other layout (scanned `blocks` / `layers` / `heads` against unrolled
  `blocks_{i}` / ..., e.g. a run resumed with `model.scan` flipped) is re-laid out
  (`layers.transformer.stack_layout_sources`) instead of refused: each saved array is read
  sharded like its targets, then sliced or stacked on the devices.
- One process: SIGTERM / SIGINT set a flag; the trainer saves and exits at the next step
  boundary. Several processes: SIGTERM is JAX's preemption notice, and its sync point makes all
  hosts save and stop at the same step (SIGINT stops at once).
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import signal
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from tok1d import errors
from tok1d.layers import transformer
from tok1d.weights import layout


class PreemptionFlag:
    """Turns SIGTERM/SIGINT into a polled flag; a second SIGINT interrupts at once.

    `signals`: by default SIGTERM and SIGINT in a one-process run, and none with several
    processes. There SIGTERM belongs to JAX's preemption notifier (installed by
    `jax.distributed.initialize`; a Python handler would replace it, and no host would ever
    stop), and `Checkpointer.reached_preemption` stops every host at the same step."""

    def __init__(self, signals=None):
        if signals is None:
            signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("Received %s: will save a checkpoint and stop at the next step.", name)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def single_process_array_writes() -> None:
    """One process writes each array whole. orbax's default, replica-parallel writing, has
    every replica of a replicated array write one slice of it (the hosts of a pod share the
    writes); within one process that only adds an eager slice per replica and array (on 8
    CPU devices, 12 of a small GigaTok's 15-second save)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


# A save in progress: orbax writes checkpoint N under this name and renames it when complete.
PARTIAL_PATTERN = "*.orbax-checkpoint-tmp*"


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` of the train state."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True,
                 compress: bool = False):
        """`compress`: zstd-compress the arrays written (either kind restores either way)."""
        self.directory = os.path.abspath(directory)
        if jax.process_count() == 1:
            single_process_array_writes()
        self._pending: collections.deque[int] = collections.deque()  # saves not yet reported
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every_steps, 1), max_to_keep=max(keep, 1), create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            # DATA_ITER_ITEM: named so that earlier versions' checkpoints read as before.
            self.directory, item_names=(layout.STATE_ITEM, layout.DATA_ITER_ITEM),
            item_handlers={layout.STATE_ITEM: ocp.PyTreeCheckpointHandler(
                use_compression=compress)},
            options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def partial_saves(self) -> list[str]:
        """The folders of saves in progress, or cut short: orbax writes checkpoint N under a
        temporary name and renames it when complete. A run starting in its workdir (which it
        holds: no other run saves there) finds those of a killed process."""
        return sorted(os.path.basename(p)
                      for p in glob.glob(os.path.join(self.directory, PARTIAL_PATTERN)))

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts saving `state` as checkpoint `step` (in the background when async): True if
        the step is one to save. "checkpoint saved at step N" is logged once the step's folder
        is complete (`report_saved`), not when its save starts."""
        if self._pending:  # the wait orbax's save does first, then what became of them
            self.wait()       # (before this save's end can remove one of them: `keep`)
        saved = self.manager.save(step, args=ocp.args.Composite(
            **{layout.STATE_ITEM: ocp.args.PyTreeSave(state)}), force=force)
        if saved:
            self._pending.append(step)
        self.report_saved()
        return saved

    def report_saved(self) -> None:
        """Logs "checkpoint saved at step N" for the save in flight once its step folder is in
        place: orbax writes a save under a temporary name and renames it when it is complete.
        Cheap, a stat: the loop calls it at every log step."""
        while self._pending and self._on_storage(self._pending[0]):
            self._report(self._pending.popleft())

    def _on_storage(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step)))

    def _report(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        if self._on_storage(step):
            logging.getLogger(__name__).info("checkpoint saved at step %d", step)
        else:  # (after the manager's close: the save did not complete)
            logging.getLogger(__name__).warning(
                "checkpoint at step %d was not completed when the run stopped (its save was "
                "interrupted): the next run resumes from the one before it", step)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state of checkpoint `step`, restored into `abstract_state`
        (ShapeDtypeStructs carrying the target shardings)."""
        target = _shapes(abstract_state)
        if self._saved_array_paths(step) != set(target):
            # The other layer-stack layout? Decided on shapes, before any array is read. (Same
            # paths: the straight restore below, which refuses other shapes itself.)
            try:
                saved_meta = self.manager.item_metadata(step)[layout.STATE_ITEM]
            except OSError as e:  # a storage error need not mean a damaged checkpoint
                raise OSError(f"Checkpoint {self.directory}/{step}: its metadata could not be "
                              f"read ({e}); check the storage and try again.") from e
            except (ValueError, KeyError, TypeError) as e:
                raise self._unreadable(step, e) from e
            saved = _shapes(saved_meta)
            if {p: x.shape for p, x in saved.items()} != {p: x.shape for p, x in target.items()}:
                flat_target = ocp.tree.to_flat_dict(abstract_state)
                sources = transformer.stack_layout_sources(saved, flat_target)
                reads = relayout_reads(sources, saved, flat_target)
                if reads is not None:
                    logging.getLogger(__name__).info(
                        "checkpoint %d: layer stacks re-laid out to this config's layout", step)
                    return self._restore_relaid(step, saved_meta, sources, reads, flat_target,
                                                abstract_state)
        items = {layout.STATE_ITEM: ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state))}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 (orbax / tensorstore raise bare Exceptions too)
            difference = self._difference(step, target)
            if difference:
                raise ValueError(
                    f"Checkpoint {self.directory}/{step} does not match the model/optimizer "
                    f"built from this config ({difference}). Use the config it was trained "
                    "with, or a new --workdir.") from e
            if self._saved_array_paths(step) is None or _reads_as_damaged(e):
                raise self._unreadable(step, e) from e
            raise  # anything else (out of memory, a sharding error, a bug) as it is
        state = restored.get(layout.STATE_ITEM)
        if state is None:  # orbax found the item's folder but not its tree metadata (_METADATA)
            raise self._unreadable(step, FileNotFoundError("no tree metadata of its state"))
        return state

    def _unreadable(self, step: int, error: Exception) -> ValueError:
        return ValueError(
            f"Checkpoint {self.directory}/{step} cannot be read "
            f"({errors.brief(errors.innermost(error), 300)}): "
            "its files are damaged or incomplete (or the storage failed: then try again). "
            "Move that step's folder aside to resume from an earlier checkpoint, or use a new "
            "--workdir.")

    def _difference(self, step: int, target: dict[tuple, Any]) -> str:
        """How checkpoint `step`'s arrays differ from `target`'s, in a line: counts and the
        first few paths (orbax's own message lists the whole tree); "" when they agree or the
        checkpoint's record of them cannot be read."""
        try:
            saved = _shapes(self.manager.item_metadata(step)[layout.STATE_ITEM])
        except Exception:  # noqa: BLE001 (unreadable metadata: the caller says damaged)
            return ""
        if not saved:
            return ""

        def named(paths, n=3):
            shown = ", ".join("/".join(map(str, p)) for p in sorted(paths, key=str)[:n])
            return shown + (", ..." if len(paths) > n else "")

        parts = []
        missing, extra = set(target) - set(saved), set(saved) - set(target)
        if missing:
            parts.append(f"{len(missing)} arrays not in the checkpoint: {named(missing)}")
        if extra:
            parts.append(f"{len(extra)} saved arrays not in the model: {named(extra)}")
        shaped = [p for p in set(target) & set(saved) if saved[p].shape != target[p].shape]
        if shaped:
            first = sorted(shaped, key=str)[0]
            parts.append(f"{len(shaped)} arrays of another shape, e.g. {named([first], 1)} "
                         f"saved {tuple(saved[first].shape)}, built {tuple(target[first].shape)}")
        return "; ".join(parts)

    def _saved_array_paths(self, step: int) -> Optional[set[tuple]]:
        """The paths of the arrays in checkpoint `step`, read from its tree-metadata file
        alone (orbax's `_METADATA`, written with every save: keys and value types); None if
        that file is not where this manager writes it. Cheap: `manager.item_metadata` opens
        every array's store for its shape, ~10 s for a GigaTok B-L train state on a local
        disk, and one small read per array on a bucket."""
        try:
            with open(os.path.join(layout.state_path(self.directory, step), "_METADATA"),
                      encoding="utf-8") as f:
                entries = json.load(f)["tree_metadata"].values()
            return {tuple(str(k["key"]) for k in e["key_metadata"]) for e in entries
                    if not e["value_metadata"].get("skip_deserialize", False)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _restore_relaid(self, step: int, saved_meta: Any, sources: dict[tuple, tuple],
                        reads: dict[tuple, jax.ShapeDtypeStruct], target: dict[tuple, Any],
                        abstract_state: Any) -> Any:
        """Checkpoint `step` (its metadata `saved_meta`) with its layer stacks re-laid out as
        `abstract_state` (flattened: `target`) has them, by `sources`
        (`transformer.stack_layout_sources`), each saved array read as `reads` says
        (`relayout_reads`): so every process reads only its own shards. The slices and stacks
        run on the devices, and each saved array is released once its last target is made."""
        flat_meta = ocp.tree.to_flat_dict(saved_meta)
        item = ocp.tree.from_flat_dict({p: reads.get(p, v) for p, v in flat_meta.items()},
                                       target=saved_meta)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            layout.STATE_ITEM: ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item))}))
        read = ocp.tree.to_flat_dict(restored[layout.STATE_ITEM])
        del restored  # `read` holds the only references: each array is freed once used
        uses: dict[tuple, int] = {}
        for source in sources.values():
            for p in transformer.source_paths(source):
                uses[p] = uses.get(p, 0) + 1
        arrays = {}
        for path, source in sources.items():
            want = target[path]
            if source[0] == "same":
                arrays[path] = read[source[1]]
            elif source[0] == "layer":
                arrays[path] = jax.jit(_layer_of, static_argnums=2, out_shardings=want.sharding)(
                    read[source[1]], np.int32(source[2]), want.dtype)
            else:
                arrays[path] = jax.jit(_stacked, static_argnums=1, out_shardings=want.sharding)(
                    tuple(read[p] for p in source[1]), want.dtype)
            for p in transformer.source_paths(source):  # free it after its last target
                uses[p] -= 1
                if not uses[p]:
                    del read[p]
        return ocp.tree.from_flat_dict(arrays, target=abstract_state)

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption notice (all hosts agree on the step)."""
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Waits for the saves in flight, and reports them. A background save that failed
        (storage full, permissions) raises here, as one error naming its step."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (orbax re-raises the save's own error)
            steps = list(self._pending)
            self._pending.clear()
            raise OSError(
                f"Checkpoint {self.directory}/{steps[0] if steps else '?'} could not be saved "
                f"({errors.brief(e)}): check the storage (space, permissions), then run the "
                "same command again: it resumes from the last checkpoint saved.") from e
        # (one not on storage yet: an interrupted wait, which orbax may return from; the
        # manager's close finishes it, then `close` reports it)
        self.report_saved()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            while self._pending:
                self._report(self._pending.popleft())


# What tensorstore / orbax say when a checkpoint's files cannot be read (an array's data cut
# short, an empty or missing index): `_reads_as_damaged`.
DAMAGE_MARKERS = ("DATA_LOSS", "NOT_FOUND", "Error reading", "Error decoding", "Error opening",
                  "error while reading array")


def _reads_as_damaged(error: BaseException) -> bool:
    """Whether `error` (or an error it came from) is a failure to read a checkpoint's files."""
    seen = 0
    while error is not None and seen < 10:
        if any(marker in str(error) for marker in DAMAGE_MARKERS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _shapes(tree: Any) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{flat path: shape and dtype} of a state tree, its abstract or its checkpoint metadata."""
    return {path: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
            for path, leaf in ocp.tree.to_flat_dict(tree).items() if hasattr(leaf, "shape")}


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def relayout_reads(sources: dict[tuple, tuple], saved: dict[tuple, Any],
                   target: dict[tuple, Any]) -> Optional[dict[tuple, jax.ShapeDtypeStruct]]:
    """How to read each saved array (shape, dtype, sharding) for the re-layout `sources`
    (`transformer.stack_layout_sources(saved, target)`) into `target` (flat
    ShapeDtypeStructs with NamedShardings); None unless every target array comes out with its
    shape and every saved array, and every layer of a saved stack, is used."""
    reads = {}
    for path, want in target.items():
        source = sources.get(path)
        if source is None or not isinstance(want.sharding, NamedSharding):
            return None
        mesh, spec = want.sharding.mesh, tuple(want.sharding.spec)
        if source[0] == "same":
            got, reads[source[1]] = saved[source[1]].shape, want
        elif source[0] == "layer":
            stack = saved[source[1]]
            got = stack.shape[1:]
            reads[source[1]] = jax.ShapeDtypeStruct(
                stack.shape, stack.dtype, sharding=NamedSharding(mesh, P(None, *spec)))
        else:
            got = (len(source[1]),) + tuple(saved[source[1][0]].shape)
            for p in source[1]:
                if tuple(saved[p].shape) != tuple(got[1:]):
                    return None
                reads[p] = jax.ShapeDtypeStruct(saved[p].shape, saved[p].dtype,
                                                sharding=NamedSharding(mesh, P(*spec[1:])))
        if tuple(got) != tuple(want.shape):
            return None
    return None if transformer.unused_by_layout(saved, sources) else reads


def _layer_of(stack: jax.Array, i: jax.Array, dtype: Any) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stack, i, keepdims=False).astype(dtype)


def _stacked(layers: tuple, dtype: Any) -> jax.Array:
    return jnp.stack(layers).astype(dtype)
