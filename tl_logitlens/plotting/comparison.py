"""Figures of a :class:`~tl_logitlens.analyses.directions.DirectionResult`: a logit difference across layers."""

from __future__ import annotations

import plotly.graph_objects as go

from tl_logitlens.core.results import ResultBase
from tl_logitlens.plotting.style import (
    LINE_CHART,
    MIN_BAND_N,
    PALETTE,
    as_list,
    band_trace,
    check_index,
    house_style,
    lens_note,
    line_trace,
    pair_name,
    sign_words,
)


def logit_diff_figure(
    result: ResultBase,
    *,
    per_prompt: bool = False,
    pair: int | None = None,
    column: int = -1,
    title: str | None = None,
) -> go.Figure:
    """The mean value over prompts at each site with the result's confidence band.

    The line is ``result.mean`` and the band ``result.low``..``result.high`` (the percentile
    bootstrap interval :func:`~tl_logitlens.logit_diff` computed, at ``result.confidence``), drawn
    from three prompts on (the legend says how many); with
    ``per_prompt=True`` each prompt's own ``values`` are drawn as thin lines. ``pair``: one pair
    (index), or all of them (``None``). ``column``: which read-position column (``logit_diff``'s
    default reads each prompt's last token, a single column). Units: logits for logit differences.
    Above the dotted zero line a site favours the correct token, below it the incorrect one (the
    subtitle names them for a single pair).
    """
    n_sites, n_cols, n_pairs = result.mean.shape
    column = check_index("column", column, n_cols)
    pairs = list(range(n_pairs)) if pair is None else [check_index("pair", pair, n_pairs)]
    labels = list(result.labels)
    x = list(range(len(labels)))
    prompts = [b for b in range(result.values.shape[1]) if bool(result.valid[b, column])]
    fig = go.Figure()
    for i, k in enumerate(pairs):
        colour = PALETTE[i % len(PALETTE)]
        name = pair_name(result, k, short=True)
        if per_prompt:
            for b in prompts:
                y = as_list(result.values[:, b, column, k])
                fig.add_trace(line_trace(x, y, colour, f"{name} prompt {b}", name, opacity=0.35))
        if len(prompts) >= MIN_BAND_N:
            fig.add_trace(
                band_trace(
                    x,
                    as_list(result.low[:, column, k]),
                    as_list(result.high[:, column, k]),
                    colour,
                    f"{name} {result.confidence:.0%} CI (n={len(prompts)})",
                    name,
                )
            )
        mean_name = f"{name} mean over {len(prompts)} prompt{'s' if len(prompts) != 1 else ''}"
        fig.add_trace(line_trace(x, as_list(result.mean[:, column, k]), colour, mean_name, name, hover=name))
    fig.add_hline(y=0, line={"color": "#888", "width": 1, "dash": "dot"})
    y_title = "logit difference (logits)" if result.kind == "logit_diff" else "value along the direction"
    fig.update_xaxes(title_text="layer (residual stream site)", tickvals=x, ticktext=labels)
    fig.update_yaxes(title_text=y_title)
    what = "Logit difference" if result.kind == "logit_diff" else "Direction"
    if len(prompts) >= MIN_BAND_N:
        band = f"band: {result.confidence:.0%} bootstrap CI over {len(prompts)} prompts"
    else:
        band = f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''}, too few for a band"
    many = "pairs" if result.kind == "logit_diff" else "directions"
    heading = pair_name(result, pairs[0]) if len(pairs) == 1 else f"{len(pairs)} {many}"
    up, down = sign_words(result, pairs[0]) if len(pairs) == 1 else ("towards the correct token", "the incorrect one")
    sides = f"<br><sup>above 0: {up}; below 0: {down}</sup>"
    return house_style(
        fig,
        title=title
        or f"{what} across layers: {heading}<br><sup>norm={result.norm}{lens_note(result)}; {band}</sup>{sides}",
        **LINE_CHART,
    )
