"""Trains one network epoch by epoch over the local devices, checkpointing as it goes."""

from __future__ import annotations

import functools
import math
import time

import flax
import jax
import numpy as np

from eb_jax import data as data_lib
from eb_jax import parallel, report, train
from eb_jax.checkpoint import config_record
from eb_jax.models import bn_scales, model_widths

logger = report.logger


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Trainer:
    """Holds the replicated TrainState; `train_epoch` resumes mid-epoch where it stopped.

    Checkpoints go out every `config.checkpoint_every_steps` steps and at each epoch end,
    with the BN statistics averaged over the devices first (at the same steps in every
    run, so an interrupted run stays bit-identical to an uninterrupted one).
    """

    def __init__(self, config, data, model, workdir, state, checkpointer=None, search=None,
                 meta=None, stage: str = "dense", extra_meta: dict | None = None,
                 end_epoch: int | None = None, lr_origin: int = 0,
                 wall_time_s: float = 0.0, compile_time_s: float = 0.0,
                 swa_params=None):  # fmt: skip
        """`end_epoch`: where this stage ends (default num_epochs); `lr_origin`: the step
        at which the LR schedule starts; `wall_time_s`, `compile_time_s`: the run's wall
        time and compilation time so far; `swa_params`: the weight average so far."""
        self.config, self.data, self.model = config, data, model
        self.stage, self.extra_meta = stage, extra_meta or {}
        self.end_epoch = config.num_epochs if end_epoch is None else end_epoch
        self.lr_origin = lr_origin
        self.checkpointer, self.search = checkpointer, search
        self.steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
        self.state = parallel.replicate(state)
        self.step = int(state.step)  # global step = the optimizer's update count
        self.p_train = parallel.pmap_step(
            functools.partial(train.train_step, precision=model.precision, seed=config.seed)
        )
        self.p_eval = parallel.pmap_step(train.eval_step, donate_state=False)
        self.wait = parallel.must_wait_each_step()
        self.writer = report.MetricWriter(workdir, enabled=jax.process_index() == 0)
        self.sums = (meta or {}).get("epoch_sums")  # this epoch's train metrics so far
        self.last_saved = self.step if meta else None
        self.start_time, self.start_step, self.last_metrics = time.perf_counter(), self.step, {}
        self.wall_time_before = (meta or {}).get("wall_time_s", wall_time_s)
        self.compile_time_s = (meta or {}).get("compile_time_s", compile_time_s)
        self.compiling_s = self._compile()  # this Trainer's (not in its ETA)
        self.compile_time_s += self.compiling_s
        # SWA in the stage that trains to the end (a searched network is cut afterwards).
        self.swa_start = config.swa_start_epoch if stage in ("dense", "retrain") else 0
        self.swa_count = (meta or {}).get("swa_count", 0)
        self.swa_params = None if swa_params is None else parallel.replicate(swa_params)
        logger.info(
            "%s on %s: %d train / %d test images, %d steps/epoch, %s, workdir %s",
            config.model, config.dataset, len(data.train), len(data.eval),
            self.steps_per_epoch, _devices(), workdir,
        )  # fmt: skip

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.step // self.steps_per_epoch

    def _compile(self) -> float:
        """Compiles the train and eval steps ahead of time; returns the seconds it took.

        Multi-process runs compile at the first step instead (a multi-process pmap's
        ahead-of-time executable expects the global shapes), which the wall time counts
        and the compile time does not."""
        if jax.process_count() > 1:
            return 0.0
        start = time.perf_counter()
        n, shape = jax.local_device_count(), self.data.spec.image_shape

        def batch(size: int, with_mask: bool) -> dict:
            per_device = size // jax.device_count()
            spec = {"image": jax.ShapeDtypeStruct((n, per_device, *shape), np.float32),
                    "label": jax.ShapeDtypeStruct((n, per_device), np.int32)}  # fmt: skip
            if with_mask:
                spec["mask"] = jax.ShapeDtypeStruct((n, per_device), np.bool_)
            return spec

        self.p_train = self.p_train.lower(self.state, batch(self.config.batch_size, False))
        self.p_train = self.p_train.compile()
        self.p_eval = self.p_eval.lower(self.state, batch(self.config.eval_batch_size, True))
        self.p_eval = self.p_eval.compile()
        return time.perf_counter() - start

    def wall_time(self) -> float:
        """Seconds this run has spent training, over every stage and restart."""
        return self.wall_time_before + time.perf_counter() - self.start_time

    def bn_scales(self) -> list:
        """The BN scale vectors (first device's copy) in module order."""
        return bn_scales(self.model, jax.tree.map(lambda x: x[0], self.state.params))

    def train_epoch(self, epoch: int) -> dict:
        """Trains the rest of `epoch` (all of it unless resumed mid-epoch), then evaluates."""
        config = self.config
        first = self.step - epoch * self.steps_per_epoch
        if not 0 <= first < self.steps_per_epoch:
            raise ValueError(f"at step {self.step}, epoch {epoch} is not the current one")
        epoch_start = time.perf_counter()
        batches = data_lib.train_batches(
            self.data, config.batch_size, config.seed, epoch, first, *_process(),
            num_threads=config.num_data_threads, num_workers=config.num_data_workers,
        )  # fmt: skip
        if first == 0:
            self.sums = None
        for batch in batches:
            self.state, metrics = self.p_train(self.state, parallel.shard(batch))
            if self.wait:
                jax.block_until_ready(metrics)
            self.sums = _accumulate(self.sums, metrics)
            self.step += 1
            if self.wait:
                self._check_finite()
            done = self.step - epoch * self.steps_per_epoch
            if config.log_every_steps and done % config.log_every_steps == 0:
                self._log_progress(epoch, done, first, epoch_start)
            every = config.checkpoint_every_steps
            if every and self.step % every == 0 and done < self.steps_per_epoch:
                self.save()
        train_time = time.perf_counter() - epoch_start
        self._check_finite()
        self.state = parallel.sync_batch_stats(self.state)
        if self.swa_start and epoch - self.lr_origin // self.steps_per_epoch >= self.swa_start:
            self._average_weights()
        test = self.evaluate()
        trained = _rates(self.sums)
        elapsed = time.perf_counter() - self.start_time - self.compiling_s
        steps_left = self.end_epoch * self.steps_per_epoch - self.step
        eta = elapsed / max(self.step - self.start_step, 1) * steps_left
        lr = train.lr_schedule(
            config.learning_rate, config.lr_boundaries, config.lr_decay, self.steps_per_epoch
        )(self.step - 1 - self.lr_origin)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": trained["loss"],
            "train_accuracy": trained["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "images_per_sec": (self.steps_per_epoch - first) * config.batch_size / train_time,
            "learning_rate": float(lr),
        }
        self.writer.write_scalars(self.step, metrics)
        logger.info(
            "epoch %3d/%d  loss %.4f  train %.2f%%  test %.2f%%  %.0f img/s  ETA %s",
            epoch + 1, self.end_epoch, metrics["train_loss"],
            100 * metrics["train_accuracy"], 100 * metrics["test_accuracy"],
            metrics["images_per_sec"], report.format_duration(eta),
        )  # fmt: skip
        self.last_metrics = metrics
        self.save()
        return metrics

    def evaluate(self, state=None) -> dict:
        """Loss and accuracy over the whole eval split (of `state`, default the trained)."""
        state = self.state if state is None else state
        sums = None
        config = self.config
        batches = data_lib.eval_batches(self.data, config.eval_batch_size, *_process(),
                                        num_threads=config.num_data_threads,
                                        num_workers=config.num_data_workers)  # fmt: skip
        for batch in batches:
            metrics = self.p_eval(state, parallel.shard(batch))
            if self.wait:
                jax.block_until_ready(metrics)
            sums = _accumulate(sums, metrics)
        return _rates(sums)

    def _average_weights(self) -> None:
        if self.swa_count == 0:  # a copy: the train step donates (frees) the state's
            self.swa_params = jax.tree.map(jax.numpy.copy, self.state.params)
        else:
            self.swa_params = _p_swa_update(self.swa_params, self.state.params, self.swa_count)
        self.swa_count += 1

    def swa_result(self) -> tuple[dict, dict]:
        """The weight average with BN statistics recomputed over one pass of the training
        data: (its eval metrics, its variables on the host)."""
        state = self.state.replace(params=self.swa_params)
        p_stats = parallel.pmap_step(train.bn_statistics_step, donate_state=False)
        config = self.config
        batches = data_lib.train_batches(
            self.data, config.batch_size, config.seed, self.end_epoch, 0, *_process(),
            num_threads=config.num_data_threads, num_workers=config.num_data_workers,
        )  # fmt: skip
        sums, count = None, 0
        for batch in batches:
            stats = p_stats(state, parallel.shard(batch))
            sums = stats if sums is None else jax.tree.map(jax.numpy.add, sums, stats)
            count += 1
        state = state.replace(batch_stats=jax.tree.map(lambda s: s / count, sums))
        metrics = self.evaluate(state)
        host = parallel.unreplicate(state)
        logger.info("SWA over %d epochs: test %.2f%% (BN statistics recomputed)",
                    self.swa_count, 100 * metrics["accuracy"])  # fmt: skip
        return metrics, {"params": host.params, "batch_stats": host.batch_stats}

    def save(self) -> None:
        """Checkpoints the state, the search, the stage and the position (once per step)."""
        if self.checkpointer is None or self.last_saved == self.step:
            return
        self._check_finite()
        self.state = parallel.sync_batch_stats(self.state)
        state = parallel.unreplicate(self.state)
        arrays = {"train": flax.serialization.to_state_dict(state)}
        meta = {
            "model": self.config.model,
            "num_classes": self.data.num_classes,
            "input_shape": list(self.data.spec.image_shape),
            "widths": model_widths(self.model),
            "stage": self.stage,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_sums": _host(self.sums) if self.sums else None,
            "config": config_record(self.config),
            "wall_time_s": self.wall_time(),
            "compile_time_s": self.compile_time_s,
            **self.extra_meta,
        }
        if self.search is not None:
            arrays["search"], meta["search"] = self.search.state_dict()
        if self.swa_count:
            arrays["swa"], meta["swa_count"] = parallel.unreplicate(self.swa_params), self.swa_count
        self.checkpointer.save(self.step, arrays, meta)
        self.last_saved = self.step

    def _check_finite(self) -> None:
        if self.sums is not None and not math.isfinite(_host(self.sums)["loss_sum"]):
            saved = self.checkpointer.steps() if self.checkpointer else []
            kept = (
                f"the last good checkpoint (step {saved[-1]}) is kept" if saved else "no checkpoint"
            )
            raise TrainingDiverged(
                f"the training loss became {_host(self.sums)['loss_sum']} by step {self.step} "
                f"(epoch {self.epoch + 1}); {kept}; lower learning_rate or check the data"
            )

    def _log_progress(self, epoch: int, done: int, first: int, epoch_start: float) -> None:
        elapsed = time.perf_counter() - epoch_start
        rates = _rates(self.sums)
        logger.info(
            "epoch %3d  step %d/%d  loss %.4f  train %.2f%%  %.0f img/s  epoch ETA %s",
            epoch + 1, done, self.steps_per_epoch, rates["loss"], 100 * rates["accuracy"],
            (done - first) * self.config.batch_size / elapsed,
            report.format_duration(elapsed / (done - first) * (self.steps_per_epoch - done)),
        )  # fmt: skip


_p_swa_update = jax.pmap(train.swa_update, in_axes=(0, 0, None))


def _process() -> tuple[int, int]:
    """(this process's index, the number of processes): which share of the data it reads."""
    return jax.process_index(), jax.process_count()


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
    return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}


def _devices() -> str:
    where = f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{jax.local_device_count()} x {jax.local_devices()[0].device_kind}{where}"
