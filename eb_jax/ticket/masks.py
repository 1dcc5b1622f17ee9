"""The ticket mask and the mask distance, exactly as docs/method.md defines them.

A mask is drawn over the whole network at once: all BN scales are ranked by magnitude,
and a channel is kept iff its |scale| is strictly above the k-th smallest magnitude,
k = floor(total * ratio). Ties at the threshold are pruned, so at least k + 1 channels
are; at initialisation every scale is equal and the mask is all zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")


def prune_count(total: int, ratio: float) -> int:
    """k = floor(total * ratio) in float64, as the original's int(total * percent)."""
    return int(total * float(ratio))


def channel_mask(scales: Sequence[jax.Array], ratio: float) -> list[jax.Array]:
    """Per-layer boolean keep-masks for prune ratio `ratio` from BN scale vectors.

    `scales`: the 1-D scale vectors of every BN layer in module order
    (`eb_jax.models.bn_scales`). Returns one bool array per layer.
    """
    check_ratio(ratio)
    sizes = [int(s.shape[0]) for s in scales]
    flat = _flat_keep(tuple(scales), prune_count(sum(sizes), ratio))
    return jnp.split(flat, np.cumsum(sizes)[:-1])


@jax.jit(static_argnums=1)
def _flat_keep(scales, k: int):
    # |scale| compared as the integer bits of a float32 with the sign bit cleared: the
    # same order as the values, but exact for subnormals, which XLA's CPU float ops
    # flush to zero (a 1e-45 scale must rank above 0, as in PyTorch).
    bits = [jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32) for s in scales]
    magnitudes = jnp.concatenate(bits) & 0x7FFFFFFF
    threshold = jnp.sort(magnitudes)[k]
    return magnitudes > threshold


def flatten_mask(mask) -> np.ndarray:
    """A per-layer mask (sequence of arrays) or a flat one as one flat numpy bool array."""
    if isinstance(mask, (list, tuple)):
        return np.concatenate([np.asarray(m, bool).ravel() for m in mask])
    return np.asarray(mask, bool).ravel()


def mask_distance(a, b) -> float:
    """Normalised Hamming distance, 1 - equal / total, in float64."""
    a, b = flatten_mask(a), flatten_mask(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in length: {a.size} vs {b.size} channels")
    return 1.0 - float(np.count_nonzero(a == b)) / a.size


def pairwise_distances(masks: Sequence) -> np.ndarray:
    """The [n, n] matrix of mask distances (paper Fig. 3, before normalisation)."""
    kept = np.stack([flatten_mask(m) for m in masks]).astype(np.int64)
    pruned = 1 - kept
    equal = kept @ kept.T + pruned @ pruned.T
    return 1.0 - equal / kept.shape[1]
