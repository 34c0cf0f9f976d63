"""The text view of the logit lens: each layer's predictions read as a line of text."""

from __future__ import annotations

import plotly.graph_objects as go

from tl_logitlens.lens import LensResult
from tl_logitlens.plotting._common import cell_text, check_prompt, quoted, valid_columns
from tl_logitlens.plotting.lens import shown_columns


def _width(label: str) -> int:
    """A box's width in characters (monospace), one character of padding."""
    return max(len(label), 1) + 1


def text_heatmap(
    result: LensResult,
    *,
    prompt: int = 0,
    max_positions: int = 40,
    long: str = "clip",
    title: str | None = None,
) -> go.Figure:
    """The sentence each layer would write: one row per site, each position's top token in a box.

    A box's shade is the top token's probability at that site (0 white, 1 dark). The top row is
    the input itself, so the prediction after each input token sits under it in reading order
    (boxes are as wide as their text, so columns line up only where the tokens have equal length).
    Built from two horizontal bar traces: ``"input"`` and ``"predictions"``, whose ``text`` is the
    top tokens (through :func:`cell_text`) and ``marker.color`` the probabilities.
    """
    prompt = check_prompt(result, prompt)
    cols_all = valid_columns(result, prompt)
    cols = [cols_all[i] for i in shown_columns(len(cols_all), max_positions, long)]
    labels = list(result.labels)
    inputs = [cell_text(t) for t in result.input_tokens()[prompt]]
    top = result.top_tokens()
    probs = result.top_probs[:, prompt].tolist()
    positions = result.positions[prompt].tolist()

    def row_boxes(tokens: list[str]) -> tuple[list[int], list[int]]:
        widths = [_width(t) for t in tokens]
        bases, at = [], 0
        for w in widths:
            bases.append(at)
            at += w
        return widths, bases

    in_tokens = [inputs[j] for j in cols]
    w_in, b_in = row_boxes(in_tokens)
    fig = go.Figure(
        go.Bar(
            name="input",
            orientation="h",
            y=["input"] * len(cols),
            x=w_in,
            base=b_in,
            text=in_tokens,
            textposition="inside",
            insidetextanchor="middle",
            marker={"color": "#eeeeee", "line": {"color": "white", "width": 2}},
            textfont={"family": "monospace", "color": "black"},
            hovertext=[f"input position {positions[j]} {quoted(result.input_tokens()[prompt][j])}" for j in cols],
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
        )
    )
    y, x, base, text, colour, hover = [], [], [], [], [], []
    for s, label in enumerate(labels):
        tokens = [cell_text(top[s][prompt][j][0]) for j in cols]
        widths, bases = row_boxes(tokens)
        y += [label] * len(cols)
        x += widths
        base += bases
        text += tokens
        colour += [probs[s][j][0] for j in cols]
        hover += [
            f"<b>{label}</b> after {quoted(result.input_tokens()[prompt][j])} (position {positions[j]})"
            f"<br>top token {quoted(top[s][prompt][j][0])}, P = {probs[s][j][0]:.3f}"
            for j in cols
        ]
    fig.add_trace(
        go.Bar(
            name="predictions",
            orientation="h",
            y=y,
            x=x,
            base=base,
            text=text,
            textposition="inside",
            insidetextanchor="middle",
            marker={
                "color": colour,
                "colorscale": "Blues",
                "cmin": 0.0,
                "cmax": 1.0,
                "showscale": True,
                "colorbar": {"title": {"text": "P(top token)", "side": "right"}},
                "line": {"color": "white", "width": 2},
            },
            textfont={"family": "monospace"},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
        )
    )
    longest = max([sum(w_in)] + [sum(_width(t) for t in text[i : i + len(cols)]) for i in range(0, len(text), len(cols) or 1)])
    fig.update_xaxes(visible=False, range=[0, longest])
    fig.update_yaxes(
        title_text="layer (residual stream site)",
        type="category",
        categoryorder="array",
        categoryarray=labels + ["input"],
    )
    fig.update_layout(
        title={"text": title or "What each layer would write next (shade: probability of its top token)"},
        barmode="overlay",
        uniformtext={"minsize": 8, "mode": "show"},
        bargap=0.08,
        width=max(520, 200 + int(8.2 * longest)),
        height=max(300, 150 + 24 * (len(labels) + 1)),
        plot_bgcolor="white",
        font={"size": 12},
    )
    return fig
