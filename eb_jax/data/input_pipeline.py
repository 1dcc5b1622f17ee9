"""TFDS data sources read through grain: shuffling, augmentation, batching, sharding.

Every dataset, the offline digits included, is a prepared TFDS dataset in `data_dir`
opened with `tfds.data_source` (random access, no TensorFlow). A training epoch is a
grain `MapDataset` indexed by step, so resuming at step k of epoch e replays exactly the
same batches. Small datasets (digits, CIFAR) are read into memory once and batched with
numpy instead (in_memory.py). Batches are dicts of numpy arrays: 'image' float32 NHWC, normalised;
'label' int32; eval batches add 'mask' (False on padding).
"""

from __future__ import annotations

import dataclasses
import math

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from eb_jax.data import digits, in_memory

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset that cannot be opened; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    tfds_name: str
    train_split: str
    eval_split: str
    image_shape: tuple  # the model's input (H, W, C)
    mean: tuple
    std: tuple
    augment: str  # 'none' | 'cifar' | 'imagenet'
    in_memory: bool = False  # small enough to read once and batch with numpy (in_memory.py)
    train_examples: int = 0  # the train split's size, for projections made without the data
    num_classes: int = 0  # likewise


DATASETS = {
    # mean/std of the digits training images scaled to [0, 1].
    "digits": DatasetSpec(
        digits.NAME, "train", "test", (8, 8, 1), (0.3053,), (0.3759,), "none", True, 1437, 10
    ),
    # CIFAR: 50 000 32x32x3 uint8 training images are 150 MB in memory.
    "cifar10": DatasetSpec(
        "cifar10",
        "train",
        "test",
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        "cifar",
        True,
        50_000,
        10,
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "train",
        "test",
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        "cifar",
        True,
        50_000,
        100,
    ),
    "imagenet2012": DatasetSpec(
        "imagenet2012",
        "train",
        "validation",
        (224, 224, 3),
        IMAGENET_MEAN,
        IMAGENET_STD,
        "imagenet",
        train_examples=1_281_167,
        num_classes=1000,
    ),
}


@dataclasses.dataclass
class Dataset:
    spec: DatasetSpec
    train: object  # random-access sources: len() and [i] -> {'image', 'label'}
    eval: object
    num_classes: int


def open_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Opens a prepared dataset (the digits are prepared here on first use)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if name == "digits":  # written by one process; the others wait for it
        if jax.process_index() == 0:
            digits.prepare(data_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("eb_jax: digits prepared")
    try:
        train, eval_ = (
            tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
            for split in (spec.train_split, spec.eval_split)
        )
        num_classes = (
            tfds.builder(spec.tfds_name, data_dir=data_dir).info.features["label"].num_classes
        )
    except Exception as e:  # tfds raises many types for a missing or unreadable dataset
        where = data_dir or "the default TFDS data_dir"
        if _has_tfrecords(data_dir, spec.tfds_name):
            fix = (
                f"it is there as tfrecord: convert it with `tfds convert_format "
                f"--root_data_dir={data_dir} --out_file_format=array_record`"
            )
        else:
            fix = (
                f"prepare it with `tfds build {spec.tfds_name} --data_dir=DIR "
                f"--file_format=array_record` and pass --config.data_dir=DIR"
            )
        raise DataError(
            f"dataset {spec.tfds_name!r} is not prepared as array_record in {where} "
            f"({type(e).__name__}); {fix}"
        ) from None
    if spec.in_memory:
        train, eval_ = in_memory.ArraySource.read(train), in_memory.ArraySource.read(eval_)
    return Dataset(spec, train, eval_, num_classes)


def _has_tfrecords(data_dir: str | None, name: str) -> bool:
    if not data_dir:
        return False
    return any(epath.Path(data_dir, name).glob("*/*.tfrecord*"))


def _normalize(image: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    return in_memory.normalize(image, spec.mean, spec.std)


def _random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """torchvision's RandomResizedCrop: scale (0.08, 1), ratio (3/4, 4/3), then resize."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:  # fall back to a central crop with the ratio clamped, as torchvision does
        ratio = min(max(w / h, 3 / 4), 4 / 3)
        cw, ch = (w, round(w / ratio)) if w / h < 3 / 4 else (round(h * ratio), h)
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(image[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def _resize_center_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """Shorter side to `resize`, then the central size x size crop."""
    h, w = image.shape[:2]
    scale = resize / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]


def _train_transform(spec: DatasetSpec):
    def transform(example, rng: np.random.Generator):
        image = np.asarray(example["image"])
        if spec.augment == "imagenet":
            image = _random_resized_crop(image, rng, spec.image_shape[0])
            image = image[:, ::-1] if rng.random() < 0.5 else image
        return {"image": _normalize(image, spec), "label": np.int32(example["label"])}

    return transform


def _eval_transform(spec: DatasetSpec):
    def transform(example):
        image = np.asarray(example["image"])
        if spec.augment == "imagenet":
            image = _resize_center_crop(image, 256, spec.image_shape[0])
        return {"image": _normalize(image, spec), "label": np.int32(example["label"])}

    return transform


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**31


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    """Full global batches in one pass over the training set (the remainder is dropped)."""
    return len(data.train) // batch_size


def train_batches(
    data: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    num_workers: int = 0,
):
    """This process's batches of epoch `epoch`, from step `start_step` on.

    The global order is a seeded permutation per epoch; process i takes the i-th of
    process_count equal blocks of every global batch (what device i of a single process
    would get), so processes see disjoint shards. Per-example
    datasets (ImageNet) are read by `num_threads` threads and, with `num_workers`,
    decoded and augmented in that many worker processes, in the same order.
    """
    local_batch = batch_size // process_count
    n_steps = steps_per_epoch(data, batch_size)
    epoch_seed = _epoch_seed(seed, epoch)
    order = np.random.default_rng(epoch_seed).permutation(len(data.train))
    # [step, process, example]: this process's indices of every step's global batch.
    mine = order[: n_steps * batch_size].reshape(n_steps, process_count, local_batch)
    mine = mine[:, process_index]
    if isinstance(data.train, in_memory.ArraySource):
        return in_memory.train_batches(
            data.train, data.spec, mine, epoch_seed, start_step, num_threads
        )
    ds = grain.MapDataset.source(_Subset(data.train, mine.reshape(-1)))
    ds = ds.random_map(_train_transform(data.spec), seed=epoch_seed)
    ds = ds.batch(local_batch, drop_remainder=True)[start_step:n_steps]
    return _iterate(ds, num_threads, num_workers)


class _Subset:
    """The examples of `source` at `indices`, in that order (a random-access source)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def _iterate(ds: grain.MapDataset, num_threads: int, num_workers: int):
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    batches = ds.to_iter_dataset(options)
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain reads absl flags (parsed when run by main)
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
        batches = batches.mp_prefetch(options)
    return iter(batches)


def eval_batches(
    data: Dataset,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    num_workers: int = 0,
):
    """Every eval example exactly once, in batches padded to `batch_size` (mask=False)."""
    local_batch = batch_size // process_count
    # Every process runs the same number of steps, padding with empty batches.
    n_steps = math.ceil(math.ceil(len(data.eval) / process_count) / local_batch)
    if isinstance(data.eval, in_memory.ArraySource):
        batches = in_memory.eval_batches(
            data.eval, data.spec, local_batch, n_steps, process_index, process_count
        )
        yield from (_pad(batch, local_batch) for batch in batches)
        return
    ds = grain.MapDataset.source(data.eval)[process_index::process_count]
    batches = _iterate(
        ds.map(_eval_transform(data.spec)).batch(local_batch), num_threads, num_workers
    )
    empty = {
        "image": np.zeros((0, *data.spec.image_shape), np.float32),
        "label": np.zeros((0,), np.int32),
    }
    for _ in range(n_steps):
        yield _pad(next(batches, empty), local_batch)


def _pad(batch, size: int):
    n = batch["label"].shape[0]
    padded = {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    padded["mask"] = np.arange(size) < n
    return padded
