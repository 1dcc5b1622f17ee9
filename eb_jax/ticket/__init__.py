"""Early-bird tickets: masks from BN scales, their distance, the emergence detector; channel
groups of any linen model by tracing, and the cut to its ticket."""

from eb_jax.ticket.cut import cut, narrow_model
from eb_jax.ticket.early_bird import DETECTION_RULES, EarlyBirdDetector
from eb_jax.ticket.masks import channel_mask, flatten_mask, mask_distance, pairwise_distances
from eb_jax.ticket.trace import TracedGroup, trace_groups

__all__ = [
    "DETECTION_RULES",
    "EarlyBirdDetector",
    "TracedGroup",
    "channel_mask",
    "cut",
    "flatten_mask",
    "mask_distance",
    "narrow_model",
    "pairwise_distances",
    "trace_groups",
]
