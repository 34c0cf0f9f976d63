"""Every example in the README and in the docs pages runs offline, as written, so the examples cannot rot.

Each page's ```python blocks (README.md, and every ``docs/*.md``, found by glob: a new page is covered
without being listed) run top to bottom in one fresh interpreter per page (as a reader would paste them
into one session), and every ``tl-logitlens`` line of its ```bash blocks runs as a command, all in an
empty folder with the Hugging Face hub switched off (``HF_HUB_OFFLINE=1``): they use the built-in demo
model and the shipped demo texts. A block whose first line is a comment saying it ``needs the hub``
(the GPT-2 variants, torchrun over a corpus of your own) is left out, and checked to be marked; the
other lines of a bash block must be setup (``python3 -m venv``, ``pip install``, ``python -m pytest``,
``mkdocs serve``).
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
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
HUB = "needs the hub"
SETUP = ("python3 -m venv", "pip install", "python -m pytest", "mkdocs serve")
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", flags=re.S | re.M)


def _blocks(language: str, page: Path = README) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [code for lang, code in _BLOCK.findall(text) if lang == language]


def _needs_hub(code: str) -> bool:
    first = next((line for line in code.splitlines() if line.strip()), "")
    return first.lstrip().startswith("#") and HUB in first


def _offline(language: str, page: Path = README) -> list[str]:
    return [code for code in _blocks(language, page) if not _needs_hub(code)]


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


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


def test_the_readme_has_offline_examples():
    assert len(_offline("python")) >= 2 and len(_offline("bash")) >= 2
    # the examples use what the package ships, not files a reader does not have
    offline = "\n".join(code for page in PAGES for code in _offline("python", page) + _offline("bash", page))
    assert "tl.demo_texts()" in offline and "--texts demo" in offline
    assert not re.search(r"stories\.jsonl?\b", offline)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_page_marks_its_hub_examples_and_runs_only_commands(page):
    hub_words = re.compile(r"\bgpt2\b|Paris|corpus\.jsonl|from_pretrained|boot_transformers")
    for code in _blocks("python", page) + _blocks("bash", page):
        if hub_words.search(code):
            assert _needs_hub(code), f"this {_id(page)} block needs the hub but is not marked '# {HUB}':\n{code}"
    for code in _offline("bash", page):
        for command in _commands(code):
            assert command.startswith(("tl-logitlens ", *SETUP)), (
                f"{_id(page)} bash line {command!r} is neither a tl-logitlens command nor setup; the examples "
                "test would not run it"
            )


def _run_python(page: Path, tmp_path: Path) -> None:
    code = "\n\n".join(_offline("python", page))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, f"the Python examples of {_id(page)} failed:\n{res.stderr[-4000:]}"


def _run_commands(page: Path, tmp_path: Path) -> list[str]:
    commands = [c for code in _offline("bash", page) for c in _commands(code) if c.startswith("tl-logitlens ")]
    for command in commands:
        argv = [sys.executable, "-m", "tl_logitlens", *shlex.split(command)[1:]]
        res = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{_id(page)} command {command!r} failed:\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr
    return commands


@pytest.mark.slow
def test_readme_python_blocks_run_offline(tmp_path):
    _run_python(README, tmp_path)
    assert (tmp_path / "report.html").is_file()  # tl.report(...)
    assert (tmp_path / "lens.html").is_file()  # fig.write_html(...)
    assert (tmp_path / "my_jlens" / "jacobian_lens.safetensors").is_file()  # mine.save(...)


@pytest.mark.slow
def test_readme_command_lines_run_offline(tmp_path):
    commands = _run_commands(README, tmp_path)
    assert any(c.startswith("tl-logitlens demo") for c in commands)
    assert (tmp_path / "logit_lens_report.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in DOCS if _offline("python", p)], ids=_id)
def test_docs_python_blocks_run_offline(page, tmp_path):
    _run_python(page, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in DOCS if any("tl-logitlens " in c for c in _offline("bash", p))], ids=_id)
def test_docs_command_lines_run_offline(page, tmp_path):
    assert _run_commands(page, tmp_path)
