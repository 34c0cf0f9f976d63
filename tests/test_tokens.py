"""Token display: accented letters stay letters in SentencePiece and WordPiece vocabularies, byte-level
BPE pieces are decoded from GPT-2's byte alphabet, and whitespace has one visible convention."""

from __future__ import annotations

import re

import pytest

from tests.helpers import GPT2_TOKENIZER, STORIES, require_shared, tiny_tokenizer
from tl_logitlens.core.tokens import display_tokens, is_byte_level, visible_token


@pytest.fixture(scope="module")
def stories_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_shared(STORIES))


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_shared(GPT2_TOKENIZER))


def _wordpiece(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "café", "##é", "naïve", "the", "ñ"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=False, strip_accents=False)


def _bytes_of(shown: str) -> bytes:
    """The bytes a displayed piece stands for: ``\\xNN`` escapes are bytes, the rest is UTF-8 text."""
    parts = re.split(r"(\\x[0-9a-f]{2})", shown)
    return b"".join(bytes([int(p[2:], 16)]) if re.fullmatch(r"\\x[0-9a-f]{2}", p) else p.encode() for p in parts)


def test_sentencepiece_accented_letters_are_letters(stories_tokenizer):
    """stories260K's tokens 485, 502, 493 are é, â, ñ (byte-decoding them as GPT-2 bytes gave '�')."""
    assert not is_byte_level(stories_tokenizer)
    assert stories_tokenizer.convert_ids_to_tokens([485, 502, 493]) == ["é", "â", "ñ"]
    assert display_tokens(stories_tokenizer, [485, 502, 493]) == ["é", "â", "ñ"]
    # the word pieces' leading-space marker still becomes a space
    ids = stories_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    shown = display_tokens(stories_tokenizer, ids)
    assert "".join(shown).strip() == "Once upon a time" and shown[0].startswith(" ")


def test_sentencepiece_byte_fallback_pieces(stories_tokenizer):
    pieces = {p: i for p, i in stories_tokenizer.get_vocab().items() if p.startswith("<0x")}
    assert display_tokens(stories_tokenizer, [pieces["<0x0A>"]]) == ["\n"]
    assert display_tokens(stories_tokenizer, [pieces["<0x41>"]]) == ["A"]
    # one byte of a multi-byte character: its byte, not a replacement character
    assert display_tokens(stories_tokenizer, [pieces["<0xC3>"]]) == ["\\xc3"]


def test_wordpiece_accented_tokens(tmp_path):
    tok = _wordpiece(tmp_path)
    assert not is_byte_level(tok)
    ids = tok.convert_tokens_to_ids(["café", "##é", "naïve", "ñ"])
    assert display_tokens(tok, ids) == ["café", "##é", "naïve", "ñ"]


def test_gpt2_byte_level_pieces(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert is_byte_level(tok)
    pieces = ["ĠParis", "Ġ", "Ċ", "ĠcafÃ©", "Ã©", "é"]
    ids = tok.convert_tokens_to_ids(pieces)
    # "é" in GPT-2's alphabet is the byte 0xE9 alone: half of nothing, shown as its byte
    assert display_tokens(tok, ids) == [" Paris", " ", "\n", " café", "é", "\\xe9"]
    # a character split across pieces: each piece shows the bytes it holds, and together they read right
    ids = tok("日本", add_special_tokens=False)["input_ids"]
    shown = display_tokens(tok, ids)
    assert all("\ufffd" not in s for s in shown)
    assert b"".join(_bytes_of(s) for s in shown).decode("utf-8") == "日本"
    assert display_tokens(tok, [tok.eos_token_id]) == ["<|endoftext|>"]


def test_tiny_byte_level_tokenizer_is_detected():
    tok = tiny_tokenizer()
    assert is_byte_level(tok)
    ids = tok(" the park", add_special_tokens=False)["input_ids"]
    assert "".join(display_tokens(tok, ids)) == " the park"


def test_unknown_ids_and_no_tokenizer(gpt2_tokenizer):
    assert display_tokens(None, [3, 4]) == ["<id 3>", "<id 4>"]
    assert display_tokens(gpt2_tokenizer, [len(gpt2_tokenizer) + 5]) == [f"<id {len(gpt2_tokenizer) + 5}>"]


@pytest.mark.parametrize(
    "token, shown",
    [
        (" the", "␣the"),
        (" ", "␣"),
        ("w", "w"),
        ("\n", "↵"),
        ("a\tb", "a⇥b"),
        ("\r\n", "\\x0d↵"),
        ("\x00\x1b", "\\x00\\x1b"),  # escapes, as byte pieces are shown: readable in any font
        ("\x7f", "\\x7f"),
        ("café", "café"),
        ("", ""),
    ],
    ids=["leading-space", "lone-space", "plain", "newline", "tab", "crlf", "controls", "del", "accent", "empty"],
)
def test_visible_token(token, shown):
    assert visible_token(token) == shown


def test_display_tokens_visible_keeps_the_default_plain(gpt2_tokenizer):
    ids = gpt2_tokenizer.convert_tokens_to_ids(["Ġthe", "Ċ"])
    assert display_tokens(gpt2_tokenizer, ids) == [" the", "\n"]
    assert display_tokens(gpt2_tokenizer, ids, visible=True) == ["␣the", "↵"]


def test_each_id_is_spelled_once_per_tokenizer():
    """A table of many ids spells each distinct id once per tokenizer and reads it back after: the same
    strings as a fresh tokenizer's, and a second call asks the tokenizer nothing."""
    fresh, counted = tiny_tokenizer(), tiny_tokenizer()
    asked: list[list[int]] = []
    spell = counted.convert_ids_to_tokens
    counted.convert_ids_to_tokens = lambda ids: asked.append(list(ids)) or spell(ids)
    ids = [5, 7, 5, 9, 7, 5, 10**6]  # repeats, and an id the tokenizer does not know
    want = display_tokens(fresh, ids)
    assert display_tokens(counted, ids) == want and asked == [[5, 7, 9, 10**6]]
    assert display_tokens(counted, list(reversed(ids)), visible=True) == [visible_token(t) for t in reversed(want)]
    assert len(asked) == 1
