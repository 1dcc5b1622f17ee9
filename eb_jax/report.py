"""Run feedback: progress lines, TensorBoard scalars and a JSON-lines metrics log."""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

logger = logging.getLogger("eb_jax")


def setup_logging() -> None:
    """Progress lines to stdout, without the absl prefix; quiet third-party chatter."""
    if not any(getattr(h, "_eb_jax", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._eb_jax = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    import absl.logging
    import tensorflow_datasets as tfds

    absl.logging.set_verbosity(absl.logging.ERROR)
    tfds.disable_progress_bar()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWriter:
    """Scalars to TensorBoard event files (tensorboardX, no TensorFlow) and metrics.jsonl."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self._tb = SummaryWriter(logdir=workdir, flush_secs=10)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def plot_mask_distances(search, path: str) -> None:
    """Paper Fig. 3: pairwise mask distances over the recorded epochs, one panel per ratio,
    min-max normalised to [0, 1]; the detection epoch is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eb_jax.ticket import pairwise_distances

    ratios = search.ratios
    fig, axes = plt.subplots(1, len(ratios), figsize=(4 * len(ratios), 3.8), squeeze=False)
    epochs = search.epochs
    for ax, ratio in zip(axes[0], ratios, strict=True):
        matrix = pairwise_distances(search.history[ratio])
        span = matrix.max() - matrix.min()
        shown = (matrix - matrix.min()) / span if span > 0 else np.zeros_like(matrix)
        extent = (epochs[0] - 0.5, epochs[-1] + 0.5, epochs[-1] + 0.5, epochs[0] - 0.5)
        image = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, extent=extent)
        title = f"p = {ratio:g}"
        if ratio in search.detected:
            e = search.detected[ratio]
            ax.axhline(e, color="w", ls="--", lw=1)
            ax.axvline(e, color="w", ls="--", lw=1)
            title += f" (EB ticket at epoch {e})"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="normalised mask distance")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
