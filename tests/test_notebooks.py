"""Every notebook in ``notebooks/`` runs top to bottom, headless, on a tiny random model.

Each notebook has one code cell tagged ``parameters`` (the papermill convention). The test copies the
notebook, inserts a cell after that one which re-assigns the tiny-model values below (only for names the
notebook declares, as papermill's injected-parameters cell does), executes it with nbclient in a ``python3``
kernel run by this interpreter (repository first on ``PYTHONPATH``) and fails on the first cell that
raises. A new notebook is picked up automatically; it must declare its parameters in such a cell, and the
committed file must carry no outputs (``docs/notebooks.md``).
"""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client import AsyncKernelManager  # noqa: E402 (after the skips: nbclient brings it)
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DOCS = ROOT / "docs" / "notebooks.md"

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
KERNEL = "python3"
NOTEBOOK_TIMEOUT_S = 180  # the whole notebook, kernel start included; each runs in ~15-30 s on 2 cores

# A random 2-layer model pretrained "at 64 tokens": every factor is out of distribution at 256 tokens, and
# every forward takes milliseconds. The byte-level tokenizer needs ≥ ~340 tokens for a passkey prompt.
TINY_PARAMETERS = {
    "MODEL": "tiny:llama",
    "LENGTH": 256,
    "TRAIN_LENGTH": 64,
    "WINDOWS": 1,
    "DEVICE": "cpu",
    "DTYPE": "float32",
    "BUCKET": 32,
    "NEW_TOKENS": 8,
    "PASSKEY_LENGTHS": [384],
    "PASSKEY_DEPTHS": [0.5],
    "PASSKEY_SAMPLES": 1,
    "WITHIN_LENGTH": 340,  # vanilla's passkey reference (notebook 04): the shortest prompt that fits
}


def parameters_cell_index(notebook: nbformat.NotebookNode) -> int:
    """Index of the one code cell tagged ``parameters``."""
    tagged = [
        index
        for index, cell in enumerate(notebook.cells)
        if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, f"expected exactly one cell tagged {PARAMETERS_TAG!r}, found {len(tagged)}"
    assert notebook.cells[tagged[0]].cell_type == "code", "the parameters cell must be a code cell"
    return tagged[0]


def declared_parameters(source: str) -> list[str]:
    """Names assigned at the top level of a parameters cell, in order."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


def inject_parameters(notebook: nbformat.NotebookNode, values: dict) -> list[str]:
    """Insert, after the parameters cell, a cell that re-assigns ``values`` the notebook declares.

    Returns the injected names. Like papermill, the original cell still runs first, so the notebook's own
    defaults are always executed too.
    """
    index = parameters_cell_index(notebook)
    declared = declared_parameters(notebook.cells[index].source)
    injected = [name for name in declared if name in values]
    source = "# Injected by tests/test_notebooks.py\n" + "".join(
        f"{name} = {values[name]!r}\n" for name in injected
    )
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    cell["id"] = INJECTED_TAG  # a stable id (nbformat ≥ 4.5 notebooks have cell ids)
    notebook.cells.insert(index + 1, cell)
    return injected


def kernel_environment() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, so the kernel imports this oodlens.

    MPLBACKEND is dropped so that ipykernel picks its inline backend, as in JupyterLab.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)
    return env


def this_python_kernel() -> AsyncKernelManager:
    """A manager for the ``python3`` kernel run by *this* interpreter (ipykernel's built-in spec).

    Searching no kernel folders makes jupyter_client fall back to ipykernel's own ``python3`` spec, whose
    command is ``sys.executable``; a ``python3`` spec elsewhere (say in ``~/.local/share/jupyter``) that
    points at another Python, without torch, cannot shadow it.
    """
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def execute(notebook: nbformat.NotebookNode, workdir: Path, timeout_s: float) -> None:
    """Run every code cell in order; raise nbclient's CellExecutionError on the first error.

    ``timeout_s`` bounds the whole notebook: each cell gets what is left of it.
    """
    client = nbclient.NotebookClient(
        notebook,
        km=this_python_kernel(),
        resources={"metadata": {"path": str(workdir)}},
        allow_errors=False,
    )
    deadline = time.monotonic() + timeout_s
    with client.setup_kernel(env=kernel_environment(), cwd=str(workdir)):
        for index, cell in enumerate(notebook.cells):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"notebook ran past {timeout_s} s (before cell {index})")
            client.timeout = max(1, int(left))
            client.execute_cell(cell, index)


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 3, f"expected at least three notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_clean_and_documented(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    index = parameters_cell_index(notebook)
    declared = declared_parameters(notebook.cells[index].source)
    for name in ("MODEL", "LENGTH", "TRAIN_LENGTH"):
        assert name in declared, f"{path.name}: the parameters cell must assign {name}"
    with_outputs = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not with_outputs, f"{path.name}: clear the outputs before committing (cells {with_outputs})"
    assert path.name in DOCS.read_text(), f"{path.name} has no paragraph in {DOCS.relative_to(ROOT)}"


def test_injection_replaces_declared_names_only():
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell(
                'MODEL = "smollm2"  # comment\nLENGTH: int = 12288\nx, y = 1, 2',
                metadata={"tags": ["parameters"]},
            ),
            nbformat.v4.new_code_cell("print(MODEL, LENGTH)"),
        ]
    )
    injected = inject_parameters(notebook, {"MODEL": "tiny:llama", "LENGTH": 256, "BUCKET": 32})
    assert injected == ["MODEL", "LENGTH"]
    assert notebook.cells[2].metadata["tags"] == [INJECTED_TAG]
    namespace: dict = {}
    for cell in notebook.cells[1:3]:
        exec(cell.source, namespace)
    assert (namespace["MODEL"], namespace["LENGTH"]) == ("tiny:llama", 256)
    assert "BUCKET" not in namespace
    nbformat.validate(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_on_a_tiny_model(path: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    values = dict(TINY_PARAMETERS, FIGURES=str(tmp_path / "figures"))
    injected = inject_parameters(notebook, values)
    assert {"MODEL", "LENGTH", "TRAIN_LENGTH"} <= set(injected)
    execute(notebook, tmp_path, NOTEBOOK_TIMEOUT_S)

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    images = sum(
        "image/png" in output.get("data", {}) for cell in code_cells for output in cell.get("outputs", [])
    )
    if "FIGURES" in injected:
        saved = sorted((tmp_path / "figures").glob("*.png"))
        assert saved, f"{path.name} saved no figure under FIGURES"
        assert images == len(saved), f"{path.name} displayed {images} figures but saved {len(saved)}"
