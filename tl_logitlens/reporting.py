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
"""

from __future__ import annotations

import base64
import hashlib
import html
import inspect
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union, no_type_check

import torch

from tl_logitlens import _compat
from tl_logitlens.attribution import AttributionResult, direct_logit_attribution
from tl_logitlens.directions import NORM_VIEWS, DirectionResult, logit_diff
from tl_logitlens.inputs import resolve_token
from tl_logitlens.lens import LensResult, logit_lens
from tl_logitlens.masked import MaskedLensResult, SlidingMaskResult, masked_lens, sliding_mask_lens
from tl_logitlens.models import load_model
from tl_logitlens.profile import DepthProfile, depth_profile
from tl_logitlens.tokens import display_tokens, visible_token

EVOLUTION_N = 10
FIGURE_MAX_WIDTH = 1140  # px: the report's column is 1200 px less padding, inside a 1280-px window
HEATMAP_POSITIONS = 24  # the most input positions a report heatmap starts from (fewer if it would not fit)
MASKED_HOLES_SHOWN = 3  # holes per prompt drawn one by one in a masked-LM report
PLOTLY_JS = ("inline", "cdn", "directory")
PLOTLY_JS_FILE = "plotly.min.js"


@dataclass(frozen=True)
class ReportData:
    """What a causal-LM report shows: the lens on every prompt and, given a comparison token, its attributions.

    - ``lens``: :func:`logit_lens` over all prompts and positions (``targets``: the target and the
      comparison token, when given).
    - ``evolution``: the lens on prompt 0's last token with ``targets`` = the final layer's top
      ``EVOLUTION_N`` tokens there (for :func:`~tl_logitlens.plotting.top_token_evolution`).
    - ``logit_diff``, ``attribution`` (components), ``head_attribution``: at each prompt's last
      token, for ``target`` minus ``versus``; None without ``versus``.
    - ``lens_name``: which lens read the sites (``"logit lens"``, or the ``name`` of the ``lens=`` given).
    """

    prompts: tuple[str, ...]
    model_name: str
    lens: LensResult
    evolution: LensResult
    target: str | None
    versus: str | None
    logit_diff: DirectionResult | None
    attribution: AttributionResult | None
    head_attribution: AttributionResult | None
    sites: tuple[str, ...]
    norm: str
    top_k: int
    lens_name: str = "logit lens"


@dataclass(frozen=True)
class MaskedReportData:
    """What a masked-LM report shows, one entry per prompt.

    - ``masked[b]``: :func:`masked_lens` of prompt ``b`` at its holes: the mask tokens in the text,
      else ``mask_positions``, else its last word (``notes[b]`` says which).
    - ``profiles[b]``: :func:`depth_profile` of those holes (the original token's log-prob by depth).
    - ``sliding[i]``, ``sliding_profiles[i]``: :func:`sliding_mask_lens` (every token masked in turn)
      of the first ``len(sliding)`` prompts, and its depth profile.
    """

    prompts: tuple[str, ...]
    model_name: str
    masked: tuple[MaskedLensResult, ...]
    profiles: tuple[DepthProfile, ...]
    sliding: tuple[SlidingMaskResult, ...]
    sliding_profiles: tuple[DepthProfile, ...]
    notes: tuple[str, ...]
    target: str | None
    top_k: int
    sites: tuple[str, ...]
    lens_name: str = "logit lens through the masked-LM head"


AnyReportData = Union[ReportData, MaskedReportData]


def _as_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        out = list(prompts)
        if not out:
            raise ValueError("no prompts were given; pass a prompt or a list of prompts")
        return out
    raise TypeError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")


def _token_text(model: Any, token: str | int | None, what: str) -> str | None:
    if token is None:
        return None
    tid = resolve_token(model, token, what)
    return display_tokens(getattr(model, "tokenizer", None), [tid])[0]


def lens_name(lens: Any) -> str:
    """How a report names the lens that read the sites: its ``name``, or ``"logit lens"`` for None."""
    return "logit lens" if lens is None else str(getattr(lens, "name", None) or type(lens).__name__)


def _lens_kwargs(fn: Callable[..., Any], lens: Any) -> dict[str, Any]:
    """``{"lens": lens}`` for an analysis that takes a lens; refuses a lens the analysis cannot use."""
    if lens is None:
        return {}
    if "lens" not in inspect.signature(fn).parameters:
        raise ValueError(
            f"{fn.__name__} in this version of tl_logitlens takes no lens=; leave lens=None for the logit lens"
        )
    return {"lens": lens}


@no_type_check  # checks its own arguments (see lens.logit_lens)
def compute_report(
    model: Any,
    prompts: str | Sequence[str],
    *,
    target: str | int | None = None,
    versus: str | int | None = None,
    top_k: int = 5,
    sites: str | Sequence[str] = "resid_pre",
    norm: str = "recompute",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    lens: Any = None,
    mask_positions: Any = None,
) -> AnyReportData:
    """Run every analysis a report shows. ``progress(done, total)`` is called after each batch of prompts.

    ``model`` is a model object or anything :func:`~tl_logitlens.load_model` takes. A masked LM gets
    a :class:`MaskedReportData` (see :func:`compute_masked_report`), a causal LM a :class:`ReportData`.
    ``lens``: None (the logit lens) or a lens object, passed to the analyses that read sites.
    ``mask_positions``: masked LMs only, where to put the hole in prompts without a mask token.
    """
    model = load_model(model)
    prompts = _as_prompts(prompts)
    if _compat.is_encoder(model):
        if versus is not None:
            raise ValueError(
                "the logit difference and its attribution are for causal LMs; a masked-LM report takes a "
                "target only (drop versus)"
            )
        if sites != "resid_pre" or norm != "recompute" or lens is not None:
            raise ValueError(
                "a masked LM's lens reads every block's input through its own MLM head: sites, norm and lens "
                "do not apply; leave them at their defaults"
            )
        return compute_masked_report(
            model, prompts, target=target, top_k=top_k, mask_positions=mask_positions, progress=progress
        )
    if mask_positions is not None:
        raise ValueError("mask_positions is for masked LMs (BERT, RoBERTa); this model predicts the next token")
    if versus is not None and target is None:
        raise ValueError("a comparison token (versus) needs a target token too: give both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    target_text = _token_text(model, target, "target")
    versus_text = _token_text(model, versus, "versus")
    targets = [t for t in (target, versus) if t is not None] or None
    with_lens = _lens_kwargs(logit_lens, lens)
    parts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        parts.append(logit_lens(model, chunk, sites=sites, norm=norm, top_k=top_k, targets=targets, **with_lens))
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    result = LensResult.concat(parts)
    first = logit_lens(model, prompts[0], sites=sites, norm=norm, top_k=EVOLUTION_N, positions="last", **with_lens)
    evolution = logit_lens(
        model,
        prompts[0],
        sites=sites,
        norm=norm,
        top_k=EVOLUTION_N,
        positions="last",
        targets=first.top_ids[-1, 0, 0].tolist(),
        **with_lens,
    )
    diff = attribution = heads = None
    if versus is not None:
        diff = logit_diff(model, prompts, target, versus, sites=sites, norm=norm, **_lens_kwargs(logit_diff, lens))
        attribution = direct_logit_attribution(model, prompts, target, versus)
        heads = direct_logit_attribution(model, prompts, target, versus, unit="head")
    return ReportData(
        prompts=tuple(prompts),
        model_name=getattr(model.cfg, "model_name", ""),
        lens=result,
        evolution=evolution,
        target=target_text,
        versus=versus_text,
        logit_diff=diff,
        attribution=attribution,
        head_attribution=heads,
        sites=result.labels,
        norm=norm,
        top_k=top_k,
        lens_name=lens_name(lens),
    )


def _last_word_position(model: Any, prompt: str) -> tuple[int, str]:
    """The token position of the prompt's last word piece (letters or digits, not a special token)."""
    tok = model.tokenizer
    ids = tok(prompt)["input_ids"]
    special = set(getattr(tok, "all_special_ids", []) or [])
    shown = display_tokens(tok, ids)
    for pos in range(len(ids) - 1, -1, -1):
        if ids[pos] not in special and any(ch.isalnum() for ch in shown[pos]):
            return pos, shown[pos]
    raise ValueError(f"prompt {prompt!r} has no word to mask; put {tok.mask_token} where the hole should be")


@no_type_check
def compute_masked_report(
    model: Any,
    prompts: str | Sequence[str],
    *,
    target: str | int | None = None,
    top_k: int = 5,
    mask_positions: Any = None,
    n_sliding: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> MaskedReportData:
    """Run the masked-LM analyses a report shows (see :class:`MaskedReportData`).

    Each prompt's holes: the mask tokens in its text; in a prompt without one, ``mask_positions``
    (as :func:`~tl_logitlens.masked_lens` takes it) or, by default, its last word. The sliding mask
    runs on the first ``n_sliding`` prompts (it runs the model once per token).
    """
    model = load_model(model)
    prompts = _as_prompts(prompts)
    if isinstance(n_sliding, bool) or not isinstance(n_sliding, int) or n_sliding < 0:
        raise ValueError(f"n_sliding must be a non-negative int, got {n_sliding!r}")
    tok = model.tokenizer
    target_text = _token_text(model, target, "target")
    targets = None if target is None else [target]
    masked, profiles, notes = [], [], []
    for b, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {b} is a {type(prompt).__name__}; a masked-LM report takes text")
        if tok.mask_token and tok.mask_token in prompt:
            where, note = None, f"the {tok.mask_token} token(s) in the text"
        elif mask_positions is not None:
            where, note = mask_positions, f"mask_positions={mask_positions!r}"
        else:
            pos, word = _last_word_position(model, prompt)
            where, note = pos, f"no {tok.mask_token} in the text: its last word {visible_token(word)!r} (position {pos})"
        res = masked_lens(model, prompt, mask_positions=where, targets=targets, top_k=top_k)
        masked.append(res)
        # a hole the text already held has no original token: profile the top token instead
        known = bool((res.original_ids[res.valid] >= 0).all())
        profiles.append(depth_profile(res) if known else depth_profile(res, "max"))
        notes.append(note)
        if progress is not None:
            progress(b + 1, len(prompts))
    sliding = tuple(sliding_mask_lens(model, p) for p in prompts[:n_sliding])
    return MaskedReportData(
        prompts=tuple(prompts),
        model_name=getattr(model.cfg, "model_name", ""),
        masked=tuple(masked),
        profiles=tuple(profiles),
        sliding=sliding,
        sliding_profiles=tuple(depth_profile(s) for s in sliding),
        notes=tuple(notes),
        target=target_text,
        top_k=top_k,
        sites=masked[0].labels,
    )


# ------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; box-sizing: border-box; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
figure.figure { margin: 1.2em 0; max-width: 100%; overflow-x: auto; }
figure.figure figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; max-width: 60em; }
.tok { display: inline-block; font-family: monospace; white-space: pre; background: #eef3fa;
       border: 1px solid #c9d6ea; border-radius: 3px; padding: 0 3px; margin: 1px; }
.howto { background: #f7f7f4; border: 1px solid #e2e2da; border-radius: 4px; padding: 0.4em 1em;
         font-size: 0.92em; max-width: 60em; }
.howto dt { font-weight: 600; margin-top: 0.4em; } .howto dd { margin-left: 1.2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td code { white-space: pre-wrap; word-break: break-all; }
.note { color: #555; font-style: italic; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _tok(token: str) -> str:
    """A token as a boxed, visible span (``␣`` for a space, ``↵`` for a newline)."""
    return f'<span class="tok">{_e(visible_token(token))}</span>'


def _code(token: str) -> str:
    return f"<code>{_e(visible_token(token))}</code>"


def _figure_html(fig: Any, div_id: str, caption: str = "") -> str:
    """One figure as a ``<figure>`` with its caption; plotly.js is loaded once for the page."""
    from tl_logitlens.plotting.export import figure_div

    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="figure">{figure_div(fig, div_id)}{cap}</figure>'


def _fit_width(fig: Any) -> Any:
    """The figure no wider than :data:`FIGURE_MAX_WIDTH` (a figure with no width fills the column)."""
    width = fig.layout.width
    if width is not None and width > FIGURE_MAX_WIDTH:
        fig.update_layout(width=FIGURE_MAX_WIDTH)
    return fig


def _positions_fitting(build: Callable[[int], Any], n_positions: int) -> tuple[Any, int]:
    """``build(max_positions)`` with the most positions (at most ``HEATMAP_POSITIONS``) whose figure fits."""
    m = max(1, min(HEATMAP_POSITIONS, n_positions))
    fig = build(m)
    while m > 4 and (fig.layout.width or 0) > FIGURE_MAX_WIDTH:
        m -= 2 if m > 8 else 1
        fig = build(m)
    return _fit_width(fig), m


def _clip_note(shown: int, total: int) -> str:
    if shown >= total:
        return ""
    return (
        f" Only the last {shown} of the prompt's {total} positions are drawn, so the figure fits the page; "
        "the tables and the other figures use every position."
    )


def top_table_html(lens: LensResult, prompt: int) -> str:
    """The top-k tokens per site at the prompt's last token, as an HTML table (probabilities)."""
    col = int(lens.valid[prompt].sum()) - 1
    top = lens.top_tokens()
    probs = lens.top_probs[:, prompt, col].tolist()
    k = lens.top_ids.shape[-1]
    names = []
    if lens.target_ids is not None:
        names = display_tokens(lens.tokenizer, lens.target_ids[prompt, col])
    rows = []
    for s, label in enumerate(lens.labels):
        cells = "".join(f"<td>{_code(top[s][prompt][col][r])} {probs[s][r]:.3f}</td>" for r in range(k))
        cells += f'<td class="num">{float(lens.entropy[s, prompt, col]):.3f}</td>'
        for t in range(len(names)):
            cells += (
                f'<td class="num">{float(lens.target_logprobs[s, prompt, col, t].exp()):.4f}</td>'
                f'<td class="num">{int(lens.target_ranks[s, prompt, col, t])}</td>'
            )
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    header = f"<tr><th>site</th>{''.join(f'<th>top {r + 1}</th>' for r in range(k))}<th>entropy (nats)</th>"
    header += "".join(f"<th>P({_code(n)})</th><th>rank</th>" for n in names) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def masked_table_html(result: MaskedLensResult, prompt: int, hole: int) -> str:
    """The top-k tokens per site at one hole, with the entropy and the original token's probability and rank."""
    k = result.top_ids.shape[-1]
    orig = int(result.original_ids[prompt, hole])
    orig_name = display_tokens(result.tokenizer, [orig])[0] if orig >= 0 else None
    rows = []
    for s, label in enumerate(result.labels):
        toks = display_tokens(result.tokenizer, result.top_ids[s, prompt, hole])
        probs = result.top_logprobs[s, prompt, hole].exp().tolist()
        cells = "".join(f"<td>{_code(toks[r])} {probs[r]:.3f}</td>" for r in range(k))
        cells += f'<td class="num">{float(result.entropy[s, prompt, hole]):.3f}</td>'
        if orig_name is not None:
            cells += (
                f'<td class="num">{float(result.original_logprobs[s, prompt, hole].exp()):.4f}</td>'
                f'<td class="num">{int(result.original_ranks[s, prompt, hole])}</td>'
            )
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    header = f"<tr><th>site</th>{''.join(f'<th>top {r + 1}</th>' for r in range(k))}<th>entropy (nats)</th>"
    if orig_name is not None:
        header += f"<th>P({_code(orig_name)})</th><th>rank</th>"
    return f"<table>{header}</tr>{''.join(rows)}</table>"


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


def _check_plotly_js(plotly_js: object) -> str:
    if plotly_js not in PLOTLY_JS:
        raise ValueError(
            f"plotly_js={plotly_js!r} is not understood; use 'inline' (one self-contained file, works offline), "
            f"'cdn' (loads plotly.js from cdn.plot.ly: small, needs the internet) or 'directory' "
            f"(one shared {PLOTLY_JS_FILE} beside the report)"
        )
    return str(plotly_js)


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
        shared.write_text(source, encoding="utf-8")
    return f'<script charset="utf-8" src="{PLOTLY_JS_FILE}"></script>'


def _howto(data: AnyReportData) -> str:
    """The short "how to read this" box: what the site names and the settings mean."""
    items = [
        (
            "Sites",
            "<code>l_pre</code> is the residual stream entering block <i>l</i> (<code>0_pre</code>: the "
            "embeddings), <code>l_mid</code> after its attention, <code>l_post</code> after its MLP; "
            "<code>final_post</code> is the last block's output, the stream the unembedding reads. "
            "Rows go from the first layer (bottom of a heatmap) to the last.",
        ),
    ]
    if isinstance(data, MaskedReportData):
        items.append(
            (
                "The masked-LM lens",
                "Each site's state at a hole (a masked token) goes through the model's own MLM head, so "
                "<code>final_post</code> is the model's own prediction. A depth profile fits "
                "log-prob ≈ a + b·√layer; the <i>decision site</i> is the first from which the top token "
                "stays the final one. The sliding mask masks each token in turn.",
            )
        )
    else:
        items.append(
            (
                f"norm = {_e(data.norm)}",
                _e(NORM_VIEWS),
            )
        )
        items.append(
            (
                "Read positions",
                "A cell at input token <i>t</i> is the prediction for the token <i>after</i> t. Probabilities "
                "are of the whole vocabulary; entropy and KL are in nats; ranks count from 1.",
            )
        )
    body = "".join(f"<dt>{name}</dt><dd>{text}</dd>" for name, text in items)
    return f'<section class="howto"><h2>How to read this</h2><dl>{body}</dl></section>'


def _header(data: AnyReportData, title: str, extra: str) -> list[str]:
    from tl_logitlens import __version__

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_prompts = len(data.prompts)
    return [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">lens <b>{_e(data.lens_name)}</b> · model <b>{_e(data.model_name or "?")}</b> · '
        f"{extra}{len(data.sites)} sites ({_e(data.sites[0])} … {_e(data.sites[-1])}) · {n_prompts} prompt(s) · "
        f"top-k {data.top_k}"
        + (f" · target {_tok(data.target)}" if data.target else "")
        + (f" versus {_tok(data.versus)}" if getattr(data, "versus", None) else "")
        + f" · tl_logitlens {_e(__version__)} · {when}</p>",
    ]


def _prompts_html(data: AnyReportData, shown: list[int], str_tokens: Sequence[Sequence[str]], extra: str) -> list[str]:
    parts = ["<h2>Prompts and tokens</h2>"]
    for b in shown:
        toks = "".join(_tok(t) for t in str_tokens[b])
        parts.append(f"<p><b>Prompt {b}</b>: {_e(data.prompts[b])}</p><p>{toks}</p>")
    n_prompts = len(data.prompts)
    if n_prompts > len(shown):
        parts.append(
            f'<p class="note">{n_prompts - len(shown)} more prompt(s) are not drawn one by one; {extra}</p>'
        )
    return parts


def _causal_sections(data: ReportData, shown: list[int]) -> tuple[list[str], list[tuple[str, str, Any]], list[str]]:
    from tl_logitlens.plotting import (
        component_bars_figure,
        head_grid_figure,
        lens_heatmap,
        logit_diff_figure,
        target_trajectory,
        text_heatmap,
        top_token_evolution,
    )
    from tl_logitlens.plotting.entropy import entropy_kl_figure

    lens = data.lens
    n_prompts = len(data.prompts)
    intro = _prompts_html(
        data, shown, lens.str_tokens, "they are in the entropy/KL, trajectory and logit-difference figures."
    )
    figures: list[tuple[str, str, Any]] = []
    for b in shown:
        n_cols = int(lens.valid[b].sum())
        fig, m = _positions_fitting(lambda m, b=b: lens_heatmap(lens, prompt=b, max_positions=m), n_cols)
        figures.append(
            (
                f"Logit lens, prompt {b}",
                "Rows are sites (first layer at the bottom), columns the input tokens. Each cell is the token "
                "the lens predicts <i>after</i> its column's token at that site; its colour is that token's "
                "probability. Hover a cell for its top-k." + _clip_note(m, n_cols),
                fig,
            )
        )
    n0 = int(lens.valid[0].sum())
    fig, m = _positions_fitting(lambda m: text_heatmap(lens, prompt=0, max_positions=m), n0)
    figures.append(
        (
            "Text view, prompt 0",
            "The same predictions laid out as text: under each input token, every site's top token, shaded "
            "by its probability." + _clip_note(m, n0),
            fig,
        )
    )
    rows = lens.valid.reshape(-1)
    entropy = lens.entropy.reshape(len(lens.labels), -1)
    kl = lens.kl_to_final.reshape(len(lens.labels), -1)
    last = torch.zeros_like(lens.valid)
    last[torch.arange(lens.valid.shape[0]), lens.valid.sum(1) - 1] = True
    figures.append(
        (
            "Entropy and KL to the final layer",
            "How uncertain the lens is at each site (entropy of its distribution) and how far it is from the "
            "model's output (KL(final ‖ site), 0 at final_post), in nats: the mean over every position of every "
            "prompt, and over each prompt's last token.",
            entropy_kl_figure(
                lens.labels, entropy, kl,
                [("every position", rows), ("last token", last.reshape(-1))],
                f"Entropy and KL(final ‖ site), {n_prompts} prompt(s)",
            ),
        )
    )
    figures.append(
        (
            "The final layer's top tokens across layers (prompt 0, last token)",
            f"The {EVOLUTION_N} tokens the model finally ranks highest after prompt 0's last token, and their "
            "probability at every site: where each one rises.",
            _fit_width(top_token_evolution(data.evolution, n=EVOLUTION_N)),
        )
    )
    if lens.target_ids is not None:
        figures.append(
            (
                "Targets across layers",
                "The log-prob (nats) of each target token at the last token of every prompt, by site: the mean, "
                "and one faint line per prompt.",
                _fit_width(target_trajectory(lens)),
            )
        )
        figures.append(
            (
                "Target rank across layers",
                "The targets' rank over the whole vocabulary (1 = the top token; log axis) by site.",
                _fit_width(target_trajectory(lens, metric="rank")),
            )
        )
    if data.logit_diff is not None:
        figures.append(
            (
                "Logit difference",
                f"logit({_e(data.target)}) − logit({_e(data.versus)}) at each prompt's last token, by site, read "
                f"with norm={_e(data.norm)}; at final_post it is the model's own logit difference.",
                _fit_width(logit_diff_figure(data.logit_diff, per_prompt=n_prompts <= 30)),
            )
        )
    if data.attribution is not None:
        figures.append(
            (
                "Direct logit attribution by component",
                "How much each component (embeddings, each attention layer and MLP, biases) writes directly "
                "along the target − versus direction (mean over prompts); the bars add up to the total.",
                _fit_width(component_bars_figure(data.attribution)),
            )
        )
    if data.head_attribution is not None:
        figures.append(
            (
                "Direct logit attribution by head",
                "The same split into attention heads (layer × head), centred on zero: red pushes towards the "
                "target, blue towards the comparison token.",
                _fit_width(head_grid_figure(data.head_attribution)),
            )
        )
    tables = ["<h2>Tables: top tokens per layer at the last token</h2>"]
    for b in shown:
        tables.append(f"<h3>Prompt {b}, after {_tok(lens.str_tokens[b][-1])}</h3>")
        tables.append(top_table_html(lens, b))
    return intro, figures, tables


def _masked_sections(data: MaskedReportData, shown: list[int]) -> tuple[list[str], list[tuple[str, str, Any]], list[str]]:
    from tl_logitlens.plotting import profile_figure, profile_heatmaps, sliding_text_heatmap
    from tl_logitlens.plotting.entropy import entropy_kl_figure
    from tl_logitlens.plotting.masked import masked_topk_figure

    str_tokens = [m.str_tokens[0] for m in data.masked]
    intro = _prompts_html(data, shown, str_tokens, "they are in the entropy/KL figure.")
    for b in shown:
        intro.append(f'<p class="note">Prompt {b}, holes: {_e(data.notes[b])}.</p>')
    figures: list[tuple[str, str, Any]] = []
    for b in shown:
        res, prof = data.masked[b], data.profiles[b]
        n_holes = int(res.valid[0].sum())
        for j in range(min(n_holes, MASKED_HOLES_SHOWN)):
            figures.append(
                (
                    f"Masked lens, prompt {b}, hole {j}",
                    "Each site's top tokens for the hole, read through the MLM head (rows: sites, first layer at "
                    "the bottom; columns: rank); colour is the probability.",
                    _fit_width(masked_topk_figure(res, prompt=0, hole=j)),
                )
            )
            figures.append(
                (
                    f"Depth profile, prompt {b}, hole {j}",
                    f"The log-prob (nats) of the {'top token' if prof.target == 'max' else _e(prof.target)} at each depth, with its fit a + b·√layer"
                    + (", the top token's log-prob" if prof.target != "max" else "")
                    + ", the tokens that peak highest, and the decision site (dotted): the first site from "
                    "which the top token stays the final one.",
                    _fit_width(profile_figure(prof, row=j)),
                )
            )
    for i in [b for b in shown if b < len(data.sliding)]:
        sl = data.sliding[i]
        figures.append(
            (
                f"Sliding mask, prompt {i}",
                "Every token masked in turn (columns) and read at every site (rows): each cell is the predicted "
                "token, coloured by the log-prob (nats) of the token that stood there.",
                _fit_width(sliding_text_heatmap(sl)),
            )
        )
        figures.append(
            (
                f"Depth profiles of the sliding mask, prompt {i}",
                "Per masked token: the original token's and the top token's log-prob by site, and the slopes "
                "of their √layer fits (nats per √layer).",
                _fit_width(profile_heatmaps(data.sliding_profiles[i])),
            )
        )
    n_sites = len(data.sites)
    entropy = torch.cat([m.entropy.reshape(n_sites, -1) for m in data.masked], dim=1)
    kl = torch.cat([m.kl_to_final.reshape(n_sites, -1) for m in data.masked], dim=1)
    valid = torch.cat([m.valid.reshape(-1) for m in data.masked])
    figures.append(
        (
            "Entropy and KL to the final layer",
            "At the holes of every prompt, the mean entropy of each site's distribution and its KL(final ‖ "
            "site), in nats (0 at final_post).",
            entropy_kl_figure(
                data.sites, entropy, kl, [("every hole", valid)], f"Entropy and KL(final ‖ site), {len(data.prompts)} prompt(s)"
            ),
        )
    )
    tables = ["<h2>Tables: top tokens per layer at each hole</h2>"]
    for b in shown:
        res = data.masked[b]
        for j in range(min(int(res.valid[0].sum()), MASKED_HOLES_SHOWN)):
            tables.append(f"<h3>Prompt {b}, hole at position {int(res.mask_positions[0, j])}</h3>")
            tables.append(masked_table_html(res, 0, j))
    return intro, figures, tables


def write_report(
    data: AnyReportData,
    out: str | os.PathLike = "logit_lens_report.html",
    *,
    max_prompts: int = 3,
    title: str | None = None,
    plotly_js: str = "inline",
) -> Path:
    """Write the figures and tables of ``data`` to one HTML file; return its path.

    ``plotly_js``: ``"inline"`` (the default) puts plotly.js in the file, which then opens offline
    on its own (about 5 MB); ``"cdn"`` loads it from cdn.plot.ly (a few hundred kB, needs the
    internet); ``"directory"`` writes one ``plotly.min.js`` beside the report that every report in the
    folder shares. Heatmaps and tables are drawn for the first ``max_prompts`` prompts (a note says
    how many were left out); trajectories, entropy/KL, logit differences and attributions use every prompt.
    """
    out = check_out(out)
    plotly_js = _check_plotly_js(plotly_js)
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise ValueError(f"max_prompts must be a positive int, got {max_prompts!r}")
    shown = list(range(min(len(data.prompts), max_prompts)))
    if isinstance(data, MaskedReportData):
        kind = "Masked-LM lens report"
        intro, figures, tables = _masked_sections(data, shown)
        extra = ""
    elif isinstance(data, ReportData):
        kind = "Logit lens report" if data.lens_name == "logit lens" else f"Lens report ({data.lens_name})"
        intro, figures, tables = _causal_sections(data, shown)
        extra = f"norm <b>{_e(data.norm)}</b> · "
    else:
        raise TypeError(f"write_report takes the ReportData or MaskedReportData of compute_report, not {type(data).__name__}")
    title = title or f"{kind}{' — ' + data.model_name if data.model_name else ''}"
    parts = _header(data, title, extra) + [_howto(data)] + intro + ["<h2>Figures</h2>"]
    for i, (heading, caption, fig) in enumerate(figures):
        parts.append(f"<h3>{_e(heading)}</h3>")
        parts.append(_figure_html(fig, f"figure-{i}", caption))
    parts += tables
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        f"{plotly_js_html(plotly_js, out)}</head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    out.write_text(page, encoding="utf-8")
    return out


@no_type_check  # checks its own arguments (see lens.logit_lens)
def report(
    model: Any,
    prompts: str | Sequence[str],
    *,
    target: str | int | None = None,
    versus: str | int | None = None,
    top_k: int = 5,
    sites: str | Sequence[str] = "resid_pre",
    norm: str = "recompute",
    out: str | os.PathLike = "logit_lens_report.html",
    max_prompts: int = 3,
    title: str | None = None,
    plotly_js: str = "inline",
    lens: Any = None,
    mask_positions: Any = None,
) -> Path:
    """Run the lens on ``prompts`` and write one HTML report; return its path.

    A causal LM's report holds the prompts and their tokens, the lens heatmap and text view, entropy
    and KL by site, the final top tokens' probabilities across layers, with ``target`` the targets'
    log-prob and rank across layers, with ``versus`` too the logit difference ``target - versus``
    across layers and its direct logit attribution (components and heads), and the top-k tables.
    A masked LM's report (BERT, RoBERTa) holds the masked lens at each prompt's holes (its mask
    tokens, else ``mask_positions``, else its last word), their depth profiles, the sliding mask,
    entropy and KL, and the top-k tables.

    ``plotly_js``: ``"inline"`` (default: one self-contained file that opens offline), ``"cdn"`` or
    ``"directory"`` (see :func:`write_report`). ``lens``: None for the logit lens, or a lens object
    for the analyses that take one; the report names it. ``model``: a model object or anything
    :func:`~tl_logitlens.load_model` takes (``"demo"``, ``"demo-bert"``, a checkpoint folder, a
    TransformerLens name).

    Raises:
        ValueError: a bad ``out`` (not .html, a folder, a missing or unwritable folder) or ``plotly_js``,
            checked before anything is computed; bad analysis arguments.
    """
    check_out(out)
    _check_plotly_js(plotly_js)
    data = compute_report(
        model, prompts, target=target, versus=versus, top_k=top_k, sites=sites, norm=norm, lens=lens,
        mask_positions=mask_positions,
    )
    return write_report(data, out, max_prompts=max_prompts, title=title, plotly_js=plotly_js)
