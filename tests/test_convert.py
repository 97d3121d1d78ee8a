"""`python -m tok1d.cli.convert` on checkpoints written by torch: random weights with the official
key names and shapes (taken from the fixture's state_dict of the VQ-8k pixel-head TiTok),
saved as .bin and .safetensors, converted, then encoded / decoded with tok1d."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tok1d import errors
from tok1d.weights import loaders
from tok1d.cli import convert as convert_cli
from tok1d.weights.convert import common
from tok1d.models.tokenizers.titok import TiTok

torch = pytest.importorskip("torch", reason="torch is needed to write .bin checkpoints")


@pytest.fixture(scope="module")
def official_keys(fixtures_dir):
    path = os.path.join(fixtures_dir, "titok.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    sd = common.load_state_dict(path, prefix="vq_pixel/sd/")
    return {k: v.shape for k, v in sd.items()}


@pytest.fixture(scope="module")
def torch_checkpoint(official_keys, tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in official_keys.items()}
    folder = tmp_path_factory.mktemp("torch_ckpt")
    torch.save(sd, folder / "tokenizer.bin")
    try:
        from safetensors.torch import save_file
        save_file(sd, str(folder / "model.safetensors"))
    except ImportError:
        pass
    return folder, sd


def test_bin_checkpoint_converts_and_round_trips(torch_checkpoint, tmp_path):
    folder, sd = torch_checkpoint
    out = tmp_path / "converted"
    assert convert_cli.main(["titok", "--checkpoint", str(folder / "tokenizer.bin"),
                             "--out", str(out)]) == 0
    model, params = loaders.load_pretrained(str(out))
    assert isinstance(model, TiTok) and model.decoder_head == "pixels"
    assert not model.legacy_reshape and model.codebook_size == sd["quantize.embedding.weight"].shape[0]
    # Every official tensor landed unchanged (up to the layout change).
    np.testing.assert_array_equal(params["quantize"]["embedding"],
                                  sd["quantize.embedding.weight"].numpy())
    np.testing.assert_array_equal(params["encoder"]["patch_embed"]["kernel"],
                                  sd["encoder.patch_embed.weight"].numpy().transpose(2, 3, 1, 0))
    images = jax.random.uniform(jax.random.key(0), (2, model.image_size, model.image_size, 3))
    z_q, aux = model.apply({"params": params}, images, method=TiTok.encode_latents)
    codes = aux["codes"]
    assert codes.shape == (2, model.num_latent_tokens)
    recon = model.apply({"params": params}, z_q, method=TiTok.decode_latents)
    via_codes = model.apply({"params": params}, codes, method=TiTok.decode_codes)
    assert recon.shape == images.shape
    np.testing.assert_allclose(via_codes, recon, atol=1e-5)
    # Re-encoding the looked-up code vectors' decoder input gives the same codes.
    z_again = model.apply({"params": params}, codes, method=lambda m, c: m.quantize.lookup(c))
    _, aux2 = model.apply({"params": params}, z_again, method=lambda m, z: m.quantize(z))
    np.testing.assert_array_equal(aux2["codes"], codes)


def test_an_interrupted_conversion_is_completed_by_the_same_command(torch_checkpoint, tmp_path,
                                                                     monkeypatch):
    """`convert --out` killed while writing the params left params/ without the model file,
    and the rerun was refused ("already holds pretrained params"). The model file now comes
    first: the cut directory is incomplete for the loaders and the same command finishes it."""
    import orbax.checkpoint as ocp
    from tok1d.weights import layout
    folder, sd = torch_checkpoint
    out = tmp_path / "converted"
    args = ["titok", "--checkpoint", str(folder / "tokenizer.bin"), "--out", str(out)]

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "save", killed)
        assert convert_cli.main(args) == 130  # Ctrl-C
    assert layout.lacks_weights(str(out))
    with pytest.raises(errors.UserError, match="run the same `tok1d convert` again"):
        loaders.load_pretrained(str(out))
    assert convert_cli.main(args) == 0
    _, params = loaders.load_pretrained(str(out))
    np.testing.assert_array_equal(params["quantize"]["embedding"],
                                  sd["quantize.embedding.weight"].numpy())
    assert convert_cli.main(args) == 2  # a complete directory is never overwritten



def test_a_conversion_into_a_training_workdir_is_refused(torch_checkpoint, tmp_path, capsys):
    """`--out` = a training workdir was taken over without a word: its pretrained files made
    every loader read the converted model instead of the run's own."""
    folder, _ = torch_checkpoint
    for marker in ("config.json", "checkpoints"):
        run = tmp_path / marker.split(".")[0]
        (run / "checkpoints").mkdir(parents=True)
        if marker == "config.json":
            (run / "checkpoints").rmdir()
            (run / marker).write_text("{}")
        assert convert_cli.main(["titok", "--checkpoint", str(folder / "tokenizer.bin"),
                                 "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert "is a training workdir" in err and "nothing was written" in err
        assert sorted(p.name for p in run.iterdir()) == [marker]


def test_safetensors_and_bin_give_identical_params(torch_checkpoint, tmp_path):
    folder, sd = torch_checkpoint
    if not (folder / "model.safetensors").exists():
        pytest.skip("safetensors not installed")
    from tok1d.weights.convert import titok
    _, from_bin = titok.convert_file(str(folder / "tokenizer.bin"))
    _, from_st = titok.convert_file(str(folder / "model.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_st)
    # Saved from a DDP / torch.compile wrapper (every key prefixed): the same weights.
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "ddp.bin")
    _, from_ddp = titok.convert_file(str(tmp_path / "ddp.bin"))
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_ddp)


def test_bad_checkpoint_fails_with_the_list_and_writes_nothing(torch_checkpoint, tmp_path,
                                                               capsys):
    folder, sd = torch_checkpoint
    bad = dict(sd)
    del bad["decoder.ln_post.weight"]
    bad["decoder.conv_out.weight"] = bad["decoder.conv_out.weight"][:2]
    torch.save(bad, tmp_path / "bad.bin")
    out = tmp_path / "never"
    assert convert_cli.main(["titok", "--checkpoint", str(tmp_path / "bad.bin"),
                             "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "decoder.ln_post.weight" in err and "decoder/conv_out/kernel" in err
    assert not out.exists()
    # An existing output is never overwritten.
    good = tmp_path / "good"
    assert convert_cli.main(["titok", "--checkpoint", str(folder / "tokenizer.bin"),
                             "--out", str(good)]) == 0
    assert convert_cli.main(["titok", "--checkpoint", str(folder / "tokenizer.bin"),
                             "--out", str(good)]) == 2


def test_maskgit_vqgan_cli(fixtures_dir, tmp_path):
    path = os.path.join(fixtures_dir, "titok.npz")
    sd = common.load_state_dict(path, prefix="maskgit_vqgan/sd/")
    torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()},
               tmp_path / "vqgan.bin")
    # The released teacher has fixed sizes; this fixture is a reduced one, so the CLI (which
    # builds the released model) must refuse it with a shape list.
    assert convert_cli.main(["maskgit_vqgan", "--checkpoint", str(tmp_path / "vqgan.bin"),
                             "--out", str(tmp_path / "out")]) == 2
    from tok1d.weights.convert import vqgan
    from tok1d.models.tokenizers.vqgan import MaskGITVQGAN
    import json
    with np.load(path) as z:
        cfg = json.loads(str(z["maskgit_vqgan/config"]))
    model = MaskGITVQGAN(**vqgan.kwargs_from_official(cfg))
    params = vqgan.convert_maskgit_vqgan(common.load_state_dict(str(tmp_path / "vqgan.bin")),
                                         model)
    images = jnp.zeros((1, 32, 32, 3))
    assert model.apply({"params": params}, images)[0].shape == images.shape


def test_gigatok_checkpoint_prefers_ema_and_reproduces_codes(fixtures_dir, tmp_path, capsys):
    """A GigaTok trainer checkpoint ({"model", "ema", "optimizer", "steps", "args"}) written by
    torch converts with the EMA weights (as the official loaders do) and encodes the fixture
    images to its codes (its pickled arguments were refused)."""
    import json
    path = os.path.join(fixtures_dir, "gigatok_1d.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    sd = common.load_state_dict(path, prefix="sd/")
    ema = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    noise = {k: torch.randn(v.shape) if v.dtype.is_floating_point else v for k, v in ema.items()}
    # As GigaTok's vq_train.py saves it, its arguments (an argparse Namespace) included.
    torch.save({"model": noise, "ema": ema, "optimizer": {"state": {}}, "steps": 7,
                "args": argparse.Namespace(vq_model="VQ-16", image_size=256)},
               tmp_path / "ckpt.pt")
    with np.load(path) as z:
        meta = json.loads(str(z["meta_json"]))
        images = np.asarray(z["input/images"], np.float32).transpose(0, 2, 3, 1)
        codes = np.asarray(z["quant/indices"])
    config = dict(meta, image_size=images.shape[1])
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "gigatok"
    assert convert_cli.main(["gigatok", "--checkpoint", str(tmp_path / "ckpt.pt"),
                             "--out", str(out),
                             "--official_config", str(tmp_path / "config.json")]) == 0
    assert "ckpt.pt: converting its 'ema' weights (of args, ema, model, optimizer, steps)." in (
        capsys.readouterr().out)  # (which of the file's weights is said)
    model, params = loaders.load_pretrained(str(out))
    with jax.default_matmul_precision("highest"):
        got = model.apply({"params": params}, jnp.asarray(images), method=model.encode)
    np.testing.assert_array_equal(np.asarray(got), codes)


def test_a_file_that_pickles_more_than_tensors_is_named(tmp_path):
    """torch's weights-only load refuses a pickled object (other than a training run's
    argparse Namespace, which the official trainers save); the error names the object and
    what to do, not torch's boilerplate."""
    import datetime
    torch.save({"day": datetime.date(2024, 1, 1), "model": {"w": torch.zeros(2)}},
               tmp_path / "run.pt")
    with pytest.raises(common.ConversionError, match="run.pt pickles datetime.date beside "
                       "its tensors"):
        common.load_state_dict(str(tmp_path / "run.pt"))


@pytest.mark.parametrize("kind", ["titok", "gpt", "gigatok"])
def test_a_page_or_a_cut_file_in_place_of_a_checkpoint_is_one_line(tmp_path, capsys, kind):
    """Google Drive serves an HTML page for a large file (every GPT and GigaTok file is a
    manual Drive download): each kind names it in one line (the GPT converter printed
    torch's 13-frame UnpicklingError); so does a file cut short."""
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html><head><title>Google Drive - "
                                      "Virus scan warning</title></head></html>")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:600])
    options = ["--preset=s_s"] if kind == "gigatok" else []
    for name, why in (("page.pt", "an HTML or XML page, not a checkpoint"),
                      ("cut.pt", "")):
        assert convert_cli.main([kind, "--checkpoint", str(tmp_path / name),
                                 "--out", str(tmp_path / "never"), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{tmp_path / name} is not a readable checkpoint ({why}" in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind,flag,named", [
    ("titok", "--preset=b_l", "gigatok"),
    ("rar", "--official_config=cfg.json", "titok and gigatok and maskgit"),
    ("dinov2", "--vgg=vgg16.pth", "lpips"),
    ("convnext_s", "--size=B", "gpt and rar"),
    ("titok", "--weights=ema", "gpt"),
])
def test_an_option_the_kind_does_not_take_is_refused(torch_checkpoint, tmp_path, capsys, kind,
                                                     flag, named):
    """Each converter option applies to some kinds only: given for another, it is refused in
    one line naming the flag and the kinds that take it, and nothing is written."""
    folder, _ = torch_checkpoint
    out = tmp_path / "never"
    assert convert_cli.main([kind, "--checkpoint", str(folder / "tokenizer.bin"),
                             "--out", str(out), flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{flag.split('=')[0]} " in err and f"does not apply to {kind}" in err
    assert f"only {named} take it" in err
    assert not out.exists()
    with pytest.raises(Exception, match="does not apply"):
        loaders.load(str(folder / "tokenizer.bin"), kind="titok", pos_grid=16)


def test_gpt_ema_weights_need_a_training_checkpoint(torch_checkpoint, tmp_path, capsys):
    """--weights=ema picks the "ema" entry of a training checkpoint: a .safetensors holds one
    state_dict, and the flag was silently ignored (the model weights written)."""
    folder, _ = torch_checkpoint
    if not (folder / "model.safetensors").exists():
        pytest.skip("safetensors is not installed")
    assert convert_cli.main(["gpt", "--checkpoint", str(folder / "model.safetensors"),
                             "--out", str(tmp_path / "never"), "--weights=ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds one state_dict: weights='ema'" in err, err
    assert not (tmp_path / "never").exists()
