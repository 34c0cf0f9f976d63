"""Answer/distractor token pairs and user-given directions, checked and turned into id tensors.

Shared by :mod:`tl_logitlens.analyses.directions` and :mod:`tl_logitlens.analyses.attribution`, so both accept and
reject the same things with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.inputs import resolve_token
from tl_logitlens.core.tokens import display_tokens


@dataclass(frozen=True)
class Pairs:
    """Token ids per prompt and pair. ``correct``/``incorrect`` are ``[B, pair]`` where ``B`` is 1
    when the pairs are shared by every prompt and the batch size when each prompt has its own."""

    correct: Int[torch.Tensor, "B pair"]
    incorrect: Int[torch.Tensor, "B pair"] | None
    labels: tuple[str, ...]


def _as_list(value: object, what: str) -> list:
    if isinstance(value, (str, int)) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return [value]
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{what} token ids must be integers, not {value.dtype}")
        if value.ndim != 1:
            raise ValueError(
                f"{what} as a tensor must be 1-D (one id per pair) here, got shape {list(value.shape)}"
            )
        return value.tolist()
    if isinstance(value, Sequence):
        if len(value) == 0:
            raise ValueError(f"{what} is empty; pass at least one token")
        return list(value)
    raise TypeError(f"{what} must be a token string, an id, or a list of them, not {type(value).__name__}")


def _per_prompt_rows(value: object, what: str, n_batch: int) -> list[list]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{what} token ids must be integers, not {value.dtype}")
        if value.ndim not in (1, 2):
            raise ValueError(
                f"per-prompt {what} must be a [batch] or [batch, pair] tensor, got shape {list(value.shape)}"
            )
        value = value.tolist()
    if isinstance(value, (str, int)) or not isinstance(value, Sequence):
        raise TypeError(
            f"with per_prompt=True, {what} must be a list with one token (or list of tokens) per "
            f"prompt, not {type(value).__name__}"
        )
    if len(value) != n_batch:
        raise ValueError(
            f"with per_prompt=True, {what} needs one entry per prompt: it has {len(value)} for "
            f"{n_batch} prompts (for pairs shared by every prompt leave per_prompt=False)"
        )
    rows = [_as_list(v, f"{what}[{b}]") for b, v in enumerate(value)]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"every prompt must have the same number of {what} tokens; got {sorted(widths)}")
    return rows


def resolve_pairs(
    model: Any,
    correct: object,
    incorrect: object,
    n_batch: int,
    *,
    per_prompt: bool,
    allow_no_incorrect: bool = False,
) -> Pairs:
    """Check ``correct``/``incorrect`` and resolve them to ids (see :func:`tl_logitlens.logit_diff`)."""
    if incorrect is None and not allow_no_incorrect:
        raise ValueError("incorrect is required: the metric is logit(correct) - logit(incorrect)")
    if per_prompt:
        c_rows = _per_prompt_rows(correct, "correct", n_batch)
        i_rows = None if incorrect is None else _per_prompt_rows(incorrect, "incorrect", n_batch)
    else:
        c_rows = [_as_list(correct, "correct")]
        i_rows = None if incorrect is None else [_as_list(incorrect, "incorrect")]
    if i_rows is not None and len(i_rows[0]) != len(c_rows[0]):
        raise ValueError(
            f"correct has {len(c_rows[0])} tokens per prompt but incorrect has {len(i_rows[0])}; "
            "pass one incorrect token for each correct one (they are read as pairs)"
        )
    device = model.cfg.device
    c_ids = torch.tensor(
        [[resolve_token(model, t, "correct") for t in row] for row in c_rows], dtype=torch.long, device=device
    )
    i_ids = None
    if i_rows is not None:
        i_ids = torch.tensor(
            [[resolve_token(model, t, "incorrect") for t in row] for row in i_rows],
            dtype=torch.long,
            device=device,
        )
        same = c_ids == i_ids
        if bool(same.any()):
            b, k = (int(v) for v in same.nonzero()[0])
            tok = display_tokens(getattr(model, "tokenizer", None), [int(c_ids[b, k])])[0]
            where = f"pair {k}" + (f" of prompt {b}" if per_prompt else "")
            raise ValueError(
                f"{where}: correct and incorrect are the same token {tok!r} (id {int(c_ids[b, k])}), so "
                "their logit difference is zero by construction; pass two different tokens"
            )
    tok = getattr(model, "tokenizer", None)
    n_pair = c_ids.shape[1]
    if per_prompt:
        labels = tuple(
            (f"correct[{k}] - incorrect[{k}]" if i_ids is not None else f"correct[{k}]") for k in range(n_pair)
        )
    else:
        c_str = display_tokens(tok, c_ids[0].tolist()) if tok is not None else [str(i) for i in c_ids[0].tolist()]
        if i_ids is None:
            labels = tuple(repr(c) for c in c_str)
        else:
            i_str = (
                display_tokens(tok, i_ids[0].tolist()) if tok is not None else [str(i) for i in i_ids[0].tolist()]
            )
            labels = tuple(f"{c!r} - {i!r}" for c, i in zip(c_str, i_str))
    return Pairs(correct=c_ids, incorrect=i_ids, labels=labels)


def check_direction(model: Any, direction: object) -> Float[torch.Tensor, "pair d_model"]:
    """A ``[d_model]`` or ``[n, d_model]`` float tensor, finite, as float32 ``[n, d_model]``."""
    d_model = model.cfg.d_model
    if not isinstance(direction, torch.Tensor):
        try:
            direction = torch.as_tensor(direction)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"direction must be a tensor (or array) of shape [d_model] or [n, d_model], not "
                f"{type(direction).__name__}"
            ) from err
    if not direction.dtype.is_floating_point:
        raise TypeError(f"direction must hold floats, not {direction.dtype}")
    given = list(direction.shape)
    if direction.ndim == 1:
        direction = direction[None]
    if direction.ndim != 2 or direction.shape[-1] != d_model or direction.shape[0] == 0:
        raise ValueError(
            f"direction must be [d_model] or [n, d_model] with d_model={d_model}, got shape {given}"
        )
    if not bool(torch.isfinite(direction).all()):
        raise ValueError("direction holds NaN or infinite values; pass a finite vector")
    return direction.detach().to(device=model.cfg.device, dtype=torch.float32)
