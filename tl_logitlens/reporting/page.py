"""The report as one HTML page: its path checked, the header, "how to read this", the figures and tables."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tl_logitlens.analyses.directions import NORM_VIEWS
from tl_logitlens.core.files import atomic_write_text
from tl_logitlens.lenses import LOGIT_LENS
from tl_logitlens.reporting.compute import AnyReportData, MaskedReportData, ReportData
from tl_logitlens.reporting.figures import comparison_figure, figures
from tl_logitlens.reporting.tables import comparison_table_html, escape, prompts_html, tables_html, token_box

PLOTLY_JS = ("inline", "cdn", "directory")
PLOTLY_JS_FILE = "plotly.min.js"

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; box-sizing: border-box; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
figure.figure { margin: 1.2em 0; max-width: 100%; overflow-x: auto; }
figure.figure figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; max-width: 60em; }
code, .tok { font-family: ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: inherit; }
.tok { display: inline-block; white-space: pre; background: #eef3fa;
       border: 1px solid #c9d6ea; border-radius: 3px; padding: 0 3px; margin: 1px; }
.howto { background: #f7f7f4; border: 1px solid #e2e2da; border-radius: 4px; padding: 0.4em 1em;
         font-size: 0.92em; max-width: 60em; }
.howto h2 { margin-top: 0.4em; }
.howto dt { font-weight: 600; margin-top: 0.4em; } .howto dd { margin-left: 1.2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td code { white-space: pre-wrap; word-break: break-all; }
.note { color: #555; font-style: italic; }
"""

_SITES = (
    "<code>l_pre</code> is the residual stream entering block <i>l</i> (<code>0_pre</code>: the "
    "embeddings), <code>l_mid</code> after its attention, <code>l_post</code> after its MLP; "
    "<code>final_post</code> is the last block's output, the stream the unembedding reads. "
    "Rows go from the first layer (bottom of a heatmap) to the last."
)
_MASKED_LENS = (
    "Each site's state at a hole (a masked token) goes through the model's own MLM head, so "
    "<code>final_post</code> is the model's own prediction. A depth profile fits "
    "log-prob ≈ a + b·√layer; the <i>decision site</i> is the first from which the top token "
    "stays the final one. The sliding mask masks each token in turn."
)
_READ_POSITIONS = (
    "A cell at input token <i>t</i> is the prediction for the token <i>after</i> t. Probabilities "
    "are of the whole vocabulary; entropy and KL are in nats; ranks count from 1."
)


def check_out(out: object) -> Path:
    """The report's path, checked before any work: an ``.html`` file name we can write.

    Raises:
        TypeError: ``out`` is not a path.
        ValueError: not ending in ``.html``; an existing folder; a missing folder; a folder or file
            we may not write.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a file path (str or Path), not {type(out).__name__}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{str(out)!r} is a folder; give the report a file name such as {str(out / 'report.html')!r}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the report is HTML: give a file name ending in .html, not {str(out)!r}")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"the folder {str(parent)!r} does not exist; create it or pick another out=")
    # try it, rather than trust permission bits (root, read-only file systems, /proc)
    try:
        if out.exists():
            with open(out, "a", encoding="utf-8"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".tl_logitlens_probe_", suffix=".html"):
                pass
    except OSError as err:
        where = str(out) if out.exists() else f"the folder {str(parent)!r}"
        raise ValueError(f"{where} may not be written ({err.strerror}); pick another out=") from None
    return out


def check_plotly_js(plotly_js: object) -> str:
    """``plotly_js`` checked: one of :data:`PLOTLY_JS`."""
    if plotly_js not in PLOTLY_JS:
        raise ValueError(
            f"plotly_js={plotly_js!r} is not understood; use 'inline' (one self-contained file, works offline), "
            f"'cdn' (loads plotly.js from cdn.plot.ly: small, needs the internet) or 'directory' "
            f"(one shared {PLOTLY_JS_FILE} beside the report)"
        )
    return str(plotly_js)


def check_page(out: object, max_prompts: object, plotly_js: object) -> tuple[Path, int, str]:
    """The page options of :func:`write_report` (and :func:`~tl_logitlens.report`), checked before
    anything is computed: ``out`` (:func:`check_out`), ``max_prompts`` and ``plotly_js``."""
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise ValueError(f"max_prompts must be a positive int, got {max_prompts!r}")
    return check_out(out), max_prompts, check_plotly_js(plotly_js)


def plotly_js_html(plotly_js: str, out: Path) -> str:
    """The ``<script>`` that loads plotly.js: inlined, from the CDN (with its integrity hash), or from a
    shared ``plotly.min.js`` written beside the report (written once; several reports share it)."""
    from tl_logitlens.plotting.export import plotly_js_source, plotly_js_version

    source = plotly_js_source()
    if plotly_js == "inline":
        return f"<script type='text/javascript'>{source}</script>"
    if plotly_js == "cdn":
        version = plotly_js_version()
        digest = base64.b64encode(hashlib.sha384(source.encode("utf-8")).digest()).decode()
        return (
            f'<script charset="utf-8" src="https://cdn.plot.ly/plotly-{version}.min.js" '
            f'integrity="sha384-{digest}" crossorigin="anonymous"></script>'
        )
    shared = out.parent / PLOTLY_JS_FILE
    if not shared.is_file() or shared.read_text(encoding="utf-8") != source:
        atomic_write_text(shared, source)
    return f'<script charset="utf-8" src="{PLOTLY_JS_FILE}"></script>'


def _figure_html(fig: Any, div_id: str, caption: str = "") -> str:
    """One figure as a ``<figure>`` with its caption; plotly.js is loaded once for the page."""
    from tl_logitlens.plotting.export import figure_div

    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="figure">{figure_div(fig, div_id)}{cap}</figure>'


def _howto(data: AnyReportData) -> str:
    """The short "how to read this" box: what the site names and the settings mean."""
    items = [("Sites", _SITES)]
    if isinstance(data, MaskedReportData):
        items.append(("The masked-LM lens", _MASKED_LENS))
    else:
        items += [(f"norm = {escape(data.norm)}", escape(NORM_VIEWS)), ("Read positions", _READ_POSITIONS)]
    body = "".join(f"<dt>{name}</dt><dd>{text}</dd>" for name, text in items)
    return f'<section class="howto"><h2>How to read this</h2><dl>{body}</dl></section>'


def _comparison_html(data: AnyReportData) -> list[str]:
    """With several lenses: the "lenses side by side" section, their heatmaps and the per-site table."""
    figure = None if isinstance(data, MaskedReportData) else comparison_figure(data)
    if figure is None:
        return []
    cmp = data.comparison
    n = int(cmp.valid.sum())
    return [
        f'<section id="lens-comparison"><h2>Lenses side by side: {escape(", ".join(cmp.lenses))}</h2>',
        f"<h3>{escape(figure.heading)}</h3>",
        _figure_html(figure.fig, "figure-comparison", figure.caption),
        "<h3>How close each lens is to the model's output, by site</h3>",
        f"<p>Mean over every read position of every prompt ({n} positions): KL(final ‖ site) in nats (0 is the "
        "model's own distribution) and top-1 agreement (how often the lens's top token is the model's final "
        "top token). For a corpus, use <code>tl.evaluate_lenses</code> or <code>tl-logitlens eval</code>.</p>",
        comparison_table_html(cmp),
        "</section>",
    ]


def _default_title(data: AnyReportData) -> str:
    if isinstance(data, MaskedReportData):
        kind = "Masked-LM lens report"
    else:
        kind = "Logit lens report" if data.lens_name == LOGIT_LENS.name else f"Lens report ({data.lens_name})"
    return f"{kind}{' — ' + data.model_name if data.model_name else ''}"


def _header(data: AnyReportData, title: str, n_prompts: int) -> list[str]:
    from tl_logitlens import __version__

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    norm = "" if isinstance(data, MaskedReportData) else f"norm <b>{escape(data.norm)}</b> · "
    n_kept = len(data.prompts)
    shown = f"{n_kept:,} prompt(s)" if n_prompts <= n_kept else f"the first {n_kept:,} of {n_prompts:,} prompts"
    partial = [] if n_prompts <= n_kept else [
        f'<p class="note">This report covers the first {n_kept:,} of the run\'s {n_prompts:,} prompts: its '
        f"figures, means and intervals are over these {n_kept:,}. Every prompt is in the run's CSV and JSON "
        "tables (<code>--csv</code>, <code>--json</code>).</p>"
    ]
    return [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">lens <b>{escape(data.lens_name)}</b> · model <b>{escape(data.model_name or "?")}</b> · '
        f"{norm}{len(data.sites)} sites ({escape(data.sites[0])} … {escape(data.sites[-1])}) · "
        f"{shown} · top-k {data.top_k}"
        + (f" · target {token_box(data.target)}" if data.target else "")
        + (f" versus {token_box(data.versus)}" if getattr(data, "versus", None) else "")
        + f" · tl_logitlens {escape(__version__)} · {when}</p>",
        *partial,
    ]


def write_report(
    data: AnyReportData,
    out: str | os.PathLike = "logit_lens_report.html",
    *,
    max_prompts: int = 3,
    title: str | None = None,
    plotly_js: str = "inline",
    evaluation: Any = None,
    faithfulness: Any = None,
    n_prompts: int | None = None,
) -> Path:
    """Write the figures and tables of ``data`` to one HTML file; return its path.

    ``n_prompts``: how many prompts the run read when ``data`` holds only its first ones (a streamed
    run, :func:`~tl_logitlens.reporting.stream.stream_report`): the header and a note say the report
    covers the first ``len(data.prompts)`` of them.

    ``evaluation``: a :class:`~tl_logitlens.LensEvaluation` (from :func:`~tl_logitlens.evaluate_lenses`)
    whose corpus-scale section (per-site curves with bands, the table with intervals, the definition)
    closes the report. ``faithfulness``: a :class:`~tl_logitlens.Faithfulness` (from
    :func:`~tl_logitlens.faithfulness`), whose "Which lens is causal?" section (effect and placebo per site
    and lens, the table with intervals, the definition) comes last.

    ``plotly_js``: ``"inline"`` (the default) puts plotly.js in the file, which then opens offline
    on its own (about 5 MB); ``"cdn"`` loads it from cdn.plot.ly (a few hundred kB, needs the
    internet); ``"directory"`` writes one ``plotly.min.js`` beside the report that every report in the
    folder shares. Heatmaps and tables are drawn for the first ``max_prompts`` prompts (a note says
    how many were left out); trajectories, entropy/KL, logit differences and attributions use every prompt.
    """
    out, max_prompts, plotly_js = check_page(out, max_prompts, plotly_js)
    if not isinstance(data, (ReportData, MaskedReportData)):
        raise TypeError(f"write_report takes the ReportData or MaskedReportData of compute_report, not {type(data).__name__}")
    if n_prompts is not None and (isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < len(data.prompts)):
        raise ValueError(f"n_prompts must be an int of at least the {len(data.prompts)} prompts data holds, got {n_prompts!r}")
    shown = list(range(min(len(data.prompts), max_prompts)))
    title = title or _default_title(data)
    parts = _header(data, title, n_prompts or len(data.prompts)) + [_howto(data)] + prompts_html(data, shown) + ["<h2>Figures</h2>"]
    for i, figure in enumerate(figures(data, shown)):
        parts.append(f"<h3>{escape(figure.heading)}</h3>")
        parts.append(_figure_html(figure.fig, f"figure-{i}", figure.caption))
    parts += _comparison_html(data)
    parts += tables_html(data, shown)
    if evaluation is not None:
        from tl_logitlens.analyses.evaluate import LensEvaluation

        if not isinstance(evaluation, LensEvaluation):
            raise TypeError(f"evaluation must be a LensEvaluation (from tl.evaluate_lenses), not {type(evaluation).__name__}")
        parts.append(evaluation.to_html(include_plotlyjs=False))
    if faithfulness is not None:
        from tl_logitlens.analyses.faithfulness import Faithfulness

        if not isinstance(faithfulness, Faithfulness):
            raise TypeError(f"faithfulness must be a Faithfulness (from tl.faithfulness), not {type(faithfulness).__name__}")
        parts.append(faithfulness.to_html(include_plotlyjs=False))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style>"
        f"{plotly_js_html(plotly_js, out)}</head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    atomic_write_text(out, page)  # a reader (or a kill mid-write) sees the old page or the new one, whole
    return out
