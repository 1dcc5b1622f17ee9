"""Export and load a cut ticket: narrow widths as JSON plus arrays, via the checkpoint module."""

from __future__ import annotations

import jax

from eb_jax.checkpoint import Checkpointer, load_model
from eb_jax.models import model_widths


def save_ticket(
    path: str, model_name: str, model, variables: dict, num_classes: int, input_shape, **info
) -> None:
    """Writes the narrow `model`'s variables and widths to `path` (a new directory)."""
    checkpointer = Checkpointer(path, keep=1, async_save=False)
    try:
        record = {
            "model": model_name,
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "widths": model_widths(model),
            "stage": "ticket",
            "ticket": info,
        }
        # On the host: orbax cannot write a device-local array from several processes.
        train = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        arrays = {"train": jax.device_get(train)}
        checkpointer.save(0, arrays, record)
    finally:
        checkpointer.close()


def load_ticket(path: str):
    """(model, {'params', 'batch_stats'}, record) of a saved ticket, from `path` alone."""
    return load_model(path)
