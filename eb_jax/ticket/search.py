"""The search phase's bookkeeping: masks for every monitored ratio after each epoch.

`TicketSearch.observe(epoch, scales)` draws the masks, feeds the detectors, and records
the masks so the pairwise distance matrix (paper Fig. 3) can be drawn. It is told which
ratio the run trains for and reports when that ratio's ticket has emerged.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from eb_jax.models.vit import ViT
from eb_jax.runlog import write_json
from eb_jax.ticket.early_bird import EarlyBirdDetector
from eb_jax.ticket.masks import channel_mask, flatten_mask, mask_distance
from eb_jax.ticket.vit_groups import gate_mask


@dataclasses.dataclass
class Ticket:
    """The drawn ticket: per-layer keep-masks for `ratio` after `epoch` epochs."""

    ratio: float
    epoch: int
    emerged: bool  # whether the detector fired at `epoch` (False: a mask taken without it)
    masks: list  # per-layer numpy bool arrays, BN module order

    def to_json(self) -> dict:
        return {
            "ratio": self.ratio,
            "epoch": self.epoch,
            "emerged": self.emerged,
            "kept": [int(m.sum()) for m in self.masks],
            "masks": ["".join("1" if k else "0" for k in m) for m in self.masks],
        }

    @classmethod
    def from_json(cls, record: dict) -> Ticket:
        masks = [np.array([c == "1" for c in m], bool) for m in record["masks"]]
        return cls(record["ratio"], record["epoch"], record["emerged"], masks)


def mask_function(model):
    """How the ticket masks of `model` are drawn from its scales (ViT: its gates' rule)."""
    return gate_mask if isinstance(model, ViT) else channel_mask


class TicketSearch:
    """Detectors for `ratios` side by side; `target` is the ratio the run trains for."""

    def __init__(
        self, ratios, target: float, detector: EarlyBirdDetector, layer_sizes, mask_fn=channel_mask
    ):
        """`mask_fn(scales, ratio)`: the per-layer masks (`mask_function(model)`)."""
        self.mask_fn = mask_fn
        self.ratios = sorted(set(ratios) | {target})
        self.target = target
        self.detector = detector
        self.layer_sizes = list(layer_sizes)
        total = sum(self.layer_sizes)
        self.states = {r: detector.init(total) for r in self.ratios}
        self.history = {r: [] for r in self.ratios}  # flat masks, one per observed epoch
        self.epochs: list[int] = []
        self.detected: dict[float, int] = {}  # ratio -> epoch its ticket emerged
        self.ticket: Ticket | None = None

    def observe(self, epoch: int, scales) -> dict:
        """Masks after `epoch` epochs. Returns {ratio: (distances, emerged)}."""
        report = {}
        self.epochs.append(epoch)
        for ratio in self.ratios:
            masks = [np.asarray(m) for m in self.mask_fn(scales, ratio)]
            self.states[ratio], emerged, distances = self.detector.update(self.states[ratio], masks)
            self.history[ratio].append(flatten_mask(masks))
            if emerged and ratio not in self.detected:
                self.detected[ratio] = epoch
                if ratio == self.target:
                    self.ticket = Ticket(ratio, epoch, True, masks)
            report[ratio] = (distances, emerged)
        return report

    def state_dict(self) -> tuple[dict, dict]:
        """(arrays, json) to checkpoint: detector windows and mask history, bookkeeping."""
        total = sum(self.layer_sizes)
        arrays = {
            f"p{r:g}": {
                "window": self.states[r]["masks"],
                "count": np.asarray(self.states[r]["count"], np.int64),
                "history": np.stack(self.history[r])
                if self.history[r]
                else np.zeros((0, total), bool),
            }
            for r in self.ratios
        }
        record = {
            "epochs": list(self.epochs),
            "detected": {f"{r:g}": e for r, e in self.detected.items()},
            "ticket": self.ticket.to_json() if self.ticket else None,
        }
        return arrays, record

    def arrays_like(self, n_observed: int) -> dict:
        """Zero arrays shaped like `state_dict()[0]` after n_observed epochs (a restore target)."""
        total = sum(self.layer_sizes)
        return {
            f"p{r:g}": {
                "window": np.zeros((self.detector.capacity, total), bool),
                "count": np.asarray(0, np.int64),
                "history": np.zeros((n_observed, total), bool),
            }
            for r in self.ratios
        }

    def load_state_dict(self, arrays: dict, record: dict) -> None:
        """Restores what `state_dict` returned."""
        for r in self.ratios:
            entry = arrays[f"p{r:g}"]
            self.states[r] = {
                "masks": np.asarray(entry["window"]),
                "count": np.int64(entry["count"]),
            }
            self.history[r] = list(np.asarray(entry["history"]))
        self.epochs = list(record["epochs"])
        self.detected = {float(r): e for r, e in record["detected"].items()}
        self.ticket = Ticket.from_json(record["ticket"]) if record["ticket"] else None

    def take_mask(self, epoch: int | None = None) -> Ticket:
        """The ticket drawn without the detector: the mask after `epoch` epochs (default:
        the last observed), for a run whose detector never fired or a fixed ticket epoch."""
        epoch = self.epochs[-1] if epoch is None else epoch
        flat = self.history[self.target][self.epochs.index(epoch)]
        masks = np.split(flat, np.cumsum(self.layer_sizes)[:-1])
        self.ticket = Ticket(self.target, epoch, self.detected.get(self.target) == epoch, masks)
        return self.ticket

    def consecutive_distances(self, ratio: float) -> list[float]:
        h = self.history[ratio]
        return [mask_distance(a, b) for a, b in zip(h[:-1], h[1:], strict=True)]

    def save(self, workdir: str) -> None:
        """ticket.json (the target ratio's ticket) and masks.npz (every recorded mask)."""
        os.makedirs(workdir, exist_ok=True)
        if self.ticket is not None:
            write_json(os.path.join(workdir, "ticket.json"), self.ticket.to_json())
        arrays = {f"p{r:g}": np.stack(self.history[r]) for r in self.ratios}
        np.savez_compressed(
            os.path.join(workdir, "masks.npz"), epochs=np.asarray(self.epochs), **arrays
        )
