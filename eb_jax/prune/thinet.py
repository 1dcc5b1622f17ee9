"""ThiNet (Luo et al. 2017): prune a layer's channels by how well the next layer's output
is reconstructed without them, then rescale the kept ones by least squares.

For each prunable layer in network order (groups.interior_groups whose channels a conv
reads): sample images and, per image, random (output channel o, position) pairs of the
next conv; each sample's value is y = sum_c xhat_c, xhat_c = sum over the kernel taps of
W[tap, c, o] * x[tap, c] (channel c's contribution). Greedily grow the removed set T by
the channel that keeps sum_samples (sum_{c in T} xhat_c)^2 smallest (ties: the lower
index) until |T| = floor(ratio * C); then scale the kept channels' slices of the next
conv's kernel by w = argmin sum_samples (y - sum_{c kept} w_c xhat_c)^2. The removed
slices are zeroed, so each later layer is chosen on the network pruned so far; the
zeroed channels are cut out by the surgery afterwards (no output changes there).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from eb_jax.models import layers
from eb_jax.ticket.groups import consumer_conv, interior_groups, masks_for_bns
from eb_jax.ticket.masks import prune_count


def greedy_removal(contributions: np.ndarray, count: int) -> np.ndarray:
    """ThiNet's greedy choice: `count` channel indices (in the order taken) whose summed
    contributions ([samples, channels]) have the smallest squared norm, built one at a time."""
    x = np.asarray(contributions, np.float64)
    removed, total = [], np.zeros(x.shape[0])
    available = np.ones(x.shape[1], bool)
    for _ in range(count):
        cost = np.sum((total[:, None] + x) ** 2, axis=0)
        cost[~available] = np.inf
        c = int(np.argmin(cost))  # the first minimum: ties go to the lower index
        removed.append(c)
        available[c] = False
        total += x[:, c]
    return np.asarray(removed, np.int64)


def rescale(contributions: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Least-squares scales of the kept channels: the output y = sum of all contributions
    fitted by the kept ones' contributions."""
    x = np.asarray(contributions, np.float64)
    return np.linalg.lstsq(x[:, kept], x.sum(axis=1), rcond=None)[0]


def thinet_prune(
    model, variables: dict, images: np.ndarray, ratio: float, locations: int, seed: int
) -> tuple[list, dict]:
    """(per-BN keep-masks in bn_paths() order, the variables with the next layers' kernels
    rescaled and the removed channels' slices zeroed), on the training `images` sample."""
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    inputs_of = _conv_inputs(model)
    keep_of = {}
    for index, group in enumerate(interior_groups(model)):
        reader = consumer_conv(group)
        if reader is None:  # a linear layer reads it (VGG's last conv): not pruned
            continue
        x, conv = inputs_of({**variables, "params": params}, images, reader)
        kernel = params[reader]["kernel"]
        rng = np.random.default_rng([seed, index])
        contributions = _contributions(x, kernel, conv, locations, rng)
        removed = greedy_removal(contributions, prune_count(kernel.shape[2], ratio))
        keep = np.ones(kernel.shape[2], bool)
        keep[removed] = False
        scales = np.zeros(kernel.shape[2])
        scales[keep] = rescale(contributions, np.flatnonzero(keep))
        params[reader] = {
            **params[reader],
            "kernel": (kernel * scales[None, None, :, None]).astype(kernel.dtype),
        }
        keep_of[group.bns[0]] = keep
    return masks_for_bns(model, params, keep_of), {**variables, "params": params}


def _contributions(x, kernel, conv: tuple, locations: int, rng) -> np.ndarray:
    """[images * locations, C]: channel c's part of the next conv's output at random
    (output channel, position) samples, from its input `x` [N, H, W, C]."""
    stride, pad = conv
    k, out = kernel.shape[0], kernel.shape[3]
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, oh, ow = x.shape[0], (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    image = np.repeat(np.arange(n), locations)
    o, h, w = (rng.integers(0, size, image.size) for size in (out, oh, ow))
    taps = np.arange(k)
    rows = (h * stride)[:, None] + taps  # [M, k]
    cols = (w * stride)[:, None] + taps
    patches = x[image[:, None, None], rows[:, :, None], cols[:, None, :]]  # [M, k, k, C]
    weights = np.moveaxis(np.asarray(kernel, np.float64)[:, :, :, o], -1, 0)  # [M, k, k, C]
    return np.einsum("mijc,mijc->mc", patches, weights)


def _conv_inputs(model):
    """A function (variables, images, conv name) -> (that conv's input as numpy, (stride,
    padding)), in eval mode. One compiled forward pass serves every conv."""
    settings = {}

    @jax.jit
    def forward(variables, images):
        captured = {}

        def capture(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, layers.Conv) and context.method_name == "__call__":
                captured[module.name] = args[0]
                pad = module.kernel_size // 2 if module.padding is None else module.padding
                settings[module.name] = (module.stride, pad)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            model.apply(variables, images, train=False)
        return captured

    def inputs_of(variables, images, name):
        x = np.concatenate(
            [
                np.asarray(forward(variables, chunk)[name])
                for chunk in np.array_split(images, max(1, len(images) // 32))
            ]
        )
        return x, settings[name]

    return inputs_of
