"""Everything a resume needs, written and read back in this one module, side by side.

A checkpoint is one pytree of arrays and one JSON record (checkpoint.Checkpointer).
`checkpoint` builds both from a Trainer; `restore_target` gives the arrays' abstract
tree for a record (before any array is read), and `restored` reads both back as one
`Restored`. A new piece of resumable state is one field here: written in `checkpoint`,
targeted in `restore_target`, read in `restored`.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import numpy as np

from eb_jax import names, parallel
from eb_jax.config import config_record
from eb_jax.models import model_widths


@dataclasses.dataclass
class Resume:
    """Mid-stage state from a checkpoint: the epoch's metric sums so far, the SWA average,
    and the run's energy and wall time when the stage and the epoch began."""

    epoch_sums: dict | None = None
    swa_params: object = None
    swa_count: int = 0
    marks: dict | None = None  # {'stage_j', 'stage_wall_s', 'epoch_j'}
    device_batch_stats: object = None  # every device's own, from a preemption's checkpoint


@dataclasses.dataclass
class Restored:
    """A checkpoint read back: where the run was (`stage`, the step the stage started
    at), what its Trainer resumes with, and what the run's context gets back (the
    finished stages and pruning result, the clocks, the search, the weight mask)."""

    stage: str
    stage_start: int
    state: object  # the TrainState
    resume: Resume
    results: dict  # the finished stages and the pruning phase's: {'history', 'pruned'}
    clock: tuple  # (wall_time_s, compile_time_s) so far
    energy: dict | None = None  # the energy reading and waste so far
    weight_mask: object = None
    search: tuple | None = None  # (arrays, JSON) for TicketSearch.load_state_dict


def checkpoint(trainer, state, reading: dict, as_is: bool) -> tuple[dict, dict]:
    """(arrays, JSON record) of `trainer`'s run at its step, with the (replicated) `state`
    and the energy `reading`. `as_is` (a preemption's): every device's own BN statistics
    too, so the resumed run goes on exactly as this one would have."""
    ctx = trainer.ctx
    arrays = {"train": flax.serialization.to_state_dict(parallel.unreplicate(state))}
    record = {
        "model": ctx.config.model,
        "num_classes": ctx.data.num_classes,
        "input_shape": list(ctx.data.spec.image_shape),
        "widths": model_widths(trainer.model),
        "stage": trainer.plan.name,
        "stage_start_step": trainer.plan.start_step,
        "step": trainer.step,
        "epoch": trainer.epoch,
        "epoch_sums": host_sums(trainer.sums) if trainer.sums else None,
        "config": config_record(ctx.config),
        "wall_time_s": ctx.clock.wall_time(),
        "compile_time_s": ctx.clock.compile_s,
        "energy": {"reading": reading, "wasted": dict(ctx.energy.wasted)},
        "energy_marks": trainer.marks,
        **ctx.results,
    }
    if ctx.search is not None:
        arrays["search"], record["search"] = ctx.search.state_dict()
    if trainer.swa.count:
        arrays["swa"] = parallel.unreplicate(trainer.swa.params)
        record["swa_count"] = trainer.swa.count
    if trainer.mask_args:
        arrays["weight_mask"] = parallel.unreplicate(trainer.mask_args[0])
    if as_is and jax.tree.leaves(trainer.state.batch_stats):
        arrays["device_batch_stats"] = parallel.device_copies(trainer.state.batch_stats)
        record["device_batch_stats"] = jax.device_count()
    return arrays, record


def restore_target(record: dict, fresh_state, search) -> dict:
    """The abstract arrays of a checkpoint with JSON `record`, given the TrainState its
    stage starts from (`fresh_state`, abstract) and the run's TicketSearch (or None)."""
    target = {"train": flax.serialization.to_state_dict(fresh_state)}
    if search is not None and record.get("search"):
        target["search"] = search.arrays_like(len(record["search"]["epochs"]))
    if record.get("swa_count"):
        target["swa"] = target["train"]["params"]
    if record.get("device_batch_stats"):  # a preemption's: every device's own
        n = record["device_batch_stats"]
        target["device_batch_stats"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), target["train"]["batch_stats"]
        )
    if record["stage"] == names.MASKED:  # a weight-masked stage's mask
        target["weight_mask"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, np.bool_), target["train"]["params"]
        )
    return target


def restored(arrays: dict, record: dict, fresh_state) -> Restored:
    """The checkpoint (`arrays` restored into `restore_target`'s tree, its `record`)."""
    resume = Resume(
        record["epoch_sums"],
        arrays.get("swa"),
        record.get("swa_count", 0),
        record["energy_marks"],
        arrays.get("device_batch_stats"),
    )
    search = (arrays["search"], record["search"]) if record.get("search") else None
    return Restored(
        stage=record["stage"],
        stage_start=record["stage_start_step"],
        state=flax.serialization.from_state_dict(fresh_state, arrays["train"]),
        resume=resume,
        results={"history": record["history"], "pruned": record["pruned"]},
        clock=(record["wall_time_s"], record["compile_time_s"]),
        energy=record.get("energy"),
        weight_mask=arrays.get("weight_mask"),
        search=search,
    )


def host_sums(sums: dict) -> dict:
    """Metric sums (equal on every device) as host floats."""
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in sums.items()}
