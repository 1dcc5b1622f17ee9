"""Networks written the usual linen way (no width fields, no BN lists) that the traced
cut must handle: each factory takes `num_classes` and returns the Module."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _bn(train: bool, name: str | None = None, dtype: Any = jnp.float32):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name, dtype=dtype)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ identity)."""

    features: int
    expand: int
    stride: int = 1
    residual: bool = False  # decided from the settings, never from a width at run time
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = x.shape[-1] * self.expand
        y = nn.Conv(hidden, (1, 1), use_bias=False, dtype=self.dtype)(x)
        y = nn.relu6(_bn(train, dtype=self.dtype)(y))
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = conv(hidden, (3, 3), self.stride, feature_group_count=hidden)(y)
        y = nn.relu6(_bn(train, dtype=self.dtype)(y))
        y = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype)(y)
        y = _bn(train, dtype=self.dtype)(y)
        return y + x if self.residual else y


class MobileNetV2(nn.Module):
    """A small MobileNetV2: depthwise convs, inverted residuals, ReLU6."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    blocks: tuple = ((8, 1, 1), (12, 4, 2), (12, 4, 1), (16, 4, 2))  # (features, expand, stride)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), use_bias=False, dtype=self.dtype)(x.astype(self.dtype))
        x = nn.relu6(_bn(train, dtype=self.dtype)(x))
        width = 16
        for features, expand, stride in self.blocks:
            residual = stride == 1 and width == features
            x = InvertedResidual(features, expand, stride, residual, self.dtype)(x, train)
            width = features
        x = nn.Conv(32, (1, 1), use_bias=False, dtype=self.dtype)(x)
        x = nn.relu6(_bn(train, dtype=self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def mobilenet_v2_tiny(num_classes: int, dtype: Any = jnp.float32) -> MobileNetV2:
    """Two blocks (one an inverted residual), for the end-to-end tests."""
    return MobileNetV2(num_classes, dtype, blocks=((16, 2, 1), (16, 2, 2)))


class ResNeXt(nn.Module):
    """ResNeXt bottlenecks: a grouped 3x3 conv (4 groups), projection shortcuts."""

    num_classes: int = 10
    groups: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn(train)(nn.Conv(16, (3, 3), use_bias=False)(x)))
        channels = 16
        for width, out, stride in ((16, 32, 1), (16, 32, 1), (32, 64, 2)):
            y = nn.relu(_bn(train)(nn.Conv(width, (1, 1), use_bias=False)(x)))
            y = nn.Conv(width, (3, 3), stride, feature_group_count=self.groups, use_bias=False)(y)
            y = nn.relu(_bn(train)(y))
            y = _bn(train)(nn.Conv(out, (1, 1), use_bias=False)(y))
            if stride != 1 or channels != out:
                x = _bn(train)(nn.Conv(out, (1, 1), stride, use_bias=False)(x))
            x, channels = nn.relu(x + y), out
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class DenseNet(nn.Module):
    """DenseNet-BC style: each layer's output concatenated to its input, transitions."""

    num_classes: int = 10
    growth: int = 6

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(12, (3, 3), use_bias=False)(x)
        for block in range(2):
            for _ in range(3):
                y = nn.relu(_bn(train)(x))
                y = nn.Conv(self.growth, (3, 3), use_bias=False)(y)
                x = jnp.concatenate([x, y], axis=-1)
            if block == 0:
                x = nn.Conv(16, (1, 1), use_bias=False)(nn.relu(_bn(train)(x)))
                x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(_bn(train)(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class SEResNet(nn.Module):
    """Basic residual blocks with squeeze-and-excitation (channel gates multiply)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn(train)(nn.Conv(16, (3, 3), use_bias=False)(x)))
        channels = 16
        for out, stride in ((16, 1), (24, 2)):
            y = nn.relu(_bn(train)(nn.Conv(out, (3, 3), stride, use_bias=False)(x)))
            y = _bn(train)(nn.Conv(out, (3, 3), use_bias=False)(y))
            gate = nn.relu(nn.Dense(out // 4)(jnp.mean(y, axis=(1, 2))))
            y = y * nn.sigmoid(nn.Dense(out)(gate))[:, None, None, :]
            if stride != 1 or channels != out:
                x = _bn(train)(nn.Conv(out, (1, 1), stride, use_bias=False)(x))
            x, channels = nn.relu(x + y), out
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class UNet(nn.Module):
    """A two-level U-Net: pooled encoder, ConvTranspose up, the skip concatenated."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        skip = nn.relu(_bn(train)(nn.Conv(12, (3, 3))(x)))
        y = nn.max_pool(skip, (2, 2), (2, 2))
        y = nn.relu(_bn(train)(nn.Conv(20, (3, 3))(y)))
        y = nn.relu(_bn(train)(nn.ConvTranspose(12, (2, 2), (2, 2))(y)))
        y = jnp.concatenate([y, skip], axis=-1)
        y = nn.relu(_bn(train)(nn.Conv(16, (3, 3))(y)))
        return nn.Conv(self.num_classes, (1, 1))(y)  # a per-pixel map


class FlattenHead(nn.Module):
    """Conv features flattened into a Dense head with a BatchNorm'd hidden layer."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn(train)(nn.Conv(8, (3, 3))(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(_bn(train)(nn.Conv(12, (3, 3))(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_bn(train)(nn.Dense(24)(x)))
        return nn.Dense(self.num_classes)(x)


class LayerNormCNN(nn.Module):
    """A LayerNorm over the channels after every BatchNorm: every group is frozen."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features in (8, 12):
            x = nn.relu(nn.LayerNorm()(_bn(train)(nn.Conv(features, (3, 3))(x))))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class HalfLayerNormCNN(nn.Module):
    """A LayerNorm over the second layer's channels only: that group alone is frozen."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_bn(train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.LayerNorm()(_bn(train)(nn.Conv(12, (3, 3))(x))))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class NoBatchNorm(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(jnp.mean(nn.relu(nn.Conv(8, (3, 3))(x)), axis=(1, 2)))
