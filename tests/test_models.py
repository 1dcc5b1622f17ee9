"""Models: presets build and train, widths set parameter shapes, BN scales in order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eb_jax import train_steps
from eb_jax.config import default_config
from eb_jax.models import MODELS, bn_scales, create_model
from eb_jax.models.layers import BN_MOMENTUM, Conv, batch_norm, max_pool_2x2

TINY = {
    "vgg_tiny": (8, 8, 1),
    "vgg_small": (8, 8, 1),
    "preresnet_tiny": (8, 8, 3),
    "resnet_tiny": (16, 16, 3),
    "resnet_tiny_bottleneck": (16, 16, 3),
}
# The paper's networks: BN channel totals from docs/method.md.
FULL = {
    "vgg16": ((32, 32, 3), 13, 4224),
    "preresnet101": ((32, 32, 3), 100, 7408),
    "resnet18": ((64, 64, 3), 20, 4800),
    "resnet50": ((64, 64, 3), 53, 26560),
}


def _state(model, shape, **overrides):
    config = default_config()
    config.update(overrides)
    tx = train_steps.create_optimizer(config, steps_per_epoch=10)
    return train_steps.create_train_state(model, jax.random.key(0), shape, tx)


def _batch(shape, n=4, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, *shape)).astype(np.float32),
        "label": rng.integers(0, classes, n).astype(np.int32),
    }


def test_every_preset_is_covered():
    others = {"vgg11", "vgg13", "vgg19", "preresnet164"}
    vits = {"vit_ti16", "vit_s16", "vit_b16", "vit_cifar", "vit_digits", "vit_tiny"}  # test_vit.py
    assert set(TINY) | set(FULL) | others | vits == set(MODELS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_preset_takes_a_train_step(name):
    shape = TINY[name]
    model = create_model(name, num_classes=10)
    state = _state(model, shape)
    step = jax.jit(train_steps.train_step)
    new_state, metrics = step(state, _batch(shape))
    assert int(new_state.step) == 1
    assert int(metrics["count"]) == 4 and np.isfinite(float(metrics["loss_sum"]))
    changed = lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b)))  # noqa: E731 (host)
    assert all(jax.tree.leaves(jax.tree.map(changed, state.params, new_state.params)))
    assert all(jax.tree.leaves(jax.tree.map(changed, state.batch_stats, new_state.batch_stats)))


@pytest.mark.parametrize("name", sorted(FULL))
def test_paper_network_traces_a_train_step_with_its_bn_layout(name):
    """The full networks, abstractly (no compile): BN layers, channel totals, a step."""
    shape, n_bn, total = FULL[name]
    model = create_model(name, num_classes=10)
    config = default_config()
    tx = train_steps.create_optimizer(config, 10)

    def init_and_step(batch):
        variables = model.init(jax.random.key(0), batch["image"][:1])
        state = train_steps.TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )
        return state, train_steps.train_step(state, batch)

    state, (new_state, metrics) = jax.eval_shape(init_and_step, _batch(shape, n=2))
    scales = bn_scales(model, state.params)
    assert len(scales) == n_bn and sum(s.shape[0] for s in scales) == total
    assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)
    assert metrics["loss_sum"].shape == ()


def test_bn_scales_follow_module_order_and_init():
    model = create_model("resnet_tiny_bottleneck", 10)
    variables = train_steps.init_variables(model, jax.random.key(0), (16, 16, 3))
    paths = model.bn_paths()
    # torchvision order inside a bottleneck: bn1, bn2, bn3, then the downsample's BN.
    assert [p[0] for p in paths[:5]] == [
        "stem_bn",
        "stage0_block0_bn1",
        "stage0_block0_bn2",
        "stage0_block0_bn3",
        "stage0_block0_down_bn",
    ]
    scales = bn_scales(model, variables["params"])
    assert all(np.all(np.asarray(s) == 1.0) for s in scales)  # ImageNet ResNets: scale 1
    vgg = create_model("vgg_tiny", 10)
    v = train_steps.init_variables(vgg, jax.random.key(0), (8, 8, 1))
    assert [s.shape[0] for s in bn_scales(vgg, v["params"])] == [8, 16, 16]
    assert all(np.all(np.asarray(s) == 0.5) for s in bn_scales(vgg, v["params"]))


def _shapes(model, shape):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    return jax.tree.map(lambda x: x.shape, variables["params"])


def test_vgg_widths_set_parameter_shapes():
    shapes = _shapes(create_model("vgg_tiny", 10, cfg=(3, "M", 5, 7)), (8, 8, 1))
    assert shapes["conv0"]["kernel"] == (3, 3, 1, 3)
    assert shapes["conv1"]["kernel"] == (3, 3, 3, 5)
    assert shapes["conv2"]["kernel"] == (3, 3, 5, 7)
    assert shapes["bn2"]["scale"] == (7,)
    assert shapes["classifier"]["kernel"] == (7, 10)


def test_preresnet_widths_and_selections_set_parameter_shapes():
    inner = ((4, 5), (6, 7), (8, 9))
    selections = ((0, 3, 5), None, tuple(range(0, 128, 2)), (1, 2))
    model = create_model("preresnet_tiny", 10, inner_widths=inner, selections=selections)
    shapes = _shapes(model, (8, 8, 3))
    assert shapes["stage0_block0_bn1"]["scale"] == (16,)  # block-input BN stays full width
    assert shapes["stage0_block0_conv1"]["kernel"] == (1, 1, 3, 4)  # reads the 3 selected
    assert shapes["stage0_block0_conv2"]["kernel"] == (3, 3, 4, 5)
    assert shapes["stage0_block0_conv3"]["kernel"] == (1, 1, 5, 64)  # residual width kept
    assert shapes["stage1_block0_conv1"]["kernel"] == (1, 1, 64, 6)
    assert shapes["stage2_block0_conv1"]["kernel"] == (1, 1, 64, 8)
    assert shapes["bn_final"]["scale"] == (256,)
    assert shapes["fc"]["kernel"] == (2, 10)


def test_resnet_widths_set_parameter_shapes():
    model = create_model(
        "resnet_tiny_bottleneck",
        10,
        stem_width=3,
        stage_widths=(10, 11, 12, 13),
        inner_widths=((2, 4), (5, 6), (7, 8), (9, 1)),
    )
    shapes = _shapes(model, (16, 16, 3))
    assert shapes["stem_conv"]["kernel"] == (7, 7, 3, 3)
    assert shapes["stage0_block0_conv1"]["kernel"] == (1, 1, 3, 2)
    assert shapes["stage0_block0_conv2"]["kernel"] == (3, 3, 2, 4)
    assert shapes["stage0_block0_conv3"]["kernel"] == (1, 1, 4, 10)
    assert shapes["stage0_block0_down_conv"]["kernel"] == (1, 1, 3, 10)
    assert shapes["stage3_block0_conv2"]["kernel"] == (3, 3, 9, 1)
    assert shapes["fc"]["kernel"] == (13, 10)


def test_wrong_number_of_widths_is_a_clear_error():
    model = create_model("preresnet_tiny", 10, inner_widths=((4, 5),))
    with pytest.raises(ValueError, match="inner_widths needs 3 entries"):
        _shapes(model, (8, 8, 3))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'vgg99'; choose one of"):
        create_model("vgg99", 10)


@pytest.mark.parametrize(
    "hw,kernel,stride", [(2, 3, 1), (4, 3, 1), (7, 3, 2), (6, 1, 2), (9, 7, 2)]
)
def test_conv_implementations_agree_and_share_parameters(hw, kernel, stride):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, hw, hw, 5)), jnp.float32)
    outs, params = {}, {}
    for impl in ("xla", "patches"):
        conv = Conv(6, kernel, stride, impl=impl)
        params[impl] = conv.init(jax.random.key(1), x)
        outs[impl] = conv.apply(params[impl], x)
    np.testing.assert_array_equal(
        params["xla"]["params"]["kernel"], params["patches"]["params"]["kernel"]
    )
    np.testing.assert_allclose(outs["xla"], outs["patches"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])
def test_max_pool_2x2_matches_flax_bit_for_bit_with_ties(hw):
    # Small integers after a ReLU: many windows hold equal maxima (zeros above all), where
    # the whole gradient must go to the window's first maximum in row-major order.
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.integers(-3, 3, (2, *hw, 3)), 0), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, hw[0] // 2, hw[1] // 2, 3)), jnp.float32)
    outs = {}
    for name, pool in {
        "flax": lambda x: nn.max_pool(x, (2, 2), (2, 2)),
        "ours": max_pool_2x2,
    }.items():
        y, vjp = jax.vjp(jax.jit(pool), x)
        outs[name] = (y, vjp(g)[0])
    np.testing.assert_array_equal(outs["ours"][0], outs["flax"][0])
    np.testing.assert_array_equal(outs["ours"][1], outs["flax"][1])
    assert int(jnp.sum(outs["ours"][1] != 0)) == g.size  # one gradient per window
    # ... and on CPU without XLA's slow reduce-window / select-and-scatter.
    program = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(max_pool_2x2(x))))(x))
    assert "reduce_window" not in program and "select_and_scatter" not in program


def test_preresnet_channel_selection_gradient_has_no_scatter():
    # A selection's gradient is a gather, or on CPU a 0/1 matmul (XLA runs a scatter-add
    # slowly on CPU); its values are checked against autodiff's in the BatchNorm test below.
    model = create_model("preresnet_tiny", 10)
    rng = np.random.default_rng(0)
    # Three blocks (inputs of 16, 64 and 128 channels) and the head (256).
    keep = [tuple(sorted(rng.choice(c, c // 2, replace=False))) for c in (16, 64, 128, 256)]
    model = model.clone(selections=tuple(keep))
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    variables = train_steps.init_variables(model, jax.random.key(0), x.shape[1:])

    def loss(params, x):
        y, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y**2)

    program = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(variables["params"], x))
    assert "scatter" not in program
    assert model.apply(variables, x).shape == (2, 10)


class _BN(nn.Module):
    """eb_jax's BatchNorm(+selection)(+ReLU), or with `flax` Flax's, then jnp.take, nn.relu."""

    flax: bool
    train_mode: bool
    dtype: object
    relu: bool
    select: tuple | None = None

    @nn.compact
    def __call__(self, x):
        if not self.flax:
            return batch_norm(self.train_mode, 0.5, "bn", self.dtype, self.relu, self.select)(x)
        y = nn.BatchNorm(
            use_running_average=not self.train_mode,
            momentum=BN_MOMENTUM,
            epsilon=1e-5,
            scale_init=nn.initializers.constant(0.5),
            dtype=self.dtype,
            name="bn",
        )(x)
        if self.select is not None:
            y = jnp.take(y, np.asarray(self.select), axis=-1)
        return nn.relu(y) if self.relu else y


@settings(max_examples=16, deadline=None, derandomize=True)
@given(
    relu=st.booleans(),
    bf16=st.booleans(),
    shift=st.floats(-3, 3),
    spread=st.floats(0.1, 10),
    shape=st.sampled_from([(4, 5, 5, 3), (2, 3, 7, 16), (8, 2, 2, 1)]),
    selecting=st.booleans(),
)
def test_batch_norm_equals_flaxs_in_values_statistics_and_gradients(
    relu, bf16, shift, spread, shape, selecting
):
    """The hand-written BatchNorm(+selection)(+ReLU) against Flax's BatchNorm, then
    jnp.take and nn.relu under autodiff: output, running statistics after a step,
    gradients of params and input, eval mode."""
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    rng = np.random.default_rng(0)
    select = None
    if selecting:  # a random ascending subset, at least one channel
        select = tuple(sorted(rng.choice(shape[-1], max(1, shape[-1] // 2), replace=False)))
    x = jnp.asarray(rng.standard_normal(shape) * spread + shift, jnp.float32).astype(dtype)
    kept = shape[-1] if select is None else len(select)
    g = jnp.asarray(rng.standard_normal((*shape[:-1], kept)), jnp.float32).astype(dtype)
    ours, theirs = _BN(False, True, dtype, relu, select), _BN(True, True, dtype, relu, select)
    variables = jax.jit(theirs.init)(jax.random.key(0), x)  # one compile, not one per op
    assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(0), x)) == (
        jax.tree.map(jnp.shape, variables)
    )
    variables = {  # trained-like scales and biases, some negative
        "params": {
            "bn": {
                "scale": jnp.asarray(rng.uniform(-1, 1, shape[-1]), jnp.float32),
                "bias": jnp.asarray(rng.uniform(-1, 1, shape[-1]), jnp.float32),
            }
        },
        "batch_stats": variables["batch_stats"],
    }

    outs = {}
    for name, module in (("ours", ours), ("flax", theirs)):

        def loss(params, x, module=module):
            y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), (y, updates)

        (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            variables["params"], x
        )
        outs[name] = (y, updates, grads)
    tol = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    (y, updates, grads), (fy, fupdates, fgrads) = outs["ours"], outs["flax"]
    assert y.dtype == fy.dtype == dtype
    np.testing.assert_allclose(np.float32(y), np.float32(fy), **tol)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates, fupdates
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), **tol), grads, fgrads
    )
    stats = {**variables, "batch_stats": fupdates["batch_stats"]}  # eval with trained stats
    ours_eval = jax.jit(_BN(False, False, dtype, relu, select).apply)(stats, x)
    flax_eval = jax.jit(_BN(True, False, dtype, relu, select).apply)(stats, x)
    np.testing.assert_allclose(np.float32(ours_eval), np.float32(flax_eval), **tol)


@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_convolution_gradients_equal_autodiffs(stride):
    """On CPU a 1x1 convolution's gradients are matmuls (hand-written); they equal
    autodiff's through XLA's convolution."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 6, 6, 5)), jnp.float32)
    conv = Conv(7, 1, stride, 0, impl="xla")
    variables = conv.init(jax.random.key(0), x)
    dy = jnp.asarray(rng.standard_normal(conv.apply(variables, x).shape), jnp.float32)

    def reference(variables, x):
        kernel = variables["params"]["kernel"]
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), [(0, 0)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    outs = {}
    for name, f in (("ours", conv.apply), ("autodiff", reference)):
        y, vjp = jax.vjp(jax.jit(f), variables, x)
        outs[name] = (y, *vjp(dy))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        outs["ours"],
        outs["autodiff"],
    )
    program = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(conv.apply(v, x))))(variables))
    assert "dot_general" in program  # the hand-written gradient ran (CPU)
