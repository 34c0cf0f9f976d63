"""Token ids to the strings people read, and token strings to ids.

Tokenizers spell a leading space differently: SentencePiece writes ``▁the``, byte-level BPE writes
``Ġthe``. Everything this package shows a person goes through :func:`display_tokens`, which turns both
into ``" the"`` so tables and figures read the same whatever the model.

Whether a token is spelled in GPT-2's byte alphabet is a property of the *tokenizer*, not of the
piece: ``"é"`` is the byte 0xE9 in a byte-level BPE vocabulary but the letter é in a SentencePiece or
WordPiece one. :func:`is_byte_level` decides it once per tokenizer (from its decoder and
pre-tokenizer), and only byte-level pieces are decoded from bytes.

:func:`visible_token` is the one convention for drawing whitespace wherever a token is shown (figures,
tables, hover text, the terminal): ``" "`` → ``␣``, ``"\\n"`` → ``↵``, ``"\\t"`` → ``⇥``, ``"\\r"`` → ``␍``,
other control characters as their Control Pictures symbol.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from typing import Any

import torch

_SPIECE_SPACE = "\u2581"  # ▁
SPACE = "\u2423"  # ␣
_VISIBLE = {" ": SPACE, "\n": "\u21b5", "\t": "\u21e5"}  # ␣ ↵ ⇥


def _build_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table (printable stand-ins for raw bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


_BYTE_DECODER = _build_byte_decoder()


def _component_types(state: Any) -> set[str]:
    """Every ``"type"`` named in a tokenizers component's JSON (a ``Sequence`` lists its parts)."""
    found: set[str] = set()
    if isinstance(state, dict):
        if isinstance(state.get("type"), str):
            found.add(state["type"])
        for value in state.values():
            found |= _component_types(value)
    elif isinstance(state, list):
        for value in state:
            found |= _component_types(value)
    return found


def _backend_types(tokenizer: Any) -> set[str] | None:
    """Types of a fast tokenizer's decoder and pre-tokenizer, or None when it has no backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    types: set[str] = set()
    try:
        for part in (backend.decoder, backend.pre_tokenizer):
            if part is not None:
                types |= _component_types(json.loads(part.__getstate__()))
    except Exception:  # an unusual backend: read the whole tokenizer's JSON instead
        whole = json.loads(backend.to_str())
        types = _component_types(whole.get("decoder")) | _component_types(whole.get("pre_tokenizer"))
    return types


_BYTE_LEVEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# each tokenizer's display strings of the ids shown so far (an id's piece never changes; a table of
# millions of ids spent most of its time spelling the same few thousand pieces again, ~2 µs an id)
_DISPLAYED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` spells its pieces in GPT-2's byte alphabet (byte-level BPE).

    Read from the tokenizer, once: a fast tokenizer whose decoder or pre-tokenizer is ``ByteLevel``;
    a slow one with a ``byte_decoder`` (GPT-2's); otherwise, a vocabulary that holds every one of the
    256 byte symbols as a token. SentencePiece (``▁``, ``<0xNN>``) and WordPiece (``##``) tokenizers are
    not byte-level, so their accented letters are letters.
    """
    if tokenizer is None:
        return False
    try:
        return _BYTE_LEVEL[tokenizer]
    except (KeyError, TypeError):
        pass
    types = _backend_types(tokenizer)
    if types is not None:
        answer = "ByteLevel" in types
    elif getattr(tokenizer, "byte_decoder", None) is not None:
        answer = True
    else:
        try:
            vocab = tokenizer.get_vocab()
        except Exception:
            vocab = {}
        answer = bool(vocab) and all(ch in vocab for ch in _BYTE_DECODER)
    try:
        _BYTE_LEVEL[tokenizer] = answer
    except TypeError:  # not weak-referenceable: decide again next time
        pass
    return answer


def _decode_bytes(data: bytes) -> str:
    """UTF-8 text; a piece that holds part of a character shows its bytes (``\\xe2\\x80``), not ``�``."""
    return data.decode("utf-8", errors="backslashreplace")


def _piece_to_text(piece: str, byte_level: bool) -> str:
    """One vocabulary piece as text, read the way its tokenizer spells pieces."""
    if byte_level:
        decoder = _BYTE_DECODER
        if piece and all(ch in decoder for ch in piece):
            return _decode_bytes(bytes(decoder[ch] for ch in piece))
        return piece  # a special token such as <|endoftext|>
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        try:
            return _decode_bytes(bytes([int(piece[3:5], 16)]))
        except ValueError:
            return piece
    return piece.replace(_SPIECE_SPACE, " ")


def visible_token(token: str) -> str:
    """``token`` with its whitespace and control characters drawn, for a person to read.

    ``" "`` → ``␣`` (so ``" w"`` and ``"w"`` differ and a lone space is not an empty cell), ``"\\n"`` →
    ``↵``, ``"\\t"`` → ``⇥``; every other control character (``"\\r"``, the rest of C0, DEL, C1) → its
    escape ``\\xNN``, the same spelling as a byte piece's, readable in any font (the Control Pictures
    block ``␀`` … ``␟`` is missing from most fonts and draws as empty boxes). Everything else is
    unchanged. Use it for figures, tables, hover text and the terminal alike; data (dataframes, JSON)
    keeps the plain text.

    Example:
        >>> visible_token(" the\\n")
        '␣the↵'
    """
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:  # C0, DEL and C1 controls
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def tail_text(tokens: Sequence[str], *, chars: int = 24, skip: Sequence[str] = ()) -> str:
    """The end of a tokenised text as a person reads it, for titles: "after '…The dog was very'".

    The last whole tokens of ``tokens`` (at least one) that fit in ``chars`` characters, joined, the
    leading space dropped, led by ``…`` when the text goes on before them. Spaces stay spaces (it is
    read as text); line breaks, tabs and control characters are drawn as :func:`visible_token` draws
    them. Tokens in ``skip`` (special tokens such as BOS) end the text and are not shown.

    Example:
        >>> tail_text(["<|endoftext|>", "The", " dog", " was", " very"], chars=13, skip=["<|endoftext|>"])
        '…dog was very'
    """
    skipped = set(skip)
    kept: list[str] = []
    for i in range(len(tokens) - 1, -1, -1):
        tok = tokens[i]
        if tok in skipped:
            break
        if kept and sum(map(len, kept)) + len(tok) > chars:
            kept.append("…")
            break
        kept.append(tok)
    text = "".join(reversed(kept))
    text = "…" + text[1:].lstrip(" ") if text.startswith("…") else text.lstrip(" ")
    return "".join(ch if ch == " " else visible_token(ch) for ch in text)


TAIL_CHARS = 24  # titles quote at most this much of the text before a read position


def text_before(result: Any, prompt: int, position: int | None = None, *, chars: int = TAIL_CHARS) -> str:
    """The end of prompt ``prompt`` of a result up to token ``position`` (default: its last token), for
    titles and headings: ``…The dog was very`` (:func:`tail_text`, the tokenizer's special tokens such
    as BOS left out). ``result`` has ``str_tokens`` and ``tokenizer``, as every result here does."""
    tokens = result.str_tokens[prompt]
    if position is not None:
        tokens = tokens[: position + 1]
    special = tuple(getattr(result.tokenizer, "all_special_tokens", None) or ())
    return tail_text(tokens, chars=chars, skip=special)


def display_tokens(tokenizer: Any, ids: Sequence[int] | torch.Tensor, *, visible: bool = False) -> list[str]:
    """Readable strings for token ids: leading-space markers (``▁``, ``Ġ``) become spaces.

    Byte-level pieces are decoded from GPT-2's byte alphabet (see :func:`is_byte_level`); a piece
    holding part of a multi-byte character shows the bytes it holds (``"\\xe2\\x80"``). SentencePiece
    byte-fallback pieces (``<0x0A>``) become their byte. Ids the tokenizer does not know (a
    ``d_vocab`` padded past the tokenizer's vocabulary) show as ``<id N>``; with no tokenizer every
    id does. ``visible=True`` draws whitespace through :func:`visible_token` (``" the"`` → ``"␣the"``).
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    if tokenizer is None:
        return [f"<id {i}>" for i in ids]
    try:
        known = _DISPLAYED.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: nothing is kept
        known = {}
    missing = [i for i in dict.fromkeys(ids) if i not in known]
    if missing:
        byte_level = is_byte_level(tokenizer)
        for i, p in zip(missing, tokenizer.convert_ids_to_tokens(missing)):
            known[i] = f"<id {i}>" if p is None else _piece_to_text(p, byte_level)
    out = [known[i] for i in ids]
    return [visible_token(t) for t in out] if visible else out
