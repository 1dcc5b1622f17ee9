"""Ticket masks, mask distance and the early-bird detector against independent numpy code."""

import math

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eb_jax.ticket import EarlyBirdDetector, channel_mask, mask_distance, pairwise_distances

settings.register_profile("eb_jax", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("eb_jax")


def reference_mask(scales, ratio):
    """keep v iff more than k magnitudes are strictly smaller than |v| (O(n^2), no sort)."""
    a = np.concatenate([np.abs(np.asarray(s, np.float32)) for s in scales])
    k = math.floor(np.float64(a.size) * np.float64(ratio))
    smaller = (a[None, :] < a[:, None]).sum(1)
    return smaller > k


def reference_distance(a, b):
    return 1.0 - np.sum(np.asarray(a) == np.asarray(b)) / np.asarray(a).size


# Scales from a small pool of values, so ties are common; sign matters not.
values = st.sampled_from([0.0, 0.5, -0.5, 1e-3, 0.25, 0.7, -1.0, 2.0, 1e-8, 0.5000001])
layers = st.lists(
    st.integers(1, 12).flatmap(lambda n: hnp.arrays(np.float32, n, elements=values)),
    min_size=1,
    max_size=5,
)
ratios = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.99]), st.floats(0, 0.999))


@given(layers, ratios)
def test_mask_matches_reference(scales, ratio):
    masks = channel_mask([jnp.asarray(s) for s in scales], ratio)
    assert [m.shape for m in masks] == [s.shape for s in scales]
    assert all(m.dtype == jnp.bool_ for m in masks)
    flat = np.concatenate([np.asarray(m) for m in masks])
    np.testing.assert_array_equal(flat, reference_mask(scales, ratio))
    total = flat.size
    assert total - flat.sum() >= int(total * ratio) + 1  # at least k + 1 pruned


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-4, 4, width=32)), ratios)
def test_mask_matches_reference_for_random_scales(scale, ratio):
    got = np.concatenate([np.asarray(m) for m in channel_mask([jnp.asarray(scale)], ratio)])
    np.testing.assert_array_equal(got, reference_mask([scale], ratio))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7])
def test_equal_scales_at_init_give_an_all_zero_mask(ratio):
    masks = channel_mask([jnp.full(64, 0.5), jnp.full(128, 0.5)], ratio)
    assert not any(bool(m.any()) for m in masks)


def test_vgg16_prune_count_uses_python_int_of_the_float_product():
    # int(4224 * 0.7) == 2956; the threshold is the 2956-th smallest magnitude.
    scales = [jnp.arange(4224, dtype=jnp.float32)]
    assert int(np.asarray(channel_mask(scales, 0.7)[0]).sum()) == 4224 - 2957


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\)"):
        channel_mask([jnp.ones(4)], ratio)


bool_masks = st.integers(1, 200).flatmap(
    lambda n: st.tuples(hnp.arrays(bool, n), hnp.arrays(bool, n))
)


@given(bool_masks)
def test_distance_matches_reference(pair):
    a, b = pair
    assert mask_distance(a, b) == reference_distance(a, b)
    assert mask_distance(a, a) == 0.0
    assert mask_distance(a, b) == mask_distance(b, a)
    split = [a[: a.size // 2], a[a.size // 2 :]]
    assert mask_distance(split, b) == mask_distance(a, b)  # per-layer masks flatten


@given(st.lists(hnp.arrays(bool, 17), min_size=1, max_size=6))
def test_pairwise_distances_match_mask_distance(masks):
    matrix = pairwise_distances(masks)
    for i, a in enumerate(masks):
        for j, b in enumerate(masks):
            assert matrix[i, j] == pytest.approx(mask_distance(a, b), abs=1e-15)


def test_masks_of_different_length_are_rejected():
    with pytest.raises(ValueError, match="masks differ in length: 3 vs 4"):
        mask_distance(np.ones(3, bool), np.ones(4, bool))


def reference_detector(masks, window, eps, rule):
    """The original's EarlyBird (code rule) and the paper's rule, with Python lists."""
    held, dists_fifo, out = [], [], []
    for mask in masks:
        if rule == "code":
            held = (held + [mask])[-window:]
            if len(held) < window:
                out.append(False)
                continue
            dists = [reference_distance(held[-1], held[i]) for i in range(window - 1)]
            out.append(all(d <= eps for d in dists))
        else:
            if held:
                dists_fifo = (dists_fifo + [reference_distance(held[-1], mask)])[-window:]
            held = [mask]
            out.append(len(dists_fifo) == window and max(dists_fifo) < eps)
    return out


@given(
    st.lists(hnp.arrays(bool, 20, elements=st.booleans()), min_size=1, max_size=14),
    st.integers(2, 6),
    st.sampled_from([0.05, 0.1, 0.3]),
    st.sampled_from(["code", "paper"]),
)
def test_detector_matches_reference(masks, window, eps, rule):
    # Make later masks similar to earlier ones so that emergence does happen.
    masks = [m if i % 3 else masks[0] for i, m in enumerate(masks)]
    detector = EarlyBirdDetector(window=window, eps=eps, rule=rule)
    state = detector.init(20)
    got = []
    for mask in masks:
        state, emerged, _ = detector.update(state, mask)
        got.append(emerged)
    assert got == reference_detector(masks, window, eps, rule)


def test_detector_fires_once_masks_settle_and_reports_distances():
    detector = EarlyBirdDetector(window=5, eps=0.1)
    state = detector.init(10)
    base = np.zeros(10, bool)
    base[:5] = True
    history = [np.zeros(10, bool)] + [base] * 5  # epoch 0: the all-zero init mask
    fired = []
    for mask in history:
        state, emerged, distances = detector.update(state, mask)
        fired.append(emerged)
    assert fired == [False] * 5 + [True]
    np.testing.assert_array_equal(distances, [0.0] * 4)
    assert int(state["count"]) == 6


def test_detector_settings_are_checked():
    with pytest.raises(ValueError, match="window must be >= 2"):
        EarlyBirdDetector(window=1)
    with pytest.raises(ValueError, match="rule must be one of"):
        EarlyBirdDetector(rule="other")
    detector = EarlyBirdDetector()
    with pytest.raises(ValueError, match="mask has 3 channels, the detector holds 4"):
        detector.update(detector.init(4), np.ones(3, bool))


def test_subnormal_scales_rank_above_zero():
    """XLA's CPU flushes subnormals to zero in float ops; the mask must not."""
    scale = jnp.asarray(np.array([0.0, 1e-45, 1e-40, -1e-42], np.float32))
    np.testing.assert_array_equal(np.asarray(channel_mask([scale], 0.0)[0]), [0, 1, 1, 1])
