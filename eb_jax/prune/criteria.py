"""Every pruning criterion, one signature, in one registry (jaxpruner's ALGORITHM_REGISTRY).

A criterion turns a trained network into keep-masks: `select(model, variables, ratio,
inputs) -> (masks, variables)`. Channel criteria give one bool vector per BatchNorm (the
surgery cuts them out); weight criteria give an unstructured mask over every conv/linear
kernel (the next stage holds those weights at 0). `variables` come back as the cut
starts from them (ThiNet rescales the next layer). A new criterion is one entry here and
its own module; `methods.Prune(name, start, ratio)` uses it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

from eb_jax import names
from eb_jax.prune.sfp import hard_prune_masks
from eb_jax.prune.thinet import thinet_prune
from eb_jax.prune.weights import magnitude_mask, snip_mask

TICKET = "ticket"  # the search's BN-scale ticket (network slimming's criterion)
THINET = "thinet"  # the next layer's reconstruction, greedy, with least-squares rescaling
SFP = "sfp"  # the filters that soft filter pruning zeroed
SNIP = "snip"  # connection sensitivity at initialisation
MAGNITUDE = "magnitude"  # global weight magnitude (the lottery ticket's)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a criterion may read besides the network: the config (its per-criterion
    fields), the search's drawn ticket masks, and `batches(size)`: the first epoch's
    training batches of `size`, the same on every process, as the model takes them."""

    config: object
    ticket_masks: list | None
    batches: Callable[[int], Iterator[dict]]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """`select` (the signature above) and what it masks: names.CHANNELS or WEIGHTS.
    `zeroes_filters`: the trained network already has the pruned filters at zero
    (SFP): its accuracy as trained is reported next to the cut one's, and constant
    channels are folded into the cut."""

    select: Callable
    granularity: str
    zeroes_filters: bool = False


def _ticket(model, variables, ratio, inputs: Inputs):
    del model, ratio  # drawn by the search at config.prune_ratio
    return inputs.ticket_masks, variables


def _thinet(model, variables, ratio, inputs: Inputs):
    config = inputs.config
    images = next(iter(inputs.batches(config.thinet_images)))["image"]
    return thinet_prune(model, variables, images, ratio, config.thinet_locations, config.seed)


def _sfp(model, variables, ratio, inputs: Inputs):
    del inputs
    return hard_prune_masks(model, variables["params"], ratio), variables


def _snip(model, variables, ratio, inputs: Inputs):
    config = inputs.config
    batches = itertools.islice(inputs.batches(config.batch_size), config.snip_batches)
    return snip_mask(model, variables, batches, ratio), variables


def _magnitude(model, variables, ratio, inputs: Inputs):
    del model, inputs
    return magnitude_mask(variables["params"], ratio), variables


REGISTRY: dict[str, Criterion] = {
    TICKET: Criterion(_ticket, names.CHANNELS),
    THINET: Criterion(_thinet, names.CHANNELS),
    SFP: Criterion(_sfp, names.CHANNELS, zeroes_filters=True),
    SNIP: Criterion(_snip, names.WEIGHTS),
    MAGNITUDE: Criterion(_magnitude, names.WEIGHTS),
}


def cuts_channels(name: str) -> bool:
    """Whether criterion `name` gives channel masks (a cut) rather than a weight mask."""
    return REGISTRY[name].granularity == names.CHANNELS
