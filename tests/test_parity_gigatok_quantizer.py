"""GigaTok's quantizer against the official one (gigatok_1d.npz / gigatok_2d.npz): codes, the
rotation-trick output and its gradient, the straight-through lookup, the VQ / commitment /
entropy losses and their gradient, from the stored pre-quantisation latents."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from tok1d.models.quantizers import VectorQuantizer


def channels_last(x):
    """Official (B, C, H, W) -> (B, H, W, C); the 1D model's fake 2D is (B, C, 1, N)."""
    return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["gigatok_1d.npz", "gigatok_2d.npz"])
def case(request, fixtures_dir):
    path = os.path.join(fixtures_dir, request.param)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    z = np.load(path)
    args = json.loads(str(z["meta_json"]))["init_args"]
    vq = VectorQuantizer(args["codebook_size"], args["codebook_embed_dim"],
                         l2_norm=args["codebook_l2_norm"],
                         commitment_cost=args["commit_loss_beta"],
                         rotation_trick=args["rot"])
    params = {"embedding": np.asarray(z["sd/quantize.embedding.weight"], np.float32)}
    return z, args, vq, params


def test_codes_values_and_losses(case):
    z, args, vq, params = case
    pre = jnp.asarray(channels_last(z["quant/pre_quant"]))
    with jax.default_matmul_precision("highest"):
        out, aux = vq.apply({"params": params}, pre)
        lookup = vq.apply({"params": params}, aux["codes"], method=VectorQuantizer.lookup)
    b = pre.shape[0]
    np.testing.assert_array_equal(np.asarray(aux["codes"]).reshape(b, -1),
                                  np.asarray(z["quant/indices"]).reshape(b, -1))
    assert rel_err(lookup, channels_last(z["quant/z_q_lookup"])) < 1e-6
    assert rel_err(out, channels_last(z["train/quantizer_out_train"])) < 2e-5
    assert rel_err(out, channels_last(z["quant/z_q_forward"])) < 2e-5
    assert rel_err(aux["codebook_loss"], z["train/vq_loss"]) < 1e-5
    assert rel_err(aux["commitment_loss"], z["train/commit_loss"]) < 1e-5
    entropy = args["entropy_loss_ratio"] * aux["entropy_loss"]
    assert rel_err(entropy, z["train/entropy_loss"]) < 1e-5


def test_rotation_trick_gradient(case):
    z, args, vq, params = case
    pre = jnp.asarray(channels_last(z["quant/pre_quant"]))
    probe = jnp.asarray(channels_last(z["train/rot_probe_G"]))

    def probed(x):
        out, _ = vq.apply({"params": params}, x)
        return jnp.sum(out * probe)

    with jax.default_matmul_precision("highest"):
        grad = jax.grad(probed)(pre)
    assert rel_err(grad, channels_last(z["train/rot_grad_pre_quant"])) < 2e-5
    if args["rot"]:
        # It is not the straight-through gradient (the shared pack's differs from it by up to
        # 0.86).
        st = VectorQuantizer(vq.codebook_size, vq.code_dim, l2_norm=args["codebook_l2_norm"])
        with jax.default_matmul_precision("highest"):
            st_grad = jax.grad(lambda x: jnp.sum(st.apply({"params": params}, x)[0] * probe))(pre)
        assert rel_err(st_grad, channels_last(z["train/rot_grad_pre_quant"])) > 1e-2


def test_quantizer_loss_gradient(case):
    z, args, vq, params = case
    pre = jnp.asarray(channels_last(z["quant/pre_quant"]))

    def total(x):
        _, aux = vq.apply({"params": params}, x)
        return (aux["codebook_loss"] + aux["commitment_loss"]
                + args["entropy_loss_ratio"] * aux["entropy_loss"])

    with jax.default_matmul_precision("highest"):
        grad = jax.grad(total)(pre)
    assert rel_err(grad, channels_last(z["train/quantizer_loss_grad_pre_quant"])) < 1e-4
