"""ImageNet's input path: torchvision's augmentation from the JPEG header, DCT-scaled
decoding, eval geometry, uint8 batches from a real array_record dataset, workers."""

import io
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from eb_jax.data import DATASETS, eval_batches, imagenet_like, open_dataset, train_batches
from eb_jax.data.input_pipeline import (
    _eval_transform,
    _open,
    _train_transform,
    center_crop_box,
    crop_resize,
    random_resized_crop_box,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = DATASETS["imagenet2012"]


def torchvision_box(width, height, rng: random.Random):
    """torchvision.transforms.RandomResizedCrop.get_params(scale=(0.08, 1),
    ratio=(3/4, 4/3)), transcribed; as (left, top, right, bottom)."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(0.08, 1.0)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return j, i, j + w, i + h
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    i, j = (height - h) // 2, (width - w) // 2
    return j, i, j + w, i + h


def _box_statistics(boxes, width, height):
    boxes = np.asarray(boxes, float)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    slack_x, slack_y = width - w, height - h
    return {
        "area": w * h / (width * height),
        "log_ratio": np.log(w / h),
        "x": np.where(slack_x > 0, boxes[:, 0] / np.maximum(slack_x, 1), 0.5),
        "y": np.where(slack_y > 0, boxes[:, 1] / np.maximum(slack_y, 1), 0.5),
    }


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (1000, 150), (60, 400)])
def test_crop_boxes_follow_torchvisions_distribution(width, height):
    n = 20_000
    ours_rng, theirs_rng = np.random.default_rng(0), random.Random(0)
    ours = [random_resized_crop_box(width, height, ours_rng) for _ in range(n)]
    theirs = [torchvision_box(width, height, theirs_rng) for _ in range(n)]
    for box in ours:
        left, top, right, bottom = box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert all(isinstance(v, int) for v in box)
    ours_stats, theirs_stats = (_box_statistics(b, width, height) for b in (ours, theirs))
    for name in ours_stats:  # same distributions: two-sample KS, fixed seeds
        result = stats.ks_2samp(ours_stats[name], theirs_stats[name])
        assert result.pvalue > 1e-3, (name, result)
    # The fallback (central crop, ratio clamped) is as frequent as torchvision's.
    full_height = [b[3] - b[1] == height and b[1] == 0 for b in ours]
    full_height_theirs = [b[3] - b[1] == height and b[1] == 0 for b in theirs]
    assert abs(np.mean(full_height) - np.mean(full_height_theirs)) < 0.01


def test_extreme_images_fall_back_to_torchvisions_central_crop():
    # No 8-100 % box with ratio 3/4-4/3 fits a 1000x20 strip: every draw falls back.
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(1000, 20, rng) == torchvision_box(1000, 20, random.Random(0))
    assert random_resized_crop_box(1000, 20, rng) == (486, 0, 513, 20)  # 27 = round(20 * 4/3)
    assert random_resized_crop_box(20, 1000, rng) == (0, 486, 20, 513)


def _jpeg(width, height, seed=0) -> bytes:
    buffer = io.BytesIO()
    picture = imagenet_like.photo(width, height, np.random.default_rng(seed))
    Image.fromarray(picture).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_train_transform_is_crop_resize_of_the_drawn_box_then_a_fair_flip():
    jpeg = _jpeg(500, 375)
    transform = _train_transform(IMAGENET)
    flips = 0
    for seed in range(40):
        out = transform({"image": jpeg, "label": 7}, np.random.default_rng(seed))
        assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.uint8
        assert out["label"] == 7
        rng = np.random.default_rng(seed)  # the same draws, by hand
        box = random_resized_crop_box(500, 375, rng)
        expected = crop_resize(_open(jpeg), box, 224)
        if rng.random() < 0.5:
            expected, flips = expected[:, ::-1], flips + 1
        np.testing.assert_array_equal(out["image"], expected)
    assert 10 < flips < 30


def test_dct_scaled_decoding_stays_close_to_the_full_decode():
    jpeg = _jpeg(1024, 768, seed=1)
    full = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    for box in [(0, 0, 1024, 768), (100, 50, 1000, 700), (10, 10, 500, 500), (300, 300, 500, 500)]:
        scaled = crop_resize(_open(jpeg), box, 224).astype(int)  # 1/4, 1/2, 1/2, 1 scale
        reference = crop_resize(_open(full), box, 224).astype(int)
        assert np.abs(scaled - reference).mean() < 5, box


def test_eval_keeps_torchvisions_resize_256_centre_crop_224():
    assert center_crop_box(500, 375, 256, 224) == pytest.approx(
        (58 * 500 / 341, 16 * 375 / 256, 282 * 500 / 341, 240 * 375 / 256)
    )
    for width, height in [(500, 375), (333, 500), (256, 256), (1200, 800)]:
        picture = imagenet_like.photo(width, height, np.random.default_rng(width))
        # torchvision: shorter side to 256 (longer truncated), then the central 224.
        if width <= height:
            size = (256, int(256 * height / width))
        else:
            size = (int(256 * width / height), 256)
        resized = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
        top, left = round((size[1] - 224) / 2), round((size[0] - 224) / 2)
        reference = resized[top : top + 224, left : left + 224].astype(int)
        ours = _eval_transform(IMAGENET)({"image": picture, "label": 0})["image"]
        assert np.abs(ours.astype(int) - reference).max() <= 1, (width, height)


@pytest.fixture(scope="module")
def jpegs_dir(data_dir):
    """The session's data_dir: the CLI's ImageNet test reads the same JPEGs, written once."""
    return data_dir


@pytest.fixture(scope="module")
def jpegs_dataset(jpegs_dir):
    return open_dataset("imagenet_like", jpegs_dir)


def test_imagenet_like_is_read_encoded_and_batched_as_uint8(jpegs_dataset):
    data = jpegs_dataset
    example = data.train[0]
    assert isinstance(example["image"], bytes) and Image.open(io.BytesIO(example["image"]))
    assert (len(data.train), len(data.eval), data.num_classes) == (256, 64, 1000)
    train = next(train_batches(data, 16, seed=0, epoch=0))
    evals = list(eval_batches(data, 48))
    for batch in [train, *evals]:
        assert batch["image"].shape == (len(batch["label"]), 224, 224, 3)
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    assert sum(int(b["mask"].sum()) for b in evals) == 64


# In a process of its own: shared memory left behind is reported when that process exits.
WORKER_CHECK = """
from absl import flags
flags.FLAGS.mark_as_parsed()
if __name__ == "__main__":
    import numpy as np
    from eb_jax.data import eval_batches, open_dataset, train_batches
    data = open_dataset("imagenet_like", {data_dir!r})

    def same(batches, others):
        assert len(batches) == len(others)
        for a, b in zip(batches, others, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])

    full = list(train_batches(data, 32, 0, 1))  # threads
    same(list(train_batches(data, 32, 0, 1, start_step=3)), full[3:])  # resumed mid-epoch
    same(list(train_batches(data, 32, 0, 1, start_step=3, num_workers=2)), full[3:])
    same(list(eval_batches(data, 32, num_workers=2)), list(eval_batches(data, 32)))
    early = train_batches(data, 32, 0, 1, num_workers=2)
    next(early)
    early.close()  # a consumer that stops early
    print("checked", len(full), "train batches")
"""


@pytest.mark.slow
def test_workers_give_the_threads_batches_and_leave_no_shared_memory(jpegs_dir, tmp_path):
    """Worker processes (2, resumed mid-epoch) make the threads' train and eval batches;
    no shared-memory block outlives the process, even when a consumer stops early."""
    script = tmp_path / "worker_check.py"
    script.write_text(WORKER_CHECK.format(data_dir=jpegs_dir))
    env = {**os.environ, "PYTHONPATH": ROOT}  # the suite runs without installing eb_jax
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checked 8 train batches" in result.stdout
    assert "leaked shared_memory" not in result.stderr
    assert "Exception ignored" not in result.stderr
