"""One HTML report of the logit lens on some prompts (self-contained: plotly.js inlined, works offline).

:func:`report` runs the analyses and writes the figures and tables; :func:`compute_report` and
:func:`write_report` are the two halves, for callers (the command line) that also want the results.

- A causal LM gets :func:`~tl_logitlens.logit_lens` over every prompt, and with a comparison token
  :func:`~tl_logitlens.logit_diff` and :func:`~tl_logitlens.direct_logit_attribution`
  (:class:`ReportData`).
- A masked LM (BERT, RoBERTa) gets :func:`~tl_logitlens.masked_lens` at each prompt's holes, their
  :func:`~tl_logitlens.depth_profile`, and :func:`~tl_logitlens.sliding_mask_lens` (:class:`MaskedReportData`).

Every figure and table fits a 1280-px browser window: wide heatmaps show a prompt's last positions
(with a note), and no figure is drawn wider than :data:`FIGURE_MAX_WIDTH`.

The modules, one job each: :mod:`~tl_logitlens.reporting.compute` runs the analyses (the numbers),
:mod:`~tl_logitlens.reporting.figures` lists the figures with their captions,
:mod:`~tl_logitlens.reporting.tables` writes the prompts and top-k tables, and
:mod:`~tl_logitlens.reporting.page` puts them on one page. Only the plotting package imports plotly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, no_type_check

from tl_logitlens.reporting.compute import (
    EVOLUTION_N,
    AnyReportData,
    MaskedReportData,
    ReportData,
    compute_masked_report,
    compute_report,
)
from tl_logitlens.reporting.figures import FIGURE_MAX_WIDTH, HEATMAP_POSITIONS
from tl_logitlens.reporting.page import (
    PLOTLY_JS,
    PLOTLY_JS_FILE,
    check_page,
    plotly_js_html,
    write_report,
)
from tl_logitlens.reporting.tables import MASKED_HOLES_SHOWN, masked_table_html, top_table_html

__all__ = [
    "EVOLUTION_N",
    "FIGURE_MAX_WIDTH",
    "HEATMAP_POSITIONS",
    "MASKED_HOLES_SHOWN",
    "PLOTLY_JS",
    "PLOTLY_JS_FILE",
    "AnyReportData",
    "MaskedReportData",
    "ReportData",
    "check_page",
    "compute_masked_report",
    "compute_report",
    "masked_table_html",
    "plotly_js_html",
    "report",
    "top_table_html",
    "write_report",
]


@no_type_check  # checks its own arguments (see lens.logit_lens)
def report(
    model: Any,
    prompts: str | Sequence[str],
    *,
    out: str | os.PathLike = "logit_lens_report.html",
    max_prompts: int = 3,
    title: str | None = None,
    plotly_js: str = "inline",
    evaluation: Any = None,
    faithfulness: Any = None,
    **analysis: Any,
) -> Path:
    """Run the lens on ``prompts`` and write one HTML report; return its path.

    ``report(model, prompts, out=..., **analysis)`` is ``write_report(compute_report(model, prompts,
    **analysis), out, ...)`` with ``out``, ``max_prompts`` and ``plotly_js`` checked first. The
    analysis arguments are :func:`compute_report`'s: ``target`` and ``versus`` (tokens), ``top_k``
    (5), ``sites`` (default: the lens's own, ``"resid_pre"`` for the logit and tuned lenses and
    ``"resid_post"`` for the Jacobian lens), ``norm`` (``"recompute"``), ``lens`` (None for the logit lens,
    or a lens object for the analyses that take one; the report names it), ``mask_positions``
    (masked LMs), ``batch_size`` and ``progress``.

    A causal LM's report holds the prompts and their tokens, the lens heatmap and text view, entropy
    and KL by site, the final top tokens' probabilities across layers, with ``target`` the targets'
    log-prob and rank across layers, with ``versus`` too the logit difference ``target - versus``
    across layers and its direct logit attribution (components and heads), and the top-k tables.
    A masked LM's report (BERT, RoBERTa) holds the masked lens at each prompt's holes (its mask
    tokens, else ``mask_positions``, else its last word), their depth profiles, the sliding mask,
    entropy and KL, and the top-k tables.

    ``plotly_js``: ``"inline"`` (default: one self-contained file that opens offline), ``"cdn"`` or
    ``"directory"`` (see :func:`write_report`). ``evaluation``: a :class:`~tl_logitlens.LensEvaluation`
    from :func:`~tl_logitlens.evaluate_lenses`, added as the report's last section; ``faithfulness``: a
    :class:`~tl_logitlens.Faithfulness` from :func:`~tl_logitlens.faithfulness`, its "Which lens is causal?"
    section after it. ``model``: a model object or anything
    :func:`~tl_logitlens.load_model` takes (``"demo"``, ``"demo-bert"``, a checkpoint folder, a
    TransformerLens name).

    Raises:
        ValueError: a bad ``out`` (not .html, a folder, a missing or unwritable folder), ``max_prompts``
            or ``plotly_js``, checked before anything is computed; bad analysis arguments.
        TypeError: an argument :func:`compute_report` does not take.

    Example:
        >>> path = tl.report("demo", ["Once upon a time, there was"], target=" a", versus=" the", out="r.html")
    """
    check_page(out, max_prompts, plotly_js)
    data = compute_report(model, prompts, **analysis)
    return write_report(
        data, out, max_prompts=max_prompts, title=title, plotly_js=plotly_js, evaluation=evaluation,
        faithfulness=faithfulness,
    )
