"""Early-bird tickets: masks from BN scales, their distance, the emergence detector."""

from eb_jax.ticket.early_bird import DETECTION_RULES, EarlyBirdDetector
from eb_jax.ticket.masks import channel_mask, flatten_mask, mask_distance, pairwise_distances

__all__ = [
    "DETECTION_RULES",
    "EarlyBirdDetector",
    "channel_mask",
    "flatten_mask",
    "mask_distance",
    "pairwise_distances",
]
