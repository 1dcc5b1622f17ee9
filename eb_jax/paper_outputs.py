"""The paper's tables and figures from an experiment grid's runs (eb_jax.experiments).

Each output is written as the paper lays it out (markdown), as CSV (one line per run) and
as JSON (every number with the run directory it came from); figures also as PNG.
"""

from __future__ import annotations

import csv
import os

from eb_jax.report import flops_unit
from eb_jax.runlog import write_json

FIELDS = (
    "run",
    "row",
    "ratio",
    "x",
    "test_accuracy",
    "test_top5_accuracy",
    "training_pflops",
    "energy_kj",
    "ticket_epoch",
    "ticket_drawn_by",
)
BASELINES = ("LT", "SNIP", "NS", "ThiNet")  # Table 2's; the rest of its rows are EB Train's


def write(name: str, cells: list[dict], workdir: str) -> None:
    """WORKDIR/NAME.md, .csv, .json (and .png for a figure) from the runs' `cells`."""
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, name)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: c.get(k) for k in FIELDS} for c in cells)
    if name.startswith("fig"):
        markdown, extra = _figure(name, cells, base + ".png"), {}
    else:
        markdown, extra = _TABLES[name](cells)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    write_json(base + ".json", {"experiment": name, "runs": cells, **extra}, indent=1)


def _kj(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _ratios(cells) -> list:
    return sorted({c["ratio"] for c in cells if c["ratio"] is not None})


def _rows(cells) -> list:
    return list(dict.fromkeys(c["row"] for c in cells))


def _cell(cells, row, ratio) -> dict | None:
    found = [c for c in cells if c["row"] == row and c["ratio"] in (ratio, None)]
    return found[0] if found else None


def _markdown(title: str, header: list, rows: list, notes=()) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join([*lines, "", *[f"- {n}" for n in notes]]).rstrip() + "\n"


def _table2(cells) -> tuple[str, dict]:
    ratios = _ratios(cells)
    body = [[row, *[_t2(_cell(cells, row, r)) for r in ratios]] for row in _rows(cells)]
    improvement = {r: _improvement(cells, r) for r in ratios}
    body.append(["EB Train improv.", *[improvement[r]["text"] for r in ratios]])
    notes = [
        "cells: retrain test accuracy / energy kJ (measured; n/a without a meter) / training "
        "PFLOPs (3 x forward x images x epochs)",
        "improv.: accuracy = EB Train FF - the most accurate baseline; energy = the cheapest "
        "baseline's / EB Train LL's; FLOPs = the cheapest baseline's / the cheapest EB Train's",
    ]
    md = _markdown("Table 2", ["method", *[f"p = {r:g}" for r in ratios]], body, notes)
    return md, {"improvement": {f"{r:g}": v for r, v in improvement.items()}, "notes": notes}


def _t2(c) -> str:
    if c is None:
        return "-"
    return f"{100 * c['test_accuracy']:.2f}% / {_kj(c['energy_kj'])} / {c['training_pflops']:.3g}"


def _improvement(cells, ratio) -> dict:
    base = [c for b in BASELINES if (c := _cell(cells, b, ratio))]
    ebs = [c for c in cells if c["ratio"] == ratio and c["row"].startswith("EB Train")]
    ff, ll = _cell(cells, "EB Train FF", ratio), _cell(cells, "EB Train LL", ratio)
    if not base or ff is None:
        return {"accuracy_points": None, "energy_x": None, "flops_x": None, "text": "-"}
    points = 100 * (ff["test_accuracy"] - max(c["test_accuracy"] for c in base))
    kj = [c["energy_kj"] for c in base if c["energy_kj"] is not None]
    energy = min(kj) / ll["energy_kj"] if kj and ll and ll["energy_kj"] else None
    flops = min(c["training_pflops"] for c in base) / min(c["training_pflops"] for c in ebs)
    text = f"{points:+.2f} pt / {'n/a' if energy is None else f'{energy:.2f}x'} / {flops:.2f}x"
    return {"accuracy_points": points, "energy_x": energy, "flops_x": flops, "text": text}


def _table3(cells) -> tuple[str, dict]:
    ratios, dense = _ratios(cells), _cell(cells, "Unpruned", None)

    def text(c):
        if c is None:
            return "-"
        top1, top5 = 100 * c["test_accuracy"], c["test_top5_accuracy"]
        parts = [
            f"top-1 {top1:.2f}%"
            + (f" ({top1 - 100 * dense['test_accuracy']:+.2f})" if dense and c is not dense else "")
        ]
        if top5 is not None:
            parts.append(f"top-5 {100 * top5:.2f}%")
        return " / ".join([*parts, f"{c['training_pflops']:.3g} PF", f"{_kj(c['energy_kj'])} kJ"])

    body = [[row, *[text(_cell(cells, row, r)) for r in ratios]] for row in _rows(cells)]
    notes = [
        "cells: top-1 (change vs. unpruned) / top-5 / training PFLOPs / energy kJ",
        "SFP: the cut network's accuracy (the network its FLOPs count); the original reports "
        "the soft-pruned one (filters zeroed, their BN offsets live): report.json's "
        "soft_pruned holds both",
    ]
    return _markdown("Table 3", ["method", *[f"p = {r:g}" for r in ratios]], body, notes), {}


def _schedule_table(title: str, note: str):
    def table(cells) -> tuple[str, dict]:
        ratios = _ratios(cells)

        def text(c):
            if c is None:
                return "-"
            how = "" if c["ticket_drawn_by"] == "detector" else f" ({c['ticket_drawn_by']})"
            return f"ticket after {c['ticket_epoch']}{how} / {100 * c['test_accuracy']:.2f}%"

        body = [[row, *[text(_cell(cells, row, r)) for r in ratios]] for row in _rows(cells)]
        notes = ["cells: the epoch the ticket was drawn after / retrain test accuracy", note]
        md = _markdown(title, ["search schedule", *[f"p = {r:g}" for r in ratios]], body, notes)
        return md, {"notes": notes}

    return table


_TABLES = {
    "table2": _table2,
    "table3": _table3,
    "table1": _schedule_table(
        "Table 1",
        "eb_jax retrains on the schedule the search began (it goes on from the ticket's "
        "epoch), so the two rows' retraining differs with their search schedule",
    ),
    "table4": _schedule_table("Table 4", "the retraining goes on with the search's schedule"),
}


def _figure(name: str, cells: list[dict], path: str) -> str:
    """Fig. 1/2: retrain accuracy vs. ticket epoch per ratio, the unpruned accuracy dashed;
    Fig. 5: total training FLOPs vs. ticket epoch, EB Train against network slimming."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    key = "training_pflops" if name == "fig5" else "test_accuracy"
    scale, unit = flops_unit(max(c[key] for c in cells)) if name == "fig5" else (100, "%")
    points, colors = [c for c in cells if c["x"] is not None], {}
    for ratio in _ratios(points):
        line = sorted((c["x"], scale * c[key]) for c in points if c["ratio"] == ratio)
        drawn = ax.plot(*zip(*line, strict=True), marker="o", label=f"EB Train, p = {ratio:g}")
        colors[ratio] = drawn[0].get_color()
    for c in cells:
        if c["x"] is None:  # a reference: the unpruned run, or network slimming per ratio
            label = c["row"] if c["ratio"] is None else f"{c['row']}, p = {c['ratio']:g}"
            color = colors.get(c["ratio"], "k")
            ax.axhline(scale * c[key], ls="--", lw=1, color=color, label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch the ticket is drawn after")
    ax.set_ylabel(f"total training {unit}" if name == "fig5" else "retrain test accuracy (%)")
    title = {"fig1": "Fig. 1", "fig2": "Fig. 2 (8-bit search)", "fig5": "Fig. 5"}[name]
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    header = ["run", "p", "ticket epoch", "test accuracy", "training PFLOPs"]
    body = [
        [
            c["run"],
            "-" if c["ratio"] is None else f"{c['ratio']:g}",
            "-" if c["x"] is None else c["x"],
            f"{100 * c['test_accuracy']:.2f}%",
            f"{c['training_pflops']:.3g}",
        ]
        for c in cells
    ]
    return _markdown(title, header, body, [f"figure: {os.path.basename(path)}"])
