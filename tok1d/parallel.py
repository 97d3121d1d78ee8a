"""Device mesh, logical-axis rules, sharded state creation and global batches.

The mesh has three named axes:
  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params and optimizer state sharded (ZeRO-3 / FSDP)
  tensor  tensor (model) parallelism over heads / MLP width
Models name the axes of every parameter and of the main activations (see
`tok1d.layers.transformer`); the rules table below (overridable from the config as
`config.sharding.rules`) maps those logical names onto mesh axes.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax._src import distributed as jax_distributed  # (the joined process id, backend-free)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis / axes / None). First match wins.
DEFAULT_RULES = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("conv_in", "fsdp"),      # conv kernels (h, w, in, out): in over fsdp like a Dense's embed
    ("conv_h", None),
    ("conv_w", None),
    ("length", None),
    ("layers", None),
    ("norm", None),
    ("codebook", None),
    ("code_dim", None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: Optional[int] = None
                       ) -> tuple[int, ...]:
    """Mesh sizes from the config ({"data": -1, "fsdp": 2, ...}); one -1 takes the rest."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; mesh axes are {MESH_AXES}.")
    n = jax.device_count() if num_devices is None else num_devices
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}.")
    bad = [a for a, s in zip(MESH_AXES, shape) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, shape))}: the size of {', '.join(bad)} "
                         "must be >= 1 (or -1: the devices left).")
    known = math.prod(s for s in shape if s != -1)
    if n % known:
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, shape))} does not fit {n} devices.")
    shape = [n // known if s == -1 else s for s in shape]
    if math.prod(shape) != n:
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices "
                         f"but {n} are available; use -1 for one axis to take the rest.")
    return tuple(shape)


def create_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None
                ) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (what Linen logical sharding needs)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules table coming from a ConfigDict (lists -> tuples)."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (such tensors stay replicated there)."""
    fitted = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if shape[i] % size == 0 else None)
    return P(*fitted)


def whole_over_axes(abstract_tree: Any, mesh: Mesh, rules, min_bytes: int = 1 << 20
                    ) -> list[tuple[str, tuple[int, ...], tuple[str, ...], int]]:
    """The tensors of a boxed tree of at least `min_bytes` that the logical `rules` split over
    mesh axes (of size > 1) that do not divide their dimension, so that every device along
    those axes holds them whole (`_fit_spec`), e.g. 20 heads on a tensor axis of 8:
    (path, shape, the axes not split over, bytes) each, largest first."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
    leaves = unbox_abstract(abstract_tree)
    found = []

    def visit(path, spec, leaf):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if nbytes < min_bytes:
            return
        fitted = _fit_spec(spec, leaf.shape, mesh)
        axes = tuple(a for want, got in zip(tuple(spec), tuple(fitted))
                     if want is not None and got is None
                     for a in ((want,) if isinstance(want, str) else want) if mesh.shape[a] > 1)
        if axes:
            found.append((jax.tree_util.keystr(path, simple=True, separator="/"),
                          tuple(leaf.shape), axes, nbytes))

    jax.tree_util.tree_map_with_path(visit, specs, leaves, is_leaf=lambda x: isinstance(x, P))
    return sorted(found, key=lambda t: -t[3])


def warn_whole_over_axes(abstract_tree: Any, mesh: Mesh, rules) -> None:
    """One console warning (process 0) naming the large tensors `whole_over_axes` finds."""
    found = whole_over_axes(abstract_tree, mesh, rules)
    if not found or jax.process_index() != 0:
        return
    path, shape, axes, _ = found[0]
    total = sum(t[3] for t in found) / 2 ** 20
    logging.getLogger(__name__).warning(
        "%d parameter tensors (%.0f MiB) are not split over mesh axes that do not divide them "
        "(each device along those axes holds them whole), e.g. %s %s over %s (mesh %s).",
        len(found), total, path, shape, "/".join(axes), dict(mesh.shape))


def unbox_abstract(tree: Any) -> Any:
    """Removes Flax metadata boxes without applying sharding constraints (abstract trees)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may be Flax `LogicallyPartitioned` boxes."""
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    unboxed = unbox_abstract(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))



def params_and_optimizer(init_params, init_optimizer, mesh: Mesh, rules, boxed: Any = None
                         ) -> tuple[Any, Any, Any, Any]:
    """(abstract params, their shardings, abstract optimizer state, its shardings) of a model
    whose boxed params `init_params(rng)` makes (or `boxed`, their abstract value where the
    caller has traced the init already), with `init_optimizer(params)` its optimizer state;
    call under the mesh and the logical rules. Optimizer moments get the sharding of their
    parameter (FSDP shards them too); counters are replicated."""
    if boxed is None:
        boxed = jax.eval_shape(init_params, jax.random.key(0))
    sh = logical_shardings(boxed, mesh, rules)
    warn_whole_over_axes(boxed, mesh, rules)
    params = unbox_abstract(boxed)
    opt_state = jax.eval_shape(init_optimizer, params)
    return params, sh, opt_state, like_params(opt_state, params, sh, NamedSharding(mesh, P()))


def like_params(tree: Any, params: Any, param_sh: Any, default: NamedSharding) -> Any:
    """Shardings for a tree that tracks `params` leaf by leaf (an optimizer state): each leaf
    gets the sharding of the parameter whose dict-key path is the longest suffix of the leaf's
    path, with the same shape; counters and other scalars get `default`. Works through masked
    and multi-transform optimizer states."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(param_sh)):
        by_path[tuple(k.key for k in path)] = (tuple(leaf.shape), sh)

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)

def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch: leading axis split like the "act_batch" logical axis."""
    spec = nn.logical_to_mesh(P("act_batch"), rules)
    return NamedSharding(mesh, P(*(tuple(spec) + (None,) * (ndim - 1))))


def batch_shards(sharding: NamedSharding) -> int:
    """How many ways a batch sharding splits the batch (the product of its batch axes)."""
    axes = tuple(sharding.spec)[0] if len(sharding.spec) else None
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in names)


def mesh_from_config(config) -> tuple[Mesh, tuple, NamedSharding]:
    """(mesh, logical-axis rules, batch sharding) of a config's `mesh` and `sharding.rules`."""
    mesh = create_mesh(dict(config.mesh))
    rules = rules_from_config(config.sharding.rules)
    return mesh, rules, batch_sharding(mesh, rules)


def host_batch_slice(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of a global batch that this process must load."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    start, stop = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if covered != stop - start:
        raise ValueError("This process's share of the batch is not contiguous; use a mesh whose "
                         "data axes follow process order (jax.make_mesh does).")
    return start, stop


def rows_sharding(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """An ndim-dimensional array's sharding with its rows split as `sharding`'s batch axis."""
    return NamedSharding(sharding.mesh, P(*(tuple(sharding.spec)[:1] + (None,) * (ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding,
                 global_size: int) -> dict[str, jax.Array]:
    """Host-local numpy rows -> global jax.Arrays sharded along the batch axis."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(
            rows_sharding(sharding, value.ndim), value, (global_size,) + value.shape[1:])
    return out


# `logging.info(..., extra={EVERY_PROCESS: True})`: a line every process of a run prints
# (the console shows tok1d's other INFO lines from process 0 only: `tok1d.cli.app`).
EVERY_PROCESS = "tok1d_every_process"


def joined_process_index() -> int:
    """This process's index in a joined multi-process run (0 when none was joined), known
    without starting the backend, as `jax.process_index()` would (e.g. in a log filter)."""
    if not jax.distributed.is_initialized():
        return 0
    return int(jax_distributed.global_state.process_id or 0)


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
    """Starts multi-host JAX. Must run before anything touches the backend.

    With no arguments, jax.distributed auto-detects TPU pods, SLURM and Open MPI clusters (a
    ValueError saying so where none is found). An explicit coordinator needs HOST:PORT and this
    process's place among `num_processes`; `num_processes` / `process_id` without a coordinator
    are refused rather than ignored (a ValueError naming the settings in each case). Logs one
    line before joining: JAX waits, silently, up to five minutes for absent processes."""
    flags = ("(training: --config.distributed.coordinator_address / num_processes / "
             "process_id; tok1d sample / evaluate / tokenize: --coordinator_address / "
             "--num_processes / --process_id)")
    # Under SLURM JAX fills local_device_ids itself in both cases below (one GPU per process)
    local = slurm_local_device_ids(os.environ)
    devices = {"local_device_ids": local} if local else {}
    drives = f"; this process drives GPUs {local}" if local else ""
    if not coordinator_address:
        if num_processes > 0 or process_id >= 0:
            raise ValueError(f"distributed: num_processes={num_processes} / process_id="
                             f"{process_id} need a coordinator_address=HOST:PORT {flags}.")
        logging.getLogger(__name__).info(
            "Joining a multi-host run (coordinator auto-detected; JAX waits up to 5 min for "
            "every process)%s", drives)
        try:
            jax.distributed.initialize(**devices)
        except ValueError as e:  # "coordinator_address should be defined": nothing detected
            if "coordinator_address" not in str(e):
                raise
            raise ValueError(
                "distributed: TOK1D_DISTRIBUTED=1 asks to auto-detect a multi-host run, but no "
                "TPU pod, SLURM or Open MPI environment was found; give a coordinator "
                f"{flags} or unset TOK1D_DISTRIBUTED.") from None
        _cpu_collectives_over_gloo()
        return
    _, colon, port = coordinator_address.rpartition(":")
    problems = ([f"coordinator_address={coordinator_address!r} is not HOST:PORT"]
                if not (colon and port.isdigit()) else [])
    if num_processes < 1:
        problems.append(f"num_processes={num_processes} (the number of processes, >= 1)")
    elif not 0 <= process_id < num_processes:
        problems.append(f"process_id={process_id} (this process: 0 .. {num_processes - 1})")
    if problems:
        raise ValueError("distributed: " + "; ".join(problems) + f" {flags}.")
    logging.getLogger(__name__).info(
        "Joining %d processes at %s as process %d (JAX waits up to 5 min for every process)%s",
        num_processes, coordinator_address, process_id, drives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **devices)
    _cpu_collectives_over_gloo()


def slurm_local_device_ids(environ: Mapping[str, str]) -> Optional[list[int]]:
    """Every GPU of the node, for an srun step with one task per node (as launch/slurm.sbatch
    runs): jax.distributed's SLURM detection gives each process only the GPU of its local
    task id (its layout is one process per GPU), which left 7 of a node's 8 GPUs idle. None
    elsewhere (outside srun, under mpirun), with several tasks per node, or where
    JAX_LOCAL_DEVICE_IDS says which."""
    if ("SLURM_JOB_ID" not in environ or environ.get("JAX_LOCAL_DEVICE_IDS")
            or "OMPI_COMM_WORLD_SIZE" in environ):  # (mpirun's ranks: JAX's Open MPI layout)
        return None
    tasks = environ.get("SLURM_STEP_TASKS_PER_NODE", "")  # an srun step's (not the job's)
    counts = [part.split("(")[0] for part in tasks.split(",") if part]  # e.g. "1(x4)", "2,1"
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if not counts or set(counts) != {"1"} or not gpus.isdigit() or int(gpus) < 2:
        return None
    return list(range(int(gpus)))


def _cpu_collectives_over_gloo() -> None:
    """CPU devices' cross-process collectives (read when the backend starts, after
    jax.distributed; harmless on GPU / TPU)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def size_cpu_thread_pool(environ=os.environ) -> None:
    """Room for programs in flight on fake CPU devices; call before the CPU backend starts.

    XLA's CPU client runs every device's share of a program on one pool of max(cores, devices)
    threads. Under async dispatch a device that finishes step k early starts step k + 1 and
    waits in its first collective, holding a thread; with `--xla_force_host_platform_device_count
    =N` on a few cores the pool fills with such waiters, the last participant of step k never
    gets a thread, and XLA aborts the process after 40 s ("Termination timeout for all reduce
    ... only 7 of them arrived"). Seen in CI; reproduced with one jitted loop on 8 fake devices.
    Gives the pool 4 N threads (`PJRT_NPROC`) unless the environment already sets it."""
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    if m and int(m.group(1)) > 1:
        environ.setdefault("PJRT_NPROC", str(4 * int(m.group(1))))


def setup_process(coordinator_address: str = "", num_processes: int = 0,
                  process_id: int = -1) -> None:
    """What every command does first: joins a multi-host run when asked (a coordinator address,
    or TOK1D_DISTRIBUTED=1 for auto-detection on TPU pods / SLURM) and turns on the persistent
    compilation cache (`compilation_cache_dir`): a restarted or resumed run loads its compiled
    programs."""
    size_cpu_thread_pool()
    if (coordinator_address or num_processes > 0 or process_id >= 0
            or os.environ.get("TOK1D_DISTRIBUTED") == "1"):
        maybe_initialize_distributed(coordinator_address, num_processes, process_id)
        watch_for_stops()
    cache = compilation_cache_dir()
    if cache and (jax_distributed.global_state.num_processes or 1) > 1 \
            and jax.default_backend() == "cpu":
        # JAX gives a CPU run's other processes other cache keys than process 0 (the only
        # one that writes): they compiled a train step (a minute) while process 0 loaded it
        # and then timed out in its first collective; every warm restart crashed.
        logging.info("The persistent compilation cache is off: a multi-process CPU run's "
                     "processes do not share its entries.")
        jax.config.update("jax_enable_compilation_cache", False)  # (a JAX_... dir too)
        cache = None
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        if (os.environ.get("TOK1D_COMPILATION_CACHE") is None
                and jax.config.jax_compilation_cache_max_size < 0):
            # tok1d's own default directory stays bounded (least recently used entries go).
            jax.config.update("jax_compilation_cache_max_size", DEFAULT_CACHE_MAX_BYTES)


DEFAULT_CACHE_MAX_BYTES = 8 << 30


# ----------------------------------------------------------------------------------------------
# A process that stops alone tells the others.
# ----------------------------------------------------------------------------------------------
# A process of a multi-process run that stopped on an error of its own mid-run (a damaged shard
# or a dead input worker on its host, Ctrl-C there) left the others in their next collective,
# silent, until JAX's heartbeat aborted them minutes later; its own exit waited for them in
# JAX's shutdown barrier, then aborted too. Now it leaves a notice for each other process in
# the coordination service's key-value store (`tell_others`), where a thread of each process
# waits for its own (`watch_for_stops`: one pending request, no cost to the steps). That
# process then prints one line and joins the stopped one in JAX's shutdown, and both exit.

_STOP_KEY = "tok1d/stop/{}"  # a process's notice: why another one stopped ("" at its own exit)
STOP_GRACE_S = 5.0  # how long a notified process leaves its own error to say so first
_stopping = threading.Event()  # this process is ending: its own error, or its normal exit
_acting = threading.Event()  # the watcher stops this process (it ends it: `_stop_watching`)
_exchanged = threading.Event()  # a notice went out or came in: the processes involved are alive
_watcher: list[threading.Thread] = []


def stopping() -> None:
    """Marks this process as ending on its own (e.g. an error from a collective that another
    process left): its watcher then leaves the saying to it."""
    _stopping.set()


def _client() -> Any:
    """The coordination service's client of a joined run of several processes, else None."""
    if (jax_distributed.global_state.num_processes or 1) <= 1:
        return None
    return jax_distributed.global_state.client


def tell_others(message: str) -> None:
    """Leaves `message` (why this process stops, one line) for every other process of a joined
    run, whose watcher stops it too (no-op with one process). Never raises: the process is on
    its way out already."""
    _stopping.set()
    client = _client()
    if client is None or not _watcher:  # (not joined: `initialize` failed before connecting)
        return
    _exchanged.set()
    me = joined_process_index()
    notice = f"process {me} stopped ({message[:400]})"
    for other in range(jax_distributed.global_state.num_processes):
        if other != me:
            try:
                client.key_value_set(_STOP_KEY.format(other), notice)
            except Exception:  # noqa: BLE001 - another stopped process told it first, or the
                pass  # service is gone (process 0 ended): nothing more to tell


def watch_for_stops() -> None:
    """Starts this process's watcher (once, after joining a run of several processes): when
    another process tells it that it stopped, and this one has not ended on its own within
    STOP_GRACE_S (every process failing the same check says its own reason), prints
    "error: process N stopped (its line): process M stops too.", takes part in JAX's
    shutdown (the stopped process waits there) and ends the process with status 1."""
    client = _client()
    if client is None or _watcher:
        return
    _stopping.clear()
    thread = threading.Thread(target=_watch, args=(client, joined_process_index()),
                              name="tok1d-stop-watcher", daemon=True)
    thread.start()
    _watcher.append(thread)
    atexit.register(_stop_watching, client, joined_process_index())  # before JAX's shutdown


def _watch(client: Any, me: int) -> None:
    while True:
        asked = time.monotonic()
        try:
            notice = client.blocking_key_value_get(_STOP_KEY.format(me), 24 * 3600 * 1000)
        except Exception as e:  # noqa: BLE001 - a day without news, or the service is gone
            if "DEADLINE_EXCEEDED" in str(e) and not _stopping.is_set():
                time.sleep(max(0.0, 1.0 - (time.monotonic() - asked)))  # (never a spin)
                continue
            return
        if not notice:
            return  # this process's own exit
        _exchanged.set()
        if _stopping.wait(STOP_GRACE_S):
            return  # its own error says why
        _acting.set()
        _stopping.set()
        print(f"error: {notice}: process {me} stops too.", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        shut_down_with_the_others()  # the stopped process waits there for us
        sys.stdout.flush()
        os._exit(1)  # (the main thread waits in a collective that will never complete)


def shut_down_with_the_others() -> None:
    """JAX's distributed shutdown (its barrier with every process), where a stop notice went
    out or came in: those processes are alive and on their way there, and a process that left
    without it (`os._exit` after a "stopped waiting" error, or with a step still compiling)
    kept them in that barrier up to its 5-min timeout. A no-op otherwise: a process that was
    killed never reaches it."""
    if not _exchanged.is_set():
        return
    try:
        jax_distributed.global_state.shutdown()
    except Exception:  # noqa: BLE001 - the service is gone already
        pass


def _stop_watching(client: Any, me: int) -> None:
    """At this process's exit: ends the watcher's pending request (JAX's shutdown aborted the
    process under one)."""
    _stopping.set()
    if not _watcher or not _watcher[0].is_alive():
        return
    if _acting.is_set():  # it is in JAX's shutdown and ends the process: not twice at once
        _watcher[0].join()
    try:
        client.key_value_set(_STOP_KEY.format(me), "", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the service is gone: so is the request
        return
    _watcher[0].join(10.0)


def compilation_cache_dir() -> Optional[str]:
    """The persistent compilation cache: $TOK1D_COMPILATION_CACHE (a local or gs:// path; empty
    or "off" turns it off); else a directory the user already gave JAX
    ($JAX_COMPILATION_CACHE_DIR / jax_compilation_cache_dir); else $XDG_CACHE_HOME/tok1d/jax,
    i.e. ~/.cache/tok1d/jax, kept under DEFAULT_CACHE_MAX_BYTES (8 GiB, least recently used
    entries evicted; JAX_COMPILATION_CACHE_MAX_SIZE overrides). On a pod, point it at a shared
    bucket so every host and every restart reuses one compile."""
    cache = os.environ.get("TOK1D_COMPILATION_CACHE")
    if cache is None:
        if jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        return os.path.join(base, "tok1d", "jax")
    return None if cache.strip().lower() in ("", "off", "none", "0") else cache


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host NumPy tree -> global arrays replicated over the mesh (works across hosts)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: put_host(np.asarray(x), sharding), tree)


def put_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every host) -> a global array with `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def rules_shardings(init_params, mesh: Mesh, rules) -> Any:
    """The shardings of a trained model's params: `logical_shardings` of the boxed params
    `init_params(rng)` makes, traced for their shapes only (call outside a mesh context)."""
    return logical_shardings(jax.eval_shape(init_params, jax.random.key(0)), mesh, rules)


def put_like(host_tree: Any, like: Any) -> Any:
    """Host arrays -> global arrays with the dtypes and shardings of `like` (same structure
    and shapes; a shape mismatch raises ValueError)."""
    def put(x, ref):
        x = np.asarray(x, ref.dtype)
        if x.shape != ref.shape:
            raise ValueError(f"shape {x.shape} does not match the model's {ref.shape}")
        return put_host(x, ref.sharding)
    return jax.tree.map(put, host_tree, like)


@functools.lru_cache(maxsize=None)
def _replicate_fn(mesh: Mesh):
    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))


def host_array(x: Any) -> np.ndarray:
    """The whole of a global array (sharded over devices and hosts) as NumPy on every host: one
    all-gather, compiled once per mesh and shape. Plain arrays pass through."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return np.asarray(x)
    return np.asarray(_replicate_fn(sharding.mesh)(x).addressable_data(0))


def process_0_view(values: Sequence[bool]) -> list[bool]:
    """Process 0's `values` (e.g. which files exist, as it sees them) on every process, so that
    all of them take the same branch around collectives (a check that each host makes on its
    own disk could differ)."""
    if jax.process_count() == 1:
        return [bool(v) for v in values]
    return [bool(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))]


def everywhere(call: Callable[[], Any], what: str) -> Any:
    """`call()`, on every process of a multi-process run; where it fails on one (a data folder
    or file its host lacks), it fails on all: that process stopped alone while the others
    waited in their next collective (orbax's start-up barrier has no deadline), and its own
    exit waited for them in JAX's shutdown barrier, then aborted. The others raise a
    ValueError naming the processes that failed (their own output says why)."""
    if jax.process_count() == 1:
        return call()
    result, error = None, None
    try:
        result = call()
    except Exception as e:  # noqa: BLE001 - raised again below, on this process
        error = e
    failed = np.flatnonzero(np.asarray(
        multihost_utils.process_allgather(np.int32(error is not None))))
    if error is not None:
        raise error
    if failed.size:
        raise ValueError(f"{what}: process(es) {', '.join(map(str, failed))} failed (their "
                         "own output says why).")
    return result


def process_0s(value: Any) -> tuple[Any, list[int]]:
    """(process 0's `value` (JSON-like), the processes whose own differs) (collectives, on
    every process)."""
    mine = json.dumps(value, sort_keys=True).encode()
    digests = np.asarray(multihost_utils.process_allgather(np.uint32(zlib.crc32(mine))))
    others = [i for i in range(len(digests)) if digests[i] != digests[0]]
    if not others:
        return value, []
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(mine))))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(mine)] = np.frombuffer(mine, np.uint8)
    first = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return json.loads(first[:int(lengths[0])].tobytes()), others


def check_same(value: Mapping[str, Any], what: str) -> None:
    """A ValueError on every process of a multi-process run where `value` (JSON-like: e.g. a
    dataset's description) is not process 0's: `what` (e.g. "the tokens DIR") differs
    between hosts. Each process trained on its own host's copy without a word (one host's
    token dataset of another tokenizer, mixed into every batch)."""
    if jax.process_count() == 1:
        return
    theirs, others = process_0s(value)
    if not others:
        return
    if jax.process_index() not in others:
        raise ValueError(f"{what}: process(es) {', '.join(map(str, others))} see another one "
                         "than process 0 (each says how): every host must see the same.")
    differ = sorted(k for k in set(value) | set(theirs) if value.get(k) != theirs.get(k))
    raise ValueError(f"{what} differ here from process 0's ({', '.join(differ[:6])}"
                     f"{', ...' if len(differ) > 6 else ''}): every host must see the same.")
