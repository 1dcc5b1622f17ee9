"""The paper's grids: dry runs on the paper configs, a reduced fig1 grid end to end on the
quickstart, skipped when finished and resumed when killed. (A table2 grid end to end is
the reproduce_paper notebook's, checked in test_notebooks.)"""

import json
import os
import subprocess
import sys

import pytest
from conftest import Interrupted

from eb_jax import experiments, pipeline, report, train_steps
from eb_jax.config import ConfigError, config_record, load_config
from eb_jax.cost import forward_cost, training_flops
from eb_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The paper's Table 2 FLOPs (P) for VGG16 on CIFAR-10 at p = 0.3, 0.5, 0.7 (None: not known
# here). LF and LL are counted as FF (8-bit FLOPs as 32-bit ones).
PAPER_TABLE2_PFLOPS = {
    "LT (one-shot)": (30.3, 30.3, 30.3),
    "SNIP": (15.1, 15.1, 15.1),
    "NS": (27.4, 25.7, 23.8),
    "ThiNet": (22.6, 19.0, 16.6),
    "EB Train (re-init)": (14.4, None, None),
    "EB Train (FF)": (12.7, 10.8, 9.85),
}


def test_dry_run_of_table2_brackets_the_papers_flops_for_every_row():
    config = load_config("vgg16_cifar10")
    runs = experiments.grid("table2", config)
    assert len(runs) == 8 * 3 and len({r.name for r in runs}) == 24
    dense = (
        training_flops(
            forward_cost(create_model("vgg16", 10), (32, 32, 3)).flops, 50_000 // 256 * 256, 160
        )
        / 1e15
    )
    assert dense == pytest.approx(15.1, abs=0.1)
    projected = {
        (r.row, r.ratio): experiments.projected_pflops(experiments.run_config(config, r))
        for r in runs
    }
    for (row, ratio), (low, high) in projected.items():
        paper = PAPER_TABLE2_PFLOPS.get(row.replace("LF", "FF").replace("LL", "FF"))
        paper = paper[(0.3, 0.5, 0.7).index(ratio)]
        if row in ("LT (one-shot)", "SNIP", "ThiNet"):  # exact: p fixes the network
            assert low == high
            # the paper counts 50,000 images an epoch (eb_jax full batches) and rounds
            assert low == pytest.approx(paper, rel=0.01), row
        elif paper is not None:
            assert low < paper < high, (row, ratio, low, high)
    assert projected[("SNIP", 0.5)][0] == pytest.approx(dense)
    assert projected[("LT (one-shot)", 0.5)][0] == pytest.approx(2 * dense)
    total = [sum(b[i] for b in projected.values()) for i in (0, 1)]
    assert total[0] < 405 < total[1]  # the paper's rows sum to 405 PF


def test_dry_run_listing_marks_every_estimate(capsys):
    config = load_config("quickstart")
    experiments.run_grid("table2", config, "unused", (0.5,), dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "table2: 8 runs"
    cost = {line.split()[0]: line.split()[-1] for line in lines[2:10]}
    for run in ("lt-one-shot-p0.5", "snip-p0.5", "thinet-p0.5"):
        float(cost[run])  # exact: a plain number
    for run in ("ns-p0.5", "eb-train-ff-p0.5", "eb-train-re-init-p0.5"):
        low, high = cost[run].removeprefix("~").split("..")
        assert cost[run].startswith("~") and float(low) < float(high)
    assert lines[10].split()[-1].startswith("~") and "estimated" in lines[11]


def test_table3_grid_runs_the_cells_the_paper_prints_unless_ratios_are_given():
    r50 = load_config("resnet50_imagenet")
    runs = experiments.grid("table3", r50)
    assert [(r.row, r.ratio) for r in runs] == [
        ("Unpruned", None),
        *[("ThiNet", p) for p in (0.3, 0.5, 0.7)],
        *[("EB Train", p) for p in (0.3, 0.5, 0.7)],
    ]
    r18 = experiments.grid("table3", load_config("resnet18_imagenet"))
    assert {(r.row, r.ratio) for r in r18} == {
        ("Unpruned", None),
        ("NS", 0.1),
        ("NS", 0.3),
        ("SFP", 0.3),
        ("EB Train", 0.1),
        ("EB Train", 0.3),
    }
    asked = experiments.grid("table3", r50, (0.5,))
    assert [r.row for r in asked] == ["Unpruned", "NS", "ThiNet", "SFP", "EB Train"]
    assert experiments.grid("table2", load_config("vgg16_cifar100"))[0].ratio == 0.1


def test_every_drawn_ticket_retrains_on_one_common_schedule():
    config = load_config("quickstart")
    for name in ("fig1", "fig2", "fig5", "table1"):
        tickets = [r for r in experiments.grid(name, config) if r.row not in ("Unpruned", "NS")]
        assert tickets and all(r.overrides["retrain_schedule"] == "fresh" for r in tickets)
    fig1 = experiments.grid("fig1", load_config("vgg16_cifar10"))
    assert sorted({r.x for r in fig1 if r.x}) == [10, 20, 40, 80, 120, 160]  # 160: retrained
    table1 = experiments.grid("table1", load_config("vgg16_cifar10"), (0.3,))
    assert [(r.row, r.x) for r in table1] == [
        *[("[0.1, x0.1 at 80, 120]", e) for e in (10, 20, 40, 160, None)],
        *[("[0.01, x0.1 at 100]", e) for e in (10, 20, 40, 160, None)],
    ]
    # The search runs on its row's schedule; every ticket retrains on the config's.
    low = experiments.run_config(config, table1[5])
    assert train_steps.stage_lr(low, 10, stage="search")(0) == pytest.approx(0.01)
    assert train_steps.stage_lr(low, 10, 25, stage="retrain")(25) == pytest.approx(0.1)
    assert train_steps.stage_lr(low, 10, stage="search")(10 * 100) == pytest.approx(0.001)


@pytest.mark.slow
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
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "table3: 7 runs"  # unpruned + ThiNet and EB Train x 3 ratios
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
    assert dense == pytest.approx(2839.96, rel=0.002)  # the paper's Table 3
    for line in lines[2:9]:
        assert line.split()[-1].startswith("~") == line.startswith("eb-train"), line


def test_bad_ratios_and_ticket_epochs_are_one_line_errors(capsys, monkeypatch):
    from absl import flags
    from absl.testing import flagsaver

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    for given, says in (("", "no prune ratios"), ("0.3,0.3", "repeat"), ("0.3,x", "numbers")):
        with flagsaver.flagsaver(ratios=given), pytest.raises(SystemExit) as exited:
            experiments._ratios()
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eb_jax: error: --ratios=") and says in err and "\n" not in err
    with flagsaver.flagsaver(ratios=None):
        assert experiments._ratios() is None  # the grid's own ratios
    config = load_config("quickstart", grid_ticket_epochs=(0, 5))
    with pytest.raises(ConfigError, match=r"grid_ticket_epochs=\(0, 5\) must be distinct"):
        experiments.run_grid("fig1", config, "unused", dry_run=True)
    with pytest.raises(ConfigError, match="no prune ratios"):
        experiments.grid("table2", load_config("quickstart", grid_ratios=()))


def test_a_grid_reuses_a_finished_run_only_of_the_same_config(tmp_path, monkeypatch):
    config = load_config("quickstart")
    runs = experiments.grid("table2", config, (0.5,))
    configs = [experiments.run_config(config, r) for r in runs]
    for run, c in zip(runs, configs, strict=True):
        (tmp_path / run.name).mkdir()
        recorded = config_record(c)
        del recorded["fields"]["search_lr"]  # a run from before the field: its default
        report.write_json(
            str(tmp_path / run.name / report.REPORT_FILE),
            {
                "run": run.name,
                "test_accuracy": 0.9,
                "training_pflops": 1e-4,
                "ticket_epoch": None,
                "ticket_drawn_by": None,
                "model": c.model,
                "dataset": c.dataset,
                "config": recorded,
                "method": c.method,
                "retrain": c.retrain,
                "prune_ratio": c.prune_ratio,
                "wall_time_s": 1.0,
                "params": {"final": 1000},
                "stages": [{"stage": "dense", "epochs": 1, "training_pflops": 1e-4}],
            },
        )
    monkeypatch.setattr(pipeline, "run", lambda *a: pytest.fail("a finished run ran again"))
    records = experiments.run_grid("table2", config, str(tmp_path), (0.5,))
    assert len(records) == 8 and (tmp_path / "table2.md").exists()
    before = (tmp_path / "table2.md").read_text()
    other = load_config("quickstart", seed=1, sparsity=1e-3)
    differ = r"\(seed: 0 there, 1 now; sparsity: 0.0001 there, 0.001 now\)"
    with pytest.raises(ConfigError, match=differ) as raised:
        experiments.run_grid("table2", other, str(tmp_path), (0.5,))
    assert "lt-one-shot-p0.5 holds a finished run of another config" in str(raised.value)
    assert "\n" not in str(raised.value) and (tmp_path / "table2.md").read_text() == before
    unknown = tmp_path / "snip-p0.5" / report.REPORT_FILE
    unknown.write_text(json.dumps({"run": "snip-p0.5"}))  # a report that records no config
    with pytest.raises(ConfigError, match="recorded nowhere"):
        experiments.run_grid("table2", config, str(tmp_path), (0.5,))


@pytest.mark.slow  # a subprocess
def test_a_bad_experiment_name_is_a_one_line_error():
    cmd = [sys.executable, "-m", "eb_jax.experiments", "table9", "--dry-run"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "table9" in result.stderr


def _tiny(data_dir, **overrides):
    overrides = {"grid_ticket_epochs": (1,), "write_plots": False, **overrides}
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
        **overrides,
    )


@pytest.mark.slow
def test_fig1_grid_killed_mid_run_resumes_to_the_same_figure(tmp_path, data_dir, interrupt_after):
    config = _tiny(data_dir, grid_ticket_epochs=(2,))  # the final epoch's ticket
    straight = experiments.run_grid("fig1", config, str(tmp_path / "a"), (0.5,))
    # The final-epoch ticket is retrained: 2 search epochs, then 2 on a fresh schedule.
    stages = [(s["stage"], s["epochs"]) for s in straight[1]["stages"]]
    assert stages == [("search", 2), ("retrain", 2)]
    # Killed after the unpruned run's last epoch (before its report), then in the next
    # run's first epoch.
    interrupt_after([2, 1])
    killed = tmp_path / "b"
    for _ in range(2):
        with pytest.raises(Interrupted):
            experiments.run_grid("fig1", config, str(killed), (0.5,))
    resumed = experiments.run_grid("fig1", config, str(killed), (0.5,))
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in straight]
    figure = json.loads((killed / "fig1.json").read_text())
    assert [c["x"] for c in figure["runs"]] == [None, 2]
    assert (killed / "fig1.png").stat().st_size > 10_000
