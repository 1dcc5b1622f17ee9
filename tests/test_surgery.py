"""Surgery: the cut network computes what the dense one does with pruned channels off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import trained_like
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from eb_jax import train_steps
from eb_jax.models import bn_scales
from eb_jax.ticket.surgery import apply_cut, cut_ticket, plan_cut

FAMILIES = [  # name, input shape, plan options
    ("vgg_tiny", (8, 8, 1), {}),
    ("preresnet_tiny", (8, 8, 3), {}),
    ("resnet_tiny", (16, 16, 3), {}),
    ("resnet_tiny_bottleneck", (16, 16, 3), {}),
    ("resnet_tiny", (16, 16, 3), {"prune_residual": True}),
    ("resnet_tiny_bottleneck", (16, 16, 3), {"prune_residual": True}),
]
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # each example compiles a model


def _switched_off(model, variables, masks):
    """The dense variables with scale and bias zeroed at every masked-out BN channel."""
    params = jax.tree.map(np.array, variables["params"])
    for path, mask in zip(model.bn_paths(), masks, strict=True):
        for leaf in ("scale", "bias"):
            params[path[-1]][leaf] = np.where(mask, params[path[-1]][leaf], 0.0)
    return {"params": params, "batch_stats": variables["batch_stats"]}


def _random_masks(model, params, data, keep_fraction):
    return [
        np.asarray(data.draw(st.lists(st.booleans(), min_size=s.shape[0], max_size=s.shape[0])))
        if keep_fraction is None
        else np.random.default_rng(0).random(s.shape[0]) < keep_fraction
        for s in bn_scales(model, params)
    ]


@pytest.mark.parametrize("name,shape,options", FAMILIES)
@settings(max_examples=4, deadline=None, derandomize=True, phases=NO_SHRINK)
@given(data=st.data())
def test_cut_network_equals_dense_network_with_pruned_channels_off(name, shape, options, data):
    model, variables = trained_like(name, shape)
    masks = _random_masks(model, variables["params"], data, None)
    narrow, narrow_variables, plan = cut_ticket(model, variables, masks, **options)
    images = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    expected = jax.jit(model.apply)(_switched_off(model, variables, plan.masks), images)
    got = jax.jit(narrow.apply)(narrow_variables, images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The cut variables have exactly the narrow model's shapes.
    fresh = jax.eval_shape(narrow.init, jax.random.key(0), jnp.zeros((1, *shape)))
    shapes = jax.tree.map(lambda x: x.shape, narrow_variables)
    assert shapes == jax.tree.map(lambda x: x.shape, dict(fresh))
    # Every channel the mask kept is still there (groups and min_channels only add).
    for asked, kept in zip(masks, plan.masks, strict=True):
        assert np.all(kept[asked])


@pytest.mark.parametrize("name,shape,options", FAMILIES)
def test_all_ones_mask_gives_an_identical_model(name, shape, options):
    model, variables = trained_like(name, shape)
    masks = [np.ones(s.shape[0], bool) for s in bn_scales(model, variables["params"])]
    narrow, narrow_variables, plan = cut_ticket(model, variables, masks, **options)
    assert jax.tree.map(np.shape, narrow_variables) == jax.tree.map(np.shape, variables)
    for a, b in zip(jax.tree.leaves(narrow_variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not plan.rescued and not plan.rounded


def test_vgg_widths_and_parameter_count_follow_the_masks():
    model, variables = trained_like("vgg_tiny", (8, 8, 1))
    masks = [np.arange(8) < 3, np.arange(16) % 2 == 0, np.arange(16) < 5]
    narrow, narrow_variables, _ = cut_ticket(model, variables, masks)
    assert narrow.cfg == (3, "M", 8, 5)
    n_params = sum(x.size for x in jax.tree.leaves(narrow_variables["params"]))
    convs = 9 * (1 * 3 + 3 * 8 + 8 * 5)
    assert n_params == convs + 2 * (3 + 8 + 5) + 5 * 10 + 10


def test_preresnet_selection_reads_the_kept_input_channels():
    model, variables = trained_like("preresnet_tiny", (8, 8, 3))
    masks = [np.zeros(s.shape[0], bool) for s in bn_scales(model, variables["params"])]
    masks[0][[2, 5, 7]] = True  # stage0_block0_bn1 (16 input channels)
    narrow, narrow_variables, plan = cut_ticket(model, variables, masks)
    assert narrow.selections[0] == (2, 5, 7)
    assert narrow_variables["params"]["stage0_block0_bn1"]["scale"].shape == (16,)  # full
    kernel = np.asarray(variables["params"]["stage0_block0_conv1"]["kernel"])
    rescued = plan.kept[("inner", 0, 0)]  # bn2's mask was empty: its best channel stays
    assert len(rescued) == 1 and "stage0_block0_bn2" in plan.rescued
    np.testing.assert_array_equal(
        narrow_variables["params"]["stage0_block0_conv1"]["kernel"],
        kernel[:, :, [2, 5, 7]][..., rescued],
    )


def test_min_channels_keeps_the_largest_scales_alive():
    model, variables = trained_like("vgg_tiny", (8, 8, 1))
    scales = [np.asarray(s) for s in bn_scales(model, variables["params"])]
    masks = [np.ones(8, bool), np.zeros(16, bool), np.ones(16, bool)]
    plan = plan_cut(model, variables["params"], masks, min_channels=3)
    assert plan.rescued == ["bn1"]
    np.testing.assert_array_equal(plan.kept[("conv", 1)], np.sort(np.argsort(-scales[1])[:3]))
    assert plan.widths["cfg"] == (8, "M", 3, 16)


def test_round_to_adds_the_next_largest_scales():
    model, variables = trained_like("vgg_tiny", (8, 8, 1))
    scales = [np.asarray(s) for s in bn_scales(model, variables["params"])]
    asked = np.zeros(16, bool)
    asked[[0, 1, 2]] = True
    masks = [np.ones(8, bool), asked, np.arange(16) < 16]
    plan = plan_cut(model, variables["params"], masks, round_to=8)
    kept = plan.kept[("conv", 1)]
    assert len(kept) == 8 and {0, 1, 2} <= set(kept.tolist())
    extra = sorted(set(kept.tolist()) - {0, 1, 2})
    others = np.array([c for c in range(16) if c not in (0, 1, 2)])
    assert extra == sorted(others[np.argsort(-scales[1][others])[:5]].tolist())
    assert plan.widths["cfg"] == (8, "M", 8, 16) and plan.rounded == ["bn1"]


def test_rewind_cuts_the_initial_weights_with_the_same_plan():
    model, trained = trained_like("vgg_tiny", (8, 8, 1))
    initial = train_steps.init_variables(model, jax.random.key(0), (8, 8, 1))
    masks = [np.arange(8) < 4, np.arange(16) >= 10, np.arange(16) % 3 == 0]
    plan = plan_cut(model, trained["params"], masks)
    _, rewound = apply_cut(model, initial, plan)
    kernel = np.asarray(initial["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(rewound["params"]["conv1"]["kernel"], kernel[:, :, :4, 10:])


def test_masks_of_the_wrong_length_or_family_are_clear_errors():
    model, variables = trained_like("vgg_tiny", (8, 8, 1))
    with pytest.raises(ValueError, match="got 2 masks for the 3 BN layers of this VGG"):
        plan_cut(model, variables["params"], [np.ones(8, bool), np.ones(16, bool)])
    with pytest.raises(ValueError, match="the mask for BN layer bn1 has 15 channels"):
        plan_cut(model, variables["params"], [np.ones(8), np.ones(15), np.ones(16)])
    with pytest.raises(ValueError, match="min_channels must be >= 1"):
        plan_cut(model, variables["params"], [np.ones(8), np.ones(16), np.ones(16)], min_channels=0)


def test_exported_ticket_loads_with_no_other_input(tmp_path):
    from eb_jax.ticket.export import load_ticket, save_ticket

    model, variables = trained_like("resnet_tiny_bottleneck", (16, 16, 3))
    masks = [
        np.random.default_rng(3).random(s.shape[0]) < 0.4
        for s in bn_scales(model, variables["params"])
    ]
    narrow, narrow_variables, plan = cut_ticket(model, variables, masks, prune_residual=True)
    save_ticket(
        str(tmp_path / "ticket"),
        "resnet_tiny_bottleneck",
        narrow,
        narrow_variables,
        10,
        (16, 16, 3),
        ratio=0.4,
        epoch=7,
    )
    loaded, loaded_variables, meta = load_ticket(str(tmp_path / "ticket"))
    assert loaded.stage_widths == narrow.stage_widths and loaded.inner_widths == narrow.inner_widths
    assert meta["ticket"] == {"ratio": 0.4, "epoch": 7}
    images = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        loaded.apply(loaded_variables, images), narrow.apply(narrow_variables, images)
    )


@pytest.mark.parametrize(
    "name, shape, exact_at",
    [
        ("vgg_tiny", (8, 8, 1), "conv2"),  # the last conv: into the classifier's bias
        ("resnet_tiny_bottleneck", (16, 16, 3), "stage1_block0_conv2"),  # into bn3's mean
    ],
)
def test_zeroed_filters_cut_where_their_offsets_fold_exactly_compute_the_same(
    name, shape, exact_at
):
    """SFP's zeroed filters output relu(BN offset): cut where that constant folds
    exactly, the network computes what the zeroed one does; unfolded, it does not."""
    from eb_jax.prune.sfp import soft_prune
    from eb_jax.ticket.groups import masks_for_bns
    from eb_jax.ticket.surgery import fold_constant_channels

    model, variables = trained_like(name, shape)
    params = soft_prune(model, jax.tree.map(np.array, variables["params"]), 0.5)
    zeroed = {"params": params, "batch_stats": variables["batch_stats"]}
    bn = exact_at.replace("conv", "bn")
    keep = {bn: np.any(params[exact_at]["kernel"] != 0, axis=(0, 1, 2))}
    plan = plan_cut(model, params, masks_for_bns(model, params, keep))
    narrow, cut = apply_cut(model, zeroed, plan)
    folded, count, left = fold_constant_channels(model, zeroed, plan, cut)
    assert count > 0 and left == 0
    images = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    expected = jax.jit(model.apply)(zeroed, images)
    apply = jax.jit(narrow.apply)
    np.testing.assert_allclose(apply(folded, images), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(apply(cut, images), expected, atol=1e-5)  # the offsets lost


def test_offsets_behind_a_padded_conv_are_counted_as_lost_not_folded():
    from eb_jax.prune.sfp import hard_prune_masks, soft_prune
    from eb_jax.ticket.surgery import fold_constant_channels

    model, variables = trained_like("vgg_tiny", (8, 8, 1))
    params = soft_prune(model, jax.tree.map(np.array, variables["params"]), 0.5)
    zeroed = {"params": params, "batch_stats": variables["batch_stats"]}
    plan = plan_cut(model, params, hard_prune_masks(model, params, 0.5))
    _, cut = apply_cut(model, zeroed, plan)
    _, folded, left = fold_constant_channels(model, zeroed, plan, cut)
    widths = [c for c in model.cfg if c != "M"]
    removed = [w // 2 for w in widths]
    assert 0 < folded <= removed[-1] and 0 < left <= sum(removed[:-1])
