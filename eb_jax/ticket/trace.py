"""Channel groups of any flax.linen CNN, found by tracing it (docs/method.md, "Tracing").

`trace_groups` traces `model.apply` in eval mode on abstract shapes and interprets the
jaxpr (jaxpr_rules.py): channels are the connected components of the array positions
the ops tie together, and a group is the channels of the layers whose outputs are tied
(a residual stream, the input and output of a depthwise conv). A group is scored by the
BatchNorms over its channels and is frozen (never cut) when the trace finds anything
that would make cutting it change the network's output; `.frozen` says what.
"""

from __future__ import annotations

import dataclasses
import inspect

import flax.linen as nn
import jax
import numpy as np

from eb_jax.ticket.jaxpr_channels import ChannelGraph, Value, new_value, zeros_like_axis
from eb_jax.ticket.jaxpr_rules import constant_value, interpret

# Leaves of a norm layer: their width always follows the input's.
_NORM_LEAVES = {"scale", "bias", "mean", "var"}


@dataclasses.dataclass(frozen=True)
class TracedGroup:
    """Channels cut together. `bns`: the BatchNorm paths (module names) that score them;
    `frozen`: None, or why the group is never cut; `producers`: the parameter paths of
    the layers whose output channels these are."""

    bns: tuple
    frozen: str | None
    channels: int
    producers: tuple
    ids: np.ndarray = dataclasses.field(repr=False, compare=False)  # channel ids, BN order


@dataclasses.dataclass
class ChannelTrace:
    """Everything the cut needs: each variable's atoms per axis and their channel ids."""

    groups: list
    channel_of: np.ndarray  # atom -> channel id
    leaves: dict  # variable path (collection first) -> atom array per axis
    bn_scales: dict  # BN path -> its scale's atoms
    scores: np.ndarray  # channel id -> the largest |BN scale| on it
    modules: dict  # module path -> the module as traced
    projections: list = dataclasses.field(default_factory=list)  # flattened axes: (merged
    # atoms, factor atom arrays)
    jaxpr: object = None  # the traced eval-mode apply


def trace_groups(model: nn.Module, variables, x, **apply_kwargs) -> list[TracedGroup]:
    """The channel groups of `model`, traced from `model.apply(variables, x, ...)`."""
    return trace_channels(model, variables, x, **apply_kwargs).groups


def eval_kwargs(model: nn.Module, apply_kwargs: dict) -> dict:
    """`apply_kwargs` for an eval-mode call: train=False where the model takes `train`."""
    kwargs = {k: v for k, v in apply_kwargs.items() if k != "mutable"}
    if "train" not in kwargs and "train" in inspect.signature(type(model).__call__).parameters:
        kwargs["train"] = False
    return kwargs


def trace_channels(model: nn.Module, variables, x, **apply_kwargs) -> ChannelTrace:
    kwargs = eval_kwargs(model, apply_kwargs)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (variables, x))
    modules = {}

    def record(next_fun, args, kw, context):
        modules.setdefault(context.module.path, context.module)
        return next_fun(*args, **kw)

    def run(v, inputs):
        with nn.intercept_methods(record):
            return model.apply(v, inputs, **kwargs)

    closed = jax.make_jaxpr(run)(*shapes)
    graph = ChannelGraph()
    leaves, bns = _variable_values(graph, variables, modules)
    inputs = [new_value(graph, s.shape) for s in jax.tree.leaves(shapes[1])]
    consts = [constant_value(graph, c) for c in closed.consts]
    ins = [leaves[path] for path in _paths(variables)] + inputs
    for out in interpret(graph, closed.jaxpr, consts, ins, ""):
        for atoms in out.axes:
            graph.poison(atoms, "they reach the model's output")
    root = type(model).__name__
    graph.poisoned = [(atoms, _clean(reason, root)) for atoms, reason in graph.poisoned]
    trace = _group(graph, {p: v.axes for p, v in leaves.items()}, bns, variables, modules)
    trace.jaxpr = closed.jaxpr
    return trace


def _clean(reason: str, root: str) -> str:
    """'Net/block/block._convolve: ...' -> 'block: ...' (module names only)."""
    where, sep, what = reason.partition(": ")
    if not sep:
        return reason
    parts = [p for p in where.split("/") if p and "." not in p and "(" not in p]
    parts = parts[1:] if parts[:1] == [root] else parts
    return f"{'/'.join(parts) or root}: {what}"


def _paths(tree) -> list[tuple]:
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def bn_paths_of(variables) -> list[tuple]:
    """Module paths with a 1-D `scale` param and `mean`/`var` statistics: the BatchNorms."""
    stats = {p[:-1] for p in _paths(variables.get("batch_stats", {})) if p[-1] == "mean"}
    return [
        p[1:-1]
        for p, leaf in zip(_paths(variables), jax.tree.leaves(variables), strict=True)
        if p[0] == "params" and p[-1] == "scale" and len(leaf.shape) == 1 and p[1:-1] in stats
    ]


def _variable_values(graph: ChannelGraph, variables, modules: dict):
    bns = bn_paths_of(variables)
    if not bns:
        raise ValueError(
            "the model has no BatchNorm layer (params 'scale' with batch_stats 'mean'/'var'): "
            "there are no BN scales to draw a ticket from"
        )
    values = {}
    for path, leaf in zip(_paths(variables), jax.tree.leaves(variables), strict=True):
        value = new_value(graph, leaf.shape)
        value.param = path
        if path[0] == "params" and path[1:-1] in bns and path[-1] in ("scale", "bias"):
            value.z[0] = zeros_like_axis(graph, value.axes[0], True)  # zeroed when cut
        reason = _unsettable(modules.get(path[1:-1]), path, leaf.shape)
        if reason:
            for atoms in value.axes:
                graph.poison(atoms, reason)
        values[path] = value
    return values, bns


def _unsettable(module, path: tuple, shape: tuple) -> str | None:
    """Why the narrow model could not have this variable narrower, or None if it can."""
    where = "/".join(path[1:-1])
    if module is None:
        return f"{where}: {path[-1]} belongs to no module the trace called"
    features = getattr(module, "features", None)
    is_width = isinstance(features, int) and len(shape) and shape[-1] == features
    if is_width and (path[-1] == "kernel" or (path[-1] == "bias" and len(shape) == 1)):
        return None
    if features is None and path[-1] in _NORM_LEAVES and len(shape) == 1:
        return None
    return f"{where}: a {type(module).__name__}, whose width eb_jax cannot set"


def _components(n: int, pairs: list) -> np.ndarray:
    """Connected-component label of each of n nodes under the position-wise `pairs`."""
    from scipy.sparse import coo_matrix  # scipy comes with jax; imported when tracing only
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return np.arange(n)
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    adjacency = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    return connected_components(adjacency, directed=False)[1]


def _group(graph, leaves, bns, variables, modules) -> ChannelTrace:
    channel_of = _components(graph.count, graph.links)
    n = int(channel_of.max()) + 1 if channel_of.size else 0
    poison_rank = np.full(n, len(graph.poisoned))
    reasons = [reason for _, reason in graph.poisoned]
    for rank, (atoms, _) in enumerate(graph.poisoned):
        ids = channel_of[atoms]
        poison_rank[ids] = np.minimum(poison_rank[ids], rank)
    produced = [(channel_of[atoms], param) for atoms, param in graph.produced]
    group_links = [(ids[:-1], ids[1:]) for ids, _ in produced]
    group_of = _components(n, group_links)
    scales = {bn: leaves[("params", *bn, "scale")][0] for bn in bns}
    scores = np.zeros(n, np.float32)
    for bn, atoms in scales.items():
        scale = _get(variables["params"], bn)["scale"]
        if isinstance(scale, jax.ShapeDtypeStruct):  # traced from shapes alone: no scores
            continue
        magnitude = np.abs(np.asarray(jax.device_get(scale)))
        np.maximum.at(scores, channel_of[atoms], magnitude.astype(np.float32))
    context = (channel_of, group_of, poison_rank, reasons, produced)
    groups = _make_groups(scales, context)
    projections = [
        (np.arange(first, first + int(np.prod(p.sizes))), p.factors)
        for first, p in graph.projections.items()
    ]
    return ChannelTrace(groups, channel_of, leaves, scales, scores, modules, projections)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _make_groups(scales: dict, context) -> list[TracedGroup]:
    channel_of, group_of, poison_rank, reasons, produced = context
    order, members = {}, {}
    for rank, (ids, _) in enumerate(produced):  # network order: the first producer's
        for g in np.unique(group_of[ids]):
            order.setdefault(int(g), rank)
    for bn, atoms in scales.items():
        for g in np.unique(group_of[channel_of[atoms]]):
            members.setdefault(int(g), []).append(bn)
    groups = []
    for g in sorted(members, key=lambda g: (order.get(g, len(produced)), g)):
        ids = np.concatenate([channel_of[scales[bn]] for bn in members[g]])
        ids = ids[group_of[ids] == g]
        _, first = np.unique(ids, return_index=True)
        ids = ids[np.sort(first)]
        producers = tuple(
            dict.fromkeys(p for c, p in produced if np.any(group_of[c] == g) and p is not None)
        )
        rank = int(poison_rank[ids].min(initial=len(reasons)))
        frozen = reasons[rank] if rank < len(reasons) else None
        if frozen is None and not producers:
            frozen = "no layer produces these channels (the model's input?)"
        groups.append(TracedGroup(tuple(members[g]), frozen, ids.size, producers, ids))
    return groups


__all__ = ["ChannelTrace", "TracedGroup", "Value", "trace_channels", "trace_groups"]
