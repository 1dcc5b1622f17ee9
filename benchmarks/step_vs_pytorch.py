"""Train-step speed: eb_jax against PyTorch on the same network, optimizer and batch,
dense and cut to tickets, interleaved, on whatever backend JAX and PyTorch run.

Networks: VGG16 and PreResNet-56 / -101 at CIFAR shapes (and ResNet-50 at 224 px with
`--resnet50`, meant for a GPU), dense and cut at p = 0.3/0.5/0.7 from random BN scales
by eb_jax's surgery (kept counts rounded up to `--round-to`); the PyTorch side is built
from the same widths (a PreResNet ticket's channel selections included). Both sides
run SGD (momentum 0.9, weight decay 1e-4) with the BN-scale sparsity term; steps are
interleaved (one of each network in turn, every round; untimed rounds first, so the host
allocators reach their steady state) and the medians compared.

Printed per network: both step times, eb_jax's speed against PyTorch's (> 1: eb_jax
faster), and for tickets each side's speedup over its dense network next to the FLOPs
ratio (eb_jax's analytic count, `cost.py`: the paper's convention).

    pip install torch==2.13.0   # the CPU wheel; a CUDA build on a GPU host
    python benchmarks/step_vs_pytorch.py [--models vgg16 preresnet56] [--batch 64]
        [--ratios 0.3 0.5 0.7] [--round-to 8] [--steps 5] [--warmup 3] [--torch-mode eager|best]

`--torch-mode best` (GPU): PyTorch with bf16 autocast, channels_last and torch.compile,
against eb_jax in bf16 (`--precision bf16`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eb_jax import platform, train_steps
from eb_jax.config import default_config
from eb_jax.cost import forward_cost
from eb_jax.lowp import Precision
from eb_jax.models import bn_scales, create_model
from eb_jax.models.preresnet import EXPANSION, STAGE_PLANES, PreResNet, blocks_per_stage
from eb_jax.platform import configure_process
from eb_jax.ticket import channel_mask
from eb_jax.ticket.surgery import cut_ticket

SPARSITY, WEIGHT_DECAY = 1e-4, 1e-4


def jax_model(name: str, precision: str):
    num_classes = 1000 if name == "resnet50" else 10
    if name.startswith("preresnet"):
        depth = int(name.removeprefix("preresnet"))
        return PreResNet(depth=depth, num_classes=num_classes, precision=Precision(precision))
    return create_model(name, num_classes, precision=Precision(precision))


def jax_runner(model, variables, batch, config=None):
    """A function running one eb_jax train step (state donated), and the step's FLOPs
    (3 forward passes per image, the paper's convention). `config`: the optimizer's
    settings, default SGD with this benchmark's weight decay and sparsity."""
    if config is None:
        config = default_config()
        config.weight_decay, config.sparsity = WEIGHT_DECAY, SPARSITY
    variables = jax.tree.map(jnp.array, variables)
    state = train_steps.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=train_steps.create_optimizer(config, 100),
    )
    step = jax.jit(train_steps.train_step, donate_argnums=0).lower(state, batch).compile()
    # The paper's count (cost.py): XLA's cost analysis would also count the 0/1 matmuls
    # that pick a PreResNet ticket's channels on CPU.
    images = batch["image"]
    flops = 3 * forward_cost(model, images.shape[1:]).flops * images.shape[0]
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    run()
    return run, flops


# ---------------------------------------------------------------- PyTorch networks


def torch_vgg(cfg, num_classes: int):
    from torch import nn

    layers, c_in = [], 3
    for c in cfg:
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        c_in = c
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers, *head)


def torch_preresnet(model: PreResNet):
    """The eb_jax PreResNet's widths and channel selections as a PyTorch module."""
    import torch
    from torch import nn

    inner, selections = model._widths()
    n = blocks_per_stage(model.depth)

    def select(indices):
        return (lambda x: x) if indices is None else (lambda x: x[:, list(indices)])

    class Block(nn.Module):
        def __init__(self, in_planes, planes, widths, selection, stride, first):
            super().__init__()
            kept = in_planes if selection is None else len(selection)
            self.bn1, self.select = nn.BatchNorm2d(in_planes), select(selection)
            self.conv1 = nn.Conv2d(kept, widths[0], 1, bias=False)
            self.bn2 = nn.BatchNorm2d(widths[0])
            self.conv2 = nn.Conv2d(widths[0], widths[1], 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(widths[1])
            self.conv3 = nn.Conv2d(widths[1], planes * EXPANSION, 1, bias=False)
            self.down = (
                nn.Conv2d(in_planes, planes * EXPANSION, 1, stride, bias=False) if first else None
            )

        def forward(self, x):
            out = torch.relu(self.select(self.bn1(x)))
            out = self.conv1(out)
            out = self.conv2(torch.relu(self.bn2(out)))
            out = self.conv3(torch.relu(self.bn3(out)))
            return out + (self.down(x) if self.down is not None else x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            blocks, in_planes = [], 16
            for i in range(3 * n):
                stage, b = divmod(i, n)
                planes = STAGE_PLANES[stage]
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(Block(in_planes, planes, inner[i], selections[i], stride, b == 0))
                in_planes = planes * EXPANSION
            self.blocks = nn.Sequential(*blocks)
            self.bn, self.select = nn.BatchNorm2d(in_planes), select(selections[-1])
            kept = in_planes if selections[-1] is None else len(selections[-1])
            self.fc = nn.Linear(kept, model.num_classes)

        def forward(self, x):
            x = torch.relu(self.select(self.bn(self.blocks(self.stem(x)))))
            return self.fc(x.mean((2, 3)))

    return Net()


def torch_runner(name: str, model, batch_size: int, image: int, mode: str):
    import torch
    from torch import nn

    if name.startswith("vgg"):
        net = torch_vgg(model.cfg, model.num_classes)
    elif name.startswith("preresnet"):
        net = torch_preresnet(model)
    else:
        import torchvision

        net = torchvision.models.resnet50()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device).train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image, image, generator=gen).to(device)
    y = torch.randint(0, 1000 if name == "resnet50" else 10, (batch_size,), generator=gen)
    y = y.to(device)
    forward = net
    if mode == "best":
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        forward = torch.compile(net)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=mode == "best"):
            loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        for m in bns:
            m.weight.grad.add_(SPARSITY * torch.sign(m.weight.data))
        opt.step()
        loss.item()

    run()
    return run, torch.__version__


# ---------------------------------------------------------------- the comparison


def networks(name: str, ratios, round_to: int, precision: str, image: int):
    """{label: (eb_jax model, variables)}: dense, then a ticket per ratio."""
    model = jax_model(name, precision)
    variables = train_steps.init_variables(model, jax.random.key(0), (image, image, 3))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            rng.uniform(0, 1, x.shape).astype(np.float32) if p[-1].key == "scale" else np.asarray(x)
        ),
        variables["params"],
    )
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    nets = {"dense": (model, variables)}
    for ratio in ratios:
        masks = channel_mask(bn_scales(model, params), ratio)
        narrow, narrow_variables, _ = cut_ticket(model, variables, masks, round_to=round_to)
        nets[f"p={ratio}"] = (narrow, narrow_variables)
    return nets


def median_seconds(runners: dict, steps: int, warmup: int) -> dict:
    """{key: median seconds of runners[key]()}, timed in interleaved rounds (one call of
    each runner in turn) after `warmup` untimed rounds, by which host allocators settle."""
    times = {key: [] for key in runners}
    for round_ in range(warmup + steps):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def compare(name: str, args) -> dict:
    image = 224 if name == "resnet50" else 32
    ratios = () if name == "resnet50" else args.ratios
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((args.batch, image, image, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32),
    }
    runners, flops, torch_version = {}, {}, None
    for label, (model, variables) in networks(
        name, ratios, args.round_to, args.precision, image
    ).items():
        runners[label, "eb_jax"], flops[label] = jax_runner(model, variables, batch)
        if not args.no_torch:
            try:
                runners[label, "torch"], torch_version = torch_runner(
                    name, model, args.batch, image, args.torch_mode
                )
            except ImportError as e:  # torchvision, for ResNet-50
                print(f"{name}: PyTorch side skipped ({e})")
    ms = {key: 1000 * t for key, t in median_seconds(runners, args.steps, args.warmup).items()}
    print(
        f"{name}, batch {args.batch}, {args.precision}, round_to {args.round_to}, "
        f"PyTorch {torch_version or 'not run'} ({args.torch_mode}), median of {args.steps}:"
    )
    results = {}
    for label in flops:
        line = f"  {label:6s} eb_jax {ms[label, 'eb_jax']:8.1f} ms"
        row = {"eb_jax_ms": ms[label, "eb_jax"]}
        if (label, "torch") in ms:
            versus = ms[label, "torch"] / ms[label, "eb_jax"]
            line += f"  PyTorch {ms[label, 'torch']:8.1f} ms  eb_jax {versus:4.2f}x PyTorch"
            row["versus_torch"] = versus
        if label != "dense":
            flop_ratio = flops["dense"] / flops[label]
            speedup = ms["dense", "eb_jax"] / ms[label, "eb_jax"]
            line += f" | FLOPs {flop_ratio:4.2f}x cheaper: eb_jax {speedup:4.2f}x faster"
            line += f" ({speedup / flop_ratio:.2f} of it)"
            row["of_flops_ratio"] = speedup / flop_ratio
            if (label, "torch") in ms:
                torch_speedup = ms["dense", "torch"] / ms[label, "torch"]
                line += f", PyTorch {torch_speedup:4.2f}x ({torch_speedup / flop_ratio:.2f})"
        results[label] = row
        print(line)
    return results


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "preresnet56", "preresnet101"])
    parser.add_argument("--resnet50", action="store_true", help="add ResNet-50 at 224 px")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds first (host allocators settle)"
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--torch-mode", default="eager", choices=["eager", "best"])
    parser.add_argument("--no-torch", action="store_true", help="time eb_jax alone")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is not installed (pip install torch==2.13.0): timing eb_jax alone")
        args.no_torch = True
    print(f"backend: {jax.default_backend()} ({platform.describe()})")
    for name in args.models + (["resnet50"] if args.resnet50 else []):
        compare(name, args)


if __name__ == "__main__":
    main()
