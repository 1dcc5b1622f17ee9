"""The training run as a readable sequence of stages, checkpointed so a killed run resumes.

method 'dense': train for num_epochs. method 'eb' (EB Train): the Early-Bird search,
drawing masks from the BN scales before every epoch until the ticket for `prune_ratio`
emerges (or, with keep_searching, to the end, recording the whole trajectory); then the
ticket is cut out (surgery) and retrained to the end of the schedule with a fresh
optimizer, its weights inherited, re-initialised or rewound to initialisation.
"""

from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from eb_jax import data as data_lib
from eb_jax import report, train
from eb_jax.checkpoint import Checkpointer, check_config_matches, load_model
from eb_jax.config import ConfigError, validate
from eb_jax.models import bn_scales, create_model, widths_from_json
from eb_jax.ticket import EarlyBirdDetector, mask_distance
from eb_jax.ticket.export import save_ticket
from eb_jax.ticket.search import TicketSearch
from eb_jax.ticket.surgery import apply_cut, plan_cut
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
    trainer = None
    try:
        model, state, search, meta = _start_or_resume(config, data, checkpointer, workdir)
        stage = meta["stage"] if meta else ("search" if search else "dense")
        extra = {"retrain_from_step": meta["retrain_from_step"]} if stage == "retrain" else {}
        trainer = Trainer(config, data, model, workdir, state, checkpointer, search, meta,
                          stage=stage, extra_meta=extra)  # fmt: skip
        if stage == "search":
            init_dir = os.path.join(workdir, "init")
            # Kept for 'rewind'; a run killed before its first checkpoint has it already
            # (the same seed gives the same initialisation).
            if config.retrain == "rewind" and not os.path.isdir(init_dir):
                save_ticket(init_dir, config.model, model,
                            {"params": state.params, "batch_stats": state.batch_stats},
                            data.num_classes, data.spec.image_shape)  # fmt: skip
            search_ticket(config, trainer, search, workdir)
            trainer.writer.close()
            trainer = _cut_for_retraining(config, data, trainer, search, checkpointer, workdir)
        for epoch in range(trainer.epoch, config.num_epochs):
            trainer.train_epoch(epoch)
    finally:
        if trainer is not None:
            trainer.writer.close()
        checkpointer.close()
    return trainer.last_metrics


def _cut_for_retraining(config, data, trainer, search, checkpointer, workdir) -> Trainer:
    """Cuts the ticket out of the searched network; a Trainer for the rest of the schedule."""
    ticket = search.ticket
    dense = jax.tree.map(lambda x: np.asarray(x[0]), trainer.state)
    dense_variables = {"params": dense.params, "batch_stats": dense.batch_stats}
    try:
        plan = plan_cut(trainer.model, dense.params, ticket.masks, min_channels=config.min_channels,
                        round_to=config.round_to, prune_residual=config.prune_residual)  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.retrain == "rewind":
        narrow, variables = apply_cut(trainer.model, _load_init(workdir), plan)
    else:
        narrow, variables = apply_cut(trainer.model, dense_variables, plan)
        if config.retrain == "reinit":
            variables = train.init_variables(narrow, jax.random.key(config.seed + 1),
                                             data.spec.image_shape)  # fmt: skip
    offset = ticket.epoch * trainer.steps_per_epoch
    tx = train.create_optimizer(config, trainer.steps_per_epoch, start_step=offset)
    state = train.TrainState.create(apply_fn=narrow.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=tx)  # fmt: skip
    state = state.replace(step=offset)  # the schedule and the data order go on from here
    n_dense = sum(np.size(x) for x in jax.tree.leaves(dense.params))
    n_ticket = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    logger.info(
        "cut the p=%g ticket of epoch %d: %d -> %d parameters (%.2fx smaller); retraining "
        "(%s) from epoch %d to %d%s%s",
        ticket.ratio, ticket.epoch, n_dense, n_ticket, n_dense / n_ticket, config.retrain,
        ticket.epoch + 1, config.num_epochs,
        f"; min_channels kept alive: {', '.join(plan.rescued)}" if plan.rescued else "",
        f"; rounded up to x{config.round_to}: {len(plan.rounded)} layers" if plan.rounded else "",
    )  # fmt: skip
    return Trainer(config, data, narrow, workdir, state, checkpointer, search, None,
                   stage="retrain", extra_meta={"retrain_from_step": offset})  # fmt: skip


def _load_init(workdir: str) -> dict:
    """The variables at initialisation that a 'rewind' run saved when its search began."""
    path = os.path.join(workdir, "init")
    if not os.path.isdir(path):
        raise ConfigError(
            f"retrain='rewind' needs the weights at initialisation, saved in {path} when the "
            "search starts; this run began without it: use retrain='inherit' or 'reinit'"
        )
    return load_model(path)[1]


def _new_model(config, num_classes: int, widths: dict | None = None):
    try:
        return create_model(config.model, num_classes, config.conv_impl, **(widths or {}))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _new_search(config, model, input_shape) -> TicketSearch | None:
    if config.method != "eb":
        return None
    detector = EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    sizes = [s.shape[0] for s in bn_scales(model, shapes["params"])]
    return TicketSearch(config.monitor_ratios, config.prune_ratio, detector, sizes)


def _start_or_resume(config, data, checkpointer, workdir):
    """(model, TrainState, TicketSearch or None, meta or None) fresh or from the newest
    readable checkpoint; the model is rebuilt from the checkpoint's widths first."""
    steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
        )
    shape = data.spec.image_shape
    search = _new_search(config, _new_model(config, data.num_classes), shape)

    def fresh(widths=None, start_step=0):
        model = _new_model(config, data.num_classes, widths)
        tx = train.create_optimizer(config, steps_per_epoch, start_step=start_step)
        state = train.create_train_state(model, jax.random.key(config.seed), shape, tx)
        return model, state.replace(step=start_step)

    built = {}

    def target_for(meta):
        check_config_matches(config, meta, workdir)
        built["parts"] = fresh(widths_from_json(meta["widths"]), meta.get("retrain_from_step", 0))
        target = {"train": flax.serialization.to_state_dict(built["parts"][1])}
        if search is not None and meta.get("search"):
            target["search"] = search.arrays_like(len(meta["search"]["epochs"]))
        return target

    restored = checkpointer.restore(target_for)
    if restored is None:
        return (*fresh(), search, None)
    step, arrays, meta = restored
    model, state = built["parts"]
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
        history = search.history[ratio]
        if len(history) > 1:
            scalars[f"eb/p{ratio:g}/distance_to_previous"] = mask_distance(*history[-2:])
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
