"""Corpora read in bounded pieces (#23, finding 6): ``max_tokens`` bounds time and memory, only regular
files are read, deeply nested JSON is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tl_logitlens as tl
from tests.helpers import SHARED, require_shared
from tl_logitlens.core.corpus import documents, iter_texts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return tl.load_model("demo")


def _full(model, text):
    return model.to_tokens(text, prepend_bos=True, truncate=False)[0].tolist()


@pytest.mark.parametrize("max_tokens", [1, 2, 100, 2000, 5000], ids=lambda k: f"max_tokens={k}")
def test_the_first_tokens_of_a_long_document_are_its_whole_tokenisation_cut(demo, max_tokens):
    """Tokenising a prefix gives exactly the first max_tokens tokens of tokenising the whole (Shakespeare,
    one document of 1.1 MB; and text without a single space)."""
    text = require_shared(SHARED / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    for doc_text in (text, "abcdefgh" * 20_000):
        full = _full(demo, doc_text)
        (doc,) = documents(demo, [doc_text], max_tokens=max_tokens)
        assert list(doc.ids) == full[:max_tokens]
        assert doc.n_bytes == len(demo.tokenizer.decode(full[1:max_tokens]).encode("utf-8"))


def test_the_cut_spans_documents_as_before(demo):
    texts = ["Once upon a time there was a dog.", "The end of the story came soon after that.", "Never read."]
    lengths = [len(_full(demo, t)) for t in texts]
    docs = list(documents(demo, texts, max_tokens=lengths[0] + 3))
    assert [len(d.ids) for d in docs] == [lengths[0], 3]
    assert list(docs[1].ids) == _full(demo, texts[1])[:3]


_BIG_DOCUMENT = """
import resource, sys, time
sys.path.insert(0, {root!r})
import tl_logitlens as tl
model = tl.load_model("demo")
path = sys.argv[1]
with open(path, "w") as fh:  # 50 MB, one line: words, no line break
    word = "the little dog ran to the park and saw a big red ball "
    fh.write(word * (50_000_000 // len(word)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ev = tl.evaluate_lenses(model, path, max_tokens=2000, progress=False, n_bootstrap=0)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(ev.n_documents, seconds, before / 1024, peak / 1024)
"""


@pytest.mark.slow
def test_a_50_mb_one_line_document_with_max_tokens_2000_stays_small_and_quick(tmp_path):
    """Before, the whole document was tokenised before the cut: 7.5 GB and still running after 10
    minutes. Now: peak RSS of the whole process (Python, torch, the demo model) under 1.5 GB, under a
    minute (measured on an idle 2-core machine: see the report)."""
    script = tmp_path / "big.py"
    script.write_text(_BIG_DOCUMENT.format(root=str(ROOT)))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "big.txt")], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    n_documents, seconds, before_mb, peak_mb = done.stdout.split()[-4:]
    print(done.stdout.splitlines()[-1])
    assert int(n_documents) == 1
    assert float(peak_mb) < 1536, f"peak RSS {peak_mb} MB (before the evaluation: {before_mb} MB)"
    assert float(seconds) < 60, f"{seconds} s"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_fifo_is_refused_at_once_not_read_forever(tmp_path, demo):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def evaluate():
        try:
            tl.evaluate_lenses(demo, str(fifo), progress=False, n_bootstrap=0)
        except BaseException as err:  # noqa: BLE001 (handed to the test's thread)
            outcome.append(err)

    worker = threading.Thread(target=evaluate, daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "w"):
            pass
        pytest.fail("evaluate_lenses blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError)
    assert "pipe.txt' is not a regular file (a FIFO, a socket or a device)" in str(outcome[0])


def test_a_device_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a regular file"):
        list(iter_texts("/dev/zero"))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        list(iter_texts(path))


@pytest.mark.parametrize("split", ["paragraph", "line", "file"])
def test_txt_files_read_a_line_at_a_time_split_as_before(tmp_path, split):
    """The .txt reader streams lines now; its documents are exactly those of str.splitlines() on the whole
    file (form feeds, \\r\\n, \\u2028 and a missing last newline included)."""
    content = "one\r\ntwo\x0cthree\n\n\nfour\u2028five\rsix\n  \nseven"
    path = tmp_path / "c.txt"
    path.write_bytes(content.encode("utf-8"))
    lines = content.splitlines()
    expected = {
        "file": [content.replace("\r\n", "\n").replace("\r", "\n")],  # as read_text reads it
        "line": [x for x in lines if x.strip()],
        "paragraph": ["one\ntwo\nthree", "four\nfive\nsix", "seven"],
    }[split]
    assert list(iter_texts(path, txt_split=split)) == expected


def test_corpus_json_round_trip_still_works(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(["a b", {"text": "c"}]))
    assert list(iter_texts(path)) == ["a b", "c"]
