"""Input pipelines: TFDS data sources read through grain, no TensorFlow."""

from eb_jax.data.input_pipeline import (
    DATASETS,
    DataError,
    Dataset,
    eval_batches,
    model_input,
    normalizing,
    open_dataset,
    train_batches,
)

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "eval_batches",
    "model_input",
    "normalizing",
    "open_dataset",
    "train_batches",
]
