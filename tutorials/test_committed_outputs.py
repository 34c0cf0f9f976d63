"""The tutorials are committed executed, and their outputs are current and readable without plotly.js.

nbmake (``--nbmake`` in pyproject's addopts) runs every notebook again in CI, on both TransformerLens
versions; these checks read the *committed* files, fast:

- every code cell ran, in order, and none raised;
- each notebook's recorded hash of its code cells (written by ``tutorials/execute.py``) matches its
  code now, so no cell was edited without executing the notebook again;
- every plotly figure output carries a PNG beside it (GitHub, nbconvert and the docs site show that);
- no output holds things that change from run to run or machine to machine: memory addresses,
  progress bars, timings, absolute paths.

What they do not check: that re-running today gives the same numbers (a library change that moves a
printed number is caught only when someone runs ``python tutorials/execute.py``; nbmake checks that
every cell still runs and every ``assert`` in the notebooks still holds).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"
_UNSTABLE = {
    "a memory address": re.compile(r"\bat 0x[0-9a-f]{6,}"),
    "a progress bar": re.compile(r"\d+%\|[█▏▎▍▌▋▊▉ ]*\||it/s\]|Loading weights"),
    "a timing": re.compile(r"\b\d+(\.\d+)?\s?(ms|µs|seconds)\b|Wall time|CPU times"),
    "an absolute path": re.compile(r"/(home|work|tmp|Users)/[\w.-]+/"),
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return "".join(output["text"])
    if output["output_type"] == "error":
        return "\n".join(output.get("traceback", []))
    data = output.get("data", {})
    return "".join("".join(v) if isinstance(v, list) else str(v) for k, v in data.items() if k.startswith("text/"))


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_executed_and_current(path):
    sys.path.insert(0, str(HERE))
    try:
        import nbformat
        from execute import source_hash
    finally:
        sys.path.remove(str(HERE))
    nb = _load(path)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not committed executed top to bottom (execution counts {counts}); "
        f"run: python tutorials/execute.py {path.name}"
    )
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name} has an error output: {errors[0].get('ename')}"
    recorded = nb["metadata"].get("tl_logitlens", {}).get("source_sha256")
    assert recorded == source_hash(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)), (
        f"{path.name}: its code changed since its outputs were computed; run: python tutorials/execute.py {path.name}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_plotly_figure_has_a_png_beside_it(path):
    nb = _load(path)
    figures = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"] if PLOTLY in o.get("data", {})]
    shows = sum("show(" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert figures and len(figures) >= shows, f"{path.name}: {shows} show() calls but {len(figures)} figure outputs"
    for o in figures:
        png = o["data"].get("image/png")
        assert png, f"{path.name}: a plotly figure without a PNG (use tl_logitlens.plotting.show)"
        assert png.replace("\n", "").startswith("iVBORw0KGgo"), "the PNG output is not a PNG"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_outputs_hold_nothing_that_changes_between_runs(path):
    nb = _load(path)
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "code":
            continue
        assert "execution" not in c.get("metadata", {}), f"{path.name} cell {i} records its timing"
        for o in c["outputs"]:
            text = _text(o)
            for what, pattern in _UNSTABLE.items():
                hit = pattern.search(text)
                assert not hit, f"{path.name} cell {i}: output holds {what}: {hit.group(0)!r}"
            if o["output_type"] == "stream":
                assert o["name"] == "stdout", f"{path.name} cell {i} writes to stderr: {text[:200]!r}"
