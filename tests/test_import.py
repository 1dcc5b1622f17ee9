"""Importing eb_jax leaves the process as it was: entry points configure it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every eb_jax module, then prints whether XLA_FLAGS changed and whether JAX
# started a backend (any computation or pmap built on import would start it).
PROBE = """
import importlib, os, pkgutil
before = os.environ.get("XLA_FLAGS", "")
import eb_jax
for module in pkgutil.walk_packages(eb_jax.__path__, "eb_jax."):
    importlib.import_module(module.name)
from jax._src import xla_bridge
print(os.environ.get("XLA_FLAGS", "") == before, xla_bridge.backends_are_initialized())
"""


@pytest.mark.slow  # a subprocess
def test_importing_eb_jax_changes_no_process_state():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    flags_unchanged, backend_started = result.stdout.split()
    assert flags_unchanged == "True"  # no XLA flag set
    assert backend_started == "False"  # no computation, no pmap built: JAX not started
