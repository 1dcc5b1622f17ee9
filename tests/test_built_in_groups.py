"""The built-in families' coupling groups come from the trace (ticket/groups.py). Their
hand declarations, as eb_jax had them, stay here only to prove the traced groups are
exactly those: the same widths, members, order and cut axes."""

import pytest

from eb_jax.models import create_model
from eb_jax.models.preresnet import PreResNet
from eb_jax.models.resnet import ResNet
from eb_jax.models.vgg import VGG
from eb_jax.ticket.groups import Group, channel_groups


def declared_groups(model, prune_residual: bool) -> list[Group]:
    if isinstance(model, VGG):
        return _vgg_groups(model)
    if isinstance(model, PreResNet):
        return _preresnet_groups(model)
    assert isinstance(model, ResNet)
    return _resnet_groups(model, prune_residual)


def _vgg_groups(model: VGG) -> list[Group]:
    n = len(model.conv_widths())
    groups = []
    for i in range(n):
        consumer = (f"conv{i + 1}", "kernel", 2) if i + 1 < n else ("classifier", "kernel", 0)
        groups.append(Group(("conv", i), (f"bn{i}",), ((f"conv{i}", "kernel", 3), consumer)))
    return groups


def _preresnet_groups(model: PreResNet) -> list[Group]:
    groups = []
    for i, blk in enumerate(model.block_names()):
        groups += [
            Group(("select", i), (f"{blk}_bn1",), ((f"{blk}_conv1", "kernel", 2),), select=True),
            Group(
                ("inner", i, 0),
                (f"{blk}_bn2",),
                ((f"{blk}_conv1", "kernel", 3), (f"{blk}_conv2", "kernel", 2)),
            ),
            Group(
                ("inner", i, 1),
                (f"{blk}_bn3",),
                ((f"{blk}_conv2", "kernel", 3), (f"{blk}_conv3", "kernel", 2)),
            ),
        ]
    n = len(model.block_names())
    groups.append(Group(("select", n), ("bn_final",), (("fc", "kernel", 0),), select=True))
    return groups


def _resnet_groups(model: ResNet, prune_residual: bool) -> list[Group]:
    groups, i = [], 0
    last = 3 if model.block == "bottleneck" else 2
    for s, n in enumerate(model.stage_sizes):
        for b in range(n):
            blk = f"stage{s}_block{b}"
            for j in range(1, last):  # the block interior: conv_j's outputs
                groups.append(
                    Group(
                        ("inner", i, j - 1),
                        (f"{blk}_bn{j}",),
                        ((f"{blk}_conv{j}", "kernel", 3), (f"{blk}_conv{j + 1}", "kernel", 2)),
                    )
                )
            i += 1
    if prune_residual:
        groups += _residual_groups(model, last)
    return groups


def _residual_groups(model: ResNet, last: int) -> list[Group]:
    """One group per residual stream: every layer that adds into it, and its readers."""

    def readers(s):  # the convs that read stage s's input stream
        if s == len(model.stage_sizes):
            return [("fc", "kernel", 0)]
        cuts = [(f"stage{s}_block0_conv1", "kernel", 2)]
        return cuts + (
            [(f"stage{s}_block0_down_conv", "kernel", 2)] if model.has_downsample(s, 0) else []
        )

    groups = []
    stem_joins_stage0 = not model.has_downsample(0, 0)  # basic blocks: identity from the stem
    if not stem_joins_stage0:
        groups.append(Group(("stem",), ("stem_bn",), (("stem_conv", "kernel", 3), *readers(0))))
    for s, n in enumerate(model.stage_sizes):
        bns, cuts = [], []
        if s == 0 and stem_joins_stage0:
            bns, cuts = ["stem_bn"], [("stem_conv", "kernel", 3)]
        for b in range(n):
            blk = f"stage{s}_block{b}"
            bns.append(f"{blk}_bn{last}")
            cuts.append((f"{blk}_conv{last}", "kernel", 3))
            if model.has_downsample(s, b):
                bns.append(f"{blk}_down_bn")
                cuts.append((f"{blk}_down_conv", "kernel", 3))
            if b > 0 or (s == 0 and stem_joins_stage0):  # reads this stage's own stream
                cuts.append((f"{blk}_conv1", "kernel", 2))
        groups.append(Group(("stage", s), tuple(bns), tuple(cuts + readers(s + 1))))
    return groups


@pytest.mark.parametrize(
    "name,prune_residual",
    [
        ("vgg_tiny", False),
        ("vgg16", False),
        ("preresnet_tiny", False),
        ("resnet_tiny", False),
        ("resnet_tiny", True),  # basic blocks: the stem adds into stage 0's stream
        ("resnet_tiny_bottleneck", True),  # the stem's own stream
        ("resnet50", False),
        ("resnet50", True),
    ],
)
def test_traced_groups_are_the_hand_declared_ones(name, prune_residual):
    model = create_model(name, 10)
    traced = channel_groups(model, prune_residual)
    declared = declared_groups(model, prune_residual)
    assert [(g.key, g.bns, g.select) for g in traced] == [
        (g.key, g.bns, g.select) for g in declared
    ]
    for t, d in zip(traced, declared, strict=True):  # a residual stream lists its axes in
        assert sorted(t.cuts) == sorted(d.cuts), t.key  # another order: the cut is the same
        if len(t.bns) == 1:
            assert t.cuts == d.cuts  # producer first: what producer() and exact_fold() read


def test_a_pruned_preresnet_has_the_dense_one_s_groups_and_its_own_selections():
    model = create_model("preresnet_tiny", 10)
    kept = tuple(range(0, 64, 2))
    narrow = model.clone(selections=(kept,) * (len(model.block_names()) + 1))
    assert channel_groups(narrow) == channel_groups(model)
