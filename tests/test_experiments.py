"""The paper's grids: dry runs on the paper configs, and reduced table2 and fig1 grids end
to end on the quickstart, checked against their runs' report.json, skipped when finished
and resumed when killed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import Interrupted

from eb_jax import experiments, pipeline, report
from eb_jax.config import load_config
from eb_jax.cost import forward_cost, training_flops
from eb_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_lists_table2_with_the_cost_models_flops():
    config = load_config("vgg16_cifar10")
    runs = experiments.grid("table2", config, (0.3, 0.5, 0.7))
    assert len(runs) == 8 * 3 and len({r.name for r in runs}) == 24
    dense = (
        training_flops(
            forward_cost(create_model("vgg16", 10), (32, 32, 3)).flops, 50_000 // 256 * 256, 160
        )
        / 1e15
    )
    assert dense == pytest.approx(15.1, abs=0.1)
    for run in runs:
        projected = experiments.projected_pflops(experiments.run_config(config, run))
        if run.row == "SNIP":  # one dense run, whatever p
            assert projected == pytest.approx(dense)
        if run.row == "LT":  # two
            assert projected == pytest.approx(2 * dense)
        if run.row.startswith("EB"):
            assert projected < dense


def test_dry_run_command_lists_table3_on_resnet50_without_data():
    cmd = [
        sys.executable,
        "-m",
        "eb_jax.experiments",
        "table3",
        "--config",
        "configs/resnet50_imagenet.py",
        "--dry-run",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "table3: 13 runs"  # unpruned + 4 methods x 3 ratios
    unpruned = next(line for line in lines if line.startswith("unpruned"))
    dense = (
        training_flops(
            forward_cost(create_model("resnet50", 1000), (224, 224, 3)).flops,
            1_281_167 // 256 * 256,
            90,
        )
        / 1e15
    )
    assert float(unpruned.split()[-1]) == pytest.approx(dense, rel=1e-3)


def test_a_bad_experiment_name_is_a_one_line_error():
    cmd = [sys.executable, "-m", "eb_jax.experiments", "table9", "--dry-run"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "table9" in result.stderr


def _tiny(data_dir, **overrides):
    return load_config(
        "quickstart",
        model="vgg_tiny",
        num_epochs=2,
        lr_boundaries=(1,),
        batch_size=128,
        eval_batch_size=120,
        eb_window=2,
        eb_eps=0.5,
        data_dir=data_dir,
        grid_ticket_epochs=(1,),
        **overrides,
    )


@pytest.mark.slow
def test_table2_grid_end_to_end_from_its_runs_reports(tmp_path, data_dir, monkeypatch):
    records = experiments.run_grid("table2", _tiny(data_dir), str(tmp_path), (0.5,))
    assert len(records) == 8
    table = json.loads((tmp_path / "table2.json").read_text())
    for cell in table["runs"]:
        saved = report.read_reports([str(tmp_path / cell["run"])])[0]
        assert cell["test_accuracy"] == saved["test_accuracy"]
        assert cell["training_pflops"] == saved["training_pflops"]
    by_row = {c["row"]: c for c in table["runs"]}
    best = max(by_row[b]["test_accuracy"] for b in ("LT", "SNIP", "NS", "ThiNet"))
    improvement = table["improvement"]["0.5"]
    assert improvement["accuracy_points"] == pytest.approx(
        100 * (by_row["EB Train FF"]["test_accuracy"] - best)
    )
    cheapest = min(by_row[b]["training_pflops"] for b in ("LT", "SNIP", "NS", "ThiNet"))
    eb = min(c["training_pflops"] for r, c in by_row.items() if r.startswith("EB"))
    assert improvement["flops_x"] == pytest.approx(cheapest / eb) and improvement["flops_x"] > 1
    markdown = (tmp_path / "table2.md").read_text()
    assert markdown.count("\n| ") == 1 + 8 + 1 and "n/a" in markdown  # no meter here
    # Run again: every run is finished, none trains.
    monkeypatch.setattr(pipeline, "run", lambda *a: pytest.fail("a finished run ran again"))
    again = experiments.run_grid("table2", _tiny(data_dir), str(tmp_path), (0.5,))
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in records]


@pytest.mark.slow
def test_fig1_grid_killed_mid_run_resumes_to_the_same_figure(tmp_path, data_dir, interrupt_after):
    straight = experiments.run_grid("fig1", _tiny(data_dir), str(tmp_path / "a"), (0.5,))
    # Killed after the unpruned run's last epoch (before its report), then in the next
    # run's first epoch.
    interrupt_after([2, 1])
    killed = tmp_path / "b"
    for _ in range(2):
        with pytest.raises(Interrupted):
            experiments.run_grid("fig1", _tiny(data_dir), str(killed), (0.5,))
    resumed = experiments.run_grid("fig1", _tiny(data_dir), str(killed), (0.5,))
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in straight]
    figure = json.loads((killed / "fig1.json").read_text())
    assert [c["x"] for c in figure["runs"]] == [None, 1]
    assert (killed / "fig1.png").stat().st_size > 10_000
