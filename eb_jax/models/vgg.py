"""VGG with BatchNorm for CIFAR, as the Early-Bird original defines it (docs/method.md, models).

conv 3x3 (no bias) -> BN -> ReLU per entry of `cfg`, 2x2 max-pool for each 'M', then an
average pool over the final map and a single Linear head. Widths are explicit in `cfg`,
so a pruned VGG is the same class with smaller numbers.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from eb_jax.lowp import FP32, Precision
from eb_jax.models.layers import Conv, batch_norm, max_pool_2x2

VGG_CFGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
    ),
}


class VGG(nn.Module):
    """VGG-BN. `cfg`: conv widths in order, 'M' for a 2x2 max-pool."""

    cfg: tuple
    num_classes: int = 10
    conv_impl: str = "auto"
    bn_scale_init: float = 0.5
    precision: Precision = FP32

    WIDTH_FIELDS = ("cfg",)

    def conv_widths(self) -> list[int]:
        return [c for c in self.cfg if c != "M"]

    def bn_paths(self) -> list[tuple[str, ...]]:
        """Param paths of the BatchNorm layers, in module order."""
        return [(f"bn{i}",) for i in range(len(self.conv_widths()))]

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype, i = self.precision.compute_dtype, 0
        x = x.astype(dtype)
        for c in self.cfg:
            if c == "M":
                x = max_pool_2x2(x)
                continue
            conv = Conv(c, 3, impl=self.conv_impl, precision=self.precision, name=f"conv{i}")
            bn = batch_norm(train, self.bn_scale_init, name=f"bn{i}", dtype=dtype, relu=True)
            x = bn(conv(x))
            i += 1
        # The original's AvgPool2d(2) on the final 2x2 CIFAR map is this global mean.
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            dtype=dtype,
            name="classifier",
        )(x).astype(jnp.float32)
