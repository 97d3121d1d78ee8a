"""Class-conditional sampling with a trained generator, decoded to pixels by its tokenizer.

    python -m tok1d.cli.sample --config=configs/maskgit_titok.py:l32 --checkpoint=WORKDIR_OR_DIR \
        --tokenizer=titok_l32/ --num_images=50000 --out=samples_l32/ [--config.sampling.x=v]

`--checkpoint` is a generator training workdir (its latest checkpoint, EMA params when kept)
or a pretrained directory (`python -m tok1d.cli.convert maskgit|gpt ...`); the model is built from
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

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing this module from
    a trainer does not clash with tok1d.main's --config)."""
    config_flags.DEFINE_config_file("config", None, "Generator config file (get_config()).",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Generator training workdir or pretrained dir.")
    flags.DEFINE_string("tokenizer", "", "Tokenizer (pretrained dir or workdir); default: "
                        "config.generator.tokenizer.")
    flags.DEFINE_integer("num_images", 50_000, "Number of images to sample.")
    flags.DEFINE_integer("batch_size", 0, "Global batch per step (0: 32 per device).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_integer("grid_classes", 10, "Classes (rows) in grid.png.")


def cyclic_labels(num_images: int, num_classes: int) -> np.ndarray:
    return (np.arange(num_images) % num_classes).astype(np.int32)


def load_generator(config, checkpoint: str):
    """(model, params) with params read from `checkpoint` and checked against the model."""
    import flax.linen as nn
    import jax
    from tok1d.weights import pretrained
    from tok1d.train import generator as gen_trainer
    model = gen_trainer.build_generator(config)
    shapes = jax.eval_shape(gen_trainer.init_generator(model, 1), jax.random.key(0))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(shapes))
    return model, pretrained.load_checked(
        checkpoint, shapes, f"the generator of the config ({config.model.name})")


def sample_images(config, model, params, tokenizer, tok_params, num_images: int,
                  batch_size: int, seed: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and their labels, sampled batch by batch over the mesh."""
    import jax
    import flax.linen as nn
    from tok1d import images as images_lib
    from tok1d import parallel
    from tok1d.train.generator import SampleDecoder
    mesh, rules, sharding = parallel.mesh_from_config(config)
    div = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = batch_size or 32 * jax.device_count()
    batch_size = -(-batch_size // div) * div
    labels = cyclic_labels(num_images, model.num_classes)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh,
                                                                   jax.sharding.PartitionSpec()))
        decoder = SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params, sharding)
        for pixels, valid in decoder.batches(params, labels, batch_size, seed, log):
            out.append(images_lib.to_uint8(parallel.host_array(pixels))[valid])
    return np.concatenate(out), labels


def class_grid(samples: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10
               ) -> np.ndarray:
    from tok1d import images as images_lib
    rows = []
    for c in range(num_classes):
        picked = samples[labels == c][:per_row]
        if len(picked):
            rows.append(picked)
    return images_lib.make_grid(rows)


def run(config, checkpoint: str, tokenizer_path: str, num_images: int, out: str,
        batch_size: int = 0, seed: int = 0, grid_classes: int = 10, log=print) -> dict[str, Any]:
    import jax
    from tok1d import images as images_lib
    from tok1d.cli.tokenize import load_tokenizer
    tokenizer_path = tokenizer_path or config.generator.tokenizer
    if not tokenizer_path:
        raise ValueError("No tokenizer: pass --tokenizer=DIR or set config.generator.tokenizer.")
    model, params = load_generator(config, checkpoint)
    tokenizer, tok_params = load_tokenizer(tokenizer_path)
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


def main(argv: Sequence[str]) -> Optional[int]:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in ("config", "checkpoint", "out"):
        if not getattr(FLAGS, name):
            print(f"--{name} is required.", file=sys.stderr)
            return 2
    from tok1d import parallel
    from tok1d.train import config_lib
    parallel.setup_process()  # TOK1D_DISTRIBUTED=1 on pods / SLURM; the compilation cache
    return config_lib.exit_status(lambda: run(
        FLAGS.config, FLAGS.checkpoint, FLAGS.tokenizer, FLAGS.num_images, FLAGS.out,
        FLAGS.batch_size, FLAGS.seed, FLAGS.grid_classes))


if __name__ == "__main__":
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
