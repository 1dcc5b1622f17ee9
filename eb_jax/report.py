"""Run feedback: progress lines, TensorBoard scalars, a JSON-lines metrics log, plots,
and the run's report (report.json, a Table-2-like table, a cost chart).

    python -m eb_jax.report runs/dense runs/ns runs/eb --plot cost.png
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from eb_jax import names
from eb_jax.runlog import format_duration, setup_logging, write_json  # noqa: F401 (re-exported)


def plot_mask_distances(search, path: str) -> None:
    """Paper Fig. 3: pairwise mask distances over the recorded epochs, one panel per ratio,
    min-max normalised to [0, 1]; the detection epoch is marked."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    from eb_jax.ticket import pairwise_distances

    ratios = search.ratios
    fig = Figure(figsize=(4 * len(ratios), 3.8))
    axes = fig.subplots(1, len(ratios), squeeze=False)
    epochs = search.epochs
    for ax, ratio in zip(axes[0], ratios, strict=True):
        matrix = pairwise_distances(search.history[ratio])
        span = matrix.max() - matrix.min()
        shown = (matrix - matrix.min()) / span if span > 0 else np.zeros_like(matrix)
        extent = (epochs[0] - 0.5, epochs[-1] + 0.5, epochs[-1] + 0.5, epochs[0] - 0.5)
        image = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, extent=extent)
        title = f"p = {ratio:g}"
        if ratio in search.detected:
            e = search.detected[ratio]
            ax.axhline(e, color="w", ls="--", lw=1)
            ax.axvline(e, color="w", ls="--", lw=1)
            title += f" (EB ticket at epoch {e})"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="normalised mask distance")
    fig.savefig(path, dpi=120, bbox_inches="tight")


# --- The run's report (the paper's Table 2 costs): report.json, a table, a cost chart ---

REPORT_FILE = "report.json"
_COLUMNS = (
    "run",
    "method",
    "p",
    "precision",
    "ticket",
    "test acc",
    "PFLOPs",
    "kJ",
    "vs dense",
    "wall time",
    "params",
)  # the paper's Table 2 pairs energy (kJ, measured; n/a without a meter) with PFLOPs

_DRAWN_BY = {"ticket_epoch": " fixed", "no emergence": " none", "full search": " final"}


def write_report(workdir: str, record: dict, plot: bool = True) -> None:
    """WORKDIR/report.json and (`plot`) WORKDIR/cost.png."""
    write_json(os.path.join(workdir, REPORT_FILE), record, indent=1)
    if plot:
        plot_costs([record], os.path.join(workdir, "cost.png"))


def read_reports(workdirs) -> list[dict]:
    """The report.json of each run directory; ValueError names one that has none."""
    records = []
    for workdir in workdirs:
        path = os.path.join(workdir, REPORT_FILE)
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            raise ValueError(
                f"{workdir} has no {REPORT_FILE}: not a run directory, or the run has not "
                "finished (run its command again to finish it)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); run its command again") from None
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
        _check_record(record, path)
        records.append(record)
    return records


# What the table and the chart read from a report.json.
_REPORT_FIELDS = (
    "run",
    "method",
    "retrain",
    "prune_ratio",
    "ticket_epoch",
    "ticket_drawn_by",
    "test_accuracy",
    "training_pflops",
    "wall_time_s",
    "params",
    "stages",
)
_STAGE_FIELDS = ("stage", "epochs", "training_pflops")


def _check_record(record, path: str) -> None:
    """ValueError unless `record` is a run's report with the fields the table reads."""
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not a run's report")
    missing = [k for k in _REPORT_FIELDS if k not in record]
    stages = record.get("stages")
    if not missing and not (
        isinstance(stages, list)
        and stages
        and all(isinstance(s, dict) and all(k in s for k in _STAGE_FIELDS) for s in stages)
    ):
        missing = ["stages (a list of stages with " + ", ".join(_STAGE_FIELDS) + ")"]
    if not missing and not (isinstance(record["params"], dict) and "final" in record["params"]):
        missing = ["params.final"]
    if missing:
        raise ValueError(
            f"{path} is not a complete run report: it lacks {', '.join(missing)} (written "
            "by another program, or damaged; run its command again)"
        )


def format_table(records: list[dict]) -> str:
    """The runs side by side, like the paper's Table 2. 'ticket': the epoch it was drawn
    after ('fixed': config.ticket_epoch; 'none': never emerged, last mask; 'final': after
    the full search of 'ns'/'lt'). 'vs dense': training cost over that of dense training
    on the same schedule."""
    rows = [_COLUMNS]
    for r in records:
        dense_run = dense_run_pflops(r)
        ticket = "-" if r["ticket_epoch"] is None else str(r["ticket_epoch"])
        ticket += _DRAWN_BY.get(r["ticket_drawn_by"], "")
        rows.append(
            (
                r["run"],
                method_label(r),
                "-" if r["prune_ratio"] is None else f"{r['prune_ratio']:g}",
                _precision(r),
                ticket,
                f"{100 * r['test_accuracy']:.2f}%" + (" swa" if r.get("swa") else ""),
                _format_pflops(r["training_pflops"]),
                _format_kj(r),
                f"{r['training_pflops'] / dense_run:.2f}x" if dense_run else "-",
                format_duration(r["wall_time_s"]),
                f"{r['params']['final']:,}",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + energy_notes(records))


def energy_notes(records: list[dict]) -> list[str]:
    """One line per run under the table: what its kJ are (the accelerator's, or the
    host CPU's when JAX ran on the CPU), the other figure beside them, or why n/a."""
    lines = []
    for r in records:
        e = r.get("energy") or {}
        if "counted" not in e:  # a report from before the figures were kept apart
            if e.get("why_not"):
                lines.append(f"{r['run']}: kJ n/a: {e['why_not']}")
            continue
        shown, other = e["counted"], "host" if e["counted"] == "accelerator" else "accelerator"
        what = "GPU/accelerator" if shown == "accelerator" else "host CPU (JAX ran on the CPU)"
        text = f"{what} energy by {e['meter']}" if e["total_kj"] is not None else "n/a"
        if e["total_kj"] is None:
            text += f" ({e['why_not']})"
        part = e[other]
        if part["total_kj"] is not None:
            text += f"; {other} {part['total_kj']:.3g} kJ apart, by {part['meter']}"
        lines.append(f"{r['run']}: kJ = {text}")
    return [""] + lines if lines else []


def _precision(record: dict) -> str:
    """The stages' number formats in order, e.g. 'bfp8/fp32' (the paper's LF)."""
    names = [s.get("precision", "fp32") for s in record["stages"]]
    return names[0] if len(set(names)) == 1 else "/".join(names)


def method_label(record: dict) -> str:
    """'eb/inherit', 'eb/reinit/fresh', 'lt/weights', 'snip', ...: the method as it ran."""
    label = record["method"]
    if label == names.EB and record["retrain"]:
        label += f"/{record['retrain']}"
        if record.get("retrain_schedule") == names.FRESH:
            label += "/fresh"
    if label == names.LT and record.get("granularity") == names.WEIGHTS:
        label += "/weights"
    return label


def dense_run_pflops(record: dict) -> float:
    """The training cost of dense training on the run's schedule (num_epochs): the first
    stage of every method trains the dense network."""
    first = record["stages"][0]
    per_epoch = first["training_pflops"] / max(first["epochs"], 1)
    if "num_epochs" in record:
        return per_epoch * record["num_epochs"]
    total = sum(s["epochs"] for s in record["stages"])  # reports written before num_epochs
    return per_epoch * (total // 2 if record["method"] in (names.NS, names.LT) else total)


def _format_kj(record: dict) -> str:
    total = (record.get("energy") or {}).get("total_kj")
    return "n/a" if total is None else f"{total:.3g}"


def _format_pflops(pflops: float) -> str:
    return f"{pflops:.3g}" if pflops >= 1e-3 else f"{pflops:.3e}"


def plot_costs(records: list[dict], path: str) -> None:
    """Draws `cost_figure(records)` to the PNG `path`."""
    cost_figure(records).savefig(path, dpi=120, bbox_inches="tight")


def _stacked_stages(ax, i: int, stages: list, scale: float, colors: dict, seen: set) -> None:
    """Run i's stages as stacked bars, each labelled with its epochs; a stage's name goes
    to the legend the first time it is `seen`."""
    bottom = 0.0
    for s in stages:
        label = None if s["stage"] in seen else s["stage"]
        seen.add(s["stage"])
        height = s["training_pflops"] * scale
        ax.bar(i, height, bottom=bottom, color=colors.get(s["stage"], "tab:red"), label=label)
        if height:
            ax.text(
                i, bottom + height / 2, f"{s['epochs']} ep.", ha="center", va="center", fontsize=8
            )
        bottom += height


def cost_figure(records: list[dict]):
    """Training FLOPs per run, stacked by stage, in a unit that suits their size, with
    each run's dense training on the same schedule as a dashed reference."""
    from matplotlib.figure import Figure

    colors = {
        names.DENSE: "tab:gray",
        names.SEARCH: "tab:blue",
        names.RETRAIN: "tab:orange",
        names.MASKED: "tab:green",
        names.SOFT: "tab:purple",
    }
    scale, unit = flops_unit(max(max(r["training_pflops"], dense_run_pflops(r)) for r in records))
    fig = Figure(figsize=(1.6 + 1.5 * len(records), 3.8))
    ax = fig.subplots()
    labels = [
        f"{r['run']}\n{method_label(r)}\n{_precision(r)}, {100 * r['test_accuracy']:.1f}%"
        for r in records
    ]
    seen = set()
    for i, r in enumerate(records):
        _stacked_stages(ax, i, r["stages"], scale, colors, seen)
        dense = dense_run_pflops(r) * scale
        ax.hlines(
            dense,
            i - 0.45,
            i + 0.45,
            colors="k",
            linestyles="--",
            lw=1,
            label=None if i else "dense training, same schedule",
        )
    ax.set_xticks(range(len(records)), labels, fontsize=8)
    ax.set_ylabel(f"training cost ({unit})")
    ax.set_title("training cost by stage (3 x forward x images x epochs)")
    ax.legend(fontsize=8)
    return fig


def flops_unit(pflops: float) -> tuple[float, str]:
    """(factor from PFLOPs, unit name) so that `pflops` reads between 1 and 1000."""
    for factor, unit in ((1, "PFLOPs"), (1e3, "TFLOPs"), (1e6, "GFLOPs"), (1e9, "MFLOPs")):
        if pflops * factor >= 1:
            return factor, unit
    return 1e12, "kFLOPs"


def main(argv=None) -> int:
    """python -m eb_jax.report DIR... [--plot PATH]: the runs' reports in one table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eb_jax.report", description=main.__doc__)
    parser.add_argument("workdirs", nargs="+", metavar="DIR", help="run directories")
    parser.add_argument("--plot", metavar="PATH", help="also draw the runs' costs to a PNG")
    args = parser.parse_args(argv)
    try:
        records = read_reports(args.workdirs)
        if args.plot:
            check_plot_path(args.plot)
    except ValueError as e:
        print(f"eb_jax.report: error: {e}", file=sys.stderr)
        return 2
    try:
        table = format_table(records)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a field of the wrong type
        print(f"eb_jax.report: error: a report.json field has a wrong value ({e})", file=sys.stderr)
        return 2
    print(table)
    if args.plot:
        try:
            plot_costs(records, args.plot)
        except OSError as e:
            print(f"eb_jax.report: error: cannot write {args.plot}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"cost chart: {args.plot}")
    return 0


def check_plot_path(path: str) -> None:
    """ValueError unless a figure can go to `path`: its folder exists, and matplotlib
    knows its extension (or it has none: PNG)."""
    from matplotlib.figure import Figure

    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path} is a directory; name a file, e.g. {path}/cost.png")
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    known = Figure().canvas.get_supported_filetypes()
    if extension and extension not in known:
        raise ValueError(
            f"--plot {path}: unknown image type .{extension}; use one of "
            f"{', '.join('.' + k for k in sorted(known))}"
        )


if __name__ == "__main__":
    sys.exit(main())
