"""Test setup: 8 fake CPU devices, fast CPU compiles, a persistent compilation cache.

Must run before JAX is imported anywhere (pytest imports conftest first)."""

import os
import sys

import pytest

# Not --xla_backend_optimization_level=0: with jax 0.10.2 it miscompiles the GAN train step
# (NaN gradients after the first discriminator update; correct without the flag, and with
# jax.disable_jit). tests/test_recipes.py is the reproducer.
FAST_XLA = ("--xla_force_host_platform_device_count=8 "
            "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_XLA).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE_DIR = os.environ.setdefault("TOK1D_COMPILATION_CACHE", "/tmp/tok1d_test_jax_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

try:  # absl flags must count as parsed before grain / tok1d code reads them.
    from absl import flags
    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass


def rel_err(got, want) -> float:
    """max|got - want| / max|want| in float64 (the fixture README's error measure); the shapes
    must agree exactly."""
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def subprocess_env(num_devices: int = 8) -> dict:
    """Environment for `python -m tok1d.main` subprocesses in tests."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_XLA.replace("device_count=8", f"device_count={num_devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TOK1D_COMPILATION_CACHE"] = CACHE_DIR
    return env


def main_command(config: str, workdir: str, *overrides: str) -> list:
    return [sys.executable, "-m", "tok1d.main", f"--config={os.path.join(REPO, config)}",
            f"--workdir={workdir}", *overrides]


def fixtures_path() -> str:
    """The golden-fixture directory: $TOK1D_FIXTURES, default ../shared/fixtures."""
    return os.environ.get("TOK1D_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir():
    """Golden fixtures of the official code: $TOK1D_FIXTURES, default ../shared/fixtures."""
    path = fixtures_path()
    if not os.path.isdir(path):
        pytest.skip(f"fixture directory {path} not found (set TOK1D_FIXTURES)")
    return path


def params_from_fixture(name: str, read, nargs: int = 1) -> list:
    """Collection-time parametrisation from what a fixture file holds: `read(z)` (z = the open
    npz) returns the parameter values (plain values / tuples or `pytest.param`s). When the file
    is absent (or holds no such case) the list is one skipped case that says so, so that the
    test reports a skip with the reason instead of vanishing."""
    import numpy as np
    path = os.path.join(fixtures_path(), name)
    placeholder = None if nargs == 1 else (None,) * nargs
    if not os.path.exists(path):
        why = (f"{path} not found (set TOK1D_FIXTURES)" if os.path.isdir(fixtures_path())
               else f"fixture directory {fixtures_path()} not found (set TOK1D_FIXTURES)")
        return [pytest.param(*([placeholder] if nargs == 1 else placeholder),
                             marks=pytest.mark.skip(reason=why), id="fixture-absent")]
    with np.load(path) as z:
        values = list(read(z))
    if not values:
        return [pytest.param(*([placeholder] if nargs == 1 else placeholder),
                             marks=pytest.mark.skip(reason=f"{path} holds no such case"),
                             id="none-in-fixture")]
    return values
