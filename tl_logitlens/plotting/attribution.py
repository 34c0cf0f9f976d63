"""Figures of direct logit attribution: a layer × head grid, component bars, the component lens."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from tl_logitlens.core.results import RowsResult
from tl_logitlens.plotting.style import (
    DIVERGING,
    MONO,
    _plain_length,
    after_quote,
    as_list,
    cell_text,
    check_index,
    clip,
    colour_bar,
    house_style,
    pair_name,
    quoted,
    sign_note,
    sign_words,
    signed_bound,
    signed_colour,
)


def _values(
    result: RowsResult, pair: int, prompt: int | None, column: int
) -> tuple[torch.Tensor, float, str]:
    """Each row's attribution (``[row]``), the model's total, and a caption of what was averaged."""
    pair = check_index("pair", pair, result.attribution.shape[-1])
    if prompt is None:
        n_valid = int(result.valid.sum())
        return (
            result.mean_attribution(pair),
            float(torch.nanmean(result.total[..., pair])),
            f"mean over {n_valid} prompt-position{'s' if n_valid != 1 else ''}",
        )
    prompt, column = _check_cell(result, prompt, column)
    where = after_quote(result, prompt, column)
    return (
        result.attribution[:, prompt, column, pair],
        float(result.total[prompt, column, pair]),
        f"prompt {prompt}, after {where}",
    )


def _unit_name(result: RowsResult) -> str:
    return "logit difference" if result.metric == "logit_diff" else "logit"


def _check_cell(result: RowsResult, prompt: int, column: int) -> tuple[int, int]:
    """``prompt`` and read-position ``column`` checked against the result: in range and not padding."""
    n_batch, n_cols = result.valid.shape
    prompt = check_index("prompt", prompt, n_batch)
    column = check_index("column", column, n_cols)
    if not bool(result.valid[prompt, column]):
        raise ValueError(f"column {column} of prompt {prompt} is padding; pick a column that holds a token")
    return prompt, column


def _signed_text(z: list, show: bool) -> list | None:
    """Each cell's value as ``+0.12`` (empty for a gap), or no text at all when ``show`` is False."""
    return [[f"{v:+.2f}" if v is not None else "" for v in row] for row in z] if show else None


def _diverging_heatmap(
    z: list, x: list, y: list, hover: list, bar_title: str, *, text: list | None, textfont: dict, bound: float
) -> go.Heatmap:
    """A heatmap of effects in logits on the package's diverging scale (blue positive, red negative,
    white at zero), symmetric: from ``-bound`` to ``+bound``."""
    return go.Heatmap(
        z=z,
        x=x,
        y=y,
        text=text,
        texttemplate="%{text}" if text is not None else None,
        textfont=textfont,
        hovertext=hover,
        hovertemplate="%{hovertext}<extra></extra>",
        colorscale=[list(stop) for stop in DIVERGING],
        zmin=-bound,
        zmax=bound,
        colorbar=colour_bar(bar_title),
        xgap=1,
        ygap=1,
    )


def head_grid_figure(
    result: RowsResult,
    *,
    pair: int = 0,
    prompt: int | None = None,
    column: int = -1,
    title: str | None = None,
) -> go.Figure:
    """Each attention head's direct contribution (logits) as a layer × head heatmap.

    Rows: layers, the first at the bottom; columns: heads. The colour scale is diverging,
    symmetric about zero: blue is positive (raises the ``pair``'s logit difference, towards the
    target), red negative; the subtitle says so with the pair's tokens. ``prompt=None``
    shows :meth:`~tl_logitlens.AttributionResult.mean_attribution` (over prompts and read
    positions); an index shows that prompt's read-position ``column``.
    """
    if result.unit not in ("head", "head_source"):
        raise ValueError(
            f"head_grid_figure needs a result with unit='head' or 'head_source', not {result.unit!r}; "
            "run direct_logit_attribution(..., unit='head')"
        )
    values, total, caption = _values(result, pair, prompt, column)
    n_layers, n_heads = result.grid_size
    grid = values[: n_layers * n_heads].reshape(n_layers, n_heads)
    labels = [[result.labels[layer * n_heads + h] for h in range(n_heads)] for layer in range(n_layers)]
    z = as_list(grid)
    pair = check_index("pair", pair, len(result.pair_labels))
    up, down = sign_words(result, pair, None if prompt is None else check_index("prompt", prompt, result.valid.shape[0]))
    hover = [
        [f"<b>{labels[layer][h]}</b><br>{_fmt(z[layer][h])} logits{_towards(z[layer][h], up, down)}" for h in range(n_heads)]
        for layer in range(n_layers)
    ]
    text = _signed_text(z, n_layers * n_heads <= 400)
    bar = f"{_unit_name(result)} (logits)"
    fig = go.Figure(
        _diverging_heatmap(
            z, list(range(n_heads)), list(range(n_layers)), hover, bar, text=text, textfont={"size": 12},
            bound=signed_bound(grid),
        )
    )
    fig.update_xaxes(title_text="head", tickvals=list(range(n_heads)), type="linear")
    fig.update_yaxes(title_text="layer", tickvals=list(range(n_layers)), type="linear")
    pair_label = pair_name(result, pair)
    fig.update_xaxes(showgrid=False)
    fig.update_yaxes(showgrid=False)
    return house_style(
        fig,
        title=title
        or f"Direct logit attribution per head: {pair_label}<br><sup>{caption}; model total {total:+.3f}</sup>"
        f"<br><sup>{sign_note(up, down)}</sup>",
        width=max(560, 240 + 52 * n_heads),
        height=max(340, 170 + 32 * n_layers),
    )


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:+.4f}"


def _towards(v: float | None, up: str, down: str) -> str:
    """Hover text's reading of a value's sign: ``" (towards '␣happy')"``; nothing for 0 or a gap."""
    if not v:
        return ""
    return f" ({up})" if v > 0 else f" ({down})"


def component_bars_figure(
    result: RowsResult,
    *,
    pair: int = 0,
    prompt: int | None = None,
    column: int = -1,
    n_grid: int = 20,
    title: str | None = None,
) -> go.Figure:
    """Bars of each row's direct contribution (logits), in depth order, and the model's total.

    Rows: embeddings, each layer's attention and MLP outputs, the biases (attention ``b_O``,
    final norm bias, unembedding bias). For ``unit="head"``/``"neuron"`` results the ``n_grid``
    heads or neurons with the largest magnitude here are shown too (the caption says how many of
    how many), and one more bar, ``other heads``/``other neurons``, is the sum of all the others, so
    the bars always add up to the total. Blue is positive (raises the ``pair``'s value, towards the
    target), red negative; the grey bar is the model's own total, which the rows add up to.
    ``prompt``/``column`` as in :func:`head_grid_figure`.
    """
    values, total, caption = _values(result, pair, prompt, column)
    pair = check_index("pair", pair, len(result.pair_labels))
    n_grid_rows = 0 if result.grid_size is None else result.grid_size[0] * result.grid_size[1]
    rows = list(range(n_grid_rows, len(result.labels)))
    note, others = "", []
    if n_grid_rows:
        if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 0:
            raise ValueError(f"n_grid must be a non-negative int, got {n_grid!r}")
        grid_vals = values[:n_grid_rows].nan_to_num(0.0).abs()
        keep = grid_vals.topk(min(n_grid, n_grid_rows)).indices.tolist()
        what = "heads" if result.unit in ("head", "head_source") else "neurons"
        rest = sorted(set(range(n_grid_rows)) - set(keep))
        note = f"; showing the {len(keep)} largest of {n_grid_rows} {what}"
        if rest:
            note += f", the other {len(rest)} summed in one bar"
            others = [(f"other {what} ({len(rest)})", float(values[rest].nansum()))]
        # heads/neurons go just before the other rows of their layer
        rows = sorted(keep + rows, key=lambda r: (_depth(result, r), r))
    labels = [result.labels[r] for r in rows] + [label for label, _ in others] + ["total (model)"]
    y = as_list(values[rows]) + [v for _, v in others] + [total]
    colours = [signed_colour(v) for v in y[:-1]] + ["#777777"]
    up, down = sign_words(result, pair, None if prompt is None else check_index("prompt", prompt, result.valid.shape[0]))
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=y,
            marker={"color": colours},
            hovertext=[f"<b>{x}</b><br>{_fmt(v)} logits{_towards(v, up, down)}" for x, v in zip(labels, y)],
            hovertemplate="%{hovertext}<extra></extra>",
            name="direct contribution",
        )
    )
    fig.add_hline(y=0, line={"color": "#444", "width": 1})
    fig.update_xaxes(title_text="component", type="category", tickangle=-45)
    fig.update_yaxes(title_text=f"direct contribution to the {_unit_name(result)} (logits)")
    pair_label = pair_name(result, pair)
    house_style(
        fig,
        title=title
        or f"Direct logit attribution: {pair_label}<br><sup>{caption}{note}</sup><br><sup>{sign_note(up, down)}; "
        "grey: the model's total</sup>",
        width=max(600, 180 + 36 * len(labels)),
        height=500,
    )
    fig.update_layout(showlegend=False, margin={"b": 120})
    return fig


def _depth(result: RowsResult, row: int) -> float:
    """Where a row sits in the forward pass: embeddings first, a layer's heads before its MLP."""
    label = result.labels[row]
    layer = result.row_layer[row]
    if label in ("embed", "pos_embed"):
        return -1.0
    if label in ("final_norm_bias", "unembed_bias") or layer < 0:
        return float("inf")
    if "mlp" in label or (result.unit == "neuron" and result.row_index[row] >= 0):
        return layer + 0.5
    return float(layer)


def component_lens_figure(
    result: RowsResult,
    *,
    prompt: int = 0,
    column: int = -1,
    k: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """The tokens each component's output promotes (right, blue) and suppresses (left, red).

    Rows: the result's components in depth order (the first at the bottom); columns: the
    ``k`` most suppressed tokens, then the ``k`` most promoted (default: all the result holds).
    Colour: the direct effect on that token's logit (logits, on the diverging scale symmetric about
    zero: blue is positive, it raises the token's logit; red negative, it lowers it); cell text: the token.
    """
    n_rows, k_max = result.promoted_ids.shape[0], result.promoted_ids.shape[-1]
    if k is None:
        k = k_max
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_max:
        raise ValueError(f"k must be an int in [1, {k_max}] (the result's top_k), got {k!r}")
    prompt, column = _check_cell(result, prompt, column)
    promoted = result.promoted_tokens()
    suppressed = result.suppressed_tokens()
    z, text, hover = [], [], []
    for r in range(n_rows):
        sup = list(range(k))[::-1]  # most suppressed at the far left
        toks = [suppressed[r][prompt][column][i] for i in sup] + [promoted[r][prompt][column][i] for i in range(k)]
        vals = as_list(result.suppressed_logits[r, prompt, column, sup]) + as_list(
            result.promoted_logits[r, prompt, column, :k]
        )
        z.append(vals)
        text.append([clip(cell_text(t)) for t in toks])
        hover.append(
            [
                f"<b>{result.labels[r]}</b><br>{quoted(t)}: {_fmt(v)} logits{_towards(v, 'promotes it', 'suppresses it')}"
                for t, v in zip(toks, vals)
            ]
        )
    columns = [f"−{i + 1}" for i in range(k)][::-1] + [f"+{i + 1}" for i in range(k)]
    bar = "effect on the logit (logits)"
    font = {"size": 12, "family": MONO}
    bound = max((abs(v) for row in z for v in row if v is not None), default=0.0) or 1.0
    fig = go.Figure(
        _diverging_heatmap(z, columns, list(result.labels), hover, bar, text=text, textfont=font, bound=bound)
    )
    where = after_quote(result, prompt, column)
    fig.update_xaxes(title_text="most suppressed ← rank → most promoted", type="category")
    fig.update_yaxes(title_text="component", type="category", showgrid=False)
    fig.update_xaxes(showgrid=False)
    longest = max([_plain_length(t) for row in text for t in row] + [4])
    return house_style(
        fig,
        title=title
        or f"Component lens: the tokens each component pushes up and down (after {where})<br><sup>"
        f"{sign_note('raises the token’s logit', 'lowers it')}</sup>",
        width=max(600, 260 + 2 * k * max(64, int(8.0 * longest) + 14)),
        height=max(340, 170 + 24 * n_rows),
    )


def head_source_figure(
    result: RowsResult,
    *,
    prompt: int = 0,
    column: int = -1,
    pair: int = 0,
    title: str | None = None,
    width: int | None = None,
) -> go.Figure:
    """Each head's direct contribution split over the source positions it attends to.

    Rows: heads ``L{layer}H{head}`` (the first layer at the top); columns: the source tokens of
    ``prompt`` up to the read position ``column`` (later sources cannot be attended to and are
    left out). A cell is ``result.source_attribution[layer, head, source, prompt, column, pair]``
    (attention weight × value vector through ``W_O``, the final scale and the unembedding, in
    logits); a row sums to that head's entry in :func:`head_grid_figure`. The colour scale is
    diverging, symmetric about zero: blue is positive (raises the pair's value, towards the
    target), red negative. ``width`` (pixels): by default 64 px per source up to 16 sources, then
    narrower columns (values in the hover only), at most 1400 px wide. The same cells as a table:
    ``result.to_dataframe()`` (a ``source`` column) and ``result.top()`` (head × source cells).

    Raises:
        ValueError: the result is not ``unit="head_source"``, or the column is padding.
    """
    if result.unit != "head_source" or result.source_attribution is None:
        raise ValueError(
            f"head_source_figure needs a result with unit='head_source', not {result.unit!r}; "
            "run direct_logit_attribution(..., unit='head_source')"
        )
    n_layers, n_heads = result.source_attribution.shape[:2]
    prompt, column = _check_cell(result, prompt, column)
    pair = check_index("pair", pair, result.source_attribution.shape[-1])
    read_at = int(result.positions[prompt, column])
    tokens = list(result.str_tokens[prompt][: read_at + 1])
    values = result.source_attribution[:, :, : len(tokens), prompt, column, pair].reshape(n_layers * n_heads, -1)
    z = as_list(values)
    rows = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
    xs = [f"{i}:{cell_text(t)}" for i, t in enumerate(tokens)]
    up, down = sign_words(result, pair, prompt)
    hover = [
        [
            f"<b>{rows[r]}</b> reading {quoted(tokens[i])} (position {i})<br>{_fmt(z[r][i])} logits"
            f"{_towards(z[r][i], up, down)}"
            for i in range(len(tokens))
        ]
        for r in range(len(rows))
    ]
    cell_px = 64 if len(tokens) <= 16 else max(24, 1140 // len(tokens))  # pixels per source position
    text = _signed_text(z, len(rows) * len(tokens) <= 600 and cell_px >= 48)
    bar = f"{_unit_name(result)} (logits)"
    fig = go.Figure(
        _diverging_heatmap(
            z, list(range(len(tokens))), rows, hover, bar, text=text, textfont={"size": 11},
            bound=signed_bound(values),
        )
    )
    fig.update_xaxes(
        title_text="source position (the token the head attends to)",
        tickvals=list(range(len(tokens))),
        ticktext=xs,
        tickfont={"family": MONO},
        tickangle=0 if max(len(x) for x in xs) * 7 <= cell_px else -45 if cell_px >= 40 else -90,
        showgrid=False,
    )
    fig.update_yaxes(title_text="head", type="category", autorange="reversed", showgrid=False)
    where = after_quote(result, prompt, column)
    return house_style(
        fig,
        title=title
        or f"Head × source position: {pair_name(result, pair)}<br><sup>prompt {prompt}, read after {where}; "
        f"each row sums to the head's direct attribution</sup><br><sup>{sign_note(up, down)}</sup>",
        width=width or min(1400, max(600, 260 + cell_px * len(tokens))),
        height=max(360, 170 + 22 * len(rows)),
    )
