"""Train-step speedup of cut ViT tickets against the dense ViT, next to the FLOPs ratio.

Tickets at p = 0.3/0.5/0.7 are cut by eb_jax's surgery from gate masks (heads per block,
MLP neurons globally) drawn over gates spread uniformly at random. Each network's AdamW
train step is compiled, its FLOPs counted by cost.py (the paper's convention: 3 forward
passes per image), and the dense and ticket steps are timed interleaved. The figure of
merit is speedup / FLOPs ratio (1.0: the cut saves time in proportion to its FLOPs).

    python benchmarks/vit_ticket_speedup.py [--models vit_cifar vit_digits] [--steps 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from step_vs_pytorch import jax_runner, median_seconds

from eb_jax import platform, train_steps
from eb_jax.config import default_config
from eb_jax.models import bn_scales, create_model
from eb_jax.platform import configure_process
from eb_jax.ticket.surgery import cut_ticket
from eb_jax.ticket.vit_groups import gate_mask

IMAGES = {"vit_cifar": (32, 32, 3), "vit_digits": (8, 8, 1), "vit_ti16": (224, 224, 3)}


def networks(name: str, ratios) -> dict:
    """{label: (model, variables)}: the dense ViT, then a ticket per ratio."""
    model = create_model(name, 10)
    variables = train_steps.init_variables(model, jax.random.key(0), IMAGES[name])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            rng.uniform(0, 1, x.shape).astype(np.float32) if p[-1].key == "scale" else np.asarray(x)
        ),
        variables["params"],
    )
    nets = {"dense": (model, {"params": params})}
    for ratio in ratios:
        masks = gate_mask(bn_scales(model, params), ratio)
        narrow, narrow_variables, _ = cut_ticket(model, {"params": params}, masks)
        nets[f"p={ratio}"] = (narrow, narrow_variables)
    return nets


def adamw_config():
    """The optimizer the ViT configs train with (AdamW), with BN-scale (gate) sparsity."""
    config = default_config()
    config.update(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, sparsity=1e-4)
    return config


def benchmark(name: str, ratios, steps: int, batch_size: int, warmup: int) -> None:
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, *IMAGES[name])), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
    }
    nets = networks(name, ratios)
    runners = {key: jax_runner(net, v, batch, adamw_config()) for key, (net, v) in nets.items()}
    seconds = median_seconds({k: run for k, (run, _) in runners.items()}, steps, warmup)
    print(f"{name}, batch {batch_size}: train step")
    for key, (net, _) in nets.items():
        line = f"  {key:6s} {1000 * seconds[key]:8.1f} ms"
        if key != "dense":
            speedup = seconds["dense"] / seconds[key]
            flop_ratio = runners["dense"][1] / runners[key][1]
            line += f"  speedup {speedup:5.2f}x  FLOPs ratio {flop_ratio:5.2f}x"
            line += f"  -> {speedup / flop_ratio:.2f}  (heads {net.head_widths})"
        print(line)


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_cifar", "vit_digits"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({platform.describe()}), median of {args.steps}")
    for name in args.models:
        benchmark(name, args.ratios, args.steps, args.batch, args.warmup)


if __name__ == "__main__":
    main()
