"""A run walks its method's declared phases (eb_jax.methods), checkpointed so a killed run
resumes in whichever stage it was; eb_jax.stage_runner runs each phase, eb_jax.run_state
restores them. At the end the run's cost and result go to WORKDIR/report.json and a
printed table; WORKDIR/config.json holds the config it started with.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from eb_jax import (
    cost,
    energy,
    methods,
    names,
    parallel,
    platform,
    report,
    run_state,
    stage_runner,
    train_steps,
)
from eb_jax import data as data_lib
from eb_jax.checkpoint import Checkpointer
from eb_jax.config import ConfigError, check_resumable, config_record, validate, write_config
from eb_jax.epoch_loop import Clock, RunContext, Trainer, energy_now, swa_result
from eb_jax.methods import Stage
from eb_jax.models import bn_scales, model_widths, widths_from_json
from eb_jax.runlog import MetricWriter, logger
from eb_jax.ticket import EarlyBirdDetector
from eb_jax.ticket.export import save_ticket
from eb_jax.ticket.search import TicketSearch, mask_function


def run(config, workdir: str) -> dict:
    """Runs `config.method` on `config.dataset`, resuming from `workdir` if it holds a run.

    Returns the run's report (report.json): method, ticket, accuracy, cost, wall time.
    """
    validate(config, jax.device_count())
    prepare_workdir(workdir, create=False)
    phases = methods.method_phases(config)
    data = data_lib.open_dataset(config.dataset, config.data_dir or None)
    # An unknown model or an option the data cannot meet fails before the workdir is touched.
    dense_model = stage_runner.build_model(config, data.num_classes, shape=data.spec.image_shape)
    stage_runner.check_options(config, phases, data)
    prepare_workdir(workdir)
    if jax.process_index() == 0:
        write_config(config, workdir)
    checkpointer = Checkpointer(workdir, config.checkpoints_to_keep, config.async_checkpoints)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    ctx = None
    try:
        ctx, index, net = _start_or_resume(
            config, phases, data, dense_model, checkpointer, writer, workdir
        )
        for phase in phases[index:]:
            if isinstance(phase, Stage):
                net = stage_runner.train_stage(ctx, phases, phase, net)
            else:
                net = stage_runner.prune(ctx, phases, phase, net)
        return _report(ctx, phases, net)
    finally:
        if ctx is not None:
            ctx.energy.close()  # its sampling thread
        writer.close()
        checkpointer.close()


def _report(ctx: RunContext, phases, net: stage_runner.Network) -> dict:
    """What the run cost and what it got; written to report.json."""
    config, trainer = ctx.config, net.trainer
    tested = _tested(trainer)
    final = tested["accuracy"]
    parallel.check_replicas_same_on_all_processes(trainer.state.params, "the final weights")
    swa = _finish_swa(ctx, trainer, final) if trainer.swa.count else None
    dense, end = _dense_and_final_cost(ctx, trainer.model, net.weight_mask)
    ticket = ctx.search.ticket if ctx.search is not None else None
    pruned = ctx.results["pruned"]
    record = {
        "run": os.path.basename(os.path.normpath(ctx.workdir)),
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "prune_ratio": config.prune_ratio if ticket or pruned else None,
        "retrain": pruned["start"] if pruned and methods.final_stage(phases) else None,
        "ticket_epoch": ticket.epoch if ticket else pruned["epoch"] if pruned else None,
        "ticket_drawn_by": _drawn_by(config, phases, ticket, pruned),
        "test_accuracy": swa["accuracy"] if swa else final,
        "test_top5_accuracy": swa["top5"] if swa else tested["top5"],  # None under 5 classes
        "swa": swa["record"] if swa else None,
        "params": {"dense": dense.params, "final": end.params},
        "forward_flops": {"dense": dense.flops, "final": end.flops},
        "forward_macs": {"dense": dense.macs, "final": end.macs},
        "stages": ctx.results["history"],
        "wall_time_s": ctx.clock.wall_time(),
        "compile_time_s": ctx.clock.compile_s,  # of the steps, part of the wall time
        "devices": platform.describe(whole_run=True),
        "energy": _energy_record(ctx, trainer),
    }
    record["training_pflops"] = sum(s["training_pflops"] for s in record["stages"])
    record["num_epochs"] = config.num_epochs
    # How the pruned network's schedule ran, and whether channels or weights were pruned.
    record["retrain_schedule"] = methods.final_stage(phases).schedule if record["retrain"] else None
    record["granularity"] = pruned["granularity"] if pruned else None
    # SFP: the original's accuracy (filters zeroed, their BN offsets live) next to the cut
    # network's, which test_accuracy (and every table) holds.
    soft = pruned.get("soft") if pruned else None
    record["soft_pruned"] = {**soft, "cut_test_accuracy": final} if soft else None
    record["config"] = config_record(config)  # what a grid checks before reusing the run
    if end.nonzero_macs is not None:
        record["forward_macs"]["final_nonzero"] = end.nonzero_macs
    if jax.process_index() == 0:
        report.write_report(ctx.workdir, record, plot=config.write_plots)
    logger.info("\n%s", report.format_table([record]))
    return record


def _dense_and_final_cost(ctx: RunContext, model, weight_mask) -> tuple:
    """cost.forward_cost of the dense network and of the final one."""
    shape = ctx.data.spec.image_shape
    dense_model = stage_runner.build_model(ctx.config, ctx.data.num_classes, shape=shape)
    dense = cost.forward_cost(dense_model, shape)
    same = model_widths(model) == model_widths(dense_model) and weight_mask is None
    return dense, dense if same else cost.forward_cost(model, shape, weight_mask)


def _tested(trainer: Trainer) -> dict:
    """The final network's test accuracy and top-5: the last epoch's, or evaluated now
    (nothing left to train: a finished run started again, or a cut)."""
    last = trainer.last_metrics
    if "test_accuracy" in last:
        return {"accuracy": last["test_accuracy"], "top5": last.get("test_top5_accuracy")}
    result = trainer.evaluate()
    return {"accuracy": result["accuracy"], "top5": result.get("top5_accuracy")}


def _energy_record(ctx: RunContext, trainer: Trainer) -> dict:
    """The run's measured energy (kJ, over every stage, restart and process), accelerator
    and host apart, what kills threw away, and the meters; an n/a total says why."""
    return energy.summary(energy_now(trainer), ctx.energy)


def _finish_swa(ctx: RunContext, trainer: Trainer, last: float) -> dict:
    """The SWA model's accuracy and record; its variables exported to WORKDIR/swa."""
    metrics, variables = swa_result(trainer)
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
        "epochs_averaged": trainer.swa.count,
        "test_accuracy_without": last,
    }
    return {"accuracy": metrics["accuracy"], "top5": metrics.get("top5_accuracy"), "record": record}


def _drawn_by(config, phases, ticket, pruned) -> str | None:
    """How the ticket (or the pruning) was decided: report.json's ticket_drawn_by."""
    if ticket is None:
        return pruned["criterion"] if pruned else None
    search = next(s for s in methods.stages(phases) if s.name == names.SEARCH)
    if search.until == "schedule":
        return "full search"
    if config.ticket_epoch:
        return "ticket_epoch"
    return "detector" if ticket.emerged else "no emergence"


def _new_search(config, phases, model, input_shape) -> TicketSearch | None:
    if not methods.draws_tickets(phases):
        return None
    detector = EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    shapes = jax.eval_shape(
        lambda: train_steps.init_variables(model, jax.random.key(0), input_shape)
    )
    sizes = [s.shape[0] for s in bn_scales(model, shapes["params"])]
    return TicketSearch(
        config.monitor_ratios, config.prune_ratio, detector, sizes, mask_function(model)
    )


def _start_or_resume(config, phases, data, dense_model, checkpointer, writer, workdir):
    """(RunContext, index of the phase to run next, Network) fresh or from the newest
    readable checkpoint; the model is rebuilt from its recorded widths first."""
    shape = data.spec.image_shape
    search = _new_search(config, phases, dense_model, shape)
    ctx = RunContext(config, data, workdir, checkpointer, writer, Clock(), search)
    meter = _open_meter()
    built = {}
    restored = checkpointer.restore(lambda record: _restore_target(ctx, phases, record, built))
    if restored is None:
        variables = train_steps.init_variables(dense_model, jax.random.key(config.seed), shape)
        _save_init_for_rewind(ctx, phases, dense_model, variables)
        ctx.clock = Clock()  # the wall time counts from here: training, not start-up
        ctx.energy = _energy_clock(config, meter, workdir, None, -1, 0.0)  # and the energy
        return ctx, 0, stage_runner.Network(dense_model, variables)
    step, arrays, record = restored
    back = run_state.restored(arrays, record, built["state"])
    if search is not None and back.search is not None:
        search.load_state_dict(*back.search)
    ctx.clock = Clock(*back.clock)
    ctx.energy = _energy_clock(config, meter, workdir, back.energy, step, back.clock[0])
    ctx.results = back.results
    logger.info(
        "resuming the run in %s from its checkpoint at step %d (epoch %d, stage %s)",
        workdir,
        step,
        record["epoch"],
        back.stage,
    )
    net = stage_runner.Network(
        built["model"],
        step=step,
        weight_mask=back.weight_mask,
        state=back.state,
        resume=back.resume,
        stage_start=back.stage_start,
    )
    return ctx, phases.index(built["stage"]), net


def _open_meter() -> energy.Meter:
    """This process's meter: its own devices, and its host's RAPL if it is the host's
    first process (the processes' host keys gathered)."""
    keys = parallel.gather_over_processes(np.array([energy.host_key()], np.int64))
    meter = energy.open_meter(host_reader=energy.host_reader(keys[:, 0], jax.process_index()))
    for channel in energy.CHANNELS:
        name, why = meter.name(channel), meter.channels[channel].why
        logger.info("energy, %s: %s", channel, f"measured by {name}" if name else f"n/a ({why})")
    return meter


def _energy_clock(config, meter, workdir: str, saved, step: int, wall_s: float):
    """The run's energy clock from its checkpoint of `step` (-1: none), sampling."""
    gather = parallel.gather_over_processes if jax.process_count() > 1 else None
    note = energy.note_path(workdir, jax.process_index())
    clock = energy.resumed_clock(meter, saved, step, wall_s, note, gather)
    clock.start(config.energy_sample_seconds)
    return clock


def _restore_target(ctx: RunContext, phases, record: dict, built: dict) -> dict:
    """The arrays a checkpoint with JSON `record` holds, as abstract targets; the
    stage's model and its fresh TrainState built for them go into `built`."""
    config, data = ctx.config, ctx.data
    check_resumable(config, record, ctx.workdir)
    stage = _stage_named(phases, record["stage"])
    after = methods.after_prune(phases, stage)
    widths = widths_from_json(record["widths"])
    model = stage_runner.build_model(config, data.num_classes, widths, after)
    shape = data.spec.image_shape
    shapes = jax.eval_shape(lambda: train_steps.init_variables(model, jax.random.key(0), shape))
    plan = stage_runner.stage_plan(ctx, phases, stage, record["stage_start_step"])
    built.update(stage=stage, model=model, state=stage_runner.fresh_state(ctx, plan, model, shapes))
    return run_state.restore_target(record, built["state"], ctx.search)


def _stage_named(phases, name: str) -> Stage:
    for stage in methods.stages(phases):
        if stage.name == name:
            return stage
    raise ConfigError(f"the checkpoint is in stage {name!r}, which this method does not have")


def _save_init_for_rewind(ctx: RunContext, phases, model, variables) -> None:
    """Keeps the weights at initialisation for a method that rewinds to them; a run
    killed before its first checkpoint has them already (the same seed, the same init)."""
    prune = methods.prune_phase(phases)
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


def prepare_workdir(workdir: str, create: bool = True) -> None:
    """Creates `workdir` if needed and makes sure files can be written there; ConfigError
    (one line) when not: a file, a dangling symlink, under a file, read-only. Without
    `create` only what needs no change on disk is checked."""
    if os.path.islink(workdir) and not os.path.exists(workdir):
        target = os.readlink(workdir)
        raise ConfigError(f"--workdir {workdir} is a symlink to {target}, which does not exist")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; name a directory")
    if not create:
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"--workdir {workdir}: cannot write there ({e.strerror or e}); name a writable "
            "directory"
        ) from None


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "quickstart"
    return os.path.join("runs", name)
