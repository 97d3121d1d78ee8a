"""MaskGIT-VQGAN port: parity with the official PyTorch model (golden fixture `titok.npz`, model
`maskgit_vqgan`), full-size parameter counts, and converter error reporting."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.weights.convert import common
from tok1d.weights.convert.vqgan import convert_maskgit_vqgan, kwargs_from_official
from tok1d.models.tokenizers.vqgan import MASKGIT_VQGAN_F16_256, MaskGITVQGAN, VQGANDecoder, VQGANEncoder

PREFIX = "maskgit_vqgan/"
TOL = 1e-4  # fixtures README §0: CNN outputs


def nhwc(x):
    return np.transpose(np.asarray(x, np.float32), (0, 2, 3, 1))


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    path = os.path.join(fixtures_dir, "titok.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    with np.load(path) as z:
        data = {k[len(PREFIX):]: z[k] for k in z.files if k.startswith(PREFIX)}
    data["path"] = path
    data["config"] = json.loads(str(data["config"]))
    return data


@pytest.fixture(scope="module")
def converted(fixture):
    model = MaskGITVQGAN(**kwargs_from_official(fixture["config"]))
    sd = common.load_state_dict(fixture["path"], prefix=PREFIX + "sd/")
    params = convert_maskgit_vqgan(sd, model)
    return model, {"params": params}, sd


@pytest.fixture(scope="module")
def run(converted, fixture):
    """The full model with hooks, `encode`, and decoding from the stored latents / codes
    (so decoder errors are not mixed with encoder errors)."""
    model, variables, _ = converted
    images = jnp.asarray(nhwc(fixture["in/images"]))
    z_q_ref = jnp.asarray(nhwc(fixture["out/z_quantized"]))
    codes_ref = jnp.asarray(fixture["out/codes"].astype(np.int32))

    @jax.jit
    def forward(variables, images, z_q_ref, codes_ref):
        (recon, aux), state = model.apply(variables, images, mutable=["intermediates"])
        z_q, _ = model.apply(variables, images, method=model.encode_latents)
        return dict(
            recon=recon, aux=aux, intermediates=state["intermediates"], z_q=z_q,
            from_zq=model.apply(variables, z_q_ref, method=model.decode_latents),
            from_codes=model.apply(variables, codes_ref, method=model.decode_codes))

    with jax.default_matmul_precision("highest"):
        out = forward(variables, images, z_q_ref, codes_ref)
    return jax.tree.map(np.asarray, out)


def test_config_from_fixture(fixture):
    cfg = fixture["config"]
    kw = kwargs_from_official(cfg)
    assert kw == dict(hidden_channels=cfg["vqgan"]["hidden_channels"],
                      channel_mult=tuple(cfg["vqgan"]["channel_mult"]),
                      num_res_blocks=cfg["vqgan"]["num_res_blocks"],
                      z_channels=cfg["vqgan"]["z_channels"], codebook_size=cfg["num_embeddings"])
    assert kwargs_from_official(None) == MASKGIT_VQGAN_F16_256
    assert kwargs_from_official({}) == MASKGIT_VQGAN_F16_256


def test_param_count_matches_fixture(converted):
    _, variables, sd = converted
    assert n_params(variables) == sum(int(np.prod(v.shape)) for v in sd.values())


def test_encoder_and_codes(run, fixture):
    aux = run["aux"]
    e = rel_err(aux.features["encoder_map"], nhwc(fixture["out/encoder_out"]))
    assert e < TOL, e
    codes = aux.codes
    b, h, w = codes.shape
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes.reshape(b, h * w), fixture["out/codes"])


def test_quantized_latents(run, fixture):
    e = rel_err(run["z_q"], nhwc(fixture["out/z_quantized"]))
    assert e < TOL, e


def test_decoder(run, fixture):
    ref = nhwc(fixture["out/decoder_out"])
    for name in ("from_zq", "from_codes", "recon"):
        e = rel_err(run[name], ref)
        assert e < TOL, (name, e)


def test_hooks(run, fixture):
    inter = run["intermediates"]
    hooks = {k[len("hook/"):]: v for k, v in fixture.items() if k.startswith("hook/")}
    assert hooks
    for name, ref in hooks.items():
        part, stage, idx = name.split(".")            # e.g. encoder.down.0 -> down_0
        got = inter[part][f"{stage}_{idx}"]["output"][0][:1]
        e = rel_err(got, nhwc(ref))
        assert e < TOL, (name, e)


def test_full_size_param_counts():
    model = MaskGITVQGAN()
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    params = nn.unbox(variables["params"])
    # Official counts (state_dict of maskgit-vqgan-imagenet-f16-256.bin).
    assert n_params(params["encoder"]) == 23_775_104
    assert n_params(params["decoder"]) == 30_478_339
    assert n_params(params["quantize"]) == 1024 * 256
    assert n_params(params) == 54_515_587
    out = jax.eval_shape(model.apply, variables, images)
    assert out[0].shape == (1, 256, 256, 3)
    assert out[1].codes.shape == (1, 16, 16)
    # The decoder alone (TiTok stage 2 reuses it as "pixel_decoder").
    kw = {k: v for k, v in MASKGIT_VQGAN_F16_256.items() if k != "codebook_size"}
    dec = VQGANDecoder(**kw)
    dvars = jax.eval_shape(dec.init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 16, 16, 256), jnp.float32))
    assert n_params(dvars) == 30_478_339
    enc = VQGANEncoder(**kw)
    evars = jax.eval_shape(enc.init, jax.random.key(0), images)
    assert n_params(evars) == 23_775_104


def test_shortcut_layout():
    """nin_shortcut only where channels change; decoder up levels stored 0..L-1."""
    variables = jax.eval_shape(MaskGITVQGAN().init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    p = nn.unbox(variables["params"])
    enc = {k for k, v in p["encoder"].items() if "nin_shortcut" in v.get("block_0", {})}
    dec = {k for k, v in p["decoder"].items() if "nin_shortcut" in v.get("block_0", {})}
    assert enc == {"down_2", "down_4"} and dec == {"up_1", "up_3"}
    assert p["decoder"]["up_1"]["block_0"]["conv1"]["kernel"].shape == (3, 3, 256, 128)
    assert "upsample_conv" not in p["decoder"]["up_0"]
    assert "bias" not in p["encoder"]["conv_in"]
    assert "bias" not in p["decoder"]["mid_0"]["conv1"]


def test_converter_reports_missing_and_unexpected(converted):
    model, _, sd = converted
    broken = dict(sd)
    del broken["decoder.up.1.block.0.nin_shortcut.weight"]
    broken["encoder.mid.0.conv1.weights"] = broken.pop("encoder.mid.0.conv1.weight")
    with pytest.raises(common.ConversionError) as info:
        convert_maskgit_vqgan(broken, model)
    msg = str(info.value)
    assert "decoder.up.1.block.0.nin_shortcut.weight" in msg
    assert "encoder.mid.0.conv1.weight" in msg          # missing
    assert "encoder.mid.0.conv1.weights" in msg         # unexpected


def test_converter_reports_shape_mismatch(converted):
    model, _, sd = converted
    broken = dict(sd)
    broken["quantize.embedding.weight"] = np.zeros((7, 3), np.float32)
    with pytest.raises(common.ConversionError, match="quantize/embedding"):
        convert_maskgit_vqgan(broken, model)
