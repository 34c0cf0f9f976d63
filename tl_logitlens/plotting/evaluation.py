"""The corpus evaluation figure: each statistic per site, one curve per lens, with its interval."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tl_logitlens.core.results import BootstrapInterval
from tl_logitlens.plotting.style import band_trace

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_FILLS = (
    "rgba(31,119,180,1)",
    "rgba(214,39,40,1)",
    "rgba(44,160,44,1)",
    "rgba(148,103,189,1)",
    "rgba(255,127,14,1)",
    "rgba(140,86,75,1)",
)


def evaluation_figure(
    ev: BootstrapInterval,
    *,
    statistics: Sequence[str] | None = None,
    bits_per_byte: bool = False,
    width: int = 1000,
    height: int | None = None,
) -> go.Figure:
    """One panel per statistic (x: site, shallow to deep), one line per lens, a band for its interval.

    Args:
        ev: a :class:`~tl_logitlens.analyses.evaluate.LensEvaluation`.
        statistics: which statistics to draw (default: all four).
        bits_per_byte: draw KL, cross-entropy and entropy in bits per byte instead of nats
            (top-1 agreement is a fraction either way).
        width, height: the figure's size in pixels (height: 320 per row of panels).
    """
    from tl_logitlens.core.measures import BPB_STATISTICS, MEASURES, STATISTICS, TITLES, UNITS

    statistics = list(STATISTICS if statistics is None else statistics)
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown or not statistics:
        raise ValueError(f"unknown statistics {unknown}; choose from {list(STATISTICS)}")
    n = len(statistics)
    cols = 1 if n == 1 else 2
    rows = (n + cols - 1) // cols
    # the measure drawn in each panel: the statistic, or its bits-per-byte form
    measures = [f"{s}_bpb" if bits_per_byte and s in BPB_STATISTICS else s for s in statistics]
    titles = [f"{TITLES[stat]} ({UNITS[m]})" for stat, m in zip(statistics, measures)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.1, vertical_spacing=0.16)
    x = list(ev.sites)
    for p, measure in enumerate(measures):
        row, col = p // cols + 1, p % cols + 1
        i = MEASURES.index(measure)
        for k, lens in enumerate(ev.lenses):
            mean, low, high = ev.mean[k, :, i], ev.low[k, :, i], ev.high[k, :, i]
            colour = _COLOURS[k % len(_COLOURS)]
            if ev.n_bootstrap > 0:
                band = band_trace(x, low.tolist(), high.tolist(), _FILLS[k % len(_FILLS)], lens, lens)
                band.showlegend = False
                fig.add_trace(band, row=row, col=col)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=mean.tolist(),
                    mode="lines+markers",
                    name=lens,
                    legendgroup=lens,
                    showlegend=p == 0,
                    line={"color": colour, "width": 2},
                    customdata=list(zip(low.tolist(), high.tolist())),
                    hovertemplate=f"{lens}<br>%{{x}}: %{{y:.4g}} [%{{customdata[0]:.4g}}, %{{customdata[1]:.4g}}]<extra></extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="site", row=row, col=col)
    ci = f"{ev.confidence:.0%} bootstrap intervals over documents" if ev.n_bootstrap > 0 else "no intervals"
    title = (
        f"Lens evaluation on {ev.n_documents:,} documents, {ev.n_tokens:,} tokens"
        f"{f' ({ev.model_name})' if ev.model_name else ''}; bands: {ci}"
    )
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        template="plotly_white",
        width=width,
        height=height or 320 * rows + 120,
        legend={"orientation": "h", "yanchor": "bottom", "y": -0.18 if rows > 1 else -0.35, "x": 0},
        margin={"l": 60, "r": 20, "t": 80, "b": 90},
        hovermode="closest",
    )
    return fig
