"""Channel coupling of the built-in CNNs, found by tracing (trace.py): which BN's
channels index which array axes. The surgery (surgery.py) is family-agnostic code over
these groups.

A `Group` is a set of channels pruned together. Its member BNs' masks decide which
channels stay (a channel stays if any member keeps it); every listed array axis is then
cut to those channels. The traced groups of VGG, ResNet and PreResNet are named here by
the width field each sets (`key`). A `select` group keeps its BNs at full width and turns
the kept channels into a gather (PreResNet's channel selection: a BN on a residual stream,
which is never cut, and the layer called next, which reads its channels); only that
reader is cut.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np

from eb_jax.lowp import FP32
from eb_jax.models.preresnet import PreResNet
from eb_jax.models.resnet import ResNet
from eb_jax.models.vgg import VGG
from eb_jax.models.vit import ViT
from eb_jax.ticket.trace import trace_channels


@dataclasses.dataclass(frozen=True)
class Group:
    key: tuple  # names the width this group sets
    bns: tuple  # member BN module names
    cuts: tuple  # (module name, param name, axis) of the arrays indexed by the channels
    select: bool = False


def channel_groups(model, prune_residual: bool = False) -> list[Group]:
    """The coupling groups of `model` (`prune_residual`: ResNet residual widths too)."""
    if isinstance(model, (VGG, ResNet, PreResNet)):
        plain = {"conv_impl": "xla", "precision": FP32}  # the same coupling, plainer ops
        if isinstance(model, PreResNet):
            plain["selections"] = None  # the dense network's streams: _selection
        groups = list(_traced_groups(model.clone(**plain)))
        if isinstance(model, ResNet) and not prune_residual:
            groups = [g for g in groups if g.key[0] == "inner"]
        return sorted(groups, key=_network_order)
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


@functools.lru_cache(maxsize=64)
def _traced_groups(model) -> tuple[Group, ...]:
    """The traced groups of a built-in model, keyed by the width field each sets; for a
    PreResNet's residual streams (never cut), each BN's channel selection instead."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    trace = trace_channels(model, variables, x)
    kernels = [
        (path[1], axis, trace.channel_of[atoms])
        for path, axes in trace.leaves.items()
        if path[0] == "params" and path[-1] == "kernel"
        for axis, atoms in enumerate(axes)
    ]
    order = {path[-1]: i for i, path in enumerate(model.bn_paths())}
    called = {path[0]: i for i, path in enumerate(trace.modules) if path}
    kernels.sort(key=lambda k: (k[1] != 3, called[k[0]]))  # producers first, in call order
    groups = []
    for traced in trace.groups:
        bns = tuple(sorted((bn[-1] for bn in traced.bns), key=order.get))
        key = _group_key(model, bns)
        if key is None:  # a PreResNet stream
            groups += [_selection(model, trace, bn) for bn in bns]
            continue
        if traced.frozen:
            raise ValueError(f"the trace freezes {bns} of {type(model).__name__}: {traced.frozen}")
        cuts = tuple(
            (module, "kernel", axis)
            for module, axis, ids in kernels
            if np.isin(ids, traced.ids).all()
        )
        groups.append(Group(key, bns, cuts))
    return tuple(groups)


def _group_key(model, bns: tuple) -> tuple | None:
    """The width a traced group sets, from its BNs' names: ('conv', i) for VGG's layer i;
    ('inner', block, j) for a block's j-th interior width; ('stage', s) for a ResNet
    stage's residual stream, ('stem',) for a stem of its own; None for a PreResNet
    stream (its BNs select instead)."""
    if isinstance(model, VGG):
        return ("conv", int(bns[0].removeprefix("bn")))
    match = re.fullmatch(r"(stage\d+_block\d+)_bn(\d)", bns[0]) if len(bns) == 1 else None
    if isinstance(model, PreResNet):  # bn2 and bn3 inside a block
        if match and match[2] in ("2", "3"):
            return ("inner", model.block_names().index(match[1]), int(match[2]) - 2)
        return None
    if match and int(match[2]) < (3 if model.block == "bottleneck" else 2):
        return ("inner", model.block_names().index(match[1]), int(match[2]) - 1)
    stages = {int(m[1]) for bn in bns if (m := re.match(r"stage(\d+)_", bn))}
    return ("stage", stages.pop()) if stages else ("stem",)


def _network_order(group: Group) -> tuple:
    """The declared order: per block its selection, then its interior widths; the
    residual streams after every block (stem first)."""
    kind, *index = group.key
    if kind == "stem":
        return (1, -1)
    if kind == "stage":
        return (1, index[0])
    return (0, index[0], 0 if kind == "select" else 1 + (index[1] if len(index) > 1 else 0))


def _selection(model: PreResNet, trace, bn: str) -> Group:
    """A PreResNet stream BN keeps its width; the layer the model calls right after it,
    which reads its channels one for one (checked), reads only the kept ones (gathered)."""
    calls = [path[0] for path in trace.modules if len(path) == 1]
    reader = next(
        m for m in calls[calls.index(bn) + 1 :] if ("params", m, "kernel") in trace.leaves
    )
    axes = trace.leaves[("params", reader, "kernel")]
    axis = len(axes) - 2  # the input axis of a conv's or a dense layer's kernel
    own = trace.channel_of[trace.bn_scales[(bn,)]]
    if not np.array_equal(trace.channel_of[axes[axis]], own):
        raise ValueError(f"PreResNet's {reader} does not read the channels of {bn} one for one")
    blocks = model.block_names()
    i = len(blocks) if bn == "bn_final" else blocks.index(bn.removesuffix("_bn1"))
    return Group(("select", i), (bn,), ((reader, "kernel", axis),), select=True)


def current_selection(model, group: Group, width: int) -> np.ndarray:
    """For a select group: the BN channels its consumers read now (all for a dense model)."""
    if not group.select:
        return np.arange(width)
    selections = getattr(model, "selections", None)
    chosen = selections[group.key[1]] if selections else None
    return np.arange(width) if chosen is None else np.asarray(chosen)
