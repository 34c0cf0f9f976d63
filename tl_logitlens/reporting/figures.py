"""The report's figures, in page order, each with its heading and caption, sized to a 1280-px window.

plotly is loaded only when a report is drawn (``import tl_logitlens`` stays light): the figure
functions are imported from :mod:`tl_logitlens.plotting` inside the functions that call them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from tl_logitlens.core.tokens import text_before, visible_token
from tl_logitlens.reporting.compute import EVOLUTION_N, AnyReportData, MaskedReportData, ReportData
from tl_logitlens.reporting.tables import MASKED_HOLES_SHOWN, escape

FIGURE_MAX_WIDTH = 1140  # px: the report's column is 1200 px less padding, inside a 1280-px window
HEATMAP_POSITIONS = 24  # the most input positions a report heatmap starts from (fewer if it would not fit)


class Figure(NamedTuple):
    """One figure of the report: its heading, its caption (HTML) and the plotly figure."""

    heading: str
    caption: str
    fig: Any


def fit_width(fig: Any) -> Any:
    """The figure no wider than :data:`FIGURE_MAX_WIDTH` (a figure with no width fills the column)."""
    width = fig.layout.width
    if width is not None and width > FIGURE_MAX_WIDTH:
        fig.update_layout(width=FIGURE_MAX_WIDTH)
    return fig


def _positions_fitting(builds: Sequence[Callable[[int], Any]], n_positions: int) -> tuple[list[Any], int]:
    """``build(max_positions)`` for each of ``builds`` with the most positions (at most
    ``HEATMAP_POSITIONS``) at which every one of the figures fits: figures drawn together (the lens
    heatmap and its text view) show the same positions."""
    m = max(1, min(HEATMAP_POSITIONS, n_positions))
    figs = [build(m) for build in builds]
    while m > 4 and any((fig.layout.width or 0) > FIGURE_MAX_WIDTH for fig in figs):
        m -= 2 if m > 8 else 1
        figs = [build(m) for build in builds]
    return [fit_width(fig) for fig in figs], m


def _clip_note(shown: int, total: int) -> str:
    if shown >= total:
        return ""
    return (
        f" Only the last {shown} of the prompt's {total} positions are drawn, so the figure fits the page; "
        "the tables and the other figures use every position."
    )


def figures(data: AnyReportData, shown: list[int]) -> list[Figure]:
    """Every figure of the report of ``data``, heatmaps for the ``shown`` prompts only."""
    if isinstance(data, MaskedReportData):
        return _hole_figures(data, shown) + _sliding_figures(data, shown) + [_masked_entropy_kl(data)]
    return _lens_figures(data, shown) + _trajectory_figures(data) + _attribution_figures(data)


def _entropy_kl(
    sites: Sequence[str], results: Sequence[Any], groups: Callable[[torch.Tensor], list], caption: str, n: int
) -> Figure:
    """Entropy and KL by site over the read cells of ``results``; ``groups(valid)`` names the lines."""
    from tl_logitlens.plotting.entropy import entropy_kl_figure

    entropy = torch.cat([r.entropy.reshape(len(sites), -1) for r in results], dim=1)
    kl = torch.cat([r.kl_to_final.reshape(len(sites), -1) for r in results], dim=1)
    valid = torch.cat([r.valid.reshape(-1) for r in results])
    title = f"Entropy and KL(final ‖ site), {n} prompt(s)"
    return Figure("Entropy and KL to the final layer", caption, entropy_kl_figure(sites, entropy, kl, groups(valid), title))


def _lens_figures(data: ReportData, shown: list[int]) -> list[Figure]:
    """The lens heatmap of each shown prompt, the text view of prompt 0, and entropy/KL by site."""
    from tl_logitlens.plotting import lens_heatmap, text_heatmap

    lens = data.lens
    name = lens.lens_name[:1].upper() + lens.lens_name[1:]  # the heading names the lens its figure draws
    out = []
    for b in shown:
        n_cols = int(lens.valid[b].sum())
        builds = [lambda m, b=b: lens_heatmap(lens, prompt=b, max_positions=m)]
        if b == 0:  # prompt 0's text view shows the very positions of its heatmap
            builds.append(lambda m: text_heatmap(lens, prompt=0, max_positions=m))
        figs, m = _positions_fitting(builds, n_cols)
        out.append(Figure(
            f"{name}, prompt {b}",
            "Rows are sites (first layer at the bottom), columns the input tokens. Each cell is the token "
            "the lens predicts <i>after</i> its column's token at that site; its colour is that token's "
            "probability. Hover a cell for its top-k." + _clip_note(m, n_cols),
            figs[0],
        ))
        if b == 0:
            text_view = Figure(
                "Text view, prompt 0",
                "The same predictions laid out as text: under each input token, every site's top token, shaded "
                "by its probability." + _clip_note(m, n_cols),
                figs[1],
            )
    out.append(text_view)
    last = torch.zeros_like(lens.valid)
    last[torch.arange(lens.valid.shape[0]), lens.valid.sum(1) - 1] = True
    out.append(_entropy_kl(
        lens.labels, [lens], lambda valid: [("every position", valid), ("last token", last.reshape(-1))],
        "How uncertain the lens is at each site (entropy of its distribution) and how far it is from the "
        "model's output (KL(final ‖ site), 0 at final_post), in nats: the mean over every position of every "
        "prompt, and over each prompt's last token.",
        len(data.prompts),
    ))
    return out


def _trajectory_figures(data: ReportData) -> list[Figure]:
    """The final top tokens' probabilities across layers and, with targets, their log-prob and rank."""
    from tl_logitlens.plotting import target_trajectory, top_token_evolution

    out = [Figure(
        f"The final layer's top tokens across layers (prompt 0, after '{text_before(data.lens, 0)}')",
        f"The {EVOLUTION_N} tokens the model finally ranks highest after prompt 0's last token, and their "
        "probability at every site: where each one rises.",
        fit_width(top_token_evolution(data.evolution, n=EVOLUTION_N)),
    )]
    if data.lens.target_ids is not None:
        out.append(Figure(
            "Targets across layers",
            "The log-prob (nats) of each target token at the last token of every prompt, by site: the mean, "
            "and one faint line per prompt.",
            fit_width(target_trajectory(data.lens)),
        ))
        out.append(Figure(
            "Target rank across layers",
            "The targets' rank over the whole vocabulary (1 = the top token; log axis) by site.",
            fit_width(target_trajectory(data.lens, metric="rank")),
        ))
    return out


def _attribution_figures(data: ReportData) -> list[Figure]:
    """With a comparison token: the logit difference across layers and its direct logit attribution."""
    from tl_logitlens.plotting import component_bars_figure, head_grid_figure, logit_diff_figure
    from tl_logitlens.plotting.style import sign_note

    colours = ""
    if data.target is not None and data.versus is not None:
        target, versus = (escape(f"'{visible_token(t)}'") for t in (data.target, data.versus))
        colours = f" Colours: {sign_note(f'towards {target}', f'towards {versus}')}."
    drawn = [
        (
            data.logit_diff,
            "Logit difference",
            f"logit({escape(visible_token(data.target or ''))}) − logit({escape(visible_token(data.versus or ''))}) at "
            "each prompt's last token, by site, read "
            f"with norm={escape(data.norm)}; at final_post it is the model's own logit difference.",
            lambda r: logit_diff_figure(r, per_prompt=len(data.prompts) <= 30),
        ),
        (
            data.attribution,
            "Direct logit attribution by component",
            "How much each component (embeddings, each attention layer and MLP, biases) writes directly "
            "along the target − versus direction (mean over prompts); the bars add up to the total (grey)."
            + colours,
            component_bars_figure,
        ),
        (
            data.head_attribution,
            "Direct logit attribution by head",
            "The attention layers split into their heads (layer × head; mean over prompts), on a scale "
            "symmetric about zero." + colours + " The MLPs, embeddings and biases are in the figure above.",
            head_grid_figure,
        ),
    ]
    return [Figure(heading, caption, fit_width(draw(r))) for r, heading, caption, draw in drawn if r is not None]


def _hole_figures(data: MaskedReportData, shown: list[int]) -> list[Figure]:
    """Per shown prompt and drawn hole: the masked lens's top-k by site and the hole's depth profile."""
    from tl_logitlens.plotting import profile_figure
    from tl_logitlens.plotting.masked import masked_topk_figure

    out = []
    for b in shown:
        res, prof = data.masked[b], data.profiles[b]
        what = "top token" if prof.target == "max" else escape(prof.target)
        for j in range(min(int(res.valid[0].sum()), MASKED_HOLES_SHOWN)):
            out.append(Figure(
                f"Masked lens, prompt {b}, hole {j}",
                "Each site's top tokens for the hole, read through the MLM head (rows: sites, first layer at "
                "the bottom; columns: rank); colour is the probability.",
                fit_width(masked_topk_figure(res, prompt=0, hole=j)),
            ))
            out.append(Figure(
                f"Depth profile, prompt {b}, hole {j}",
                f"The log-prob (nats) of the {what} at each depth, with its fit a + b·√layer"
                + (", the top token's log-prob" if prof.target != "max" else "")
                + ", the tokens that peak highest, and the decision site (dotted): the first site from "
                "which the top token stays the final one.",
                fit_width(profile_figure(prof, row=j)),
            ))
    return out


def _sliding_figures(data: MaskedReportData, shown: list[int]) -> list[Figure]:
    """Per shown prompt with a sliding mask: its text heatmap and its depth profiles."""
    from tl_logitlens.plotting import profile_heatmaps, sliding_text_heatmap

    out = []
    for i in [b for b in shown if b < len(data.sliding)]:
        out.append(Figure(
            f"Sliding mask, prompt {i}",
            "Every token masked in turn (columns) and read at every site (rows): each cell is the predicted "
            "token, coloured by the log-prob (nats) of the token that stood there.",
            fit_width(sliding_text_heatmap(data.sliding[i])),
        ))
        out.append(Figure(
            f"Depth profiles of the sliding mask, prompt {i}",
            "Per masked token: the original token's and the top token's log-prob by site, and the slopes "
            "of their √layer fits (nats per √layer).",
            fit_width(profile_heatmaps(data.sliding_profiles[i])),
        ))
    return out


def _masked_entropy_kl(data: MaskedReportData) -> Figure:
    return _entropy_kl(
        data.sites, data.masked, lambda valid: [("every hole", valid)],
        "At the holes of every prompt, the mean entropy of each site's distribution and its KL(final ‖ "
        "site), in nats (0 at final_post).",
        len(data.prompts),
    )


def comparison_figure(data: ReportData) -> Figure | None:
    """With several lenses: one heatmap per lens on prompt 0, on one colour scale (None with one lens)."""
    cmp = data.comparison
    if cmp is None:
        return None
    n_cols = int(cmp.valid[0].sum())
    figs, m = _positions_fitting([lambda m: cmp.plot(prompt=0, max_positions=m)], n_cols)
    names = ", ".join(escape(name) for name in cmp.lenses)
    return Figure(
        f"{len(cmp.lenses)} lenses on prompt 0",
        f"The same run read through each lens ({names}), top to bottom, at the sites every one of them reads "
        f"({escape(cmp.labels[0])} … {escape(cmp.labels[-1])}). As in the lens heatmap, each cell is the token the "
        "lens predicts after its column's token; one colour scale for all panels, so a colour is the same "
        "probability in each." + _clip_note(m, n_cols),
        figs[0],
    )
