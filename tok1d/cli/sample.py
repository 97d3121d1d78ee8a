r"""Class-conditional sampling with a trained generator, decoded to pixels by its tokenizer.

    tok1d sample --config=configs/maskgit_titok.py:l32 --checkpoint=WORKDIR_OR_DIR \
        --tokenizer=titok_l32/ --num_images=50000 --out=samples_l32/ [--config.sampling.x=v]

`--checkpoint` is a generator training workdir (its latest checkpoint, EMA params when kept)
or a pretrained directory (`tok1d convert maskgit|gpt ...`); the model is built from
`--config` and the sampler options come from `config.sampling` (overridable on the command
line). `--tokenizer` (default `config.generator.tokenizer`) is a pretrained directory or a
tokenizer training workdir. Labels cycle through the classes (image i gets class
i mod num_classes, so 50000 images = 50 per ImageNet class, as the ADM / LlamaGen evaluations).

Writes OUT/samples.npz in the ADM evaluator's format (`arr_0`: uint8 (N, H, W, 3); `arr_1`:
int labels), OUT/grid.png (one row per class for the first classes) and OUT/sampling.json.
Batches are sharded over every device of every host; progress (images/s, ETA) is printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from tok1d import images as images_lib
from tok1d import parallel
from tok1d.cli import app
from tok1d.generation import common as gen_common
from tok1d.generation.decode import SampleDecoder
from tok1d.train import generator as gen_trainer
from tok1d.weights import loaders

USAGE = "--config=FILE --checkpoint=DIR --out=DIR [--tokenizer=DIR] [flags]"
CONFIG = "Generator config file (get_config()); its sampling section sets the sampler."
REQUIRED = ("config", "checkpoint", "out")
POSITIONAL = ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "Generator training workdir or pretrained dir.",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "Tokenizer (pretrained dir or workdir); default: "
                        "config.generator.tokenizer.", flag_values=fv)
    flags.DEFINE_integer("num_images", 50_000, "Number of images to sample.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "Global batch per step (0: 32 per device).",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("grid_classes", 10, "Classes (rows) in grid.png.", flag_values=fv)


def load_generator(config, checkpoint: str):
    """(model, params) with params read from `checkpoint` and checked against the model."""
    model = gen_trainer.build_generator(config)
    shapes = jax.eval_shape(gen_trainer.init_generator(model, 1), jax.random.key(0))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(shapes))
    return model, loaders.load_checked(
        checkpoint, shapes, f"the generator of the config ({config.model.name})")


def sample_images(config, model, params, tokenizer, tok_params, num_images: int,
                  batch_size: int, seed: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and their labels, sampled batch by batch over the mesh."""
    mesh, rules, sharding = parallel.mesh_from_config(config)
    div = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = batch_size or 32 * jax.device_count()
    batch_size = -(-batch_size // div) * div
    labels = gen_common.cyclic_labels(num_images, model.num_classes)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh,
                                                                   jax.sharding.PartitionSpec()))
        decoder = SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params,
                                sharding)
        for pixels, valid in decoder.batches(params, labels, batch_size, seed, log):
            out.append(images_lib.to_uint8(parallel.host_array(pixels))[valid])
    return np.concatenate(out), labels


def class_grid(samples: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10
               ) -> np.ndarray:
    rows = []
    for c in range(num_classes):
        picked = samples[labels == c][:per_row]
        if len(picked):
            rows.append(picked)
    return images_lib.make_grid(rows)


def run(config, checkpoint: str, tokenizer_path: str, num_images: int, out: str,
        batch_size: int = 0, seed: int = 0, grid_classes: int = 10, log=print) -> dict[str, Any]:
    tokenizer_path = tokenizer_path or config.generator.tokenizer
    if not tokenizer_path:
        raise ValueError("No tokenizer: pass --tokenizer=DIR or set config.generator.tokenizer.")
    model, params = load_generator(config, checkpoint)
    tokenizer, tok_params = loaders.load_tokenizer(tokenizer_path)
    t0 = time.time()
    samples, labels = sample_images(config, model, params, tokenizer, tok_params, num_images,
                                    batch_size, seed, log)
    seconds = time.time() - t0
    info = dict(num_images=int(num_images), seconds=seconds, images_per_second=num_images / seconds,
                checkpoint=checkpoint, tokenizer=tokenizer_path, seed=seed,
                model=config.model.to_dict(), sampling=config.sampling.to_dict())
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "samples.npz"), arr_0=samples, arr_1=labels)
        images_lib.save_png(os.path.join(out, "grid.png"),
                            class_grid(samples, labels, min(grid_classes, model.num_classes)))
        with open(os.path.join(out, "sampling.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)
        log(f"Wrote {num_images} samples to {out}/samples.npz and grid.png "
            f"({info['images_per_second']:.1f} img/s).")
    return info


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    parallel.setup_process()  # TOK1D_DISTRIBUTED=1 on pods / SLURM; the compilation cache
    run(fv.config, fv.checkpoint, fv.tokenizer, fv.num_images, fv.out, fv.batch_size, fv.seed,
        fv.grid_classes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
