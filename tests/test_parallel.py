"""Sharding tests: data / FSDP / tensor meshes give the same numbers, and really shard.

Runs on the 8 fake CPU devices that conftest.py sets up. The model is a small TiTok whose
widths divide the mesh axes (embed 64 over fsdp=4, heads 4 / MLP 128 over tensor=2), so every
kernel is genuinely split rather than silently replicated.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import subprocess_env

from tok1d import parallel
from tok1d.train import config_lib
from tok1d.objectives import losses
from tok1d.train import optim
from tok1d.train import state as state_lib
from tok1d.train import tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16
IMAGE = 32
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))


def _load_tiny_config():
    spec = importlib.util.spec_from_file_location(
        "tiny_test_config", os.path.join(REPO, "configs", "tiny_test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _config():
    config = _load_tiny_config()
    config.model = dict(name="titok", patch_size=8, num_latent_tokens=8,
                        encoder_width=64, encoder_depth=2, encoder_heads=4, encoder_mlp_dim=128,
                        decoder_width=64, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=128,
                        codebook_size=64, token_dim=8)
    # No warm-up: the first step must really move the params (lr(0) would be 0 otherwise).
    config.optim.warmup_steps = 0
    config_lib.validate(config, num_devices=8)
    return config


def _images() -> np.ndarray:
    return np.random.default_rng(1234).uniform(
        0.0, 1.0, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)


def _mesh(shape):
    return parallel.create_mesh(dict(zip(parallel.MESH_AXES, shape)))


def _setup(shape):
    """Model, optimizer, mesh, rules and the sharded state machinery for one mesh shape."""
    config = _config()
    model = tokenizer.build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    mesh = _mesh(shape)
    rules = parallel.rules_from_config(config.sharding.rules)
    dummy = np.zeros((2, IMAGE, IMAGE, 3), np.float32)
    init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
    abstract, shardings, init = state_lib.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=True)
    return config, model, tx, schedule, mesh, rules, abstract, shardings, init


def _run(shape):
    config, model, tx, schedule, mesh, rules, abstract, shardings, init = _setup(shape)
    rng = jax.random.key(config.seed)
    batch_sh = parallel.batch_sharding(mesh, rules)
    batch = parallel.global_batch({"image": _images()}, batch_sh, BATCH)
    weights = {k: float(v) for k, v in config.losses.items()}

    def loss_fn(params, images_):
        recon, aux = model.apply({"params": params}, images_)
        return losses.combine(weights, recon, images_, aux.losses)[0]

    state = init(rng)
    init_params = jax.device_get(state.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        grad_fn = jax.jit(jax.value_and_grad(loss_fn),
                          in_shardings=(shardings.params, batch_sh))
        loss, grads = grad_fn(state.params, batch["image"])
        step = jax.jit(tokenizer.make_train_step(model, tx, schedule, config),
                       in_shardings=(shardings, batch_sh, {}),
                       out_shardings=(shardings, None, None), donate_argnums=(0,))
        new_state, scalars, finite = step(state, batch, {})
    return dict(
        init_params=init_params,
        loss=float(loss),
        grads=jax.device_get(grads),
        step_loss=float(scalars["loss"]),
        grad_norm=float(scalars["grad_norm"]),
        finite=bool(finite),
        new_params=jax.device_get(new_state.params),
        new_ema=jax.device_get(new_state.ema_params),
        new_mu=jax.device_get(_adam_state(new_state.opt_state).mu),
        new_step=int(new_state.step),
        new_state_shardings=jax.tree.map(lambda x: x.sharding, new_state),
        expected_shardings=shardings,
        abstract=abstract,
        fresh_state=init(rng),   # not donated: for the sharding-layout tests
        mesh=mesh,
        rules=rules,
        batch=batch,
    )


@pytest.fixture(scope="module")
def runs():
    cache = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = _run(shape)
        return cache[shape]

    return get


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(opt_state,
                                        is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, opt_state
    return found[0]


def _find(tree, *names):
    """The single leaf whose path contains every one of `names` (in order)."""
    hits = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        it = iter(keys)
        if all(name in it for name in names):
            hits.append((keys, leaf))
    assert len(hits) == 1, [h[0] for h in hits]
    return hits[0][1]


def _assert_trees_close(a, b, rtol, atol, what):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b], what
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=f"{what} at {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape", MESHES[1:], ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_data_parallel(runs, shape):
    ref, got = runs(MESHES[0]), runs(shape)
    # Same seed -> bit-identical init whatever the sharding.
    _assert_trees_close(ref["init_params"], got["init_params"], 0, 0, "init params")
    assert ref["finite"] and got["finite"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["step_loss"], ref["step_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["step_loss"], got["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
    _assert_trees_close(ref["grads"], got["grads"], 1e-4, 1e-6, "grads")
    # One AdamW step with lr 3e-3 moves every param by up to ~lr (Adam normalises the update,
    # so gradients that are ~eps amplify float noise); require agreement 300x below lr.
    _assert_trees_close(ref["new_params"], got["new_params"], 1e-5, 1e-5, "updated params")
    _assert_trees_close(ref["new_ema"], got["new_ema"], 1e-5, 1e-6, "updated EMA")
    _assert_trees_close(ref["new_mu"], got["new_mu"], 1e-4, 1e-7, "Adam mu")
    assert ref["new_step"] == got["new_step"] == 1


def test_step_really_updates(runs):
    ref = runs(MESHES[0])
    moved = [float(np.max(np.abs(np.asarray(n) - np.asarray(o))))
             for n, o in zip(jax.tree.leaves(ref["new_params"]),
                             jax.tree.leaves(ref["init_params"]))]
    assert max(moved) > 1e-3   # lr 3e-3 and no warm-up
    grad_leaves = jax.tree.leaves(ref["grads"])
    assert all(np.all(np.isfinite(g)) for g in grad_leaves)
    assert sum(float(np.abs(g).sum()) for g in grad_leaves) > 0


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_step_keeps_state_shardings(runs, shape):
    run = runs(shape)
    got, expected = run["new_state_shardings"], run["expected_shardings"]
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e, a in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                       jax.tree.leaves(run["abstract"])):
        assert g.is_equivalent_to(e, a.ndim), (g, e)


# ----------------------------------------------------------------------------- layouts


def _fc1(params):
    return _find(params, "encoder", "transformer", "mlp", "fc1", "kernel")


def test_fsdp_splits_embed(runs):
    run = runs((2, 4, 1))
    params = run["fresh_state"].params
    fc1 = _fc1(params)
    depth, embed, mlp = fc1.shape
    assert (depth, embed, mlp) == (2, 64, 128)
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (depth, embed // 4, mlp)
    assert not fc1.sharding.is_fully_replicated
    # fc2 is ("mlp", "embed"): split on its last dim.
    fc2 = _find(params, "encoder", "transformer", "mlp", "fc2", "kernel")
    assert fc2.addressable_shards[0].data.shape == (depth, mlp, embed // 4)
    # Attention q kernel (layers, embed, heads, kv).
    q = _find(params, "encoder", "transformer", "attn", "query", "kernel")
    assert q.addressable_shards[0].data.shape == (depth, 64 // 4, 4, 16)


def test_fsdp_and_tensor_split(runs):
    run = runs((2, 2, 2))
    params = run["fresh_state"].params
    fc1 = _fc1(params)
    depth, embed, mlp = fc1.shape
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (depth, embed // 2, mlp // 2)
    # Each of the 8 devices holds a distinct (embed, mlp) block, replicated only over "data".
    blocks = {tuple((s.start, s.stop) for s in shard.index[1:]) for shard in fc1.addressable_shards}
    assert len(blocks) == 4
    # Attention: heads over tensor, embed over fsdp.
    q = _find(params, "encoder", "transformer", "attn", "query", "kernel")
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (depth, 64 // 2, 4 // 2, 16)
    # Decoder pixel head conv ("conv_h","conv_w","embed","conv_out"): 192 outputs over tensor.
    ffn = _find(params, "decoder", "ffn", "kernel")
    assert ffn.shape == (1, 1, 64, 8 * 8 * 3)
    assert ffn.addressable_shards[0].data.shape == (1, 1, 32, 96)
    # Final 3x3 conv has 3 output channels: tensor=2 does not divide them -> replicated there.
    conv_out = _find(params, "decoder", "conv_out", "kernel")
    assert conv_out.shape == (3, 3, 3, 3)
    assert conv_out.sharding.spec == P(None, None, None, None)
    assert conv_out.sharding.is_fully_replicated


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_optimizer_and_ema_follow_params(runs, shape):
    run = runs(shape)
    state = run["fresh_state"]
    adam = _adam_state(state.opt_state)
    for moments in (adam.mu, adam.nu, state.ema_params):
        assert jax.tree.structure(moments) == jax.tree.structure(state.params)
        for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(state.params)):
            assert m.sharding == p.sharding, (m.sharding, p.sharding)
            assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape
    assert adam.count.sharding.is_fully_replicated
    assert state.step.sharding.is_fully_replicated
    # The abstract shardings say the same thing.
    sh = run["expected_shardings"]
    sh_adam = _adam_state(sh.opt_state)
    assert jax.tree.leaves(sh_adam.mu) == jax.tree.leaves(sh.params)
    assert jax.tree.leaves(sh_adam.nu) == jax.tree.leaves(sh.params)


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_codebook_replicated(runs, shape):
    params = runs(shape)["fresh_state"].params
    codebook = params["quantize"]["embedding"]
    assert codebook.shape == (64, 8)
    assert codebook.sharding.spec == P(None, None)
    assert codebook.sharding.is_fully_replicated
    assert codebook.addressable_shards[0].data.shape == (64, 8)


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_batch_sharding(runs, shape):
    run = runs(shape)
    mesh, rules, batch = run["mesh"], run["rules"], run["batch"]
    image = batch["image"]
    data, fsdp, tensor = shape
    assert image.shape == (BATCH, IMAGE, IMAGE, 3)
    assert image.sharding.spec[0] == ("data", "fsdp")
    assert image.addressable_shards[0].data.shape == (BATCH // (data * fsdp), IMAGE, IMAGE, 3)
    # Rows split over data x fsdp, replicated over tensor.
    row_blocks = {shard.index[0].start for shard in image.addressable_shards}
    assert len(row_blocks) == data * fsdp
    np.testing.assert_array_equal(np.asarray(jax.device_get(image)), _images())
    sharding = parallel.batch_sharding(mesh, rules)
    assert sharding.spec == P(("data", "fsdp"))
    assert parallel.batch_sharding(mesh, rules, 4).spec == P(("data", "fsdp"), None, None, None)
    assert parallel.host_batch_slice(sharding, BATCH) == (0, BATCH)
    assert parallel.host_batch_slice(sharding, 32) == (0, 32)


def test_global_batch_extra_keys():
    mesh = _mesh((2, 4, 1))
    rules = parallel.rules_from_config(config_lib.base_config().sharding.rules)
    sharding = parallel.batch_sharding(mesh, rules)
    labels = np.arange(BATCH, dtype=np.int32)
    out = parallel.global_batch({"image": _images(), "label": labels}, sharding, BATCH)
    assert out["label"].shape == (BATCH,)
    assert out["label"].addressable_shards[0].data.shape == (2,)
    np.testing.assert_array_equal(np.asarray(jax.device_get(out["label"])), labels)


# ----------------------------------------------------------------------------- mesh shapes


def test_resolve_mesh_shape():
    r = parallel.resolve_mesh_shape
    assert r({"data": -1}, 8) == (8, 1, 1)
    assert r({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    assert r({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
    assert r({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert r({"tensor": -1}, 8) == (1, 1, 8)
    assert r({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert r({"fsdp": -1, "tensor": 4}, 4) == (1, 1, 4)
    assert r({"data": -1}) == (jax.device_count(), 1, 1) == (8, 1, 1)
    # Rules coming from a ConfigDict / JSON (lists) normalise to tuples.
    assert parallel.rules_from_config([["act_batch", ["data", "fsdp"]], ["embed", "fsdp"]]) == (
        ("act_batch", ("data", "fsdp")), ("embed", "fsdp"))


@pytest.mark.parametrize("sizes", [
    {"data": -1, "fsdp": -1},
    {"data": -1, "tensor": -1},
    {"data": 3, "fsdp": -1},          # 3 does not divide 8
    {"data": 3},
    {"data": 2, "fsdp": 2},           # 4 != 8 and no -1 to take the rest
    {"data": 16},
    {"data": 0, "fsdp": -1},
    {"data": -2},
])
def test_resolve_mesh_shape_errors(sizes):
    with pytest.raises(ValueError):
        parallel.resolve_mesh_shape(sizes, 8)


def test_a_mesh_size_below_one_is_named():
    with pytest.raises(ValueError, match="the size of tensor must be >= 1"):
        parallel.resolve_mesh_shape({"data": -1, "tensor": 0}, 8)


def test_resolve_mesh_shape_unknown_axis():
    with pytest.raises(ValueError, match="model"):
        parallel.resolve_mesh_shape({"data": -1, "model": 2}, 8)
    with pytest.raises(ValueError):
        parallel.create_mesh({"batch": -1})


def test_create_mesh():
    mesh = _mesh((2, 2, 2))
    assert mesh.axis_names == parallel.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.size == 8
    sub = parallel.create_mesh({"data": -1, "fsdp": 2}, jax.devices()[:4])
    assert dict(sub.shape) == {"data": 2, "fsdp": 2, "tensor": 1}


def test_config_validate_rejects_bad_mesh():
    config = _config()
    config.mesh.data = 3
    config.mesh.fsdp = -1
    with pytest.raises(config_lib.ConfigError, match="mesh"):
        config_lib.validate(config, num_devices=8)
    config = _config()
    config.mesh.data = -1
    config.batch_size = 12   # not divisible by 8 data-parallel devices
    with pytest.raises(config_lib.ConfigError, match="batch_size"):
        config_lib.validate(config, num_devices=8)


def test_fake_cpu_devices_get_a_thread_pool_that_cannot_starve_a_collective():
    """On N fake CPU devices XLA runs every device's share of a program on max(cores, N)
    threads; under async dispatch the devices of step k + 1 that start early wait in its first
    collective, and with only N threads the last participant of step k starved until XLA aborted
    the process (the CI crash). `setup_process` sizes the pool to 4 N; a dependent loop of
    collective programs, never blocked on, then finishes."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    parallel.size_cpu_thread_pool(env)
    assert env["PJRT_NPROC"] == "32"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "12"}
    parallel.size_cpu_thread_pool(env)
    assert env["PJRT_NPROC"] == "12"  # the user's choice stands
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    parallel.size_cpu_thread_pool(env)
    assert "PJRT_NPROC" not in env

    code = """
import collections, os
from tok1d import parallel
parallel.setup_process()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = parallel.create_mesh({"data": 8})
x = jax.device_put(jnp.ones((8, 1024)), NamedSharding(mesh, P("data")))
step = jax.jit(lambda x: x / (1 + jnp.sum(x * x)) + jnp.mean(x, axis=0, keepdims=True))
for _ in range(300):
    x = step(x)
x.block_until_ready()
threads = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip()
                              for t in os.listdir("/proc/self/task"))
print("pool", threads["tf_XLAEigen"])
"""
    env = subprocess_env(8)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pool 32" in run.stdout


@pytest.mark.parametrize("which", ["patchgan", "gigatok_encoder"])
def test_strided_conv_gradients_on_a_data_fsdp_tensor_mesh(which):
    """XLA (jax 0.10.2) partitions the backward of a strided conv followed by another conv
    wrongly when the kernels are split over fsdp and tensor and the batch over data x fsdp
    (2x2x2: gradient errors of 20-100%, forward exact). tok1d's convs keep their outputs on the
    batch sharding, which avoids it: the PatchGAN discriminator's and GigaTok's CNN encoder's
    gradients on 2x2x2 equal one device's."""
    import jax.numpy as jnp
    from tok1d.models import discriminator
    from tok1d.models.tokenizers import gigatok_cnn
    if which == "patchgan":
        model = discriminator.PatchGANDiscriminator(base_channels=32, num_layers=2, norm="group")
        x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    else:
        model = gigatok_cnn.GigaTokCNNEncoder(ch=64, ch_mult=(1, 2), num_res_blocks=1,
                                              z_channels=16)
        x = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    boxed = model.init(jax.random.key(0), x[:2])["params"]
    params = nn.unbox(boxed)

    def grads(params, x):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x))),
                        argnums=(0, 1))(params, x)

    want = jax.jit(grads)(params, x)
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = parallel.logical_shardings(boxed, mesh, rules)
        sharded = jax.device_put(params, shardings)
        xs = jax.device_put(x, parallel.batch_sharding(mesh, rules))
        got = jax.jit(grads)(sharded, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-6


def test_tensors_the_mesh_cannot_split_are_named_once(caplog):
    """A >= 1 MiB kernel whose dimension a ruled axis does not divide stays whole on every
    device along it (`_fit_spec`); building its state says so in one warning line, naming the
    largest such tensor; small ones (biases) are not named."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(300, name="odd", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
            return nn.Dense(1024, name="even", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "embed")))(x[..., :256])

    mesh = parallel.create_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    rules = parallel.DEFAULT_RULES
    boxed = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 1024)))["params"]
    found = parallel.whole_over_axes(boxed, mesh, rules)
    assert found == [("odd/kernel", (1024, 300), ("tensor",), 1024 * 300 * 4)]
    sh = parallel.logical_shardings(boxed, mesh, rules)
    assert sh["odd"]["kernel"].spec == P("fsdp", None)  # fsdp = 1 divides anything
    assert sh["even"]["kernel"].spec == P("tensor", "fsdp")
    with caplog.at_level(logging.WARNING):
        parallel.params_and_optimizer(None, lambda p: {}, mesh, rules, boxed=boxed)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "1 parameter tensors (1 MiB)" in lines[0]
    assert "odd/kernel (1024, 300) over tensor" in lines[0]
    assert parallel.whole_over_axes(boxed, parallel.create_mesh({"fsdp": 8}), rules) == []


@pytest.mark.parametrize("address, n, pid, needle", [
    ("localhost", 1, 0, "coordinator_address='localhost' is not HOST:PORT"),
    ("127.0.0.1:1234", 0, -1, "num_processes=0"),
    ("127.0.0.1:1234", 2, 2, r"process_id=2 \(this process: 0 .. 1\)")])
def test_a_bad_coordinator_setting_is_one_line_before_jax_distributed(address, n, pid, needle):
    """An explicit coordinator without a port, or without a valid place among the processes:
    one ValueError naming the settings (jax.distributed raised an IndexError traceback or
    "Got process_id=-1, num_processes=0")."""
    with pytest.raises(ValueError, match=needle):
        parallel.maybe_initialize_distributed(address, n, pid)


def test_process_settings_without_a_coordinator_are_refused():
    """num_processes / process_id alone were silently ignored (a one-process run)."""
    with pytest.raises(ValueError, match=r"num_processes=2 / process_id=1 need a coordinator"):
        parallel.maybe_initialize_distributed("", 2, 1)


def test_a_slurm_step_with_one_task_per_node_drives_every_gpu_of_its_node(monkeypatch):
    """launch/slurm.sbatch runs one task per node over its 8 GPUs; jax.distributed's SLURM
    detection restricted each process to the GPU of its local task id (1 of 8). One task per
    node: all of them; one task per GPU (JAX's own layout), or JAX_LOCAL_DEVICE_IDS: JAX's."""
    job = {"SLURM_JOB_ID": "7", "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
           "SLURM_GPUS_ON_NODE": "8"}
    assert parallel.slurm_local_device_ids(job) == list(range(8))
    assert parallel.slurm_local_device_ids(dict(job, SLURM_STEP_TASKS_PER_NODE="8(x4)")) is None
    assert parallel.slurm_local_device_ids(dict(job, SLURM_STEP_TASKS_PER_NODE="1,2")) is None
    assert parallel.slurm_local_device_ids(dict(job, JAX_LOCAL_DEVICE_IDS="0,1")) is None
    assert parallel.slurm_local_device_ids({k: v for k, v in job.items()
                                            if k != "SLURM_GPUS_ON_NODE"}) is None
    assert parallel.slurm_local_device_ids({"SLURM_GPUS_ON_NODE": "8"}) is None  # no SLURM
    assert parallel.slurm_local_device_ids(dict(job, OMPI_COMM_WORLD_SIZE="16")) is None
    no_step = {k: v for k, v in job.items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    assert parallel.slurm_local_device_ids(dict(no_step, SLURM_TASKS_PER_NODE="1(x2)")) is None
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(parallel, "_cpu_collectives_over_gloo", lambda: None)
    for key in [k for k in os.environ if k.startswith("SLURM_") or k == "JAX_LOCAL_DEVICE_IDS"]:
        monkeypatch.delenv(key)
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    parallel.maybe_initialize_distributed()
    parallel.maybe_initialize_distributed("node001:1234", 4, 0)  # JAX detects SLURM here too
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x4)")
    parallel.maybe_initialize_distributed()
    explicit = dict(coordinator_address="node001:1234", num_processes=4, process_id=0)
    assert calls == [{"local_device_ids": list(range(8))},
                     dict(explicit, local_device_ids=list(range(8))), {}]


def test_auto_detection_that_finds_nothing_says_so():
    """TOK1D_DISTRIBUTED=1 off a pod or cluster: one line saying that nothing was detected (it
    was JAX's "coordinator_address should be defined"). A fresh process: jax.distributed
    refuses to start after the backend has."""
    env = {k: v for k, v in subprocess_env(1).items()
           if not k.startswith(("SLURM_", "OMPI_", "TPU_", "CLOUD_TPU", "MEGASCALE"))}
    code = ("from tok1d import parallel\ntry:\n    parallel.maybe_initialize_distributed()\n"
            "except ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "no TPU pod, SLURM or Open MPI environment was found" in out.stdout, out.stderr
