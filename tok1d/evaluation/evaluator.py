"""Streaming image metrics over sharded batches: the one place where images become FID, IS,
precision/recall, PSNR, SSIM and LPIPS numbers (the eval job `python -m tok1d.cli.evaluate`, the
evals inside training and the demo all use it).

    nets = load_metric_nets(config.evaluation, config.perceptual.weights)
    metrics = ImageMetrics(nets, mesh)
    for batch in ...:                        # global arrays sharded along the batch axis
        metrics.add_pairs(batch["image"], recon, batch["mask"])     # reconstruction
        # or metrics.add_fake(samples) (+ metrics.add_real(...) / set_reference(mu, sigma))
    metrics.result()   # {"psnr", "ssim", "lpips", "fid", "inception_score", ...}

Networks run jitted on the accelerators, sharded like the batch; their outputs are gathered to
every host (`parallel.host_array`) and reduced there in float64, batch after batch in dataset
order, so the numbers do not depend on how many devices or hosts computed them. Rows with
mask 0 (the padding of the last batch) are dropped before anything is counted.

FID compares the Inception pool features of the generated / reconstructed images ("fake")
with those of the real images given to `add_real` / `add_pairs`, or with reference statistics
(`set_reference`, e.g. the ADM reference batch); precision / recall (k=3) use the features of
the same two sets; IS uses the fake images' 1008-way softmax of the fc without its bias (as
ADM's evaluator). The feature networks see the images rounded to 8-bit levels.

The feature network is a parameter (`MetricNets.inception`): any module returning a dict with
its feature vector under "pool3" (the Inception) or "features" (e.g. the demo's digit
classifier, tok1d.evaluation.digit_features) and class logits under "logits";
`MetricNets.feature_dim` is the feature size. With the fake images' labels (`add_fake(...,
labels=)`, `generation_metrics(..., labels=)`), the result also holds "diversity" (mean pairwise
feature distance within a class, `precision_recall.intra_class_diversity`) and, when the
network classifies those labels (`labels_are_classes`), "class_accuracy".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tok1d import images as images_lib
from tok1d import errors, parallel, summary
from tok1d.data import feeding, pipeline, sources
from tok1d.evaluation import fid as fid_lib
from tok1d.evaluation.image_metrics import pixel_metrics
from tok1d.evaluation.precision_recall import intra_class_diversity, precision_recall
from tok1d.models.frozen import inception as inception_lib
from tok1d.models.frozen import perceptual as perceptual_nets
from tok1d.weights import loaders, registry
from tok1d.weights import perceptual as perceptual_files

FEATURE_DIM = 2048
NO_REFERENCE = ("gFID needs a reference: evaluation.reference (--reference=FILE: the ADM "
                "reference batch VIRTUAL_imagenet256_labeled.npz, or statistics / images in a "
                ".npz) or a config whose data.name / data.eval_split hold the real images.")

_HOW_TO_GET_INCEPTION = (
    "FID / IS / precision-recall need the FID InceptionV3: pass "
    "--config.evaluation.inception=inception_fid (downloaded and converted once), or download "
    "pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases), convert "
    "it with `tok1d convert inception_fid "
    "--checkpoint=pt_inception-2015-12-05-6726825d.pth --out=DIR` "
    "and pass --config.evaluation.inception=DIR")


@dataclasses.dataclass
class MetricNets:
    """Frozen networks of the metrics (None: that metric is skipped) and why any is missing.

    `inception` is the feature network (module, params) of FID / IS / precision / recall:
    the FID Inception or another one with `feature_dim` features (see the module docstring);
    `labels_are_classes`: its logits classify the generator's labels (class_accuracy)."""

    inception: Optional[tuple[nn.Module, Any]] = None
    lpips: Optional[tuple[nn.Module, Any]] = None
    notes: list[str] = dataclasses.field(default_factory=list)
    feature_dim: int = FEATURE_DIM
    labels_are_classes: bool = False

    @property
    def is_inception(self) -> bool:
        """Whether the feature network is the FID Inception (its IS is the Inception Score)."""
        return self.inception is not None and isinstance(self.inception[0],
                                                         inception_lib.FIDInceptionV3)


def require_inception(ecfg, what: str) -> None:
    """A UserError naming `what` and how to get the FID Inception when `ecfg` (a config's
    `evaluation`) names none: before `load_metric_nets`, whose note would say it again."""
    if not (ecfg.inception or ecfg.allow_random_init):
        raise errors.UserError(f"{what}: {_HOW_TO_GET_INCEPTION}.")


def load_metric_nets(ecfg, perceptual_weights: str = "", log=print,
                     lpips: bool = True) -> MetricNets:
    """The Inception / LPIPS networks named by a config's `evaluation` section (`lpips`
    False: the Inception only, for generated images, which have no pairs to compare).

    A missing network is not an error (its metrics are left out and a note says how to add
    them), except that a path that is given must load."""
    nets = MetricNets()
    size = ecfg.inception_size
    convention = ecfg.get("inception_input", "tf1")
    if ecfg.inception:
        nets.inception = loaders.load_inception(ecfg.inception, input_size=size,
                                                input_convention=convention)
    elif ecfg.allow_random_init:
        nets.inception = (inception_lib.FIDInceptionV3(input_size=size,
                                                       input_convention=convention),
                          inception_lib.random_params(0))
        nets.notes.append("Inception weights are RANDOM (evaluation.allow_random_init): "
                          "FID / IS / precision-recall are smoke-test numbers only.")
    else:
        nets.notes.append(_HOW_TO_GET_INCEPTION + ".")

    lpips_path = ecfg.lpips or _lpips_file(perceptual_weights)
    if not lpips:
        pass
    elif lpips_path or ecfg.allow_random_init:
        params = loaders.load_perceptual(("lpips",), lpips_path, allow_random_init=True)
        nets.lpips = (perceptual_nets.build_module("lpips"), params["lpips"])
        if not lpips_path:
            nets.notes.append("LPIPS weights are RANDOM (evaluation.allow_random_init).")
    else:
        nets.notes.append("LPIPS needs the LPIPS-VGG weights: --config.evaluation.lpips="
                          "lpips_vgg (downloaded and converted once), or a DIR written by "
                          "`tok1d convert lpips ...`.")
    if size != inception_lib.INPUT_SIZE:
        nets.notes.append(f"The Inception sees {size}-px images (evaluation.inception_size), "
                          "not the 299 px that define FID: not comparable with published FIDs.")
    for note in nets.notes:
        log(note)
    return nets


def _lpips_file(weights: str) -> str:
    """The converted LPIPS file among `weights` (perceptual.weights), else "". Only its LPIPS
    parts are resolved (paths, and released names of kind lpips: nothing else is fetched or
    converted for the evaluation); a name that is not released is an error (UnknownName)."""
    paths = []
    for part in (p.strip() for p in str(weights or "").split(",") if p.strip()):
        if os.path.exists(part):
            paths.append(part)
        elif registry.looks_like_a_name(part) and registry.get(part).kind == "lpips":
            paths.append(loaders.resolve(part))
    if not paths:
        return ""
    try:
        return perceptual_files.resolve_weight_files(",".join(paths), ("lpips",))["lpips"]
    except (FileNotFoundError, ValueError):
        return ""


class ImageMetrics:
    """Accumulates the metrics of a stream of image batches (see the module docstring)."""

    def __init__(self, nets: MetricNets, mesh: jax.sharding.Mesh, *,
                 precision_recall: bool = True, is_splits: int = 10, is_split_size: int = 0,
                 chunk_size: int = 8,
                 fid_method: str = "eigh", precision_recall_float16: bool = False,
                 pixel_convention: str = "standard", sfid: bool = True):
        self.nets = nets
        self.sfid = sfid
        self.pixel_convention = pixel_convention
        self.adm_float16 = precision_recall_float16
        self.fid_method = fid_method
        self.mesh = mesh
        self.chunk_size = chunk_size
        self.precision_recall = precision_recall and nets.inception is not None
        self.is_splits, self.is_split_size = is_splits, is_split_size
        replicated = NamedSharding(mesh, P())
        self._sums: dict[str, float] = {}
        self._count = 0
        self.real = fid_lib.FeatureStats(nets.feature_dim)
        self.fake = fid_lib.FeatureStats(nets.feature_dim)
        # ADM's sFID: the Inception's "spatial" features (created at the first batch; None for
        # a feature network without them)
        self.real_spatial: Optional[fid_lib.FeatureStats] = None
        self.fake_spatial: Optional[fid_lib.FeatureStats] = None
        self._reference_spatial: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._labels: list[np.ndarray] = []
        self._real_pool: list[np.ndarray] = []
        self._fake_pool: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._reference: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._reference_pool: Optional[np.ndarray] = None

        self._inception_params = self._lpips_params = None
        if nets.inception is not None:
            self._inception_params = jax.device_put(nets.inception[1], replicated)
        if nets.lpips is not None:
            self._lpips_params = jax.device_put(nets.lpips[1], replicated)

    def _compiled(self, kind: str, model, x: jax.Array):
        """The jitted per-device function of `kind` for the sharding of the batch `x`."""
        sharding = x.sharding if isinstance(x.sharding, NamedSharding) else None
        mesh = sharding.mesh if sharding is not None else self.mesh
        spec = tuple(sharding.spec)[:1] if sharding is not None else ()
        local = x.shape[0] // _axis_size(mesh, spec)
        chunk = math.gcd(self.chunk_size, local) if self.chunk_size > 0 else local
        num_arrays = 1 if kind == "inception" else 2
        return _chunked_fn(kind, model, mesh, P(*spec), chunk, num_arrays)

    def _features(self, images: jax.Array):
        fn = self._compiled("inception", self.nets.inception[0], images)
        return fn(self._inception_params, images)

    def _pair_metrics(self, real: jax.Array, recon: jax.Array):
        lpips = self.nets.lpips[0] if self.nets.lpips is not None else None
        return self._compiled(f"pairs:{self.pixel_convention}", lpips, real)(
            self._lpips_params, real, recon)

    @classmethod
    def from_config(cls, nets: MetricNets, mesh, ecfg) -> "ImageMetrics":
        """With the options of a config's `evaluation` section."""
        return cls(nets, mesh, precision_recall=ecfg.precision_recall, is_splits=ecfg.is_splits,
                   is_split_size=ecfg.get("is_split_size", 0),
                   chunk_size=ecfg.chunk_size, fid_method=ecfg.fid_method,
                   precision_recall_float16=ecfg.get("precision_recall_float16", False),
                   pixel_convention=ecfg.get("pixel_metrics", "standard"),
                   sfid=ecfg.get("sfid", True))

    # ------------------------------------------------------------------ input

    @staticmethod
    def _keep(images: jax.Array, mask: Optional[jax.Array]) -> np.ndarray:
        if mask is None:
            return np.ones(images.shape[0], bool)
        return np.asarray(parallel.host_array(mask)).astype(bool)

    def _inception(self, images: jax.Array, keep: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(pool features, class probabilities, spatial features or None) of the kept rows
        (the spatial ones stay on the device when sFID is off)."""
        out = self._features(images)
        spatial = out.get("spatial") if self.sfid else None
        return (parallel.host_array(out["pool"])[keep].astype(np.float64),
                parallel.host_array(out["probs"])[keep],
                None if spatial is None else parallel.host_array(spatial)[keep])

    @staticmethod
    def _add_spatial(stats: Optional[fid_lib.FeatureStats], spatial: Optional[np.ndarray]
                     ) -> Optional[fid_lib.FeatureStats]:
        if spatial is None:
            return stats
        stats = fid_lib.FeatureStats(spatial.shape[-1]) if stats is None else stats
        return stats.update(spatial)

    def add_real(self, images: jax.Array, mask: Optional[jax.Array] = None) -> None:
        """Real images (NHWC in [0, 1], global array): the FID / recall reference."""
        self._add_real(images, self._keep(images, mask))

    def add_fake(self, images: jax.Array, mask: Optional[jax.Array] = None,
                 labels: Optional[np.ndarray] = None) -> None:
        """Generated or reconstructed images: FID, IS and precision; with their class labels
        (host array, one per valid row, in order) also diversity / class accuracy."""
        keep = self._keep(images, mask)
        if labels is not None:
            labels = np.asarray(labels)
            if len(labels) != int(keep.sum()):
                raise ValueError(f"{len(labels)} labels for {int(keep.sum())} valid images.")
            self._labels.append(labels)
        self._add_fake(images, keep)

    def add_pairs(self, real: jax.Array, recon: jax.Array,
                  mask: Optional[jax.Array] = None) -> None:
        """Inputs and their reconstructions: PSNR, SSIM, LPIPS and rFID (recon vs real)."""
        keep = self._keep(real, mask)
        for name, values in self._pair_metrics(real, recon).items():
            values = parallel.host_array(values).astype(np.float64)[keep]
            self._sums[name] = self._sums.get(name, 0.0) + float(values.sum())
        self._add_real(real, keep)
        self._add_fake(recon, keep)

    def _add_real(self, images: jax.Array, keep: np.ndarray) -> None:
        if self.nets.inception is None:
            return
        pool, _, spatial = self._inception(images, keep)
        self.real.update(pool)
        self.real_spatial = self._add_spatial(self.real_spatial, spatial)
        if self.precision_recall:
            self._real_pool.append(pool.astype(np.float32))

    def _add_fake(self, images: jax.Array, keep: np.ndarray) -> None:
        self._count += int(keep.sum())
        if self.nets.inception is None:
            return
        pool, probs, spatial = self._inception(images, keep)
        self.fake.update(pool)
        self.fake_spatial = self._add_spatial(self.fake_spatial, spatial)
        self._probs.append(probs.astype(np.float64))
        if self.precision_recall or self._labels:
            self._fake_pool.append(pool.astype(np.float32))

    def set_reference(self, mu: np.ndarray, sigma: np.ndarray,
                      features: Optional[np.ndarray] = None,
                      spatial: Optional[tuple[np.ndarray, np.ndarray]] = None) -> None:
        """Reference statistics for FID (instead of the real images given here) and optionally
        reference pool features for precision / recall and the spatial statistics of sFID
        (an ADM reference batch's mu_s, sigma_s)."""
        self._reference = (np.asarray(mu, np.float64), np.asarray(sigma, np.float64))
        if features is not None:
            self._reference_pool = np.asarray(features, np.float32)
        if spatial is not None:
            self._reference_spatial = tuple(np.asarray(a, np.float64) for a in spatial)

    # ------------------------------------------------------------------ output

    def _reference_stats(self, reference: Optional[tuple[np.ndarray, np.ndarray]],
                         real: Optional[fid_lib.FeatureStats]
                         ) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """What the fake statistics are compared with: the set reference's `reference` when a
        reference is set, else the real images' (None with fewer than two)."""
        return reference if self._reference is not None else _mean_cov(real)

    def _sfid(self) -> Optional[float]:
        """ADM's sFID: the Frechet distance of the spatial features against the reference's
        (its mu_s / sigma_s) or the real images'; None without them, or when the reference's
        were taken at another Inception input size (another number of features)."""
        fake = _mean_cov(self.fake_spatial)
        if fake is None:
            return None
        ref = self._reference_stats(self._reference_spatial, self.real_spatial)
        if ref is None or ref[0].shape != fake[0].shape:
            return None
        return fid_lib.frechet_distance(*fake, *ref, method=self.fid_method)

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {"num_images": float(self._count)}
        for name, total in self._sums.items():
            out[name] = total / max(self._count, 1)
        if self.nets.inception is None or self.fake.count < 2:
            return out
        ref = self._reference_stats(self._reference, self.real)
        if ref is not None:
            mu_f, sigma_f = self.fake.mean_cov()
            out["fid"] = fid_lib.frechet_distance(mu_f, sigma_f, *ref, method=self.fid_method)
        sfid = self._sfid()
        if sfid is not None:
            out["sfid"] = sfid
        probs = np.concatenate(self._probs)
        splits = min(self.is_splits, len(probs))
        out["inception_score"], out["inception_score_std"] = fid_lib.inception_score(
            probs, splits, self.is_split_size)
        real_pool = (self._reference_pool if self._reference_pool is not None
                     else (np.concatenate(self._real_pool) if self._real_pool else None))
        k = 3  # neighbours of the manifold estimate; both sets need more than k points
        if (self.precision_recall and real_pool is not None and len(real_pool) > k
                and self.fake.count > k):
            pr = precision_recall(real_pool, np.concatenate(self._fake_pool), k=k,
                                  adm_float16=self.adm_float16)
            out["precision"], out["recall"] = float(pr["precision"]), float(pr["recall"])
        if self._labels:
            labels = np.concatenate(self._labels)
            out["diversity"] = intra_class_diversity(np.concatenate(self._fake_pool), labels)
            if self.nets.labels_are_classes:
                out["class_accuracy"] = float(np.mean(probs.argmax(-1) == labels))
        return out


def _mean_cov(stats: Optional[fid_lib.FeatureStats]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """`stats.mean_cov()`, or None without stats or with fewer than two features."""
    return stats.mean_cov() if stats is not None and stats.count >= 2 else None


def _inception_outputs(model):
    """(params, images in [0, 1]) -> {"pool": features, "probs": class probabilities, and the
    Inception's "spatial" sFID features where it has them}. The images are rounded to
    8-bit levels first, as every official path sees them (ADM's .npz of PNGs; TiTok's rFID
    rounds its reconstructions), so generated, reconstructed and stored images score alike;
    the probabilities are those of the fc without its bias where the network has them (the
    Inception Score of ADM's evaluator and torch-fidelity)."""
    def features(p, x):
        x = jnp.round(jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * 255.0) / 255.0
        out = model.apply({"params": p}, x)
        result = {"pool": out["pool3"] if "pool3" in out else out["features"],
                  "probs": jax.nn.softmax(out.get("logits_unbiased", out["logits"]), axis=-1)}
        if "spatial" in out:
            result["spatial"] = out["spatial"]
        return result
    return features


def _pair_outputs(lpips, convention: str):
    def pair_metrics(lp, real, recon):
        out = pixel_metrics(recon, real, convention)
        if lpips is not None:  # GigaTok's LPIPS reads the decoder output unclipped
            x = recon if convention == "gigatok" else jnp.clip(recon, 0.0, 1.0)
            out["lpips"] = lpips.apply({"params": lp}, x, real)
        return out
    return pair_metrics


@functools.lru_cache(maxsize=64)
def _chunked_fn(kind: str, model, mesh, batch_spec: P, chunk: int, num_arrays: int):
    """jit(shard_map(...)): each device runs the metric network over its rows in `chunk`-image
    pieces (`lax.map`), so a row's numbers are computed by the same program whatever the mesh.
    Cached by (kind, model, mesh, spec, chunk): evals during training compile once."""
    fn = (_inception_outputs(model) if kind == "inception"
          else _pair_outputs(model, kind.partition(":")[2]))

    def per_device(p, *arrays):
        k = arrays[0].shape[0] // chunk
        split = tuple(a.reshape((k, chunk) + a.shape[1:]) for a in arrays)
        # Full float32 convolutions and matmuls on every backend (TPUs default to one bf16
        # pass, recent GPUs to TF32): the metrics are the same numbers wherever they run.
        with jax.default_matmul_precision("highest"):
            out = jax.lax.map(lambda xs: fn(p, *xs), split)
        return jax.tree.map(lambda t: t.reshape((k * chunk,) + t.shape[2:]), out)

    return jax.jit(jax.shard_map(per_device, mesh=mesh,
                                 in_specs=(P(),) + (batch_spec,) * num_arrays,
                                 out_specs=batch_spec))


def _axis_size(mesh, spec_entry: tuple) -> int:
    """Devices the batch axis is split over (spec_entry: the first entry of a PartitionSpec)."""
    axes = spec_entry[0] if spec_entry else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def numpy_batches(images: np.ndarray, batch_size: int, sharding: NamedSharding
                  ) -> Iterator[tuple[jax.Array, jax.Array]]:
    """(global images in [0, 1], global mask) batches of a host array that every host holds
    (e.g. an ADM .npz's uint8 `arr_0`); the last batch is padded with mask-0 rows."""
    start, stop = parallel.host_batch_slice(sharding, batch_size)
    for i in range(0, len(images), batch_size):
        chunk = np.asarray(images[i:i + batch_size])
        valid = np.arange(batch_size) < len(chunk)
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                                    chunk.dtype)])
        local = {"image": _to_unit(chunk[start:stop]), "mask": valid[start:stop]}
        batch = parallel.global_batch(local, sharding, batch_size)
        yield batch["image"], batch["mask"]


def _to_unit(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.asarray(x, np.float32)


def load_npz_images(path: str, key: str = "arr_0") -> np.ndarray:
    """NHWC images of an ADM-style .npz (uint8 `arr_0`), checked for shape and range."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Images (.npz) not found: {path}")
    try:
        with np.load(path) as z:
            files = list(z.files)
            images = z[key] if key in files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # damaged or truncated
        raise ValueError(f"{path} is not a readable .npz of images "
                         f"({errors.brief(e, 120)})") from None
    if images is None:
        raise ValueError(f"{path}: no {key!r} array (found {sorted(files)}); expected uint8 "
                         "images (N, H, W, 3) as tok1d.cli.sample / the ADM suite write.")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: {key} has shape {images.shape}; expected (N, H, W, 3).")
    if images.dtype != np.uint8 and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{path}: {key} is {images.dtype} outside [0, 1]; expected uint8 "
                         "or floats in [0, 1].")
    return images


# ---------------------------------------------------------------------------- references


@dataclasses.dataclass
class Reference:
    """FID reference statistics and (optionally) pool features for precision / recall; no
    statistics (`mu` None) without a feature network (`load_reference`)."""

    mu: Optional[np.ndarray]
    sigma: Optional[np.ndarray]
    features: Optional[np.ndarray] = None
    source: str = ""
    spatial: Optional[tuple[np.ndarray, np.ndarray]] = None  # sFID's (mu_s, sigma_s)
    count: int = 0  # images behind the statistics (0: not known, e.g. ADM's mu / sigma)

    def apply(self, metrics: ImageMetrics) -> None:
        if self.mu is not None:
            metrics.set_reference(self.mu, self.sigma, self.features, self.spatial)

    def save(self, path: str, ecfg, nets: MetricNets) -> None:
        """The statistics to `path` (`fid.save_statistics`: ADM's keys, the pool features when
        kept, and what they were computed with, which `reference_from_file` checks)."""
        meta = dict(reference_meta(ecfg, nets), source=self.source, count=int(self.count),
                    inception=str(ecfg.inception or "random"))
        fid_lib.save_statistics(path, self.mu, self.sigma, spatial=self.spatial,
                                features=self.features, meta=meta)

    def notes(self, ecfg, nets: MetricNets) -> list[str]:
        """What the report should say about metrics this reference cannot give (nothing
        without a feature network: `MetricNets.notes` says how to add one)."""
        notes = []
        if nets.inception is None:
            return notes
        if ecfg.precision_recall and self.features is None:
            notes.append(f"No precision / recall: the reference {self.source} has neither "
                         "pool features nor images.")
        want = spatial_dim(nets) if ecfg.get("sfid", True) else None
        if want is not None and self.spatial is None:
            notes.append(f"No sFID: the reference {self.source} has no spatial statistics "
                         "(mu_s, sigma_s; e.g. pytorch-fid's statistics).")
        elif want is not None and len(self.spatial[0]) != want:
            notes.append(f"No sFID: the reference {self.source} has {len(self.spatial[0])} "
                         f"spatial features; the Inception at evaluation.inception_size gives "
                         f"{want}.")
        return notes


def spatial_dim(nets: MetricNets) -> Optional[int]:
    """The size of the feature network's sFID features (None: it has none)."""
    if nets.inception is None:
        return None
    model, params = nets.inception
    shapes = jax.eval_shape(_inception_outputs(model), params,
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    return shapes["spatial"].shape[-1] if "spatial" in shapes else None


# What a saved reference's statistics depend on beside the images (`reference_meta`): a file
# made under other values would give FIDs silently off, so loading it against them is an error.
REFERENCE_INPUTS = ("feature_net", "feature_dim", "random_weights", "inception_input",
                    "inception_size")


def reference_meta(ecfg, nets: MetricNets) -> dict[str, Any]:
    """What the statistics are computed with ({} without a feature network); for the FID
    Inception also its weights' kind and input settings, read from the module itself."""
    if nets.inception is None:
        return {}
    model = nets.inception[0]
    meta = {"feature_net": type(model).__name__, "feature_dim": nets.feature_dim}
    if nets.is_inception:
        meta.update(random_weights=not ecfg.inception, inception_input=model.input_convention,
                    inception_size=int(model.input_size))
    return meta


def _reference_files(path: str) -> set[str]:
    """The array names of the reference .npz at `path`; one clear error for a missing,
    damaged, truncated or non-.npz file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference not found: {path}")
    try:
        with np.load(path) as z:
            return set(z.files)
    except (OSError, ValueError, EOFError, AttributeError, TypeError,
            zipfile.BadZipFile) as e:  # damaged, truncated, or a .npy (no context manager)
        raise ValueError(f"FID reference {path} is not a readable .npz "
                         f"({errors.brief(e, 120)})") from None


def check_reference_file(path: str, ecfg, nets: MetricNets) -> None:
    """A ValueError when the `Reference.save` file at `path` was computed with other
    `REFERENCE_INPUTS` than `ecfg` and `nets` use (files without a record pass); a
    FileNotFoundError / ValueError for a missing or unreadable file."""
    _reference_files(path)
    _check_reference_meta(path, fid_lib.load_meta(path), ecfg, nets)


def _check_reference_meta(path: str, saved: dict[str, Any], ecfg, nets: MetricNets) -> None:
    now = reference_meta(ecfg, nets)
    for key in REFERENCE_INPUTS:
        if key in saved and key in now and saved[key] != now[key]:
            raise ValueError(f"{path} was computed with {key}={saved[key]!r}; this evaluation "
                             f"uses {now[key]!r} (recompute it with tok1d evaluate "
                             "--save_reference).")


def reference_from_batches(nets: MetricNets, mesh, batches, ecfg, source: str = "",
                           progress: Optional[summary.ProgressReporter] = None) -> Reference:
    """Statistics of real images given as (global images, global mask) batches."""
    metrics = ImageMetrics.from_config(nets, mesh, ecfg)
    for i, (images, mask) in enumerate(batches):
        metrics.add_real(images, mask)
        if progress is not None:
            progress.update(i + 1)
    mu, sigma = metrics.real.mean_cov()
    pool = np.concatenate(metrics._real_pool) if metrics._real_pool else None
    return Reference(mu, sigma, pool, source, _mean_cov(metrics.real_spatial),
                     metrics.real.count)


def reference_from_file(path: str, nets: MetricNets, mesh, sharding: NamedSharding,
                        batch_size: int, ecfg) -> Reference:
    """An ADM reference batch (`mu`, `sigma` and uint8 `arr_0` images, e.g.
    VIRTUAL_imagenet256_labeled.npz), a `Reference.save` file (mu, sigma, mu_s, sigma_s,
    features, meta) or a plain image .npz (arr_0 only). FID uses the file's mu / sigma when
    present; for precision / recall its `features`, else its images run through the Inception.
    A saved file made with another feature network or Inception input is an error."""
    files = _reference_files(path)
    if not ({"mu", "sigma"} <= files or "arr_0" in files):
        raise ValueError(f"{path}: neither FID statistics (mu, sigma) nor images (arr_0); "
                         f"found {sorted(files)}.")
    meta = fid_lib.load_meta(path)
    _check_reference_meta(path, meta, ecfg, nets)
    ref = None
    if {"mu", "sigma"} <= files:
        mu, sigma = fid_lib.load_reference(path)
        if mu.shape != (nets.feature_dim,):
            raise ValueError(f"{path}: mu has shape {mu.shape}; the feature network's "
                             f"features have {nets.feature_dim} dimensions.")
        ref = Reference(mu, sigma, None, path, fid_lib.load_spatial_reference(path),
                        meta.get("count", 0))
        if ecfg.precision_recall and "features" in files:
            ref.features = _saved_features(path, nets.feature_dim)
            return ref
        if not (ecfg.precision_recall and "arr_0" in files):
            return ref
    images = load_npz_images(path)
    from_images = reference_from_batches(nets, mesh, numpy_batches(images, batch_size, sharding),
                                         ecfg, path)
    if ref is None:
        return from_images
    ref.features = from_images.features
    ref.spatial = ref.spatial or from_images.spatial
    ref.count = ref.count or from_images.count
    return ref


def _saved_features(path: str, dim: int) -> np.ndarray:
    with np.load(path) as z:
        features = np.asarray(z["features"], np.float32)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"{path}: features have shape {features.shape}; expected (N, {dim}).")
    return features


def reference_from_data(dcfg, nets: MetricNets, mesh, sharding: NamedSharding, batch_size: int,
                        ecfg, log=None) -> Reference:
    """Statistics of a config's `data.eval_split` (center crops at `data.image_size`, the first
    `data.eval_examples`), e.g. the 50k ImageNet validation images."""
    src = sources.get_source(dcfg.name, dcfg.eval_split, data_dir=dcfg.data_dir,
                             demo_size=dcfg.demo_size, image_size=dcfg.image_size)
    start, stop = parallel.host_batch_slice(sharding, batch_size)
    ds, num_batches = pipeline.eval_dataset(src, global_batch=batch_size, host_start=start,
                                            host_stop=stop, image_size=dcfg.image_size,
                                            num_examples=dcfg.eval_examples,
                                            resize_on=dcfg.resize_on,
                                            resize_rule=pipeline.resize_rule_of(dcfg))
    feeder = feeding.Feeder(iter(ds), sharding, batch_size)
    batches = ((b["image"], b["mask"]) for b in (next(feeder) for _ in range(num_batches)))
    source = f"{dcfg.name}:{dcfg.eval_split}"
    progress = None
    if log is not None:
        log(f"FID reference: the Inception features of {source} ({num_batches} batches of "
            f"{batch_size}).")
        progress = summary.ProgressReporter(num_batches, batch_size=batch_size,
                                            every_secs=30.0, print_fn=log)
    return reference_from_batches(nets, mesh, batches, ecfg, source, progress)


def load_reference(ecfg, dcfg, nets: MetricNets, mesh, sharding: NamedSharding,
                   batch_size: int, log=None) -> Reference:
    """`evaluation.reference` when set, else the statistics of the data's eval split (its
    progress through `log`); none without a feature network (the metrics that need one are
    left out, and `MetricNets.notes` says how to add it)."""
    if nets.inception is None:
        return Reference(None, None, source="none (no feature network)")
    if ecfg.reference:
        return reference_from_file(ecfg.reference, nets, mesh, sharding, batch_size, ecfg)
    if dcfg.name == "demo":
        raise ValueError(NO_REFERENCE)
    return reference_from_data(dcfg, nets, mesh, sharding, batch_size, ecfg, log)


def generation_metrics(nets: MetricNets, mesh, reference: Reference, batches, ecfg,
                       keep: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None
                       ) -> tuple[dict[str, float], np.ndarray]:
    """gFID / IS / precision / recall of generated (global images, mask) batches against
    `reference` (with the images' `labels` in stream order, also diversity / class accuracy);
    also returns, as uint8, the images whose position in the stream (counting valid rows only)
    is True in `keep` (for the report's grid)."""
    metrics = ImageMetrics.from_config(nets, mesh, ecfg)
    reference.apply(metrics)
    kept: list[np.ndarray] = []
    seen = 0
    for images, mask in batches:
        valid = np.asarray(parallel.host_array(mask), bool)
        n = int(valid.sum())
        metrics.add_fake(images, mask, None if labels is None else labels[seen:seen + n])
        if keep is not None and keep[seen:seen + n].any():
            rows = parallel.host_array(images)[valid][keep[seen:seen + n]]
            kept.append(images_lib.to_uint8(rows))
        seen += n
    out = metrics.result()
    if "fid" in out:
        out["gfid"] = out.pop("fid")
    return out, (np.concatenate(kept) if kept else np.zeros((0, 1, 1, 3), np.uint8))
