"""Command line: python -m eb_jax.main [--config configs/X.py] [--workdir DIR] [--config.f=v]

Without --config it runs the offline quickstart (configs/quickstart.py). A bad flag,
config file or config value ends the run with a one-line error and exit code 2. SIGTERM
or SIGINT (a preemption, Ctrl-C) stops it at the next step boundary with a checkpoint,
one line and exit code 143 or 130 (128 + the signal's number); the same command resumes.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

import eb_jax

QUICKSTART = os.path.join(
    os.path.dirname(os.path.dirname(eb_jax.__file__)), "configs", "quickstart.py"
)

WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for metrics, checkpoints and plots (default: runs/<config>)."
)
CONFIG = []  # the config flag's holder, defined by run(): defining it parses sys.argv


def fail(message: str) -> None:
    print(f"eb_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _describe(error: Exception) -> str:
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return "the config file has no get_config() function; see configs/quickstart.py"
    if isinstance(error, AttributeError) and "' object has no attribute '" in str(error):
        return (
            f"the config file's get_config() must return an ml_collections ConfigDict, e.g. "
            f"eb_jax.config.default_config() with changes ({error})"
        )
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: an unknown field
        name = str(error).strip("\"'")
        return f"the config has no field {name!r}; see the config file for its fields"
    if isinstance(error, OSError):  # the config file is missing or fails to import
        return f"cannot load the config file: {str(error).strip().splitlines()[-1].strip()}"
    return f"bad config: {' '.join(str(error).split())}"


def _describe_flag(message: str) -> str:
    """absl's message for a bad flag; a value given to a group of fields (precision,
    bfp, distributed) names the group's fields instead of a parser's internals."""
    from eb_jax.config import default_config

    match = re.match(r"flag --config\.([\w.]+)=.*as a ConfigDict", message)
    if not match:
        return message
    name, group = match.group(1), default_config()
    for part in name.split("."):
        group = group.get(part) if hasattr(group, "get") else None
    fields = ", ".join(group.keys()) if hasattr(group, "keys") else "its fields"
    first = next(iter(group.keys()), "FIELD") if hasattr(group, "keys") else "FIELD"
    return (
        f"--config.{name} is a group of fields ({fields}); set one of them, e.g. "
        f"--config.{name}.{first}=VALUE"
    )


def _check_fields(config) -> None:
    """Fails naming every field a config file lacks (it should start from
    eb_jax.config.default_config())."""
    from eb_jax.config import default_config

    missing = _missing_fields(config, default_config())
    if missing:
        fail(
            f"the config file lacks the field(s) {', '.join(missing)}; start its get_config() "
            "from eb_jax.config.default_config() (which has them all)"
        )


def _missing_fields(config, expected, prefix: str = "") -> list[str]:
    missing = []
    for key, value in expected.items():
        if key not in config:
            missing.append(prefix + key)
        elif hasattr(value, "keys"):
            if not hasattr(config[key], "keys"):
                fail(f"config field {prefix + key} must be a group of fields ({', '.join(value)})")
            missing += _missing_fields(config[key], value, f"{prefix}{key}.")
    return missing


def parse_flags(argv: list[str], positional: int = 0) -> list[str]:
    """absl flag parsing with every bad flag or config as a one-line error; exactly
    `positional` arguments may follow the program's name."""
    try:
        rest = flags.FLAGS(argv)
        CONFIG[0].value.keys()  # loads the config file: a missing or broken one fails here
    except flags.Error as e:
        fail(_describe_flag(str(e)))
    except Exception as e:  # ml_collections raises assorted types for a bad config
        fail(_describe(e))
    _check_fields(CONFIG[0].value)
    if len(rest) - 1 > positional:
        fail(
            f"unexpected arguments: {' '.join(rest[1 + positional :])} (flags look like "
            "--config.field=value)"
        )
    if len(rest) - 1 < positional:
        fail(f"{argv[0]} needs {positional} argument(s) before its flags; see --help")
    return rest


def main(argv) -> int:
    del argv
    import jax

    from eb_jax import parallel, pipeline, platform, report
    from eb_jax.checkpoint import CheckpointError
    from eb_jax.config import ConfigError
    from eb_jax.data import DataError
    from eb_jax.epoch_loop import TrainingDiverged

    config = CONFIG[0].value
    platform.configure_process(config.cpu_xla_flags, config.reuse_host_memory)  # before JAX
    report.setup_logging()  # quiets absl before JAX logs
    try:
        parallel.initialize_distributed(config.distributed)
    except (ValueError, RuntimeError) as e:
        fail(f"cannot join the distributed run: {' '.join(str(e).split())}")
    report.setup_logging(jax.process_index())
    workdir = WORKDIR.value or pipeline.default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    try:
        run_preemptible(lambda: pipeline.run(config, workdir), workdir)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        fail(str(e))
    return 0


def run_preemptible(run, workdir: str):
    """`run()`, stopped by SIGTERM or SIGINT at the next step boundary with a checkpoint,
    one line and exit status 128 + the signal's number (143, 130)."""
    from eb_jax import preemption

    try:
        with preemption.handling():
            return run()
    except preemption.Preempted as e:
        print(f"eb_jax: stopped by {e} in {workdir}", file=sys.stderr)
        sys.exit(preemption.exit_code(e.signum))


def define_config_flag() -> None:
    """--config (default: the quickstart), with a bad file as a one-line error."""
    try:
        CONFIG.append(
            config_flags.DEFINE_config_file(
                "config",
                QUICKSTART,
                "Training configuration file (configs/*.py).",
                lock_config=True,
            )
        )
    except Exception as e:
        fail(_describe(e))


def run() -> None:
    define_config_flag()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
