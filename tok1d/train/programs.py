"""A trainer's compiled train steps: `PhasedStep`, one program per training phase, and
`BackgroundCompile`, which compiles a step beside other work (a restore, training steps)."""

from __future__ import annotations

import atexit
import dataclasses
import threading
import time
from typing import Any, Callable, Hashable, Optional

import flax.linen as nn
import jax


@dataclasses.dataclass
class PhasedStep:
    """A trainer's jitted train step, one program per training phase.

    Some terms of an objective switch on or off at fixed steps (GigaTok's warm-up terms end at
    `aux_loss_end_step`, the discriminator starts at `discriminator.start_step`). Flags traced
    from the step keep both sides of every switch in one program for the whole run: the
    finished warm-up's shortcut decoder is compiled into every (re)start, and the step gates
    it each time (a conditional whose predicate a GPU's host reads, or on the CPU a select that
    runs both sides). One program per phase holds only the terms its steps use; a (re)start
    compiles its own phase only, and the loop compiles the next one in the background
    (`tok1d.train.loop`).

    make(phase) -> the jitted step `(state, batch, *args) -> (state, scalars, finite)` of a
    phase; phase_at(step) -> the (hashable) phase of a 0-based step; boundaries: the steps
    where `phase_at` may change. `single(fn)`: one program for every step."""

    make: Callable[[Hashable], Any]
    phase_at: Callable[[int], Hashable]
    boundaries: tuple[int, ...] = ()
    programs: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def single(cls, fn: Any) -> "PhasedStep":
        return cls(lambda _: fn, lambda _: None)

    def at(self, step: int) -> Any:
        """The jitted step of `step`'s phase (made once per phase)."""
        phase = self.phase_at(step)
        if phase not in self.programs:
            self.programs[phase] = self.make(phase)
        return self.programs[phase]

    def next_change(self, step: int) -> Optional[int]:
        """The first step after `step` whose phase differs from `step`'s, or None."""
        phase = self.phase_at(step)
        later = sorted(b for b in self.boundaries if b > step and self.phase_at(b) != phase)
        return later[0] if later else None


class BackgroundCompile:
    """A jitted function lowered and compiled for given (abstract or concrete) arguments, under
    `mesh` and the logical axis `rules`, in a daemon thread; its later call with arguments of
    the same shapes and shardings, under the same mesh (`jax.set_mesh`), reuses the executable.
    `wait()` joins it and raises its error; `seconds`: how long it took, of which
    `lower_seconds` tracing and lowering (the rest is XLA's compile, or its load from the
    persistent compilation cache)."""

    def __init__(self, fn: Any, args: tuple, mesh, rules):
        self.seconds = self.lower_seconds = 0.0
        self._error: Optional[BaseException] = None
        self._done = threading.Event()

        def run():
            t0 = time.perf_counter()
            try:
                with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                    lowered = fn.lower(*args)
                    self.lower_seconds = time.perf_counter() - t0
                    lowered.compile()
            except BaseException as e:  # noqa: BLE001 - raised again by wait()
                self._error = e
            self.seconds = time.perf_counter() - t0
            _RUNNING.discard(self)
            self._done.set()

        # A daemon thread, waited for at interpreter exit (`_wait_at_exit`); the command line
        # exits at once instead (`compiling`, `tok1d.cli.app.exit_process`).
        self._thread = threading.Thread(target=run, name="compile-train-step", daemon=True)
        _RUNNING.add(self)
        self._thread.start()

    def wait(self) -> None:
        # In slices: a wait without a timeout is a lock that only a signal delivered to the
        # main thread interrupts; a Ctrl-C the kernel hands to another thread would wait
        # (its handler pending) until the compile ends, a second Ctrl-C too. On an event, not
        # a join: a KeyboardInterrupt inside `Thread.join` marks the thread as ended while it
        # still runs (Python 3.11), and a later `wait()` would not wait.
        while not self._done.wait(0.2):
            pass
        if self._error is not None:
            raise self._error


# Background compiles still running. A process that finalizes while XLA compiles in another
# thread aborts ("terminate called ... FATAL: exception not rethrown", exit status 134, seen
# on jax 0.10.2 when a run stops during a compile): interpreter exit waits for them, and the
# command line, whose files are closed by then, ends the process without finalizing.
_RUNNING: set = set()


def compiling() -> bool:
    """Whether a `BackgroundCompile` is still running."""
    return bool(_RUNNING)  # each leaves the set as its thread's compile ends


@atexit.register
def _wait_at_exit() -> None:
    for c in list(_RUNNING):
        c._thread.join()  # noqa: SLF001


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shapes, dtypes and shardings of a tree of arrays (valid after
    the arrays were donated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type), tree)
