"""ImageNet-like JPEGs, made here: the ImageNet input path run and measured offline.

Pictures with a photograph's 1/f spectrum (correlated colour noise) and hard-edged
shapes, at sizes spread like ImageNet's (mostly 500x375, from 250x200 to 1200x800),
saved as quality-90 JPEGs of ~115 KB at 500x375 (ImageNet's average is ~110 KB). Stored
as a TFDS array_record dataset with ImageNet's features (a JPEG image and one of 1000
labels), so it is read exactly as `imagenet2012` is. Written on first use (no
TensorFlow needed: the JPEG bytes are stored as they are).
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "imagenet_like"
# (width, height): ImageNet's typical landscape size most often, portraits, small and large.
SIZES = ((500, 375),) * 6 + (
    (500, 333),
    (500, 333),
    (375, 500),
    (333, 500),
    (250, 200),
    (320, 240),
    (640, 480),
    (800, 600),
    (1024, 768),
    (1200, 800),
)
TRAIN_EXAMPLES, EVAL_EXAMPLES = 256, 64
DISTINCT = 32  # pictures made; the examples cycle through them


def photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (height, width, 3) picture with a photograph's spectrum and some edges."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    freq = np.hypot(fx, fy)
    freq[0, 0] = 1.0
    shape = freq.shape

    def noise():
        return rng.normal(size=shape) + 1j * rng.normal(size=shape)

    shared = noise()
    channels = [
        np.fft.irfft2((0.8 * shared + 0.4 * noise()) / freq, s=(height, width)) for _ in "rgb"
    ]
    image = np.stack(channels, -1)
    image = (image - image.mean()) / image.std() * 50 + 120
    rows, cols = np.ogrid[:height, :width]
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        radius = rng.integers(10, max(11, min(width, height) // 4))
        image[(cols - x) ** 2 + (rows - y) ** 2 < radius**2] += rng.uniform(-60, 60, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpegs(count: int = DISTINCT, seed: int = 0) -> list[bytes]:
    """`count` pictures as JPEG bytes, cycling through SIZES."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(photo(*SIZES[i % len(SIZES)], rng)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class ImagenetLike(tfds.core.GeneratorBasedBuilder):
    """ImageNet-like JPEGs with labels i % 1000; train and validation splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=1000),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        pictures = jpegs()
        return {
            "train": self._generate_examples(pictures, 0, TRAIN_EXAMPLES),
            "validation": self._generate_examples(pictures, TRAIN_EXAMPLES, EVAL_EXAMPLES),
        }

    def _generate_examples(self, pictures, first: int, count: int):
        for i in range(first, first + count):
            yield i, {"image": pictures[i % len(pictures)], "label": i % 1000}


def prepare(data_dir: str | None) -> None:
    """Writes the dataset to `data_dir` unless it is there already."""
    builder = ImagenetLike(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
