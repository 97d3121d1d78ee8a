"""GigaTok's released sizes: parameter counts of every preset equal the official ones, and the
released B-L state_dict key list converts completely (shapes only: no weights here)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from tok1d import models
from tok1d.convert import gigatok as convert_gigatok

OFFICIAL_MILLIONS = {"s_s": 136.07, "s_b": 232.40, "b_l": 621.64, "xl_xxl": 2893.97,
                     "s_b_2d": 197.13, "b_l_2d": 491.41}
KEYS = os.path.join(REPO, "..", "shared", "research", "gigatok_bl256_state_dict_keys.tsv")


def abstract_params(model):
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


@pytest.mark.parametrize("preset", sorted(OFFICIAL_MILLIONS))
def test_parameter_counts(preset):
    model = models.create("gigatok", preset=preset)
    total = sum(x.size for x in jax.tree.leaves(abstract_params(model)))
    assert total / 1e6 == pytest.approx(OFFICIAL_MILLIONS[preset], abs=0.006)


def test_released_b_l_key_list_converts():
    if not os.path.exists(KEYS):
        pytest.skip(f"{KEYS} not found")
    sd = {}
    with open(KEYS, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                shape = tuple(int(x) for x in re.findall(r"\d+", parts[1]))
                sd[parts[0]] = np.broadcast_to(np.zeros((), np.dtype(parts[2])), shape)
    model = models.create("gigatok", preset="b_l")
    params = convert_gigatok.convert_gigatok(sd, model, what="VQ_BL256")
    total = sum(x.size for x in jax.tree.leaves(params))
    assert total / 1e6 == pytest.approx(OFFICIAL_MILLIONS["b_l"], abs=0.006)
