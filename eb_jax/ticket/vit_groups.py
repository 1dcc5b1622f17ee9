"""The ViT's ticket: its masks from the gates, its coupling groups, and gate folding.

Masks (docs/method.md, "ViT tickets"): for prune ratio p, each block loses the
floor(heads * p) heads with the smallest |gate| (ties: the lower index goes first), so
every block keeps at least one head; the MLP neurons are ranked over the whole network
as BN channels are (`channel_mask` over the MLP gates alone). A head is cut from the
q/k/v kernels and biases along their head axis and from the output kernel's; a neuron
from the first MLP Dense's outputs and the second's inputs. When cut, the gates are
folded into the output projection and the second MLP Dense (their rows times the gate)
and reset to 1: the cut network computes the same function, and its retraining starts
from unit gates.
"""

from __future__ import annotations

import numpy as np

from eb_jax.models.vit import ViT
from eb_jax.ticket.groups import Group
from eb_jax.ticket.masks import channel_mask, check_ratio, prune_count


def gate_mask(scales, ratio: float) -> list[np.ndarray]:
    """Keep-masks in bn_paths() order (per block: heads, then MLP neurons) for ratio p."""
    check_ratio(ratio)
    heads, neurons = scales[0::2], scales[1::2]
    head_masks = [_head_mask(np.asarray(s, np.float32), ratio) for s in heads]
    neuron_masks = [np.asarray(m) for m in channel_mask(list(neurons), ratio)]
    return [m for pair in zip(head_masks, neuron_masks, strict=True) for m in pair]


def _head_mask(scale: np.ndarray, ratio: float) -> np.ndarray:
    keep = np.ones(scale.size, bool)
    order = np.argsort(np.abs(scale), kind="stable")
    keep[order[: prune_count(scale.size, ratio)]] = False
    return keep


def vit_groups(model: ViT) -> list[Group]:
    """Per block: its heads (q/k/v/out head axes) and its MLP neurons."""
    groups = []
    for i in range(model.depth):
        b = f"block{i}"
        qkv = tuple(
            cut
            for n in ("query", "key", "value")
            for cut in ((f"{b}_{n}", "kernel", 1), (f"{b}_{n}", "bias", 0))
        )
        groups.append(Group(("heads", i), (f"{b}_head_gate",), (*qkv, (f"{b}_out", "kernel", 0))))
        mlp = ((f"{b}_mlp1", "kernel", 1), (f"{b}_mlp1", "bias", 0), (f"{b}_mlp2", "kernel", 0))
        groups.append(Group(("mlp", i), (f"{b}_mlp_gate",), mlp))
    return groups


def narrow_widths(model: ViT, kept: dict) -> dict:
    return {
        "head_widths": tuple(len(kept[("heads", i)]) for i in range(model.depth)),
        "mlp_widths": tuple(len(kept[("mlp", i)]) for i in range(model.depth)),
    }


def fold_gates(model: ViT, params: dict) -> dict:
    """`params` (numpy, modified in place) with every gate folded into the weights that
    read its units and reset to 1; the network's function is unchanged."""
    for i in range(model.depth):
        b = f"block{i}"
        for gate, reader, shape in (
            ("head_gate", "out", (-1, 1, 1)),
            ("mlp_gate", "mlp2", (-1, 1)),
        ):
            scale = params[f"{b}_{gate}"]["scale"]
            kernel = params[f"{b}_{reader}"]["kernel"]
            params[f"{b}_{reader}"] = {
                **params[f"{b}_{reader}"],
                "kernel": (kernel * scale.reshape(shape)).astype(kernel.dtype),
            }
            params[f"{b}_{gate}"] = {"scale": np.ones_like(scale)}
    return params
