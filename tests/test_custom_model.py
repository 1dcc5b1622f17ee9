"""A user's own linen network named `package.module:Factory`: EB Train end to end on it,
resumed after the cut to the same result, rebuilt by `load_model`; the one-line errors."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import assert_same_run, run_through_kills, tiny_config

from eb_jax import cost, pipeline, train_steps
from eb_jax.checkpoint import load_model
from eb_jax.config import ConfigError, validate
from eb_jax.models import create_model

MOBILENET = "zoo:mobilenet_v2_tiny"  # tests/ is on the path, as for conftest


def not_a_module(num_classes):
    """A factory that returns something else."""
    return {"classes": num_classes}


def n_params(report):
    return report["params"]["final"]


def _config(data_dir, **overrides):
    return tiny_config(
        data_dir,
        model=MOBILENET,
        method="eb",
        num_epochs=3,
        ticket_epoch=1,
        prune_ratio=0.5,
        **overrides,
    )


@pytest.mark.slow
def test_eb_on_a_custom_mobilenet_resumes_after_the_cut(tmp_path, data_dir, interrupt_after):
    config = _config(data_dir)
    straight = pipeline.run(config, str(tmp_path / "straight"))
    assert straight["ticket_epoch"] == 1
    assert straight["params"]["final"] < straight["params"]["dense"]

    interrupt_after([2])  # the first epoch of the retrained, cut network
    resumed = run_through_kills(config, tmp_path / "killed", kills=1)
    assert_same_run(resumed, tmp_path / "killed", straight, tmp_path / "straight")

    model, variables, meta = load_model(str(tmp_path / "killed"))
    assert meta["model"] == MOBILENET and meta["widths"]["cut_widths"]
    images = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    assert model.apply(variables, images).shape == (2, 10)
    assert sum(np.size(x) for x in jax.tree.leaves(variables["params"])) == n_params(straight)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "no_such_package.nets:Net"}, "cannot import 'no_such_package.nets'"),
        ({"model": "zoo:NoSuchNet"}, "'zoo' has no callable 'NoSuchNet'"),
        ({"model": "test_custom_model:not_a_module"}, "returned a dict, not a flax"),
        ({"model": "zoo:NoBatchNorm"}, "has no BatchNorm"),
        ({"model": "zoo:LayerNormCNN"}, "every channel group is frozen"),
        ({"model": "zoo:ResNeXt", "method": "thinet"}, "method 'thinet' needs the layer"),
        ({"model": "zoo:ResNeXt", "precision.retrain": "bf16"}, "needs a `dtype` argument"),
        ({"model": "zoo:MobileNetV2", "precision.search": "bfp8"}, "not 'bfp8'"),
    ],
)
def test_a_custom_model_that_cannot_run_is_a_one_line_error(tmp_path, data_dir, overrides, message):
    config = _config(data_dir)
    for key, value in overrides.items():
        if "." in key:
            section, field = key.split(".")
            config[section][field] = value
        else:
            config[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        validate(config, 1)
        pipeline.run(config, str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_cost_of_a_custom_model_counts_its_linen_convs():
    # At a 1x1 image every conv output is one position: one multiply-add per kernel weight.
    model = create_model("zoo:MobileNetV2", 10, image_shape=(1, 1, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), model.example_input())["params"]
    kernels = sum(math.prod(k.shape) for p, k in _leaves(params) if p[-1] == "kernel")
    assert cost.forward_cost(model, (1, 1, 3)).macs == kernels > 0


def _leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def test_bn_sparsity_on_a_custom_model_spares_its_layernorm():
    model = create_model("zoo:HalfLayerNormCNN", 10, image_shape=(4, 4, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), model.example_input())["params"]
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = train_steps.add_bn_sparsity(0.5, model.bn_paths()).update(zeros, None, params)
    moved = {path[:-1] for path, u in _leaves(updates) if np.any(u)}
    assert moved == set(model.bn_paths()) and moved
    everything, _ = train_steps.add_bn_sparsity(0.5).update(zeros, None, params)  # every 'scale'
    assert any("LayerNorm" in "/".join(p) for p, u in _leaves(everything) if np.any(u))


class ListWidths(nn.Module):
    """A network with a list field: flax cannot hash it."""

    widths: list

    @nn.compact
    def __call__(self, x, train=False):
        for width in self.widths:
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(width)(x)))
        return x


def test_a_network_that_cannot_be_hashed_still_initialises_and_trains():
    """Only eb_jax's own networks are compared by value (to share compiled programs); any
    other Module is used as itself, hashable or not."""
    model = ListWidths([4, 3])
    variables = train_steps.init_variables(model, jax.random.key(0), (5,))
    assert variables["params"]["Dense_1"]["kernel"].shape == (4, 3)
    config = _config("unused")
    tx = train_steps.create_optimizer(config, 10)
    state = train_steps.create_train_state(model, jax.random.key(0), (5,), tx)
    batch = {"image": np.ones((2, 5), np.float32), "label": np.zeros(2, np.int32)}
    state, metrics = jax.jit(train_steps.train_step)(state, batch)
    assert int(state.step) == 1 and np.isfinite(metrics["loss_sum"])
