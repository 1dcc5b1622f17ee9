"""Low-precision training: 8-bit block floating point and bf16 compute (docs/method.md).

Block floating point (SWALP / QPyTorch's `block_quantize`): every slice along one axis
shares an exponent, taken from the slice's largest magnitude, and holds w-bit signed
integers times 2^(exponent - (w - 2)); rounding is to nearest or stochastic, values
beyond +-(2^(w-1) - 1) steps saturate. Training in it quantises weights, momentum and
gradients (here, and in `train`'s optimizer) and the activations at every conv output
with their errors on the way back (`quantize_activation`, called by `models.layers.Conv`).

Stochastic rounding takes explicit PRNG keys, so a quantised run is as deterministic as
an fp32 one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PRECISIONS = ("fp32", "bf16", "bfp8")


@dataclasses.dataclass(frozen=True)
class BFPFormat:
    """Word lengths (sign included) of the five quantised quantities, and the rounding."""

    weight_bits: int = 8
    activation_bits: int = 8
    error_bits: int = 8
    gradient_bits: int = 8
    momentum_bits: int = 8
    stochastic: bool = True  # False: round to nearest (ties to even)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_bits") and not 2 <= value <= 24:
                raise ValueError(f"bfp.{field.name}={value} must be in [2, 24] (8 in the paper)")


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a network computes: 'fp32'; 'bf16' (bf16 compute, fp32 weights and BN
    statistics); or 'bfp8' (block floating point in `bfp`'s word lengths, fp32 compute)."""

    name: str = "fp32"
    bfp: BFPFormat = BFPFormat()

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"precision {self.name!r} must be one of {PRECISIONS}")

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.name == "bf16" else jnp.float32

    @property
    def quantized(self) -> bool:
        return self.name == "bfp8"


FP32 = Precision()

# Shared exponents are kept in [-100, 125], so 2^(w - 2 - exponent) is a normal float32.
_MIN_EXPONENT, _MAX_EXPONENT = -100, 125


def _floor_log2(x):
    """floor(log2 x) of non-negative float32 values, read from their exponent bits."""
    biased = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(x, jnp.int32), 23)
    return jnp.clip(biased - 127, _MIN_EXPONENT, _MAX_EXPONENT)


def _exp2(n):
    """2.0 ** n, exactly, for int32 n in [-126, 127]."""
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(n + 127, 23), jnp.float32)


def quantize_bfp(x, bits: int, key=None, axis: int | None = 0):
    """`x` in `bits`-bit block floating point, one exponent per slice along `axis`
    (None: one for the whole array); nearest rounding, or stochastic given `key`.

    Exact for values already in the format; the error is below half a step (nearest) or
    one step (stochastic, unbiased), the step being 2^(floor(log2 max|slice|) - bits + 2).
    """
    x = jnp.asarray(x)
    noise = None if key is None else _uniform(key, x.shape)
    return _quantize(x, bits, axis, noise)


def _uniform(key, shape):
    """U[0, 1) of `shape` from the classic (non-partitionable) threefry: for odd shapes
    (a cut ticket's widths) XLA on CPU compiles the partitionable one ~3x slower."""
    with jax.threefry_partitionable(False):
        return jax.random.uniform(key, shape)


def _quantize(x, bits: int, axis: int | None, noise):
    """`quantize_bfp` with the stochastic rounding's U[0, 1) `noise` given (None: nearest)."""
    if x.ndim == 0 or axis is None:
        reduce = None
    else:
        axis = axis % x.ndim
        reduce = tuple(i for i in range(x.ndim) if i != axis)
    amax = jnp.max(jnp.abs(x), axis=reduce, keepdims=True).astype(jnp.float32)
    shift = bits - 2 - _floor_log2(amax)
    scaled = x.astype(jnp.float32) * _exp2(shift)  # exact: a power of two
    if noise is None:
        q = jnp.round(scaled)
    else:
        # floor + Bernoulli(fraction): unbiased, and exact when the fraction is 0.
        low = jnp.floor(scaled)
        q = low + (noise < scaled - low)
    # Symmetric saturation (SWALP allows -2^(w-1) too, but a tensor holding it would get a
    # larger exponent when quantised again: the format would not be closed).
    top = 2 ** (bits - 1) - 1
    q = jnp.clip(q, -top, top)
    return (q * _exp2(-shift)).astype(x.dtype)


def quantize_tree(tree, bits: int, key=None):
    """Every leaf quantised with one exponent per output channel (the last axis of
    Flax's kernels; axis 0 of PyTorch's); stochastically given `key`."""
    leaves, treedef = jax.tree.flatten(tree)
    if key is None:
        quantized = [quantize_bfp(x, bits, axis=-1) for x in leaves]
    else:  # one draw of uniforms for the whole tree (compiles far faster than one per leaf)
        sizes = [x.size for x in leaves]
        noise = _uniform(key, (sum(sizes),))
        offsets = np.cumsum([0, *sizes])
        quantized = [
            _quantize(x, bits, -1, noise[a:b].reshape(x.shape))
            for x, a, b in zip(leaves, offsets[:-1], offsets[1:], strict=True)
        ]
    return jax.tree.unflatten(treedef, quantized)


def quantize_activation(x, fmt: BFPFormat, key=None):
    """Forward: `x` in `fmt.activation_bits` per sample (axis 0). Backward: the error
    (the gradient arriving here) in `fmt.error_bits` per sample. Stochastic given `key`."""
    keys = () if key is None else tuple(jax.random.split(key))
    return _quantize_activation(x, keys, fmt.activation_bits, fmt.error_bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantize_activation(x, keys, activation_bits, error_bits):
    return quantize_bfp(x, activation_bits, keys[0] if keys else None)


def _quantize_activation_fwd(x, keys, activation_bits, error_bits):
    return _quantize_activation(x, keys, activation_bits, error_bits), keys


def _quantize_activation_bwd(activation_bits, error_bits, keys, g):
    error = quantize_bfp(g, error_bits, keys[1] if keys else None)
    return error, jax.tree.map(lambda _: None, keys)


_quantize_activation.defvjp(_quantize_activation_fwd, _quantize_activation_bwd)


# Independent rounding-noise streams of one run.
ACTIVATIONS, WEIGHTS, GRADIENTS, MOMENTUM = range(4)


def stream_key(seed: int, stream: int, count):
    """The key of `stream`'s rounding at update `count` (same on every device)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), count)


class QuantizedTraceState(NamedTuple):
    trace: optax.Params
    count: jax.Array


def quantize_gradients(bits: int, seed: int, stochastic: bool = True):
    """Gradients in `bits`-bit block floating point before the update uses them."""

    def update(updates, state, params=None):
        key = stream_key(seed, GRADIENTS, state.count) if stochastic else None
        return quantize_tree(updates, bits, key), optax.ScaleByScheduleState(state.count + 1)

    return optax.GradientTransformation(
        lambda _: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)), update
    )


def quantized_momentum(momentum: float, bits: int, seed: int, stochastic: bool = True):
    """PyTorch SGD momentum, buf = m * buf + g, with the buffer stored in `bits`-bit block
    floating point after each update (QPyTorch's OptimLP: this update uses it unrounded)."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return QuantizedTraceState(zeros, jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        buf = jax.tree.map(lambda g, t: g + momentum * t, updates, state.trace)
        key = stream_key(seed, MOMENTUM, state.count) if stochastic else None
        return buf, QuantizedTraceState(quantize_tree(buf, bits, key), state.count + 1)

    return optax.GradientTransformation(init, update)
