"""benchmarks/gpu_check.py in its CI form (``--device cpu``): every task runs, agrees with the float32 CPU
reference within the stated tolerance, and the JSON and the table are written. The CUDA form is run
by a GPU session (see the script's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_writes_its_json_and_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    out, table = tmp_path / "check.json", tmp_path / "check.md"
    rc = gpu_check.main(["--device", "cpu", "--out", str(out), "--table", str(table)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert rc == 0 and report["all_equal"] is True and report["size"] == "ci"
    runs = {(r["shape"], r["dtype"], r["task"]) for r in report["runs"]}
    assert runs == {
        (shape, dtype, task)
        for shape in ("gpt2-small", "llama-shaped")
        for dtype in ("float32", "bfloat16")
        for task in ("lens", "evaluate", "jlens", "tuned")
    }
    for r in report["runs"]:
        assert r["equal"] and r["diff"] <= r["tol"] and r["seconds"] > 0 and r["x_floor"] > 0, r
        # the same float32 weights on the same device: the very same numbers
        assert r["dtype"] == "bfloat16" or r["diff"] == 0.0, r
    assert report["split"]["equal"] and "no CUDA" in report["split"]["note"]
    text = table.read_text(encoding="utf-8")
    assert "| gpt2-small | bfloat16 | jlens |" in text and "all equal: True" in text
