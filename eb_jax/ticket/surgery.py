"""Pytree surgery: cut a network down to its ticket, inheriting the kept weights.

`plan_cut` turns per-BN masks into the kept channels of every coupling group (groups.py),
applying `min_channels` (no layer ends empty: its largest-|scale| channels stay) and
`round_to` (kept counts rounded up with the next-largest scales). `apply_cut` slices any
variables of the dense model with a plan, so the same plan cuts the trained weights
('inherit') and the weights at initialisation ('rewind').
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from eb_jax.models import bn_scales
from eb_jax.models.vit import ViT
from eb_jax.ticket import vit_groups
from eb_jax.ticket.groups import (
    Group,
    channel_groups,
    current_selection,
    exact_fold,
    interior_groups,
    narrow_widths,
    producer,
)

BN_EPSILON = 1e-5  # the models' (models.layers.batch_norm)


@dataclasses.dataclass
class CutPlan:
    groups: list[Group]
    kept: dict  # group key -> ascending kept channel indices (of the BN's channels)
    masks: list  # effective per-BN keep-masks, bn_paths() order (all ones if not cut)
    widths: dict  # the narrow model's width fields
    rescued: list  # BN names of groups that min_channels kept alive
    rounded: list  # BN names of groups that round_to widened


def plan_cut(
    model, params, masks, *, min_channels: int = 1, round_to: int = 0, prune_residual: bool = False
) -> CutPlan:
    """The kept channels per group for per-BN `masks` (bn_paths() order)."""
    if min_channels < 1 or round_to < 0:
        raise ValueError(
            f"min_channels must be >= 1 and round_to >= 0, got {min_channels}, {round_to}"
        )
    names = [path[-1] for path in model.bn_paths()]
    scales = [np.abs(np.asarray(s, np.float32)) for s in bn_scales(model, params)]
    _check_masks(model, names, scales, masks)
    mask_of = {n: np.asarray(m, bool).ravel() for n, m in zip(names, masks, strict=True)}
    score_of = dict(zip(names, scales, strict=True))
    groups = channel_groups(model, prune_residual)
    kept, effective, rescued, rounded = {}, {n: np.ones_like(m) for n, m in mask_of.items()}, [], []
    for group in groups:
        width = mask_of[group.bns[0]].size
        available = current_selection(model, group, width)
        keep = np.zeros(width, bool)
        for bn in group.bns:  # a channel stays if any member keeps it
            keep |= mask_of[bn]
        keep &= np.isin(np.arange(width), available)
        score = np.max([score_of[bn] for bn in group.bns], axis=0)
        target = max(int(keep.sum()), min(min_channels, available.size))
        if target > keep.sum():
            rescued.append(group.bns[0])
        if round_to:
            rounded_target = min(available.size, math.ceil(target / round_to) * round_to)
            if rounded_target > target:
                rounded.append(group.bns[0])
            target = rounded_target
        if target > keep.sum():  # add the largest-|scale| available channels not yet kept
            candidates = available[~keep[available]]
            best = candidates[np.argsort(-score[candidates], kind="stable")]
            keep[best[: target - keep.sum()]] = True
        kept[group.key] = np.flatnonzero(keep)
        for bn in group.bns:
            effective[bn] = keep.copy()
    return CutPlan(
        groups, kept, [effective[n] for n in names], narrow_widths(model, kept), rescued, rounded
    )


def apply_cut(model, variables: dict, plan: CutPlan):
    """(narrow model, its variables): `variables` of the dense `model` sliced by `plan`."""
    # tree.map builds new dicts, so the slicing below leaves `variables` untouched.
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    stats = jax.tree.map(np.asarray, dict(variables.get("batch_stats", {})))
    if isinstance(model, ViT):
        params = vit_groups.fold_gates(model, params)
    for group in plan.groups:
        kept = plan.kept[group.key]
        width = params[group.bns[0]]["scale"].shape[0]
        positions = np.searchsorted(current_selection(model, group, width), kept)
        if not group.select:
            for bn in group.bns:
                for tree, leaves in ((params, ("scale", "bias")), (stats, ("mean", "var"))):
                    for leaf in (leaf for leaf in leaves if leaf in tree.get(bn, {})):
                        tree[bn][leaf] = np.take(tree[bn][leaf], kept, axis=0)
        for module, leaf, axis in group.cuts:
            params[module][leaf] = np.take(params[module][leaf], positions, axis=axis)
    narrow = model.clone(**plan.widths)
    return narrow, {"params": params, "batch_stats": stats}


def fold_constant_channels(model, variables: dict, plan: CutPlan, narrow_variables: dict):
    """(narrow variables, folded, left): the cut channels whose output is a constant (a
    zeroed filter: the ReLU of its BN's offset, as SFP leaves them) added into their
    consumer's bias or BN mean where `groups.exact_fold` says that is exact; `left`
    counts the constant channels that could not be folded (their offsets are lost)."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    narrow = jax.tree.map(np.array, narrow_variables)  # copies, written below
    folded = left = 0
    for group in interior_groups(model):
        conv, bn = producer(group), group.bns[0]
        kernel = np.asarray(params[conv]["kernel"], np.float64)
        cut = np.setdiff1d(np.arange(kernel.shape[-1]), plan.kept[group.key])
        constant = cut[~np.any(kernel[..., cut] != 0, axis=tuple(range(kernel.ndim - 1)))]
        if not constant.size or "bias" in params[conv]:
            continue
        values = _constant_outputs(params[bn], stats[bn], constant)
        target = exact_fold(model, group)
        if target is None:
            left += int(np.count_nonzero(values))
            continue
        weights = np.asarray(params[target[1]]["kernel"], np.float64)
        shift = values @ weights.reshape(-1, weights.shape[-2], weights.shape[-1])[0][constant]
        if target[0] == "dense":
            layer = narrow["params"][target[1]]
            layer["bias"] = (layer["bias"] + shift).astype(layer["bias"].dtype)
        else:
            mean = narrow["batch_stats"][target[2]]["mean"]
            narrow["batch_stats"][target[2]]["mean"] = (mean - shift).astype(mean.dtype)
        folded += int(np.count_nonzero(values))
    return narrow, folded, left


def _constant_outputs(bn_params, bn_stats, channels) -> np.ndarray:
    """relu(BN(0)) of `channels` in evaluation: what a zeroed filter's channel outputs."""
    inv = np.asarray(bn_params["scale"], np.float64)[channels] / np.sqrt(
        np.asarray(bn_stats["var"], np.float64)[channels] + BN_EPSILON
    )
    mean = np.asarray(bn_stats["mean"], np.float64)[channels]
    return np.maximum(np.asarray(bn_params["bias"], np.float64)[channels] - mean * inv, 0.0)


def cut_ticket(model, variables, masks, **plan_options):
    """plan_cut + apply_cut on the trained variables ('inherit'). Returns (model, vars, plan)."""
    plan = plan_cut(model, variables["params"], masks, **plan_options)
    narrow, narrow_variables = apply_cut(model, variables, plan)
    return narrow, narrow_variables, plan


def _check_masks(model, names, scales, masks) -> None:
    family = type(model).__name__
    if len(masks) != len(names):
        raise ValueError(
            f"got {len(masks)} masks for the {len(names)} BN layers of this {family}; pass "
            "one mask per BN layer in bn_paths() order (a mask from another model family?)"
        )
    for name, scale, mask in zip(names, scales, masks, strict=True):
        if np.asarray(mask).size != scale.size:
            raise ValueError(
                f"the mask for BN layer {name} has {np.asarray(mask).size} channels, the "
                f"layer has {scale.size}"
            )
