"""The training run as a readable sequence of stages.

method 'dense': train for num_epochs. method 'eb': the Early-Bird search, drawing masks
from the BN scales before every epoch until the ticket for `prune_ratio` emerges
(or, with keep_searching, to the end, recording the whole trajectory).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from eb_jax import data as data_lib
from eb_jax import parallel, report, train
from eb_jax.config import ConfigError, validate
from eb_jax.models import bn_scales, create_model
from eb_jax.ticket import EarlyBirdDetector
from eb_jax.ticket.search import TicketSearch

logger = report.logger


def run(config, workdir: str) -> dict:
    """Runs `config.method` on `config.dataset`; returns the last epoch's metrics."""
    validate(config, jax.local_device_count())
    data = data_lib.open_dataset(config.dataset, config.data_dir or None)
    try:
        model = create_model(config.model, data.num_classes, config.conv_impl)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    trainer = Trainer(config, data, model, workdir)
    try:
        if config.method == "dense":
            for epoch in range(config.num_epochs):
                trainer.train_epoch(epoch)
        else:
            search_ticket(config, trainer, workdir)
    finally:
        trainer.writer.close()
    return trainer.last_metrics


def search_ticket(config, trainer, workdir: str) -> TicketSearch:
    """Dense training with masks drawn before every epoch until the ticket emerges."""
    detector = EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    sizes = [s.shape[0] for s in trainer.bn_scales()]
    search = TicketSearch(config.monitor_ratios, config.prune_ratio, detector, sizes)
    for epoch in range(config.num_epochs + 1):
        result = search.observe(epoch, trainer.bn_scales())
        _log_search(trainer, search, epoch, result)
        if epoch == config.num_epochs or (search.ticket and not config.keep_searching):
            break
        trainer.train_epoch(epoch)
    if search.ticket is None:
        ticket = search.take_last_mask()
        logger.info(
            "no early-bird ticket for p=%g within %d epochs: taking the mask after epoch %d",
            config.prune_ratio, config.num_epochs, ticket.epoch,
        )  # fmt: skip
    history = search.consecutive_distances(config.prune_ratio)
    logger.info(
        "p=%g mask distance to the previous epoch: %s",
        config.prune_ratio, " ".join(f"{d:.3f}" for d in history),
    )  # fmt: skip
    if jax.process_index() == 0:
        search.save(workdir)
        report.plot_mask_distances(search, os.path.join(workdir, "mask_distance.png"))
    return search


def _log_search(trainer, search, epoch: int, result: dict) -> None:
    step = epoch * trainer.steps_per_epoch
    scalars = {}
    for ratio, (distances, emerged) in result.items():
        history = search.history[ratio]
        if len(history) > 1:
            scalars[f"eb/p{ratio:g}/distance_to_previous"] = search.consecutive_distances(ratio)[-1]
        if len(distances):
            scalars[f"eb/p{ratio:g}/max_window_distance"] = float(np.max(distances))
        if emerged and search.detected[ratio] == epoch:
            logger.info(
                "early-bird ticket for p=%g emerged after %d epochs (window distances %s)",
                ratio, epoch, " ".join(f"{d:.3f}" for d in distances),
            )  # fmt: skip
    if scalars:
        trainer.writer.write_scalars(step, scalars)


class Trainer:
    """Trains one network (replicated over the local devices) epoch by epoch."""

    def __init__(self, config, data, model, workdir: str, state=None):
        self.config, self.data, self.model = config, data, model
        self.steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
            )
        if state is None:
            tx = train.create_optimizer(config, self.steps_per_epoch)
            state = train.create_train_state(
                model, jax.random.key(config.seed), data.spec.image_shape, tx
            )
        self.state = parallel.replicate(state)
        self.p_train = parallel.pmap_step(train.train_step)
        self.p_eval = parallel.pmap_step(train.eval_step, donate_state=False)
        self.wait = parallel.must_wait_each_step()
        self.writer = report.MetricWriter(workdir, enabled=jax.process_index() == 0)
        self.start_time, self.epochs_done, self.last_metrics = time.perf_counter(), 0, {}
        logger.info(
            "%s on %s: %d train / %d test images, %d steps/epoch, %s, workdir %s",
            config.model, config.dataset, len(data.train), len(data.eval),
            self.steps_per_epoch, _devices(), workdir,
        )  # fmt: skip

    def bn_scales(self) -> list:
        """The BN scale vectors (first device's copy) in module order."""
        params = jax.tree.map(lambda x: x[0], self.state.params)
        return bn_scales(self.model, params)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set, then an evaluation; logs and returns metrics."""
        config = self.config
        epoch_start = time.perf_counter()
        batches = data_lib.train_batches(
            self.data, config.batch_size, config.seed, epoch, num_threads=config.num_data_threads
        )
        sums = None
        for step, batch in enumerate(batches):
            self.state, metrics = self.p_train(self.state, parallel.shard(batch))
            if self.wait:
                jax.block_until_ready(metrics)
            sums = _accumulate(sums, metrics)
            if config.log_every_steps and (step + 1) % config.log_every_steps == 0:
                self._log_progress(epoch, step + 1, epoch_start, sums)
        train_time = time.perf_counter() - epoch_start
        self.state = parallel.sync_batch_stats(self.state)
        test = self.evaluate()
        trained = _rates(parallel.to_float(sums))
        self.epochs_done += 1
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / self.epochs_done * (config.num_epochs - epoch - 1)
        global_step = (epoch + 1) * self.steps_per_epoch
        schedule = train.lr_schedule(
            config.learning_rate, config.lr_boundaries, config.lr_decay, self.steps_per_epoch
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": trained["loss"],
            "train_accuracy": trained["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "images_per_sec": self.steps_per_epoch * config.batch_size / train_time,
            "learning_rate": float(schedule(global_step - 1)),
        }
        self.writer.write_scalars(global_step, metrics)
        logger.info(
            "epoch %3d/%d  loss %.4f  train %.2f%%  test %.2f%%  %.0f img/s  ETA %s",
            epoch + 1, config.num_epochs, metrics["train_loss"],
            100 * metrics["train_accuracy"], 100 * metrics["test_accuracy"],
            metrics["images_per_sec"], report.format_duration(eta),
        )  # fmt: skip
        self.last_metrics = metrics
        return metrics

    def evaluate(self) -> dict:
        """Loss and accuracy over the whole eval split."""
        sums = None
        for batch in data_lib.eval_batches(self.data, self.config.eval_batch_size):
            metrics = self.p_eval(self.state, parallel.shard(batch))
            if self.wait:
                jax.block_until_ready(metrics)
            sums = _accumulate(sums, metrics)
        return _rates(parallel.to_float(sums))

    def _log_progress(self, epoch: int, step: int, epoch_start: float, sums) -> None:
        elapsed = time.perf_counter() - epoch_start
        rates = _rates(parallel.to_float(sums))
        logger.info(
            "epoch %3d  step %d/%d  loss %.4f  train %.2f%%  %.0f img/s  epoch ETA %s",
            epoch + 1, step, self.steps_per_epoch, rates["loss"], 100 * rates["accuracy"],
            step * self.config.batch_size / elapsed,
            report.format_duration(elapsed / step * (self.steps_per_epoch - step)),
        )  # fmt: skip


def _accumulate(sums, device_metrics):
    metrics = jax.tree.map(lambda m: m[0], device_metrics)  # psum'd: every copy is equal
    return metrics if sums is None else jax.tree.map(np.add, sums, metrics)


def _rates(sums: dict) -> dict:
    count = max(sums["count"], 1)
    return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}


def _devices() -> str:
    return f"{jax.local_device_count()} x {jax.local_devices()[0].device_kind}"


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "quickstart"
    return os.path.join("runs", name)
