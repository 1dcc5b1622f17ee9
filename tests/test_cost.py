"""Analytic FLOPs/params against the paper, torchvision's published counts and XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eb_jax import train_steps
from eb_jax.cost import forward_cost, training_flops, uniform_cut_flops, widest_ticket_flops
from eb_jax.models import create_model
from eb_jax.ticket.surgery import cut_ticket

CIFAR, IMAGENET = (32, 32, 3), (224, 224, 3)


def test_dense_vgg16_cifar10_training_cost_is_the_papers_15_pflops():
    cost = forward_cost(create_model("vgg16", 10), CIFAR)
    pflops = training_flops(cost.flops, 50_000, 160) / 1e15
    assert pflops == pytest.approx(15.1, abs=0.1)  # Table 2: SNIP/dense 15.1, LT 2 x 15.1
    assert cost.macs == 313_201_664  # sum of k*k*in*out*H*W over the 13 convs + the head


@pytest.mark.parametrize(
    "name, gmacs, params",
    [("resnet18", 1.814, 11_689_512), ("resnet50", 4.089, 25_557_032)],
)
def test_imagenet_resnets_match_torchvision(name, gmacs, params):
    cost = forward_cost(create_model(name, 1000), IMAGENET)
    assert cost.macs / 1e9 == pytest.approx(gmacs, abs=0.001)
    assert cost.params == params


def test_vgg_counts_by_hand():
    # vgg_tiny on 8x8x1: conv 1->8 at 8x8, pool, conv 8->16 and 16->16 at 4x4, mean, fc 16->10.
    cost = forward_cost(create_model("vgg_tiny", 10), (8, 8, 1))
    conv_macs = 9 * (1 * 8 * 64 + 8 * 16 * 16 + 16 * 16 * 16)
    macs = conv_macs + 16 * 10
    bn = 2 * (8 * 64 + 16 * 16 * 2)
    relu = 8 * 64 + 16 * 16 * 2
    pools = 4 * 8 * 16 + 16 * 16  # 2x2 max-pool to 4x4x8; global mean over 4x4x16
    assert cost.macs == macs
    assert cost.flops == 2 * macs + 10 + bn + relu + pools
    assert cost.params == 9 * (8 + 8 * 16 + 16 * 16) + 2 * (8 + 16 + 16) + 16 * 10 + 10


@pytest.mark.parametrize(
    "name, shape",
    [("vgg_tiny", (128, 128, 1)), ("preresnet_tiny", (64, 64, 3)), ("resnet_tiny", (224, 224, 3))],
)
def test_agrees_with_xla_cost_analysis(name, shape):
    # XLA skips multiply-adds on zero padding and counts BN as its own elementwise ops;
    # on large maps both effects are small (the last 7x7 maps of resnet_tiny: 3.4 %).
    model = create_model(name, 10, "xla")
    x = jnp.zeros((1, *shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    analysis = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    assert analysis["flops"] == pytest.approx(forward_cost(model, shape).flops, rel=0.05)


def test_a_cut_ticket_costs_what_its_widths_say():
    model = create_model("vgg_tiny", 10)
    variables = train_steps.init_variables(model, jax.random.key(0), (8, 8, 1))
    masks = [np.arange(n) % 2 == 0 for n in (8, 16, 16)]  # keep half of every layer
    narrow, _, _ = cut_ticket(model, variables, masks)
    cost = forward_cost(narrow, (8, 8, 1))
    assert cost.macs == 9 * (1 * 4 * 64 + 4 * 8 * 16 + 8 * 8 * 16) + 8 * 10
    assert cost.flops < forward_cost(model, (8, 8, 1)).flops / 2


def test_training_flops_is_three_forward_passes_per_image_and_epoch():
    assert training_flops(10, 7, 5) == 3 * 10 * 7 * 5


def test_cut_network_bounds_bracket_the_papers_network_slimming_ticket():
    model = create_model("vgg16", 10)
    dense = forward_cost(model, CIFAR).flops
    halved = model.clone(cfg=tuple(c if c == "M" else c - c // 2 for c in model.cfg))
    uniform = uniform_cut_flops(model, CIFAR, 0.5)
    assert uniform == forward_cost(halved, CIFAR).flops  # every layer loses floor(C / 2)
    widest = widest_ticket_flops(model, CIFAR, 0.5)
    # The paper's NS row (25.7 PF = 15.1 dense + a cut fine-tune) implies its p = 0.5
    # ticket costs 0.70 of dense: between the uniform cut and the widest ticket.
    assert uniform < 0.70 * dense < widest < dense
