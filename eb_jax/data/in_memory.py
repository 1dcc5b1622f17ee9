"""Datasets small enough to hold in memory (digits, CIFAR): read once, batched by numpy.

Reading every example through the data source and a per-example transform costs more
than a small network's train step (the quickstart: 0.4 ms per 8x8 digit, 30x the step's
share). Here the decoded uint8 images are read once into one array; a batch is a fancy
index into it, augmented for the whole batch at once, and normalised later on the device
(input_pipeline.model_input). The order is a seeded permutation per epoch and the
augmentation draws from a generator seeded by (seed, epoch, step), so resuming at any
step replays the same batches, and batches can be prepared in parallel threads. Which
examples a step holds is input_pipeline's choice.
"""

from __future__ import annotations

import collections
import concurrent.futures

import numpy as np

_KEEP = 4  # splits kept by ArraySource.read_once: CIFAR's train and test ~180 MB
_READ: dict = {}


class ArraySource:
    """A split as arrays: `images` uint8 [N, H, W, C], `labels` int32 [N].

    Also a random-access source (len() and [i] -> {'image', 'label'}) like TFDS's.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    @classmethod
    def read(cls, source) -> ArraySource:
        """Reads every example of a TFDS data source."""
        examples = (source[i] for i in range(len(source)))
        images, labels = zip(*((e["image"], e["label"]) for e in examples), strict=True)
        return cls(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))

    @classmethod
    def read_once(cls, source, files_key) -> ArraySource:
        """`read(source)`, kept for this process under `files_key` (what identifies the files
        read: changed files make a new key), so the runs of a grid or a notebook read a
        split once. The arrays are read-only: every run shares them."""
        if files_key not in _READ:
            if len(_READ) >= _KEEP:
                del _READ[next(iter(_READ))]  # the oldest
            split = cls.read(source)
            split.images.flags.writeable = split.labels.flags.writeable = False
            _READ[files_key] = split
        return _READ[files_key]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


def cifar_augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per image: zero-pad 4 (on the uint8 image), random crop to the original size,
    random horizontal flip (docs/method.md, search protocol)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    tops, lefts = rng.integers(0, 9, size=(2, n))
    rows = tops[:, None] + np.arange(h)[None, :]  # [N, H]
    cols = lefts[:, None] + np.arange(w)[None, :]  # [N, W]
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    batch = np.arange(n)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def train_batches(
    source: ArraySource,
    spec,
    step_indices: np.ndarray,
    epoch_seed: int,
    start_step: int,
    num_threads: int = 1,
):
    """The batches of `step_indices[step]` (examples of each step, [steps, batch]) from
    `start_step` on, augmented from (epoch_seed, step) and prepared `num_threads` at a
    time ahead of the consumer (numpy frees the GIL)."""

    def batch(step: int) -> dict:
        indices = step_indices[step]
        images = source.images[indices]
        if spec.augment == "cifar":
            images = cifar_augment_batch(images, np.random.default_rng([epoch_seed, step]))
        return {"image": images, "label": source.labels[indices]}

    with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
        ahead = collections.deque()
        for step in range(start_step, len(step_indices)):
            ahead.append(pool.submit(batch, step))
            if len(ahead) > 2 * num_threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def eval_batches(
    source: ArraySource,
    local_batch: int,
    n_steps: int,
    process_index: int,
    process_count: int,
):
    """This process's every process_count-th eval example, in batches (last one short)."""
    mine = np.arange(process_index, len(source), process_count)
    for step in range(n_steps):
        indices = mine[step * local_batch : (step + 1) * local_batch]
        yield {"image": source.images[indices], "label": source.labels[indices]}
