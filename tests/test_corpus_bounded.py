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
import torch

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


# --- tuned-lens windows: streamed, cut by max_tokens, a document too long to tokenise refused ------------


def _windows_as_before(model, texts, seq_len):
    """pack_windows as it was before it streamed (the reference): the tokenizer on 256 texts at a time,
    one Python list of the whole stream, cut into windows."""
    tok = model.tokenizer
    bos = tok.bos_token_id if getattr(model.cfg, "default_prepend_bos", True) else None
    sep = bos if bos is not None else tok.eos_token_id
    stream: list[int] = []
    for i in range(0, len(texts), 256):
        for ids in tok(texts[i : i + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            if sep is not None and (stream or bos is None):
                stream.append(sep)
            stream.extend(ids)
    return _cut_stream(stream, bos, seq_len)


def _cut_stream(stream, bos, seq_len):
    body = seq_len - 1 if bos is not None else seq_len
    n_full = len(stream) // body
    if n_full == 0:
        n_full, body = 1, len(stream)
    data = torch.tensor(stream[: n_full * body], dtype=torch.long).view(n_full, body)
    if bos is not None:
        data = torch.cat([torch.full((n_full, 1), bos, dtype=torch.long), data], 1)
    return data


@pytest.mark.parametrize("prepend_bos", [True, False], ids=["bos-first", "eos-separated"])
@pytest.mark.parametrize("which", ["demo", "stories260K"])
def test_streamed_windows_are_the_old_windows_bit_for_bit(demo, stories, which, prepend_bos, monkeypatch):
    """Without max_tokens, the windows streamed from documents() (to_tokens with BOS, one document at a time)
    are exactly those of the old whole-corpus packing (the tokenizer without special tokens), in order:
    GPT-2's byte-level BPE (demo) and Llama's SentencePiece (stories260K, whose tokenizer adds BOS itself),
    with BOS leading every window, and with default_prepend_bos=False (EOS between texts, no BOS)."""
    from tl_logitlens.core.corpus import pack_windows

    model = demo if which == "demo" else stories
    monkeypatch.setattr(model.cfg, "default_prepend_bos", prepend_bos)
    texts = json.loads(require_shared(SHARED / "corpora" / "tinystories_1000.json").read_text())[:150]
    texts += ["Hi", "  a text with leading spaces", "é ü 日本語 🙂", "<|endoftext|> inside a text"]
    for seq_len in (2, 17, 128):
        got = pack_windows(model, texts, seq_len)
        want = _windows_as_before(model, texts, seq_len)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), seq_len
    for short in (["Hi there"], ["Once upon a time", "the end"]):  # one window, shorter than seq_len
        assert torch.equal(pack_windows(model, short, 128), _windows_as_before(model, short, 128))


@pytest.mark.parametrize("prepend_bos", [True, False], ids=["bos-first", "eos-separated"])
def test_max_tokens_cuts_the_windows_where_documents_cuts(demo, monkeypatch, prepend_bos):
    """The slow reference: every text tokenised whole (BOS first), the corpus cut after max_tokens of those
    tokens (each BOS counted), then packed as before. Shakespeare is one 1.1 MB document between two short
    ones, so most cuts fall inside it (tokenised only as far as the cut)."""
    from tl_logitlens.core.corpus import pack_windows

    monkeypatch.setattr(demo.cfg, "default_prepend_bos", prepend_bos)
    shakespeare = require_shared(SHARED / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    texts = ["Once upon a time there was a dog.", shakespeare, "The end of the story came soon after that."]
    whole = [_full(demo, t) for t in texts]
    tok = demo.tokenizer
    bos = tok.bos_token_id if prepend_bos else None
    sep = bos if bos is not None else tok.eos_token_id
    for max_tokens in (3, len(whole[0]), len(whole[0]) + 2, 5000, sum(map(len, whole)) - 4, 10**9):
        stream: list[int] = []
        left = max_tokens
        for ids in whole:
            if left <= 0:
                break
            cut = ids[:left]
            left -= len(cut)
            if stream or bos is None:
                stream.append(sep)
            stream.extend(cut[1:])
        want = _cut_stream(stream, bos, 32)
        got = pack_windows(demo, texts, 32, max_tokens=max_tokens)
        assert got.shape == want.shape and torch.equal(got, want), max_tokens


def test_a_document_too_long_to_tokenise_whole_is_refused_before_tokenising(demo, monkeypatch):
    """Over MAX_TOKENIZED_CHARS characters with no max_tokens: a ValueError naming the document, its length
    and --max-tokens, raised before the tokenizer sees it (the tokenizer would raise another error here);
    with max_tokens the same text is read, its first tokens only. Eval, tuned training and the windows;
    the Jacobian fit reads seq_len tokens of each text, so it is bounded and accepts the text."""
    from tl_logitlens.core import corpus

    word = "the little dog ran to the park and saw a big red ball "
    huge = word * (corpus.MAX_TOKENIZED_CHARS // len(word) + 1)
    assert len(huge) > corpus.MAX_TOKENIZED_CHARS
    texts = ["A short first story.", huge]

    def no_whole_tokenising(*args, **kwargs):
        raise AssertionError("the tokenizer was called on the whole over-long text")

    message = rf"document 1 is {len(huge):,} characters long, too long to tokenise whole .*max_tokens \(--max-tokens\)"
    with monkeypatch.context() as patch:
        patch.setattr(demo, "to_tokens", no_whole_tokenising)
        with pytest.raises(ValueError, match=message):
            corpus.tokenize_document(demo, huge, index=1)
    for call in (
        lambda: list(documents(demo, texts)),
        lambda: corpus.pack_windows(demo, texts, 32),
        lambda: tl.evaluate_lenses(demo, texts, progress=False, n_bootstrap=0),
        lambda: tl.train_tuned_lens(demo, texts, steps=1, tokens_per_step=32, seq_len=32, progress=False),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    windows = corpus.pack_windows(demo, texts, 32, max_tokens=200)
    assert windows.shape == (200 // 31, 32)
    ev = tl.evaluate_lenses(demo, texts, max_tokens=200, progress=False, n_bootstrap=0)
    assert ev.n_documents == 2
    lens = tl.fit_jacobian_lens(demo, texts, seq_len=16, skip_first=2, progress=False)
    assert lens.n_prompts == 2
    with pytest.raises(ValueError, match=r"document 1 is 10,000,044 characters long, and its first 8,999,994 tokens need more than 10,000,000"):
        corpus.pack_windows(demo, texts, 32, max_tokens=9_000_000)


_TRAIN_ON_A_LONG_LINE = """
import resource, sys, time
sys.path.insert(0, {root!r})
import tl_logitlens as tl
model = tl.load_model("demo")
word = "the little dog ran to the park and saw a big red ball "
text = word * (8_000_000 // len(word))  # 8 MB, one line: 1.3 GB to tokenise whole
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
lens = tl.train_tuned_lens(model, [text], max_tokens=20_000, steps=2, tokens_per_step=256, seq_len=32, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(lens.meta["training"]["windows"], seconds, before / 1024, peak / 1024)
"""


def test_training_with_max_tokens_on_a_long_one_line_text_is_small_and_quick(tmp_path):
    """An 8 MB one-line text (about 1.3 GB of tokenizer memory to read whole) with max_tokens=20,000: the
    process's peak RSS grows by under 150 MB during training (its windows and the prefixes tokenised),
    in under 30 s; 20,000 tokens make 645 windows of 31 tokens after BOS."""
    script = tmp_path / "long.py"
    script.write_text(_TRAIN_ON_A_LONG_LINE.format(root=str(ROOT)))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    n_windows, seconds, before_mb, peak_mb = done.stdout.split()[-4:]
    assert int(n_windows) == (20_000 - 1) // 31
    assert float(peak_mb) - float(before_mb) < 150, f"peak RSS {peak_mb} MB, {before_mb} MB before training"
    assert float(seconds) < 30, f"{seconds} s"
