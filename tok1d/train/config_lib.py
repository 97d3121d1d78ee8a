"""Config schemas and start-up validation.

A config is the common keys (`common_config`: seed, steps, batch, precision, EMA, model, data,
optim, evaluation, mesh, sharding, logging, checkpoint, distributed) plus the section of its
trainer (`SECTIONS`): the tokenizer's losses, teacher, perceptual net, discriminator and AR
probe; the generator's token data and sampler; the demo's tokenizer section plus its generator
stage. Every config file starts from `base_config(trainer)` and changes what it needs.
`validate(config)` runs before anything is built and fails with one message that names every
problem: keys that are not in the trainer's schema (typos, another trainer's keys), impossible
shapes, batch sizes that do not divide over the mesh.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
from typing import Any, Callable, Iterator

import ml_collections

from tok1d import models
from tok1d import errors, parallel
from tok1d.data import pipeline
from tok1d.evaluation import fid as fid_lib
from tok1d.evaluation import image_metrics
from tok1d.generation import decode
from tok1d.models import interfaces
from tok1d.models.frozen import inception as inception_lib
from tok1d.models.frozen import vgg
from tok1d.objectives import terms
from tok1d.train import optim
from tok1d.weights import layout
from tok1d.weights.layout import model_kwargs

TRAINERS = ("tokenizer", "generator", "demo")
# Where a generator's training sequences come from (generator.token_source).
TOKEN_SOURCES = ("dataset", "images")
# What `tok1d evaluate`'s linear probe reads (evaluation.linear_probe_source; "": tokens when
# generator.tokens is set, else images).
LINEAR_PROBE_SOURCES = ("", "tokens", "images")
# Where a generator run keeps its frozen tokenizer's decoder (generator.tokenizer_decoder).
TOKENIZER_DECODER_PLACES = ("device", "host")


class ConfigError(errors.UserError, ValueError):
    """A config that cannot run; the message lists every problem found."""


def common_config() -> ml_collections.ConfigDict:
    """The keys every trainer reads, with their defaults (`trainer` is set by `base_config`)."""
    c = ml_collections.ConfigDict()
    c.trainer = ""
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 64             # global, over all hosts and devices
    c.eval_batch_size = 64
    c.precision = "bfloat16"      # compute dtype; params and optimizer state stay float32
    c.ema_decay = 0.999           # 0 disables the EMA of params
    c.ema_warmup = "none"         # "none": ema_decay from the first step (GigaTok / LlamaGen);
                                  # "titok": the official TiTok / MaskGIT EMAModel warm-up,
                                  # min(ema_decay, (1 + s) / (10 + s)), s = step - 1 (tok1d.train.optim)

    # Model: `name` picks the registry entry in tok1d.models, the rest are its keyword arguments
    # (checked against the module's fields when the config is validated).
    c.model = ml_collections.ConfigDict({"name": "titok"})

    c.data = ml_collections.ConfigDict(dict(
        name="demo",                  # "demo", "tfds:<name>" or "array_record:<dir>"
        data_dir="",                  # TFDS data_dir (empty: TFDS default)
        train_split="train",
        eval_split="validation",
        image_size=256,
        augment="random_resized_crop",  # or "random_crop" / "adm_random_crop" / "center_crop"
        min_scale=0.8,                # smallest area fraction of random_resized_crop; smallest
                                      # crop / shorter-side ratio of adm_random_crop
        resize_rule="adm",            # how resized sides and center offsets round: "adm"
                                      # (ADM's crops: LlamaGen, GigaTok) or "torchvision"
                                      # (Resize + CenterCrop / RandomCrop: TiTok's loaders)
        flip=True,
        num_workers=0,                # grain worker processes (0: decode in the main process;
                                      # -1: one per core but one, at most 16)
        resize_on="host",             # "host": crops leave the host resized (PIL); "device":
                                      # the host decodes and ships each window, the device
                                      # resizes it (PIL's weights; ~2x the host's images/s per
                                      # core, tok1d.data.pipeline)
        eval_examples=-1,             # -1: the whole eval split
        demo_size=4096,               # number of random crops per epoch of the demo data
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,
        end_lr=1e-5,
        warmup_steps=1000,
        warmup_init=0.0,              # warm-up starts at warmup_init * lr (GigaTok: 0.01)
        schedule="cosine",            # "cosine", "linear", "constant" or "wsd" after warmup
        decay_fraction=0.2,           # wsd: 1 - sqrt decay to 0 over this last fraction
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=1e-4,
        decay_mask="kernels",         # decayed params: "kernels" (matrices only: not norms,
                                      # biases, embeddings), "all", "no_norm" or "matrices"
                                      # (>= 2-D incl. embeddings; LlamaGen) (tok1d.train.optim)
        no_decay_names="",            # comma-separated substrings of parameter paths that are
                                      # never decayed (TiTok / MaskGIT: optim.TITOK_NO_DECAY_NAMES)
        schedule_step="before",       # "before": update k uses schedule(k-1) (TiTok's LambdaLR);
                                      # "after_call": update 1 at lr, k >= 2 at schedule(k-2)
                                      # (GigaTok / LlamaGen scheduler called after the step)
        grad_clip=1.0,                # global-norm clipping; 0 disables
        clip_eps=1e-6,                # torch clip_grad_norm_: scale max/(norm + clip_eps) when
                                      # < 1 (0: optax's max/norm when norm > max)
        grad_accum_steps=1,
        mu_dtype="float32",
    ))

    # Comma-separated top-level parameter groups that are not trained (e.g. TiTok stage 2:
    # "encoder,latent_tokens,quantize"): zero updates, no weight decay, no optimizer state.
    c.optim.freeze = ""

    # Evaluation (tok1d.evaluation; `python -m tok1d.cli.evaluate` and the evals inside training).
    # rFID / gFID, Inception Score and precision/recall need the FID InceptionV3 (the released
    # name "inception_fid", or a DIR from `tok1d convert inception_fid`); LPIPS needs LPIPS-VGG
    # ("lpips_vgg"; default: `perceptual.weights` when it holds it). Every weights path below
    # also takes a released name (tok1d.weights.registry: fetched and converted once). Metrics
    # whose network is missing are left out (and said so); allow_random_init is for tests only.
    c.evaluation = ml_collections.ConfigDict(dict(
        inception="",                 # converted FID Inception directory or "inception_fid"
        lpips="",                     # converted LPIPS weights (directory, .npz, "lpips_vgg")
        allow_random_init=False,      # random Inception / LPIPS weights (tests, smoke runs)
        inception_size=299,           # Inception input resize (299 defines FID; >= 75, smaller
                                      # only for tests / smoke runs)
        inception_input="tf1",        # "tf1": the TF FID graph's resize and scaling (ADM's
                                      # evaluator, torch-fidelity: the official numbers);
                                      # "pytorch_fid": pytorch-fid's
        fid_every_steps=0,            # FID inside training every K steps and at the end (0: off)
        reference="",                 # gFID reference: an ADM reference batch .npz (mu, sigma
                                      # and arr_0 images) or a file of `tok1d evaluate
                                      # --save_reference`; empty: the data's eval split
                                      # (features computed, cached for the run)
        sfid=True,                    # ADM's sFID beside FID (the Inception's spatial
                                      # features; their statistics cost the host about as
                                      # much again as FID's; off: --save_reference writes
                                      # no mu_s / sigma_s)
        num_samples=50_000,           # gFID: generated images (50 per class, 1000 classes)
        fid_method="eigh",            # tr(sqrtm(S1 S2)) by two symmetric eigendecompositions
                                      # (6x faster at 2048 features, same value to ~1e-13
                                      # relative), or "sqrtm": pytorch-fid's scipy sqrtm
        precision_recall=True,        # k=3 manifold precision / recall (keeps pool features)
        precision_recall_float16=False,  # ADM's float16 distances (to compare with published
                                      # numbers; float32, the default, is more accurate)
        is_splits=10,                 # Inception Score splits (equal parts; torch-fidelity)
        # > 0: parts of this many images instead, the last one shorter (ADM's evaluator, which
        # TiTok and GigaTok report: 5000, set by the recipes; at 50k the same as 10 splits)
        is_split_size=0,
        chunk_size=8,                 # images per network call on each device: the numbers are
                                      # bit-identical on any mesh whose per-device batch is a
                                      # multiple of it (0: the whole per-device batch)
        num_report_images=32,         # images in the report's grids
        # PSNR / SSIM convention (tok1d.evaluation.image_metrics): "standard" (Gaussian 11x11
        # SSIM of the reconstructions as they are) or "gigatok" (GigaTok's
        # reconstruction_ddp.py: 8-bit reconstructions, scikit-image's default 7x7 SSIM called
        # with data_range=2.0; its recipes).
        pixel_metrics="standard",
        # Compute dtype of the tokenizer in `tok1d evaluate`'s reconstruction metrics
        # (tok1d.generation.decode.SAMPLING_PRECISIONS): "" = the run's `precision`,
        # "float32" (GigaTok's reconstruction_ddp.py; TF32 matmuls) or "bfloat16".
        tokenizer_precision="",
        # GigaTok's linear probe of a GPT generator's features (null class, layer depth // 2,
        # mean over positions; BN + linear head, LARS): epochs over the train split, accuracy
        # on the eval split. 0: off; GigaTok: 90 epochs, lr 0.1 x batch / 256.
        # In a tokenizer run with ar_probe on, the probe GPT is probed too.
        linear_probe_epochs=0,
        linear_probe_batch_size=256,
        linear_probe_lr=0.1,
        # What `tok1d evaluate` probes on: "images" (upstream: `data`'s images, ADM random crop
        # + flip drawn afresh every epoch, encoded by the tokenizer in every step; center crops
        # for validation), "tokens" (the codes of generator.tokens), "" (tokens when
        # generator.tokens is set, else images).
        linear_probe_source="",
        # The training features with the GPT's dropout, drawn in every step (upstream's
        # lin_probe.py trains with the GPT in train mode); False: clean features, and on
        # tokens computed once for the whole run (faster, not comparable with GigaTok's).
        linear_probe_dropout=True,
        # GigaTok's tokenizer linear probe in `tok1d evaluate` of a tokenizer (its
        # tokenizer/lin_probe; "not recommended" there): the same probe, epochs, batch and lr
        # (linear_probe_*) on the tokenizer's own features averaged over positions, at this
        # tap: "encoder" (upstream's default: after the encoder's ln_post), "encoder_tokens"
        # (--fix-dim: after its conv_out), "decoder" (--from-decoder: the decoder's queries
        # after distill_depth layers; GigaTok only); "": off. TiTok has the first two.
        tokenizer_probe="",
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=parallel.DEFAULT_RULES))

    c.log_every_steps = 50
    c.eval_every_steps = 1000       # 0: only at the end
    c.num_grid_images = 16        # images in the input-vs-reconstruction grid

    # `compress`: zstd-compress the saved arrays (orbax's default). Off: trained float32 weights
    # shrink only ~8% under zstd, and on a host with few cores the (de)compression bounds saving
    # and restoring (2 cores: restore ~1.8x, save ~2x faster without; benchmarks/RESULTS.md).
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000,             # 0: only at the end and on a preemption signal
        keep=3,
        async_save=True,
        compress=False,
    ))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="",       # empty: let jax.distributed auto-detect (TPU, SLURM)
        num_processes=0,
        process_id=-1,
    ))
    return c


def add_tokenizer_keys(c: ml_collections.ConfigDict) -> None:
    """The tokenizer trainer's section: loss weights, initial weights, the frozen teacher and
    perceptual network, the discriminator and its optimizer, the AR probe."""
    # Loss weights; a term with weight 0 is not computed. Pixel terms compare images in the
    # model's own range (TiTok [0, 1], GigaTok [-1, 1], as the official losses do).
    #   l2, l1       pixel reconstruction
    #   quantizer    VQ codebook + commitment; entropy: code-usage entropy; kl: VAE KL
    #   proxy_ce     stage 1: cross-entropy of the decoder logits vs the teacher's codes
    #   perceptual   `perceptual.kind` network loss; gan: generator term of `discriminator`
    #   semantic     GigaTok: mean -cos(decoder features, DINOv2 teacher patch tokens)
    #   fea_rec      GigaTok warm-up: MSE(transformer-decoder grid, sg(CNN-encoder map))
    #   shortcut     GigaTok warm-up: the CNN decoder on the CNN-encoder map, l2 + perceptual
    c.losses = ml_collections.ConfigDict(dict(l2=1.0, l1=0.0, quantizer=1.0, entropy=0.0,
                                              kl=0.0, proxy_ce=0.0, perceptual=0.0, gan=0.0,
                                              semantic=0.0, fea_rec=0.0, shortcut=0.0))
    # The warm-up terms (losses.fea_rec, losses.shortcut) apply while step < aux_loss_end_step
    # (GigaTok: 15000; 0 for XL-XXL).
    c.aux_loss_end_step = 0
    # One compiled train step per phase (warm-up terms on / off, discriminator before / from
    # discriminator.start_step): each program holds only the terms its steps compute, a
    # (re)start compiles its own phase's, and the run compiles the next phase's in the
    # background (tok1d.train.programs). False: one program for every step, the switches
    # traced from the step count (one compilation for short runs that cross a switch).
    c.phase_programs = True
    # Compute dtype of the loss networks: the perceptual net(s) and the discriminator (their
    # params stay float32, their norms and distances compute in float32). TiTok's official loss
    # module runs in float32 (autocast disabled); GigaTok's official step runs its loss inside
    # the same bf16 autocast as the model, i.e. "bfloat16" with precision="bfloat16".
    c.loss_precision = "float32"

    # Weights to start from (instead of random init); the optimizer starts fresh. `checkpoint`:
    # a pretrained directory (tok1d convert), a released name ("titok_l32") or a
    # training workdir (its latest EMA params), matched by parameter path and shape.
    # `pixel_decoder`: a converted MaskGIT-VQGAN ("maskgit_vqgan")
    # whose decoder / quantizer become TiTok stage 2's pixel_decoder / pixel_quantize.
    c.init = ml_collections.ConfigDict(dict(checkpoint="", pixel_decoder=""))

    # Frozen teacher (`name` empty: none): "maskgit_vqgan" gives TiTok stage 1 its proxy codes,
    # "dinov2" gives GigaTok's semantic loss its targets. `weights`: a converted directory, the
    # official checkpoint (.bin / dinov2_vit*14_pretrain.pth) or a released name
    # ("maskgit_vqgan", "dinov2_vitb14"); `model`: its arguments (default:
    # the released MaskGIT-VQGAN / dinov2 `size` "vitb14"). allow_random_init is for tests only.
    c.teacher = ml_collections.ConfigDict(dict(name="", weights="", allow_random_init=False,
                                               model=ml_collections.ConfigDict()))

    # Perceptual network (used when losses.perceptual > 0): "lpips", "convnext_s" or
    # "lpips+convnext_s"; `weights`: converted directory (tok1d convert lpips ...)
    # or released names ("lpips_vgg", "lpips_vgg,convnext_s").
    # `image_size`: ConvNeXt input resolution (224 as trained; smaller only for tests).
    # `lpips_dropout`: rate of the LPIPS linear layers' Dropout in training (GigaTok trains its
    # LPIPS in train mode: 0.5; 0 = eval-mode LPIPS, TiTok). Its keep masks are the step's
    # random draws "lpips_keep/<rec|shortcut>/lin<k>" (tok1d.train.tokenizer).
    # `lpips_channels`: VGG16 block widths of a random LPIPS stand-in (allow_random_init; tests
    # use e.g. (8, 16, 32, 32, 32), 1/60 of the compute); () = the released (64, 128, 256, 512,
    # 512), the only widths converted weights have.
    c.perceptual = ml_collections.ConfigDict(dict(kind="lpips", weights="", image_size=224,
                                                  allow_random_init=False, lpips_dropout=0.0,
                                                  lpips_channels=()))

    # Discriminator (trained when losses.gan > 0) and its optimizer.
    c.discriminator = ml_collections.ConfigDict(dict(
        name="titok",                 # "titok" (NLayer + BlurPool), "patchgan" or "dino"
        weights="",                   # dino: the frozen trunk, dino_deitsmall16_pretrain.pth
                                      # or the released name "dino_vits16"
        allow_random_init=False,      # dino: random trunk (tests only)
        diffaug_prob=0.0,             # DiffAugment on D's inputs (GigaTok dino_disc: 1.0)
        diffaug_cutout=0.2,
        start_step=0,                 # neither the G term nor the D update runs before it
        loss="hinge",                 # D and G loss family (tok1d.objectives.gan)
        lecam=0.0,                    # LeCam regulariser weight (TiTok: 0.001)
        lecam_decay=0.999,            # its EMAs' decay (TiTok 0.999; GigaTok 0.99)
        lecam_form="titok",           # "titok" or "gigatok" (tok1d.objectives.gan.LECAM_FORMS)
        d_weight=1.0,                 # scale of the D loss (GigaTok's disc_weight: 0.5)
        call_order="fake_real",       # D step's calls: D(x_hat) then D(x) (GigaTok's DINO
                                      # discriminator) or "real_fake" (GigaTok's PatchGAN;
                                      # TiTok, whose D is stateless); matters for BatchNorm
                                      # running stats, spectral norms and DiffAugment draws
        direct_fake="shortcut",       # GigaTok warm-up + GAN overlap steps: the "direct" G term
                                      # and D's third fake call see the shortcut reconstruction
                                      # x~ (PatchGAN) or "reconstruction" x_hat again (the
                                      # official dinodisc branch)
        global_schedule=False,        # D's lr at the global step (GigaTok) instead of a schedule
                                      # over its own steps from start_step (TiTok)
        schedule_processes=1,         # TiTok: D's schedule spans total_steps - start_step / P
                                      # D updates for P = this (the official run's GPUs:
                                      # accelerate steps D's scheduler P times per update
                                      # against a horizon of total_steps * P - start_step)
        model=ml_collections.ConfigDict(),   # size arguments of the discriminator
    ))
    c.disc_optim = ml_collections.ConfigDict(dict(
        lr=1e-4, end_lr=1e-5, warmup_steps=0, warmup_init=0.0, schedule="cosine", b1=0.9,
        b2=0.999, eps=1e-8, decay_mask="kernels", no_decay_names="", schedule_step="before",
        decay_fraction=0.2, weight_decay=1e-4, grad_clip=1.0, clip_eps=1e-6, grad_accum_steps=1,
        mu_dtype="float32", freeze=""))


    # AR probing of a tokenizer run (GigaTok): at every `every_steps` (0: off) and at the end,
    # encode `train_examples` training images and the eval split with the current tokenizer,
    # train a small GPT (`model`: its size arguments) from scratch on those codes for `steps`
    # steps and log its validation loss: how learnable the tokens are, while the tokenizer trains.
    c.ar_probe = ml_collections.ConfigDict(dict(
        every_steps=0, train_examples=2048, steps=300, batch_size=64, lr=1e-3,
        model=ml_collections.ConfigDict(dict(width=256, depth=4, num_heads=4))))



def add_generator_keys(c: ml_collections.ConfigDict) -> None:
    """The generator trainer's section: its token data and objective, and the sampler."""
    # Generators (trainer "generator"; model "maskgit", "gpt" or "rar"), trained on a token
    # dataset.
    c.generator = ml_collections.ConfigDict(dict(
        token_source="dataset",       # "dataset": the token dataset in `tokens`; "images": the
                                      # images of `data` (its crop and flip), encoded by the
                                      # frozen `tokenizer` in every train step (GigaTok's
                                      # --dataset imagenet; validation loss on center crops)
        tokens="",                    # token dataset directory (python -m tok1d.cli.tokenize)
        tokenizer="",                 # decodes samples for grids / tok1d.cli.sample (and
                                      # encodes the images with token_source "images"): a
                                      # pretrained directory or a tokenizer training workdir
        tokenizer_decoder="device",   # with token_source "images": "host" keeps the params
                                      # the encode does not read (the decoder's) in host
                                      # memory, put on the devices only while an evaluation
                                      # decodes (upstream deletes its decoder)
        label_dropout=0.1,            # labels -> null class with this probability (CFG)
        mask_schedule="arccos",       # MaskGIT: training mask-ratio schedule
        label_smoothing=0.1,          # MaskGIT: CE label smoothing
        unmasked_weight=0.1,          # MaskGIT: loss weight of the unmasked positions
        randomness_anneal_start=0,    # RAR: every training sequence is permuted before this
        randomness_anneal_end=0,      # step, then with a probability falling linearly to 0 at
                                      # this one (tok1d.objectives.tokens.random_ratio)
        num_sample_classes=10,        # classes (0..n-1) in the periodic sample grid
        prefix_tokens=0,              # > 0: train on the first k tokens of every sequence
                                      # (ordered 1D tokens, model.nested_dropout); the model's
                                      # num_tokens is then k and its samples decode as prefixes
                                      # (k counts the dataset's codes: residual VQ, a multiple
                                      # of its depth)
    ))
    # Keyword arguments of the sampler (tok1d.generation.maskgit.sample,
    # tok1d.generation.autoregressive.sample or .sample_rar), used for the sample grids and
    # tok1d.cli.sample.
    c.sampling = ml_collections.ConfigDict()
    # Compute dtype of the sampler and of the tokenizer's decode of its samples (grids,
    # tok1d sample, gFID; tok1d.generation.decode.SAMPLING_PRECISIONS): "" = each model's own
    # (the generator's is `precision`), "float32" (the official gFID protocols', TF32
    # matmuls) or "bfloat16".
    c.sampling_precision = ""


def add_demo_keys(c: ml_collections.ConfigDict) -> None:
    """The demo (tok1d.cli.demo): the tokenizer's section and the generator stage's values."""
    add_tokenizer_keys(c)
    # Trainer "demo" (configs/demo.py): tokenizer, then tokens, then a generator. `generator`
    # holds the generator config's values that differ from these defaults.
    c.demo = ml_collections.ConfigDict(dict(generator=ml_collections.ConfigDict(),
                                            samples_per_class=10))
    # On the digits: the feature network of the demo's metrics (tok1d.evaluation.digit_features)
    # and the guidance x temperature sweep that picks the sampling settings (lowest
    # FID-digits among those with class accuracy >= min_class_accuracy).
    c.demo.feature_net = ml_collections.ConfigDict(dict(
        steps=300, batch_size=128, learning_rate=2e-3, feature_dim=64))
    c.demo.sweep = ml_collections.ConfigDict(dict(
        guidance_scales=(2.0,), temperatures=(1.0,), samples_per_class=10,
        min_class_accuracy=0.9))


SECTIONS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "tokenizer": add_tokenizer_keys, "generator": add_generator_keys, "demo": add_demo_keys}


def base_config(trainer: str = "tokenizer") -> ml_collections.ConfigDict:
    """The schema of `trainer` ("tokenizer", "generator" or "demo") with its defaults: the
    common keys plus the trainer's section (what `validate` checks a config against)."""
    if trainer not in SECTIONS:
        raise ConfigError(f"trainer={trainer!r} is not one of {TRAINERS}")
    c = common_config()
    c.trainer = trainer
    SECTIONS[trainer](c)
    return c


def for_trainer(config: ml_collections.ConfigDict, trainer: str) -> ml_collections.ConfigDict:
    """A copy of `config` as a config of `trainer`: its values for the keys of that trainer's
    schema, the schema's defaults for the keys `config` lacks (e.g. the demo's tokenizer
    stage: the demo config without its `demo` section)."""
    out = base_config(trainer)
    for key in out:
        if key != "trainer" and key in config:
            out[key] = copy.deepcopy(config[key])
    return out


def from_run(path: str) -> ml_collections.ConfigDict:
    """The config a training run was started with: its workdir's config.json (or the file
    `path`), laid onto its trainer's schema, so keys tok1d added since keep their defaults
    (JSON lists become tuples where the schema holds tuples)."""
    file = path if os.path.isfile(path) else layout.config_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} holds no {layout.CONFIG_FILE} of a training run.")
    values = layout.read_json(file)
    if not isinstance(values, dict) or values.get("trainer") not in TRAINERS:
        raise ConfigError(f"{file} is not a tok1d run's config (no trainer among {TRAINERS}).")
    if not isinstance(values.get("model"), dict) or "name" not in values["model"]:
        # (laid onto the schema, the default model was benchmarked or blamed in its place)
        raise ConfigError(f"{file} has no model section with a name: not a whole run config "
                          "(damaged or edited?).")
    out = base_config(values["trainer"])
    _lay_onto(out, values, "")
    return out


def _lay_onto(cfg: ml_collections.ConfigDict, values: dict[str, Any], prefix: str) -> None:
    for key, value in values.items():
        path = f"{prefix}{key}"
        current = cfg.get(key) if key in cfg else None
        if (isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict)
                and path not in FREE_FORM):
            _lay_onto(current, value, path + ".")
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = _as_tuples(value)
        with cfg.ignore_type():
            cfg[key] = value


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of a config file, `path.py` or `path.py:arg` (its `get_config(arg)`), as
    `--config=path.py:arg` gives it to `python -m tok1d.main`; or a training run's own config
    (its workdir or config.json: `from_run`)."""
    if os.path.isdir(spec) or spec.endswith(".json"):
        return from_run(spec)
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# Sub-dicts checked by their owner, not the schema: module arguments (against the module's
# fields) and `losses` (against the loss-term registry).
FREE_FORM = ("model", "losses", "teacher.model", "discriminator.model", "sampling", "demo.generator",
             "ar_probe.model")


def _walk(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, ml_collections.ConfigDict) and path not in FREE_FORM:
            yield from _walk(value, path + ".")




def _schema_paths(trainer: str) -> dict[str, Any]:
    return dict(_walk(base_config(trainer)))


def _key_problems(config: ml_collections.ConfigDict, trainer: str
                  ) -> tuple[list[str], list[str]]:
    """(problems, missing paths) of `config`'s keys against `trainer`'s schema: keys of no
    schema (with the closest known key), keys of another trainer's section, and schema keys the
    config lacks. Only the topmost path of an unknown or missing sub-dict is named."""
    known = _schema_paths(trainer)
    owners: dict[str, str] = {}
    for other in TRAINERS:
        for path in _schema_paths(other):
            if path not in known:
                owners.setdefault(path, other)
    present = dict(_walk(config))
    problems: list[str] = []
    named: list[str] = []

    def below_named(path: str) -> bool:
        return any(path.startswith(p + ".") for p in named)

    for path in present:
        if path in known or below_named(path):
            continue
        named.append(path)
        if path in owners:
            problems.append(f"config key {path!r} is a {owners[path]} key: trainer "
                            f"{trainer!r} does not read it")
        else:
            close = difflib.get_close_matches(path, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown config key {path!r}{hint}")
    missing: list[str] = []
    for path in known:
        if path not in present and not any(path.startswith(p + ".") for p in missing):
            missing.append(path)
            problems.append(f"missing config key {path!r} (trainer {trainer!r} reads it)")
    if missing or any(path in owners for path in named):
        problems.append(f"(a config of trainer {trainer!r} starts from "
                        f"config_lib.base_config({trainer!r}))")
    return problems, missing


def _tokenizer_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The tokenizer section's checks: the teacher, and the loss weights against the loss-term
    registry (`tok1d.objectives.terms`: unknown terms, terms whose teacher is missing, warm-up
    terms that would never apply)."""
    problems: list[str] = []
    losses, teacher = config.losses, config.teacher.name
    if teacher not in ("", "maskgit_vqgan", "dinov2"):
        problems.append(f"teacher.name={teacher!r} is not one of '', 'maskgit_vqgan', 'dinov2'")
    problems += terms.problems(losses, teacher, config.aux_loss_end_step)
    if config.loss_precision not in models.DTYPES:
        problems.append(f"loss_precision={config.loss_precision!r} is not one of "
                        f"{sorted(models.DTYPES)}")
    widths, released = tuple(config.perceptual.lpips_channels), vgg.TAP_CHANNELS
    if widths and (len(widths) != len(released) or min(widths) < 1):
        problems.append(f"perceptual.lpips_channels={widths} must be {len(released)} positive "
                        "VGG16 block widths (or () for the released network's)")
    if widths and (config.perceptual.weights or not config.perceptual.allow_random_init):
        problems.append(f"perceptual.lpips_channels={widths} sizes a random LPIPS stand-in "
                        "(perceptual.allow_random_init, no perceptual.weights): the released "
                        f"weights have {released}")
    return problems


# Model arguments that are sizes or counts wherever a model has them: 0 or less is an error
# of the config (it failed as a ZeroDivisionError inside the model or the data pipeline).
MODEL_SIZES = ("codebook_size", "token_dim", "num_latent_tokens", "num_tokens", "patch_size",
               "width", "depth", "num_heads", "mlp_dim", "image_size", "num_classes")


def data_problems(data: ml_collections.ConfigDict) -> list[str]:
    """The problems of the image-pipeline keys of a config's `data` section (part of `validate`;
    `tok1d bench --workload=input` checks only these)."""
    problems = []
    if data.image_size <= 0:
        problems.append(f"data.image_size={data.image_size} must be positive")
    augments = ("random_resized_crop", "random_crop", "adm_random_crop", "center_crop")
    if data.augment not in augments:
        problems.append(f"data.augment={data.augment!r} is not one of {augments}")
    if not 0 < data.min_scale <= 1:
        problems.append(f"data.min_scale={data.min_scale} must be in (0, 1] (the smallest "
                        "crop, as a fraction of the image; the largest is 1)")
    if pipeline.resize_rule_of(data) not in pipeline.RESIZE_RULES:
        problems.append(f"data.resize_rule={data.resize_rule!r} is not one of "
                        f"{pipeline.RESIZE_RULES}")
    if data.resize_on not in pipeline.RESIZE_ON:
        problems.append(f"data.resize_on={data.resize_on!r} is not one of {pipeline.RESIZE_ON}")
    if data.num_workers < -1:
        problems.append(f"data.num_workers={data.num_workers} must be >= 0, or -1 (one per "
                        "core but one)")
    if data.eval_examples == 0 or data.eval_examples < -1:
        problems.append(f"data.eval_examples={data.eval_examples} must be positive, or -1 (the "
                        "whole eval split)")
    return problems


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the keys against the schema of `config.trainer` (`base_config(trainer)`) and the
    values against each other; raises one ConfigError that lists every problem."""
    trainer = config.get("trainer", "")
    if trainer not in SECTIONS:
        raise ConfigError(f"Invalid config:\n  - trainer={trainer!r} is not one of {TRAINERS}")
    problems, missing = _key_problems(config, trainer)
    common = dict(_walk(common_config()))
    if any(path in common for path in missing):  # the checks below read the common keys
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
    section_complete = not missing

    try:
        model = models.create(config.model.get("name"), **model_kwargs(config))
    except (ValueError, TypeError) as e:
        problems.append(f"model: {e}")
        model = None

    image_size = config.data.image_size
    if model is not None:
        if isinstance(model, interfaces.Tokenizer) and model.input_size not in (None,
                                                                                image_size):
            problems.append(f"model.image_size={model.input_size} differs from "
                            f"data.image_size={image_size}")
        patch = config.model.get("patch_size")  # a patch-embedding tokenizer's key (TiTok)
        if patch and image_size % patch:
            problems.append(f"data.image_size={image_size} is not divisible by "
                            f"model.patch_size={patch}")

    problems += data_problems(config.data)
    if config.optim.schedule not in optim.SCHEDULES:
        problems.append(f"optim.schedule={config.optim.schedule!r} is not one of "
                        f"{optim.SCHEDULES}")
    if config.ema_warmup not in optim.EMA_WARMUPS:
        problems.append(f"ema_warmup={config.ema_warmup!r} is not one of {optim.EMA_WARMUPS}")
    tokenizer_section = section_complete and trainer in ("tokenizer", "demo")
    for group in ("optim", "disc_optim") if tokenizer_section else ("optim",):
        if config[group].schedule_step not in optim.SCHEDULE_STEPS:
            problems.append(f"{group}.schedule_step={config[group].schedule_step!r} is not one "
                            f"of {optim.SCHEDULE_STEPS}")
        if config[group].decay_mask not in optim.DECAY_MASKS:
            problems.append(f"{group}.decay_mask={config[group].decay_mask!r} is not one of "
                            f"{optim.DECAY_MASKS}")
    if config.precision not in models.DTYPES:
        problems.append(f"precision={config.precision!r} is not one of {sorted(models.DTYPES)}")

    try:
        mesh_shape = parallel.resolve_mesh_shape(dict(config.mesh), num_devices)
        batch_div = mesh_shape[0] * mesh_shape[1]  # batch is split over data x fsdp
        accum = config.optim.grad_accum_steps
        if accum < 1:
            problems.append(f"optim.grad_accum_steps={accum} must be >= 1")
        elif config.batch_size % (batch_div * accum):
            problems.append(
                f"batch_size={config.batch_size} is not divisible by the data-parallel size "
                f"{batch_div} (mesh data x fsdp = {mesh_shape[0]} x {mesh_shape[1]})"
                + (f" times grad_accum_steps={accum}" if accum > 1 else ""))
        if config.eval_batch_size % batch_div:
            problems.append(f"eval_batch_size={config.eval_batch_size} is not divisible by the "
                            f"data-parallel size {batch_div}")
    except ValueError as e:
        problems.append(f"mesh: {e}")

    if tokenizer_section:
        problems += _tokenizer_problems(config)
    if section_complete and trainer == "generator":
        g = config.generator
        if g.token_source not in TOKEN_SOURCES:
            problems.append(f"generator.token_source={g.token_source!r} is not one of "
                            f"{TOKEN_SOURCES}")
        if g.get("tokenizer_decoder", "device") not in TOKENIZER_DECODER_PLACES:
            problems.append(f"generator.tokenizer_decoder={g.tokenizer_decoder!r} is not one "
                            f"of {TOKENIZER_DECODER_PLACES}")
        if config.sampling_precision not in decode.SAMPLING_PRECISIONS:
            problems.append(f"sampling_precision={config.sampling_precision!r} is not one of "
                            f"{decode.SAMPLING_PRECISIONS}")
    ev = config.evaluation
    if ev.get("tokenizer_probe", "") and trainer != "tokenizer":
        problems.append(f"evaluation.tokenizer_probe={ev.tokenizer_probe!r} probes a "
                        "tokenizer's own features (`tok1d evaluate` of a tokenizer config); "
                        f"this config's trainer is {trainer!r}")
    if ev.get("tokenizer_precision", "") not in decode.SAMPLING_PRECISIONS:
        problems.append(f"evaluation.tokenizer_precision={ev.tokenizer_precision!r} is not one "
                        f"of {decode.SAMPLING_PRECISIONS}")
    if ev.get("pixel_metrics", "standard") not in image_metrics.PIXEL_METRICS:
        problems.append(f"evaluation.pixel_metrics={ev.pixel_metrics!r} is not one of "
                        f"{image_metrics.PIXEL_METRICS}")
    if ev.get("linear_probe_source", "") not in LINEAR_PROBE_SOURCES:
        problems.append(f"evaluation.linear_probe_source={ev.linear_probe_source!r} is not one "
                        f"of {LINEAR_PROBE_SOURCES}")
    if (ev.fid_every_steps > 0 and not ev.inception and not ev.allow_random_init):
        problems.append(f"evaluation.fid_every_steps={ev.fid_every_steps} needs "
                        "evaluation.inception (the released name inception_fid, or a "
                        "directory from tok1d convert inception_fid ...)")
    if (ev.fid_every_steps > 0 and config.trainer == "generator" and not ev.reference
            and config.data.name == "demo"):
        problems.append("evaluation.fid_every_steps on a generator needs evaluation.reference "
                        "(e.g. VIRTUAL_imagenet256_labeled.npz) or data.name set to the real "
                        "images' dataset (its eval split is the reference)")
    if config.trainer == "tokenizer" and ev.reference:
        problems.append(f"evaluation.reference={ev.reference!r} is gFID's real side (a "
                        "generator's evaluation); a tokenizer's rFID compares its "
                        "reconstructions with the eval split's originals: leave it empty")
    if ev.inception_input not in inception_lib.INPUT_CONVENTIONS:
        problems.append(f"evaluation.inception_input={ev.inception_input!r} must be one of "
                        f"{', '.join(inception_lib.INPUT_CONVENTIONS)}")
    if ev.inception_size < 75:
        problems.append(f"evaluation.inception_size={ev.inception_size} must be >= 75 (the "
                        "smallest input the Inception accepts)")
    if ev.fid_method not in fid_lib.FID_METHODS:
        problems.append(f"evaluation.fid_method={ev.fid_method!r} must be one of "
                        f"{', '.join(fid_lib.FID_METHODS)}")
    for key in ("num_samples", "is_splits"):
        if ev[key] <= 0:
            problems.append(f"evaluation.{key}={ev[key]} must be positive")
    if ev.get("linear_probe_epochs", 0) < 0:
        problems.append(f"evaluation.linear_probe_epochs={ev.linear_probe_epochs} must be >= 0 "
                        "(0: no linear probe)")
    for key in ("linear_probe_batch_size", "linear_probe_lr"):
        if key in ev and ev[key] <= 0:
            problems.append(f"evaluation.{key}={ev[key]} must be positive")
    if ev.get("is_split_size", 0) < 0:
        problems.append(f"evaluation.is_split_size={ev.is_split_size} must be >= 0 (0: "
                        "evaluation.is_splits equal parts)")
    for key in ("total_steps", "batch_size", "eval_batch_size", "log_every_steps"):
        if config[key] <= 0:
            problems.append(f"{key}={config[key]} must be positive")
    for key in MODEL_SIZES:  # (a 0 divided by zero deep in the model or the data pipeline)
        value = config.model.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            problems.append(f"model.{key}={value} must be positive")
    if not 0 <= config.ema_decay < 1:
        problems.append(f"ema_decay={config.ema_decay} must be in [0, 1) (0: no EMA)")
    if config.checkpoint.keep < 1:
        problems.append(f"checkpoint.keep={config.checkpoint.keep} must be >= 1 (the "
                        "checkpoints kept)")
    for group in ("optim", "disc_optim") if tokenizer_section else ("optim",):
        if config[group].warmup_steps < 0:
            problems.append(f"{group}.warmup_steps={config[group].warmup_steps} must be >= 0")
    for key, value in (("eval_every_steps", config.eval_every_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps)):
        if value < 0:
            problems.append(f"{key}={value} must be >= 0 (0: only at the end)")
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
