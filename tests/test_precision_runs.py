"""Low-precision EB Train (the paper's LF and LL) and SWA, end to end on tiny settings."""

import jax
import numpy as np
import pytest
from conftest import Interrupted, checkpoint_arrays, tiny_config

from eb_jax import lowp, pipeline, report
from eb_jax.checkpoint import load_model

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them


def _config(data_dir, **overrides):
    defaults = dict(num_epochs=2, lr_boundaries=(1,), ticket_epoch=1, checkpoints_to_keep=10)
    return tiny_config(data_dir, **{**defaults, **overrides})


def _lowp(data_dir, retrain):
    return _config(data_dir, precision={"search": "bfp8", "retrain": retrain})


def _in_bfp8(tree) -> bool:
    """Whether every leaf is already 8-bit block floating point."""
    quantized = jax.jit(lowp.quantize_tree, static_argnums=1)(tree, 8)
    same = jax.tree.map(np.array_equal, quantized, tree)
    return all(jax.tree.leaves(same))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("lowp")
    return {
        name: (root / name, pipeline.run(_lowp(data_dir, retrain), str(root / name)))
        for name, retrain in (("lf", "fp32"), ("ll", "bfp8"))
    }


@pytest.mark.parametrize("name, retrain", [("lf", "fp32"), ("ll", "bfp8")])
def test_lf_and_ll_search_in_bfp8_and_report_it(runs, name, retrain):
    workdir, record = runs[name]
    assert [(s["stage"], s["precision"]) for s in record["stages"]] == [
        ("search", "bfp8"),
        ("retrain", retrain),
    ]
    _, variables, meta = load_model(str(workdir))
    assert meta["stage"] == "retrain"
    assert _in_bfp8(variables["params"]) == (retrain == "bfp8")  # the retrained weights
    search_end = checkpoint_arrays(workdir, 11)[1]["train"]  # the search's last epoch
    assert _in_bfp8(search_end["params"])
    row = report.format_table([record]).splitlines()[2].split()
    assert row[3] == ("bfp8" if retrain == "bfp8" else "bfp8/fp32")


def test_an_interrupted_bfp8_run_ends_bit_identical(runs, tmp_path, data_dir, interrupt_after):
    interrupt_after([1])  # in the search, its rounding mid-stream
    with pytest.raises(Interrupted):
        pipeline.run(_lowp(data_dir, "bfp8"), str(tmp_path))
    record = pipeline.run(_lowp(data_dir, "bfp8"), str(tmp_path))
    assert record["test_accuracy"] == runs["ll"][1]["test_accuracy"]
    want = checkpoint_arrays(runs["ll"][0])[1]
    jax.tree.map(np.testing.assert_array_equal, checkpoint_arrays(tmp_path)[1], want)


def _swa_config(data_dir):
    return _config(data_dir, method="dense", ticket_epoch=0, num_epochs=3, swa_start_epoch=1)


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("swa")
    return workdir, pipeline.run(_swa_config(data_dir), str(workdir))


def test_swa_averages_the_epochs_from_its_start_and_recomputes_bn(swa_run):
    workdir, record = swa_run
    assert record["swa"]["epochs_averaged"] == 2  # after epochs 2 and 3
    epoch_ends = [checkpoint_arrays(workdir, 11 * e)[1]["train"] for e in (2, 3)]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *(e["params"] for e in epoch_ends))
    _, swa, _ = load_model(str(workdir / "swa"))
    jax.tree.map(np.testing.assert_array_equal, swa["params"], mean)
    for got, last in zip(
        jax.tree.leaves(swa["batch_stats"]),
        jax.tree.leaves(epoch_ends[1]["batch_stats"]),
        strict=True,
    ):
        assert np.all(np.isfinite(got)) and not np.array_equal(got, last)
    assert 0 < record["test_accuracy"] <= 1
    assert "swa" in report.format_table([record]).splitlines()[2]


def test_an_interrupted_swa_run_ends_bit_identical(swa_run, tmp_path, data_dir, interrupt_after):
    interrupt_after([2])  # one epoch averaged, in the checkpoint
    with pytest.raises(Interrupted):
        pipeline.run(_swa_config(data_dir), str(tmp_path))
    record = pipeline.run(_swa_config(data_dir), str(tmp_path))
    assert record["test_accuracy"] == swa_run[1]["test_accuracy"]
    assert record["swa"] == swa_run[1]["swa"]
    got, want = load_model(str(tmp_path / "swa"))[1], load_model(str(swa_run[0] / "swa"))[1]
    jax.tree.map(np.testing.assert_array_equal, got, want)
