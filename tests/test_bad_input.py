"""Bad input as a new user gives it: config files, workdirs, the report CLI and method
options each end in one line (`eb_jax: error: ...`, exit 2) before anything is lost."""

import json
import os

import pytest
from absl import flags
from conftest import tiny_config
from ml_collections import config_flags

from eb_jax import main, pipeline, report
from eb_jax.config import ConfigError, default_config, load_config


def _one_line_exit(capsys, call) -> str:
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eb_jax: error: "), lines
    return lines[0]


def _flag_error(tmp_path, monkeypatch, config_text: str, *args) -> Exception:
    """What absl / ml_collections raise for `--config FILE args` (parsed here; defining
    the flag reads sys.argv, as in the CLI)."""
    path = tmp_path / "config.py"
    path.write_text(config_text)
    argv = ["prog", f"--config={path}", *args]
    monkeypatch.setattr("sys.argv", argv)
    values = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_file("config", str(path), flag_values=values)
        values(argv)
        holder.value.keys()
    except Exception as e:  # noqa: BLE001 (the error under test)
        return e
    raise AssertionError("no error")


def test_a_config_file_missing_a_field_names_it(capsys):
    config = default_config()
    del config["thinet_images"]
    del config["precision"]["retrain"]
    message = _one_line_exit(capsys, lambda: main._check_fields(config))
    assert "lacks the field(s) " in message and "default_config()" in message
    assert "thinet_images" in message and "precision.retrain" in message
    main._check_fields(default_config())  # a whole config passes


def test_a_config_file_without_get_config_or_a_config_dict_is_named(tmp_path, monkeypatch):
    error = _flag_error(tmp_path, monkeypatch, "X = 1\n")
    assert main._describe(error) == (
        "the config file has no get_config() function; see configs/quickstart.py"
    )
    error = _flag_error(tmp_path, monkeypatch, "def get_config():\n    return 3\n")
    assert "must return an ml_collections ConfigDict" in main._describe(error)


def test_load_config_names_a_file_without_get_config(tmp_path):
    (tmp_path / "mine.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match="has no get_config"):
        load_config(str(tmp_path / "mine.py"))


@pytest.mark.parametrize("group", ["precision", "bfp", "distributed"])
def test_a_value_for_a_group_of_fields_names_the_fields(tmp_path, monkeypatch, group):
    config = "from eb_jax.config import default_config\nget_config = default_config\n"
    error = _flag_error(tmp_path, monkeypatch, config, f"--config.{group}=bf16")
    message = main._describe_flag(str(error))
    assert message.startswith(f"--config.{group} is a group of fields (")
    assert "ast.Name" not in message and f"--config.{group}." in message


@pytest.mark.parametrize("how", ["dangling symlink", "under a file", "under /proc", "a file"])
def test_an_unusable_workdir_is_a_one_line_error_and_nothing_is_touched(tmp_path, how):
    (tmp_path / "notes.txt").write_text("keep me")
    workdir = {
        "dangling symlink": tmp_path / "link",
        "under a file": tmp_path / "notes.txt" / "run",
        "under /proc": "/proc/eb_jax_run",
        "a file": tmp_path / "notes.txt",
    }[how]
    if how == "dangling symlink":
        os.symlink(tmp_path / "gone", workdir)
    with pytest.raises(ConfigError, match=f"--workdir {workdir}") as error:
        pipeline.prepare_workdir(str(workdir))
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.txt"] + ["link"] * ("link" in how))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_writable_workdir_is_created(tmp_path):
    pipeline.prepare_workdir(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path / "a" / "b") == []


@pytest.mark.parametrize(
    "method, option, message",
    [
        ("thinet", {"thinet_images": 1438}, "thinet_images=1438 exceeds the 1437 training"),
        ("snip", {"snip_batches": 12}, "snip_batches=12 exceeds the 11 batches of 128"),
        ("dense", {"batch_size": 1440}, "batch_size=1440 exceeds the 1437 training examples"),
    ],
)
def test_an_option_the_data_cannot_meet_is_refused_before_training(
    tmp_path, data_dir, method, option, message
):
    config = tiny_config(data_dir, method=method, **option)
    with pytest.raises(ConfigError, match=message):
        pipeline.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _report(workdir, text: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    (workdir / "report.json").write_text(text)


GOOD = {
    "run": "r",
    "method": "dense",
    "retrain": None,
    "prune_ratio": None,
    "ticket_epoch": None,
    "ticket_drawn_by": None,
    "test_accuracy": 0.5,
    "training_pflops": 1e-6,
    "wall_time_s": 3.0,
    "params": {"dense": 10, "final": 10},
    "stages": [{"stage": "dense", "epochs": 1, "training_pflops": 1e-6}],
}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is not valid JSON"),
        ('{"run": "x", "method"', "is not valid JSON"),
        ("[1, 2]", "holds a list, not a run's report"),
        ('{"run": "x"}', "is not a complete run report: it lacks method, retrain"),
        (json.dumps({**GOOD, "stages": []}), "it lacks stages (a list of stages"),
        (None, "cannot read"),  # report.json is a directory
        (json.dumps({**GOOD, "test_accuracy": "high"}), "a report.json field has a wrong value"),
    ],
)
def test_the_report_cli_on_a_bad_report_json_is_a_one_line_error(
    tmp_path, capsys, content, message
):
    if content is None:
        os.makedirs(tmp_path / "report.json")
    else:
        _report(tmp_path, content)
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eb_jax.report: error: ") and message in err[0]


@pytest.mark.parametrize(
    "plot, message",
    [
        ("missing/cost.png", "the folder"),
        ("cost.xyz", "unknown image type .xyz; use one of"),
        (".", "is a directory"),
    ],
)
def test_the_report_cli_refuses_a_plot_it_cannot_write_before_printing(
    tmp_path, capsys, plot, message
):
    _report(tmp_path / "run", json.dumps(GOOD))
    assert report.main([str(tmp_path / "run"), "--plot", str(tmp_path / plot)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert report.main([str(tmp_path / "run"), "--plot", str(tmp_path / "cost.svg")]) == 0
    assert (tmp_path / "cost.svg").stat().st_size > 1000
