"""VGG16-BN CIFAR train step on CPU: eb_jax against a PyTorch eager implementation.

Both sides train the same network (docs/method.md, models) with the same optimizer (SGD momentum
0.9, weight decay, BN-scale sparsity) on the same random batch; steps are interleaved
(one JAX step, one PyTorch step, ...) so both see the same machine load. Prints the
median step times and the ratio (PyTorch time / JAX time: > 1 means JAX is faster).

    pip install torch==2.13.0   # optional; CPU wheel
    python benchmarks/vgg16_cpu_vs_pytorch.py [--batch 64] [--steps 10] [--conv_impl auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eb_jax import platform, train
from eb_jax.models import VGG_CFGS, create_model


def jax_step_fn(batch_size: int, conv_impl: str):
    config = ml_collections.ConfigDict(
        dict(
            learning_rate=0.1,
            lr_boundaries=(),
            lr_decay=0.1,
            momentum=0.9,
            weight_decay=1e-4,
            sparsity=1e-4,
        )
    )
    model = create_model("vgg16", 10, conv_impl=conv_impl)
    state = train.create_train_state(
        model, jax.random.key(0), (32, 32, 3), train.create_optimizer(config, 1)
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
    }
    step = jax.jit(train.train_step, donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return run


def torch_step_fn(batch_size: int):
    import torch
    from torch import nn

    layers, c_in = [], 3
    for c in VGG_CFGS[16]:
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
    net = nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(512, 10))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    net.train()

    def run():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        for m in bns:
            m.weight.grad.add_(1e-4 * torch.sign(m.weight.data))
        opt.step()
        loss.item()

    return run, torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conv_impl", default="auto")
    args = parser.parse_args()

    runners = {"jax": jax_step_fn(args.batch, args.conv_impl)}
    try:
        runners["torch"], torch_version = torch_step_fn(args.batch)
    except ImportError:
        print("PyTorch is not installed (pip install torch==2.13.0): timing eb_jax alone")
    times = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    print(
        f"VGG16-BN CIFAR train step, batch {args.batch}, {jax.default_backend()} "
        f"({platform.describe()}), median of {args.steps}:"
    )
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"  eb_jax (conv_impl={args.conv_impl}): {1000 * med['jax']:.0f} ms/step, "
        f"{args.batch / med['jax']:.1f} img/s"
    )
    if "torch" in med:
        print(
            f"  PyTorch {torch_version} eager: {1000 * med['torch']:.0f} ms/step, "
            f"{args.batch / med['torch']:.1f} img/s"
        )
        print(f"  ratio PyTorch time / eb_jax time: {med['torch'] / med['jax']:.2f}")


if __name__ == "__main__":
    main()
