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
import os
import time

from absl import app, flags

from eb_jax import cost, methods, names, paper_outputs, pipeline, report
from eb_jax import main as main_lib
from eb_jax.config import ConfigError, model_refuses, validate
from eb_jax.data import DATASETS
from eb_jax.models import create_model, custom
from eb_jax.runlog import format_duration, logger

# The paper's ticket epochs for Fig. 1 (10, 20, 40, 80, 120, 160 of 160) as fractions.
TICKET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)


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
    "LT": {"method": names.LT, "lt_granularity": names.WEIGHTS},
    "SNIP": {"method": names.SNIP},
    "NS": {"method": names.NS},
    "ThiNet": {"method": names.THINET},
    "EB Train (re-init)": {
        "method": names.EB,
        "retrain": names.REINIT,
        "retrain_schedule": "fresh",
    },
    "EB Train FF": {"method": names.EB},
    "EB Train LF": {"method": names.EB, "precision.search": "bfp8"},
    "EB Train LL": {"method": names.EB, "precision.search": "bfp8", "precision.retrain": "bfp8"},
}
TABLE2_BASELINES = ("LT", "SNIP", "NS", "ThiNet")
TABLE3_ROWS = {
    "NS": {"method": names.NS},
    "ThiNet": {"method": names.THINET},
    "SFP": {"method": names.SFP},
    "EB Train": {"method": names.EB},
}


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-").replace("--", "-")


def _by_method(rows: dict, ratios) -> list[GridRun]:
    return [
        GridRun(f"{_slug(row)}-p{r:g}", {**o, "prune_ratio": r}, row, r)
        for row, o in rows.items()
        for r in ratios
    ]


def _ticket_epochs(config) -> list[int]:
    if config.grid_ticket_epochs:
        return sorted(set(config.grid_ticket_epochs))
    return sorted({max(1, round(f * config.num_epochs)) for f in TICKET_FRACTIONS})


def _fixed_tickets(config, ratios, extra: dict, label: str) -> list[GridRun]:
    """EB Train with the ticket drawn at fixed epochs (Fig. 1, 2, 5)."""
    return [
        GridRun(
            f"{label}-p{r:g}-e{e}",
            {"method": names.EB, "prune_ratio": r, "ticket_epoch": e, **extra},
            label,
            r,
            e,
        )
        for r in ratios
        for e in _ticket_epochs(config)
    ]


def _schedules(config, ratios, variants: dict) -> list[GridRun]:
    """EB Train (detected ticket) under each search LR schedule (Tables 1, 4)."""
    return [
        GridRun(f"{_slug(v)}-p{r:g}", {"method": names.EB, "prune_ratio": r, **o}, v, r)
        for v, o in variants.items()
        for r in ratios
    ]


def grid(name: str, config, ratios) -> list[GridRun]:
    """The runs of experiment `name` for `config` at prune ratios `ratios`."""
    dense = GridRun("unpruned", {"method": names.DENSE_METHOD}, "Unpruned")
    n = config.num_epochs
    if name == "table2":
        return _by_method(TABLE2_ROWS, ratios)
    if name == "table3":
        return [dense, *_by_method(TABLE3_ROWS, ratios)]
    if name == "fig1":
        return [dense, *_fixed_tickets(config, ratios, {}, "eb")]
    if name == "fig2":
        return [dense, *_fixed_tickets(config, ratios, {"precision.search": "bfp8"}, "eb-lf")]
    if name == "fig5":
        ns = [
            GridRun(f"ns-p{r:g}", {"method": names.NS, "prune_ratio": r}, "NS", r) for r in ratios
        ]
        return [*_fixed_tickets(config, ratios, {}, "eb"), *ns]
    if name == "table1":  # the paper's [0.1, x0.1 at 80, 120] against [0.01, x0.1 at 100]
        late = (round(100 / 160 * n),)
        given = (
            f"lr {config.learning_rate:g}, x{config.lr_decay:g} at {tuple(config.lr_boundaries)}"
        )
        lower = {"learning_rate": 0.01, "lr_boundaries": late, "lr_decay": 0.1}
        return _schedules(config, ratios, {given: {}, f"lr 0.01, x0.1 at {late}": lower})
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


def projected_pflops(config) -> float:
    """The run's training cost before it runs: dense stages exactly (the paper's count);
    a cut network's stages at (1 - p)^2 of dense, a BN-scale ticket detected at epoch
    num_epochs / 8 (where the paper's emerged): estimates, until report.json has the truth."""
    spec = DATASETS[config.dataset]
    shape = {"image_shape": tuple(spec.image_shape)} if custom.is_custom(config.model) else {}
    model = create_model(config.model, spec.num_classes, **shape)
    dense = cost.forward_cost(model, spec.image_shape).flops
    images = spec.train_examples // config.batch_size * config.batch_size
    steps, n = methods.method_steps(config), config.num_epochs
    ticket = config.ticket_epoch or max(1, n // 8)
    total, cut = 0.0, False
    for step in steps:
        if isinstance(step, methods.Prune):
            cut = step.criterion in methods.CHANNEL_CRITERIA
            continue
        until_ticket = step.until == "ticket" and not config.keep_searching
        epochs = ticket if until_ticket else n
        if step.schedule == names.CONTINUE and cut:
            epochs = n - ticket if config.method == names.EB else n
        width = (1 - config.prune_ratio) ** 2 if cut else 1.0
        total += cost.training_flops(dense * width, images, epochs)
    return total / 1e15


def run_grid(name: str, config, workdir: str, ratios, dry_run: bool = False) -> list[dict]:
    """Runs (or with `dry_run` lists) the grid; returns the finished runs' reports."""
    # A ViT's grid leaves out the rows it cannot run (ThiNet, SFP, 8-bit search).
    runs = [r for r in grid(name, config, ratios) if not model_refuses(run_config(config, r))]
    configs = [run_config(config, r) for r in runs]
    for c in configs:
        validate(c, 1)
    projected = [projected_pflops(c) for c in configs]
    if dry_run:
        return _list_runs(name, runs, configs, projected)
    records, started, done_pf = [], time.perf_counter(), 0.0
    for k, (run, run_config_, pf) in enumerate(zip(runs, configs, projected, strict=True)):
        path = os.path.join(workdir, run.name)
        if os.path.exists(os.path.join(path, report.REPORT_FILE)):
            logger.info("[%d/%d] %s: finished, skipped", k + 1, len(runs), run.name)
            records.append(report.read_reports([path])[0])
            continue
        elapsed = time.perf_counter() - started
        left = sum(projected[k:])
        eta = format_duration(elapsed / done_pf * left) if done_pf else "after the first run"
        logger.info(
            "[%d/%d] %s (%s; ~%.3g PFLOPs projected), grid ETA %s",
            k + 1,
            len(runs),
            run.name,
            _label(run_config_),
            pf,
            eta,
        )
        records.append(pipeline.run(run_config_, path))
        done_pf += pf
    write_outputs(name, runs, records, workdir)
    return records


def _list_runs(name, runs, configs, projected) -> list:
    lines = [f"{name}: {len(runs)} runs", f"{'run':28s} {'method':22s} {'p':>5s} {'PFLOPs':>9s}"]
    for run, c, pf in zip(runs, configs, projected, strict=True):
        p = "-" if run.ratio is None else f"{run.ratio:g}"
        lines.append(f"{run.name:28s} {_label(c):22s} {p:>5s} {pf:9.4g}")
    lines.append(f"{'total':28s} {'':22s} {'':>5s} {sum(projected):9.4g}")
    lines.append("(projected: dense stages exact; pruned stages and detected tickets estimated)")
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


def _ratios(config) -> tuple:
    if not _RATIOS.value:
        return tuple(config.grid_ratios)
    try:
        ratios = tuple(float(r) for r in _RATIOS.value.split(","))
    except ValueError:
        main_lib.fail(f"--ratios={_RATIOS.value} must be numbers separated by commas, e.g. 0.3,0.5")
    if not all(0 <= r < 1 for r in ratios):
        main_lib.fail(f"--ratios={_RATIOS.value}: every prune ratio must be in [0, 1)")
    return ratios


def _main(argv) -> int:
    from eb_jax.checkpoint import CheckpointError
    from eb_jax.data import DataError
    from eb_jax.runlog import setup_logging
    from eb_jax.trainer import TrainingDiverged

    name, config = argv[1], main_lib.CONFIG[0].value
    setup_logging()
    workdir = main_lib.WORKDIR.value or os.path.join("runs", name)
    try:
        ratios = _ratios(config)
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
