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


def test_ruff_format_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", ROOT], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


# docs/design.md's layers, top first: a module may import its own layer and those below.
LAYERS = [
    ["main", "experiments"],
    ["pipeline"],
    ["stage_runner"],
    ["report", "paper_outputs"],
    ["epoch_loop", "run_state", "config", "methods"],
    [
        "prune",
        "ticket",
        "cost",
        "checkpoint",
        "train_steps",
        "parallel",
        "preemption",
        "data",
        "models",
        "lowp",
        "platform",
    ],
    ["names", "runlog", "energy"],
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("eb_jax.") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"eb_jax.{top} is in no layer of docs/design.md")


def _eb_jax_imports(path: str) -> set[str]:
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eb_jax"):
            if node.module == "eb_jax":
                found.update(f"eb_jax.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("eb_jax."))
    return found


def test_imports_run_one_way_from_higher_layers_to_lower():
    package = os.path.join(ROOT, "eb_jax")
    upward = []
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            if module == "eb_jax":
                continue
            for imported in _eb_jax_imports(path):
                if _layer(imported) < _layer(module):
                    upward.append(f"{module} -> {imported}")
    assert not upward, upward


def test_nothing_points_outside_the_repository():
    pattern = ("PAPER.md", "DESIGN.md", "../shared")
    hits = []
    for top in ("eb_jax", "tests", "benchmarks", "configs", "colab", "docs", "README.md"):
        path = os.path.join(ROOT, top)
        files = (
            [path]
            if os.path.isfile(path)
            else [
                os.path.join(d, f)
                for d, _, fs in os.walk(path)
                for f in fs
                if f.endswith((".py", ".md", ".ipynb"))
            ]
        )
        for file in files:
            if file == os.path.abspath(__file__):
                continue
            with open(file) as f:
                text = f.read()
            hits += [f"{os.path.relpath(file, ROOT)}: {p}" for p in pattern if p in text]
    assert not hits, hits


def _definitions():
    """(where, node) for every function and class in eb_jax/."""
    import ast

    for folder, _, files in os.walk(os.path.join(ROOT, "eb_jax")):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                        yield f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}", node


def _constructor_parameters(node) -> int:
    """An __init__'s parameters, or a dataclass's fields that have no default (what a
    caller must pass)."""
    import ast

    if isinstance(node, ast.FunctionDef):
        return len(node.args.args) - 1 + len(node.args.kwonlyargs)
    fields = [s for s in node.body if isinstance(s, ast.AnnAssign)]
    return sum(s.value is None for s in fields)


def test_no_long_function_big_class_or_wide_constructor():
    import ast

    too_big = []
    for where, node in _definitions():
        lines = node.end_lineno - node.lineno + 1
        if isinstance(node, ast.FunctionDef) and lines > 50:
            too_big.append(f"{where}: a function of {lines} lines (at most 50)")
        if isinstance(node, ast.ClassDef) and lines > 150:
            too_big.append(f"{where}: a class of {lines} lines (at most 150)")
        is_dataclass = isinstance(node, ast.ClassDef) and any(
            "dataclass" in ast.unparse(d) for d in node.decorator_list
        )
        if (node.name == "__init__" or is_dataclass) and _constructor_parameters(node) > 6:
            too_big.append(f"{where}: a constructor of {_constructor_parameters(node)} parameters")
    assert not too_big, too_big
