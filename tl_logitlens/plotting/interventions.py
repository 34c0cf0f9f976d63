"""Figures of the interventions: a decoded vector's tokens, an alpha sweep against its placebo, generated
tokens' log-probs, and the faithfulness of each lens by site."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tl_logitlens.core.results import token_strings
from tl_logitlens.plotting.style import (
    NEGATIVE_COLOUR,
    PALETTE,
    POSITIVE_COLOUR,
    band_trace,
    house_style,
    quoted,
)

# unsigned series (lens vector vs placebo, one lens vs another): palette colours other than the
# blue/red pair, which here means promoted/suppressed
_LENS_COLOUR = PALETTE[2]  # green
_PLACEBO_COLOUR = "#7f7f7f"  # grey: the control
_SERIES = (PALETTE[2], PALETTE[3], PALETTE[4], PALETTE[5], PALETTE[6], PALETTE[7])


def decoded_vector_figure(
    result: Any, vector: int = 0, *, width: int = 780, height: int | None = None
) -> go.Figure:
    """Horizontal bars of one vector's top tokens (blue, the scores it promotes) and bottom tokens (red,
    the scores it suppresses), extreme first."""
    if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector < len(result.labels):
        raise ValueError(f"vector must be an int from 0 to {len(result.labels) - 1}, not {vector!r}")
    top = token_strings(result.tokenizer, result.top_ids[vector])
    bottom = token_strings(result.tokenizer, result.bottom_ids[vector])
    k = len(top)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("promoted (highest scores)", "suppressed (lowest scores)"),
        horizontal_spacing=0.25,
    )
    for col, names, scores, colour in (
        (1, top, result.top_scores[vector], POSITIVE_COLOUR),
        (2, bottom, result.bottom_scores[vector], NEGATIVE_COLOUR),
    ):
        fig.add_trace(
            go.Bar(
                x=scores.cpu().tolist()[::-1],
                y=[f"{quoted(n)} " for n in names][::-1],
                orientation="h",
                marker_color=colour,
                showlegend=False,
                hovertemplate="%{y}: %{x:.4g}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    unit = "score / ‖x‖" if result.normalized else "score v_t · x"
    fig.update_xaxes(title_text=unit)
    title = f"What the {result.lens_name} reads off {result.labels[vector]} at {result.site}"
    return house_style(fig, title=title, width=width, height=height or 120 + 26 * k)


def sweep_figure(result: Any, *, width: int = 900, height: int = 420) -> go.Figure:
    """Two panels against ``alpha``: the mean change of the token's final log-prob, and the mean
    ``KL(unsteered ‖ steered)``, for the lens vector and its norm-matched placebo (means over prompts and
    read positions)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=(f"Δ log p({quoted(result.token)}) (nats)", "KL(unsteered ‖ steered) (nats)"),
    )
    alphas = result.alphas.tolist()
    valid = result.valid.cpu()
    delta = result.logprobs - result.base_logprobs[None, None]
    for d, (name, colour) in enumerate(
        (("lens vector", _LENS_COLOUR), ("placebo (random, same norm)", _PLACEBO_COLOUR))
    ):
        for col, values in ((1, delta[d]), (2, result.kl[d])):
            mean = (
                values[:, valid].mean(-1) if bool(valid.any()) else torch.full((len(alphas),), float("nan"))
            )
            fig.add_trace(
                go.Scatter(
                    x=alphas,
                    y=mean.tolist(),
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": colour, "width": 2, "dash": "solid" if d == 0 else "dash"},
                    hovertemplate=f"{name}<br>alpha %{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="alpha (residual-stream units)")
    title = f"Steering towards {quoted(result.token)} at {result.site} through the {result.lens_name}"
    return house_style(fig, title=title, width=width, height=height, legend_below=True)


def generation_figure(result: Any, *, width: int = 780, height: int = 400) -> go.Figure:
    """Each prompt's chosen tokens' log-probs by step (hover: the token)."""
    fig = go.Figure()
    for b in range(result.new_ids.shape[0]):
        keep = result.new_ids[b] >= 0
        steps = keep.nonzero()[:, 0].tolist()
        tokens = token_strings(result.tokenizer, result.new_ids[b][keep])
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=result.new_logprobs[b][keep].tolist(),
                mode="lines+markers",
                name=f"prompt {b}",
                text=[quoted(t) for t in tokens],
                line={"color": _SERIES[b % len(_SERIES)]},
                hovertemplate="step %{x}: %{text} %{y:.3f}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="generated token")
    fig.update_yaxes(title_text="log-prob of the chosen token (nats)")
    how = (
        "greedy"
        if result.temperature == 0
        else f"sampled at temperature {result.temperature:g}, seed {result.seed}"
    )
    return house_style(
        fig,
        title=f"Generation with {result.n_hooks} hook(s) on ({how})",
        width=width,
        height=height,
        legend_below=True,
    )


def faithfulness_figure(result: Any, *, width: int = 1000, height: int = 440) -> go.Figure:
    """Two panels by site: the mean ``Δ log p`` of each lens's top-1 token and the mean KL, a solid line per
    lens for its own vectors and a dashed line of the same colour for its placebo, with bootstrap bands."""
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=(
            "Δ log p of the lens's top-1 token in the model's output (nats)",
            "KL(clean ‖ intervened) of the model's output (nats)",
        ),
    )
    x = list(result.sites)
    for k, lens in enumerate(result.lenses):
        colour = _SERIES[k % len(_SERIES)]
        for col, measure in ((1, "logprob"), (2, "kl")):
            for kind, dash in (("effect", "solid"), ("placebo", "dash")):
                i = result.statistics.index(f"{kind}_{measure}")
                name = lens if kind == "effect" else f"{lens}: placebo"
                if result.n_bootstrap > 0 and kind == "effect":
                    band = band_trace(
                        x, result.low[k, :, i].tolist(), result.high[k, :, i].tolist(), colour, name, name
                    )
                    band.showlegend = False
                    fig.add_trace(band, row=1, col=col)
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=result.mean[k, :, i].tolist(),
                        mode="lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=col == 1,
                        line={"color": colour, "width": 2, "dash": dash},
                        hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="site")
    title = (
        f"Which lens is causal? {result.intervention} along each lens's top-1 vector vs a random placebo "
        f"({result.n_positions:,} positions, {result.n_documents:,} documents)"
    )
    return house_style(fig, title=title, width=width, height=height, legend_below=True)
