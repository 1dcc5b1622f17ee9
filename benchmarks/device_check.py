"""Accelerator evidence in one run: step speed, tickets, energy and input on one device.

On whatever accelerator JAX finds (one GPU or TPU chip; a CPU with `--quick`), side by
side in one process, each figure a ratio measured in interleaved rounds:

- step: the train step of VGG16 (CIFAR, batch 256) and ResNet-50 (224 px, batch 256),
  eb_jax fp32 and bf16 against PyTorch at its best on the same card (bf16 autocast,
  channels_last, torch.compile; eager in --quick; skipped, with the reason, where PyTorch
  is absent);
  ResNet-50 bf16 images/s (goal on an H200: >= 7,900, MLPerf's per-GPU rate).
- tickets: p = 0.3/0.5/0.7 cut with kept counts rounded up to 8, each step's speedup over
  the dense step against its FLOPs ratio (cost.py; goal >= 0.8 of it), both networks.
- energy: one epoch-equivalent (50,000 synthetic CIFAR-shaped images) of dense VGG16 and
  of its p = 0.5 ticket through the real trainer (eb_jax.epoch_loop), joules from the
  machine's meter (NVML on NVIDIA GPUs; n/a with the reason where there is none): the
  dense/ticket joules ratio next to the FLOPs and time ratios (goal: >= 0.8 of FLOPs).
- input: the ImageNet pipeline (grain + Pillow in one worker per host core but one) on
  `imagenet_like` JPEGs, and DALI's where it runs, in images/s against the ResNet-50
  bf16 step's (goal >= 1).

Writes OUT/device_check.json (every number, the machine, what was skipped and why) and
OUT/device_check.md (the table). `--quick` runs every section on a tiny VGG at tiny
sizes, no ResNet (a test runs it on CPU so the script cannot rot); `--budget` seconds
skips the sections not yet started once spent (each says so). Each section's failure is
recorded and the others still run; the exit code is 1 if any failed.

    python benchmarks/device_check.py --out device_check [--quick] [--budget 420]
        [--sections step input energy tickets]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from input_pipeline import Repeated
from step_vs_pytorch import jax_runner, median_seconds, networks, torch_runner

from eb_jax import names, platform, stage_runner
from eb_jax.config import default_config
from eb_jax.cost import forward_cost
from eb_jax.data import DATASETS, DataError, Dataset, dali, open_dataset, train_batches
from eb_jax.data.in_memory import ArraySource
from eb_jax.data.input_pipeline import default_workers
from eb_jax.energy import open_meter
from eb_jax.epoch_loop import Clock, RunContext, StagePlan, Trainer
from eb_jax.lowp import Precision
from eb_jax.platform import configure_process
from eb_jax.runlog import MetricWriter

# The input needs the step's rate; the tickets (6 more compilations) come last, where a
# budget cut costs least.
SECTIONS = ("step", "input", "energy", "tickets")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The networks and sizes one run measures (`--quick`: tiny ones)."""

    vgg: str = "vgg16"
    resnet: str | None = "resnet50"  # None: VGG alone (the step rate the input meets: VGG's)
    resnet_image: int = 224
    batch: int = 256
    steps: int = 10
    warmup: int = 3
    ratios: tuple = (0.3, 0.5, 0.7)
    round_to: int = 8
    epoch_images: int = 50_000  # CIFAR's training set: one epoch-equivalent
    energy_rounds: int = 3
    input_images: int = 8192
    torch_mode: str = "best"  # step_vs_pytorch's: 'best' (bf16 autocast, channels_last,
    # torch.compile) or 'eager'


FULL = Sizes()
# A ResNet's train step, even a tiny one's, takes ~40 CPU-seconds to compile here.
QUICK = Sizes(
    vgg="vgg_tiny",
    resnet=None,
    batch=16,
    steps=2,
    warmup=1,
    ratios=(0.5,),
    epoch_images=64,
    energy_rounds=1,
    input_images=64,
    torch_mode="eager",  # torch.compile would compile C++ for a minute on a CPU
)


def _batch(size: int, image: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.standard_normal((size, image, image, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
    }


class Runners:
    """Compiled eb_jax train steps of (network, ticket label, precision), made once and
    shared by the sections; the FLOPs of each step (cost.py, 3 forward passes)."""

    def __init__(self, sizes: Sizes):
        self.sizes, self.runs, self.flops, self.nets = sizes, {}, {}, {}

    def names(self) -> list[str]:
        return [self.sizes.vgg] + ([self.sizes.resnet] if self.sizes.resnet else [])

    def rate_network(self) -> str:
        """The network whose bf16 step the input must keep up with."""
        return self.sizes.resnet or self.sizes.vgg

    def image(self, name: str) -> int:
        return self.sizes.resnet_image if name == self.sizes.resnet else 32

    def networks(self, name: str, precision: str, tickets: bool = True) -> dict:
        """{label: (model, variables)}: dense and (`tickets`) the tickets of `sizes.ratios`
        (the same dense network either way: `networks` is seeded)."""
        if (name, precision, True) in self.nets:
            return self.nets[name, precision, True]
        key, s = (name, precision, tickets), self.sizes
        if key not in self.nets:
            ratios = s.ratios if tickets else ()
            self.nets[key] = networks(name, ratios, s.round_to, precision, self.image(name))
        return self.nets[key]

    def get(self, name: str, label: str, precision: str):
        key = (name, label, precision)
        if key not in self.runs:
            model, variables = self.networks(name, precision, label != "dense")[label]
            batch = _batch(self.sizes.batch, self.image(name))
            self.runs[key], self.flops[key] = jax_runner(model, variables, batch)
        return self.runs[key]


def torch_side(runners: Runners, name: str, skipped: list):
    """PyTorch (`sizes.torch_mode`) on `name`'s dense network, or None (the reason in
    `skipped`)."""
    sizes = runners.sizes
    model, _ = runners.networks(name, "fp32", tickets=False)["dense"]
    try:
        run, _ = torch_runner(name, model, sizes.batch, runners.image(name), sizes.torch_mode)
    except ImportError as e:
        skipped.append(f"PyTorch {name}: not installed ({e})")
        return None
    except Exception as e:  # torch.compile needs a compiler and a supported backend
        skipped.append(f"PyTorch {name}: failed ({type(e).__name__}: {str(e)[:200]})")
        return None
    return run


def step_section(runners: Runners, skipped: list) -> dict:
    """eb_jax fp32 and bf16 against PyTorch (at its best but in --quick), per network;
    images/s of each."""
    sizes, out = runners.sizes, {}
    for name in runners.names():
        runs = {p: runners.get(name, "dense", p) for p in ("fp32", "bf16")}
        torch_run = torch_side(runners, name, skipped)
        if torch_run is not None:
            runs["torch"] = torch_run
        ms = {k: 1000 * t for k, t in median_seconds(runs, sizes.steps, sizes.warmup).items()}
        row = {f"{k}_ms": v for k, v in ms.items()} | {"torch_mode": sizes.torch_mode}
        row["images_per_s"] = {k: 1000 * sizes.batch / v for k, v in ms.items()}
        if "torch" in ms:  # > 1: eb_jax faster
            row["versus_torch"] = {p: ms["torch"] / ms[p] for p in ("fp32", "bf16")}
        out[name] = row
        print(f"step {name}: {json.dumps(row)}")
    return out


def ticket_section(runners: Runners, precision: str) -> dict:
    """Each ticket's step speedup over the dense step, against its FLOPs ratio."""
    sizes, out = runners.sizes, {}
    for name in runners.names():
        labels = list(runners.networks(name, precision))
        runs = {label: runners.get(name, label, precision) for label in labels}
        seconds = median_seconds(runs, sizes.steps, sizes.warmup)
        rows = {}
        for label in labels[1:]:
            speedup = seconds["dense"] / seconds[label]
            flop_ratio = (
                runners.flops[name, "dense", precision] / runners.flops[name, label, precision]
            )
            rows[label] = {
                "speedup": speedup,
                "flops_ratio": flop_ratio,
                "of_flops_ratio": speedup / flop_ratio,
            }
        out[name] = {"precision": precision, "dense_ms": 1000 * seconds["dense"], **rows}
        print(f"tickets {name}: {json.dumps(out[name])}")
    return out


def _synthetic_cifar(images: int, batch: int) -> Dataset:
    """CIFAR-shaped random uint8 images through the in-memory path (crop, flip); one
    eval batch."""
    rng = np.random.default_rng(0)

    def split(n):
        pictures = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        return ArraySource(pictures, rng.integers(0, 10, n).astype(np.int32))

    return Dataset(DATASETS["cifar10"], split(images), split(batch), 10)


def _trainer(data: Dataset, workdir: str, net, precision: str, epochs: int) -> Trainer:
    """A compiled Trainer of one dense stage (no checkpoints, no metrics files)."""
    config = default_config()
    batch = len(data.eval)
    config.update(batch_size=batch, eval_batch_size=batch, num_epochs=epochs)
    config.update(lr_boundaries=(), log_every_steps=0, checkpoint_every_steps=0)
    run = RunContext(config, data, workdir, None, MetricWriter(workdir, False), Clock())
    plan = StagePlan(names.DENSE, 0, epochs, 0, Precision(precision), config.sparsity)
    model, variables = net
    trainer = Trainer(run, plan, model, stage_runner.fresh_state(run, plan, model, variables))
    trainer.compile()
    return trainer


def _meter() -> tuple:
    """(meter, the channel this machine counts, None), or (None, None, why not)."""
    meter = open_meter()
    channel = meter.counted
    if meter.name(channel) is None:
        return None, None, f"{channel}: {meter.channels[channel].why}"
    return meter, channel, None


def _train_epochs(trainers: dict, rounds: int, meter, channel: str | None) -> dict:
    """{label: (median seconds, median joules or None)} of whole epochs, in turn."""
    seconds = {label: [] for label in trainers}
    joules = {label: [] for label in trainers}
    for epoch in range(rounds):
        for label, trainer in trainers.items():
            start_j = meter.joules()[channel] if meter else None
            start = time.perf_counter()
            trainer.train_epoch(epoch)
            jax.block_until_ready(trainer.state)
            seconds[label].append(time.perf_counter() - start)
            if meter:
                joules[label].append(meter.joules()[channel] - start_j)
    return {
        label: (
            statistics.median(seconds[label]),
            statistics.median(joules[label]) if meter else None,
        )
        for label in trainers
    }


def energy_section(runners: Runners, precision: str, skipped: list) -> dict:
    """Dense VGG vs its p = 0.5 ticket through the trainer, an epoch each in turn."""
    sizes = runners.sizes
    meter, channel, why = _meter()
    if meter is None:
        skipped.append(f"energy: no meter ({why}); seconds and FLOPs measured")
    data = _synthetic_cifar(sizes.epoch_images, sizes.batch)
    nets = {label: runners.networks(sizes.vgg, precision)[label] for label in ("dense", "p=0.5")}
    with tempfile.TemporaryDirectory() as workdir:
        trainers = {
            label: _trainer(data, workdir, net, precision, sizes.energy_rounds)
            for label, net in nets.items()
        }
        measured = _train_epochs(trainers, sizes.energy_rounds, meter, channel)
    flops = {label: forward_cost(model, (32, 32, 3)).flops for label, (model, _) in nets.items()}
    out = {
        "meter": f"{channel}: {meter.name(channel)}" if meter else None,
        "no_meter_because": why or None,
        "epoch_images": len(data.train) // sizes.batch * sizes.batch,
        "precision": precision,
        "rounds": sizes.energy_rounds,
        "seconds": {label: s for label, (s, _) in measured.items()},
        "joules": {label: j for label, (_, j) in measured.items()},
        "flops_ratio": flops["dense"] / flops["p=0.5"],
        "time_ratio": measured["dense"][0] / measured["p=0.5"][0],
    }
    if meter:
        out["joules_ratio"] = measured["dense"][1] / measured["p=0.5"][1]
        out["joules_of_flops_ratio"] = out["joules_ratio"] / out["flops_ratio"]
    print(f"energy: {json.dumps(out)}")
    return out


def _rate(batches) -> float:
    """Images/s delivered after the first batch (workers or pipelines started)."""
    next(batches)
    start, count, last = time.perf_counter(), 0, None
    for batch in batches:
        count, last = count + len(batch["label"]), batch
    jax.block_until_ready(last["image"])
    return count / (time.perf_counter() - start)


def input_section(sizes: Sizes, step: tuple, skipped: list) -> dict:
    """ImageNet input with all host cores (and DALI where it runs) against the step
    (network, its bf16 images/s or None)."""
    out, step_rate = {}, step[1]
    with tempfile.TemporaryDirectory() as data_dir:
        data = open_dataset("imagenet_like", data_dir)
        n = sizes.input_images
        data = Dataset(data.spec, Repeated(data.train, n), Repeated(data.eval, n), 1000)
        options = {"num_threads": 2, "num_workers": -1}
        rate = _rate(train_batches(data, sizes.batch, 0, 0, **options))
        out["grain_pillow"] = {"workers": default_workers(), "images_per_s": rate}
        try:
            dali.check_backend(data.spec)
        except DataError as e:
            skipped.append(f"input through DALI: {e}")
        else:
            rate = _rate(dali.train_batches(data, sizes.batch, 0, 0, num_threads=4))
            out["dali"] = {"images_per_s": rate}
    for row in out.values():
        row["of_step_rate"] = row["images_per_s"] / step_rate if step_rate else None
    out["step_network"], out["step_images_per_s"] = step
    print(f"input: {json.dumps(out)}")
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


PACKAGES = ("jax", "jaxlib", "flax", "grain", "torch", "torchvision")
PACKAGES += ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-ml-py")


def environment() -> dict:
    """The machine: backend, device, host CPU and cores, versions, the energy meter."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    meter, channel, why = _meter()
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": platform.describe(),
        "host_cpu": cpu,
        "host_cores": os.cpu_count(),
        "versions": {p: _version(p) for p in PACKAGES},
        "meter": f"{channel}: {meter.name(channel)}" if meter else f"none: {why}",
    }


def _met(value, goal: float | None) -> str:
    if value is None or goal is None:
        return "-"
    return "yes" if value >= goal else "no"


def _step_rows(results: dict, sizes: Sizes) -> list[tuple]:
    rows = []
    for name, row in results.get("step", {}).items():
        kinds, torch = ("fp32", "bf16", "torch"), f"PyTorch {row['torch_mode']}"
        ms = " / ".join(f"{row[f'{k}_ms']:.1f}" if f"{k}_ms" in row else "-" for k in kinds)
        rows.append((f"{name} step, batch {sizes.batch}: ms fp32 / bf16 / {torch}", ms, "", ""))
        for precision, ratio in row.get("versus_torch", {}).items():
            what = f"{name} eb_jax {precision} vs {torch}"
            rows.append((what, f"{ratio:.2f}x", ">= 1.0x", _met(ratio, 1.0)))
        if name == "resnet50":
            rate = row["images_per_s"]["bf16"]
            goal = 7900 if "H200" in results["environment"]["device"] else None
            rows.append((f"{name} bf16 img/s", f"{rate:,.0f}", ">= 7,900 (H200)", _met(rate, goal)))
    return rows


def _ticket_rows(results: dict) -> list[tuple]:
    rows = []
    for name, tickets in results.get("tickets", {}).items():
        for label, t in tickets.items():
            if not isinstance(t, dict):
                continue
            what = f"{name} {label} ticket ({tickets['precision']}): speedup / FLOPs ratio"
            measured = f"{t['of_flops_ratio']:.2f} ({t['speedup']:.2f}x of {t['flops_ratio']:.2f}x)"
            rows.append((what, measured, ">= 0.8", _met(t["of_flops_ratio"], 0.8)))
    return rows


def _energy_rows(results: dict, sizes: Sizes) -> list[tuple]:
    energy = results.get("energy")
    if not energy:
        return []
    ratios = f"time {energy['time_ratio']:.2f}x, FLOPs {energy['flops_ratio']:.2f}x"
    if "joules_ratio" in energy:
        joules = f"joules {energy['joules_ratio']:.2f}x"
        measured = f"{energy['joules_of_flops_ratio']:.2f} ({joules}, {ratios})"
    else:
        measured = f"n/a: no meter ({ratios})"
    what = f"{sizes.vgg} p=0.5 epoch: dense/ticket joules ratio / FLOPs ratio"
    return [(what, measured, ">= 0.8", _met(energy.get("joules_of_flops_ratio"), 0.8))]


def _input_rows(results: dict) -> list[tuple]:
    rows, section = [], results.get("input", {})
    step = section.get("step_images_per_s")
    for key, row in section.items():
        if isinstance(row, dict):
            measured = f"{row['images_per_s']:,.0f} img/s"
            if step:
                measured += f" = {row['of_step_rate']:.2f}x {step:,.0f}"
            what = f"ImageNet input ({key}) / {section['step_network']} bf16 step"
            rows.append((what, measured, ">= 1.0", _met(row["of_step_rate"], 1.0)))
    return rows


def table_rows(results: dict, sizes: Sizes) -> list[tuple]:
    """(what, measured, goal, met) for every figure in the results."""
    return [
        *_step_rows(results, sizes),
        *_ticket_rows(results),
        *_energy_rows(results, sizes),
        *_input_rows(results),
    ]


def write_outputs(results: dict, sizes: Sizes, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    env = results["environment"]
    lines = [
        f"# device_check{' --quick' if results['quick'] else ''}: {env['devices']} "
        f"({env['backend']}), host {env['host_cpu'] or '?'} x {env['host_cores']} cores",
        "",
        "| what | measured | goal | met |",
        "| --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in table_rows(results, sizes)),
        "",
        f"{results.get('seconds', 0):.0f} s in all; "
        + ("skipped:" if results["skipped"] else "nothing skipped."),
        *(f"- {reason}" for reason in results["skipped"]),
    ]
    with open(os.path.join(out, "device_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_sections(args, sizes: Sizes) -> dict:
    """Every asked section in order, each recorded (or its failure, or why it was not
    started) in the results, written out after each (a run killed later keeps them)."""
    results = {"environment": environment(), "quick": args.quick, "skipped": [], "errors": {}}
    results["section_seconds"], results["section_cpu_seconds"] = {}, {}
    precision = "fp32" if jax.default_backend() == "cpu" else "bf16"  # CPU emulates bf16
    runners, start = Runners(sizes), time.perf_counter()
    if sizes.resnet is None:
        results["skipped"].append("ResNet: not in --quick (compiling even a tiny one is slow)")
    sections = {
        "step": lambda: step_section(runners, results["skipped"]),
        "tickets": lambda: ticket_section(runners, precision),
        "energy": lambda: energy_section(runners, precision, results["skipped"]),
        "input": lambda: input_section(sizes, _step_rate(results, runners), results["skipped"]),
    }
    for name in args.sections:
        if time.perf_counter() - start > args.budget:
            results["skipped"].append(
                f"{name}: not started, the {args.budget:.0f} s budget was spent"
            )
            continue
        began, cpu = time.perf_counter(), time.process_time()
        try:
            results[name] = sections[name]()
        except Exception as e:  # the other sections' evidence still counts
            traceback.print_exc()
            results["errors"][name] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            results["skipped"].append(f"{name}: failed ({results['errors'][name]})")
        results["section_seconds"][name] = time.perf_counter() - began
        results["section_cpu_seconds"][name] = time.process_time() - cpu
        results["seconds"] = time.perf_counter() - start
        write_outputs(results, sizes, args.out)
    results["seconds"] = time.perf_counter() - start
    write_outputs(results, sizes, args.out)
    return results


def _step_rate(results: dict, runners: Runners) -> tuple:
    name = runners.rate_network()
    row = results.get("step", {}).get(name)
    return name, row["images_per_s"]["bf16"] if row else None


def main(argv=None) -> int:
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="device_check", help="folder for the JSON and table")
    parser.add_argument("--quick", action="store_true", help="tiny networks and sizes (CPU)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; then skip the rest")
    args = parser.parse_args(argv)
    # Before JAX starts its backend: PyTorch shares the card, so JAX takes 60 % of its
    # memory, not 75 %.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    sizes = QUICK if args.quick else FULL
    print(f"backend: {jax.default_backend()} ({platform.describe()})", flush=True)
    results = run_sections(args, sizes)
    with open(os.path.join(args.out, "device_check.md")) as f:
        print(f.read())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    sys.exit(main())
