"""Block floating point: the quantiser's properties, the quantised layers' gradients, the
quantised train step, and bf16 compute."""

import dataclasses
import functools
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eb_jax import lowp, parallel, train_steps
from eb_jax.config import ConfigError, default_config, stage_precision, validate
from eb_jax.models import create_model

# Shared exponents stop at 2^-100 (lowp._MIN_EXPONENT): smaller slices are not tested.
ELEMENTS = st.floats(-1e4, 1e4, width=32).filter(lambda v: v == 0 or abs(v) > 1e-20)
ROWS = hnp.arrays(np.float32, (3, 16), elements=ELEMENTS)
BITS = st.sampled_from([4, 8, 12])


def _step(x, bits):
    """Each row's quantisation step: 2^(floor(log2 max|row|) - bits + 2)."""
    amax = np.max(np.abs(x), axis=1, keepdims=True)
    exponent = np.floor(np.log2(np.where(amax > 0, amax, 1.0)))
    return np.exp2(exponent - bits + 2)


@settings(max_examples=30, deadline=None)
@given(ROWS, BITS, st.integers(0, 2**16))
def test_values_in_the_format_are_unchanged(x, bits, seed):
    q = np.asarray(lowp.quantize_bfp(x, bits))
    np.testing.assert_array_equal(lowp.quantize_bfp(q, bits), q)
    np.testing.assert_array_equal(lowp.quantize_bfp(q, bits, jax.random.key(seed)), q)


@settings(max_examples=30, deadline=None)
@given(ROWS, BITS, st.integers(0, 2**16))
def test_error_is_within_half_a_step_nearest_and_one_step_stochastic(x, bits, seed):
    step, top = _step(x, bits), 2 ** (bits - 1) - 1
    saturated = np.abs(x / step) > top  # rounds beyond the largest integer: clamped to it
    nearest = np.asarray(lowp.quantize_bfp(x, bits))
    stochastic = np.asarray(lowp.quantize_bfp(x, bits, jax.random.key(seed)))
    err = np.abs(nearest - x)
    assert np.all(err[~saturated] <= step.repeat(16, 1)[~saturated] / 2)
    clamped = (np.sign(x) * top * step)[saturated]
    np.testing.assert_array_equal(nearest[saturated], clamped)
    assert np.all(np.abs(stochastic - x) < step)
    # Every value is an integer number of its row's steps, within the word length.
    for q in (nearest, stochastic):
        k = q / step
        np.testing.assert_array_equal(k, np.round(k))
        assert np.all(np.abs(k) <= top)


def test_stochastic_rounding_is_unbiased():
    x = np.array([[1.0, 0.3, -0.61, 0.017, 0.9]], np.float32)  # max exactly representable
    keys = jax.random.split(jax.random.key(0), 4000)
    q = jax.vmap(lambda k: lowp.quantize_bfp(x, 8, k))(keys)
    step = 2.0**-6
    np.testing.assert_allclose(np.mean(q, axis=0), x, atol=4 * (step / 2) / np.sqrt(4000))
    assert len(np.unique(np.asarray(q[:, 0, 1]))) == 2  # 0.3 lies between two steps


def test_each_slice_has_its_own_exponent():
    x = np.array([[1000.0, 3.0, -700.0], [1e-3, 3e-4, -7e-4]], np.float32)
    q = np.asarray(lowp.quantize_bfp(x, 8, axis=0))
    np.testing.assert_allclose(q[1], x[1], atol=2.0**-17)  # half its own step, 2^-16
    np.testing.assert_array_equal(q[0, 1], 0.0)  # 3 is below half of 1000's step (8)
    assert lowp.quantize_bfp(x, 8, axis=None)[1].tolist() == [0.0, 0.0, 0.0]


def test_saturation_and_zeros():
    q = lowp.quantize_bfp(np.array([[1.999, -1.999, 0.5, 0.0]], np.float32), 8)
    assert q.tolist() == [[127 / 64, -127 / 64, 0.5, 0.0]]
    assert lowp.quantize_bfp(np.zeros((2, 3), np.float32), 8).tolist() == [[0.0] * 3] * 2


def test_tree_quantises_per_output_channel():
    kernel = np.stack([np.full((3, 3, 2), 1.3), np.full((3, 3, 2), 1e-3)], -1).astype(np.float32)
    q = lowp.quantize_tree({"conv": {"kernel": kernel}}, 4, jax.random.key(1))["conv"]["kernel"]
    assert q.shape == kernel.shape
    assert set(np.unique(q[..., 0])) <= {1.25, 1.5} and np.all(q[..., 1] > 0)  # steps 1/4


def test_backward_quantises_the_error():
    fmt = lowp.BFPFormat(activation_bits=6, error_bits=4)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    g = jax.random.normal(jax.random.key(1), (4, 5))
    key = jax.random.key(2)
    y, vjp = jax.vjp(lambda x: lowp.quantize_activation(x, fmt, key), x)
    forward_key, backward_key = jax.random.split(key)
    np.testing.assert_array_equal(y, lowp.quantize_bfp(x, 6, forward_key))
    np.testing.assert_array_equal(vjp(g)[0], lowp.quantize_bfp(g, 4, backward_key))
    _, vjp = jax.vjp(lambda x: lowp.quantize_activation(x, fmt), x)  # no key: nearest
    np.testing.assert_array_equal(vjp(g)[0], lowp.quantize_bfp(g, 4))


FINE = lowp.Precision("bfp8", lowp.BFPFormat(*(24,) * 5, stochastic=False))


def test_quantised_layer_gradient_matches_finite_differences():
    """At 24 bits the quantised forward is smooth enough for central differences."""
    x = jax.random.normal(jax.random.key(0), (6, 5))
    c = jax.random.normal(jax.random.key(1), (6, 3))

    def loss(w):
        return jnp.sum(jnp.tanh(lowp.quantize_activation(x @ w, FINE.bfp)) * c)

    w = 0.3 * jax.random.normal(jax.random.key(2), (5, 3))
    grad = np.asarray(jax.grad(loss)(w))
    eps = 1e-2
    for i, j in [(0, 0), (2, 1), (4, 2)]:
        dw = np.zeros((5, 3), np.float32)
        dw[i, j] = eps
        numeric = (loss(w + dw) - loss(w - dw)) / (2 * eps)
        np.testing.assert_allclose(grad[i, j], numeric, rtol=2e-3, atol=1e-4)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def _loss(state, batch):
    """The train-mode loss of `batch` as a function of the params (BN updates as aux)."""

    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(
            variables, batch["image"], train=True, mutable=["batch_stats"]
        )
        return train_steps.cross_entropy(logits, batch["label"]), updates

    return loss


def _state(precision, config=None, model="vgg_tiny"):
    config = config or default_config()
    tx = train_steps.create_optimizer(config, 10, precision=precision)
    net = create_model(model, 10, precision=precision)
    return train_steps.create_train_state(net, jax.random.key(0), (8, 8, 1), tx)


@pytest.mark.parametrize("model", ["vgg_tiny"])  # the quantisers live in the shared Conv
def test_model_gradients_at_24_bits_match_fp32(model):
    def grads(precision):
        state = _state(precision, model=model)

        return jax.jit(jax.grad(_loss(state, _batch()), has_aux=True))(state.params)[0]

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
        grads(FINE),
        grads(lowp.FP32),
    )


BFP8 = lowp.Precision("bfp8")


@functools.cache
def _jitted_step(precision, seed):
    return jax.jit(functools.partial(train_steps.train_step, precision=precision, seed=seed))


def _quantised_step(seed=0, steps=2):
    state = _state(BFP8)
    for i in range(steps):
        state, _ = _jitted_step(BFP8, seed)(state, _batch(seed=i))
    return state


def test_bfp_step_is_seeded_and_keeps_weights_and_momentum_in_the_format():
    state, again = _quantised_step(0), _quantised_step(0)
    jax.tree.map(np.testing.assert_array_equal, state.params, again.params)
    keys = [lowp.stream_key(seed, lowp.WEIGHTS, 0) for seed in (0, 0, 1)]
    x = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    a, b, c = (lowp.quantize_tree({"w": x}, 8, k)["w"] for k in keys)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # the seed drives the rounding
    trace = next(s for s in state.opt_state if isinstance(s, lowp.QuantizedTraceState)).trace
    in_format = jax.jit(lambda tree: lowp.quantize_tree(tree, 8))  # one compile, not per leaf
    for tree in (state.params, trace):
        jax.tree.map(np.testing.assert_array_equal, in_format(tree), tree)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))


def test_bfp_pmap_step_keeps_the_devices_replicas_equal():
    state = parallel.replicate(_state(BFP8))
    step = parallel.pmap_step(
        lambda s, b, axis_name: train_steps.train_step(s, b, axis_name=axis_name, precision=BFP8)
    )
    for i in range(2):
        state, _ = step(state, parallel.shard(_batch(seed=i), 2))
    for x in jax.tree.leaves(state.params):
        np.testing.assert_array_equal(x[0], x[1])


def test_precision_off_is_the_plain_fp32_step():
    """fp32 ignores the bfp settings (bit-identical), inserts no rounding, and is plain
    value_and_grad + PyTorch-style SGD."""
    config, odd = default_config(), default_config()
    odd.bfp.update(weight_bits=3, activation_bits=3, rounding="nearest")
    batch = _batch()
    states = []
    for c in (config, odd):
        state = _state(stage_precision(c, "search"), c)
        new, _ = jax.jit(functools.partial(train_steps.train_step, seed=c.seed))(state, batch)
        states.append(new)
    jax.tree.map(np.testing.assert_array_equal, states[0].params, states[1].params)
    jaxpr = str(jax.make_jaxpr(train_steps.train_step)(state, batch))
    assert not any(op in jaxpr for op in ("round", "floor", "random_bits", "threefry"))

    grads, updates = jax.jit(jax.grad(_loss(state, batch), has_aux=True))(state.params)
    tx = optax.chain(
        train_steps.add_bn_sparsity(config.sparsity),
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(config.learning_rate, momentum=config.momentum),
    )
    deltas, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, deltas)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
        states[0].params,
        expected,
    )
    jax.tree.map(np.testing.assert_array_equal, states[0].batch_stats, updates["batch_stats"])


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_and_statistics():
    bf16 = lowp.Precision("bf16")
    state, reference = _state(bf16), _state(lowp.FP32)
    batch = _batch()
    jaxpr = str(
        jax.make_jaxpr(lambda v: state.apply_fn(v, batch["image"]))(
            {"params": state.params, "batch_stats": state.batch_stats}
        )
    )
    assert "conv_general_dilated" in jaxpr and "bf16[8,8,8,8]" in jaxpr
    new, metrics = _jitted_step(bf16, 0)(state, batch)
    ref, ref_metrics = _jitted_step(lowp.FP32, 0)(reference, batch)
    for tree in (new.params, new.batch_stats):
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(tree))
    np.testing.assert_allclose(metrics["loss_sum"], ref_metrics["loss_sum"], rtol=2e-2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0.1, atol=2e-3), new.params, ref.params
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"precision": {"search": "int8"}}, "precision.search='int8' must be one of"),
        ({"bfp": {"gradient_bits": 40}}, "bfp.gradient_bits=40 must be in [2, 24]"),
        ({"bfp": {"rounding": "up"}}, "bfp.rounding='up'"),
        ({"swa_start_epoch": 160}, "swa_start_epoch=160 must be in [0, num_epochs)"),
        ({"swa_start_epoch": 5, "keep_searching": True}, "swa_start_epoch needs a final stage"),
    ],
)
def test_config_errors(overrides, message):
    config = default_config()
    config.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config, 1)


def test_stage_precision_follows_the_config():
    config = default_config()
    config.precision.search, config.bfp.error_bits, config.bfp.rounding = "bfp8", 6, "nearest"
    search, retrain = stage_precision(config, False), stage_precision(config, True)
    assert search == lowp.Precision(
        "bfp8", dataclasses.replace(lowp.BFPFormat(), error_bits=6, stochastic=False)
    )
    assert retrain.name == "fp32"
