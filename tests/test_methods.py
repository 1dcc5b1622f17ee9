"""Every method end to end on tiny settings, its report, and resuming in each stage."""

import json

import numpy as np
import pytest
from conftest import assert_same_run, run_through_kills, run_through_signals, tiny_config

from eb_jax import pipeline, report
from eb_jax.checkpoint import load_model
from eb_jax.config import ConfigError, load_config
from eb_jax.cost import forward_cost, training_flops
from eb_jax.models import bn_scales, create_model

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them

EPOCHS = 2
IMAGES = 11 * 128  # steps per epoch x batch size: what one epoch trains on


def _config(data_dir, **overrides):
    defaults = dict(num_epochs=EPOCHS, lr_boundaries=(1,), eb_window=2, eb_eps=0.5)
    return tiny_config(data_dir, **{**defaults, **overrides})


def _learning_rates(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["learning_rate"] for r in map(json.loads, lines) if "learning_rate" in r]


DENSE_FLOPS = forward_cost(create_model("vgg_tiny", 10), (8, 8, 1)).flops


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """One uninterrupted run per method, shared by the tests below (ns draws its PNGs)."""
    root = tmp_path_factory.mktemp("methods")
    return {
        m: (
            root / m,
            pipeline.run(_config(data_dir, method=m, write_plots=m == "ns"), str(root / m)),
        )
        for m in ("dense", "ns", "lt")
    }


def test_dense_trains_every_epoch_without_a_ticket(runs):
    workdir, record = runs["dense"]
    assert [s["stage"] for s in record["stages"]] == ["dense"]
    assert record["stages"][0]["epochs"] == EPOCHS and record["ticket_epoch"] is None
    assert record["training_pflops"] == pytest.approx(
        training_flops(DENSE_FLOPS, IMAGES, EPOCHS) / 1e15
    )
    assert _learning_rates(workdir) == pytest.approx([0.1, 0.01])
    assert not (workdir / "ticket.json").exists()
    assert 0 < record["compile_time_s"] < record["wall_time_s"]
    assert json.loads((workdir / "report.json").read_text()) == record


@pytest.mark.parametrize("method, mode", [("ns", "inherit"), ("lt", "rewind")])
def test_baselines_search_fully_then_retrain_a_second_schedule(runs, method, mode):
    workdir, record = runs[method]
    assert record["retrain"] == mode and record["ticket_epoch"] == EPOCHS
    assert record["ticket_drawn_by"] == "full search"
    assert [(s["stage"], s["epochs"]) for s in record["stages"]] == [
        ("search", EPOCHS),
        ("retrain", EPOCHS),
    ]
    model, _, meta = load_model(str(workdir))
    ticket = json.loads((workdir / "ticket.json").read_text())
    assert [c for c in model.cfg if c != "M"] == ticket["kept"]
    assert meta["stage"] == "retrain" and meta["epoch"] == 2 * EPOCHS
    retrain = record["stages"][1]
    assert retrain["forward_flops"] == forward_cost(model, (8, 8, 1)).flops < DENSE_FLOPS
    assert record["training_pflops"] == pytest.approx(
        training_flops(DENSE_FLOPS + retrain["forward_flops"], IMAGES, EPOCHS) / 1e15
    )
    assert _learning_rates(workdir) == pytest.approx([0.1, 0.01, 0.1, 0.01])  # schedule anew
    assert (workdir / "init").is_dir() == (method == "lt")


def test_a_fixed_ticket_epoch_draws_the_ticket_there(tmp_path, data_dir):
    config = _config(data_dir, ticket_epoch=1, eb_eps=1e-9, retrain="reinit")
    record = pipeline.run(config, str(tmp_path))
    assert record["ticket_epoch"] == 1 and record["ticket_drawn_by"] == "ticket_epoch"
    assert [(s["stage"], s["epochs"]) for s in record["stages"]] == [("search", 1), ("retrain", 1)]
    assert _learning_rates(tmp_path) == pytest.approx([0.1, 0.01])  # one schedule


@pytest.mark.parametrize("method", ["dense", "eb"])
def test_bn_sparsity_applies_only_while_searching(tmp_path, data_dir, method):
    # s = 1 at lr 0.1 pulls every |scale| by 0.1 a step: 11 steps would take the initial
    # 0.5 to about 0. Dense training and the re-initialised ticket's retraining keep them.
    config = _config(data_dir, method=method, sparsity=1.0, lr_boundaries=())
    if method == "eb":  # search 1 epoch (scales collapse), retrain 1 epoch
        config.update(ticket_epoch=1, retrain="reinit")
    pipeline.run(config, str(tmp_path))
    model, variables, _ = load_model(str(tmp_path))
    scales = np.concatenate([np.abs(np.asarray(s)) for s in bn_scales(model, variables["params"])])
    assert scales.mean() > 0.3


@pytest.mark.parametrize("method", ["dense", "ns"])  # 'lt' shares the stages of 'ns'
def test_a_run_interrupted_in_each_stage_ends_bit_identical(
    runs, tmp_path, data_dir, method, interrupt_after
):
    """Stopped after the first epoch of each stage (its checkpoint written), run again."""
    config = _config(data_dir, method=method)
    stops = [1] if method == "dense" else [1, EPOCHS + 1]  # epochs after which to stop
    interrupt_after(list(stops))
    record = run_through_kills(config, tmp_path, len(stops))
    expected_dir, expected = runs[method]
    assert_same_run(record, tmp_path, expected, expected_dir)


def test_a_run_stopped_by_sigterm_in_each_stage_resumes_bit_identically(
    runs, tmp_path, data_dir, signal_during
):
    """SIGTERM mid-epoch in the search and in the retraining: each stop checkpoints the
    step in flight (with every device's own BN statistics) and the run ends the same."""
    signal_during([5, 2 * 11 + 8])
    config = _config(data_dir, method="ns", checkpoint_every_steps=0)
    record, stopped = run_through_signals(config, tmp_path, 2)
    assert stopped == [5, 30]
    expected_dir, expected = runs["ns"]
    assert_same_run(record, tmp_path, expected, expected_dir)


def test_report_compares_runs_in_one_table_and_a_chart(runs, tmp_path, capsys):
    dirs = [str(runs[m][0]) for m in ("dense", "ns", "lt")]
    assert report.main([*dirs, "--plot", str(tmp_path / "cost.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["run", "method", "p", "precision", "ticket"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["dense"][7:9] == ["n/a", "1.00x"]  # no energy meter here; vs dense
    assert rows["ns"][4:6] == [str(EPOCHS), "final"]
    assert float(rows["ns"][9].rstrip("x")) > 1  # a full dense search, then more
    assert (tmp_path / "cost.png").stat().st_size > 5_000
    assert (runs["ns"][0] / "cost.png").exists()
    assert not (runs["dense"][0] / "cost.png").exists()  # write_plots=False


def test_report_on_a_directory_without_a_run_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no report.json" in err


def test_load_config_by_name_or_path_with_overrides():
    assert load_config("quickstart", num_epochs=3).num_epochs == 3
    assert load_config("configs/vgg16_cifar10.py").model == "vgg16"
    with pytest.raises(ConfigError, match="no field.*epochz"):
        load_config("quickstart", epochz=3)
    with pytest.raises(ConfigError, match="no config file 'nope'"):
        load_config("nope")


def test_an_equal_run_in_the_same_process_compiles_nothing(tmp_path, data_dir):
    """Equal stages build equal TrainStates (the same optimizer and LR function, an
    apply_fn equal by its model), so a rerun reuses every compiled program: a grid's
    runs, a resumed run, a notebook's reruns."""
    from jax import monitoring

    config = _config(data_dir, num_epochs=1, ticket_epoch=1)
    first = pipeline.run(config, str(tmp_path / "first"))
    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        again = pipeline.run(
            _config(data_dir, num_epochs=1, ticket_epoch=1), str(tmp_path / "again")
        )
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert compiled == []
    assert again["test_accuracy"] == first["test_accuracy"]
    assert [s["stage"] for s in again["stages"]] == ["search", "retrain"]
