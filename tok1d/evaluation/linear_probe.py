"""Linear probe of an AR generator's features: how semantic its representation of a
tokenizer's codes is (GigaTok's `autoregressive/lin_probe/lin_probe.py`, itself MAE's
`main_linprobe.py` with a frozen LlamaGen GPT in place of the ViT). And GigaTok's tokenizer
linear probe (`tokenizer/lin_probe/lin_probe.py`, `run_tokenizer_linear_probe`): the same
probe and training on the frozen tokenizer's own features (`interfaces.probe_features`: the
encoder's after ln_post by default, or after its conv_out, or the decoder's semantic-head
input) averaged over positions, encoded in every step from the augmented images. GigaTok's
instructions call it "not recommended" (its accuracy does not follow the AR probe's, the
paper's point); it is here to reproduce that comparison.

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
* augmentation and features, two trainers:
  - `run_linear_probe_on_images` / `train_linear_probe_online` train as upstream does: every
    step encodes the next batch of images (upstream: ADM's random_crop_arr + flip, a fresh
    draw every epoch; the caller's pipeline) with the frozen tokenizer, takes the GPT's
    features of the codes with its dropout (`dropout`, upstream: train mode) and updates the
    probe, in one jitted step; on codes (`run_linear_probe(dropout=True)`) the step draws one
    of each example's precomputed variants (`code_batches`);
  - `train_linear_probe` takes clean features computed once: `train_features` (V, N, D)
    holds V feature vectors per example (e.g. of the codes of the image and of its mirror, as
    `python -m tok1d.cli.tokenize --flip` writes them) and every step picks one variant per
    example at random; the probe's epochs are scanned on device (fast, but not upstream's
    numbers: see the deviations);
* metric: top-1 accuracy over the whole validation set with the BatchNorm's running
  statistics (upstream `evaluate`).

Deviations:
* with clean features (`dropout=False`, evaluation.linear_probe_dropout=False), upstream's
  training features differ: lin_probe.py never calls `eval()` before training, so token,
  residual and FFN dropout 0.1 act on them, drawn afresh every step, while the validation
  features are clean (here too). A review measured on a tiny random GPT the same accuracy on
  an easy task, but 0.76 clean vs 0.61 with dropout features on a harder one;
* the encode: upstream encodes the training images under autocast in --mixed-precision
  (default "none": float32) and the validation images under torch's default fp16 autocast;
  tok1d encodes both in the tokenizer's own dtype (float32 for a converted release);
* upstream probes the checkpoint's raw weights ("model"); `tok1d evaluate` probes the EMA
  params when the run kept an EMA (the GPT recipe keeps none);
* BatchNorm is Flax's, whose running variance averages the biased batch variance (torch:
  unbiased, a factor B / (B - 1) = 1.004 at B = 256); the probe trains with the global
  batch's statistics (upstream: DDP, each GPU normalises with its own rows, 128
  in GigaTok's scripts: LIN_BSZ=128 on 64 GPUs, lr scaled by the global 8192);
* the GPT and the probe compute in float32 (upstream: the autocast above).

    acc = run_linear_probe(model, params, train_codes, train_labels, val_codes, val_labels)
    acc["val_accuracy"]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tok1d import parallel
from tok1d.models import interfaces
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


def _on_mesh(params: Any, mesh: Mesh) -> Any:
    """Leaves already laid out on `mesh` stay as they are; others are replicated onto it."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)
    return jax.tree.map(place, params)


def feature_fn(sub: GPT, tokenizer: Any = None, prefix_tokens: int = 0, train: bool = False
               ) -> Callable[..., jax.Array]:
    """(params of `sub`, tokenizer params, batch, rng) -> (B, width) float32: the mean over all
    positions of the residual stream of `sub` (a GPT cut to the probed depth, `truncate`),
    teacher-forced with the null class on the batch's "codes", or on the codes that
    `tokenizer` encodes from its [0, 1] "image"s (the first `prefix_tokens` when > 0).
    `train`: with the GPT's token / residual / FFN dropout drawn from `rng` (upstream's
    training features: lin_probe.py never puts the GPT in eval mode before training)."""
    null = sub.null_label

    def features(p, tok_p, batch, rng):
        codes = batch["codes"] if tokenizer is None else interfaces.encode_images(
            tokenizer, tok_p, batch["image"], prefix_tokens)
        codes = jax.lax.stop_gradient(codes)
        labels = jnp.full((codes.shape[0],), null, jnp.int32)
        h = sub.apply({"params": p}, codes, labels, train=train, method="hidden_states",
                      rngs={"dropout": rng} if train else None)
        return jnp.mean(h.astype(jnp.float32), axis=1)
    return features


def tokenizer_feature_fn(tokenizer: Any, tap: str) -> Callable[..., jax.Array]:
    """(tokenizer params, unused, batch, rng) -> (B, D) float32: the mean over positions of
    the tokenizer's features at `tap` (`interfaces.probe_features`, eval mode) of the batch's
    [0, 1] "image"s: GigaTok's tokenizer linear probe (`tokenizer/lin_probe/lin_probe.py`).
    A tap the tokenizer lacks is its ValueError when the features are first traced."""
    interfaces.check_probed(tokenizer)

    def features(p, _, batch, rng):
        del rng  # the tokenizer has no dropout
        f = interfaces.probe_features(tokenizer, p, batch["image"], tap)
        return jnp.mean(f.astype(jnp.float32), axis=1)
    return features


def features_of_batches(features: Callable[..., jax.Array], params: Any, tok_params: Any,
                        batches: Iterable[dict[str, Any]], rng: Optional[jax.Array] = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of the rows of global `batches` whose "mask" is
    True (all rows without a mask; labels -1 without a "label"), in order, the same on every
    host: `features` (`feature_fn`) jitted once, one batch in flight while the previous one
    is copied back. `rng`: folded with the batch index (dropout features)."""
    fn = jax.jit(features)
    rng = jax.random.key(0) if rng is None else rng
    feats, labels, pending = [], [], None

    def store(result):
        f, batch = result
        keep = (parallel.host_array(batch["mask"]).astype(bool) if "mask" in batch
                else slice(None))
        feats.append(parallel.host_array(f)[keep])
        y = (parallel.host_array(batch["label"]) if "label" in batch
             else np.full((f.shape[0],), -1))
        labels.append(np.asarray(y, np.int32)[keep])

    for b, batch in enumerate(batches):
        result = (fn(params, tok_params, batch, jax.random.fold_in(rng, b)), batch)
        if pending is not None:
            store(pending)
        pending = result
    if pending is not None:
        store(pending)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels)


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
    n = len(codes)
    if mesh is None:
        place = lambda batch: jax.tree.map(jnp.asarray, batch)  # noqa: E731
    else:
        sharding = parallel.batch_sharding(mesh, _rules(rules))
        shards = parallel.batch_shards(sharding)
        batch_size = -(-batch_size // shards) * shards
        start, stop = parallel.host_batch_slice(sharding, batch_size)
        sub_params = _on_mesh(sub_params, mesh)

        def place(batch):
            return parallel.global_batch({k: v[start:stop] for k, v in batch.items()},
                                         sharding, batch_size)
    context = _mesh_context(mesh, rules)

    def batches():
        for begin in range(0, n, batch_size):
            chunk = codes[begin:begin + batch_size].astype(np.int32)
            rows = len(chunk)
            mask = np.arange(batch_size) < rows
            if rows < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - rows, chunk.shape[1]),
                                                        np.int32)])
            yield place({"codes": chunk, "mask": mask})

    with context:
        feats, _ = features_of_batches(feature_fn(sub), sub_params, None, batches())
    return feats.reshape(n, model.width)


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


# The largest training-feature array `train_linear_probe` copies to the device whole.
DEVICE_FEATURE_BYTES = 4 << 30


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


def _check_labels(name: str, y: np.ndarray, num_classes: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}).")


class _Probe:
    """The probe's model, MAE schedule and LARS, its initial variables and optimizer state,
    and one update on a batch of features; shared by the two trainers below."""

    def __init__(self, num_classes: int, dim: int, batch_size: int, steps_per_epoch: int,
                 epochs: int, base_lr: float, warmup_epochs: float, seed: int):
        self.peak_lr = base_lr * batch_size / 256
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.schedule = mae_schedule(self.peak_lr, steps_per_epoch, epochs, warmup_epochs)
        self.tx = mae_lars(self.schedule)
        self.model = LinearProbe(num_classes)
        variables = self.model.init(jax.random.key(seed), jnp.zeros((2, dim), jnp.float32),
                                    train=False)
        self.params, self.batch_stats = variables["params"], variables["batch_stats"]
        self.opt_state = self.tx.init(self.params)

    def update(self, params, batch_stats, opt_state, x, y):
        """One LARS step on features x (B, D), labels y (B,) (train-mode BN) -> (params,
        batch_stats, opt_state, loss, accuracy)."""
        def loss_fn(p):
            logits, new = self.model.apply({"params": p, "batch_stats": batch_stats}, x,
                                           train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.mean(ce), (logits, new["batch_stats"])
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
        return params, batch_stats, opt_state, loss, acc

    def log_epoch(self, log_fn, epoch: int, loss, acc) -> None:
        if log_fn is not None:
            lr = float(self.schedule((epoch + 1) * self.steps_per_epoch - 1))
            log_fn(f"linear probe epoch {epoch + 1}/{self.epochs}: loss {float(loss):.4f}, "
                   f"train accuracy {float(acc):.4f}, lr {lr:.4g}")

    def finish(self, params, batch_stats, val: np.ndarray, val_labels: np.ndarray, loss, acc,
               log_fn) -> dict[str, Any]:
        variables = {"params": params, "batch_stats": batch_stats}
        preds = predict(self.model, variables, val)
        val_acc = float(np.mean(preds == val_labels)) if len(val_labels) else float("nan")
        if log_fn is not None:
            log_fn(f"linear probe: top-1 validation accuracy {val_acc:.4f} "
                   f"({len(val_labels)} examples)")
        return {"val_accuracy": val_acc, "train_loss": float(loss),
                "train_accuracy": float(acc), "lr": self.peak_lr,
                "steps": self.epochs * self.steps_per_epoch, "variables": variables}


def train_linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                       val_features: np.ndarray, val_labels: np.ndarray, num_classes: int,
                       epochs: int = 90, batch_size: int = 256, base_lr: float = 0.1,
                       warmup_epochs: float = 10, seed: int = 0,
                       log_fn: Optional[Callable[[str], None]] = None,
                       device_bytes: int = DEVICE_FEATURE_BYTES) -> dict[str, Any]:
    """Trains a `LinearProbe` on (train_features, train_labels) with MAE's linear-probe recipe
    (see the module docstring) and evaluates it on the validation set. Features over
    `device_bytes` stay in host memory (ten-crop ImageNet features of a GPT: tens of GB) and
    are sent in pieces of that size; smaller ones are copied to the device once.

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
    _check_labels("train_labels", labels, num_classes)
    _check_labels("val_labels", val_labels, num_classes)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training examples do not fill one batch of {batch_size}.")
    probe = _Probe(num_classes, dim, batch_size, steps_per_epoch, epochs, base_lr,
                   warmup_epochs, seed)

    @jax.jit
    def train_steps(params, batch_stats, opt_state, feats_, labels_, rows, variants):
        """The probe's update scanned over (steps, batch) row / variant ids of the features
        (V, n, D) and labels (n,); returns the sums of the steps' loss and accuracy."""
        def train_step(carry, idx):
            x, y = feats_[idx[1], idx[0]], labels_[idx[0]]
            *carry, loss, acc = probe.update(*carry, x, y)
            return tuple(carry), (loss, acc)

        (params, batch_stats, opt_state), (losses, accs) = jax.lax.scan(
            train_step, (params, batch_stats, opt_state), (rows, variants))
        return params, batch_stats, opt_state, jnp.sum(losses), jnp.sum(accs)

    # Features that fit in `device_bytes` go to the device once and every epoch is one call;
    # larger ones stay on the host, which sends each piece of an epoch's batches (at most
    # `device_bytes` of features) with its rows renumbered: the same steps, in the same order.
    resident = feats.nbytes <= device_bytes
    piece = steps_per_epoch if resident else max(1, device_bytes // (batch_size * dim * 4))
    if resident:
        device_feats, device_labels = jnp.asarray(feats), jnp.asarray(labels)
    elif log_fn is not None:
        log_fn(f"linear probe: {feats.nbytes / 2**30:.1f} GiB of features stay on the host "
               f"(over {device_bytes / 2**30:.1f} GiB); {piece} batches are sent at a time")
    params, batch_stats, opt_state = probe.params, probe.batch_stats, probe.opt_state
    rng = np.random.default_rng(seed)
    loss = acc = float("nan")
    for epoch in range(epochs):
        rows = rng.permutation(n)[:steps_per_epoch * batch_size].reshape(steps_per_epoch,
                                                                           batch_size)
        variants = (rng.integers(0, num_variants, rows.shape) if num_variants > 1
                    else np.zeros(rows.shape, np.int64))
        loss = acc = 0.0
        for start in range(0, steps_per_epoch, piece):
            r, v = rows[start:start + piece], variants[start:start + piece]
            if resident:
                args = (device_feats, device_labels, r.astype(np.int32), v.astype(np.int32))
            else:  # this piece's feature rows alone, numbered 0 .. rows - 1
                ids = np.arange(r.size, dtype=np.int32).reshape(r.shape)
                args = (feats[v.reshape(1, -1), r.reshape(1, -1)], labels[r.reshape(-1)], ids,
                        np.zeros_like(ids))
            params, batch_stats, opt_state, loss_sum, acc_sum = train_steps(
                params, batch_stats, opt_state, *args)
            loss, acc = loss + loss_sum, acc + acc_sum
        loss, acc = loss / steps_per_epoch, acc / steps_per_epoch
        probe.log_epoch(log_fn, epoch, loss, acc)
    return probe.finish(params, batch_stats, val, val_labels, loss, acc, log_fn)


def train_linear_probe_online(features: Callable[..., jax.Array], params: Any, tok_params: Any,
                              batches: Iterator[dict[str, Any]], num_train: int,
                              val_features: np.ndarray, val_labels: np.ndarray,
                              num_classes: int, epochs: int = 90, batch_size: int = 256,
                              base_lr: float = 0.1, warmup_epochs: float = 10, seed: int = 0,
                              log_fn: Optional[Callable[[str], None]] = None
                              ) -> dict[str, Any]:
    """`train_linear_probe` with the training features computed inside every step, as
    upstream trains: `features(params, tok_params, batch, rng)` (`feature_fn`, e.g. encoding
    a fresh random crop + flip of each image, with the GPT's dropout) on the next of the
    global `batches` ({"codes" or "image", "label"} of `batch_size` rows; its augmentation is
    the caller's), then the probe's update, in one jitted step. An epoch is
    num_train // batch_size steps (upstream's drop_last); over a stream that runs on from one
    pass to the next (tok1d's training pipelines), an epoch's batches may start in the
    previous pass (at most batch_size - 1 examples each). Same result dict."""
    val = np.asarray(val_features, np.float32)
    val_labels = np.asarray(val_labels).reshape(-1).astype(np.int32)
    _check_labels("val_labels", val_labels, num_classes)
    if val.ndim != 2 or len(val) != len(val_labels):
        raise ValueError(f"Shapes do not match: val features {val.shape}, labels "
                         f"{val_labels.shape}.")
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_train} training examples do not fill one batch of "
                         f"{batch_size}.")
    probe = _Probe(num_classes, val.shape[1], batch_size, steps_per_epoch, epochs, base_lr,
                   warmup_epochs, seed)
    base_rng = jax.random.key(seed + 1)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(probe_params, batch_stats, opt_state, params, tok_params, batch, step):
        x = features(params, tok_params, batch, jax.random.fold_in(base_rng, step))
        return probe.update(probe_params, batch_stats, opt_state, x,
                            batch["label"].astype(jnp.int32))

    params_, batch_stats, opt_state = probe.params, probe.batch_stats, probe.opt_state
    loss = acc = float("nan")
    for epoch in range(epochs):
        sums = []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            params_, batch_stats, opt_state, loss_i, acc_i = train_step(
                params_, batch_stats, opt_state, params, tok_params, next(batches),
                jnp.int32(step))
            sums.append((loss_i, acc_i))
        loss, acc = (float(np.mean([float(v[k]) for v in sums])) for k in (0, 1))
        probe.log_epoch(log_fn, epoch, loss, acc)
    return probe.finish(params_, batch_stats, val, val_labels, loss, acc, log_fn)


# ---------------------------------------------------------------------------- both


def code_batches(codes: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0,
                 sharding: Optional[NamedSharding] = None) -> Iterator[dict[str, Any]]:
    """Endless training batches {"codes" (B, T) int32, "label" (B,)} of in-memory codes
    (N, V, T): every epoch a fresh seeded shuffle of the N examples (the last incomplete batch
    dropped, upstream's drop_last), each row one of its V variants drawn at random (the token
    dataset's augmentation). With a batch `sharding` every batch is a global array of which
    this host loads its rows (`codes` the same on every host)."""
    codes, labels = np.asarray(codes), np.asarray(labels).reshape(-1)
    if codes.ndim == 2:
        codes = codes[:, None]
    n, num_variants = codes.shape[:2]
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"{n} training examples do not fill one batch of {batch_size}.")
    if sharding is not None and batch_size % parallel.batch_shards(sharding):
        raise ValueError(f"The probe's batch of {batch_size} is not a multiple of the mesh's "
                         f"{parallel.batch_shards(sharding)} batch shards.")
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size)
        variants = rng.integers(0, num_variants, rows.shape)
        for r, v in zip(rows, variants):
            batch = {"codes": codes[r, v].astype(np.int32), "label": labels[r].astype(np.int32)}
            if sharding is None:
                yield jax.tree.map(jnp.asarray, batch)
            else:
                start, stop = parallel.host_batch_slice(sharding, batch_size)
                yield parallel.global_batch({k: x[start:stop] for k, x in batch.items()},
                                            sharding, batch_size)


def _mesh_context(mesh: Optional[Mesh], rules):
    if mesh is None:
        return _NullContext()
    return _MeshContext(mesh, _rules(rules))


def _rules(rules) -> tuple:
    return parallel.DEFAULT_RULES if rules is None else tuple(rules)


def run_linear_probe(model: GPT, params: Any, train_codes: np.ndarray, train_labels: np.ndarray,
                     val_codes: np.ndarray, val_labels: np.ndarray, layer: Optional[int] = None,
                     feature_batch_size: int = 256, mesh: Optional[Mesh] = None,
                     rules: Optional[Sequence[tuple[str, Any]]] = None,
                     num_classes: Optional[int] = None, log_fn: Optional[Callable[[str], None]]
                     = None, val_variant: int = 0, dropout: bool = False,
                     **probe_kwargs: Any) -> dict[str, Any]:
    """GigaTok's AR linear probe end to end on codes: `probe_features` of the validation codes
    (M, T) (or (M, V, T): the variant `val_variant`, the un-augmented one:
    `TokenSource.plain_variant`), and of the training codes (N, T) or (N, V, T) (the token
    dataset's layout: V variants per example), then the probe (`probe_kwargs`: epochs,
    batch_size, base_lr, warmup_epochs, seed).

    Without `dropout` (or for a GPT without dropout, where it changes nothing) the training
    features are computed once, clean, for every variant (`train_linear_probe`: fast, the
    probe's epochs scanned on device). With `dropout` they are computed in every step with
    the GPT's dropout, as upstream trains, on one variant drawn per example
    (`train_linear_probe_online` over `code_batches`; with a mesh the batch must be a
    multiple of its batch shards).
    `num_classes` defaults to the GPT's. Returns the trainer's dict plus "layer" and
    "feature_dim"."""
    layer = default_layer(model) if layer is None else int(layer)
    train_codes, val_codes = np.asarray(train_codes), np.asarray(val_codes)
    if train_codes.ndim == 2:
        train_codes = train_codes[:, None]
    if val_codes.ndim == 3:
        val_codes = val_codes[:, val_variant]
    n, num_variants, num_tokens = train_codes.shape
    num_classes = model.num_classes if num_classes is None else num_classes
    dropout = dropout and has_dropout(model)
    feature = lambda c: probe_features(model, params, c, layer, feature_batch_size, mesh, rules)
    val_features = feature(val_codes)
    if not dropout:
        flat = feature(train_codes.transpose(1, 0, 2).reshape(num_variants * n, num_tokens))
        train_features = flat.reshape(num_variants, n, -1)
        if log_fn is not None:
            log_fn(f"linear probe: features after {layer} of {model.depth} blocks, "
                   f"{train_features.shape} train, {val_features.shape} validation")
        result = train_linear_probe(train_features, train_labels, val_features, val_labels,
                                    num_classes, log_fn=log_fn, **probe_kwargs)
    else:
        batch_size = probe_kwargs.get("batch_size", 256)
        sharding = None if mesh is None else parallel.batch_sharding(mesh, _rules(rules))
        batches = code_batches(train_codes, train_labels, batch_size,
                               probe_kwargs.get("seed", 0), sharding)
        if log_fn is not None:
            log_fn(f"linear probe: features after {layer} of {model.depth} blocks with "
                   f"dropout in every step, {n} x {num_variants} train codes, "
                   f"{val_features.shape} validation")
        sub, sub_params = truncate(model, params, layer)
        with _mesh_context(mesh, rules):
            if mesh is not None:
                sub_params = _on_mesh(sub_params, mesh)
            result = train_linear_probe_online(
                feature_fn(sub, train=True), sub_params, None, batches, n, val_features,
                val_labels, num_classes, log_fn=log_fn, **probe_kwargs)
    result.update(layer=layer, feature_dim=int(val_features.shape[-1]))
    return result


def run_linear_probe_on_images(model: GPT, params: Any, tokenizer: Any, tok_params: Any,
                               train_batches: Iterator[dict[str, Any]], num_train: int,
                               val_batches: Iterable[dict[str, Any]], prefix_tokens: int = 0,
                               layer: Optional[int] = None, dropout: bool = True,
                               mesh: Optional[Mesh] = None,
                               rules: Optional[Sequence[tuple[str, Any]]] = None,
                               num_classes: Optional[int] = None,
                               log_fn: Optional[Callable[[str], None]] = None,
                               **probe_kwargs: Any) -> dict[str, Any]:
    """GigaTok's AR linear probe as lin_probe.py runs it, on images: every training step
    encodes the next of the global `train_batches` ({"image" [0, 1], "label"}, the caller's
    augmentation: upstream's random_crop_arr + flip, a fresh draw every epoch) with the frozen
    `tokenizer`, takes the GPT's features of the codes (with its dropout when `dropout`) and
    updates the probe; `val_batches` ({"image", "label", "mask"}: upstream's center crops) are
    encoded and featurised once in eval mode. An epoch is `num_train` // batch_size steps.
    Returns `train_linear_probe`'s dict plus "layer" and "feature_dim"."""
    layer = default_layer(model) if layer is None else int(layer)
    sub, sub_params = truncate(model, params, layer)
    what = (f"features after {layer} of {model.depth} blocks of images encoded in every step"
            f"{' (GPT dropout on)' if dropout else ''}")
    result = _probe_on_images(
        feature_fn(sub, tokenizer, prefix_tokens, train=dropout),
        feature_fn(sub, tokenizer, prefix_tokens), sub_params, tok_params, train_batches,
        num_train, val_batches, model.num_classes if num_classes is None else num_classes,
        mesh, rules, log_fn, what, **probe_kwargs)
    result.update(layer=layer)
    return result


def run_tokenizer_linear_probe(tokenizer: Any, params: Any,
                               train_batches: Iterator[dict[str, Any]], num_train: int,
                               val_batches: Iterable[dict[str, Any]], num_classes: int,
                               tap: str = "encoder", mesh: Optional[Mesh] = None,
                               rules: Optional[Sequence[tuple[str, Any]]] = None,
                               log_fn: Optional[Callable[[str], None]] = None,
                               **probe_kwargs: Any) -> dict[str, Any]:
    """GigaTok's tokenizer linear probe (`tokenizer/lin_probe/lin_probe.py`, which GigaTok's
    instructions call "not recommended": its accuracy does not follow the AR probe's): the
    same probe and recipe as the AR probe, on the frozen tokenizer's own features at `tap`
    (`interfaces.probe_features`; "encoder", upstream's default) averaged over positions,
    computed in every step from the next of the global `train_batches` (upstream: ADM
    random_crop_arr + flip) and once from `val_batches` (center crops). Returns
    `train_linear_probe`'s dict plus "tap" and "feature_dim"."""
    features = tokenizer_feature_fn(tokenizer, tap)
    result = _probe_on_images(features, features, params, None, train_batches, num_train,
                              val_batches, num_classes, mesh, rules, log_fn,
                              f"the tokenizer's {tap!r} features of images encoded in every "
                              "step", **probe_kwargs)
    result.update(tap=tap)
    return result


def _probe_on_images(train_features: Callable[..., jax.Array],
                     val_features_fn: Callable[..., jax.Array], params: Any, tok_params: Any,
                     train_batches: Iterator[dict[str, Any]], num_train: int,
                     val_batches: Iterable[dict[str, Any]], num_classes: int,
                     mesh: Optional[Mesh], rules, log_fn, what: str,
                     **probe_kwargs: Any) -> dict[str, Any]:
    """The validation features once, then `train_linear_probe_online`, on `mesh` (`params`
    not on it are replicated onto it); adds "feature_dim"."""
    with _mesh_context(mesh, rules):
        if mesh is not None:
            params = _on_mesh(params, mesh)
        val_features, val_labels = features_of_batches(val_features_fn, params, tok_params,
                                                       val_batches)
        if log_fn is not None:
            log_fn(f"linear probe: {what}, {num_train} train, {val_features.shape} validation")
        result = train_linear_probe_online(
            train_features, params, tok_params, train_batches, num_train, val_features,
            val_labels, num_classes, log_fn=log_fn, **probe_kwargs)
    result.update(feature_dim=int(val_features.shape[-1]))
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


def probe_options(ecfg, num_train: int, seed: int = 0, shards: int = 1) -> dict[str, Any]:
    """The probe's keyword arguments from a config's `evaluation.linear_probe_*` options:
    warm-up min(10, epochs / 9) epochs; the batch at most the training set, and a multiple of
    `shards` (the mesh's batch shards, where batches are sharded: the training set cut to a
    multiple of them when it is the smaller; a ValueError for a configured batch that is
    not)."""
    batch = ecfg.linear_probe_batch_size
    if batch % shards:
        raise ValueError(f"evaluation.linear_probe_batch_size={batch} is not a multiple of "
                         f"the mesh's {shards} batch shards.")
    batch = min(batch, num_train // shards * shards)
    if batch < 1:
        raise ValueError(f"The linear probe's {num_train} training examples do not fill one "
                         f"batch over the mesh's {shards} batch shards.")
    return dict(epochs=ecfg.linear_probe_epochs, batch_size=batch,
                base_lr=ecfg.linear_probe_lr,
                warmup_epochs=min(10, ecfg.linear_probe_epochs / 9), seed=seed)


def batch_shards(mesh: Optional[Mesh], rules=None) -> int:
    """How many ways the mesh splits a batch (1 without a mesh)."""
    if mesh is None:
        return 1
    return parallel.batch_shards(parallel.batch_sharding(mesh, _rules(rules)))


def code_probe_shards(ecfg, model: GPT, mesh: Optional[Mesh], rules=None) -> int:
    """The batch shards the probe on codes must split its batch into: the mesh's when it
    trains online (`linear_probe_dropout` on a GPT with dropout: sharded batches), else 1."""
    online = bool(ecfg.get("linear_probe_dropout", False)) and has_dropout(model)
    return batch_shards(mesh, rules) if online else 1


def has_dropout(model: GPT) -> bool:
    """Whether the GPT's train mode differs from its eval mode (token / residual dropout)."""
    return model.token_dropout > 0 or model.dropout_rate > 0


def probe_metrics(out: dict[str, Any]) -> dict[str, float]:
    """{"linear_probe_accuracy", "linear_probe_train_accuracy", "linear_probe_layer"}."""
    return {"linear_probe_accuracy": float(out["val_accuracy"]),
            "linear_probe_train_accuracy": float(out["train_accuracy"]),
            "linear_probe_layer": float(out["layer"])}


def probe_from_config(model: GPT, params: Any, train: tuple[np.ndarray, np.ndarray],
                      val: tuple[np.ndarray, np.ndarray], ecfg, mesh: Optional[Mesh] = None,
                      rules=None, seed: int = 0, log_fn=None) -> dict[str, float]:
    """`run_linear_probe` of (codes, labels) pairs with a config's `evaluation.linear_probe_*`
    options (`linear_probe_dropout`: upstream's dropout features); `probe_metrics`."""
    dropout = bool(ecfg.get("linear_probe_dropout", False)) and has_dropout(model)
    out = run_linear_probe(model, params, train[0], train[1], val[0], val[1], mesh=mesh,
                           rules=rules, log_fn=log_fn, dropout=dropout,
                           **probe_options(ecfg, len(train[0]), seed,
                                           code_probe_shards(ecfg, model, mesh, rules)))
    return probe_metrics(out)
