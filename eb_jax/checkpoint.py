"""Checkpoints with orbax: arrays (StandardSave) + a JSON record (JsonSave, orbax item
'meta') per step; eb_jax.run_state says what goes into both.

The JSON record holds what is needed *before* arrays can be restored: the model name,
its per-layer widths and class count, the stage, the training position and the config
(eb_jax.config.config_record).
`restore` reads it first, builds the (possibly pruned) model's abstract state, then
restores the arrays. A damaged newest step is reported in one line, moved aside (never
deleted) and the previous step is used. No pickles: arrays go to orbax, the rest to JSON.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger("eb_jax")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class Checkpointer:
    """Saves steps to WORKDIR/checkpoints when asked, keeping the newest `keep`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # orbax's own unfinished saves, nothing else
            create=True,
        )
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("arrays", "meta")
        )

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, arrays, record: dict) -> None:
        """Saves asynchronously where orbax allows; `arrays` is a pytree of arrays."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(jsonable(record))
            ),
        )

    def read_record(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        if not restored.meta:
            raise ValueError("its JSON record is missing")
        return restored.meta

    def restore(self, target_for: Callable[[dict], object]):
        """(step, arrays, record) of the newest readable step, or None when there is none.

        `target_for(record)` returns the arrays' target tree, or None for the tree as saved.
        """
        self.wait()
        # A damaged step's failed read leaves orbax's other reads in flight, and they print
        # tracebacks from tensorstore's threads while it fails: stderr is set aside.
        stderr, failed = _set_stderr_aside(), False
        try:
            for step in sorted(self.steps(), reverse=True):
                try:
                    record = self.read_record(step)
                    target = target_for(record)
                    restore = ocp.args.StandardRestore(target)
                    restored = self._manager.restore(step, args=ocp.args.Composite(arrays=restore))
                    return step, restored.arrays, record
                except CheckpointError:  # a usable checkpoint that this run must not take
                    raise
                except Exception as e:  # orbax/tensorstore raise many types for damaged files
                    detail = " ".join(str(e).split()).split(" See full")[0][:160]
                    reason = f"{type(e).__name__}: {detail}"
                failed = True
                self._set_aside(step, reason)
            return None
        finally:
            _restore_stderr(stderr, grace_s=2.0 if failed else 0.0)

    def _set_aside(self, step: int, reason: str) -> None:
        aside = os.path.join(self.directory, f"damaged-{step}-{int(time.time())}")
        os.rename(os.path.join(self.directory, str(step)), aside)
        logger.warning(
            "checkpoint step %d is damaged (%s); moved to %s, falling back to the previous one",
            step,
            reason,
            aside,
        )
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        self._manager.wait_until_finished()
        # orbax removes its unfinished temporaries in a background thread started by the
        # manager, which close() does not join; an early exit would interrupt it.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def _set_stderr_aside() -> int:
    """Points the process's stderr at /dev/null; returns the saved descriptor. (Python's
    own messages about a failing restore are exceptions, raised to the caller.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    return saved


def _restore_stderr(saved: int, grace_s: float) -> None:
    """Points stderr back at `saved` after `grace_s` seconds in which the reads a failed
    restore abandoned may finish and be collected (their tracebacks go nowhere)."""
    try:
        if grace_s:
            with warnings.catch_warnings():  # "coroutine ... was never awaited": the same
                warnings.simplefilter("ignore", RuntimeWarning)
                gc.collect()
                time.sleep(grace_s)
                gc.collect()
        sys.stderr.flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_model(workdir: str):
    """(model, {'params', 'batch_stats'}, record) from the newest readable checkpoint in
    `workdir`, built from its recorded model name and widths alone (pruned ones too)."""
    from eb_jax.models import create_model, widths_from_json

    models = {}

    def target_for(record):
        widths = widths_from_json(record["widths"])
        models["model"] = create_model(record["model"], record["num_classes"], **widths)
        return None  # the arrays as saved

    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        restored = checkpointer.restore(target_for)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no readable checkpoint in {checkpointer.directory}")
    _, arrays, record = restored
    train_state = arrays["train"]
    variables = {"params": train_state["params"], "batch_stats": train_state.get("batch_stats", {})}
    return models["model"], variables, record


def jsonable(value):
    """Config values and numpy scalars as plain JSON types (tuples become lists)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
