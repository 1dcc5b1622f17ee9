"""Layers shared by every model family: a convolution with a CPU-fast path, BatchNorm.

The convolution keeps one parameter layout (`kernel` of shape [kh, kw, in, out], no
bias) whatever implementation runs, so a checkpoint never depends on the backend.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eb_jax.lowp import FP32, Precision, quantize_activation

CONV_IMPLS = ("auto", "xla", "patches")

# He fan-out normal, untruncated: PyTorch `normal_(0, sqrt(2 / (k*k*out)))` in the original.
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# On CPU, XLA's convolution is very slow on tiny feature maps with many channels (VGG16's
# 2x2 maps: 1.6 s vs 0.04 s for a batch-64 gradient); there im2col + matmul wins. Maps up
# to this many pixels use it (measured in benchmarks/conv_cpu.py).
_PATCHES_MAX_PIXELS = 4


def torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@functools.cache
def _default_backend() -> str:
    return jax.default_backend()


def resolve_conv_impl(impl: str, height: int, width: int) -> str:
    """Which convolution implementation runs: 'xla' or 'patches' (on CPU, 'auto' takes
    the matmul for tiny maps)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if _default_backend() != "cpu":
        return "xla"
    return "patches" if height * width <= _PATCHES_MAX_PIXELS else "xla"


class Conv(nn.Module):
    """Square bias-free 2-D convolution over NHWC inputs with symmetric zero padding.

    Computes in the input's dtype. With a 'bfp8' `precision` its output (and the error
    coming back) is quantised, stochastically where the 'quant' RNG stream is given.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None  # default: kernel_size // 2 ("same" for odd kernels)
    impl: str = "auto"
    kernel_init: Any = he_fan_out
    precision: Precision = FP32

    @nn.compact
    def __call__(self, x):
        y = self._convolve(x)
        if not self.precision.quantized:
            return y
        fmt = self.precision.bfp
        key = self.make_rng("quant") if fmt.stochastic and self.has_rng("quant") else None
        return quantize_activation(y, fmt, key)

    def _convolve(self, x):
        k, s = self.kernel_size, self.stride
        pad = k // 2 if self.padding is None else self.padding
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features))
        kernel = kernel.astype(x.dtype)
        impl = resolve_conv_impl(self.impl, x.shape[1], x.shape[2])
        if impl == "xla" and k == 1 and pad == 0 and _default_backend() == "cpu":
            return _pointwise_conv(x[:, ::s, ::s, :], kernel)
        if impl == "xla":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), [(pad, pad)] * 2, dimension_numbers=_NHWC
            )
        if k == 1 and pad == 0:
            return x[:, ::s, ::s, :] @ kernel[0, 0]
        return _im2col(x, k, s, pad) @ kernel.reshape(-1, self.features)


_NHWC = ("NHWC", "HWIO", "NHWC")


# A 1x1 convolution on CPU: XLA's convolution forward, both gradients as matmuls. XLA
# computes a 1x1 kernel gradient as a convolution of transposed copies of the input
# and the error; measured over PreResNet's 1x1 shapes (batch 64), forward + backward
# take 30 ms this way against 53 as XLA's convolution and 49 as a matmul throughout.
@jax.custom_vjp
def _pointwise_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(0, 0)] * 2, dimension_numbers=_NHWC)


def _pointwise_conv_fwd(x, kernel):
    return _pointwise_conv(x, kernel), (x, kernel)


def _pointwise_conv_bwd(residuals, dy):
    x, kernel = residuals
    dx = jax.lax.dot_general(dy, kernel[0, 0], (((3,), (1,)), ((), ())))
    dkernel = jax.lax.dot_general(x, dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return dx.astype(x.dtype), dkernel[None, None].astype(kernel.dtype)


_pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def _im2col(x, k: int, stride: int, pad: int):
    """[N, H', W', k*k*C] patches ordered (kh, kw, C), the order of a reshaped HWIO kernel."""
    n, h, w, _ = x.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = [
        xp[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride]
        for i in range(k)
        for j in range(k)
    ]
    return jnp.concatenate(taps, axis=-1)


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, over NHWC (an odd last row/column is dropped, as VALID).

    On CPU, XLA's reduce-window and its select-and-scatter gradient are slow (a VGG16
    ticket step spent a quarter of its time there); this reshaped max with a hand-written
    gradient is several times faster and bit-identical: the whole gradient goes to the
    first maximum of each window in row-major order, as select-and-scatter does.
    """
    if _default_backend() != "cpu":
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    return cpu_max_pool_2x2(x)


@jax.jit
def cpu_max_pool_2x2(x):
    """`max_pool_2x2`'s CPU path (a named call: eb_jax.cost counts it as a pool)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return _max_pool_2x2(x[:, :h, :w])


def _window_corners(x):
    """The four [N, H/2, W/2, C] corners of each 2x2 window, in row-major window order."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return [x[:, :, i, :, j] for i in range(2) for j in range(2)]


@jax.custom_vjp
def _max_pool_2x2(x):
    return functools.reduce(jnp.maximum, _window_corners(x))


def _max_pool_2x2_fwd(x):
    y = _max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(residuals, g):
    x, y = residuals
    taken = jnp.zeros(y.shape, bool)
    grads = []
    for corner in _window_corners(x):
        first = (corner == y) & ~taken
        grads.append(jnp.where(first, g, jnp.zeros_like(g)))
        taken = taken | first
    n, h2, w2, c = y.shape
    rows = [jnp.stack(grads[2 * i : 2 * i + 2], axis=3) for i in range(2)]
    return (jnp.stack(rows, axis=2).reshape(n, 2 * h2, 2 * w2, c),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def pooled_torch_linear(x, num_classes: int, name: str = "fc"):
    """Global average pool, then a Linear head with PyTorch's default init; fp32 logits.

    Call inside a parent's compact method (the Dense becomes its submodule `name`).
    """
    x = jnp.mean(x, axis=(1, 2))
    init = torch_linear_init(x.shape[-1])
    head = nn.Dense(num_classes, kernel_init=init, bias_init=init, dtype=x.dtype, name=name)
    return head(x).astype(jnp.float32)


# PyTorch's BN momentum 0.1: Flax's running average keeps this fraction of the old value.
BN_MOMENTUM = 0.9


class BatchNorm(nn.Module):
    """Flax's BatchNorm (same `scale`/`bias` params and `mean`/`var` batch_stats, biased
    batch variance in the running estimate, statistics in fp32, output in `dtype`),
    optionally followed by a channel selection and a ReLU, with a hand-written gradient.

    Training-mode autodiff of Flax's BatchNorm reads and writes the activation about
    nine times; here the forward pass reads it twice (both statistics in one pass, then
    the normalisation) and the backward pass three times (two sums in one pass, then
    the input gradient), the ReLU's mask taken from the saved output. With `select`
    (kept channel indices, ascending) the statistics cover every channel, as before a
    cut, but only the kept channels are normalised and returned, and the gradient of
    the others is zero without a scatter.
    """

    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = 1e-5
    scale_init: Any = nn.initializers.ones
    dtype: Any = jnp.float32
    relu: bool = False
    select: tuple | None = None

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            x, mean, bias = (_take(v, self.select) for v in (x, ra_mean.value, bias))
            y = (x.astype(jnp.float32) - mean) * _take(inv, self.select) + bias
            return (jnp.maximum(y, 0) if self.relu else y).astype(self.dtype)
        options = (self.epsilon, self.relu, self.dtype, self.select)
        y, mean, var = _batch_norm_train(x, scale, bias, *options)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean
            ra_var.value = m * ra_var.value + (1 - m) * var
        return y


def _take(x, select: tuple | None):
    """The `select`ed channels (last axis) of x; all of them for None.

    On CPU an activation's channels are picked by a matmul with a 0/1 matrix: XLA's CPU
    gather along the minor axis makes transposed copies around it. Exact: each output is
    one product by 1 plus products by 0 (a non-finite value in a dropped channel would
    spread over its pixel, in a run already diverged)."""
    if select is None:
        return x
    if x.ndim > 1 and _default_backend() == "cpu":
        return jnp.dot(x, _selection_matrix(select, x.shape[-1], x.dtype))
    return jnp.take(x, np.asarray(select, np.int32), axis=-1)


def _put(x, select: tuple | None, channels: int):
    """Inverse of `_take`: the selected channels back in place, zeros elsewhere. Not a
    scatter-add (slow on XLA's CPU backend): a gather from a zero-padded x, or on CPU,
    for an activation, a matmul with the transposed 0/1 matrix of `_take`."""
    if select is None:
        return x
    if x.ndim > 1 and _default_backend() == "cpu":
        return jnp.dot(x, _selection_matrix(select, channels, x.dtype).T)
    position = np.full(channels, len(select), np.int32)  # len(select): the zero column
    position[list(select)] = np.arange(len(select))
    padded = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], 1), x.dtype)], axis=-1)
    return jnp.take(padded, position, axis=-1)


def _selection_matrix(select: tuple, channels: int, dtype) -> jax.Array:
    """(channels, len(select)) zeros with a 1 at (select[k], k)."""
    matrix = np.zeros((channels, len(select)), np.float32)
    matrix[list(select), np.arange(len(select))] = 1
    return jnp.asarray(matrix, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _batch_norm_train(x, scale, bias, epsilon, relu, dtype, select):
    return _batch_norm_train_fwd(x, scale, bias, epsilon, relu, dtype, select)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, relu, dtype, select):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)  # as Flax
    inv = jax.lax.rsqrt(var + epsilon)
    kept_x = _take(x, select)  # saved for the backward pass: picked once
    kept = [_take(v, select) for v in (mean, scale * inv, bias)]
    y = (kept_x.astype(jnp.float32) - kept[0]) * kept[1] + kept[2]
    y = (jnp.maximum(y, 0) if relu else y).astype(dtype)
    return (y, mean, var), (kept_x, mean, inv, scale, y if relu else None)


def _batch_norm_train_bwd(epsilon, relu, dtype, select, residuals, cotangents):
    kept_x, mean, inv, scale, y = residuals
    dy = cotangents[0].astype(jnp.float32)  # the statistics' cotangents: running stats only
    if relu:
        dy = jnp.where(y > 0, dy, 0.0)
    axes, channels = tuple(range(kept_x.ndim - 1)), mean.shape[0]
    mean, inv, scale = (_take(v, select) for v in (mean, inv, scale))
    xhat = (kept_x.astype(jnp.float32) - mean) * inv
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    dx = (scale * inv) * (dy - (dbias + xhat * dscale) / (kept_x.size // kept_x.shape[-1]))
    dx = _put(dx.astype(kept_x.dtype), select, channels)
    return dx, _put(dscale, select, channels), _put(dbias, select, channels)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm(
    train: bool,
    scale_init: float,
    name: str | None = None,
    dtype=jnp.float32,
    relu: bool = False,
    select: tuple | None = None,
) -> BatchNorm:
    """BatchNorm with PyTorch's defaults: momentum 0.1 (Flax 0.9), epsilon 1e-5; output
    in `dtype`, statistics always in fp32; then the `select`ed channels, and a ReLU if
    `relu`.

    Unlike PyTorch, Flax keeps the biased batch variance in its running estimate.
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=1e-5,
        scale_init=nn.initializers.constant(scale_init),
        dtype=dtype,
        relu=relu,
        select=None if select is None else tuple(int(i) for i in select),
        name=name,
    )
