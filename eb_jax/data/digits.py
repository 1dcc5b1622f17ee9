"""scikit-learn's handwritten digits (1 797 real 8x8 images) as a TFDS dataset.

The quickstart's data: it ships inside scikit-learn, so it needs no download. Written to
array_record on first use (no TensorFlow needed) and read like every other dataset.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
TEST_EVERY = 5  # example i goes to the test split iff i % 5 == 0: 360 test, 1 437 train


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """8x8 grey digits scaled from 0..16 to 0..255, deterministic 80/20 split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # A raw tensor, not tfds.features.Image: PNG encoding needs TensorFlow.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(False), "test": self._generate_examples(True)}

    def _generate_examples(self, test: bool):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
            if (i % TEST_EVERY == 0) == test:
                yield i, {"image": image, "label": int(label)}


def prepare(data_dir: str | None) -> None:
    """Writes the dataset to `data_dir` unless it is there already."""
    builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
