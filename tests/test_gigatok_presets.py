"""GigaTok's released sizes: parameter counts of every preset equal the official ones exactly,
the released B-L state_dict key list converts completely (shapes only: no weights here), and
the S-S 2D tokenizer (DETR-style `TransformerDecoderLayer` blocks) converts from its official
key names: a lossless round trip with random weights, the complete key list, and the forward
against a NumPy transcription of the official layer."""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, rel_err

from tok1d import models
from tok1d.weights.convert import common
from tok1d.weights.convert import gigatok as convert_gigatok
from tok1d.models.tokenizers.gigatok import GigaTok, ViT2DDecoder, ViT2DEncoder

# Counted by instantiating the official classes (VQVitModelPlus / VQVitModel2DPlus with
# configs/vq/*.yaml; the `quantize.codebook_used` logging buffer is not a parameter).
OFFICIAL_COUNTS = {"s_s": 136_073_227, "s_b": 232_399_627, "b_l": 621_637_131,
                   "xl_xxl": 2_893_970_443, "s_s_2d": 135_548_427, "s_b_2d": 197_132_555,
                   "b_l_2d": 491_410_187}
# VQ_SS256_2d by part: s2dencoder, s2ddecoder without / only its distill MLP.
SS2D_ENCODER, SS2D_DECODER, SS2D_DISTILL = 25_619_712, 26_668_288, 6_820_608
KEYS = os.path.join(REPO, "..", "shared", "research", "gigatok_bl256_state_dict_keys.tsv")

# VQ_SS256_2d's init_args (configs/vq/VQ_SS256_2d.yaml, model_cls VQVitModel2DPlus): no
# `transformer_layer_type`, so the dataclass default TransformerDecoderLayer applies.
SS2D_INIT_ARGS = dict(
    codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
    commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=[1, 1, 2, 2, 4],
    decoder_ch_mult=[1, 1, 2, 2, 4], model_size=None, encoder_size="small",
    decoder_size="small", num_latent_tokens=256, z_channels=256, dropout_p=0.0,
    adaptive_gn=True, d2s_up=True, rot=True, use_attn=False, fea_rec_loss_type="mse",
    fea_rec_loss_weight=1.0, distill_depth=3)


def abstract_params(model):
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset", sorted(OFFICIAL_COUNTS))
def test_parameter_counts(preset):
    model = models.create("gigatok", preset=preset)
    assert count(abstract_params(model)) == OFFICIAL_COUNTS[preset]


def test_s_s_2d_parameter_count_by_part():
    params = abstract_params(models.create("gigatok", preset="s_s_2d"))
    assert count(params["vit_encoder"]) == SS2D_ENCODER
    assert count(params["vit_decoder"]["distill_mlp"]) == SS2D_DISTILL
    assert count(params["vit_decoder"]) == SS2D_DECODER + SS2D_DISTILL


def read_key_list(path):
    """{key: zero array of the listed shape (a broadcast view: no memory)} from a key TSV."""
    sd = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                shape = tuple(int(x) for x in re.findall(r"\d+", parts[1]))
                sd[parts[0]] = np.broadcast_to(np.zeros((), np.dtype(parts[2])), shape)
    return sd


def test_released_b_l_key_list_converts():
    if not os.path.exists(KEYS):
        pytest.skip(f"{KEYS} not found")
    model = models.create("gigatok", preset="b_l")
    params = convert_gigatok.convert_gigatok(read_key_list(KEYS), model, what="VQ_BL256")
    assert count(params) == OFFICIAL_COUNTS["b_l"]


# --------------------------------------------------------------------------- S-S 2D

def detr_half_shapes(src, part, width, depth, z, grid, distill_dim=None):
    """Key -> shape of an official 2D half (`ViTEncoder2D` / `ViTDecoder2D`) built with
    `TransformerDecoderLayer` blocks, as its state_dict lists them."""
    w, f = width, 4 * width
    shapes = {f"{src}.positional_embedding": (grid * grid, 1, w),
              f"{src}.{part}_embed.weight": (w, z), f"{src}.{part}_embed.bias": (w,),
              f"{src}.ln_pre.weight": (z,), f"{src}.ln_pre.bias": (z,),
              f"{src}.ln_post.weight": (w,), f"{src}.ln_post.bias": (w,),
              f"{src}.conv_out.weight": (z, w) + ((1, 1) if part == "encoder" else (3, 3)),
              f"{src}.conv_out.bias": (z,)}
    for i in range(depth):
        p = f"{src}.transformer.{i}"
        for attn in ("self_attn", "multihead_attn"):
            shapes.update({f"{p}.{attn}.in_proj_weight": (3 * w, w),
                           f"{p}.{attn}.in_proj_bias": (3 * w,),
                           f"{p}.{attn}.out_proj.weight": (w, w),
                           f"{p}.{attn}.out_proj.bias": (w,)})
        shapes.update({f"{p}.linear1.weight": (f, w), f"{p}.linear1.bias": (f,),
                       f"{p}.linear2.weight": (w, f), f"{p}.linear2.bias": (w,)})
        for n in ("norm1", "norm2", "norm3"):
            shapes.update({f"{p}.{n}.weight": (w,), f"{p}.{n}.bias": (w,)})
    if distill_dim:
        for idx, (fan_out, fan_in) in ((0, (f, w)), (2, (f, f)), (4, (distill_dim, f))):
            shapes[f"{src}.distill_mlp.{idx}.weight"] = (fan_out, fan_in)
            shapes[f"{src}.distill_mlp.{idx}.bias"] = (fan_out,)
    return shapes


def random_state_dict(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def to_official(tree, src, part):
    """Inverse of the converter for a 2D DETR half: tok1d params -> official state_dict."""
    sd = {}
    lin = lambda node, key: sd.update({f"{key}.weight": node["kernel"].T,  # noqa: E731
                                       f"{key}.bias": node["bias"]})
    ln = lambda node, key: sd.update({f"{key}.weight": node["norm"]["scale"],  # noqa: E731
                                      f"{key}.bias": node["norm"]["bias"]})
    pos = tree["positional_embedding"]
    sd[f"{src}.positional_embedding"] = pos.reshape(pos.shape[0], 1, pos.shape[1])
    lin(tree[f"{part}_embed"], f"{src}.{part}_embed")
    ln(tree["ln_pre"], f"{src}.ln_pre")
    ln(tree["ln_post"], f"{src}.ln_post")
    kernel = tree["conv_out"]["kernel"]
    sd[f"{src}.conv_out.weight"] = (kernel.T[:, :, None, None] if kernel.ndim == 2
                                    else kernel.transpose(3, 2, 0, 1))
    sd[f"{src}.conv_out.bias"] = tree["conv_out"]["bias"]
    i = 0
    while f"layer_{i}" in tree:
        layer, p = tree[f"layer_{i}"], f"{src}.transformer.{i}"
        for ours, theirs in (("self_attn", "self_attn"), ("cross_attn", "multihead_attn")):
            a = layer[ours]
            width = a["query"]["kernel"].shape[0]
            sd[f"{p}.{theirs}.in_proj_weight"] = np.concatenate(
                [a[n]["kernel"].reshape(width, width).T for n in ("query", "key", "value")])
            sd[f"{p}.{theirs}.in_proj_bias"] = np.concatenate(
                [a[n]["bias"].reshape(width) for n in ("query", "key", "value")])
            sd[f"{p}.{theirs}.out_proj.weight"] = a["out"]["kernel"].reshape(width, width).T
            sd[f"{p}.{theirs}.out_proj.bias"] = a["out"]["bias"]
        lin(layer["mlp"]["fc1"], f"{p}.linear1")
        lin(layer["mlp"]["fc2"], f"{p}.linear2")
        for n in ("norm1", "norm2", "norm3"):
            ln(layer[n], f"{p}.{n}")
        i += 1
    if "distill_mlp" in tree:
        for ours, theirs in (("fc_0", 0), ("fc_1", 2), ("fc_2", 4)):
            lin(tree["distill_mlp"][ours], f"{src}.distill_mlp.{theirs}")
    return sd


def ss2d_half(part):
    """(official prefix, shapes at the released S-S 2D size, the matching tok1d module, its
    input): small = width 512, 6 layers, 8 heads; z 256 on a 16x16 grid."""
    if part == "encoder":
        return ("s2dencoder", detr_half_shapes("s2dencoder", part, 512, 6, 256, 16),
                ViT2DEncoder(512, 6, 8, layer_type="detr"),
                jax.ShapeDtypeStruct((1, 16, 16, 256), jnp.float32))
    return ("s2ddecoder", detr_half_shapes("s2ddecoder", part, 512, 6, 256, 16, 768),
            ViT2DDecoder(512, 6, 8, 16, distill_depth=3, out_inner_dim=768, layer_type="detr"),
            jax.ShapeDtypeStruct((1, 256, 256), jnp.float32))


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_s_s_2d_half_round_trip(part):
    src, shapes, module, x = ss2d_half(part)
    want = SS2D_ENCODER if part == "encoder" else SS2D_DECODER + SS2D_DISTILL
    assert sum(map(math.prod, shapes.values())) == want
    sd = random_state_dict(shapes, seed=len(part))
    reader, out = common.StateDict(sd, src), common.ParamTree()
    convert_gigatok.convert_vit2d(reader, out, src, "half", 6, 8, part,
                                  distill=part == "decoder", layer_type="detr")
    assert not reader.missing and not reader.unused()
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    assert (jax.tree.map(lambda a: tuple(a.shape), out.tree["half"])
            == jax.tree.map(lambda a: tuple(a.shape), abstract))
    back = to_official(out.tree["half"], src, part)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_released_s_s_2d_key_list_converts():
    """The complete VQ_SS256_2d key list (CNN, quantizer and 1x1 convs shared with every
    release, read from the B-L list) converts into the `s_s_2d` preset."""
    if not os.path.exists(KEYS):
        pytest.skip(f"{KEYS} not found")
    sd = {k: v for k, v in read_key_list(KEYS).items()
          if not k.startswith(("s2to1encoder.", "s1to2decoder."))}
    for part in ("encoder", "decoder"):
        src, shapes, _, _ = ss2d_half(part)
        sd.update({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()})
    model = models.create("gigatok", preset="s_s_2d")
    params = convert_gigatok.convert_gigatok(sd, model, what="VQ_SS256_2d")
    assert count(params) == OFFICIAL_COUNTS["s_s_2d"]


def test_s_s_2d_official_config():
    cfg = {"model": {"model_cls": "VQVitModel2DPlus", "init_args": dict(SS2D_INIT_ARGS)}}
    layout = convert_gigatok.layout_from_config(cfg)
    assert layout == "2d"
    kwargs = convert_gigatok.kwargs_from_official(SS2D_INIT_ARGS, layout=layout)
    assert kwargs["layer_type"] == "detr"
    got, want = models.create("gigatok", **kwargs), models.create("gigatok", preset="s_s_2d")
    assert got == want
    explicit = dict(SS2D_INIT_ARGS, transformer_layer_type="TransformerLayer")
    assert convert_gigatok.kwargs_from_official(explicit)["layer_type"] == "vit"
    with pytest.raises(common.ConversionError, match="QformerLayerVar"):
        convert_gigatok.kwargs_from_official(
            dict(SS2D_INIT_ARGS, transformer_layer_type="QformerLayerVar"), layout="2d")
    with pytest.raises(common.ConversionError, match="model_cls"):
        convert_gigatok.layout_from_config({"model_cls": "VAEVitModel"})
    with pytest.raises(ValueError, match="2D layout only"):
        abstract_params(GigaTok(layout="1d", layer_type="detr"))


# A NumPy transcription of the official 2D half with TransformerDecoderLayer blocks
# (sequence-first tensors (L, B, W) as upstream; eval mode, dropout off).

def _ln(x, sd, key):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def _mha(q_in, k_in, v_in, sd, key, heads):
    """torch.nn.MultiheadAttention (packed in_proj, rows q; k; v) on (L, B, W) inputs."""
    w, b = sd[f"{key}.in_proj_weight"], sd[f"{key}.in_proj_bias"]
    width = w.shape[1]
    q, k, v = (x @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width]
               for i, x in enumerate((q_in, k_in, v_in)))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2, 0, 3)  # noqa
    q, k, v = split(q), split(k), split(v)                                  # (B, H, L, D)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ v
    o = o.transpose(2, 0, 1, 3).reshape(q_in.shape[0], q_in.shape[1], width)
    return o @ sd[f"{key}.out_proj.weight"].T + sd[f"{key}.out_proj.bias"]


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def _official_detr_half(sd, src, part, x, depth, heads, distill_depth=None):
    """x: (B, z, g, g) as upstream -> output (B, z, g, g) [, distill features (B, L, D)]."""
    b, z, g, _ = x.shape
    t = x.reshape(b, z, g * g).transpose(2, 0, 1)                           # (L, B, z)
    t = _ln(t, sd, f"{src}.ln_pre") @ sd[f"{src}.{part}_embed.weight"].T \
        + sd[f"{src}.{part}_embed.bias"]
    pos = sd[f"{src}.positional_embedding"]                                 # (L, 1, W)
    inner = None
    for i in range(depth):
        p, memory = f"{src}.transformer.{i}", t
        h = _ln(t, sd, f"{p}.norm1")
        t = t + _mha(h + pos, h + pos, h, sd, f"{p}.self_attn", heads)
        h = _ln(t, sd, f"{p}.norm2")
        t = t + _mha(h + pos, memory + pos, memory, sd, f"{p}.multihead_attn", heads)
        h = _ln(t, sd, f"{p}.norm3")
        h = _gelu(h @ sd[f"{p}.linear1.weight"].T + sd[f"{p}.linear1.bias"])
        t = t + h @ sd[f"{p}.linear2.weight"].T + sd[f"{p}.linear2.bias"]
        if distill_depth and i + 1 == distill_depth:
            h = t
            for idx in (0, 2, 4):
                key = f"{src}.distill_mlp.{idx}"
                h = h @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]
                h = h / (1 + np.exp(-h)) if idx < 4 else h
            inner = h.transpose(1, 0, 2)
    t = _ln(t, sd, f"{src}.ln_post")
    grid = t.transpose(1, 2, 0).reshape(b, -1, g, g)                        # (B, W, g, g)
    wc, bc = sd[f"{src}.conv_out.weight"], sd[f"{src}.conv_out.bias"]
    k = wc.shape[-1] // 2
    padded = np.pad(grid, ((0, 0), (0, 0), (k, k), (k, k)))
    out = np.zeros((b, wc.shape[0], g, g)) + bc[None, :, None, None]
    for dy in range(wc.shape[2]):
        for dx in range(wc.shape[3]):
            window = padded[:, :, dy:dy + g, dx:dx + g]
            out += np.einsum("bchw,oc->bohw", window, wc[:, :, dy, dx])
    return out, inner


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_detr_half_matches_official_layer(part):
    """Tiny sizes (width 32, 4 heads, 3 layers, z 8, 4x4 grid), random weights, against the
    float64 transcription. Checked once against the official torch modules themselves (not
    part of the suite: it needs the upstream code): width 256, 4 layers, 4 heads, 4x4 grid,
    random weights: encoder tokens 3.1e-6, ln_post features 2.7e-6, decoder grid 4.2e-5,
    distill features 5.0e-5 relative (torch's own float32 result is 2.9e-4 / 3.5e-4 from its
    float64 one there: the random decoder is ill-conditioned); the whole VQ_SS256_2d-layout
    tokenizer (tiny ViTs, full CNN) gave the same 512 codes and pixels within 7.8e-6."""
    src = "s2dencoder" if part == "encoder" else "s2ddecoder"
    distill = 16 if part == "decoder" else None
    shapes = detr_half_shapes(src, part, 32, 3, 8, 4, distill)
    sd = {k: v * (0.2 if v.ndim > 1 else 0.1) for k, v in random_state_dict(shapes, 3).items()}
    for key in sd:
        if re.search(r"(norm\d|ln_pre|ln_post)\.weight$", key):
            sd[key] = sd[key] + 1.0
    x = np.random.default_rng(4).standard_normal((2, 8, 4, 4)).astype(np.float32)
    sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
    want, want_inner = _official_detr_half(sd64, src, part, x.astype(np.float64), 3, 4,
                                           distill_depth=2 if distill else None)
    out = common.ParamTree()
    convert_gigatok.convert_vit2d(common.StateDict(sd, src), out, src, "half", 3, 4, part,
                                  distill=bool(distill), layer_type="detr")
    with jax.default_matmul_precision("highest"):
        if part == "encoder":
            module = ViT2DEncoder(32, 3, 4, layer_type="detr")
            tokens, _ = module.apply({"params": out.tree["half"]}, x.transpose(0, 2, 3, 1))
            got = np.asarray(tokens).reshape(2, 4, 4, 8).transpose(0, 3, 1, 2)
        else:
            module = ViT2DDecoder(32, 3, 4, 4, distill_depth=2, out_inner_dim=16,
                                  layer_type="detr")
            grid, inner, _ = module.apply({"params": out.tree["half"]},
                                          x.reshape(2, 8, 16).transpose(0, 2, 1))
            got = np.asarray(grid).transpose(0, 3, 1, 2)
            assert rel_err(inner, want_inner) < 1e-5
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("layout,layer_type", [("1d", "vit"), ("2d", "vit"), ("2d", "detr")])
def test_scanned_halves_equal_the_unrolled_layers(layout, layer_type):
    """The scanned stacks (`scan=True`, the recipes' setting: `layers` with a leading axis named
    "layers", one layer compiled whatever the depth) compute what the unrolled `layer_{i}` do
    with the same weights, the distillation tap read inside the scan (after layer 2 of 3)
    included."""
    kw = dict(layout=layout, layer_type=layer_type, image_size=16, encoder_ch=32, decoder_ch=32,
              encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
              encoder_width=32, encoder_depth=2, encoder_heads=2, decoder_width=32,
              decoder_depth=3, decoder_heads=2, num_latent_tokens=8, codebook_size=64,
              distill_depth=2, out_inner_dim=16)
    scanned, unrolled = GigaTok(**kw, scan=True), GigaTok(**kw)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    boxed = scanned.init(jax.random.key(0), images)["params"]
    assert nn.get_partition_spec(boxed)["vit_decoder"]["layers"]["mlp"]["fc1"]["kernel"] == \
        jax.sharding.PartitionSpec("layers", "embed", "mlp")
    params = nn.unbox(boxed)
    flat = dict(params)
    for half in ("vit_encoder", "vit_decoder"):
        tree = dict(params[half])
        stacked = tree.pop("layers")
        depth = len(jax.tree.leaves(stacked)[0])
        tree.update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                     for i in range(depth)})
        flat[half] = tree
    want = jax.tree.map(lambda a: a.shape, nn.unbox(jax.eval_shape(
        unrolled.init, jax.random.key(0), images)["params"]))
    assert jax.tree.map(lambda a: a.shape, flat) == want
    with jax.default_matmul_precision("highest"):
        (pix_s, aux_s), (pix_u, aux_u) = (m.apply({"params": p}, images)
                                          for m, p in ((scanned, params), (unrolled, flat)))
    assert rel_err(pix_s, pix_u) < 1e-5
    assert rel_err(aux_s.features["semantic_features"],
                   aux_u.features["semantic_features"]) < 1e-5
    np.testing.assert_array_equal(aux_s.codes, aux_u.codes)


def test_weights_of_either_layout_load_into_either(tmp_path):
    """A converted release / run written unrolled (`layer_{i}`, the converter's and the module's
    default) loads into the recipes' scanned model (`layers`), every array of it, by
    `load_checked` and the init path (`load_initial_params`), and back: the same numbers."""
    from tok1d.weights import loaders, pretrained
    kw = dict(image_size=16, encoder_ch=32, decoder_ch=32, encoder_ch_mult=(1, 2),
              decoder_ch_mult=(1, 2), num_res_blocks=1, z_channels=32, encoder_width=32,
              encoder_depth=2, encoder_heads=2, decoder_width=32, decoder_depth=3,
              decoder_heads=2, num_latent_tokens=8, codebook_size=64, distill_depth=2,
              out_inner_dim=16)
    images = jnp.zeros((1, 16, 16, 3))
    shapes = {scan: nn.unbox(jax.eval_shape(GigaTok(**kw, scan=scan).init, jax.random.key(0),
                                            images)["params"]) for scan in (False, True)}
    unrolled = jax.tree.map(np.asarray, nn.unbox(GigaTok(**kw).init(jax.random.key(3),
                                                                    images)["params"]))
    src = pretrained.save_pretrained(str(tmp_path / "unrolled"), "gigatok", kw, unrolled)
    scanned = loaders.load_checked(src, shapes[True], "the scanned model")
    layers = scanned["vit_decoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert layers.shape[0] == 3
    for i in range(3):
        np.testing.assert_array_equal(layers[i], unrolled["vit_decoder"][f"layer_{i}"]["mlp"]
                                      ["fc1"]["kernel"])
    init = loaders.load_initial_params(shapes[True], checkpoint=src)
    assert len(init) == len(jax.tree.leaves(shapes[True]))
    back = pretrained.save_pretrained(str(tmp_path / "scanned"), "gigatok",
                                      dict(kw, scan=True), scanned)
    again = loaders.load_checked(back, shapes[False], "the unrolled model")
    jax.tree.map(np.testing.assert_array_equal, again, unrolled)
