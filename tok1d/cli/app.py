"""What every tok1d command shares: its flags, a quiet console, and one-line errors.

A command is a module of `tok1d.cli` with
  USAGE        the arguments part of its usage line ("--config=FILE --workdir=DIR [flags]");
  CONFIG       None, or the help of its `--config` flag (ml_collections config file; any
               `--config.KEY=VALUE` overrides a value);
  REQUIRED     names of flags that must be given;
  POSITIONAL   the name of the one positional argument it takes ("" for none; "[NAME]" when
               it may be left out);
  define_flags(fv)       its flags, defined on the FlagValues `fv`;
  execute(fv, args)      the job (args: the positional arguments).
`run(module, argv)` parses the command line on a FlagValues of its own (so `--help` lists only
the command's flags, one line each), sets up the console, runs the job and turns the errors a
user can fix into one `error: ...` line and a non-zero exit status: a bad or unknown flag, a
mistyped `--config.KEY` override, a missing config file, an invalid config, a missing input,
a missing optional dependency, a non-finite loss (`tok1d.errors.UserError` and its subclasses,
and the ValueErrors / OSErrors the libraries raise for bad inputs). Anything else is a bug and
keeps its traceback (`--verbosity=2` shows the traceback of every error).

The console: the lines tok1d writes itself (progress with steps/s and ETA, evaluations,
"checkpoint saved at step N", and INFO records of the root and `tok1d.*` loggers) on stdout;
other libraries' records (orbax, absl, jax, grain) only from WARNING on (orbax's and grain's
absl records and Python warnings from ERROR on), unless `--verbosity=1` (their INFO too) or
`--verbosity=2` (DEBUG).

`main` is the `tok1d` console script (`tok1d COMMAND [flags]`, also `python -m tok1d.cli`);
`python -m tok1d.cli.COMMAND` and `python -m tok1d.main` (= train) run one command.
"""

from __future__ import annotations

import _thread
import ast
import difflib
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
import types
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
from ml_collections import config_flags

from tok1d import errors, models, parallel, summary
from tok1d.generation import common as gen_common
from tok1d.train import config_lib, programs
from tok1d.weights import download, layout, registry

TOOL = "tok1d"
# Optional packages and how to get them; a missing one ends in a one-line hint.
# (tok1d is not on PyPI: its extras install from its checkout)
OPTIONAL = {"torch": "pip install -e '.[convert]' in tok1d's checkout",
            "safetensors": "pip install safetensors", "yaml": "pip install pyyaml",
            "tensorflow": "pip install -e '.[tfds_build]' in tok1d's checkout",
            "matplotlib": "pip install matplotlib", "sklearn": "pip install scikit-learn",
            "huggingface_hub": "pip install -e '.[hub]' in tok1d's checkout",
            "torchvision": "pip install -e '.[bench]' in tok1d's checkout"}
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")
_running: list[str] = []  # the command line of the command being run


# ----------------------------------------------------------------------------------------------
# Flags and help.
# ----------------------------------------------------------------------------------------------

def _flag_values(job: types.ModuleType, argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    if job.CONFIG is not None:
        config_flags.DEFINE_config_file("config", None, job.CONFIG, flag_values=fv,
                                        lock_config=True, sys_argv=argv)
    job.define_flags(fv)
    flags.DEFINE_integer("verbosity", 0, "0: tok1d's own lines; 1: also the INFO logs of "
                         "orbax / absl / jax; 2: also DEBUG, and errors with their traceback.",
                         short_name="v", flag_values=fv)
    return fv


MAX_ERROR_CHARS = 2000  # an error line's length on the console without -v 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def help_text(job: types.ModuleType, prog: str, fv: flags.FlagValues) -> str:
    """The usage line, the command's summary and its flags, one line each."""
    summary = (job.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"usage: {prog} {job.USAGE}", "", _one_line(summary), "", "flags:"]
    seen = []
    for name in fv:
        flag = fv[name]
        if flag in seen:
            continue
        seen.append(flag)
        left = (f"-{flag.short_name}, " if flag.short_name else "") + (
            f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}")
        right = _one_line(flag.help)
        if flag.name in job.REQUIRED and not (flag.name == "config" and "checkpoint" in fv):
            right += " (required)"
        elif flag.default not in (None, "") and not flag.boolean and flag.name != "config":
            right += f" (default: {flag.default})"
        elif flag.boolean and flag.default:
            right += " (default: on)"
        lines.append(f"  {left:<24} {right}")
    if job.CONFIG is not None:
        lines.append(f"  {'--config.KEY=VALUE':<24} Overrides one value of the config "
                     "(e.g. --config.optim.lr=1e-4); --config.model.ARG=VALUE sets any "
                     "argument of the model.")
    lines.append(f"  {'-h, --help':<24} This list.")
    return "\n".join(lines)


RUN_CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "train", "run_config.py")


def _with_run_config(job: types.ModuleType, args: list[str]) -> list[str]:
    """`args` with a run's own config put in as the config file: `--config=RUN/config.json`
    or `--config=RUN` (a workdir) becomes `--config=run_config.py:PATH`; a command with a
    `checkpoint` flag (sample, evaluate) given none uses its checkpoint run's config."""
    if job.CONFIG is None:
        return args
    spec = _config_path(args)
    if spec is not None:
        path = spec.split(":", 1)[0]
        if not (os.path.isdir(path) or (path.endswith(".json") and os.path.isfile(path))):
            return args
        return _replace_flag(args, "config", f"{RUN_CONFIG_FILE}:{os.path.abspath(path)}")
    run = _checkpoint_run(args)
    if run is not None:
        return [f"--config={RUN_CONFIG_FILE}:{run}"] + list(args)
    if "config" not in job.REQUIRED and any(a.startswith("--config.") for a in args):
        return [f"--config={RUN_CONFIG_FILE}"] + list(args)  # overrides of the defaults
    return args


def _checkpoint_run(args: Sequence[str]) -> Optional[str]:
    """The training run whose saved config a command given --checkpoint and no --config
    uses (a checkpoint's folder gives its run's); None when there is none."""
    checkpoint = _flag_arg(args, "checkpoint")
    if _config_path(args) is not None or not checkpoint:
        return None
    run = layout.run_dir(checkpoint)
    return run if os.path.isfile(layout.config_path(run)) else None


def config_for_checkpoint(checkpoint: str, prog: str) -> str:
    """Why --config is needed with this --checkpoint (which gave no run config)."""
    if not (os.path.exists(checkpoint) or checkpoint in registry.RELEASED
            or download.is_remote(checkpoint)):
        if registry.looks_like_a_name(checkpoint):  # ("run": a folder on another host only?)
            try:
                registry.get(checkpoint)
            except registry.UnknownName as e:
                return f"--checkpoint={checkpoint}: {e}"
        return f"--checkpoint={checkpoint}: no such folder or file."
    return (f"--config is required: --checkpoint={checkpoint} is not a training run's workdir "
            f"(it has no {layout.CONFIG_FILE}), so the model's config must be given "
            f"(see {prog} --help).")


def run_config_used() -> bool:
    """Whether the running command took its config from its --checkpoint's run (it was given
    no --config): what a config error should then name is the checkpoint."""
    return _checkpoint_run(_running[1:]) is not None


def _config_path(args: Sequence[str]) -> Optional[str]:
    return _flag_arg(args, "config")


def _flag_spans(args: Sequence[str], names: Sequence[str]) -> list[tuple[int, int]]:
    """Where flags `names` are in `args`, in any form absl takes (--name=V, --name V, -name=V,
    -name V): (first, end) index ranges, the value included; none after "--" (absl's end
    of flags)."""
    spans, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if arg.startswith(tuple(f"{d}{n}=" for n in names for d in ("--", "-"))):
            spans.append((i, i + 1))
        elif arg in tuple(f"{d}{n}" for n in names for d in ("--", "-")) and i + 1 < len(args):
            spans.append((i, i + 2))
            i += 1
        i += 1
    return spans


def _flag_arg(args: Sequence[str], name: str) -> Optional[str]:
    """The value of flag `name` in `args` (its last, as absl takes a repeated flag); None when
    absent."""
    spans = _flag_spans(args, [name])
    if not spans:
        return None
    first, end = spans[-1]
    return args[first + 1] if end - first == 2 else args[first].split("=", 1)[1]


def _replace_flag(args: Sequence[str], name: str, value: Optional[str]) -> list[str]:
    """`args` with each flag `name` (and its value) replaced by `--name=value`, or removed
    where `value` is None."""
    out, last = [], 0
    for first, end in _flag_spans(args, [name]):
        out += args[last:first] + ([] if value is None else [f"--{name}={value}"])
        last = end
    return out + list(args[last:])


def _existing_config_file(spec: str) -> str:
    """The file of a `FILE[:ARG]` config argument; UserError when it does not exist."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise errors.UserError(f"config file not found: {path}")
    return path


def load_config_file(spec: str):
    """`get_config(ARG)` of a config file given as `FILE[:ARG]` (unlocked)."""
    _existing_config_file(spec)
    return config_lib.load(spec)


def _unknown_override(config_file: str, args: Sequence[str]) -> Optional[str]:
    """The message for the first `--config.KEY` override naming no key of the config."""
    try:
        config = load_config_file(config_file)
    except Exception:  # noqa: BLE001 - the config itself fails: reported by the caller
        return None
    for arg in args:
        m = _OVERRIDE.match(arg)
        if not m:
            continue
        node, done = config, []
        for key in m.group(1).split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
                known = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict,
                                                               dict)) else []
                close = difflib.get_close_matches(key, known, n=1)
                where = ".".join(done + [key])
                hint = f" (did you mean {'.'.join(done + close[:1])!r}?)" if close else ""
                section = ".".join(done)
                options = _sampler_options(config) if section == SAMPLING_SECTION else ()
                if not close and options:
                    hint = (f" (the {config.model.name} sampler's options: "
                            f"{', '.join(options)})")
                elif (not close and section in config_lib.FREE_FORM
                      and section not in MODULE_SECTIONS):
                    hint = (f" ({section} holds its module's arguments, here "
                            f"{sorted(known)}: give the whole section to add one, e.g. "
                            f"--config.{section}=\"{{'name': ..., '{key}': ...}}\")")
                return f"--config.{m.group(1)}: {where!r} is not a config key{hint}."
            node, done = node[key], done + [key]
    return None


# Config sections that hold a module's keyword arguments: `--config.SECTION.KEY=VALUE` may add
# any argument of the module, also one the config file does not name (the model's check in
# `validate`, or where the teacher / discriminator / probe model is built, refuses a key it
# does not take).
MODULE_SECTIONS = ("model", "teacher.model", "discriminator.model", "ar_probe.model")
# The generator's sampler options: `--config.sampling.KEY=VALUE` may add any option of the
# config's sampler (`gen_common.sampler_options`: e.g. RAR's `greedy`), not another key.
SAMPLING_SECTION = "sampling"


def _sampler_options(config) -> tuple[str, ...]:
    """The options of the sampler of `config`'s generator; () for another config (or a model
    that cannot be built: `validate` names its problem)."""
    if config.get("trainer") != "generator":
        return ()
    try:
        return gen_common.sampler_options(models.create(config.model.name,
                                                        **layout.model_kwargs(config)))
    except Exception:  # noqa: BLE001 - a bad model section is reported by validate
        return ()


def _adds_argument(config, path: str, key: str) -> bool:
    """Whether `--config.PATH.KEY=...` adds an argument the config file does not name."""
    section = _section(config, path)
    if section is None or key in section:
        return False  # a key the parser knows (or a section it will refuse)
    return path in MODULE_SECTIONS or (path == SAMPLING_SECTION
                                       and key in _sampler_options(config))


_MODULE_ARGUMENT = re.compile(r"^--?config\.([^=]+)\.([A-Za-z_]\w*)(?:=(.*))?$", re.DOTALL)


def _split_new_module_arguments(config_file: Optional[str], args: Sequence[str]
                                ) -> tuple[list[str], list[tuple[str, str, Any]]]:
    """(the other arguments, [(section, key, value)]) for the `--config.SECTION.KEY=VALUE`
    (or `--config.SECTION.KEY VALUE`) overrides that add a module argument the config file
    does not name (`_literal` values). Such an argument together with an override of its
    whole section is refused (the parser applies that one first)."""
    matches = [_MODULE_ARGUMENT.match(a) for a in args]
    sections = MODULE_SECTIONS + (SAMPLING_SECTION,)
    if not config_file or not any(m and m.group(1) in sections for m in matches):
        return list(args), []
    try:
        config = load_config_file(config_file)
    except Exception:  # noqa: BLE001 - the config itself fails: reported by the parser
        return list(args), []
    kept, added, i = [], [], 0
    while i < len(args):
        m, value, used = matches[i], None, 1
        if m and m.group(1) in sections and _adds_argument(config, m.group(1), m.group(2)):
            value = m.group(3)
            if value is None and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value, used = args[i + 1], 2  # the space-separated form
        if value is None:
            kept.append(args[i])
        else:
            _refuse_whole_section_beside(m.group(1), m.group(2), args)
            added.append((m.group(1), m.group(2), _literal(value)))
        i += used
    return kept, added


def _refuse_whole_section_beside(path: str, key: str, args: Sequence[str]) -> None:
    parts = path.split(".")
    for n in range(1, len(parts) + 1):
        whole = re.compile(rf"^--?config\.{re.escape('.'.join(parts[:n]))}(=|$)")
        if any(whole.match(a) for a in args):
            raise errors.UserError(
                f"--config.{path}.{key} adds an argument to {path}, and --config."
                f"{'.'.join(parts[:n])} replaces that section: give {key!r} inside the "
                "replacement, or only the single arguments.")


def _section(config: Any, path: str) -> Optional[Any]:
    node = _setting(config, path)
    return node if isinstance(node, (ml_collections.ConfigDict, dict)) else None


def _json_as_literal(args: Sequence[str]) -> list[str]:
    """`args` with each `--config.KEY={...}` / `[...]` override written in JSON (`true`,
    `false`, `null`), also as `--config.KEY VALUE`, rewritten as the Python literal that
    ml_collections parses (it refused JSON's names)."""
    out = []
    for i, arg in enumerate(args):
        if _OVERRIDE.match(arg) and "=" in arg:
            name, value = arg.split("=", 1)
            arg = f"{name}={_python_literal_text(value)}"
        elif i and _OVERRIDE.match(args[i - 1]) and "=" not in args[i - 1]:
            arg = _python_literal_text(arg)
        out.append(arg)
    return out


def _python_literal_text(text: str) -> str:
    """`text`, or the Python literal of a JSON object / array that is not one already."""
    if not text.lstrip().startswith(("{", "[")):
        return text
    try:
        ast.literal_eval(text)
        return text
    except (ValueError, SyntaxError):
        pass
    try:
        return repr(json.loads(text))
    except ValueError:
        return text


def _literal(text: str) -> Any:
    """A new module argument's value: a Python literal (JSON's objects, `true`, `false` and
    `null` too), else the string itself."""
    if text.strip() in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[text.strip()]
    try:
        return ast.literal_eval(_python_literal_text(text))
    except (ValueError, SyntaxError):
        return text


def _config_line(e: BaseException, config_file: Optional[str]) -> str:
    """", line N" of the config file's last frame in `e`'s traceback, or ""."""
    if not config_file:
        return ""
    path = os.path.abspath(config_file.split(":", 1)[0])
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == path]
    return f", line {lines[-1]}" if lines else ""


def _parse(job: types.ModuleType, prog: str, args: list[str]
           ) -> tuple[flags.FlagValues, list[str]]:
    """Parses `args` (raising UserError); the flags and the positional arguments."""
    args = _with_run_config(job, args)
    config_file = _config_path(args) if job.CONFIG is not None else None
    if config_file is not None:
        _existing_config_file(config_file)
    args = _json_as_literal(args)
    args, new_arguments = _split_new_module_arguments(config_file, args)
    argv = [prog] + list(args)
    fv = _flag_values(job, argv)
    try:
        rest = fv(argv)[1:]
    except Exception as e:  # noqa: BLE001 - a bad flag, or the config file's own error
        bad = _unknown_override(config_file, args) if config_file else None
        if bad:
            raise errors.UserError(bad) from None
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        hint = ("" if not config_file or config_file.split(":", 1)[0].endswith(".py") else
                " (a config is a Python file with get_config(), e.g. a recipe in configs/; "
                "a run's config.json is what it resolved to)")
        if isinstance(e, SyntaxError):  # the file does not parse
            message = f"--config={config_file}, line {e.lineno}: SyntaxError: {e.msg}{hint}"
        elif "Error whilst parsing config file" in message:  # get_config raised: last line
            last = [line.strip() for line in message.splitlines() if line.strip()][-1]
            ours = re.match(r"tok1d\.[\w.]+\.(?:ConfigError|UserError): (.*)", last)
            # (tok1d's own error names the file: a run's config.json, not its internal reader)
            message = ours.group(1) if ours else f"--config={config_file}: {last}"
        elif isinstance(e, errors.UserError):  # written for the user (a run's config.json)
            message = str(e)
        elif not isinstance(e, flags.Error):  # raised by the config file itself
            line = _config_line(e, config_file)
            message = f"--config={config_file}{line}: {type(e).__name__}: {message}{hint}"
        raise errors.UserError(_one_line(message)) from None
    if job.CONFIG is not None and fv["config"].value is not None:
        try:
            fv.config.keys()  # a config that failed to load raises on first access
        except OSError as e:  # (config_flags' wrapper: its cause is the failure)
            raise errors.UserError(_one_line(e.__cause__ or e)) from None
    for path, key, value in new_arguments:
        section = _section(fv.config, path)
        if section is None:
            raise errors.UserError(f"--config.{path}.{key}: the config has no section {path}.")
        with section.unlocked(), section.ignore_type():
            section[key] = value
    for name in job.REQUIRED:
        if fv[name].value in (None, ""):
            if name == "config" and "checkpoint" in fv and fv["checkpoint"].value:
                continue  # (the command says why after its process setup, `setup_process`:
                # the --checkpoint run, with its config, may be on another host only)
            raise errors.UserError(f"--{name} is required (see {prog} --help).")
    if len(rest) > (1 if job.POSITIONAL else 0):
        raise errors.UserError(f"unexpected arguments: {' '.join(rest)} (see {prog} --help).")
    if job.POSITIONAL and not job.POSITIONAL.startswith("[") and not rest:
        raise errors.UserError(f"{job.POSITIONAL} is required (see {prog} --help).")
    return fv, rest


# ----------------------------------------------------------------------------------------------
# Console.
# ----------------------------------------------------------------------------------------------

class _ConsoleFilter(logging.Filter):
    """tok1d's own INFO records (on process 0 of a multi-process run, but those marked
    parallel.EVERY_PROCESS); other libraries' warnings (but absl's, which orbax and grain log
    their internals to, and Python's `warnings`) and errors always; the rest only when
    verbose."""

    def __init__(self, verbosity: int, below_warning: bool):
        super().__init__()
        self.verbosity, self.below_warning = verbosity, below_warning

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno < logging.WARNING) != self.below_warning:
            return False
        own = record.name == "root" or record.name.startswith("tok1d")
        if record.levelno >= logging.WARNING:
            quiet = record.name in ("absl", "py.warnings") and record.levelno < logging.ERROR
            # orbax's background save threads log a failed save (e.g. a full disk) in four
            # long lines; tok1d raises its own one line for it (`Checkpointer.wait`).
            quiet = quiet or (record.name == "absl" and record.levelno < logging.CRITICAL
                              and f"{os.sep}orbax{os.sep}" in record.pathname)
            return own or self.verbosity >= 1 or not quiet
        if self.verbosity >= 1:
            return True
        # tok1d's progress lines once per run: process 0's (the others' say the same), but
        # for those marked parallel.EVERY_PROCESS (each process's own facts).
        return own and record.levelno >= logging.INFO and (
            parallel.joined_process_index() == 0
            or getattr(record, parallel.EVERY_PROCESS, False))


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, verbosity: int):
        super().__init__()
        self.verbosity = verbosity

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and self.verbosity >= 1:
            message += "\n" + self.formatException(record.exc_info)
        own = record.name == "root" or record.name.startswith("tok1d")
        if record.levelno < logging.WARNING and own and self.verbosity == 0:
            return message
        return f"{record.levelname.lower()}: {'' if own else record.name + ': '}{message}"


def _quiet_unraisable(inner: Callable[[Any], None]) -> Callable[[Any], None]:
    """`inner` (the hook in place: Python's, pytest's, a notebook's), less tensorstore's
    callbacks into orbax's closed event loop: after a failed checkpoint read (e.g. a damaged
    array index) each one printed a traceback of "RuntimeError: Event loop is closed",
    hundreds of lines above the run's one error line. A Ctrl-C that landed in a callback or
    finalizer (JAX's garbage-collection callback: "Exception ignored in _xla_gc_callback")
    is raised again in the main thread, not printed and lost."""
    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if isinstance(value, KeyboardInterrupt):  # (raised from here, it would be ignored)
            threading.Timer(0.01, _thread.interrupt_main).start()
            return
        inner(unraisable)

    hook.tok1d_inner = inner
    return hook


def setup_console(verbosity: int = 0) -> None:
    """Routes logging to the console: tok1d's INFO lines to stdout, warnings and errors to
    stderr, other libraries' INFO / DEBUG only with `verbosity` 1 / 2. Replaces the handlers
    of an earlier call and the plain one `logging.basicConfig` adds (absl calls it)."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # ours of an earlier call; logging.basicConfig's
        if getattr(handler, "tok1d_console", False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    for stream, below in ((sys.stdout, True), (sys.stderr, False)):
        handler = logging.StreamHandler(stream)
        handler.tok1d_console = True
        handler.addFilter(_ConsoleFilter(verbosity, below))
        handler.setFormatter(_ConsoleFormatter(verbosity))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    logging.captureWarnings(True)
    absl_logging.set_verbosity({0: "warning", 1: "info"}.get(verbosity, "debug"))
    inner = getattr(sys.unraisablehook, "tok1d_inner", sys.unraisablehook)  # (a 2nd call)
    sys.unraisablehook = inner if verbosity >= 1 else _quiet_unraisable(inner)
    if not flags.FLAGS.is_parsed():  # libraries read absl's global flags: their defaults
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------

# What a runtime error of a collective with the other processes says when one of them is gone
# (stopped by its own error, killed): the processes wait for it until a deadline.
PEER_FAILURE_MARKERS = ("DEADLINE_EXCEEDED", "Gloo", "Barrier timed out", "heartbeat",
                        "coordination service", "CoordinationService",
                        "Connection reset by peer", "GetKeyValue() timed out")
# A backend that could not start because another process never joined (it stopped first).
BACKEND_START_MARKER = "Unable to initialize backend"

_peer_failed = False  # set when a run ended on `_peer_failure`: `exit_process` skips JAX's
# shutdown barrier, which would wait for the stopped process (~90 s), then abort


def _peer_failure(e: BaseException) -> Optional[str]:
    """The one line for a multi-process run's collective that timed out waiting for another
    process (which failed on its own and said why there), or for a backend that could not
    start without it; None for another error."""
    text = str(e)
    if not any(marker in text for marker in PEER_FAILURE_MARKERS):
        return None
    if type(e).__name__ == "RuntimeError" and BACKEND_START_MARKER in text:
        return (f"this process stopped waiting for the others to start ({errors.brief(e, 120)})"
                ": another process has probably stopped with an error before it; its own "
                "output says which.")
    if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return None
    if jax.process_count() <= 1:  # (the backend is up: a collective ran)
        return None
    return (f"process {jax.process_index()} of {jax.process_count()} stopped waiting for the "
            f"others ({errors.brief(e, 120)}): another process has probably stopped with an "
            "error; its own output says which.")


def user_error_message(e: BaseException) -> Optional[str]:
    """The one line to print for an error the user can fix, or None for a bug."""
    peer = _peer_failure(e)
    if peer is not None:
        return peer
    if isinstance(e, ImportError):
        missing = getattr(e, "name", None) or getattr(e.__cause__, "name", None) or ""
        package = missing.split(".")[0]
        if package not in OPTIONAL:
            return None
        if isinstance(e, ModuleNotFoundError):  # the bare import error: add the hint
            return f"missing optional dependency {package!r}: {OPTIONAL[package]}"
        return _one_line(e)  # the code raising it wrote the hint
    if not isinstance(e, (errors.UserError, ValueError, OSError)):
        return None
    message = _one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)
    if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
        message = f"{message}: {e.filename}"
    if isinstance(e, errors.UserError):  # written for the user: no type name
        return message
    return f"{message} ({type(e).__name__})"


# The warning multiprocessing's resource tracker prints at exit for the shared-memory batches
# grain's worker processes still had in flight ("There appear to be N leaked shared_memory
# objects to clean up at shutdown"): it then removes them itself, so nothing is lost. The
# tracker is a separate process that takes its warning filters from this one's -W options.
_TRACKER_FILTER = "ignore::UserWarning:multiprocessing.resource_tracker"


def quiet_resource_tracker() -> None:
    """Silences that exit-time warning in the resource tracker this process will start."""
    if _TRACKER_FILTER not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_FILTER)


def run(job: types.ModuleType, argv: Optional[Sequence[str]] = None,
        prog: Optional[str] = None) -> int:
    """Runs command `job` on `argv` (the arguments, without the program name; default
    sys.argv[1:]); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python -m {getattr(job.__spec__, 'name', job.__name__)}"
    _running[:] = [prog] + args
    quiet_resource_tracker()
    if any(a in _HELP for a in args):
        fv = _flag_values(job, [prog])
        print(help_text(job, prog, fv))
        return 0
    verbosity = 0
    previous = _terminate_like_ctrl_c()
    try:
        fv, rest = _parse(job, prog, args)
        verbosity = fv.verbosity
        setup_console(verbosity)
        job.execute(fv, rest)
    except KeyboardInterrupt as e:
        # (a library on the way may raise a plain KeyboardInterrupt in its place: orbax's
        # async write of a conversion did, which ended SIGTERM with "interrupted", 130)
        terminated = isinstance(e, errors.Terminated) or _terminated.is_set()
        print("interrupted" + (" (SIGTERM)" if terminated else ""), file=sys.stderr)
        parallel.tell_others("interrupted" + (" by SIGTERM" if terminated else ""))
        return 128 + signal.SIGTERM if terminated else 130
    except Exception as e:  # noqa: BLE001 - a user's error becomes one line, a bug re-raises
        message = user_error_message(e)
        if _peer_failure(e) is not None:
            global _peer_failed
            _peer_failed = True
            parallel.stopping()  # (its own line: not also the watcher's)
        else:  # the others of a multi-process run would wait for this one in a collective
            parallel.tell_others(message or f"a bug, {type(e).__name__}: see its traceback")
        if message is None or verbosity >= 2:
            raise
        if len(message) > MAX_ERROR_CHARS and verbosity < 1:  # e.g. a converter's key list
            message = (message[:MAX_ERROR_CHARS] + f" ... ({len(message) - MAX_ERROR_CHARS} "
                       "more characters: -v 1 prints the whole message)")
        print(f"error: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


_terminated = threading.Event()  # SIGTERM came (while `_terminate_like_ctrl_c`'s handler is on)
_TERMINATE = "terminate"  # that handler's name


def _terminate_like_ctrl_c() -> Any:
    """Makes SIGTERM end a command as Ctrl-C does ("interrupted (SIGTERM)", status 143, its
    temporary files removed) where the command has not taken it over: a training run killed
    during its start-up (restore, compile) ended silently. The training loop saves and stops
    on it instead (`PreemptionFlag`); with several processes JAX's preemption notifier,
    installed later by `jax.distributed.initialize`, takes it. Returns the previous handler
    (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _terminated.clear()

    def terminate(signum, frame):  # noqa: ARG001 - (named _TERMINATE)
        _terminated.set()
        raise errors.Terminated

    return signal.signal(signal.SIGTERM, terminate)


# ----------------------------------------------------------------------------------------------
# The `tok1d` tool.
# ----------------------------------------------------------------------------------------------

COMMANDS = {
    "train": "train a tokenizer or generator from a config (as python -m tok1d.main)",
    "prepare": "convert a folder of class subfolders of images into ArrayRecord shards",
    "tokenize": "encode an image dataset into a token dataset with a trained tokenizer",
    "sample": "sample class-conditional images with a trained generator",
    "evaluate": "rFID / gFID, sFID, IS, precision / recall, PSNR, SSIM, LPIPS, codebook usage",
    "convert": "an official PyTorch checkpoint, or released weights by name (--from NAME), "
               "-> a tok1d pretrained directory",
    "bench": "speed, memory and MFU of a config's programs (random weights)",
}


def define_distributed_flags(fv: flags.FlagValues) -> None:
    """The multi-host flags of the commands without a run config (`tok1d train` has
    `--config.distributed.*`): an explicit coordinator, or TOK1D_DISTRIBUTED=1 for
    auto-detection on TPU pods / SLURM / Open MPI."""
    flags.DEFINE_string("coordinator_address", "", "Multi-host: coordinator host:port (or set "
                        "TOK1D_DISTRIBUTED=1 for auto-detection).", flag_values=fv)
    flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("process_id", -1, "Multi-host: this process's id.",
                         lower_bound=-1, flag_values=fv)


def setup_process(fv: flags.FlagValues, paths: Sequence[str] = ()) -> None:
    """`parallel.setup_process` with the flags of `define_distributed_flags`, then
    `check_same_command` (and, for a command that takes a config, given none and a
    --checkpoint that gave none, `config_for_checkpoint`'s error), then, with several
    processes, that every process sees the local files or folders named in `paths`: flags
    (e.g. "checkpoint") or config keys ("config.generator.tokenizer"). A process without one
    stopped alone while the others waited in their next collective.

    With several processes `jax.distributed` puts JAX's preemption notifier in place of the
    SIGTERM handler of `run`, which only the training loop polls: a sample, evaluate or
    tokenize run went on to its end after SIGTERM (a scheduler's `scancel`, `kill`). The
    handler is put back: the process ends as for Ctrl-C and tells the others."""
    handler = signal.getsignal(signal.SIGTERM)
    parallel.setup_process(fv.coordinator_address, fv.num_processes, fv.process_id)
    if (getattr(handler, "__name__", "") == _TERMINATE
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGTERM, handler)
    config = fv["config"].value if "config" in fv else None
    check_same_command(config)
    if "config" in fv and config is None and "checkpoint" in fv and fv["checkpoint"].value:
        raise errors.UserError(config_for_checkpoint(fv["checkpoint"].value, _running[0]))
    given = {}
    for name in paths:
        if name.startswith("config."):
            value = _setting(config, name[len("config."):])
            label = f"{name[len('config.'):]}={value} (of the config)"
        else:
            value = fv[name].value
            label = f"--{name}={value}"
        if value:
            given[label] = value
    if jax.process_count() == 1 or not given:  # (the same on every process: same arguments)
        return

    def check() -> None:
        missing = [flag for flag, value in given.items() if not _seen_here(value)]
        if missing:
            raise errors.UserError(f"{', '.join(missing)}: no such file or folder on this "
                                   "host (every host must see it).")

    parallel.everywhere(check, ", ".join(given))


def _setting(config: Any, key: str) -> Any:
    """The value of dotted `key` in `config`, or None where it (or the config) is not there."""
    node = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return None
        node = node[part]
    return node


def _seen_here(value: str) -> bool:
    """Whether a path flag's value is on this host, or is no local path (a released name, a
    URL)."""
    return os.path.exists(value) or value in registry.RELEASED or download.is_remote(value)


_PROCESS_ID_FLAGS = ("process_id", "config.distributed.process_id")


def _without_process_id(args: Sequence[str]) -> list[str]:
    for name in _PROCESS_ID_FLAGS:
        args = _replace_flag(args, name, None)
    return list(args)


def check_same_command(config: Optional[ml_collections.ConfigDict] = None) -> None:
    """A UserError on every process of a multi-process run whose processes were not given the
    same arguments (all but the process id), or, with the same arguments, read another
    `config` (a config file that differs on one host): each process did its share of another
    job (one process's other --tokenizer or --seed silently wrote rows of another tokenizer
    or sampler into the output; another batch size trained on without a word), or they
    stopped in mismatched collectives. Hosts with different numbers of devices are named
    first (the comparison's own collective failed on them with a numpy error)."""
    if not jax.distributed.is_initialized() or jax.process_count() <= 1:
        return  # (a single process: the backend is not started for this)
    if jax.device_count() != jax.local_device_count() * jax.process_count():
        raise errors.UserError(  # (each process finds it on its own)
            f"the processes have different numbers of devices ({jax.local_device_count()} "
            f"here, {jax.device_count()} in all over {jax.process_count()} processes): tok1d "
            "runs take the same number on every host.")
    rule = ("every process of a run takes the same command, all but its process id (" +
            ", ".join("--" + f for f in _PROCESS_ID_FLAGS) + ")")
    args = _without_process_id(_running[1:])
    theirs, others = parallel.process_0s(args)
    if others:
        if jax.process_index() not in others:
            raise errors.UserError(
                f"process(es) {', '.join(map(str, others))} were given other arguments than "
                f"process 0 (each says which): {rule}.")
        here = [a for a in args if a not in theirs] or ["(none)"]
        there = [a for a in theirs if a not in args] or ["(none)"]
        raise errors.UserError(
            f"process {jax.process_index()} was given other arguments than process 0: "
            f"{' '.join(here)} here, {' '.join(there)} there; {rule}.")
    # (a process without a config compares too: one whose --checkpoint folder, with the run's
    # config.json, is on another host only stopped alone, the others hung in this collective)
    settings = {NO_CONFIG: ""} if config is None else {
        k: repr(v) for k, v in summary.flatten(config.to_dict()).items()}
    settings.pop("distributed.process_id", None)
    theirs, others = parallel.process_0s(settings)
    if not others:
        return
    if jax.process_index() not in others:
        raise errors.UserError(
            f"process(es) {', '.join(map(str, others))} read another config than process 0 "
            "from the same command (each says which settings): is the config file (or the "
            "--checkpoint folder with its config.json) the same on every host?")
    if (NO_CONFIG in settings) != (NO_CONFIG in theirs):
        raise errors.UserError(
            f"process {jax.process_index()} has "
            + ("no config, process 0 has one" if config is None else
               "a config, process 0 has none")
            + " from the same command: is the --checkpoint folder (with the run's "
            "config.json) or the config file on every host?")
    differ = sorted(set(settings) ^ set(theirs)
                    | {k for k in set(settings) & set(theirs) if settings[k] != theirs[k]})
    shown = "; ".join(f"{k}: {settings.get(k, '(none)')} here, {theirs.get(k, '(none)')} "
                      "there" for k in differ[:5]) + ("; ..." if len(differ) > 5 else "")
    raise errors.UserError(
        f"process {jax.process_index()} read another config than process 0 from the same "
        f"command ({shown}): is the config file the same on every host?")


NO_CONFIG = "(no config)"  # `check_same_command`'s settings of a process without a config


def tool_help() -> str:
    lines = [f"usage: {TOOL} COMMAND [flags]     ({TOOL} COMMAND --help lists its flags)", "",
             "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def command_line() -> list[str]:
    """The command being run, as typed (program and arguments), e.g. for result records."""
    return list(_running)


def exit_process(status: int) -> NoReturn:
    """Ends the command-line process with `status`. While a train step still compiles in the
    background (a run stopped by a preemption signal or an error before the next phase's
    step was ready) it ends it without finalizing the interpreter, which would abort inside
    XLA (`tok1d.train.programs.compiling`); the run's files are written and closed by then.
    So does a multi-process run that stopped because another process did (`_peer_failure`):
    JAX's shutdown barrier would wait for that process, then abort."""
    if programs.compiling() or _peer_failed:
        sys.stdout.flush()
        sys.stderr.flush()
        parallel.shut_down_with_the_others()  # (after a stop notice: they wait for this one)
        os._exit(status)
    sys.exit(status)


def console() -> NoReturn:
    """The `tok1d` executable (setup.py's console script)."""
    exit_process(main())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `tok1d` command: `tok1d COMMAND [flags]`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in _HELP:
        print(tool_help())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}.",
              file=sys.stderr)
        return 2
    return run(importlib.import_module(f"tok1d.cli.{name}"), rest, prog=f"{TOOL} {name}")
