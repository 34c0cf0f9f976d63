"""Helpers every figure shares: token labels safe for plotly's text, picking a prompt's columns."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from tl_logitlens.lens import LensResult

# plotly draws text as a small subset of HTML: '<b>' makes bold, '\n' breaks the line, '&amp;' is an
# entity. Tokens are data, not markup, so these characters are escaped or shown as visible symbols.
_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def cell_text(token: str) -> str:
    """A token as plotly should show it: newlines and tabs as visible symbols, ``& < >`` escaped.

    Plotly turns the entities back into the characters on screen, so what is drawn is the token
    itself; the escaping only stops ``"<b>"`` being read as markup. Other control characters
    (which SVG cannot hold) show as their Control Pictures symbol (``␀``..``␟``, ``␡``) or ``\\x85``.
    """
    return "".join(_ESCAPES.get(ch, _VISIBLE.get(ch)) or _control(ch) for ch in token)


def _control(ch: str) -> str:
    """Control characters (not allowed in SVG, so they break static export) as visible symbols."""
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # the Control Pictures block: ␀ ... ␟
    if code == 0x7F:
        return "\u2421"
    if 0x80 <= code < 0xA0:
        return f"\\x{code:02x}"
    return ch


def quoted(token: str) -> str:
    """A token in quotes for hover text and titles, so leading spaces are visible."""
    return "'" + cell_text(token) + "'"


def check_prompt(result: LensResult, prompt: int) -> int:
    """The prompt index, checked against the result's batch."""
    n_batch = result.top_ids.shape[1]
    if isinstance(prompt, bool) or not isinstance(prompt, int):
        raise TypeError(f"prompt must be an int index, not {type(prompt).__name__}")
    if not -n_batch <= prompt < n_batch:
        raise ValueError(f"prompt={prompt} is out of range: the result holds {n_batch} prompt(s)")
    return prompt % n_batch


def valid_columns(result: LensResult, prompt: int) -> list[int]:
    """The read-position columns of one prompt that hold real tokens, in order."""
    return [j for j, ok in enumerate(result.valid[prompt].tolist()) if ok]


def column_at(result: LensResult, prompt: int, position: int) -> int:
    """The column of ``result`` that read token ``position`` of ``prompt`` (``-1``: its last token).

    Negative positions count back from the prompt's own last real token, as in ``logit_lens``.
    """
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int, not {type(position).__name__}")
    length = len(result.str_tokens[prompt])
    pos = position + length if position < 0 else position
    cols = [j for j in valid_columns(result, prompt) if int(result.positions[prompt, j]) == pos]
    if not cols:
        read = [int(result.positions[prompt, j]) for j in valid_columns(result, prompt)]
        raise ValueError(
            f"position {position} of prompt {prompt} was not read by this result (it read positions "
            f"{read}); run logit_lens with positions=None or include that position"
        )
    return cols[0]


def target_index(result: LensResult, target: str | int, prompt: int | None = None) -> int:
    """Which of the result's targets ``target`` names: a token string (as displayed) or a token id."""
    if result.target_ids is None:
        raise ValueError(
            f"target={target!r} was given but this result has no targets; pass targets=[...] to logit_lens"
        )
    rows = range(result.target_ids.shape[0]) if prompt is None else [prompt]
    names = target_names(result)
    for t in range(result.target_ids.shape[-1]):
        ids = {int(result.target_ids[b, j, t]) for b in rows for j in valid_columns(result, b)}
        if isinstance(target, int) and not isinstance(target, bool) and ids == {target}:
            return t
        if isinstance(target, str) and names[t] == target:
            return t
    raise ValueError(f"target {target!r} is not one of this result's targets {names}; pick one of those")


def target_names(result: LensResult) -> list[str]:
    """A readable name per target: the token when every row shares it, else ``target <t>``."""
    from tl_logitlens.tokens import display_tokens

    if result.target_ids is None:
        return []
    names = []
    for t in range(result.target_ids.shape[-1]):
        ids = result.target_ids[..., t][result.valid]
        unique = torch.unique(ids).tolist()
        if len(unique) == 1:
            names.append(display_tokens(result.tokenizer, unique)[0])
        else:
            names.append(f"target {t}")
    return names


def as_list(values: torch.Tensor) -> list:
    """A tensor as nested Python lists of floats, NaN as ``None`` (a gap, for plotly)."""
    flat = values.detach().cpu().double()
    return _nan_to_none(flat.tolist())


def _nan_to_none(x: object) -> object:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x



def band_trace(x: list, low: list, high: list, colour: str, name: str, group: str) -> go.Scatter:
    """A filled band between ``low`` and ``high`` along ``x`` (a confidence interval), hover off."""
    return go.Scatter(
        x=x + x[::-1],
        y=high + low[::-1],
        mode="lines",
        fill="toself",
        fillcolor=colour,
        opacity=0.2,
        line={"width": 0},
        name=name,
        legendgroup=group,
        hoverinfo="skip",
    )
