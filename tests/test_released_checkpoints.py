"""Every released TiTok tokenizer converts: the official key lists with their shapes
(../shared/research/titok_state_dict_keys.txt, dumped from the released checkpoints) are fed to
the converter as zero arrays. Sizes are inferred from the shapes, every key must be consumed
and every tok1d parameter filled with the right shape, and the parameter count must equal the
official element count. (The weights themselves cannot be downloaded here.)"""

import os
import re

import jax
import numpy as np
import pytest
from conftest import REPO

from tok1d.weights.convert import titok

KEYS_FILE = os.environ.get("TOK1D_TITOK_KEYS", os.path.join(
    REPO, "..", "shared", "research", "titok_state_dict_keys.txt"))
TOKENIZERS = ["titok_l32_stage1", "titok_l32_stage2", "titok_b64_stage2", "titok_s128_stage2",
              "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k", "titok_ll32_vae_c16",
              "titok_bl64_vae_c16"]


def read_sections(path):
    sections, counts, current = {}, {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                current = line[3:].split(":")[0]
                sections[current] = {}
                m = re.search(r"([\d.]+)M elements", line)
                counts[current] = float(m.group(1)) if m else None
                continue
            parts = line.rstrip("\n").split("\t")
            if current and len(parts) == 3:
                shape = tuple(int(x) for x in re.findall(r"\d+", parts[1]))
                sections[current][parts[0]] = (shape, parts[2])
    return sections, counts


@pytest.fixture(scope="module")
def key_lists():
    if not os.path.exists(KEYS_FILE):
        pytest.skip(f"{KEYS_FILE} not found (set TOK1D_TITOK_KEYS)")
    return read_sections(KEYS_FILE)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_released_tokenizer_converts(key_lists, name):
    sections, counts = key_lists
    # Zero-stride views: no memory for the source tensors.
    sd = {k: np.broadcast_to(np.zeros((), np.dtype(dtype)), shape)
          for k, (shape, dtype) in sections[name].items()}
    kwargs = titok.infer_kwargs(sd)
    model = titok.TiTok(**kwargs)
    params = titok.convert_titok(sd, model, what=name)
    total = sum(x.size for x in jax.tree.leaves(params))
    assert total / 1e6 == pytest.approx(counts[name], abs=0.006)
    assert model.image_size == 256 and model.patch_size == 16
    legacy = "vq8k" not in name and "vae" not in name
    assert model.legacy_reshape == legacy and model.decoder_head == (
        "logits" if legacy else "pixels")
    assert model.pixel_decoder == name.endswith("stage2")
    assert model.quantizer == ("vae" if "vae" in name else "vq")
    assert model.encoder_heads == model.encoder_width // 64
