"""Run feedback shared by every layer: the eb_jax logger, durations, TensorBoard scalars
with a JSON-lines copy, and whole-or-nothing JSON files. A leaf: it imports no eb_jax
module, so the trainer, the ticket search and the report can all use it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

logger = logging.getLogger("eb_jax")


def setup_logging(process_index: int = 0) -> None:
    """Progress lines to stdout, without the absl prefix; quiet third-party chatter.
    Processes other than 0 of a multi-process run only report problems."""
    import absl.logging
    import tensorflow_datasets as tfds

    absl.logging.set_verbosity(absl.logging.ERROR)
    if not any(getattr(h, "_eb_jax", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._eb_jax = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if process_index == 0 else logging.WARNING)
    logger.propagate = False
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


def write_json(path: str, record: dict, indent: int | None = None) -> None:
    """Writes `record` to `path` whole or not at all (never a half-written file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=indent)
    os.replace(path + ".tmp", path)
