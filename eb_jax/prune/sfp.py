"""Soft filter pruning (He et al. 2018): after every epoch, in every prunable conv, the
`ratio` fraction of output filters with the smallest L2 norm is set to zero; training
goes on and they may grow back. At the end those filters are cut out for good.

"Prunable" means the widths the coupling groups cut inside blocks (groups.interior_groups),
as for ThiNet. Ties in the norm are broken by channel index (the lower goes first).
"""

from __future__ import annotations

import numpy as np

from eb_jax.ticket.groups import interior_groups, masks_for_bns, producer
from eb_jax.ticket.masks import prune_count


def filter_keep_masks(model, params, ratio: float) -> dict:
    """{BN name: keep-mask}: each prunable conv's filters but the `ratio` weakest (L2)."""
    keep_of = {}
    for group in interior_groups(model):
        kernel = np.asarray(params[producer(group)]["kernel"], np.float64)
        norms = np.sqrt(np.sum(kernel.reshape(-1, kernel.shape[-1]) ** 2, axis=0))
        keep = np.ones(norms.size, bool)
        keep[np.argsort(norms, kind="stable")[: prune_count(norms.size, ratio)]] = False
        keep_of[group.bns[0]] = keep
    return keep_of


def soft_prune(model, params, ratio: float) -> dict:
    """`params` (host arrays) with the weakest filters of every prunable conv set to 0."""
    params = dict(params)
    keep_of = filter_keep_masks(model, params, ratio)
    for group in interior_groups(model):
        module = producer(group)
        kernel = np.asarray(params[module]["kernel"])
        zeroed = np.where(keep_of[group.bns[0]], kernel, np.zeros_like(kernel))
        params[module] = {**params[module], "kernel": zeroed}
    return params


def hard_prune_masks(model, params, ratio: float) -> list:
    """Per-BN masks (bn_paths() order) that cut the zeroed filters: the final hard prune."""
    return masks_for_bns(model, params, filter_keep_masks(model, params, ratio))
