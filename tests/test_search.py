"""The search phase in the training loop: keep searching, no emergence, saved records."""

import json

import numpy as np
import pytest
from conftest import tiny_config

from eb_jax import pipeline
from eb_jax.checkpoint import load_model
from eb_jax.ticket.search import Ticket

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them


def _config(data_dir, **overrides):
    defaults = dict(num_epochs=4, lr_boundaries=())
    return tiny_config(data_dir, **{**defaults, **overrides})


def test_keep_searching_records_every_epoch(tmp_path, data_dir):
    config = _config(data_dir, keep_searching=True, eb_window=2, eb_eps=0.5)
    record = pipeline.run(config, str(tmp_path))
    assert [(s["stage"], s["epochs"]) for s in record["stages"]] == [("search", 4)]  # no cut
    assert record["retrain"] is None and record["ticket_drawn_by"] == "detector"
    with np.load(tmp_path / "masks.npz") as masks:
        np.testing.assert_array_equal(masks["epochs"], [0, 1, 2, 3, 4])
        for ratio in ("p0.3", "p0.5", "p0.7"):
            assert masks[ratio].shape == (5, 40) and masks[ratio].dtype == bool
        assert not masks["p0.5"][0].any()  # equal scales at init: nothing kept
    ticket = Ticket.from_json(json.loads((tmp_path / "ticket.json").read_text()))
    assert ticket.emerged and ticket.epoch <= 4
    np.testing.assert_array_equal(
        np.concatenate(ticket.masks), masks_at(tmp_path, "p0.5", ticket.epoch)
    )


def masks_at(workdir, key, epoch):
    with np.load(workdir / "masks.npz") as masks:
        return masks[key][list(masks["epochs"]).index(epoch)]


def test_no_emergence_takes_the_last_mask(tmp_path, data_dir):
    pipeline.run(_config(data_dir, num_epochs=2, eb_eps=1e-9, prune_ratio=0.4), str(tmp_path))
    ticket = json.loads((tmp_path / "ticket.json").read_text())
    assert ticket["ratio"] == 0.4 and not ticket["emerged"] and ticket["epoch"] == 2
    with np.load(tmp_path / "masks.npz") as masks:
        assert set(masks.files) == {"epochs", "p0.3", "p0.4", "p0.5", "p0.7"}


@pytest.mark.parametrize("mode", ["inherit", "reinit", "rewind"])
def test_eb_train_cuts_the_ticket_and_retrains_it(tmp_path, data_dir, mode, caplog):
    config = _config(data_dir, eb_window=2, eb_eps=0.5, retrain=mode, num_epochs=3)
    with caplog.at_level("INFO", logger="eb_jax"):
        record = pipeline.run(config, str(tmp_path))
    ticket = json.loads((tmp_path / "ticket.json").read_text())
    assert ticket["epoch"] < 3 and record["ticket_epoch"] == ticket["epoch"]
    assert [s["epochs"] for s in record["stages"]] == [ticket["epoch"], 3 - ticket["epoch"]]
    model, variables, meta = load_model(str(tmp_path))
    assert meta["stage"] == "retrain"
    assert [c for c in model.cfg if c != "M"] == ticket["kept"]  # the cut widths
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"retraining ({mode}) from epoch {ticket['epoch'] + 1} to 3" in messages
    assert (tmp_path / "init").exists() == (mode == "rewind")


def test_a_run_resumes_in_the_retrain_stage(tmp_path, data_dir, caplog):
    config = _config(data_dir, eb_window=2, eb_eps=0.5, num_epochs=3)
    pipeline.run(config, str(tmp_path))
    config.num_epochs = 4  # extend the schedule: the run goes on from its checkpoint
    with caplog.at_level("INFO", logger="eb_jax"):
        record = pipeline.run(config, str(tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    assert any("resuming" in m and "stage retrain" in m for m in messages)
    assert not any("cut the" in m for m in messages)  # the ticket is not cut twice
    assert sum(s["epochs"] for s in record["stages"]) == 4
    model, _, meta = load_model(str(tmp_path))
    assert meta["stage"] == "retrain" and model.cfg != (8, "M", 16, 16)
