"""Turn what users pass (text, lists of texts, token tensors, token strings, positions) into tensors.

Every check on user input that more than one analysis needs lives here, so that the lens, the
logit difference and the attributions reject the same mistakes with the same words.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union, no_type_check

import numpy as np
import torch
from jaxtyping import Bool, Int

from tl_logitlens.core.tokens import display_tokens

Inputs = Union[str, Sequence[str], torch.Tensor]
TokenLike = Union[str, int]
# what every analysis takes as targets: a token, a list of tokens, or a tensor of ids
Targets = Union[None, TokenLike, Sequence[TokenLike], torch.Tensor]
PositionSpec = Union[None, int, Sequence[int], str]


@dataclass(frozen=True)
class Batch:
    """A right-padded batch of prompts.

    Right padding keeps every real token at its own position (positional embeddings and rotary
    phases are unchanged) and, in a causal model, no real token attends to a pad. ``mask`` marks
    the real tokens. A causal model runs it without an attention mask (no real token can see a pad);
    a masked LM runs each length in its own forward pass (see :func:`tl_logitlens.core.run.run_cache`).
    """

    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    texts: tuple[str, ...] | None = None
    offsets: tuple[tuple[tuple[int, int], ...], ...] | None = None

    @property
    def lengths(self) -> Int[torch.Tensor, " batch"]:
        return self.mask.sum(-1)

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())


def is_integer(value: object) -> bool:
    """A Python or NumPy integer (not a bool): what users pass as an id or a position."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_count(value: object, name: str, low: int, high: int | None = None) -> int:
    """A count option (``top_k``, ``chunk_size``, ``seq_len``...): a Python or NumPy integer in
    ``[low, high]``, returned as an int; a TypeError or ValueError that names it otherwise."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}={value} must be {bound}")
    return value


def check_real(
    value: object, name: str, low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> float:
    """A real-valued option (a learning rate, a weight decay...): a finite Python or NumPy number (not a
    bool) in the interval from ``low`` to ``high`` (open at an end where ``low_open``/``high_open``),
    returned as a float; a TypeError or ValueError that names it otherwise (NaN and inf included)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"{name}={value:g} must be in {lo}, {hi}")
    return value


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "this model has no tokenizer, so text cannot be tokenized; pass a token tensor instead "
            "(e.g. torch.tensor([[1, 2, 3]])), or set one with model.set_tokenizer(...)"
        )
    return tok


def _check_text(text: object, index: int | None) -> str:
    where = "the prompt" if index is None else f"prompt {index}"
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(f"{where} is {type(text).__name__}; decode it to a str first (e.g. text.decode('utf-8'))")
    if not isinstance(text, str):
        raise TypeError(f"{where} is a {type(text).__name__}; prompts must be strings")
    if not text.strip():
        raise ValueError(f"{where} is empty; give at least one word of text")
    return text


def _texts(inputs: object) -> list[str]:
    """The prompts of a string or a list of strings, each checked."""
    if isinstance(inputs, str):
        return [_check_text(inputs, None)]
    if isinstance(inputs, (bytes, bytearray)):
        _check_text(inputs, None)
    if not isinstance(inputs, Sequence):
        raise TypeError(
            f"inputs must be a string, a list of strings or a token tensor, not {type(inputs).__name__}"
        )
    if len(inputs) == 0:
        raise ValueError("the list of prompts is empty; pass at least one string")
    return [_check_text(t, i) for i, t in enumerate(inputs)]


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return int(pad) if pad is not None else 0


def _pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``[batch, pos]`` ids and the mask of real tokens."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return tokens, mask


def check_flag(value: object, name: str, allow_none: bool = False) -> None:
    """A bool option (``include_bias``, ``prepend_bos``...): a string such as ``'no'`` is refused, not read as True."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}, not {value!r}")


@no_type_check  # checks its own arguments (see lens.logit_lens)
def prepare_inputs(
    model: Any,
    inputs: Inputs,
    *,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    special_tokens: bool = False,
) -> Batch:
    """Tokenize ``inputs`` (a string, a list of strings, or token ids) into a checked :class:`Batch`.

    Causal models tokenize with ``model.to_tokens`` (its BOS rule, or ``prepend_bos``); masked LMs
    (``special_tokens=True``) with the tokenizer itself, adding [CLS]/[SEP] or <s>/</s> and keeping
    each token's character offsets so a word of the text can be masked. Nothing is truncated: a
    prompt longer than the model's context is an error.
    """
    check_flag(prepend_bos, "prepend_bos", allow_none=True)
    cfg = model.cfg
    texts = offsets = None
    if isinstance(inputs, torch.Tensor):
        tokens = _check_token_tensor(inputs, cfg.d_vocab)
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else _check_mask(attention_mask, tokens)
    else:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is only for token-tensor inputs; for text, tl_logitlens pads and "
                "masks the prompts itself"
            )
        texts = _texts(inputs)
        tok = _tokenizer(model)
        check_length_before_tokenising(texts, tok, int(cfg.n_ctx))
        if special_tokens:
            fast = bool(getattr(tok, "is_fast", False))
            encoded = [tok(t, add_special_tokens=True, return_offsets_mapping=fast) for t in texts]
            rows = [list(e["input_ids"]) for e in encoded]
            if fast:
                offsets = tuple(tuple(tuple(o) for o in e["offset_mapping"]) for e in encoded)
        else:
            kwargs: dict[str, Any] = {"truncate": False}
            if prepend_bos is not None:
                kwargs["prepend_bos"] = prepend_bos
            rows = [model.to_tokens(t, **kwargs)[0].tolist() for t in texts]
        tokens, mask = _pad_rows(rows, _pad_id(model))
        texts = tuple(texts)
    n_ctx = cfg.n_ctx
    if tokens.shape[1] > n_ctx:
        raise ValueError(
            f"the input is {tokens.shape[1]} tokens long (longest prompt: {int(mask.sum(-1).max())}) but the "
            f"model's context is {n_ctx} tokens; shorten the prompt, nothing is truncated for you"
        )
    device = cfg.device
    tokens, mask = tokens.to(device), mask.to(device)
    tok = getattr(model, "tokenizer", None)
    str_tokens = tuple(
        tuple(display_tokens(tok, row[m].tolist())) for row, m in zip(tokens.cpu(), mask.cpu())
    )
    return Batch(tokens=tokens, mask=mask, str_tokens=str_tokens, texts=texts, offsets=offsets)


def _check_token_tensor(tokens: torch.Tensor, d_vocab: int) -> torch.Tensor:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"token tensors must hold integer ids, not {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"token tensors must be [pos] or [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError("the token tensor is empty; pass at least one token")
    bad = (tokens < 0) | (tokens >= d_vocab)
    if bool(bad.any()):
        first = tokens[bad][0].item()
        raise ValueError(f"token id {first} is outside the vocabulary [0, {d_vocab}); check the tokenizer")
    return tokens.long()


def _check_mask(mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the tokens have {tuple(tokens.shape)}"
        )
    mask = mask.bool()
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask has a row with no real tokens")
    expected = torch.arange(tokens.shape[1], device=mask.device)[None] < lengths[:, None]
    if not torch.equal(mask, expected.to(mask.device)):
        raise ValueError(
            "attention_mask must be right-padded (ones, then zeros, in every row); left padding "
            "shifts positions, so re-tokenize with padding_side='right' or pass the texts themselves"
        )
    return mask


def resolve_token(model: Any, token: object, what: str = "target") -> int:
    """One token id from a token string (which must be exactly one token) or an id."""
    d_vocab = model.cfg.d_vocab
    if isinstance(token, bool):
        raise TypeError(f"{what} {token!r} is a bool; pass a token string or an integer id")
    if is_integer(token) or (isinstance(token, torch.Tensor) and token.ndim == 0):
        tid = int(token)
        if not 0 <= tid < d_vocab:
            raise ValueError(f"{what} id {tid} is outside the vocabulary [0, {d_vocab})")
        return tid
    if isinstance(token, str):
        if token == "":
            raise ValueError(f"{what} is an empty string; pass one token, e.g. ' Paris'")
        tok = _tokenizer(model)
        ids = model.to_tokens(token, prepend_bos=False, truncate=False)[0].tolist()
        if len(ids) != 1:
            pieces = display_tokens(tok, ids)
            raise ValueError(
                f"{what} {token!r} is not a single token: it splits into {len(ids)} tokens {pieces}; "
                "pass one of those pieces or its id (mind the leading space)"
            )
        return int(ids[0])
    raise TypeError(f"{what} must be a token string or an integer id, not {type(token).__name__}")


def _longest_token_chars(tok: Any) -> int | None:
    """The most characters of text one token of ``tok`` can stand for (its longest vocabulary entry: a
    byte-level BPE entry has a character per byte, a SentencePiece piece its own characters), cached on
    the tokenizer; None when the tokenizer does not list its vocabulary."""
    cached = getattr(tok, "_tl_logitlens_longest_token", None)
    if cached is not None:
        return cached
    try:
        longest = max(len(piece) for piece in tok.get_vocab())
    except Exception:  # a tokenizer without get_vocab (or an empty one): no pre-check
        return None
    with contextlib.suppress(AttributeError, TypeError):
        tok._tl_logitlens_longest_token = longest
    return longest


def check_length_before_tokenising(texts: Sequence[str], tok: Any, n_ctx: int) -> None:
    """Refuse a text that cannot fit the context *before* tokenising it: with at most ``k`` characters per
    token, a text of over ``k · n_ctx`` characters is over ``n_ctx`` tokens (a 200 MB prompt would
    otherwise be tokenised whole, or abort the tokenizer, before the context check)."""
    longest = max((len(t) for t in texts), default=0)
    if longest <= 4096:
        return
    per_token = _longest_token_chars(tok)
    if per_token is not None and longest > per_token * n_ctx:
        which = max(range(len(texts)), key=lambda i: len(texts[i]))
        raise ValueError(
            f"prompt {which} is {longest:,} characters long, more than the model's context of {n_ctx} tokens can "
            f"hold (a token of this tokenizer covers at most {per_token} characters); shorten the prompt, "
            "nothing is truncated for you"
        )


def check_position(position: int, length: int, prompt: int | None = None, what: str = "position") -> int:
    """The index of ``position`` in a prompt of ``length`` tokens (negative counts back from its end): the
    one range check of every ``positions=`` in the package, so none is wrapped round silently.

    Raises:
        ValueError: outside ``[-length, length - 1]``, naming the prompt's length.
    """
    index = position + length if position < 0 else position
    if not 0 <= index < length:
        which = "the prompt" if prompt is None else f"prompt {prompt}"
        raise ValueError(
            f"{what} {position} is out of range for {which}, which has {length} tokens; use positions in "
            f"[-{length}, {length - 1}]"
        )
    return index


def resolve_positions(
    positions: object, batch: Batch
) -> tuple[Int[torch.Tensor, "batch n"], Bool[torch.Tensor, "batch n"]]:
    """Which positions of each prompt to read, and which of those are real tokens.

    ``None``: every position (pads marked invalid). ``"last"``: the last real token of each prompt.
    An int or a list of ints: those positions in every prompt; negative values count back from each
    prompt's own last real token (``-1`` is ``"last"``). A position past a prompt's end is an error.
    """
    lengths = batch.lengths
    n_batch, width = batch.tokens.shape
    device = batch.tokens.device
    if positions is None:
        index = torch.arange(width, device=device).expand(n_batch, width)
        return index, batch.mask
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(f"positions={positions!r} is not understood; use None, 'last', an int or a list of ints")
        positions = [-1]
    elif isinstance(positions, bool):
        raise TypeError("positions must be None, 'last', an int or a list of ints, not a bool")
    elif is_integer(positions):
        positions = [int(positions)]
    elif hasattr(positions, "tolist") and not isinstance(positions, Sequence):  # a tensor or an array
        positions = positions.tolist()
        positions = positions if isinstance(positions, list) else [positions]
    if not isinstance(positions, Sequence) or len(positions) == 0:
        raise ValueError("positions must be None, 'last', an int or a non-empty list of ints")
    if not all(is_integer(p) for p in positions):
        raise TypeError(f"positions must be integers, got {list(positions)!r}")
    positions = [int(p) for p in positions]
    for p in positions:
        if not -width <= p < width:  # beyond every prompt (and maybe beyond int64): refused before torch sees it
            check_position(p, int(lengths[0]), 0)
    req = torch.tensor(list(positions), device=device)[None].expand(n_batch, -1)
    index = torch.where(req < 0, req + lengths[:, None], req)
    bad = (index < 0) | (index >= lengths[:, None])
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        check_position(positions[j], int(lengths[b]), b)
    return index, torch.ones_like(index, dtype=torch.bool)
