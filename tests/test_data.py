"""Input pipelines: the offline digits, determinism, eval coverage, augmentation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from eb_jax.data import (
    DATASETS,
    DataError,
    eval_batches,
    in_memory,
    input_pipeline,
    model_input,
    normalizing,
    open_dataset,
    train_batches,
)
from eb_jax.models import apply_fn, create_model


@pytest.fixture(scope="module")
def digits(data_dir):
    return open_dataset("digits", data_dir)


def test_digits_split_is_deterministic_and_complete(digits):
    assert (len(digits.train), len(digits.eval), digits.num_classes) == (1437, 360, 10)
    labels = [int(digits.eval[i]["label"]) for i in range(len(digits.eval))]
    assert sorted(set(labels)) == list(range(10))
    image = np.asarray(digits.train[0]["image"])
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and image.max() > 200


def test_train_batches_are_uint8_normalised_on_device_and_reproducible(digits):
    a = list(train_batches(digits, 64, seed=3, epoch=1))
    b = list(train_batches(digits, 64, seed=3, epoch=1))
    assert len(a) == input_pipeline.steps_per_epoch(digits, 64) == 1437 // 64
    assert a[0]["image"].shape == (64, 8, 8, 1) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].dtype == np.int32
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    spec = digits.spec
    images = np.concatenate([model_input(x["image"], spec.mean, spec.std) for x in a])
    assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05
    other_epoch = next(train_batches(digits, 64, seed=3, epoch=2))
    assert not np.array_equal(other_epoch["label"], a[0]["label"])


def test_resuming_mid_epoch_replays_the_same_batches(digits):
    full = list(train_batches(digits, 64, seed=0, epoch=0))
    resumed = list(train_batches(digits, 64, seed=0, epoch=0, start_step=7))
    assert len(resumed) == len(full) - 7
    for x, y in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_process_shards_are_disjoint_and_cover_the_epoch(digits):
    def ids(batches):  # identify examples by their pixels
        return {x.tobytes() for b in batches for x in b["image"]}

    single = ids(train_batches(digits, 64, seed=0, epoch=0))
    shard0 = ids(train_batches(digits, 64, seed=0, epoch=0, process_index=0, process_count=2))
    shard1 = ids(train_batches(digits, 64, seed=0, epoch=0, process_index=1, process_count=2))
    assert not shard0 & shard1
    assert len(shard0 | shard1) >= 0.95 * len(single)


def test_eval_sees_every_example_once_with_padding(digits):
    batches = list(eval_batches(digits, 128))
    assert [b["image"].shape[0] for b in batches] == [128, 128, 128]
    assert sum(int(b["mask"].sum()) for b in batches) == 360
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    expected = [int(digits.eval[i]["label"]) for i in range(360)]
    np.testing.assert_array_equal(labels, expected)
    shards = [list(eval_batches(digits, 128, i, 2)) for i in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert sum(int(b["mask"].sum()) for s in shards for b in s) == 360


def test_normalising_on_the_device_in_a_jitted_step_equals_the_host_formula():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8)
    host = (images.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)

    @jax.jit
    def step(images, weight):  # normalising fused into a step, as in the train step
        x = model_input(images, mean, std)
        return x, jnp.sum(x * weight)

    on_device, _ = step(images, 2.0)
    assert on_device.dtype == jnp.float32
    np.testing.assert_allclose(on_device, host, rtol=0, atol=1e-6)
    floats = np.zeros((2, 4, 4, 3), np.float32)  # already the model's input: untouched
    assert model_input(floats, mean, std) is floats


class _Identity(nn.Module):
    @nn.compact
    def __call__(self, images, train):
        return images


def _identity_apply(variables, images, train):
    return images


def test_a_normalising_apply_feeds_the_model_floats_and_keeps_jit_caches_shared():
    spec = DATASETS["digits"]
    apply = normalizing(_identity_apply, spec)
    assert apply == normalizing(_identity_apply, spec)  # same static field: no recompiling
    assert hash(apply) == hash(normalizing(_identity_apply, spec))
    # eb_jax's networks rebuilt by each run: their apply_fn are equal too.
    vgg = normalizing(apply_fn(create_model("vgg_tiny", 10)), spec)
    assert vgg == normalizing(apply_fn(create_model("vgg_tiny", 10)), spec)
    assert vgg != normalizing(apply_fn(create_model("vgg_tiny", 100)), spec)
    # A network of any other class (a factory's, redefined by a notebook's rerun cell
    # under the same name) shares nothing with an equal-looking one.
    assert normalizing(apply_fn(_Identity()), spec) != normalizing(apply_fn(_Identity()), spec)
    white = apply({}, np.full((1, 8, 8, 1), 255, np.uint8), train=False)
    np.testing.assert_allclose(white, (1 - spec.mean[0]) / spec.std[0], rtol=1e-6)


def test_cifar_pipeline_on_mock_data():
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        data = open_dataset("cifar10")
        batch = next(train_batches(data, 8, seed=0, epoch=0))
    assert batch["image"].shape == (8, 32, 32, 3) and data.num_classes == 10


def test_cifar_augment_pads_with_zeros_crops_and_flips():
    rng = np.random.default_rng(0)
    outs = in_memory.cifar_augment_batch(np.full((50, 32, 32, 3), 255, np.uint8), rng)
    assert outs.shape == (50, 32, 32, 3) and outs.dtype == np.uint8
    assert (outs == 0).any(axis=(1, 2, 3)).mean() > 0.5  # crops reach into the zero padding
    assert (outs == 255).all(axis=(1, 2, 3)).any()  # the centred crop (1 in 81) or lucky
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, None, :, None], (50, 32, 1, 3))
    flipped = in_memory.cifar_augment_batch(ramp, rng)
    descends = flipped[:, 16, 10, 0] > flipped[:, 16, 11, 0]
    assert 0.2 < descends.mean() < 0.8  # about half the images flipped
    # Every output is a 32x32 window of the padded image, maybe mirrored.
    padded = np.pad(ramp[0], ((4, 4), (4, 4), (0, 0)))
    crops = [padded[t : t + 32, x : x + 32] for t in range(9) for x in range(9)]
    windows = {c.tobytes() for c in crops} | {c[:, ::-1].tobytes() for c in crops}
    assert all(o.tobytes() in windows for o in flipped)


def test_unknown_or_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        open_dataset("mnist")
    with pytest.raises(DataError, match="not prepared.*tfds build cifar10"):
        open_dataset("cifar10", str(tmp_path))
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # built in TFDS's older format
    (tmp_path / "cifar10" / "3.0.2" / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(DataError, match="as tfrecord: convert it with `tfds convert_format"):
        open_dataset("cifar10", str(tmp_path))


def test_an_in_memory_split_is_read_once_per_process_until_its_files_change(tmp_path):
    first = open_dataset("digits", str(tmp_path))
    again = open_dataset("digits", str(tmp_path))
    assert again.train.images is first.train.images and again.eval.labels is first.eval.labels
    assert not first.train.images.flags.writeable  # shared by every run: nobody writes it
    with pytest.raises(ValueError, match="read-only"):
        first.train.images[0] = 0
    record = next((tmp_path / "sklearn_digits").glob("*/sklearn_digits-train.array_record*"))
    record.touch()  # rewritten (the same bytes)
    reread = open_dataset("digits", str(tmp_path))
    assert reread.train.images is not first.train.images
    np.testing.assert_array_equal(reread.train.images, first.train.images)
    assert reread.eval.images is not first.eval.images  # its dataset's files changed


def test_mocked_examples_are_never_cached_as_the_prepared_files(tmp_path):
    real = open_dataset("digits", str(tmp_path))
    with tfds.testing.mock_data(num_examples=7, data_dir=str(tmp_path)):
        assert len(open_dataset("digits", str(tmp_path)).train) == 7
    assert open_dataset("digits", str(tmp_path)).train.images is real.train.images
