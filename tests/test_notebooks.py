"""The Colab notebooks run top to bottom (on CPU, with shorter schedules)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # end-to-end runs: pytest -m 'not slow' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = {
    "quickstart": 5,
    "mask_distance": 5,
    "surgery": 2,
    "reproduce_paper": 2,
    "bring_your_own_model": 3,
    "vit_early_bird": 2,
}
# Extra parameters for the test's shorter runs: the grid notebook on the tiny VGG, one ratio.
EXTRA = {
    "reproduce_paper": '\nMODEL = "vgg_tiny"\nFIG1_RATIOS = (0.5,)',
    "bring_your_own_model": "\nTICKET_EPOCH = 1",  # drawn early enough to retrain
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
