"""Two local processes (127.0.0.1, one CPU device each) run EB Train together through
jax.distributed: preempted, killed and resumed, they end with the ticket and parameters
of one process with two devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import checkpoint_arrays

from eb_jax import pipeline
from eb_jax.config import load_config

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 'rewind': process 0 decides whether the initial weights still need saving (a resumed
# run has them), and every process follows.
OVERRIDES = {
    "model": "vgg_tiny",
    "batch_size": 128,
    "eval_batch_size": 120,
    "num_epochs": 2,
    "lr_boundaries": (1,),
    "eb_window": 2,
    "eb_eps": 0.5,
    "retrain": "rewind",
    "write_plots": False,
    "checkpoint_every_steps": 5,  # steps 5, 10, 11 (the epoch's end), 15, 20, 22
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, device_flags: str):
    """A Python process with its own forced CPU devices (the session's other XLA flags
    kept: the same compilation as the reference run), its output collected."""
    own = ("--xla_force_host_platform_device_count", "--xla_cpu_collective_call_terminate")
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(own)]
    env = dict(os.environ, XLA_FLAGS=" ".join([*kept, device_flags]))
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _start(workdir, data_dir, port):
    """Both processes of one run, each with one CPU device."""
    devices = "--xla_force_host_platform_device_count=1 "
    devices += "--xla_cpu_collective_call_terminate_timeout_seconds=30"
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [
        _spawn(
            [
                "-m",
                "eb_jax.main",
                "--workdir",
                str(workdir),
                f"--config.data_dir={data_dir}",
                *flags,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            devices,
        )
        for i in range(2)
    ]


def _finish(procs, timeout=240):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """The same run in this process, on its two devices."""
    workdir = tmp_path_factory.mktemp("single")
    config = load_config("quickstart", data_dir=data_dir, **OVERRIDES)
    return workdir, pipeline.run(config, str(workdir))


def _assert_same_run(workdir, single):
    single_dir, record = single
    step, arrays = checkpoint_arrays(workdir)
    single_step, expected = checkpoint_arrays(single_dir)
    assert step == single_step
    jax.tree.map(np.testing.assert_array_equal, arrays, expected)
    assert (workdir / "ticket.json").read_text() == (single_dir / "ticket.json").read_text()
    report = json.loads((workdir / "report.json").read_text())
    assert report["test_accuracy"] == record["test_accuracy"]
    assert report["devices"] == "2 x cpu"
    init, single_init = checkpoint_arrays(workdir / "init"), checkpoint_arrays(single_dir / "init")
    jax.tree.map(np.testing.assert_array_equal, init, single_init)


def _wait_for_checkpoint(workdir, step, procs, timeout=180):
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)


def test_two_processes_preempted_then_killed_end_as_one_process_with_two_devices(
    tmp_path, data_dir, single
):
    """A preemption notice to process 1 alone (as the first epoch's checkpoint appears):
    JAX's sync point stops both processes after the same step, each checkpointing it and
    exiting 143. Started again, both are killed as a later checkpoint appears; started
    once more, the two processes end bit-identical to one process with two devices."""
    procs = _start(tmp_path, data_dir, _free_port())
    _wait_for_checkpoint(tmp_path, 11, procs)
    procs[1].send_signal(signal.SIGTERM)
    preempted = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], preempted[1][-3000:]
    stops = [o.strip().splitlines()[-1] for o in preempted]
    assert stops[0] == stops[1] and stops[0].startswith("eb_jax: stopped by SIGTERM after step")
    step = int(stops[0].split("after step ")[1].split(",")[0])
    assert 11 < step < 20 and step in _steps(tmp_path)
    assert "1 x cpu in each of 2 processes" in preempted[0] and "cut the p=0.5" in preempted[0]

    procs = _start(tmp_path, data_dir, _free_port())
    _wait_for_checkpoint(tmp_path, 20, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    killed = [p.communicate()[0] for p in procs]
    assert f"from its checkpoint at step {step}" in killed[0]

    outputs = _finish(_start(tmp_path, data_dir, _free_port()))
    assert "resuming the run" in outputs[0] and "from its checkpoint at step 20" in outputs[0]
    assert "epoch   2/2" in outputs[0] and "epoch" not in outputs[1]  # process 0 reports
    _assert_same_run(tmp_path, single)


def _steps(workdir):
    return sorted(int(e) for e in os.listdir(workdir / "checkpoints") if e.isdigit())


GATHER_SCRIPT = """
import sys
import jax
import numpy as np
from eb_jax import parallel
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
joules = np.array([262143.328850123 + int(sys.argv[2]), 2.0**60])
gathered = parallel.gather_over_processes(joules)
print("gathered", gathered[:, 0].tolist() == [262143.328850123 + i for i in range(2)])
"""


def test_each_process_measures_its_own_devices_and_the_gather_is_exact():
    """Energy: every process reads its own meter; the rows are gathered as float64, exact
    (JAX without x64 would round them to float32)."""
    address = f"127.0.0.1:{_free_port()}"
    devices = "--xla_force_host_platform_device_count=1"
    procs = [_spawn(["-c", GATHER_SCRIPT, address, str(i)], devices) for i in range(2)]
    outputs = _finish(procs, timeout=120)
    assert all("gathered True" in out for out in outputs), outputs
