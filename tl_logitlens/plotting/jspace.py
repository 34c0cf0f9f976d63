"""Figures of the J-space analyses: a decomposition's coordinates, a coordinate patch, occupancy against
random controls, and the fraction of variance in J-space per site.

The quantities drawn are unsigned (coordinates, captured variance, fractions), so no figure here uses the
blue/red pair of signed values: one series is drawn in :data:`SERIES`, a comparison series (the random
controls, the coordinates before an edit) in :data:`REFERENCE`.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from tl_logitlens.plotting.style import LINE_CHART, PALETTE, cell_text, house_style, line_trace, quoted

SERIES = PALETTE[3]  # purple: the lens's own values
REFERENCE = "#8c8c8c"  # grey: what they are compared with (random controls, before an edit)


def _line(x: list, y: list, colour: str, name: str, *, dash: bool = False) -> go.Scatter:
    """A bold line with markers (:func:`~tl_logitlens.plotting.style.line_trace`), dashed for a reference."""
    trace = line_trace(x, y, colour, name, name)
    if dash:
        trace.line.dash = "dash"
    return trace


def _where(result: Any) -> str:
    at = f" at {result.site}"
    if getattr(result, "position", None) is not None:
        at += f", position {result.position}"
        token = getattr(result, "input_token", "")
        if token:
            at += f" ({quoted(token)})"
    return at


def decomposition_figure(decomposition: Any, *, title: str | None = None) -> go.Figure:
    """Bars of a :class:`~tl_logitlens.analyses.jspace.Decomposition`: each active token's contribution
    ``c_t ‖v_t‖`` (the length of its part of the reconstruction), in selection order; hover gives the
    coordinate ``c_t`` and ``‖v_t‖``. The title states the explained variance and the J-space fraction."""
    frame = decomposition.to_dataframe()
    frame = frame[frame["active"]]
    fig = go.Figure(
        go.Bar(
            x=[f"{i + 1}. {cell_text(t)}" for i, t in enumerate(frame["token"])],
            y=frame["contribution"].tolist(),
            marker_color=SERIES,
            customdata=list(zip(frame["coordinate"], frame["atom_norm"], frame["token_id"])),
            hovertemplate="contribution %{y:.4g}<br>coordinate %{customdata[0]:.4g}<br>‖v‖ %{customdata[1]:.4g}"
            "<br>id %{customdata[2]}<extra></extra>",
            name="contribution",
        )
    )
    fig.update_xaxes(title_text="token (in the order selected)", type="category")
    fig.update_yaxes(title_text="contribution c·‖v‖ (residual units)", rangemode="tozero")
    if title is None:
        title = (
            f"{decomposition.lens_name} decomposition{_where(decomposition)}<br><sup>"
            f"{len(frame)} active of {len(decomposition.selected_support)} selected (k={decomposition.k}, "
            f"{decomposition.algorithm}); explained variance {decomposition.explained_variance:.3f}, "
            f"J-space fraction {decomposition.j_space_fraction:.3f}</sup>"
        )
    return house_style(fig, title=title, width=max(520, 70 * len(frame) + 200), height=420)


def patch_figure(patch: Any, *, title: str | None = None) -> go.Figure:
    """Grouped bars of a :class:`~tl_logitlens.analyses.patching.CoordinatePatch`: every coordinate of the
    edit frame before (grey) and after (purple) the edit; the source and target are marked in the labels."""
    frame = patch.to_dataframe()
    marks = {"source": " (source)", "target": " (target)", "": ""}
    x = [f"{cell_text(t)}{marks[r]}" for t, r in zip(frame["token"], frame["role"])]
    fig = go.Figure(
        [
            go.Bar(
                x=x,
                y=frame["before"].tolist(),
                name="before",
                marker_color=REFERENCE,
                hovertemplate="before %{y:.4g}<extra></extra>",
            ),
            go.Bar(
                x=x,
                y=frame["after"].tolist(),
                name="after",
                marker_color=SERIES,
                hovertemplate="after %{y:.4g}<extra></extra>",
            ),
        ]
    )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="token of the edit frame", type="category")
    fig.update_yaxes(title_text="coordinate")
    if title is None:
        title = (
            f"{patch.mode} {quoted(patch.source_token)} → {quoted(patch.target_token)}{_where(patch)}"
            f"<br><sup>{patch.lens_name}, alpha={patch.alpha:g}; |delta| = {float(patch.delta.norm()):.4g}</sup>"
        )
    return house_style(fig, title=title, width=max(560, 90 * len(frame) + 200), height=440, legend_below=True)


def occupancy_figure(occupancy: Any, *, title: str | None = None) -> go.Figure:
    """The mean cumulative captured variance of an :class:`~tl_logitlens.analyses.jspace.Occupancy` over
    its valid cells, step by step: the lens's vectors (purple) against the random controls (grey); the
    dotted line marks the pooled occupancy, where the lead is largest."""
    valid = occupancy.valid
    real = occupancy.gains[valid].mean(0).cumsum(0).tolist()
    control = occupancy.control_gains[valid].mean(0).cumsum(0).tolist()
    steps = list(range(1, occupancy.max_atoms + 1))
    fig = go.Figure(
        [
            _line(steps, real, SERIES, f"{occupancy.lens_name} vectors"),
            _line(steps, control, REFERENCE, f"random controls (mean of {occupancy.n_controls})", dash=True),
        ]
    )
    fig.add_vline(x=occupancy.pooled, line={"dash": "dot", "color": "#444"})
    fig.update_xaxes(title_text="atoms selected", dtick=1)
    fig.update_yaxes(title_text="captured variance ‖Πx‖²/‖x‖²", rangemode="tozero")
    n = int(valid.sum())
    if title is None:
        title = (
            f"Occupancy at {occupancy.site}: {occupancy.lens_name} vectors against random directions<br><sup>"
            f"mean over {n} state(s); pooled occupancy {occupancy.pooled}, median {occupancy.median:g}</sup>"
        )
    return house_style(fig, title=title, **LINE_CHART)


def variance_figure(variance: Any, *, title: str | None = None) -> go.Figure:
    """Each site's per-position J-space fractions of a :class:`~tl_logitlens.analyses.jspace.JSpaceVariance`
    (faint points), their median (purple) and the pooled fraction (grey, dashed)."""
    labels = list(variance.labels)
    fig = go.Figure()
    xs, ys = [], []
    for i, label in enumerate(labels):
        values = variance.fractions[i][variance.sampled[i]].tolist()
        xs += [label] * len(values)
        ys += values
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            marker={"color": SERIES, "opacity": 0.25, "size": 6},
            name="one position",
            hovertemplate="%{y:.3f}<extra></extra>",
        )
    )
    fig.add_trace(_line(labels, variance.median.tolist(), SERIES, "median"))
    fig.add_trace(_line(labels, variance.pooled.tolist(), REFERENCE, "pooled", dash=True))
    fig.update_xaxes(title_text="site", type="category")
    fig.update_yaxes(title_text="‖J-space component‖² / ‖x‖²", range=[0, 1.02])
    n = int(variance.sampled[0].sum())
    if title is None:
        title = (
            f"Fraction of variance in J-space ({variance.lens_name}, k={variance.k})<br><sup>"
            f"{n} position(s) per site; pooled = Σ‖j‖²/Σ‖x‖²</sup>"
        )
    return house_style(fig, title=title, **LINE_CHART)
