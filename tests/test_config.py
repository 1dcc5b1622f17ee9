"""Methods as declared steps, and the options each method refuses as one-line errors."""

import os
import re

import pytest

from eb_jax import methods, names
from eb_jax.config import ConfigError, default_config, validate
from eb_jax.methods import Prune, Stage
from eb_jax.prune import criteria

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    config = default_config()
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "snip", "retrain": "rewind"}, "retrain='rewind' applies to method='eb' only"),
        ({"method": "thinet", "keep_searching": True}, "keep_searching applies to method='eb'"),
        ({"method": "sfp", "ticket_epoch": 3}, "ticket_epoch applies to method='eb'"),
        ({"method": "ns", "retrain_schedule": "fresh"}, "retrain_schedule applies to"),
        ({"method": "snip", "lt_granularity": "weights"}, "lt_granularity applies to method='lt'"),
        ({"method": "thinet", "round_to": 8}, "set round_to=0"),
        ({"method": "sfp", "prune_residual": True}, "prune_residual applies to"),
        ({"method": "sfp", "swa_start_epoch": 10}, "ends with a cut"),
        ({"method": "lt", "lt_granularity": "filters"}, "lt_granularity='filters' must be one"),
        ({"retrain_schedule": "later"}, "retrain_schedule='later' must be one of"),
        ({"method": "prune"}, "method='prune' must be one of"),
        ({"sparsity_stages": ("search", "finetune")}, "unknown stage(s) ['finetune']"),
        ({"method": "thinet", "thinet_images": 0}, "thinet_images=0 must be >= 1"),
    ],
)
def test_bad_combinations_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(_config(**overrides), 1)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("method", names.METHODS)
def test_every_method_is_a_valid_declaration(method):
    config = _config(method=method)
    validate(config, 1)
    phases = methods.method_phases(config)
    assert all(isinstance(s, (Stage, Prune)) for s in phases)
    assert sum(isinstance(s, Prune) for s in phases) <= 1
    assert all(s.name in names.STAGES for s in methods.stages(phases))
    prune = methods.prune_phase(phases)
    if prune is not None:
        assert prune.criterion in criteria.REGISTRY and prune.ratio == config.prune_ratio
        assert prune.start in names.RETRAIN_MODES


def test_the_pipeline_never_branches_on_the_method_name():
    with open(os.path.join(ROOT, "eb_jax", "pipeline.py")) as f:
        source = f.read()
    assert not re.search(r"config\.method\s*(==|!=|in\b)", source)
    assert "FULL_SEARCH_METHODS" not in source


def test_every_config_field_is_classified_once():
    from eb_jax.config import FREE_FIELDS, GROWABLE_FIELDS, TRAJECTORY_FIELDS

    classified = TRAJECTORY_FIELDS + GROWABLE_FIELDS + FREE_FIELDS
    assert len(classified) == len(set(classified)), "a field is in two classes"
    unclassified = set(default_config().keys()) - set(classified)
    assert not unclassified, f"classify {sorted(unclassified)} in eb_jax/config.py"
    assert not set(classified) - set(default_config().keys()), "a classified field is gone"
