"""The generator interface (tok1d.models.interfaces): MaskGIT and GPT implement it, the
objective picks the loss and the sampler, and a module that lacks a field is named; the
tokenizer trainer gets the AR probe (tok1d.probes.ar) from its caller."""

import flax.linen as nn
import pytest

from tok1d.generation import common
from tok1d.models import interfaces
from tok1d.models.generators import gpt, maskgit


def generators():
    kw = dict(num_tokens=8, num_classes=10)
    return [maskgit.build("vit", size="tiny", codebook_size=64, **kw),
            maskgit.build("uvit", size="tiny", codebook_size=64, **kw),
            gpt.build(vocab_size=64, width=32, depth=2, num_heads=2, **kw)]


def test_generators_implement_the_interface():
    objectives = []
    for model in generators():
        interfaces.check_generator(model)
        assert isinstance(model, interfaces.Generator)
        assert (model.vocab_size, model.num_tokens, model.null_label) == (64, 8, 10)
        assert isinstance(model, interfaces.MaskedGenerator) == (model.objective == "masked")
        assert common.SAMPLERS[model.objective] is not None
        objectives.append(model.objective)
    assert objectives == ["masked", "masked", "next_token"]


def test_a_module_without_the_interface_is_named():
    class NotAGenerator(nn.Module):
        objective = "masked"
        num_tokens: int = 8

    with pytest.raises(TypeError, match=r"lacks \['vocab_size', 'num_classes', 'null_label', "
                                        r"'mask_id'\]"):
        interfaces.check_generator(NotAGenerator())
    with pytest.raises(ValueError, match="No sampler for generator objective 'permuted'"):
        common.make_sampler(type("G", (), {"objective": "permuted"})())


def test_the_tokenizer_trainer_takes_the_ar_probe_by_injection(tmp_path):
    """ar_probe on without a probe factory: one clear config error before anything runs."""
    from tok1d.train import config_lib, tokenizer
    config = config_lib.base_config()
    config.ar_probe.every_steps = 4
    with pytest.raises(config_lib.ConfigError, match="no AR probe was given"):
        tokenizer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_bert_generator_drops_attention_probabilities_in_training_as_upstream():
    """The official ImageBert passes `attn_drop` (0.1 in maskgit.yaml) to BERT's
    attention_probs_dropout_prob: tok1d's MaskGITBert drops attention probabilities in training
    only, and the official config's value reaches it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tok1d.weights.convert import maskgit as convert_maskgit
    official = {"model": {"vq_model": {"codebook_size": 16, "num_latent_tokens": 4},
                          "generator": {"hidden_size": 16, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 32,
                                        "condition_num_classes": 3, "dropout": 0.0,
                                        "attn_drop": 0.5}}}
    kw = convert_maskgit.kwargs_from_official(official)
    assert kw["attention_dropout"] == 0.5 and kw["dropout_rate"] == 0.0
    kw.pop("arch")
    tokens, labels = jnp.array([[1, 16, 3, 16]]), jnp.array([2])

    def run(model, train, seed=0):
        params = model.init(jax.random.key(0), tokens, labels)["params"]
        return np.asarray(model.apply({"params": params}, tokens, labels, train=train,
                                      rngs={"dropout": jax.random.key(seed)}))

    model = maskgit.MaskGITBert(**kw)
    assert not np.allclose(run(model, True, 1), run(model, True, 2))
    np.testing.assert_array_equal(run(model, False, 1), run(model, False, 2))
    off = model.clone(attention_dropout=0.0)
    np.testing.assert_allclose(run(off, True, 1), run(off, False), rtol=1e-6, atol=1e-6)
    assert maskgit.MaskGITBert.attention_dropout == 0.1  # maskgit.yaml's attn_drop


def test_a_generator_predicting_codes_the_tokenizer_lacks_is_refused():
    """A sampled code beyond the tokenizer's codebook decodes to NaN pixels (black images, a
    failed FID): refused before sampling. Official pairs predict exactly the codebook (MaskGIT's
    [MASK] is an input id beyond vocab_size, not a predicted code)."""
    import types

    from tok1d import errors, models
    from tok1d.generation import decode

    titok = models.create("titok", image_size=32, patch_size=8, num_latent_tokens=8,
                          encoder_size="nano", decoder_size="nano", codebook_size=32, token_dim=8)
    for generator in generators():  # all predict 64 codes
        assert generator.vocab_size == 64
        with pytest.raises(errors.UserError, match="the generator predicts 64 codes but the "
                           "tokenizer has 32 .*NaN pixels"):
            decode.check_pair(generator, titok)
    masked = maskgit.build("vit", size="tiny", codebook_size=32, num_tokens=8, num_classes=10)
    assert masked.mask_id == 32
    decode.check_pair(masked, titok)  # its [MASK] id is no code it predicts
    decode.check_pair(types.SimpleNamespace(vocab_size=32, num_tokens=8), titok)
    # Its warnings are "Warning: ..." lines of the caller's log (as the CLI's others).
    said = []
    decode.check_pair(types.SimpleNamespace(vocab_size=32, num_tokens=4), titok, said.append)
    assert said == ["Warning: the generator samples 4 of the tokenizer's 8 tokens per image, and "
                    "the tokenizer was not trained with nested dropout: its decoded prefixes "
                    "may be poor images."]
