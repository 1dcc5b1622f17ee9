"""The training run as a readable sequence of stages, checkpointed so a killed run resumes.

Every method (config.method) is one sequence of the same stages:
- 'dense': standard training for num_epochs (stage 'dense').
- 'eb' (EB Train): the Early-Bird search (stage 'search'): dense training with BN-scale
  sparsity, masks drawn before every epoch until the ticket for `prune_ratio` emerges (or
  after a fixed `ticket_epoch`); the ticket is cut out (surgery) and retrained (stage
  'retrain') to num_epochs with a fresh optimizer whose LR schedule goes on, its weights
  inherited, re-initialised or rewound to initialisation.
- 'ns' (network slimming) / 'lt' (one-shot structured lottery ticket): the search runs all
  num_epochs, the ticket is cut, then trained for another num_epochs on a fresh schedule
  with inherited ('ns') or rewound ('lt') weights.
At the end the run's cost and result go to WORKDIR/report.json and a printed table.
"""

from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from eb_jax import cost, parallel, report, train
from eb_jax import data as data_lib
from eb_jax.checkpoint import Checkpointer, check_config_matches, load_model
from eb_jax.config import (
    FULL_SEARCH_METHODS,
    ConfigError,
    retrain_mode,
    stage_precision,
    validate,
)
from eb_jax.models import bn_scales, create_model, widths_from_json
from eb_jax.ticket import EarlyBirdDetector, mask_distance
from eb_jax.ticket.export import save_ticket
from eb_jax.ticket.search import TicketSearch
from eb_jax.ticket.surgery import apply_cut, plan_cut
from eb_jax.trainer import Trainer

logger = report.logger


def run(config, workdir: str) -> dict:
    """Runs `config.method` on `config.dataset`, resuming from `workdir` if it holds a run.

    Returns the run's report (report.json): method, ticket, accuracy, cost, wall time.
    """
    validate(config, jax.device_count())
    data = data_lib.open_dataset(config.dataset, config.data_dir or None)
    _new_model(config, data.num_classes)  # an unknown model fails before the workdir is touched
    checkpointer = Checkpointer(workdir, config.checkpoints_to_keep, config.async_checkpoints)
    trainer = None
    try:
        model, state, search, meta, swa = _start_or_resume(config, data, checkpointer, workdir)
        stage = meta["stage"] if meta else ("search" if search else "dense")
        trainer = _trainer(config, data, model, workdir, state, checkpointer, search, meta, stage,
                           meta.get("retrain_from_step", 0) if meta else 0, swa=swa)  # fmt: skip
        if stage == "search":
            init_dir = os.path.join(workdir, "init")
            # Kept for 'rewind'; a run killed before its first checkpoint has it already
            # (the same seed gives the same initialisation).
            if retrain_mode(config) == "rewind" and parallel.process_zero_says(
                not os.path.isdir(init_dir)
            ):
                save_ticket(init_dir, config.model, model,
                            {"params": state.params, "batch_stats": state.batch_stats},
                            data.num_classes, data.spec.image_shape)  # fmt: skip
            search_ticket(config, trainer, search, workdir)
            if not config.keep_searching:
                trainer.writer.close()
                trainer = _cut_for_retraining(config, data, trainer, search, checkpointer, workdir)
        for epoch in range(trainer.epoch, trainer.end_epoch):
            trainer.train_epoch(epoch)
        swa_metrics = _finish_swa(config, data, trainer, workdir) if trainer.swa_count else None
        record = _report(config, data, trainer, search, workdir, swa_metrics)
    finally:
        if trainer is not None:
            trainer.writer.close()
        checkpointer.close()
    return record


def _trainer(config, data, model, workdir, state, checkpointer, search, meta, stage,
             retrain_from: int, before: Trainer | None = None, swa=None) -> Trainer:  # fmt: skip
    """The Trainer for `stage`; a retraining stage starts at step `retrain_from`."""
    end_epoch, lr_origin = config.num_epochs, 0
    extra = {}
    if stage == "retrain":
        extra["retrain_from_step"] = retrain_from
        if config.method in FULL_SEARCH_METHODS:  # a whole second schedule
            end_epoch, lr_origin = 2 * config.num_epochs, retrain_from
    return Trainer(config, data, model, workdir, state, checkpointer, search, meta, stage=stage,
                   extra_meta=extra, end_epoch=end_epoch, lr_origin=lr_origin,
                   wall_time_s=before.wall_time() if before else 0.0,
                   compile_time_s=before.compile_time_s if before else 0.0,
                   swa_params=swa)  # fmt: skip


def _optimizer(config, steps_per_epoch: int, stage: str, start_step: int):
    """Sparsity only while searching; a retraining 'ns'/'lt' schedule starts afresh."""
    if stage == "retrain" and config.method in FULL_SEARCH_METHODS:
        start_step = 0
    sparsity = config.sparsity if stage == "search" else 0.0
    precision = stage_precision(config, stage)
    return train.create_optimizer(config, steps_per_epoch, start_step, sparsity, precision)


def _cut_for_retraining(config, data, trainer, search, checkpointer, workdir) -> Trainer:
    """Cuts the ticket out of the searched network; a Trainer for the retraining stage."""
    ticket = search.ticket
    mode = retrain_mode(config)
    parallel.check_same_on_all_processes(
        np.concatenate([np.asarray(m, np.uint8) for m in ticket.masks]), "the ticket's masks"
    )
    dense = jax.tree.map(lambda x: np.asarray(x[0]), trainer.state)
    dense_variables = {"params": dense.params, "batch_stats": dense.batch_stats}
    try:
        plan = plan_cut(trainer.model, dense.params, ticket.masks, min_channels=config.min_channels,
                        round_to=config.round_to, prune_residual=config.prune_residual)  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mode == "rewind":
        narrow, variables = apply_cut(trainer.model, _load_init(workdir), plan)
    else:
        narrow, variables = apply_cut(trainer.model, dense_variables, plan)
        if mode == "reinit":
            variables = train.init_variables(narrow, jax.random.key(config.seed + 1),
                                             data.spec.image_shape)  # fmt: skip
    narrow = narrow.clone(precision=stage_precision(config, "retrain"))
    start = ticket.epoch * trainer.steps_per_epoch  # EB: the schedule and data order go on
    if config.method in FULL_SEARCH_METHODS:
        start = trainer.step  # after the whole search
    tx = _optimizer(config, trainer.steps_per_epoch, "retrain", start)
    state = train.TrainState.create(apply_fn=narrow.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=tx)  # fmt: skip
    state = state.replace(step=start)
    retrainer = _trainer(config, data, narrow, workdir, state, checkpointer, search, None,
                         "retrain", start, before=trainer)  # fmt: skip
    n_dense = sum(np.size(x) for x in jax.tree.leaves(dense.params))
    n_ticket = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    logger.info(
        "cut the p=%g ticket of epoch %d: %d -> %d parameters (%.2fx smaller); retraining "
        "(%s) from epoch %d to %d%s%s",
        ticket.ratio, ticket.epoch, n_dense, n_ticket, n_dense / n_ticket, mode,
        retrainer.epoch + 1, retrainer.end_epoch,
        f"; min_channels kept alive: {', '.join(plan.rescued)}" if plan.rescued else "",
        f"; rounded up to x{config.round_to}: {len(plan.rounded)} layers" if plan.rounded else "",
    )  # fmt: skip
    return retrainer


def _finish_swa(config, data, trainer: Trainer, workdir: str) -> dict:
    """The SWA model's accuracy; its variables exported to WORKDIR/swa (load_ticket)."""
    metrics, variables = trainer.swa_result()
    save_ticket(os.path.join(workdir, "swa"), config.model, trainer.model, variables,
                data.num_classes, data.spec.image_shape)  # fmt: skip
    trainer.writer.write_scalars(trainer.step, {"swa/test_accuracy": metrics["accuracy"]})
    return metrics


def _report(config, data, trainer: Trainer, search, workdir: str, swa_metrics=None) -> dict:
    """What the run cost and what it got (PAPER.md §8); written to report.json."""
    final = trainer.last_metrics.get("test_accuracy")
    if final is None:  # nothing left to train (a finished run started again)
        final = trainer.evaluate()["accuracy"]
    parallel.check_replicas_same_on_all_processes(trainer.state.params, "the final weights")
    last = final
    if swa_metrics is not None:  # the averaged weights are the run's final model
        final = swa_metrics["accuracy"]
    shape, images = data.spec.image_shape, trainer.steps_per_epoch * config.batch_size
    dense = cost.forward_cost(_new_model(config, data.num_classes), shape)
    cut = cost.forward_cost(trainer.model, shape) if trainer.stage == "retrain" else dense
    if search is None:
        stages = [("dense", config.num_epochs, dense)]
    else:
        stages = [("search", search.epochs[-1], dense)]  # masks after e epochs: e trained
        if trainer.stage == "retrain":
            first = trainer.extra_meta["retrain_from_step"] // trainer.steps_per_epoch
            stages.append(("retrain", trainer.end_epoch - first, cut))
    ticket = search.ticket if search is not None else None  # drawn (not cut if keep_searching)
    record = {
        "run": os.path.basename(os.path.normpath(workdir)),
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "prune_ratio": config.prune_ratio if ticket else None,
        "retrain": retrain_mode(config) if trainer.stage == "retrain" else None,
        "ticket_epoch": ticket.epoch if ticket else None,
        "ticket_drawn_by": _drawn_by(config, ticket) if ticket else None,
        "test_accuracy": final,
        "swa": {
            "start_epoch": config.swa_start_epoch,
            "epochs_averaged": trainer.swa_count,
            "test_accuracy_without": last,
        }
        if swa_metrics
        else None,  # fmt: skip
        "params": {"dense": dense.params, "final": cut.params},
        "forward_flops": {"dense": dense.flops, "final": cut.flops},
        "forward_macs": {"dense": dense.macs, "final": cut.macs},
        "stages": [
            {
                "stage": name,
                "epochs": epochs,
                "images_per_epoch": images,
                "precision": stage_precision(config, name).name,
                "forward_flops": c.flops,
                "training_pflops": cost.training_flops(c.flops, images, epochs) / 1e15,
            }
            for name, epochs, c in stages
        ],
        "wall_time_s": trainer.wall_time(),
        "compile_time_s": trainer.compile_time_s,  # of the steps, part of the wall time
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    record["training_pflops"] = sum(s["training_pflops"] for s in record["stages"])
    if jax.process_index() == 0:
        report.write_report(workdir, record)
    logger.info("\n%s", report.format_table([record]))
    return record


def _drawn_by(config, ticket) -> str:
    if config.method in FULL_SEARCH_METHODS:
        return "full search"
    if config.ticket_epoch:
        return "ticket_epoch"
    return "detector" if ticket.emerged else "no emergence"


def _load_init(workdir: str) -> dict:
    """The variables at initialisation that a 'rewind' run saved when its search began."""
    path = os.path.join(workdir, "init")
    if not os.path.isdir(path):
        raise ConfigError(
            f"retrain='rewind' needs the weights at initialisation, saved in {path} when the "
            "search starts; this run began without it: use retrain='inherit' or 'reinit'"
        )
    return load_model(path)[1]


def _new_model(config, num_classes: int, widths: dict | None = None, stage: str = "search"):
    try:
        precision = stage_precision(config, stage)
        return create_model(config.model, num_classes, config.conv_impl, precision,
                            **(widths or {}))  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _new_search(config, model, input_shape) -> TicketSearch | None:
    if config.method == "dense":
        return None
    detector = EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    sizes = [s.shape[0] for s in bn_scales(model, shapes["params"])]
    return TicketSearch(config.monitor_ratios, config.prune_ratio, detector, sizes)


def _start_or_resume(config, data, checkpointer, workdir):
    """(model, TrainState, TicketSearch or None, meta or None, SWA average or None) fresh
    or from the newest readable checkpoint; the model is rebuilt from its widths first."""
    steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
        )
    shape = data.spec.image_shape
    search = _new_search(config, _new_model(config, data.num_classes), shape)

    def fresh(stage, widths=None, start_step=0):
        model = _new_model(config, data.num_classes, widths, stage)
        tx = _optimizer(config, steps_per_epoch, stage, start_step)
        state = train.create_train_state(model, jax.random.key(config.seed), shape, tx)
        return model, state.replace(step=start_step)

    built = {}

    def target_for(meta):
        check_config_matches(config, meta, workdir)
        built["parts"] = fresh(meta["stage"], widths_from_json(meta["widths"]),
                               meta.get("retrain_from_step", 0))  # fmt: skip
        target = {"train": flax.serialization.to_state_dict(built["parts"][1])}
        if search is not None and meta.get("search"):
            target["search"] = search.arrays_like(len(meta["search"]["epochs"]))
        if meta.get("swa_count"):
            target["swa"] = target["train"]["params"]
        return target

    restored = checkpointer.restore(target_for)
    if restored is None:
        return (*fresh("search" if search else "dense"), search, None, None)
    step, arrays, meta = restored
    model, state = built["parts"]
    state = flax.serialization.from_state_dict(state, arrays["train"])
    if search is not None and meta.get("search"):
        search.load_state_dict(arrays["search"], meta["search"])
    logger.info(
        "resuming the run in %s from its checkpoint at step %d (epoch %d, stage %s)",
        workdir, step, meta["epoch"], meta["stage"],
    )  # fmt: skip
    return model, state, search, meta, arrays.get("swa")


def search_ticket(config, trainer: Trainer, search: TicketSearch, workdir: str):
    """Dense training with masks drawn before every epoch until the ticket is drawn: when
    it emerges, or after `ticket_epoch` epochs ('eb'), or after all epochs ('ns', 'lt')."""
    fixed = config.num_epochs if config.method in FULL_SEARCH_METHODS else config.ticket_epoch
    epoch = trainer.epoch
    while True:
        if epoch not in search.epochs:
            result = search.observe(epoch, trainer.bn_scales())
            _log_search(trainer, search, epoch, result)
        done = epoch == fixed if fixed else search.ticket is not None
        parallel.check_same_on_all_processes(np.array([epoch, done]), "the search's state")
        if epoch == config.num_epochs or (done and not config.keep_searching):
            break
        trainer.train_epoch(epoch)
        epoch += 1
    if fixed:
        ticket = search.take_mask(fixed)
        logger.info("drew the p=%g ticket after %d epochs", config.prune_ratio, ticket.epoch)
    elif search.ticket is None:
        ticket = search.take_mask()
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
