"""GAN discriminators (TiTok / MaskBit, PatchGAN) and GAN losses / LeCam."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tok1d.objectives import gan
from tok1d.weights.convert.common import ConversionError
from tok1d.models import discriminator as disc
from tok1d.weights.convert import discriminator as convert_disc


def count(model, size):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)["params"]))


def out_shape(model, size, batch=2):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.eval_shape(model.apply, variables, x).shape


# ------------------------------------------------------------------ official-code references
# Weights: uniform(-0.5, 0.5) from default_rng(seed), drawn in the official state_dict order
# (norm scales + 1); expected values computed once with the official PyTorch modules
# (bytedance/1d-tokenizer NLayerDiscriminator(hidden_channels=32), eval; GigaTok PatchGAN
# NLayerDiscriminator(ndf=8, n_layers=2), train mode) on the inputs below.

def titok_keys(h):
    keys = [("block_in.0.weight", (h, 3, 5, 5)), ("block_in.0.bias", (h,))]
    widths = [h, h, 2 * h, 4 * h]
    for i in range(3):
        o, c = widths[i + 1], widths[i]
        keys += [(f"blocks.{i}.0.weight", (o, c, 3, 3)), (f"blocks.{i}.0.bias", (o,)),
                 (f"blocks.{i}.1.kernel", None),
                 (f"blocks.{i}.2.weight", (o,)), (f"blocks.{i}.2.bias", (o,))]
    return keys + [("to_logits.0.weight", (4 * h, 4 * h, 1, 1)), ("to_logits.0.bias", (4 * h,)),
                   ("to_logits.2.weight", (1, 4 * h, 5, 5)), ("to_logits.2.bias", (1,))]


def patchgan_keys(ndf):
    return [("main.0.weight", (ndf, 3, 4, 4)), ("main.0.bias", (ndf,)),
            ("main.2.weight", (2 * ndf, ndf, 4, 4)), ("main.3.weight", (2 * ndf,)),
            ("main.3.bias", (2 * ndf,)), ("main.3.running_mean", "stat"),
            ("main.3.running_var", "stat"), ("main.3.num_batches_tracked", "stat"),
            ("main.5.weight", (4 * ndf, 2 * ndf, 4, 4)), ("main.6.weight", (4 * ndf,)),
            ("main.6.bias", (4 * ndf,)), ("main.6.running_mean", "stat"),
            ("main.6.running_var", "stat"), ("main.6.num_batches_tracked", "stat"),
            ("main.8.weight", (1, 4 * ndf, 4, 4)), ("main.8.bias", (1,))]


def fake_state_dict(keys, seed):
    rng = np.random.default_rng(seed)
    a = np.array([1.0, 3.0, 3.0, 1.0])
    sd = {}
    for key, shape in keys:
        if shape is None:
            sd[key] = (np.outer(a, a) / 64.0).reshape(1, 1, 4, 4).astype(np.float32)
        elif shape == "stat":
            sd[key] = np.zeros((), np.int64) if key.endswith("tracked") else np.ones(4, np.float32)
        else:
            sd[key] = rng.uniform(-0.5, 0.5, size=shape).astype(np.float32)
            if key.endswith("weight") and len(shape) == 1:
                sd[key] = sd[key] + 1.0
    return sd


def test_titok_discriminator_matches_the_official_code():
    model = disc.TiTokDiscriminator(hidden_channels=32)
    sd = {"discriminator." + k: v for k, v in fake_state_dict(titok_keys(32), 0).items()}
    sd["ema_real_logits_mean"] = np.zeros(1, np.float32)  # TiTok loss-module extras are skipped
    params = convert_disc.convert_titok_discriminator(sd, model)
    x = np.random.default_rng(1).uniform(size=(2, 3, 20, 20)).astype(np.float32)
    y = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert y.shape == (2, 16, 16, 1) and y.dtype == jnp.float32
    # 20 -> 10 -> 5 -> 3 (odd-size blur padding), then adaptive max pool 3 -> 16.
    np.testing.assert_allclose(y[0, :3, :3, 0], [[26.75531, 11.425677, 30.762474],
                                                 [27.340965, 14.598143, 19.323215],
                                                 [12.382966, 4.051029, 16.360592]], rtol=2e-5)
    np.testing.assert_allclose(y[1, 7:9, 10:12, 0], [[8.135014, 14.124841],
                                                     [17.151268, 19.801468]], rtol=2e-5)
    np.testing.assert_allclose(jnp.mean(y), 13.281163, rtol=2e-5)
    np.testing.assert_allclose(jnp.mean(jnp.abs(y)), 16.230812, rtol=2e-5)


def test_patchgan_matches_the_official_code_in_train_mode():
    model = disc.PatchGANDiscriminator(base_channels=8, num_layers=2)
    params = convert_disc.convert_patchgan_discriminator(fake_state_dict(patchgan_keys(8), 2), model)
    x = np.random.default_rng(3).uniform(-1, 1, size=(3, 3, 32, 32)).astype(np.float32)
    variables = {"params": params}
    y = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))  # no mutables
    assert y.shape == (3, 6, 6, 1)
    np.testing.assert_allclose(y[0, :3, :3, 0], [[0.63194627, 1.2764709, -4.107868],
                                                 [-2.9614227, -8.575874, 2.197019],
                                                 [-0.77585727, -8.414759, -7.9606586]],
                               rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y[2, 4:6, 4:6, 0], [[-4.971708, 6.5536017],
                                                   [-3.300654, -5.321233]], rtol=2e-5)
    np.testing.assert_allclose(jnp.mean(y), -1.5155787, rtol=2e-5)
    np.testing.assert_allclose(jnp.mean(jnp.abs(y)), 3.6396604, rtol=2e-5)


def test_converter_reports_missing_and_wrong_keys():
    sd = fake_state_dict(titok_keys(32), 0)
    del sd["to_logits.2.bias"]
    with pytest.raises(ConversionError, match="to_logits.2.bias"):
        convert_disc.convert_titok_discriminator(sd, disc.TiTokDiscriminator(hidden_channels=32))
    with pytest.raises(ConversionError, match="shape"):
        convert_disc.convert_titok_discriminator(fake_state_dict(titok_keys(32), 0),
                                         disc.TiTokDiscriminator(hidden_channels=64))


# ------------------------------------------------------------------ sizes and shapes

def test_official_parameter_counts_and_output_shapes():
    # Counted from the official PyTorch modules: TiTok NLayerDiscriminator() 1,909,889;
    # GigaTok PatchGAN NLayerDiscriminator(ndf=64, n_layers=3, kw=4, norm="batch") 2,765,633.
    assert count(disc.TiTokDiscriminator(), 64) == 1_909_889
    assert count(disc.PatchGANDiscriminator(), 64) == 2_765_633
    assert out_shape(disc.TiTokDiscriminator(), 256) == (2, 16, 16, 1)
    assert out_shape(disc.TiTokDiscriminator(), 512) == (2, 16, 16, 1)
    assert out_shape(disc.PatchGANDiscriminator(), 256) == (2, 30, 30, 1)


def test_tiny_titok_discriminator_runs_at_a_small_size():
    model = disc.TiTokDiscriminator(hidden_channels=8, num_groups=4)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 40, 40, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    y = jax.jit(model.apply)(variables, x)
    assert y.shape == (2, 16, 16, 1) and bool(jnp.all(jnp.isfinite(y)))
    names = nn.get_partition_spec(variables)["params"]
    assert names["stage_0_conv"]["kernel"] == jax.sharding.PartitionSpec(*disc.CONV)
    assert names["stage_0_norm"]["scale"] == jax.sharding.PartitionSpec("norm")


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    for model in (disc.TiTokDiscriminator(hidden_channels=8, num_groups=4, dtype=jnp.bfloat16),
                  disc.PatchGANDiscriminator(base_channels=8, num_layers=2, dtype=jnp.bfloat16)):
        x = jnp.zeros((2, 32, 32, 3))
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
        assert jax.eval_shape(model.apply, variables, x).dtype == jnp.float32


def test_init_follows_the_official_initialisers():
    model = disc.TiTokDiscriminator(hidden_channels=32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]
    w = params["stage_2_conv"]["kernel"]  # fan_in 64 * 9: PyTorch U(+-1/sqrt(fan_in))
    bound = 1 / math.sqrt(64 * 9)
    assert float(jnp.max(jnp.abs(w))) <= bound and float(jnp.max(jnp.abs(w))) > 0.95 * bound
    assert float(jnp.max(jnp.abs(params["stage_2_conv"]["bias"]))) <= bound
    np.testing.assert_array_equal(params["stage_2_norm"]["scale"], 1.0)
    model = disc.PatchGANDiscriminator(base_channels=16)
    p = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert abs(float(jnp.std(p["conv_3"]["kernel"])) - 0.02) < 1e-3
    assert "bias" not in p["conv_1"]  # convs before BatchNorm have no bias
    assert abs(float(jnp.mean(p["norm_3"]["scale"])) - 1.0) < 0.01
    assert float(jnp.std(p["norm_3"]["scale"])) > 0.01  # N(1, 0.02)


# ------------------------------------------------------------------ building blocks

def torch_adaptive_max_pool_1d(x, out):
    n = x.shape[0]
    return np.stack([x[(i * n) // out:-((-(i + 1) * n) // out)].max(0) for i in range(out)])


@pytest.mark.parametrize("n", [32, 16, 8, 6, 13])
def test_adaptive_max_pool_uses_pytorch_bins(n):
    x = np.random.default_rng(n).normal(size=(1, n, n, 2)).astype(np.float32)
    y = np.asarray(disc.adaptive_max_pool(jnp.asarray(x), (16, 16)))
    ref = torch_adaptive_max_pool_1d(x[0], 16)                      # rows
    ref = torch_adaptive_max_pool_1d(ref.transpose(1, 0, 2), 16).transpose(1, 0, 2)  # cols
    np.testing.assert_array_equal(y[0], ref)
    if n == 16:
        np.testing.assert_array_equal(y, x)
    if n == 32:
        np.testing.assert_array_equal(y, x.reshape(1, 16, 2, 16, 2, 2).max((2, 4)))
    if n == 8:  # smaller maps are repeated (nearest upsampling)
        np.testing.assert_array_equal(y, np.repeat(np.repeat(x, 2, 1), 2, 2))


@pytest.mark.parametrize("n", [8, 7])
def test_blur_downsample(n):
    x = np.random.default_rng(0).normal(size=(1, n, n, 3)).astype(np.float32)
    y = np.asarray(disc.blur_downsample(jnp.asarray(x)))
    assert y.shape == (1, math.ceil(n / 2), math.ceil(n / 2), 3)
    # Direct definition: zero pad 1 before, (1 if even else 2) after; 4x4 [1,3,3,1]^2/64, stride 2.
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    after = 1 if n % 2 == 0 else 2
    xp = np.pad(x[0], ((1, after), (1, after), (0, 0)))
    ref = np.array([[np.einsum("hwc,hw->c", xp[2 * i:2 * i + 4, 2 * j:2 * j + 4], k)
                     for j in range(y.shape[2])] for i in range(y.shape[1])])
    np.testing.assert_allclose(y[0], ref, rtol=1e-5, atol=1e-6)
    ones = np.asarray(disc.blur_downsample(jnp.ones((1, 8, 8, 1))))
    np.testing.assert_allclose(ones[0, 1:-1, 1:-1], 1.0, rtol=1e-6)  # normalised kernel


def test_batch_norm_uses_current_batch_statistics_and_optional_groups():
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 5, 6)), jnp.float32)
    bn = disc.BatchNorm()
    variables = bn.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # no batch_stats collection

    @jax.jit
    def run(x):
        whole = bn.apply(variables, x)
        grouped = disc.BatchNorm(group_size=2).apply(variables, x)
        halves = jnp.concatenate([bn.apply(variables, x[:2]), bn.apply(variables, x[2:])])
        return whole, grouped, halves

    y, grouped, halves = run(x)
    np.testing.assert_allclose(jnp.mean(y, (0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, (0, 1, 2)), 1.0, rtol=1e-3)
    np.testing.assert_allclose(grouped, halves, atol=1e-6)
    model = disc.PatchGANDiscriminator(base_channels=8, num_layers=2, batch_norm_group_size=3)
    with pytest.raises(ValueError, match="multiple"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((4, 32, 32, 3)))


def test_patchgan_running_stats_advance_only_in_train_calls():
    """`track_running_stats`: init creates them, a train=True call advances them (torch momentum
    0.1 from mean 0 / var 1), a train=False call leaves them; the logits are the same in both
    modes (always the batch's statistics, as the official trainers' train-mode module)."""
    x = jnp.asarray(np.random.default_rng(1).normal(0.5, 2.0, size=(4, 16, 16, 3)), jnp.float32)
    model = disc.PatchGANDiscriminator(base_channels=8, num_layers=2, track_running_stats=True)
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    stats0 = variables["batch_stats"]["norm_1"]
    np.testing.assert_array_equal(stats0["mean"], 0.0)
    out = {train: model.apply(variables, x, train=train, mutable=["batch_stats"])
           for train in (True, False)}
    np.testing.assert_array_equal(out[True][0], out[False][0])
    assert int(out[True][1]["batch_stats"]["norm_1"]["count"]) == 1
    assert np.abs(np.asarray(out[True][1]["batch_stats"]["norm_1"]["mean"])).max() > 0
    jax.tree.map(np.testing.assert_array_equal, out[False][1]["batch_stats"],
                 variables["batch_stats"])


# ------------------------------------------------------------------ losses

def test_gan_losses_on_hand_computed_values():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
    # 1/2 (mean(relu(-1), relu(0.5)) + mean(relu(-1), relu(1))) = 1/2 (0.25 + 0.5)
    np.testing.assert_allclose(gan.hinge_d_loss(real, fake), 0.375, rtol=1e-6)
    np.testing.assert_allclose(gan.hinge_g_loss(jnp.array([1.0, 3.0])), -2.0)
    zeros = jnp.zeros((2, 4, 4, 1))
    np.testing.assert_allclose(gan.vanilla_d_loss(zeros, zeros), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(gan.non_saturating_d_loss(zeros, zeros), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(gan.non_saturating_g_loss(zeros), math.log(2), rtol=1e-6)
    big = jnp.array([30.0])
    np.testing.assert_allclose(gan.non_saturating_g_loss(-big), 30.0, rtol=1e-6)  # no overflow
    assert gan.d_loss_fn("hinge") is gan.hinge_d_loss and gan.g_loss_fn("hinge") is gan.hinge_g_loss
    with pytest.raises(ValueError, match="Unknown"):
        gan.d_loss_fn("wgan")
    assert gan.hinge_d_loss(real.astype(jnp.bfloat16), fake).dtype == jnp.float32


def test_lecam_matches_the_titok_formula_and_ema():
    state = gan.lecam_init()
    assert all(v.shape == () and v.dtype == jnp.float32 for v in state.values())
    real, fake = jnp.array([1.0, 0.0]), jnp.array([-0.5, 0.0])  # means 0.5, -0.25
    # relu(0.5 - 0)^2 + relu(0 - (-0.25))^2
    np.testing.assert_allclose(gan.lecam_loss(real, fake, state), 0.3125, rtol=1e-6)
    state = gan.lecam_update(state, real, fake, decay=0.9)
    np.testing.assert_allclose(state["ema_real_logits_mean"], 0.05, rtol=1e-6)
    np.testing.assert_allclose(state["ema_fake_logits_mean"], -0.025, rtol=1e-6)
    state = gan.lecam_update(state, real, fake, decay=0.9)
    np.testing.assert_allclose(state["ema_real_logits_mean"], 0.05 * 0.9 + 0.05, rtol=1e-6)
    # relu(0.5 - (-0.0475))^2 + relu(0.095 - (-0.25))^2
    np.testing.assert_allclose(gan.lecam_loss(real, fake, state),
                               0.5475 ** 2 + 0.345 ** 2, rtol=1e-6)
    # per-logit (lecam-gan / GigaTok) form: mean relu(r - ema_f)^2 + mean relu(ema_r - f)^2
    s = gan.lecam_init(0.2, 0.4)
    want = np.mean(np.maximum([0.6, -0.4], 0) ** 2) + np.mean(np.maximum([0.7, 0.2], 0) ** 2)
    np.testing.assert_allclose(gan.lecam_loss(real, fake, s, per_logit=True), want, rtol=1e-6)
    # decay 0.999 in double precision, like the official Python-float arithmetic
    s = gan.lecam_update(gan.lecam_init(), jnp.ones(3), jnp.ones(3), 0.999)
    assert float(s["ema_real_logits_mean"]) == np.float32(1.0 - 0.999)
    traced = jax.jit(gan.lecam_update)(gan.lecam_init(), jnp.ones(3), jnp.ones(3), 0.5)
    np.testing.assert_allclose(traced["ema_fake_logits_mean"], 0.5)


def test_lecam_gradients_reach_logits_not_state():
    state = gan.lecam_init(0.3, -0.2)
    real, fake = jnp.array([1.0, 0.0]), jnp.array([0.5, -1.0])
    g_real, g_fake, g_state = jax.grad(gan.lecam_loss, argnums=(0, 1, 2))(real, fake, state)
    # d/dr relu(mean r - ema_f)^2 = 2 (0.5 + 0.2) / 2 per logit
    np.testing.assert_allclose(g_real, [0.7, 0.7], rtol=1e-6)
    np.testing.assert_allclose(g_fake, [-0.55, -0.55], rtol=1e-6)  # -2 (0.3 - (-0.25)) / 2
    assert all(float(v) == 0.0 for v in g_state.values())
    g = jax.grad(lambda s: gan.lecam_update(s, real, fake)["ema_real_logits_mean"])(state)
    np.testing.assert_allclose(g["ema_real_logits_mean"], 0.999, rtol=1e-6)


def test_gan_active_inside_jit():
    f = jax.jit(gan.gan_active)
    assert float(f(19_999, 20_000)) == 0.0 and float(f(20_000, 20_000)) == 1.0
    assert f(jnp.int32(5), 0).dtype == jnp.float32
    assert float(gan.gan_active(3, 0)) == 1.0


def test_gradients_flow_through_discriminator_and_losses():
    model = disc.TiTokDiscriminator(hidden_channels=8, num_groups=4)
    rng = np.random.default_rng(0)
    real = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
    fake = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), real)["params"]
    state = gan.lecam_init()

    @jax.jit
    def d_step(params, state):
        def loss_fn(p):  # one call on [real; fake] (GroupNorm is per example)
            logits = model.apply({"params": p}, jnp.concatenate([real, fake]))
            lr, lf = logits[:2], logits[2:]
            loss = gan.hinge_d_loss(lr, lf) + 0.001 * gan.lecam_loss(lr, lf, state)
            return loss, gan.lecam_update(state, lr, lf)
        return jax.grad(loss_fn, has_aux=True)(params)

    grads, new_state = d_step(params, state)
    for path, g in jax.tree_util.tree_leaves_with_path(nn.unbox(grads)):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, path
    assert float(new_state["ema_real_logits_mean"]) != 0.0

    @jax.jit
    def g_grad(images, step):
        return jax.grad(lambda x: gan.gan_active(step, 20_000) * gan.hinge_g_loss(
            model.apply({"params": params}, x)))(images)

    assert float(jnp.max(jnp.abs(g_grad(fake, 25_000)))) > 0
    assert float(jnp.max(jnp.abs(g_grad(fake, 10)))) == 0.0
