"""The tree is lint-clean, and CI runs exactly the README's test command."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", ROOT],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        head = f.read().split("```")[1]  # the first code block holds the two commands
    return [line.strip() for line in head.splitlines() if line.strip().startswith("python")]


def test_ci_runs_the_readme_test_command():
    quickstart, tests = _readme_commands()
    assert "eb_jax.main" in quickstart and "pytest" in tests
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert tests in f.read()
