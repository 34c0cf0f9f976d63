"""Figures of direct logit attribution: a layer × head grid, component bars, the component lens."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from tl_logitlens.attribution import AttributionResult, ComponentLensResult
from tl_logitlens.plotting._common import as_list, cell_text, quoted
from tl_logitlens.plotting.comparison import _check_index


def _values(
    result: AttributionResult, pair: int, prompt: int | None, column: int
) -> tuple[torch.Tensor, float, str]:
    """Each row's attribution (``[row]``), the model's total, and a caption of what was averaged."""
    n_rows, n_batch, n_cols, n_pairs = result.attribution.shape
    pair = _check_index("pair", pair, n_pairs)
    if prompt is None:
        n_valid = int(result.valid.sum())
        return (
            result.mean_attribution(pair),
            float(torch.nanmean(result.total[..., pair])),
            f"mean over {n_valid} prompt-position{'s' if n_valid != 1 else ''}",
        )
    prompt = _check_index("prompt", prompt, n_batch)
    column = _check_index("column", column, n_cols)
    if not bool(result.valid[prompt, column]):
        raise ValueError(f"column {column} of prompt {prompt} is padding; pick a column that holds a token")
    where = quoted(result.input_tokens()[prompt][column])
    return (
        result.attribution[:, prompt, column, pair],
        float(result.total[prompt, column, pair]),
        f"prompt {prompt}, after {where}",
    )


def _unit_name(result: AttributionResult) -> str:
    return "logit difference" if result.metric == "logit_diff" else "logit"


def head_grid_figure(
    result: AttributionResult,
    *,
    pair: int = 0,
    prompt: int | None = None,
    column: int = -1,
    title: str | None = None,
) -> go.Figure:
    """Each attention head's direct contribution (logits) as a layer × head heatmap.

    Rows: layers, the first at the bottom; columns: heads. The colour scale is diverging and
    centred on zero (red lowers, blue raises the ``pair``'s logit difference). ``prompt=None``
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
    hover = [
        [f"<b>{labels[layer][h]}</b><br>{_fmt(z[layer][h])} logits" for h in range(n_heads)]
        for layer in range(n_layers)
    ]
    show_text = n_layers * n_heads <= 400
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            text=[[f"{v:+.2f}" if v is not None else "" for v in row] for row in z] if show_text else None,
            texttemplate="%{text}" if show_text else None,
            textfont={"size": 10},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": {"text": f"{_unit_name(result)} (logits)", "side": "right"}},
            xgap=1,
            ygap=1,
        )
    )
    fig.update_xaxes(title_text="head", tickvals=list(range(n_heads)), type="linear")
    fig.update_yaxes(title_text="layer", tickvals=list(range(n_layers)), type="linear")
    pair_label = cell_text(result.pair_labels[_check_index("pair", pair, len(result.pair_labels))])
    fig.update_layout(
        title={
            "text": title
            or f"Direct logit attribution per head: {pair_label}<br><sup>{caption}; model total {total:+.3f}</sup>"
        },
        width=max(480, 220 + 48 * n_heads),
        height=max(320, 160 + 30 * n_layers),
        plot_bgcolor="white",
    )
    return fig


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:+.4f}"


def component_bars_figure(
    result: AttributionResult,
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
    how many). Blue raises, red lowers the ``pair``'s value; the grey bar is the model's own total,
    which the rows add up to. ``prompt``/``column`` as in :func:`head_grid_figure`.
    """
    values, total, caption = _values(result, pair, prompt, column)
    n_grid_rows = 0 if result.grid_size is None else result.grid_size[0] * result.grid_size[1]
    rows = list(range(n_grid_rows, len(result.labels)))
    note = ""
    if n_grid_rows:
        if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 0:
            raise ValueError(f"n_grid must be a non-negative int, got {n_grid!r}")
        grid_vals = values[:n_grid_rows].nan_to_num(0.0).abs()
        keep = grid_vals.topk(min(n_grid, n_grid_rows)).indices.tolist()
        what = "heads" if result.unit in ("head", "head_source") else "neurons"
        note = f"; showing the {len(keep)} largest of {n_grid_rows} {what}"
        # heads/neurons go just before the other rows of their layer
        rows = sorted(keep + rows, key=lambda r: (_depth(result, r), r))
    labels = [result.labels[r] for r in rows] + ["total (model)"]
    y = as_list(values[rows]) + [total]
    colours = ["#2166ac" if (v or 0) >= 0 else "#b2182b" for v in y[:-1]] + ["#777777"]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=y,
            marker={"color": colours},
            hovertemplate="<b>%{x}</b><br>%{y:+.4f} logits<extra></extra>",
            name="direct contribution",
        )
    )
    fig.add_hline(y=0, line={"color": "#444", "width": 1})
    fig.update_xaxes(title_text="component", type="category", tickangle=-45)
    fig.update_yaxes(title_text=f"direct contribution to the {_unit_name(result)} (logits)")
    pair_label = cell_text(result.pair_labels[_check_index("pair", pair, len(result.pair_labels))])
    fig.update_layout(
        title={"text": title or f"Direct logit attribution: {pair_label}<br><sup>{caption}{note}</sup>"},
        width=max(560, 160 + 34 * len(labels)),
        height=460,
        plot_bgcolor="white",
        showlegend=False,
    )
    return fig


def _depth(result: AttributionResult, row: int) -> float:
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
    result: ComponentLensResult,
    *,
    prompt: int = 0,
    column: int = -1,
    k: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """The tokens each component's output promotes (right, blue) and suppresses (left, red).

    Rows: the result's components in depth order (the first at the bottom); columns: the
    ``k`` most suppressed tokens, then the ``k`` most promoted (default: all the result holds). Colour: the direct effect on that
    token's logit (logits, centred on zero); cell text: the token.
    """
    n_rows, n_batch, n_cols, k_max = result.promoted_ids.shape
    prompt = _check_index("prompt", prompt, n_batch)
    column = _check_index("column", column, n_cols)
    if k is None:
        k = k_max
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_max:
        raise ValueError(f"k must be an int in [1, {k_max}] (the result's top_k), got {k!r}")
    if not bool(result.valid[prompt, column]):
        raise ValueError(f"column {column} of prompt {prompt} is padding; pick a column that holds a token")
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
        text.append([cell_text(t) for t in toks])
        hover.append(
            [f"<b>{result.labels[r]}</b><br>{quoted(t)}: {_fmt(v)} logits" for t, v in zip(toks, vals)]
        )
    columns = [f"−{i + 1}" for i in range(k)][::-1] + [f"+{i + 1}" for i in range(k)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=columns,
            y=list(result.labels),
            text=text,
            texttemplate="%{text}",
            textfont={"size": 10},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": {"text": "effect on the logit (logits)", "side": "right"}},
            xgap=1,
            ygap=1,
        )
    )
    where = quoted(result.input_tokens()[prompt][column])
    fig.update_xaxes(title_text="most suppressed ← rank → most promoted", type="category")
    fig.update_yaxes(title_text="component", type="category")
    fig.update_layout(
        title={"text": title or f"Component lens: tokens each component pushes up and down (after {where})"},
        width=max(560, 200 + 70 * 2 * k),
        height=max(320, 150 + 22 * n_rows),
        plot_bgcolor="white",
    )
    return fig
