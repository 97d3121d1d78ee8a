"""Work files: files and directories written under a temporary name, then renamed into place
(downloads and conversions of released weights, `tok1d prepare`'s shards). Their names carry the
host and process that write them (`owner_tag`), so that a later run can tell a killed process's
leftovers (SIGKILL, the OOM killer: nothing could clean up) from another live process's work.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from typing import Callable

# Another host's leftovers (or unnamed ones, of a tok1d before the names carried the writer)
# go when nothing in them has changed for this long.
STALE_AFTER_S = 24 * 3600


def owner_tag() -> str:
    """"+host+pid+": put in a work file's name (before a random part), it names this
    process as its writer. ("@" before 2026-12-07, still read; ArrayRecord takes "NAME@N" for
    N sharded files.)"""
    return f"+{socket.gethostname()}+{os.getpid()}+"


def _writer(name: str) -> tuple[str, int] | None:
    parts = re.split("[@+]", name)
    if len(parts) == 4 and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _newest_mtime(path: str) -> float:
    """The newest mtime of `path` and everything in it (object-store mounts may report an old
    or zero mtime for directories; the files' own are more reliable)."""
    newest = os.path.getmtime(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for entry in dirs + files:
                try:
                    newest = max(newest, os.path.getmtime(os.path.join(root, entry)))
                except OSError:
                    pass
    return newest


def remove_stale(directory: str, is_work: Callable[[str], bool],
                 older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Deletes the work files and directories in `directory` (the names `is_work` accepts)
    that no live process writes: this host's of processes that have exited, and other hosts'
    (or unnamed ones) in which nothing has changed for `older_than_s`; an empty one of another
    host is kept (it may have just been made). Returns the names removed."""
    removed = []
    now, host = time.time(), socket.gethostname()
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not is_work(name):
            continue
        path = os.path.join(directory, name)
        try:
            writer = _writer(name)
            if writer is not None and writer[0] == host:
                stale = writer[1] != os.getpid() and not _alive(writer[1])
            else:
                empty = os.path.isdir(path) and not os.listdir(path)
                stale = not empty and now - _newest_mtime(path) >= older_than_s
            if not stale:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except OSError:
            continue  # another process removed it, or it is not ours to remove
    return sorted(removed)
