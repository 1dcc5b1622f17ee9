"""Training state, the optimizer (PyTorch SGD semantics, or AdamW), and the pure train/eval
steps.

The steps take an optional `axis_name`: under `pmap` they average gradients over it and
sum evaluation counts; BatchNorm statistics stay per device, like the original's
DataParallel.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from eb_jax import lowp, names
from eb_jax.models import built_from_fields
from eb_jax.models.layers import BN_MOMENTUM


class TrainState(train_state.TrainState):
    """flax's TrainState with the BN statistics, and the learning rate at each global
    step (the optimizer's schedule), which the train step reports."""

    batch_stats: Any = None
    learning_rate_fn: Any = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, apply_fn, params, tx, **kwargs):
        """flax's, with the optimizer state built by one compiled call: run eagerly,
        `tx.init` compiles a small program per parameter shape."""
        opt_state = jax.jit(tx.init)(params)
        return cls(step=0, apply_fn=apply_fn, params=params, tx=tx, opt_state=opt_state, **kwargs)


def lr_schedule(base_lr: float, boundaries_epochs, decay: float, steps_per_epoch: int):
    """Piecewise-constant LR: `base_lr`, times `decay` at the start of each boundary epoch."""
    return optax.piecewise_constant_schedule(
        base_lr, {int(e) * steps_per_epoch: decay for e in boundaries_epochs}
    )


def cosine_schedule(base_lr: float, warmup_epochs: int, epochs: int, steps_per_epoch: int):
    """Linear warm-up from 0 over `warmup_epochs`, then a cosine decay to 0 at `epochs`."""
    warmup = warmup_epochs * steps_per_epoch
    return optax.warmup_cosine_decay_schedule(
        0.0, base_lr, warmup, max(epochs * steps_per_epoch, warmup + 1), 0.0
    )


class _ConfigKey:
    """A config as a cache key: equal when their JSON is equal (the config rides along).
    A value JSON cannot hold is keyed by its repr: equal only where the repr is."""

    def __init__(self, config):
        self.config = config
        self.json = json.dumps(config.to_dict(), sort_keys=True, default=repr)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ConfigKey) and self.json == other.json

    def __hash__(self) -> int:
        return hash(self.json)


def stage_lr(config, steps_per_epoch: int, lr_origin: int = 0, stage: str = ""):
    """The learning rate at each global step of a stage whose schedule starts at step
    `lr_origin`: the one source the optimizer and the logged learning rate read. A
    'search' stage takes config.search_lr where that sets a learning rate.

    Equal arguments give the same function (as `create_optimizer` gives the same
    optimizer): the TrainStates of equal stages compare equal and share JAX's compiled
    steps within a process (a grid's runs, a resumed run, a notebook's reruns)."""
    return _stage_lr(_ConfigKey(config), steps_per_epoch, lr_origin, stage)


@functools.lru_cache(maxsize=64)
def _stage_lr(key: _ConfigKey, steps_per_epoch: int, lr_origin: int, stage: str):
    config = key.config
    if config.lr_schedule == "cosine":
        schedule = cosine_schedule(
            config.learning_rate, config.warmup_epochs, config.num_epochs, steps_per_epoch
        )
    else:
        searching = stage == names.SEARCH and config.search_lr.learning_rate
        lr = config.search_lr if searching else config
        schedule = lr_schedule(lr.learning_rate, lr.lr_boundaries, lr.lr_decay, steps_per_epoch)
    if not lr_origin:
        return schedule
    return lambda step: schedule(step - lr_origin)  # noqa: E731


def _is_bn_scale(params, bn_paths=None):
    """Marks the BatchNorm scale leaves: those of `bn_paths` (module paths), default every
    param named 'scale' (only BatchNorms' in eb_jax's own models)."""
    bns = None if bn_paths is None else {tuple(p) for p in bn_paths}
    return flax.traverse_util.path_aware_map(
        lambda path, _: path[-1] == "scale" and (bns is None or tuple(path[:-1]) in bns), params
    )


def add_bn_sparsity(strength: float, bn_paths=None) -> optax.GradientTransformation:
    """Network slimming: adds strength * sign(scale) to every BN scale gradient (the BNs
    at `bn_paths`, default every 'scale' param).

    Applied before weight decay and momentum, as the original adds it to `.grad`.
    """

    def update(updates, state, params):
        flags = _is_bn_scale(params, bn_paths)
        updates = jax.tree.map(
            lambda u, p, is_scale: u + strength * jnp.sign(p) if is_scale else u,
            updates,
            params,
            flags,
        )
        return updates, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def create_optimizer(
    config,
    steps_per_epoch: int,
    start_step: int = 0,
    sparsity: float | None = None,
    precision: lowp.Precision = lowp.FP32,
    learning_rate_fn=None,
    bn_paths=None,
) -> optax.GradientTransformation:
    """SGD with PyTorch semantics: g += s*sign(bn scale); g += wd*p; buf = m*buf + g.
    With config.optimizer 'adamw': g += s*sign(scale), then AdamW (`_adamw`).

    A fresh optimizer for a stage that starts at global step `start_step`, at the
    learning rate `learning_rate_fn(global step)` (default: `stage_lr` of the run).
    `sparsity`: s, default `config.sparsity` (0 where no ticket is drawn from the scales).
    `precision` 'bfp8': g quantised after the sparsity term, buf after each update.
    `bn_paths`: the BNs the sparsity acts on (a factory's network), default every 'scale'.
    Equal arguments give the same optimizer (see `stage_lr`).
    """
    bn_paths = None if bn_paths is None else tuple(tuple(p) for p in bn_paths)
    return _optimizer(
        _ConfigKey(config),
        steps_per_epoch,
        start_step,
        sparsity,
        precision,
        learning_rate_fn,
        bn_paths,
    )


@functools.lru_cache(maxsize=64)
def _optimizer(
    key: _ConfigKey, steps_per_epoch, start_step, sparsity, precision, learning_rate_fn, bn_paths
) -> optax.GradientTransformation:
    config = key.config
    sparsity = config.sparsity if sparsity is None else sparsity
    learning_rate_fn = learning_rate_fn or _stage_lr(key, steps_per_epoch, 0, "")
    schedule = learning_rate_fn
    if start_step:  # the optimizer counts its own updates from 0
        schedule = lambda count: learning_rate_fn(count + start_step)  # noqa: E731
    parts = []
    if sparsity:
        parts.append(add_bn_sparsity(sparsity, bn_paths))
    if config.optimizer == "adamw":
        return optax.chain(*parts, _adamw(config, schedule))
    fmt = precision.bfp
    if precision.quantized:
        parts.append(lowp.quantize_gradients(fmt.gradient_bits, config.seed, fmt.stochastic))
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if precision.quantized and config.momentum:
        parts.append(
            lowp.quantized_momentum(config.momentum, fmt.momentum_bits, config.seed, fmt.stochastic)
        )
        parts.append(optax.scale_by_learning_rate(schedule))
    else:
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=False))
    return optax.chain(*parts)


def _adamw(config, schedule) -> optax.GradientTransformation:
    """AdamW (decay = weight_decay x learning rate, on the kernels and embeddings only:
    no biases, norms or gates, as DeiT), after clipping the global gradient norm."""
    b1, b2 = config.adam_betas
    decayed = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    parts.append(optax.adamw(schedule, b1, b2, weight_decay=config.weight_decay, mask=decayed))
    return optax.chain(*parts)


def init_variables(model, rng, input_shape) -> dict:
    """The model's params and batch_stats for inputs of shape (H, W, C)."""
    # Partitionable threefry takes seconds to compile per shape on CPU; init is never
    # sharded, so the classic threefry (as fast to compile as it is to run) is used.
    images = jnp.zeros((1, *input_shape), jnp.float32)
    with jax.threefry_partitionable(False):
        if built_from_fields(model):
            return _init(model, rng, images)
        return jax.jit(model.init)(rng, images)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, rng, images):
    """`model.init`, compiled once per (equal) model and shape in a process."""
    return model.init(rng, images)


def create_train_state(model, rng, input_shape, tx, apply_fn=None) -> TrainState:
    """Initialises the model on a dummy batch of `input_shape` (H, W, C); `apply_fn`
    (default `model.apply`) is how the steps call it (data.normalizing: uint8 batches)."""
    variables = init_variables(model, rng, input_shape)
    return TrainState.create(
        apply_fn=apply_fn or model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean cross-entropy; with `label_smoothing` e the targets are (1 - e) one-hot + e / C."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def train_step(
    state: TrainState,
    batch,
    weight_mask=None,
    axis_name: str | None = None,
    precision: lowp.Precision = lowp.FP32,
    seed: int = 0,
    label_smoothing: float = 0.0,
):
    """One optimizer step on `batch` ({'image', 'label'}); returns the new state and metrics
    (with the step's `learning_rate` where the state carries its `learning_rate_fn`).

    `weight_mask` (a params-shaped tree of bools, or None): the masked-out weights get no
    gradient, so neither weight decay nor momentum moves them, and are set to exactly 0
    after the update. `precision` 'bfp8' (the model's too): activations and errors rounded
    with noise drawn from `seed`, the step and the device; the updated weights rounded too.
    """
    rngs = _rounding_rngs(precision, seed, state.step, axis_name)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return cross_entropy(logits, batch["label"], label_smoothing), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    if weight_mask is not None:
        grads = apply_weight_mask(grads, weight_mask)
    step = state.step
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    if precision.quantized:
        fmt = precision.bfp
        key = lowp.stream_key(seed, lowp.WEIGHTS, step) if fmt.stochastic else None
        state = state.replace(params=lowp.quantize_tree(state.params, fmt.weight_bits, key))
    if weight_mask is not None:
        state = state.replace(params=apply_weight_mask(state.params, weight_mask))
    metrics = _train_metrics(loss, logits, batch["label"], axis_name)
    if state.learning_rate_fn is not None:
        metrics["learning_rate"] = state.learning_rate_fn(step)
    return state, metrics


def _rounding_rngs(precision: lowp.Precision, seed: int, step, axis_name) -> dict:
    """The 'quant' key of a stochastically rounded (bfp8) step; {} otherwise."""
    if not (precision.quantized and precision.bfp.stochastic):
        return {}
    key = lowp.stream_key(seed, lowp.ACTIVATIONS, step)
    if axis_name is not None:  # each device rounds its own examples
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return {"quant": key}


def _train_metrics(loss, logits, labels, axis_name) -> dict:
    """The step's summed loss, correct count and count (over the devices)."""
    n = labels.shape[0]
    metrics = {
        "loss_sum": loss * n,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": jnp.asarray(n, jnp.int32),
    }
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    return metrics


def apply_weight_mask(tree, weight_mask):
    """`tree` (params-shaped) with the entries that `weight_mask` marks False set to 0."""
    return jax.tree.map(lambda x, keep: jnp.where(keep, x, jnp.zeros_like(x)), tree, weight_mask)


def bn_statistics_step(state: TrainState, batch, axis_name: str | None = None):
    """The BatchNorm batch statistics of `batch` under `state.params` (for SWA)."""
    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    _, updates = state.apply_fn(
        {"params": state.params, "batch_stats": zeros},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    # From zero, a running average holds (1 - momentum) x the batch's statistics.
    stats = jax.tree.map(lambda s: s / (1 - BN_MOMENTUM), updates["batch_stats"])
    if axis_name is not None:
        stats = jax.lax.pmean(stats, axis_name)
    return stats


def swa_update(average, params, count):
    """The running mean of `count` weight snapshots with `params` added (SWALP's formula)."""
    alpha = 1.0 / (count + 1)
    return jax.tree.map(lambda a, p: a * (1.0 - alpha) + p * alpha, average, params)


def eval_step(state: TrainState, batch, axis_name: str | None = None):
    """Summed loss/correct(/top-5 correct)/count over the examples whose `mask` is set
    (padding is not)."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    mask = batch.get("mask", jnp.ones(batch["label"].shape, bool))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    metrics = {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & mask),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }
    if logits.shape[-1] >= 5:  # top-5 (ImageNet's second number): the label among the 5 best
        _, top5 = jax.lax.top_k(logits, 5)
        metrics["correct5"] = jnp.sum(jnp.any(top5 == batch["label"][:, None], -1) & mask)
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    return metrics
