"""ViT tickets: the gated model, its masks, the cut (equal to the gated dense model with
the removed gates at 0), its cost, and the settings a ViT cannot take."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from eb_jax import cost, train_steps
from eb_jax.config import ConfigError, validate
from eb_jax.lowp import Precision
from eb_jax.models import bn_scales, create_model
from eb_jax.ticket.masks import channel_mask
from eb_jax.ticket.surgery import cut_ticket
from eb_jax.ticket.vit_groups import gate_mask

SHAPE = (8, 8, 1)
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


@functools.cache
def _trained_like(seed=0):
    """vit_tiny's variables with every param (gates, classifier) spread as after training."""
    model = create_model("vit_tiny", 10)
    variables = train_steps.init_variables(model, jax.random.key(seed), SHAPE)
    rng = np.random.default_rng(seed)

    def spread(path, x):
        if path[-1].key == "scale":
            return rng.uniform(0.2, 1.5, x.shape).astype(np.float32)
        return (np.asarray(x) + rng.normal(0, 0.3, x.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(spread, variables)


def _gates_off(model, variables, masks):
    params = jax.tree.map(np.array, variables["params"])
    for path, mask in zip(model.bn_paths(), masks, strict=True):
        params[path[-1]]["scale"] = np.where(mask, params[path[-1]]["scale"], 0.0)
    return {"params": params}


@pytest.mark.parametrize(
    "name, params, gmacs",
    [("vit_ti16", 5.72e6, 1.26), ("vit_s16", 22.05e6, 4.60), ("vit_b16", 86.57e6, 17.58)],
)
def test_imagenet_vits_have_the_published_size_and_cost(name, params, gmacs):
    # DeiT's table at 224x224 (Ti 5.7 M / 1.3 G, S 22 M / 4.6 G, B 86.6 M / 17.6 G).
    c = cost.forward_cost(create_model(name, 1000), (224, 224, 3))
    assert c.params == pytest.approx(params, rel=2e-3)
    assert c.macs / 1e9 == pytest.approx(gmacs, rel=2e-2)


def test_gates_are_the_scales_and_the_only_params_named_scale():
    model, variables = _trained_like()
    params = variables["params"]
    assert [s.shape for s in bn_scales(model, params)] == [(2,), (16,)] * 2
    marked = jax.tree_util.tree_flatten_with_path(train_steps._is_bn_scale(params))[0]
    assert {p[0].key for p, is_scale in marked if is_scale} == {
        f"block{i}_{g}_gate" for i in range(2) for g in ("head", "mlp")
    }


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    heads=st.lists(
        st.lists(st.floats(-2, 2, width=32), min_size=1, max_size=6), min_size=1, max_size=3
    ),
    neurons=st.integers(1, 12),
    ratio=st.floats(0, 0.95),
)
def test_heads_are_ranked_per_block_and_neurons_globally(heads, neurons, ratio):
    rng = np.random.default_rng(len(heads))
    mlp = [rng.normal(size=neurons).astype(np.float32) for _ in heads]
    scales = [np.asarray(x, np.float32) for pair in zip(heads, mlp, strict=True) for x in pair]
    masks = gate_mask(scales, ratio)
    for h, mask in zip(heads, masks[0::2], strict=True):
        pruned = int(len(h) * ratio)
        assert mask.sum() == len(h) - pruned >= 1  # every block keeps a head
        if 0 < pruned < len(h):  # no pruned head outranks a kept one
            assert np.abs(h)[~mask].max() <= np.abs(h)[mask].min()
    expected = channel_mask(mlp, ratio)
    for got, want in zip(masks[1::2], expected, strict=True):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=4, deadline=None, derandomize=True, phases=NO_SHRINK)
@given(data=st.data())
def test_cut_vit_equals_gated_vit_with_removed_gates_at_zero(data):
    model, variables = _trained_like()
    masks = [
        np.asarray(data.draw(st.lists(st.booleans(), min_size=s.shape[0], max_size=s.shape[0])))
        for s in bn_scales(model, variables["params"])
    ]
    narrow, narrow_variables, plan = cut_ticket(model, variables, masks)
    assert narrow.head_widths == tuple(int(m.sum()) for m in plan.masks[0::2])
    assert narrow.mlp_widths == tuple(int(m.sum()) for m in plan.masks[1::2])
    images = np.random.default_rng(1).standard_normal((3, *SHAPE)).astype(np.float32)
    dense = _gates_off(model, variables, plan.masks)
    for mode in (False, True):
        expected = jax.jit(model.apply, static_argnames="train")(dense, images, train=mode)
        got = jax.jit(narrow.apply, static_argnames="train")(narrow_variables, images, train=mode)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    fresh = jax.eval_shape(narrow.init, jax.random.key(0), jnp.zeros((1, *SHAPE)))
    assert jax.tree.map(np.shape, narrow_variables["params"]) == jax.tree.map(
        np.shape, fresh["params"]
    )
    # Gates are folded into the weights: the cut model's are all 1.
    assert all(np.all(s == 1) for s in bn_scales(narrow, narrow_variables["params"]))
    for asked, kept in zip(masks, plan.masks, strict=True):
        assert np.all(kept[asked]) and kept.sum() >= 1  # min_channels: a head and a neuron


def test_cut_cost_counts_the_kept_heads_and_neurons():
    model = create_model("vit_tiny", 10)  # 4 tokens + class token, hidden 16, head dim 8
    narrow = model.clone(head_widths=(1, 2), mlp_widths=(4, 16))
    dense, cut = cost.forward_cost(model, SHAPE), cost.forward_cost(narrow, SHAPE)
    n, d = 5, 8
    per_head = 3 * 2 * n * 16 * d + 3 * n * d + 2 * n * d * 16  # q/k/v, biases, out kernel
    per_head += 4 * n * n * d + n * d + 3 * n * n + n * d  # attention, softmax, head gate
    per_neuron = 2 * n * 16 + n + 2 * n * 16 + 2 * n  # mlp1 (+bias), mlp2, GELU and gate
    assert dense.flops - cut.flops == per_head * 1 + per_neuron * 12


def test_bf16_vit_follows_fp32():
    model, variables = _trained_like()
    images = np.random.default_rng(2).standard_normal((4, *SHAPE)).astype(np.float32)
    fp32 = jax.jit(model.apply)(variables, images)
    bf16 = jax.jit(model.clone(precision=Precision("bf16")).apply)(variables, images)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.1 * float(np.abs(fp32).max()))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"method": "thinet"}, "prunes conv filters"),
        ({"precision": {"search": "bfp8", "retrain": "fp32"}}, "not 'bfp8'"),
        ({"optimizer": "adam"}, "optimizer='adam' must be one of"),
        ({"lr_schedule": "cosine", "warmup_epochs": 5, "num_epochs": 5}, "warmup_epochs=5"),
    ],
)
def test_what_a_vit_cannot_run_is_a_config_error(data_dir, overrides, message):
    config = tiny_config(data_dir, model="vit_tiny")
    config.update(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(config, 1)


def test_the_search_draws_gate_masks_and_detects_when_they_settle():
    from eb_jax.ticket import EarlyBirdDetector
    from eb_jax.ticket.search import TicketSearch, mask_function

    model, variables = _trained_like()
    scales = [np.asarray(s) for s in bn_scales(model, variables["params"])]
    search = TicketSearch(
        (0.5,),
        0.5,
        EarlyBirdDetector(3, 0.1, "code"),
        [s.size for s in scales],
        mask_function(model),
    )
    rng = np.random.default_rng(0)
    for epoch in range(6):  # two epochs of random gates, then the same gates
        drawn = [rng.uniform(0, 1, s.size) for s in scales] if epoch < 2 else scales
        search.observe(epoch, drawn)
    assert search.detected == {0.5: 4}  # the window of 3 equal masks: epochs 2, 3, 4
    np.testing.assert_array_equal(
        np.concatenate(search.ticket.masks), np.concatenate(gate_mask(scales, 0.5))
    )


def test_adamw_decays_only_kernels_and_the_cosine_schedule_warms_up():
    from eb_jax.config import default_config

    config = default_config()
    config.update(optimizer="adamw", learning_rate=1.0, weight_decay=0.1, sparsity=0.0)
    config.update(lr_schedule="cosine", warmup_epochs=1, num_epochs=3)
    schedule = train_steps.stage_lr(config, 10)
    assert [float(schedule(s)) for s in (0, 5, 10, 20, 30)] == pytest.approx(
        [0, 0.5, 1, 0.5, 0], abs=1e-6
    )
    config.warmup_epochs = 0
    tx = train_steps.create_optimizer(config, 10)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1)  # lr 1 x decay 0.1 x weight 1
    np.testing.assert_allclose(updates["bias"], 0.0)


def test_label_smoothing_mixes_the_uniform_target_in():
    logits = jnp.asarray([[2.0, 0.0, -1.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 * log_p[1] + 0.1 * log_p.mean())
    got = train_steps.cross_entropy(logits, jnp.asarray([1]), label_smoothing=0.1)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("name", ["vit_quickstart", "vit_tiny_cifar10", "vit_s16_imagenet"])
def test_vit_configs_load_and_validate(name):
    from eb_jax.config import load_config

    config = load_config(name)
    validate(config, 1)
    assert config.optimizer == "adamw" and config.lr_schedule == "cosine"
