"""Data parallelism with `pmap` over the local devices of every process, kept in one place.

Steps are written per device with an `axis_name`; a move to `jax.shard_map` changes only
this module.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils

AXIS = "batch"


def initialize_distributed(distributed) -> None:
    """Joins this process to a multi-process run (config.distributed), before JAX's
    backend starts; a single-process config does nothing."""
    if distributed.coordinator_address:
        n, i = distributed.num_processes, distributed.process_id
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"distributed.process_id={i} must be in [0, num_processes={n})")
        jax.distributed.initialize(distributed.coordinator_address, n, i)
    elif distributed.auto:
        jax.distributed.initialize()


def check_same_on_all_processes(array, what: str) -> None:
    """Fails loudly if `array` (host numpy) differs between the run's processes."""
    if jax.process_count() > 1:
        multihost_utils.assert_equal(array, f"the processes disagree on {what}")


def check_replicas_same_on_all_processes(replicated, what: str) -> None:
    """`check_same_on_all_processes` for a replicated pytree, through a digest of this
    process's first copy (read from the devices only in a multi-process run)."""
    if jax.process_count() > 1:
        data = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(unreplicate(replicated)))
        digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
        check_same_on_all_processes(digest, what)


def gather_over_processes(array: np.ndarray) -> np.ndarray:
    """Every process's `array` (of 4- or 8-byte values), stacked [process, ...]; every
    process must call it. 8-byte values travel as pairs of int32 words, exact (JAX
    without x64 would round float64 to float32)."""
    array = np.ascontiguousarray(array)
    if jax.process_count() == 1:
        return array[None]
    words = np.asarray(multihost_utils.process_allgather(array.reshape(-1).view(np.int32)))
    return words.view(array.dtype).reshape(-1, *array.shape)


def process_zero_says(flag: bool) -> bool:
    """Process 0's `flag` on every process (a decision taken from its filesystem view)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def pmap_step(step_fn, donate_state: bool = True):
    """`step_fn(state, batch, axis_name)` mapped over local devices."""
    return jax.pmap(
        functools.partial(step_fn, axis_name=AXIS),
        axis_name=AXIS,
        donate_argnums=(0,) if donate_state else (),
    )


def _device_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    return jax.NamedSharding(mesh, jax.P(AXIS))


def replicate(tree):
    """One copy of every leaf per local device, stacked on a leading axis."""
    n, sharding = jax.local_device_count(), _device_sharding()
    return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * n), sharding), tree)


def unreplicate(tree):
    """The first device's copy, on the host: copied from that device's shard (indexing
    `x[0]` would compile and run a gather per leaf shape)."""
    return jax.tree.map(_first_copy, tree)


def _first_copy(x):
    if not isinstance(x, jax.Array):
        return np.asarray(x)[0]
    first = min(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.array(first.data)[0]  # a copy: the state's buffers are donated to the step


def device_copies(tree):
    """Every device's copy of a replicated pytree, over all processes, on the host:
    [devices, ...] in process order, the same on every process."""
    local = jax.device_get(tree)
    if jax.process_count() == 1:
        return local
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), local)


def own_copies(copies):
    """The inverse of `device_copies`: each local device gets its own row back."""
    n, sharding = jax.local_device_count(), _device_sharding()
    first = jax.process_index() * n
    rows = slice(first, first + n)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x)[rows], sharding), copies)


def shard(batch, num_devices: int | None = None):
    """Splits the leading (batch) axis of every array into [devices, per_device, ...]:
    a host array on the host, a jax.Array already split over the devices in order
    (data.dali's images) where it is."""
    n = num_devices or jax.local_device_count()

    def split(x):
        shape = (n, -1, *x.shape[1:])
        return x.reshape(shape) if isinstance(x, jax.Array) else np.reshape(x, shape)

    return jax.tree.map(split, batch)


@functools.cache
def _pmean_tree():
    return jax.pmap(lambda t: jax.lax.pmean(t, AXIS), axis_name=AXIS)


def sync_batch_stats(state):
    """Averages the per-device BatchNorm statistics (done before eval and saving)."""
    if not jax.tree.leaves(state.batch_stats):
        return state
    return state.replace(batch_stats=_pmean_tree()(state.batch_stats))


def must_wait_each_step() -> bool:
    """Forced CPU devices can deadlock in collectives with several steps in flight."""
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1
