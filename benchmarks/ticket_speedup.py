"""Train-step speedup of cut tickets against the dense network, next to the FLOPs ratio.

For VGG16 and PreResNet-101 (CIFAR shapes, batch 64), tickets at p = 0.3/0.5/0.7 are cut
by eb_jax's surgery from masks drawn over scales spread uniformly at random (a trained
network prunes its later layers harder; this spreads the cut evenly). Each network's
train step is compiled, its FLOPs read from XLA's cost analysis, and the dense and ticket
steps are timed interleaved. Goal: speedup >= 0.9 x the FLOPs ratio for VGG16 on CPU.

    python benchmarks/ticket_speedup.py [--models vgg16 preresnet101] [--steps 5] [--round-to 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eb_jax import platform, train
from eb_jax.config import default_config
from eb_jax.models import bn_scales, create_model
from eb_jax.ticket import channel_mask
from eb_jax.ticket.surgery import cut_ticket


def _step_runner(model, variables, batch):
    config = default_config()
    tx = train.create_optimizer(config, 100)
    variables = jax.tree.map(jnp.array, variables)  # the step donates (deletes) its inputs
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=tx)  # fmt: skip
    compiled = jax.jit(train.train_step, donate_argnums=0).lower(state, batch).compile()
    flops = compiled.cost_analysis()["flops"]
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    run()
    return run, flops


def benchmark(name: str, ratios, steps: int, batch_size: int, round_to: int = 0):
    model = create_model(name, 10)
    variables = train.init_variables(model, jax.random.key(0), (32, 32, 3))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.uniform(0, 1, x.shape).astype(np.float32) if p[-1].key == "scale"
        else np.asarray(x), variables["params"])  # fmt: skip
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
    }
    runners = {"dense": _step_runner(model, variables, batch)}
    for ratio in ratios:
        masks = channel_mask(bn_scales(model, params), ratio)
        narrow, narrow_variables, _ = cut_ticket(model, variables, masks, round_to=round_to)
        runners[f"p={ratio}"] = _step_runner(narrow, narrow_variables, batch)
    times = {key: [] for key in runners}
    for _ in range(steps):
        for key, (run, _) in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    dense_time, dense_flops = statistics.median(times["dense"]), runners["dense"][1]
    rounded = f", kept counts rounded up to x{round_to}" if round_to else ""
    print(f"{name}, batch {batch_size}{rounded}: dense {1000 * dense_time:.1f} ms/step")
    for key in runners:
        if key == "dense":
            continue
        t, flops = statistics.median(times[key]), runners[key][1]
        speedup, flop_ratio = dense_time / t, dense_flops / flops
        print(f"  {key}: {1000 * t:7.1f} ms/step  speedup {speedup:5.2f}x  FLOPs ratio "
              f"{flop_ratio:5.2f}x  speedup / FLOPs ratio {speedup / flop_ratio:.2f}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "preresnet101"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--round-to", type=int, default=0, help="8 for GPU, 128 for TPU")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({platform.describe()}), median of {args.steps}")
    for name in args.models:
        benchmark(name, args.ratios, args.steps, args.batch, args.round_to)


if __name__ == "__main__":
    main()
