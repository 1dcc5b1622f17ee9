"""The early-bird detector: has the ticket stopped changing? (docs/method.md, detector)

The detector is a frozen dataclass of settings; its state is a small pytree of numpy
arrays (the last masks and how many were seen), so it checkpoints with everything else.

- 'code' rule (the released code, default): keep the last `window` masks; once full,
  the ticket has emerged iff the newest mask is within `eps` of each older one.
- 'paper' rule: keep the last `window` consecutive-epoch distances (window + 1 masks);
  emerged iff all are held and their max is < eps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eb_jax.ticket.masks import flatten_mask, mask_distance

DETECTION_RULES = ("code", "paper")


@dataclasses.dataclass(frozen=True)
class EarlyBirdDetector:
    window: int = 5
    eps: float = 0.1
    rule: str = "code"

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"early-bird window must be >= 2, got {self.window}")
        if self.rule not in DETECTION_RULES:
            raise ValueError(f"early-bird rule must be one of {DETECTION_RULES}, got {self.rule!r}")
        if not self.eps > 0:
            raise ValueError(f"early-bird eps must be > 0, got {self.eps}")

    @property
    def capacity(self) -> int:
        """Masks held: the window, plus one for the paper rule's consecutive distances."""
        return self.window + (self.rule == "paper")

    def init(self, total: int) -> dict:
        """Empty state for masks of `total` channels."""
        return {"masks": np.zeros((self.capacity, total), bool), "count": np.int64(0)}

    def update(self, state: dict, mask) -> tuple[dict, bool, np.ndarray]:
        """Adds the newest mask. Returns (state, emerged, distances).

        distances: 'code' rule, newest mask to each older mask held (oldest first);
        'paper' rule, consecutive distances (oldest first). Empty until the FIFO is full.
        """
        flat = flatten_mask(mask)
        if flat.size != state["masks"].shape[1]:
            raise ValueError(
                f"mask has {flat.size} channels, the detector holds {state['masks'].shape[1]}"
            )
        masks = np.concatenate([state["masks"][1:], flat[None]])
        state = {"masks": masks, "count": np.int64(state["count"] + 1)}
        if state["count"] < self.capacity:
            return state, False, np.zeros(0)
        if self.rule == "code":
            distances = np.array([mask_distance(masks[-1], m) for m in masks[:-1]])
            return state, bool(np.all(distances <= self.eps)), distances
        distances = np.array(
            [mask_distance(a, b) for a, b in zip(masks[:-1], masks[1:], strict=True)]
        )
        return state, bool(distances.max() < self.eps), distances
