"""Model registry: a config names a model by string; every model takes explicit widths.

Every model has `bn_paths()`, the param paths of its BatchNorm layers in module order;
`bn_scales(model, params)` reads their scale vectors (the ticket code depends on it).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn

from eb_jax.lowp import FP32, Precision
from eb_jax.models import custom
from eb_jax.models.preresnet import PreResNet
from eb_jax.models.resnet import ResNet
from eb_jax.models.vgg import VGG, VGG_CFGS
from eb_jax.models.vit import ViT

MODELS = {
    "vgg11": functools.partial(VGG, cfg=VGG_CFGS[11]),
    "vgg13": functools.partial(VGG, cfg=VGG_CFGS[13]),
    "vgg16": functools.partial(VGG, cfg=VGG_CFGS[16]),
    "vgg19": functools.partial(VGG, cfg=VGG_CFGS[19]),
    # The quickstart's network for 8x8 digits, and a tiny one for tests.
    "vgg_small": functools.partial(VGG, cfg=(32, 32, "M", 64, 64, "M", 128, 128)),
    "vgg_tiny": functools.partial(VGG, cfg=(8, "M", 16, 16)),
    "preresnet101": functools.partial(PreResNet, depth=101),
    "preresnet164": functools.partial(PreResNet, depth=164),
    "preresnet_tiny": functools.partial(PreResNet, depth=11),
    "resnet18": functools.partial(ResNet, block="basic", stage_sizes=(2, 2, 2, 2)),
    "resnet50": functools.partial(ResNet, block="bottleneck", stage_sizes=(3, 4, 6, 3)),
    "resnet_tiny": functools.partial(ResNet, block="basic", stage_sizes=(1, 1, 1, 1), base_width=8),
    "resnet_tiny_bottleneck": functools.partial(
        ResNet, block="bottleneck", stage_sizes=(1, 1, 1, 1), base_width=4
    ),
    # ViT-Ti/S/B-16 for 224x224 ImageNet; a ViT for 32x32 CIFAR (4x4 patches); the ViT
    # quickstart's for 8x8 digits (2x2 patches); a tiny one for tests.
    "vit_ti16": functools.partial(ViT, hidden=192, depth=12, num_heads=3, mlp_dim=768),
    "vit_s16": functools.partial(ViT, hidden=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_b16": functools.partial(ViT, hidden=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_cifar": functools.partial(
        ViT, patch_size=4, hidden=192, depth=6, num_heads=3, mlp_dim=768
    ),
    "vit_digits": functools.partial(
        ViT, patch_size=2, hidden=64, depth=4, num_heads=4, mlp_dim=128
    ),
    "vit_tiny": functools.partial(ViT, patch_size=4, hidden=16, depth=2, num_heads=2, mlp_dim=16),
}


BUILT_IN = (VGG, PreResNet, ResNet, ViT)


def built_from_fields(model) -> bool:
    """Is `model` one of eb_jax's own networks, whose structure is its fields alone? Equal
    ones may share compiled programs. A factory's network is not: its code can be
    redefined under the same name (a notebook's rerun cell), and its Module may hold
    fields that cannot be hashed."""
    return type(model) in BUILT_IN


@dataclasses.dataclass(frozen=True)
class _ApplyOf:
    model: nn.Module

    def __call__(self, *args, **kwargs):
        return self.model.apply(*args, **kwargs)


def apply_fn(model):
    """`model.apply` as a TrainState's static field: for eb_jax's own networks equal to
    that of any equal model (bound methods are equal only to themselves), so equal stages
    share their compiled steps; a factory's network keeps its own bound `apply`."""
    return _ApplyOf(model) if built_from_fields(model) else model.apply


def create_model(
    name: str, num_classes: int, conv_impl: str = "auto", precision: Precision = FP32, **widths
) -> nn.Module:
    """Builds a registered model, or a factory's ('package.module:Factory', with its
    `image_shape`); `widths` override its dense per-layer widths."""
    if custom.is_custom(name):
        model = custom.Custom(name, num_classes, conv_impl=conv_impl, precision=precision, **widths)
        custom.build(name, num_classes, precision)  # its one-line errors, now
        return model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, conv_impl=conv_impl, precision=precision, **widths)


def model_widths(model: nn.Module) -> dict:
    """The model's per-layer width fields (None = the dense default), JSON-ready."""
    return {f: _as_lists(getattr(model, f)) for f in model.WIDTH_FIELDS}


def widths_from_json(record: dict) -> dict:
    """Inverse of `model_widths` after a JSON round trip: lists back to (nested) tuples."""
    return {k: _as_tuples(v) for k, v in record.items()}


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def bn_scales(model: nn.Module, params) -> list:
    """The BN scale vectors of `model` from its params, in module order."""
    return [get_path(params, path)["scale"] for path in model.bn_paths()]
