"""Does the input pipeline keep the train step fed? CIFAR shapes, and ImageNet JPEGs.

1. CIFAR-10 shapes (mock data through the real pipeline: in-memory, pad/crop/flip,
   uint8 batches normalised inside the step, `--threads` threads): the paper's VGG16
   train step fed by the pipeline against the same step fed ready-made batches,
   interleaved; goal ratio >= 0.95. Also the pipeline alone, in images/s.
2. ImageNet: the `imagenet_like` dataset (photographic JPEGs at ImageNet's sizes, read
   from array_record as `imagenet2012` is) through the train path (random-resized crop
   224 + flip) and the eval path (resize 256, centre crop 224) in 1 and 2 worker
   processes, next to the bare decode of the same JPEGs with Pillow in this process,
   interleaved rounds; goals: a worker >= 0.7x bare decode, 2 workers >= 1.6x one.

    PYTHONPATH=. python benchmarks/input_pipeline.py [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from eb_jax import parallel, platform, train_steps
from eb_jax.config import default_config
from eb_jax.data import eval_batches, normalizing, open_dataset, train_batches
from eb_jax.data.input_pipeline import Dataset
from eb_jax.models import create_model
from eb_jax.platform import configure_process


def _cifar_mock(num_examples: int):
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        return open_dataset("cifar10")


def _step(spec):
    config = default_config()
    model = create_model("vgg16", 10)
    tx = train_steps.create_optimizer(config, 100)
    apply_fn = normalizing(model.apply, spec)
    state = train_steps.create_train_state(model, jax.random.key(0), (32, 32, 3), tx, apply_fn)
    return parallel.pmap_step(train_steps.train_step), parallel.replicate(state)


def feed_ratio(steps: int, batch_size: int, threads: int, rounds: int):
    data = _cifar_mock(steps * batch_size)
    p_step, state = _step(data.spec)
    ready = list(train_batches(data, batch_size, 0, 0))  # the same batches, made beforehand
    holder = {"state": state}

    def run(batches):
        start = time.perf_counter()
        for batch in batches:
            holder["state"], metrics = p_step(holder["state"], parallel.shard(batch))
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    run(ready[:2])  # compile
    fed, synthetic = [], []
    for epoch in range(rounds):
        fed.append(run(train_batches(data, batch_size, 0, epoch, num_threads=threads)))
        synthetic.append(run(ready))
    t_fed, t_syn = statistics.median(fed), statistics.median(synthetic)
    start = time.perf_counter()
    n = sum(1 for _ in train_batches(data, batch_size, 0, 99, num_threads=threads))
    alone = n * batch_size / (time.perf_counter() - start)
    print(
        f"CIFAR-10 shapes, VGG16 step, batch {batch_size}, {steps} steps, {threads} threads, "
        f"median of {rounds}:"
    )
    print(f"  step fed by the pipeline {steps * batch_size / t_fed:8.0f} img/s")
    print(f"  step fed ready batches   {steps * batch_size / t_syn:8.0f} img/s")
    print(f"  ratio {t_syn / t_fed:.3f} (goal >= 0.95); the pipeline alone {alone:.0f} img/s")


class Repeated:
    """`source`'s examples again and again, `n` in all (a longer epoch to time)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[int(i) % len(self.source)]


def bare_decode_rate(jpegs: list[bytes], seconds: float) -> float:
    """Pillow decoding the JPEGs to RGB arrays, nothing else, in this process."""
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for jpeg in jpegs:
            np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        count += len(jpegs)
    return count / (time.perf_counter() - start)


def pipeline_rate(data: Dataset, split: str, workers: int, batch_size: int) -> float:
    """Images/s the pipeline delivers after its first batch (workers started)."""
    options = {"num_threads": 1, "num_workers": workers}
    if split == "train":
        batches = train_batches(data, batch_size, 0, 0, **options)
    else:
        batches = eval_batches(data, batch_size, **options)
    next(batches)
    start = time.perf_counter()
    count = sum(int(b.get("mask", b["label"] >= 0).sum()) for b in batches)
    return count / (time.perf_counter() - start)


def imagenet_rates(images: int, batch_size: int, rounds: int):
    with tempfile.TemporaryDirectory() as data_dir:
        data = open_dataset("imagenet_like", data_dir)
        jpegs = [data.train[i]["image"] for i in range(len(data.train))]
        data = Dataset(data.spec, Repeated(data.train, images), Repeated(data.eval, images), 1000)
        rows = {"bare decode": [], "train, 1 worker": [], "train, 2 workers": []}
        rows |= {"eval, 1 worker": [], "eval, 2 workers": []}
        for _ in range(rounds):  # interleaved: each round measures every row once
            rows["bare decode"].append(bare_decode_rate(jpegs, 3.0))
            for split in ("train", "eval"):
                for workers in (1, 2):
                    name = f"{split}, {workers} worker{'s' if workers > 1 else ''}"
                    rows[name].append(pipeline_rate(data, split, workers, batch_size))
    rate = {name: statistics.median(values) for name, values in rows.items()}
    kb = np.mean([len(j) for j in jpegs]) / 1024
    sizes = sorted({Image.open(io.BytesIO(j)).size for j in jpegs})
    print(
        f"ImageNet-like JPEGs ({len(set(jpegs))} distinct, {kb:.0f} KB on average, "
        f"{sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]}), {images} images a "
        f"pass, batch {batch_size}, median of {rounds} interleaved rounds:"
    )
    bare = rate["bare decode"]
    print(f"  bare decode (Pillow, this process) {bare:6.0f} img/s")
    for split in ("train", "eval"):
        one, two = rate[f"{split}, 1 worker"], rate[f"{split}, 2 workers"]
        print(
            f"  {split}: 1 worker {one:6.0f} img/s = {one / bare:.2f}x bare decode (goal >= 0.7); "
            f"2 workers {two:6.0f} img/s = {two / one:.2f}x one (goal >= 1.6)"
        )


def main():
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--imagenet-images", type=int, default=1024)
    parser.add_argument("--imagenet-batch", type=int, default=32)
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({platform.describe()}); {os.cpu_count()} CPU cores")
    if args.steps:
        feed_ratio(args.steps, args.batch, args.threads, args.rounds)
    if args.imagenet_images:
        imagenet_rates(args.imagenet_images, args.imagenet_batch, args.rounds)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    main()
