"""Trains one stage's network epoch by epoch over the local devices, checkpointing as it goes.

A stage's settings are one frozen `StagePlan`; what the stages of a run share (config,
data, checkpointer, metric writer, clock, ticket search, the record of finished stages)
is one `RunContext`. `Trainer(run, plan, model, state)` builds nothing expensive;
`compile()` compiles the steps ahead of time and `train_epoch(e)` trains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import flax
import jax
import numpy as np

from eb_jax import data as data_lib
from eb_jax import energy, names, parallel, preemption, train
from eb_jax.config import config_record
from eb_jax.data import dali
from eb_jax.energy import EnergyClock
from eb_jax.lowp import Precision
from eb_jax.models import bn_scales, model_widths
from eb_jax.prune.sfp import soft_prune
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
    """What every stage of one run shares; `record` (finished stages, the pruning step's
    result) goes into every checkpoint's JSON."""

    config: object
    data: object
    workdir: str
    checkpointer: object
    writer: object
    clock: Clock
    search: object = None
    record: dict = dataclasses.field(default_factory=lambda: {"history": [], "pruned": None})
    energy: EnergyClock = dataclasses.field(default_factory=EnergyClock)

    @property
    def steps_per_epoch(self) -> int:
        return data_lib.input_pipeline.steps_per_epoch(self.data, self.config.batch_size)


@dataclasses.dataclass
class Resume:
    """Mid-stage state from a checkpoint: the epoch's metric sums so far, the SWA average,
    and the run's energy and wall time when the stage and the epoch began."""

    epoch_sums: dict | None = None
    swa_params: object = None
    swa_count: int = 0
    marks: dict | None = None  # {'stage_j', 'stage_wall_s', 'epoch_j'}
    device_batch_stats: object = None  # every device's own, from a preemption's checkpoint


class Trainer:
    """Holds the replicated TrainState; `train_epoch` resumes mid-epoch where it stopped.

    Checkpoints go out every `config.checkpoint_every_steps` steps and at each epoch end,
    with the BN statistics averaged over the devices first (at the same steps in every
    run, so an interrupted run stays bit-identical to an uninterrupted one).
    """

    def __init__(
        self,
        run: RunContext,
        plan: StagePlan,
        model,
        state,
        weight_mask=None,
        resume: Resume | None = None,
    ):
        """`resume`: given when `state` comes from a checkpoint of this stage."""
        resumed, resume = resume is not None, resume or Resume()
        self.run, self.plan, self.model = run, plan, model
        self.state = _replicate_state(state, resume.device_batch_stats)
        self.step = int(state.step)  # global step = the optimizer's update count; host copy
        # The weight mask (replicated) is the train step's third argument, when there is one.
        self.mask_args = () if weight_mask is None else (parallel.replicate(weight_mask),)
        self.sums = resume.epoch_sums  # this epoch's train metrics so far
        self.swa = WeightAverage(resume.swa_params, resume.swa_count)
        self.last_saved = self.step if resumed else None  # its checkpoint exists
        self.start_step, self.last_metrics, self.compiling_s = self.step, {}, 0.0
        self.started = time.perf_counter()
        self.lr = train.stage_lr(run.config, run.steps_per_epoch, plan.lr_origin, plan.name)
        self.marks = resume.marks or _stage_start_marks(self)
        step_fn = functools.partial(
            train.train_step,
            precision=model.precision,
            seed=run.config.seed,
            label_smoothing=run.config.label_smoothing,
        )
        self.p_train = parallel.pmap_step(step_fn)
        self.p_eval = parallel.pmap_step(train.eval_step, donate_state=False)
        self.wait = parallel.must_wait_each_step()

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.step // self.run.steps_per_epoch

    def compile(self) -> None:
        """Compiles the train and eval steps ahead of time (not counted in the ETA); a
        multi-process run compiles at its first step (a multi-process pmap's ahead-of-time
        executable expects global shapes): its wall time counts that, its compile time not."""
        if jax.process_count() > 1:
            return
        start, config, shape = time.perf_counter(), self.run.config, self.run.data.spec.image_shape
        train_batch = _batch_spec(config.batch_size, shape, False)
        eval_batch = _batch_spec(config.eval_batch_size, shape, True)
        self.p_train = self.p_train.lower(self.state, train_batch, *self.mask_args).compile()
        self.p_eval = self.p_eval.lower(self.state, eval_batch).compile()
        self.compiling_s = time.perf_counter() - start
        self.run.clock.compile_s += self.compiling_s

    def bn_scales(self) -> list:
        """The BN scale vectors (first device's copy) in module order."""
        return bn_scales(self.model, jax.tree.map(lambda x: x[0], self.state.params))

    def train_epoch(self, epoch: int) -> dict:
        """Trains the rest of `epoch` (all of it unless resumed mid-epoch), then evaluates."""
        spe = self.run.steps_per_epoch
        first = self.step - epoch * spe
        if not 0 <= first < spe:
            raise ValueError(f"at step {self.step}, epoch {epoch} is not the current one")
        entry_j = energy_now(self)  # then the clock: both measure the same stretch
        epoch_start = time.perf_counter()
        if first == 0:
            self.sums, self.marks["epoch_j"] = None, entry_j
        stopping = False
        for batch in _loader(self.run, "train", epoch, first):
            self._step(batch)
            stopping = preemption.stop_at(self.step)  # every process asks at every step
            done = self.step - epoch * spe
            if self.run.config.log_every_steps and done % self.run.config.log_every_steps == 0:
                _log_progress(self, epoch, done, first, epoch_start)
            every = self.run.config.checkpoint_every_steps
            if every and self.step % every == 0 and done < spe:
                self.save()
            if stopping and done < spe:  # at the epoch's last step: after its end
                self._stop()
        train_time = time.perf_counter() - epoch_start
        self._check_finite()
        if self.plan.soft_prune_ratio:
            self._soft_prune()
        self.state = parallel.sync_batch_stats(self.state)
        if self.plan.swa_start and epoch - self.plan.lr_origin // spe >= self.plan.swa_start:
            self.swa.add(self.state.params)
        metrics = self._epoch_metrics(epoch, first, train_time)
        metrics.update(_epoch_energy(self, entry_j, epoch_start))
        self.run.writer.write_scalars(self.step, metrics)
        self.last_metrics = metrics
        self.save()
        if stopping or preemption.stop_now():
            self._stop()
        return metrics

    def _step(self, batch) -> None:
        self.state, metrics = self.p_train(self.state, parallel.shard(batch), *self.mask_args)
        if self.wait:
            jax.block_until_ready(metrics)
        self.sums = _accumulate(self.sums, metrics)
        self.step += 1
        if self.wait:
            self._check_finite()

    def _epoch_metrics(self, epoch: int, first: int, train_time: float) -> dict:
        """Evaluates; writes and logs the epoch's metrics with the stage's ETA."""
        spe, config = self.run.steps_per_epoch, self.run.config
        test, trained = self.evaluate(), _rates(self.sums)
        elapsed = time.perf_counter() - self.started - self.compiling_s
        steps_left = self.plan.end_epoch * spe - self.step
        eta = elapsed / max(self.step - self.start_step, 1) * steps_left
        metrics = {
            "epoch": epoch + 1,
            "train_loss": trained["loss"],
            "train_accuracy": trained["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            **({"test_top5_accuracy": test["top5_accuracy"]} if "top5_accuracy" in test else {}),
            "images_per_sec": (spe - first) * config.batch_size / train_time,
            "learning_rate": float(self.lr(self.step - 1)),  # the optimizer's last
        }
        _log_epoch(metrics, self.plan.end_epoch, eta)
        return metrics

    def evaluate(self, state=None) -> dict:
        """Loss and accuracy over the whole eval split (of `state`, default the trained)."""
        state = self.state if state is None else state
        sums = None
        for batch in _loader(self.run, "eval"):
            metrics = self.p_eval(state, parallel.shard(batch))
            if self.wait:
                jax.block_until_ready(metrics)
            sums = _accumulate(sums, metrics)
        return _rates(sums)

    def _soft_prune(self) -> None:
        params = parallel.unreplicate(self.state.params)
        pruned = soft_prune(self.model, params, self.plan.soft_prune_ratio)
        self.state = self.state.replace(params=parallel.replicate(pruned))

    def save(self, as_is: bool = False) -> None:
        """Checkpoints the state and everything a resumed run needs (once per step).

        `as_is`: a step off the run's checkpoint steps (a preemption's): the devices keep
        their own BN statistics, saved alongside the average, so the resumed run goes on
        exactly as this one would have.
        """
        if self.run.checkpointer is None or self.last_saved == self.step:
            return
        self._check_finite()
        synced = parallel.sync_batch_stats(self.state)
        arrays, meta = _checkpoint(self, synced)
        if as_is and jax.tree.leaves(self.state.batch_stats):
            arrays["device_batch_stats"] = parallel.device_copies(self.state.batch_stats)
            meta["device_batch_stats"] = jax.device_count()
        else:
            self.state = synced
        self.run.checkpointer.save(self.step, arrays, meta)
        self.last_saved = self.step

    def _stop(self) -> None:
        """Checkpoints this step and stops the run: it was asked to (preemption)."""
        self.save(as_is=True)
        raise preemption.Preempted(self.step, preemption.signal_number())

    def _check_finite(self) -> None:
        if self.sums is not None and not math.isfinite(_host(self.sums)["loss_sum"]):
            raise _diverged(self)


@functools.cache
def _p_swa_update():
    return jax.pmap(train.swa_update, in_axes=(0, 0, None))


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
    p_stats = parallel.pmap_step(train.bn_statistics_step, donate_state=False)
    sums, count = None, 0
    for batch in _loader(trainer.run, "train", trainer.plan.end_epoch, 0):
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


def _checkpoint(trainer: Trainer, state) -> tuple[dict, dict]:
    """(arrays, JSON record) of a checkpoint: the (replicated) `state`, the search, the SWA
    average and the weight mask; the model's widths, the stage, the position and the run's
    record."""
    run = trainer.run
    arrays = {"train": flax.serialization.to_state_dict(parallel.unreplicate(state))}
    meta = {
        "model": run.config.model,
        "num_classes": run.data.num_classes,
        "input_shape": list(run.data.spec.image_shape),
        "widths": model_widths(trainer.model),
        "stage": trainer.plan.name,
        "stage_start_step": trainer.plan.start_step,
        "step": trainer.step,
        "epoch": trainer.epoch,
        "epoch_sums": _host(trainer.sums) if trainer.sums else None,
        "config": config_record(run.config),
        "wall_time_s": run.clock.wall_time(),
        "compile_time_s": run.clock.compile_s,
        "energy": {"reading": energy_now(trainer), "wasted": dict(run.energy.wasted)},
        "energy_marks": trainer.marks,
        **run.record,
    }
    run.energy.checkpointed(trainer.step, meta["energy"]["reading"], meta["wall_time_s"])
    if run.search is not None:
        arrays["search"], meta["search"] = run.search.state_dict()
    if trainer.swa.count:
        arrays["swa"], meta["swa_count"] = (
            parallel.unreplicate(trainer.swa.params),
            trainer.swa.count,
        )
    if trainer.mask_args:
        arrays["weight_mask"] = parallel.unreplicate(trainer.mask_args[0])
    return arrays, meta


def _stage_start_marks(trainer: Trainer) -> dict:
    """The run's energy and wall time as a stage starts (its epoch's energy comes later)."""
    return {
        "stage_j": energy_now(trainer),
        "stage_wall_s": trainer.run.clock.wall_time(),
        "epoch_j": None,
    }


def energy_now(trainer: Trainer) -> dict:
    """The run's energy reading so far over all processes, once the devices are done
    (every process calls it at the same points, whatever its meter can read)."""
    jax.block_until_ready(trainer.state)
    return trainer.run.energy.reading()


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
    saved = trainer.run.checkpointer.steps() if trainer.run.checkpointer else []
    kept = f"the last good checkpoint (step {saved[-1]}) is kept" if saved else "no checkpoint"
    return TrainingDiverged(
        f"the training loss became {_host(trainer.sums)['loss_sum']} by step {trainer.step} "
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
    rates, spe = _rates(trainer.sums), trainer.run.steps_per_epoch
    logger.info(
        "epoch %3d  step %d/%d  loss %.4f  train %.2f%%  %.0f img/s  epoch ETA %s",
        epoch + 1,
        done,
        spe,
        rates["loss"],
        100 * rates["accuracy"],
        (done - first) * trainer.run.config.batch_size / elapsed,
        format_duration(elapsed / (done - first) * (spe - done)),
    )


def _loader(run: RunContext, split: str, epoch: int = 0, first: int = 0):
    """This process's batches: the training batches of `epoch` from step `first`, or the
    whole eval split."""
    config = run.config
    where = (jax.process_index(), jax.process_count())
    workers = {"num_threads": config.num_data_threads, "num_workers": config.num_data_workers}
    source = dali if config.input_backend == names.DALI else data_lib
    if split == "train":
        return source.train_batches(
            run.data, config.batch_size, config.seed, epoch, first, *where, **workers
        )
    return source.eval_batches(run.data, config.eval_batch_size, *where, **workers)


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


def _host(sums: dict) -> dict:
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in sums.items()}


def _rates(sums: dict) -> dict:
    sums = _host(sums)
    count = max(sums["count"], 1)
    rates = {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}
    if "correct5" in sums:
        rates["top5_accuracy"] = sums["correct5"] / count
    return rates
