"""Errors a user can fix: the command line (`tok1d.cli`) prints them as one `error: ...` line
and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem the user can fix: a bad flag, config, path or input, or a missing optional
    dependency. `exit_code` is the status the command line exits with."""

    exit_code = 2
