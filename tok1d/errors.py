"""Errors a user can fix: the command line (`tok1d.cli`) prints them as one `error: ...` line
and exits non-zero, without a traceback."""

import os


class UserError(Exception):
    """A problem the user can fix: a bad flag, config, path or input, or a missing optional
    dependency. `exit_code` is the status the command line exits with."""

    exit_code = 2


class UnknownSplit(UserError, KeyError):
    """A dataset has no split of that name (the message lists those it has). A KeyError too,
    for callers that look a split up."""

    def __str__(self) -> str:  # (KeyError's would quote the message)
        return str(self.args[0]) if self.args else ""


class WorkdirInUse(UserError):
    """Another run holds the workdir (`tok1d.train.loop.workdir_lock`)."""


class InputFailed(UserError):
    """The input of a run failed midway, not the run's own state: the training loop saves
    that state first (`tok1d.train.loop.train_loop`), then the command prints one line."""

    exit_code = 1


class InputWorkerDied(InputFailed):
    """An input worker process (grain's `mp_prefetch`) died: killed (SIGKILL is the kernel's
    out-of-memory killer's signal) or crashed."""


class DamagedRecord(InputFailed):
    """A record of a dataset's shard could not be read (`tok1d.data.records.damaged_record`)."""


def brief(error: BaseException, limit: int = 200) -> str:
    """`Type: message` of an exception for a one-line error, its message on one line and cut at
    `limit` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's limit, `kill`), raised as Ctrl-C's KeyboardInterrupt is (the same
    clean-up) where a command has not taken it over; the command line ends with
    "interrupted (SIGTERM)", status 143."""


def innermost(error: BaseException) -> BaseException:
    """The deepest exception `error` was raised from (its explicit causes, then the context it
    was raised in, unless suppressed): e.g. TensorStore's "Error reading X ... Not enough
    data" under orbax's "Encountered error while reading array index ... <bound method ...>"."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def missing_directory(what: str, path: str) -> FileNotFoundError:
    """The error for a `what` directory at `path` that is not there, or is a file."""
    if os.path.isfile(path):
        return FileNotFoundError(f"{what} directory expected, but {path} is a file")
    return FileNotFoundError(f"{what} directory not found: {path}")


def check_local(path: str, what: str) -> None:
    """A UserError for a remote path (gs://, s3://, ...) where tok1d reads and writes files with
    the local file API: it would silently become a local folder named `gs:`."""
    if "://" in str(path):
        raise UserError(f"{what}={path}: tok1d reads and writes local paths only; mount the "
                        "bucket (e.g. `gcsfuse --implicit-dirs --rename-dir-limit=200000 "
                        "BUCKET /gcs/BUCKET`: checkpoints are renamed into place) and pass "
                        "/gcs/BUCKET/... instead.")


def check_output_dir(path: str, what: str) -> None:
    """A UserError, before anything runs, for an output directory that tok1d cannot write: a
    remote path (`check_local`), an existing file, or a missing one under a file or an
    unwritable folder. An empty `path` (an output that was not asked for) passes."""
    check_local(path, what)
    if not path:
        return
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{what}={path} is a file, not a directory.")
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what}={path}: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path}: {parent} is not writable.")
