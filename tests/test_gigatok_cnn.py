"""GigaTok CNN encoder / decoder (tok1d.models.tokenizers.gigatok_cnn) against the official PyTorch
modules' golden outputs (gigatok_1d.npz, gigatok_2d.npz), through the checkpoint converter."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.weights.convert.common import ConversionError
from tok1d.weights.convert.gigatok_cnn import convert_cnn_decoder_only, convert_cnn_encoder_only
from tok1d.models.tokenizers.gigatok_cnn import GIGATOK_CNN_256, GigaTokCNNDecoder, GigaTokCNNEncoder, depth_to_space_dcr, init_shapes

CNN_TOL = 1e-4        # README §0: CNN outputs
ROT_TOL = 3e-4        # README §0: train/*pixels


def _nchw(x):  # NHWC -> NCHW
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x):
    return jnp.asarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def _num_res_blocks(sd):
    """Res blocks per encoder level (the decoder has one more), counted in the state dict: a
    constructor default upstream, not a config field."""
    n = 0
    while f"encoder.conv_blocks.0.res.{n}.conv1.weight" in sd:
        n += 1
    assert f"decoder.conv_blocks.0.res.{n}.conv1.weight" in sd
    assert f"decoder.conv_blocks.0.res.{n + 1}.conv1.weight" not in sd
    return n


def _models(meta, sd):
    args, patches = meta["init_args"], meta["ctor_patches"]
    common = dict(num_res_blocks=_num_res_blocks(sd), z_channels=int(args["z_channels"]),
                  use_attn=bool(args["use_attn"]))
    enc = GigaTokCNNEncoder(ch=int(patches["Encoder.ch"]),
                            ch_mult=tuple(args["encoder_ch_mult"]), **common)
    dec = GigaTokCNNDecoder(ch=int(patches["Decoder.ch"]),
                            ch_mult=tuple(args["decoder_ch_mult"]),
                            adaptive_gn=bool(args["adaptive_gn"]), d2s_up=bool(args["d2s_up"]),
                            **common)
    return enc, dec


def _hooks(z, part):
    """The file's hooks of the CNN `part` ("encoder" / "decoder"): {module name: image-0 NCHW
    output}, e.g. "decoder.adaptive.0"."""
    return {k[len("hook/"):]: v for k, v in z.items() if k.startswith(f"hook/{part}.")}


def _captured(intermediates, name):
    """The sown output of the official module `name`: "decoder.conv_blocks.0.upsample" ->
    intermediates["conv_blocks_0"]["upsample"]["output"][0]."""
    path = []
    for part in name.split(".")[1:]:
        if part.isdigit():
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    node = intermediates
    for part in path:
        assert part in node, (name, part, sorted(node))
        node = node[part]
    return node["output"][0]


@pytest.fixture(scope="module", params=["gigatok_1d.npz", "gigatok_2d.npz"])
def case(request, fixtures_dir):
    path = os.path.join(fixtures_dir, request.param)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    z = dict(np.load(path))
    meta = json.loads(str(z["meta_json"]))
    sd = {k[3:]: v for k, v in z.items() if k.startswith("sd/")}
    enc, dec = _models(meta, sd)
    enc_params = convert_cnn_encoder_only(sd, enc)
    dec_params = convert_cnn_decoder_only(sd, dec)
    return z, enc, dec, enc_params, dec_params


def test_encoder_matches_official(case):
    z, enc, _, params, _ = case
    images = _nhwc(z["input/images"])
    with jax.default_matmul_precision("highest"):
        out, state = jax.jit(lambda p, x: enc.apply({"params": p}, x, mutable=["intermediates"])
                             )(params, images)
    inter = state["intermediates"]
    e = rel_err(_nchw(out), z["enc/cnn_out"])
    assert e < CNN_TOL, e
    hooks = _hooks(z, "encoder")
    assert hooks
    for name, want in hooks.items():
        e = rel_err(_nchw(_captured(inter, name)[:1]), want)
        assert e < CNN_TOL, (name, e)


@pytest.mark.parametrize("source,target,tol", [("dec/vit_out", "dec/pixels", CNN_TOL),
                                               ("enc/cnn_out", "train/shortcut_pixels",
                                                ROT_TOL)])
def test_decoder_matches_official(case, source, target, tol):
    z, _, dec, _, params = case
    with jax.default_matmul_precision("highest"):
        out, state = jax.jit(lambda p, x: dec.apply({"params": p}, x, mutable=["intermediates"])
                             )(params, _nhwc(z[source]))
    e = rel_err(_nchw(out), z[target])
    assert e < tol, (target, e)
    if source == "dec/vit_out":  # the hooks were recorded on the eval decode
        hooks = _hooks(z, "decoder")
        assert hooks
        for name, want in hooks.items():
            e = rel_err(_nchw(_captured(state["intermediates"], name)[:1]), want)
            assert e < CNN_TOL, (name, e)


def test_converter_reports_problems(case):
    z, enc, _, _, _ = case
    sd = {k[3:]: v for k, v in z.items() if k.startswith("sd/encoder.")}
    del sd["encoder.conv_out.bias"]
    sd["encoder.extra.weight"] = np.zeros(3, np.float16)
    with pytest.raises(ConversionError, match="conv_out.bias.*\n.*encoder.extra.weight"):
        convert_cnn_encoder_only(sd, enc)


def test_depth_to_space_is_dcr():
    c, h, w = 3, 2, 5
    x = np.arange(4 * c * h * w, dtype=np.float32).reshape(1, 4 * c, h, w)   # NCHW
    out = _nchw(depth_to_space_dcr(_nhwc(x), 2))
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(out[0, :, i::2, j::2], x[0, (2 * i + j) * c:
                                                                (2 * i + j + 1) * c])


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_parameter_counts():
    """gigatok.md §1.10: 26.14M (CNN encoder) and 50.16M (CNN decoder) in every config; the
    nearest-neighbour up-sampler variant (d2s_up False) has 1/4 of the up-sampling weights."""
    enc = GigaTokCNNEncoder(**GIGATOK_CNN_256)
    dec = GigaTokCNNDecoder(**GIGATOK_CNN_256)
    n_enc = _count(init_shapes(enc, 16)["params"])
    n_dec = _count(init_shapes(dec, 1, 256)["params"])
    assert round(n_enc / 1e6, 2) == 26.14, n_enc
    assert round(n_dec / 1e6, 2) == 50.16, n_dec
    params = nn.unbox(init_shapes(dec, 1, 256)["params"])
    assert params["conv_blocks_0"]["upsample"]["conv1"]["kernel"].shape == (3, 3, 512, 2048)
    assert params["adaptive_4"]["gamma"]["kernel"].shape == (256, 128)
    assert "nin_shortcut" in params["conv_blocks_1"]["res_0"]
    assert "nin_shortcut" not in params["conv_blocks_0"]["res_0"]
    nearest = GigaTokCNNDecoder(**GIGATOK_CNN_256, d2s_up=False)
    p2 = nn.unbox(init_shapes(nearest, 1, 256)["params"])
    assert p2["conv_blocks_0"]["upsample"]["conv"]["kernel"].shape == (3, 3, 512, 512)


KEYS_TSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
                        "shared", "research", "gigatok_bl256_state_dict_keys.tsv")


@pytest.mark.skipif(not os.path.exists(KEYS_TSV), reason="released key list not present")
def test_converter_covers_released_keys():
    """Every `encoder.*` / `decoder.*` key of the released VQ_BL256 checkpoint (names and shapes
    from the research notes; zero-filled) is consumed and fits the full-size models."""
    sd = {}
    with open(KEYS_TSV) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0].startswith(("encoder.", "decoder.")):
                shape = tuple(int(d) for d in parts[1].strip("()").split(",") if d.strip())
                sd[parts[0]] = np.zeros(shape, np.float16)
    assert sd
    enc = convert_cnn_encoder_only(sd, GigaTokCNNEncoder(**GIGATOK_CNN_256))
    dec = convert_cnn_decoder_only(sd, GigaTokCNNDecoder(**GIGATOK_CNN_256))
    n = sum(v.size for v in sd.values())
    assert _count(enc) + _count(dec) == n
