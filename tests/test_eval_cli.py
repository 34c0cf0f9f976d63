"""``tl-logitlens eval``'s threads, checkpoints, padding report and outputs, and the CLI's allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import SENTENCES
from tests.test_cli import _in_process, _one_line_error


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    texts = [" ".join(SENTENCES[i % 5 : i % 5 + 2]) for i in range(12)]
    (tmp_path / "corpus.json").write_text(json.dumps(texts), encoding="utf-8")
    return tmp_path


def test_threads_checkpoint_and_padding(corpus, capsys):
    threads = torch.get_num_threads()
    common = ["eval", "demo", "--texts", "corpus.json", "--seq-len", "8", "--bootstrap", "40", "--no-progress"]
    try:
        res = _in_process([*common, "--threads", "1", "--checkpoint-dir", "ckpt", "--checkpoint-every", "5",
                           "--json", "a.json"], capsys)
        assert res.returncode == 0, res.stderr
        assert torch.get_num_threads() == 1  # the command owns its process
    finally:
        torch.set_num_threads(threads)
    assert (corpus / "ckpt" / "checkpoint.pt").is_file()
    assert "padding:" in res.stdout and "token slots computed" in res.stdout
    first = json.loads((corpus / "a.json").read_text(encoding="utf-8"))
    assert 0 <= first["padding_fraction"] < 0.5 and first["n_computed"] == first["n_tokens"] + first["n_padded"]
    # the same command again resumes from the finished checkpoint: the same JSON, replaced whole
    again = _in_process([*common, "--checkpoint-dir", "ckpt", "--checkpoint-every", "5", "--json", "a.json"], capsys)
    assert again.returncode == 0, again.stderr
    assert json.loads((corpus / "a.json").read_text(encoding="utf-8")) == first
    # other settings on the same folder: refused in one line
    other = _in_process([*common, "--seed", "3", "--checkpoint-dir", "ckpt"], capsys)
    _one_line_error(other, "other settings", "seed")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--threads", "0"], ["--threads", "at least 1"]),
        (["--threads", "1.5"], ["--threads", "not a whole number"]),
        (["--checkpoint-every", "0"], ["--checkpoint-every", "at least 1"]),
        (["--checkpoint-every", "nan"], ["--checkpoint-every", "not a whole number"]),
        (["--batch-size", "inf"], ["--batch-size", "not a whole number"]),
        (["--checkpoint-dir", "corpus.json"], ["is a file; give a folder"]),
    ],
    ids=["threads-0", "threads-float", "every-0", "every-nan", "batch-inf", "dir-is-file"],
)
def test_bad_options_are_one_line_errors(corpus, capsys, extra, fragments):
    _one_line_error(_in_process(["eval", "demo", "--texts", "corpus.json", *extra], capsys), *fragments)


def test_help_says_outputs_are_replaced(capsys, monkeypatch):
    from tl_logitlens.cli.commands import build_parser

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("an existing FILE is replaced (atomically)") == 2
    assert "--threads N" in text and "--checkpoint-dir DIR" in text


def test_run_json_reports_the_padding_fraction(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(SENTENCES + ["The dog", "A cat sat"]), encoding="utf-8")
    res = _in_process(["run", "demo", "--prompts-file", "prompts.txt", "--no-report", "--json", "r.json"], capsys)
    assert res.returncode == 0, res.stderr
    payload = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert 0 <= payload["padding_fraction"] < 0.5
    assert [p for p in payload["prompts"]] == [*SENTENCES, "The dog", "A cat sat"]  # the file's order


# ------------------------------------------------------------------------------------------------
# the allocator: the CLI keeps freed buffers; importing the library changes nothing

_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = __import__("os").sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def kept_after_free(size=256 << 20):
        # a large block, touched, then freed: does its memory stay in the process?
        ptr = libc.malloc(size)
        ctypes.memset(ptr, 1, size)
        before = rss()
        libc.free(ptr)
        return before - rss() < size // 2

    import tl_logitlens, tl_logitlens.cli.commands, tl_logitlens.analyses.evaluate  # noqa: E401
    first = kept_after_free()
    changed = tl_logitlens.cli.commands.tune_allocator()
    print(first, changed, kept_after_free())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_importing_leaves_the_allocator_and_the_cli_tunes_it():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: tune_allocator is a no-op")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]  # imports: returned to the OS; after tuning: kept
    # the user's own setting stands
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
