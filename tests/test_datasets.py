"""The paper's datasets on TFDS mock data (no download), sharding over processes and
determinism (worker processes: test_imagenet_input)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from eb_jax.config import load_config
from eb_jax.data import (
    eval_batches,
    imagenet_like,
    in_memory,
    input_pipeline,
    open_dataset,
    train_batches,
)
from eb_jax.data.input_pipeline import Dataset, DatasetSpec

PAPER_CONFIGS = [
    "vgg16_cifar10",
    "vgg16_cifar100",
    "preresnet101_cifar10",
    "preresnet101_cifar100",
    "resnet18_imagenet",
    "resnet50_imagenet",
]


class EncodedImages:
    """Mock ImageNet read with its images left encoded: JPEG bytes, label i."""

    def __init__(self, n):
        self.n, self.jpegs = n, imagenet_like.jpegs(3)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": self.jpegs[int(i) % 3], "label": int(i)}


def _encoded_data_source(builder, split, decoders=None, **kwargs):
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)  # decoded in the transform
    return EncodedImages(20)


def _mock_data(dataset: str):
    if dataset == "imagenet2012":
        return tfds.testing.mock_data(num_examples=20, as_data_source_fn=_encoded_data_source)
    return tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_pipeline_on_mock_data(name):
    config = load_config(name)
    with _mock_data(config.dataset):
        data = open_dataset(config.dataset, config.data_dir or None)
        train = list(
            train_batches(data, 8, config.seed, epoch=0, num_threads=config.num_data_threads)
        )
        test = list(eval_batches(data, 8, num_threads=config.num_data_threads))
    spec = data.spec
    assert (
        data.num_classes == {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[config.dataset]
    )
    assert len(train) == 20 // 8
    for batch in train + test:
        assert batch["image"].shape == (8, *spec.image_shape) == (8, *config_shape(config))
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < data.num_classes))
        real = batch.get("mask", np.ones(8, bool))  # not the eval padding
        assert batch["image"][real].std() > 10  # pictures, not blank
    assert sum(int(b["mask"].sum()) for b in test) == 20  # every test example, once


def config_shape(config):
    return (224, 224, 3) if config.dataset == "imagenet2012" else (32, 32, 3)


class IndexSource:
    """Example i: a (12 + i % 9) x 20 image filled with i % 256, label i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        return {"image": np.full((12 + i % 9, 20, 3), i % 256, np.uint8), "label": i}


SMALL = DatasetSpec("index", "train", "test", (8, 8, 3), (0.5,) * 3, (0.25,) * 3, "imagenet")


def _per_example_data(n=100):
    return Dataset(SMALL, IndexSource(n), IndexSource(n // 2), num_classes=n)


def _in_memory_data(n=100):
    images = np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in range(n)])
    spec = DatasetSpec("index", "train", "test", (8, 8, 3), (0.5,) * 3, (0.25,) * 3, "cifar", True)
    return Dataset(
        spec,
        in_memory.ArraySource(images, np.arange(n, dtype=np.int32)),
        in_memory.ArraySource(images[: n // 2], np.arange(n // 2, dtype=np.int32)),
        num_classes=n,
    )


@pytest.mark.parametrize("make", [_per_example_data, _in_memory_data], ids=["grain", "memory"])
def test_two_processes_see_every_example_exactly_once_per_epoch(make):
    data = make()
    for epoch in (0, 1):
        shards = [
            np.concatenate([b["label"] for b in train_batches(data, 8, 0, epoch, 0, i, 2)])
            for i in range(2)
        ]
        assert len(shards[0]) == len(shards[1]) == 12 * 4  # 100 // 8 steps of 4 each
        seen = np.concatenate(shards)
        assert len(set(seen.tolist())) == len(seen)  # no example twice
        assert len(seen) > 100 - 8  # only the last partial global batch is dropped
    evals = [
        np.concatenate([b["label"][b["mask"]] for b in eval_batches(data, 8, i, 2)])
        for i in range(2)
    ]
    assert sorted(np.concatenate(evals).tolist()) == list(range(50))


@pytest.mark.parametrize("make", [_per_example_data, _in_memory_data], ids=["grain", "memory"])
def test_order_is_fixed_by_seed_and_epoch_and_resumes_mid_epoch(make):
    data = make()

    def labels(seed, epoch, start=0):
        return [b["label"].tolist() for b in train_batches(data, 8, seed, epoch, start)]

    first = labels(0, 3)
    assert labels(0, 3) == first  # a restart replays the epoch
    assert labels(0, 3, start=5) == first[5:]  # resuming at step 5
    assert labels(0, 4) != first and labels(1, 3) != first
    assert sorted(sum(first, [])) != sum(first, [])  # shuffled


def test_imagenet_augmentation_crops_flips_and_keeps_pixels():
    data = _per_example_data()
    batch = next(train_batches(data, 100, 0, 0))
    assert batch["image"].shape == (100, 8, 8, 3) and batch["image"].dtype == np.uint8
    for image, label in zip(batch["image"], batch["label"], strict=True):  # constant stays so
        np.testing.assert_array_equal(image, label % 256)
    spec = input_pipeline._eval_transform(SMALL)
    out = spec({"image": np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3), "label": 0})
    assert out["image"].shape == (8, 8, 3)
