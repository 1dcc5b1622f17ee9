"""The training run as a readable sequence of stages, checkpointed so a killed run resumes.

method 'dense': train for num_epochs. method 'eb': the Early-Bird search, drawing masks
from the BN scales before every epoch until the ticket for `prune_ratio` emerges
(or, with keep_searching, to the end, recording the whole trajectory).
"""

from __future__ import annotations

import os

import flax
import jax

from eb_jax import data as data_lib
from eb_jax import report, train
from eb_jax.checkpoint import Checkpointer, check_config_matches
from eb_jax.config import ConfigError, validate
from eb_jax.models import bn_scales, create_model, widths_from_json
from eb_jax.ticket import EarlyBirdDetector
from eb_jax.ticket.search import TicketSearch
from eb_jax.trainer import Trainer

logger = report.logger


def run(config, workdir: str) -> dict:
    """Runs `config.method` on `config.dataset`, resuming from `workdir` if it holds a run.

    Returns the last epoch's metrics.
    """
    validate(config, jax.local_device_count())
    data = data_lib.open_dataset(config.dataset, config.data_dir or None)
    _new_model(config, data.num_classes)  # an unknown model fails before the workdir is touched
    checkpointer = Checkpointer(workdir, config.checkpoints_to_keep, config.async_checkpoints)
    try:
        model, state, search, meta = _start_or_resume(config, data, checkpointer, workdir)
        trainer = Trainer(config, data, model, workdir, state, checkpointer, search, meta)
        try:
            if config.method == "dense":
                for epoch in range(trainer.epoch, config.num_epochs):
                    trainer.train_epoch(epoch)
            else:
                search_ticket(config, trainer, search, workdir)
        finally:
            trainer.writer.close()
    finally:
        checkpointer.close()
    return trainer.last_metrics


def _new_model(config, num_classes: int, widths: dict | None = None):
    try:
        return create_model(config.model, num_classes, config.conv_impl, **(widths or {}))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _new_search(config, model, params) -> TicketSearch | None:
    if config.method != "eb":
        return None
    detector = EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    sizes = [s.shape[0] for s in bn_scales(model, params)]
    return TicketSearch(config.monitor_ratios, config.prune_ratio, detector, sizes)


def _start_or_resume(config, data, checkpointer, workdir):
    """(model, TrainState, TicketSearch or None, meta or None) fresh or from the newest
    readable checkpoint; the model is rebuilt from the checkpoint's widths first."""
    steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
        )
    tx = train.create_optimizer(config, steps_per_epoch)

    def fresh(widths=None):
        model = _new_model(config, data.num_classes, widths)
        state = train.create_train_state(
            model, jax.random.key(config.seed), data.spec.image_shape, tx
        )
        return model, state, _new_search(config, model, state.params)

    built = {}

    def target_for(meta):
        check_config_matches(config, meta, workdir)
        built["parts"] = fresh(widths_from_json(meta["widths"]))
        _, state, search = built["parts"]
        target = {"train": flax.serialization.to_state_dict(state)}
        if search is not None and meta.get("search"):
            target["search"] = search.arrays_like(len(meta["search"]["epochs"]))
        return target

    restored = checkpointer.restore(target_for)
    if restored is None:
        return (*fresh(), None)
    step, arrays, meta = restored
    model, state, search = built["parts"]
    state = flax.serialization.from_state_dict(state, arrays["train"])
    if search is not None and meta.get("search"):
        search.load_state_dict(arrays["search"], meta["search"])
    logger.info(
        "resuming the run in %s from its checkpoint at step %d (epoch %d, stage %s)",
        workdir, step, meta["epoch"], meta["stage"],
    )  # fmt: skip
    return model, state, search, meta


def search_ticket(config, trainer: Trainer, search: TicketSearch, workdir: str):
    """Dense training with masks drawn before every epoch until the ticket emerges."""
    epoch = trainer.epoch
    while True:
        if epoch not in search.epochs:
            result = search.observe(epoch, trainer.bn_scales())
            _log_search(trainer, search, epoch, result)
        done = search.ticket is not None and not config.keep_searching
        if epoch == config.num_epochs or done:
            break
        trainer.train_epoch(epoch)
        epoch += 1
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


def _log_search(trainer: Trainer, search: TicketSearch, epoch: int, result: dict) -> None:
    scalars = {}
    for ratio, (distances, emerged) in result.items():
        if len(search.history[ratio]) > 1:
            scalars[f"eb/p{ratio:g}/distance_to_previous"] = search.consecutive_distances(ratio)[-1]
        if len(distances):
            scalars[f"eb/p{ratio:g}/max_window_distance"] = float(max(distances))
        if emerged and search.detected[ratio] == epoch:
            logger.info(
                "early-bird ticket for p=%g emerged after %d epochs (window distances %s)",
                ratio, epoch, " ".join(f"{d:.3f}" for d in distances),
            )  # fmt: skip
    if scalars:
        trainer.writer.write_scalars(epoch * trainer.steps_per_epoch, scalars)


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "quickstart"
    return os.path.join("runs", name)
