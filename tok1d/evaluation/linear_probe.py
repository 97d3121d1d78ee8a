"""Linear probe of an AR generator's features: how semantic its representation of a
tokenizer's codes is (GigaTok's `autoregressive/lin_probe/lin_probe.py`, itself MAE's
`main_linprobe.py` with a frozen LlamaGen GPT in place of the ViT).

Features (`probe_features`), as upstream's `main` / `evaluate` compute them:

* the frozen GPT (eval mode: no dropout) runs teacher-forced on an image's codes with the
  NULL class as the condition (upstream `cond_null = gpt.num_classes`), i.e. on the sequence
  [null class token, codes[:-1]] that `GPT.__call__` builds;
* the residual stream right after the first `layer` blocks (upstream `ret_inner_feat_layer`,
  default `n_layer // 2`; no norm applied), (B, num_tokens, width), is averaged over all
  positions, the class token's included, -> (B, width) float32. The GPT is cut to its first
  `layer` blocks (`truncate`) and run with `GPT.hidden_states`; nothing after them is computed.

Probe (`LinearProbe`, upstream `LinProb`): `BatchNorm1d(width, affine=False, eps=1e-6)` then
`Linear(width, num_classes)`, weight N(0, 0.01) (timm's `trunc_normal_(std=0.01)` cuts at
+-2 absolute, i.e. not at all), bias 0 (upstream leaves torch's default U(+-1/sqrt(width)),
+-0.036 at width 768: negligible).

Training (`train_linear_probe`), MAE's recipe as upstream runs it:

* cross-entropy, LARS (`tokenizer/lin_probe/misc.py` `LARS`: weight decay and the trust ratio
  0.001 * |w| / |g| only for tensors of rank > 1, momentum 0.9 accumulated on the scaled
  gradient, then the step lr * momentum buffer), built from optax pieces in that order by
  `mae_lars` (`optax.lars` differs: it multiplies by the lr *before* the momentum, which under
  a changing lr is another optimizer, and applies the trust ratio to the bias too);
* lr = base_lr * global_batch / 256, set every step from the fractional epoch by MAE's
  `adjust_learning_rate` (`mae_schedule`): linear warm-up from 0 over `warmup_epochs`, then a
  half-cycle cosine to min_lr = 0 at `epochs`;
* every epoch visits each training example once in a fresh seeded shuffle (NumPy
  `default_rng(seed)`) and drops the last incomplete batch (upstream's training DataLoader has
  `drop_last=True`; its DistributedSampler pads, which only matters per GPU);
* augmentation: upstream encodes a random crop + horizontal flip of every image on the fly. We
  take precomputed variants instead: `train_features` (V, N, D) holds V feature vectors per
  example (e.g. of the codes of the image and of its mirror, as `python -m tok1d.cli.tokenize
  --flip` writes them) and every step picks one variant per example at random;
* metric: top-1 accuracy over the whole validation set with the BatchNorm's running
  statistics (upstream `evaluate`).

Deviations:
* upstream computes the training features with the GPT in train mode (lin_probe.py never
  calls `eval()` before training; only its separate `--eval` run does): token, residual and
  FFN dropout 0.1 on them, drawn afresh every epoch, while the validation features are clean.
  Here both are clean (eval mode, computed once), so accuracies are not directly comparable
  with GigaTok's published ones (a review measured on a tiny random GPT: the same accuracy on
  an easy task, 0.76 here vs 0.61 with dropout features on a harder one);
* upstream probes the checkpoint's raw weights ("model"); `tok1d evaluate` probes the EMA
  params when the run kept an EMA (the GPT recipe keeps none);
* BatchNorm is Flax's, whose running variance averages the biased batch variance (torch:
  unbiased, a factor B / (B - 1) = 1.004 at B = 256); the probe trains with the global
  batch's statistics on one device (upstream: DDP, each GPU normalises with its own rows, 128
  in GigaTok's scripts: LIN_BSZ=128 on 64 GPUs, lr scaled by the global 8192);
* float32 throughout (upstream: autocast).
The probe step is jitted once and scanned over an epoch on device, the training features
living on the device (V * N * D float32).

    acc = run_linear_probe(model, params, train_codes, train_labels, val_codes, val_labels)
    acc["val_accuracy"]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tok1d import parallel
from tok1d.models.generators.gpt import GPT


# ---------------------------------------------------------------------------- features


def default_layer(model: GPT) -> int:
    """Upstream's default probed depth: the output of the first `depth // 2` blocks."""
    return max(model.depth // 2, 1)


def truncate(model: GPT, params: Any, n: int) -> tuple[GPT, Any]:
    """(the GPT with only its first n blocks, its parameters): the scanned stack's stacked
    "layers" axis is sliced to [:n], an unrolled stack keeps `blocks_0` .. `blocks_{n-1}`;
    everything else (embeddings, final norm, head) is shared."""
    if not 1 <= n <= model.depth:
        raise ValueError(f"Cannot keep {n} of the GPT's {model.depth} blocks.")
    params = dict(params)
    stack = dict(params["transformer"])
    if model.scan:
        stack["blocks"] = jax.tree.map(lambda x: x[:n], stack["blocks"])
    else:
        stack = {k: v for k, v in stack.items()
                 if not (k.startswith("blocks_") and int(k[len("blocks_"):]) >= n)}
    params["transformer"] = stack
    return model.clone(depth=n), params


def _batch_shards(sharding: NamedSharding) -> int:
    axes = tuple(sharding.spec)[0] if len(sharding.spec) else None
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in names)


def _on_mesh(params: Any, mesh: Mesh) -> Any:
    """Leaves already laid out on `mesh` stay as they are; others are replicated onto it."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)
    return jax.tree.map(place, params)


def probe_features(model: GPT, params: Any, codes: np.ndarray, layer: Optional[int] = None,
                   batch_size: int = 256, mesh: Optional[Mesh] = None,
                   rules: Optional[Sequence[tuple[str, Any]]] = None) -> np.ndarray:
    """Mean over all positions of the GPT's residual stream after `layer` blocks (default
    `depth // 2`), teacher-forced on `codes` (N, num_tokens) with the null class:
    (N, width) float32 NumPy, the same on every host.

    One jitted function, batches of `batch_size` rows (the last one padded with code 0 and
    cut). With a `mesh`, every batch is sharded over its batch axes ("act_batch" of `rules`,
    default `parallel.DEFAULT_RULES`; `batch_size` is rounded up to a multiple of their size),
    every host loads its rows of it (`codes` must be the same host array on every host), and
    parameters not already on the mesh are replicated onto it. Rows are independent, so the
    result does not depend on the number of devices."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != model.num_tokens:
        raise ValueError(f"Expected codes (N, {model.num_tokens}), got {codes.shape}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    layer = default_layer(model) if layer is None else int(layer)
    sub, sub_params = truncate(model, params, layer)
    null = model.null_label

    def features(p, c):
        labels = jnp.full((c.shape[0],), null, jnp.int32)
        h = sub.apply({"params": p}, c, labels, method="hidden_states")
        return jnp.mean(h, axis=1)

    n = len(codes)
    out = np.zeros((n, model.width), np.float32)
    if mesh is None:
        place = jnp.asarray
        context = _NullContext()
    else:
        rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
        sharding = parallel.batch_sharding(mesh, rules)
        shards = _batch_shards(sharding)
        batch_size = -(-batch_size // shards) * shards
        start, stop = parallel.host_batch_slice(sharding, batch_size)
        sub_params = _on_mesh(sub_params, mesh)

        def place(chunk):
            return parallel.global_batch({"codes": chunk[start:stop]}, sharding,
                                         batch_size)["codes"]
        context = _MeshContext(mesh, rules)

    with context:
        fn = jax.jit(features)
        pending = None  # one batch in flight while the previous one is copied back
        for begin in range(0, n, batch_size):
            chunk = codes[begin:begin + batch_size].astype(np.int32)
            rows = len(chunk)
            if rows < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - rows, chunk.shape[1]),
                                                        np.int32)])
            result = (begin, rows, fn(sub_params, place(chunk)))
            if pending is not None:
                _store(out, pending)
            pending = result
        if pending is not None:
            _store(out, pending)
    return out


def _store(out: np.ndarray, pending: tuple[int, int, jax.Array]) -> None:
    begin, rows, feats = pending
    out[begin:begin + rows] = parallel.host_array(feats)[:rows]


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MeshContext:
    """`jax.set_mesh(mesh)` and the logical axis rules, entered together."""

    def __init__(self, mesh: Mesh, rules):
        self._mesh, self._rules = jax.set_mesh(mesh), nn.logical_axis_rules(rules)

    def __enter__(self):
        self._mesh.__enter__()
        self._rules.__enter__()
        return self

    def __exit__(self, *exc):
        self._rules.__exit__(*exc)
        return self._mesh.__exit__(*exc)


# ---------------------------------------------------------------------------- probe


class LinearProbe(nn.Module):
    """Upstream `LinProb`: BatchNorm without affine parameters (eps 1e-6, torch momentum 0.1,
    i.e. Flax momentum 0.9; batch statistics when `train`, running ones otherwise), then a
    linear classifier (weight N(0, 0.01), bias 0). Logits float32."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                         use_bias=False, use_scale=False, use_fast_variance=False,
                         name="bn")(x.astype(jnp.float32))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(stddev=0.01),
                        bias_init=nn.initializers.zeros, name="head")(x)


def mae_schedule(peak_lr: float, steps_per_epoch: int, epochs: float, warmup_epochs: float,
                 min_lr: float = 0.0) -> optax.Schedule:
    """MAE's `adjust_learning_rate` per step: at epoch e = step / steps_per_epoch,
    peak * e / warmup while e < warmup, else
    min_lr + (peak - min_lr) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2."""
    def schedule(step):
        epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
        warm = peak_lr * epoch / max(warmup_epochs, 1e-12)
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(epoch < warmup_epochs, warm, cosine)
    return schedule


def mae_lars(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
             momentum: float = 0.9, trust_coefficient: float = 0.001
             ) -> optax.GradientTransformation:
    """MAE's `LARS`: for tensors of rank > 1 the gradient gets weight decay and is scaled by
    trust_coefficient * |w| / |g| (1 where either norm is 0); every tensor keeps a momentum
    buffer mu = momentum * mu + g and steps by -lr * mu."""
    def matrices(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate))


def _as_variants(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if features.ndim == 2:
        features = features[None]
    if features.ndim != 3:
        raise ValueError(f"{name} must be (N, D) or (V, N, D), got {features.shape}.")
    return features


def predict(probe: LinearProbe, variables: Any, features: np.ndarray,
            batch_size: int = 4096) -> np.ndarray:
    """Eval-mode (running BatchNorm statistics) class predictions (N,) of `features` (N, D)."""
    features = np.asarray(features, np.float32)
    fn = jax.jit(lambda v, x: jnp.argmax(probe.apply(v, x, train=False), axis=-1))
    out = []
    for begin in range(0, len(features), batch_size):
        chunk = features[begin:begin + batch_size]
        rows = len(chunk)
        if rows < batch_size and begin > 0:  # keep one compiled shape past the first batch
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:],
                                                    np.float32)])
        out.append(np.asarray(fn(variables, chunk))[:rows])
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def train_linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                       val_features: np.ndarray, val_labels: np.ndarray, num_classes: int,
                       epochs: int = 90, batch_size: int = 256, base_lr: float = 0.1,
                       warmup_epochs: float = 10, seed: int = 0,
                       log_fn: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Trains a `LinearProbe` on (train_features, train_labels) with MAE's linear-probe recipe
    (see the module docstring) and evaluates it on the validation set.

    train_features: (N, D) or (V, N, D) (V augmentation variants per example; each step picks
    one per example at random); val_features: (M, D) (or (V, M, D): variant 0, the image
    itself); labels integers in [0, num_classes). Deterministic given `seed`.

    Returns {"val_accuracy": top-1 fraction over the validation set (eval-mode BN),
    "train_loss", "train_accuracy": means over the steps of the last epoch (train-mode BN, the
    batches as trained on), "lr": the peak lr, "steps": optimizer steps taken,
    "variables": the probe's {"params", "batch_stats"}}.
    """
    feats = _as_variants(train_features, "train_features")
    val = _as_variants(val_features, "val_features")[0]
    labels = np.asarray(train_labels).reshape(-1).astype(np.int32)
    val_labels = np.asarray(val_labels).reshape(-1).astype(np.int32)
    num_variants, n, dim = feats.shape
    if len(labels) != n or len(val_labels) != len(val) or val.shape[1] != dim:
        raise ValueError(f"Shapes do not match: train features {feats.shape}, labels "
                         f"{labels.shape}; val features {val.shape}, labels {val_labels.shape}.")
    for name, y in (("train_labels", labels), ("val_labels", val_labels)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}).")
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training examples do not fill one batch of {batch_size}.")

    peak_lr = base_lr * batch_size / 256
    schedule = mae_schedule(peak_lr, steps_per_epoch, epochs, warmup_epochs)
    tx = mae_lars(schedule)
    probe = LinearProbe(num_classes)
    variables = probe.init(jax.random.key(seed), jnp.zeros((2, dim), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    def loss_fn(p, stats, x, y):
        logits, new = probe.apply({"params": p, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(ce), (logits, new["batch_stats"])

    @jax.jit
    def train_epoch(params, batch_stats, opt_state, all_feats, all_labels, rows, variants):
        """The jitted train step scanned over one epoch's (steps, batch) row / variant ids."""
        def train_step(carry, idx):
            params, batch_stats, opt_state = carry
            x, y = all_feats[idx[1], idx[0]], all_labels[idx[0]]
            (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch_stats, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
            return (params, batch_stats, opt_state), (loss, acc)

        (params, batch_stats, opt_state), (losses, accs) = jax.lax.scan(
            train_step, (params, batch_stats, opt_state), (rows, variants))
        return params, batch_stats, opt_state, jnp.mean(losses), jnp.mean(accs)

    device_feats, device_labels = jnp.asarray(feats), jnp.asarray(labels)
    rng = np.random.default_rng(seed)
    loss = acc = float("nan")
    for epoch in range(epochs):
        rows = rng.permutation(n)[:steps_per_epoch * batch_size].reshape(steps_per_epoch,
                                                                           batch_size)
        variants = (rng.integers(0, num_variants, rows.shape) if num_variants > 1
                    else np.zeros(rows.shape, np.int64))
        params, batch_stats, opt_state, loss, acc = train_epoch(
            params, batch_stats, opt_state, device_feats, device_labels,
            rows.astype(np.int32), variants.astype(np.int32))
        if log_fn is not None:
            log_fn(f"linear probe epoch {epoch + 1}/{epochs}: loss {float(loss):.4f}, "
                   f"train accuracy {float(acc):.4f}, "
                   f"lr {float(schedule((epoch + 1) * steps_per_epoch - 1)):.4g}")

    variables = {"params": params, "batch_stats": batch_stats}
    preds = predict(probe, variables, val)
    val_acc = float(np.mean(preds == val_labels)) if len(val_labels) else float("nan")
    if log_fn is not None:
        log_fn(f"linear probe: top-1 validation accuracy {val_acc:.4f} ({len(val_labels)} "
               "examples)")
    return {"val_accuracy": val_acc, "train_loss": float(loss), "train_accuracy": float(acc),
            "lr": peak_lr, "steps": epochs * steps_per_epoch, "variables": variables}


# ---------------------------------------------------------------------------- both


def run_linear_probe(model: GPT, params: Any, train_codes: np.ndarray, train_labels: np.ndarray,
                     val_codes: np.ndarray, val_labels: np.ndarray, layer: Optional[int] = None,
                     feature_batch_size: int = 256, mesh: Optional[Mesh] = None,
                     rules: Optional[Sequence[tuple[str, Any]]] = None,
                     num_classes: Optional[int] = None, log_fn: Optional[Callable[[str], None]]
                     = None, val_variant: int = 0, **probe_kwargs: Any) -> dict[str, Any]:
    """GigaTok's AR linear probe end to end: `probe_features` of the training codes (N, T) or
    (N, V, T) (the token dataset's layout: V variants per example, all of them featurised and
    sampled during training) and of the validation codes (M, T) (or (M, V, T): the variant
    `val_variant`, the un-augmented one: `TokenSource.plain_variant`), then
    `train_linear_probe` (`probe_kwargs`: epochs, batch_size, base_lr, warmup_epochs, seed).
    `num_classes` defaults to the GPT's. Returns its dict plus "layer" and "feature_dim"."""
    layer = default_layer(model) if layer is None else int(layer)
    train_codes, val_codes = np.asarray(train_codes), np.asarray(val_codes)
    if train_codes.ndim == 2:
        train_codes = train_codes[:, None]
    if val_codes.ndim == 3:
        val_codes = val_codes[:, val_variant]
    n, num_variants, num_tokens = train_codes.shape
    feature = lambda c: probe_features(model, params, c, layer, feature_batch_size, mesh, rules)
    flat = feature(train_codes.transpose(1, 0, 2).reshape(num_variants * n, num_tokens))
    train_features = flat.reshape(num_variants, n, -1)
    val_features = feature(val_codes)
    if log_fn is not None:
        log_fn(f"linear probe: features after {layer} of {model.depth} blocks, "
               f"{train_features.shape} train, {val_features.shape} validation")
    result = train_linear_probe(train_features, train_labels, val_features, val_labels,
                                model.num_classes if num_classes is None else num_classes,
                                log_fn=log_fn, **probe_kwargs)
    result.update(layer=layer, feature_dim=int(train_features.shape[-1]))
    return result


def read_token_split(source, plain_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N, V, T), labels (N,)) of a whole token split (`tok1d.data.tokens`);
    `plain_only`: (N, T), each example's un-augmented variant (`TokenSource.plain_variant`;
    the validation codes)."""
    items = source.__getitems__(range(len(source))) if hasattr(source, "__getitems__") else [
        source[i] for i in range(len(source))]
    codes = np.stack([np.asarray(r["codes"]).reshape(source.num_variants, -1) for r in items])
    if plain_only:
        codes = codes[:, getattr(source, "plain_variant", 0)]
    return codes.astype(np.int32), np.asarray([r["label"] for r in items], np.int32)


def probe_from_config(model: GPT, params: Any, train: tuple[np.ndarray, np.ndarray],
                      val: tuple[np.ndarray, np.ndarray], ecfg, mesh: Optional[Mesh] = None,
                      rules=None, seed: int = 0, log_fn=None) -> dict[str, float]:
    """`run_linear_probe` with a config's `evaluation.linear_probe_*` options; returns
    {"linear_probe_accuracy", "linear_probe_train_accuracy", "linear_probe_layer"}."""
    out = run_linear_probe(model, params, train[0], train[1], val[0], val[1], mesh=mesh,
                           rules=rules, log_fn=log_fn, epochs=ecfg.linear_probe_epochs,
                           batch_size=min(ecfg.linear_probe_batch_size, len(train[0])),
                           base_lr=ecfg.linear_probe_lr,
                           warmup_epochs=min(10, ecfg.linear_probe_epochs / 9), seed=seed)
    return {"linear_probe_accuracy": float(out["val_accuracy"]),
            "linear_probe_train_accuracy": float(out["train_accuracy"]),
            "linear_probe_layer": float(out["layer"])}
