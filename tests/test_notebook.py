"""notebooks/explore.ipynb runs top to bottom on CPU with tiny random models (no checkpoints):
its code cells are executed in order in a fresh Python process, figures drawn with the Agg
backend."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env

NOTEBOOK = os.path.join(REPO, "notebooks", "explore.ipynb")


def notebook_source(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in cells:  # plain Python: no shell escapes or magics that only Jupyter runs
        assert not any(line.lstrip().startswith(("!", "%")) for line in cell.splitlines())
    return "\n\n".join(cells)


@pytest.mark.parametrize("variant", ["default", "residual_vq"])
def test_notebook_runs_top_to_bottom(tmp_path, variant):
    """As shipped; and with a residual-VQ tokenizer (several codes per token: its codes were
    passed to decode_codes unflattened) and photos of the user's: 16-bit greyscale, a palette
    PNG and a phone's (EXIF orientation; `tok1d.images.read_rgb`)."""
    source = notebook_source(NOTEBOOK)
    if variant == "residual_vq":
        for old, new in (("token_dim=8)", 'token_dim=8, quantizer="residual_vq", '
                                          'quantizer_options={"depth": 2})'),
                         ("OWN_IMAGES = []", "OWN_IMAGES = {!r}".format(
                             [str(tmp_path / n) for n in ("grey16.png", "p.png", "phone.jpg")]))):
            assert source.count(old) == 1, old
            source = source.replace(old, new)
        ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
        Image.fromarray(ramp).save(tmp_path / "grey16.png")
        colour = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
        Image.fromarray(colour).quantize(colors=16).save(tmp_path / "p.png")
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(colour).save(tmp_path / "phone.jpg", exif=exif)
    script = tmp_path / "explore.py"
    script.write_text(source + "\n\nprint('NOTEBOOK DONE', samples.shape, influence.shape, "
                      "len(x))\n")
    env = subprocess_env(1)
    env["MPLBACKEND"] = "Agg"
    run = subprocess.run([sys.executable, str(script)], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "PSNR" in out and "SSIM" in out
    photos = 7 if variant == "residual_vq" else 4
    assert f"NOTEBOOK DONE (16, 64, 64, 3) (16, 64, 64) {photos}" in out, out[-2000:]
