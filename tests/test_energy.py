"""Measured energy with fake counters: RAPL on fake powercap trees (wraps, psys, DRAM), a
fake NVML module (bus ids, MIG, no counter, errors), the devices JAX runs on, several
processes combined, the waste of two kills; then a run's joules per epoch and stage with
an injected meter, across a resume and kills."""

import json
import os
import sys
import threading
import time

import numpy as np
import pytest
from conftest import Interrupted, tiny_config

from eb_jax import energy, pipeline, report
from eb_jax.energy import ACCELERATOR, HOST, Device
from eb_jax.epoch_loop import Trainer

WATTS = 100.0
GPU_A, GPU_B = "0000:3B:00.0", "0000:86:00.0"


def _zone(root, name, label, energy_uj, max_uj=2**32):
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label)
    (path / "energy_uj").write_text(str(energy_uj))
    (path / "max_energy_range_uj").write_text(str(max_uj))
    return path


def _socket(root, max_uj=10_000_000):
    """One package (10 J range) with core and DRAM subzones, and a psys zone beside it."""
    package = _zone(root, "intel-rapl:0", "package-0", 1_000_000, max_uj)
    _zone(package, "intel-rapl:0:0", "core", 5)  # inside the package: never added
    dram = _zone(package, "intel-rapl:0:1", "dram", 200)
    psys = _zone(root, "intel-rapl:1", "psys", 0)  # contains package and DRAM
    return package, dram, psys


class FakeNVML:
    """pynvml's calls the meter makes, over GPUs {bus id: {name, mj, mig, counter, error}}."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, **gpus):
        self.gpus = {
            bus: {"name": "H100", "mj": 0, "mig": 0, "counter": True, **g}
            for bus, g in gpus.items()
        }
        self.error = False

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return list(self.gpus)[i]

    def nvmlDeviceGetPciInfo(self, handle):  # NVML's form: 8-digit domain, lower case
        return type("Pci", (), {"busId": ("0000" + handle.lower()).encode()})

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle]["name"].encode()

    def nvmlDeviceGetMigMode(self, handle):
        return [self.gpus[handle]["mig"], self.gpus[handle]["mig"]]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        gpu = self.gpus[handle]
        if not gpu["counter"]:
            raise self.NVMLError("Not Supported")
        if self.error:
            raise self.NVMLError("GPU is lost")
        return gpu["mj"]


def _reading(*meters):
    """The run's reading from meters standing for processes 0, 1, ... (their gather)."""
    return energy.combine(np.stack([m.rows() for m in meters]))


def test_several_rapl_wraps_between_reads_are_counted_by_the_sampling_thread(tmp_path):
    package, dram, _ = _socket(tmp_path)  # 10 J range: sampled every 5 ms, not every 60 s
    meter = energy.open_meter([Device("cpu")], str(tmp_path), FakeNVML())
    assert meter.name(HOST) == "rapl (package-0, dram)" and meter.counted == HOST
    start = _reading(meter)[HOST]["j"]
    sampled = threading.Event()
    meter.start(60.0, lambda: (meter.joules(), sampled.set()))
    try:
        for k in range(1, 9):  # 8 x 4 J on the package: 3 wraps past 10 J
            (package / "tmp").write_text(str((1_000_000 + 4_000_000 * k) % 10_000_000))
            os.replace(package / "tmp", package / "energy_uj")  # whole, as sysfs reads
            for _ in range(2):  # a whole sample after the write
                sampled.clear()
                assert sampled.wait(5)
    finally:
        meter.close()
    (dram / "energy_uj").write_text(str(2_200))
    assert _reading(meter)[HOST]["j"] - start == pytest.approx(32.0 + 0.002)


def test_psys_alone_is_counted_and_unreadable_rapl_says_why(tmp_path):
    (tmp_path / "a").mkdir()
    _zone(tmp_path / "a", "intel-rapl:1", "psys", 0)
    assert energy._rapl_source(str(tmp_path / "a"))[0].name == "rapl (psys)"
    package, dram, _ = _socket(tmp_path / "b")
    (dram / "energy_uj").unlink()
    (dram / "energy_uj").mkdir()  # unreadable, whoever we are
    source, why = energy._rapl_source(str(tmp_path / "b"))
    assert source is None and why.startswith("RAPL not readable (Is a directory: ")
    assert "no intel-rapl package" in energy._rapl_source(str(tmp_path / "c"))[1]


def test_gpus_are_found_by_the_bus_ids_of_jax_devices_not_by_cuda_visible_devices(
    tmp_path, monkeypatch
):
    # CUDA_VISIBLE_DEVICES=GPU-<uuid of B>: JAX's one device is GPU B, CUDA ordinal 0.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5c3b1f0e-b")
    nvml = FakeNVML(**{GPU_A: {"mj": 1_000}, GPU_B: {"mj": 5_000}})
    meter = energy.open_meter([Device("gpu", GPU_B)], str(tmp_path), nvml)
    assert meter.name(ACCELERATOR) == "nvml (1 x H100)" and meter.counted == ACCELERATOR
    start = _reading(meter)
    nvml.gpus[GPU_A]["mj"] += 70_000  # another job's GPU
    nvml.gpus[GPU_B]["mj"] += 2_500
    assert energy.joules_between(start, _reading(meter), ACCELERATOR) == pytest.approx(2.5)
    assert start[HOST]["j"] is None and "no intel-rapl" in start[HOST]["why"]


@pytest.mark.parametrize(
    "devices, gpu, why",
    [
        ([Device("cpu")], {}, "JAX runs on the CPU"),  # JAX_PLATFORMS=cpu on a GPU node
        ([Device("gpu", GPU_A)], {"mig": 1}, "MIG slices"),
        ([Device("gpu", GPU_A)], {"counter": False}, "no NVML energy counter on P100"),
        ([Device("gpu", GPU_B)], {}, "NVML has no GPU at PCI bus id 0000:86:00.0"),
        ([Device("tpu")], {}, "no TPU energy counter"),
    ],
)
def test_an_accelerator_without_its_own_counter_is_na_and_the_host_stays_apart(
    tmp_path, devices, gpu, why
):
    _socket(tmp_path)
    nvml = FakeNVML(**{GPU_A: {"name": "P100", **gpu}})
    meter = energy.open_meter(devices, str(tmp_path), nvml)
    reading = _reading(meter)
    assert reading[ACCELERATOR]["j"] is None and why in reading[ACCELERATOR]["why"]
    assert reading[HOST]["j"] is not None  # measured, and never passed off as the GPU's
    record = energy.summary(reading, energy.EnergyClock(meter))
    assert record["host"]["total_kj"] is not None and record["host"]["meter"].startswith("rapl")
    if devices[0].platform == "cpu":  # then the host's figure is the compute's, labelled
        assert record["counted"] == HOST and record["total_kj"] is not None
    else:
        assert record["counted"] == ACCELERATOR and record["total_kj"] is None
        assert why in record["why_not"]


def test_this_machine_runs_jax_on_the_cpu_so_the_host_figure_is_shown(tmp_path):
    assert {d.platform for d in energy.jax_devices()} == {"cpu"}
    meter = energy.open_meter(rapl_root=str(tmp_path), nvml=FakeNVML(**{GPU_A: {}}))
    assert meter.counted == HOST and meter.name(ACCELERATOR) is None


def test_a_gpu_run_without_nvml_is_na_not_the_hosts_rapl(tmp_path, monkeypatch):
    _socket(tmp_path)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = energy.open_meter([Device("gpu", GPU_A)], str(tmp_path))
    record = energy.summary(_reading(meter), energy.EnergyClock(meter))
    assert record["total_kj"] is None and "no NVML" in record["why_not"]
    assert record["host"]["total_kj"] is not None


def test_an_nvml_error_mid_run_makes_that_stretch_na_and_training_reads_on(tmp_path):
    nvml = FakeNVML(**{GPU_A: {}})
    meter = energy.open_meter([Device("gpu", GPU_A)], str(tmp_path), nvml)
    marks = [_reading(meter)]
    nvml.gpus[GPU_A]["mj"] += 1_000
    marks.append(_reading(meter))
    nvml.error = True
    nvml.gpus[GPU_A]["mj"] += 50_000
    marks.append(_reading(meter))  # read while failing: no exception
    nvml.error = False
    nvml.gpus[GPU_A]["mj"] += 50_000
    marks.append(_reading(meter))  # the first good read again: a new origin
    nvml.gpus[GPU_A]["mj"] += 3_000
    marks.append(_reading(meter))
    between = [
        energy.joules_between(a, b, ACCELERATOR) for a, b in zip(marks, marks[1:], strict=False)
    ]
    assert between == [pytest.approx(1.0), None, None, pytest.approx(3.0)]
    record = energy.summary(marks[-1], energy.EnergyClock(meter))
    assert record["total_kj"] is None and "GPU is lost" in record["why_not"]
    assert record["accelerator"]["measured_kj"] == pytest.approx(0.004)


def test_one_process_per_gpu_counts_each_gpu_once_and_the_host_once(tmp_path):
    _socket(tmp_path)
    nvml = FakeNVML(**{GPU_A: {}, GPU_B: {}})
    keys = np.array([7, 7, 9])  # processes 0 and 1 on one host, 2 on another
    assert [energy.host_reader(keys, i) for i in range(3)] == [None, 0, None]
    first = energy.open_meter([Device("gpu", GPU_A)], str(tmp_path), nvml, None)
    second = energy.open_meter([Device("gpu", GPU_B)], str(tmp_path), nvml, 0)
    start = _reading(first, second)
    nvml.gpus[GPU_A]["mj"] += 1_000
    nvml.gpus[GPU_B]["mj"] += 2_000
    package = tmp_path / "intel-rapl:0" / "energy_uj"
    package.write_text(str(int(package.read_text()) + 4_000_000))
    end = _reading(first, second)
    assert energy.joules_between(start, end, ACCELERATOR) == pytest.approx(3.0)
    assert energy.joules_between(start, end, HOST) == pytest.approx(4.0)  # not 8


def test_a_process_that_cannot_read_makes_the_figure_na_and_says_which(tmp_path):
    _socket(tmp_path)
    nvml = FakeNVML(**{GPU_A: {}})
    first = energy.open_meter([Device("gpu", GPU_A)], str(tmp_path), nvml)
    second = energy.open_meter([Device("gpu", GPU_B)], str(tmp_path / "none"), nvml, 0)
    reading = _reading(first, second)
    assert reading[ACCELERATOR]["j"] is None
    assert reading[ACCELERATOR]["why"].startswith("process 1: NVML has no GPU")
    assert reading[HOST]["j"] is not None  # process 0 reads the host's


class Joules:
    """A fake counter: set `.j` to what has been drawn."""

    def __init__(self):
        self.j = 0.0

    def meter(self) -> energy.Meter:
        source = energy.Source("fake", lambda: [self.j], [None])
        channels = {ACCELERATOR: energy.Channel(source), HOST: energy.Channel(None, "none")}
        return energy.Meter(channels, ACCELERATOR)


def test_two_kills_before_a_new_checkpoint_both_count_as_wasted(tmp_path):
    note = str(tmp_path / energy.NOTE_FILE)
    drawn = Joules()
    clock = energy.resumed_clock(drawn.meter(), None, -1, 0.0, note)
    drawn.j = 10.0
    saved = {"reading": clock.reading(), "wasted": dict(clock.wasted)}  # checkpoint, step 5
    clock.checkpointed(5, saved["reading"], 2.0)
    drawn.j = 13.0
    clock.write_note()  # by the sampling thread
    for wasted, more in ((3.0, 5.0), (8.0, 0.5)):  # killed; resumed from step 5; killed
        drawn = Joules()
        clock = energy.resumed_clock(drawn.meter(), saved, 5, 2.0, note)
        assert clock.wasted[ACCELERATOR] == pytest.approx(wasted)
        drawn.j = more
        clock.write_note()
    clock = energy.resumed_clock(Joules().meter(), saved, 5, 2.0, note)
    assert clock.wasted[ACCELERATOR] == pytest.approx(8.5)
    assert clock.reading()[ACCELERATOR]["j"] == pytest.approx(10.0)  # the total goes on


def test_the_sampling_thread_keeps_the_note_current(tmp_path):
    note = tmp_path / energy.NOTE_FILE
    drawn = Joules()
    clock = energy.resumed_clock(drawn.meter(), None, -1, 0.0, str(note))
    clock.start(0.005)
    try:
        drawn.j = 4.0
        deadline = time.time() + 5
        while json.loads(note.read_text())["since"][ACCELERATOR] != 4.0:
            assert time.time() < deadline
            time.sleep(0.005)
    finally:
        clock.close()
    # Killed before its first checkpoint: all it drew is wasted.
    assert (
        energy.resumed_clock(Joules().meter(), None, -1, 0.0, str(note)).wasted[ACCELERATOR] == 4.0
    )


def test_processes_that_read_different_things_gather_alike_and_never_hang(tmp_path):
    """Two processes (threads, their all-gather a barrier that breaks if one skips it):
    process 0 reads a GPU and RAPL, process 1 neither; the n/a figures name process 1."""
    _socket(tmp_path)
    meters = [
        energy.open_meter([Device("gpu", GPU_A)], str(tmp_path), FakeNVML(**{GPU_A: {}})),
        energy.open_meter([Device("gpu", GPU_A)], str(tmp_path / "none"), FakeNVML()),
    ]
    rows, barrier, readings = [None, None], threading.Barrier(2, timeout=5), [[], []]

    def process(i):
        def gather(row):
            rows[i] = row
            barrier.wait()  # both rows in
            gathered = np.stack(rows)
            barrier.wait()  # both read
            return gathered

        clock = energy.EnergyClock(meters[i], gather=gather)
        readings[i] += [clock.reading() for _ in range(3)]

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(readings[0]) == len(readings[1]) == 3 and readings[0] == readings[1]
    accelerator, host = readings[0][-1][ACCELERATOR], readings[0][-1][HOST]
    assert accelerator["j"] is None and host["j"] is None
    assert (
        accelerator["why"]
        == "process 1: NVML has no GPU at PCI bus id 0000:3B:00.0 (a JAX device's)"
    )
    assert host["why"].startswith("process 1: no RAPL")


def test_the_report_cli_says_why_energy_is_na(tmp_path, capsys, monkeypatch):
    record = json.loads(json.dumps(_REPORT))
    (tmp_path / "report.json").write_text(json.dumps(record))
    monkeypatch.setattr(report, "plot_costs", lambda *a: None)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[7] == "n/a"
    assert out[-1] == (
        "r: kJ = n/a (no NVML energy counter on P100 (Not Supported)); host 1.5 kJ apart, by "
        "rapl (package-0, dram)"
    )


_FIGURE = {"measured_kj": None, "wasted_kj": None, "meter": None, "why_not": None}
_REPORT = {
    "run": "r",
    "method": "dense",
    "prune_ratio": None,
    "ticket_epoch": None,
    "ticket_drawn_by": None,
    "retrain": None,
    "test_accuracy": 0.5,
    "training_pflops": 1.0,
    "num_epochs": 1,
    "wall_time_s": 60.0,
    "params": {"final": 10},
    "stages": [{"stage": "dense", "epochs": 1, "training_pflops": 1.0}],
    "energy": {
        "counted": "accelerator",
        "total_kj": None,
        "why_not": "no NVML energy counter on P100 (Not Supported)",
        "accelerator": {**_FIGURE, "total_kj": None},
        "host": {**_FIGURE, "total_kj": 1.5, "meter": "rapl (package-0, dram)"},
    },
}


# --- Runs with an injected meter: joules per epoch and stage, resumes, kills ---


@pytest.fixture
def hundred_watts(monkeypatch):
    """JAX on the CPU, whose host meter draws WATTS constantly: joules = WATTS x seconds."""

    def open_meter(*args, **kwargs):
        source = energy.Source("fake (100 W)", lambda: [WATTS * time.perf_counter()], [None])
        channels = {HOST: energy.Channel(source), ACCELERATOR: energy.Channel(None, "on CPU")}
        return energy.Meter(channels, HOST)

    monkeypatch.setattr(energy, "open_meter", open_meter)


def _config(data_dir, **overrides):
    defaults = dict(num_epochs=3, lr_boundaries=(), eb_window=2, eb_eps=0.5, ticket_epoch=1)
    return tiny_config(data_dir, **{**defaults, **overrides})


def _epochs(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "test_accuracy" in r]


def _check_sums(workdir, record):
    total = record["energy"]["total_kj"]
    assert record["energy"]["meter"] == "fake (100 W)" and record["energy"]["why_not"] is None
    assert record["energy"]["counted"] == HOST and record["energy"]["accelerator"]["meter"] is None
    assert total == pytest.approx(WATTS * record["wall_time_s"] / 1e3, rel=0.02)
    stages = [s["energy_kj"] for s in record["stages"]]
    assert stages == [s["host_energy_kj"] for s in record["stages"]]
    assert all(s > 0 for s in stages) and sum(stages) <= total
    epochs = _epochs(workdir)
    watts = [e["energy/host_watts"] for e in epochs]
    assert watts == pytest.approx([WATTS] * len(epochs), rel=0.05), watts
    assert sum(e["energy/host_joules"] for e in epochs) / 1e3 <= sum(stages)
    assert not any("energy/accelerator_joules" in e for e in epochs)
    watts = [stage["average_watts"] for stage in record["stages"]]
    assert watts == pytest.approx([WATTS] * len(watts), rel=0.05), watts


@pytest.mark.slow
def test_a_run_reports_joules_per_epoch_and_stage(tmp_path, data_dir, hundred_watts):
    record = pipeline.run(_config(data_dir), str(tmp_path))
    assert [s["stage"] for s in record["stages"]] == ["search", "retrain"]
    _check_sums(tmp_path, record)
    assert record["energy"]["wasted_kj"] == 0
    assert json.loads((tmp_path / "report.json").read_text())["energy"] == record["energy"]
    assert "r: kJ = host CPU (JAX ran on the CPU) energy by fake (100 W)" in report.format_table(
        [{**record, "run": "r"}]
    )


@pytest.fixture
def joule_per_step(monkeypatch):
    """A GPU's meter that counts one joule per training step: exact totals."""
    drawn, step = Joules(), Trainer._step

    def counted(self, batch):
        step(self, batch)
        drawn.j += 1.0

    monkeypatch.setattr(Trainer, "_step", counted)
    monkeypatch.setattr(energy, "open_meter", lambda *a, **k: drawn.meter())


@pytest.mark.slow
def test_energy_totals_are_exact_across_kills_and_every_kill_is_wasted(
    tmp_path, data_dir, joule_per_step, interrupt_after, monkeypatch
):
    config = _config(data_dir)  # 11 steps an epoch, the ticket after epoch 1; 33 steps
    interrupt_after([1])  # after epoch 1, its checkpoint written: nothing lost
    with pytest.raises(Interrupted):
        pipeline.run(config, str(tmp_path))
    step = Trainer._step

    def killed_at_step_18(self, batch):  # the newest checkpoint is at step 11
        if self.step == 18:
            raise Interrupted
        step(self, batch)

    monkeypatch.setattr(Trainer, "_step", killed_at_step_18)
    for _ in range(2):  # killed twice before a new checkpoint
        with pytest.raises(Interrupted):
            pipeline.run(config, str(tmp_path))
    noted = json.loads((tmp_path / energy.NOTE_FILE).read_text())
    assert noted["step"] == 11 and noted["wasted"][ACCELERATOR] == 7.0  # the first kill's
    monkeypatch.setattr(Trainer, "_step", step)
    record = pipeline.run(config, str(tmp_path))
    figure = record["energy"]
    assert figure["counted"] == ACCELERATOR and figure["host"]["why_not"] == "none"
    assert figure["total_kj"] * 1e3 == pytest.approx(33, abs=1e-9)
    assert figure["wasted_kj"] * 1e3 == pytest.approx(14, abs=1e-9)  # steps 11-17, twice
    assert figure["wasted_s"] > 0
    assert [s["accelerator_energy_kj"] * 1e3 for s in record["stages"]] == [11, 22]
    epochs = [e["energy/accelerator_joules"] for e in _epochs(tmp_path)]
    assert epochs == [11.0] * 3


@pytest.mark.slow
def test_the_table_shows_kilojoules_or_na(tmp_path, data_dir, hundred_watts):
    record = pipeline.run(_config(data_dir, num_epochs=1, ticket_epoch=0), str(tmp_path))
    row = report.format_table([record]).splitlines()[2].split()
    assert row[7] == f"{record['energy']['total_kj']:.3g}"
    record["energy"]["total_kj"] = None
    assert report.format_table([record]).splitlines()[2].split()[7] == "n/a"
