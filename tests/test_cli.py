"""The `tok1d` tool (`tok1d.cli.app`): every command's --help, one-line user errors, the quiet
console, and `python -m tok1d.main` (the design card's command). Fast: nothing trains."""

import importlib
import logging
import ast
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types

import pytest

from conftest import REPO, subprocess_env
from tok1d import errors, parallel
from tok1d.cli import app, convert, tokenize, train
from tok1d.evaluation import evaluator
from tok1d.train import loop, tokenizer
from tok1d.weights import perceptual

TINY = os.path.join(REPO, "configs", "tiny_test.py")


@pytest.fixture(autouse=True)
def restore_logging():
    """`app.run` installs console handlers on the root logger: undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("name", list(app.COMMANDS))
def test_every_command_lists_its_flags_one_line_each(name, capsys):
    assert app.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tok1d {name} ")
    listed = out.split("\nflags:\n", 1)[1].splitlines()
    assert all(line.startswith("  -") for line in listed), out
    job = importlib.import_module(f"tok1d.cli.{name}")
    fv = app._flag_values(job, ["tok1d"])
    names = {fv[n].name for n in fv}
    for flag in names:  # each flag once, with a description on its line
        rows = [line for line in listed
                if line[:26].strip().endswith((f"--{flag}", f"--[no]{flag}"))]
        assert len(rows) == 1 and rows[0][26:].strip(), (flag, out)
    assert len(listed) == len(names) + 1 + (job.CONFIG is not None), out  # + --help, overrides
    for library_flag in ("--logtostderr", "--only_check_args", "--jax_", "--flagfile"):
        assert library_flag not in out  # not absl's dump of every library flag


def test_tool_lists_commands_and_rejects_unknown_ones(capsys):
    assert app.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in app.COMMANDS)
    assert app.main(["tokenise"]) == 2
    assert "did you mean 'tokenize'" in one_error_line(capsys.readouterr().err)


def test_entry_points():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        assert '"tok1d = tok1d.cli.app:console"' in f.read()
    assert callable(app.console) and callable(app.exit_process)
    for name in app.COMMANDS:  # the protocol of tok1d.cli.app
        job = importlib.import_module(f"tok1d.cli.{name}")
        for attr in ("USAGE", "CONFIG", "REQUIRED", "POSITIONAL", "define_flags", "execute"):
            assert hasattr(job, attr), (name, attr)


def test_mistyped_override_is_one_line_naming_the_key(tmp_path, capsys):
    args = [f"--config={TINY}", f"--workdir={tmp_path}", "--config.optim.lrr=0.1"]
    assert app.run(train, args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "optim.lrr" in line and "did you mean 'optim.lr'" in line
    assert app.run(train, [f"--config={TINY}", f"--workdir={tmp_path}",
                           "--config.optimm.lr=0.1"]) == 2
    assert "'optimm' is not a config key" in one_error_line(capsys.readouterr().err)
    assert not os.listdir(tmp_path)


def test_a_fresh_run_that_fails_before_writing_leaves_no_empty_workdir(tmp_path, capsys):
    """The workdir is made before the data is opened; a fresh run refused there removes it
    again (an existing workdir is left as it was)."""
    args = [f"--config={TINY}", f"--config.data.name=array_record:{tmp_path / 'none'}"]
    assert app.run(train, args + [f"--workdir={tmp_path / 'run'}"]) == 2
    assert "Dataset directory not found" in one_error_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "run")
    os.makedirs(tmp_path / "kept")
    assert app.run(train, args + [f"--workdir={tmp_path / 'kept'}"]) == 2
    assert os.path.isdir(tmp_path / "kept")


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/nope.py", "--workdir=W"], "config file not found: configs/nope.py"),
    (["--config=configs/demo.py:extra", "--workdir=W"],
     "get_config() takes 0 positional arguments"),
    ([f"--config={TINY}:extra", "--workdir=W"], "unknown variant 'extra'"),
    ([f"--config={TINY}"], "--workdir is required"),
    ([f"--config={TINY}", "--workdir=W", "--wrokdir=X"], "Unknown command line flag 'wrokdir'"),
    ([f"--config={TINY}", "--workdir=W", "--config.optim.lr=fast"], "--config.optim.lr=fast"),
    ([f"--config={TINY}", "--workdir=W", "stray"], "unexpected arguments: stray"),
    ([f"--config={TINY}", "--workdir=W", "--config.model.qqq=1"],
     "Unknown argument(s) for model 'titok' (plus encoder_size/decoder_size): 'qqq'"),
    ([f"--config={TINY}", "--workdir=W", "--config.model.decoder_heed=logits"],
     "'decoder_heed' (did you mean 'decoder_head'?)"),
    ([f"--config={TINY}", "--workdir=W", "--config.losses.qqq=1"],
     "losses holds its module's arguments"),
])
def test_bad_command_lines_are_one_line(args, needle, capsys):
    assert app.run(train, args) == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_any_module_argument_is_an_override(tmp_path, capsys):
    """`--config.model.KEY=VALUE` (and teacher / discriminator / ar_probe `.model`) adds any
    argument of the module, not only those the config file names ("not a config key"
    before); values are Python literals or strings, and a dict or list override may be JSON
    (ml_collections refused `true`). A tokenizer whose reconstruction is
    not its input's size is one line before the train step is traced (it was the pixel
    loss's broadcasting traceback): here a pixel decoder upsampling by 16 after patch 8."""
    args = [f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
            "--config.model.decoder_head=logits", "--config.model.pixel_decoder=true",
            "--config.model.num_proxy_codes=64", "--config.model.finetune_decoder=True",
            "--config.model.pixel_channel_mult=(1, 1, 2, 2, 4)",
            "--config.discriminator.model.num_stages=2"]
    fv, _ = app._parse(train, "python -m tok1d.main", args + [
        '--config.model.quantizer_options={"levels": [8, 8], "flag": true, "none": null}'])
    assert fv.config.model.quantizer_options.to_dict() == {"levels": [8, 8], "flag": True,
                                                           "none": None}  # JSON's names
    model = fv.config.model
    assert (model.decoder_head, model.pixel_decoder, model.num_proxy_codes) == ("logits", True, 64)
    assert model.pixel_channel_mult == (1, 1, 2, 2, 4) and model.finetune_decoder is True
    assert fv.config.discriminator.model.num_stages == 2
    # The space-separated form, JSON in it, a value holding ".x=", JSON's null.
    fv, _ = app._parse(train, "python -m tok1d.main", [
        f"--config={TINY}", "--workdir=w", "--config.model.decoder_head", "logits",
        "--config.model.quantizer_options", '{"levels": [8, 8], "flag": true}',
        "--config.model.note=a.b=c", "--config.model.cnn_remat=null"])
    model = fv.config.model
    assert (model.decoder_head, model.note, model.cnn_remat) == ("logits", "a.b=c", None)
    assert model.quantizer_options.to_dict() == {"levels": [8, 8], "flag": True}
    # With an override of its whole section (applied first by the parser): refused.
    assert app.run(train, [f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
                           "--config.model.decoder_head=logits",
                           "--config.model={'name': 'titok'}"]) == 2
    assert "replaces that section" in one_error_line(capsys.readouterr().err)
    assert app.run(train, args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the tokenizer reconstructs 64x64x3 images from 32x32x3 inputs" in line, line
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("name, text, needle", [
    ("broken.py", "def get_config(:\n    pass\n", "broken.py, line 1: SyntaxError"),
    ("raises.py", "def get_config():\n    return undefined\n",
     "raises.py, line 2: NameError: name 'undefined' is not defined"),
    ("config.json", '{"seed": true}\n', "config.json is not a tok1d run's config"),
    ("config.json", 'null\n', "config.json is not a tok1d run's config"),
    ("config.json", '{"trainer": "tokenizer"}\n', "config.json has no model section with a name"),
    ("settings.cfg", "[run]\nseed: 1\n", "a config is a Python file with get_config()"),
])
def test_a_config_file_that_fails_is_one_line_naming_its_line(name, text, needle, tmp_path,
                                                              capsys):
    (tmp_path / name).write_text(text)
    assert app.run(train, [f"--config={tmp_path / name}", f"--workdir={tmp_path / 'w'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert needle in line
    # (a run's config.json: its reader's own path and error class were shown before it)
    assert "run_config.py" not in line and "tok1d.train" not in line, line


def test_a_folder_that_is_no_run_as_config_is_one_line(tmp_path, capsys):
    """--config=DIR without a run's config.json: the error itself (config_flags prefixed it
    with "Configuration is not available because of an earlier failure to load")."""
    assert app.run(train, [f"--config={tmp_path}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {tmp_path} holds no config.json of a training run.")


def test_convert_commands_that_messages_suggest_are_valid_command_lines():
    """A missing teacher, Inception or perceptual net names the convert command that makes it:
    each such command (`tok1d convert KIND --flag=...`) parses with convert's own flags."""
    texts = [*tokenizer._MISSING_TEACHER.values(), evaluator._HOW_TO_GET_INCEPTION,
             *perceptual._HOW_TO_CONVERT.values()]
    commands = [m.group(1) for text in texts
                for m in re.finditer(r"(?:tok1d convert|tok1d\.cli\.convert) ([^`)]+)", text)]
    assert len(commands) == len(texts), commands
    for command in commands:
        fv, rest = app._parse(convert, "tok1d convert", shlex.split(command))
        assert rest and rest[0] in convert.KINDS, command
        assert fv["checkpoint"].value and fv["out"].value, command
    # gigatok's choice of size names convert's own flags (it said --config, which it has not)
    from tok1d.weights import loaders
    with pytest.raises(ValueError, match="--preset NAME or --official_config FILE") as e:
        loaders._official_gigatok("unused.pt", None, None, None)
    fv, _ = app._parse(convert, "tok1d convert", ["gigatok", "--checkpoint=c", "--out=o"])
    assert all(flag in fv for flag in re.findall(r"--(\w+)", str(e.value)))


def docstring_commands(path: str) -> list[str]:
    """The tok1d command lines of a module's docstring: indented lines that start with
    `python -m tok1d.main`, `python -m tok1d.cli.COMMAND` or `tok1d COMMAND`, joined over their
    trailing backslashes; lines with elisions or optional parts (`...`, `[`) are left out."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    commands, current = [], None
    for line in doc.splitlines():
        text = line.strip()
        if current is not None:
            current += " " + text.rstrip("\\")
        elif line.startswith("    ") and re.match(r"(python -m tok1d[.]|tok1d [a-z])", text):
            current = text.rstrip("\\")
        if current is not None and not text.endswith("\\"):
            commands.append(current.split("  #")[0])
            current = None
    return [c for c in commands if "..." not in c and "[" not in c]


def job_of(command: str):
    """(job module, prog, args) of a tok1d command line."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "tok1d.main"]:
        return train, "tok1d train", words[3:]
    if words[:2] == ["python", "-m"]:
        name, args = words[2].split(".")[-1], words[3:]
    else:
        name, args = words[1], words[2:]
    return importlib.import_module(f"tok1d.cli.{name}"), f"tok1d {name}", args


DOCUMENTED = sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))
                    + glob.glob(os.path.join(REPO, "tok1d", "cli", "*.py")))


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: os.path.relpath(p, REPO))
def test_commands_in_docstrings_parse(path, monkeypatch):
    """Every command a config's or a command's docstring shows parses: its flags exist, its
    config file and variant load and its `--config.` overrides name real keys."""
    monkeypatch.chdir(REPO)
    for command in docstring_commands(path):
        job, prog, args = job_of(command)
        try:
            app._parse(job, prog, args)
        except errors.UserError as e:
            pytest.fail(f"{os.path.relpath(path, REPO)}: {command}: {e}")


def test_docstring_commands_are_found():
    rar = docstring_commands(os.path.join(REPO, "configs", "rar.py"))
    assert rar[0].startswith("python -m tok1d.cli.tokenize --tokenizer=maskgit_vqgan/")
    assert rar[0].endswith("--out=/gcs/BUCKET/tokens_maskgit_vqgan") and len(rar) == 5
    assert sum(len(docstring_commands(p)) for p in DOCUMENTED) > 40


@pytest.mark.parametrize("command, args, needle", [
    ("tokenize", ["--tokenizer=T", "--data=demo", "--out=O", "--batch_size=0"],
     "flag --batch_size=0: 0 is not a positive integer"),
    ("sample", ["--checkpoint=C", "--out=O", "--num_images=-5"],
     "flag --num_images=-5: -5 is not a positive integer"),
    ("sample", ["--checkpoint=C", "--out=O", "--batch_size=-2"], "flag --batch_size=-2"),
    ("bench", [f"--config={TINY}", "--steps=0"], "flag --steps=0"),
    ("prepare", ["--input=I", "--out=O", "--workers=-2"], "flag --workers=-2"),
    ("prepare", ["--input=I", "--out=O", "--val_fraction=1.5"], "not a number in the range"),
    ("tokenize", ["--tokenizer=T", "--data=demo", "--out=O", "--num_examples=0"],
     "flag --num_examples=0: -1 (all) or a positive number"),
    ("sample", ["--checkpoint=C", "--out=O", "--sweep", "--sweep_guidance=1,abc"],
     "guidance scales are comma-separated finite numbers >= 0"),
    ("sample", ["--checkpoint=C", "--out=O", "--sweep", "--sweep_temperature=-1"],
     "temperatures are comma-separated finite numbers >= 0"),
    ("sample", [f"--config={os.path.join(REPO, 'configs', 'gpt_gigatok.py')}:b",
                "--checkpoint=C", "--tokenizer=T", "--out=O", "--sweep",
                "--sweep_temperature=0,1"], "this sampler's temperatures must be > 0"),
    ("sample", [f"--config={os.path.join(REPO, 'configs', 'rar.py')}:b",
                "--checkpoint=C", "--tokenizer=T", "--out=O", "--sweep",
                "--sweep_temperature=1,0"], "this sampler's temperatures must be > 0"),
])
def test_counts_out_of_range_are_one_line(command, args, needle, capsys):
    """A count or fraction out of its range is refused while parsing, naming the flag (it
    used to reach the job: a ZeroDivisionError, 'need at least one array to concatenate')."""
    assert app.run(importlib.import_module(f"tok1d.cli.{command}"), args) == 2
    assert needle in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command, args", [
    ("tokenize", ["--tokenizer=T", "--data=demo"]),
    ("sample", [f"--config={os.path.join(REPO, 'configs', 'gpt_gigatok.py')}:b", "--checkpoint=C",
                "--tokenizer=T"]),
    ("evaluate", ["--checkpoint=C"]),
    ("bench", [f"--config={TINY}"])])
def test_every_command_takes_the_multi_host_flags(command, args, tmp_path, capsys):
    """tokenize, sample, evaluate and bench take --coordinator_address / --num_processes /
    --process_id (only tokenize did); process settings without a coordinator are one line
    (they were ignored: a one-process run)."""
    job = importlib.import_module(f"tok1d.cli.{command}")
    out = [f"--out={tmp_path / 'o'}"] if command != "bench" else []
    assert app.run(job, args + out + ["--num_processes=2", "--process_id=1"]) == 2
    assert "num_processes=2 / process_id=1 need a coordinator_address" in one_error_line(
        capsys.readouterr().err)


def test_sampling_with_a_tokenizer_config_or_workdir_is_one_line(tmp_path, capsys):
    """`tok1d sample` given a tokenizer's config, or a tokenizer's workdir as the generator
    checkpoint, names the mistake."""
    sample = importlib.import_module("tok1d.cli.sample")
    args = [f"--config={TINY}", "--checkpoint=C", "--tokenizer=T", "--out=O"]
    assert app.run(sample, args) == 2
    assert "not a generator: pass a generator's config" in one_error_line(
        capsys.readouterr().err)
    (tmp_path / "config.json").write_text('{"trainer": "tokenizer"}')
    args = [f"--config={os.path.join(REPO, 'configs', 'maskgit_titok.py')}:l32",
            f"--checkpoint={tmp_path}", "--tokenizer=T", "--out=O"]
    assert app.run(sample, args) == 2
    assert "is of a tokenizer run, not of a generator" in one_error_line(
        capsys.readouterr().err)
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # one checkpoint's folder: its run's
    args[1] = f"--checkpoint={tmp_path / 'checkpoints' / '5'}"
    assert app.run(sample, args) == 2
    assert "5 is of a tokenizer run, not of a generator" in one_error_line(
        capsys.readouterr().err)
    # Without --config the run's own config is used: the error names the checkpoint given,
    # not "the config" (which the user never passed).
    (tmp_path / "config.json").write_text(json.dumps(app.load_config_file(TINY).to_dict()))
    assert app.run(sample, [f"--checkpoint={tmp_path}", "--tokenizer=T", "--out=O"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --checkpoint={tmp_path} is of a tokenizer run (titok), not of a generator: "
        "sample takes a generator's checkpoint (a tokenizer goes to --tokenizer).")


def test_a_damaged_checkpoint_file_is_one_line(tmp_path, capsys):
    """`tok1d convert` of a file that is not what its extension says names the file."""
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk" * 8)
    args = ["titok", f"--checkpoint={junk}", f"--out={tmp_path / 'out'}"]
    assert app.run(convert, args) == 2
    assert f"{junk} is not a readable checkpoint" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    assert app.run(convert, ["titok", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
    assert "is a directory: give the official checkpoint file" in one_error_line(
        capsys.readouterr().err)


def test_a_very_long_error_is_cut_unless_verbose(capsys):
    """A converter's mismatch lists every key (22k characters for a GigaTok preset): the
    console's line stops at app.MAX_ERROR_CHARS unless -v 1 asks for all of it."""
    def execute(fv, args):
        raise errors.UserError("missing: " + ", ".join(f"key_{i}" for i in range(5000)))
    assert app.run(_job(execute), []) == 2
    line = one_error_line(capsys.readouterr().err)
    assert len(line) < app.MAX_ERROR_CHARS + 100 and "-v 1 prints the whole message" in line
    assert app.run(_job(execute), ["--verbosity=1"]) == 2
    assert "key_4999" in one_error_line(capsys.readouterr().err)


def test_an_output_directory_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    assert app.run(train, [f"--config={TINY}", f"--workdir={path}"]) == 2
    assert "is a file, not a directory" in one_error_line(capsys.readouterr().err)
    # Every output directory: an existing file is one line, not `[Errno 17] File exists`.
    assert convert.main(["titok", f"--checkpoint={path}", f"--out={path}"]) == 2
    assert f"--out={path} is a file, not a directory" in one_error_line(capsys.readouterr().err)
    assert app.run(tokenize, ["--tokenizer=x", "--data=digits", f"--out={path}/tokens"]) == 2
    assert f"{path} is a file, not a directory" in one_error_line(capsys.readouterr().err)
    # A workdir whose checkpoints folder is a file: refused at the start (it trained to the
    # first save, then failed there with orbax's errors).
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")
    assert app.run(train, [f"--config={TINY}", f"--workdir={run}"]) == 2
    assert (f"{run / 'checkpoints'} is a file: the run keeps its checkpoints"
            in one_error_line(capsys.readouterr().err))
    assert sorted(os.listdir(run)) == ["checkpoints"]


def test_a_bucket_path_is_refused_instead_of_becoming_a_local_folder(tmp_path, capsys,
                                                                     monkeypatch):
    """tok1d writes with the local file API: --workdir=gs://B/run made ./gs:/B/run on each
    host's own disk. Refused in one line (mount the bucket), before anything is written."""
    monkeypatch.chdir(tmp_path)
    assert app.run(train, [f"--config={TINY}", "--workdir=gs://b/run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--workdir=gs://b/run" in line and "gcsfuse" in line
    assert app.run(tokenize, ["--tokenizer=x", "--data=digits", "--out=gs://b/tokens"]) == 2
    assert "--out=gs://b/tokens" in one_error_line(capsys.readouterr().err)
    assert convert.main(["--from", "rar_b", "--out=gs://b/rar"]) == 2
    assert "--out=gs://b/rar" in one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("TOK1D_CACHE", "gs://b/cache")
    assert convert.main(["--from", "rar_b"]) == 2
    assert "$TOK1D_CACHE)=gs://b/cache" in one_error_line(capsys.readouterr().err)
    assert not os.listdir(tmp_path)
    # A local folder is no source to convert (it printed "already converted: FOLDER").
    assert convert.main(["--from", str(REPO)]) == 2
    assert f"--from={REPO} is a local folder" in one_error_line(capsys.readouterr().err)


def test_missing_optional_dependency(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    ckpt = tmp_path / "tokenizer.bin"
    ckpt.write_bytes(b"")
    assert convert.main(["titok", f"--checkpoint={ckpt}", f"--out={tmp_path / 'out'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "PyTorch" in line and "pip install -e '.[convert]'` in tok1d's checkout" in line
    assert not (tmp_path / "out").exists()
    bare = ModuleNotFoundError("No module named 'safetensors'", name="safetensors")
    assert "pip install safetensors" in app.user_error_message(bare)
    assert app.user_error_message(ModuleNotFoundError("x", name="tok1d.nope")) is None  # a bug


def test_a_collective_left_waiting_by_another_process_is_one_line(monkeypatch, capsys):
    """In a multi-process run, a collective that timed out because another process stopped
    (its own error printed there) is one line saying so (it was a 64-line JaxRuntimeError
    traceback about Gloo); one process's runtime error is a bug's traceback as before."""
    import jax
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo context initialization failed: "
                                      "DEADLINE_EXCEEDED: GetKeyValue() timed out")

    def execute(fv, args):
        raise gloo
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(app, "_peer_failed", False)
    assert app.run(_job(execute), []) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: process 0 of 2 stopped waiting for the others (")
    assert line.endswith("another process has probably stopped with an error; its own "
                         "output says which.")
    assert app._peer_failed  # exit_process skips JAX's shutdown barrier (~90 s, then abort)
    # What real runs print when a peer was killed (a walkthrough): a collective's reset
    # connection, and a backend that never started because the other process stopped first.
    for error in (jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: [...] Read "
                                             "error [127.0.0.1]:5: Connection reset by peer"),
                  RuntimeError("Unable to initialize backend 'cpu': INTERNAL: Getting local "
                               "topologies failed: GetKeyValue() timed out with key: x")):
        gloo = error
        assert app.run(_job(execute), []) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "another process has probably stopped with an error" in line, line
    monkeypatch.setattr(app, "_peer_failed", False)
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo context initialization failed: "
                                      "DEADLINE_EXCEEDED: GetKeyValue() timed out")
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    with pytest.raises(jax.errors.JaxRuntimeError):
        app.run(_job(execute), [])


def _job(execute):
    return types.SimpleNamespace(__name__="job", __spec__=None, __doc__="A job.", USAGE="",
                                 CONFIG=None, REQUIRED=(), POSITIONAL="",
                                 define_flags=lambda fv: None, execute=execute)


def test_nonfinite_loss_is_one_line_with_exit_status_1(capsys):
    def execute(fv, args):
        loop.check_finite(5, False, 4)
    assert app.run(_job(execute), []) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "NaN/Inf at step 5" in line and "last good checkpoint (step 4)" in line
    assert line.startswith("error: Loss or gradient norm")  # a UserError's: no type name


def test_bugs_keep_their_traceback():
    def execute(fv, args):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        app.run(_job(execute), [])
    assert issubclass(loop.NonFiniteLossError, errors.UserError)


def test_console_shows_tok1d_lines_and_hides_library_info(capsys):
    def execute(fv, args):
        logging.getLogger("tok1d.train.checkpoint").info("checkpoint saved at step 4")
        logging.info("Model titok: 0.04M parameters")
        logging.getLogger("absl").info("orbax internals")
        logging.getLogger("absl").warning("Metadata file does not exist")
        logging.getLogger("jax._src.xla_bridge").warning("a real warning")
        # orbax's save thread on a full disk (tok1d's Checkpointer raises its own line).
        logging.getLogger("absl").handle(logging.LogRecord(
            "absl", logging.ERROR, os.path.join(os.sep, "site-packages", "orbax", "checkpoint",
                                                "async.py"), 1,
            "Save Finalize thread failed: No space left on device", None, None))
        logging.getLogger("absl").error("an absl error of another library")
    assert app.run(_job(execute), []) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["checkpoint saved at step 4", "Model titok: 0.04M parameters"]
    assert "orbax internals" not in out + err and "Metadata" not in out + err
    assert "a real warning" in err and "Save Finalize" not in err
    assert "an absl error of another library" in err
    assert app.run(_job(execute), ["--verbosity=1"]) == 0
    out, err = capsys.readouterr()
    assert "orbax internals" in out and "checkpoint saved at step 4" in out
    assert "Metadata file does not exist" in err


def test_python_m_main_still_parses(tmp_path):
    fv, rest = app._parse(train, "python -m tok1d.main",
                          [f"--config={TINY}", f"--workdir={tmp_path}", "--config.optim.lr=0.5",
                           "--config.total_steps=3"])
    assert rest == [] and fv.workdir == str(tmp_path)
    assert fv.config.optim.lr == 0.5 and fv.config.total_steps == 3
    run = subprocess.run([sys.executable, "-m", "tok1d.main", "--help"], env=subprocess_env(1),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: python -m tok1d.main --config=")
    assert "--workdir" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "tok1d.main", f"--config={TINY}",
                          f"--workdir={tmp_path}", "--config.optim.lrr=0.1"],
                         env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "optim.lrr" in one_error_line(bad.stderr)


def test_a_runs_own_config_is_the_default_config(tmp_path):
    """A run's config.json serves as `--config` (`--config=RUN/config.json` or `--config=RUN`,
    with --config.KEY overrides on top), and `tok1d sample` / `evaluate` without --config use
    the --checkpoint run's: laid onto the trainer's schema (keys added since keep their
    defaults, lists back to tuples), so it validates."""
    import json
    from tok1d.cli import evaluate, sample
    from tok1d.train import config_lib
    original = config_lib.load(os.path.join(REPO, "configs", "gpt_gigatok.py:b"))
    run = tmp_path / "run"
    written = original.to_dict()
    del written["evaluation"]["linear_probe_source"]  # as a run from before that key
    loop.write_json(str(run / "config.json"), written)
    json.loads((run / "config.json").read_text())  # JSON: the rules' tuples became lists

    loaded = config_lib.from_run(str(run))
    config_lib.validate(loaded, num_devices=8)
    assert loaded.to_dict() == original.to_dict()
    for spec in (run, run / "config.json"):  # config_lib.load takes them too (the notebook)
        assert config_lib.load(str(spec)).to_dict() == original.to_dict()
    assert isinstance(loaded.sharding.rules, tuple)
    for form in ([f"--checkpoint={run}"], ["--checkpoint", str(run)], [f"-checkpoint={run}"]):
        fv, _ = app._parse(sample, "tok1d sample", form + ["--out=o",
                                                           "--config.sampling.cfg_scale=3.0"])
        assert fv.config.sampling.cfg_scale == 3.0 and fv.config.model.size == "B"
    fv, _ = app._parse(evaluate, "tok1d evaluate", ["--checkpoint", str(run), "--out", "o"])
    assert fv.config.model.size == "B"  # (the space form used to fall back to the defaults)
    assert "(required)" not in next(line for line in app.help_text(
        sample, "tok1d sample", app._flag_values(sample, ["tok1d"])).splitlines()
        if line.strip().startswith("--config "))
    for spec in (str(run / "config.json"), str(run)):
        fv, _ = app._parse(evaluate, "tok1d evaluate", [f"--config={spec}", "--out=o",
                                                        "--config.seed=7"])
        assert fv.config.seed == 7 and fv.config.trainer == "generator"
    fv, _ = app._parse(evaluate, "tok1d evaluate", [f"--checkpoint={tmp_path}", "--out=o"])
    assert fv.config is None  # no config.json: evaluate's defaults (base_config())
    fv, _ = app._parse(evaluate, "tok1d evaluate", [
        "--samples=s.npz", "--out=o", "--config.evaluation.allow_random_init=True"])
    assert fv.config.evaluation.allow_random_init  # overrides of the defaults, no --config
    assert fv.config.to_dict() == dict(config_lib.base_config().to_dict(), evaluation=dict(
        config_lib.base_config().evaluation.to_dict(), allow_random_init=True))
    with pytest.raises(errors.UserError, match="'sampling.cfg_scal' is not a config key"):
        app._parse(sample, "tok1d sample", [f"--checkpoint={run}", "--out=o",
                                            "--config.sampling.cfg_scal=3.0"])


def test_one_checkpoints_folder_is_a_checkpoint(tmp_path, capsys):
    """`--checkpoint=RUN/checkpoints/<step>` (or `tokenize --tokenizer=...` of it) reads that
    step, with the run's config.json (there was no way to choose a step: the latest only,
    and a damaged latest left the earlier ones out of reach); a step that is not there is
    named with the run's steps."""
    import json
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from configs import tiny_test
    from flax import linen as nn
    from tok1d import models
    from tok1d.cli import evaluate, sample
    from tok1d.weights import layout, loaders
    config = tiny_test.get_config()
    model = models.create(config.model.name, **layout.model_kwargs(config))
    params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), np.zeros(
        (1, config.data.image_size, config.data.image_size, 3), np.float32))["params"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    with ocp.StandardCheckpointer() as ckptr:
        for step in (4, 8):
            ckptr.save(str(run / "checkpoints" / str(step) / "state"),
                       {"params": jax.tree.map(lambda x, s=step: x + s, params)})
    for path, step in ((run, 8), (run / "checkpoints", 8), (run / "checkpoints" / "4", 4)):
        assert loaders.checkpoint_step(str(path)) == step
        got = loaders.load_params(str(path))
        np.testing.assert_array_equal(got["latent_tokens"], params["latent_tokens"] + step)
        _, tok = loaders.load_tokenizer(str(path))
        np.testing.assert_array_equal(tok["latent_tokens"], params["latent_tokens"] + step)
    assert loaders.describe_tokenizer(str(run / "checkpoints" / "4"))["step"] == 4
    step4 = str(run / "checkpoints" / "4")
    for job in (sample, evaluate):  # the run's config.json
        fv, _ = app._parse(job, "tok1d x", [f"--checkpoint={step4}", "--out=o"])
        assert fv.config.model.name == config.model.name
    with pytest.raises(errors.UserError, match=r"run has no checkpoint at step 6 \(its steps: "
                       r"4, 8\)"):
        loaders.load_params(str(run / "checkpoints" / "6"))
    assert app.run(evaluate, [f"--checkpoint={run / 'checkpoints' / '6'}",
                              f"--out={tmp_path / 'o'}"]) == 2
    assert "has no checkpoint at step 6" in one_error_line(capsys.readouterr().err)
    # Another model's config: the first shape differences, the rest counted, and the run's own
    # config.json named (it printed every array of other shapes: 2000 characters).
    assert app.run(evaluate, [f"--config={TINY}", "--config.model.encoder_width=64",
                              f"--checkpoint={step4}", f"--out={tmp_path / 'o'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"; \d+ more arrays of other shapes", line) and len(line) < 800, line
    assert line.endswith("The run's config.json has other model settings (encoder_width): "
                         "without --config, sample and evaluate use it. (ValueError)"), line


def test_any_sampler_option_is_an_override(capsys):
    """`--config.sampling.KEY=VALUE` adds any option of the config's sampler that the config
    file does not name (RAR's `greedy` was refused, with a hint to give the whole section
    with a 'name' it does not have); another key is refused with the sampler's options."""
    from tok1d.cli import sample
    from tok1d.generation import common
    rar = [f"--config={os.path.join(REPO, 'configs', 'rar.py')}:b", "--checkpoint=C", "--out=o"]
    fv, _ = app._parse(sample, "tok1d sample", rar + ["--config.sampling.greedy=True",
                                                      "--config.sampling.top_k", "5"])
    assert fv.config.sampling.greedy is True and fv.config.sampling.top_k == 5
    assert app.run(sample, rar + ["--config.sampling.gredy=True"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'sampling.gredy' is not a config key (the rar sampler's options: cache_chunk, " \
           "greedy," in line
    gpt = [f"--config={os.path.join(REPO, 'configs', 'gpt_gigatok.py')}:b", "--checkpoint=C",
           "--out=o"]
    assert app.run(sample, gpt + ["--config.sampling.cfg_scal=3.0"]) == 2  # a typo: named
    assert "did you mean 'sampling.cfg_scale'" in one_error_line(capsys.readouterr().err)
    from tok1d.generation import maskgit
    assert common.sampler_options(types.SimpleNamespace(objective="masked")) == tuple(
        sorted(maskgit.SAMPLER_DEFAULTS))


def test_a_damaged_run_config_is_named_alone(tmp_path, capsys):
    """A run's damaged config.json, read as --config (or through --checkpoint), is one line
    naming that file: not tok1d's internal run_config.py loader, its line and error type."""
    from tok1d.cli import sample
    (tmp_path / "config.json").write_text('{"trainer": "gen')
    for job, args in ((sample, [f"--checkpoint={tmp_path}", "--out=o"]),
                      (train, [f"--config={tmp_path / 'config.json'}",
                               f"--workdir={tmp_path / 'w'}"])):
        assert app.run(job, args) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {tmp_path / 'config.json'} is not valid JSON"), line
        assert "run_config.py" not in line and "UserError" not in line


def test_a_checkpoint_without_a_run_config_is_named(tmp_path, capsys):
    """`tok1d sample` given no --config and a --checkpoint that is not a run names that
    checkpoint: missing, or a folder without the run's config.json (it said "--config is
    required" either way); `evaluate` of a missing checkpoint names it (it called any path
    "pretrained weights")."""
    from tok1d.cli import evaluate, sample
    assert app.run(sample, [f"--checkpoint={tmp_path / 'none'}", "--out=o"]) == 2
    assert one_error_line(capsys.readouterr().err).endswith(
        f"--checkpoint={tmp_path / 'none'}: no such folder or file.")
    assert app.run(sample, ["--checkpoint", str(tmp_path), "--out=o"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--config is required" in line and "no config.json" in line and str(tmp_path) in line
    assert app.run(evaluate, [f"--checkpoint={tmp_path / 'none'}",
                              f"--out={tmp_path / 'o'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"--checkpoint={tmp_path / 'none'}: no such folder or file.")
    assert not os.path.exists(tmp_path / "o")


def test_the_resource_trackers_exit_warning_is_silenced():
    """grain's worker processes leave shared-memory batches in flight at exit, which the
    resource tracker removes while warning "There appear to be N leaked shared_memory
    objects" (library noise at the end of every run with data workers). The tracker takes its
    warning filters from this process's -W options: the commands add one for it."""
    import multiprocessing.util
    app.quiet_resource_tracker()
    app.quiet_resource_tracker()
    flags = multiprocessing.util._args_from_interpreter_flags()
    assert flags.count("-W" + app._TRACKER_FILTER) == 1, flags


def test_the_closed_event_loop_tracebacks_of_a_failed_restore_are_silenced(capsys):
    """After a failed checkpoint read, tensorstore's callbacks into orbax's closed event loop
    each printed a "RuntimeError: Event loop is closed" traceback (hundreds of lines above the
    one error line); the console drops those, and only those, unless --verbosity >= 1."""
    class RaisesWhenCollected:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    before = sys.unraisablehook
    sys.unraisablehook = sys.__unraisablehook__  # (pytest's would turn them into warnings)
    try:
        for verbosity, shown in ((0, False), (1, True), (0, False)):
            app.setup_console(verbosity)
            for error, expect in ((RuntimeError("Event loop is closed"), shown),
                                  (ValueError("something else"), True)):
                RaisesWhenCollected(error)  # collected at once: an unraisable exception
                assert (str(error) in capsys.readouterr().err) == expect, (verbosity, error)
        # A Ctrl-C caught in a finalizer (JAX's gc callback) is the main thread's again,
        # without the "Exception ignored" traceback.
        app.setup_console(0)
        handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # (the CLI's; an
        try:                                                # xdist worker ignores SIGINT)
            with pytest.raises(KeyboardInterrupt):
                RaisesWhenCollected(KeyboardInterrupt())
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # (it comes at a bytecode check)
                    pass
        finally:
            signal.signal(signal.SIGINT, handler)
        assert "KeyboardInterrupt" not in capsys.readouterr().err
        # The hook in place before goes on (called once: no wrapper of a wrapper).
        calls = []
        sys.unraisablehook = calls.append
        app.setup_console(0)
        app.setup_console(0)
        RaisesWhenCollected(ValueError("to the notebook's hook"))
        assert len(calls) == 1 and str(calls[0].exc_value) == "to the notebook's hook"
        app.setup_console(1)
        assert sys.unraisablehook == calls.append
    finally:
        app.setup_console(0)
        sys.unraisablehook = before


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path, capsys, monkeypatch):
    """Two runs on one workdir (a job resubmitted while the first still runs) saved into the
    same step folders and interleaved metrics.jsonl: the second is refused in one line while
    the first holds the workdir's lock, which goes with the first (a kernel lock: a killed run
    leaves none)."""
    from tok1d.train import loop
    run = tmp_path / "run"
    run.mkdir()
    with loop.workdir_lock(str(run)):
        assert app.run(train, [f"--config={TINY}", f"--workdir={run}"]) == 2
        assert "is in use by another run" in one_error_line(capsys.readouterr().err)
        with pytest.raises(errors.UserError, match="in use by another run"):
            with loop.workdir_lock(str(run)):
                pass
    assert os.listdir(run) == []  # the refused run wrote nothing
    with loop.workdir_lock(str(run)):  # released
        pass
    # Two runs on one fresh workdir at once: the refused one leaves the folder the other made
    # (and holds) in place, though it saw none.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setattr(train, "first_missing", lambda path: str(fresh))
    with loop.workdir_lock(str(fresh)):
        assert app.run(train, [f"--config={TINY}", f"--workdir={fresh}"]) == 2
        assert "is in use by another run" in one_error_line(capsys.readouterr().err)
        assert fresh.is_dir()


def test_a_refused_fresh_run_leaves_no_folders(tmp_path, capsys):
    """A fresh run refused for its config leaves neither its workdir nor the folders made
    above it (the workdir is made before the config is validated, to hold its lock)."""
    workdir = tmp_path / "a" / "b" / "w"
    assert app.run(train, [f"--config={TINY}", f"--workdir={workdir}",
                           "--config.ema_decay=2.0"]) == 2
    assert "ema_decay=2.0 must be in [0, 1)" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_flags_are_found_and_replaced_in_every_form_absl_takes():
    """One reader of flags in a command line serves the run config's substitution, the
    checkpoint lookup and the processes' command comparison: `--name=V`, `--name V`,
    `-name=V`, `-name V`; `--name.x=y` overrides and a trailing bare flag are not the flag."""
    args = ["--config", "a.py", "--config.seed=3", "-process_id", "1", "--x=2", "--config"]
    assert app._flag_arg(args, "config") == "a.py"
    assert app._flag_arg(["-config=b.py"], "config") == "b.py"
    assert app._flag_arg(["--config=a.py", "--config", "b.py"], "config") == "b.py"  # absl's
    assert app._flag_arg(["--config=a.py", "--", "--config=b.py"], "config") == "a.py"
    assert app._flag_arg(["--config.seed=3"], "config") is None
    assert app._replace_flag(args, "config", "c.py") == [
        "--config=c.py", "--config.seed=3", "-process_id", "1", "--x=2", "--config"]
    assert app._without_process_id(
        args + ["--config.distributed.process_id=4", "--process_id=0"]) == [
        "--config", "a.py", "--config.seed=3", "--x=2", "--config"]


def test_sigterm_before_a_command_takes_it_over_ends_it_as_ctrl_c_does(capsys):
    """A training run sent SIGTERM during its start-up (restoring, compiling: before the loop
    takes the signal over to save and stop) ended without a word (status 143 from the
    default action); every command now ends as for Ctrl-C, its `finally` blocks run."""
    import signal
    import time
    import types
    cleaned = []
    job = types.ModuleType("job")
    job.CONFIG, job.REQUIRED, job.POSITIONAL = None, (), None
    job.define_flags = lambda fv: None

    def execute(fv, args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            cleaned.append(True)

    job.execute = execute
    before = signal.getsignal(signal.SIGTERM)
    assert app.run(job, []) == 128 + signal.SIGTERM
    assert cleaned == [True]
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before

    def execute_in_a_library(fv, args):  # one that raises a KeyboardInterrupt of its own
        try:
            execute(fv, args)
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # (orbax's async write of a conversion did)

    job.execute = execute_in_a_library
    assert app.run(job, []) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    job.execute = lambda fv, args: (_ for _ in ()).throw(KeyboardInterrupt)  # Ctrl-C: still 130
    assert app.run(job, []) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


def test_sigterm_still_ends_a_command_after_joining_a_multi_process_run(monkeypatch, capsys):
    """`jax.distributed.initialize` puts JAX's preemption notifier in place of the SIGTERM
    handler (here: SIG_IGN in its place), which only the training loop polls: two-process
    sample / evaluate / tokenize runs went on to their end after SIGTERM. `app.setup_process`
    puts tok1d's handler back."""
    import signal
    import time
    import types
    monkeypatch.setattr(parallel, "setup_process",
                        lambda *args: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    job = types.ModuleType("job")
    job.CONFIG, job.REQUIRED, job.POSITIONAL = None, (), None
    job.define_flags = app.define_distributed_flags

    def execute(fv, args):
        app.setup_process(fv)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    job.execute = execute
    before = signal.getsignal(signal.SIGTERM)
    assert app.run(job, []) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before
