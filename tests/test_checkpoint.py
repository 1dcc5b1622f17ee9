"""Checkpoints: exact resume after SIGKILL, fallback past damage, NaN stop, pruned models."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import assert_same_run, checkpoint_arrays, tiny_config

from eb_jax import pipeline, train_steps
from eb_jax.checkpoint import Checkpointer, CheckpointError, load_model
from eb_jax.config import load_config
from eb_jax.data import open_dataset
from eb_jax.epoch_loop import Clock, RunContext, StagePlan, Trainer
from eb_jax.lowp import FP32
from eb_jax.models import create_model
from eb_jax.runlog import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, data_dir, *flags):
    """The `python -m eb_jax.main` command on the test digits with `flags`, no PNGs."""
    return [
        sys.executable,
        "-m",
        "eb_jax.main",
        "--workdir",
        str(workdir),
        f"--config.data_dir={data_dir}",
        "--config.write_plots=False",
        *flags,
    ]


# The quickstart's schedule (22 steps per epoch) on the tiny VGG, for 4 epochs.
QUICKSTART_4 = dict(model="vgg_tiny", num_epochs=4, checkpoint_every_steps=5, write_plots=False)


def _command(workdir, data_dir, *extra):
    """The CLI's run of QUICKSTART_4."""
    flags = [f"--config.{k}={v}" for k, v in QUICKSTART_4.items() if k != "write_plots"]
    return _cli(workdir, data_dir, *flags, *extra)


def _run_killed_when(cmd, predicate, timeout=180):
    """Runs cmd; SIGKILLs it as soon as predicate() holds. Returns True if it was killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if predicate():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait(timeout=10)
    return False


def _stop_with_sigterm(cmd, workdir, at_step: int) -> None:
    """Runs cmd with a progress line per step; SIGTERMs it once global step `at_step` is
    done: it checkpoints the step in flight, says so in one line and exits 143."""
    cmd = [*cmd, "--config.log_every_steps=1"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # "epoch   3  step 5/22  loss ..."
        if line.startswith("epoch") and " step " in line:
            epoch, done = int(line.split()[1]), int(line.split()[3].split("/")[0])
            if (epoch - 1) * 22 + done >= at_step:
                signalled = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                break
    proc.stdout.read()
    stopping_s = time.perf_counter() - signalled if proc.wait(timeout=60) == 143 else None
    stop = proc.stderr.read().strip().splitlines()
    assert stopping_s is not None and len(stop) == 1, stop
    step = int(stop[0].split("after step ")[1].split(",")[0])
    assert stop[0].startswith("eb_jax: stopped by SIGTERM after step")
    assert 0 <= step - at_step <= 2  # the step in flight (and one the reader was behind)
    assert _steps(workdir)[-1] == step and not any("tmp" in e for e in _entries(workdir))
    assert stopping_s < 10
    print(f"SIGTERM to exit: {stopping_s:.2f} s (step {step})")


def _main(workdir, data_dir, *flags):
    """Runs `_cli(...)` to its end."""
    return subprocess.run(
        _cli(workdir, data_dir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _entries(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return os.listdir(directory) if os.path.isdir(directory) else []


def _steps(workdir):
    return sorted(int(e) for e in _entries(workdir) if e.isdigit())


@pytest.mark.slow
def test_killed_quickstart_resumes_bit_identically(tmp_path, data_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The run uninterrupted, in this process (the same result as the command's: the
    # multi-process tests compare the two bit for bit).
    pipeline.run(load_config("quickstart", data_dir=data_dir, **QUICKSTART_4), str(straight))

    cmd = _command(killed, data_dir)
    # Mid-epoch (22 steps per epoch): right after the step-35 checkpoint appears.
    assert _run_killed_when(cmd, lambda: 35 in _steps(killed))
    # During a save: while orbax's temporary directory for a later step exists.
    assert _run_killed_when(
        cmd, lambda: any("tmp" in e for e in _entries(killed)) and _steps(killed)[-1] >= 60
    )
    _stop_with_sigterm(cmd, killed, at_step=random.Random(0).randrange(66, 80))
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the run in" in resumed.stdout
    assert not any("tmp" in e for e in _entries(killed))  # orbax's leftovers cleaned up

    step_a, a = checkpoint_arrays(straight)
    step_b, b = checkpoint_arrays(killed)
    assert step_a == step_b == 4 * 22
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (straight / "ticket.json").read_text() == (killed / "ticket.json").read_text()


def _config(data_dir, **overrides):
    defaults = dict(
        num_epochs=2, lr_boundaries=(), checkpoint_every_steps=4, async_checkpoints=False
    )
    return tiny_config(data_dir, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def _first_epoch(tmp_path_factory, data_dir):
    """One epoch of `_config`, run once for the module (checkpoints at steps 4, 8, 11)."""
    workdir = tmp_path_factory.mktemp("first_epoch")
    pipeline.run(_config(data_dir, num_epochs=1), str(workdir))
    return workdir


@pytest.fixture
def first_epoch(_first_epoch, tmp_path):
    """A copy of the module's one-epoch run in this test's tmp_path."""
    shutil.copytree(_first_epoch, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _damage(workdir, step, how):
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    if how == "missing metadata":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
        return
    for root, _, files in os.walk(os.path.join(step_dir, "arrays")):
        for name in files:
            if "ocdbt.process" in root and "/d" in root:  # the array data files
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    if how == "truncated":
                        f.truncate(os.path.getsize(path) // 2)
                    else:
                        f.seek(0)
                        f.write(b"\xff" * 64)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "corrupted", "missing metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    first_epoch, data_dir, how, caplog
):
    steps = _steps(first_epoch)
    assert steps == [4, 8, 11]
    _damage(first_epoch, 11, how)
    with caplog.at_level("INFO", logger="eb_jax"):
        pipeline.run(_config(data_dir, num_epochs=2), str(first_epoch))
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "eb_jax" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1 and "checkpoint step 11 is damaged" in warnings[0]
    assert "\n" not in warnings[0]
    assert any(e.startswith("damaged-11-") for e in _entries(first_epoch))  # kept, set aside
    assert _steps(first_epoch)[-1] == 22
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert "from its checkpoint at step 8" in resumed[0]


@pytest.mark.slow
def test_resuming_past_a_damaged_checkpoint_prints_only_eb_jax_s_line(first_epoch, data_dir):
    """orbax's abandoned reads of the damaged step used to print tracebacks to stderr."""
    _damage(first_epoch, 11, "truncated")
    result = _main(
        first_epoch,
        data_dir,
        "--config.model=vgg_tiny",
        "--config.batch_size=128",
        "--config.eval_batch_size=120",
        "--config.num_epochs=2",
        "--config.lr_boundaries=()",
        "--config.log_every_steps=0",
        "--config.checkpoint_every_steps=4",
        "--config.async_checkpoints=False",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("checkpoint step 11 is damaged") == 1
    assert result.stderr == ""


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, data_dir):
    # lr x1e12 from epoch 1 on: the loss blows up after the epoch-0 checkpoint (step 11).
    result = _main(
        tmp_path,
        data_dir,
        "--config.model=vgg_tiny",
        "--config.batch_size=128",
        "--config.eval_batch_size=120",
        "--config.lr_boundaries=(1,)",
        "--config.lr_decay=1e12",
        "--config.method=dense",
        "--config.checkpoint_every_steps=0",
    )
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "the training loss became" in errors[0], result.stderr[-2000:]
    assert "the last good checkpoint (step 11) is kept" in errors[0]
    assert _steps(tmp_path) == [11]


@pytest.mark.slow
def test_config_that_does_not_match_the_checkpoint_is_a_clear_error(first_epoch, data_dir):
    result = _main(
        first_epoch,
        data_dir,
        "--config.model=vgg_tiny",
        "--config.batch_size=64",
    )
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1
    assert "batch_size: 128 there, 64 now" in errors[0]
    assert "another --workdir" in errors[0]
    assert _steps(first_epoch) == [4, 8, 11]  # nothing touched


@pytest.mark.slow
def test_a_resume_may_grow_num_epochs_and_trains_on_as_the_longer_run(tmp_path, data_dir):
    grown, longer = tmp_path / "grown", tmp_path / "longer"
    pipeline.run(_config(data_dir, method="dense", num_epochs=1), str(grown))
    with open(grown / "config.json") as f:  # the whole resolved config, as it started
        assert json.load(f)["num_epochs"] == 1
    record = pipeline.run(_config(data_dir, method="dense", num_epochs=2), str(grown))
    expected = pipeline.run(_config(data_dir, method="dense", num_epochs=2), str(longer))
    assert_same_run(record, str(grown), expected, str(longer))
    with pytest.raises(CheckpointError, match=r"num_epochs: 2 there, 1 now \(it may only grow"):
        pipeline.run(_config(data_dir, method="dense", num_epochs=1), str(grown))
    cosine = _config(data_dir, method="dense", num_epochs=3, lr_schedule="cosine")
    with pytest.raises(CheckpointError, match="the cosine schedule spans num_epochs"):
        pipeline.run(cosine, str(grown))


@pytest.mark.slow
def test_pruned_model_is_rebuilt_from_the_checkpoint_metadata_alone(tmp_path, data_dir):
    config = _config(data_dir)
    data = open_dataset("digits", data_dir)
    narrow = create_model("vgg_tiny", 10, cfg=(3, "M", 5, 2))
    tx = train_steps.create_optimizer(config, 11)
    state = train_steps.create_train_state(narrow, jax.random.key(1), (8, 8, 1), tx)
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    writer = MetricWriter(str(tmp_path))
    run = RunContext(config, data, str(tmp_path), checkpointer, writer, Clock())
    plan = StagePlan("dense", 0, config.num_epochs, 0, FP32, 0.0)
    trainer = Trainer(run, plan, narrow, state)
    trainer.train_epoch(0)
    checkpointer.close()
    writer.close()

    model, variables, meta = load_model(str(tmp_path))
    assert meta["widths"] == {"cfg": [3, "M", 5, 2]}
    assert variables["params"]["conv2"]["kernel"].shape == (3, 3, 5, 2)
    images = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
    trained = jax.tree.map(lambda x: x[0], trainer.state)
    expected = narrow.apply({"params": trained.params, "batch_stats": trained.batch_stats}, images)
    np.testing.assert_array_equal(model.apply(variables, images), expected)
    assert json.loads(json.dumps(meta))["stage"] == "dense"


def test_no_checkpoint_is_a_clear_error(tmp_path):
    from eb_jax.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        load_model(str(tmp_path))
