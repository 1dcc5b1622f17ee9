"""Cut any traced linen model to its ticket: the kept channels, sliced variables, and a
narrow module called exactly as the original.

Which channels go follows the traced groups (trace.py): a channel stays if any BN over it
keeps it; a frozen group stays whole; `min_channels` and `round_to` act per group as in
surgery.plan_cut. Every variable axis is then cut to the positions whose channels stay
(a flattened axis: the positions none of whose factors went). The narrow module is a
subclass of the model's class that runs the same code with each layer's `features` (and
a grouped conv's `feature_group_count`) set to the cut widths.
"""

from __future__ import annotations

import functools
import json
import math

import flax.linen as nn
import jax
import numpy as np

from eb_jax.ticket.trace import ChannelTrace, eval_kwargs, trace_channels


def cut(
    model: nn.Module, variables, masks: dict, x, *, min_channels=1, round_to=0, whole=(), **kwargs
):
    """(narrow_model, narrow_variables, kept_masks) for per-BN keep-`masks` (BN path ->
    bool vector). The groups of the BNs in `whole` stay whole, as a frozen group does
    (e.g. a ResNet's residual streams). `kwargs` are `model.apply`'s (train=False is
    used for the trace)."""
    if min_channels < 1 or round_to < 0:
        raise ValueError(
            f"min_channels must be >= 1 and round_to >= 0, got {min_channels}, {round_to}"
        )
    trace = trace_channels(model, variables, x, **kwargs)
    if all(g.frozen for g in trace.groups):
        first = trace.groups[0].frozen
        raise ValueError(f"every channel group of this model is frozen, nothing to cut: {first}")
    kept = _kept_channels(trace, masks, min_channels, round_to, _paths(whole))
    removed = removed_atoms(trace, kept)
    narrow_variables = _slice_variables(variables, trace, removed)
    kept_masks = {bn: ~removed[atoms] for bn, atoms in trace.bn_scales.items()}
    narrow = narrow_model(model, _widths(trace, narrow_variables))
    _check_narrow(trace, narrow, narrow_variables, x, kwargs)
    return narrow, narrow_variables, kept_masks


def _paths(keys) -> list[tuple]:
    """BN paths given as tuples of module names, or one name for a top-level module."""
    return [(k,) if isinstance(k, str) else tuple(k) for k in keys]


def _kept_channels(trace: ChannelTrace, masks: dict, min_channels: int, round_to: int, whole):
    """Per channel id: does it stay."""
    kept = np.zeros(trace.scores.size, bool)
    scored = np.zeros_like(kept)
    masks = dict(zip(_paths(masks), masks.values(), strict=True))
    unknown = [k for k in [*masks, *whole] if k not in trace.bn_scales]
    if unknown:
        names = ", ".join("/".join(k) for k in trace.bn_scales)
        raise ValueError(f"no BatchNorm {'/'.join(unknown[0])} in this model; it has: {names}")
    for bn, atoms in trace.bn_scales.items():
        ids = trace.channel_of[atoms]
        mask = np.asarray(masks.get(bn, np.ones(ids.size, bool)), bool).ravel()
        if mask.size != ids.size:
            raise ValueError(
                f"the mask for BN layer {'/'.join(bn)} has {mask.size} channels, the layer "
                f"has {ids.size}"
            )
        scored[ids] = True
        np.logical_or.at(kept, ids, mask)
    kept |= ~scored
    for group in trace.groups:
        ids = group.ids
        stays = group.frozen or any(bn in whole for bn in group.bns)
        keep = np.ones(ids.size, bool) if stays else kept[ids].copy()
        target = max(int(keep.sum()), min(min_channels, ids.size))
        if round_to:
            target = min(ids.size, math.ceil(target / round_to) * round_to)
        if target > keep.sum():  # the largest-|scale| channels not yet kept
            candidates = np.flatnonzero(~keep)
            best = candidates[np.argsort(-trace.scores[ids][candidates], kind="stable")]
            keep[best[: target - keep.sum()]] = True
        kept[ids] = keep
    return kept


def removed_atoms(trace: ChannelTrace, kept: np.ndarray) -> np.ndarray:
    """Per atom: is its position cut (its channel goes, or for a flattened position, the
    channel of any of its factors)."""
    removed = ~kept
    for merged, factors in trace.projections:
        n = len(factors)
        grids = [  # factor j's removal, broadcast along the other factors
            removed[trace.channel_of[f]].reshape([-1 if k == j else 1 for k in range(n)])
            for j, f in enumerate(factors)
        ]
        gone = functools.reduce(np.logical_or, grids).ravel()
        removed[trace.channel_of[merged[gone]]] = True
    return removed[trace.channel_of]


def _slice_variables(variables, trace: ChannelTrace, removed: np.ndarray):
    def slice_leaf(path, leaf):
        axes = trace.leaves[tuple(k.key for k in path)]
        keep = [np.flatnonzero(~removed[atoms]) for atoms in axes]
        if all(k.size == n for k, n in zip(keep, np.shape(leaf), strict=True)):
            return leaf
        return np.asarray(leaf)[np.ix_(*keep)] if keep else leaf

    return jax.tree_util.tree_map_with_path(slice_leaf, variables)


def _widths(trace: ChannelTrace, narrow_variables) -> dict:
    """Module path -> the attributes the narrow model sets on it."""
    params = narrow_variables["params"]
    widths = {}
    for path, module in trace.modules.items():
        kernel = _find(params, (*path, "kernel"))
        features = getattr(module, "features", None)
        if kernel is None or not isinstance(features, int):
            continue
        # Every layer's width, changed or not: code may derive a width from its input's.
        setting = {"features": int(kernel.shape[-1])}
        if getattr(module, "feature_group_count", 1) != 1:
            setting["group_inputs"] = int(kernel.shape[-2])  # per group: groups follow
        widths["/".join(path)] = setting
    return widths


def _find(tree, path):
    for key in path:
        if not hasattr(tree, "get") or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_widths(widths: dict, next_fun, args, kwargs, context):
    setting = widths.get("/".join(context.module.path))
    if setting and context.method_name == "__call__":
        for name, value in setting.items():
            if name == "group_inputs":
                name, value = "feature_group_count", args[0].shape[-1] // value
            object.__setattr__(context.module, name, value)
    return next_fun(*args, **kwargs)


@functools.cache
def _narrow_class(base: type, widths_json: str) -> type:
    widths = json.loads(widths_json)

    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(functools.partial(set_widths, widths)):
            return base.__call__(self, *args, **kwargs)

    if getattr(base.__call__, "compact", False):
        __call__ = nn.compact(__call__)
    namespace = {"__call__": __call__, "__module__": base.__module__, "eb_base": base}
    namespace["eb_widths"] = widths
    return type(base.__name__, (base,), namespace)


def narrow_model(model: nn.Module, widths: dict) -> nn.Module:
    """`model` with the given layers' widths (module path 'a/b' -> {attribute: value});
    `widths` is JSON-ready, so a checkpoint can rebuild the narrow model from it."""
    base = getattr(type(model), "eb_base", type(model))
    fields = {
        f: getattr(model, f)
        for f, field in base.__dataclass_fields__.items()
        if f not in ("parent", "name") and field.init
    }
    if not widths:
        return base(**fields)
    return _narrow_class(base, json.dumps(widths, sort_keys=True))(**fields)


def _check_narrow(trace: ChannelTrace, narrow, narrow_variables, x, kwargs) -> None:
    """The narrow model must run on the cut variables (flax checks every param's shape
    against the layer's) and trace to the same ops as the dense one: code that compares a
    width with a number could otherwise take another branch once narrow."""
    kwargs = eval_kwargs(narrow, kwargs)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), narrow_variables)
    try:
        closed = jax.make_jaxpr(lambda v, inputs: narrow.apply(v, inputs, **kwargs))(shapes, x)
    except Exception as error:  # flax's shape errors, JAX's, the model's own
        first = str(error).strip().splitlines()[0]
        raise ValueError(
            f"the cut model does not run ({first}): does the model's code write or compare a "
            "width as a number rather than read it from its input?"
        ) from None
    if op_sequence(closed.jaxpr) != op_sequence(trace.jaxpr):
        raise ValueError(
            "the cut model runs other ops than the dense one: its code compares a width with "
            "a number (e.g. x.shape[-1] == self.features) and branches; compare two arrays' "
            "shapes or the module's own settings instead"
        )


def op_sequence(jaxpr) -> list:
    """The primitives of `jaxpr` in order, sub-jaxprs inlined."""
    ops = []
    for eqn in jaxpr.eqns:
        ops.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    ops += op_sequence(inner)
    return ops
