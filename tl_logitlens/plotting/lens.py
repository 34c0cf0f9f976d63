"""Figures of a :class:`~tl_logitlens.analyses.predictions.LensResult`: the lens heatmap, target trajectories, and the
probability of the final layer's top tokens across layers.

These functions only read the result's fields; every number they show was computed by
:func:`tl_logitlens.logit_lens` (the trajectory figure's mean and band are the one summary drawn here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from tl_logitlens.core.results import LensStatistics
from tl_logitlens.plotting.style import (
    LINE_CHART,
    MIN_BAND_N,
    MONO,
    PALETTE,
    _plain_length,
    after_quote,
    as_list,
    band_trace,
    cell_text,
    check_prompt,
    clip,
    colour_bar,
    colour_scale,
    column_at,
    house_style,
    lens_note,
    line_trace,
    log_ticks,
    quoted,
    target_index,
    target_names,
    valid_columns,
)

COLORS = ("prob", "logprob", "entropy", "rank", "kl")
_Z_CRIT = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass(frozen=True)
class _Colour:
    values: torch.Tensor  # [site, pos] for the chosen prompt and columns, in the metric's own units
    title: str
    colorscale: str
    scale: str  # the default scale of this metric: "linear" or "log"
    lower: float | None = None  # a natural lower end of a linear scale (0 for probabilities, entropy)
    floor: float | None = None  # a natural lower end of a log scale (1 for ranks)
    unit: str = ""


def _colour_values(result: LensStatistics, color: str, target: str | int | None, prompt: int) -> _Colour:
    """The tensor the colour shows, ``[site, pos]`` for one prompt, read from the result's fields."""
    if color not in COLORS:
        raise ValueError(f"color={color!r} is not one of {list(COLORS)}")
    if color == "entropy":
        return _Colour(result.entropy[:, prompt], "entropy (nats)", "Viridis_r", "linear", lower=0.0, unit="nats")
    if color == "kl":
        return _Colour(result.kl_to_final[:, prompt], "KL to final (nats)", "Reds", "log", unit="nats")
    if color in ("prob", "logprob") and target is None:
        lp = result.top_logprobs[:, prompt, :, 0]
        if color == "prob":
            return _Colour(lp.exp(), "P(top token)", "Blues", "linear", lower=0.0)
        return _Colour(lp, "log P(top token) (nats)", "Blues", "linear", unit="nats")
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
        return _Colour(values, f"rank of {name}", "Viridis_r", "log", lower=1.0, floor=1.0)
    t = target_index(result, target, prompt)
    name = quoted(target_names(result)[t])
    if color == "rank":
        values = result.target_ranks[:, prompt, :, t].double()
        return _Colour(values, f"rank of {name}", "Viridis_r", "log", lower=1.0, floor=1.0)
    lp = result.target_logprobs[:, prompt, :, t]
    if color == "prob":
        return _Colour(lp.exp(), f"P({name})", "Blues", "linear", lower=0.0)
    return _Colour(lp, f"log P({name}) (nats)", "Blues", "linear", unit="nats")


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
    result: LensStatistics,
    *,
    color: str = "prob",
    target: str | int | None = None,
    prompt: int = 0,
    max_positions: int = 40,
    long: str = "clip",
    scale: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """The logit lens as a picture: sites (rows, first layer at the bottom) × input positions.

    Each cell's text is the site's top token (drawn through :func:`cell_text`, whitespace visible
    as ``␣``/``↵``); its colour is ``color``: ``"prob"`` / ``"logprob"`` (of the top token, or of
    ``target``), ``"entropy"`` (nats), ``"rank"`` (of ``target``; with no target named, of the
    result's only target or, with none, of the actual next token), or ``"kl"``
    (``KL(final ‖ layer)``, nats). Hovering a cell lists its top-k tokens with their probabilities.

    Colour scale: ``scale="linear"`` or ``"log"`` (default: log for ``"rank"`` and ``"kl"``, where
    one early layer would otherwise wash out the rest; linear for the others). The range adapts to
    the cells shown (probabilities and entropy from 0 to the largest value shown; a log scale
    spans at most four decades below the largest value, ranks from 1); ``zmin``/``zmax`` fix either
    end, in the metric's own units (``zmin=0, zmax=1`` for the classic fixed probability scale).
    A log scale draws ``log10`` of the values, with the colour bar labelled in the values (1, 10, 100).

    Prompts longer than ``max_positions`` are clipped to their last positions (``long="clip"``) or
    strided (``long="stride"``, every k-th position, always ending at the last); a note on the
    figure says so.

    Raises:
        ValueError: an unknown ``color``/``scale``/``long``, a target the result does not hold,
            ``scale="log"`` of log-probs (already a log scale: use ``color="prob", scale="log"``).
    """
    prompt = check_prompt(result, prompt)
    colour = _colour_values(result, color, target, prompt)
    scale = colour.scale if scale is None else scale
    if scale == "log" and color == "logprob":
        raise ValueError(
            "color='logprob' is already on a log scale (nats) and its values are negative; "
            "use color='prob', scale='log' for a log colour scale of the probability"
        )
    cols_all = valid_columns(result, prompt)
    shown = shown_columns(len(cols_all), max_positions, long)
    cols = [cols_all[i] for i in shown]
    labels = list(result.labels)
    inputs = result.input_tokens()[prompt]
    top = result.top_tokens()
    raw = colour.values[:, cols]
    drawn = colour_scale(
        raw, scale=scale, zmin=zmin, zmax=zmax, floor=colour.floor, lower=colour.lower if scale == "linear" else None
    )
    z_list = as_list(drawn.z)
    text = [[clip(cell_text(top[s][prompt][j][0])) for j in cols] for s in range(len(labels))]
    hover = _heatmap_hover(result, prompt, cols, colour.title, as_list(raw), color == "rank")
    n_cols, n_rows = len(cols), len(labels)
    fig = go.Figure(
        go.Heatmap(
            z=z_list,
            x=list(range(n_cols)),
            y=labels,
            text=text,
            texttemplate="%{text}",
            textfont={"size": 12, "family": MONO},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale=colour.colorscale,
            zmin=drawn.zmin,
            zmax=drawn.zmax,
            colorbar=colour_bar(colour.title + (" · log" if drawn.log else ""), drawn),
            xgap=1,
            ygap=1,
        )
    )
    ticks = [clip(cell_text(inputs[j])) for j in cols]
    longest = max([_plain_length(t) for t in ticks] + [_plain_length(t) for row in text for t in row] + [3])
    col_px = max(56, int(8.0 * longest) + 14)
    fig.update_xaxes(
        title_text="input token (each cell: the prediction for the token after it)",
        tickvals=list(range(n_cols)),
        ticktext=ticks,
        tickangle=0 if max((_plain_length(t) for t in ticks), default=0) * 8.0 <= col_px - 6 else -45,
        tickfont={"family": MONO},
        side="bottom",
        showgrid=False,
    )
    fig.update_yaxes(title_text="layer (residual stream site)", type="category", showgrid=False)
    if title is None:
        name = result.lens_name
        title = f"{name[:1].upper() + name[1:]}{' — ' + result.model_name if result.model_name else ''} (norm={result.norm})"
    house_style(fig, title=title, width=max(560, 200 + col_px * n_cols), height=max(360, 200 + 24 * n_rows))
    if len(cols) < len(cols_all):
        how = (
            f"the last {len(cols)}"
            if long == "clip"
            else f"every {math.ceil(len(cols_all) / max_positions)}th ({len(cols)})"
        )
        _add_note(fig, f"Showing {how} of {len(cols_all)} positions (max_positions={max_positions})")
    return fig


def _heatmap_hover(
    result: LensStatistics, prompt: int, cols: list[int], what: str, values: list, whole: bool
) -> list[list[str]]:
    """Each cell's hover text: site, position and input token, the coloured value (``whole``: as an
    integer), and the site's top-k tokens with their probabilities."""
    inputs = result.input_tokens()[prompt]
    positions = result.positions[prompt].tolist()
    top = result.top_tokens()
    probs = result.top_probs[:, prompt].tolist()
    k = result.top_ids.shape[-1]
    hover = []
    for s, label in enumerate(result.labels):
        row = []
        for c, j in enumerate(cols):
            value = values[s][c]
            shown_value = "—" if value is None else f"{value:.0f}" if whole else f"{value:.4g}"
            lines = [
                f"<b>{label}</b> · position {positions[j]} {quoted(inputs[j])}",
                f"{what}: {shown_value}",
                "top tokens:",
            ]
            lines += [f"{r + 1}. {quoted(top[s][prompt][j][r])}  {probs[s][j][r]:.3f}" for r in range(k)]
            row.append("<br>".join(lines))
        hover.append(row)
    return hover


def _add_note(fig: go.Figure, text: str) -> None:
    """A grey note just above the plot, left-aligned (what the figure leaves out; not an error)."""
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0,
        y=1.0,
        yanchor="bottom",
        showarrow=False,
        font={"size": 12, "color": "#555"},
        name="positions-note",
    )


def target_trajectory(
    result: LensStatistics,
    *,
    target: str | int | None = None,
    metric: str = "logprob",
    position: int = -1,
    show_prompts: bool = True,
    title: str | None = None,
) -> go.Figure:
    """The log-prob (nats), probability or rank of each target across sites, at one position.

    One thin line per prompt (``show_prompts``), their mean in bold and, from three prompts on, a
    band of mean ± 1.96 standard errors over prompts (a normal-approximation 95% interval; with
    fewer prompts no band is drawn, as it would say nothing). The legend says how many prompts.
    Ranks are summarised on ``log10`` (geometric mean and its band) and drawn on a log axis
    labelled 1, 10, 100, ... (up is better). ``position`` is a token position in each prompt
    (``-1``: each prompt's last token).
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
    fig = go.Figure()
    plural = "s" if n_batch != 1 else ""
    all_values = []
    for i, t in enumerate(chosen):
        colour = PALETTE[i % len(PALETTE)]
        b_idx = torch.arange(n_batch)
        if metric == "rank":
            values = result.target_ranks[:, b_idx, cols, t].double()  # [site, batch]
            summary_in = values.log10()
        else:
            values = result.target_logprobs[:, b_idx, cols, t].double()
            if metric == "prob":
                values = values.exp()
            summary_in = values
        all_values.append(values)
        mean = summary_in.mean(1)
        centre = 10**mean if metric == "rank" else mean
        name = quoted(names[t])
        if show_prompts and n_batch > 1:
            for b in range(n_batch):
                fig.add_trace(line_trace(x, as_list(values[:, b]), colour, f"{name} prompt {b}", name, opacity=0.3))
        if n_batch >= MIN_BAND_N:
            sem = summary_in.std(1, unbiased=True) / math.sqrt(n_batch)
            lo, hi = mean - _Z_CRIT * sem, mean + _Z_CRIT * sem
            if metric == "rank":
                lo, hi = 10**lo, 10**hi
            fig.add_trace(band_trace(x, as_list(lo), as_list(hi), colour, f"{name} 95% band (n={n_batch})", name))
        label = "geometric mean" if metric == "rank" else "mean"
        trace_name = f"{name} {label} over {n_batch} prompt{plural}" if n_batch > 1 else f"{name} (1 prompt)"
        fig.add_trace(line_trace(x, as_list(centre), colour, trace_name, name, hover=name))
    y_title = {"logprob": "log-prob (nats)", "prob": "probability", "rank": "rank (1 = top token)"}[metric]
    fig.update_xaxes(title_text="layer (residual stream site)", tickvals=x, ticktext=labels)
    fig.update_yaxes(title_text=y_title, type="log" if metric == "rank" else "linear")
    if metric == "rank":
        ranks = torch.cat([v.reshape(-1) for v in all_values])
        ranks = ranks[torch.isfinite(ranks) & (ranks > 0)]
        hi = float(ranks.max()) if ranks.numel() else 10.0
        tickvals, ticktext = log_ticks(1.0, max(hi, 10.0))
        # decades labelled 1, 10, 100 (plotly's own log ticks read "10, 2, 5, 100"); up is better
        fig.update_yaxes(
            tickvals=[10**v for v in tickvals], ticktext=ticktext, autorange="reversed", minor={"showgrid": False}
        )
    where = "last token" if position == -1 else f"position {position}"
    what = {"logprob": "Log-prob", "prob": "Probability", "rank": "Rank"}[metric]
    band = (
        f"; band: mean ± 1.96 s.e. over {n_batch} prompts"
        if n_batch >= MIN_BAND_N
        else f"; {n_batch} prompt{plural}, too few for a band"
    )
    return house_style(
        fig,
        title=title or f"{what} of the targets across layers{lens_note(result)}<br><sup>at the {where}{band}</sup>",
        **LINE_CHART,
    )


def top_token_evolution(
    result: LensStatistics,
    *,
    prompt: int = 0,
    position: int = -1,
    n: int = 10,
    scale: str = "linear",
    zmin: float | None = None,
    zmax: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Probability of each of the result's first ``n`` targets at every site (a heatmap).

    The colour scale (``scale="linear"`` or ``"log"``, ``zmin``/``zmax``) adapts to the cells
    shown as in :func:`lens_heatmap`: linear from 0 to the largest probability by default.

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
    names = result.target_labels(ids)
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
    drawn = colour_scale(probs, scale=scale, zmin=zmin, zmax=zmax, lower=0.0 if scale == "linear" else None)
    z = as_list(drawn.z)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=list(range(n)),
            text=[[f"{v:.2f}" for v in row] for row in probs.tolist()],
            texttemplate="%{text}",
            textfont={"size": 12},
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale="Blues",
            zmin=drawn.zmin,
            zmax=drawn.zmax,
            colorbar=colour_bar("probability" + (" (log scale)" if drawn.log else ""), drawn),
            xgap=1,
            ygap=1,
        )
    )
    where = after_quote(result, prompt, col)
    fig.update_xaxes(title_text="layer (residual stream site)", type="category")
    fig.update_yaxes(
        title_text="final layer's top tokens" if is_final_top else "target",
        tickvals=list(range(n)),
        ticktext=rows,
        autorange="reversed",
    )
    heading = f"final layer's top {n} tokens" if is_final_top else "targets"
    fig.update_yaxes(tickfont={"family": MONO}, showgrid=False)
    fig.update_xaxes(showgrid=False)
    return house_style(
        fig,
        title=title or f"Probability of the {heading} across layers (after {where}){lens_note(result)}",
        width=max(560, 220 + 60 * len(labels)),
        height=max(320, 170 + 28 * n),
    )
