"""The notebooks: paired and in sync, committed clean, mirroring each other, Colab links built from lib.colab's slug;
make_figures.py; and (slow) both notebooks executed headless with papermill on the synthetic data."""

from __future__ import annotations

import ast
import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import matplotlib.image
import nbformat
import numpy as np
import pytest

from lib.colab import BRANCH, REPO, find_clone_urls, find_colab_links, make_badge, sync_links

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"masknet": "MaskNet", "depthnet": "DepthNet"}
REQUIRED_PARAMETERS = {  # None: present, any default
    "RECIPE": "original",
    "DATA": None,
    "EPOCHS": None,
    "BATCH_SIZE": None,
    "IMAGE_SIZE": None,
    "OUT": None,
    "RESUME": "auto",
    "MOUNT_DRIVE": True,
    "DOWNLOAD": None,
    "WORKERS": None,
    "LR": None,
    "OPTIMIZER": None,
    "TRAIN": True,
    "UPLOAD": False,
}


def notebook_path(name: str, ext: str) -> Path:
    return ROOT / "notebooks" / f"{name}.{ext}"


def headings(nb, level: int) -> list[str]:
    """Markdown headings of one level, in order."""
    marks = "#" * level + " "
    return [
        line[len(marks) :].strip()
        for cell in nb.cells
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith(marks)
    ]


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell must carry the papermill tag 'parameters'"
    return cells[0]


# ---------------------------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_in_sync(name):
    """The .ipynb and the .py hold the same cells (type, source, tags) as jupytext reads them."""
    ipynb, py = jupytext.read(notebook_path(name, "ipynb")), jupytext.read(notebook_path(name, "py"))
    as_cells = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
    assert as_cells(ipynb) == as_cells(py), f"run: jupytext --sync notebooks/{name}.py"


def test_jupytext_pairs_the_notebooks_folder():
    """jupytext.toml pairs notebooks/*.ipynb with percent-format .py files, and nothing outside notebooks/."""
    from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file

    config = load_jupytext_configuration_file(find_jupytext_configuration_file(str(ROOT / "notebooks")))
    formats = config.default_formats(str(notebook_path("depthnet", "ipynb")))
    assert formats is not None and "ipynb" in formats and "py:percent" in formats
    assert config.default_formats(str(ROOT / "make_figures.py")) is None


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_committed_without_outputs(name):
    nb = json.loads(notebook_path(name, "ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), "clear the outputs before committing"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_opens_with_a_gpu_runtime(name):
    """Colab reads the runtime it offers from the notebook's metadata: ask for a GPU."""
    metadata = json.loads(notebook_path(name, "ipynb").read_text())["metadata"]
    assert metadata["accelerator"] == "GPU" and metadata["colab"]["gpuType"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_loop_is_in_the_notebook(name):
    """The notebook builds model, loss function, optimizer and loaders itself and runs the epoch loop in view."""
    code = "\n".join(c.source for c in jupytext.read(notebook_path(name, "py")).cells if c.cell_type == "code")
    for built in ("model = make_model(", "loss_fn = make_loss(", "optimizer = make_optimizer(", "make_loaders("):
        assert built in code, built
    assert "for epoch in range(" in code and "train_one_epoch(" in code and "evaluate(" in code
    assert "fit(" not in code.replace("_fit(", ""), "the loop is shown, not hidden in fit()"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_markdown_shows_results_from_images(name):
    """A visitor on GitHub sees no outputs: results are figures from images/, each captioned with its command."""
    nb = jupytext.read(notebook_path(name, "py"))
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    figures = re.findall(r"!\[[^\]]*\]\((\.\./images/[\w.-]+\.png)\)", markdown)
    assert len(figures) >= 2
    assert all((ROOT / "notebooks" / f).resolve().is_file() for f in figures), figures
    assert "python -m lib.train" in nb.cells[0].source and "make_figures.py" in nb.cells[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell(name):
    """Tagged for papermill; UPPER_CASE constants only, each with a comment; the issue's parameters and defaults."""
    cell = parameters_cell(jupytext.read(notebook_path(name, "py")))
    assert cell.cell_type == "code"
    values = {}
    for statement in ast.parse(cell.source).body:
        assert isinstance(statement, ast.Assign) and len(statement.targets) == 1, ast.unparse(statement)
        target = statement.targets[0].id
        assert target.isupper(), f"{target}: parameters are UPPER_CASE"
        values[target] = ast.literal_eval(statement.value)
    lines = [line for line in cell.source.splitlines() if line.strip()]
    assert all(re.match(r"^[A-Z_]+ = .+  # \S", line) for line in lines), "one constant a line, each with a comment"
    for key, default in REQUIRED_PARAMETERS.items():
        assert key in values, f"{name}: parameter {key} missing"
        if default is not None:
            assert values[key] == default, f"{name}: {key} defaults to {values[key]!r}, expected {default!r}"


def test_notebooks_mirror_each_other():
    """Same section headings in the same order (the model's name aside), and a title naming the model."""
    sections = {}
    for name, title in NOTEBOOKS.items():
        nb = jupytext.read(notebook_path(name, "py"))
        (heading,) = headings(nb, 1)
        assert heading.startswith(f"{title}:"), heading
        sections[name] = [re.sub(title, "MODEL", h, flags=re.I) for h in headings(nb, 2)]
        assert {"Setup", "Parameters", "Data", "Model", "Train", "Curves", "Predictions", "Metrics"} <= set(
            sections[name]
        )
    assert sections["masknet"] == sections["depthnet"]
    cells = {name: [c.cell_type for c in jupytext.read(notebook_path(name, "py")).cells] for name in NOTEBOOKS}
    assert cells["masknet"] == cells["depthnet"]


# ---------------------------------------------------------------------------------------------- Colab links


def link_files() -> list[Path]:
    files = [*sorted((ROOT / "notebooks").glob("*.ipynb")), *sorted((ROOT / "notebooks").glob("*.py"))]
    return files + ([ROOT / "README.md"] if (ROOT / "README.md").is_file() else [])


def test_colab_links_use_the_slug_and_existing_notebooks():
    """Every Colab badge/link (README.md, notebooks) and clone URL is built from lib.colab.REPO; each target exists."""
    seen = 0
    for path in link_files():
        text = path.read_text()
        for repo, branch, notebook in find_colab_links(text):
            seen += 1
            assert (repo, branch) == (REPO, BRANCH), f"{path.name}: link to {repo}@{branch}; run python -m lib.colab"
            assert (ROOT / notebook).is_file(), f"{path.name}: Colab link to missing {notebook}"
        for repo in find_clone_urls(text):
            assert repo == REPO, f"{path.name}: clones {repo}; run python -m lib.colab"
    assert seen >= 2 * len(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_opens_with_its_own_badge(name):
    nb = jupytext.read(notebook_path(name, "py"))
    assert nb.cells[0].cell_type == "markdown"
    assert make_badge(f"notebooks/{name}.ipynb") in nb.cells[0].source
    assert any(f'REPO_URL = "https://github.com/{REPO}"' in c.source for c in nb.cells if c.cell_type == "code")


def test_readme_links_to_both_notebooks():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md yet")
    targets = {notebook for _, _, notebook in find_colab_links(readme.read_text())}
    assert {f"notebooks/{name}.ipynb" for name in NOTEBOOKS} <= targets


def test_sync_links_rewrites_a_changed_slug(tmp_path):
    for ext in ("py", "ipynb"):
        shutil.copy(notebook_path("depthnet", ext), tmp_path / f"depthnet.{ext}")
    readme = tmp_path / "README.md"
    readme.write_text(
        "git clone https://github.com/old/name.git\n" + make_badge("notebooks/masknet.ipynb", repo="old/name")
    )
    changed = sync_links(sorted(tmp_path.iterdir()), repo="someone/else")
    assert len(changed) == 3
    for path in changed:
        text = path.read_text()
        assert {repo for repo, _, _ in find_colab_links(text)} == {"someone/else"}
        assert set(find_clone_urls(text)) == {"someone/else"}
    assert (
        jupytext.read(tmp_path / "depthnet.py").cells[2].source
        == jupytext.read(tmp_path / "depthnet.ipynb").cells[2].source
    )
    assert sync_links(sorted(tmp_path.iterdir()), repo="someone/else") == []


# ---------------------------------------------------------------------------------------------- make_figures.py


def test_make_figures_without_a_run_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "make_figures.py", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "python -m lib.train" in result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_make_figures_from_a_finished_run(tiny_modest, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(ROOT))
    import make_figures
    from lib.train import Config, fit

    run = tmp_path / "run"
    fit(
        Config(model="masknet", data=str(tiny_modest), epochs=1, batch_size=8, image_size=32, workers=0, out=str(run)),
        progress=False,
    )
    assert make_figures.main(["--run", str(run), "--out", str(tmp_path / "images"), "--data", str(tiny_modest)]) == 0
    for name in ("dataset_grid", "curves", "predictions", "widget"):
        image = matplotlib.image.imread(tmp_path / "images" / f"{name}.png")
        assert image.shape[0] > 100 and image.std() > 0.01, name


# ---------------------------------------------------------------------------------------------- execution (slow)


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """The `python3` kernelspec papermill runs; installed for this user if Jupyter does not know it."""
    from jupyter_client.kernelspec import find_kernel_specs

    if "python3" not in find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
    return "python3"


def png_outputs(nb) -> list[np.ndarray]:
    """Every image/png a cell displayed, decoded."""
    return [
        matplotlib.image.imread(io.BytesIO(base64.b64decode(out.data["image/png"])), format="png")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(name, tmp_path, python3_kernel, monkeypatch, tiny_modest):
    """papermill, the demo recipe for one epoch on the tiny set: every cell runs; figures, checkpoint, table appear."""
    import papermill

    monkeypatch.setenv("MPLBACKEND", "Agg")
    run = tmp_path / "run"
    parameters = dict(RECIPE="demo", DATA=str(tiny_modest), EPOCHS=1, WORKERS=2, OUT=str(run))
    output = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        str(notebook_path(name, "ipynb")),
        str(output),
        parameters=parameters,
        kernel_name=python3_kernel,
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
    )
    nb = nbformat.read(output, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    images = png_outputs(nb)
    assert len(images) >= 3, f"expected data, curves and prediction figures, got {len(images)} images"
    assert all(img.shape[0] > 100 and img.std() > 0.01 for img in images), "a blank figure"
    assert (run / "best.pt").is_file() and len(json.loads((run / "history.json").read_text())) == 1
    browser_cell = next(c for c in code if "make_browser(" in c.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in browser_cell.outputs)
    assert "| mask IoU |" in code[-1].outputs[0].data["text/markdown"]
    # Run all again (a reconnect): RESUME = "auto" finds the finished run and goes straight to the results.
    before = (run / "best.pt").read_bytes()
    papermill.execute_notebook(
        str(notebook_path(name, "ipynb")),
        str(output),
        parameters=parameters,
        kernel_name=python3_kernel,
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
    )
    text = "".join(o.get("text", "") for c in nbformat.read(output, as_version=4).cells for o in c.get("outputs", []))
    assert "continuing its run" in text and "holds a finished run" in text
    assert (run / "best.pt").read_bytes() == before and len(json.loads((run / "history.json").read_text())) == 1
