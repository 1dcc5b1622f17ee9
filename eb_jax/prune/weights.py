"""Unstructured pruning: masks over every conv/linear kernel weight (SNIP, the lottery
ticket's global magnitude pruning).

A weight mask is a params-shaped tree of bools, True where a weight is kept; leaves that
are not kernels (BN scales and biases, linear biases) are all True. The train step holds
the masked weights at exactly zero (`train.apply_weight_mask`).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from eb_jax.ticket.masks import prune_count
from eb_jax.train_steps import cross_entropy


def is_kernel(path) -> bool:
    """Conv and linear weights: the params named 'kernel' in eb_jax models."""
    return path[-1] == "kernel"


def global_top_mask(scores: dict, ratio: float) -> dict:
    """Keeps the largest (1 - ratio) fraction of kernel weights by `scores` over the whole
    network: exactly total - floor(total * ratio) of them. Ties are broken by position:
    the kernels in the tree's key order, each flattened in C order; earlier stays."""
    flat = flax.traverse_util.flatten_dict(scores)
    kernels = [path for path in flat if is_kernel(path)]
    values = np.concatenate([np.asarray(flat[p], np.float64).ravel() for p in kernels])
    keep_count = values.size - prune_count(values.size, ratio)
    order = np.argsort(-values, kind="stable")  # stable: equal scores keep their order
    keep = np.zeros(values.size, bool)
    keep[order[:keep_count]] = True
    masks, start = {}, 0
    for path, leaf in flat.items():
        if is_kernel(path):
            size = np.size(leaf)
            masks[path] = keep[start : start + size].reshape(np.shape(leaf))
            start += size
        else:
            masks[path] = np.ones(np.shape(leaf), bool)
    return flax.traverse_util.unflatten_dict(masks)


def magnitude_mask(params: dict, ratio: float) -> dict:
    """Frankle & Carbin's one-shot pruning: the smallest |w| of all kernels, globally."""
    return global_top_mask(jax.tree.map(np.abs, params), ratio)


def snip_mask(model, variables: dict, batches, ratio: float) -> dict:
    """SNIP (Lee et al. 2019): connection sensitivity |dL/dw * w| at `variables` (the
    initialisation), the gradient averaged over `batches` ({'image', 'label'}, train-mode
    BatchNorm); the largest (1 - ratio) fraction of kernel weights is kept."""
    grad_fn = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    total, count = None, 0
    for batch in batches:
        grads = grad_fn(model, variables["params"], variables.get("batch_stats", {}), batch)
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
        count += 1
    if not count:
        raise ValueError("SNIP needs at least one training batch")
    saliency = jax.tree.map(
        lambda g, w: np.abs(np.asarray(g) / count * np.asarray(w)), total, variables["params"]
    )
    return global_top_mask(saliency, ratio)


def _loss(model, params, batch_stats, batch):
    logits, _ = model.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    return cross_entropy(logits, batch["label"])


def nonzero_fraction(weight_mask: dict) -> float:
    """The fraction of kernel weights a mask keeps."""
    flat = flax.traverse_util.flatten_dict(weight_mask)
    kept = sum(int(np.sum(m)) for p, m in flat.items() if is_kernel(p))
    total = sum(np.size(m) for p, m in flat.items() if is_kernel(p))
    return kept / total
