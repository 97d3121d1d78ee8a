"""TiTok parity with the official PyTorch modules (golden fixtures in titok.npz).

Each model is built from the configuration stored in the fixture, its official weights are
converted with `tok1d.weights.convert.titok`, and the stored intermediate and final outputs are
reproduced: codes exactly, floats to the fixture README's float32 bounds.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import params_from_fixture, rel_err
from tok1d.weights.convert import common
from tok1d.weights.convert import titok as titok_convert
from tok1d.models.tokenizers.titok import TiTok

TRANSFORMER_TOL = 2e-5
CNN_TOL = 1e-4
SOFTMAX_CNN_TOL = 3e-4


@pytest.fixture(scope="module")
def npz(fixtures_dir):
    path = os.path.join(fixtures_dir, "titok.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return np.load(path), path


def titok_models(z):
    """Names of the TiTok models a titok.npz-format file holds (`<m>/config` with a TiTok
    `model.vq_model`, stage 2's nested under `titok`)."""
    names = []
    for key in z.files:
        if key.endswith("/config") and key.count("/") == 1:
            config = json.loads(str(z[key]))
            if "vit_enc_model_size" in config.get("titok", config).get("model", {}).get(
                    "vq_model", {}):
                names.append(key[:-len("/config")])
    return names


def vq_config(z, name):
    config = json.loads(str(z[f"{name}/config"]))
    return config.get("titok", config)["model"]["vq_model"]


def build(npz, name, **overrides):
    z, path = npz
    meta = json.loads(str(z["meta"]))
    config = json.loads(str(z[f"{name}/config"]))
    kwargs = titok_convert.kwargs_from_official(config, size_tables=meta["size_tables_added"])
    kwargs.update(overrides)
    model = TiTok(**kwargs)
    sd = common.load_state_dict(path, prefix=f"{name}/sd/")
    params = titok_convert.convert_titok(sd, model)
    images = jnp.asarray(np.asarray(z["images"], np.float32).transpose(0, 2, 3, 1))
    return z, model, params, images


def tokens_first(x):
    """Official fake-2D (B, C, 1, N) -> (B, N, C)."""
    return np.asarray(x)[:, :, 0, :].transpose(0, 2, 1)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _apply(model, params, *args, method=None, **kw):
    with jax.default_matmul_precision("highest"):
        return model.apply({"params": params}, *args, method=method, **kw)


@pytest.mark.parametrize("scan", [True, False])
def test_vq_legacy_proxy_code_head(npz, scan):
    z, model, params, images = build(npz, "vq_legacy", scan=scan)
    assert model.legacy_reshape and model.decoder_head == "logits"  # what vq_legacy checks
    assert model.l2_norm == bool(vq_config(z, "vq_legacy").get("use_l2_norm", True))
    m = "vq_legacy/"
    z_q, aux = _apply(model, params, images, method=TiTok.encode_latents)
    z_cont = _apply(model, params, images,
                    method=lambda mdl, x: mdl.encoder(x, mdl.latent_tokens))
    assert rel_err(z_cont, tokens_first(z[m + "out/z_continuous"])) < TRANSFORMER_TOL
    np.testing.assert_array_equal(np.asarray(aux["codes"]), np.asarray(z[m + "out/codes"])[:, 0])
    assert rel_err(z_q, tokens_first(z[m + "out/z_quantized"])) < TRANSFORMER_TOL
    for key in ("quantizer_loss", "commitment_loss", "codebook_loss"):
        assert rel_err(aux[key], z[m + f"out/{key}"]) < 1e-5, key
    logits = _apply(model, params, z_q, method=TiTok.decode_latents)
    assert rel_err(nchw(logits), z[m + "out/decoder_logits"]) < TRANSFORMER_TOL
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1),
                                  np.asarray(z[m + "out/proxy_code_argmax"]))
    # decode_codes (the tokenizer's public decode path) agrees with decode(z_q).
    via_codes = _apply(model, params, aux["codes"], method=TiTok.decode_codes)
    np.testing.assert_allclose(via_codes, logits, atol=1e-5)


def test_vq_legacy_hooks(npz):
    """Stage by stage: ln_pre / transformer blocks / ln_post of encoder and decoder."""
    z, model, params, images = build(npz, "vq_legacy", scan=False)
    m = "vq_legacy/hook/"

    def encoder_trunk(mdl, x):
        enc = mdl.encoder
        return enc(x, mdl.latent_tokens)

    _, inter = _apply(model, params, images, method=encoder_trunk,
                      capture_intermediates=True, mutable=["intermediates"])
    inter = inter["intermediates"]["encoder"]
    hook_patch = np.asarray(inter["patch_embed"]["__call__"][0][:1])
    assert rel_err(nchw(hook_patch), z[m + "encoder.patch_embed"]) < CNN_TOL
    trunk = inter["trunk"]
    assert rel_err(trunk["ln_pre"]["__call__"][0][:1], z[m + "encoder.ln_pre"]) < TRANSFORMER_TOL
    for i in range(model.encoder_depth):
        got = np.asarray(trunk["transformer"][f"blocks_{i}"]["__call__"][0][:1])
        want = np.asarray(z[m + f"encoder.transformer.{i}"]).transpose(1, 0, 2)  # seq-first
        assert rel_err(got, want) < TRANSFORMER_TOL, i
    assert rel_err(trunk["ln_post"]["__call__"][0][:1], z[m + "encoder.ln_post"]) < TRANSFORMER_TOL


def test_probe_taps(npz):
    """`probe_features` of every model of the file that stores the hooks: "encoder" is the
    official encoder's `ln_post` output (image 0's hook), "encoder_tokens" the continuous
    latents before the quantizer (legacy reshape included)."""
    z = npz[0]
    names = [n for n in titok_models(z)
             if {f"{n}/hook/encoder.ln_post", f"{n}/out/z_continuous"} <= set(z.files)]
    if not names:
        pytest.skip("no model of the file stores the encoder's ln_post hook")
    for name in names:
        _, model, params, images = build(npz, name)
        feat = _apply(model, params, images, "encoder", method=TiTok.probe_features)
        assert feat.shape == (images.shape[0], model.num_latent_tokens, model.encoder_width)
        assert rel_err(feat[:1], z[f"{name}/hook/encoder.ln_post"]) < TRANSFORMER_TOL, name
        tokens = _apply(model, params, images, "encoder_tokens", method=TiTok.probe_features)
        assert rel_err(tokens, tokens_first(z[f"{name}/out/z_continuous"])) < TRANSFORMER_TOL
        with pytest.raises(ValueError, match="no probe tap 'decoder'"):
            _apply(model, params, images, "decoder", method=TiTok.probe_features)


def test_vq_pixel_head(npz):
    z, model, params, images = build(npz, "vq_pixel")
    assert not model.legacy_reshape and model.decoder_head == "pixels"  # what vq_pixel checks
    vq = vq_config(z, "vq_pixel")
    assert model.l2_norm == bool(vq.get("use_l2_norm", True))
    sizes = dict(titok_convert.OFFICIAL_SIZES, **json.loads(str(z["meta"]))["size_tables_added"])
    # Encoder and decoder widths from their own size names (they may differ, as in BL-64).
    assert model.encoder_width == sizes[vq["vit_enc_model_size"]]["width"]
    assert model.decoder_width == sizes[vq["vit_dec_model_size"]]["width"]
    m = "vq_pixel/"
    recon, aux = _apply(model, params, images)
    np.testing.assert_array_equal(np.asarray(aux.codes), np.asarray(z[m + "out/codes"])[:, 0])
    for key in ("quantizer_loss", "commitment_loss", "codebook_loss"):
        assert rel_err(aux.losses[key[:-5]], z[m + f"out/{key}"]) < 1e-5, key
    assert rel_err(nchw(recon), z[m + "out/decoder_pixels"]) < TRANSFORMER_TOL
    # The stored quantised latents decode to the stored pixels (no argmin in between).
    from_zq = _apply(model, params, jnp.asarray(tokens_first(z[m + "out/z_quantized"])),
                     method=TiTok.decode_latents)
    assert rel_err(nchw(from_zq), z[m + "out/decoder_pixels"]) < TRANSFORMER_TOL


def test_vae(npz):
    z, model, params, images = build(npz, "vae")
    assert model.quantizer == "vae" and model.num_codes is None
    m = "vae/"
    z_mean, aux = _apply(model, params, images, method=TiTok.encode_latents)
    moments = np.concatenate([aux["mean"], aux["logvar"]], -1)
    want_moments = tokens_first(z[m + "out/z_moments"])
    c = model.token_dim
    assert rel_err(moments[..., :c], want_moments[..., :c]) < TRANSFORMER_TOL
    assert rel_err(aux["logvar"], tokens_first(z[m + "out/logvar_clamped"])) < TRANSFORMER_TOL
    assert rel_err(aux["std"], tokens_first(z[m + "out/std"])) < TRANSFORMER_TOL
    assert rel_err(aux["kl_per_token"], z[m + "out/kl_per_sample"]) < TRANSFORMER_TOL
    np.testing.assert_allclose(float(aux["kl_loss"]),
                               float(np.sum(z[m + "out/kl_per_sample"])) / 2, rtol=1e-5)
    eps = tokens_first(np.asarray(z[m + "in/eps"], np.float32))
    sample = jnp.asarray(aux["mean"] + aux["std"] * eps)
    pixels = _apply(model, params, sample, method=TiTok.decode_latents)
    assert rel_err(nchw(pixels), z[m + "out/decoder_pixels_from_sample"]) < TRANSFORMER_TOL
    from_mean = _apply(model, params, z_mean[:1], method=TiTok.decode_latents)
    assert rel_err(nchw(from_mean), z[m + "hook/decoder_pixels_from_mean_img0"]) < TRANSFORMER_TOL
    # Sampling draws from the "sample" rng stream and differs from the mean.
    drawn, _ = _apply(model, params, images, True, method=TiTok.encode_latents,
                      rngs={"sample": jax.random.key(1)})
    assert not np.allclose(drawn, z_mean)


def test_stage2_pixel_decoder(npz):
    z, model, params, images = build(npz, "stage2")
    assert model.pixel_decoder and model.finetune_decoder
    m = "stage2/"
    pixels, aux = _apply(model, params, images)
    np.testing.assert_array_equal(np.asarray(aux.codes), np.asarray(z[m + "out/codes"])[:, 0])
    logits = _apply(model, params, images[:1],
                    method=lambda mdl, x: mdl.decoder(mdl.encode_latents(x)[0]))
    assert rel_err(nchw(logits), z[m + "hook/decoder_logits_img0"]) < TRANSFORMER_TOL
    assert rel_err(nchw(pixels), z[m + "out/pixels"]) < SOFTMAX_CNN_TOL
    # Stage 2 freezes the encoder side: its losses are zero and no gradient reaches it.
    assert float(aux.losses["quantizer"]) == 0.0
    grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, images)[0]))(params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0
               for g in jax.tree.leaves(grads["encoder"]) + [grads["latent_tokens"]])
    assert float(jnp.max(jnp.abs(grads["decoder"]["ffn_2"]["kernel"]))) > 0


@pytest.mark.parametrize("name", params_from_fixture("titok.npz", titok_models))
def test_infer_kwargs_matches_the_configs(npz, name):
    """Sizes read from the tensor shapes equal the ones the stored configs give (every TiTok
    model the file holds)."""
    z, path = npz
    meta = json.loads(str(z["meta"]))
    config = json.loads(str(z[f"{name}/config"]))
    from_config = titok_convert.kwargs_from_official(config, meta["size_tables_added"])
    inferred = titok_convert.infer_kwargs(common.load_state_dict(path, f"{name}/sd/"))
    for key, value in inferred.items():
        if key.endswith("_heads"):
            continue  # shapes cannot tell heads apart; official sizes use head dim 64
        assert from_config.get(key, getattr(TiTok, key, None)) == value, (name, key)


def test_conversion_errors_name_every_problem(npz):
    z, path = npz
    meta = json.loads(str(z["meta"]))
    config = json.loads(str(z["vq_legacy/config"]))
    model = TiTok(**titok_convert.kwargs_from_official(config, meta["size_tables_added"]))
    sd = common.load_state_dict(path, prefix="vq_legacy/sd/")
    sd["encoder.extra_thing"] = sd.pop("encoder.ln_post.bias")
    width, token_dim = sd["decoder.decoder_embed.weight"].shape  # nn.Linear (out, in)
    sd["decoder.decoder_embed.weight"] = np.zeros((width, token_dim + 1), np.float32)
    with pytest.raises(common.ConversionError) as e:
        titok_convert.convert_titok(sd, model)
    msg = str(e.value)
    assert "encoder.ln_post.bias" in msg and "encoder.extra_thing" in msg
    assert (f"decoder/decoder_embed/kernel: model expects {(token_dim, width)}" in msg
            and f"gives {(token_dim + 1, width)}" in msg), msg
