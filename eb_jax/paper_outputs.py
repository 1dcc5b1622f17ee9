"""The paper's tables and figures from an experiment grid's runs (eb_jax.experiments).

Each output is written as the paper lays it out (markdown), as CSV (one line per run) and
as JSON (every number with the run directory it came from); figures also as PNG.
"""

from __future__ import annotations

import csv
import math
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
    "model",
    "dataset",
)
BASELINES = (
    "LT (one-shot)",
    "SNIP",
    "NS",
    "ThiNet",
)  # Table 2's; the rest of its rows are EB Train's


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


def paper_number(value, digits: int = 3) -> str:
    """`value` as the paper prints it: `digits` significant digits, every integer digit
    kept, trailing zeros kept, no exponent (6322, 30.3, 9.85, 6.50, 0.000808); n/a for None."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


MODEL_NAMES = {
    "vgg16": "VGG16",
    "preresnet101": "PreResNet-101",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet2012": "ImageNet"}


def _model(cell) -> str:
    return MODEL_NAMES.get(cell.get("model"), cell.get("model") or "")


def _dataset(cell) -> str:
    return DATASET_NAMES.get(cell.get("dataset"), cell.get("dataset") or "")


def _acc(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _ratios(cells) -> list:
    return sorted({c["ratio"] for c in cells if c["ratio"] is not None})


def _rows(cells) -> list:
    return list(dict.fromkeys(c["row"] for c in cells))


def _cell(cells, row, ratio) -> dict | None:
    found = [c for c in cells if c["row"] == row and c["ratio"] in (ratio, None)]
    return found[0] if found else None


def _markdown(title: str, header: list, rows: list, notes=()) -> str:
    lines = [f"# {title}", "", *_table_lines(header, rows)]
    return "\n".join([*lines, "", *[f"- {n}" for n in notes]]).rstrip() + "\n"


def _table_lines(header: list, rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _settings(cells) -> list[tuple]:
    """The (model, dataset) settings of `cells`, in order: a grid has one, merged grids more."""
    return list(dict.fromkeys((c.get("model"), c.get("dataset")) for c in cells))


def _of(cells, setting) -> list[dict]:
    return [c for c in cells if (c.get("model"), c.get("dataset")) == setting]


TABLE2_NOTES = (
    "Retrain acc.: test accuracy (%) of each method's final network; energy: measured (kJ; "
    "n/a without a meter); FLOPs: total training PFLOPs (3 x forward x images x epochs)",
    "EB Train Improv.: accuracy = EB Train (FF) - the most accurate baseline (points); "
    "energy = the cheapest baseline's / EB Train (LL)'s; FLOPs = the cheapest baseline's / "
    "the cheapest EB Train variant's",
)


def _table2(cells) -> tuple[str, dict]:
    """The paper's Table 2: per setting, the methods' retrain accuracy per ratio, then
    their energy / FLOPs per ratio, and the EB Train Improv. row."""
    lines, improvements = ["# Table 2", ""], {}
    for setting in _settings(cells):
        mine, ratios = _of(cells, setting), _ratios(_of(cells, setting))
        header = [
            "Methods",
            *[f"Retrain acc. (%) p = {r:g}" for r in ratios],
            *[f"Energy (kJ) / FLOPs (P) p = {r:g}" for r in ratios],
        ]
        body = []
        for row in _rows(mine):
            found = [_cell(mine, row, r) for r in ratios]
            accuracy = [_acc(c["test_accuracy"]) if c else "-" for c in found]
            body.append([row, *accuracy, *[_costs(c) for c in found]])
        improvement = {r: _improvement(mine, r) for r in ratios}
        body.append(
            [
                "EB Train Improv.",
                *[_signed(improvement[r]["accuracy_points"]) for r in ratios],
                *[_times(improvement[r]) for r in ratios],
            ]
        )
        lines += [f"## {_model(mine[0])} on {_dataset(mine[0])}", "", *_table_lines(header, body)]
        lines.append("")
        key = "/".join(str(s) for s in setting)
        improvements[key] = {f"{r:g}": v for r, v in improvement.items()}
    md = "\n".join([*lines, *[f"- {n}" for n in TABLE2_NOTES]]) + "\n"
    single = next(iter(improvements.values())) if len(improvements) == 1 else improvements
    return md, {"improvement": single, "notes": list(TABLE2_NOTES)}


def _costs(c) -> str:
    if c is None:
        return "-"
    return f"{paper_number(c['energy_kj'], 4)} / {paper_number(c['training_pflops'])}"


def _signed(points) -> str:
    return "-" if points is None else f"{points:+.2f}"


def _times(improvement: dict) -> str:
    if improvement["flops_x"] is None:
        return "-"
    energy = improvement["energy_x"]
    return f"{'n/a' if energy is None else f'{energy:.2f}x'} / {improvement['flops_x']:.2f}x"


def _improvement(cells, ratio) -> dict:
    base = [c for b in BASELINES if (c := _cell(cells, b, ratio))]
    ebs = [c for c in cells if c["ratio"] == ratio and c["row"].startswith("EB Train")]
    ff, ll = _cell(cells, "EB Train (FF)", ratio), _cell(cells, "EB Train (LL)", ratio)
    if not base or ff is None:
        return {"accuracy_points": None, "energy_x": None, "flops_x": None}
    points = 100 * (ff["test_accuracy"] - max(c["test_accuracy"] for c in base))
    kj = [c["energy_kj"] for c in base if c["energy_kj"] is not None]
    energy = min(kj) / ll["energy_kj"] if kj and ll and ll["energy_kj"] else None
    flops = min(c["training_pflops"] for c in base) / min(c["training_pflops"] for c in ebs)
    return {"accuracy_points": points, "energy_x": energy, "flops_x": flops}


TABLE3_ORDER = ("NS", "ThiNet", "SFP", "EB Train")  # the paper's order within a ratio
TABLE3_HEADER = [
    "Models",
    "Methods",
    "Pruning ratio",
    "Top-1 Acc. (%)",
    "Top-1 Acc. Improv. (%)",
    "Top-5 Acc. (%)",
    "Top-5 Acc. Improv. (%)",
    "Total Training FLOPs (P)",
    "Total Training Energy (kJ)",
]


def _table3(cells) -> tuple[str, dict]:
    """The paper's Table 3: one row per method x ratio (Unpruned once, first), top-1 and
    top-5 accuracy and their change against the unpruned network, FLOPs, energy."""
    body = []
    for setting in _settings(cells):
        mine = _of(cells, setting)
        dense = _cell(mine, "Unpruned", None)
        shown = [dense] if dense else []
        rows = sorted(_rows(mine), key=lambda r: TABLE3_ORDER.index(r) if r in TABLE3_ORDER else 99)
        for ratio in _ratios(mine):
            shown += [c for row in rows if (c := _find(mine, row, ratio))]
        body += [_table3_row(c, dense) for c in shown]
    notes = [
        "Improv.: the change against the unpruned network, in points",
        "FLOPs: total training PFLOPs (3 x forward x images x epochs); energy: measured (kJ; "
        "n/a without a meter)",
        "SFP is counted as the dense training it is (see docs/method.md: the paper counts "
        "1.58x dense for it)",
        "SFP: the cut network's accuracy (the network its FLOPs count); the original reports "
        "the soft-pruned one (filters zeroed, their BN offsets live): report.json's "
        "soft_pruned holds both",
    ]
    return _markdown("Table 3", TABLE3_HEADER, body, notes), {"notes": notes}


def _find(cells, row, ratio) -> dict | None:
    found = [c for c in cells if c["row"] == row and c["ratio"] == ratio]
    return found[0] if found else None


def _table3_row(c, dense) -> list:
    def change(key):
        if dense is None or c is dense or c[key] is None or dense[key] is None:
            return "-"
        return _signed(100 * (c[key] - dense[key]))

    pflops = c["training_pflops"]
    return [
        _model(c),
        c["row"],
        "-" if c["ratio"] is None else f"{100 * c['ratio']:g}%",
        _acc(c["test_accuracy"]),
        change("test_accuracy"),
        _acc(c["test_top5_accuracy"]),
        change("test_top5_accuracy"),
        f"{pflops:.2f}" if pflops >= 1 else paper_number(pflops),
        paper_number(c["energy_kj"], 4),
    ]


TABLE1_NOTES = (
    "cells: retrain test accuracy (%) of the ticket drawn after that epoch (final: the last "
    "epoch); EB (detected): the ticket the detector drew (the epoch it was drawn after)",
    "every ticket, of either search schedule, retrains with its inherited weights for "
    "num_epochs on a fresh run of the config's own LR schedule (the paper's one common "
    "retraining schedule)",
)


def _table1(cells) -> tuple[str, dict]:
    """The paper's Table 1: rows model x search schedule (x ratio when several), per
    dataset the retrain accuracy of the tickets drawn at each epoch, the last one final."""
    datasets = list(dict.fromkeys(_dataset(c) for c in cells))
    epochs = {d: sorted({c["x"] for c in cells if _dataset(c) == d and c["x"]}) for d in datasets}
    several = len(_ratios(cells)) > 1
    header = ["Models", "Search LR schedule", *(["p"] if several else [])]
    for d in datasets:
        header += [f"{d} {e}" if e < epochs[d][-1] else f"{d} final ({e})" for e in epochs[d]]
        header.append(f"{d} EB (detected)")
    body = []
    for model, row, ratio in dict.fromkeys((_model(c), c["row"], c["ratio"]) for c in cells):
        mine = [c for c in cells if (_model(c), c["row"], c["ratio"]) == (model, row, ratio)]
        line = [model, row, *([f"{ratio:g}"] if several else [])]
        for d in datasets:
            at = {c["x"]: c for c in mine if _dataset(c) == d}
            line += [_acc(at[e]["test_accuracy"]) if e in at else "-" for e in epochs[d]]
            found = at.get(None)
            line.append(
                f"{_acc(found['test_accuracy'])} ({found['ticket_epoch']})" if found else "-"
            )
        body.append(line)
    return _markdown("Table 1", header, body, TABLE1_NOTES), {"notes": list(TABLE1_NOTES)}


def _table4(cells) -> tuple[str, dict]:
    """Table 4: per search LR, the epoch the ticket was detected and its retrain accuracy."""
    ratios = _ratios(cells)

    def text(c):
        if c is None:
            return "-"
        how = "" if c["ticket_drawn_by"] == "detector" else f" ({c['ticket_drawn_by']})"
        return f"ticket after {c['ticket_epoch']}{how} / {_acc(c['test_accuracy'])}"

    body = [[row, *[text(_cell(cells, row, r)) for r in ratios]] for row in _rows(cells)]
    notes = [
        "cells: the epoch the ticket was drawn after / retrain test accuracy (%)",
        "the retraining goes on with the search's schedule",
    ]
    md = _markdown("Table 4", ["search schedule", *[f"p = {r:g}" for r in ratios]], body, notes)
    return md, {"notes": notes}


_TABLES = {"table1": _table1, "table2": _table2, "table3": _table3, "table4": _table4}


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
