"""benchmarks/device_check.py: `--quick` runs every section on CPU (so the accelerator
script cannot rot) and writes its JSON and table, saying what it skipped and why."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick(out, monkeypatch, *args) -> int:
    """`device_check.py --quick --out out *args`, in this process (as its `main`)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # main sets it; kept here
    import device_check

    return device_check.main(["--quick", "--out", str(out), *args])


@pytest.mark.slow
def test_quick_device_check_measures_every_section_on_cpu(tmp_path, monkeypatch):
    assert _quick(tmp_path, monkeypatch) == 0
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert results["errors"] == {} and results["quick"] is True
    assert results["environment"]["backend"] == "cpu" and results["environment"]["host_cores"]
    skipped = "\n".join(results["skipped"])
    assert "ResNet: not in --quick" in skipped
    assert list(results["step"]) == list(results["tickets"]) == ["vgg_tiny"]
    for name, row in results["step"].items():
        assert row["fp32_ms"] > 0 and row["bf16_ms"] > 0
        assert row["images_per_s"]["bf16"] == pytest.approx(16_000 / row["bf16_ms"])
        assert row["torch_mode"] == "eager"  # torch.compile is for the accelerator run
        if "torch_ms" in row:
            assert row["versus_torch"]["fp32"] == pytest.approx(row["torch_ms"] / row["fp32_ms"])
        else:  # PyTorch is not in requirements.txt
            assert f"PyTorch {name}:" in skipped
    for name, tickets in results["tickets"].items():
        ticket = tickets["p=0.5"]
        assert ticket["flops_ratio"] > 1 and ticket["speedup"] > 0, name
        assert ticket["of_flops_ratio"] == pytest.approx(ticket["speedup"] / ticket["flops_ratio"])
    energy = results["energy"]
    assert energy["flops_ratio"] > 1 and energy["time_ratio"] > 0
    assert energy["epoch_images"] == 64 and set(energy["seconds"]) == {"dense", "p=0.5"}
    if energy["meter"] is None:  # no NVML or RAPL on these machines
        assert energy["joules"] == {"dense": None, "p=0.5": None} and "energy: no meter" in skipped
    else:
        assert energy["joules_ratio"] > 0
    pillow = results["input"]["grain_pillow"]
    assert pillow["images_per_s"] > 0 and pillow["workers"] >= 1
    assert results["input"]["step_network"] == "vgg_tiny"
    step_rate = results["step"]["vgg_tiny"]["images_per_s"]["bf16"]
    assert pillow["of_step_rate"] == pytest.approx(pillow["images_per_s"] / step_rate)
    assert "dali" in results["input"] or "input through DALI: input_backend='dali'" in skipped
    table = (tmp_path / "device_check.md").read_text()
    assert table.startswith("# device_check --quick: ")
    assert "| what | measured | goal | met |" in table
    for what in ("step, batch 16", "p=0.5 ticket (fp32)", "joules ratio", "ImageNet input"):
        assert what in table
    assert all(reason in table for reason in results["skipped"])


def test_sections_past_the_budget_are_skipped_and_said_so(tmp_path, monkeypatch):
    assert _quick(tmp_path, monkeypatch, "--budget", "-1") == 0
    import device_check  # on the path now

    results = json.loads((tmp_path / "device_check.json").read_text())
    not_started = [r for r in results["skipped"] if "not started" in r]
    assert [r.split(":")[0] for r in not_started] == list(device_check.SECTIONS)
    assert "not started, the -1 s budget was spent" in not_started[0]
    assert "| what | measured | goal | met |" in (tmp_path / "device_check.md").read_text()
