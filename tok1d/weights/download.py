"""Fetching official files: the Hugging Face Hub, plain URLs, installed packages, local files.

    path = fetch(registry.File("hf://yucornetto/RAR/rar_b.bin"))

Where things go (the root is `cache_root()`: --cache_dir, else $TOK1D_CACHE, else
~/.cache/tok1d):

    ROOT/<name>/                       a converted tok1d directory (`tok1d.weights.loaders`)
    ROOT/downloads/<host or repo>/FILE  downloaded files of the table; also where to put a file
                                       fetched by hand (checked before any network access)
    ROOT/downloads/<host>/<digest>/FILE a URL outside the table (12 hex digits of its sha256)

Hub files go through `huggingface_hub` (its own cache), URLs through the standard library with
a progress bar, into a temporary file renamed into place once complete and checked, so nothing
half-written is ever used; with TOK1D_OFFLINE=1 (or HF_HUB_OFFLINE=1) nothing is downloaded:
only the caches and the manual-download location are read. What lands in the cache gets the
modes of any file the user creates (the umask), so a shared $TOK1D_CACHE stays readable.
Every failure is one `errors.UserError` line: `DownloadError` names the URL and the path to
put the file at by hand, `ChecksumError` the expected and the actual digest.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

import tqdm

from tok1d import errors, parallel, workfiles
from tok1d.weights.registry import File

CACHE_ENV = "TOK1D_CACHE"
OFFLINE_ENVS = ("TOK1D_OFFLINE", "HF_HUB_OFFLINE")
HF_SCHEME = "hf://"
DOWNLOADS = "downloads"


class DownloadError(errors.UserError):
    """A file could not be fetched (no network, offline, not on the server, a manual file)."""


class ChecksumError(errors.UserError):
    """A file's sha256 is not the published one."""


def cache_root(cache_dir: Optional[str] = None) -> str:
    """Where converted directories and downloads live: `cache_dir`, else $TOK1D_CACHE, else
    ~/.cache/tok1d."""
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "tok1d")
    errors.check_local(root, "the weights cache (--cache_dir / $TOK1D_CACHE)")
    return os.path.abspath(os.path.expanduser(root))


def is_remote(source: str) -> bool:
    return source.startswith((HF_SCHEME, "http://", "https://"))


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in OFFLINE_ENVS)


def split_hub(source: str) -> tuple[str, str]:
    """hf://owner/repo/path/in/repo -> ("owner/repo", "path/in/repo")."""
    parts = source[len(HF_SCHEME):].split("/")
    if len(parts) < 3 or not all(parts):
        raise errors.UserError(f"{source!r}: a Hub file is hf://OWNER/REPO/FILE")
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_url(source: str) -> str:
    repo, path = split_hub(source)
    return f"https://huggingface.co/{repo}/resolve/main/{path}"


def manual_path(file: File, cache_dir: Optional[str] = None) -> str:
    """Where a file downloaded by hand is looked for (and where URL downloads are kept)."""
    if file.source.startswith(HF_SCHEME):
        repo, path = split_hub(file.source)
        folder = repo.replace("/", "--")
        rel = path
    else:
        folder = urllib.parse.urlsplit(file.source).netloc or "files"
        rel = f"{file.folder}/{file.name}" if file.folder else file.name
    return os.path.join(cache_root(cache_dir), DOWNLOADS, folder, *rel.split("/"))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str, expected: Optional[str], what: str, where: str = "") -> None:
    """Checks `path` against a full sha256 or a published prefix; ChecksumError otherwise
    (naming `where` instead of `path`, e.g. for a download that will not be kept)."""
    if not expected:
        return
    actual = sha256_of(path)
    if not actual.startswith(expected.lower()):
        raise ChecksumError(f"{what}: sha256 {actual} does not match the published "
                            f"{expected}{'...' if len(expected) < 64 else ''} ({where or path});"
                            " the file is damaged or not the official one (refused).")


# How to convert a file fetched by hand, in the errors above; a caller that knows the
# converter and its options names them instead (`loaders.resolve`).
CONVERT_ANY = ("tok1d convert KIND --checkpoint=FILE --out=DIR (in Python: "
               "tok1d.weights.load(FILE, kind=KIND))")


def fetch(file: File, cache_dir: Optional[str] = None,
          downloaded: Optional[list[str]] = None) -> str:
    """A local, checked copy of `file`: from an installed package that ships it, from the
    manual-download location, from the Hub's cache, or downloaded now (a URL's file: its path
    is appended to `downloaded`, so that a caller whose reader rejects it can `forget` it)."""
    if file.package:
        spec = importlib.util.find_spec(file.package[0])
        if spec is not None and spec.origin:
            shipped = os.path.join(os.path.dirname(spec.origin), file.package[1])
            if os.path.isfile(shipped):
                verify(shipped, file.sha256, file.source)
                return shipped
    local = manual_path(file, cache_dir)
    if os.path.isfile(local):
        verify(local, file.sha256, file.source)
        return local
    if file.manual:
        raise DownloadError(f"{file.name} cannot be downloaded automatically: download it by "
                            f"hand from {file.source} and put it at {local}, or convert it "
                            f"where it is: {CONVERT_ANY}.")
    if not file.source.startswith(HF_SCHEME):
        path = _from_url(file, local)  # checked before it is renamed into place
        if downloaded is not None:
            downloaded.append(path)
        return path
    path = _from_hub(file, local)
    verify(path, file.sha256, file.source)
    return path


def forget(paths: list[str]) -> None:
    """Removes files downloaded now that their reader rejected (e.g. an HTML page where a
    checkpoint was expected, with no published digest to refuse it earlier): the next run
    downloads them again instead of failing on the cached copy."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _unreachable(url: str, local: str, why: str,
                 what_to_do: str = "with no network,") -> DownloadError:
    return DownloadError(f"could not download {url} ({why}); {what_to_do} download it by "
                         f"hand and put it at {local}, or convert the file you have: "
                         f"{CONVERT_ANY}.")


def quiet_own_handler(logger: logging.Logger) -> None:
    """Removes the stderr handler a library puts on its own logger (huggingface_hub does, at
    import): its records still reach the root logger, which the console prints once (twice
    before: each of the Hub's retry warnings came out raw and as `warning: ...`)."""
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)


def _from_hub(file: File, local: str) -> str:
    repo, path = split_hub(file.source)
    try:
        import huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError
    except ImportError:
        raise _unreachable(hub_url(file.source), local, "huggingface_hub is not installed: "
                           "pip install -e '.[hub]' in tok1d's checkout") from None
    hub_download = huggingface_hub.hf_hub_download  # (a lazy import: it adds the handler)
    quiet_own_handler(logging.getLogger("huggingface_hub"))
    local_only = offline() or not _hub_reachable(huggingface_hub.constants.ENDPOINT)
    try:
        return hub_download(repo_id=repo, filename=path, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - offline, no network, no such repo/file: one line
        if isinstance(e, LocalEntryNotFoundError):
            why = ("offline (TOK1D_OFFLINE / HF_HUB_OFFLINE) and not in the Hub cache"
                   if offline() else "the Hub is unreachable and the file is not in its cache")
        else:
            why = errors.brief(e)
        raise _unreachable(hub_url(file.source), local, why) from None


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the Hub's host accepts a connection. Without a network this answers in
    `timeout` at most (a failed DNS lookup at once); huggingface_hub's own retries take about
    26 s to give up."""
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_url(file: File, local: str) -> str:
    if offline():
        raise _unreachable(file.source, local, "offline: TOK1D_OFFLINE / HF_HUB_OFFLINE is set")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    remove_stale(os.path.dirname(local))
    fd, tmp = tempfile.mkstemp(prefix=work_prefix(".part-"), dir=os.path.dirname(local))
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                _copy_response(file, out)
            except urllib.error.HTTPError as e:  # the server answered, with an error
                raise _unreachable(file.source, local, f"the server answered HTTP {e.code} "
                                   f"{e.reason}", "check the URL or") from None
            except http.client.IncompleteRead as e:
                done = out.tell() + len(e.partial or b"")
                raise _unreachable(file.source, local, f"the connection closed after {done} "
                                   f"of {done + (e.expected or 0)} bytes",
                                   "run again or") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                why = str(getattr(e, "reason", e)) or type(e).__name__
                raise _unreachable(file.source, local, why) from None
        verify(tmp, file.sha256, file.source, where="the download, not kept")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local


def _copy_response(file: File, out) -> None:
    """Writes the body at `file.source` to `out`; an OSError / HTTPException when the
    connection fails, also mid-stream (a body shorter than its Content-Length)."""
    with urllib.request.urlopen(file.source, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        done = 0
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=file.name,
                       disable=None) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    if total is not None and done != total:
        raise http.client.IncompleteRead(b"", total - done)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Work files (`tok1d.workfiles`): ".tmp-" conversion directories, ".part-" downloads,
# ".discard-" directories being deleted.
WORK_PREFIXES = (".tmp-", ".part-", ".discard-")


def work_prefix(kind: str, name: str = "") -> str:
    """The name prefix of a work file or directory of this process (`kind` one of
    WORK_PREFIXES): kind + name + "+host+pid+" (tempfile appends a random part)."""
    return f"{kind}{name}{workfiles.owner_tag()}"


def remove_stale(directory: str) -> list[str]:
    """Deletes the leftovers of killed downloads / conversions in `directory`
    (`workfiles.remove_stale`); returns their names."""
    removed = workfiles.remove_stale(directory, lambda name: name.startswith(WORK_PREFIXES))
    if removed:
        logging.info("Removed leftovers of killed downloads / conversions in %s: %s",
                     directory, ", ".join(removed),
                     extra={parallel.EVERY_PROCESS: True})  # (each host's own cache)
    return removed


def discard_dir(path: str) -> None:
    """Removes a cached directory safely beside other processes: renamed away first (one
    process wins the rename; the others find it gone), then deleted."""
    aside = tempfile.mkdtemp(prefix=work_prefix(".discard-"), dir=os.path.dirname(path))
    try:
        os.replace(path, os.path.join(aside, "old"))
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


def replace_dir(tmp_dir: str, final: str) -> str:
    """Moves a completely written directory into place (with the modes of a directory the
    user creates: mkdtemp's are private); when another process won the race, keeps theirs
    and drops ours."""
    os.chmod(tmp_dir, 0o777 & ~_umask())
    try:
        os.replace(tmp_dir, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final
