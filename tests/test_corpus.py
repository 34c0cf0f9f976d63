"""Reading corpora (lists, iterables, .txt/.json/.jsonl files, datasets splits) and cutting windows."""

from __future__ import annotations

import json

import pytest

from tests.helpers import SHARED, require_shared, tiny_model
from tl_logitlens.core.corpus import corpus_length, document_windows, documents, iter_texts, tokenize_document

STORIES_JSON = SHARED / "corpora" / "tinystories_1000.json"


def test_list_and_generator_skip_blank_documents():
    assert list(iter_texts(["a b", "", "  \n", "c"])) == ["a b", "c"]
    assert list(iter_texts(t for t in ("x", "y"))) == ["x", "y"]
    assert corpus_length(["a", "b"]) == 2 and corpus_length(iter(["a"])) is None


def test_txt_splits(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First:\nline one\n\n\nSecond block\n  \nthird\n", encoding="utf-8")
    assert list(iter_texts(path)) == ["First:\nline one", "Second block", "third"]
    assert list(iter_texts(str(path), txt_split="line")) == ["First:", "line one", "Second block", "third"]
    assert list(iter_texts(path, txt_split="file")) == [path.read_text(encoding="utf-8")]


def test_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", {"text": "two"}]), encoding="utf-8")
    assert list(iter_texts(tmp_path / "a.json")) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('"one"\n\n{"text": "two", "id": 3}\n{"body": "three"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 4 of .* has no 'text' field"):
        list(iter_texts(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text('"one"\n{"body": "two"}\n', encoding="utf-8")
    assert list(iter_texts(tmp_path / "c.jsonl", text_field="body")) == ["one", "two"]


def test_shared_stories_corpus():
    texts = list(iter_texts(require_shared(STORIES_JSON)))
    assert len(texts) == 1000 and all(isinstance(t, str) and t.strip() for t in texts)


def test_hf_dataset_and_streaming_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a b", "", "c d"], "n": [1, 2, 3]})
    assert list(iter_texts(ds)) == ["a b", "c d"]
    assert list(iter_texts(ds.to_iterable_dataset())) == ["a b", "c d"]
    with pytest.raises(ValueError, match="no 'body' column"):
        list(iter_texts(ds, text_field="body"))
    with pytest.raises(TypeError, match="one split"):
        list(iter_texts(datasets.DatasetDict({"train": ds})))
    bad = datasets.Dataset.from_dict({"text": [1, 2]})
    with pytest.raises(TypeError, match="row 0 .* is a int"):
        list(iter_texts(bad))


@pytest.mark.parametrize(
    ("content", "suffix", "error", "match"),
    [
        ("[]", ".json", ValueError, "holds no text"),
        ('["", " "]', ".json", ValueError, "holds no text"),
        ('{"text": "a"}', ".json", ValueError, "holds a JSON dict, not a list"),
        ("[1, 2]", ".json", TypeError, "item 0 .* is a int"),
        ("not json", ".json", ValueError, "not valid JSON"),
        ("not json\n", ".jsonl", ValueError, "line 1 .* is not JSON"),
        ("a,b\n1,2\n", ".csv", ValueError, "not a corpus file"),
        ("\n\n  \n", ".txt", ValueError, "holds no text"),
    ],
    ids=["empty-list", "blank-strings", "dict", "ints", "bad-json", "bad-jsonl", "csv", "blank-txt"],
)
def test_files_that_are_not_corpora(tmp_path, content, suffix, error, match):
    path = tmp_path / f"c{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        list(iter_texts(path))


def test_bad_sources(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not UTF-8"):
        list(iter_texts(tmp_path / "bin.txt"))
    with pytest.raises(ValueError, match="no corpus file at"):
        list(iter_texts(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="is a folder"):
        list(iter_texts(tmp_path))
    with pytest.raises(ValueError, match="holds no text"):
        list(iter_texts([]))
    with pytest.raises(TypeError, match="document 1 of the corpus is a int"):
        list(iter_texts(["ok", 3]))
    with pytest.raises(TypeError, match="not int"):
        list(iter_texts(5))
    with pytest.raises(TypeError, match="bytes"):
        list(iter_texts(b"text"))
    with pytest.raises(ValueError, match="txt_split"):
        list(iter_texts(["a"], txt_split="words"))


def test_windows_each_start_with_bos_and_cover_every_token_once():
    ids = (7, 1, 2, 3, 4, 5, 6, 8)
    assert document_windows(ids, 4) == [[7, 1, 2, 3], [7, 4, 5, 6], [7, 8]]
    assert document_windows(ids, 8) == [list(ids)]
    assert document_windows((7,), 4) == [[7]]
    for seq_len in range(2, 10):
        wins = document_windows(ids, seq_len)
        assert all(w[0] == 7 and len(w) <= seq_len for w in wins)
        assert [t for w in wins for t in w[1:]] == list(ids[1:])
    with pytest.raises(ValueError, match="at least 2"):
        document_windows(ids, 1)


def test_tokenize_document_puts_bos_first_and_counts_decoded_bytes():
    model = tiny_model()
    text = "Once upon a time, there was a little girl named Lily."
    doc = tokenize_document(model, text, index=4)
    assert doc.index == 4
    assert doc.ids[0] == model.tokenizer.bos_token_id
    assert list(doc.ids[1:]) == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert doc.n_bytes == len(text.encode("utf-8"))


def test_documents_cut_at_max_tokens_in_corpus_order_whoever_owns_them():
    model = tiny_model()
    texts = ["Once upon a time there was a cat.", "The end.", "A dog ran to the park and sat down.", "Bye."]
    whole = [tokenize_document(model, t, i) for i, t in enumerate(texts)]
    assert list(documents(model, texts)) == whole
    # a cut inside the third document: the first two whole, the third shortened, the fourth gone
    limit = len(whole[0].ids) + len(whole[1].ids) + 3
    cut = list(documents(model, texts, max_tokens=limit))
    assert cut[:2] == whole[:2] and len(cut) == 3
    assert cut[2].ids == whole[2].ids[:3] and cut[2].index == 2
    assert cut[2].n_bytes == len(model.tokenizer.decode(list(whole[2].ids[1:3])).encode("utf-8"))
    assert sum(len(d.ids) for d in cut) == limit
    # two owners split the same cut corpus between them, nothing lost or repeated
    even = list(documents(model, texts, max_tokens=limit, owns=lambda i: i % 2 == 0))
    odd = list(documents(model, texts, max_tokens=limit, owns=lambda i: i % 2 == 1))
    assert sorted(even + odd, key=lambda d: d.index) == cut


# ----------------------------------------------------------------------------------------------
# the shipped demo texts


def test_demo_texts_are_the_demo_models_held_out_stories():
    """``tl.demo_texts()``: the 100 stories the demo models never saw, in split order (the model card's
    held-out loss is measured on them), recomputed here from the 1000-story sample and its seeded split."""
    import random

    import tl_logitlens as tl
    from tl_logitlens.core.corpus import DEMO_TEXTS

    texts = tl.demo_texts()
    assert len(texts) == 100 and all(isinstance(t, str) and t.strip() for t in texts)
    assert texts is not tl.demo_texts()  # a fresh list each call: a caller may change it
    metrics = json.loads((DEMO_TEXTS.parents[1] / "demo" / "metrics.json").read_text(encoding="utf-8"))
    held = metrics["data"]["held_out_indices"]
    stories = json.loads(require_shared(STORIES_JSON).read_text(encoding="utf-8"))
    order = list(range(len(stories)))
    random.Random(1234).shuffle(order)
    assert order[-100:] == held
    assert texts == [stories[i] for i in held]
    assert list(iter_texts(texts)) == texts  # every one is a document the corpus readers take
    # shipped with its licence, and small
    notice = (DEMO_TEXTS.parent / "README.md").read_text(encoding="utf-8")
    assert "CDLA-Sharing-1.0" in notice and "TinyStories" in notice
    assert DEMO_TEXTS.stat().st_size < 300_000


def test_demo_texts_ship_in_the_wheel():
    """hatch puts every file under tl_logitlens/ that git does not ignore into the wheel: the texts and
    their licence must not be ignored (pyproject: ``packages = ["tl_logitlens"]``)."""
    import subprocess
    from pathlib import Path

    from tl_logitlens.core.corpus import DEMO_TEXTS

    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    assert 'packages = ["tl_logitlens"]' in pyproject
    files = [DEMO_TEXTS, DEMO_TEXTS.parent / "README.md"]
    if (root / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *map(str, files)], cwd=root, capture_output=True, text=True)
        assert ignored.stdout.strip() == "", f"git ignores {ignored.stdout.split()}: hatch would leave them out"
