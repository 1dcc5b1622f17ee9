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


def resolve_conv_impl(impl: str, height: int, width: int, kernel_size: int) -> str:
    """Which convolution implementation runs: 'xla' or 'patches'."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if _default_backend() != "cpu":
        return "xla"
    return "patches" if kernel_size == 1 or height * width <= _PATCHES_MAX_PIXELS else "xla"


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
        impl = resolve_conv_impl(self.impl, x.shape[1], x.shape[2], k)
        if impl == "xla":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if k == 1 and pad == 0:
            return x[:, ::s, ::s, :] @ kernel[0, 0]
        return _im2col(x, k, s, pad) @ kernel.reshape(-1, self.features)


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


def batch_norm(
    train: bool, scale_init: float, name: str | None = None, dtype=jnp.float32
) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults: momentum 0.1 (Flax 0.9), epsilon 1e-5; output
    in `dtype`, statistics always in fp32.

    Unlike PyTorch, Flax keeps the biased batch variance in its running estimate.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=1e-5,
        scale_init=nn.initializers.constant(scale_init),
        dtype=dtype,
        name=name,
    )
