"""Every example in the README runs offline, as written, so the examples cannot rot.

The README's ```python blocks run top to bottom in one fresh interpreter (as a reader would paste them
into one session), and every ``tl-logitlens`` line of its ```bash blocks runs as a command, all in an
empty folder with the Hugging Face hub switched off (``HF_HUB_OFFLINE=1``): they use the built-in demo
model and the shipped demo texts. A block whose first line is a comment saying it ``needs the hub``
(the GPT-2 variants, torchrun over a corpus of your own) is left out, and checked to be marked; the
other lines of a bash block must be setup (``python3 -m venv``, ``pip install``, ``python -m pytest``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HUB = "needs the hub"
SETUP = ("python3 -m venv", "pip install", "python -m pytest")
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", flags=re.S | re.M)


def _blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [code for lang, code in _BLOCK.findall(text) if lang == language]


def _needs_hub(code: str) -> bool:
    first = next((line for line in code.splitlines() if line.strip()), "")
    return first.lstrip().startswith("#") and HUB in first


def _offline(language: str) -> list[str]:
    return [code for code in _blocks(language) if not _needs_hub(code)]


def _commands(code: str) -> list[str]:
    """A bash block's commands, ``\\``-continued lines joined, comments dropped."""
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # a block that reached for the hub fails instead of downloading
        "TRANSFORMERS_OFFLINE": "1",
        "PLOTLY_RENDERER": "json",  # fig.show() prints the figure instead of opening a browser
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "COLUMNS": "100",
    }


def test_the_readme_has_offline_examples_and_marks_the_others():
    python, bash = _blocks("python"), _blocks("bash")
    assert len(_offline("python")) >= 3 and len(_offline("bash")) >= 3
    hub_words = re.compile(r"\bgpt2\b|Paris|corpus\.jsonl|from_pretrained|boot_transformers")
    for code in python + bash:
        if hub_words.search(code):
            assert _needs_hub(code), f"this README block needs the hub but is not marked '# {HUB}':\n{code}"
    for code in _offline("bash"):
        for command in _commands(code):
            assert command.startswith(("tl-logitlens ", *SETUP)), (
                f"README bash line {command!r} is neither a tl-logitlens command nor setup; the README test "
                "would not run it"
            )
    # the examples use what the package ships, not files a reader does not have
    offline = "\n".join(_offline("python") + _offline("bash"))
    assert "tl.demo_texts()" in offline and "--texts demo" in offline
    assert not re.search(r"stories\.jsonl?\b", offline)


@pytest.mark.slow
def test_readme_python_blocks_run_offline(tmp_path):
    code = "\n\n".join(_offline("python"))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, f"the README's Python examples failed:\n{res.stderr[-4000:]}"
    assert (tmp_path / "report.html").is_file()  # tl.report(...)
    assert (tmp_path / "my_lens" / "tuned_lens.safetensors").is_file()  # lens.save(...)
    assert (tmp_path / "eval.json").is_file()  # ev.to_json(...)


@pytest.mark.slow
def test_readme_command_lines_run_offline(tmp_path):
    commands = [c for code in _offline("bash") for c in _commands(code) if c.startswith("tl-logitlens ")]
    assert any(c.startswith("tl-logitlens demo") for c in commands)
    for command in commands:
        argv = [sys.executable, "-m", "tl_logitlens", *shlex.split(command)[1:]]
        res = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"README command {command!r} failed:\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr
    assert (tmp_path / "logit_lens_report.html").is_file()
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "eval.csv").is_file()
