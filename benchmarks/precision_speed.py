"""Train-step speed of bf16 and 8-bit block floating point against fp32, side by side.

The same network and batch in each precision (eb_jax.lowp): the step is compiled, then
the precisions' steps are timed interleaved (median over rounds of `--chunk` steps).
bf16 is the TPU/GPU speed option; bfp8 *simulates* 8-bit arithmetic in fp32 (as SWALP /
QPyTorch do), so its figure is the simulation's overhead, not 8-bit hardware speed.

    python benchmarks/precision_speed.py [--models vgg16 resnet50] [--rounds 10]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eb_jax import lowp, platform, train_steps
from eb_jax.config import default_config
from eb_jax.models import create_model
from eb_jax.platform import configure_process

# model: (input shape, classes, batch) as in the paper's runs
CASES = {
    "vgg16": ((32, 32, 3), 10, 256),
    "preresnet101": ((32, 32, 3), 10, 256),
    "resnet18": ((224, 224, 3), 1000, 256),
    "resnet50": ((224, 224, 3), 1000, 128),
    "vgg_small": ((8, 8, 1), 10, 64),
}


def _runner(name, precision, chunk: int, batch_size: int | None):
    shape, classes, default_batch = CASES[name]
    batch_size = batch_size or default_batch
    config = default_config()
    model = create_model(name, classes, precision=precision)
    tx = train_steps.create_optimizer(config, 100, precision=precision)
    state = train_steps.create_train_state(model, jax.random.key(0), shape, tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, *shape)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, batch_size), jnp.int32),
    }
    step = functools.partial(train_steps.train_step, precision=precision, seed=0)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        for _ in range(chunk):
            holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    run()
    return run, compile_s, batch_size


def benchmark(name: str, precisions, rounds: int, chunk: int, batch_size: int | None):
    runners = {p: _runner(name, lowp.Precision(p), chunk, batch_size) for p in precisions}
    times = {p: [] for p in precisions}
    for _ in range(rounds):
        for p, (run, _, _) in runners.items():
            start = time.perf_counter()
            run()
            times[p].append((time.perf_counter() - start) / chunk)
    base = statistics.median(times[precisions[0]])
    batch = runners[precisions[0]][2]
    print(f"{name}, batch {batch}:")
    for p in precisions:
        t, compile_s = statistics.median(times[p]), runners[p][1]
        print(
            f"  {p:5s} {1000 * t:8.2f} ms/step  {batch / t:9.0f} img/s  "
            f"speed vs {precisions[0]} {base / t:5.2f}x  compile {compile_s:5.1f} s"
        )


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"], choices=CASES)
    parser.add_argument("--precisions", nargs="+", default=list(lowp.PRECISIONS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=5, help="steps timed together")
    parser.add_argument("--batch", type=int, default=None, help="default: the paper's")
    args = parser.parse_args()
    print(
        f"backend: {jax.default_backend()} ({platform.describe()}), "
        f"median of {args.rounds} rounds of {args.chunk} steps"
    )
    for name in args.models:
        benchmark(name, args.precisions, args.rounds, args.chunk, args.batch)


if __name__ == "__main__":
    main()
