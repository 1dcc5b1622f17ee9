"""The paper's other baselines end to end: ThiNet, SNIP, SFP, the unstructured lottery
ticket and EB Train re-init on a fresh schedule; their reports, resuming in every stage,
and the options each method refuses."""

import json

import jax
import numpy as np
import pytest
from conftest import (
    assert_same_run,
    checkpoint_arrays,
    run_through_kills,
    run_through_signals,
    tiny_config,
)

from eb_jax import pipeline, report
from eb_jax.checkpoint import load_model
from eb_jax.cost import forward_cost, training_flops
from eb_jax.models import create_model
from eb_jax.prune.weights import magnitude_mask
from eb_jax.ticket.export import load_ticket

pytestmark = pytest.mark.slow

EPOCHS = 2
IMAGES = 11 * 128
DENSE_FLOPS = forward_cost(create_model("vgg_tiny", 10), (8, 8, 1)).flops

VARIANTS = {  # name: config overrides
    "thinet": {"method": "thinet", "thinet_images": 32, "thinet_locations": 4},
    "snip": {"method": "snip", "snip_batches": 2},
    "sfp": {"method": "sfp", "prune_ratio": 0.3},
    "lt_weights": {"method": "lt", "lt_granularity": "weights"},
    "eb_reinit_fresh": {"retrain": "reinit", "retrain_schedule": "fresh", "ticket_epoch": 1},
}
# Epochs (1-based, over the whole run) after which the interrupted runs are stopped: the
# first epoch of each stage.
STOPS = {"thinet": [1, 3], "snip": [1], "sfp": [1], "lt_weights": [1, 3], "eb_reinit_fresh": [1, 2]}


def _config(data_dir, **overrides):
    defaults = dict(num_epochs=EPOCHS, lr_boundaries=(1,), eb_window=2, eb_eps=0.5)
    return tiny_config(data_dir, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("baselines")
    return {
        name: (root / name, pipeline.run(_config(data_dir, **overrides), str(root / name)))
        for name, overrides in VARIANTS.items()
    }


def _stages(record):
    return [(s["stage"], s["epochs"]) for s in record["stages"]]


def test_every_method_writes_the_same_report_fields(runs):
    dense_keys = set(json.loads((runs["thinet"][0] / "report.json").read_text()))
    for _, record in runs.values():
        assert set(record) == dense_keys
        assert 0 <= record["test_accuracy"] <= 1 and record["prune_ratio"] is not None


def test_thinet_trains_dense_prunes_each_layer_and_fine_tunes_the_cut_network(runs):
    workdir, record = runs["thinet"]
    assert _stages(record) == [("dense", EPOCHS), ("retrain", EPOCHS)]
    assert record["ticket_drawn_by"] == "thinet" and record["granularity"] == "channels"
    model, _, meta = load_model(str(workdir))
    widths = [c for c in model.cfg if c != "M"]
    assert widths == [8 - 4, 16 - 8, 16]  # half of each layer a conv reads; the last whole
    assert meta["stage"] == "retrain" and meta["epoch"] == 2 * EPOCHS
    assert record["training_pflops"] == pytest.approx(
        training_flops(DENSE_FLOPS + record["forward_flops"]["final"], IMAGES, EPOCHS) / 1e15
    )


def test_snip_trains_the_weight_masked_network_once_at_dense_cost(runs):
    workdir, record = runs["snip"]
    assert _stages(record) == [("masked", EPOCHS)] and record["ticket_epoch"] == 0
    assert record["training_pflops"] == pytest.approx(
        training_flops(DENSE_FLOPS, IMAGES, EPOCHS) / 1e15
    )
    _, arrays = checkpoint_arrays(workdir)
    kernels = [
        (arrays["train"]["params"][m]["kernel"], arrays["weight_mask"][m]["kernel"])
        for m in arrays["weight_mask"]
        if "kernel" in arrays["weight_mask"][m]
    ]
    total = sum(k.size for k, _ in kernels)
    assert sum(int(m.sum()) for _, m in kernels) == total - int(total * 0.5)
    assert all(np.all(k[~m] == 0) for k, m in kernels)
    nonzero = record["stages"][0]["nonzero_forward_macs"]
    assert nonzero == record["forward_macs"]["final_nonzero"] < record["forward_macs"]["dense"]


def test_sfp_ends_with_the_hard_cut_evaluated_without_fine_tuning(runs):
    workdir, record = runs["sfp"]
    assert _stages(record) == [("soft", EPOCHS)] and record["ticket_drawn_by"] == "sfp"
    model, variables, _ = load_ticket(str(workdir / "pruned"))
    assert [c for c in model.cfg if c != "M"] == [8 - 2, 16 - 4, 16 - 4]
    assert record["params"]["final"] == sum(x.size for x in jax.tree.leaves(variables["params"]))
    soft = record["soft_pruned"]  # the original's accuracy, and the cut's (the table's)
    assert soft["cut_test_accuracy"] == record["test_accuracy"]
    assert 0 < soft["test_accuracy"] <= 1 and 0 < soft["test_top5_accuracy"] <= 1
    assert soft["folded_channels"] > 0 and soft["lost_offsets"] > 0  # the last conv's; others
    assert all(r["soft_pruned"] is None for n, (_, r) in runs.items() if n != "sfp")
    assert record["training_pflops"] == pytest.approx(
        training_flops(DENSE_FLOPS, IMAGES, EPOCHS) / 1e15
    )


def test_unstructured_lottery_ticket_rewinds_and_counts_two_dense_runs(runs):
    workdir, record = runs["lt_weights"]
    assert _stages(record) == [("dense", EPOCHS), ("masked", EPOCHS)]
    assert record["retrain"] == "rewind" and record["granularity"] == "weights"
    assert report.method_label(record) == "lt/weights"
    assert record["training_pflops"] == pytest.approx(
        2 * training_flops(DENSE_FLOPS, IMAGES, EPOCHS) / 1e15
    )
    # The mask is the global magnitude mask of the dense stage's final weights.
    _, dense = checkpoint_arrays(workdir, step=11 * EPOCHS)
    _, final = checkpoint_arrays(workdir)
    expected = magnitude_mask(dense["train"]["params"], 0.5)
    for a, b in zip(jax.tree.leaves(final["weight_mask"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (workdir / "init").is_dir()


def test_eb_reinit_on_a_fresh_schedule_retrains_the_full_num_epochs(runs):
    workdir, record = runs["eb_reinit_fresh"]
    assert _stages(record) == [("search", 1), ("retrain", EPOCHS)]
    assert report.method_label(record) == "eb/reinit/fresh"
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    lrs = [r["learning_rate"] for r in map(json.loads, lines) if "learning_rate" in r]
    assert lrs == pytest.approx([0.1, 0.1, 0.01])  # the schedule starts again at the cut


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_run_killed_in_each_stage_ends_bit_identical(
    runs, tmp_path, data_dir, name, interrupt_after
):
    config = _config(data_dir, **VARIANTS[name])
    interrupt_after(list(STOPS[name]))
    record = run_through_kills(config, tmp_path, len(STOPS[name]))
    expected_dir, expected = runs[name]
    assert_same_run(record, tmp_path, expected, expected_dir)


# Steps (global, 1-based) during which a SIGTERM arrives: mid-epoch in each stage.
SIGNALS = {"thinet": [5, 2 * 11 + 8], "eb_reinit_fresh": [5, 11 + 6]}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_run_stopped_by_sigterm_in_each_stage_resumes_bit_identically(
    runs, tmp_path, data_dir, name, signal_during
):
    signal_during(list(SIGNALS[name]))
    config = _config(data_dir, **VARIANTS[name])
    record, stopped = run_through_signals(config, tmp_path, len(SIGNALS[name]))
    assert stopped == SIGNALS[name]  # the step the signal came in, checkpointed
    expected_dir, expected = runs[name]
    assert_same_run(record, tmp_path, expected, expected_dir)
