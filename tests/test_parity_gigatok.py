"""The whole GigaTok tokenizer (1D and 2D) against the official modules: built from the config
stored in the fixture, official weights converted, then images -> codes -> pixels and the
training forward (rotation-trick latents, shortcut pixels, feature reconstruction, semantic
features and the projection loss against a stand-in teacher)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d import models
from tok1d.weights.convert import common
from tok1d.weights.convert import gigatok as convert_gigatok
from tok1d.models.tokenizers.gigatok import GigaTok


def nhwc(x):
    return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["gigatok_1d.npz", "gigatok_2d.npz"])
def built(request, fixtures_dir):
    path = os.path.join(fixtures_dir, request.param)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    z = np.load(path)
    meta = json.loads(str(z["meta_json"]))
    images = nhwc(z["input/images"])
    kwargs = convert_gigatok.kwargs_from_official(
        meta["init_args"], meta.get("size_tables_added"), meta.get("ctor_patches"),
        image_size=images.shape[1], layout=meta["variant"])
    model = GigaTok(**kwargs)
    params = convert_gigatok.convert_gigatok(common.load_state_dict(path, prefix="sd/"), model)
    return z, meta, model, params, jnp.asarray(images)


def _apply(model, params, *args, **kw):
    with jax.default_matmul_precision("highest"):
        return model.apply({"params": params}, *args, **kw)


def test_codes_and_eval_pixels(built):
    z, meta, model, params, images = built
    z_q, aux = _apply(model, params, images, method=GigaTok.encode_latents)
    b = images.shape[0]
    np.testing.assert_array_equal(np.asarray(aux["codes"]).reshape(b, -1),
                                  np.asarray(z["quant/indices"]).reshape(b, -1))
    assert rel_err(aux["cnn_map"], nhwc(z["enc/cnn_out"])) < 1e-4
    pixels = _apply(model, params, aux["codes"], method=GigaTok.decode_codes)
    assert rel_err(pixels, nhwc(z["dec/pixels"])) < 1e-4


def test_training_forward(built):
    z, meta, model, params, images = built
    pixels, aux = _apply(model, params, images, train=True)
    assert rel_err(pixels, nhwc(z["train/pixels"])) < 3e-4
    assert rel_err(aux.features["shortcut_pixels"], nhwc(z["train/shortcut_pixels"])) < 3e-4
    assert rel_err(aux.losses["fea_rec"], z["train/fea_rec_loss"]) < 1e-4
    assert rel_err(aux.losses["codebook"], z["train/vq_loss"]) < 1e-5
    assert rel_err(aux.losses["commitment"], z["train/commit_loss"]) < 1e-5
    ratio = meta["init_args"]["entropy_loss_ratio"]
    assert rel_err(ratio * aux.losses["entropy"], z["train/entropy_loss"]) < 1e-5
    if not meta["init_args"].get("distill_depth"):
        return  # no semantic-regularisation head: no features, no projection loss
    assert rel_err(aux.features["semantic_features"], z["train/inner_feat"]) < 2e-5
    # The official projection loss on a stand-in teacher: mean over tokens of -cos.
    teacher = np.asarray(z["train/fake_teacher"], np.float32)
    feat = np.asarray(aux.features["semantic_features"], np.float64)
    cos = np.sum(feat * teacher, -1) / (np.linalg.norm(feat, axis=-1)
                                        * np.linalg.norm(teacher, axis=-1))
    assert rel_err(-np.mean(cos), z["train/proj_loss"]) < 1e-5


def test_the_tokenizer_linear_probes_features(built):
    """`probe_features` end to end from the images: the official encoder's `return_feat`
    (after ln_post) and `--fix-dim` (after conv_out) features, and with a semantic head the
    decoder's `return_feat` queries (the fixture decodes the codebook lookup; tok1d the
    rotation-trick latents, equal to ~4e-6)."""
    z, meta, model, params, images = built
    b = images.shape[0]

    def tokens_last(x):  # official (B, D, 1, N) or (B, D, h, w) -> (B, L, D)
        x = np.asarray(x, np.float32)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)

    feat = _apply(model, params, images, "encoder", method=GigaTok.probe_features)
    assert rel_err(feat, tokens_last(z["enc/vit_feat_ln_post"])) < 1e-4
    tokens = _apply(model, params, images, "encoder_tokens", method=GigaTok.probe_features)
    assert rel_err(tokens, tokens_last(z["enc/vit_out"])) < 1e-4
    assert feat.shape[:2] == tokens.shape[:2] == (b, model.num_latent_tokens
                                                  if model.layout == "1d" else model.grid_size ** 2)
    if model.distill_depth:  # the 2D fixture stores none (upstream's 2D model fails on it)
        dec = _apply(model, params, images, "decoder", method=GigaTok.probe_features)
        assert dec.shape == (b, model.grid_size ** 2, model.decoder_width)
        if "sem/decoder_layer_feat" in z.files:
            assert rel_err(dec, z["sem/decoder_layer_feat"]) < 1e-4
    else:
        with pytest.raises(ValueError, match="distill_depth"):
            _apply(model, params, images, "decoder", method=GigaTok.probe_features)
    with pytest.raises(ValueError, match="no probe tap 'pixels'"):
        _apply(model, params, images, "pixels", method=GigaTok.probe_features)


def test_the_fsdp_trainers_weight_decay_rule_on_the_official_names(built):
    """decay_mask "no_norm" is GigaTok's FSDP trainer's rule (decay a parameter whose official
    name lacks "norm"): it selects exactly the tok1d leaves of those official tensors, in the
    1D model (Q-Former layers' norm1-3, ln_pre / ln_post decayed) and the 2D one (its layers'
    norm1 / norm2 are tok1d's ln_1 / ln_2)."""
    import train_parity as tp
    from tok1d.train import optim
    z, meta, model, params, images = built
    sd = common.load_state_dict(z.fid.name, prefix="sd/")
    keys = [k for k in sd if np.asarray(sd[k]).dtype.kind == "f"]
    tmap = tp.TensorMap(lambda s: convert_gigatok.convert_gigatok(s, model), sd, keys)

    def leaves(names):
        out = set()
        for key in names:
            for path, m in jax.tree_util.tree_flatten_with_path(
                    tmap.masks[key], is_leaf=lambda x: x is None)[0]:
                if m is not None:
                    out.add(jax.tree_util.keystr(path))
        return out

    decayed = {jax.tree_util.keystr(path) for path, on in
               jax.tree_util.tree_flatten_with_path(optim.decay_mask(params, "no_norm"))[0]
               if on}
    assert decayed == leaves(k for k in keys if "norm" not in k)
    assert leaves(k for k in keys if "norm" in k)  # some are exempt


def test_a_checkpoint_of_another_size_is_one_error_naming_the_models_sizes(built, fixtures_dir):
    """The tiny official file converted into the B-L preset (`tok1d convert --from gigatok_b_l`
    with a file of another size): one short ConversionError naming both sizes (it was the
    start of a list of every missing key, cut at 2,000 characters)."""
    z, meta, model, _, _ = built
    big = models.create("gigatok", preset="b_l", layout=model.layout, image_size=256)
    if (model.encoder_width, model.encoder_depth) == (big.encoder_width, big.encoder_depth):
        pytest.skip("the fixture already has B-L's encoder")
    path = os.path.join(fixtures_dir, "gigatok_1d.npz" if model.layout == "1d"
                        else "gigatok_2d.npz")
    sd = common.load_state_dict(path, prefix="sd/")
    layout = model.layout.upper()
    with pytest.raises(common.ConversionError) as e:
        convert_gigatok.convert_gigatok(sd, big, what="the file")
    assert str(e.value) == (
        f"the file is a GigaTok of another size: the file's is {layout}, encoder width "
        f"{model.encoder_width} depth {model.encoder_depth}, decoder width "
        f"{model.decoder_width} depth {model.decoder_depth}; the model's (its preset or "
        f"config) {layout}, encoder width {big.encoder_width} depth {big.encoder_depth}, "
        f"decoder width {big.decoder_width} depth {big.decoder_depth}.")
    # Sizes that agree but another tensor that does not: the tensor is named.
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:, :1]
    with pytest.raises(common.ConversionError, match=(
            r"^the file does not match the model:\n  shape mismatches \(1\): quant_conv")):
        convert_gigatok.convert_gigatok(sd, model, what="the file")
