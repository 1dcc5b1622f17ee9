"""Traced channel groups and the generic cut: any linen CNN, nothing declared."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from eb_jax.models import bn_scales, create_model
from eb_jax.ticket import cut, narrow_model, trace_groups
from eb_jax.ticket.groups import channel_groups
from eb_jax.ticket.surgery import cut_ticket
from eb_jax.ticket.trace import bn_paths_of

ZOO = ["MobileNetV2", "ResNeXt", "DenseNet", "SEResNet", "UNet", "FlattenHead"]
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # each example traces a model
_MODELS = {}


def _drawn(model, x, seed=0):
    """Random weights, and scales, biases and statistics spread as after training, drawn
    in numpy from the shapes (no initialiser is compiled)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        leaf, shape = path[-1].key, shape.shape
        if leaf in ("scale", "var"):
            return rng.uniform(0.2, 1.5, shape).astype(np.float32)
        if leaf in ("bias", "mean"):
            return rng.normal(0, 0.2, shape).astype(np.float32)
        fan_in = np.prod(shape[:-1]) if len(shape) > 1 else 1
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def _model(name):
    if name not in _MODELS:
        model = getattr(zoo, name)(num_classes=5)
        x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32)
        _MODELS[name] = model, _drawn(model, x), x
    return _MODELS[name]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _switched_off(variables, masks):
    params = jax.tree.map(np.array, variables["params"])
    for bn, mask in masks.items():
        for leaf in ("scale", "bias"):
            _get(params, bn)[leaf] = np.where(mask, _get(params, bn)[leaf], 0.0)
    return {**variables, "params": params}


def _n_params(variables):
    return sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"]))


@functools.cache
def _dense_eval_and_train(name):
    """`_eval_and_train` of the zoo's dense `name`, compiled once for every mask."""
    return jax.jit(functools.partial(_eval_and_train, _model(name)[0]))


def _eval_and_train(model, variables, x):
    """Outputs in eval and in train mode, and the train step's batch statistics."""
    train_out, stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return model.apply(variables, x), train_out, stats["batch_stats"]


def _check_cut(name, masks):
    model, variables, x = _model(name)
    narrow, narrow_variables, kept = cut(model, variables, masks, x)
    got = jax.jit(functools.partial(_eval_and_train, narrow))(narrow_variables, x)
    want = _dense_eval_and_train(name)(_switched_off(variables, kept), x)
    for a, b in zip(got[:2], want[:2], strict=True):  # eval, then train mode
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert jax.tree.map(np.shape, got[2]) == jax.tree.map(np.shape, narrow_variables["batch_stats"])
    for bn, mask in masks.items():  # groups and min_channels only add channels
        assert np.all(kept[bn][mask])
    assert _n_params(narrow_variables) < _n_params(variables)
    fresh = jax.eval_shape(narrow.init, jax.random.key(0), x)  # init builds the cut shapes
    assert jax.tree.map(lambda s: s.shape, dict(fresh)) == jax.tree.map(np.shape, narrow_variables)


def _widths(variables):
    return {bn: _get(variables["params"], bn)["scale"].shape[0] for bn in bn_paths_of(variables)}


@pytest.mark.parametrize("name", ZOO)
def test_cut_network_equals_dense_network_with_pruned_channels_off(name):
    rng = np.random.default_rng(ZOO.index(name))
    _check_cut(name, {bn: rng.random(n) < 0.5 for bn, n in _widths(_model(name)[1]).items()})


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
@settings(max_examples=4, deadline=None, derandomize=True, phases=NO_SHRINK)
@given(data=st.data())
def test_cut_equals_dense_network_at_any_mask(name, data):
    widths = _widths(_model(name)[1])
    draw = lambda n: np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))  # noqa: E731
    _check_cut(name, {bn: draw(n) for bn, n in widths.items()})


def test_depthwise_grouped_and_concatenated_channels_group_as_their_structure_says():
    groups = {tuple("/".join(b) for b in g.bns): g for g in trace_groups(*_model("MobileNetV2"))}
    # A depthwise conv's input and output are the same channels; a residual joins blocks.
    assert ("InvertedResidual_1/BatchNorm_0", "InvertedResidual_1/BatchNorm_1") in groups
    assert ("InvertedResidual_1/BatchNorm_2", "InvertedResidual_2/BatchNorm_2") in groups
    resnext = trace_groups(*_model("ResNeXt"))
    inner = next(g for g in resnext if g.bns == (("BatchNorm_1",),))
    assert inner.channels == 4  # 16 channels in 4 conv groups: cut alike in every group
    dense = trace_groups(*_model("DenseNet"))  # the stem's channels: read by every BN after
    assert dense[0].bns == tuple((f"BatchNorm_{i}",) for i in range(4))
    assert not any(g.frozen for g in dense + resnext)


def test_layer_norm_over_channels_freezes_its_group_and_the_rest_still_cut():
    model, variables, x = _model("HalfLayerNormCNN")
    first, second = trace_groups(model, variables, x)
    assert first.frozen is None
    assert second.frozen.startswith("LayerNorm_0: mixed by `reduce_sum`")
    masks = {
        bn: np.arange(len(_get(variables["params"], bn)["scale"])) % 2 == 0
        for bn in bn_paths_of(variables)
    }
    _, narrow_variables, kept = cut(model, variables, masks, x)
    assert kept[("BatchNorm_0",)].sum() == 4 and kept[("BatchNorm_1",)].all()
    assert narrow_variables["params"]["Conv_1"]["kernel"].shape == (3, 3, 4, 12)


def test_all_groups_frozen_no_batchnorm_and_width_branches_are_one_line_errors():
    model, variables, x = _model("LayerNormCNN")
    assert all(g.frozen for g in trace_groups(model, variables, x))
    with pytest.raises(ValueError, match="every channel group of this model is frozen"):
        cut(model, variables, {}, x)
    plain = zoo.NoBatchNorm()
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        trace_groups(plain, jax.eval_shape(plain.init, jax.random.key(0), x), x)

    class Branchy(nn.Module):  # a width compared with a number: the cut model would differ
        @nn.compact
        def __call__(self, x, train: bool = False):
            y = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
            y = nn.relu(y) if y.shape[-1] == 8 else y
            return nn.Dense(2)(jnp.mean(y, axis=(1, 2)))

    branchy = Branchy()
    branchy_variables = jax.tree.map(
        lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(branchy.init, jax.random.key(0), x)
    )
    with pytest.raises(ValueError, match="runs other ops than the dense one"):
        cut(branchy, branchy_variables, {("BatchNorm_0",): np.arange(8) < 4}, x)


def test_an_unknown_op_on_the_channels_freezes_them():
    class Sorted(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            y = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
            y = jax.lax.sort(y, dimension=3)
            return nn.Dense(2)(jnp.mean(y, axis=(1, 2)))

    x = np.zeros((1, 8, 8, 3), np.float32)
    model = Sorted()
    (group,) = trace_groups(model, jax.eval_shape(model.init, jax.random.key(0), x), x)
    assert "`sort` is an operation eb_jax does not trace" in group.frozen


def test_preresnet_residual_read_before_its_batchnorm_is_frozen():
    model, x = create_model("preresnet_tiny", 10), np.zeros((1, 8, 8, 3), np.float32)
    groups = trace_groups(model, jax.eval_shape(model.init, jax.random.key(0), x), x)
    frozen = {g.bns[0][0]: g.frozen for g in groups if g.frozen}
    assert set(frozen) == {f"stage{s}_block0_bn1" for s in range(3)}
    assert (
        "reads them where switching off their BatchNorm does not zero them"
        in frozen["stage1_block0_bn1"]
    )


@pytest.mark.parametrize(
    "name,shape,options",
    [
        ("vgg_tiny", (8, 8, 1), {}),
        ("preresnet_tiny", (8, 8, 3), {}),
        ("resnet_tiny", (16, 16, 3), {"prune_residual": True}),
        ("resnet_tiny_bottleneck", (16, 16, 3), {"prune_residual": True}),
        ("resnet_tiny", (16, 16, 3), {}),  # the residual streams whole: cut(whole=...)
        ("resnet_tiny_bottleneck", (16, 16, 3), {}),
    ],
)
def test_traced_groups_cut_the_built_in_families_as_the_declared_ones(name, shape, options):
    model = create_model(name, 10)
    variables = _drawn(model, np.zeros((1, *shape), np.float32))
    rng = np.random.default_rng(3)
    masks = [rng.random(s.shape[0]) < 0.4 for s in bn_scales(model, variables["params"])]
    if name == "preresnet_tiny":  # its block-input BNs select channels instead (not traced)
        selecting = [p[0].endswith("bn1") or p[0] == "bn_final" for p in model.bn_paths()]
        masks = [np.ones_like(m) if s else m for m, s in zip(masks, selecting, strict=True)]
    x = np.zeros((2, *shape), np.float32)
    declared = {bn for g in channel_groups(model, **options) for bn in g.bns}
    whole = [p for p in model.bn_paths() if p[-1] not in declared]
    assert bool(whole) == (name.startswith("resnet") and not options)
    narrow, narrow_variables, kept = cut(
        model, variables, dict(zip(model.bn_paths(), masks, strict=True)), x, whole=whole
    )
    _, declared_variables, plan = cut_ticket(model, variables, masks, **options)
    assert jax.tree.map(np.shape, narrow_variables) == jax.tree.map(np.shape, declared_variables)
    for a, b in zip(
        jax.tree.leaves(narrow_variables), jax.tree.leaves(declared_variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for path, mask in zip(model.bn_paths(), plan.masks, strict=True):
        np.testing.assert_array_equal(kept[path], mask)
    assert narrow.eb_base is type(model)


def test_min_channels_round_to_and_the_narrow_model_rebuilt_from_its_widths():
    model, variables, x = _model("SEResNet")
    masks = {bn: np.zeros(n, bool) for bn, n in _widths(variables).items()}
    narrow, narrow_variables, kept = cut(model, variables, masks, x, min_channels=2, round_to=3)
    for group in trace_groups(model, variables, x):  # 2 channels, rounded up to 3, per group
        assert kept[group.bns[0]].sum() == min(3, group.channels)
    stem = next(g for g in trace_groups(model, variables, x) if ("BatchNorm_0",) in g.bns)
    score = np.max([np.abs(_get(variables["params"], bn)["scale"]) for bn in stem.bns], axis=0)
    assert set(np.flatnonzero(kept[("BatchNorm_0",)])) == set(np.argsort(-score)[:3])
    rebuilt = narrow_model(model, json.loads(json.dumps(narrow.eb_widths)))
    np.testing.assert_array_equal(
        rebuilt.apply(narrow_variables, x), narrow.apply(narrow_variables, x)
    )
    with pytest.raises(ValueError, match="min_channels must be >= 1"):
        cut(model, variables, masks, x, min_channels=0)
    with pytest.raises(ValueError, match="has 3 channels, the layer has 16"):
        cut(model, variables, {("BatchNorm_0",): np.ones(3, bool)}, x)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))


class _Wrapped(nn.Module):
    """Channels through nn.remat, lax.cond and a nested jit."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.remat(_Block, static_argnums=(2,))()(x, train)
        x = jax.lax.cond(x.shape[0] > 1, lambda y: y * 2.0, lambda y: y, x)
        x = jax.jit(lambda y: jnp.maximum(y, 0.0))(x)
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_remat_cond_and_jit_are_traced_into():
    model, x = _Wrapped(), np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("f4")
    variables = _drawn(model, x)
    assert [(g.bns, g.frozen) for g in trace_groups(model, variables, x)] == [
        ((("Checkpoint_Block_0", "BatchNorm_0"),), None),
        ((("BatchNorm_0",),), None),
    ]
    masks = {("Checkpoint_Block_0", "BatchNorm_0"): np.arange(8) < 5}
    narrow, narrow_variables, kept = cut(model, variables, masks, x)
    assert narrow_variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 5, 4)
    want = model.apply(_switched_off(variables, kept), x)
    np.testing.assert_allclose(narrow.apply(narrow_variables, x), want, atol=2e-5)
