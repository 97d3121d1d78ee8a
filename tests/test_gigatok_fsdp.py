"""GigaTok trains with FSDP: per-device parameter and optimizer-state bytes shrink as the fsdp
mesh axis grows.

A GigaTok with the XL-XXL preset's *structure* (1D Q-Former encoder and decoder, multi-level
query init, rotation-trick l2 VQ, AdaGN + depth-to-space CNN decoder, distill MLP tapped from an
inner decoder layer, remat "full") but tiny sizes is built through `tok1d.models.create`,
its sharded state through `state.state_shardings_and_init` and its step through
`tokenizer.make_train_step`, jitted as `train_and_evaluate` does. On (data, fsdp, tensor) =
(8/f, f, 1) meshes over the 8 fake CPU devices, the compiled step's per-device argument bytes
(XLA's memory analysis) and the parameter / optimizer-state shards it takes shrink about f-fold
(f = 1, 2, 8).
The released XL-XXL preset (2.9B parameters) is checked with `jax.eval_shape` only.

Cost: three train-step compiles and one init, about 2.5 CPU-minutes with a cold compilation
cache and 40 s with a warm one (GigaTok's layers are unrolled: every layer adds leaves to
compile for). Compute is float32: a third faster to compile on CPU than bfloat16, and the
parameter / optimizer-state bytes are float32 either way.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tok1d import models, parallel
from tok1d.train import config_lib
from tok1d.train import optim
from tok1d.train import state as state_lib
from tok1d.train import tokenizer

FSDP = (1, 2, 8)  # fsdp=1 is the baseline, 8 splits over every device
IMAGE = 16
BATCH = 8
# XL-XXL structure (the preset sets layout "1d", the rotation trick and the distill MLP; it taps
# decoder layer 3 of 48 there, layer 1 of 2 here), tiny sizes: every width divides 8, so FSDP
# can split every kernel, and GroupNorm's 32 groups divide the CNN channels.
TINY = dict(image_size=IMAGE, encoder_ch=32, decoder_ch=32, encoder_ch_mult=(1, 2),
            decoder_ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
            encoder_width=64, encoder_depth=1, encoder_heads=4,
            decoder_width=64, decoder_depth=2, decoder_heads=4, distill_depth=1,
            num_latent_tokens=8, codebook_size=64, out_inner_dim=64)
# Parameters with at least this many elements must be split over "fsdp" (smaller ones, e.g. the
# codebook, norms, biases and the 3-input-channel first conv, may stay replicated).
LARGE = 4096
# Large kernels allowed to stay whole (none: the distill MLP's fc_1 / fc_2, once left whole at
# 144 + 18 MiB per device for XL-XXL, are annotated ("embed", "mlp") / ("mlp", "embed")).
MAY_STAY_REPLICATED: set[str] = set()


def _config(fsdp: int):
    config = config_lib.base_config()
    config.model = dict(name="gigatok", preset="xl_xxl", remat="full", **TINY)
    config.data.image_size = IMAGE
    config.precision = "float32"    # CPU compile time; params / optimizer state are f32 anyway
    config.batch_size = config.eval_batch_size = BATCH
    config.losses.update(l2=1.0, quantizer=1.0)
    config.optim.warmup_steps = 0   # lr(0) > 0: the first step really moves the params
    config.total_steps = 10
    config.mesh.update(data=8 // fsdp, fsdp=fsdp, tensor=1)
    config_lib.validate(config, num_devices=8)
    return config


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _device_bytes(abstract, shardings) -> int:
    """Bytes of `abstract` that one device holds when laid out as `shardings`."""
    leaves, sh = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
    assert len(leaves) == len(sh)
    return sum(_nbytes(s.shard_shape(a.shape), a.dtype) for a, s in zip(leaves, sh))


def _named(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _on_fsdp(spec) -> bool:
    return any(axes == "fsdp" or (isinstance(axes, tuple) and "fsdp" in axes) for axes in spec)


def _state_pieces(config):
    """What train_and_evaluate builds: model, optimizer, mesh, rules, sharded state."""
    model = tokenizer.build_model(config)
    mesh = parallel.create_mesh(dict(config.mesh))
    rules = parallel.rules_from_config(config.sharding.rules)
    dummy = jnp.zeros((2, IMAGE, IMAGE, 3), jnp.float32)
    init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
    param_shapes = nn.unbox(jax.eval_shape(init_params, jax.random.key(0)))
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, param_shapes)
    abstract, shardings, init = state_lib.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0)
    return model, tx, schedule, mesh, rules, abstract, shardings, init


def _compile(fsdp: int) -> dict:
    config = _config(fsdp)
    model, tx, schedule, mesh, rules, abstract, shardings, init = _state_pieces(config)
    batch_sh = parallel.batch_sharding(mesh, rules)
    batch = {"image": jax.ShapeDtypeStruct((BATCH, IMAGE, IMAGE, 3), jnp.float32,
                                           sharding=batch_sh)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(tokenizer.make_train_step(model, tx, schedule, config),
                       in_shardings=(shardings, batch_sh, {}),
                       out_shardings=(shardings, None, None), donate_argnums=(0,))
        compiled = step.lower(abstract, batch, {}).compile()
    # The layouts the executable really takes (not just the ones asked for).
    state_sh = compiled.input_shardings[0][0]
    memory = compiled.memory_analysis()
    return dict(
        config=config, mesh=mesh, rules=rules, abstract=abstract, shardings=shardings,
        init=init, compiled=compiled, state_sh=state_sh, memory=memory,
        params=_device_bytes(abstract.params, state_sh.params),
        opt_state=_device_bytes(abstract.opt_state, state_sh.opt_state),
        ema=_device_bytes(abstract.ema_params, state_sh.ema_params),
        state=_device_bytes(abstract, state_sh),
        batch=_device_bytes(batch, compiled.input_shardings[0][1]),
        total_params=sum(_nbytes(a.shape, a.dtype) for a in jax.tree.leaves(abstract.params)),
    )


@pytest.fixture(scope="module")
def compiled():
    return {f: _compile(f) for f in FSDP}


@pytest.fixture(scope="module")
def trained(compiled):
    """One real step at fsdp=8 from the sharded init."""
    run = compiled[8]
    state = run["init"](jax.random.key(run["config"].seed))
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    values = jax.device_get(state.params)   # copied: the step donates `state`
    images = np.random.default_rng(0).uniform(0, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    batch = parallel.global_batch({"image": images}, parallel.batch_sharding(
        run["mesh"], run["rules"]), BATCH)
    new_state, scalars, finite = run["compiled"](state, batch, {})
    return dict(shardings=shardings, values=values, new_state=new_state,
                scalars=jax.device_get(scalars), finite=bool(finite))


def _table(compiled) -> str:
    rows = ["fsdp  params  opt_state  ema  arguments  (per-device bytes)"]
    for f in FSDP:
        r = compiled[f]
        rows.append(f"{f:4d}  {r['params']}  {r['opt_state']}  {r['ema']}  "
                    f"{r['memory'].argument_size_in_bytes}")
    return "\n".join(rows)


def _replicated_params(run) -> dict:
    """Params of the compiled step that are not split over "fsdp", with their sizes in bytes."""
    return {name: _nbytes(a.shape, a.dtype)
            for (name, a), s in zip(_named(run["abstract"].params).items(),
                                    jax.tree.leaves(run["state_sh"].params))
            if not _on_fsdp(s.spec)}


# ----------------------------------------------------------------------------- memory


def test_compiled_step_takes_state_as_sharded(compiled):
    for f in FSDP:
        run = compiled[f]
        assert dict(run["mesh"].shape) == {"data": 8 // f, "fsdp": f, "tensor": 1}
        # The executable keeps the requested layouts of the whole state ...
        for got, want, a in zip(jax.tree.leaves(run["state_sh"]),
                                jax.tree.leaves(run["shardings"]),
                                jax.tree.leaves(run["abstract"])):
            assert got.is_equivalent_to(want, a.ndim), (f, got, want)
        # ... and XLA's per-device argument size is exactly the state shards plus the batch
        # shard: nothing is passed in replicated behind our back.
        assert run["memory"].argument_size_in_bytes == run["state"] + run["batch"], f


def test_per_device_bytes_shrink_with_fsdp(compiled):
    table = _table(compiled)
    print("\n" + table)
    full = compiled[1]
    assert full["params"] == full["total_params"]        # fsdp=1: every device has everything
    for small, big in zip(FSDP, FSDP[1:]):
        for key in ("params", "opt_state", "ema"):
            assert compiled[big][key] < compiled[small][key], (key, table)
        assert (compiled[big]["memory"].argument_size_in_bytes
                < compiled[small]["memory"].argument_size_in_bytes), table
    for f in FSDP[1:]:
        run = compiled[f]
        unsplit = _replicated_params(run)
        replicated = sum(unsplit.values())
        # Params: exactly 1/f of the fsdp-split ones plus all of the others ...
        assert run["params"] == (full["params"] - replicated) // f + replicated, (f, table)
        # ... which are few and small (norms, biases, codebook, first conv).
        leftovers = sum(v for k, v in unsplit.items() if k not in MAY_STAY_REPLICATED)
        assert leftovers <= 0.02 * full["params"], (f, sorted(unsplit.items(),
                                                              key=lambda kv: -kv[1]))
    for f in FSDP:
        run = compiled[f]
        # Adam's mu and nu follow the params (2x their bytes, plus int32 step counters), as
        # does the EMA.
        assert 0 <= run["opt_state"] - 2 * run["params"] <= 64, (f, table)
        assert run["ema"] == run["params"]
    # fsdp=8 holds well under a fifth of the fsdp=1 state per device.
    assert compiled[8]["state"] < 0.2 * compiled[1]["state"], table


# ----------------------------------------------------------------------------- layouts


def test_large_params_are_split_over_fsdp(compiled, trained):
    """The arrays init really creates: every large parameter split 8 ways over fsdp."""
    abstract = _named(compiled[8]["abstract"].params)
    fresh = _named(trained["shardings"])
    assert set(fresh) == set(abstract)
    unsplit = {}
    for name, sharding in fresh.items():
        shape = abstract[name].shape
        shard = sharding.shard_shape(shape)
        if _on_fsdp(sharding.spec):
            assert math.prod(shard) * 8 == math.prod(shape), (name, shape, sharding.spec)
        elif math.prod(shape) >= LARGE:
            unsplit[name] = shape
    assert set(unsplit) <= MAY_STAY_REPLICATED, unsplit
    # The structure under test is really there (kernels of each part are split).
    for name in ("encoder/conv_blocks_1/res_0/conv1/kernel", "decoder/adaptive_0/gamma/kernel",
                 "decoder/conv_blocks_0/upsample/conv1/kernel",
                 "vit_encoder/layer_0/cross_attn/query/kernel",
                 "vit_encoder/global_proj/kernel",
                 "vit_decoder/layer_1/mlp/fc1/kernel", "vit_decoder/distill_mlp/fc_0/kernel",
                 "vit_decoder/conv_out/kernel", "quant_conv/kernel"):
        assert _on_fsdp(fresh[name].spec), (name, fresh[name].spec)


def test_one_fsdp_step_trains(compiled, trained):
    assert trained["finite"]
    assert np.isfinite(trained["scalars"]["loss"])
    new_state = trained["new_state"]
    assert int(new_state.step) == 1
    shardings, new = _named(trained["shardings"]), _named(new_state.params)
    moved = 0.0
    for name, value in _named(trained["values"]).items():
        assert new[name].sharding.is_equivalent_to(shardings[name], value.ndim), name
        moved = max(moved, float(np.max(np.abs(np.asarray(jax.device_get(new[name])) - value))))
    assert moved > 1e-5


# ----------------------------------------------------------------------------- XL-XXL


def test_released_xl_xxl_fits_one_eighth_per_device():
    """Shapes only: the 2.9B XL-XXL preset's params on a (1, 8, 1) mesh."""
    model = models.create("gigatok", preset="xl_xxl", remat="full")
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    mesh = parallel.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rules = parallel.rules_from_config(config_lib.base_config().sharding.rules)
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = parallel.unbox_abstract(boxed)
    total = sum(_nbytes(a.shape, a.dtype) for a in jax.tree.leaves(abstract))
    assert 2.85e9 < total / 4 < 2.95e9
    per_device = _device_bytes(abstract, shardings)
    replicated = {name: _nbytes(a.shape, a.dtype)
                  for (name, a), s in zip(_named(abstract).items(), jax.tree.leaves(shardings))
                  if not _on_fsdp(s.spec)}
    known = sum(v for k, v in replicated.items() if k in MAY_STAY_REPLICATED)
    leftovers = sum(replicated.values()) - known
    # Everything else that stays whole (norms, biases, the codebook, ...) is < 0.1% of it.
    assert leftovers < 1e-3 * total, sorted(replicated.items(), key=lambda kv: -kv[1])[:10]
    assert per_device <= total / 8 + sum(replicated.values()) * 7 / 8 + 1
    assert per_device - known * 7 / 8 < 1.01 * total / 8
    assert per_device < 1.01 * total / 8  # 1,387 MiB of 11,040 MiB
