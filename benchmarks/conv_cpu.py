"""Per-layer CPU cost of the two convolution paths on VGG16's shapes (batch 64).

Shows where XLA's convolution loses to im2col + matmul (the tiny late maps), which sets
`conv_impl='auto'`'s threshold in eb_jax/models/layers.py. Prints forward and
forward+backward milliseconds and the ratio xla / patches per shape.

    python benchmarks/conv_cpu.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eb_jax.models.layers import Conv
from eb_jax.platform import configure_process

SHAPES = [(32, 3, 64), (32, 64, 64), (16, 128, 128), (8, 256, 256), (4, 512, 512), (2, 512, 512)]


def _median_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    print("hw  cin cout | xla fwd / grad ms | patches fwd / grad ms | grad ratio xla/patches")
    for hw, cin, cout in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((64, hw, hw, cin), np.float32))
        grads = {}
        fwds = {}
        for impl in ("xla", "patches"):
            conv = Conv(cout, 3, impl=impl)
            variables = conv.init(jax.random.key(0), x)
            fwds[impl] = _median_ms(jax.jit(conv.apply), variables, x)
            loss = lambda v, x, c=conv: jnp.sum(c.apply(v, x) ** 2)  # noqa: E731
            grads[impl] = _median_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), variables, x)
        print(
            f"{hw:2d} {cin:4d} {cout:4d} | {fwds['xla']:7.1f} / {grads['xla']:7.1f} | "
            f"{fwds['patches']:7.1f} / {grads['patches']:7.1f} | "
            f"{grads['xla'] / grads['patches']:.2f}"
        )


if __name__ == "__main__":
    main()
