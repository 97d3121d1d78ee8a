"""GigaTok's 1D Q-Former encoder and 1D->2D Q-Former decoder against the official modules
(gigatok_1d.npz), stage by stage from the fixture's own stored inputs: the CNN map -> tokens,
the post-quant tokens -> the decoder grid, the semantic-regularisation features."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.weights.convert import common
from tok1d.weights.convert import gigatok as convert_gigatok
from tok1d.models.tokenizers.gigatok import QFormerDecoder, QFormerEncoder, VIT_SIZES

TOL = 2e-5


def load(fixtures_dir, name):
    """(arrays, official init_args, ViT size table incl. the fixture's sizes, state_dict)."""
    path = os.path.join(fixtures_dir, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    z = np.load(path)
    meta = json.loads(str(z["meta_json"]))
    sizes = dict(VIT_SIZES)
    for size, s in meta.get("size_tables_added", {}).items():
        sizes[size] = dict(width=s["width"], depth=s["num_layers"], num_heads=s["num_heads"])
    sd = common.StateDict(common.load_state_dict(path, prefix="sd/"), name)
    return z, meta["init_args"], sizes, sd


def distill_depth(args):
    """The semantic-regularisation tap (0 / None upstream: no distill MLP)."""
    return args.get("distill_depth") or 0


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return load(fixtures_dir, "gigatok_1d.npz")


def test_encoder(fx):
    z, args, sizes, sd = fx
    s = sizes[args["encoder_size"]]
    enc = QFormerEncoder(s["width"], s["depth"], s["num_heads"], args["num_latent_tokens"],
                         multi_level_query_init=args["multi_level_query_init"])
    cnn = jnp.asarray(np.asarray(z["enc/cnn_out"], np.float32).transpose(0, 2, 3, 1))
    out = common.ParamTree()
    convert_gigatok.convert_qformer_encoder(sd, out, "s2to1encoder", "", s["depth"],
                                            s["num_heads"])
    params = out.tree[""]
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), cnn)["params"])
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
    with jax.default_matmul_precision("highest"):
        (tokens, feat), inter = enc.apply({"params": params}, cnn, mutable=["intermediates"])
    assert rel_err(tokens, np.asarray(z["enc/vit_out"])[:, :, 0, :].transpose(0, 2, 1)) < TOL
    assert rel_err(feat, np.asarray(z["enc/vit_feat_ln_post"])[:, :, 0, :].transpose(0, 2, 1)) < TOL
    queries = inter["intermediates"]["queries"][0]
    assert rel_err(queries[:1], np.asarray(z["hook/s2to1encoder.global_proj"]).transpose(1, 0, 2)) < TOL


def test_decoder_and_semantic_head(fx):
    z, args, sizes, sd = fx
    s = sizes[args["decoder_size"]]
    grid = z["dec/vit_out"].shape[-1]
    distill = distill_depth(args)
    dec = QFormerDecoder(s["width"], s["depth"], s["num_heads"], args["num_latent_tokens"], grid,
                         distill_depth=distill, out_inner_dim=args["out_inner_dim"])
    post = jnp.asarray(np.asarray(z["dec/post_quant"])[:, :, 0, :].transpose(0, 2, 1))
    out = common.ParamTree()
    convert_gigatok.convert_qformer_decoder(sd, out, "s1to2decoder", "", s["depth"],
                                            s["num_heads"], distill=distill > 0)
    params = out.tree[""]
    abstract = nn.unbox(jax.eval_shape(dec.init, jax.random.key(0), post)["params"])
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
    with jax.default_matmul_precision("highest"):
        rec, inner, layer_feat = dec.apply({"params": params}, post)
    assert rel_err(rec, np.asarray(z["dec/vit_out"]).transpose(0, 2, 3, 1)) < TOL
    if distill:
        assert rel_err(inner, z["sem/distill_mlp_out"]) < TOL
        assert rel_err(layer_feat, z["sem/decoder_layer_feat"]) < TOL


def test_multi_level_query_groups():
    from tok1d.models.tokenizers.gigatok import multi_level_queries
    grid = jnp.arange(4 * 8, dtype=jnp.float32).reshape(1, 4, 8, 1)
    q = np.asarray(multi_level_queries(grid, 8))[0, :, 0]
    g = np.arange(32, dtype=np.float32).reshape(4, 8)
    want = [g.mean(), g.mean(), g[:, :4].mean(), g[:, 4:].mean(),
            g[:2, :4].mean(), g[:2, 4:].mean(), g[2:, :4].mean(), g[2:, 4:].mean()]
    np.testing.assert_allclose(q, want)


@pytest.fixture(scope="module")
def fx2d(fixtures_dir):
    return load(fixtures_dir, "gigatok_2d.npz")


def test_2d_encoder_and_decoder(fx2d):
    from tok1d.models.tokenizers.gigatok import LAYER_TYPES_2D, ViT2DDecoder, ViT2DEncoder
    z, args, sizes, sd = fx2d
    # The block type the file's config names (the official 2D default when it names none).
    official = args.get("transformer_layer_type") or "TransformerDecoderLayer"
    assert official in LAYER_TYPES_2D, f"2D transformer_layer_type {official!r} is not ported"
    layer_type = LAYER_TYPES_2D[official]
    se, sdec = sizes[args["encoder_size"]], sizes[args["decoder_size"]]
    enc = ViT2DEncoder(se["width"], se["depth"], se["num_heads"], layer_type=layer_type)
    grid = z["dec/vit_out"].shape[-1]
    distill = distill_depth(args)
    dec = ViT2DDecoder(sdec["width"], sdec["depth"], sdec["num_heads"], grid,
                       distill_depth=distill, out_inner_dim=args["out_inner_dim"],
                       layer_type=layer_type)
    out = common.ParamTree()
    convert_gigatok.convert_vit2d(sd, out, "s2dencoder", "enc", se["depth"], se["num_heads"],
                                  "encoder", layer_type=layer_type)
    convert_gigatok.convert_vit2d(sd, out, "s2ddecoder", "dec", sdec["depth"],
                                  sdec["num_heads"], "decoder", distill=distill > 0,
                                  layer_type=layer_type)
    cnn = jnp.asarray(np.asarray(z["enc/cnn_out"], np.float32).transpose(0, 2, 3, 1))
    post = np.asarray(z["dec/post_quant"])
    post = jnp.asarray(post.reshape(post.shape[0], post.shape[1], -1).transpose(0, 2, 1))
    for module, params, x in ((enc, out.tree["enc"], cnn), (dec, out.tree["dec"], post)):
        abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
        assert (jax.tree.map(lambda a: a.shape, abstract)
                == jax.tree.map(lambda a: a.shape, params))
    with jax.default_matmul_precision("highest"):
        tokens, feat = enc.apply({"params": out.tree["enc"]}, cnn)
        rec, inner, _ = dec.apply({"params": out.tree["dec"]}, post)
    b, g = tokens.shape[0], grid
    assert rel_err(tokens.reshape(b, g, g, -1), np.asarray(z["enc/vit_out"]).transpose(0, 2, 3, 1)) < TOL
    assert rel_err(feat.reshape(b, g, g, -1),
                   np.asarray(z["enc/vit_feat_ln_post"]).transpose(0, 2, 3, 1)) < TOL
    assert rel_err(rec, np.asarray(z["dec/vit_out"]).transpose(0, 2, 3, 1)) < TOL
    if distill:
        assert rel_err(inner, z["sem/distill_mlp_out"]) < TOL
