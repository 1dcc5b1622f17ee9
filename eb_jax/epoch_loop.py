"""Trains one stage's network epoch by epoch over the local devices, checkpointing as it goes.

A stage's settings are one frozen `StagePlan`; what the stages of a run share (config,
data, checkpointer, metric writer, clock, ticket search, the record of finished stages)
is one `RunContext`. `Trainer(ctx, plan, model, state)` builds nothing expensive;
`compile()` compiles the steps ahead of time and `train_epoch(e)` trains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import numpy as np

from eb_jax import data as data_lib
from eb_jax import energy, names, parallel, preemption, run_state, train_steps
from eb_jax.data import dali
from eb_jax.energy import EnergyClock
from eb_jax.lowp import Precision
from eb_jax.models import bn_scales
from eb_jax.prune.sfp import soft_prune
from eb_jax.run_state import host_sums
from eb_jax.runlog import format_duration, logger


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage's settings: where it starts and ends (global steps and epochs), where its
    LR schedule starts, its number format and sparsity, and its per-epoch extras."""

    name: str
    start_step: int
    end_epoch: int
    lr_origin: int
    precision: Precision
    sparsity: float
    swa_start: int = 0  # average the weights from this epoch of the stage's schedule; 0: off
    soft_prune_ratio: float = 0.0  # SFP: zero the weakest filters after every epoch


@dataclasses.dataclass
class Clock:
    """The run's wall time and the part of it spent compiling, over stages and restarts."""

    wall_before: float = 0.0
    compile_s: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


@dataclasses.dataclass
class RunContext:
    """What every stage of one run shares; `results` (the finished stages, the pruning
    step's result) go into every checkpoint's JSON record."""

    config: object
    data: object
    workdir: str
    checkpointer: object
    writer: object
    clock: Clock
    search: object = None
    results: dict = dataclasses.field(default_factory=lambda: {"history": [], "pruned": None})
    energy: EnergyClock = dataclasses.field(default_factory=EnergyClock)

    @property
    def steps_per_epoch(self) -> int:
        return data_lib.input_pipeline.steps_per_epoch(self.data, self.config.batch_size)


@dataclasses.dataclass
class EpochProgress:
    """The epoch in flight, as its per-step and epoch-end actions see it."""

    epoch: int
    first: int  # the epoch's step this process began at (0: its start)
    entry_j: dict  # the run's energy reading then
    started: float  # time.perf_counter() then
    train_time: float = 0.0
    stopping: bool = False  # a signal asked the run to stop


class Trainer:
    """Holds the replicated TrainState; `train_epoch` resumes mid-epoch where it stopped.

    Checkpoints go out every `config.checkpoint_every_steps` steps and at each epoch end,
    with the BN statistics averaged over the devices first (at the same steps in every
    run, so an interrupted run stays bit-identical to an uninterrupted one).
    """

    def __init__(
        self,
        ctx: RunContext,
        plan: StagePlan,
        model,
        state,
        weight_mask=None,
        resume: run_state.Resume | None = None,
    ):
        """`resume`: given when `state` comes from a checkpoint of this stage."""
        resumed, resume = resume is not None, resume or run_state.Resume()
        self.ctx, self.plan, self.model = ctx, plan, model
        self.state = _replicate_state(state, resume.device_batch_stats)
        self.step = int(state.step)  # global step = the optimizer's update count; host copy
        # The weight mask (replicated) is the train step's third argument, when there is one.
        self.mask_args = () if weight_mask is None else (parallel.replicate(weight_mask),)
        self.sums = resume.epoch_sums  # this epoch's train metrics so far
        self.swa = WeightAverage(resume.swa_params, resume.swa_count)
        self.last_saved = self.step if resumed else None  # its checkpoint exists
        self.start_step, self.last_metrics, self.compiling_s = self.step, {}, 0.0
        self.started = time.perf_counter()
        self.learning_rate = None  # the last step's, as the train step reports it
        self.marks = resume.marks or _stage_start_marks(self)
        config = ctx.config
        self.p_train = _pmapped_train_step(model.precision, config.seed, config.label_smoothing)
        self.p_eval = _pmapped_eval_step()
        self.wait = parallel.must_wait_each_step()

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.step // self.ctx.steps_per_epoch

    def compile(self) -> None:
        """Compiles the train and eval steps ahead of time (not counted in the ETA); a
        multi-process run compiles at its first step (a multi-process pmap's ahead-of-time
        executable expects global shapes): its wall time counts that, its compile time not."""
        if jax.process_count() > 1:
            return
        start, config, shape = time.perf_counter(), self.ctx.config, self.ctx.data.spec.image_shape
        train_batch = _batch_spec(config.batch_size, shape, False)
        eval_batch = _batch_spec(config.eval_batch_size, shape, True)
        if self.epoch < self.plan.end_epoch:  # else nothing is left to train (a 0-epoch stage)
            self.p_train = self.p_train.lower(self.state, train_batch, *self.mask_args).compile()
        self.p_eval = self.p_eval.lower(self.state, eval_batch).compile()
        self.compiling_s = time.perf_counter() - start
        self.ctx.clock.compile_s += self.compiling_s

    def bn_scales(self) -> list:
        """The BN scale vectors (first device's copy) in module order."""
        return parallel.unreplicate(bn_scales(self.model, self.state.params))

    def train_epoch(self, epoch: int) -> dict:
        """Trains the rest of `epoch` (all of it unless resumed mid-epoch) with the
        per-step actions after each step, then runs the epoch-end actions in order."""
        spe = self.ctx.steps_per_epoch
        first = self.step - epoch * spe
        if not 0 <= first < spe:
            raise ValueError(f"at step {self.step}, epoch {epoch} is not the current one")
        entry_j = energy_now(self)  # then the clock: both measure the same stretch
        progress = EpochProgress(epoch, first, entry_j, time.perf_counter())
        if first == 0:
            self.sums, self.marks["epoch_j"] = None, entry_j
        for batch in _loader(self.ctx, "train", epoch, first):
            self._step(batch)
            for _, action in STEP_ACTIONS:
                action(self, progress)
        progress.train_time = time.perf_counter() - progress.started
        for _, action in EPOCH_END_ACTIONS:
            action(self, progress)
        return self.last_metrics

    def _step(self, batch) -> None:
        self.state, metrics = self.p_train(self.state, parallel.shard(batch), *self.mask_args)
        metrics = dict(metrics)
        self.learning_rate = metrics.pop("learning_rate", None)
        if self.wait:
            jax.block_until_ready(metrics)
        self.sums = _accumulate(self.sums, metrics)
        self.step += 1
        if self.wait:
            self._check_finite()

    def evaluate(self, state=None) -> dict:
        """Loss and accuracy over the whole eval split (of `state`, default the trained)."""
        state = self.state if state is None else state
        sums = None
        for batch in _loader(self.ctx, "eval"):
            metrics = self.p_eval(state, parallel.shard(batch))
            if self.wait:
                jax.block_until_ready(metrics)
            sums = _accumulate(sums, metrics)
        return _rates(sums)

    def save(self, as_is: bool = False) -> None:
        """Checkpoints the state and everything a resumed run needs (once per step).

        `as_is`: a step off the run's checkpoint steps (a preemption's): the devices keep
        their own BN statistics, saved alongside the average, so the resumed run goes on
        exactly as this one would have.
        """
        if self.ctx.checkpointer is None or self.last_saved == self.step:
            return
        self._check_finite()
        synced = parallel.sync_batch_stats(self.state)
        reading = energy_now(self)
        arrays, record = run_state.checkpoint(self, synced, reading, as_is)
        if "device_batch_stats" not in arrays:
            self.state = synced
        self.ctx.energy.checkpointed(self.step, reading, record["wall_time_s"])
        self.ctx.checkpointer.save(self.step, arrays, record)
        self.last_saved = self.step

    def _stop(self) -> None:
        """Checkpoints this step and stops the run: it was asked to (preemption)."""
        self.save(as_is=True)
        raise preemption.Preempted(self.step, preemption.signal_number())

    def _check_finite(self) -> None:
        if self.sums is not None and not math.isfinite(host_sums(self.sums)["loss_sum"]):
            raise _diverged(self)


# One pmapped step per setting for the process: equal stages (equal models, optimizers and
# shapes) reuse its compiled program instead of tracing and compiling it again.
@functools.cache
def _pmapped_train_step(precision: Precision, seed: int, label_smoothing: float):
    step_fn = functools.partial(
        train_steps.train_step, precision=precision, seed=seed, label_smoothing=label_smoothing
    )
    return parallel.pmap_step(step_fn)


@functools.cache
def _pmapped_eval_step():
    return parallel.pmap_step(train_steps.eval_step, donate_state=False)


def train_epochs(trainer: Trainer, before_epoch=None, stop=None) -> None:
    """The epoch loop every stage runs: `before_epoch(epoch)` first (a search draws its
    ticket there), then the stage ends at its plan's end_epoch or where `stop(epoch)`
    says, else the epoch is trained."""
    epoch = trainer.epoch
    while True:
        if before_epoch is not None:
            before_epoch(epoch)
        if epoch >= trainer.plan.end_epoch or (stop is not None and stop(epoch)):
            return
        trainer.train_epoch(epoch)
        epoch += 1


def _ask_to_stop(trainer: Trainer, progress: EpochProgress) -> None:
    progress.stopping = preemption.stop_at(trainer.step)  # every process, every step


def _log_progress_every(trainer: Trainer, progress: EpochProgress) -> None:
    every, done = trainer.ctx.config.log_every_steps, _done(trainer, progress)
    if every and done % every == 0:
        _log_progress(trainer, progress.epoch, done, progress.first, progress.started)


def _checkpoint_every(trainer: Trainer, progress: EpochProgress) -> None:
    every, done = trainer.ctx.config.checkpoint_every_steps, _done(trainer, progress)
    if every and trainer.step % every == 0 and done < trainer.ctx.steps_per_epoch:
        trainer.save()


def _stop_mid_epoch(trainer: Trainer, progress: EpochProgress) -> None:
    if progress.stopping and _done(trainer, progress) < trainer.ctx.steps_per_epoch:
        trainer._stop()  # at the epoch's last step: after its end


def _done(trainer: Trainer, progress: EpochProgress) -> int:
    return trainer.step - progress.epoch * trainer.ctx.steps_per_epoch


# After every step, in order.
STEP_ACTIONS = (
    ("preemption", _ask_to_stop),
    ("progress", _log_progress_every),
    ("checkpoint", _checkpoint_every),
    ("stop", _stop_mid_epoch),
)


def _check_loss(trainer: Trainer, progress: EpochProgress) -> None:
    trainer._check_finite()


def _soft_prune(trainer: Trainer, progress: EpochProgress) -> None:
    if trainer.plan.soft_prune_ratio:  # SFP: zero the weakest filters
        params = parallel.unreplicate(trainer.state.params)
        pruned = soft_prune(trainer.model, params, trainer.plan.soft_prune_ratio)
        trainer.state = trainer.state.replace(params=parallel.replicate(pruned))


def _average_batch_stats(trainer: Trainer, progress: EpochProgress) -> None:
    trainer.state = parallel.sync_batch_stats(trainer.state)


def _average_weights(trainer: Trainer, progress: EpochProgress) -> None:
    plan, spe = trainer.plan, trainer.ctx.steps_per_epoch
    if plan.swa_start and progress.epoch - plan.lr_origin // spe >= plan.swa_start:
        trainer.swa.add(trainer.state.params)


def _evaluate(trainer: Trainer, progress: EpochProgress) -> None:
    """Evaluates; logs the epoch's metrics with the stage's ETA."""
    spe, config = trainer.ctx.steps_per_epoch, trainer.ctx.config
    test, trained = trainer.evaluate(), _rates(trainer.sums)
    elapsed = time.perf_counter() - trainer.started - trainer.compiling_s
    steps_left = trainer.plan.end_epoch * spe - trainer.step
    eta = elapsed / max(trainer.step - trainer.start_step, 1) * steps_left
    metrics = {
        "epoch": progress.epoch + 1,
        "train_loss": trained["loss"],
        "train_accuracy": trained["accuracy"],
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        **({"test_top5_accuracy": test["top5_accuracy"]} if "top5_accuracy" in test else {}),
        "images_per_sec": (spe - progress.first) * config.batch_size / progress.train_time,
    }
    if trainer.learning_rate is not None:  # the last step's, as the state's schedule gave it
        metrics["learning_rate"] = host_sums({"lr": trainer.learning_rate})["lr"]
    _log_epoch(metrics, trainer.plan.end_epoch, eta)
    trainer.last_metrics = metrics


def _measure_energy(trainer: Trainer, progress: EpochProgress) -> None:
    trainer.last_metrics.update(_epoch_energy(trainer, progress.entry_j, progress.started))


def _write_metrics(trainer: Trainer, progress: EpochProgress) -> None:
    trainer.ctx.writer.write_scalars(trainer.step, trainer.last_metrics)


def _checkpoint(trainer: Trainer, progress: EpochProgress) -> None:
    trainer.save()


def _stop_if_asked(trainer: Trainer, progress: EpochProgress) -> None:
    if progress.stopping or preemption.stop_now():
        trainer._stop()


# At every epoch's end, in order: the order is part of the trajectory (BN statistics are
# averaged after SFP zeroes filters, SWA adds the averaged weights, and so on).
EPOCH_END_ACTIONS = (
    ("finite loss", _check_loss),
    ("soft pruning", _soft_prune),
    ("BN statistics averaged over the devices", _average_batch_stats),
    ("weight averaging (SWA)", _average_weights),
    ("evaluation", _evaluate),
    ("energy", _measure_energy),
    ("metrics written", _write_metrics),
    ("checkpoint", _checkpoint),
    ("stop if a signal asked", _stop_if_asked),
)


@functools.cache
def _p_swa_update():
    return jax.pmap(train_steps.swa_update, in_axes=(0, 0, None))


class WeightAverage:
    """SWA (SWALP): the running mean of the weights at each epoch end, on the devices."""

    def __init__(self, params=None, count: int = 0):
        self.params = None if params is None else parallel.replicate(params)
        self.count = count

    def add(self, params) -> None:
        if self.count == 0:  # a copy: the train step donates (frees) the state's
            self.params = jax.tree.map(jax.numpy.copy, params)
        else:
            self.params = _p_swa_update()(self.params, params, self.count)
        self.count += 1


def swa_result(trainer: Trainer) -> tuple[dict, dict]:
    """The weight average with BN statistics recomputed over one pass of the training
    data: (its eval metrics, its variables on the host)."""
    state = trainer.state.replace(params=trainer.swa.params)
    p_stats = parallel.pmap_step(train_steps.bn_statistics_step, donate_state=False)
    sums, count = None, 0
    for batch in _loader(trainer.ctx, "train", trainer.plan.end_epoch, 0):
        stats = p_stats(state, parallel.shard(batch))
        sums = stats if sums is None else jax.tree.map(jax.numpy.add, sums, stats)
        count += 1
    state = state.replace(batch_stats=jax.tree.map(lambda s: s / count, sums))
    metrics = trainer.evaluate(state)
    host = parallel.unreplicate(state)
    logger.info(
        "SWA over %d epochs: test %.2f%% (BN statistics recomputed)",
        trainer.swa.count,
        100 * metrics["accuracy"],
    )
    return metrics, {"params": host.params, "batch_stats": host.batch_stats}


def _replicate_state(state, device_batch_stats):
    """`state` on every local device; a preemption's per-device BN statistics each back
    on their own device when the run has the same devices (else their average, `state`'s)."""
    replicated = parallel.replicate(state)
    leaves = jax.tree.leaves(device_batch_stats)
    if not leaves or leaves[0].shape[0] != jax.device_count():
        return replicated
    return replicated.replace(batch_stats=parallel.own_copies(device_batch_stats))


def _stage_start_marks(trainer: Trainer) -> dict:
    """The run's energy and wall time as a stage starts (its epoch's energy comes later)."""
    return {
        "stage_j": energy_now(trainer),
        "stage_wall_s": trainer.ctx.clock.wall_time(),
        "epoch_j": None,
    }


def energy_now(trainer: Trainer) -> dict:
    """The run's energy reading so far over all processes, once the devices are done
    (every process calls it at the same points, whatever its meter can read)."""
    jax.block_until_ready(trainer.state)
    return trainer.ctx.energy.reading()


def _epoch_energy(trainer: Trainer, entry: dict, entry_t: float) -> dict:
    """Per figure ('accelerator', 'host'): the epoch's joules (from its first step; a
    resumed epoch's earlier part included) and the average watts of this process's part
    of it (since `entry` at `entry_t`); a figure not measured over the stretch is left out."""
    now, seconds = energy_now(trainer), time.perf_counter() - entry_t
    metrics = {}
    for channel in energy.CHANNELS:
        joules = energy.joules_between(trainer.marks["epoch_j"], now, channel)
        part = energy.joules_between(entry, now, channel)
        if joules is not None:
            metrics[f"energy/{channel}_joules"] = joules
        if part is not None:
            metrics[f"energy/{channel}_watts"] = part / max(seconds, 1e-9)
    return metrics


def _diverged(trainer: Trainer) -> TrainingDiverged:
    saved = trainer.ctx.checkpointer.steps() if trainer.ctx.checkpointer else []
    kept = f"the last good checkpoint (step {saved[-1]}) is kept" if saved else "no checkpoint"
    return TrainingDiverged(
        f"the training loss became {host_sums(trainer.sums)['loss_sum']} by step {trainer.step} "
        f"(epoch {trainer.epoch + 1}); {kept}; lower learning_rate or check the data"
    )


def _log_epoch(metrics: dict, end_epoch: int, eta: float) -> None:
    logger.info(
        "epoch %3d/%d  loss %.4f  train %.2f%%  test %.2f%%  %.0f img/s  ETA %s",
        metrics["epoch"],
        end_epoch,
        metrics["train_loss"],
        100 * metrics["train_accuracy"],
        100 * metrics["test_accuracy"],
        metrics["images_per_sec"],
        format_duration(eta),
    )


def _log_progress(trainer: Trainer, epoch: int, done: int, first: int, epoch_start: float):
    elapsed = time.perf_counter() - epoch_start
    rates, spe = _rates(trainer.sums), trainer.ctx.steps_per_epoch
    logger.info(
        "epoch %3d  step %d/%d  loss %.4f  train %.2f%%  %.0f img/s  epoch ETA %s",
        epoch + 1,
        done,
        spe,
        rates["loss"],
        100 * rates["accuracy"],
        (done - first) * trainer.ctx.config.batch_size / elapsed,
        format_duration(elapsed / (done - first) * (spe - done)),
    )


def _loader(ctx: RunContext, split: str, epoch: int = 0, first: int = 0):
    """This process's batches: the training batches of `epoch` from step `first`, or the
    whole eval split."""
    config = ctx.config
    where = (jax.process_index(), jax.process_count())
    workers = {"num_threads": config.num_data_threads, "num_workers": config.num_data_workers}
    source = dali if config.input_backend == names.DALI else data_lib
    if split == "train":
        return source.train_batches(
            ctx.data, config.batch_size, config.seed, epoch, first, *where, **workers
        )
    return source.eval_batches(ctx.data, config.eval_batch_size, *where, **workers)


def _batch_spec(size: int, shape, with_mask: bool) -> dict:
    """The abstract per-device batch of a global `size` (ahead-of-time compilation)."""
    n, per_device = jax.local_device_count(), size // jax.device_count()
    spec = {
        "image": jax.ShapeDtypeStruct((n, per_device, *shape), np.uint8),
        "label": jax.ShapeDtypeStruct((n, per_device), np.int32),
    }
    if with_mask:
        spec["mask"] = jax.ShapeDtypeStruct((n, per_device), np.bool_)
    return spec


def _accumulate(sums, device_metrics) -> dict:
    """Adds one step's (psum'd, so equal on every device) metrics to the running sums.

    The sums stay on the devices, one copy each (no host sync, no per-step indexing),
    until `_host` reads them.
    """
    if sums is None:
        return dict(device_metrics)
    return {k: sums[k] + device_metrics[k] for k in sums}


def _rates(sums: dict) -> dict:
    sums = host_sums(sums)
    count = max(sums["count"], 1)
    rates = {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}
    if "correct5" in sums:
        rates["top5_accuracy"] = sums["correct5"] / count
    return rates
