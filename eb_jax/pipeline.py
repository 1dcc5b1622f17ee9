"""A run walks its method's declared steps (eb_jax.methods), checkpointed so a killed run
resumes in whichever stage it was.

Stages train (`_train_stage`; a search stage draws a ticket before every epoch); a prune
step (`_prune`) turns the trained network into the next one with its criterion. At the
end the run's cost and result go to WORKDIR/report.json and a printed table.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from eb_jax import cost, methods, names, parallel, platform, report, train
from eb_jax import data as data_lib
from eb_jax.checkpoint import Checkpointer, check_config_matches, load_model
from eb_jax.config import ConfigError, stage_precision, validate
from eb_jax.methods import Prune, Stage
from eb_jax.models import bn_scales, create_model, model_widths, widths_from_json
from eb_jax.prune.sfp import hard_prune_masks
from eb_jax.prune.thinet import thinet_prune
from eb_jax.prune.weights import magnitude_mask, nonzero_fraction, snip_mask
from eb_jax.runlog import MetricWriter, logger
from eb_jax.ticket import EarlyBirdDetector, mask_distance
from eb_jax.ticket.export import save_ticket
from eb_jax.ticket.search import TicketSearch
from eb_jax.ticket.surgery import apply_cut, plan_cut
from eb_jax.trainer import Clock, Resume, RunContext, StagePlan, Trainer


@dataclasses.dataclass
class Network:
    """What one step of a method hands the next: a model with host `variables` to start
    a stage from at global step `step`, or the `trainer` that trained it, or a stage's
    checkpointed `state` (with `resume` and the step the stage started at); and its
    unstructured weight mask, if any."""

    model: object
    variables: dict | None = None
    step: int = 0
    weight_mask: dict | None = None
    trainer: Trainer | None = None
    state: train.TrainState | None = None
    resume: Resume | None = None
    stage_start: int | None = None


def run(config, workdir: str) -> dict:
    """Runs `config.method` on `config.dataset`, resuming from `workdir` if it holds a run.

    Returns the run's report (report.json): method, ticket, accuracy, cost, wall time.
    """
    validate(config, jax.device_count())
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; name a directory")
    steps = methods.method_steps(config)
    data = data_lib.open_dataset(config.dataset, config.data_dir or None)
    _model(config, data.num_classes)  # an unknown model fails before the workdir is touched
    checkpointer = Checkpointer(workdir, config.checkpoints_to_keep, config.async_checkpoints)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    try:
        ctx, index, net = _start_or_resume(config, steps, data, checkpointer, writer, workdir)
        for step in steps[index:]:
            if isinstance(step, Stage):
                net = _train_stage(ctx, steps, step, net)
            else:
                net = _prune(ctx, steps, step, net)
        return _report(ctx, steps, net)
    finally:
        writer.close()
        checkpointer.close()


def _plan(ctx: RunContext, steps, stage: Stage, start_step: int) -> StagePlan:
    """The settings of `stage` when it starts at global step `start_step`."""
    config, spe = ctx.config, ctx.steps_per_epoch
    fresh = stage.schedule == names.FRESH
    return StagePlan(
        name=stage.name,
        start_step=start_step,
        end_epoch=start_step // spe + config.num_epochs if fresh else config.num_epochs,
        lr_origin=start_step if fresh else 0,
        precision=stage_precision(config, methods.after_prune(steps, stage)),
        sparsity=config.sparsity if stage.name in config.sparsity_stages else 0.0,
        swa_start=config.swa_start_epoch if stage is methods.final_stage(steps) else 0,
        soft_prune_ratio=config.prune_ratio if stage.name == names.SOFT else 0.0,
    )


def _fresh_state(ctx: RunContext, plan: StagePlan, model, variables) -> train.TrainState:
    """A TrainState at the stage's first step with the stage's own fresh optimizer."""
    tx = train.create_optimizer(
        ctx.config,
        ctx.steps_per_epoch,
        plan.start_step,
        plan.sparsity,
        plan.precision,
        plan.lr_origin,
    )
    state = train.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )
    return state.replace(step=plan.start_step)


_DOING = {
    names.DENSE: "training",
    names.SEARCH: "searching for the ticket",
    names.RETRAIN: "retraining",
    names.MASKED: "training the weight-masked network",
    names.SOFT: "training with soft filter pruning",
}


def _train_stage(ctx: RunContext, steps, stage: Stage, net: Network) -> Network:
    """Trains `stage` to its end (a search: until its ticket is drawn)."""
    start = net.step if net.stage_start is None else net.stage_start
    plan = _plan(ctx, steps, stage, start)
    model = net.model.clone(precision=plan.precision)
    state = net.state if net.state is not None else _fresh_state(ctx, plan, model, net.variables)
    trainer = Trainer(ctx, plan, model, state, net.weight_mask, net.resume)
    pruned = ctx.record["pruned"] if methods.after_prune(steps, stage) else None
    logger.info(
        "%s%s from epoch %d to %d: %s on %s, %d train / %d test images, %d steps/epoch, %s, "
        "workdir %s",
        _DOING[stage.name],
        f" ({pruned['start']})" if pruned else "",
        plan.start_step // ctx.steps_per_epoch + 1,
        plan.end_epoch,
        ctx.config.model,
        ctx.config.dataset,
        len(ctx.data.train),
        len(ctx.data.eval),
        ctx.steps_per_epoch,
        platform.describe(),
        ctx.workdir,
    )
    trainer.compile()
    if stage.name == names.SEARCH:
        _search(ctx, trainer, stage)
    else:
        for epoch in range(trainer.epoch, plan.end_epoch):
            trainer.train_epoch(epoch)
    epochs = trainer.epoch - plan.start_step // ctx.steps_per_epoch
    ctx.record["history"].append(_stage_entry(ctx, plan, model, epochs, net.weight_mask))
    return Network(model, step=trainer.step, weight_mask=net.weight_mask, trainer=trainer)


def _stage_entry(ctx: RunContext, plan: StagePlan, model, epochs: int, weight_mask) -> dict:
    """A finished stage as report.json lists it: its epochs and what they cost."""
    images = ctx.steps_per_epoch * ctx.config.batch_size
    c = cost.forward_cost(model, ctx.data.spec.image_shape, weight_mask)
    entry = {
        "stage": plan.name,
        "epochs": epochs,
        "images_per_epoch": images,
        "precision": plan.precision.name,
        "forward_flops": c.flops,
        "training_pflops": cost.training_flops(c.flops, images, epochs) / 1e15,
    }
    if weight_mask is not None:  # zeros save no dense FLOPs; the kept MACs, labelled
        entry["nonzero_forward_macs"] = c.nonzero_macs
    return entry


def _search(ctx: RunContext, trainer: Trainer, stage: Stage) -> None:
    """Dense training with masks drawn before every epoch until the ticket is drawn: when
    it emerges or after `ticket_epoch` epochs ('ticket'), or after all epochs."""
    config, search = ctx.config, ctx.search
    fixed = config.num_epochs if stage.until == "schedule" else config.ticket_epoch
    epoch = trainer.epoch
    while True:
        if epoch not in search.epochs:
            result = search.observe(epoch, trainer.bn_scales())
            _log_search(ctx, search, epoch, result)
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
            config.prune_ratio,
            config.num_epochs,
            ticket.epoch,
        )
    history = search.consecutive_distances(config.prune_ratio)
    logger.info(
        "p=%g mask distance to the previous epoch: %s",
        config.prune_ratio,
        " ".join(f"{d:.3f}" for d in history),
    )
    if jax.process_index() == 0:
        search.save(ctx.workdir)
        report.plot_mask_distances(search, os.path.join(ctx.workdir, "mask_distance.png"))


def _log_search(ctx: RunContext, search: TicketSearch, epoch: int, result: dict) -> None:
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
                ratio,
                epoch,
                " ".join(f"{d:.3f}" for d in distances),
            )
    if scalars:
        ctx.writer.write_scalars(epoch * ctx.steps_per_epoch, scalars)


def _prune(ctx: RunContext, steps, prune: Prune, net: Network) -> Network:
    """The pruning step: the criterion's masks, then the cut (channels) or the weight
    mask (weights); the pruned network's weights start as `prune.start` says."""
    config, shape = ctx.config, ctx.data.spec.image_shape
    model, variables = net.model, net.variables
    if net.trainer is not None:
        model, trained = net.trainer.model, parallel.unreplicate(net.trainer.state)
        variables = {"params": trained.params, "batch_stats": trained.batch_stats}
    masks, variables = _criterion(ctx, prune.criterion, model, variables)
    source = _load_init(ctx.workdir) if prune.start == names.REWIND else variables
    weight_mask = None
    if prune.criterion in methods.CHANNEL_CRITERIA:
        narrow, pruned = _cut(config, model, masks, source)
        if prune.start == names.REINIT:
            pruned = train.init_variables(narrow, jax.random.key(config.seed + 1), shape)
    else:
        weight_mask, narrow = masks, model
        pruned = {
            **source,
            "params": jax.tree.map(
                np.asarray, train.apply_weight_mask(source["params"], weight_mask)
            ),
        }
    ctx.record["pruned"] = {
        "criterion": prune.criterion,
        "epoch": net.step // ctx.steps_per_epoch,
        "granularity": names.WEIGHTS if weight_mask is not None else names.CHANNELS,
        "start": prune.start,
    }
    _log_prune(ctx, prune, variables, pruned, weight_mask)
    after = Network(narrow, pruned, net.step, weight_mask)
    if methods.final_stage(steps) is None:  # the method ends with this cut: evaluate it
        after.trainer = _evaluator(ctx, steps, after)
    return after


def _criterion(ctx: RunContext, criterion: str, model, variables: dict):
    """(channel masks per BN or a weight mask, the variables the cut starts from)."""
    config = ctx.config
    if criterion == methods.TICKET:
        masks = ctx.search.ticket.masks
    elif criterion == methods.THINET:
        images = next(iter(_sample_batches(ctx, config.thinet_images)))["image"]
        masks, variables = thinet_prune(
            model, variables, images, config.prune_ratio, config.thinet_locations, config.seed
        )
    elif criterion == methods.SFP:
        masks = hard_prune_masks(model, variables["params"], config.prune_ratio)
    elif criterion == methods.SNIP:
        batches = itertools.islice(_sample_batches(ctx, config.batch_size), config.snip_batches)
        masks = snip_mask(model, variables, batches, config.prune_ratio)
    else:
        masks = magnitude_mask(variables["params"], config.prune_ratio)
    flat = np.concatenate([np.asarray(m, np.uint8).ravel() for m in jax.tree.leaves(masks)])
    parallel.check_same_on_all_processes(flat, f"the {criterion} masks")
    return masks, variables


def _sample_batches(ctx: RunContext, batch_size: int):
    """The first epoch's training batches of `batch_size`, the same on every process."""
    config = ctx.config
    if len(ctx.data.train) < batch_size:
        raise ConfigError(
            f"a batch of {batch_size} exceeds the {len(ctx.data.train)} "
            "training examples; lower thinet_images / batch_size"
        )
    return data_lib.train_batches(
        ctx.data, batch_size, config.seed, 0, 0, 0, 1, num_threads=config.num_data_threads
    )


def _cut(config, model, masks, variables):
    """(narrow model, `variables` cut to it) for per-BN keep-masks."""
    try:
        plan = plan_cut(
            model,
            variables["params"],
            masks,
            min_channels=config.min_channels,
            round_to=config.round_to,
            prune_residual=config.prune_residual,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if plan.rescued:
        logger.info("min_channels kept alive: %s", ", ".join(plan.rescued))
    if plan.rounded:
        logger.info("rounded up to x%d: %d layers", config.round_to, len(plan.rounded))
    return apply_cut(model, variables, plan)


def _log_prune(ctx, prune: Prune, before: dict, after: dict, weight_mask) -> None:
    what = "ticket" if prune.criterion == methods.TICKET else f"{prune.criterion} pruning"
    epoch = ctx.record["pruned"]["epoch"]
    if weight_mask is not None:
        kept = f"{100 * nonzero_fraction(weight_mask):.1f}% of the conv/linear weights kept"
        logger.info("masked the p=%g %s of epoch %d: %s", ctx.config.prune_ratio, what, epoch, kept)
    else:
        n_before = sum(np.size(x) for x in jax.tree.leaves(before["params"]))
        n_after = sum(np.size(x) for x in jax.tree.leaves(after["params"]))
        logger.info(
            "cut the p=%g %s of epoch %d: %d -> %d parameters (%.2fx smaller)",
            ctx.config.prune_ratio,
            what,
            epoch,
            n_before,
            n_after,
            n_before / n_after,
        )


def _evaluator(ctx: RunContext, steps, net: Network) -> Trainer:
    """A Trainer that only evaluates `net` (a method that ends with a cut); the cut
    network is exported to WORKDIR/pruned."""
    spe = ctx.steps_per_epoch
    plan = StagePlan(
        names.RETRAIN,
        net.step,
        net.step // spe,
        0,
        stage_precision(ctx.config, after_prune=True),
        0.0,
    )
    model = net.model.clone(precision=plan.precision)
    if jax.process_index() == 0:
        save_ticket(
            os.path.join(ctx.workdir, "pruned"),
            ctx.config.model,
            model,
            net.variables,
            ctx.data.num_classes,
            ctx.data.spec.image_shape,
        )
    return Trainer(ctx, plan, model, _fresh_state(ctx, plan, model, net.variables))


def _report(ctx: RunContext, steps, net: Network) -> dict:
    """What the run cost and what it got; written to report.json."""
    config, trainer = ctx.config, net.trainer
    final = trainer.last_metrics.get("test_accuracy")
    if final is None:  # nothing left to train (a finished run started again), or a cut
        final = trainer.evaluate()["accuracy"]
    parallel.check_replicas_same_on_all_processes(trainer.state.params, "the final weights")
    swa = _finish_swa(ctx, trainer, final) if trainer.swa_count else None
    shape = ctx.data.spec.image_shape
    dense_model = _model(config, ctx.data.num_classes)
    dense = cost.forward_cost(dense_model, shape)
    same = model_widths(trainer.model) == model_widths(dense_model) and net.weight_mask is None
    end = dense if same else cost.forward_cost(trainer.model, shape, net.weight_mask)
    ticket = ctx.search.ticket if ctx.search is not None else None
    pruned = ctx.record["pruned"]
    record = {
        "run": os.path.basename(os.path.normpath(ctx.workdir)),
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "prune_ratio": config.prune_ratio if ticket or pruned else None,
        "retrain": pruned["start"] if pruned and methods.final_stage(steps) else None,
        "ticket_epoch": ticket.epoch if ticket else pruned["epoch"] if pruned else None,
        "ticket_drawn_by": _drawn_by(config, steps, ticket, pruned),
        "test_accuracy": swa["accuracy"] if swa else final,
        "swa": swa["record"] if swa else None,
        "params": {"dense": dense.params, "final": end.params},
        "forward_flops": {"dense": dense.flops, "final": end.flops},
        "forward_macs": {"dense": dense.macs, "final": end.macs},
        "stages": ctx.record["history"],
        "wall_time_s": ctx.clock.wall_time(),
        "compile_time_s": ctx.clock.compile_s,  # of the steps, part of the wall time
        "devices": platform.describe(whole_run=True),
    }
    record["training_pflops"] = sum(s["training_pflops"] for s in record["stages"])
    record["num_epochs"] = config.num_epochs
    # How the pruned network's schedule ran, and whether channels or weights were pruned.
    record["retrain_schedule"] = methods.final_stage(steps).schedule if record["retrain"] else None
    record["granularity"] = pruned["granularity"] if pruned else None
    if end.nonzero_macs is not None:
        record["forward_macs"]["final_nonzero"] = end.nonzero_macs
    if jax.process_index() == 0:
        report.write_report(ctx.workdir, record)
    logger.info("\n%s", report.format_table([record]))
    return record


def _finish_swa(ctx: RunContext, trainer: Trainer, last: float) -> dict:
    """The SWA model's accuracy and record; its variables exported to WORKDIR/swa."""
    metrics, variables = trainer.swa_result()
    save_ticket(
        os.path.join(ctx.workdir, "swa"),
        ctx.config.model,
        trainer.model,
        variables,
        ctx.data.num_classes,
        ctx.data.spec.image_shape,
    )
    ctx.writer.write_scalars(trainer.step, {"swa/test_accuracy": metrics["accuracy"]})
    record = {
        "start_epoch": ctx.config.swa_start_epoch,
        "epochs_averaged": trainer.swa_count,
        "test_accuracy_without": last,
    }
    return {"accuracy": metrics["accuracy"], "record": record}


def _drawn_by(config, steps, ticket, pruned) -> str | None:
    """How the ticket (or the pruning) was decided: report.json's ticket_drawn_by."""
    if ticket is None:
        return pruned["criterion"] if pruned else None
    search = next(s for s in methods.stages(steps) if s.name == names.SEARCH)
    if search.until == "schedule":
        return "full search"
    if config.ticket_epoch:
        return "ticket_epoch"
    return "detector" if ticket.emerged else "no emergence"


def _load_init(workdir: str) -> dict:
    """The variables at initialisation that a 'rewind' run saved when it began."""
    path = os.path.join(workdir, "init")
    if not os.path.isdir(path):
        raise ConfigError(
            f"retrain='rewind' needs the weights at initialisation, saved in {path} when the "
            "run starts; this run began without it: use retrain='inherit' or 'reinit'"
        )
    return load_model(path)[1]


def _model(config, num_classes: int, widths: dict | None = None, after_prune: bool = False):
    try:
        precision = stage_precision(config, after_prune)
        return create_model(
            config.model, num_classes, config.conv_impl, precision, **(widths or {})
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _new_search(config, steps, model, input_shape) -> TicketSearch | None:
    if not methods.draws_tickets(steps):
        return None
    detector = EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    sizes = [s.shape[0] for s in bn_scales(model, shapes["params"])]
    return TicketSearch(config.monitor_ratios, config.prune_ratio, detector, sizes)


def _start_or_resume(config, steps, data, checkpointer, writer, workdir):
    """(RunContext, index of the step to run next, Network) fresh or from the newest
    readable checkpoint; the model is rebuilt from its recorded widths first."""
    steps_per_epoch = data_lib.input_pipeline.steps_per_epoch(data, config.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
        )
    shape = data.spec.image_shape
    search = _new_search(config, steps, _model(config, data.num_classes), shape)
    ctx = RunContext(config, data, workdir, checkpointer, writer, Clock(), search)
    built = {}

    def target_for(meta):
        check_config_matches(config, meta, workdir)
        stage = _stage_named(steps, meta["stage"])
        after = methods.after_prune(steps, stage)
        model = _model(config, data.num_classes, widths_from_json(meta["widths"]), after)
        shapes = jax.eval_shape(lambda: train.init_variables(model, jax.random.key(0), shape))
        plan = _plan(ctx, steps, stage, meta["stage_start_step"])
        built.update(
            stage=stage, model=model, plan=plan, state=_fresh_state(ctx, plan, model, shapes)
        )
        target = {"train": flax.serialization.to_state_dict(built["state"])}
        if search is not None and meta.get("search"):
            target["search"] = search.arrays_like(len(meta["search"]["epochs"]))
        if meta.get("swa_count"):
            target["swa"] = target["train"]["params"]
        if stage.name == names.MASKED:
            target["weight_mask"] = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, np.bool_), target["train"]["params"]
            )
        return target

    restored = checkpointer.restore(target_for)
    if restored is None:
        model = _model(config, data.num_classes)
        variables = train.init_variables(model, jax.random.key(config.seed), shape)
        _save_init_for_rewind(ctx, steps, model, variables)
        ctx.clock = Clock()  # the wall time counts from here: training, not start-up
        return ctx, 0, Network(model, variables)
    step, arrays, meta = restored
    state = flax.serialization.from_state_dict(built["state"], arrays["train"])
    if search is not None and meta.get("search"):
        search.load_state_dict(arrays["search"], meta["search"])
    ctx.clock = Clock(meta["wall_time_s"], meta["compile_time_s"])
    ctx.record = {"history": meta["history"], "pruned": meta["pruned"]}
    logger.info(
        "resuming the run in %s from its checkpoint at step %d (epoch %d, stage %s)",
        workdir,
        step,
        meta["epoch"],
        meta["stage"],
    )
    resume = Resume(meta["epoch_sums"], arrays.get("swa"), meta.get("swa_count", 0))
    net = Network(
        built["model"],
        step=step,
        weight_mask=arrays.get("weight_mask"),
        state=state,
        resume=resume,
        stage_start=meta["stage_start_step"],
    )
    return ctx, steps.index(built["stage"]), net


def _stage_named(steps, name: str) -> Stage:
    for stage in methods.stages(steps):
        if stage.name == name:
            return stage
    raise ConfigError(f"the checkpoint is in stage {name!r}, which this method does not have")


def _save_init_for_rewind(ctx: RunContext, steps, model, variables) -> None:
    """Keeps the weights at initialisation for a method that rewinds to them; a run
    killed before its first checkpoint has them already (the same seed, the same init)."""
    prune = methods.prune_step(steps)
    init_dir = os.path.join(ctx.workdir, "init")
    if prune is None or prune.start != names.REWIND:
        return
    if parallel.process_zero_says(not os.path.isdir(init_dir)):
        save_ticket(
            init_dir,
            ctx.config.model,
            model,
            variables,
            ctx.data.num_classes,
            ctx.data.spec.image_shape,
        )


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "quickstart"
    return os.path.join("runs", name)
