"""The official training loaders' image pipelines (torchvision `ImageFolder` + `DataLoader`),
rewritten from their descriptions, to run side by side with tok1d's grain pipeline on the same
files (`tok1d bench --workload=input`). torch and torchvision are imported only here
(`pip install -e '.[bench]' in tok1d's checkout`).

  random_crop (TiTok, bytedance/1d-tokenizer's `ImageTransform`): torchvision
      Resize(shorter side to S, bicubic, antialias) -> RandomCrop(S) -> RandomHorizontalFlip
      -> ToTensor -> Normalize(mean 0, std 1);
  center_crop (TiTok's eval transform): Resize -> CenterCrop -> ToTensor -> Normalize;
  adm_random_crop (GigaTok / LlamaGen: ADM's `random_crop_arr`, crop fraction 0.8..1): the
      shorter side drawn in [S, ceil(S / 0.8)], BOX halving while the image is at least twice
      that, a bicubic resize, a random square crop; RandomHorizontalFlip -> ToTensor ->
      Normalize(0.5, 0.5);
  random_resized_crop: torchvision RandomResizedCrop(S, scale=(min_scale, 1), bicubic)
      -> RandomHorizontalFlip -> ToTensor -> Normalize(0.5, 0.5).
The files are read by `ImageFolder`'s default loader (PIL, converted to RGB), batches collated
by the `DataLoader` (float32 NCHW tensors), shuffled by seeded `torch.randperm` epochs.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from typing import Sequence

import numpy as np
from PIL import Image


def import_torchvision():
    """`torchvision`, also where its compiled operators do not load: a torchvision wheel built
    for CUDA torch beside a CPU-only torch registers fake kernels of two operators its library
    failed to define (`torchvision::nms`, `qnms`) and fails on import. The transforms used here
    are pure Python on PIL images, so the two schemas are defined (without kernels) and the
    import is retried."""
    import torch  # Local import: optional dependency.
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.library = library  # keep the definitions alive
    import torchvision
    return torchvision


def adm_crop(image: Image.Image, size: int, min_crop_frac: float = 0.8,
             center: bool = False) -> Image.Image:
    """ADM's `random_crop_arr` (or `center_crop_arr` with `center`), drawing from Python's
    `random` module as the official code does."""
    shorter = size if center else random.randrange(size, math.ceil(size / min_crop_frac) + 1)
    while min(image.size) >= 2 * shorter:
        image = image.resize(tuple(v // 2 for v in image.size), resample=Image.BOX)
    scale = shorter / min(image.size)
    image = image.resize(tuple(round(v * scale) for v in image.size), resample=Image.BICUBIC)
    pixels = np.array(image)
    h, w = pixels.shape[:2]
    if center:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = random.randrange(h - size + 1), random.randrange(w - size + 1)
    return Image.fromarray(pixels[top:top + size, left:left + size])


def official_transform(augment: str, image_size: int, flip: bool = True,
                       min_scale: float = 0.8):
    """The official torchvision transform of a tok1d `data.augment` (see the module doc)."""
    transforms = import_torchvision().transforms
    bicubic = transforms.InterpolationMode.BICUBIC
    if augment == "random_crop":
        steps = [transforms.Resize(image_size, interpolation=bicubic, antialias=True),
                 transforms.RandomCrop(image_size)]
        norm = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    elif augment == "center_crop":
        steps = [transforms.Resize(image_size, interpolation=bicubic, antialias=True),
                 transforms.CenterCrop(image_size)]
        flip, norm = False, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    elif augment == "adm_random_crop":
        steps = [transforms.Lambda(lambda im: adm_crop(im, image_size, min_scale))]
        norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    elif augment == "random_resized_crop":
        steps = [transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                                              interpolation=bicubic, antialias=True)]
        norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    else:
        raise ValueError(f"Unknown augmentation {augment!r}.")
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(*norm)]
    return transforms.Compose(steps)


class _EndlessShuffle:
    """Shuffled epochs of `size` indices, back to back, without end (a torch `Sampler`); or,
    given `order`, those indices over and over."""

    def __init__(self, size: int, seed: int, order: Sequence[int] = ()):
        self.size, self.seed, self.order = size, seed, list(order)

    def __iter__(self):
        import torch  # Local import: optional dependency.
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from self.order or torch.randperm(self.size, generator=generator).tolist()


def official_loader(image_folder: str, *, augment: str, image_size: int, flip: bool,
                    min_scale: float, batch_size: int, num_workers: int, seed: int = 0,
                    order: Sequence[str] = ()):
    """A torch `DataLoader` over `ImageFolder(image_folder)` with the official transform of
    `augment`: shuffled batches without end (epochs repeat, as tok1d's training stream), from
    `num_workers` processes; with `order` (files relative to the folder, "class/name.jpg"),
    those files in that order, over and over (a benchmark reads the files tok1d reads).
    Endless, so that its workers refill their prefetch buffers after the batches a benchmark
    takes, as tok1d's pipeline does (a loader that stops after them leaves its last
    prefetched batches undone, and looks that much cheaper)."""
    import torch  # Local import: optional dependency.
    torchvision = import_torchvision()
    dataset = torchvision.datasets.ImageFolder(
        image_folder, transform=official_transform(augment, image_size, flip, min_scale))
    index = {os.path.relpath(path, image_folder).replace(os.sep, "/"): i
             for i, (path, _) in enumerate(dataset.samples)}
    missing = [name for name in order if name not in index]
    if missing:  # (e.g. a name that is not UTF-8, which `tok1d prepare` stores escaped)
        logging.warning("The official loader reads its own shuffle of %s: %d of the files "
                        "to read in order are not its images (e.g. %r).", image_folder,
                        len(missing), missing[0])
        order = ()
    sampler = _EndlessShuffle(len(dataset), seed, [index[name] for name in order])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=num_workers, drop_last=True)
