"""The latent-language figure (Wendler et al., 2024): two probability curves over depth with bands."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from tl_logitlens.plotting.style import (
    LINE_CHART,
    MIN_BAND_N,
    as_list,
    band_trace,
    house_style,
    lens_note,
    line_trace,
)

# unsigned quantities, so not the blue/red pair of signed ones: orange for the answer language,
# purple for the latent one (a pair readable in grey and by colour-blind readers)
ANSWER_COLOUR = "#e66101"
LATENT_COLOUR = "#5e3c99"


def latent_language_figure(result: Any, *, show_prompts: bool = False, title: str | None = None) -> go.Figure:
    """The answer-language and latent-language probabilities per site, means over prompts with their
    bootstrap intervals as bands (x: sites, shallow to deep; y: probability, 0 to 1).

    Args:
        result: a :class:`~tl_logitlens.analyses.latent_language.LatentLanguageResult`.
        show_prompts: also draw each prompt's own curve, faint.
        title: replaces the default title.
    """
    labels = list(result.labels)
    x = list(range(len(labels)))
    n = result.probs.shape[1]
    fig = go.Figure()
    for g, colour in enumerate((ANSWER_COLOUR, LATENT_COLOUR)):
        name = result.names[g]
        if show_prompts and n > 1:
            for b in range(n):
                fig.add_trace(
                    line_trace(
                        x, as_list(result.probs[:, b, g]), colour, f"{name} prompt {b}", name, opacity=0.25
                    )
                )
        if n >= MIN_BAND_N:
            band = f"{name} {result.confidence:.0%} interval"
            fig.add_trace(
                band_trace(x, as_list(result.low[:, g]), as_list(result.high[:, g]), colour, band, name)
            )
        fig.add_trace(line_trace(x, as_list(result.mean[:, g]), colour, f"P({name})", name))
    fig.update_xaxes(title_text="layer (residual stream site)", tickvals=x, ticktext=labels)
    # from 0 up to the data: a small model's masses are small (fig.update_yaxes(range=[0, 1]): the paper's axis)
    fig.update_yaxes(title_text="probability (summed over the word's token set)", rangemode="tozero")
    band = (
        f"mean over {n} prompts; bands: {result.confidence:.0%} bootstrap intervals over prompts"
        if n >= MIN_BAND_N
        else f"{n} prompt{'s' if n != 1 else ''}, too few for a band"
    )
    default = (
        f"Latent language: P({result.names[0]}) and P({result.names[1]}) across layers{lens_note(result)}"
    )
    return house_style(fig, title=title or f"{default}<br><sup>{band}</sup>", **LINE_CHART)
