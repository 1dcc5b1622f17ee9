"""The command line: the quickstart end to end, and every bad input as a one-line error."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, data_dir=None, timeout=300):
    cmd = [sys.executable, "-m", "eb_jax.main", *args]
    if data_dir:
        cmd.append(f"--config.data_dir={data_dir}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quickstart_trains_to_90_percent_and_writes_metrics(tmp_path, data_dir):
    """No --config: the offline quickstart, on the 2 forced CPU devices."""
    workdir = tmp_path / "run"
    result = _main("--workdir", str(workdir), data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 20 and "img/s" in lines[-1] and "ETA" in lines[-1]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 21))
    assert records[-1]["test_accuracy"] >= 0.90
    assert records[-1]["learning_rate"] == pytest.approx(0.001)
    assert glob.glob(str(workdir / "events.out.tfevents.*"))


@pytest.mark.parametrize("args,message", [
    (["--config.foo=1"], "the config has no field 'foo'"),
    (["--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config", "configs/missing.py"], "cannot load the config file"),
    (["--config.batch_size=63"], "batch_size=63 must be a positive multiple of the 2 devices"),
    (["--config.model=vgg99"], "unknown model 'vgg99'"),
    (["--config.dataset=mnist"], "unknown dataset 'mnist'"),
    (["--config", "configs/vgg16_cifar10.py"], "not prepared as array_record"),
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["stray"], "unexpected arguments: stray"),
])  # fmt: skip
def test_bad_input_is_a_one_line_error(args, message, tmp_path, data_dir):
    result = _main("--workdir", str(tmp_path / "w"), *args, data_dir=data_dir, timeout=120)
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("eb_jax: error: "), result.stderr[-2000:]
    assert message in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
