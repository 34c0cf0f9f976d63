"""Figures of a :class:`~tl_logitlens.lens.LensResult`: the lens heatmap, target trajectories, and the
probability of the final layer's top tokens across layers.

These functions only read the result's fields; every number they show was computed by
:func:`tl_logitlens.logit_lens` (the trajectory figure's mean and band are the one summary drawn here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from tl_logitlens.lens import LensResult
from tl_logitlens.plotting._common import (
    as_list,
    band_trace,
    cell_text,
    check_prompt,
    column_at,
    quoted,
    target_index,
    target_names,
    valid_columns,
)

COLORS = ("prob", "logprob", "entropy", "rank", "kl")
_Z_CRIT = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass(frozen=True)
class _Colour:
    values: torch.Tensor  # [site, pos] for the chosen prompt and columns
    title: str
    colorscale: str
    zmin: float | None
    zmax: float | None
    log_rank: bool = False


def _colour_values(result: LensResult, color: str, target: str | int | None, prompt: int) -> _Colour:
    """The tensor the colour shows, ``[site, pos]`` for one prompt, read from the result's fields."""
    if color not in COLORS:
        raise ValueError(f"color={color!r} is not one of {list(COLORS)}")
    if color == "entropy":
        return _Colour(result.entropy[:, prompt], "entropy (nats)", "Viridis", 0.0, None)
    if color == "kl":
        return _Colour(result.kl_to_final[:, prompt], "KL(final ‖ layer) (nats)", "Reds", 0.0, None)
    if color in ("prob", "logprob") and target is None:
        lp = result.top_logprobs[:, prompt, :, 0]
        if color == "prob":
            return _Colour(lp.exp(), "P(top token)", "Blues", 0.0, 1.0)
        return _Colour(lp, "log P(top token) (nats)", "Blues", None, 0.0)
    if target is None:  # rank, no target named
        n_t = 0 if result.target_ids is None else result.target_ids.shape[-1]
        if n_t == 0:
            values, name = result.next_ranks[:, prompt].double(), "the next input token"
        elif n_t == 1:
            values, name = result.target_ranks[:, prompt, :, 0].double(), quoted(target_names(result)[0])
        else:
            raise ValueError(
                f"color='rank' needs to know which target: pass target= one of {target_names(result)}"
            )
        values = torch.where(values > 0, values, torch.nan)  # -1 marks "no next token"
        return _Colour(values.log10(), f"rank of {name} (log scale)", "Viridis_r", 0.0, None, log_rank=True)
    t = target_index(result, target, prompt)
    name = quoted(target_names(result)[t])
    if color == "rank":
        values = result.target_ranks[:, prompt, :, t].double()
        return _Colour(values.log10(), f"rank of {name} (log scale)", "Viridis_r", 0.0, None, log_rank=True)
    lp = result.target_logprobs[:, prompt, :, t]
    if color == "prob":
        return _Colour(lp.exp(), f"P({name})", "Blues", 0.0, 1.0)
    return _Colour(lp, f"log P({name}) (nats)", "Blues", None, 0.0)


def shown_columns(n: int, max_positions: int, long: str) -> list[int]:
    """Which of ``n`` columns a heatmap shows: all, the last ``max_positions``, or a stride ending at the last."""
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    if long not in ("clip", "stride"):
        raise ValueError(f"long={long!r} is not understood; use 'clip' (keep the last positions) or 'stride'")
    if n <= max_positions:
        return list(range(n))
    if long == "clip":
        return list(range(n - max_positions, n))
    step = math.ceil(n / max_positions)
    return list(range(n - 1, -1, -step))[::-1]


def lens_heatmap(
    result: LensResult,
    *,
    color: str = "prob",
    target: str | int | None = None,
    prompt: int = 0,
    max_positions: int = 40,
    long: str = "clip",
    title: str | None = None,
) -> go.Figure:
    """The logit lens as a picture: sites (rows, first layer at the bottom) × input positions.

    Each cell's text is the site's top token (drawn through :func:`cell_text`); its colour is
    ``color``: ``"prob"`` / ``"logprob"`` (of the top token, or of ``target``), ``"entropy"``
    (nats), ``"rank"`` (of ``target``; with no target named, of the result's only target or, with
    none, of the actual next token; drawn as ``log10(rank)``), or ``"kl"`` (``KL(final ‖ layer)``,
    nats). Hovering a cell lists its top-k tokens with their probabilities.

    Prompts longer than ``max_positions`` are clipped to their last positions (``long="clip"``) or
    strided (``long="stride"``, every k-th position, always ending at the last); a note on the
    figure says so.
    """
    prompt = check_prompt(result, prompt)
    colour = _colour_values(result, color, target, prompt)
    cols_all = valid_columns(result, prompt)
    shown = shown_columns(len(cols_all), max_positions, long)
    cols = [cols_all[i] for i in shown]
    labels = list(result.labels)
    inputs = result.input_tokens()[prompt]
    positions = result.positions[prompt].tolist()
    top = result.top_tokens()
    k = result.top_ids.shape[-1]
    probs = result.top_probs[:, prompt].tolist()
    z = colour.values[:, cols]
    z_list = as_list(z)

    text = [[cell_text(top[s][prompt][j][0]) for j in cols] for s in range(len(labels))]
    hover = []
    for s, label in enumerate(labels):
        row = []
        for c, j in enumerate(cols):
            value = z_list[s][c]
            shown_value = "—" if value is None else f"{10**value:.0f}" if colour.log_rank else f"{value:.4g}"
            lines = [
                f"<b>{label}</b> · position {positions[j]} {quoted(inputs[j])}",
                f"{colour.title.replace(' (log scale)', '')}: {shown_value}",
                "top tokens:",
            ]
            lines += [f"{r + 1}. {quoted(top[s][prompt][j][r])}  {probs[s][j][r]:.3f}" for r in range(k)]
            row.append("<br>".join(lines))
        hover.append(row)

    colorbar: dict = {"title": {"text": colour.title, "side": "right"}}
    if colour.log_rank:
        finite = z[torch.isfinite(z)]
        top_decade = max(1, math.ceil(float(finite.max()))) if finite.numel() else 1
        ticks = list(range(0, top_decade + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"{10**t:,}" for t in ticks])
    n_cols, n_rows = len(cols), len(labels)
    fig = go.Figure(
        go.Heatmap(
            z=z_list,
            x=list(range(n_cols)),
            y=labels,
            text=text,
            texttemplate="%{text}",
            textfont={"size": 10},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale=colour.colorscale,
            zmin=colour.zmin,
            zmax=colour.zmax,
            colorbar=colorbar,
            xgap=1,
            ygap=1,
        )
    )
    fig.update_xaxes(
        title_text="input token",
        tickvals=list(range(n_cols)),
        ticktext=[cell_text(inputs[j]) for j in cols],
        tickangle=-45,
        side="bottom",
    )
    fig.update_yaxes(title_text="layer (residual stream site)", type="category")
    if title is None:
        title = f"Logit lens{' — ' + result.model_name if result.model_name else ''} (norm={result.norm})"
    fig.update_layout(
        title={"text": title},
        width=max(520, 170 + 62 * n_cols),
        height=max(320, 170 + 20 * n_rows),
        margin={"t": 80 if len(cols) < len(cols_all) else 60},
        plot_bgcolor="white",
    )
    if len(cols) < len(cols_all):
        how = (
            f"the last {len(cols)}"
            if long == "clip"
            else f"every {math.ceil(len(cols_all) / max_positions)}th ({len(cols)})"
        )
        fig.add_annotation(
            text=f"Showing {how} of {len(cols_all)} positions (max_positions={max_positions})",
            xref="paper",
            yref="paper",
            x=0,
            y=1.0,
            yanchor="bottom",
            showarrow=False,
            font={"size": 11, "color": "#a33"},
            name="positions-note",
        )
    return fig


def target_trajectory(
    result: LensResult,
    *,
    target: str | int | None = None,
    metric: str = "logprob",
    position: int = -1,
    show_prompts: bool = True,
    title: str | None = None,
) -> go.Figure:
    """The log-prob (nats), probability or rank of each target across sites, at one position.

    One thin line per prompt (``show_prompts``), their mean in bold and a band of mean ± 1.96
    standard errors over prompts (a normal-approximation 95% interval; no band for one prompt).
    Ranks are summarised on ``log10`` (geometric mean and its band) and drawn on a log axis.
    ``position`` is a token position in each prompt (``-1``: each prompt's last token).
    """
    metrics = ("logprob", "prob", "rank")
    if metric not in metrics:
        raise ValueError(f"metric={metric!r} is not one of {list(metrics)}")
    if result.target_ids is None:
        raise ValueError("this result has no targets; pass targets=[...] to logit_lens to plot their trajectories")
    names = target_names(result)
    chosen = list(range(len(names))) if target is None else [target_index(result, target)]
    n_batch = result.top_ids.shape[1]
    cols = [column_at(result, b, position) for b in range(n_batch)]
    labels = list(result.labels)
    x = list(range(len(labels)))
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
    fig = go.Figure()
    for i, t in enumerate(chosen):
        colour = palette[i % len(palette)]
        b_idx = torch.arange(n_batch)
        if metric == "rank":
            values = result.target_ranks[:, b_idx, cols, t].double()  # [site, batch]
            summary_in = values.log10()
        else:
            values = result.target_logprobs[:, b_idx, cols, t].double()
            if metric == "prob":
                values = values.exp()
            summary_in = values
        mean = summary_in.mean(1)
        if metric == "rank":
            centre = 10**mean
        else:
            centre = mean
        name = quoted(names[t])
        if show_prompts and n_batch > 1:
            for b in range(n_batch):
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=as_list(values[:, b]),
                        mode="lines",
                        line={"color": colour, "width": 1},
                        opacity=0.3,
                        name=f"{name} prompt {b}",
                        legendgroup=name,
                        showlegend=False,
                        hovertemplate=f"{name} prompt {b}<br>%{{y:.4g}}<extra></extra>",
                    )
                )
        if n_batch > 1:
            sem = summary_in.std(1, unbiased=True) / math.sqrt(n_batch)
            lo, hi = mean - _Z_CRIT * sem, mean + _Z_CRIT * sem
            if metric == "rank":
                lo, hi = 10**lo, 10**hi
            fig.add_trace(band_trace(x, as_list(lo), as_list(hi), colour, f"{name} 95% band", name))
        label = "geometric mean" if metric == "rank" else "mean"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=as_list(centre),
                mode="lines+markers",
                line={"color": colour, "width": 3},
                name=f"{name} {label} over {n_batch} prompt{'s' if n_batch > 1 else ''}",
                legendgroup=name,
                hovertemplate=f"{name}<br>%{{y:.4g}}<extra></extra>",
            )
        )
    y_title = {"logprob": "log-prob (nats)", "prob": "probability", "rank": "rank (1 = top token)"}[metric]
    fig.update_xaxes(title_text="layer (residual stream site)", tickvals=x, ticktext=labels)
    fig.update_yaxes(title_text=y_title, type="log" if metric == "rank" else "linear")
    if metric == "rank":
        fig.update_yaxes(autorange="reversed")
    where = "last token" if position == -1 else f"position {position}"
    fig.update_layout(
        title={"text": title or f"Targets across layers ({where}; band: mean ± 1.96 s.e.)"},
        height=420,
        width=760,
        plot_bgcolor="white",
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def top_token_evolution(
    result: LensResult,
    *,
    prompt: int = 0,
    position: int = -1,
    n: int = 10,
    title: str | None = None,
) -> go.Figure:
    """Probability of each of the result's first ``n`` targets at every site (a heatmap).

    To follow the final layer's top-n tokens, run the lens twice: once for the final top tokens
    (``first.top_ids[-1, prompt, col, :n]`` with ``top_k >= n``), then with ``targets=`` those ids;
    this figure reads the second result's ``target_logprobs``. (The figure never runs the model.)
    Rows: targets, the first at the top; columns: sites, the first layer on the left.
    """
    prompt = check_prompt(result, prompt)
    if result.target_ids is None:
        raise ValueError(
            "top_token_evolution reads target log-probs: run logit_lens again with targets= the final "
            "layer's top ids (result.top_ids[-1, prompt, col, :n]); see the docstring"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    col = column_at(result, prompt, position)
    n = min(n, result.target_ids.shape[-1])
    ids = result.target_ids[prompt, col, :n]
    from tl_logitlens.tokens import display_tokens

    names = display_tokens(result.tokenizer, ids)
    probs = result.target_logprobs[:, prompt, col, :n].exp().T  # [target, site]
    ranks = result.target_ranks[:, prompt, col, :n].T
    labels = list(result.labels)
    is_final_top = result.top_ids.shape[-1] >= n and torch.equal(result.top_ids[-1, prompt, col, :n], ids)
    rows = [f"{r + 1}. {cell_text(t)}" for r, t in enumerate(names)] if is_final_top else [
        cell_text(t) for t in names
    ]
    hover = [
        [
            f"{quoted(names[r])} at <b>{labels[s]}</b><br>P = {float(probs[r, s]):.4f}<br>rank {int(ranks[r, s])}"
            for s in range(len(labels))
        ]
        for r in range(n)
    ]
    z = as_list(probs)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=list(range(n)),
            text=[[f"{v:.2f}" for v in row] for row in probs.tolist()],
            texttemplate="%{text}",
            textfont={"size": 10},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale="Blues",
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": {"text": "probability", "side": "right"}},
            xgap=1,
            ygap=1,
        )
    )
    where = quoted(result.str_tokens[prompt][int(result.positions[prompt, col])])
    fig.update_xaxes(title_text="layer (residual stream site)", type="category")
    fig.update_yaxes(
        title_text="final layer's top tokens" if is_final_top else "target",
        tickvals=list(range(n)),
        ticktext=rows,
        autorange="reversed",
    )
    heading = f"final layer's top {n} tokens" if is_final_top else "targets"
    fig.update_layout(
        title={"text": title or f"Probability of the {heading} across layers (after {where})"},
        width=max(520, 200 + 55 * len(labels)),
        height=max(300, 150 + 26 * n),
        plot_bgcolor="white",
    )
    return fig
