"""Token ids to the strings people read, and token strings to ids.

Tokenizers spell a leading space differently: SentencePiece writes ``▁the``, byte-level BPE writes
``Ġthe``. Everything this package shows a person goes through :func:`display_tokens`, which turns both
into ``" the"`` so tables and figures read the same whatever the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

_SPIECE_SPACE = "\u2581"  # ▁


@lru_cache(maxsize=8)
def _byte_decoder() -> dict[str, int]:
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


def _piece_to_text(piece: str) -> str:
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
    if _SPIECE_SPACE in piece:
        return piece.replace(_SPIECE_SPACE, " ")
    decoder = _byte_decoder()
    if piece and all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece).decode("utf-8", errors="replace")
    return piece


def display_tokens(tokenizer: Any, ids: Sequence[int] | torch.Tensor) -> list[str]:
    """Readable strings for token ids: leading-space markers (``▁``, ``Ġ``) become spaces.

    Ids the tokenizer does not know (a ``d_vocab`` padded past the tokenizer's vocabulary) show as
    ``<id N>``; with no tokenizer every id does.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    if tokenizer is None:
        return [f"<id {i}>" for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [f"<id {i}>" if p is None else _piece_to_text(p) for i, p in zip(ids, pieces)]
