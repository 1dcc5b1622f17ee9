"""The Colab notebooks run top to bottom (on CPU, with shorter schedules)."""

import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from eb_jax import report

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = {
    "quickstart": 5,
    "mask_distance": 5,
    "surgery": 2,
    "reproduce_paper": 2,
    "bring_your_own_model": 2,
    "vit_early_bird": 2,
}
# Extra parameters for the test's shorter runs: the tiny VGG instead of the quickstart's
# (the grid notebook at one ratio); the ViT notebook on the 2-block ViT.
TINY_VGG = '\nMODEL = "vgg_tiny"'
EXTRA = {
    "quickstart": TINY_VGG,
    "mask_distance": TINY_VGG,
    "surgery": TINY_VGG,
    "reproduce_paper": TINY_VGG + "\nFIG1_RATIOS = (0.5,)",
    "bring_your_own_model": "\nTICKET_EPOCH = 1",  # drawn early enough to retrain
    "vit_early_bird": '\nMODEL = "vit_tiny"',
}


@pytest.mark.parametrize("name", sorted(EPOCHS))
def test_notebook_runs_top_to_bottom(name, tmp_path, data_dir):
    book = nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)
    parameters = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1, "one cell tagged 'parameters' (papermill's convention)"
    workdir = str(tmp_path / "run")
    source = f"EPOCHS = {EPOCHS[name]}\nWORKDIR = {workdir!r}\nDATA_DIR = {data_dir!r}"
    source += EXTRA.get(name, "")
    parameters[0].source = source
    client = NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots were drawn
    assert (tmp_path / "run").is_dir()
    if name == "reproduce_paper":  # its Table 2 grid, end to end
        assert_table2_is_its_runs(pathlib.Path(workdir) / "table2")


def assert_table2_is_its_runs(directory) -> None:
    """A finished table2 grid at p = 0.5 (the reproduce_paper notebook's): every cell is
    its run's report.json, the improvement row follows from the cells, and table2.md has
    a row per run."""
    table = json.loads((directory / "table2.json").read_text())
    assert len(table["runs"]) == 8
    for cell in table["runs"]:
        saved = report.read_reports([str(directory / cell["run"])])[0]
        assert cell["test_accuracy"] == saved["test_accuracy"]
        assert cell["training_pflops"] == saved["training_pflops"]
    by_row = {c["row"]: c for c in table["runs"]}
    baselines = ("LT (one-shot)", "SNIP", "NS", "ThiNet")
    best = max(by_row[b]["test_accuracy"] for b in baselines)
    improvement = table["improvement"]["0.5"]
    assert improvement["accuracy_points"] == pytest.approx(
        100 * (by_row["EB Train (FF)"]["test_accuracy"] - best)
    )
    cheapest = min(by_row[b]["training_pflops"] for b in baselines)
    eb = min(c["training_pflops"] for r, c in by_row.items() if r.startswith("EB"))
    assert improvement["flops_x"] == pytest.approx(cheapest / eb)
    markdown = (directory / "table2.md").read_text()
    assert markdown.count("\n| ") == 1 + 8 + 1 and "n/a" in markdown  # no meter here
