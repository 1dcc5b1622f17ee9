"""The jaxpr interpreter's rules for the ops that change which axis is which: reshape,
convolution (with its feature groups) and dot_general."""

from __future__ import annotations

import math

import numpy as np

from eb_jax.ticket.jaxpr_channels import (
    ChannelGraph,
    Value,
    aligned_z,
    poison_all,
    poison_unzeroed,
    zeros_like_axis,
)


def reshape(graph: ChannelGraph, eqn, ins, here):
    value, sizes = ins[0], tuple(eqn.params["new_sizes"])
    if eqn.params.get("dimensions") is not None:
        return poison_all(graph, ins, eqn.outvars, f"{here}: a reshape with a transpose")
    big_in = [d for d, atoms in enumerate(value.axes) if len(atoms) != 1]
    big_out = [d for d, n in enumerate(sizes) if n != 1]
    for atoms in value.axes:
        if len(atoms) == 1:
            graph.poison(atoms, f"{here}: a one-wide axis reshaped away")
    axes = [graph.fresh(1) if n == 1 else None for n in sizes]
    z = [zeros_like_axis(graph, a, value.const == 0) if a is not None else None for a in axes]
    i = j = 0
    while i < len(big_in):
        block_in, block_out = [big_in[i]], [big_out[j]]
        n_in, n_out = len(value.axes[big_in[i]]), sizes[big_out[j]]
        while n_in != n_out:
            if n_in < n_out:
                i += 1
                block_in.append(big_in[i])
                n_in *= len(value.axes[big_in[i]])
            else:
                j += 1
                block_out.append(big_out[j])
                n_out *= sizes[big_out[j]]
        _reshape_block(graph, value, block_in, block_out, sizes, (axes, z), here)
        i, j = i + 1, j + 1
    return [Value(axes, z, value.const, value.param)]


def _reshape_block(graph, value, block_in, block_out, sizes, result, here) -> None:
    axes, z = result
    if len(block_in) == 1 and len(block_out) == 1:
        axes[block_out[0]], z[block_out[0]] = value.axes[block_in[0]], value.z[block_in[0]]
        return
    factors, zf = [], []
    for d in block_in:
        factors += graph.factors(value.axes[d])
        zf += aligned_z(graph, value.axes[d], value.z[d])
    k = 0
    for d in block_out:
        run, n = [], 1
        while n < sizes[d] and k < len(factors):
            run.append(k)
            n, k = n * len(factors[k]), k + 1
        if n != sizes[d]:
            return _split_channels(graph, value, block_in, block_out, sizes, result, here)
        axes[d] = graph.project([factors[r] for r in run])
        z[d] = tuple(zf[r] for r in run)


def _split_channels(graph, value, block_in, block_out, sizes, result, here) -> None:
    axes, z = result
    reason = f"{here}: split by a reshape (channels regrouped)"
    for d in block_in:
        graph.poison(value.axes[d], reason)
    for d in block_out:
        axes[d] = graph.fresh(sizes[d])
        graph.poison(axes[d], reason)
        z[d] = zeros_like_axis(graph, axes[d])


def conv(graph: ChannelGraph, eqn, ins, here):
    (lhs, rhs), p = ins, eqn.params
    if p["batch_group_count"] != 1 or rhs.param is None:
        reason = f"{here}: a convolution whose kernel is not a parameter, or with batch groups"
        return poison_all(graph, ins, eqn.outvars, reason)
    dn, shape = p["dimension_numbers"], eqn.outvars[0].aval.shape
    (lb, lf, *ls), (ro, ri, _, *_), (ob, of, *os) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    feat, k_in, k_out = lhs.axes[lf], rhs.axes[ri], rhs.axes[ro]
    groups = p["feature_group_count"]
    if groups != 1 and (graph.projection(feat) or graph.projection(k_out)):
        return poison_all(graph, ins, eqn.outvars, f"{here}: a grouped convolution of a reshape")
    axes, z = [None] * len(shape), [None] * len(shape)
    axes[ob], z[ob] = lhs.axes[lb], lhs.z[lb]
    for d in ls:
        graph.poison(lhs.axes[d], f"{here}: convolved over")
    for d in os:
        axes[d] = graph.fresh(shape[d])
        z[d] = zeros_like_axis(graph, axes[d])
    axes[of], z[of] = k_out, zeros_like_axis(graph, k_out)
    if groups == 1:
        graph.tie(feat, k_in)
        poison_unzeroed(graph, feat, lhs.z[lf], rhs.z[ri], here)
    elif len(k_in) == 1:  # depthwise: output channel o reads input channel o // multiplier
        multiplier = len(k_out) // len(feat)
        graph.tie(k_out, np.repeat(feat, multiplier))
        z[of] = (np.repeat(aligned_z(graph, feat, lhs.z[lf])[0], multiplier),)
    else:  # grouped: a cut takes the same channels out of every group
        graph.tie(feat, np.tile(k_in, groups))
        poison_unzeroed(graph, feat, lhs.z[lf], (np.tile(rhs.z[ri][0], groups),), here)
        graph.tie(k_out, np.tile(k_out[: len(k_out) // groups], groups))
    graph.produced.append((k_out, rhs.param))
    return [Value(axes, z)]


def dot_general(graph: ChannelGraph, eqn, ins, here):
    (lhs, rhs), ((lc, rc), (lb, rb)) = ins, eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc, strict=True):
        graph.tie(lhs.axes[a], rhs.axes[b])
        poison_unzeroed(graph, lhs.axes[a], lhs.z[a], rhs.z[b], here)
    axes, z = [], []
    for a, b in zip(lb, rb, strict=True):
        graph.tie(lhs.axes[a], rhs.axes[b])
        axes.append(lhs.axes[a])
        za, zb = (aligned_z(graph, lhs.axes[a], v) for v in (lhs.z[a], rhs.z[b]))
        z.append(tuple(x | y for x, y in zip(za, zb, strict=True)))
    for value, contracted, batch in ((lhs, lc, lb), (rhs, rc, rb)):
        for d, atoms in enumerate(value.axes):
            if d in contracted or d in batch:
                continue
            axes.append(atoms)
            z.append(value.z[d])
            if value.param is not None:
                graph.produced.append((atoms, value.param))
    assert math.prod(len(a) for a in axes) == math.prod(eqn.outvars[0].aval.shape)
    return [Value(axes, z)]
