"""Execute the tutorial notebooks in place, so they are committed with their outputs.

    python tutorials/execute.py                 # every notebook here
    python tutorials/execute.py 01_logit_lens_basics.ipynb

Each figure is shown with ``tl.plotting.show``: one output holding the interactive plotly figure and a
PNG of it (kaleido), so GitHub, nbconvert and the docs site show the figure too. Outputs are made
reproducible: no per-cell timings, and the notebook's metadata records a hash of its code cells
(``tl_logitlens.source_sha256``), which ``tutorials/test_committed_outputs.py`` checks, so a notebook
whose code changed without being executed again fails the tests.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def source_hash(nb: nbformat.NotebookNode) -> str:
    """sha256 of the code cells' sources, in order (what the committed outputs were computed from)."""
    code = "\n\0\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}},
                   record_timing=False).execute()
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            # tl.plotting.show warns when kaleido made no PNG (it happens under load); GitHub and the docs
            # would then show no figure, so nothing is written and the notebook is to be executed again
            if output.get("name") == "stderr" and "no PNG for this figure" in output.get("text", ""):
                raise RuntimeError(f"{path.name}: a figure got no PNG ({output['text'].strip()}); run it again")
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["tl_logitlens"] = {"source_sha256": source_hash(nb)}
    nbformat.write(nb, path)


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        print(f"executing {name}", flush=True)
        execute(HERE / name)
