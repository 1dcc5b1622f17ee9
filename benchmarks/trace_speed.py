"""Tracing and grouping ResNet-50's channels at 224 px, and cutting it, on this CPU.

`trace_groups` traces the eval-mode apply on abstract shapes and interprets the jaxpr;
`cut` traces again, slices the 25M parameters and traces the narrow model once to check
it. Prints the median wall seconds of each (targets: trace <= 5 s, cut <= 2 s) and the
declared-groups surgery (surgery.cut_ticket) on the same masks, for comparison.

    PYTHONPATH=. python benchmarks/trace_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np
from step_vs_pytorch import median_seconds

from eb_jax.models import create_model
from eb_jax.platform import configure_process
from eb_jax.ticket import cut, trace_groups
from eb_jax.ticket.surgery import cut_ticket


def _variables(model, x):
    """Weights drawn in numpy from the shapes (no initialiser compiled)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: rng.uniform(0.1, 1.0, s.shape).astype(s.dtype), dict(shapes))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    model = create_model("resnet50", 1000)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    variables = _variables(model, x)
    rng = np.random.default_rng(1)
    scales = [variables["params"][p[-1]]["scale"] for p in model.bn_paths()]
    masks = [rng.random(s.shape[0]) < 0.5 for s in scales]
    groups = trace_groups(model, variables, x)
    cuttable = sum(g.frozen is None for g in groups)
    print(f"{_cpu()}, {os.cpu_count()} cores; {len(groups)} groups, {cuttable} cuttable")
    timings = {
        "trace_groups": lambda: trace_groups(model, variables, x),
        "cut (traced)": lambda: cut(
            model, variables, dict(zip(model.bn_paths(), masks, strict=True)), x
        ),
        "cut_ticket (declared)": lambda: cut_ticket(model, variables, masks, prune_residual=True),
    }
    for name, fn in timings.items():
        seconds = median_seconds({name: fn}, repeats, 0)[name]
        print(f"{name:22s} {seconds:6.2f} s (median of {repeats})")


if __name__ == "__main__":
    main()
