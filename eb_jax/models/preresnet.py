"""Pre-activation ResNet with bottlenecks for CIFAR, with channel selection (docs/method.md).

Block: BN(in) -> select -> ReLU -> 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1
to 4*planes, plus the identity or a bare strided 1x1 conv on the raw block input. The
residual width never shrinks; a pruned network narrows the two inner widths of each
block and gathers a subset of its input channels after the block-input BN (`selections`,
fused into that BN: layers.BatchNorm `select`).
"""

from __future__ import annotations

import functools

import flax.linen as nn

from eb_jax.lowp import FP32, Precision
from eb_jax.models.layers import Conv, batch_norm, pooled_torch_linear

EXPANSION = 4
STAGE_PLANES = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"PreResNet depth must be 9n+2 with n >= 1 (11, 20, ...), got {depth}")
    return (depth - 2) // 9


def default_inner_widths(depth: int) -> tuple[tuple[int, int], ...]:
    """Dense (conv1 out, conv2 out) of every block: (planes, planes)."""
    n = blocks_per_stage(depth)
    return tuple((p, p) for p in STAGE_PLANES for _ in range(n))


class PreResNet(nn.Module):
    """PreResNet-(9n+2). Widths: `inner_widths` per block, `selections` per block + head.

    A selection is a tuple of kept input-channel indices (ascending), or None for all.
    """

    depth: int = 101
    num_classes: int = 10
    inner_widths: tuple | None = None
    selections: tuple | None = None  # len = number of blocks + 1 (the head's)
    conv_impl: str = "auto"
    bn_scale_init: float = 0.5
    precision: Precision = FP32

    WIDTH_FIELDS = ("inner_widths", "selections")

    def _widths(self):
        n_blocks = 3 * blocks_per_stage(self.depth)
        inner = self.inner_widths or default_inner_widths(self.depth)
        selections = self.selections or (None,) * (n_blocks + 1)
        if len(inner) != n_blocks or len(selections) != n_blocks + 1:
            raise ValueError(
                f"PreResNet-{self.depth} has {n_blocks} blocks: inner_widths needs {n_blocks} "
                f"entries and selections {n_blocks + 1}, got {len(inner)} and {len(selections)}"
            )
        return inner, selections

    def block_names(self) -> list[str]:
        n = blocks_per_stage(self.depth)
        return [f"stage{s}_block{b}" for s in range(3) for b in range(n)]

    def bn_paths(self) -> list[tuple[str, ...]]:
        """Param paths of the BatchNorm layers, in module order."""
        paths = [(f"{blk}_{bn}",) for blk in self.block_names() for bn in ("bn1", "bn2", "bn3")]
        return paths + [("bn_final",)]

    @nn.compact
    def __call__(self, x, train: bool = False):
        inner, selections = self._widths()
        n = blocks_per_stage(self.depth)
        dtype = self.precision.compute_dtype
        conv = functools.partial(Conv, impl=self.conv_impl, precision=self.precision)
        bn = functools.partial(batch_norm, train, self.bn_scale_init, dtype=dtype)
        x = conv(16, 3, name="conv_stem")(x.astype(dtype))
        for i, name in enumerate(self.block_names()):
            stage, b = divmod(i, n)
            planes, stride = STAGE_PLANES[stage], (2 if stage > 0 and b == 0 else 1)
            c1, c2 = inner[i]
            out = bn(name=f"{name}_bn1", relu=True, select=selections[i])(x)
            out = conv(c1, 1, name=f"{name}_conv1")(out)
            out = bn(name=f"{name}_bn2", relu=True)(out)
            out = conv(c2, 3, stride, name=f"{name}_conv2")(out)
            out = bn(name=f"{name}_bn3", relu=True)(out)
            out = conv(planes * EXPANSION, 1, name=f"{name}_conv3")(out)
            if b == 0:  # in_planes != 4*planes or stride 2: a bare 1x1 conv on the raw input
                x = conv(planes * EXPANSION, 1, stride, 0, name=f"{name}_down")(x)
            x = out + x
        x = bn(name="bn_final", relu=True, select=selections[-1])(x)
        return pooled_torch_linear(x, self.num_classes)
