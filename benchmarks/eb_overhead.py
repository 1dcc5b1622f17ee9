"""Early-Bird search overhead: drawing the masks and updating the detectors, per epoch,
as a fraction of the epoch's training time, for VGG16 (CIFAR) and ResNet-50 (ImageNet).

Both are measured here in one run: the per-epoch search work (masks for p = 0.3/0.5/0.7
from the BN scales, detector updates, history) and a train step, whose time per image
is scaled to one epoch of the dataset (50 000 CIFAR / 1 281 167 ImageNet images).

    python benchmarks/eb_overhead.py [--repeats 5]
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
from eb_jax.models import bn_scales, create_model
from eb_jax.platform import configure_process
from eb_jax.ticket import EarlyBirdDetector
from eb_jax.ticket.search import TicketSearch

CASES = [  # model, input shape, classes, images per epoch, measured batch
    ("vgg16", (32, 32, 3), 10, 50_000, 64),
    ("resnet50", (224, 224, 3), 1000, 1_281_167, 8),
]


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, shape, classes, epoch_images, batch_size, repeats):
    model = create_model(name, classes)
    config = default_config()
    state = train_steps.create_train_state(
        model, jax.random.key(0), shape, train_steps.create_optimizer(config, 100)
    )
    # Spread the scales as training would, so masks and distances are not trivial.
    scales = bn_scales(model, state.params)
    rng = np.random.default_rng(0)
    scales = [jnp.asarray(s * rng.uniform(0.0, 2.0, s.shape), jnp.float32) for s in scales]
    search = TicketSearch((0.3, 0.5, 0.7), 0.5, EarlyBirdDetector(), [s.shape[0] for s in scales])
    epoch = iter(range(10**6))
    for _ in range(6):  # compile, and fill the detectors' windows
        search.observe(next(epoch), scales)
    search_time = _median(lambda: search.observe(next(epoch), scales), repeats)

    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, *shape), np.float32)),
        "label": jnp.asarray(rng.integers(0, classes, batch_size), jnp.int32),
    }
    step = jax.jit(train_steps.train_step, donate_argnums=0)
    holder = {"state": step(state, batch)[0]}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    step_time = _median(one_step, max(2, repeats // 2))
    epoch_time = step_time / batch_size * epoch_images
    total = sum(s.shape[0] for s in scales)
    print(
        f"{name:9s} {total:6d} BN channels | search {1000 * search_time:7.2f} ms/epoch | "
        f"train step {step_time:6.2f} s @ batch {batch_size} -> epoch {epoch_time / 3600:6.2f} h"
        f" | overhead {100 * search_time / epoch_time:.6f} % of the epoch"
    )


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({platform.describe()})")
    for case in CASES:
        measure(*case, repeats=args.repeats)


if __name__ == "__main__":
    main()
