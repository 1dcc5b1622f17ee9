"""One phase of a method at a time: a training stage (`train_stage`: the epoch loop of
eb_jax.epoch_loop; a search draws a ticket before every epoch) or the pruning phase
(`prune`), which turns the trained network into the next one with its criterion
(eb_jax.prune.criteria). `pipeline.run` walks a method's phases with these.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np

from eb_jax import cost, energy, methods, models, names, parallel, platform, report, train_steps
from eb_jax import data as data_lib
from eb_jax.checkpoint import load_model
from eb_jax.config import ConfigError, stage_precision
from eb_jax.epoch_loop import RunContext, StagePlan, Trainer, energy_now, train_epochs
from eb_jax.methods import Prune, Stage
from eb_jax.models import create_model
from eb_jax.models.custom import Custom, is_custom
from eb_jax.models.custom import check as check_custom
from eb_jax.prune import criteria
from eb_jax.prune.weights import nonzero_fraction
from eb_jax.run_state import Resume
from eb_jax.runlog import logger
from eb_jax.ticket import cut, mask_distance
from eb_jax.ticket.export import save_ticket
from eb_jax.ticket.search import TicketSearch
from eb_jax.ticket.surgery import apply_cut, fold_constant_channels, plan_cut


@dataclasses.dataclass
class Network:
    """What one phase of a method hands the next: a model with host `variables` to start
    a stage from at global step `step`, or the `trainer` that trained it, or a stage's
    checkpointed `state` (with `resume` and the step the stage started at); and its
    unstructured weight mask, if any."""

    model: object
    variables: dict | None = None
    step: int = 0
    weight_mask: dict | None = None
    trainer: Trainer | None = None
    state: train_steps.TrainState | None = None
    resume: Resume | None = None
    stage_start: int | None = None


def stage_plan(ctx: RunContext, phases, stage: Stage, start_step: int) -> StagePlan:
    """The settings of `stage` when it starts at global step `start_step`."""
    config, spe = ctx.config, ctx.steps_per_epoch
    fresh = stage.schedule == names.FRESH
    return StagePlan(
        name=stage.name,
        start_step=start_step,
        end_epoch=start_step // spe + config.num_epochs if fresh else config.num_epochs,
        lr_origin=start_step if fresh else 0,
        precision=stage_precision(config, methods.after_prune(phases, stage)),
        sparsity=config.sparsity if stage.name in config.sparsity_stages else 0.0,
        swa_start=config.swa_start_epoch if stage is methods.final_stage(phases) else 0,
        soft_prune_ratio=config.prune_ratio if stage.name == names.SOFT else 0.0,
    )


def fresh_state(ctx: RunContext, plan: StagePlan, model, variables) -> train_steps.TrainState:
    """A TrainState at the stage's first step with the stage's own fresh optimizer."""
    learning_rate_fn = train_steps.stage_lr(
        ctx.config, ctx.steps_per_epoch, plan.lr_origin, plan.name
    )
    tx = train_steps.create_optimizer(
        ctx.config,
        ctx.steps_per_epoch,
        plan.start_step,
        plan.sparsity,
        plan.precision,
        learning_rate_fn,
        model.bn_paths() if isinstance(model, Custom) else None,  # not a LayerNorm's scale
    )
    state = train_steps.TrainState.create(
        apply_fn=data_lib.normalizing(models.apply_fn(model), ctx.data.spec),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        learning_rate_fn=learning_rate_fn,
    )
    return state.replace(step=plan.start_step)


_DOING = {
    names.DENSE: "training",
    names.SEARCH: "searching for the ticket",
    names.RETRAIN: "retraining",
    names.MASKED: "training the weight-masked network",
    names.SOFT: "training with soft filter pruning",
}


def train_stage(ctx: RunContext, phases, stage: Stage, net: Network) -> Network:
    """Trains `stage` to its end (a search: until its ticket is drawn)."""
    start = net.step if net.stage_start is None else net.stage_start
    plan = stage_plan(ctx, phases, stage, start)
    model = net.model.clone(precision=plan.precision)
    state = net.state if net.state is not None else fresh_state(ctx, plan, model, net.variables)
    trainer = Trainer(ctx, plan, model, state, net.weight_mask, net.resume)
    pruned = ctx.results["pruned"] if methods.after_prune(phases, stage) else None
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
        draw = TicketDraw(ctx, trainer, stage)
        train_epochs(trainer, draw.before_epoch, draw.stop)
        draw.take()
    else:
        train_epochs(trainer)
    epochs = trainer.epoch - plan.start_step // ctx.steps_per_epoch
    entry = _stage_entry(ctx, plan, model, epochs, net.weight_mask)
    ctx.results["history"].append({**entry, **_stage_energy(ctx, trainer)})
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


def _stage_energy(ctx: RunContext, trainer: Trainer) -> dict:
    """The stage's measured energy per figure (its compilation and evaluations included),
    and the shown figure's kJ and average power; None where not measured over the whole
    stage. A bfp8 stage's is that of its fp32 simulation."""
    now = energy_now(trainer)
    seconds = ctx.clock.wall_time() - trainer.marks["stage_wall_s"]
    kj = {}
    for channel in energy.CHANNELS:
        joules = energy.joules_between(trainer.marks["stage_j"], now, channel)
        kj[f"{channel}_energy_kj"] = None if joules is None else joules / 1e3
    shown = kj[f"{ctx.energy.meter.counted}_energy_kj"]  # report.json energy.counted's
    watts = None if shown is None else shown * 1e3 / max(seconds, 1e-9)
    entry = {"energy_kj": shown, "average_watts": watts, **kj}
    if shown is not None and trainer.plan.precision.quantized:
        entry["energy_note"] = "measured on the fp32 simulation of bfp8, not 8-bit hardware"
    return entry


class TicketDraw:
    """A search's per-epoch action: before every epoch the BN-scale masks are recorded
    and the detectors updated; the search stops once the ticket is drawn (when it
    emerges, or after `ticket_epoch` epochs for 'ticket'; after all epochs for
    'schedule'), or trains on where config.keep_searching says."""

    def __init__(self, ctx: RunContext, trainer: Trainer, stage: Stage):
        self.ctx, self.trainer, self.done = ctx, trainer, False
        config = ctx.config
        self.fixed = config.num_epochs if stage.until == "schedule" else config.ticket_epoch

    def before_epoch(self, epoch: int) -> None:
        search = self.ctx.search
        if epoch not in search.epochs:
            result = search.observe(epoch, self.trainer.bn_scales())
            _log_search(self.ctx, search, epoch, result)
        self.done = epoch == self.fixed if self.fixed else search.ticket is not None
        parallel.check_same_on_all_processes(np.array([epoch, self.done]), "the search's state")

    def stop(self, epoch: int) -> bool:
        return self.done and not self.ctx.config.keep_searching

    def take(self) -> None:
        """Takes the ticket (the mask of its epoch), logs the distances, saves the search."""
        ctx, search, config = self.ctx, self.ctx.search, self.ctx.config
        if self.fixed:
            ticket = search.take_mask(self.fixed)
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
            if config.write_plots:
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


def prune(ctx: RunContext, phases, prune_phase: Prune, net: Network) -> Network:
    """The pruning step: the criterion's masks, then the cut (channels) or the weight
    mask (weights); the pruned network's weights start as `prune_phase.start` says."""
    config, shape = ctx.config, ctx.data.spec.image_shape
    model, variables = net.model, net.variables
    if net.trainer is not None:
        model, trained = net.trainer.model, parallel.unreplicate(net.trainer.state)
        variables = {"params": trained.params, "batch_stats": trained.batch_stats}
    masks, variables = _criterion(ctx, prune_phase, model, variables)
    source = load_init(ctx.workdir) if prune_phase.start == names.REWIND else variables
    weight_mask, soft = None, None
    if criteria.REGISTRY[prune_phase.criterion].zeroes_filters:  # as trained: zeroed, offsets live
        soft = _soft_pruned_result(net.trainer)
    if criteria.cuts_channels(prune_phase.criterion):
        narrow, pruned = _cut(config, model, masks, source, fold=soft)
        if prune_phase.start == names.REINIT:
            pruned = train_steps.init_variables(narrow, jax.random.key(config.seed + 1), shape)
    else:
        weight_mask, narrow = masks, model
        pruned = {
            **source,
            "params": jax.tree.map(
                np.asarray, train_steps.apply_weight_mask(source["params"], weight_mask)
            ),
        }
    ctx.results["pruned"] = {
        "criterion": prune_phase.criterion,
        "epoch": net.step // ctx.steps_per_epoch,
        "granularity": names.WEIGHTS if weight_mask is not None else names.CHANNELS,
        "start": prune_phase.start,
    }
    if soft is not None:
        ctx.results["pruned"]["soft"] = soft
    _log_prune(ctx, prune_phase, variables, pruned, weight_mask)
    after = Network(narrow, pruned, net.step, weight_mask)
    if methods.final_stage(phases) is None:  # the method ends with this cut: evaluate it
        after.trainer = _evaluator(ctx, after)
    return after


def _criterion(ctx: RunContext, prune_phase: Prune, model, variables: dict):
    """(channel masks per BN or a weight mask, the variables the cut starts from)."""
    ticket = ctx.search.ticket.masks if ctx.search is not None and ctx.search.ticket else None
    inputs = criteria.Inputs(ctx.config, ticket, functools.partial(_sample_batches, ctx))
    masks, variables = criteria.REGISTRY[prune_phase.criterion].select(
        model, variables, prune_phase.ratio, inputs
    )
    flat = np.concatenate([np.asarray(m, np.uint8).ravel() for m in jax.tree.leaves(masks)])
    parallel.check_same_on_all_processes(flat, f"the {prune_phase.criterion} masks")
    return masks, variables


def check_options(config, phases, data) -> None:
    """ConfigError for a method option the dataset cannot meet, before any training."""
    if data_lib.input_pipeline.steps_per_epoch(data, config.batch_size) == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(data.train)} training examples"
        )
    prune = methods.prune_phase(phases)
    criterion = prune.criterion if prune is not None else None
    if criterion == criteria.THINET and config.thinet_images > len(data.train):
        raise ConfigError(
            f"thinet_images={config.thinet_images} exceeds the {len(data.train)} training "
            f"examples of {config.dataset}; set --config.thinet_images={len(data.train)} "
            "or fewer"
        )
    spe = len(data.train) // config.batch_size
    if criterion == criteria.SNIP and config.snip_batches > spe:
        raise ConfigError(
            f"snip_batches={config.snip_batches} exceeds the {spe} batches of "
            f"{config.batch_size} in {config.dataset}'s training set; set at most {spe}"
        )


def _sample_batches(ctx: RunContext, batch_size: int):
    """The first epoch's training batches of `batch_size`, the same on every process,
    with the images as the model takes them."""
    config = ctx.config
    if len(ctx.data.train) < batch_size:
        raise ConfigError(
            f"a batch of {batch_size} exceeds the {len(ctx.data.train)} "
            "training examples; lower thinet_images / batch_size"
        )
    batches = data_lib.train_batches(
        ctx.data, batch_size, config.seed, 0, 0, 0, 1, num_threads=config.num_data_threads
    )
    mean, std = ctx.data.spec.mean, ctx.data.spec.std
    return ({**b, "image": data_lib.model_input(b["image"], mean, std)} for b in batches)


def _soft_pruned_result(trainer: Trainer) -> dict:
    """SFP's network before the cut (its weakest filters zeroed, their BN offsets still
    live), as the original evaluates it: {'test_accuracy', 'test_top5_accuracy'}."""
    result = trainer.evaluate()
    return {"test_accuracy": result["accuracy"], "test_top5_accuracy": result.get("top5_accuracy")}


def _cut(config, model, masks, variables, fold: dict | None = None):
    """(narrow model, `variables` cut to it) for per-BN keep-masks; `fold`: a dict that
    gets the counts of constant channels folded into the cut network and left out."""
    if isinstance(model, Custom):
        return _cut_traced(config, model, masks, variables)
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
    narrow, cut = apply_cut(model, variables, plan)
    if fold is not None:
        cut, fold["folded_channels"], fold["lost_offsets"] = fold_constant_channels(
            model, variables, plan, cut
        )
        logger.info(
            "folded %d constant channels (zeroed filters' BN offsets) into the cut network; "
            "%d could not be folded exactly",
            fold["folded_channels"],
            fold["lost_offsets"],
        )
    return narrow, cut


def _cut_traced(config, model: Custom, masks, variables):
    """A factory's network cut along its traced channel groups (ticket.cut)."""
    by_path = dict(zip(model.bn_paths(), masks, strict=True))
    try:
        narrow, cut_variables, _ = cut(
            model,
            variables,
            by_path,
            model.example_input(),
            min_channels=config.min_channels,
            round_to=config.round_to,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    widths = getattr(type(narrow), "eb_widths", None)
    narrow = model.clone(cut_widths=json.dumps(widths, sort_keys=True) if widths else None)
    return narrow, jax.tree.map(np.asarray, cut_variables)


def _log_prune(ctx, prune: Prune, before: dict, after: dict, weight_mask) -> None:
    what = "ticket" if prune.criterion == criteria.TICKET else f"{prune.criterion} pruning"
    epoch = ctx.results["pruned"]["epoch"]
    if weight_mask is not None:
        kept = f"{100 * nonzero_fraction(weight_mask):.1f}% of the conv/linear weights kept"
        logger.info("masked the p=%g %s of epoch %d: %s", prune.ratio, what, epoch, kept)
    else:
        n_before = sum(np.size(x) for x in jax.tree.leaves(before["params"]))
        n_after = sum(np.size(x) for x in jax.tree.leaves(after["params"]))
        logger.info(
            "cut the p=%g %s of epoch %d: %d -> %d parameters (%.2fx smaller)",
            prune.ratio,
            what,
            epoch,
            n_before,
            n_after,
            n_before / n_after,
        )


def _evaluator(ctx: RunContext, net: Network) -> Trainer:
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
    return Trainer(ctx, plan, model, fresh_state(ctx, plan, model, net.variables))


def load_init(workdir: str) -> dict:
    """The variables at initialisation that a 'rewind' run saved when it began."""
    path = os.path.join(workdir, "init")
    if not os.path.isdir(path):
        raise ConfigError(
            f"retrain='rewind' needs the weights at initialisation, saved in {path} when the "
            "run starts; this run began without it: use retrain='inherit' or 'reinit'"
        )
    return load_model(path)[1]


def build_model(
    config, num_classes: int, widths: dict | None = None, after_prune: bool = False, shape=None
):
    """The config's model; a factory's (custom) also needs the image `shape` (H, W, C)
    unless `widths` (a checkpoint's) record it, and is checked to be prunable."""
    widths = dict(widths or {})
    if is_custom(config.model) and "image_shape" not in widths:
        widths["image_shape"] = tuple(shape)
    try:
        precision = stage_precision(config, after_prune)
        model = create_model(config.model, num_classes, config.conv_impl, precision, **widths)
        if is_custom(config.model):
            check_custom(model)
        return model
    except ValueError as e:
        raise ConfigError(str(e)) from None
