"""Figures of masked-LM lens results and depth profiles (plotly). They read result fields only."""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tl_logitlens.core.tokens import display_tokens
from tl_logitlens.plotting.style import (
    LINE_CHART,
    MONO,
    PALETTE,
    as_list,
    cell_text,
    colour_bar,
    colour_scale,
    house_style,
    log_ticks,
    quoted,
)

_CHAR_PX = 8.4


def _site_index(labels: tuple[str, ...], site: str | int) -> int:
    if isinstance(site, str):
        if site not in labels:
            raise ValueError(f"site {site!r} is not in this result; it has {list(labels)}")
        return labels.index(site)
    if not -len(labels) <= site < len(labels):
        raise ValueError(f"site index {site} is out of range for {len(labels)} sites")
    return site % len(labels)


def _styled(fig: go.Figure, layout: dict[str, Any], **style: Any) -> go.Figure:
    """``fig`` in the house style (``title``, ``width``, ``height``, ``legend_below``), then the caller's ``layout``."""
    return house_style(fig, **style).update_layout(**layout)


def _column_px(texts: list[str], least: int = 56) -> int:
    """A column wide enough for its longest text at 12-px monospace."""
    return max(least, int(_CHAR_PX * max([len(t) for t in texts] + [1])) + 16)


def vocab_figure(result: Any, site: str | int = -1, prompt: int = 0, mask: int = 0, **layout: Any) -> go.Figure:
    """The full-vocabulary log-softmax (nats) at one site and hole, sorted, with the original token and targets marked.

    x: rank (1 = top, log axis labelled 1, 10, 100, ...); y: log-prob in nats. The original token
    and each target are marked and named in the legend with their rank (no labels on the plot, so
    they never overlap). ``layout`` goes to ``fig.update_layout``.
    """
    if result.full_logprobs is None:
        raise ValueError("this result holds no full log-probs; run masked_lens(..., keep_logprobs=True)")
    if not bool(result.valid[prompt, mask]):
        raise ValueError(f"prompt {prompt} has no hole number {mask}")
    s = _site_index(result.labels, site)
    lp = result.full_logprobs[s, prompt, mask].cpu()
    order = lp.argsort(descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    tok = result.tokenizer
    fig = go.Figure()
    fig.add_trace(
        go.Scattergl(
            x=list(range(1, order.numel() + 1)),
            y=lp[order].tolist(),
            mode="lines",
            line={"color": "#555", "width": 2},
            name="vocabulary, sorted",
            text=[quoted(t) for t in display_tokens(tok, order)],
            hovertemplate="rank %{x}: %{text} %{y:.2f} nats<extra></extra>",
        )
    )
    marks: list[tuple[str, int]] = []
    orig = int(result.original_ids[prompt, mask])
    if orig >= 0:
        marks.append(("original", orig))
    if result.target_ids is not None:
        marks += [("target", int(t)) for t in result.target_ids.tolist()]
    for i, (what, tid) in enumerate(marks):
        name = quoted(display_tokens(tok, [tid])[0])
        fig.add_trace(
            go.Scatter(
                x=[int(ranks[tid])],
                y=[float(lp[tid])],
                mode="markers",
                marker={"size": 12, "color": PALETTE[i % len(PALETTE)], "line": {"color": "white", "width": 1}},
                name=f"{what} {name}: rank {int(ranks[tid])}, {float(lp[tid]):.2f} nats",
                hovertemplate=f"{what} {name}<br>rank %{{x}}, %{{y:.2f}} nats<extra></extra>",
            )
        )
    tickvals, ticktext = log_ticks(1.0, float(order.numel()))
    fig.update_xaxes(title_text="rank (1 = top token)", type="log", tickvals=[10**v for v in tickvals], ticktext=ticktext)
    fig.update_yaxes(title_text="log-prob (nats)")
    return _styled(
        fig,
        layout,
        title=f"Log-softmax over the whole vocabulary at {result.labels[s]}<br><sup>hole at position "
        f"{int(result.mask_positions[prompt, mask])}, prompt {prompt}; every token sorted by its log-prob</sup>",
        **LINE_CHART,
    )


def profile_figure(profile: Any, row: int = 0, *, show_max: bool = True, show_tracked: bool = True, **layout: Any) -> go.Figure:
    """The laminar profile of one row: target log-prob per depth, its fit ``a + b·√d`` with the equation."""
    n_rows = len(profile.row_tokens)
    if not 0 <= row < n_rows:
        raise ValueError(f"row {row} is out of range; this profile has {n_rows} rows")
    depths = profile.depths
    dense = torch.linspace(float(depths.min()), float(depths.max()), 100, dtype=torch.float64)
    a, b, r2 = (float(t[row]) for t in (profile.intercept, profile.slope, profile.r2))
    target = html.escape(profile.target, quote=False)  # a description ("original token") or a token
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=depths.tolist(), y=profile.logprobs[:, row].tolist(), mode="markers+lines", name=f"log P({target})",
            line={"color": PALETTE[0], "width": 3},
            text=list(profile.labels), hovertemplate="%{text}: %{y:.3f} nats<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=dense.tolist(), y=(a + b * dense.sqrt()).tolist(), mode="lines",
            line={"dash": "dash", "color": PALETTE[0]},
            name=f"fit: log P = {a:.2f} + {b:.2f}·√layer (r² = {r2:.2f})",
        )
    )
    if show_max:
        fig.add_trace(
            go.Scatter(
                x=depths.tolist(), y=profile.max_logprobs[:, row].tolist(), mode="markers+lines",
                name="each site's top token",
                text=[quoted(t) for t in display_tokens(profile.tokenizer, profile.max_ids[:, row].clamp(min=0))],
                hovertemplate="%{text}: %{y:.3f} nats<extra></extra>",
                line={"dash": "dot", "color": PALETTE[1]},
            )
        )
    if show_tracked:
        for c, tid in enumerate(profile.tracked_ids[row].tolist()):
            if tid < 0:
                continue
            fig.add_trace(
                go.Scatter(
                    x=depths.tolist(), y=as_list(profile.tracked_logprobs[:, row, c]), mode="lines",
                    opacity=0.45, line={"color": PALETTE[(c + 2) % len(PALETTE)]},
                    name=f"tracked {quoted(display_tokens(profile.tokenizer, [tid])[0])}",
                )
            )
    dec = float(depths[profile.decision_site[row]])
    fig.add_vline(
        x=dec, line={"dash": "dot", "color": "grey"},
        annotation_text=f"decision ({profile.labels[int(profile.decision_site[row])]})",
        annotation_position="top left",
    )
    fig.update_xaxes(title_text="layer (depth)", tickvals=depths.tolist(), ticktext=list(profile.labels))
    fig.update_yaxes(title_text="log-prob (nats)")
    return _styled(
        fig,
        layout,
        title=f"Depth profile of {target} at position {int(profile.positions[row])} "
        f"({quoted(profile.row_tokens[row])})",
        width=780,
        height=480,
        legend_below=True,
    )


def profile_heatmaps(profile: Any, *, prompt: int = 0, **layout: Any) -> go.Figure:
    """Three stacked panels over the same words: the target's log-prob per site (heatmap), the top
    token and its log-prob per site (heatmap, cell text the token), and the √depth slopes (bars).

    The two heatmaps share one colour scale (nats), adapted to their values; its colour bar spans
    them and the legend sits below the figure, so neither overlaps the other.
    """
    rows = (profile.prompts == prompt).nonzero().reshape(-1)
    if rows.numel() == 0:
        raise ValueError(f"prompt {prompt} has no rows in this profile")
    idx = rows.tolist()
    x = list(range(len(idx)))
    ticks = [cell_text(profile.row_tokens[i]) for i in idx]
    labels = list(profile.labels)
    target = html.escape(profile.target, quote=False)  # a description ("original token") or a token
    max_text = [[cell_text(t) for t in display_tokens(profile.tokenizer, profile.max_ids[s, rows].clamp(min=0))] for s in range(len(labels))]
    n_sites = len(labels)
    heat_h, bar_h = 26 * n_sites + 30, 180
    total = 2 * heat_h + bar_h
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
        row_heights=[heat_h / total, heat_h / total, bar_h / total],
        subplot_titles=(
            f"log P({target}) at each site (the word that stood there)",
            "each site's top token and its log-prob",
            "slope of the √depth fit (nats/√layer)",
        ),
    )
    both = torch.stack([profile.logprobs[:, rows], profile.max_logprobs[:, rows]])
    drawn = colour_scale(both, scale="linear", zmin=None, zmax=None)
    for panel, (values, text) in enumerate(((profile.logprobs, None), (profile.max_logprobs, max_text)), start=1):
        fig.add_trace(
            go.Heatmap(
                z=as_list(values[:, rows]), x=x, y=labels, text=text,
                texttemplate="%{text}" if text else None, textfont={"family": MONO, "size": 12},
                coloraxis="coloraxis", xgap=1, ygap=1,
                hovertemplate="%{y}, word %{x}: %{z:.2f} nats<extra></extra>",
                name="target log-prob" if panel == 1 else "top-token log-prob",
            ),
            row=panel, col=1,
        )
    fig.add_trace(
        go.Bar(x=x, y=profile.slope[rows].tolist(), name=f"slope of log P({target})", marker_color=PALETTE[0]),
        row=3, col=1,
    )
    fig.add_trace(
        go.Bar(x=x, y=profile.max_slope[rows].tolist(), name="slope of the top token's log-prob", marker_color=PALETTE[1]),
        row=3, col=1,
    )
    for r in (1, 2, 3):
        fig.update_xaxes(tickvals=x, ticktext=ticks, tickfont={"family": MONO}, showticklabels=True, showgrid=False, row=r, col=1)
        if r < 3:
            fig.update_yaxes(type="category", showgrid=False, row=r, col=1)
    fig.update_xaxes(title_text="masked word", row=3, col=1)
    width = max(640, 200 + len(idx) * _column_px([t for row in max_text for t in row] + ticks))
    house_style(
        fig,
        title=f"Depth profiles of every word, prompt {prompt}",
        width=width,
        height=total + 190,
        legend_below=True,
    )
    top_domain = fig.layout.yaxis.domain
    mid_domain = fig.layout.yaxis2.domain
    fig.update_layout(
        coloraxis={
            "colorscale": "Viridis",
            "cmin": drawn.zmin,
            "cmax": drawn.zmax,
            "colorbar": {
                "title": {"text": "log-prob (nats)", "side": "right"},
                "y": (top_domain[1] + mid_domain[0]) / 2,
                "len": top_domain[1] - mid_domain[0],
                "yanchor": "middle",
            },
        },
        barmode="group",
        legend={"y": -0.12},
    )
    fig.update_annotations(font={"size": 13}, xanchor="left", x=0.0)
    fig.update_layout(**layout)
    return fig


def sliding_text_heatmap(
    result: Any,
    *,
    value: str = "original_logprob",
    zmin: float | None = None,
    zmax: float | None = None,
    **layout: Any,
) -> go.Figure:
    """The sliding-mask run as a text heatmap: sites × masked tokens, each cell the predicted token.

    ``value`` colours the cells: ``"original_logprob"`` (log-prob of the token that stood there) or
    ``"max_logprob"`` (the top-1 token's log-prob), in nats; the colour range adapts to the values
    (``zmin``/``zmax`` fix either end). Columns are the masked words (whitespace visible), as wide
    as their longest prediction; the first site is at the bottom.
    """
    if value not in ("original_logprob", "max_logprob"):
        raise ValueError(f"value={value!r}; use 'original_logprob' or 'max_logprob'")
    z = result.original_logprobs if value == "original_logprob" else result.max_logprobs
    drawn = colour_scale(z, scale="linear", zmin=zmin, zmax=zmax)
    words = [cell_text(t) for t in result.original_tokens()]
    preds = [[cell_text(t) for t in row] for row in result.predicted_tokens()]
    positions = result.positions.tolist()
    x = list(range(len(words)))
    hover = [
        [
            f"<b>{label}</b>, hole at {positions[c]} ({quoted(result.original_tokens()[c])})"
            f"<br>predicts {quoted(result.predicted_tokens()[s][c])}; {value.replace('_', ' ')} {float(z[s, c]):.2f} nats"
            for c in x
        ]
        for s, label in enumerate(result.labels)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=as_list(z), x=x, y=list(result.labels), text=preds, texttemplate="%{text}",
            textfont={"family": MONO, "size": 12}, colorscale="Viridis", zmin=drawn.zmin, zmax=drawn.zmax,
            colorbar=colour_bar(f"{'log P(original)' if value == 'original_logprob' else 'log P(top)'} (nats)"),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", xgap=1, ygap=1,
        )
    )
    fig.update_xaxes(title_text="masked word", tickvals=x, ticktext=words, tickfont={"family": MONO}, showgrid=False)
    fig.update_yaxes(title_text="site", type="category", showgrid=False)
    what = "the log-prob of the word that stood there" if value == "original_logprob" else "the top token's log-prob"
    return _styled(
        fig,
        layout,
        title=f"Sliding mask: each word masked in turn<br><sup>cell: what the site predicts for the hole; colour: {what}</sup>",
        width=max(640, 200 + len(words) * _column_px([t for row in preds for t in row] + words)),
        height=max(340, 190 + 28 * len(result.labels)),
    )


def masked_topk_figure(result: Any, prompt: int = 0, hole: int = 0) -> go.Figure:
    """One hole's top-k tokens at every site (rows: sites, first at the bottom; columns: rank), shaded by probability.

    ``result`` is a :class:`~tl_logitlens.MaskedLensResult`; the colour is each token's probability
    on a fixed 0..1 scale.
    """
    k = result.top_ids.shape[-1]
    labels = list(result.labels)
    probs = result.top_logprobs[:, prompt, hole].exp()
    text = [[cell_text(t) for t in display_tokens(result.tokenizer, result.top_ids[s, prompt, hole])] for s in range(len(labels))]
    orig = int(result.original_ids[prompt, hole])
    mask = cell_text(getattr(result.tokenizer, "mask_token", None) or "mask")
    orig_name = f"was {cell_text(display_tokens(result.tokenizer, [orig])[0])}" if orig >= 0 else f"a {mask} in the text"
    position = int(result.mask_positions[prompt, hole])
    fig = go.Figure(
        go.Heatmap(
            z=probs.tolist(), x=[f"top {r + 1}" for r in range(k)], y=labels, text=text,
            texttemplate="%{text}", textfont={"size": 13}, colorscale="Blues", zmin=0, zmax=1,
            colorbar=colour_bar("probability"), xgap=1, ygap=1,
            hovertemplate="%{y}, %{x}: %{text} (%{z:.3f})<extra></extra>",
        )
    )
    fig.update_yaxes(type="category", title_text="site")
    fig.update_layout(
        title={"text": f"Masked lens, prompt {prompt}: the hole at position {position} ({orig_name})"},
        width=260 + 110 * k, height=max(320, 150 + 30 * len(labels)),
        plot_bgcolor="white",
    )
    return fig
