"""The training run as a readable sequence of stages.

Today: dense training (with the network-slimming sparsity term) and evaluation.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from eb_jax import data as data_lib
from eb_jax import parallel, report, train
from eb_jax.config import ConfigError, validate
from eb_jax.models import create_model

logger = report.logger


def run(config, workdir: str) -> dict:
    """Trains `config.model` on `config.dataset`; returns the final metrics."""
    validate(config, jax.local_device_count())
    data = data_lib.open_dataset(config.dataset, config.data_dir or None)
    try:
        model = create_model(config.model, data.num_classes, config.conv_impl)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
        )
    tx = train.create_optimizer(config, steps_per_epoch)
    state = train.create_train_state(model, jax.random.key(config.seed), data.spec.image_shape, tx)
    logger.info(
        "%s on %s: %d train / %d test images, %d steps/epoch, %s, workdir %s",
        config.model, config.dataset, len(data.train), len(data.eval), steps_per_epoch,
        f"{jax.local_device_count()} x {jax.local_devices()[0].device_kind}", workdir,
    )  # fmt: skip
    writer = report.MetricWriter(workdir, enabled=jax.process_index() == 0)
    try:
        state, summary = train_epochs(config, data, state, 0, config.num_epochs, writer)
    finally:
        writer.close()
    return summary


def train_epochs(config, data, state, first_epoch: int, end_epoch: int, writer):
    """Trains epochs [first_epoch, end_epoch) with an eval after each; returns final metrics."""
    p_train = parallel.pmap_step(train.train_step)
    p_eval = parallel.pmap_step(train.eval_step, donate_state=False)
    wait = parallel.must_wait_each_step()
    steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
    state = parallel.replicate(state)
    run_start, summary = time.perf_counter(), {}
    for epoch in range(first_epoch, end_epoch):
        epoch_start = time.perf_counter()
        batches = data_lib.train_batches(
            data, config.batch_size, config.seed, epoch, num_threads=config.num_data_threads
        )
        sums = None
        for step, batch in enumerate(batches):
            state, metrics = p_train(state, parallel.shard(batch))
            if wait:
                jax.block_until_ready(metrics)
            metrics = jax.tree.map(lambda m: m[0], metrics)
            sums = metrics if sums is None else jax.tree.map(np.add, sums, metrics)
            if config.log_every_steps and (step + 1) % config.log_every_steps == 0:
                _log_progress(epoch, step + 1, steps_per_epoch, config, epoch_start, sums)
        train_time = time.perf_counter() - epoch_start
        state = parallel.sync_batch_stats(state)
        test = evaluate(p_eval, state, data, config.eval_batch_size)
        train_metrics = _rates(parallel.to_float(sums))
        elapsed = time.perf_counter() - run_start
        eta = elapsed / (epoch + 1 - first_epoch) * (end_epoch - epoch - 1)
        global_step = (epoch + 1) * steps_per_epoch
        summary = {
            "epoch": epoch + 1,
            "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "images_per_sec": steps_per_epoch * config.batch_size / train_time,
            "learning_rate": float(train.lr_schedule(
                config.learning_rate, config.lr_boundaries, config.lr_decay, steps_per_epoch
            )(global_step - 1)),
        }  # fmt: skip
        writer.write_scalars(global_step, summary)
        logger.info(
            "epoch %3d/%d  loss %.4f  train %.2f%%  test %.2f%%  %.0f img/s  ETA %s",
            epoch + 1, end_epoch, summary["train_loss"], 100 * summary["train_accuracy"],
            100 * summary["test_accuracy"], summary["images_per_sec"],
            report.format_duration(eta),
        )  # fmt: skip
    return parallel.unreplicate(state), summary


def evaluate(p_eval, state, data, batch_size: int) -> dict:
    """Loss and accuracy over the whole eval split (replicated `state`)."""
    wait = parallel.must_wait_each_step()
    sums = None
    for batch in data_lib.eval_batches(data, batch_size):
        metrics = p_eval(state, parallel.shard(batch))
        if wait:
            jax.block_until_ready(metrics)
        metrics = jax.tree.map(lambda m: m[0], metrics)
        sums = metrics if sums is None else jax.tree.map(np.add, sums, metrics)
    return _rates(parallel.to_float(sums))


def _rates(sums: dict) -> dict:
    count = max(sums["count"], 1)
    return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}


def _log_progress(epoch, step, steps_per_epoch, config, epoch_start, sums):
    elapsed = time.perf_counter() - epoch_start
    rates = _rates(parallel.to_float(sums))
    logger.info(
        "epoch %3d  step %d/%d  loss %.4f  train %.2f%%  %.0f img/s  epoch ETA %s",
        epoch + 1, step, steps_per_epoch, rates["loss"], 100 * rates["accuracy"],
        step * config.batch_size / elapsed,
        report.format_duration(elapsed / step * (steps_per_epoch - step)),
    )  # fmt: skip


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "quickstart"
    return os.path.join("runs", name)
