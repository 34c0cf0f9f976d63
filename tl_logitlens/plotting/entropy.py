"""Entropy and KL(final ‖ site) by site, in nats, averaged over groups of read positions."""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tl_logitlens.plotting.style import PALETTE


def entropy_kl_figure(
    labels: Sequence[str],
    entropy: torch.Tensor,
    kl: torch.Tensor,
    groups: Sequence[tuple[str, torch.Tensor]],
    title: str,
) -> go.Figure:
    """Entropy and KL(final ‖ site) by site, in nats: the mean over each group of read rows.

    ``entropy`` and ``kl`` are ``[site, row]`` (NaN where a row was not read); each group is a
    (name, boolean ``[row]`` mask) drawn as one line in both panels. The figure has no width of its
    own: it fills the page or notebook column it is drawn in.
    """
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.12,
        subplot_titles=("entropy of the read distribution (nats)", "KL(final ‖ site) (nats)"),
    )
    x = list(labels)
    for g, (name, rows) in enumerate(groups):
        n = int(rows.sum())
        for col, values in ((1, entropy), (2, kl)):
            mean = torch.nanmean(values[:, rows].double(), dim=1)
            fig.add_trace(
                go.Scatter(
                    x=x, y=[None if torch.isnan(m) else float(m) for m in mean], mode="lines+markers",
                    name=f"{name} (n={n})", legendgroup=name, showlegend=col == 1,
                    line={"color": PALETTE[g % len(PALETTE)], "width": 2},
                    hovertemplate="%{x}: %{y:.3f} nats<extra>" + html.escape(name) + "</extra>",
                ),
                row=1, col=col,
            )
    fig.update_xaxes(type="category", title_text="site")
    fig.update_yaxes(title_text="nats", rangemode="tozero")
    fig.update_layout(
        title={"text": title}, height=400, template="plotly_white",
        legend={"orientation": "h", "y": -0.28, "x": 0}, margin={"t": 80, "b": 110},
    )
    return fig
