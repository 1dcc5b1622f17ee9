"""ResNet-18/50 for ImageNet in torchvision's layout (docs/method.md, models).

Stem 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool; four stages of basic blocks (two 3x3
convs) or bottlenecks (1x1, 3x3 with the stride, 1x1 to 4x); downsample = 1x1 conv + BN.
Widths are explicit: `stem_width`, the residual width of each stage, and the inner
widths of every block, so a pruned ResNet is the same class with smaller numbers.
"""

from __future__ import annotations

import functools

import flax.linen as nn

from eb_jax.lowp import FP32, Precision
from eb_jax.models.layers import Conv, batch_norm, pooled_torch_linear

BLOCK_KINDS = ("basic", "bottleneck")


def default_widths(block: str, stage_sizes, base: int = 64):
    """Dense (stem_width, stage_widths, inner_widths) of a torchvision ResNet."""
    expansion = 4 if block == "bottleneck" else 1
    n_inner = 2 if block == "bottleneck" else 1
    planes = [base * 2**i for i in range(len(stage_sizes))]
    stage_widths = tuple(p * expansion for p in planes)
    inner = tuple(
        (p,) * n_inner for p, n in zip(planes, stage_sizes, strict=True) for _ in range(n)
    )
    return base, stage_widths, inner


class ResNet(nn.Module):
    """torchvision ResNet. Leave the widths None for the dense network."""

    block: str = "bottleneck"
    stage_sizes: tuple = (3, 4, 6, 3)
    num_classes: int = 1000
    base_width: int = 64
    stem_width: int | None = None
    stage_widths: tuple | None = None
    inner_widths: tuple | None = None
    conv_impl: str = "auto"
    bn_scale_init: float = 1.0
    precision: Precision = FP32

    WIDTH_FIELDS = ("stem_width", "stage_widths", "inner_widths")

    def _widths(self):
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"ResNet block must be one of {BLOCK_KINDS}, got {self.block!r}")
        stem, stages, inner = default_widths(self.block, self.stage_sizes, self.base_width)
        stem = self.stem_width or stem
        stages = self.stage_widths or stages
        inner = self.inner_widths or inner
        if len(inner) != sum(self.stage_sizes) or len(stages) != len(self.stage_sizes):
            raise ValueError(
                f"ResNet with stage sizes {self.stage_sizes} needs {len(self.stage_sizes)} "
                f"stage widths and {sum(self.stage_sizes)} inner widths"
            )
        return stem, stages, inner

    def block_names(self) -> list[str]:
        return [f"stage{s}_block{b}" for s, n in enumerate(self.stage_sizes) for b in range(n)]

    def has_downsample(self, stage: int, block: int) -> bool:
        # Structural (from the dense network), never inferred from pruned widths.
        return block == 0 and (stage > 0 or self.block == "bottleneck")

    def bn_paths(self) -> list[tuple[str, ...]]:
        """Param paths of the BatchNorm layers, in torchvision's module order."""
        bns = ("bn1", "bn2", "bn3") if self.block == "bottleneck" else ("bn1", "bn2")
        paths = [("stem_bn",)]
        for s, n in enumerate(self.stage_sizes):
            for b in range(n):
                name = f"stage{s}_block{b}"
                paths += [(f"{name}_{bn}",) for bn in bns]
                if self.has_downsample(s, b):
                    paths.append((f"{name}_down_bn",))
        return paths

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem, stages, inner = self._widths()
        dtype = self.precision.compute_dtype
        conv = functools.partial(Conv, impl=self.conv_impl, precision=self.precision)
        bn = functools.partial(batch_norm, train, self.bn_scale_init, dtype=dtype)
        x = conv(stem, 7, 2, 3, name="stem_conv")(x.astype(dtype))
        x = bn(name="stem_bn", relu=True)(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        i = 0
        for s, n in enumerate(self.stage_sizes):
            for b in range(n):
                name, stride = f"stage{s}_block{b}", (2 if s > 0 and b == 0 else 1)
                widths = inner[i] + (stages[s],)
                out = x
                for j, width in enumerate(widths):
                    if self.block == "bottleneck":
                        k, st = (3, stride) if j == 1 else (1, 1)
                    else:
                        k, st = 3, (stride if j == 0 else 1)
                    out = conv(width, k, st, name=f"{name}_conv{j + 1}")(out)
                    out = bn(name=f"{name}_bn{j + 1}", relu=j < len(widths) - 1)(out)
                if self.has_downsample(s, b):
                    x = conv(stages[s], 1, stride, 0, name=f"{name}_down_conv")(x)
                    x = bn(name=f"{name}_down_bn")(x)
                x = nn.relu(out + x)
                i += 1
        return pooled_torch_linear(x, self.num_classes)
