"""The jaxpr interpreter of jaxpr_channels.py: one rule per primitive (or family of them).

A rule gets the equation, its operands' `Value`s and where it sits in the model (the
name stack, for the reasons), links atoms on the `ChannelGraph` and returns the outputs'
`Value`s. A primitive without a rule poisons every channel it touches.
"""

from __future__ import annotations

import numpy as np

from eb_jax.ticket.jaxpr_channels import (
    CUMULATIVE,
    ELEMENTWISE,
    IDENTITY,
    REDUCTIONS,
    WINDOWED,
    ZERO_KEEPING,
    ChannelGraph,
    Value,
    aligned_z,
    new_value,
    poison_all,
    zeros_like_axis,
)
from eb_jax.ticket.jaxpr_layers import conv, dot_general, reshape


def interpret(graph: ChannelGraph, jaxpr, consts: list, inputs: list, where: str) -> list:
    """The output Values of `jaxpr` (open) run on `inputs`, with `consts` for its constvars."""
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, inputs, strict=True))
    for eqn in jaxpr.eqns:
        operands = [_read(graph, env, v) for v in eqn.invars]
        stack = str(eqn.source_info.name_stack)
        here = f"{where}/{stack}" if where and stack else (stack or where)
        outputs = _rule(eqn.primitive.name)(graph, eqn, operands, here)
        env.update(zip(eqn.outvars, outputs, strict=True))
    return [_read(graph, env, v) for v in jaxpr.outvars]


def constant_value(graph: ChannelGraph, array) -> Value:
    array = np.asarray(array)
    uniform = array.size and np.all(array == array.ravel()[0])
    const = float(array.ravel()[0]) if uniform and array.dtype.kind in "biuf" else None
    return new_value(graph, array.shape, const)


def _read(graph, env, var):
    if hasattr(var, "val"):  # a Literal
        return constant_value(graph, var.val)
    return env[var]


def _rule(name: str):
    if name in ELEMENTWISE:
        return _elementwise
    if name in REDUCTIONS:
        return _reduce
    if name in WINDOWED:
        return _window
    if name in CUMULATIVE:
        return _cumulative
    if name in IDENTITY:
        return lambda graph, eqn, ins, here: ins
    return RULES.get(name, _call if _sub_jaxpr_params(name) else _unknown)


def _sub_jaxpr_params(name: str) -> bool:
    calls = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call")
    return name.startswith(calls) or name.startswith("custom_vjp_call")


def _unknown(graph, eqn, ins, here, reason=None):
    reason = reason or f"{here}: `{eqn.primitive.name}` is an operation eb_jax does not trace"
    return poison_all(graph, ins, eqn.outvars, reason)


def _call(graph, eqn, ins, here):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
        if len(jaxpr.invars) != len(ins) or len(jaxpr.constvars) != len(consts):
            break
        consts = [constant_value(graph, c) for c in consts]
        return interpret(graph, jaxpr, consts, ins, here)
    return _unknown(graph, eqn, ins, here)


def _cond(graph, eqn, ins, here):
    results = []
    for branch in eqn.params["branches"]:
        consts = [constant_value(graph, c) for c in branch.consts]
        results.append(interpret(graph, branch.jaxpr, consts, ins[1:], here))
    outs = results[0]
    for other in results[1:]:
        for out, alt in zip(outs, other, strict=True):
            for d, (a, b) in enumerate(zip(out.axes, alt.axes, strict=True)):
                graph.tie(a, b)
                out.z[d] = _z_combine(graph, a, [out.z[d], alt.z[d]], np.logical_and)
    return outs


def _loop(graph, eqn, ins, here):
    return _unknown(graph, eqn, ins, here, f"{here}: a `{eqn.primitive.name}` loop is not traced")


def _z_combine(graph, atoms, zs: list, op) -> tuple:
    """Combine per-factor z entries; where their factorisations differ, assume nonzero."""
    zs = [aligned_z(graph, atoms, z) for z in zs]
    return tuple(op.reduce([z[j] for z in zs]) for j in range(len(zs[0])))


def _elementwise(graph, eqn, ins, here):
    shape = eqn.outvars[0].aval.shape
    name = eqn.primitive.name
    full = [v for v in ins if len(v.axes) == len(shape) and len(shape)]
    if not full:
        out = new_value(graph, shape)
        out.const = ins[0].const if name == "convert_element_type" else None
        return [out] * len(eqn.outvars)
    axes = []
    for d, n in enumerate(shape):  # operands broadcast their one-wide axes
        wide = [v.axes[d] for v in full if len(v.axes[d]) == n]
        axes.append(wide[0] if wide else graph.fresh(n))
        for atoms in wide[1:]:
            graph.tie(axes[d], atoms)
    picked, op = _zero_sources(eqn, ins)
    z = []
    for d, atoms in enumerate(axes):
        zs = [_z_at(graph, v, d, atoms) for v in ins]
        z.append(_z_combine(graph, atoms, [zs[i] for i in picked], op) if picked else None)
        z[-1] = z[-1] or zeros_like_axis(graph, atoms)
    keep = name == "convert_element_type"
    return [Value(axes, z, full[0].const if keep else None, full[0].param if keep else None)]


def _z_at(graph, value, d, atoms) -> tuple:
    """An operand's z along output axis d (a scalar or one-wide operand: zero only if 0)."""
    if value.axes and len(value.axes[d]) == len(atoms):
        return value.z[d]
    return zeros_like_axis(graph, atoms, value.const == 0)


def _zero_sources(eqn, ins) -> tuple:
    """(operand indices, combine op): the output is zero where these are (any/all)."""
    name, n = eqn.primitive.name, len(ins)
    if name in ZERO_KEEPING or (name == "integer_pow" and eqn.params["y"] > 0):
        return [0], np.logical_and
    if name in ("mul", "and"):
        return list(range(n)), np.logical_or
    if name in ("div", "rem"):
        return [0], np.logical_and
    if name in ("max", "min"):
        sign = 1 if name == "max" else -1  # max(x, c) == 0 at x == 0 iff c <= 0
        consts = [i for i in range(n) if ins[i].const is not None and sign * ins[i].const <= 0]
        others = [i for i in range(n) if i not in consts]
        return (others or [0]), np.logical_and
    if name == "clamp":
        low, high = ins[0].const, ins[2].const
        ok = low is not None and high is not None and low <= 0 <= high
        return ([1] if ok else []), np.logical_and
    if name == "select_n":
        return list(range(1, n)), np.logical_and
    if name in ("add", "sub", "add_any", "or", "xor", "atan2"):
        return list(range(n)), np.logical_and
    return [], np.logical_and


def _broadcast_in_dim(graph, eqn, ins, here):
    (value, *_), shape = ins, eqn.params["shape"]
    dims = eqn.params["broadcast_dimensions"]
    axes, z = [], []
    for d, n in enumerate(shape):
        i = dims.index(d) if d in dims else None
        if i is not None and value.axes[i].size == n:
            axes.append(value.axes[i])
            z.append(value.z[i])
        else:
            axes.append(graph.fresh(n))
            z.append(zeros_like_axis(graph, axes[-1], value.const == 0))
    return [Value(axes, z, value.const, value.param)]


def _transpose(graph, eqn, ins, here):
    (value,), perm = ins, eqn.params["permutation"]
    return [Value([value.axes[p] for p in perm], [value.z[p] for p in perm], value.const)]


def _squeeze(graph, eqn, ins, here):
    (value,), dims = ins, {d % len(ins[0].axes) for d in eqn.params["dimensions"]}
    for d in dims:
        graph.poison(value.axes[d], f"{here}: a one-wide axis squeezed away")
    keep = [d for d in range(len(value.axes)) if d not in dims]
    axes, z = [value.axes[d] for d in keep], [value.z[d] for d in keep]
    return [Value(axes, z, value.const, value.param)]


def _reduce(graph, eqn, ins, here):
    (value,), dims = ins[:1], set(eqn.params["axes"])
    name = eqn.primitive.name
    for d in dims:
        graph.poison(value.axes[d], f"{here}: mixed by `{name}` (a norm or softmax over them?)")
    keep = [d for d in range(len(value.axes)) if d not in dims]
    zero = name in ("reduce_sum", "reduce_max", "reduce_min")
    z = [value.z[d] if zero else zeros_like_axis(graph, value.axes[d]) for d in keep]
    return [Value([value.axes[d] for d in keep], z)]


def _window(graph, eqn, ins, here):
    p, value = eqn.params, ins[0]
    if "jaxpr" in p:
        return _unknown(graph, eqn, ins, here)
    axes, z = [], []
    for d, atoms in enumerate(value.axes):
        trivial = (
            p["window_dimensions"][d] == 1
            and p["window_strides"][d] == 1
            and tuple(p["padding"][d]) == (0, 0)
            and p["base_dilation"][d] == 1
            and p["window_dilation"][d] == 1
        )
        if trivial:
            axes.append(atoms)
            z.append(value.z[d])
            continue
        graph.poison(atoms, f"{here}: pooled over by `{eqn.primitive.name}`")
        axes.append(graph.fresh(eqn.outvars[0].aval.shape[d]))
        z.append(zeros_like_axis(graph, axes[-1]))
    return [Value(axes, z)]


def _cumulative(graph, eqn, ins, here):
    (value,), d = ins, eqn.params["axis"]
    graph.poison(value.axes[d], f"{here}: mixed by `{eqn.primitive.name}`")
    return [Value(list(value.axes), [zeros_like_axis(graph, a) for a in value.axes])]


def _pad(graph, eqn, ins, here):
    value, pad_value = ins
    axes, z = [], []
    for d, (low, high, interior) in enumerate(eqn.params["padding_config"]):
        atoms = value.axes[d]
        if (low, high, interior) == (0, 0, 0):
            axes.append(atoms)
            z.append(value.z[d])
        elif interior == 0 and low >= 0 and high >= 0 and not graph.projection(atoms):
            axes.append(np.concatenate([graph.fresh(low), atoms, graph.fresh(high)]))
            edge = np.full(low, pad_value.const == 0), np.full(high, pad_value.const == 0)
            z.append((np.concatenate([edge[0], value.z[d][0], edge[1]]),))
        else:
            graph.poison(atoms, f"{here}: padded inside or cropped")
            axes.append(graph.fresh(eqn.outvars[0].aval.shape[d]))
            z.append(zeros_like_axis(graph, axes[-1]))
    return [Value(axes, z)]


def _slice(graph, eqn, ins, here):
    value, p = ins[0], eqn.params
    strides = p["strides"] or (1,) * len(value.axes)
    axes, z = [], []
    for d, atoms in enumerate(value.axes):
        part = slice(p["start_indices"][d], p["limit_indices"][d], strides[d])
        if part.indices(len(atoms)) == (0, len(atoms), 1):
            axes.append(atoms)
            z.append(value.z[d])
            continue
        graph.poison(atoms, f"{here}: sliced (a slice's bounds would not follow a cut)")
        plain = not graph.projection(atoms)
        axes.append(atoms[part] if plain else graph.fresh(len(range(*part.indices(len(atoms))))))
        z.append(zeros_like_axis(graph, axes[-1]))
    return [Value(axes, z, value.const, value.param)]


def _split(graph, eqn, ins, here):
    (value,), d = ins, eqn.params["axis"]
    graph.poison(value.axes[d], f"{here}: split (a split's sizes would not follow a cut)")
    outs = []
    for size in eqn.params["sizes"]:
        axes, z = list(value.axes), list(value.z)
        axes[d] = graph.fresh(size)
        graph.poison(axes[d], f"{here}: split (a split's sizes would not follow a cut)")
        z[d] = zeros_like_axis(graph, axes[d])
        outs.append(Value(axes, z))
    return outs


def _concatenate(graph, eqn, ins, here):
    d = eqn.params["dimension"]
    axes = list(ins[0].axes)
    for value in ins[1:]:
        for e, (a, b) in enumerate(zip(axes, value.axes, strict=True)):
            if e != d:
                graph.tie(a, b)
    z = [
        _z_combine(graph, a, [v.z[e] for v in ins], np.logical_and) if e != d else None
        for e, a in enumerate(axes)
    ]
    pieces = [v.axes[d] for v in ins]
    if all(np.array_equal(p, pieces[0]) for p in pieces[1:]):  # copies (im2col's taps)
        taps = graph.fresh(len(pieces))
        axes[d] = graph.project([taps, pieces[0]])
        shared = _z_combine(graph, pieces[0], [v.z[d] for v in ins], np.logical_and)
        z[d] = (np.zeros(len(pieces), bool), *shared) if len(pieces[0]) > 1 else (taps < 0,)
    elif not any(graph.projection(p) for p in pieces):
        axes[d] = np.concatenate(pieces)
        z[d] = (np.concatenate([v.z[d][0] for v in ins]),)
    else:
        for p in pieces:
            graph.poison(p, f"{here}: flattened axes concatenated")
        axes[d] = graph.fresh(sum(len(p) for p in pieces))
        z[d] = zeros_like_axis(graph, axes[d])
    return [Value(axes, z)]


def _rev(graph, eqn, ins, here):
    (value,), dims = ins, eqn.params["dimensions"]
    axes, z = list(value.axes), list(value.z)
    for d in dims:
        if graph.projection(axes[d]):
            graph.poison(axes[d], f"{here}: a flattened axis reversed")
            axes[d] = graph.fresh(len(axes[d]))
            z[d] = zeros_like_axis(graph, axes[d])
        else:
            axes[d], z[d] = axes[d][::-1], (z[d][0][::-1],)
    return [Value(axes, z, value.const, value.param)]


def _iota(graph, eqn, ins, here):
    return [new_value(graph, eqn.outvars[0].aval.shape)]


RULES = {
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reshape": reshape,
    "pad": _pad,
    "slice": _slice,
    "split": _split,
    "concatenate": _concatenate,
    "rev": _rev,
    "iota": _iota,
    "cond": _cond,
    "scan": _loop,
    "while": _loop,
    "conv_general_dilated": conv,
    "dot_general": dot_general,
}
