"""TFDS data sources read through grain: shuffling, augmentation, batching, sharding.

Every dataset, the offline digits included, is a prepared TFDS dataset in `data_dir`
opened with `tfds.data_source` (random access, no TensorFlow). A training epoch is a
grain `MapDataset` indexed by step, so resuming at step k of epoch e replays exactly the
same batches. Small datasets (digits, CIFAR) are read into memory once and batched with
numpy instead (in_memory.py). Batches are dicts of numpy arrays: 'image' uint8 NHWC (a
quarter of float32's bytes to move; `model_input` normalises them on the device, inside
the jitted step); 'label' int32; eval batches add 'mask' (False on padding).

ImageNet's JPEGs stay encoded until the transform: the random-resized-crop box is drawn
from the size in the JPEG header, the JPEG is decoded at a reduced scale in the DCT
domain when the crop allows it, and crop and resize are one Pillow call.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import os
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from eb_jax.data import digits, imagenet_like, in_memory

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
    augment: str = "none"  # 'none' | 'cifar' | 'imagenet'
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
# Made here (imagenet_like.py): the ImageNet input path offline, for tests and benchmarks.
DATASETS["imagenet_like"] = dataclasses.replace(
    DATASETS["imagenet2012"],
    tfds_name=imagenet_like.NAME,
    train_examples=imagenet_like.TRAIN_EXAMPLES,
)
PREPARED_HERE = {"digits": digits.prepare, "imagenet_like": imagenet_like.prepare}


@dataclasses.dataclass
class Dataset:
    spec: DatasetSpec
    train: object  # random-access sources: len() and [i] -> {'image', 'label'}
    eval: object
    num_classes: int


def open_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Opens a prepared dataset (digits and imagenet_like are prepared here on first use)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if name in PREPARED_HERE:  # written by one process; the others wait for it
        if jax.process_index() == 0:
            PREPARED_HERE[name](data_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"eb_jax: {name} prepared")
    # Per-example images stay encoded: the transform decodes only what its crop needs.
    decoders = None if spec.in_memory else {"image": tfds.decode.SkipDecoding()}
    try:
        train, eval_ = (
            tfds.data_source(
                spec.tfds_name, split=split, data_dir=data_dir, download=False, decoders=decoders
            )
            for split in (spec.train_split, spec.eval_split)
        )
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        num_classes = builder.info.features["label"].num_classes
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
        files = _files_key(builder.data_dir)
        train, eval_ = (
            _read_in_memory(source, files, split)
            for source, split in ((train, spec.train_split), (eval_, spec.eval_split))
        )
    return Dataset(spec, train, eval_, num_classes)


def _data_source_method():
    return inspect.getattr_static(tfds.core.DatasetBuilder, "as_data_source")


_REAL_DATA_SOURCE = _data_source_method()  # tfds.testing.mock_data swaps it


def _files_key(directory: str) -> tuple | None:
    """The prepared dataset's files as (path, size, mtime): a rewritten file changes it.
    None where the examples do not come from files (tfds.testing.mock_data)."""
    mocked = _data_source_method() is not _REAL_DATA_SOURCE
    if mocked or not os.path.isdir(directory):
        return None
    entries = sorted(os.scandir(directory), key=lambda e: e.name)
    return tuple((e.path, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)


def _read_in_memory(source, files: tuple | None, split: str) -> in_memory.ArraySource:
    if files is None:
        return in_memory.ArraySource.read(source)
    return in_memory.ArraySource.read_once(source, (files, split))


def _has_tfrecords(data_dir: str | None, name: str) -> bool:
    if not data_dir:
        return False
    return any(epath.Path(data_dir, name).glob("*/*.tfrecord*"))


def _open(image) -> Image.Image:
    """An example's image as a PIL image: encoded bytes are opened lazily (the JPEG header
    gives the size; nothing is decoded yet), a decoded uint8 array is wrapped."""
    if isinstance(image, (bytes, np.bytes_)):
        return Image.open(io.BytesIO(image))
    image = np.asarray(image)
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): 8-100 % of the
    area, aspect ratio log-uniform in 3/4-4/3, 10 tries, then the central crop of the
    whole image with its ratio clamped to that range."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    if width / height < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif width / height > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple:
    """The part of the image that torchvision's Resize(resize) + CenterCrop(size) keeps
    (left, top, right, bottom): the shorter side scaled to `resize` (the longer one
    truncated), then the central crop at whole pixels of the resized image."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def crop_resize(image: Image.Image, box: tuple, size: int, flip: bool = False) -> np.ndarray:
    """`box` of `image` resized to size x size in one call (bilinear, antialiased), as
    uint8 RGB, mirrored left-right if `flip` (by Pillow: a numpy view would make the
    batching copy strided, measured slower).

    A JPEG not yet decoded is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (Pillow's `draft`) where the box still spans `size` pixels each way at that scale.
    """
    if image.format == "JPEG":  # draft is a no-op once decoded
        width, height = image.size
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        drafted = image.draft(
            "RGB", (math.ceil(width * size / box_w), math.ceil(height * size / box_h))
        )
        if drafted:
            scale = width / drafted[1][2]
            box = tuple(b / scale for b in box)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)


def _train_transform(spec: DatasetSpec):
    def transform(example, rng: np.random.Generator):
        image = example["image"]
        if spec.augment == "imagenet":
            image, size = _open(image), spec.image_shape[0]
            box = random_resized_crop_box(*image.size, rng)
            image = crop_resize(image, box, size, flip=rng.random() < 0.5)
        return {"image": _as_uint8(image, spec), "label": np.int32(example["label"])}

    return transform


def _eval_transform(spec: DatasetSpec):
    def transform(example):
        image = example["image"]
        if spec.augment == "imagenet":
            image, size = _open(image), spec.image_shape[0]
            image = crop_resize(image, center_crop_box(*image.size, 256, size), size)
        return {"image": _as_uint8(image, spec), "label": np.int32(example["label"])}

    return transform


def _as_uint8(image, spec: DatasetSpec) -> np.ndarray:
    """The model's (H, W, C) uint8 image."""
    return np.asarray(image, np.uint8).reshape(spec.image_shape)


def model_input(images, mean, std) -> jax.Array:
    """A batch's uint8 images as the model's float32 input, (x / 255 - mean) / std,
    computed where the images are: on the device, inside the jitted step that calls it.
    Float images are taken as the model's input already."""
    if images.dtype != jnp.uint8:
        return images
    images = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class NormalizingApply:
    """A model's `apply` that takes the batches' uint8 images (`model_input` first).

    A TrainState's `apply_fn`: equal instances compare equal, so states of one model
    share their compiled steps (models.apply_fn gives an `apply` equal across equal models)."""

    apply: Callable
    mean: tuple
    std: tuple

    def __call__(self, variables, images, *args, **kwargs):
        return self.apply(variables, model_input(images, self.mean, self.std), *args, **kwargs)


def normalizing(apply: Callable, spec: DatasetSpec) -> NormalizingApply:
    return NormalizingApply(apply, tuple(spec.mean), tuple(spec.std))


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
    mine, epoch_seed = epoch_indices(data, batch_size, seed, epoch, process_index, process_count)
    local_batch, n_steps = mine.shape[1], mine.shape[0]
    if isinstance(data.train, in_memory.ArraySource):
        return in_memory.train_batches(
            data.train, data.spec, mine, epoch_seed, start_step, num_threads
        )
    ds = grain.MapDataset.source(Subset(data.train, mine.reshape(-1)))
    ds = ds.random_map(_train_transform(data.spec), seed=epoch_seed)
    ds = ds.batch(local_batch, drop_remainder=True)[start_step:n_steps]
    return _iterate(ds, num_threads, num_workers)


def epoch_indices(
    data: Dataset, batch_size: int, seed: int, epoch: int, process_index: int, process_count: int
) -> tuple[np.ndarray, int]:
    """([steps, local batch] indices of this process's training examples in epoch
    `epoch`, the epoch's seed): a seeded permutation, every global batch split into
    process_count equal blocks."""
    local_batch = batch_size // process_count
    n_steps = steps_per_epoch(data, batch_size)
    epoch_seed = _epoch_seed(seed, epoch)
    order = np.random.default_rng(epoch_seed).permutation(len(data.train))
    # [step, process, example]: this process's indices of every step's global batch.
    mine = order[: n_steps * batch_size].reshape(n_steps, process_count, local_batch)
    return mine[:, process_index], epoch_seed


def eval_steps(data: Dataset, local_batch: int, process_count: int) -> int:
    """Eval batches every process runs (the same number, padded with empty ones)."""
    return math.ceil(math.ceil(len(data.eval) / process_count) / local_batch)


class Subset:
    """The examples of `source` at `indices`, in that order (a random-access source)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def _iterate(ds: grain.MapDataset, num_threads: int, num_workers: int):
    """The batches of `ds`, read by `num_threads` threads, made in `num_workers` worker
    processes if any (-1: `default_workers()`).

    Worker batches arrive in shared memory; each is copied out and its block unlinked
    at once, and the workers are stopped (their unread blocks unlinked) after the last
    batch or when the consumer stops early, so no block outlives the iteration. The last
    batch ends the iteration: no wait for the workers to report the end.
    """
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    batches = ds.to_iter_dataset(options)
    num_workers = default_workers() if num_workers == -1 else num_workers
    if not num_workers:
        yield from batches
        return
    if not flags.FLAGS.is_parsed():  # grain reads absl flags (parsed when run by main)
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
    iterator = iter(batches.mp_prefetch(options))
    try:
        for _ in range(len(ds)):
            yield jax.tree.map(_out_of_shared_memory, next(iterator))
    finally:
        iterator.close()


def default_workers() -> int:
    """Worker processes for `num_data_workers=-1`: one per core this process may use,
    less one for the training loop (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def _out_of_shared_memory(array):
    """A plain copy of a batch array; a shared-memory block is unlinked now.

    grain would unlink it from a thread pool when the array is collected, which at exit
    can come too late ("leaked shared_memory objects")."""
    if not isinstance(array, grain.multiprocessing.SharedMemoryArray):
        return array
    copy = np.array(array)
    array.shm.unlink()
    array._unlink_on_del = False  # noqa: SLF001 (only closed when collected: unlinked once)
    return copy


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
    n_steps = eval_steps(data, local_batch, process_count)
    if isinstance(data.eval, in_memory.ArraySource):
        batches = in_memory.eval_batches(
            data.eval, local_batch, n_steps, process_index, process_count
        )
        yield from (_pad(batch, local_batch) for batch in batches)
        return
    ds = grain.MapDataset.source(data.eval)[process_index::process_count]
    batches = _iterate(
        ds.map(_eval_transform(data.spec)).batch(local_batch), num_threads, num_workers
    )
    empty = {
        "image": np.zeros((0, *data.spec.image_shape), np.uint8),
        "label": np.zeros((0,), np.int32),
    }
    for _ in range(n_steps):
        yield _pad(next(batches, empty), local_batch)


def _pad(batch, size: int):
    n = batch["label"].shape[0]
    if n < size:
        batch = {
            k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()
        }
    return {**batch, "mask": np.arange(size) < n}
