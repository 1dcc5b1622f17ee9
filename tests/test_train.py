"""Train step: PyTorch SGD semantics, the sparsity term, the LR schedule, pmap = one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eb_jax import parallel, train_steps
from eb_jax.config import default_config
from eb_jax.models import create_model


class NoBatchNorm(nn.Module):
    """A BN-free conv net: its pmap step must equal its single-device step."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _config(**overrides):
    config = default_config()
    config.update(overrides)
    return config


def _batch(n=8, shape=(8, 8, 1), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def test_lr_schedule_steps_down_at_boundary_epochs():
    schedule = train_steps.lr_schedule(0.1, (2, 3), 0.1, steps_per_epoch=5)
    lrs = [float(schedule(step)) for step in range(20)]
    np.testing.assert_allclose(lrs[:10], 0.1)
    np.testing.assert_allclose(lrs[10:15], 0.01)
    np.testing.assert_allclose(lrs[15:], 0.001)


def test_optimizer_matches_pytorch_sgd():
    """PyTorch: g += s*sign(scale) (BN only); g += wd*p; buf = m*buf + g; p -= lr*buf."""
    lr, wd, m, s = 0.1, 1e-2, 0.9, 1e-3
    config = _config(learning_rate=lr, lr_boundaries=(), weight_decay=wd, momentum=m, sparsity=s)
    tx = train_steps.create_optimizer(config, steps_per_epoch=1)
    params = {"bn": {"scale": jnp.array([0.5, -0.2, 0.0]), "bias": jnp.array([0.1, 0.2, 0.3])}}
    opt_state = tx.init(params)
    expected = jax.tree.map(np.asarray, params)
    buf = jax.tree.map(np.zeros_like, expected)
    for k in range(3):
        grads = jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.3 * (k + 1)), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        for name in ("scale", "bias"):
            p, g = expected["bn"][name], np.full(3, 0.3 * (k + 1), np.float32)
            if name == "scale":
                g = g + s * np.sign(p)
            g = g + wd * p
            buf["bn"][name] = m * buf["bn"][name] + g
            expected["bn"][name] = p - lr * buf["bn"][name]
        for name in ("scale", "bias"):
            np.testing.assert_allclose(params["bn"][name], expected["bn"][name], rtol=1e-6)


def test_sparsity_changes_only_bn_scale_updates():
    model = create_model("vgg_tiny", 10)
    batch = _batch()
    states = {}
    for s in (0.0, 1e-2):
        tx = train_steps.create_optimizer(_config(sparsity=s), steps_per_epoch=10)
        state = train_steps.create_train_state(model, jax.random.key(0), (8, 8, 1), tx)
        states[s], _ = jax.jit(train_steps.train_step)(state, batch)
    flat0 = dict(jax.tree_util.tree_leaves_with_path(states[0.0].params))
    flat1 = dict(jax.tree_util.tree_leaves_with_path(states[1e-2].params))
    n_scales = 0
    for path, before in flat0.items():
        diff = np.asarray(flat1[path]) - np.asarray(before)
        if path[-1].key == "scale":  # first step: delta = -lr * s * sign(scale) = -0.1*0.01
            n_scales += 1
            np.testing.assert_allclose(diff, -0.1 * 1e-2, rtol=1e-4)
        else:
            np.testing.assert_array_equal(diff, 0.0)
    assert n_scales == 3


def _one_step(model, batch, shape, devices: int):
    tx = train_steps.create_optimizer(_config(), steps_per_epoch=10)
    state = train_steps.create_train_state(model, jax.random.key(0), shape, tx)
    if devices == 1:
        state, metrics = jax.jit(train_steps.train_step)(state, batch)
        return state, metrics
    step = parallel.pmap_step(train_steps.train_step)
    state, metrics = step(parallel.replicate(state), parallel.shard(batch, devices))
    jax.block_until_ready(metrics)
    return parallel.unreplicate(state), parallel.unreplicate(metrics)


def test_two_device_pmap_step_equals_one_device_step_without_batchnorm():
    assert jax.local_device_count() == 2
    batch = _batch(n=8)
    one, m1 = _one_step(NoBatchNorm(), batch, (8, 8, 1), 1)
    two, m2 = _one_step(NoBatchNorm(), batch, (8, 8, 1), 2)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(m2["count"]) == 8 and int(m1["correct"]) == int(m2["correct"])
    np.testing.assert_allclose(m1["loss_sum"], m2["loss_sum"], rtol=1e-6)


def test_two_device_pmap_step_agrees_with_one_device_step_with_batchnorm():
    """Per-device BN statistics differ from whole-batch ones, so only to tolerance."""
    model = create_model("vgg_tiny", 10)
    batch = _batch(n=16)
    one, _ = _one_step(model, batch, (8, 8, 1), 1)
    two, _ = _one_step(model, batch, (8, 8, 1), 2)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=5e-3)


def test_eval_step_ignores_padding():
    model = create_model("vgg_tiny", 10)
    tx = train_steps.create_optimizer(_config(), 10)
    state = train_steps.create_train_state(model, jax.random.key(0), (8, 8, 1), tx)
    batch = _batch(n=6)
    full = train_steps.eval_step(state, {k: v[:4] for k, v in batch.items()})
    batch["mask"] = np.arange(6) < 4
    padded = train_steps.eval_step(state, batch)
    assert int(padded["count"]) == 4 and int(padded["correct"]) == int(full["correct"])
    np.testing.assert_allclose(padded["loss_sum"], full["loss_sum"], rtol=1e-6)


def test_eval_step_counts_top5_with_five_classes_or_more():
    logits = np.array([[9, 8, 7, 6, 5, 0], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]], np.float32)
    labels = np.array([4, 0, 5], np.int32)  # 5th best: in; worst: out; worst: out

    def apply_fn(variables, images, train):
        return images

    state = train_steps.TrainState(
        step=0, apply_fn=apply_fn, params={}, tx=None, opt_state=None, batch_stats={}
    )
    metrics = train_steps.eval_step(state, {"image": logits, "label": labels})
    assert int(metrics["correct5"]) == 1 and int(metrics["correct"]) == 0
    few = train_steps.eval_step(state, {"image": logits[:, :4], "label": labels % 4})
    assert "correct5" not in few


def test_sync_batch_stats_averages_devices():
    stats = {"bn": {"mean": np.stack([np.zeros(3), np.full(3, 2.0)]).astype(np.float32)}}
    state = train_steps.TrainState(
        step=0, apply_fn=None, params={}, tx=None, opt_state=None, batch_stats=stats
    )
    synced = parallel.sync_batch_stats(state)
    np.testing.assert_allclose(np.asarray(synced.batch_stats["bn"]["mean"]), 1.0)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batch_size", 63, "batch_size=63 must be a positive multiple of the 2 devices"),
        ("eval_batch_size", 0, "eval_batch_size=0 must be a positive multiple"),
        ("lr_boundaries", (5, 2), "must be ascending"),
        ("num_epochs", 0, "num_epochs=0 must be positive"),
        ("num_data_workers", -2, "num_data_workers must be -1 .one per core., 0 .none. or a"),
        ("num_data_threads", 0, "and num_data_threads >= 1"),
    ],
)
def test_invalid_config_values_are_rejected(field, value, message):
    from eb_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(_config(**{field: value}), num_devices=2)
