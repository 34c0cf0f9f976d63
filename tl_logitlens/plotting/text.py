"""The text view of the logit lens: the input on top, under each token what every layer predicts next."""

from __future__ import annotations

import plotly.graph_objects as go

from tl_logitlens.core.results import LensStatistics
from tl_logitlens.plotting.lens import shown_columns
from tl_logitlens.plotting.style import (
    MONO,
    as_list,
    cell_text,
    check_prompt,
    colour_bar,
    colour_scale,
    house_style,
    lens_note,
    quoted,
    valid_columns,
)

_CHAR_PX = 8.4  # width of one 13-px monospace character
_ROW_PX = 28


def column_edges(columns: list[list[str]]) -> list[float]:
    """Left and right edges (in characters) of each column: as wide as its longest text, plus padding."""
    edges = [0.0]
    for texts in columns:
        edges.append(edges[-1] + max([len(t) for t in texts] + [1]) + 2)
    return edges


def text_heatmap(
    result: LensStatistics,
    *,
    prompt: int = 0,
    max_positions: int = 40,
    long: str = "clip",
    scale: str = "linear",
    zmin: float | None = None,
    zmax: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """The sentence each layer would write, aligned by position.

    The top row is the input; under each input token, one row per site (the last layer just below
    the input, the embeddings at the bottom) shows that site's top prediction for the *next* token,
    so a prediction sits under the token it follows. Columns are as wide as their longest token,
    text is horizontal and monospace, whitespace visible (``␣``, ``↵``). A cell's shade is the top
    token's probability (``scale``, ``zmin``, ``zmax`` as in :func:`lens_heatmap`: by default
    linear from 0 to the largest probability shown).

    Built from two heatmap traces sharing the same column edges (``x``): ``"input"`` (grey, the
    input tokens, at ``y = n_sites``) and ``"predictions"`` (``y = 0 .. n_sites - 1``, ticks labelled
    with the sites; ``text``: the top tokens through :func:`cell_text`; ``z``: their probabilities,
    ``[site][column]``).
    """
    prompt = check_prompt(result, prompt)
    cols_all = valid_columns(result, prompt)
    cols = [cols_all[i] for i in shown_columns(len(cols_all), max_positions, long)]
    labels = list(result.labels)
    raw_inputs = result.input_tokens()[prompt]
    inputs = [cell_text(raw_inputs[j]) for j in cols]
    top = result.top_tokens()
    probs = result.top_probs[:, prompt][:, cols, 0]  # [site, column]
    positions = result.positions[prompt].tolist()
    preds = [[cell_text(top[s][prompt][j][0]) for j in cols] for s in range(len(labels))]
    edges = column_edges([[inputs[c]] + [preds[s][c] for s in range(len(labels))] for c in range(len(cols))])
    drawn = colour_scale(probs, scale=scale, zmin=zmin, zmax=zmax, lower=0.0 if scale == "linear" else None)
    font = {"family": MONO, "size": 13}
    fig = go.Figure(
        go.Heatmap(
            name="input",
            x=edges,
            y=[len(labels)],
            z=[[0.0] * len(cols)],
            text=[inputs],
            texttemplate="%{text}",
            textfont={**font, "color": "black"},
            colorscale=[[0.0, "#e6e6e6"], [1.0, "#e6e6e6"]],
            showscale=False,
            hovertext=[[f"input position {positions[j]} {quoted(raw_inputs[j])}" for j in cols]],
            hovertemplate="%{hovertext}<extra></extra>",
            xgap=2,
            ygap=2,
        )
    )
    hover = [
        [
            f"<b>{label}</b> after {quoted(raw_inputs[j])} (position {positions[j]})"
            f"<br>top token {quoted(top[s][prompt][j][0])}, P = {float(probs[s, c]):.3f}"
            for c, j in enumerate(cols)
        ]
        for s, label in enumerate(labels)
    ]
    fig.add_trace(
        go.Heatmap(
            name="predictions",
            x=edges,
            y=list(range(len(labels))),
            z=as_list(drawn.z),
            text=preds,
            texttemplate="%{text}",
            textfont=font,
            colorscale="Blues",
            zmin=drawn.zmin,
            zmax=drawn.zmax,
            colorbar=colour_bar("P(top token)" + (" (log scale)" if drawn.log else ""), drawn),
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            xgap=2,
            ygap=2,
        )
    )
    fig.update_xaxes(visible=False, range=[edges[0], edges[-1]])
    # a numeric y axis (rows 0..n_sites-1, the input at n_sites): plotly.js cannot draw two heatmaps
    # on one category axis whose categories differ (the static export fails)
    fig.update_yaxes(
        title_text="layer (residual stream site)",
        tickvals=list(range(len(labels) + 1)),
        ticktext=labels + ["input"],
        range=[-0.5, len(labels) + 0.5],
        showgrid=False,
        zeroline=False,
    )
    return house_style(
        fig,
        title=title or f"What each layer would write next{lens_note(result)}<br><sup>under each input token, each site's top "
        "prediction for the token after it; shade: its probability</sup>",
        width=max(560, 230 + int(_CHAR_PX * edges[-1])),
        height=max(320, 150 + _ROW_PX * (len(labels) + 1)),
    )
