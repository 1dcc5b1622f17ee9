"""Train-step time with host memory kept for reuse (eb_jax's setting on import) against
glibc's malloc defaults: step time, page faults and kernel share of CPU time.

glibc's setting must be made before JAX starts its threads, so each mode runs in its own
process (the dense PreResNet-56 CIFAR step at batch 64 by default); the processes
alternate, `--rounds` of each, and the medians are compared.

    python benchmarks/host_memory.py [--model preresnet56] [--rounds 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: `steps` timed steps after three untimed ones, as JSON.
CHILD = """
import json, resource, statistics, sys, time
sys.path.insert(0, {benchmarks!r})
from eb_jax import platform
platform.configure_process(reuse_memory={reuse})
import jax.numpy as jnp
import numpy as np
from step_vs_pytorch import jax_runner, networks
model, variables = networks({model!r}, (), 8, "fp32", 32)["dense"]
rng = np.random.default_rng(0)
batch = {{
    "image": jnp.asarray(rng.standard_normal(({batch}, 32, 32, 3)), jnp.float32),
    "label": jnp.zeros(({batch},), jnp.int32),
}}
run, _ = jax_runner(model, variables, batch)
for _ in range(3):
    run()
times, faults, kernel = [], [], []
for _ in range({steps}):
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults.append(after.ru_minflt - before.ru_minflt)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    kernel.append((after.ru_stime - before.ru_stime) / cpu)
median = statistics.median
result = {{"ms": 1000 * median(times), "faults": median(faults), "kernel": median(kernel)}}
print(json.dumps(result))
"""


def one_process(reuse: bool, args) -> dict:
    script = CHILD.format(
        benchmarks=os.path.join(ROOT, "benchmarks"),
        reuse=reuse,
        model=args.model,
        batch=args.batch,
        steps=args.steps,
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        sys.exit(f"the step process failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preresnet56")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    runs = {True: [], False: []}
    for _ in range(args.rounds):  # alternating processes
        for reuse in (True, False):
            runs[reuse].append(one_process(reuse, args))
    ms = {mode: statistics.median(r["ms"] for r in rs) for mode, rs in runs.items()}
    faults = {mode: statistics.median(r["faults"] for r in rs) for mode, rs in runs.items()}
    kernel = {mode: statistics.median(r["kernel"] for r in rs) for mode, rs in runs.items()}
    print(f"{args.model}, batch {args.batch}, dense train step, {os.cpu_count()} CPU cores,")
    print(f"median of {args.steps} steps in each of {args.rounds} processes per mode:")
    for mode, name in ((False, "glibc's defaults     "), (True, "memory kept for reuse")):
        print(
            f"  {name} {ms[mode]:7.1f} ms  {faults[mode]:8.0f} page faults a step, "
            f"{kernel[mode]:.0%} of its CPU time in the kernel"
        )
    print(f"  {ms[False] / ms[True]:.2f}x faster with memory kept for reuse")


if __name__ == "__main__":
    main()
