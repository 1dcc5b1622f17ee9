"""Which array positions of a traced computation are the same channel: a jaxpr interpreter.

Every position along every axis of every value gets an integer atom; an equation links
the atoms its semantics tie (an add ties its operands' aligned positions, a convolution
ties the input's features to the kernel's input axis), and the linked atoms' connected
components are the channels. Nothing is linked because sizes match. A merging reshape
(a flatten) makes a *projection*: fresh atoms for the merged positions, each remembering
its factors' atoms. Whatever would make cutting a channel change the result poisons its
atoms with a reason: an op this interpreter does not know, a reduction or window over the
axis, a split or slice of it, or a contraction that reads it where zeroing its
BatchNorm's scale and bias does not zero it (`z`, tracked per position, is that
property: "zero wherever this position's channel is switched off").
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# f(0) == 0: a channel that is zero stays zero through these.
ZERO_KEEPING = {
    "neg", "abs", "sign", "sqrt", "cbrt", "tanh", "sin", "tan", "asin", "atan", "sinh",
    "asinh", "atanh", "erf", "erf_inv", "square", "convert_element_type", "reduce_precision",
    "copy", "copy_p", "real", "floor", "ceil", "round", "expm1", "log1p", "stop_gradient",
}  # fmt: skip
# Element-wise, but f(0) may be nonzero (or the output is not a number).
ELEMENTWISE = ZERO_KEEPING | {
    "exp", "exp2", "log", "logistic", "rsqrt", "cos", "cosh", "acos", "erfc", "is_finite",
    "not", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "add", "sub", "mul",
    "div", "max", "min", "pow", "integer_pow", "rem", "atan2", "select_n", "clamp",
    "nextafter", "add_any",
}  # fmt: skip
IDENTITY = {"sharding_constraint", "optimization_barrier", "pvary", "copy", "copy_p"}
REDUCTIONS = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin",
}  # fmt: skip
WINDOWED = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


@dataclasses.dataclass
class Value:
    """One traced array: the atoms of each axis, and where it is zero for a cut channel.

    `z[d]` holds one bool array per factor of axis d (one for a plain axis, one per
    factor of a projection). `const` is the value of a uniform constant, `param` the path
    of the parameter the array is (or a reshaped, converted view of), else None."""

    axes: list
    z: list
    const: float | None = None
    param: tuple | None = None


@dataclasses.dataclass
class Projection:
    sizes: tuple
    factors: list  # one atom array per factor


class ChannelGraph:
    """Atoms, their links, what is poisoned (and why), and the producers' output axes."""

    def __init__(self):
        self.count = 0
        self.links = []  # pairs of equally long atom arrays, linked position by position
        self.poisoned = []  # (atoms, reason)
        self.produced = []  # (atoms, param path): the output axis of one layer
        self.projections = {}  # first atom -> Projection

    def fresh(self, n: int) -> np.ndarray:
        atoms = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return atoms

    def poison(self, atoms, reason: str) -> None:
        atoms = np.asarray(atoms, np.int64).ravel()
        if atoms.size:
            self.poisoned.append((atoms, reason))
        projection = self.projection(atoms)
        if projection:  # a merged axis: its factors are what gets cut
            for factor in projection.factors:
                self.poison(factor, reason)

    def projection(self, atoms) -> Projection | None:
        if not len(atoms):
            return None
        p = self.projections.get(int(atoms[0]))
        if p is None or math.prod(p.sizes) != len(atoms) or atoms[-1] - atoms[0] != len(atoms) - 1:
            return None
        return p

    def factors(self, atoms) -> list:
        p = self.projection(atoms)
        return p.factors if p else [atoms]

    def project(self, factors: list) -> np.ndarray:
        """Atoms of the axis that merges `factors` (row-major), as a projection."""
        flat = [f for atoms in factors for f in self.factors(atoms) if len(f) != 1]
        if len(flat) == 1:
            return flat[0]
        sizes = tuple(len(f) for f in flat)
        atoms = self.fresh(math.prod(sizes))
        if len(atoms):
            self.projections[int(atoms[0])] = Projection(sizes, flat)
        return atoms

    def tie(self, a, b) -> None:
        """Positions of a and b are the same channels (equal-length axes)."""
        if a is b or len(a) == 0 or np.array_equal(a, b):
            return
        assert len(a) == len(b), (len(a), len(b))
        pa, pb = self.projection(a), self.projection(b)
        if pa and pb:
            for run_a, run_b in _aligned_runs(pa.sizes, pb.sizes):
                fa, fb = [pa.factors[i] for i in run_a], [pb.factors[i] for i in run_b]
                if len(fa) > 1 and len(fb) > 1:
                    for atoms in fa + fb:
                        self.poison(atoms, "merged by two reshapes that do not line up")
                else:
                    self.tie(self.project(fa), self.project(fb))
            return
        if pa or pb:
            p, plain, merged = (pa, b, a) if pa else (pb, a, b)
            j = _depends_on_one_factor(p, plain)
            if j is not None:
                self.tie(p.factors[j], _along_factor(p, plain, j))
            else:
                self.links.append((merged, plain))
            return
        self.links.append((np.asarray(a), np.asarray(b)))


def _aligned_runs(sizes_a: tuple, sizes_b: tuple) -> list:
    """The shortest runs of factors of a and of b with equal products, in order."""
    runs, i, j = [], 0, 0
    while i < len(sizes_a):
        run_a, run_b = [i], [j]
        n_a, n_b = sizes_a[i], sizes_b[j]
        while n_a != n_b:
            if n_a < n_b:
                i += 1
                run_a.append(i)
                n_a *= sizes_a[i]
            else:
                j += 1
                run_b.append(j)
                n_b *= sizes_b[j]
        runs.append((run_a, run_b))
        i, j = i + 1, j + 1
    return runs


def _depends_on_one_factor(p: Projection, plain) -> int | None:
    """The one factor of `p` whose index alone decides `plain`'s atom, or None."""
    grid = np.asarray(plain).reshape(p.sizes)
    for j in range(len(p.sizes)):
        shape = [p.sizes[j] if k == j else 1 for k in range(len(p.sizes))]
        line = _along_factor(p, plain, j).reshape(shape)
        if np.array_equal(np.broadcast_to(line, grid.shape), grid):
            return j
    return None


def _along_factor(p: Projection, plain, j: int) -> np.ndarray:
    grid = np.asarray(plain).reshape(p.sizes)
    return grid[tuple(slice(None) if k == j else 0 for k in range(len(p.sizes)))]


def zeros_like_axis(graph: ChannelGraph, atoms, fill: bool = False) -> tuple:
    """A `z` entry for axis `atoms`: one constant bool array per factor."""
    return tuple(np.full(len(f), fill) for f in graph.factors(atoms))


def new_value(graph: ChannelGraph, shape, const=None) -> Value:
    """Fresh atoms for every axis; zero everywhere only for the constant 0."""
    axes = [graph.fresh(n) for n in shape]
    return Value(axes, [zeros_like_axis(graph, a, const == 0) for a in axes], const)


def poison_all(graph: ChannelGraph, ins: list, outvars, reason: str) -> list:
    """Poison every axis of `ins` and of fresh outputs shaped as `outvars`; return those."""
    outs = [new_value(graph, v.aval.shape) for v in outvars]
    for value in [*ins, *outs]:
        for atoms in value.axes:
            graph.poison(atoms, reason)
    return outs


def aligned_z(graph: ChannelGraph, atoms, z: tuple) -> tuple:
    """`z` if it matches `atoms`' factors, else nonzero everywhere (the safe side)."""
    like = zeros_like_axis(graph, atoms)
    if len(z) == len(like) and all(a.shape == b.shape for a, b in zip(z, like, strict=True)):
        return z
    return like


def poison_unzeroed(graph: ChannelGraph, atoms, z_a: tuple, z_b: tuple, here: str) -> None:
    """A contraction over `atoms`: poison the positions where neither side is zero when
    their channel is switched off (cutting them would change the sum)."""
    factors = graph.factors(atoms)
    z_a, z_b = aligned_z(graph, atoms, z_a), aligned_z(graph, atoms, z_b)
    for factor, a, b in zip(factors, z_a, z_b, strict=True):
        bad = ~(a | b)
        if bad.any():
            reason = f"{here}: reads them where switching off their BatchNorm does not zero them"
            graph.poison(factor[bad], reason)
