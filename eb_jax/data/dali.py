"""ImageNet's JPEGs decoded on NVIDIA GPUs by DALI (`--config.input_backend=dali`).

A host's cores decode ~290 ImageNet JPEGs/s each with Pillow, far from what one GPU's
ResNet-50 step takes. Here grain still reads the records (JPEG bytes and labels, in the
Pillow path's per-epoch order, by `num_data_threads` threads) and draws each image's
augmentation on the host from the JPEG header's size — torchvision's random-resized-crop
box and a fair flip, the very draws of the Pillow path (input_pipeline.py), from the same
per-example generators, so a resumed run replays them. One DALI pipeline per local GPU
then decodes its share of every batch with nvJPEG (the GPU's hardware JPEG decoder where
it has one): only the crop box (`decoders.image_slice`), resized to 224 x 224 (linear,
antialiased, as Pillow's bilinear), mirrored where drawn. Eval: the whole image decoded,
the region torchvision's Resize(256) + CenterCrop(224) keeps resized to 224 in one pass
(`center_crop_box`, as the Pillow path). Images stay uint8: the step normalises them
(`NormalizingApply`), as it does the Pillow path's.

A batch is {'image': a jax.Array of this process's batch, its examples split over the
local devices in order (device i holds the i-th block, what `parallel.shard` makes of a
host batch), 'label': int32 numpy} (+ 'mask' in eval). The next batch is decoded while
the current one trains. On a CPU backend the same pipelines run on DALI's CPU operators
(the tests: DALI's wheel installs without a GPU; `config.validate` refuses 'dali' there).
DALI's GPU buffers live beside JAX's, which takes 75 % of each GPU's memory by default
(XLA_PYTHON_CLIENT_MEM_FRACTION lowers it if DALI runs out).
"""

from __future__ import annotations

import functools

import grain
import jax
import numpy as np

from eb_jax.data.input_pipeline import (
    DataError,
    Dataset,
    DatasetSpec,
    Subset,
    center_crop_box,
    epoch_indices,
    eval_steps,
    random_resized_crop_box,
)
from eb_jax.data.input_pipeline import _open as open_image

WHEEL = "nvidia-dali-cuda120"  # CUDA 12, as jax[cuda12]; requirements-gpu.txt
EVAL_RESIZE = 256
AXIS = "batch"  # parallel.AXIS: the local devices' mesh axis


def check_backend(spec: DatasetSpec, backend: str | None = None) -> None:
    """Raises DataError (one line, with the fix) where DALI cannot feed this run."""
    if spec.augment != "imagenet":
        raise DataError(
            f"input_backend='dali' decodes JPEG datasets (imagenet2012, imagenet_like); "
            f"{spec.tfds_name} is not one: use input_backend='grain'"
        )
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DataError(
            f"input_backend='dali' needs NVIDIA DALI: pip install -r requirements-gpu.txt "
            f"({WHEEL}), or use input_backend='grain'"
        ) from None
    backend = backend or jax.default_backend()
    if backend != "gpu":
        raise DataError(
            f"input_backend='dali' decodes on NVIDIA GPUs and JAX runs on {backend}: "
            "use input_backend='grain'"
        )


def _train_record(example, rng: np.random.Generator) -> dict:
    """An example's JPEG bytes and its augmentation, drawn as `_train_transform` draws it."""
    jpeg = example["image"]
    left, top, right, bottom = random_resized_crop_box(*open_image(jpeg).size, rng)
    flip = rng.random() < 0.5
    return {
        "jpegs": np.frombuffer(jpeg, np.uint8),
        "anchor": np.array([left, top], np.int32),  # (x, y)
        "shape": np.array([right - left, bottom - top], np.int32),  # (w, h)
        "flip": np.int32(flip),
        "label": np.int32(example["label"]),
    }


def _eval_record(spec: DatasetSpec):
    """An example's JPEG bytes and the region the eval resize keeps, (y, x) as DALI's."""

    def record(example) -> dict:
        jpeg = example["image"]
        box = center_crop_box(*open_image(jpeg).size, EVAL_RESIZE, spec.image_shape[0])
        left, top, right, bottom = box
        return {
            "jpegs": np.frombuffer(jpeg, np.uint8),
            "roi_start": np.array([top, left], np.float32),
            "roi_end": np.array([bottom, right], np.float32),
            "label": np.int32(example["label"]),
        }

    return record


def _collate(records: list[dict]) -> dict:
    return {key: [r[key] for r in records] for key in records[0]}


@functools.cache
def _pipeline(train: bool, batch: int, size: int, device_id: int | None, slot: int, threads: int):
    """A built DALI pipeline of `batch` images (one per device and kind; `slot` tells
    apart the CPU pipelines of forced host devices). `device_id` None: CPU operators."""
    del slot
    from nvidia.dali import fn, pipeline_def, types

    decode = "cpu" if device_id is None else "mixed"
    linear = {"interp_type": types.INTERP_LINEAR, "antialias": True}
    decoder = {"device": decode, "output_type": types.RGB, "adjust_orientation": False}

    # One batch decoded ahead of the consumer (the feed loop schedules the next one).
    @pipeline_def(
        batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1
    )
    def pipe():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
        if train:
            anchor = fn.external_source(name="anchor", dtype=types.INT32)
            shape = fn.external_source(name="shape", dtype=types.INT32)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            box = {"normalized_anchor": False, "normalized_shape": False, "axis_names": "WH"}
            images = fn.decoders.image_slice(jpegs, anchor, shape, **decoder, **box)
            images = fn.resize(images, resize_x=size, resize_y=size, **linear)
            return fn.flip(images, horizontal=flip)
        start = fn.external_source(name="roi_start", dtype=types.FLOAT)
        end = fn.external_source(name="roi_end", dtype=types.FLOAT)
        images = fn.decoders.image(jpegs, **decoder)
        return fn.resize(
            images, resize_x=size, resize_y=size, roi_start=start, roi_end=end, **linear
        )

    pipeline = pipe()
    pipeline.build()
    return pipeline


class Decoder:
    """One DALI pipeline per local device for one kind of batch (train or eval)."""

    INPUTS = {True: ("jpegs", "anchor", "shape", "flip"), False: ("jpegs", "roi_start", "roi_end")}

    def __init__(self, train: bool, local_batch: int, size: int, threads: int, device_ids=None):
        """`device_ids`: the CUDA ordinals of the local devices; None: CPU operators."""
        self.devices, self.train, self.size = jax.local_devices(), train, size
        n = len(self.devices)
        if local_batch % n:
            raise DataError(f"a batch of {local_batch} does not split over {n} devices")
        self.per_device = local_batch // n
        ids = device_ids or [None] * n
        self.pipelines = [
            _pipeline(train, self.per_device, size, ids[i], i, threads) for i in range(n)
        ]
        mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
        self.sharding = jax.NamedSharding(mesh, jax.P(AXIS))

    def _feed(self, records: dict) -> None:
        for i, pipeline in enumerate(self.pipelines):
            part = slice(i * self.per_device, (i + 1) * self.per_device)
            for name in self.INPUTS[self.train]:
                pipeline.feed_input(name, records[name][part])
            pipeline.schedule_run()

    def _images(self) -> jax.Array:
        shards = []
        for pipeline, device in zip(self.pipelines, self.devices, strict=True):
            (out,) = pipeline.outputs()
            shards.append(_on_device(out, device))
        shape = (self.per_device * len(shards), self.size, self.size, 3)
        return jax.make_array_from_single_device_arrays(shape, self.sharding, shards)

    def decode(self, record_batches):
        """(images on the devices, the batch's records) for each collated record batch;
        the next batch is fed before the current one is handed out."""
        batches = iter(record_batches)
        current, scheduled = next(batches, None), False
        try:
            if current is not None:
                self._feed(current)
                scheduled = True
            while current is not None:
                images, scheduled = self._images(), False
                following = next(batches, None)
                if following is not None:
                    self._feed(following)
                    scheduled = True
                yield images, current
                current = following
        finally:  # a consumer that stops early leaves no batch in the pipelines
            if scheduled:
                for pipeline in self.pipelines:
                    pipeline.outputs()


def _on_device(output, device) -> jax.Array:
    """A DALI output batch as a jax.Array on `device`: a GPU batch through DLPack (copied:
    DALI reuses its buffers), a CPU one through the host."""
    if type(output).__name__ == "TensorListGPU":
        return jax.dlpack.from_dlpack(output.as_tensor()).copy()
    return jax.device_put(np.asarray(output.as_array()), device)


def _device_ids() -> list[int] | None:
    """The CUDA ordinals of this process's devices (None on CPU: DALI's CPU operators)."""
    devices = jax.local_devices()
    if devices[0].platform != "gpu":
        return None
    return [d.local_hardware_id for d in devices]


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
    """`input_pipeline.train_batches`'s batches (same examples, crops and flips), decoded
    by DALI; `num_workers` is unused (nothing is decoded on the host)."""
    del num_workers
    mine, epoch_seed = epoch_indices(data, batch_size, seed, epoch, process_index, process_count)
    local_batch, n_steps = mine.shape[1], mine.shape[0]
    ds = grain.MapDataset.source(Subset(data.train, mine.reshape(-1)))
    ds = ds.random_map(_train_record, seed=epoch_seed)
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)[start_step:n_steps]
    decoder = Decoder(True, local_batch, data.spec.image_shape[0], num_threads, _device_ids())
    for images, records in decoder.decode(_read(ds, num_threads)):
        yield {"image": images, "label": np.asarray(records["label"], np.int32)}


def eval_batches(
    data: Dataset,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    num_workers: int = 0,
):
    """`input_pipeline.eval_batches`'s batches decoded by DALI: every eval example once,
    the last batch padded (with copies of its first example, mask=False)."""
    del num_workers
    local_batch = batch_size // process_count
    n_steps = eval_steps(data, local_batch, process_count)
    ds = grain.MapDataset.source(data.eval)[process_index::process_count]
    ds = ds.map(_eval_record(data.spec)).batch(local_batch, batch_fn=_collate)
    decoder = Decoder(False, local_batch, data.spec.image_shape[0], num_threads, _device_ids())
    padded = (_pad(records, local_batch) for records in _read(ds, num_threads))
    done = 0
    for images, records in decoder.decode(padded):
        yield {"image": images, "label": records["label"], "mask": records["mask"]}
        done += 1
    for _ in range(done, n_steps):  # this process has run out of examples
        yield {
            "image": np.zeros((local_batch, *data.spec.image_shape), np.uint8),
            "label": np.zeros((local_batch,), np.int32),
            "mask": np.zeros((local_batch,), bool),
        }


def _read(ds: grain.MapDataset, num_threads: int):
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(ds.to_iter_dataset(options))


def _pad(records: dict, size: int) -> dict:
    n = len(records["label"])
    padded = {key: values + [values[0]] * (size - n) for key, values in records.items()}
    padded["label"] = np.asarray(padded["label"], np.int32)
    padded["mask"] = np.arange(size) < n
    return padded
