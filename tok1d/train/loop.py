"""The training loop shared by every trainer, and its run setup: workdir, metric writer,
config.json, mesh; progress, evaluations, checkpoints, preemption, the non-finite guard."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils

from tok1d import errors, parallel, summary
from tok1d.train import checkpoint as ckpt_lib
from tok1d.train import config_lib, programs
from tok1d.train.state import StartTimes, TrainState
from tok1d.weights import layout


def average_collection(names) -> type[clu_metrics.Collection]:
    """A clu metrics Collection averaging each named scalar over the steps it is merged over."""
    return clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in names})


class ScalarMeans:
    """Means of the train step's scalars over the steps since the last `pop` (a clu
    `average_collection`). Its updates, merges and the final division run jitted, on the
    device: one dispatch per step that waits for nothing, and one read per `pop`. (Run
    eagerly, the collection costs a few hundred dispatches per step, each across every
    device of the mesh: seconds per step on 8 CPU devices.)"""

    def __init__(self):
        self.acc, self._first, self._merge, self._compute = None, None, None, None

    def add(self, scalars: Mapping[str, Any]) -> None:
        if self._first is None:
            cls = average_collection(sorted(scalars))
            self._first = jax.jit(lambda s: cls.single_from_model_output(**s))
            self._merge = jax.jit(lambda a, s: a.merge(cls.single_from_model_output(**s)))
            self._compute = jax.jit(lambda a: a.compute())
        self.acc = (self._first(scalars) if self.acc is None
                    else self._merge(self.acc, scalars))

    def pop(self) -> dict[str, float]:
        values = jax.device_get(self._compute(self.acc))
        self.acc = None
        return {k: float(v) for k, v in values.items()}


def every(step: int, period: int) -> bool:
    """True at the steps of a period (`eval_every_steps`, `checkpoint.every_steps`; 0: off,
    only the end's)."""
    return period > 0 and step % period == 0


class NonFiniteLossError(errors.UserError, FloatingPointError):
    """The loss or gradient norm became NaN/Inf: the run stops (exit status 1), its last good
    checkpoint intact."""
    exit_code = 1


def check_finite(step: int, finite: Any, last_saved: Optional[int]) -> None:
    if not bool(jax.device_get(finite)):
        raise NonFiniteLossError(
            f"Loss or gradient norm became NaN/Inf at step {step}; the run stopped there. "
            + (f"The last good checkpoint (step {last_saved}) is intact."
               if last_saved is not None else "No checkpoint had been written yet."))


def write_json(path: str, data: Mapping[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The training loop shared by every trainer.
# -----------------------------------------------------------------------------


def final_metrics_of(workdir: str, step: int) -> Optional[dict[str, Any]]:
    """The final metrics (metrics.json) a run wrote when it completed at `step`, or None (not
    there, another step's, unreadable). Every process follows process 0's answer (a rerun of
    a complete run skips its final eval, collectives included, on all of them or on none)."""
    done = None
    try:
        data = layout.read_json(os.path.join(workdir, "metrics.json"))
        if isinstance(data, dict) and data.get("step") == step:
            done = data
    except (OSError, ValueError, errors.UserError):  # unreadable: evaluated again
        pass
    if not parallel.process_0_view([done is not None])[0]:
        return None
    return done or {"step": step}


def log_fn() -> Callable[[str], None]:
    """print (flushed) on the chief process, nothing elsewhere."""
    if jax.process_index() == 0:
        return lambda msg: print(msg, flush=True)
    return lambda msg: None


# The next phase's train step starts compiling about this long before its first step (or 3x the
# first step's compile time, when longer), so that it compiles beside training, not at the
# switch, without taking host cores from the input pipeline for the whole phase before.
COMPILE_LEAD_S = 600.0


def train_loop(config, workdir: str, state: TrainState, first_step: int,
               steps: programs.PhasedStep, feeder: Iterator[Any],
               checkpointer: ckpt_lib.Checkpointer, writer,
               run_eval: Callable[[TrainState, int], Mapping[str, Any]], times: StartTimes,
               step_args: tuple = (), eval_periods: Sequence[int] = ()) -> dict[str, Any]:
    """Steps until `config.total_steps`: averaged train scalars and progress (steps/s, img/s,
    ETA) every `log_every_steps`, `run_eval(state, step)` every `eval_every_steps`, every one
    of `eval_periods` (the periods of the eval's own parts, e.g. `evaluation.fid_every_steps`:
    `run_eval` decides what runs at a step) and at the end, checkpoints every
    `checkpoint.every_steps`, at the end, on a preemption signal and when the input fails
    (`errors.InputFailed`: a dead input worker, a damaged record; one process). A
    non-finite step stops the run before it can be saved.

    `steps.at(step)(state, batch, *step_args) -> (state, scalars, finite)` is the step of each
    phase; the next phase's step compiles in the background (under the current mesh and
    logical axis rules) from about `COMPILE_LEAD_S` (or 3x the first step's compile) before
    its first step, at the rate the steps have run, and takes over there.
    `run_eval` returns the metrics it wrote; `times`: what the start took before the loop
    (`state.start_or_resume`), logged with the first step. Returns {"step": ...,
    **final eval metrics} (also written to metrics.json)."""
    total = config.total_steps
    periods = (config.eval_every_steps, *eval_periods)
    preempt = ckpt_lib.PreemptionFlag()
    log = log_fn()
    progress = summary.ProgressReporter(total, batch_size=config.batch_size,
                                        every_steps=config.log_every_steps, first_step=first_step,
                                        print_fn=log)
    means = ScalarMeans()
    last_saved = first_step if first_step else None
    pending = None  # (step, finite flag) of the previous step, checked one step late
    step = first_step
    train_step = steps.at(step)
    change = steps.next_change(step)  # the next phase's first step
    ahead = None                      # its step, compiling in the background
    t_loop = time.perf_counter()      # reset when the first step has been dispatched
    rules = nn.get_logical_axis_rules()

    def compile_ahead(state_, batch_):
        """The next phase's step, compiling in the background for arguments like these."""
        mesh = jax.tree.leaves(state_)[0].sharding.mesh
        return programs.BackgroundCompile(
            steps.at(change), programs.abstract_like((state_, batch_, *step_args)), mesh, rules)

    def evaluate(step_):
        with progress.timed_pause():
            try:
                metrics = run_eval(state, step_)
            except errors.InputFailed as e:  # (the eval's input: its damaged shard, say)
                raise input_failed(e, step_) from e
        log(f"eval @ step {step_}: " + ", ".join(
            f"{k} {summary.format_number(v)}" for k, v in metrics.items()
            if isinstance(v, (int, float))))
        return metrics

    def stop_requested(step_) -> bool:
        return (checkpointer.reached_preemption(step_) if jax.process_count() > 1
                else preempt.is_set())

    def stopped(step_):
        """Saves the state of `step_` (unless saved) and ends the run on a preemption."""
        nonlocal last_saved
        if pending is not None:
            check_finite(*pending, last_saved)  # (a non-finite state is never saved)
        if last_saved != step_:
            with progress.timed_pause():
                if checkpointer.save(step_, state, force=True):
                    last_saved = step_
        checkpointer.wait()
        log(f"Stopped by a preemption signal at step {step_}; checkpoint saved. "
            "Run the same command again to resume.")
        return {"step": step_, "preempted": True}

    def input_failed(error: errors.InputFailed, step_) -> errors.InputFailed:
        """`error` (the input failed before step `step_ + 1`) with where to resume from,
        after saving the state of `step_` (intact: the input failed, not the step). With
        several processes the others may be inside a step: no save, the last one stands."""
        nonlocal last_saved
        if jax.process_count() == 1:
            if pending is not None:
                check_finite(*pending, last_saved)
            if last_saved != step_ and step_ > first_step:  # (trained since the start)
                with progress.timed_pause():
                    if checkpointer.save(step_, state, force=True):
                        last_saved = step_
            checkpointer.wait()
        saved = ("No checkpoint was saved yet: the same command starts over"
                 if last_saved is None else f"Checkpoint at step {last_saved} saved: the "
                 "same command resumes there")
        return type(error)(f"{error} The run stopped at step {step_}. {saved}.")

    try:
        while step < total:
            try:
                batch = next(feeder)
            except errors.InputFailed as e:  # (a dead input worker, a damaged record)
                raise input_failed(e, step) from e
            if step == change:
                if step > first_step and stop_requested(step):  # (before the compile's wait)
                    return stopped(step)
                with progress.timed_pause():
                    t0 = time.perf_counter()
                    if ahead is None:  # the switch came sooner than the lead time
                        ahead = compile_ahead(state, batch)
                    ahead.wait()
                    log(f"step {step + 1}: {steps.phase_at(step)}; this phase's train step "
                        f"compiled in the background in {ahead.seconds:.1f} s (waited "
                        f"{time.perf_counter() - t0:.1f} s)")
                train_step, change, ahead = steps.at(step), steps.next_change(step), None
            t0 = time.perf_counter()
            state, scalars, finite = train_step(state, batch, *step_args)
            if step == first_step:
                log(started_message(step + 1, times, time.perf_counter() - t0,
                                    summary.process_age()))
                t_loop = time.perf_counter()
            elif (ahead is None and change is not None and change < total
                  and (change - step) * (time.perf_counter() - t_loop) / (step - first_step)
                  <= max(COMPILE_LEAD_S, 3 * times.compile_s)):
                ahead = compile_ahead(state, batch)
            step += 1
            if pending is not None:
                check_finite(*pending, last_saved)
            pending = (step, finite)
            means.add(scalars)

            stop = stop_requested(step)
            if step % config.log_every_steps == 0 or step == total or stop:
                check_finite(*pending, last_saved)  # (a stop logs its part of a window)
                values = means.pop()
                rates = progress.update(step, values)
                if rates:
                    values.update({f"perf/{k}": v for k, v in rates.items()})
                writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
                checkpointer.report_saved()  # the saves completed since the last log step

            # The checkpoint before the eval of the same step: an eval that fails (a missing
            # FID reference, out of memory) or is cut by a preemption loses no training.
            if stop or every(step, config.checkpoint.every_steps) or step == total:
                check_finite(*pending, last_saved)
                with progress.timed_pause():
                    if checkpointer.save(step, state, force=True):
                        last_saved = step
            if stop:
                return stopped(step)

            if step != total and any(every(step, p) for p in periods):
                evaluate(step)
                if stop_requested(step):  # (a signal during the eval: no step more)
                    return stopped(step)
        if first_step >= total:
            done = final_metrics_of(workdir, first_step)
            if done is not None:
                log(f"Nothing to do: the run is complete at step {first_step} (total_steps "
                    f"{total}) and its final metrics are in {workdir}/metrics.json. To "
                    "evaluate it again (other evaluation settings), delete that file and run "
                    "again, or run python -m tok1d.cli.evaluate.")
                return done
            log(f"Nothing to do: the checkpoint is already at step {first_step} >= "
                f"total_steps {total}; its final eval follows.")
        final = dict(step=step, **evaluate(step))
        write_json(os.path.join(workdir, "metrics.json"), final)
        return final
    finally:
        preempt.restore()
        checkpointer.close()
        writer.flush()


def started_message(step: int, times: StartTimes, first_call_s: float,
                    age_s: Optional[float]) -> str:
    """The line a run prints when its first step is under way: how long tracing and compiling
    the step (or loading it from the persistent compilation cache) took beside creating or
    restoring the state, what a (re)start pays before training, split into its parts, and the
    first call's time."""
    since = "" if age_s is None else f", {age_s:.1f} s after the process started"
    state = "restored" if times.resumed else "initialised"
    return (f"step {step} started: train step traced and compiled (or loaded from the "
            f"compilation cache) in {times.compile_s:.1f} s beside creating or restoring the "
            f"state (trace + lowering {times.lower_s:.1f} s, XLA "
            f"{times.compile_s - times.lower_s:.1f} s; state {state} in {times.state_s:.1f} s; "
            f"first call {first_call_s:.1f} s){since}")


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds an exclusive lock on the (existing) `workdir` folder for the block, on process 0:
    a second run started on the same workdir (a job resubmitted while the first still runs or
    saves) is refused with one line, on every process, instead of saving into the same step
    folders. The lock is the kernel's (`flock`), so a killed run leaves none behind. It holds
    between processes of one machine: network mounts (NFS, gcsfuse) grant it locally only,
    and file systems that refuse it run unlocked."""
    fd = os.open(workdir, os.O_RDONLY) if jax.process_index() == 0 else None
    try:
        in_use = False
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                in_use = True
            except OSError:  # no locks on this file system
                pass
        if parallel.process_0_view([in_use])[0]:  # on every process (the others would wait)
            raise errors.WorkdirInUse(
                f"--workdir={workdir} is in use by another run (a process holds its lock): "
                "wait for it to end, or choose another --workdir.")
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


def setup_run(config, workdir: str) -> tuple[str, Any, Any, Any]:
    """The start of every training run: validates the config, makes the workdir and the mesh.
    Nothing else is written to the workdir until the state has been created or restored
    (`start_writing`): a resume refused for another config leaves the workdir's config.json,
    which describes its checkpoints, as it was.

    Returns (absolute workdir, mesh, logical-axis rules, batch sharding)."""
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    checkpoints = layout.checkpoint_dir(workdir)
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):  # found at the 1st save
        raise errors.UserError(f"{checkpoints} is a file: the run keeps its checkpoints in a "
                               "folder of that name (move the file aside).")
    os.makedirs(workdir, exist_ok=True)
    check_shared(workdir)
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size,
                 jax.process_count())
    return workdir, mesh, rules, batch_sh


SHARED_WAIT_S = 10.0  # how long a process looks for process 0's file (a slow shared mount)


def check_shared(workdir: str) -> None:
    """A UserError on every process of a multi-process run whose processes do not share
    `workdir` (each host its own folder of that path): all of them write each checkpoint into
    it, and the first save waited forever for the others' files; a host with an old run's
    checkpoints there resumed alone. Process 0 writes a file of a new name; each process
    looks for it."""
    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(
        np.asarray(np.random.default_rng().integers(1 << 31), np.int32)))
    marker = os.path.join(workdir, f".tok1d-shared-{token:08x}")
    if jax.process_index() == 0:
        with open(marker, "w", encoding="utf-8") as f:
            f.write("process 0 of a multi-process run checks that every process sees this\n")
    multihost_utils.sync_global_devices("tok1d: shared-workdir file written")
    deadline = time.monotonic() + SHARED_WAIT_S
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    sees = np.asarray(multihost_utils.process_allgather(np.int32(os.path.exists(marker))))
    if jax.process_index() == 0:
        with contextlib.suppress(OSError):
            os.remove(marker)
    blind = np.flatnonzero(sees == 0)
    if blind.size:
        raise errors.UserError(
            f"the workdir {workdir} is not one folder for every process: process(es) "
            f"{', '.join(map(str, blind))} do not see the file process 0 wrote there (each "
            "host has its own folder of that path?); every process writes its part of each "
            "checkpoint into it: put it on storage all hosts share (NFS, a mounted bucket).")


def _trained_config(workdir: str) -> Optional[dict[str, Any]]:
    """The config.json a resumed run's checkpoints were trained with; None for a fresh run."""
    if layout.latest_step(workdir) is None or not os.path.isfile(layout.config_path(workdir)):
        return None
    try:
        return layout.read_config(workdir)
    except (OSError, errors.UserError):
        return None


def changed_model_settings(config, workdir: str) -> list[str]:
    """The model settings of `config` that differ from those a resumed run's checkpoints were
    trained with (the workdir's config.json); [] for a fresh run. Settings that keep the
    parameter shapes (e.g. `legacy_reshape`) resume without any error, so they are named."""
    trained = _trained_config(workdir)
    if trained is None:
        return []
    old, new = dict(trained.get("model") or {}), _json_like(config.model.to_dict())
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
            for k in differing_model_keys(config, trained)]


def differing_model_keys(config, trained: Mapping[str, Any]) -> list[str]:
    """The keys of `config.model` whose values differ from those of a run's config.json
    (`trained`, as read: tuples are JSON lists there), sorted."""
    old, new = dict(trained.get("model") or {}), _json_like(config.model.to_dict())
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# Where the training examples come from, with the value of configs written before the key.
DATA_SETTINGS = (("data.name", None), ("generator.token_source", "dataset"),
                 ("generator.tokens", None), ("generator.tokenizer", None))
READ_FROM_IMAGES = ("data.name", "generator.tokenizer")  # the images, and what encodes them


def changed_data_settings(config, workdir: str) -> list[str]:
    """The `DATA_SETTINGS` of `config` that differ from a resumed run's config.json (e.g. a
    GPT run started on a token dataset, resumed with the recipe's newer default of encoding
    the images); [] for a fresh run or keys the config does not have."""
    trained = _trained_config(workdir)
    if trained is None:
        return []

    def value(tree, key, default):
        section, name = key.split(".")
        return (tree.get(section) or {}).get(name, default)

    now = config.to_dict()
    generator = "generator" in now
    # a generator on a token dataset does not read `data`: its recipe may change it freely
    reads_images = not generator or "images" in {
        value(tree, "generator.token_source", "dataset") for tree in (trained, now)}
    changed = []
    for key, default in DATA_SETTINGS:
        if key.split(".")[0] not in now or (key in READ_FROM_IMAGES and not reads_images):
            continue
        old, new = value(trained, key, default), value(now, key, default)
        if old != new:
            changed.append(f"{key}: {old!r} there, {new!r} now")
    return changed


def changed_schedule_settings(config, workdir: str) -> list[str]:
    """`total_steps`, `batch_size` and the `optim` settings of `config` that differ from a
    resumed run's config.json (e.g. a run extended with more steps: its LR schedule, computed
    from them, is another one from the resumed step on); [] for a fresh run."""
    trained = _trained_config(workdir)
    if trained is None:
        return []
    now = config.to_dict()
    pairs = [(k, trained.get(k), now.get(k)) for k in ("total_steps", "batch_size")]
    old_optim, new_optim = dict(trained.get("optim") or {}), dict(now.get("optim") or {})
    # keys added to tok1d after the run started are not in its config.json: not changes
    pairs += [(f"optim.{k}", old_optim[k], new_optim.get(k)) for k in sorted(old_optim)]
    return [f"{key}: {_json_like(old)!r} there, {_json_like(new)!r} now"
            for key, old, new in pairs if _json_like(old) != _json_like(new)]


# Settings that do not change what is trained (where it runs, what is logged, evaluated or
# saved, and how often), and those the other checks name: not named again on a resume.
_NOT_TRAINING = ("checkpoint.", "distributed.", "evaluation.", "ar_probe.", "mesh.",
                 "sharding.", "log_every_steps", "eval_every_steps", "eval_batch_size",
                 "num_grid_images", "phase_programs", "data.num_workers", "data.data_dir",
                 "data.eval_split", "data.eval_examples", "data.demo_size", "sampling.",
                 "sampling_precision", "generator.num_sample_classes",
                 "generator.tokenizer_decoder", "model.", "optim.", "total_steps",
                 "batch_size")


def changed_training_settings(config, workdir: str) -> list[str]:
    """Every other setting of `config` that trains differently (a loss weight, the
    discriminator's start step or learning rate, the EMA decay, the seed) and differs from a
    resumed run's config.json; [] for a fresh run. Keys that the run's config.json does not
    have (added to tok1d later) or that it no longer has are not changes."""
    trained = _trained_config(workdir)
    if trained is None:
        return []
    old = summary.flatten(_json_like(trained))
    new = summary.flatten(_json_like(config.to_dict()))
    skip = _NOT_TRAINING + tuple(key for key, _ in DATA_SETTINGS)
    return [f"{key}: {old[key]!r} there, {new.get(key)!r} now" for key in sorted(old)
            if not key.startswith(skip) and key in new and old[key] != new[key]]


def _json_like(value: Any) -> Any:
    """A config value as its config.json holds it (tuples as lists)."""
    if isinstance(value, (tuple, list)):
        return [_json_like(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_like(v) for k, v in value.items()}
    return value


DATA_FILE = "data.json"  # in the workdir: what the run trains and evaluates on (`data_record`)


def data_record(train_source: Any, eval_source: Any = None) -> dict[str, Any]:
    """What data.json records of a run's data: the training split's size, and the content
    fingerprints of its training and eval splits where their sources know them (a split
    `tok1d prepare` wrote: `ArrayRecordImageSource.fingerprint`), with the split each is of
    (DIR/SPLIT: a run moved to another split is not told that its split was prepared again)."""
    def split_of(source):
        if getattr(source, "fingerprint", None) is None:
            return None
        return os.path.join(os.path.abspath(source.directory), source.split)

    return {"train_examples": len(train_source),
            "train_split": split_of(train_source),
            "train_fingerprint": getattr(train_source, "fingerprint", None),
            "eval_split": split_of(eval_source),
            "eval_fingerprint": getattr(eval_source, "fingerprint", None)}


def _recorded_data(workdir: str) -> dict[str, Any]:
    """A resumed run's data.json ({} for a fresh run, or none readable)."""
    path = os.path.join(workdir, DATA_FILE)
    if layout.latest_step(workdir) is None or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except (OSError, ValueError):
        return {}
    return before if isinstance(before, dict) else {}


def changed_data(workdir: str, data: Optional[Mapping[str, Any]]) -> tuple[list[str], bool]:
    """(what differs between the training split a resumed run's checkpoints were trained on
    (its workdir's data.json) and `data` now (`data_record`): its size, or its content, a
    dataset prepared again under the same name; whether its eval split's content differs).
    Nothing is known to differ where either side lacks a value."""
    before, data = (_recorded_data(workdir), data) if data else ({}, {})

    def differs(key):
        return None not in (before.get(key), data.get(key)) and before[key] != data[key]

    def prepared_again(split):  # (the same split's content: another split is named elsewhere)
        same = before.get(f"{split}_split") == data.get(f"{split}_split") is not None
        return same and differs(f"{split}_fingerprint")

    changed = []
    if differs("train_examples"):
        changed.append(f"the training split: {before['train_examples']} examples there, "
                       f"{data['train_examples']} now")
    elif prepared_again("train"):
        changed.append("the training split: prepared again, as many examples (other images, "
                       "order or preprocessing)")
    return changed, prepared_again("eval")


def start_writing(config, workdir: str, first_step: int = 0,
                  data: Optional[Mapping[str, Any]] = None) -> summary.MetricWriter:
    """The run's metric writer, with the config recorded: config.json and the hyperparameters
    (call once the run's state exists). A resumed run whose model settings or training data
    changed says which (`changed_model_settings`, `changed_data_settings`, and with `data`
    (`data_record`), its splits' size and content: `changed_data`) before config.json and
    data.json record the new ones. A run (re)starting at `first_step` drops its logs of
    later steps (`MetricWriter.resume_at`)."""
    changed = changed_model_settings(config, workdir)
    if changed:
        log_fn()(f"Warning: resuming with model settings other than the checkpoints were "
                 f"trained with ({'; '.join(changed)}); the params are read as they are.")
    changed = changed_data_settings(config, workdir)
    content, other_eval = changed_data(workdir, data)
    if changed or content:
        log_fn()(f"Warning: resuming on other training data than the checkpoints were trained "
                 f"on ({'; '.join(changed + content)})"
                 + ("; the data stream resumes at the same batch count, in the new data's "
                    "order." if content else "."))
    if other_eval:
        log_fn()(f"Warning: the eval split {config.data.eval_split!r} was prepared again "
                 "since the run's last start: its evals from here on are of other images "
                 "than those logged before.")
    changed = changed_schedule_settings(config, workdir)
    if changed:
        log_fn()(f"Warning: resuming with other optimizer or schedule settings than the run's "
                 f"last start ({'; '.join(changed)}): the learning-rate schedule follows "
                 "the new ones from the resumed step on"
                 + ("; the data stream's position is counted in batches of the new size, so "
                    "some examples of this epoch are skipped or seen again."
                    if any(c.startswith("batch_size:") for c in changed) else "."))
    changed = changed_training_settings(config, workdir)
    if changed:
        log_fn()(f"Warning: resuming with other training settings than the run's last start "
                 f"({'; '.join(changed)}): they apply from the resumed step on.")
    writer = summary.MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.resume_at(first_step)  # (steps after the checkpoint, logged before a kill: redone)
    writer.write_hparams(config.to_dict())
    write_json(layout.config_path(workdir), config.to_dict())
    if data is not None:
        write_json(os.path.join(workdir, DATA_FILE), dict(data))
    return writer


def checkpointer_for(config, workdir: str) -> ckpt_lib.Checkpointer:
    """The run's checkpointer (`workdir/checkpoints`, `config.checkpoint`)."""
    return ckpt_lib.Checkpointer(
        layout.checkpoint_dir(workdir), every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
        compress=config.checkpoint.compress)


def eval_params(state: TrainState) -> Any:
    """The params evaluations use: the EMA when the run keeps one."""
    return state.ema_params if state.ema_params is not None else state.params
