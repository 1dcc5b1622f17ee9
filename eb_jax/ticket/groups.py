"""Channel coupling, declared once per model family: which BN's channels index which
array axes. The surgery (surgery.py) is family-agnostic code over these groups.

A `Group` is a set of channels pruned together. Its member BNs' masks decide which
channels stay (a channel stays if any member keeps it); every listed array axis is then
cut to those channels. A `select` group keeps its BNs at full width and turns the kept
channels into a gather (PreResNet's channel selection); only its consumers are cut.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eb_jax.models.preresnet import PreResNet
from eb_jax.models.resnet import ResNet
from eb_jax.models.vgg import VGG
from eb_jax.models.vit import ViT


@dataclasses.dataclass(frozen=True)
class Group:
    key: tuple  # names the width this group sets
    bns: tuple  # member BN module names
    cuts: tuple  # (module name, param name, axis) of the arrays indexed by the channels
    select: bool = False


def channel_groups(model, prune_residual: bool = False) -> list[Group]:
    """The coupling groups of `model` (`prune_residual`: ResNet residual widths too)."""
    if isinstance(model, VGG):
        return _vgg_groups(model)
    if isinstance(model, PreResNet):
        return _preresnet_groups(model)
    if isinstance(model, ResNet):
        return _resnet_groups(model, prune_residual)
    if isinstance(model, ViT):
        from eb_jax.ticket import vit_groups  # it builds on Group

        return vit_groups.vit_groups(model)
    raise ValueError(f"no channel coupling is declared for {type(model).__name__}")


def interior_groups(model) -> list[Group]:
    """The groups that per-layer criteria (ThiNet, SFP) prune: one BN's channels inside a
    block, or one VGG layer's. Channel selections and residual streams stay whole."""
    return [
        g
        for g in channel_groups(model)
        if not g.select and len(g.bns) == 1 and g.key[0] in ("conv", "inner")
    ]


def producer(group: Group) -> str:
    """The conv whose output channels the group's channels are."""
    return next(module for module, _, axis in group.cuts if axis == 3)


def consumer_conv(group: Group) -> str | None:
    """The conv that reads the group's channels, or None where a linear layer does."""
    return next((module for module, _, axis in group.cuts if axis == 2), None)


def exact_fold(model, group: Group) -> tuple | None:
    """Where a constant output of one of `group`'s channels can be folded exactly once
    the channel is cut: ('dense', layer) for a linear layer after the global mean (VGG's
    classifier: the mean of a constant map is the constant), ('bn', conv, bn) for a 1x1
    conv straight into a BN (a bottleneck's conv3 -> bn3: no padding, so the constant
    reaches every position and shifts the BN's mean); None where no fold is exact (a
    padded 3x3 conv sees the constant only inside the map, not at its zero border; a
    pre-activation block's conv3 adds into the residual stream, which has no bias)."""
    consumer = next(module for module, _, axis in group.cuts if axis in (0, 2))
    if isinstance(model, VGG) and consumer == "classifier":
        return ("dense", consumer)
    if isinstance(model, ResNet) and model.block == "bottleneck" and consumer.endswith("_conv3"):
        return ("bn", consumer, consumer.removesuffix("_conv3") + "_bn3")
    return None


def masks_for_bns(model, params, keep_of: dict) -> list:
    """Per-BN keep-masks in bn_paths() order: `keep_of[bn]` where given, else all kept."""
    masks = []
    for path in model.bn_paths():
        width = np.shape(params[path[-1]]["scale"])[0]
        masks.append(np.asarray(keep_of.get(path[-1], np.ones(width, bool))))
    return masks


def narrow_widths(model, kept: dict) -> dict:
    """The width fields of the narrow model, from each group key's kept channel indices."""
    if isinstance(model, VGG):
        counts = iter(len(kept[("conv", i)]) for i in range(len(model.conv_widths())))
        return {"cfg": tuple(c if c == "M" else next(counts) for c in model.cfg)}
    if isinstance(model, ViT):
        from eb_jax.ticket import vit_groups

        return vit_groups.narrow_widths(model, kept)
    if isinstance(model, PreResNet):
        n = len(model.block_names())
        return {
            "inner_widths": tuple(
                (len(kept[("inner", i, 0)]), len(kept[("inner", i, 1)])) for i in range(n)
            ),
            "selections": tuple(tuple(int(c) for c in kept[("select", i)]) for i in range(n + 1)),
        }
    stem, stages, inner = model._widths()
    n_inner = 2 if model.block == "bottleneck" else 1
    widths = {
        "inner_widths": tuple(
            tuple(len(kept[("inner", i, j)]) for j in range(n_inner)) for i in range(len(inner))
        )
    }
    if ("stage", 0) in kept:
        widths["stage_widths"] = tuple(len(kept[("stage", s)]) for s in range(len(stages)))
        widths["stem_width"] = len(kept[("stem",)] if ("stem",) in kept else kept[("stage", 0)])
    return widths


def _vgg_groups(model: VGG) -> list[Group]:
    n = len(model.conv_widths())
    groups = []
    for i in range(n):
        consumer = (f"conv{i + 1}", "kernel", 2) if i + 1 < n else ("classifier", "kernel", 0)
        groups.append(Group(("conv", i), (f"bn{i}",), ((f"conv{i}", "kernel", 3), consumer)))
    return groups


def _preresnet_groups(model: PreResNet) -> list[Group]:
    groups = []
    for i, blk in enumerate(model.block_names()):
        groups += [
            Group(("select", i), (f"{blk}_bn1",), ((f"{blk}_conv1", "kernel", 2),), select=True),
            Group(
                ("inner", i, 0),
                (f"{blk}_bn2",),
                ((f"{blk}_conv1", "kernel", 3), (f"{blk}_conv2", "kernel", 2)),
            ),
            Group(
                ("inner", i, 1),
                (f"{blk}_bn3",),
                ((f"{blk}_conv2", "kernel", 3), (f"{blk}_conv3", "kernel", 2)),
            ),
        ]
    n = len(model.block_names())
    groups.append(Group(("select", n), ("bn_final",), (("fc", "kernel", 0),), select=True))
    return groups


def _resnet_groups(model: ResNet, prune_residual: bool) -> list[Group]:
    groups, i = [], 0
    last = 3 if model.block == "bottleneck" else 2
    for s, n in enumerate(model.stage_sizes):
        for b in range(n):
            blk = f"stage{s}_block{b}"
            for j in range(1, last):  # the block interior: conv_j's outputs
                groups.append(
                    Group(
                        ("inner", i, j - 1),
                        (f"{blk}_bn{j}",),
                        ((f"{blk}_conv{j}", "kernel", 3), (f"{blk}_conv{j + 1}", "kernel", 2)),
                    )
                )
            i += 1
    if prune_residual:
        groups += _residual_groups(model, last)
    return groups


def _residual_groups(model: ResNet, last: int) -> list[Group]:
    """One group per residual stream: every layer that adds into it, and its readers."""

    def readers(s):  # the convs that read stage s's input stream
        if s == len(model.stage_sizes):
            return [("fc", "kernel", 0)]
        cuts = [(f"stage{s}_block0_conv1", "kernel", 2)]
        return cuts + (
            [(f"stage{s}_block0_down_conv", "kernel", 2)] if model.has_downsample(s, 0) else []
        )

    groups = []
    stem_joins_stage0 = not model.has_downsample(0, 0)  # basic blocks: identity from the stem
    if not stem_joins_stage0:
        groups.append(Group(("stem",), ("stem_bn",), (("stem_conv", "kernel", 3), *readers(0))))
    for s, n in enumerate(model.stage_sizes):
        bns, cuts = [], []
        if s == 0 and stem_joins_stage0:
            bns, cuts = ["stem_bn"], [("stem_conv", "kernel", 3)]
        for b in range(n):
            blk = f"stage{s}_block{b}"
            bns.append(f"{blk}_bn{last}")
            cuts.append((f"{blk}_conv{last}", "kernel", 3))
            if model.has_downsample(s, b):
                bns.append(f"{blk}_down_bn")
                cuts.append((f"{blk}_down_conv", "kernel", 3))
            if b > 0 or (s == 0 and stem_joins_stage0):  # reads this stage's own stream
                cuts.append((f"{blk}_conv1", "kernel", 2))
        groups.append(Group(("stage", s), tuple(bns), tuple(cuts + readers(s + 1))))
    return groups


def current_selection(model, group: Group, width: int) -> np.ndarray:
    """For a select group: the BN channels its consumers read now (all for a dense model)."""
    if not group.select:
        return np.arange(width)
    selections = getattr(model, "selections", None)
    chosen = selections[group.key[1]] if selections else None
    return np.arange(width) if chosen is None else np.asarray(chosen)
