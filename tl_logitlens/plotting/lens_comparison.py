"""The figure of a lens comparison: one lens heatmap per lens, one above the other, on one colour scale."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tl_logitlens.core.results import ResultBase
from tl_logitlens.plotting.lens import _colour_values, lens_heatmap, shown_columns
from tl_logitlens.plotting.style import check_prompt, colour_scale, house_style, valid_columns


def lens_comparison_figure(
    comparison: ResultBase,
    *,
    color: str = "prob",
    target: str | int | None = None,
    prompt: int = 0,
    max_positions: int = 16,
    long: str = "clip",
    scale: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """One :func:`~tl_logitlens.plotting.lens_heatmap` per lens of a
    :class:`~tl_logitlens.analyses.lens_comparison.LensComparison`, top to bottom in its lens order, sharing the
    input positions (columns) and one colour scale (so the same colour is the same value in every panel).

    ``color``, ``target``, ``prompt``, ``max_positions``, ``long`` and ``scale`` are as in
    :func:`~tl_logitlens.plotting.lens_heatmap`; the colour range spans the cells of every panel.
    """
    results = comparison.results
    prompt = check_prompt(comparison, prompt)
    cols_all = valid_columns(comparison, prompt)
    cols = [cols_all[i] for i in shown_columns(len(cols_all), max_positions, long)]
    colours = [_colour_values(r, color, target, prompt) for r in results]
    scale = colours[0].scale if scale is None else scale
    joint = colour_scale(
        torch.cat([c.values[:, cols].reshape(-1) for c in colours]),
        scale=scale, zmin=None, zmax=None, floor=colours[0].floor,
        lower=colours[0].lower if scale == "linear" else None,
    )
    zmin, zmax = (10**joint.zmin, 10**joint.zmax) if joint.log else (joint.zmin, joint.zmax)
    panels = [
        lens_heatmap(r, color=color, target=target, prompt=prompt, max_positions=max_positions, long=long,
                     scale=scale, zmin=zmin, zmax=zmax)
        for r in results
    ]
    n_sites = len(comparison.labels)
    fig = make_subplots(
        rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=min(0.12, 0.3 / len(panels)),
        subplot_titles=[f"<b>{name}</b>" for name in comparison.lenses],
    )
    for k, panel in enumerate(panels, start=1):
        trace = panel.data[0]
        trace.showscale = k == 1
        fig.add_trace(trace, row=k, col=1)
        fig.update_yaxes(type="category", showgrid=False, title_text="site", row=k, col=1)
    x = panels[0].layout.xaxis
    fig.update_xaxes(showgrid=False)
    fig.update_xaxes(tickvals=x.tickvals, ticktext=x.ticktext, tickangle=x.tickangle, tickfont=x.tickfont,
                     title_text=x.title.text, row=len(panels), col=1)
    if title is None:
        model = f" — {comparison.model_name}" if comparison.model_name else ""
        title = f"{len(panels)} lenses on the same run{model}, coloured by {panels[0].data[0].colorbar.title.text}"
        if len(cols) < len(cols_all):
            which = (f"the last {len(cols)}" if long == "clip"
                     else f"every {math.ceil(len(cols_all) / max_positions)}th ({len(cols)})")
            title += f"<br><sup>showing {which} of {len(cols_all)} positions (max_positions={max_positions})</sup>"
    panel_px = 60 + 28 * n_sites
    house_style(fig, title=title, width=panels[0].layout.width, height=180 + panel_px * len(panels))
    return fig
