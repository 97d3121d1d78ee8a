"""The shared training loop's host-side parts: the logged means of the step scalars (jitted
clu averages, equal to the eager collection), and single-process checkpoints that write each
array whole."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tok1d.train import checkpoint, loop


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
