"""Train-step speedup of cut tickets against the dense network, next to the FLOPs ratio.

For VGG16 and PreResNet-101 (CIFAR shapes, batch 64), tickets at p = 0.3/0.5/0.7 are cut
by eb_jax's surgery from masks drawn over scales spread uniformly at random (a trained
network prunes its later layers harder; this spreads the cut evenly). Each network's
train step is compiled, its FLOPs counted by cost.py (the paper's convention), and the
dense and ticket steps are timed interleaved. Goal: speedup >= 0.9 x the FLOPs ratio for
VGG16 on CPU.

To show where a ticket loses against its FLOPs, the same run times each network's
convolutions alone (forward and both gradients of every conv at the shapes the step
sees, one compiled function): their own speedup against their own FLOPs ratio, and
what the step spends outside them (BatchNorm, ReLU, pooling, loss, optimizer, and
per-op overhead), which shrinks only linearly with the width, not quadratically.

    python benchmarks/ticket_speedup.py [--models vgg16 preresnet101] [--steps 5] [--round-to 8]
        [--warmup 3]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from step_vs_pytorch import jax_runner, median_seconds
from step_vs_pytorch import networks as tickets

from eb_jax import platform
from eb_jax.models.layers import Conv
from eb_jax.platform import configure_process


def _conv_calls(model, variables, image):
    """(unbound Conv, input shape) of every convolution one training forward pass runs."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Conv) and context.method_name == "__call__":
            calls.append((context.module.clone(parent=None), args[0].shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, image
        )
    return calls


def _conv_runner(model, variables, batch):
    """The step's convolutions alone: forward, kernel gradient and (but for the first
    conv, which reads the images) input gradient of each, in one compiled function that
    runs them in turn."""
    calls = _conv_calls(model, variables, batch["image"])
    rng = np.random.default_rng(0)
    inputs = []
    for conv, shape in calls:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        conv_vars = conv.init(jax.random.key(0), x)
        y = jax.eval_shape(conv.apply, conv_vars, x)
        inputs.append((conv_vars, x, jnp.asarray(rng.standard_normal(y.shape), jnp.float32)))

    def convolutions(inputs):
        outputs = []
        for i, ((conv, _), (conv_vars, x, dy)) in enumerate(zip(calls, inputs, strict=True)):
            if outputs:  # one conv after the other, as in the step (not all at once)
                (conv_vars, x, dy), outputs[-1] = jax.lax.optimization_barrier(
                    ((conv_vars, x, dy), outputs[-1])
                )
            y, vjp = jax.vjp(conv.apply, conv_vars, x)
            dvars, dx = vjp(dy)
            outputs.append((y, dvars) if i == 0 else (y, dvars, dx))
        return outputs

    compiled = jax.jit(convolutions).lower(inputs).compile()

    def run():
        jax.block_until_ready(compiled(inputs))

    run()
    return run, compiled.cost_analysis()["flops"]


def benchmark(name: str, ratios, steps: int, batch_size: int, round_to: int = 0, warmup: int = 3):
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
    }
    networks = tickets(name, ratios, round_to, "fp32", 32)
    runners = {
        (key, part): make(net, net_variables, batch)
        for key, (net, net_variables) in networks.items()
        for part, make in (("step", jax_runner), ("convs", _conv_runner))
    }
    runs = {key: run for key, (run, _) in runners.items()}
    seconds = median_seconds(runs, steps, warmup)
    flops = {key: runner[1] for key, runner in runners.items()}

    def versus_dense(key, part):
        speedup = seconds["dense", part] / seconds[key, part]
        flop_ratio = flops["dense", part] / flops[key, part]
        ratio = speedup / flop_ratio
        return f"speedup {speedup:5.2f}x  FLOPs ratio {flop_ratio:5.2f}x  -> {ratio:.2f}"

    rounded = f", kept counts rounded up to x{round_to}" if round_to else ""
    print(
        f"{name}, batch {batch_size}{rounded}: train step | convolutions alone | "
        f"step time outside the convolutions"
    )
    for key in networks:
        step_ms, conv_ms = 1000 * seconds[key, "step"], 1000 * seconds[key, "convs"]
        line = f"  {key:6s} {step_ms:7.1f} ms"
        if key != "dense":
            line += f"  {versus_dense(key, 'step')} | {versus_dense(key, 'convs')}"
        print(f"{line} | {step_ms - conv_ms:6.1f} ms ({1 - conv_ms / step_ms:.0%})")


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "preresnet101"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--round-to", type=int, default=0, help="8 for GPU, 128 for TPU")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({platform.describe()}), median of {args.steps}")
    for name in args.models:
        benchmark(name, args.ratios, args.steps, args.batch, args.round_to, args.warmup)


if __name__ == "__main__":
    main()
