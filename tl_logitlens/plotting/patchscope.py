"""The figure of a patchscope generation: one table row per source site, its continuation beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from tl_logitlens.plotting.style import FONT, MONO, after_quote, check_index, column_at, house_style

if TYPE_CHECKING:
    from tl_logitlens.analyses.patchscope import PatchscopeGeneration


def _shown(text: str) -> str:
    """Newlines and markup made visible in a table cell."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", "\\n")


def generation_table(result: PatchscopeGeneration, *, prompt: int = 0, position: int = -1) -> go.Figure:
    """The continuations of one prompt's read position, one row per source site (shallowest first).

    Args:
        result: a :class:`~tl_logitlens.analyses.patchscope.PatchscopeGeneration`.
        prompt: which prompt (negative counts from the end).
        position: which token position of it (``-1``: its last; it must be one the generation read).

    Raises:
        ValueError, TypeError: a prompt or position the result does not hold.

    Example:
        >>> tl.patchscope_generate(model, "Once upon a time", max_new_tokens=3).plot()   # doctest: +SKIP
    """
    prompt = check_index("prompt", prompt, result.valid.shape[0])
    column = column_at(result, prompt, position)
    texts = result.texts()
    rows = [_shown(texts[s][prompt][column]) for s in range(len(result.labels))]
    fig = go.Figure(
        go.Table(
            columnwidth=[1, 5],
            header={"values": ["site", "continuation"], "align": "left", "font": {"size": 13}},
            cells={
                "values": [list(result.labels), rows],
                "align": "left",
                "font": {"family": [FONT, MONO], "size": 13},
                "height": 26,
            },
        )
    )
    decoding = "greedy" if result.temperature is None else f"sampled at temperature {result.temperature:g}"
    title = (
        f"Patchscope continuations of {after_quote(result, prompt, column)} ({decoding})<br>"
        f"<sup>target prompt {_shown(result.target_text)}</sup>"
    )
    # the title block (two lines and the mode bar) takes about 170 px above the table; every row, the header
    # included, 26 px: a table cut short would hide the deepest sites
    fig = house_style(fig, title=title, width=780, height=180 + 26 * (len(rows) + 1))
    fig.update_layout(margin={"b": 10})
    return fig
