"""The DALI input path (input_backend='dali'): its checks, device batches through
`parallel.shard`, and, where DALI's wheel is installed, its CPU operators against the
Pillow path (the same examples, crops and flips; pixels within resampling error)."""

import importlib.util
import io

import jax
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from eb_jax import names, parallel
from eb_jax.config import ConfigError, validate
from eb_jax.data import Dataset, eval_batches, open_dataset, train_batches

HAS_DALI = importlib.util.find_spec("nvidia") is not None and (
    importlib.util.find_spec("nvidia.dali") is not None
)
needs_dali = pytest.mark.skipif(
    not HAS_DALI,
    reason="NVIDIA DALI is not installed (requirements-gpu.txt; CI does not install it)",
)


def test_dali_backend_fails_in_one_line_where_it_cannot_run(data_dir):
    config = tiny_config(data_dir, input_backend="nvjpeg")
    with pytest.raises(ConfigError, match=r"input_backend='nvjpeg' must be one of"):
        validate(config, 2)
    config = tiny_config(data_dir, input_backend=names.DALI)  # the digits: in memory
    with pytest.raises(ConfigError, match=r"decodes JPEG datasets .*use input_backend='grain'"):
        validate(config, 2)
    config = tiny_config(data_dir, input_backend=names.DALI, dataset="imagenet_like")
    missing = "decodes on NVIDIA GPUs and JAX runs on cpu" if HAS_DALI else "needs NVIDIA DALI"
    with pytest.raises(ConfigError, match=missing) as error:
        validate(config, 2)
    assert "\n" not in str(error.value)
    validate(tiny_config(data_dir, dataset="imagenet_like"), 2)  # 'grain' is the default


def test_a_batch_already_on_the_devices_is_split_where_it_is():
    devices = jax.local_devices()
    host = np.arange(len(devices) * 3 * 2, dtype=np.float32).reshape(-1, 2)
    mesh = jax.sharding.Mesh(np.array(devices), (parallel.AXIS,))
    sharding = jax.NamedSharding(mesh, jax.P(parallel.AXIS))
    on_devices = jax.device_put(host, sharding)
    split = parallel.shard({"image": on_devices, "label": np.arange(len(host))})
    assert isinstance(split["image"], jax.Array) and isinstance(split["label"], np.ndarray)
    np.testing.assert_array_equal(split["image"], parallel.shard(host))
    sums = jax.pmap(lambda x: x.sum())(split["image"])
    np.testing.assert_allclose(sums, host.reshape(len(devices), -1).sum(1))


@pytest.fixture(scope="module")
def jpegs(data_dir):
    return open_dataset("imagenet_like", data_dir)


class Decoded:
    """A JPEG source's examples decoded in full by Pillow: the Pillow path then crops
    and resizes without its DCT-domain downscaling, as DALI does."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        example = self.source[i]
        image = np.asarray(Image.open(io.BytesIO(example["image"])).convert("RGB"))
        return {"image": image, "label": example["label"]}


@pytest.fixture(scope="module")
def decoded(jpegs):
    return Dataset(jpegs.spec, Decoded(jpegs.train), Decoded(jpegs.eval), jpegs.num_classes)


def assert_close_images(ours, pillow):
    """Per image, within resampling error; a box or a flip drawn differently would move
    most pixels by tens of levels."""
    diff = np.abs(np.asarray(ours, int) - pillow.astype(int))
    assert diff.mean(axis=(1, 2, 3)).max() < 0.5
    assert np.percentile(diff, 99.9) <= 6


@needs_dali
def test_train_batches_are_the_pillow_paths_examples_crops_and_flips(jpegs, decoded):
    from eb_jax.data import dali

    ours = list(dali.train_batches(jpegs, 32, seed=1, epoch=2, start_step=5))
    pillow = list(train_batches(decoded, 32, seed=1, epoch=2, start_step=5, num_threads=2))
    assert len(ours) == len(pillow) == 3
    for a, b in zip(ours, pillow, strict=True):
        assert isinstance(a["image"], jax.Array) and a["image"].dtype == np.uint8
        assert a["image"].shape == b["image"].shape == (32, 224, 224, 3)
        assert len(a["image"].sharding.device_set) == jax.local_device_count()
        np.testing.assert_array_equal(a["label"], b["label"])
        assert_close_images(a["image"], b["image"])


@needs_dali
def test_eval_batches_keep_the_resize_256_centre_crop_geometry_and_padding(jpegs, decoded):
    from eb_jax.data import dali

    ours, pillow = list(dali.eval_batches(jpegs, 48)), list(eval_batches(decoded, 48))
    assert len(ours) == len(pillow) == 2
    for a, b in zip(ours, pillow, strict=True):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        kept = b["mask"]
        np.testing.assert_array_equal(a["label"][kept], b["label"][kept])
        assert_close_images(np.asarray(a["image"])[kept], b["image"][kept])
    assert sum(int(b["mask"].sum()) for b in ours) == len(jpegs.eval)


@needs_dali
def test_a_consumer_that_stops_early_leaves_no_batch_behind(jpegs):
    from eb_jax.data import dali

    first = next(dali.train_batches(jpegs, 32, seed=0, epoch=0))
    early = dali.train_batches(jpegs, 32, seed=0, epoch=1)
    next(early)
    early.close()  # its next batch was already scheduled
    again = next(dali.train_batches(jpegs, 32, seed=0, epoch=0))
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(again["image"]))


@needs_dali
@pytest.mark.slow
def test_the_trainer_trains_on_dali_batches(jpegs, data_dir, tmp_path, monkeypatch):
    from eb_jax import pipeline
    from eb_jax.data import dali

    monkeypatch.setattr(dali, "check_backend", lambda spec: None)  # CPU operators here
    decoded = []

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            decoded.append(isinstance(batch["image"], jax.Array))
            yield batch

    real = dali.train_batches
    monkeypatch.setattr(dali, "train_batches", counting)
    config = tiny_config(
        data_dir,
        dataset="imagenet_like",
        model="resnet_tiny",
        method="dense",
        input_backend=names.DALI,
        batch_size=64,
        eval_batch_size=32,
        num_epochs=1,
        lr_boundaries=(),
    )
    report = pipeline.run(config, str(tmp_path / "run"))
    assert decoded == [True] * (len(jpegs.train) // 64)
    assert 0 <= report["test_accuracy"] <= 1
