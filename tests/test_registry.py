"""Released weights by name without a network: a tiny RAR written by torch with the official key
names, served from a Hugging Face Hub cache laid out here (read offline, HF_HUB_OFFLINE) and
from a local HTTP server on 127.0.0.1; converted once into the tok1d cache and read from there
afterwards (the server stopped, the Hub cache deleted); a wrong sha256, a file that is not what
its name says and an unreachable file each refused with one line, nothing half-written left."""

import functools
import hashlib
import http.server
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse

import jax
import numpy as np
import pytest

from conftest import free_port, subprocess_env
from tok1d import errors, workfiles
from tok1d.cli import convert as convert_cli
from tok1d.models.generators.rar import RAR
from tok1d.weights import download, layout, loaders, registry
from tok1d.weights.convert import common
from tok1d.weights.convert import rar as convert_rar

torch = pytest.importorskip("torch", reason="torch writes the official-format .bin files")

TINY = dict(vocab_size=11, num_tokens=4, num_classes=3, width=16, depth=1, num_heads=2,
            mlp_dim=32)


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    """(path, bytes, sha256) of a tiny RAR in the official layout, saved by torch."""
    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(rng.normal(size=s).astype(np.float32))
          for k, s in convert_rar.official_shapes(RAR(**TINY)).items()}
    path = tmp_path_factory.mktemp("official") / "rar_tiny.bin"
    torch.save(sd, path)
    data = path.read_bytes()
    return str(path), data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The tok1d cache ($TOK1D_CACHE) of this test; no offline switch inherited."""
    root = tmp_path / "tok1d_cache"
    monkeypatch.setenv(download.CACHE_ENV, str(root))
    for name in download.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    return root


def _entry(monkeypatch, name, source, **file_kw):
    entry = registry.Released(name, "rar", {"checkpoint": registry.File(source, **file_kw)})
    monkeypatch.setitem(registry.RELEASED, name, entry)
    return entry


def _hub_cache(root, repo, filename, data, commit="0123456789abcdef0123456789abcdef01234567"):
    """A file in the `huggingface_hub` cache layout: blobs/<sha256>, refs/main holding the
    commit, snapshots/<commit>/<file> a relative link to the blob."""
    folder = root / ("models--" + repo.replace("/", "--"))
    digest = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / digest).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / filename)
    return folder


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hub cache of this test, read with HF_HUB_OFFLINE=1 (the library reads its settings at
    import: they are set on its constants too)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    root = tmp_path / "hf_hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture
def server(tiny_bin, tmp_path):
    """A local HTTP server on 127.0.0.1 serving the tiny file at /files/rar_tiny.bin."""
    www = tmp_path / "www"
    (www / "files").mkdir(parents=True)
    shutil.copy(tiny_bin[0], www / "files" / "rar_tiny.bin")
    shutil.copy(tiny_bin[0], www / "files" / "rar_tiny-0badbeef.pth")  # torch.hub-style name

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/files/rar_tiny.bin"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".part-", ".discard-"))]


def _expected_params(path):
    return common.flatten(convert_rar.convert_file(path)[1])


def _assert_same(params, path):
    want = _expected_params(path)
    got = common.flatten(params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_hub_cache_offline_then_the_tok1d_cache(tiny_bin, cache, offline_hub, monkeypatch):
    """A released name whose file is in the Hub cache loads offline in one line; the converted
    directory is cached, so with the Hub cache gone the second call still loads."""
    _entry(monkeypatch, "rar_tiny", "hf://tok1d-test/tiny-rar/rar_tiny.bin")
    folder = _hub_cache(offline_hub, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    model, params = loaders.load("rar_tiny")
    assert model == RAR(**TINY).clone(dtype=model.dtype)
    _assert_same(params, tiny_bin[0])
    assert os.path.isdir(cache / "rar_tiny") and not _leftovers(cache)
    shutil.rmtree(folder)
    assert loaders.resolve("rar_tiny") == str(cache / "rar_tiny")
    _, again = loaders.load("rar_tiny")
    _assert_same(again, tiny_bin[0])
    # Every loader takes the name (here: init from released weights).
    assert common.flatten(loaders.load_params("rar_tiny")).keys() == common.flatten(params).keys()


def test_a_conversion_by_older_converters_is_converted_again(tiny_bin, cache, offline_hub,
                                                            monkeypatch):
    """A cached conversion records the converters' version; after a converter change (the
    version bumped) the next load converts again instead of serving the old output. A directory
    without the record (tok1d before it) counts as version 1."""
    _entry(monkeypatch, "rar_tiny", "hf://tok1d-test/tiny-rar/rar_tiny.bin")
    _hub_cache(offline_hub, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    final = cache / "rar_tiny"
    assert loaders.resolve("rar_tiny") == str(final)
    record = final / loaders.CONVERSION_FILE
    assert json.loads(record.read_text())["version"] == loaders.CONVERSION_VERSION == 1
    (final / "sentinel").write_text("the first conversion")
    record.unlink()  # as an earlier tok1d left it: still version 1, used as it is
    assert loaders.resolve("rar_tiny") == str(final) and (final / "sentinel").exists()
    monkeypatch.setattr(loaders, "CONVERSION_VERSION", 2)
    assert loaders.resolve("rar_tiny") == str(final)
    assert not (final / "sentinel").exists() and not _leftovers(cache)
    assert json.loads(record.read_text())["version"] == 2
    _, params = loaders.load("rar_tiny")
    _assert_same(params, tiny_bin[0])


def test_a_conversion_by_older_converters_stays_until_a_new_one_is_made(tiny_bin, cache,
                                                                      offline_hub, monkeypatch,
                                                                      capsys):
    """The file to convert again cannot be fetched (offline, not in the Hub cache): the
    command refuses in one line naming the cached directory, which is kept as it was; once the
    file is back, the new conversion replaces it."""
    _entry(monkeypatch, "rar_tiny", "hf://tok1d-test/tiny-rar/rar_tiny.bin")
    folder = _hub_cache(offline_hub, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    final = cache / "rar_tiny"
    assert loaders.resolve("rar_tiny") == str(final)
    (final / "sentinel").write_text("the first conversion")
    shutil.rmtree(folder)
    monkeypatch.setattr(loaders, "CONVERSION_VERSION", 2)
    monkeypatch.setenv("TOK1D_OFFLINE", "1")
    assert convert_cli.main(["--from", "rar_tiny"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{final} was converted by other converters (version 1" in err
    assert "could not download" in err and "is kept" in err
    assert (final / "sentinel").exists() and not _leftovers(cache)
    # the file back: converted again, replacing the old directory
    _hub_cache(offline_hub, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    assert loaders.resolve("rar_tiny") == str(final)
    assert not (final / "sentinel").exists() and not _leftovers(cache)
    assert json.loads((final / loaders.CONVERSION_FILE).read_text())["version"] == 2


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next_one(tiny_bin, cache,
                                                                      offline_hub, monkeypatch):
    """A conversion or download killed outright (SIGKILL, the OOM killer) cannot clean up: its
    ".tmp-" directory (maybe GBs) or ".part-" file stays. Their names carry the writer's host
    and pid: the next conversion removes this host's of exited processes at once, and another
    host's (or an unnamed, older tok1d's) only when nothing in them changed for a day; an
    empty one of another host may have just been made (object-store mounts can report old
    directory mtimes), a live process's is kept."""
    _entry(monkeypatch, "rar_tiny", "hf://tok1d-test/tiny-rar/rar_tiny.bin")
    _hub_cache(offline_hub, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    cache.mkdir(parents=True, exist_ok=True)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    old = time.time() - 2 * workfiles.STALE_AFTER_S
    entries = {  # name: (a file inside, made a day ago)
        f".tmp-rar_tiny+{host}+{exited}+x1": (True, False),      # killed here: removed
        f".part-@{host}@{exited}@x2": (False, False),            # killed here: removed
        f".tmp-rar_tiny@{host}@{os.getppid()}@x3": (True, True),  # live here: kept
        ".tmp-rar_tiny@other-host@12@x4": (True, True),           # old elsewhere: removed
        ".tmp-rar_tiny@other-host@13@x5": (False, True),          # empty elsewhere: kept
        ".tmp-rar_tiny@other-host@14@x6": (True, False),          # recent elsewhere: kept
        ".tmp-rar_tiny-unnamed": (True, True),                    # older tok1d, old: removed
    }
    for name, (filled, aged) in entries.items():
        path = cache / name
        if name.startswith(".tmp-"):
            path.mkdir()
            if filled:
                (path / "params").write_bytes(b"partial")
        else:
            path.write_bytes(b"partial")
        if aged:
            for p in [path, *path.rglob("*")]:
                os.utime(p, (old, old))
    (cache / "kept_old_dir").mkdir()
    os.utime(cache / "kept_old_dir", (old, old))
    assert loaders.resolve("rar_tiny") == str(cache / "rar_tiny")
    assert sorted(p.name for p in cache.iterdir()) == sorted([
        f".tmp-rar_tiny@{host}@{os.getppid()}@x3", ".tmp-rar_tiny@other-host@13@x5",
        ".tmp-rar_tiny@other-host@14@x6", "kept_old_dir", "rar_tiny"])
    assert download.work_prefix(".tmp-", "x") == f".tmp-x+{host}+{os.getpid()}+"


def test_url_download_then_cache_hit_with_the_server_stopped(tiny_bin, cache, server,
                                                             monkeypatch, capsys):
    httpd, url = server
    _entry(monkeypatch, "rar_url", url, sha256=tiny_bin[2])
    assert convert_cli.main(["--from", "rar_url"]) == 0
    first = capsys.readouterr().out.strip()
    assert first == f"wrote {cache / 'rar_url'}"
    assert (cache / "downloads" / "127.0.0.1:{}".format(httpd.server_address[1])
            / "rar_tiny.bin").read_bytes() == tiny_bin[1]
    httpd.shutdown()
    httpd.server_close()
    assert convert_cli.main(["--from", "rar_url"]) == 0
    assert capsys.readouterr().out.strip() == f"already converted: {cache / 'rar_url'}"
    # A copy to --out; a Hub/URL source with its converter kind (cached under its own key).
    # The copy of a run killed midway (kill -9) is removed by the next (it stayed).
    out = cache.parent / "copy"
    killed = cache.parent / download.work_prefix(".tmp-convert").replace(
        f"+{os.getpid()}+", "+999999999+")
    (killed / "copy").mkdir(parents=True)
    assert convert_cli.main(["--from", "rar_url", "--out", str(out)]) == 0
    assert not killed.exists()
    _, params = loaders.load_pretrained(str(out))
    _assert_same(params, tiny_bin[0])
    assert not _leftovers(cache) and not _leftovers(cache.parent)


def test_checksum_mismatch_is_refused_and_nothing_is_kept(tiny_bin, cache, server, monkeypatch,
                                                          capsys):
    _, url = server
    _entry(monkeypatch, "rar_bad", url, sha256="0" * 64)
    assert convert_cli.main(["--from", "rar_bad"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "sha256" in err and tiny_bin[2] in err and "refused" in err
    assert not (cache / "rar_bad").exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no download kept, no .part
    with pytest.raises(download.ChecksumError):
        loaders.load("rar_bad")
    # A published prefix (torch.hub-style names) is checked too.
    _entry(monkeypatch, "rar_prefix", url, sha256=tiny_bin[2][:8])
    assert os.path.isdir(loaders.resolve("rar_prefix"))


def test_a_download_the_converter_rejects_is_not_kept(tiny_bin, cache, server, capsys):
    """A URL without a published digest serving an HTML page: refused in one line that says
    so (not torch's advice to load it with weights_only=False), and not cached, so once the
    server has the right file the next run downloads it again and converts."""
    httpd, url = server
    www = pathlib.Path(httpd.RequestHandlerClass.keywords["directory"])
    (www / "files" / "page.bin").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    page = url.replace("rar_tiny.bin", "page.bin")
    assert convert_cli.main(["rar", "--from", page]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "HTML" in err and "not kept" in err and "weights_only" not in err
    assert not [p for p in cache.rglob("*") if p.is_file()] and not _leftovers(cache)
    shutil.copy(tiny_bin[0], www / "files" / "page.bin")
    assert convert_cli.main(["rar", "--from", page]) == 0
    _assert_same(loaders.load(page, kind="rar")[1], tiny_bin[0])
    # torch's refusal of another foreign file, without its advice
    other = cache.parent / "garbage.bin"
    other.write_bytes(b"\xcd" * 64)
    with pytest.raises(common.ConversionError, match="Unsupported operand 205") as e:
        common.load_state_dict(str(other))
    assert str(other) in str(e.value) and "weights_only" not in str(e.value)


def test_no_network_names_the_url_and_the_manual_path(tiny_bin, cache, monkeypatch, capsys):
    url = "http://127.0.0.1:9/files/rar_tiny.bin"  # the discard port: nothing listens
    _entry(monkeypatch, "rar_far", url)
    monkeypatch.setenv("TOK1D_OFFLINE", "1")
    assert convert_cli.main(["--from", "rar_far"]) != 0
    err = capsys.readouterr().err.strip()
    manual = cache / "downloads" / "127.0.0.1:9" / "rar_tiny.bin"
    assert len(err.splitlines()) == 1 and url in err and str(manual) in err
    assert not (cache / "rar_far").exists() and not _leftovers(cache)
    monkeypatch.delenv("TOK1D_OFFLINE")
    with pytest.raises(download.DownloadError, match=re.escape(str(manual))):
        loaders.resolve("rar_far")
    # A file put there by hand is used (and still checked), without the network.
    manual.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_bin[0], manual)
    _, params = loaders.load("rar_far")
    _assert_same(params, tiny_bin[0])
    # GigaTok's Google Drive files: the page and the path, no download attempted.
    with pytest.raises(download.DownloadError, match="drive.google.com.*download it by hand|"
                       "download it by hand.*drive.google.com") as e:
        loaders.resolve("gigatok_b_l")
    # ... and how to convert it where it is, with the converter and options the name uses
    assert ("tok1d convert gigatok --checkpoint=FILE --preset=b_l --out=DIR (in Python: "
            "tok1d.weights.load(FILE, kind='gigatok', preset='b_l'))") in str(e.value)


def test_offline_hub_miss_names_the_url(cache, offline_hub, capsys):
    assert convert_cli.main(["--from", "rar_b"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "https://huggingface.co/yucornetto/RAR/resolve/main/rar_b.bin" in err
    assert str(cache / "downloads" / "yucornetto--RAR" / "rar_b.bin") in err
    assert "tok1d convert rar --checkpoint=FILE --size=B --out=DIR" in err and "KIND" not in err
    # a perceptual network's: its own flags, no Python form (its directory is not a model's)
    with pytest.raises(download.DownloadError) as e:
        loaders.resolve("lpips_vgg")
    assert "tok1d convert lpips --vgg=VGG16_FILE --checkpoint=FILE --out=DIR." in str(e.value)


def test_a_file_that_is_not_what_its_name_says(tiny_bin, cache, offline_hub, monkeypatch,
                                               capsys):
    """The tiny RAR fetched as the released rar_b (the converter's size check), and as a name
    promising other model arguments (`expect`): refused, nothing cached; converted with a
    wrong kind, the kind is named and the file kept."""
    _hub_cache(offline_hub, "yucornetto/RAR", "rar_b.bin", tiny_bin[1])
    assert convert_cli.main(["--from", "rar_b"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "size 'B'" in err and "(ConversionError)" in err
    assert not (cache / "rar_b").exists() and not _leftovers(cache)
    entry = _entry(monkeypatch, "rar_other", "hf://yucornetto/RAR/rar_b.bin")
    monkeypatch.setitem(registry.RELEASED, "rar_other",
                        registry.Released(entry.name, "rar", entry.files,
                                          expect=dict(num_tokens=256)))
    with pytest.raises(common.ConversionError, match="num_tokens=4 .expected 256"):
        loaders.load("rar_other")
    assert not (cache / "rar_other").exists() and not _leftovers(cache)
    # a small DINOv2 at dinov2_vitb14's manual-download path (it was converted and cached)
    from test_dinov2 import _tiny_sd
    _, sd = _tiny_sd(d=64, depth=1)
    path = download.manual_path(registry.RELEASED["dinov2_vitb14"].files["checkpoint"])
    os.makedirs(os.path.dirname(path))
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    with pytest.raises(common.ConversionError, match="embed_dim=64 .expected 768") as e:
        loaders.load("dinov2_vitb14")
    assert f"remove {path} (or put the official file there)" in str(e.value)
    assert not (cache / "dinov2_vitb14").exists() and not _leftovers(cache)
    assert os.path.isfile(path)  # what the user put there stays: the error names it
    # A file of a URL converted with the wrong kind: the kind may be what is wrong (the
    # file was blamed, "remove it and run again", which only downloaded it again).
    url = "https://dl.example.invalid/x/rar_tiny.bin"
    manual = download.manual_path(registry.file_of(url))
    os.makedirs(os.path.dirname(manual))
    shutil.copy(tiny_bin[0], manual)
    with pytest.raises(common.ConversionError) as e:
        loaders.resolve(url, kind="titok")
    assert str(e.value).startswith("the converter (kind='titok') may not fit the file (it is "
                                   "kept): ")  # (first: a long key list is cut on the console)
    assert "remove" not in str(e.value) and os.path.isfile(manual) and not _leftovers(cache)
    assert loaders.load(url, kind="rar")[0] is not None  # the right kind converts it


def test_unknown_names_and_sources():
    for source in ("hf://yucornetto/RAR", "hf://yucornetto/RAR/"):  # no file: its format
        with pytest.raises(errors.UserError, match="a Hub file is hf://OWNER/REPO/FILE"):
            loaders.resolve(source)
    with pytest.raises(registry.UnknownName, match="did you mean titok_l32"):
        loaders.load("titok_l33")
    with pytest.raises(registry.UnknownName):
        loaders.load_tokenizer("titok_l33")
    with pytest.raises(Exception, match="say which converter"):
        loaders.resolve("hf://owner/repo/file.bin")


def test_the_table():
    """Every entry converts with a known kind, names its official source, and records only
    published digests (torch.hub-style names carry their sha256 prefix)."""
    assert {"titok_l32", "titok_b64", "titok_s128", "titok_bl64_vq8k", "titok_ll32_vae",
            "maskgit_titok_l32", "maskgit_vqgan", "rar_b", "rar_xxl", "gigatok_b_l",
            "gpt_b_gigatok_b_l", "dinov2_vitb14", "lpips_vgg", "convnext_s",
            "inception_fid"} <= set(registry.RELEASED)
    for name, entry in registry.RELEASED.items():
        assert entry.kind is None or entry.kind in loaders.CONVERT_KINDS, name
        assert "checkpoint" in entry.files, name
        for f in entry.files.values():
            if f.source.startswith(download.HF_SCHEME):
                download.split_hub(f.source)
            else:
                assert f.source.startswith("https://"), name
            assert f.manual == ("drive.google.com" in f.source), name
            if f.sha256:
                assert re.search(rf"-{f.sha256}\.pth$", f.source), name


def test_a_teacher_by_name(cache, monkeypatch):
    """`teacher.weights` as a released name: DINOv2's official file, fetched (here: put at its
    manual-download path), its table resampled to the student's grid as from the file itself."""
    from test_dinov2 import _tiny_sd

    _, sd = _tiny_sd(d=64, depth=1)
    entry = registry.Released("dinov2_tiny", "dinov2", {"checkpoint": registry.File(
        "https://dl.example.invalid/dinov2/dinov2_tiny_pretrain.npz")})
    monkeypatch.setitem(registry.RELEASED, entry.name, entry)
    path = download.manual_path(entry.files["checkpoint"])
    os.makedirs(os.path.dirname(path))
    np.savez(path, **sd)
    by_name = loaders.load_teacher("dinov2", "dinov2_tiny", {}, precision="float32", grid=8)
    by_file = loaders.load_teacher("dinov2", path, {}, precision="float32", grid=8)
    assert by_name[0] == by_file[0] and by_name[0].pos_grid == 8
    jax.tree.map(np.testing.assert_array_equal, by_name[1], by_file[1])


def test_user_options_override_the_entrys_and_key_the_cache(tiny_bin, cache, monkeypatch,
                                                             capsys):
    """Options given with a released name reach the converter and are cached apart; --vgg
    reaches the LPIPS converter (with a name, and with a local file)."""
    seen = []

    def fake_convert(kind, checkpoint, out, *, vgg=None, expect=None, source="", **options):
        seen.append((kind, vgg and os.path.basename(vgg), options))
        os.makedirs(out, exist_ok=True)
        return out

    monkeypatch.setattr(loaders, "convert_official", fake_convert)
    for name, kind, options, roles in (("gpt_opts", "gpt", dict(size="B", weights="model"),
                                        ("checkpoint",)),
                                       ("lpips_opts", "lpips", {}, ("checkpoint", "vgg"))):
        files = {r: registry.File(f"https://dl.example.invalid/{name}/{r}.pth") for r in roles}
        monkeypatch.setitem(registry.RELEASED, name,
                            registry.Released(name, kind, files, options=options))
        for f in files.values():  # put by hand at their manual-download paths: no network
            os.makedirs(os.path.dirname(download.manual_path(f)), exist_ok=True)
            shutil.copy(tiny_bin[0], download.manual_path(f))
    other_vgg = cache.parent / "my_vgg16.pth"
    shutil.copy(tiny_bin[0], other_vgg)

    dirs = [loaders.resolve("gpt_opts")]
    assert convert_cli.main(["--from", "gpt_opts", "--weights=ema"]) == 0
    dirs.append(capsys.readouterr().out.split()[-1])
    dirs.append(loaders.resolve("gpt_opts", size="XL"))
    assert loaders.resolve("gpt_opts", size="B") == dirs[0]  # the entry's own options
    assert convert_cli.main(["--from", "lpips_opts", "--vgg", str(other_vgg)]) == 0
    dirs.append(capsys.readouterr().out.split()[-1])
    assert convert_cli.main(["lpips", "--from", tiny_bin[0], "--out", str(cache.parent / "lp"),
                             "--vgg", str(other_vgg)]) == 0
    assert len(set(dirs)) == 4 and all(os.path.isdir(d) for d in dirs)
    assert dirs[0] == str(cache / "gpt_opts") and dirs[1].startswith(str(cache / "gpt_opts-"))
    assert seen == [("gpt", None, dict(size="B", weights="model")),
                    ("gpt", None, dict(size="B", weights="ema")),
                    ("gpt", None, dict(size="XL", weights="model")),
                    ("lpips", "my_vgg16.pth", {}), ("lpips", "my_vgg16.pth", {})]
    # A file used as it is takes no options, and is not called a "None checkpoint".
    with pytest.raises(Exception, match="takes no converter options"):
        loaders.resolve("dino_vits16", pos_grid=16)
    assert convert_cli.main(["dinov2", "--from", "dino_vits16"]) != 0
    err = capsys.readouterr().err
    assert "None" not in err and "a file used as it is" in err


def test_tok1d_offline_reads_only_the_hub_cache(tiny_bin, cache, tmp_path, monkeypatch):
    """TOK1D_OFFLINE=1 alone (no HF_HUB_OFFLINE) keeps huggingface_hub off the network; a Hub
    failure is worded by its cause."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    root = tmp_path / "hf_hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TOK1D_OFFLINE", "1")
    calls, real = [], hub.hf_hub_download

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(hub, "hf_hub_download", spy)
    _hub_cache(root, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    _entry(monkeypatch, "rar_tiny", "hf://tok1d-test/tiny-rar/rar_tiny.bin")
    assert os.path.isdir(loaders.resolve("rar_tiny"))
    assert calls and all(kw.get("local_files_only") is True for kw in calls)
    _entry(monkeypatch, "rar_miss", "hf://tok1d-test/tiny-rar/missing.bin")
    with pytest.raises(download.DownloadError, match=r"offline \(TOK1D_OFFLINE"):
        loaders.resolve("rar_miss")

    def broken(**kw):
        raise ValueError("Repo id must use alphanumeric chars")

    monkeypatch.setattr(hub, "hf_hub_download", broken)
    with pytest.raises(download.DownloadError, match="ValueError: Repo id must") as e:
        loaders.resolve("rar_miss")
    assert "offline" not in str(e.value).split("(", 1)[1].split(")")[0]


def test_a_download_cut_mid_stream_is_one_error_and_nothing_is_kept(cache, monkeypatch):
    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if not self.path.endswith("cut.bin"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/files/cut.bin"
        entry = _entry(monkeypatch, "rar_cut", url)
        manual = download.manual_path(entry.files["checkpoint"])
        with pytest.raises(download.DownloadError, match=re.escape(manual)) as e:
            loaders.resolve("rar_cut")
        assert "the connection closed after 1000 of 100000 bytes); run again or" in str(e.value)
        assert "no network" not in str(e.value)
        missing = url.replace("cut.bin", "missing.bin")
        with pytest.raises(download.DownloadError, match="HTTP 404") as e:
            loaders.resolve(missing, kind="rar")
        assert "no network" not in str(e.value) and "check the URL" in str(e.value)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not os.path.exists(manual) and not _leftovers(cache)
    assert not (cache / "rar_cut").exists()


def test_cached_files_have_the_umask_modes_and_are_hashed_once(tiny_bin, cache, server,
                                                               monkeypatch):
    _, url = server
    entry = _entry(monkeypatch, "rar_mode", url, sha256=tiny_bin[2])
    hashed = []
    monkeypatch.setattr(download, "sha256_of",
                        lambda path, f=download.sha256_of: hashed.append(path) or f(path))
    old = os.umask(0o022)
    try:
        converted = loaders.resolve("rar_mode")
    finally:
        os.umask(old)
    assert len(hashed) == 1
    assert stat.S_IMODE(os.stat(converted).st_mode) == 0o755
    downloaded = download.manual_path(entry.files["checkpoint"])
    assert stat.S_IMODE(os.stat(downloaded).st_mode) == 0o644


def test_a_url_of_the_table_or_torch_hub_style_is_checked(tiny_bin, cache, server,
                                                          monkeypatch):
    """`--from URL` checks the table's sha256 for that URL, and the digest prefix of a
    torch.hub-style name (NAME-<sha256 prefix>.pth) on torch's model host only: elsewhere such
    a tail is a date or a step number, and is not a digest."""
    _, url = server
    _entry(monkeypatch, "rar_listed", url, sha256="0" * 64)
    with pytest.raises(download.ChecksumError, match="the download, not kept"):
        loaders.resolve(url, kind="rar")
    hub_style = url.replace("rar_tiny.bin", "rar_tiny-0badbeef.pth")
    assert os.path.isdir(loaders.resolve(hub_style, kind="rar"))  # any host: no digest
    monkeypatch.setattr(registry, "_HUB_STYLE_HOSTS",
                        registry._HUB_STYLE_HOSTS + (urllib.parse.urlsplit(url).netloc,))
    with pytest.raises(download.ChecksumError):  # torch's host: its prefix is checked
        loaders.resolve(hub_style, kind="rar", cache_dir=str(cache.parent / "fresh"))
    assert registry.file_of(registry.RELEASED["inception_fid"].files["checkpoint"].source
                            ).sha256 == "6726825d"
    assert registry.file_of(
        "https://download.pytorch.org/models/vgg16-397923af.pth").sha256 == "397923af"
    for other in ("https://x.invalid/a/vgg16-397923af.pth", "https://x.invalid/run/step-00250000.pt",
                  "hf://o/r/model-0123abcd.pth"):
        assert registry.file_of(other).sha256 is None, other
    assert not _leftovers(cache)


def test_two_urls_with_one_host_and_file_name_are_two_files(tiny_bin, cache, server, tmp_path):
    """Downloads are kept per URL: /a/model.bin and /b/model.bin of one host are not taken for
    each other (each URL's own weights are converted)."""
    httpd, url = server
    other = tmp_path / "www" / "b" / "files"
    other.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sd = {k: torch.from_numpy(rng.normal(size=s).astype(np.float32))
          for k, s in convert_rar.official_shapes(RAR(**TINY)).items()}
    torch.save(sd, other / "rar_tiny.bin")
    url_b = url.replace("/files/", "/b/files/")
    paths = [download.manual_path(registry.file_of(u)) for u in (url, url_b)]
    assert paths[0] != paths[1] and os.path.basename(paths[1]) == "rar_tiny.bin"
    _, params_a = loaders.load(url, kind="rar")
    _, params_b = loaders.load(url_b, kind="rar")
    _assert_same(params_a, tiny_bin[0])
    _assert_same(params_b, str(other / "rar_tiny.bin"))


def test_a_librarys_own_stderr_handler_is_removed_so_its_lines_print_once():
    """huggingface_hub puts a StreamHandler on its logger and also propagates to the root
    logger, which tok1d's console prints: every retry warning came out twice."""
    logger = logging.getLogger("tok1d_test_library")
    own, file_handler = logging.StreamHandler(), logging.FileHandler(os.devnull)
    logger.addHandler(own)
    logger.addHandler(file_handler)
    download.quiet_own_handler(logger)
    assert logger.handlers == [file_handler] and logger.propagate
    logger.removeHandler(file_handler)
    file_handler.close()


_POD_HOST = r"""
import os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from tok1d.weights import loaders, registry
registry.RELEASED["rar_pod"] = registry.Released(
    "rar_pod", "rar", {"checkpoint": registry.File(sys.argv[3])})
_, params = loaders.load("rar_pod")
print("leaves", len(jax.tree.leaves(params)), flush=True)
"""


def test_two_hosts_converting_one_name_leave_the_weights_in_a_shared_cache(
        tiny_bin, cache, tmp_path):
    """On a pod every host resolves the same name at once; orbax writes the converted arrays
    from process 0 only. The shared cache must end up with process 0's complete copy (it
    used to keep whichever host renamed first: often one without weights), every host loads
    it, and a directory left without weights is converted again."""
    url = "https://dl.example.invalid/pod/rar_tiny.bin"
    manual = download.manual_path(registry.File(url))
    os.makedirs(os.path.dirname(manual))
    shutil.copy(tiny_bin[0], manual)
    script = tmp_path / "host.py"
    script.write_text(_POD_HOST)
    env = subprocess_env(1)
    env.update({download.CACHE_ENV: str(cache), "TOK1D_OFFLINE": "1"})

    def pod():
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, str(script), str(i), port, url], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=240) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
            assert "leaves" in out
        assert not layout.lacks_weights(str(cache / "rar_pod"))
        assert not _leftovers(cache)

    pod()
    shutil.rmtree(cache / "rar_pod" / "params")  # what an older tok1d could leave
    assert layout.lacks_weights(str(cache / "rar_pod"))
    pod()
    with pytest.raises(errors.UserError, match="storage every host shares"):
        loaders._wait_for_process_0(str(tmp_path / "never"), "rar_pod", timeout_s=0.2)


_POD_HOST_OWN_CACHE = r"""
import os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
os.environ["TOK1D_CACHE"] = os.path.join(sys.argv[4], f"host{pid}")
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from tok1d import errors
from tok1d.weights import loaders, registry
loaders.WAIT_FOR_PROCESS_0_S = 3.0
registry.RELEASED["rar_pod"] = registry.Released(
    "rar_pod", "rar", {"checkpoint": registry.File(sys.argv[3])})
try:
    loaders.load("rar_pod")
except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
print("loaded", flush=True)
"""


def test_hosts_with_a_cache_each_all_stop_with_the_error(tiny_bin, tmp_path):
    """A cache on each host's own disk: process 1 cannot see process 0's conversion. Every
    process agrees on it before the collective restore, so both exit non-zero with one line
    (process 1 used to raise alone, process 0 waiting for it in the restore: both hung). Run
    again, host 0 finds its conversion cached and host 1 does not: they convert together
    again and stop the same way (host 0 used to restore its cache while host 1 saved a
    conversion: both crashed in the mismatched collectives, "sync_global_devices name
    mismatch", with tracebacks)."""
    url = "https://dl.example.invalid/pod/rar_tiny.bin"
    for pid in range(2):
        manual = download.manual_path(registry.File(url), str(tmp_path / f"host{pid}"))
        os.makedirs(os.path.dirname(manual))
        shutil.copy(tiny_bin[0], manual)
    script = tmp_path / "host.py"
    script.write_text(_POD_HOST_OWN_CACHE)
    env = subprocess_env(1)
    env.update({"TOK1D_OFFLINE": "1"})
    for run in range(2):
        port = str(free_port())
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, str(script), str(i), port, url,
                                   str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            outs = [p.communicate(timeout=180) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert time.monotonic() - t0 < 180
        errs = [err for _, err in outs]
        assert [p.returncode for p in procs] == [2, 2], (run, errs)
        assert "process 1 does not see the conversion process 0" in errs[1]
        assert "process(es) 1 could not use the conversion" in errs[0]
        assert not any("loaded" in out for out, _ in outs)
        assert loaders._complete(str(tmp_path / "host0" / "rar_pod"))


def test_an_unreachable_hub_fails_at_once_and_still_reads_its_cache(tiny_bin, cache,
                                                                      offline_hub, monkeypatch,
                                                                      capsys):
    """No network (the Hub's endpoint refuses connections): one line in a few seconds, not the
    library's ~26 s of retries; a file in the Hub cache still loads."""
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    t0 = time.time()
    assert convert_cli.main(["--from", "rar_b"]) != 0
    err = capsys.readouterr().err.strip()
    assert time.time() - t0 < 10
    assert len(err.splitlines()) == 1 and "the Hub is unreachable" in err
    _entry(monkeypatch, "rar_tiny", "hf://tok1d-test/tiny-rar/rar_tiny.bin")
    _hub_cache(offline_hub, "tok1d-test/tiny-rar", "rar_tiny.bin", tiny_bin[1])
    _assert_same(loaders.load("rar_tiny")[1], tiny_bin[0])


def test_a_name_in_the_wrong_place_is_refused_before_any_download(cache, monkeypatch, capsys):
    """A generator's name given as the tokenizer (or a tokenizer's as the generator) was
    downloaded and converted (GBs) before the refusal; offline, the download's error hid the
    real mistake. A released generator brings its own tokenizer; evaluate without --config
    of a released name asks for one (it read the default TiTok's and dumped 163 shapes); the
    report records the name, not a folder of that name under the current directory."""
    from tok1d import summary
    from tok1d.cli import evaluate as evaluate_cli
    from tok1d.cli import sample as sample_cli
    from tok1d.train import config_lib
    monkeypatch.setenv("TOK1D_OFFLINE", "1")
    with pytest.raises(errors.UserError, match="rar_b is not a tokenizer but a RAR-B generator"
                       ".*give a tokenizer \\(titok_l32, "):
        loaders.load_tokenizer("rar_b")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load(os.path.join(repo, "configs", "maskgit_titok.py") + ":l32")
    with pytest.raises(errors.UserError, match="titok_l32 is not a generator but a TiTok"):
        sample_cli.load_generator(config, "titok_l32")
    with pytest.raises(errors.UserError, match="titok_l32 is not a generator but a TiTok"):
        loaders.load_generator("titok_l32")
    logged = []
    assert sample_cli.tokenizer_of(config, "maskgit_titok_l32", "", logged.append) == "titok_l32"
    assert logged == ["Tokenizer: titok_l32 (the released tokenizer maskgit_titok_l32 was "
                      "trained on)."]
    assert sample_cli.tokenizer_of(config, "maskgit_titok_l32", "mine/", logged.append) == "mine/"
    assert {e.tokenizer for e in registry.RELEASED.values() if e.kind in loaders.GENERATOR_KINDS
            } <= {n for n, e in registry.RELEASED.items() if e.kind in loaders.TOKENIZER_KINDS}
    assert evaluate_cli.main(["--checkpoint=titok_l32", "--out", str(cache / "ev")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --config is required: --checkpoint=titok_l32 is not a training run's workdir "
        "(it has no config.json), so the model's config must be given (see python -m "
        "tok1d.cli.evaluate --help).")
    assert loaders.recorded_path("titok_l32") == "titok_l32"
    assert loaders.recorded_path("hf://owner/repo/f.bin") == "hf://owner/repo/f.bin"
    assert summary.format_rate(0.0213) == "0.021" and summary.format_rate(537.14) == "537.1"
    # a step a workdir does not have, and a workdir given as a pretrained directory
    run = cache / "run"
    (run / layout.CHECKPOINTS_DIR / "4").mkdir(parents=True)
    (run / layout.CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint at step 3 \(its steps: 4\)"):
        loaders.load_params(str(run), step=3)
    with pytest.raises(FileNotFoundError, match="is a training workdir, not a pretrained "
                       "directory .*tok1d.weights.load\\(DIR\\)"):
        loaders.load_pretrained(str(run))
