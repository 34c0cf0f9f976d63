"""Shared pieces of the results' long-format ``to_dataframe()`` methods.

Every result indexes its values ``[row-like, batch, pos, column-like]`` over *read* positions, with a
``valid`` mask over ``[batch, pos]`` that marks padding; these helpers enumerate the valid cells and
name the prompt, position and input token of each, the same way for every result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Int


def input_tokens(positions: Int[torch.Tensor, "batch pos"], str_tokens: Sequence[Sequence[str]]) -> list[list[str]]:
    """The input token at each read position, ``[batch][pos]`` (pads: ``""``)."""
    out = []
    for b, row in enumerate(positions.tolist()):
        toks = str_tokens[b]
        out.append([toks[p] if p < len(toks) else "" for p in row])
    return out


def long_index(
    shape: Sequence[int], valid: Bool[torch.Tensor, "batch pos"]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors ``(outer, b, j, inner)`` over every cell of a ``[outer, batch, pos, inner]`` grid
    whose ``[b, j]`` is a real (not padding) read position, in row-major order."""
    grid = torch.cartesian_prod(*(torch.arange(n) for n in shape)).reshape(-1, 4)
    grid = grid[valid.cpu()[grid[:, 1], grid[:, 2]]]
    outer, b, j, inner = grid.unbind(-1)
    return outer, b, j, inner


def position_columns(
    positions: Int[torch.Tensor, "batch pos"],
    str_tokens: Sequence[Sequence[str]],
    b: torch.Tensor,
    j: torch.Tensor,
) -> dict[str, object]:
    """The ``prompt``, ``position`` and ``input_token`` columns for cells ``(b, j)``."""
    inputs = input_tokens(positions, str_tokens)
    return {
        "prompt": b.numpy(),
        "position": positions.cpu()[b, j].numpy(),
        "input_token": [inputs[bb][jj] for bb, jj in zip(b.tolist(), j.tolist())],
    }
