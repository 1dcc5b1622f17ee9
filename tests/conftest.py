"""Two forced CPU devices for every test, so pmap code runs multi-device here."""

import atexit
import os
import shutil
import signal
import tempfile

# Before JAX starts: 2 CPU devices; a collective that hangs fails in 10 s, not forever;
# and cheap compilation: the tests' tiny networks spend far longer compiling than running,
# so LLVM's optimisations are off and fusions use XLA's older emitters (half the compile
# time of the MLIR fusion emitters, the same run time here). Every result compared is
# computed under the same flags (subprocesses and notebook kernels inherit them).
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=2",
        "--xla_cpu_collective_call_terminate_timeout_seconds=10",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false",
    ]
).strip()

# Compiled programs are cached on disk for the session: runs and subprocesses that
# compile the same steps (most tests train the same tiny networks) skip recompiling. The
# process that makes the cache (pytest's, before its workers start) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="eb_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# eb_jax's process settings, as its entry points make them (importing eb_jax does not);
# subprocesses inherit the CPU flags through XLA_FLAGS.
from eb_jax import platform as _platform  # noqa: E402

_platform.configure_process()

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _eb_jax_logger_reaches_caplog():
    """A CLI run in-process turns the eb_jax logger's propagation off (runlog.setup_logging);
    every test starts with it on, so caplog sees eb_jax's records whatever ran before."""
    logging.getLogger("eb_jax").propagate = True
    yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir shared by the session's tests (the digits are written on first use)."""
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **overrides):
    """The tests' run: the tiny VGG on the digits, a few epochs of 11 steps, quiet, no
    PNGs (a third of such a run's time; the tests of the plots turn them on)."""
    from eb_jax.config import default_config

    config = default_config()
    config.update(
        model="vgg_tiny",
        dataset="digits",
        data_dir=data_dir,
        batch_size=128,
        eval_batch_size=120,
        log_every_steps=0,
        write_plots=False,
    )
    config.update(overrides)
    return config


_TRAINED_LIKE = {}


def trained_like(name, shape, seed=0):
    """Init variables with scales, biases and statistics spread as after training."""
    if (name, seed) not in _TRAINED_LIKE:
        import jax
        import numpy as np

        from eb_jax import train_steps
        from eb_jax.models import create_model

        model = create_model(name, 10)
        variables = train_steps.init_variables(model, jax.random.key(seed), shape)
        rng = np.random.default_rng(seed)

        def spread(path, x):
            leaf = path[-1].key
            if leaf in ("scale", "var"):
                return rng.uniform(0.2, 1.5, x.shape).astype(np.float32)
            if leaf in ("bias", "mean"):
                return rng.normal(0, 0.2, x.shape).astype(np.float32)
            return np.asarray(x)

        _TRAINED_LIKE[name, seed] = (model, jax.tree_util.tree_map_with_path(spread, variables))
    return _TRAINED_LIKE[name, seed]


class Interrupted(Exception):
    """Raised by `interrupt_after` in place of a killed run."""


@pytest.fixture
def interrupt_after(monkeypatch):
    """`interrupt_after([e1, e2, ...])`: training stops with `Interrupted` right after
    epoch e1 (1-based, its checkpoint written), in a later run after e2, and so on."""
    from eb_jax.epoch_loop import Trainer

    def arm(epochs: list[int]):
        train_epoch = Trainer.train_epoch

        def interrupted(self, epoch):
            metrics = train_epoch(self, epoch)
            if epochs and epoch + 1 == epochs[0]:
                epochs.pop(0)
                raise Interrupted
            return metrics

        monkeypatch.setattr(Trainer, "train_epoch", interrupted)

    return arm


@pytest.fixture
def signal_during(monkeypatch):
    """`signal_during([s1, s2, ...])`: a real SIGTERM to this process as its training step
    s1 (global, 1-based) starts; in a later run as step s2 starts, and so on."""
    from eb_jax.epoch_loop import Trainer

    def arm(steps: list[int]):
        step = Trainer._step

        def signalled(self, batch):
            if steps and self.step + 1 == steps[0]:
                steps.pop(0)
                os.kill(os.getpid(), signal.SIGTERM)
            step(self, batch)

        monkeypatch.setattr(Trainer, "_step", signalled)

    return arm


def run_through_signals(config, workdir, signals: int) -> tuple[dict, list[int]]:
    """Runs `config` in `workdir` with preemption handling again after each of `signals`
    stops (armed with `signal_during`); returns its report and the steps it stopped at."""
    from eb_jax import pipeline, preemption

    stopped = []
    for _ in range(signals):
        with pytest.raises(preemption.Preempted) as stop, preemption.handling():
            pipeline.run(config, str(workdir))
        stopped.append(stop.value.step)
    with preemption.handling():
        return pipeline.run(config, str(workdir)), stopped


def checkpoint_arrays(workdir, step: int | None = None):
    """(step, arrays) of a run's checkpoint at `step`, default the newest."""
    import orbax.checkpoint as ocp

    checkpoints = os.path.join(workdir, "checkpoints")
    if step is None:
        step = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    return step, ocp.StandardCheckpointer().restore(os.path.join(checkpoints, str(step), "arrays"))


def run_through_kills(config, workdir, kills: int) -> dict:
    """Runs `config` in `workdir` again after each of `kills` interruptions (armed with
    `interrupt_after`) until it finishes; returns its report."""
    from eb_jax import pipeline

    for _ in range(kills):
        with pytest.raises(Interrupted):
            pipeline.run(config, str(workdir))
    return pipeline.run(config, str(workdir))


def assert_same_run(record, workdir, expected, expected_dir) -> None:
    """Two runs ended the same: accuracy, stages and newest checkpoint, bit for bit."""
    import jax
    import numpy as np

    assert record["test_accuracy"] == expected["test_accuracy"]
    assert record["stages"] == expected["stages"]
    got, want = checkpoint_arrays(workdir)[1], checkpoint_arrays(expected_dir)[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
