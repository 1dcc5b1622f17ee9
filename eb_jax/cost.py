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

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params

from eb_jax.lowp import FP32
from eb_jax.models import layers


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
    # One conv primitive per Conv whatever the backend; no quantisers, fp32.
    model = model.clone(conv_impl="xla", precision=FP32)
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    counts = {"flops": 0, "macs": 0, "nonzero_macs": 0}

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
        module, inputs = context.module, args[0]
        if isinstance(module, layers.Conv):
            k = module.kernel_size
            macs = k * k * inputs.shape[-1] * out.size
            counts["macs"] += macs
            counts["nonzero_macs"] += kept(module, out, macs)
            counts["flops"] += 2 * macs
        elif isinstance(module, (nn.Conv, nn.ConvTranspose)):  # a factory network's
            macs = _linen_conv_macs(module, inputs, out)
            counts["macs"] += macs
            counts["nonzero_macs"] += kept(module, out, macs)
            counts["flops"] += 2 * macs + (out.size if module.use_bias else 0)
        elif isinstance(module, nn.Dense):
            macs = inputs.shape[-1] * out.size
            counts["macs"] += macs
            counts["nonzero_macs"] += kept(module, out, macs)
            counts["flops"] += 2 * macs + (out.size if module.use_bias else 0)
        elif isinstance(module, nn.DenseGeneral):
            axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
            macs = int(np.prod([inputs.shape[a] for a in axes])) * out.size
            counts["macs"] += macs
            counts["nonzero_macs"] += kept(module, out, macs)
            counts["flops"] += 2 * macs + (out.size if module.use_bias else 0)
        elif hasattr(module, "flops"):
            flops, macs = module.flops(inputs, out)
            counts["flops"] += flops
            counts["macs"] += macs
            counts["nonzero_macs"] += macs
        elif isinstance(module, nn.BatchNorm):
            counts["flops"] += 2 * inputs.size
        elif isinstance(module, layers.BatchNorm):
            counts["flops"] += 2 * inputs.size + (out.size if module.relu else 0)  # fused ReLU
        return out

    def forward(v, x):
        with nn.intercept_methods(count_module):
            return model.apply(v, x, train=False)

    jaxpr = jax.make_jaxpr(forward)(variables, x)
    if not getattr(model, "ELEMENTWISE_IN_MODULES", False):
        counts["flops"] += _activation_and_pool_flops(jaxpr.jaxpr)
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    nonzero = counts["nonzero_macs"] if weight_mask is not None else None
    return Cost(flops=counts["flops"], macs=counts["macs"], params=params, nonzero_macs=nonzero)


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
