"""The paper's tables and figures from one command: each a declared grid of ordinary runs.

    python -m eb_jax.experiments NAME --config configs/X.py [--config.FIELD=VALUE] \\
        --workdir runs/NAME [--ratios 0.3,0.5,0.7] [--dry-run]

NAME is one of table2, table3, fig1, fig2, fig5, table1, table4 (docs/method.md says what
each holds). Every run lives in its own sub-workdir, so the command can be run again after
any interruption: finished runs are skipped and a killed one resumes. The outputs (tables
as markdown + CSV + JSON, figures as PNG + CSV + JSON) are built from the runs'
report.json and name the run every number came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from absl import app, flags

from eb_jax import cost, methods, names, paper_outputs, pipeline, platform, report
from eb_jax import main as main_lib
from eb_jax.checkpoint import Checkpointer
from eb_jax.config import (
    GROWABLE_FIELDS,
    TRAJECTORY_FIELDS,
    ConfigError,
    config_differences,
    model_refuses,
    validate,
)
from eb_jax.data import DATASETS
from eb_jax.models import create_model, custom
from eb_jax.prune import criteria
from eb_jax.runlog import format_duration, logger
from eb_jax.ticket.groups import channel_groups, consumer_conv, interior_groups

# The paper's ticket epochs for Fig. 1 (10, 20, 40, 80, 120, 160 of 160) as fractions,
# and Table 1's (10, 20, 40 and final).
TICKET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)
TABLE1_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1)
# Every drawn ticket (the final epoch's too) retrains on one common schedule: inherited
# weights, num_epochs on a fresh run of the config's LR schedule.
RETRAINED = {"method": names.EB, "retrain_schedule": names.FRESH}


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One run of a grid: its sub-workdir, config overrides, and where it goes in the
    output (`row`: a table row or a figure's series; `ratio`; `x`: a ticket epoch)."""

    name: str
    overrides: dict
    row: str
    ratio: float | None = None
    x: int | None = None


TABLE2_ROWS = {  # the paper's Table 2, in its order
    "LT (one-shot)": {"method": names.LT, "lt_granularity": names.WEIGHTS},
    "SNIP": {"method": names.SNIP},
    "NS": {"method": names.NS},
    "ThiNet": {"method": names.THINET},
    "EB Train (re-init)": {
        "method": names.EB,
        "retrain": names.REINIT,
        "retrain_schedule": names.FRESH,
    },
    "EB Train (FF)": {"method": names.EB},
    "EB Train (LF)": {"method": names.EB, "precision.search": "bfp8"},
    "EB Train (LL)": {"method": names.EB, "precision.search": "bfp8", "precision.retrain": "bfp8"},
}
TABLE3_ROWS = {
    "NS": {"method": names.NS},
    "ThiNet": {"method": names.THINET},
    "SFP": {"method": names.SFP},
    "EB Train": {"method": names.EB},
}
# The (method, ratios) cells the paper's Table 3 prints per model; other models (and an
# explicit --ratios) get every method at every ratio.
TABLE3_PRINTED = {
    "resnet18": {"NS": (0.1, 0.3), "SFP": (0.3,), "EB Train": (0.1, 0.3)},
    "resnet50": {"ThiNet": (0.3, 0.5, 0.7), "EB Train": (0.3, 0.5, 0.7)},
}


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-").replace("--", "-")


def _by_method(rows: dict, ratios) -> list[GridRun]:
    return [
        GridRun(f"{_slug(row)}-p{r:g}", {**o, "prune_ratio": r}, row, r)
        for row, o in rows.items()
        for r in ratios
    ]


def _epochs(config, fractions) -> list[int]:
    return sorted({max(1, round(f * config.num_epochs)) for f in fractions})


def _ticket_epochs(config) -> list[int]:
    chosen = tuple(config.grid_ticket_epochs)
    if any(not 1 <= e <= config.num_epochs for e in chosen) or len(set(chosen)) < len(chosen):
        raise ConfigError(
            f"grid_ticket_epochs={chosen} must be distinct epochs in [1, num_epochs="
            f"{config.num_epochs}] (() for the paper's 1/16 ... all of num_epochs)"
        )
    return sorted(chosen) or _epochs(config, TICKET_FRACTIONS)


def _fixed_tickets(config, ratios, extra: dict, label: str) -> list[GridRun]:
    """EB Train with the ticket drawn at fixed epochs, each retrained (Fig. 1, 2, 5)."""
    return [
        GridRun(
            f"{label}-p{r:g}-e{e}",
            {**RETRAINED, "prune_ratio": r, "ticket_epoch": e, **extra},
            label,
            r,
            e,
        )
        for r in ratios
        for e in _ticket_epochs(config)
    ]


def _table1(config, ratios) -> list[GridRun]:
    """Tickets drawn at 1/16, 1/8, 1/4 and all of the epochs (and the detected one) under
    the paper's two search schedules, every ticket retrained on the config's schedule."""
    n = config.num_epochs

    def at(epoch):  # an epoch of the paper's 160, scaled to num_epochs
        return max(1, round(epoch / 160 * n))

    schedules = {
        "lr0.1": (f"[0.1, x0.1 at {at(80)}, {at(120)}]", 0.1, (at(80), at(120))),
        "lr0.01": (f"[0.01, x0.1 at {at(100)}]", 0.01, (at(100),)),
    }
    runs = []
    for slug, (label, lr, boundaries) in schedules.items():
        search = {"search_lr.learning_rate": lr, "search_lr.lr_boundaries": boundaries}
        search["search_lr.lr_decay"] = 0.1
        for r in ratios:
            base = {**RETRAINED, **search, "prune_ratio": r}
            runs += [
                GridRun(f"{slug}-p{r:g}-e{e}", {**base, "ticket_epoch": e}, label, r, e)
                for e in _epochs(config, TABLE1_FRACTIONS)
            ]
            runs.append(GridRun(f"{slug}-p{r:g}-detected", base, label, r))
    return runs


def _table3(config, ratios) -> list[GridRun]:
    printed = TABLE3_PRINTED.get(config.model) if ratios is None else None
    if printed is None:
        ratios = check_ratios(tuple(config.grid_ratios) if ratios is None else tuple(ratios))
        return _by_method(TABLE3_ROWS, ratios)
    return [
        GridRun(f"{_slug(row)}-p{r:g}", {**TABLE3_ROWS[row], "prune_ratio": r}, row, r)
        for row, row_ratios in printed.items()
        for r in row_ratios
    ]


def _schedules(config, ratios, variants: dict) -> list[GridRun]:
    """EB Train (detected ticket) under each search LR schedule (Table 4)."""
    return [
        GridRun(f"{_slug(v)}-p{r:g}", {"method": names.EB, "prune_ratio": r, **o}, v, r)
        for v, o in variants.items()
        for r in ratios
    ]


def check_ratios(ratios: tuple) -> tuple:
    """`ratios` if they make a grid: some, distinct, each in [0, 1); else ConfigError."""
    if not ratios:
        raise ConfigError("no prune ratios given; name some, e.g. --ratios=0.3,0.5")
    if len(set(ratios)) < len(ratios):
        raise ConfigError(f"prune ratios {ratios} repeat a ratio; name each once")
    if not all(0 <= r < 1 for r in ratios):
        raise ConfigError(f"prune ratios {ratios}: every one must be in [0, 1)")
    return ratios


def grid(name: str, config, ratios=None) -> list[GridRun]:
    """The runs of experiment `name` for `config` at prune ratios `ratios` (None: the
    config's grid_ratios; for Table 3 the cells the paper prints for the model)."""
    dense = GridRun("unpruned", {"method": names.DENSE_METHOD}, "Unpruned")
    if name == "table3":
        return [dense, *_table3(config, ratios)]
    ratios = check_ratios(tuple(config.grid_ratios) if ratios is None else tuple(ratios))
    if name == "table2":
        return _by_method(TABLE2_ROWS, ratios)
    if name == "fig1":
        return [dense, *_fixed_tickets(config, ratios, {}, "eb")]
    if name == "fig2":
        return [dense, *_fixed_tickets(config, ratios, {"precision.search": "bfp8"}, "eb-lf")]
    if name == "fig5":
        ns = [
            GridRun(f"ns-p{r:g}", {"method": names.NS, "prune_ratio": r}, "NS", r) for r in ratios
        ]
        return [*_fixed_tickets(config, ratios, {}, "eb"), *ns]
    if name == "table1":
        return _table1(config, ratios)
    if name == "table4":  # a larger initial LR: 0.5 for VGG, 0.2 for PreResNet
        large = 0.2 if config.model.startswith("preresnet") else 0.5
        return _schedules(
            config,
            ratios,
            {f"lr {config.learning_rate:g}": {}, f"lr {large:g}": {"learning_rate": large}},
        )
    raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")


EXPERIMENTS = ("table2", "table3", "fig1", "fig2", "fig5", "table1", "table4")


def run_config(config, run: GridRun):
    """The base config with the run's overrides ('precision.search' reaches a field)."""
    config = config.copy_and_resolve_references()
    for key, value in run.overrides.items():
        node, field = config, key
        while "." in field:
            head, field = field.split(".", 1)
            node = node[head]
        node[field] = value
    return config


def projected_pflops(config) -> tuple[float, float]:
    """The run's training PFLOPs before it runs, as (low, high); equal where exact.

    Exact: dense stages, and networks whose cut p fixes (ThiNet, SFP: per layer). A
    BN-scale ticket's network between the uniform cut (low) and the widest ticket with
    as many channels pruned (high); a detected ticket between eb_window epochs and a
    quarter of num_epochs (assumed)."""
    spec = DATASETS[config.dataset]
    phases, n = methods.method_phases(config), config.num_epochs
    prune = methods.prune_phase(phases)
    dense = _dense_flops(config.model, spec.num_classes, spec.image_shape)
    widths = (dense, dense)
    cut_trains = prune is not None and methods.final_stage(phases) is not None
    if cut_trains and criteria.cuts_channels(prune.criterion):
        widths = _cut_flops(config, prune.criterion)
    detected = (min(n, config.eb_window), max(1, n // 4))
    tickets = (config.ticket_epoch,) * 2 if config.ticket_epoch else detected
    images = spec.train_examples // config.batch_size * config.batch_size
    bounds = []
    for width, ticket in zip(widths, tickets, strict=True):
        total, cut = 0.0, False
        for phase in phases:
            if isinstance(phase, methods.Prune):
                cut = criteria.cuts_channels(phase.criterion)
                continue
            epochs = ticket if phase.until == "ticket" and not config.keep_searching else n
            if phase.schedule == names.CONTINUE and cut:
                epochs = n - ticket if config.method == names.EB else n
            total += cost.training_flops(width if cut else dense, images, epochs)
        bounds.append(total / 1e15)
    return bounds[0], bounds[1]


def _create(model: str, num_classes: int, shape: tuple):
    custom_shape = {"image_shape": tuple(shape)} if custom.is_custom(model) else {}
    return create_model(model, num_classes, **custom_shape)


@functools.cache
def _dense_flops(model: str, num_classes: int, shape: tuple) -> int:
    return cost.forward_cost(_create(model, num_classes, shape), shape).flops


def _cut_flops(config, criterion: str) -> tuple[int, int]:
    """(low, high) forward FLOPs of the network `criterion` cuts at config.prune_ratio."""
    spec = DATASETS[config.dataset]
    return _cut_range(
        config.model,
        spec.num_classes,
        spec.image_shape,
        criterion,
        config.prune_ratio,
        (config.min_channels, config.round_to, config.prune_residual),
    )


@functools.cache
def _cut_range(model_name, num_classes, shape, criterion, ratio, plan_options):
    model = _create(model_name, num_classes, shape)
    if custom.is_custom(model_name):  # no declared groups: the uniform cut .. dense
        dense = cost.forward_cost(model, shape).flops
        return int(dense * (1 - ratio) ** 2), dense
    if criterion != criteria.TICKET:  # ThiNet, SFP: floor(p * C) of every interior layer
        groups = interior_groups(model)
        if criterion == criteria.THINET:  # the layers a conv reads (prune.thinet)
            groups = [g for g in groups if consumer_conv(g) is not None]
        exact = cost.uniform_cut_flops(model, shape, ratio, groups)
        return exact, exact
    min_channels, round_to, residual = plan_options
    # A ticket can be narrower than the uniform cut (docs/method.md, dry runs): the low end
    # is a typical ticket's, the high end a bound.
    low = cost.uniform_cut_flops(model, shape, ratio, channel_groups(model, residual))
    high = cost.widest_ticket_flops(
        model,
        shape,
        ratio,
        min_channels=min_channels,
        round_to=round_to,
        prune_residual=residual,
    )
    return min(low, high), max(low, high)


def format_pflops(bounds) -> str:
    """'15.06' where exact, '~7.68..14.0' (marked) where estimated."""
    low, high = bounds
    if low == high:
        return paper_outputs.paper_number(low, 4)
    return f"~{paper_outputs.paper_number(low)}..{paper_outputs.paper_number(high)}"


def run_grid(name: str, config, workdir: str, ratios=None, dry_run: bool = False) -> list[dict]:
    """Runs (or with `dry_run` lists) the grid; returns the finished runs' reports."""
    # A ViT's grid leaves out the rows it cannot run (ThiNet, SFP, 8-bit search).
    runs = [r for r in grid(name, config, ratios) if not model_refuses(run_config(config, r))]
    configs = [run_config(config, r) for r in runs]
    for c in configs:
        validate(c, 1)
    projected = [projected_pflops(c) for c in configs]
    if dry_run:
        return _list_runs(name, runs, configs, projected)
    paths = [os.path.join(workdir, run.name) for run in runs]
    for path, run_config_ in zip(paths, configs, strict=True):
        check_finished_run(run_config_, path)
    records, started, done_pf = [], time.perf_counter(), 0.0
    for k, (run, run_config_, pf) in enumerate(zip(runs, configs, projected, strict=True)):
        path = paths[k]
        if _finished(path):
            logger.info("[%d/%d] %s: finished, skipped", k + 1, len(runs), run.name)
            records.append(report.read_reports([path])[0])
            continue
        todo = [b for b, p in zip(projected[k:], paths[k:], strict=True) if not _finished(p)]
        left = [sum(b[i] for b in todo) for i in (0, 1)]
        rate = (time.perf_counter() - started) / done_pf if done_pf else None
        eta = "after the first run" if rate is None else _eta(rate, left)
        logger.info(
            "[%d/%d] %s (%s; %s PFLOPs projected), grid ETA %s",
            k + 1,
            len(runs),
            run.name,
            _label(run_config_),
            format_pflops(pf),
            eta,
        )
        records.append(pipeline.run(run_config_, path))
        done_pf += records[-1]["training_pflops"]
    write_outputs(name, runs, records, workdir)
    return records


def _finished(path: str) -> bool:
    return os.path.exists(os.path.join(path, report.REPORT_FILE))


def _recorded_config(path: str) -> dict | None:
    """The config a finished run's report.json records (None if it records none)."""
    try:
        with open(os.path.join(path, report.REPORT_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: its report.json cannot be read ({e}); move it away") from e
    return record.get("config") if isinstance(record, dict) else None


def _eta(seconds_per_pf: float, left_pf) -> str:
    low, high = (format_duration(seconds_per_pf * pf) for pf in left_pf)
    return low if low == high else f"~{low}..{high}"


def check_finished_run(config, path: str) -> None:
    """A finished sub-run is reused only if it ran `config`'s trajectory; ConfigError
    names the fields that differ (nothing is run or overwritten)."""
    if not _finished(path):
        return
    saved = _recorded_config(path) or _checkpoint_config(path)
    if saved is None:
        raise ConfigError(
            f"{path} holds a finished run whose config is recorded nowhere; move it away or "
            "use another --workdir"
        )
    diffs = config_differences(config, saved["fields"], TRAJECTORY_FIELDS + GROWABLE_FIELDS)
    if diffs:
        raise ConfigError(
            f"{path} holds a finished run of another config ({'; '.join(diffs)}); "
            "use another --workdir or the config it ran"
        )


def _checkpoint_config(path: str) -> dict | None:
    """The config record of the run's newest checkpoint (runs from before report.json
    recorded it), or None."""
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        return None
    checkpointer = Checkpointer(path, async_save=False)
    try:
        steps = checkpointer.steps()
        return checkpointer.read_record(max(steps))["config"] if steps else None
    finally:
        checkpointer.close()


def _list_runs(name, runs, configs, projected) -> list:
    lines = [
        f"{name}: {len(runs)} runs",
        f"{'run':28s} {'method':22s} {'p':>5s} {'PFLOPs':>16s}",
    ]
    for run, c, pf in zip(runs, configs, projected, strict=True):
        p = "-" if run.ratio is None else f"{run.ratio:g}"
        lines.append(f"{run.name:28s} {_label(c):22s} {p:>5s} {format_pflops(pf):>16s}")
    total = tuple(sum(b[i] for b in projected) for i in (0, 1))
    lines.append(f"{'total':28s} {'':22s} {'':>5s} {format_pflops(total):>16s}")
    lines.append(
        "(~low..high: estimated; a cut BN-scale ticket between the uniform cut and the widest "
        "ticket with as many channels pruned, a detected ticket between eb_window epochs and "
        "num_epochs / 4; plain numbers exact)"
    )
    print("\n".join(lines))
    return []


def write_outputs(name: str, runs, records, workdir: str) -> None:
    """The experiment's tables or figures in `workdir`, from the runs' reports."""
    cells = [
        {"run": run.name, "row": run.row, "ratio": run.ratio, "x": run.x, **_numbers(r)}
        for run, r in zip(runs, records, strict=True)
    ]
    paper_outputs.write(name, cells, workdir)


def _numbers(record: dict) -> dict:
    """The numbers a table or figure takes from one run's report.json."""
    energy = record.get("energy") or {}
    return {
        "test_accuracy": record["test_accuracy"],
        "test_top5_accuracy": record.get("test_top5_accuracy"),
        "training_pflops": record["training_pflops"],
        "energy_kj": energy.get("total_kj"),
        "ticket_epoch": record["ticket_epoch"],
        "ticket_drawn_by": record["ticket_drawn_by"],
        "model": record.get("model"),
        "dataset": record.get("dataset"),
    }


def _label(config) -> str:
    """How a run's config reads in a listing: 'eb/reinit/fresh', 'lt/weights', 'eb bfp8/fp32'."""
    label = config.method
    if config.method == names.EB:
        label += f"/{config.retrain}" + ("/fresh" if config.retrain_schedule == "fresh" else "")
    if config.method == names.LT:
        label += f"/{config.lt_granularity}"
    precision = {config.precision.search, config.precision.retrain}
    if precision != {"fp32"}:
        label += f" {config.precision.search}/{config.precision.retrain}"
    return label


_RATIOS = flags.DEFINE_string(
    "ratios", None, "Prune ratios, e.g. 0.3,0.5,0.7 (default: config.grid_ratios)."
)
_DRY_RUN = flags.DEFINE_boolean("dry-run", False, "List the runs and their projected cost.")


def _parse(argv: list[str]) -> list[str]:
    rest = main_lib.parse_flags(argv, positional=1)
    if rest[1] not in EXPERIMENTS:
        main_lib.fail(f"unknown experiment {rest[1]!r}; choose one of {', '.join(EXPERIMENTS)}")
    return rest


def _ratios() -> tuple | None:
    """--ratios as numbers; None when not given (the grid's own ratios)."""
    if _RATIOS.value is None:
        return None
    try:
        ratios = tuple(float(r) for r in _RATIOS.value.split(",")) if _RATIOS.value else ()
    except ValueError:
        main_lib.fail(f"--ratios={_RATIOS.value} must be numbers separated by commas, e.g. 0.3,0.5")
    try:
        return check_ratios(ratios)
    except ConfigError as e:
        main_lib.fail(f"--ratios={_RATIOS.value}: {e}")


def _main(argv) -> int:
    from eb_jax.checkpoint import CheckpointError
    from eb_jax.data import DataError
    from eb_jax.epoch_loop import TrainingDiverged
    from eb_jax.runlog import setup_logging

    name, config = argv[1], main_lib.CONFIG[0].value
    platform.configure_process(config.cpu_xla_flags, config.reuse_host_memory)  # before JAX
    setup_logging()
    workdir = main_lib.WORKDIR.value or os.path.join("runs", name)
    try:
        ratios = _ratios()
        if not _DRY_RUN.value:
            pipeline.prepare_workdir(workdir)
        main_lib.run_preemptible(
            lambda: run_grid(name, config, workdir, ratios, _DRY_RUN.value), workdir
        )
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        main_lib.fail(str(e))
    return 0


def main() -> None:
    main_lib.define_config_flag()
    app.run(_main, flags_parser=_parse)


if __name__ == "__main__":
    main()
