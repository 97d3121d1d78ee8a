"""Test setup: 8 fake CPU devices, fast CPU compiles, a persistent compilation cache.

Must run before JAX is imported anywhere (pytest imports conftest first)."""

import gc
import os
import socket
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

import numpy as np  # noqa: E402

from tok1d import parallel  # noqa: E402
from tok1d.layers.transformer import init_cache  # noqa: E402

parallel.size_cpu_thread_pool()  # 8 fake devices on 2 cores: see its docstring

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

try:  # absl flags must count as parsed before grain / tok1d code reads them.
    from absl import flags
    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass


# Tests by cost: every test carries exactly one of these markers (registered in pytest.ini).
#   unit         one module or function at a small size, in process: seconds. `-m unit` is the
#                fast subset for daily work (and the Python 3.12 CI run).
#   parity       agreement with the official code's golden fixtures: forward parity
#                (test_parity_*, and the fixture-parity tests of other files) and train-step
#                parity (test_train_parity_*).
#   integration  whole training runs, `python -m` subprocesses, the demo and the notebook,
#                two processes, exact resume.
# A file's tests take its entry in COST_BY_FILE; COST_BY_TEST overrides single tests (by the
# function's name, every parametrisation alike). A test file missing from the table fails the
# collection with a message: put it in the table.
COST_BY_FILE = {
    # unit
    "test_config.py": "unit", "test_data.py": "unit", "test_input_pipeline.py": "unit",
    "test_fid.py": "unit", "test_digit_features.py": "unit", "test_sweep.py": "unit",
    "test_gan.py": "unit", "test_gigatok_presets.py": "unit",
    "test_gpt_sampling.py": "unit", "test_image_metrics.py": "unit", "test_launch.py": "unit",
    "test_linear_probe.py": "unit", "test_maskgit_sampling.py": "unit", "test_models.py": "unit",
    "test_parallel.py": "unit", "test_prepare.py": "unit", "test_released_checkpoints.py": "unit",
    "test_summary.py": "unit", "test_tokenize.py": "unit", "test_architecture.py": "unit",
    "test_loop.py": "unit",
    "test_dino_disc.py": "unit", "test_evaluation.py": "unit",
    "test_cli.py": "unit", "test_loss_terms.py": "unit", "test_interfaces.py": "unit",
    "test_generator_interface.py": "unit", "test_rar.py": "unit", "test_quantizers.py": "unit",
    "test_registry.py": "unit",
    "test_nested_tokens.py": "unit",
    # parity (besides test_parity_* and test_train_parity_*): forward parity with the
    # official code's fixtures, or converters on fixture-shaped checkpoints
    "test_vqgan.py": "parity", "test_gigatok_cnn.py": "parity", "test_dinov2.py": "parity",
    "test_inception.py": "parity", "test_perceptual.py": "parity", "test_convert.py": "parity",
    "test_convert_generators.py": "parity",
    # integration
    "test_demo.py": "integration", "test_notebook.py": "integration",
    "test_multiprocess.py": "integration", "test_resume.py": "integration",
    "test_recipes.py": "integration", "test_gigatok_training.py": "integration",
    "test_generator_training.py": "integration",
    "test_gigatok_fsdp.py": "integration",  # GigaTok steps compiled at three fsdp sizes
    "test_bench.py": "integration",  # benchmark workloads: whole train / sample programs
    "test_trace_summary.py": "unit",
}
COST_BY_TEST = {
    # a whole (4-step) generator run on prefix tokens
    "test_nested_tokens.py::test_generator_on_prefixes_samples_k_decodable_tokens": "integration",
    # subprocesses in unit files
    "test_config.py::test_cli_rejects_mistyped_override_and_bad_shapes": "integration",
    "test_prepare.py::test_cli": "integration",
    "test_prepare.py::test_a_signal_stops_prepare_at_once_and_removes_its_temporary_files":
        "integration",
    "test_prepare.py::test_a_decoding_worker_killed_alone_stops_prepare_with_one_line":
        "integration",
    "test_data.py::test_worker_processes_give_the_batches_of_one_process": "integration",
    "test_data.py::test_input_workers_end_when_the_training_process_is_killed": "integration",
    "test_data.py::test_a_killed_input_worker_is_one_error_naming_the_signal": "integration",
    "test_cli.py::test_python_m_main_still_parses": "integration",
    "test_registry.py::test_two_hosts_converting_one_name_leave_the_weights_in_a_shared_cache":
        "integration",
    "test_registry.py::test_hosts_with_a_cache_each_all_stop_with_the_error": "integration",
    # costly tests in unit files: sharded train steps on three meshes, the evaluation suite's
    # Inception through the mesh, a trainer run
    **{f"test_parallel.py::{name}": "integration" for name in (
        "test_sharded_step_matches_data_parallel", "test_step_really_updates",
        "test_step_keeps_state_shardings", "test_fsdp_splits_embed", "test_fsdp_and_tensor_split",
        "test_optimizer_and_ema_follow_params", "test_codebook_replicated",
        "test_batch_sharding")},
    "test_evaluation.py::test_metrics_identical_on_1_and_8_devices": "integration",
    "test_evaluation.py::test_fid_of_a_set_with_itself_and_against_references": "integration",
    "test_evaluation.py::test_evaluate_job_tokenizer_and_samples": "integration",
    "test_evaluation.py::test_sfid_is_adms_spatial_frechet_distance": "integration",
    "test_linear_probe.py::test_the_tokenizer_probe_of_a_gigatok_in_the_evaluate_job":
        "integration",
    "test_dino_disc.py::test_trainer_trains_the_heads_and_keeps_the_trunk": "integration",
    # two compilations of a tokenizer train step each (50-65 s on a 2-core CPU)
    "test_models.py::test_gradient_accumulation_matches_the_full_batch_step": "integration",
    "test_models.py::test_lecam_emas_advance_microbatch_after_microbatch_as_upstream":
        "integration",
    # cheap tests in costly files
    "test_bench.py::test_flop_count_multiplies_loops": "unit",
    "test_bench.py::test_flop_count_sees_the_depthwise_shifted_sum": "unit",
    "test_bench.py::test_compilation_cache_is_on_by_default": "unit",
    "test_bench.py::test_pod_plan_arithmetic": "unit",
    "test_resume.py::test_batches_from_a_step_and_host_slices": "unit",
    "test_recipes.py::test_paper_configs_validate": "unit",
    "test_generator_training.py::test_generator_configs_validate": "unit",
    "test_gigatok_training.py::test_semantic_loss_is_mean_negative_cosine": "unit",
    "test_gigatok_training.py::test_missing_teacher_weights_fail_with_the_download_hint": "unit",
    "test_gigatok_training.py::test_semantic_loss_without_the_dinov2_teacher_is_a_config_error":
        "unit",
    "test_gigatok_training.py::test_gigatok_configs_validate_on_a_pod": "unit",
    "test_gigatok_training.py::"
    "test_schedules_are_cosine_v2_and_the_disc_follows_the_global_step": "unit",
    # no fixture, no torch in parity files
    "test_vqgan.py::test_full_size_param_counts": "unit",
    "test_vqgan.py::test_shortcut_layout": "unit",
    "test_gigatok_cnn.py::test_depth_to_space_is_dcr": "unit",
    "test_gigatok_cnn.py::test_full_size_parameter_counts": "unit",
    "test_dinov2.py::test_param_count": "unit",
    "test_dinov2.py::test_converter_errors": "unit",
    "test_perceptual.py::test_missing_weights_error_says_what_and_how": "unit",
    "test_perceptual.py::test_lpips_random_init_shapes_zero_and_gradients": "unit",
    "test_inception.py::test_load_inception_without_weights_says_how": "unit",
    "test_inception.py::test_resize_vs_numpy_and_torch": "unit",
}
COSTS = ("unit", "parity", "integration")


def _cost(path: str, name: str):
    base = os.path.basename(path)
    if f"{base}::{name}" in COST_BY_TEST:
        return COST_BY_TEST[f"{base}::{name}"]
    if base in COST_BY_FILE:
        return COST_BY_FILE[base]
    if base.startswith(("test_parity_", "test_train_parity_")):
        return "parity"
    return None


# Seconds each costly file took in a cold whole-suite run on the 2-core machine (two workers;
# 2026-12-03; GigaTok training and recipes 2026-12-04): the scheduling order only, so rough
# values are fine.
FILE_SECONDS = {
    "test_train_parity_titok.py": 285, "test_demo.py": 320, "test_gigatok_training.py": 245,
    "test_recipes.py": 235, "test_generator_training.py": 315, "test_bench.py": 275,
    "test_nested_tokens.py": 255, "test_quantizers.py": 200, "test_train_parity_gigatok.py": 200,
    "test_models.py": 170, "test_gigatok_presets.py": 160, "test_gigatok_fsdp.py": 145,
    "test_resume.py": 135, "test_train_parity_gigatok_dino.py": 135, "test_dino_disc.py": 130,
    "test_parallel.py": 125, "test_maskgit_sampling.py": 125, "test_evaluation.py": 125,
    "test_rar.py": 115, "test_interfaces.py": 115, "test_parity_titok.py": 115,
    "test_gpt_sampling.py": 105, "test_parity_rar.py": 75, "test_multiprocess.py": 60,
}


def pytest_collection_modifyitems(config, items):
    missing = set()
    for item in items:
        if any(item.get_closest_marker(c) for c in COSTS):  # marked in its own file
            continue
        cost = _cost(str(item.path), item.originalname)
        if cost is None:
            missing.add(os.path.basename(str(item.path)))
        else:
            item.add_marker(cost)
    if missing:
        raise pytest.UsageError(
            f"no cost marker for the tests of {', '.join(sorted(missing))}: add the file to "
            "COST_BY_FILE in tests/conftest.py (unit, parity or integration)")
    # Longest files first (files stay contiguous, tests keep their order inside a file): with
    # `-n 2 --dist loadfile` the long files start early instead of leaving one worker alone
    # at the end (`pytest_configure` keeps xdist from re-sorting the files by test count,
    # which put the one-test demo last). Files without a measured time follow by cost.
    rank = {}
    for item in items:
        costs = {c for c in COSTS if item.get_closest_marker(c)}
        r = 0 if "integration" in costs else 1 if "parity" in costs else 2
        if os.path.basename(str(item.path)).startswith("test_train_parity_"):
            r = 0
        rank[str(item.path)] = min(r, rank.get(str(item.path), 2))
    items.sort(key=lambda item: (-FILE_SECONDS.get(os.path.basename(str(item.path)), 0),
                                 rank[str(item.path)]))


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order above
        config.option.loadscopereorder = False


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each test module's compiled programs are dropped when it ends: an xdist worker runs dozens
    of modules, and with every executable kept alive two workers grew past 5-7 GB each (the
    persistent compilation cache still serves a later module that compiles the same program)."""
    yield
    jax.clear_caches()
    gc.collect()


def step_by_step_logits(model, params, codes, labels):
    """An AR generator's cached decoding fed `codes` (B, N): `prefill` on the labels, then
    `decode` of codes[:, t - 1] for t = 1 .. N - 1; the logits of every position (B, N, V), to
    compare with the full teacher-forced forward, and the variables after the last decode.
    Run under the caller's matmul precision."""
    prefill = jax.jit(lambda v, l: model.apply(v, l, method=model.prefill, mutable=["cache"]))
    decode = jax.jit(lambda v, c: model.apply(v, c, method=model.decode, mutable=["cache"]))
    cache = jax.jit(init_cache, static_argnums=(0, 2))(model, params, codes.shape[0])
    logits, state = prefill({"params": params, "cache": cache}, labels)
    got = [logits]
    for t in range(1, codes.shape[1]):
        logits, state = decode({"params": params, **state}, codes[:, t - 1])
        got.append(logits)
    return np.stack(got, axis=1), state


def rel_err(got, want) -> float:
    """max|got - want| / max|want| in float64 (the fixture README's error measure); the shapes
    must agree exactly."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def subprocess_env(num_devices: int = 8) -> dict:
    """Environment for `python -m tok1d.main` subprocesses in tests."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_XLA.replace("device_count=8", f"device_count={num_devices}")
    env.pop("PJRT_NPROC", None)  # sized for num_devices by parallel.size_cpu_thread_pool
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TOK1D_COMPILATION_CACHE"] = CACHE_DIR
    return env


def damage_records(shard: str) -> None:
    """Overwrites bytes among the records of an ArrayRecord `shard` (the file: its records,
    zero padding to the next block, its index), not its header or its footer: reading some
    of its records fails, opening it does not."""
    with open(shard, "rb") as f:
        records_end = f.read().find(b"\0" * 256, 128)
    with open(shard, "r+b") as f:
        for at in range(records_end // 4, records_end // 2, 64):
            f.seek(at)
            f.write(b"\xff" * 8)


def assert_damage_is_named(source, match: str) -> None:
    """Reading the records of `source` (with a `damage_records` shard) one by one, and all
    at once, fails with the one-line `DamagedRecord` error that `match` matches."""
    from tok1d import errors
    with pytest.raises(errors.DamagedRecord, match=match):
        for i in range(len(source)):
            source[i]
    with pytest.raises(errors.DamagedRecord, match=match):
        source.__getitems__(list(range(len(source))))


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (for a jax.distributed coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
