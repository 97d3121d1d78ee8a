"""GigaTok tokenizer training (SilentView/GigaTok `tokenizer/tokenizer_image/vq/vq_train.py`
with a `configs/vq/*.yaml` model config) -> a tok1d config.

    import yaml
    from tok1d.official import gigatok
    config = gigatok.config_from_official(
        yaml.safe_load(open("configs/vq/VQ_SS256.yaml")),
        train_args=dict(iterations=1_000_000, ema=True))
    config.teacher.weights = "dinov2_vitb14_pretrain.pth"
    config.perceptual.weights = "lpips_vgg"           # the released name (or a converted DIR)

`official_config`: the yaml as a dict (`model.model_cls` / `model.init_args`, `trainer`,
`loss.params`). `train_args`: vq_train.py's argparse values under their `dest` names
(`TRAIN_DEFAULTS`: iterations, global_batch_size, global_seed, image_size, ema,
mixed_precision, warmup, fract_decay). `size_tables` / `ctor_patches` add ViT size names and
constructor defaults that are not config fields upstream (as the golden fixtures record them,
see `tok1d.weights.convert.gigatok.kwargs_from_official`); `teacher` overrides the DINOv2 teacher's
`DinoV2` arguments (a reduced stand-in; default the hub model named by
`trainer.distill_model`, "dinov2-vit-b").

The result trains like vq_train.py's loop (`config_from_fixture_meta` builds the same from a
`train_gigatok*.npz` fixture's `meta`; tests/test_train_parity_gigatok.py checks it step by
step against the official step):

* loss (VQLoss, `optimizer_idx=0`): w_rec (MSE or L1) + w_perceptual LPIPS-VGG with its
  Dropout(0.5) active (`perceptual.lpips_dropout` 0.5: VQLoss runs in train mode), the VQ terms
  with weight 1 (**`codebook_weight` is ignored upstream**), entropy (ratio), `proj_weight` x
  the semantic loss vs DINOv2 patch tokens (`trainer.distill_loss`), and until `aux_loss_end`
  the feature-reconstruction loss (`fea_rec_loss_weight`) and the shortcut reconstruction
  (`use_direct_rec_loss`); the GAN term `disc_weight` x hinge from `disc_start`;
* the step counters: upstream compares the 1-based `global_step = train_steps + 1` with
  `aux_loss_end` / `disc_start` (`global_step < aux_loss_end`, `global_step >= disc_start`);
  tok1d's `aux_loss_end_step` / `discriminator.start_step` compare the 0-based step, so they
  are the official values minus 1;
* the DINO discriminator (`disc_type: dinodisc`: `DinoDisc` sizes from `ctor_patches`, its
  trunk frozen by `disc_optim.freeze` "trunk", DiffAugment with prob 1 and cutout 0.2 before
  every D call, D called on the fake batch first, and in a warm-up + GAN overlap step the
  "direct" terms on the reconstruction x_hat, `discriminator.direct_fake` "reconstruction";
  tests/test_train_parity_gigatok_dino.py) or
* PatchGAN (`disc_dim`, `disc_num_layers`, `kw`, BatchNorm in train mode with its running
  statistics as `disc_state`), D loss `disc_weight` x hinge, D called on the real batch first
  (`discriminator.call_order` "real_fake"), D's LR on the global schedule with its first step
  at the construction LR (`discriminator.global_schedule`, `disc_optim.schedule_step`
  "after_call");
* two torch AdamW (eps 1e-8, no decay split: `decay_mask` "all"), `cosine_v2` (warm-up from
  lr/100, cosine to `end_lr`) / `const` / `wsd`, the scheduler function called after the step
  (`schedule_step` "after_call"), torch clipping with `max_grad_norm` for both (eps 1e-6);
* `--ema`: `update_ema` with decay 0.9999 from a copy of the initial weights, no warm-up.

Refused (ConfigError, listing every one): options tok1d does not implement -- other model
classes, discriminators other than PatchGAN and the DINO discriminator, the adaptive
GAN weight, blur down-sampling in D, non-hinge G losses, L1/cosine feature reconstruction,
perceptual nets other than VGG-LPIPS, causal / dynamic-length training, `entropy_loss_end`,
`gen_start`, prior LR groups, optimizers other than AdamW.
Not reproduced: `codebook_show_usage`'s `codebook_usage` log (a 65536-entry shift register of
the latest codes; tok1d's evaluation reports codebook usage over the eval split instead) and
`--gradient-accumulation-steps` (parsed but unused upstream).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import ml_collections

from tok1d import recipes
from tok1d.train import config_lib
from tok1d.weights.convert import gigatok as convert_gigatok

# vq_train.py's argparse defaults of the arguments this mapping reads (iterations is required
# upstream; global_batch_size / warmup None = the yaml's trainer values).
TRAIN_DEFAULTS: dict[str, Any] = dict(
    iterations=None, global_batch_size=None, global_seed=0, image_size=256, ema=False,
    mixed_precision="bf16", warmup=None, fract_decay=0.2)

PRECISIONS = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}

# `update_ema`'s decay as vq_train calls it (not an argument upstream).
EMA_DECAY = 0.9999

# lr_scheduler -> tok1d optim.schedule (all warm up from lr / 100: `_warmup_lr`).
SCHEDULES = {"cosine_v2": "cosine", "const": "constant", "wsd": "wsd"}

# VQLoss defaults of the `loss.params` this mapping reads.
LOSS_DEFAULTS: dict[str, Any] = dict(
    disc_loss="hinge", disc_dim=64, disc_type="patchgan", disc_num_layers=3, disc_weight=1.0,
    disc_adaptive_weight=False, gen_adv_loss="hinge", reconstruction_loss="l2",
    reconstruction_weight=1.0, codebook_weight=1.0, perceptual_weight=1.0, aux_loss_end=0,
    entropy_loss_end=None, use_direct_rec_loss=False, norm="batch", kw=4, blur_ds=False,
    lecam=False, lecam_weight=0.001, proj_weight=0.5, gen_start=0, perceptual_model="vgg",
    use_semantic_input=False)

# VQLoss disc_type -> tok1d discriminator.name.
DISC_TYPES = {"patchgan": "patchgan", "dinodisc": "dino"}

# `DinoDisc` / `FrozenDINOSmallNoDrop` constructor defaults (not config fields upstream;
# `ctor_patches` may override them) -> tok1d `DinoDiscriminator` fields. VQLoss builds
# `DinoDisc(norm_type="bn")` and `DiffAug(prob=1.0, cutout=0.2)` with these constants.
DINO_DISC_CTOR = {"DinoDisc.depth": ("depth", 12),
                  "DinoDisc.key_depths": ("key_depths", (2, 5, 8, 11)),
                  "FrozenDINOSmallNoDrop.embed_dim": ("embed_dim", 384),
                  "FrozenDINOSmallNoDrop.num_heads": ("num_heads", 6)}
DINO_DIFFAUG = dict(diffaug_prob=1.0, diffaug_cutout=0.2)


def dino_disc_kwargs(ctor_patches: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """`DinoDiscriminator` fields of VQLoss's `DinoDisc` with `ctor_patches` applied."""
    patches = ctor_patches or {}
    kw = {}
    for key, (field, default) in DINO_DISC_CTOR.items():
        value = patches.get(key, default)
        kw[field] = tuple(int(v) for v in value) if field == "key_depths" else int(value)
    return kw


def _check(official_config: Mapping[str, Any], loss: Mapping[str, Any],
           init_args: Mapping[str, Any], t: Mapping[str, Any]) -> None:
    trainer = official_config["trainer"]
    causal = official_config["model"].get("causal_settings") or {}
    problems = []
    if official_config["model"].get("model_cls") != "VQVitModelPlus" and \
            official_config["model"].get("model_cls") != "VQVitModel2DPlus":
        problems.append(f"model_cls={official_config['model'].get('model_cls')!r} (VQVitModelPlus"
                        " / VQVitModel2DPlus)")
    if official_config.get("loss", {}).get("loss_cls", "VQLoss") != "VQLoss":
        problems.append(f"loss_cls={official_config['loss']['loss_cls']!r} (VQLoss)")
    if loss["disc_type"] not in DISC_TYPES:
        problems.append(f"disc_type={loss['disc_type']!r} (one of {sorted(DISC_TYPES)})")
    if loss["disc_loss"] != "hinge" or loss["gen_adv_loss"] != "hinge":
        problems.append(f"disc_loss={loss['disc_loss']!r} / gen_adv_loss="
                        f"{loss['gen_adv_loss']!r} (hinge / hinge)")
    for flag in ("disc_adaptive_weight", "blur_ds", "use_semantic_input"):
        if loss[flag]:
            problems.append(f"{flag}=True")
    if loss["norm"] != "batch":
        problems.append(f"norm={loss['norm']!r} (the official GroupNorm path does not run)")
    if loss["reconstruction_loss"] not in ("l1", "l2"):
        problems.append(f"reconstruction_loss={loss['reconstruction_loss']!r}")
    if loss["perceptual_model"] != "vgg" or loss.get("resnet_perceptual"):
        problems.append(f"perceptual_model={loss['perceptual_model']!r} (vgg LPIPS)")
    if loss["entropy_loss_end"] is not None:
        problems.append(f"entropy_loss_end={loss['entropy_loss_end']}")
    if loss["gen_start"]:
        problems.append(f"gen_start={loss['gen_start']}")
    if init_args.get("fea_rec_loss_type", "mse") != "mse":
        problems.append(f"fea_rec_loss_type={init_args['fea_rec_loss_type']!r} (mse)")
    if init_args.get("dropout_p", 0.0):
        problems.append(f"dropout_p={init_args['dropout_p']}")
    if causal.get("causal_type") is not None or causal.get("dynamic_length_train"):
        problems.append("causal / dynamic-length training (causal_settings)")
    if trainer.get("optimizer", "AdamW") != "AdamW":
        problems.append(f"optimizer={trainer.get('optimizer')!r} (AdamW)")
    if trainer.get("lr_scheduler") not in SCHEDULES:
        problems.append(f"lr_scheduler={trainer.get('lr_scheduler')!r} (one of "
                        f"{sorted(SCHEDULES)})")
    for key in ("prior_lr_mult", "freeze_but_decoder_iter", "random_mix_reg"):
        if trainer.get(key) not in (None, False, 1.0):
            problems.append(f"trainer.{key}={trainer[key]!r}")
    distill = str(trainer.get("distill_model", "dinov2-vit-b"))
    if trainer.get("distill_loss") and not distill.startswith("dinov2-vit-"):
        problems.append(f"distill_model={distill!r} (a dinov2-vit-* teacher)")
    if t["iterations"] is None:
        problems.append("train_args.iterations is required (vq_train's --iterations)")
    if t["mixed_precision"] not in PRECISIONS:
        problems.append(f"mixed_precision={t['mixed_precision']!r} (one of {sorted(PRECISIONS)})")
    if problems:
        raise config_lib.ConfigError("The official GigaTok run uses options tok1d does not "
                                     "implement:\n  - " + "\n  - ".join(problems))


def teacher_kwargs(distill_model: str, overrides: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, Any]:
    """`DinoV2` arguments of vq_train's teacher (`load_encoders(distill_model)`: the hub
    `dinov2_vit{s,b,l,g}14[_reg]`) plus `overrides`. Its position table is resampled to the
    tokenizer's decoder grid (16x16 upstream) by `tokenizer.build_teacher`."""
    kind, arch, size = distill_model.split("-")
    name = f"{arch}{size}14" + ("_reg" if "reg" in kind else "")
    kw: dict[str, Any] = dict(size=name)
    kw.update(overrides or {})
    return kw


def config_from_official(official_config: Mapping[str, Any],
                         train_args: Optional[Mapping[str, Any]] = None, *,
                         size_tables: Optional[Mapping[str, Any]] = None,
                         ctor_patches: Optional[Mapping[str, Any]] = None,
                         teacher: Optional[Mapping[str, Any]] = None
                         ) -> ml_collections.ConfigDict:
    """The tok1d tokenizer config of a vq_train.py run (see the module docstring)."""
    t = {**TRAIN_DEFAULTS, **dict(train_args or {})}
    unknown = sorted(set(t) - set(TRAIN_DEFAULTS))
    if unknown:
        raise config_lib.ConfigError(f"Unknown vq_train arguments {unknown}; this mapping reads "
                                     f"{sorted(TRAIN_DEFAULTS)}.")
    model_cfg, trainer = official_config["model"], official_config["trainer"]
    init_args = model_cfg["init_args"]
    loss = {**LOSS_DEFAULTS, **official_config["loss"]["params"]}
    _check(official_config, loss, init_args, t)
    image_size = int(t["image_size"])
    kwargs = convert_gigatok.kwargs_from_official(
        init_args, size_tables, ctor_patches, image_size=image_size,
        layout=convert_gigatok.layout_from_config(dict(official_config)))
    for half in ("ViTEncoder", "ViTDecoder", "ViTEncoder2D", "ViTDecoder2D"):
        patched = (ctor_patches or {}).get(f"{half}.image_size")
        if patched is not None and int(patched) != image_size:
            raise config_lib.ConfigError(f"ctor_patches {half}.image_size={patched} differs from "
                                         f"image_size={image_size}")
    kwargs.pop("image_size")
    distill = bool(trainer.get("distill_loss")) and bool(kwargs["distill_depth"])

    config = config_lib.base_config("tokenizer")
    config.seed = int(t["global_seed"])
    config.total_steps = int(t["iterations"])
    config.batch_size = int(t["global_batch_size"] or trainer["global_batch_size"])
    config.eval_batch_size = config.batch_size
    config.precision = PRECISIONS[t["mixed_precision"]]
    config.loss_precision = config.precision  # vq_train computes VQLoss inside the autocast
    config.ema_decay = EMA_DECAY if t["ema"] else 0.0
    config.ema_warmup = "none"
    recipes.imagenet(config)
    config.data.image_size = image_size
    config.data.augment, config.data.min_scale = "adm_random_crop", 0.8  # random_crop_arr
    config.data.resize_rule = "adm"  # random_crop_arr / center_crop_arr's rounding
    config.model = dict(name="gigatok", **kwargs)

    rec = loss["reconstruction_loss"]
    aux_end = recipes.gigatok_step(loss["aux_loss_end"])
    config.losses = ml_collections.ConfigDict(dict(
        l2=float(loss["reconstruction_weight"]) if rec == "l2" else 0.0,
        l1=float(loss["reconstruction_weight"]) if rec == "l1" else 0.0,
        quantizer=1.0,  # VQLoss adds the VQ terms with weight 1 (codebook_weight is ignored)
        entropy=float(init_args.get("entropy_loss_ratio", 0.0)), kl=0.0, proxy_ce=0.0,
        perceptual=float(loss["perceptual_weight"]), gan=float(loss["disc_weight"]),
        semantic=float(loss["proj_weight"]) if distill else 0.0,
        fea_rec=float(init_args.get("fea_rec_loss_weight", 1.0)) if aux_end else 0.0,
        shortcut=1.0 if aux_end and loss["use_direct_rec_loss"] else 0.0))
    config.aux_loss_end_step = aux_end
    config.perceptual.kind = "lpips"
    if distill:
        config.teacher.name = "dinov2"
        config.teacher.model = ml_collections.ConfigDict(teacher_kwargs(
            str(trainer.get("distill_model", "dinov2-vit-b")), teacher))

    warmup = int(t["warmup"] if t["warmup"] is not None else trainer.get("warmup", 0))
    for o in (config.optim, config.disc_optim):
        o.lr, o.end_lr = float(trainer["lr"]), float(trainer.get("end_lr", 1e-5))
        o.warmup_steps = warmup
        o.schedule, o.decay_fraction = SCHEDULES[trainer["lr_scheduler"]], float(t["fract_decay"])
        o.b1, o.b2 = float(trainer["beta1"]), float(trainer["beta2"])
        o.weight_decay, o.decay_mask = float(trainer["weight_decay"]), "all"
        o.grad_clip = float(trainer.get("max_grad_norm", 0.0))

    d = config.discriminator
    d.name, d.loss = DISC_TYPES[loss["disc_type"]], "hinge"
    # LeCam (off in every released config): lecam-gan's form, EMA decay 0.99 (`ema_losses`)
    d.lecam = float(loss["lecam_weight"]) if loss["lecam"] else 0.0
    d.lecam_form, d.lecam_decay = "gigatok", 0.99
    d.d_weight = float(loss["disc_weight"])
    d.start_step = recipes.gigatok_step(loss["disc_start"])
    if d.name == "patchgan":
        d.model = ml_collections.ConfigDict(dict(
            base_channels=int(loss["disc_dim"]), num_layers=int(loss["disc_num_layers"]),
            kernel_size=int(loss["kw"]), norm="batch"))
    else:  # the frozen DINO trunk is not a D parameter upstream (no update, decay, state)
        d.model = ml_collections.ConfigDict(dino_disc_kwargs(ctor_patches))
        d.update(DINO_DIFFAUG)
        config.disc_optim.freeze = "trunk"
    recipes.gigatok_vq_train(config)  # LPIPS dropout, stepping, clipping, D order and stats
    recipes.pod_run(config)
    return config


def config_from_fixture_meta(meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config_from_official` for a `train_gigatok*.npz` fixture's `meta`: its `config`, the
    vq_train arguments it records (`params.iterations`, `params.image`, `ema`), its
    `size_tables_added` / `ctor_patches` and the reduced DINOv2 teacher it used."""
    params = meta["params"]
    tables = dict(meta.get("size_tables_added") or {})
    teacher = next((v for k, v in tables.items() if k.startswith("dinov2")), None)
    # ViT size names only (the DINO discriminator's sizes come from ctor_patches).
    sizes = {k: v for k, v in tables.items() if not k.startswith("dinov2") and "num_layers" in v}
    # ctor_patches recorded as {"upstream": ..., "used": ...} -> the used value.
    patches = {k: v["used"] if isinstance(v, Mapping) and "used" in v else v
               for k, v in (meta.get("ctor_patches") or {}).items()}
    train_args = dict(iterations=int(params["iterations"]), image_size=int(params["image"]),
                      ema=bool(meta.get("ema")), mixed_precision="none",
                      global_batch_size=int(params.get("batch") or 0) or None)
    overrides = None
    if teacher is not None:
        overrides = dict(embed_dim=int(teacher["embed_dim"]), depth=int(teacher["depth"]),
                         num_heads=int(teacher["num_heads"]))
    return config_from_official(meta["config"], train_args, size_tables=sizes,
                                ctor_patches=patches, teacher=overrides)


def official_log(scalars: Mapping[str, Any], config: ml_collections.ConfigDict
                 ) -> dict[str, float]:
    """A tok1d tokenizer step's scalars (unweighted terms, see `tok1d.objectives.tokenizer_loss` /
    `make_train_step`) -> the values of vq_train.py's loop under the official names: the
    `vq_loss.py` log dict (`(Generator)...` weighted except proj_loss, `(Discriminator)...`,
    nan when D does not train), `loss_gen`, `loss_disc` (0 without a D step), `grad_norm(_disc)`
    (before clipping), `lr(_disc)` (the LR the update used), `feature_rec_loss`, and the
    fixtures' unlogged direct terms `direct_generator_adv_loss`, `d_d_adversarial_loss`,
    `direct_logits_fake`."""
    s = {k: float(v) for k, v in scalars.items()}
    w = config.losses
    rec = "l2" if w.l2 else "l1"
    w_rec = float(w.l2 or w.l1)
    gan_on = s.get("gan_active", 0.0) > 0
    aux_on = s.get("warmup_losses_active", 0.0) > 0
    nan = float("nan")
    out = {
        "loss_gen": s["loss"], "grad_norm": s["grad_norm"], "lr": s["lr"],
        "(Generator)rec_loss": w_rec * s[f"loss_{rec}"],
        "(Generator)perceptual_loss": w.perceptual * s.get("loss_perceptual", 0.0),
        "(Generator)vq_loss": s["quantizer_codebook"],
        "(Generator)commit_loss": s["quantizer_commitment"],
        "(Generator)entropy_loss": w.entropy * s.get("loss_entropy", 0.0),
        "(Generator)generator_adv_loss": w.gan * s.get("loss_gan", 0.0) if gan_on else 0.0,
        "(Generator)disc_weight": w.gan if gan_on else 0.0,
        "(Generator)disc_adaptive_weight": 1.0,
        "(Generator)direct_rec_loss": w_rec * s.get(f"shortcut_{rec}", 0.0) if aux_on else 0.0,
        "(Generator)direct_p_loss": (w.perceptual * s.get("shortcut_perceptual", 0.0)
                                     if aux_on else 0.0),
        "(Generator)proj_loss": s.get("loss_semantic", 0.0),
        "(Generator)ar_prior_loss": 0.0,
        "feature_rec_loss": w.fea_rec * s.get("loss_fea_rec", 0.0) if aux_on else 0.0,
        "loss_disc": s.get("d_loss", 0.0) if gan_on else 0.0,
        "grad_norm_disc": s.get("d_grad_norm", nan) if gan_on else nan,
        "lr_disc": s.get("d_lr", nan) if gan_on else nan,
    }
    for name, key in (("discriminator_adv_loss", "d_adv_loss"), ("logits_real", "d_logits_real"),
                      ("logits_fake", "d_logits_fake")):
        out[f"(Discriminator){name}"] = s.get(key, nan) if gan_on else nan
    out["(Discriminator)disc_weight"] = w.gan if gan_on else nan
    # The unlogged "direct" GAN terms of a warm-up + GAN overlap step (0 after the warm-up, nan
    # before disc_start; see discriminator.direct_fake): the G step's second term, the D step's
    # third-call loss and that call's mean logit.
    overlap = gan_on and aux_on
    out["direct_generator_adv_loss"] = (
        w.gan * s.get("shortcut_gan", 0.0) if overlap else 0.0) if gan_on else nan
    out["d_d_adversarial_loss"] = (
        s.get("d_shortcut_adv_loss", 0.0) if overlap else 0.0) if gan_on else nan
    out["direct_logits_fake"] = s.get("d_direct_logits_fake", nan) if overlap else nan
    return out
