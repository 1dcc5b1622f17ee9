"""Run feedback: progress lines, TensorBoard scalars and a JSON-lines metrics log."""

from __future__ import annotations

import json
import logging
import os
import sys

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
