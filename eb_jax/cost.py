"""Analytic cost of a network and of a training run, in the original's convention.

The paper's convention (docs/method.md, "Cost"): for one image, a multiply-add is 2 FLOPs
(conv, linear; a linear bias adds 1 per output), BatchNorm 2 per element, ReLU 1 per
element, pooling k*k per output; channel selection and residual additions are free.
Training costs 3 x the forward pass per image (forward + two backward products), times
images, times epochs, per stage.

The layers are found by tracing the model once at batch 1 (no compilation): its Conv,
Dense and BatchNorm modules are intercepted with their shapes, and ReLU and pooling are
read off the traced program. Any eb_jax model, dense or cut, is counted by the same code.
A module with a `flops(inputs, out)` method (the ViT's attention, LayerNorm, GELU and
gates) counts itself; a model whose modules count all their element-wise work
(`ELEMENTWISE_IN_MODULES`) is not read off the program, whose reductions are then its
LayerNorms' and softmaxes', not pooling.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params

from eb_jax.lowp import FP32
from eb_jax.models import layers
from eb_jax.ticket.groups import channel_groups
from eb_jax.ticket.masks import prune_count
from eb_jax.ticket.surgery import plan_cut


@dataclasses.dataclass(frozen=True)
class Cost:
    """Forward cost of one image: FLOPs (original convention), MACs (conv, linear and
    attention multiply-adds only) and the number of parameters (BN running statistics excluded)."""

    flops: int
    macs: int
    params: int
    nonzero_macs: int | None = None  # with a weight mask: the MACs of the kept weights


def forward_cost(model: nn.Module, input_shape, weight_mask=None) -> Cost:
    """The forward cost of `model` for one image of shape (H, W, C).

    With a `weight_mask` (unstructured pruning) the counts stay those of the dense
    network, as the paper counts them; `Cost.nonzero_macs` gives the multiply-adds with
    a kept weight."""
    modules, activation_flops, params = _trace(model, input_shape, weight_mask)
    flops = activation_flops + sum(m["flops"] for m in modules.values())
    macs = sum(m["macs"] for m in modules.values())
    nonzero = sum(m["kept_macs"] for m in modules.values()) if weight_mask is not None else None
    return Cost(flops=flops, macs=macs, params=params, nonzero_macs=nonzero)


def _module_cost(module, inputs, out) -> dict | None:
    """A conv/linear/norm module's FLOPs, MACs, input and output channels for one call
    ('kept_macs' where the module counts itself, else None); None for any other module."""
    entry = {"macs": 0, "kept_macs": None, "in": inputs.shape[-1], "out": out.shape[-1]}
    bias = out.size if getattr(module, "use_bias", False) else 0
    if isinstance(module, layers.Conv):
        entry["macs"] = module.kernel_size**2 * inputs.shape[-1] * out.size
        entry["flops"] = 2 * entry["macs"]
    elif isinstance(module, (nn.Conv, nn.ConvTranspose)):  # a factory network's
        entry["macs"] = _linen_conv_macs(module, inputs, out)
        entry["flops"] = 2 * entry["macs"] + bias
    elif isinstance(module, nn.Dense):
        entry["macs"] = inputs.shape[-1] * out.size
        entry["flops"] = 2 * entry["macs"] + bias
    elif isinstance(module, nn.DenseGeneral):
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        entry["macs"] = int(np.prod([inputs.shape[a] for a in axes])) * out.size
        entry["flops"] = 2 * entry["macs"] + bias
    elif hasattr(module, "flops"):  # counts itself (the ViT's attention, norms, gates)
        entry["flops"], entry["macs"] = module.flops(inputs, out)
        entry["kept_macs"] = entry["macs"]
    elif isinstance(module, nn.BatchNorm):  # a factory network's
        entry["flops"] = 2 * inputs.size
    elif isinstance(module, layers.BatchNorm):
        entry["flops"] = 2 * inputs.size + (out.size if module.relu else 0)  # fused ReLU
    else:
        return None
    return entry


def _trace(model: nn.Module, input_shape, weight_mask=None) -> tuple[dict, int, int]:
    """Per conv/linear/BN module (by name): FLOPs, MACs, kept MACs, its input and output
    channels; the ReLU and pooling FLOPs; the parameter count. Without a mask, each
    (model, shape) is traced once per process (a grid's projection asks again and again)."""
    if weight_mask is not None or not _hashable(model):  # a field holding a list: uncached
        return _traced(model, input_shape, weight_mask)
    modules, activation_flops, params = _unmasked_trace(model, tuple(input_shape))
    return copy.deepcopy(modules), activation_flops, params  # the cached one stays as traced


def _hashable(model: nn.Module) -> bool:
    try:
        hash(model)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _unmasked_trace(model: nn.Module, input_shape: tuple) -> tuple[dict, int, int]:
    return _traced(model, input_shape, None)


def _traced(model: nn.Module, input_shape, weight_mask) -> tuple[dict, int, int]:
    # One conv primitive per Conv whatever the backend; no quantisers, fp32.
    model = model.clone(conv_impl="xla", precision=FP32)
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    modules = {}

    def kept(module, out, macs: int) -> int:  # MACs whose weight the mask keeps
        if weight_mask is None:
            return macs
        mask = weight_mask.get(module.name, weight_mask)
        if mask is weight_mask:  # a nested module (a factory's network): by its path
            for key in module.path:
                mask = mask[key]
        mask = np.asarray(mask["kernel"])
        outputs = int(np.prod(getattr(module, "features", out.shape[-1])))
        return out.size // outputs * int(mask.sum())

    def count_module(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        entry = _module_cost(module, args[0], out)
        if entry is None:
            return out
        if entry["kept_macs"] is None:
            entry["kept_macs"] = kept(module, out, entry["macs"]) if entry["macs"] else 0
        modules["/".join(module.path)] = entry  # a top-level module's path is its name
        return out

    def forward(v, x):
        with nn.intercept_methods(count_module):
            return model.apply(v, x, train=False)

    jaxpr = jax.make_jaxpr(forward)(variables, x)
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    if getattr(model, "ELEMENTWISE_IN_MODULES", False):
        return modules, 0, params
    return modules, _activation_and_pool_flops(jaxpr.jaxpr), params


def _linen_conv_macs(module, inputs, out) -> int:
    """Multiply-adds of a flax nn.Conv (grouped too) or nn.ConvTranspose."""
    window = int(np.prod(module.kernel_size))
    if isinstance(module, nn.ConvTranspose):  # every input position meets the whole kernel
        return window * inputs.size * out.shape[-1]
    return window * inputs.shape[-1] // module.feature_group_count * out.size


def _activation_and_pool_flops(jaxpr) -> int:
    """ReLU (1 per element) and pooling (window size per output) in a traced program."""
    flops = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("jit", "pjit") and eqn.params.get("name") == "relu":
            flops += eqn.invars[0].aval.size
            continue
        if name in ("jit", "pjit") and eqn.params.get("name") == layers.cpu_max_pool_2x2.__name__:
            flops += 4 * eqn.outvars[0].aval.size  # as the reduce_window it stands for
            continue
        if name in ("reduce_window_max", "reduce_window_sum"):
            flops += int(np.prod(eqn.params["window_dimensions"])) * eqn.outvars[0].aval.size
        elif name == "reduce_sum":  # a global average pool: every input element once
            flops += eqn.invars[0].aval.size
        for sub in jaxprs_in_params(eqn.params):
            flops += _activation_and_pool_flops(sub)
    return flops


def training_flops(forward_flops: int, images_per_epoch: int, epochs: int) -> float:
    """3 x forward x images x epochs (the paper's training cost)."""
    return 3.0 * forward_flops * images_per_epoch * epochs


def uniform_cut_flops(model: nn.Module, input_shape, ratio: float, groups=None) -> int:
    """Forward FLOPs of `model` with floor(ratio * C) of the C channels cut from every
    group in `groups` (default: every coupling group): ThiNet's and SFP's per-layer cut,
    and the uniform end of a BN-scale ticket's range."""
    groups = channel_groups(model) if groups is None else groups
    modules = _trace(model, input_shape)[0]
    removed = {bn: prune_count(modules[bn]["out"], ratio) for g in groups for bn in g.bns}
    return _cut_flops(model, input_shape, modules, removed)


def widest_ticket_flops(model: nn.Module, input_shape, ratio: float, **plan_options) -> int:
    """Forward FLOPs of the most expensive BN-scale ticket at `ratio`: its
    floor(ratio * all BN channels) pruned channels removed one at a time where a channel
    now saves the fewest FLOPs (channels the cut cannot remove first, then the cheap late
    layers)."""
    modules = _trace(model, input_shape)[0]
    bns = [path[-1] for path in model.bn_paths()]
    groups = channel_groups(model, plan_options.get("prune_residual", False))
    grouped = {bn for g in groups for bn in g.bns}
    idle = sum(modules[bn]["out"] for bn in bns if bn not in grouped)  # cut saves nothing
    budget = max(0, prune_count(sum(modules[bn]["out"] for bn in bns), ratio) - idle)
    keep = max(1, plan_options.get("min_channels", 1))
    removed = _greedy_removal(groups, modules, budget, keep, most=False)
    return _cut_flops(model, input_shape, modules, removed, **plan_options)


def _greedy_removal(groups, modules: dict, budget: int, keep: int, most: bool) -> dict:
    """Per BN, how many channels to remove: `budget` BN channels, one group channel at a
    time, each time from the group whose channel now saves the most (or fewest) FLOPs."""
    width = {m: [e["in"], e["out"]] for m, e in modules.items()}
    per_unit = {m: e["flops"] / (e["in"] * e["out"]) for m, e in modules.items() if e["macs"]}
    left = {g.key: modules[g.bns[0]]["out"] - keep for g in groups}
    removed = {g.key: 0 for g in groups}
    while True:
        open_ = [g for g in groups if left[g.key] > 0 and len(g.bns) <= budget]
        if not open_:
            break
        g = (max if most else min)(open_, key=lambda g: _saving(g, modules, width, per_unit))
        for module, leaf, axis in g.cuts:
            if leaf == "kernel" and module in width:
                width[module][1 if axis == 3 else 0] -= 1
        left[g.key] -= 1
        removed[g.key] += 1
        budget -= len(g.bns)
    return {bn: removed[g.key] for g in groups for bn in g.bns}


def _saving(group, modules: dict, width: dict, per_unit: dict) -> float:
    """The forward FLOPs one more channel of `group` saves at the current widths."""
    flops = 0.0
    for module, leaf, axis in group.cuts:
        if leaf == "kernel" and module in per_unit:
            other = width[module][0] if axis == 3 else width[module][1]
            flops += per_unit[module] * other
    if not group.select:
        flops += sum(modules[bn]["flops"] / modules[bn]["out"] for bn in group.bns)
    return flops


def _cut_flops(model, input_shape, modules: dict, removed: dict, **plan_options) -> int:
    """Forward FLOPs of `model` cut by the surgery with the first `removed[bn]` channels
    of each BN pruned (only the widths matter)."""
    params, masks = {}, []
    for path in model.bn_paths():
        width = modules[path[-1]]["out"]
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node["scale"] = np.ones(width, np.float32)
        masks.append(np.arange(width) >= removed.get(path[-1], 0))
    plan = plan_cut(model, params, masks, **plan_options)
    return forward_cost(model.clone(**plan.widths), input_shape).flops
