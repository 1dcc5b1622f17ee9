"""Does the input pipeline keep the train step fed? CIFAR shapes, and ImageNet decoding.

1. CIFAR-10 shapes (mock data through the real pipeline: in-memory, pad/crop/flip,
   normalise, `--threads` threads): the paper's VGG16 train step fed by the pipeline
   against the same step fed ready-made batches, interleaved; goal ratio >= 0.95. Also
   the pipeline alone, in images/s, next to the step's images/s.
2. ImageNet: examples decoded from JPEG (500x375, the dataset's typical size), random-
   resized-cropped to 224, flipped and normalised in 1 and 2 worker processes: images/s
   per worker.

    PYTHONPATH=. python benchmarks/input_pipeline.py [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from eb_jax import parallel, platform, train
from eb_jax.config import default_config
from eb_jax.data import DATASETS, open_dataset, train_batches
from eb_jax.data.input_pipeline import Dataset
from eb_jax.models import create_model


def _cifar_mock(num_examples: int):
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        return open_dataset("cifar10")


def _step(batch_size: int):
    config = default_config()
    model = create_model("vgg16", 10)
    tx = train.create_optimizer(config, 100)
    state = parallel.replicate(train.create_train_state(model, jax.random.key(0), (32, 32, 3), tx))
    return parallel.pmap_step(train.train_step), state


def feed_ratio(steps: int, batch_size: int, threads: int, rounds: int):
    data = _cifar_mock(steps * batch_size)
    p_step, state = _step(batch_size)
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


class JpegSource:
    """`n` ImageNet-sized JPEGs (smooth random pictures, ~100 KB like the dataset's),
    decoded on access like TFDS's image feature."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.jpegs = []
        for _ in range(8):
            coarse = Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8))
            pixels = np.asarray(coarse.resize((500, 375), Image.BICUBIC)).astype(np.int16)
            pixels = np.clip(pixels + rng.integers(-12, 12, pixels.shape), 0, 255)
            pixels = pixels.astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            self.jpegs.append(buffer.getvalue())
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = np.asarray(Image.open(io.BytesIO(self.jpegs[int(i) % 8])).convert("RGB"))
        return {"image": image, "label": int(i) % 1000}


def imagenet_rate(workers: int, batch_size: int, n_batches: int) -> float:
    data = Dataset(DATASETS["imagenet2012"], JpegSource(batch_size * n_batches), None, 1000)
    batches = train_batches(data, batch_size, 0, 0, num_threads=1, num_workers=workers)
    next(batches)  # workers started
    start = time.perf_counter()
    count = sum(b["label"].shape[0] for b in batches)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--imagenet-batches", type=int, default=12)
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({platform.describe()})")
    if args.steps:
        feed_ratio(args.steps, args.batch, args.threads, args.rounds)
    kb = sum(map(len, JpegSource(1).jpegs)) / 8 / 1024
    print(
        f"ImageNet: decode (JPEG 500x375, {kb:.0f} KB) + random-resized crop 224 + flip + "
        "normalise:"
    )
    for workers in (1, 2):
        rate = imagenet_rate(workers, 32, args.imagenet_batches)
        print(f"  {workers} worker(s): {rate:6.0f} img/s, {rate / workers:5.0f} img/s per worker")


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    main()
