"""Pruning criteria on tiny layers: ThiNet's greedy choice and rescaling, SNIP and
magnitude weight masks (exact counts, ties, zeros held through training), SFP's filters."""

import itertools

import jax
import numpy as np
import pytest
from conftest import trained_like
from hypothesis import given, settings
from hypothesis import strategies as st

from eb_jax import parallel, train_steps
from eb_jax.config import default_config
from eb_jax.prune import sfp, thinet, weights
from eb_jax.ticket.groups import interior_groups, producer
from eb_jax.ticket.surgery import apply_cut, plan_cut


def _model(name="vgg_tiny", shape=(8, 8, 1), seed=0):
    return trained_like(name, shape, seed)


def _images(shape, n=6, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# --- ThiNet ---


def _orthogonal_columns(norms, samples=20, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((samples, len(norms))))
    return q * np.asarray(norms)


def _exhaustive(x, count):
    cost = {
        t: np.sum(x[:, list(t)].sum(axis=1) ** 2)
        for t in itertools.combinations(range(x.shape[1]), count)
    }
    return set(min(cost, key=cost.get))


def test_thinet_greedy_equals_exhaustive_search_where_greedy_is_optimal():
    # Orthogonal contributions: a removed set's error is the sum of its channels' squared
    # norms, so taking the smallest one at a time is optimal.
    x = _orthogonal_columns([3.0, 0.5, 2.0, 0.1, 1.5, 0.7, 4.0, 1.0])
    for count in range(1, 6):
        assert set(thinet.greedy_removal(x, count)) == _exhaustive(x, count)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 9), st.data())
def test_thinet_greedy_removes_count_distinct_channels_each_step_best(channels, data):
    count = data.draw(st.integers(0, channels - 1))
    seed = data.draw(st.integers(0, 100))
    x = np.random.default_rng(seed).standard_normal((15, channels))
    removed = thinet.greedy_removal(x, count)
    assert len(set(removed.tolist())) == count == len(removed)
    total = np.zeros(15)
    for i, c in enumerate(removed):  # each choice was the best given the ones before
        rest = [d for d in range(channels) if d not in removed[:i]]
        costs = [np.sum((total + x[:, d]) ** 2) for d in rest]
        assert np.sum((total + x[:, c]) ** 2) <= min(costs) + 1e-12
        total += x[:, c]


def test_thinet_rescaling_lowers_the_reconstruction_error():
    x = np.random.default_rng(0).standard_normal((50, 8)) + 0.3
    kept = np.array([0, 2, 3, 6])
    y = x.sum(axis=1)
    plain = np.sum((y - x[:, kept].sum(axis=1)) ** 2)
    scales = thinet.rescale(x, kept)
    assert np.sum((y - x[:, kept] @ scales) ** 2) < plain


@pytest.mark.parametrize("name, shape", [("vgg_tiny", (8, 8, 1)), ("preresnet_tiny", (8, 8, 3))])
def test_thinet_prunes_each_read_layer_uniformly_and_the_cut_changes_nothing(name, shape):
    model, variables = _model(name, shape)
    masks, rescaled = thinet.thinet_prune(model, variables, _images(shape), 0.5, 4, seed=0)
    pruned = {g.bns[0] for g in interior_groups(model) if thinet.consumer_conv(g)}
    for path, mask in zip(model.bn_paths(), masks, strict=True):
        width = mask.size
        expected = width - int(width * 0.5) if path[-1] in pruned else width
        assert mask.sum() == expected, path
    # The removed channels' slices of the reading convs are zero: cutting them is exact.
    narrow, cut = apply_cut(model, rescaled, plan_cut(model, rescaled["params"], masks))
    images = _images(shape, seed=2)
    np.testing.assert_allclose(
        narrow.apply(cut, images), model.apply(rescaled, images), rtol=1e-5, atol=1e-5
    )


def test_thinet_is_deterministic_for_a_seed():
    model, variables = _model()
    a = thinet.thinet_prune(model, variables, _images((8, 8, 1)), 0.5, 3, seed=7)
    b = thinet.thinet_prune(model, variables, _images((8, 8, 1)), 0.5, 3, seed=7)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --- Weight masks: SNIP and magnitude ---


def _kernel_values(tree):
    return np.concatenate(
        [np.ravel(x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if p[-1].key == "kernel"]
    )


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.99), st.integers(0, 1000))
def test_global_top_mask_keeps_exactly_the_stated_count(ratio, seed):
    rng = np.random.default_rng(seed)
    scores = {
        "conv0": {"kernel": rng.integers(0, 4, (3, 3, 1, 4)).astype(float)},  # many ties
        "bn0": {"scale": rng.random(4)},
        "fc": {"kernel": rng.integers(0, 4, (4, 5)).astype(float), "bias": rng.random(5)},
    }
    mask = weights.global_top_mask(scores, ratio)
    total = 36 + 20
    assert _kernel_values(mask).sum() == total - int(total * ratio)
    assert mask["bn0"]["scale"].all() and mask["fc"]["bias"].all()
    kept, values = _kernel_values(mask), _kernel_values(scores)
    if kept.any() and (~kept).any():
        assert values[kept].min() >= values[~kept].max()


def test_global_top_mask_breaks_ties_by_position():
    scores = {"a": {"kernel": np.ones((2, 3))}, "b": {"kernel": np.ones(4)}}
    mask = weights.global_top_mask(scores, 0.5)  # 10 equal scores: the first 5 stay
    np.testing.assert_array_equal(mask["a"]["kernel"].ravel(), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(mask["b"]["kernel"], [False] * 4)
    mask = weights.global_top_mask(scores, 0.7)
    np.testing.assert_array_equal(mask["a"]["kernel"].ravel(), [1, 1, 1, 0, 0, 0])


def test_magnitude_mask_keeps_the_largest_weights_over_the_whole_network():
    _, variables = _model()
    mask = weights.magnitude_mask(variables["params"], 0.6)
    kept, values = _kernel_values(mask), np.abs(_kernel_values(variables["params"]))
    assert kept.sum() == kept.size - int(kept.size * 0.6)
    assert values[kept].min() >= values[~kept].max()


def test_snip_keeps_the_most_sensitive_weights():
    model, variables = _model()
    rng = np.random.default_rng(0)
    batch = {"image": _images((8, 8, 1), n=16), "label": rng.integers(0, 10, 16).astype(np.int32)}
    mask = weights.snip_mask(model, variables, [batch, batch], 0.5)
    grads = jax.grad(weights._loss, argnums=1)(
        model, variables["params"], variables["batch_stats"], batch
    )
    saliency = np.abs(_kernel_values(grads) * _kernel_values(variables["params"]))
    kept = _kernel_values(mask)
    assert kept.sum() == kept.size - int(kept.size * 0.5)
    assert saliency[kept].min() >= saliency[~kept].max()


def test_masked_weights_stay_exactly_zero_through_many_steps():
    model, variables = _model()
    config = default_config()
    config.update(weight_decay=1e-2, momentum=0.9, learning_rate=0.5, lr_boundaries=())
    mask = weights.magnitude_mask(variables["params"], 0.7)
    params = train_steps.apply_weight_mask(variables["params"], mask)
    state = train_steps.TrainState.create(
        apply_fn=model.apply,
        params=params,
        batch_stats=variables["batch_stats"],
        tx=train_steps.create_optimizer(config, 10),
    )
    step = parallel.pmap_step(train_steps.train_step)
    state, mask_r = parallel.replicate(state), parallel.replicate(mask)
    rng = np.random.default_rng(0)
    for _ in range(25):
        batch = {
            "image": _images((8, 8, 1), n=8, seed=int(rng.integers(1e6))),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        state, _ = step(state, parallel.shard(batch, 2), mask_r)
    final = parallel.unreplicate(state)
    kept = _kernel_values(mask)
    values = _kernel_values(final.params)
    assert np.all(values[~kept] == 0.0) and np.all(values[kept] != 0.0)
    momentum = _kernel_values(final.opt_state[-1][0].trace)
    assert np.all(momentum[~kept] == 0.0)


# --- SFP ---


@pytest.mark.parametrize("name, shape", [("vgg_tiny", (8, 8, 1)), ("resnet_tiny", (16, 16, 3))])
def test_sfp_zeroes_exactly_the_lowest_norm_filters_of_each_prunable_conv(name, shape):
    model, variables = _model(name, shape)
    soft = sfp.soft_prune(model, variables["params"], 0.4)
    for group in interior_groups(model):
        conv = producer(group)
        kernel = np.asarray(variables["params"][conv]["kernel"])
        norms = np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0)
        n = int(norms.size * 0.4)
        zeroed = np.flatnonzero(np.all(soft[conv]["kernel"].reshape(-1, norms.size) == 0, axis=0))
        np.testing.assert_array_equal(np.sort(zeroed), np.sort(np.argsort(norms)[:n]))
        kept = np.setdiff1d(np.arange(norms.size), zeroed)
        np.testing.assert_array_equal(soft[conv]["kernel"][..., kept], kernel[..., kept])


@pytest.mark.parametrize("name, shape", [("vgg_tiny", (8, 8, 1)), ("preresnet_tiny", (8, 8, 3))])
def test_sfp_cut_network_computes_what_the_soft_pruned_network_does(name, shape):
    model, variables = _model(name, shape)
    params = sfp.soft_prune(model, variables["params"], 0.5)
    masks = sfp.hard_prune_masks(model, params, 0.5)
    narrow, cut = apply_cut(model, {**variables, "params": params}, plan_cut(model, params, masks))
    # The soft network with each zeroed filter's channel silent (its BN scale and bias 0).
    silent = jax.tree.map(np.array, params)
    for path, mask in zip(model.bn_paths(), masks, strict=True):
        for leaf in ("scale", "bias"):
            silent[path[-1]][leaf] = np.where(mask, silent[path[-1]][leaf], 0.0)
    images = _images(shape, seed=3)
    np.testing.assert_allclose(
        narrow.apply(cut, images),
        model.apply({**variables, "params": silent}, images),
        rtol=1e-5,
        atol=1e-5,
    )
    assert sum(m.sum() for m in masks) < sum(m.size for m in masks)
