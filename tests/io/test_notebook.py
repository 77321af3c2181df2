"""examples/demo.ipynb (run top to bottom on the tiny checkpoint) and the plotting helpers it uses (uio.plots)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uio.tasks import TASKS

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "demo.ipynb"
MISSING_EXTRA = 'the notebook extra is not installed (pip install -e ".[notebook]")'


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.fixture(scope="module")
def stored() -> dict:
    return json.loads(NOTEBOOK.read_text())


@pytest.fixture(scope="module")
def pyplot():
    """matplotlib drawing off screen (Agg); skips where the notebook extra is missing."""
    matplotlib = pytest.importorskip("matplotlib", reason=MISSING_EXTRA)
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_notebook_is_stored_without_outputs(stored):
    """Outputs of the test weights would be noise passed off as results (the first cell says so)."""
    cells = code_cells(stored)
    assert cells and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells)
    assert "random" in source(stored["cells"][0])


def test_notebook_has_a_section_per_task(stored):
    code = "\n".join(source(cell) for cell in code_cells(stored))
    missing = [name for name in [*TASKS, "run"] if f"runner.{name}(" not in code]
    assert not missing, f"no section calls {missing}"
    assert "ModelRunner.from_pretrained(" in code


def test_notebook_runs_top_to_bottom(conformance, tmp_path, monkeypatch):
    """Every cell runs on the tiny checkpoint and shows exactly one figure."""
    nbformat = pytest.importorskip("nbformat", reason=MISSING_EXTRA)
    nbclient = pytest.importorskip("nbclient", reason=MISSING_EXTRA)
    pytest.importorskip("ipykernel", reason=MISSING_EXTRA)
    pytest.importorskip("matplotlib", reason=MISSING_EXTRA)
    for name, value in {"UIO_DEMO_MODEL": conformance / "tiny" / "config.json",
                        "UIO_DEMO_WEIGHTS": conformance / "tiny" / "tiny.bin",
                        "UIO_DEMO_TOKENIZER": conformance / "tokenizer" / "spiece.model",
                        "UIO_DEMO_DEVICE": "cpu", "UIO_OFFLINE": "1",
                        "MPLBACKEND": "module://matplotlib_inline.backend_inline"}.items():
        monkeypatch.setenv(name, str(value))  # the kernel inherits them
    monkeypatch.delenv("UIO_DEMO_IMAGE", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in code_cells(notebook):
        figures = [out for out in cell["outputs"] if "image/png" in out.get("data", {})]
        assert len(figures) == 1, f"{len(figures)} figures from the cell:\n{source(cell)}"


def test_importing_plots_leaves_matplotlib_unloaded():
    code = "import sys, uio.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_masks_are_fitted_to_the_image(pyplot):
    from uio import plots

    image = np.zeros((100, 200, 3), np.uint8)  # padded to the bottom of a 256x256 square, rows 0-127
    square = np.zeros((256, 256), bool)
    square[:64, :128] = True  # the image's top-left quarter
    fitted = plots.masks_to_image([square], image.shape)[0]
    assert fitted.shape == (100, 200)
    assert fitted[:48, :98].all() and not fitted[52:].any() and not fitted[:, 102:].any()
    figure = plots.show_masks(image, [square])
    pixels = np.asarray(figure.axes[0].get_images()[0].get_array())
    assert pixels.shape == (100, 200, 3) and (pixels[fitted] > 0).any(axis=-1).all() and not pixels[~fitted].any()


def test_titles_show_model_text_as_written(pyplot):
    """Text from the model may hold "$": drawn as written, not parsed as math (which raised)."""
    from uio import plots

    figure = plots.show_text(np.zeros((8, 8, 3)), "$x$ costs $$", "answer")
    figure.canvas.draw()
    assert figure.axes[0].get_title() == "answer: '$x$ costs $$'"


def test_depth_is_shown_beside_the_input_in_a_colormap(pyplot):
    from uio import plots

    depth = np.linspace(0, 1, 12 * 16 * 3).reshape(12, 16, 3)
    figure = plots.show_depth(np.ones((12, 16, 3)), depth, cmap="viridis")
    shown_input, shown_depth = (ax.get_images()[0] for ax in figure.axes)
    assert np.asarray(shown_input.get_array()).shape == (12, 16, 3)
    assert np.asarray(shown_depth.get_array()).shape == (12, 16) and shown_depth.get_cmap().name == "viridis"
