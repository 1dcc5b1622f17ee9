"""The report's table and cost chart on hand-made records, and the workdir checks."""

import pytest

from eb_jax import pipeline, report
from eb_jax.config import ConfigError, default_config


def _record(run, method, stages, num_epochs=20, **extra):
    record = {
        "run": run,
        "method": method,
        "prune_ratio": 0.5,
        "retrain": None,
        "ticket_epoch": None,
        "ticket_drawn_by": None,
        "test_accuracy": 0.99,
        "training_pflops": sum(p for _, _, p in stages),
        "wall_time_s": 10.0,
        "params": {"final": 1000},
        "num_epochs": num_epochs,
        "stages": [
            {"stage": s, "epochs": e, "training_pflops": p, "precision": "fp32"}
            for s, e, p in stages
        ],
    }
    record.update(extra)
    return record


def test_cost_chart_picks_a_readable_unit_and_draws_the_dense_reference():
    dense = _record("dense", "dense", [("dense", 20, 4.0e-4)])
    eb = _record("eb", "eb", [("search", 9, 1.8e-4), ("retrain", 11, 0.4e-4)])
    fig = report.cost_figure([dense, eb])
    ax = fig.axes[0]
    assert ax.get_ylabel() == "training cost (GFLOPs)"  # 0.0004 PFLOPs = 400 GFLOPs
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [40.0, 180.0, 400.0]
    references = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
    levels = sorted({round(float(seg[0][1]), 6) for c in references for seg in c.get_segments()})
    assert levels == [400.0]  # each run's dense run on its schedule: 20 epochs x 2e-5 PF


@pytest.mark.parametrize(
    "pflops, unit", [(30.3, "PFLOPs"), (0.5, "TFLOPs"), (1.75e-4, "GFLOPs"), (3e-9, "MFLOPs")]
)
def test_flops_unit(pflops, unit):
    factor, name = report.flops_unit(pflops)
    assert name == unit and 1 <= pflops * factor < 1000


def test_method_labels_say_how_the_method_ran():
    eb = _record("a", "eb", [("search", 9, 1.0)], retrain="reinit", retrain_schedule="fresh")
    lt = _record("b", "lt", [("dense", 9, 1.0)], retrain="rewind", granularity="weights")
    assert report.method_label(eb) == "eb/reinit/fresh"
    assert report.method_label(lt) == "lt/weights"


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        pipeline.run(default_config(), str(path))
    assert path.read_text() == "keep me"
