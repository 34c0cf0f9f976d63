"""Text corpora: where documents come from, and how a document becomes model windows.

:func:`iter_texts` reads documents, one string each, from any of:

- a list, tuple or other iterable of strings (a generator works: nothing is read ahead);
- a ``.txt`` file: by default one document per *blank-line-separated block* (paragraphs, plays'
  speeches); ``txt_split="line"`` makes every non-blank line a document, ``"file"`` the whole file one;
- a ``.json`` file: a list of strings, or of objects with a ``"text"`` field;
- a ``.jsonl`` file: one string or one object with a ``"text"`` field per line;
- a Hugging Face ``datasets`` split (``Dataset`` or a streaming ``IterableDataset``), read from its
  ``"text"`` column (``text_field=`` names another); ``datasets`` is never imported here.

Documents that are empty or only whitespace are skipped (a data set's blank rows carry no text to
score); a corpus with no document left is an error. Anything that is not a string is an error that
names the document.

:func:`documents` tokenises them one by one (:func:`tokenize_document`), optionally cut after
``max_tokens`` and split between processes. :func:`document_windows` turns one document into model
inputs: the document is tokenised once with the model's BOS token in front, and its tokens after BOS
are cut into consecutive, non-overlapping pieces of at most ``seq_len - 1`` tokens, each given its
own BOS. So every window starts with BOS (a model sees no window without its usual first token), and
every token of the document is predicted exactly once: the first token of each window from BOS, the
others from the tokens before them in that window.
"""

from __future__ import annotations

import hashlib
import json
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TXT_SPLITS: tuple[str, ...] = ("paragraph", "line", "file")
_MAX_REPR = 60


@dataclass(frozen=True)
class Document:
    """One tokenised document: ``ids`` with BOS first, ``n_bytes`` the UTF-8 bytes its tokens decode to."""

    index: int
    ids: tuple[int, ...]
    n_bytes: int


def iter_texts(source: Any, *, text_field: str = "text", txt_split: str = "paragraph") -> Iterator[str]:
    """The documents of ``source``, one non-blank string each, in order.

    Args:
        source: an iterable of strings; a path (``str`` or ``Path``) to a ``.txt``, ``.json`` or
            ``.jsonl`` file; or a Hugging Face ``datasets`` split (streaming or not).
        text_field: the field or column holding the text, in JSON objects and data sets.
        txt_split: how a ``.txt`` file is cut: ``"paragraph"`` (blank-line-separated blocks, the
            default), ``"line"`` or ``"file"``.

    Raises:
        ValueError: the corpus holds no text; the file is missing, not UTF-8, or not a corpus
            (JSON that is not a list, a file with another suffix); ``txt_split`` is unknown.
        TypeError: a document is not a string; ``source`` is not something a corpus is read from.

    Example:
        >>> list(iter_texts(["Once upon a time.", "  ", "The end."]))
        ['Once upon a time.', 'The end.']
    """
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"txt_split={txt_split!r} is not one of {list(TXT_SPLITS)}")
    if not isinstance(text_field, str):
        raise TypeError(f"text_field must be a string, not {type(text_field).__name__}")
    n = 0
    for text in _raw_texts(source, text_field, txt_split):
        if text.strip():
            n += 1
            yield text
    if n == 0:
        raise ValueError(f"the corpus {_describe(source)} holds no text; give at least one non-empty document")


def corpus_length(source: Any) -> int | None:
    """The number of items in ``source`` when it is known without reading it (a list, a data set)."""
    if isinstance(source, (str, Path, bytes)):
        return None
    try:
        return len(source)
    except TypeError:
        return None


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return repr(str(source))
    text = repr(source)
    return f"{type(source).__name__}" if len(text) > _MAX_REPR else text


def _raw_texts(source: Any, text_field: str, txt_split: str) -> Iterator[str]:
    if isinstance(source, bytes):
        raise TypeError("the corpus is bytes; decode it to a string, or pass a list of strings or a file path")
    if isinstance(source, (str, Path)):
        yield from _file_texts(Path(source), text_field, txt_split)
        return
    if isinstance(source, dict) or _is_dataset_dict(source):
        keys = list(source.keys())
        raise TypeError(
            f"the corpus is a mapping with keys {keys[:5]}; pass one split (e.g. ds['train']) or a list of strings"
        )
    if _is_hf_dataset(source):
        yield from _dataset_texts(source, text_field)
        return
    if not isinstance(source, Iterable):
        raise TypeError(
            f"the corpus must be a list or iterable of strings, a .txt/.json/.jsonl path, or a Hugging "
            f"Face datasets split, not {type(source).__name__}"
        )
    for i, item in enumerate(source):
        if not isinstance(item, str):
            raise TypeError(f"document {i} of the corpus is a {type(item).__name__}, not a string; pass text")
        yield item


def _file_texts(path: Path, text_field: str, txt_split: str) -> Iterator[str]:
    if not path.exists():
        raise ValueError(f"no corpus file at {str(path)!r}; give a .txt, .json or .jsonl file")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a .txt, .json or .jsonl file")
    if not stat.S_ISREG(path.stat().st_mode):  # opening a FIFO would wait for a writer; a device never ends
        raise ValueError(
            f"{str(path)!r} is not a regular file (a FIFO, a socket or a device); save the corpus to a file first"
        )
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".jsonl"):
        raise ValueError(
            f"{str(path)!r} is not a corpus file this reads: use .txt (blank-line-separated documents), "
            ".json (a list of strings) or .jsonl (one string or {\"text\": ...} object per line)"
        )
    if suffix == ".jsonl":
        yield from _jsonl_texts(path, text_field)
        return
    if suffix == ".txt":
        # read line by line, so a large file is never held whole (only its current document is)
        raw = _txt_lines(path)
        if txt_split == "file":
            yield "".join(raw)
            return
        lines = (piece for line in raw for piece in line.splitlines())  # exactly the file's str.splitlines()
        yield from (lines if txt_split == "line" else _paragraphs(lines))
        return
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text, so it is not a corpus; save it as UTF-8") from None
    data = _json_loads(content, f"{str(path)!r}")
    if not isinstance(data, list):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, not a list; a .json corpus is a list of strings "
            f"(or of objects with a {text_field!r} field)"
        )
    for i, item in enumerate(data):
        yield _from_record(item, text_field, f"item {i} of {str(path)!r}")


def _json_loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg} at line {err.lineno}); a .json corpus is a list of strings") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a corpus (a list of strings, or of objects with text)") from None


def _txt_lines(path: Path) -> Iterator[str]:
    """A ``.txt`` file's lines (``\r\n`` and ``\r`` read as ``\n``, as ``read_text`` reads them), checked
    for NUL bytes and UTF-8 as they come."""
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if "\x00" in line:
                    raise ValueError(f"{str(path)!r} holds NUL bytes: it looks binary, not a text corpus")
                yield line
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text, so it is not a corpus; save it as UTF-8") from None


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"line {lineno} of {str(path)!r}"
                try:
                    item = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    raise ValueError(f"{where} is not JSON (or nested too deeply); a .jsonl corpus holds one JSON string or object per line") from None
                yield _from_record(item, text_field, where)
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text, so it is not a corpus; save it as UTF-8") from None


def _from_record(item: Any, text_field: str, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if text_field not in item:
            raise ValueError(f"{where} has no {text_field!r} field (it has {sorted(item)[:5]}); pass text_field=...")
        item = item[text_field]
        if isinstance(item, str):
            return item
    raise TypeError(f"{where} is a {type(item).__name__}, not a string; a corpus holds text")


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _is_hf_dataset(source: Any) -> bool:
    module = type(source).__module__ or ""
    return module.startswith("datasets") and hasattr(source, "iter")


def _is_dataset_dict(source: Any) -> bool:
    module = type(source).__module__ or ""
    return module.startswith("datasets") and type(source).__name__ in ("DatasetDict", "IterableDatasetDict")


def _dataset_texts(ds: Any, text_field: str) -> Iterator[str]:
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise ValueError(f"the data set has no {text_field!r} column (it has {list(columns)}); pass text_field=...")
    i = 0
    for batch in ds.iter(batch_size=256):
        if text_field not in batch:
            raise ValueError(f"the data set has no {text_field!r} column (it has {list(batch)}); pass text_field=...")
        for item in batch[text_field]:
            if not isinstance(item, str):
                raise TypeError(f"row {i} of the data set's {text_field!r} column is a {type(item).__name__}, not a string")
            i += 1
            yield item


# a prefix of a document is tokenised instead of the whole when only its first tokens are needed: it must
# reach this many tokens past the cut, and agree with a prefix twice as long on the tokens kept
_PREFIX_MARGIN = 64
_CHARS_PER_TOKEN = 8


# The most characters tokenised at once. A fast tokenizer holds about 100 to 160 bytes per character of
# one-line text while it works (measured: 5 and 20 MB of English words, one line, took 0.77 and 2.9 GB
# for GPT-2's byte-level BPE, 0.54 GB for 5 MB with stories260K's Llama SentencePiece; 200 MB aborted
# the tokenizer), so 10 million characters stay under about 1.6 GB. A longer document is read only as
# far as a ``max_tokens`` cut needs, or refused before it is tokenised.
MAX_TOKENIZED_CHARS = 10_000_000


def _tokenize(model: Any, text: str, index: int = 0, max_tokens: int | None = None) -> list[int]:
    """``text`` as token ids with BOS first: the one place a corpus text is tokenised, so the one place a
    text too long to tokenise in bounded memory is refused (document ``index``, read for ``max_tokens``
    tokens or whole), before the tokenizer sees it."""
    if len(text) > MAX_TOKENIZED_CHARS:
        if max_tokens is None:
            raise ValueError(
                f"document {index} is {len(text):,} characters long, too long to tokenise whole (at most "
                f"{MAX_TOKENIZED_CHARS:,} characters at once: a tokenizer holds about 150 bytes per character); "
                "pass max_tokens (--max-tokens) to read only the tokens you need, or split the text into "
                "smaller documents"
            )
        raise ValueError(
            f"document {index} is {len(text):,} characters long, and its first {max_tokens:,} tokens need more "
            f"than {MAX_TOKENIZED_CHARS:,} characters of it tokenised at once (a tokenizer holds about 150 bytes "
            "per character); pass a smaller max_tokens (--max-tokens), or split the text into smaller documents"
        )
    return model.to_tokens(text, prepend_bos=True, truncate=False)[0].tolist()


def first_tokens(model: Any, text: str, limit: int, index: int = 0) -> list[int]:
    """The first ``limit`` tokens (BOS included) of ``text``, tokenising a prefix of it, not the whole.

    A tokenizer's output near the end of a prefix can differ from the whole text's (a word cut in two),
    so the prefix must reach ``_PREFIX_MARGIN`` tokens past the cut and give the same first ``limit``
    tokens as a prefix twice as long; it doubles until it does (or is the whole text). The work is a
    few times ``limit`` tokens, whatever the document's length.
    """
    n_chars = max(1024, _CHARS_PER_TOKEN * (limit + _PREFIX_MARGIN))
    previous: list[int] | None = None
    while n_chars < len(text):
        ids = _tokenize(model, text[:n_chars], index, limit)
        if len(ids) >= limit + _PREFIX_MARGIN:
            if previous is not None and previous[:limit] == ids[:limit]:
                return ids[:limit]
            previous = ids
        n_chars *= 2
    return _tokenize(model, text, index, limit)[:limit]


def tokenize_document(model: Any, text: str, index: int = 0, max_tokens: int | None = None) -> Document:
    """``text`` as token ids with the model's BOS first, and its decoded byte count: the whole document,
    or with ``max_tokens`` its first ``max_tokens`` tokens (BOS included), found by tokenising a prefix
    (so a huge document costs time and memory in proportion to ``max_tokens``, not to its length).

    Raises:
        ValueError: the model has no tokenizer; the text is over ``MAX_TOKENIZED_CHARS`` characters and
            ``max_tokens`` does not bound what is tokenised (the message names the document's ``index``).
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so a text corpus cannot be tokenised; set one with model.set_tokenizer(...)")
    ids = _tokenize(model, text, index) if max_tokens is None else first_tokens(model, text, max_tokens, index)
    return Document(index=index, ids=tuple(ids), n_bytes=decoded_bytes(tokenizer, ids[1:]))


def documents(
    model: Any,
    texts: object,
    *,
    text_field: str = "text",
    max_tokens: int | None = None,
    owns: Callable[[int], bool] | None = None,
    per_document: int | None = None,
) -> Iterator[Document]:
    """The documents of ``texts`` (see :func:`iter_texts`), tokenised, in corpus order.

    With ``per_document`` each document is only its first ``per_document`` tokens (BOS included), and only
    a prefix of its text is tokenised (:func:`first_tokens`): for a reader that uses no more, a long
    document costs what its prefix costs.

    With ``max_tokens`` the corpus is cut after that many document tokens (BOS included), the last
    document shortened to fit; files are read a line at a time and a document only as far as the cut
    needs (:func:`tokenize_document`), so ``max_tokens`` bounds the time and memory. ``owns(index)``
    picks which documents are yielded (one process's share under torch.distributed); the cut counts
    every document, so it falls at the same place whoever owns what.
    """
    taken = 0
    for index, text in enumerate(iter_texts(texts, text_field=text_field)):
        mine = owns is None or owns(index)
        if max_tokens is None:
            if mine:
                yield tokenize_document(model, text, index, max_tokens=per_document)
            continue
        if taken >= max_tokens:
            return
        limit = max_tokens - taken if per_document is None else min(per_document, max_tokens - taken)
        doc = tokenize_document(model, text, index, max_tokens=limit)
        taken += len(doc.ids)
        if mine:
            yield doc


def decoded_bytes(tokenizer: Any, ids: Iterable[int]) -> int:
    """UTF-8 bytes of the text the tokens ``ids`` decode to (what bits per byte divide by)."""
    ids = list(ids)
    if not ids:
        return 0
    return len(tokenizer.decode(ids).encode("utf-8"))


def document_windows(ids: tuple[int, ...] | list[int], seq_len: int) -> list[list[int]]:
    """Cut a document's tokens (BOS first) into windows of at most ``seq_len`` tokens, each led by BOS.

    The tokens after BOS are split into consecutive pieces of ``seq_len - 1``; each piece is
    prefixed with the document's BOS. A document of BOS alone gives one window ``[BOS]``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} leaves no room for a token after BOS; use at least 2")
    bos, body = ids[0], list(ids[1:])
    if not body:
        return [[bos]]
    step = seq_len - 1
    return [[bos, *body[i : i + step]] for i in range(0, len(body), step)]


def read_texts(texts: Any) -> list[str]:
    """The documents of ``texts`` as :func:`tl_logitlens.core.corpus.iter_texts` reads them: a list or iterable
    of strings, a ``.txt``/``.json``/``.jsonl`` file, or a Hugging Face ``datasets`` split (its
    ``"text"`` column); blank documents are skipped and a corpus with none left is an error."""
    return list(iter_texts(texts))


DEMO_TEXTS = Path(__file__).resolve().parent.parent / "demo_models" / "texts" / "tinystories_held_out.json"


def demo_texts() -> list[str]:
    """The 100 TinyStories the built-in demo models never saw, shipped with the package (about 90 KB).

    The held-out split of ``load_model("demo")`` and ``"demo-bert"`` (the last 100 of a seeded shuffle
    of a 1000-story sample, in that order; the demo model card's held-out loss is measured on them),
    so examples of corpus evaluation, tuned-lens training and lens fitting run offline. A new list
    on every call. Licence: CDLA-Sharing-1.0, as TinyStories (see ``demo_models/texts/README.md``).

    Example:
        >>> texts = tl.demo_texts()
        >>> len(texts), texts[1][:30]
        (100, 'Once upon a time, there was a ')
    """
    return json.loads(DEMO_TEXTS.read_text(encoding="utf-8"))


def pack_windows(
    model: Any, texts: Any, seq_len: int | None, *, max_tokens: int | None = None, text_field: str = "text"
) -> Any:
    """``[window, seq_len]`` token ids: each text as BOS + its tokens (EOS where the model prepends no
    BOS), concatenated and cut into consecutive windows; each window starts with BOS when the model
    prepends one (so ``seq_len - 1`` stream tokens follow it). The last, shorter, window is dropped
    unless it is the only one. Returns a ``torch.Tensor`` of ids.

    ``texts`` is any corpus :func:`documents` reads, tokenised one document at a time; with
    ``max_tokens`` it is cut after that many document tokens (BOS included, as :func:`documents` cuts),
    and a long document is only tokenised as far as the cut. The windows are written as they come into
    one flat buffer of 8-byte ids laid out window by window (each window's BOS in place), which becomes
    the tensor without a copy: about 8 bytes per token, whatever the corpus.

    Raises:
        ValueError: the model has no tokenizer; ``seq_len`` is not from 2 to ``n_ctx``; the texts hold
            fewer than two tokens; a document too long to tokenise whole without ``max_tokens``
            (:func:`tokenize_document`).
    """
    import torch

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; attach one (model.set_tokenizer(...)) to train on text")
    n_ctx = int(model.cfg.n_ctx)
    seq_len = n_ctx if seq_len is None else seq_len
    if not isinstance(seq_len, int) or not 2 <= seq_len <= n_ctx:
        raise ValueError(f"seq_len must be an int from 2 to the model's n_ctx ({n_ctx}), not {seq_len!r}")
    bos = tok.bos_token_id if getattr(model.cfg, "default_prepend_bos", True) else None
    sep = bos if bos is not None else tok.eos_token_id
    buffer = array("q")  # the windows, flat: with a BOS, one at the start of every seq_len ids
    n_stream = 0  # stream tokens written (the windows' own BOS not counted)

    def put(ids: Sequence[int]) -> None:
        nonlocal n_stream
        if bos is None:
            buffer.extend(ids)
            n_stream += len(ids)
            return
        start = 0
        while start < len(ids):
            if len(buffer) % seq_len == 0:
                buffer.append(bos)
            take = min(len(ids) - start, seq_len - len(buffer) % seq_len)
            buffer.extend(ids[start : start + take])
            start += take
        n_stream += len(ids)

    for doc in documents(model, texts, text_field=text_field, max_tokens=max_tokens):
        if sep is not None and (n_stream or bos is None):  # a window's own BOS starts the first text
            put((sep,))
        put(doc.ids[1:])
    body = seq_len - 1 if bos is not None else seq_len
    n_full = n_stream // body
    if n_full == 0:  # one short window: all there is
        data = torch.frombuffer(buffer, dtype=torch.long).view(1, len(buffer)) if buffer else torch.zeros(1, 0)
    else:
        data = torch.frombuffer(buffer, dtype=torch.long)[: n_full * seq_len if bos is not None else n_full * body]
        data = data.view(n_full, -1)
    if data.shape[1] < 2:
        raise ValueError("the texts hold fewer than two tokens; pass more text")
    return data


class HashedTexts:
    """The corpus's texts as :func:`iter_texts` reads them, with a running SHA-256
    of those read so far, so a resumed job (an evaluation, a Jacobian lens fit) can check it reads the corpus it was
    checkpointed on: :meth:`expect` the digest saved after ``count`` texts, and reading raises when the
    first ``count`` texts differ (or :meth:`check_complete` when there are fewer)."""

    def __init__(self, texts: Any, text_field: str) -> None:
        self.texts, self.text_field = texts, text_field
        self.hash = hashlib.sha256()
        self.count = 0
        self.expected: tuple[int, str, Path] | None = None

    def expect(self, count: int, digest: str, where: Path) -> None:
        self.expected = (count, digest, where)

    def digest(self) -> str:
        return self.hash.hexdigest()

    def __iter__(self) -> Iterator[str]:
        for text in iter_texts(self.texts, text_field=self.text_field):
            data = text.encode("utf-8")
            self.hash.update(len(data).to_bytes(8, "little"))
            self.hash.update(data)
            self.count += 1
            if (
                self.expected is not None
                and self.count == self.expected[0]
                and self.digest() != self.expected[1]
            ):
                raise ValueError(
                    f"the corpus differs from the one {self.expected[2]} was saved on (its first {self.count} "
                    "documents are not the same); resume with the same texts, or use another checkpoint folder"
                )
            yield text

    def check_complete(self) -> None:
        if self.expected is not None and self.count < self.expected[0]:
            raise ValueError(
                f"the corpus has {self.count} documents, but {self.expected[2]} was saved after reading "
                f"{self.expected[0]}; resume with the same texts, or use another checkpoint folder"
            )
