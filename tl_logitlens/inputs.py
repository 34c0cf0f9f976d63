"""Turn what users pass (text, lists of texts, token tensors, token strings, positions) into tensors.

Every check on user input that more than one analysis needs lives here, so that the lens, the
logit difference and the attributions reject the same mistakes with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union, no_type_check

import torch
from jaxtyping import Bool, Int

from tl_logitlens.tokens import display_tokens

Inputs = Union[str, Sequence[str], torch.Tensor]
TokenLike = Union[str, int]
PositionSpec = Union[None, int, Sequence[int], str]


@dataclass(frozen=True)
class Batch:
    """A right-padded batch of prompts.

    Right padding keeps every real token at its own position (positional embeddings and rotary
    phases are unchanged) and, in a causal model, no real token attends to a pad. ``mask`` marks
    the real tokens; it is also passed to the model as its attention mask.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]

    @property
    def lengths(self) -> Int[torch.Tensor, " batch"]:
        return self.mask.sum(-1)

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "this model has no tokenizer, so text cannot be tokenized; pass a token tensor instead "
            "(e.g. torch.tensor([[1, 2, 3]])), or set one with model.set_tokenizer(...)"
        )
    return tok


def _tokenize_one(model: Any, text: object, prepend_bos: bool | None, index: int | None) -> list[int]:
    where = "the prompt" if index is None else f"prompt {index}"
    if not isinstance(text, str):
        raise TypeError(f"{where} is a {type(text).__name__}; prompts must be strings")
    if not text.strip():
        raise ValueError(f"{where} is empty; give at least one word of text")
    _tokenizer(model)
    kwargs: dict[str, Any] = {"truncate": False}
    if prepend_bos is not None:
        kwargs["prepend_bos"] = prepend_bos
    ids = model.to_tokens(text, **kwargs)[0].tolist()
    return ids


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return int(pad) if pad is not None else 0


@no_type_check  # checks its own arguments (see lens.logit_lens)
def prepare_inputs(
    model: Any,
    inputs: Inputs,
    *,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Batch:
    """Tokenize ``inputs`` (a string, a list of strings, or token ids) into a checked :class:`Batch`.

    Nothing is truncated: a prompt longer than the model's context is an error.
    """
    cfg = model.cfg
    device = cfg.device
    if isinstance(inputs, torch.Tensor):
        tokens = _check_token_tensor(inputs, cfg.d_vocab)
        if attention_mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            mask = _check_mask(attention_mask, tokens)
    else:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is only for token-tensor inputs; for text, tl_logitlens pads and "
                "masks the prompts itself"
            )
        if isinstance(inputs, str):
            rows = [_tokenize_one(model, inputs, prepend_bos, None)]
        elif isinstance(inputs, Sequence):
            if len(inputs) == 0:
                raise ValueError("the list of prompts is empty; pass at least one string")
            rows = [_tokenize_one(model, t, prepend_bos, i) for i, t in enumerate(inputs)]
        else:
            raise TypeError(
                f"inputs must be a string, a list of strings or a token tensor, not {type(inputs).__name__}"
            )
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
    n_ctx = cfg.n_ctx
    longest = int(mask.sum(-1).max())
    if tokens.shape[1] > n_ctx:
        raise ValueError(
            f"the input is {tokens.shape[1]} tokens long (longest prompt: {longest}) but the model's "
            f"context is {n_ctx} tokens; shorten the prompt, nothing is truncated for you"
        )
    tokens = tokens.to(device)
    mask = mask.to(device)
    tok = getattr(model, "tokenizer", None)
    str_tokens = tuple(
        tuple(display_tokens(tok, row[m].tolist())) for row, m in zip(tokens.cpu(), mask.cpu())
    )
    return Batch(tokens=tokens, mask=mask, str_tokens=str_tokens)


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
    if isinstance(token, (int,)) or (isinstance(token, torch.Tensor) and token.ndim == 0):
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
    elif isinstance(positions, int):
        positions = [positions]
    elif isinstance(positions, torch.Tensor):
        positions = positions.reshape(-1).tolist()
    if not isinstance(positions, Sequence) or len(positions) == 0:
        raise ValueError("positions must be None, 'last', an int or a non-empty list of ints")
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        raise TypeError(f"positions must be integers, got {list(positions)!r}")
    req = torch.tensor(list(positions), device=device)[None].expand(n_batch, -1)
    index = torch.where(req < 0, req + lengths[:, None], req)
    bad = (index < 0) | (index >= lengths[:, None])
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"position {positions[j]} is out of range for prompt {b}, which has {int(lengths[b])} "
            f"tokens; use positions in [-{int(lengths[b])}, {int(lengths[b]) - 1}]"
        )
    return index, torch.ones_like(index, dtype=torch.bool)
