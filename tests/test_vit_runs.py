"""ViT runs end to end: the early-bird ticket of heads and neurons detected, cut and
retrained with AdamW on a cosine schedule, resumed bit for bit; the other methods."""

import json

import pytest
from conftest import assert_same_run, run_through_kills, tiny_config

from eb_jax import pipeline
from eb_jax.checkpoint import load_model
from eb_jax.cost import forward_cost
from eb_jax.models import create_model

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them

DENSE_FLOPS = forward_cost(create_model("vit_tiny", 10), (8, 8, 1)).flops


def _config(data_dir, **overrides):
    vit = dict(
        model="vit_tiny",
        num_epochs=3,
        optimizer="adamw",
        learning_rate=1e-3,
        weight_decay=0.05,
        lr_schedule="cosine",
        warmup_epochs=1,
        lr_boundaries=(),
        label_smoothing=0.1,
        eb_window=2,
        eb_eps=0.5,
    )
    return tiny_config(data_dir, **{**vit, **overrides})


@pytest.fixture(scope="module")
def eb_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("vit_eb")
    return workdir, pipeline.run(_config(data_dir, write_plots=True), str(workdir))


def test_eb_detects_cuts_heads_and_neurons_and_retrains(eb_run):
    workdir, record = eb_run
    assert record["ticket_drawn_by"] == "detector" and record["ticket_epoch"] < 3
    assert [s["stage"] for s in record["stages"]] == ["search", "retrain"]
    model, _, meta = load_model(str(workdir))
    ticket = json.loads((workdir / "ticket.json").read_text())
    assert list(model.head_widths) == ticket["kept"][0::2] == [1, 1]  # p=0.5 of 2 heads
    assert list(model.mlp_widths) == ticket["kept"][1::2]
    assert sum(model.mlp_widths) < 2 * 16 and meta["epoch"] == 3
    retrain = record["stages"][1]
    assert retrain["forward_flops"] == forward_cost(model, (8, 8, 1)).flops < DENSE_FLOPS
    assert (workdir / "mask_distance.png").exists()
    lrs = [
        r["learning_rate"]
        for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        if "learning_rate" in r
    ]
    # The last step of the warm-up epoch (10 of 11 steps), then the cosine decay.
    assert lrs[0] == pytest.approx(1e-3 * 10 / 11) and lrs[1:] == sorted(lrs[1:], reverse=True)


def test_eb_interrupted_in_each_stage_ends_bit_identical(
    eb_run, tmp_path, data_dir, interrupt_after
):
    expected_dir, expected = eb_run
    stops = [1, expected["ticket_epoch"] + 1]
    interrupt_after(list(stops))
    record = run_through_kills(_config(data_dir), tmp_path, len(stops))
    assert_same_run(record, tmp_path, expected, expected_dir)


@pytest.mark.parametrize("method", ["dense", "ns", "lt", "snip"])
def test_the_other_methods_run_on_a_vit(tmp_path, data_dir, method):
    record = pipeline.run(
        _config(data_dir, method=method, num_epochs=1, warmup_epochs=0), str(tmp_path)
    )
    assert 0 <= record["test_accuracy"] <= 1
    model, _, _ = load_model(str(tmp_path))
    if method in ("ns", "lt"):
        assert sum(model.mlp_widths) < 2 * 16 and list(model.head_widths) == [1, 1]
    else:
        assert model.head_widths is None and model.mlp_widths is None
