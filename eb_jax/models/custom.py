"""A user's own flax.linen network, named `package.module:Factory` (docs/method.md, "Any
linen model"): `Factory(num_classes)` returns the Module; `Custom` wraps it with the
interface every built-in model has (`bn_paths()`, widths that a checkpoint records).

Its BatchNorms are found on the variables (a 1-D `scale` with `mean`/`var` statistics),
its channel groups by tracing (ticket/trace.py), and a cut's layer widths are kept as the
JSON `cut_widths` that `ticket.cut` produced, so the narrow network is rebuilt from the
factory and that string alone.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eb_jax.lowp import FP32, Precision


def is_custom(name: str) -> bool:
    """Does the model name a factory ('package.module:Factory')?"""
    return ":" in name


@functools.cache
def resolve(name: str):
    """The factory `name` points at; ValueError (one line) when it cannot be had."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module's own failure
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {module_name!r} has no callable {attr!r}")
    return factory


def attr_of(name: str) -> str:
    return name.partition(":")[2]


def takes_dtype(name: str) -> bool:
    """Does the factory take a `dtype` argument (so bf16 can be asked of it)?"""
    try:
        parameters = inspect.signature(resolve(name)).parameters
    except (TypeError, ValueError):
        return False
    return "dtype" in parameters


def build(name: str, num_classes: int, precision: Precision = FP32) -> nn.Module:
    """The user's Module for `num_classes` classes, in `precision`'s compute dtype."""
    factory = resolve(name)
    kwargs = {"dtype": precision.compute_dtype} if precision.name == "bf16" else {}
    if precision.name not in ("fp32", "bf16") or (kwargs and not takes_dtype(name)):
        raise ValueError(f"model {name!r} cannot compute in {precision.name}")
    try:
        module = factory(num_classes=num_classes, **kwargs)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"model {name!r}: {attr_of(name)}(num_classes=...) failed: {first}"
        ) from None
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"model {name!r} returned a {type(module).__name__}, not a flax.linen Module"
        )
    return module


def _set_widths(widths: dict, next_fun, args, kwargs, context):
    from eb_jax.ticket.cut import set_widths

    return set_widths(widths, next_fun, args, kwargs, context)


class Custom(nn.Module):
    """The network `factory` builds, with the widths a cut gave it (None: dense)."""

    factory: str
    num_classes: int
    image_shape: tuple = ()
    cut_widths: str | None = None  # JSON: module path -> {attribute: width}, from ticket.cut
    conv_impl: str = "auto"  # the user's layers are their own
    precision: Precision = FP32

    WIDTH_FIELDS = ("image_shape", "cut_widths")

    def setup(self):
        self.net = build(self.factory, self.num_classes, self.precision)

    def __call__(self, x, train: bool = False):
        kwargs = {"train": train} if _takes_train(type(self.net)) else {}
        if not self.cut_widths:
            return self.net(x, **kwargs)
        widths = json.loads(self.cut_widths)
        with nn.intercept_methods(functools.partial(_set_widths, widths)):
            return self.net(x, **kwargs)

    def bn_paths(self) -> list:
        return _bn_paths(self.factory, self.num_classes, tuple(self.image_shape), self.cut_widths)

    def example_input(self):
        """One batch of the input shape, for tracing."""
        return jnp.zeros((1, *self.image_shape), jnp.float32)


@functools.cache
def _takes_train(cls: type) -> bool:
    return "train" in inspect.signature(cls.__call__).parameters


@functools.cache
def _bn_paths(factory: str, num_classes: int, image_shape: tuple, cut_widths) -> list:
    from eb_jax.ticket.trace import bn_paths_of

    model = Custom(factory, num_classes, image_shape, cut_widths, parent=None)
    shapes = jax.eval_shape(model.init, jax.random.key(0), model.example_input())
    return bn_paths_of(shapes)


def check(model: Custom) -> None:
    """ValueError (one line) for a network eb_jax cannot prune: no BatchNorm, or every
    channel group frozen."""
    _check(model.factory, model.num_classes, tuple(model.image_shape), model.cut_widths)


@functools.cache
def _check(factory: str, num_classes: int, image_shape: tuple, cut_widths) -> None:
    from eb_jax.ticket.trace import trace_groups

    model = Custom(factory, num_classes, image_shape, cut_widths, parent=None)
    if not model.bn_paths():
        raise ValueError(
            f"model {model.factory!r} has no BatchNorm: the ticket is drawn from BN scales"
        )
    shapes = jax.eval_shape(model.init, jax.random.key(0), model.example_input())
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)  # nothing to compile
    groups = trace_groups(model, variables, model.example_input())
    if all(g.frozen for g in groups):
        raise ValueError(
            f"model {model.factory!r}: every channel group is frozen, nothing to cut "
            f"({groups[0].frozen})"
        )
