"""Measured energy: the meters (RAPL on a fake powercap tree, the fallbacks), and a run's
joules per epoch and stage with an injected meter, across a resume and a kill."""

import json
import time

import pytest
from conftest import Interrupted, tiny_config

from eb_jax import energy, pipeline, report
from eb_jax.trainer import ENERGY_FILE, Trainer

WATTS = 100.0


def _zone(root, name, label, energy_uj, max_uj=2**32):
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label)
    (path / "energy_uj").write_text(str(energy_uj))
    (path / "max_energy_range_uj").write_text(str(max_uj))
    return path


def test_rapl_sums_packages_and_dram_and_undoes_wraparound(tmp_path):
    package = _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, max_uj=10_000_000)
    _zone(package, "intel-rapl:0:0", "core", 5)  # inside the package: not added again
    dram = _zone(package, "intel-rapl:0:1", "dram", 200)
    meter = energy._rapl_meter([], str(tmp_path))
    assert meter.name == "rapl (package-0, dram)"
    start = meter.read()
    (package / "energy_uj").write_text(str(9_000_000))
    (dram / "energy_uj").write_text(str(2_200))
    assert meter.read() - start == pytest.approx(8.0 + 0.002)
    (package / "energy_uj").write_text(str(500_000))  # wrapped past 10 J
    assert meter.read() - start == pytest.approx(8.0 + 1.5 + 0.002)


def test_unreadable_rapl_and_no_meter_say_why(tmp_path):
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 1)
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()  # unreadable, whoever we are
    reasons = []
    assert energy._rapl_meter(reasons, str(tmp_path)) is None
    assert reasons[0].startswith("no readable RAPL")
    meter, why = energy.open_meter(str(tmp_path / "absent"))
    if meter is None:  # this machine: no NVIDIA GPU, and no RAPL under the given root
        assert "NVML" in why and "RAPL" in why and "\n" not in why


def test_an_energy_clock_without_a_meter_reads_none():
    clock = energy.EnergyClock(None, "no NVML; no RAPL")
    assert clock.joules() is None


@pytest.fixture
def hundred_watts(monkeypatch):
    """A meter that draws WATTS constantly: joules = WATTS x seconds."""
    meter = energy.Meter("fake (100 W)", lambda: WATTS * time.perf_counter())
    monkeypatch.setattr(energy, "open_meter", lambda *a: (meter, ""))


def _config(data_dir, **overrides):
    defaults = dict(num_epochs=3, lr_boundaries=(), eb_window=2, eb_eps=0.5, ticket_epoch=1)
    return tiny_config(data_dir, **{**defaults, **overrides})


def _epochs(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "test_accuracy" in r]


def _check_sums(workdir, record):
    total = record["energy"]["total_kj"]
    assert record["energy"]["meter"] == "fake (100 W)" and record["energy"]["why_not"] is None
    assert total == pytest.approx(WATTS * record["wall_time_s"] / 1e3, rel=0.02)
    stages = [s["energy_kj"] for s in record["stages"]]
    assert all(s > 0 for s in stages) and sum(stages) <= total
    epochs = _epochs(workdir)
    watts = [e["energy/average_watts"] for e in epochs]
    assert watts == pytest.approx([WATTS] * len(epochs), rel=0.05), watts
    assert sum(e["energy/epoch_joules"] for e in epochs) / 1e3 <= sum(stages)
    watts = [stage["average_watts"] for stage in record["stages"]]
    assert watts == pytest.approx([WATTS] * len(watts), rel=0.05), watts


@pytest.mark.slow
def test_a_run_reports_joules_per_epoch_and_stage(tmp_path, data_dir, hundred_watts):
    record = pipeline.run(_config(data_dir), str(tmp_path))
    assert [s["stage"] for s in record["stages"]] == ["search", "retrain"]
    _check_sums(tmp_path, record)
    assert record["energy"]["wasted_kj"] == 0
    assert json.loads((tmp_path / "report.json").read_text())["energy"] == record["energy"]


@pytest.mark.slow
def test_energy_continues_across_a_resume_and_a_kill_is_counted_as_wasted(
    tmp_path, data_dir, hundred_watts, interrupt_after, monkeypatch
):
    config = _config(data_dir, checkpoint_every_steps=4, log_every_steps=1)
    interrupt_after([1])  # after epoch 1, its checkpoint written: nothing lost
    with pytest.raises(Interrupted):
        pipeline.run(config, str(tmp_path))
    step = Trainer._step

    def killed_at_step_30(self, batch):  # the last checkpoint at step 28, energy.json at 30
        if self.step == 30:
            raise Interrupted
        step(self, batch)

    monkeypatch.setattr(Trainer, "_step", killed_at_step_30)
    with pytest.raises(Interrupted):
        pipeline.run(config, str(tmp_path))
    noted = json.loads((tmp_path / ENERGY_FILE).read_text())
    assert noted["step"] == 30
    monkeypatch.setattr(Trainer, "_step", step)
    time.sleep(0.5)  # drawn between the runs: counted nowhere
    record = pipeline.run(config, str(tmp_path))
    _check_sums(tmp_path, record)
    # Steps 28-30 ran twice: the first time is wasted, ~2 steps' worth plus the start-up.
    assert 0 < record["energy"]["wasted_kj"] < record["energy"]["total_kj"] / 3


@pytest.mark.slow
def test_the_table_shows_kilojoules_or_na(tmp_path, data_dir, hundred_watts):
    record = pipeline.run(_config(data_dir, num_epochs=1, ticket_epoch=0), str(tmp_path))
    row = report.format_table([record]).splitlines()[2].split()
    assert row[7] == f"{record['energy']['total_kj']:.3g}"
    record["energy"]["total_kj"] = None
    assert report.format_table([record]).splitlines()[2].split()[7] == "n/a"
