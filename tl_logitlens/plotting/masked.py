"""Figures of masked-LM lens results and depth profiles (plotly). They read result fields only."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tl_logitlens.tokens import display_tokens


def _site_index(labels: tuple[str, ...], site: str | int) -> int:
    if isinstance(site, str):
        if site not in labels:
            raise ValueError(f"site {site!r} is not in this result; it has {list(labels)}")
        return labels.index(site)
    if not -len(labels) <= site < len(labels):
        raise ValueError(f"site index {site} is out of range for {len(labels)} sites")
    return site % len(labels)


def vocab_figure(result: Any, site: str | int = -1, prompt: int = 0, mask: int = 0, **layout: Any) -> go.Figure:
    """The full-vocabulary log-softmax (nats) at one site and hole, sorted, with the original token and targets marked."""
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
            x=list(range(1, order.numel() + 1)), y=lp[order].tolist(), mode="lines", name="vocabulary",
            text=display_tokens(tok, order), hovertemplate="rank %{x}: %{text!r} %{y:.2f} nats<extra></extra>",
        )
    )
    marks: list[tuple[str, int]] = []
    orig = int(result.original_ids[prompt, mask])
    if orig >= 0:
        marks.append(("original", orig))
    if result.target_ids is not None:
        marks += [("target", int(t)) for t in result.target_ids.tolist()]
    for what, tid in marks:
        name = display_tokens(tok, [tid])[0]
        fig.add_trace(
            go.Scatter(
                x=[int(ranks[tid])], y=[float(lp[tid])], mode="markers+text", marker={"size": 11},
                text=[f"{name!r} (rank {int(ranks[tid])})"], textposition="top right", name=f"{what}: {name!r}",
            )
        )
    fig.update_layout(
        title=f"log-softmax over the vocabulary at {result.labels[s]}, hole at position "
        f"{int(result.mask_positions[prompt, mask])}",
        xaxis={"title": "rank", "type": "log"}, yaxis={"title": "log-prob (nats)"}, **layout,
    )
    return fig


def profile_figure(profile: Any, row: int = 0, *, show_max: bool = True, show_tracked: bool = True, **layout: Any) -> go.Figure:
    """The laminar profile of one row: target log-prob per depth, its fit ``a + b·√d`` with the equation."""
    n_rows = len(profile.row_tokens)
    if not 0 <= row < n_rows:
        raise ValueError(f"row {row} is out of range; this profile has {n_rows} rows")
    depths = profile.depths
    dense = torch.linspace(float(depths.min()), float(depths.max()), 100, dtype=torch.float64)
    a, b, r2 = (float(t[row]) for t in (profile.intercept, profile.slope, profile.r2))
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=depths.tolist(), y=profile.logprobs[:, row].tolist(), mode="markers+lines", name=profile.target,
            text=list(profile.labels), hovertemplate="%{text}: %{y:.3f} nats<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=dense.tolist(), y=(a + b * dense.sqrt()).tolist(), mode="lines", line={"dash": "dash"},
            name=f"logp = {a:.2f} + {b:.2f}·√layer (r² = {r2:.2f})",
        )
    )
    if show_max:
        fig.add_trace(
            go.Scatter(
                x=depths.tolist(), y=profile.max_logprobs[:, row].tolist(), mode="markers+lines", name="max token",
                text=display_tokens(profile.tokenizer, profile.max_ids[:, row].clamp(min=0)),
                hovertemplate="%{text!r}: %{y:.3f} nats<extra></extra>", line={"dash": "dot"},
            )
        )
    if show_tracked:
        for c, tid in enumerate(profile.tracked_ids[row].tolist()):
            if tid < 0:
                continue
            fig.add_trace(
                go.Scatter(
                    x=depths.tolist(), y=profile.tracked_logprobs[:, row, c].tolist(), mode="lines",
                    opacity=0.5, name=f"tracked {display_tokens(profile.tokenizer, [tid])[0]!r}",
                )
            )
    dec = float(depths[profile.decision_site[row]])
    fig.add_vline(x=dec, line={"dash": "dot", "color": "grey"}, annotation_text="decision")
    fig.update_layout(
        title=f"depth profile at position {int(profile.positions[row])} ({profile.row_tokens[row]!r})",
        xaxis={"title": "layer"}, yaxis={"title": "log-prob (nats)"}, **layout,
    )
    return fig


def profile_heatmaps(profile: Any, *, prompt: int = 0, **layout: Any) -> go.Figure:
    """Heatmaps (site × position) of the target's and the max token's log-probs, and a panel of √depth slopes."""
    rows = (profile.prompts == prompt).nonzero().reshape(-1)
    if rows.numel() == 0:
        raise ValueError(f"prompt {prompt} has no rows in this profile")
    xs = [f"{int(profile.positions[i])}:{profile.row_tokens[i]}" for i in rows.tolist()]
    fig = make_subplots(
        rows=1, cols=3, shared_xaxes=False, column_widths=[0.38, 0.38, 0.24],
        subplot_titles=(f"log-prob of {profile.target}", "max log-prob", "slope (nats/√layer)"),
    )
    labels = list(profile.labels)
    max_text = [display_tokens(profile.tokenizer, profile.max_ids[s, rows].clamp(min=0)) for s in range(len(labels))]
    for col, (values, text) in enumerate(((profile.logprobs, None), (profile.max_logprobs, max_text)), start=1):
        fig.add_trace(
            go.Heatmap(
                z=values[:, rows].tolist(), x=xs, y=labels, text=text, texttemplate="%{text}" if text else None,
                coloraxis="coloraxis",
            ),
            row=1, col=col,
        )
    fig.add_trace(go.Bar(x=xs, y=profile.slope[rows].tolist(), name=f"{profile.target} slope"), row=1, col=3)
    fig.add_trace(go.Bar(x=xs, y=profile.max_slope[rows].tolist(), name="max slope"), row=1, col=3)
    fig.update_layout(coloraxis={"colorbar": {"title": "nats"}}, barmode="group", **layout)
    return fig


def sliding_text_heatmap(result: Any, *, value: str = "original_logprob", **layout: Any) -> go.Figure:
    """The sliding-mask run as a text heatmap: sites × masked tokens, each cell the predicted token.

    ``value`` colours the cells: ``"original_logprob"`` (log-prob of the token that stood there) or
    ``"max_logprob"`` (the top-1 token's log-prob), in nats.
    """
    if value not in ("original_logprob", "max_logprob"):
        raise ValueError(f"value={value!r}; use 'original_logprob' or 'max_logprob'")
    z = result.original_logprobs if value == "original_logprob" else result.max_logprobs
    xs = [f"{p}:{t}" for p, t in zip(result.positions.tolist(), result.original_tokens())]
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(), x=xs, y=list(result.labels), text=result.predicted_tokens(), texttemplate="%{text}",
            colorbar={"title": "nats"},
            hovertemplate="%{y}, %{x}: predicts %{text!r}, " + value + " %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"sliding mask: each token masked in turn ({value.replace('_', ' ')})",
        xaxis={"title": "masked token"}, yaxis={"title": "site"}, **layout,
    )
    return fig
