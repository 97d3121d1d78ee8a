"""Official GigaTok checkpoints (SilentView/GigaTok) -> tok1d parameters: the Q-Former halves.

`convert_qformer_encoder` / `convert_qformer_decoder` write the `s2to1encoder.*` /
`s1to2decoder.*` tensors into a `ParamTree`; the CNN halves are in `convert.gigatok_cnn`.
"""

from __future__ import annotations

from tok1d.convert import common
from tok1d.convert.common import ParamTree, StateDict


def _positions(sd: StateDict, key: str):
    """Official position tables are stored (L, 1, W)."""
    value = sd.take(key)
    return None if value is None else value.reshape(value.shape[0], value.shape[-1])


def qformer_layer(sd: StateDict, src: str, num_heads: int) -> dict:
    def attention(name):
        w = sd.take(f"{src}.{name}.in_proj_weight")
        b = sd.take(f"{src}.{name}.in_proj_bias")
        ow = sd.take(f"{src}.{name}.out_proj.weight")
        ob = sd.take(f"{src}.{name}.out_proj.bias")
        out = common.split_in_proj(w, b, num_heads) if w is not None else {}
        if ow is not None:
            out["out"] = common.out_proj(ow, ob, num_heads)
        return out

    return {"norm1": {"norm": common.norm(sd, f"{src}.norm1")},
            "norm2": {"norm": common.norm(sd, f"{src}.norm2")},
            "norm3": {"norm": common.norm(sd, f"{src}.norm3")},
            "self_attn": attention("self_attn"), "cross_attn": attention("multihead_attn"),
            "mlp": {"fc1": common.dense(sd, f"{src}.linear1"),
                    "fc2": common.dense(sd, f"{src}.linear2")}}


def _layers(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int,
            num_heads: int) -> None:
    for i in range(depth):
        out.set_tree(f"{dst}/layer_{i}", qformer_layer(sd, f"{src}.transformer.{i}", num_heads),
                     f"{src}.transformer.{i}")


def convert_qformer_encoder(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int,
                            num_heads: int) -> None:
    out.set(f"{dst}/positional_embedding", _positions(sd, f"{src}.positional_embedding"),
            f"{src}.positional_embedding")
    out.set(f"{dst}/latent_token_positional_embedding",
            _positions(sd, f"{src}.latent_token_positional_embedding"),
            f"{src}.latent_token_positional_embedding")
    out.set_tree(f"{dst}/ln_pre/norm", common.norm(sd, f"{src}.ln_pre"), f"{src}.ln_pre")
    out.set_tree(f"{dst}/encoder_embed", common.dense(sd, f"{src}.encoder_embed"),
                 f"{src}.encoder_embed")
    out.set_tree(f"{dst}/global_proj", common.dense(sd, f"{src}.global_proj"),
                 f"{src}.global_proj")
    _layers(sd, out, src, dst, depth, num_heads)
    out.set_tree(f"{dst}/ln_post/norm", common.norm(sd, f"{src}.ln_post"), f"{src}.ln_post")
    w = sd.take(f"{src}.conv_out.weight")
    out.set(f"{dst}/conv_out/kernel", None if w is None else common.conv1x1_as_dense(w),
            f"{src}.conv_out.weight")
    out.set(f"{dst}/conv_out/bias", sd.take(f"{src}.conv_out.bias"), f"{src}.conv_out.bias")


def convert_qformer_decoder(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int,
                            num_heads: int, distill: bool) -> None:
    out.set(f"{dst}/positional_embedding", _positions(sd, f"{src}.positional_embedding"),
            f"{src}.positional_embedding")
    out.set(f"{dst}/latent_token_positional_embedding",
            _positions(sd, f"{src}.latent_token_positional_embedding"),
            f"{src}.latent_token_positional_embedding")
    out.set_tree(f"{dst}/ln_pre/norm", common.norm(sd, f"{src}.ln_pre"), f"{src}.ln_pre")
    out.set_tree(f"{dst}/decoder_embed", common.dense(sd, f"{src}.decoder_embed"),
                 f"{src}.decoder_embed")
    _layers(sd, out, src, dst, depth, num_heads)
    out.set_tree(f"{dst}/ln_post/norm", common.norm(sd, f"{src}.ln_post"), f"{src}.ln_post")
    out.set_tree(f"{dst}/conv_out", common.conv_params(sd, f"{src}.conv_out"),
                 f"{src}.conv_out")
    if distill:
        for ours, theirs in (("fc_0", 0), ("fc_1", 2), ("fc_2", 4)):
            out.set_tree(f"{dst}/distill_mlp/{ours}",
                         common.dense(sd, f"{src}.distill_mlp.{theirs}"),
                         f"{src}.distill_mlp.{theirs}")


# Key names of GigaTok's plain `TransformerLayer` (the 2D tokenizers).
TRANSFORMER_LAYER = dict(ln_1="norm1", ln_2="norm2", attn="self_attn", fc1="linear1",
                         fc2="linear2")


def convert_vit2d(sd: StateDict, out: ParamTree, src: str, dst: str, depth: int, num_heads: int,
                  part: str, distill: bool = False) -> None:
    """`s2dencoder.*` (part="encoder") or `s2ddecoder.*` (part="decoder") -> ViT2D params."""
    out.set(f"{dst}/positional_embedding", _positions(sd, f"{src}.positional_embedding"),
            f"{src}.positional_embedding")
    out.set_tree(f"{dst}/ln_pre/norm", common.norm(sd, f"{src}.ln_pre"), f"{src}.ln_pre")
    embed = "encoder_embed" if part == "encoder" else "decoder_embed"
    out.set_tree(f"{dst}/{embed}", common.dense(sd, f"{src}.{embed}"), f"{src}.{embed}")
    for i in range(depth):
        out.set_tree(f"{dst}/layer_{i}",
                     common.attention_block(sd, f"{src}.transformer.{i}", num_heads,
                                            TRANSFORMER_LAYER), f"{src}.transformer.{i}")
    out.set_tree(f"{dst}/ln_post/norm", common.norm(sd, f"{src}.ln_post"), f"{src}.ln_post")
    if part == "encoder":
        w = sd.take(f"{src}.conv_out.weight")
        out.set(f"{dst}/conv_out/kernel", None if w is None else common.conv1x1_as_dense(w),
                f"{src}.conv_out.weight")
        out.set(f"{dst}/conv_out/bias", sd.take(f"{src}.conv_out.bias"), f"{src}.conv_out.bias")
    else:
        out.set_tree(f"{dst}/conv_out", common.conv_params(sd, f"{src}.conv_out"),
                     f"{src}.conv_out")
    if distill:
        for ours, theirs in (("fc_0", 0), ("fc_1", 2), ("fc_2", 4)):
            out.set_tree(f"{dst}/distill_mlp/{ours}",
                         common.dense(sd, f"{src}.distill_mlp.{theirs}"),
                         f"{src}.distill_mlp.{theirs}")
