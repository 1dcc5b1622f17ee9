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


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_quickstart_runs_eb_train_end_to_end(tmp_path, data_dir):
    """No --config: the offline quickstart (search, cut, retrain) on 2 forced CPU devices."""
    workdir = tmp_path / "run"
    result = _main("--workdir", str(workdir), data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    ticket = json.loads((workdir / "ticket.json").read_text())
    assert ticket["ratio"] == 0.5 and ticket["emerged"] and 5 <= ticket["epoch"] <= 10
    assert f"early-bird ticket for p=0.5 emerged after {ticket['epoch']} epochs" in out
    history = out.split("p=0.5 mask distance to the previous epoch: ")[1].splitlines()[0].split()
    assert len(history) == ticket["epoch"]
    assert 0.45 < float(history[0]) <= 0.5  # the epoch-0 mask is all zeros
    assert f"cut the p=0.5 ticket of epoch {ticket['epoch']}: 288170 -> " in out
    assert f"retraining (inherit) from epoch {ticket['epoch'] + 1} to 20" in out
    epochs = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 20 and "img/s" in epochs[-1] and "ETA" in epochs[-1]
    assert [len(m) for m in ticket["masks"]] == [32, 32, 64, 64, 128, 128]
    assert sum(ticket["kept"]) == sum(m.count("1") for m in ticket["masks"]) < 448 / 2
    metrics = [r for r in _records(workdir) if "epoch" in r]
    assert [r["epoch"] for r in metrics] == list(range(1, 21))
    assert metrics[-1]["test_accuracy"] >= 0.90
    assert metrics[-1]["learning_rate"] == pytest.approx(0.001)
    distances = [r for r in _records(workdir) if "eb/p0.5/distance_to_previous" in r]
    assert len(distances) == ticket["epoch"]
    assert (workdir / "mask_distance.png").stat().st_size > 10_000
    assert glob.glob(str(workdir / "events.out.tfevents.*"))
    report = json.loads((workdir / "report.json").read_text())
    assert report["method"] == "eb" and report["ticket_epoch"] == ticket["epoch"]
    assert [(s["stage"], s["epochs"]) for s in report["stages"]] == [
        ("search", ticket["epoch"]),
        ("retrain", 20 - ticket["epoch"]),
    ]
    assert report["test_accuracy"] == metrics[-1]["test_accuracy"]
    assert report["params"]["dense"] == 288170 > report["params"]["final"]
    assert "run  method      p    precision  ticket  test acc  PFLOPs" in out  # the table
    assert (workdir / "cost.png").stat().st_size > 5_000


BAD_INPUT = [
    (["--config.foo=1"], "the config has no field 'foo'"),
    (["--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config", "configs/missing.py"], "cannot load the config file"),
    (["--config.batch_size=63"], "batch_size=63 must be a positive multiple of the 2 devices"),
    (["--config.model=vgg99"], "unknown model 'vgg99'"),
    (["--config.dataset=mnist"], "unknown dataset 'mnist'"),
    (["--config", "configs/vgg16_cifar10.py"], "not prepared as array_record"),
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["--config.prune_ratio=1.0"], "prune ratio 1.0 must be in [0, 1)"),
    (["--config.monitor_ratios=(0.3,-0.1)"], "prune ratio -0.1 must be in [0, 1)"),
    (["--config.eb_window=1"], "early-bird window must be >= 2"),
    (["--config.method=magic"], "method='magic' must be one of"),
    (["--config.retrain=later"], "retrain='later' must be one of"),
    (["--config.min_channels=0"], "min_channels must be >= 1 and round_to >= 0"),
    (["--config.checkpoints_to_keep=0"], "checkpoints_to_keep must be >= 1"),
    (["--config.ticket_epoch=50"], "ticket_epoch=50 must be in [0, num_epochs=20]"),
    (["--config.method=ns", "--config.keep_searching=True"], "keep_searching applies to"),
    (["--config.precision.search=int4"], "precision.search='int4' must be one of"),
    (
        [
            "--config.distributed.coordinator_address=127.0.0.1:1",
            "--config.distributed.process_id=3",
            "--config.distributed.num_processes=2",
        ],
        "process_id=3 must be in [0, num_processes=2)",
    ),
    (["stray"], "unexpected arguments: stray"),
    (["--config.input_backend=nvjpeg"], "input_backend='nvjpeg' must be one of"),
    (["--config.input_backend=dali"], "decodes JPEG datasets (imagenet2012, imagenet_like)"),
    (
        ["--config.dataset=imagenet_like", "--config.input_backend=dali"],
        "use input_backend='grain'",  # no DALI, or no GPU (tests/test_dali.py)
    ),
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory, data_dir):
    """Every BAD_INPUT case run as its own command line (forked from one process start:
    tests/cli_batch.py), case index -> returncode, stdout, stderr."""
    outdir = tmp_path_factory.mktemp("bad_input")
    cases = [
        ["--workdir", str(outdir / f"w{i}"), *args, f"--config.data_dir={data_dir}"]
        for i, (args, _) in enumerate(BAD_INPUT)
    ]
    (outdir / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "tests.cli_batch", str(outdir / "cases.json"), str(outdir)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600)
    return json.loads((outdir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_a_one_line_error(case, bad_input_results):
    message = BAD_INPUT[case][1]
    result = bad_input_results[case]
    assert result["returncode"] == 2
    errors = result["stderr"].strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("eb_jax: error: "), result["stderr"][-2000:]
    assert message in errors[0]
    assert "Traceback" not in result["stdout"] + result["stderr"]


@pytest.mark.slow
def test_defaults_work_without_workdir_from_any_directory(tmp_path):
    """No --config and no --workdir, run from elsewhere: the quickstart config is found and
    the default workdir computed (the run then stops at the bad dataset)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "eb_jax.main", "--config.dataset=mnist"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "eb_jax: error: unknown dataset 'mnist'; choose one of: digits, cifar10, cifar100, "
        "imagenet2012, imagenet_like"
    )


@pytest.mark.slow
def test_the_imagenet_config_runs_on_imagenet_like_jpegs_in_worker_processes(tmp_path, data_dir):
    """The ImageNet input path end to end: JPEGs decoded in a worker process, uint8
    batches normalised in the step, a search epoch and the cut; no shared memory left."""
    workdir = tmp_path / "run"
    result = _main(
        "--config",
        "configs/resnet50_imagenet.py",
        "--config.model=resnet_tiny",
        "--config.dataset=imagenet_like",
        "--config.batch_size=32",
        "--config.eval_batch_size=32",
        "--config.num_epochs=1",
        "--config.lr_boundaries=()",
        "--config.num_data_workers=1",
        "--workdir",
        str(workdir),
        data_dir=data_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["dataset"] == "imagenet_like" and report["ticket_epoch"] == 1
    assert report["params"]["final"] < report["params"]["dense"]
    assert [s["images_per_epoch"] for s in report["stages"]] == [256, 256]
    assert "leaked shared_memory" not in result.stderr
