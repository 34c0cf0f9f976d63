"""One self-contained HTML report of the logit lens on some prompts (plotly.js inlined, works offline).

:func:`report` runs the analyses (:func:`~tl_logitlens.logit_lens`, and with a comparison token
:func:`~tl_logitlens.logit_diff` and :func:`~tl_logitlens.direct_logit_attribution`) and writes
the figures and tables; :func:`compute_report` and :func:`write_report` are the two halves, for
callers (the command line) that also want the results.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, no_type_check

import torch

from tl_logitlens.attribution import AttributionResult, direct_logit_attribution
from tl_logitlens.directions import DirectionResult, logit_diff
from tl_logitlens.inputs import resolve_token
from tl_logitlens.lens import LensResult, logit_lens
from tl_logitlens.models import load_model
from tl_logitlens.tokens import display_tokens

EVOLUTION_N = 10


@dataclass(frozen=True)
class ReportData:
    """What a report shows: the lens on every prompt and, given a comparison token, its attributions.

    - ``lens``: :func:`logit_lens` over all prompts and positions (``targets``: the target and the
      comparison token, when given).
    - ``evolution``: the lens on prompt 0's last token with ``targets`` = the final layer's top
      ``EVOLUTION_N`` tokens there (for :func:`~tl_logitlens.plotting.top_token_evolution`).
    - ``logit_diff``, ``attribution`` (components), ``head_attribution``: at each prompt's last
      token, for ``target`` minus ``versus``; None without ``versus``.
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
) -> ReportData:
    """Run every analysis a report shows. ``progress(done, total)`` is called after each batch of prompts.

    ``model`` is a model object or anything :func:`~tl_logitlens.load_model` takes.
    """
    model = load_model(model)
    prompts = _as_prompts(prompts)
    if versus is not None and target is None:
        raise ValueError("a comparison token (versus) needs a target token too: give both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    target_text = _token_text(model, target, "target")
    versus_text = _token_text(model, versus, "versus")
    targets = [t for t in (target, versus) if t is not None] or None
    parts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        parts.append(logit_lens(model, chunk, sites=sites, norm=norm, top_k=top_k, targets=targets))
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    lens = concat_lens(parts)
    first = logit_lens(model, prompts[0], sites=sites, norm=norm, top_k=EVOLUTION_N, positions="last")
    evolution = logit_lens(
        model,
        prompts[0],
        sites=sites,
        norm=norm,
        top_k=EVOLUTION_N,
        positions="last",
        targets=first.top_ids[-1, 0, 0].tolist(),
    )
    diff = attribution = heads = None
    if versus is not None:
        diff = logit_diff(model, prompts, target, versus, sites=sites, norm=norm)
        attribution = direct_logit_attribution(model, prompts, target, versus)
        heads = direct_logit_attribution(model, prompts, target, versus, unit="head")
    return ReportData(
        prompts=tuple(prompts),
        model_name=getattr(model.cfg, "model_name", ""),
        lens=lens,
        evolution=evolution,
        target=target_text,
        versus=versus_text,
        logit_diff=diff,
        attribution=attribution,
        head_attribution=heads,
        sites=lens.labels,
        norm=norm,
        top_k=top_k,
    )


def concat_lens(parts: Sequence[LensResult]) -> LensResult:
    """Lens results of disjoint batches (same sites, settings, targets) joined along the batch.

    Shorter batches are padded along ``pos`` (and ``seq``) exactly as ``logit_lens`` pads a batch:
    ``valid`` False, ids -1, values NaN, ranks -1.
    """
    if len(parts) == 1:
        return parts[0]
    width = max(p.positions.shape[1] for p in parts)
    seq = max(p.tokens.shape[1] for p in parts)

    def pad(t: torch.Tensor | None, dim: int, size: int, fill: float | int) -> torch.Tensor | None:
        if t is None:
            return None
        extra = size - t.shape[dim]
        if extra == 0:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)

    def join(name: str, batch_dim: int, fill: float | int) -> torch.Tensor | None:
        """Pad each part's ``pos`` dim (right after ``batch``) to the widest, then concatenate."""
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([pad(getattr(p, name), batch_dim + 1, width, fill) for p in parts], dim=batch_dim)

    positions = []
    for p in parts:
        n = p.positions.shape[1]
        extra = torch.arange(n, width, device=p.positions.device).expand(p.positions.shape[0], -1)
        positions.append(torch.cat([p.positions, extra], dim=1))
    nan = float("nan")
    return replace(
        parts[0],
        tokens=torch.cat([pad(p.tokens, 1, seq, 0) for p in parts]),
        str_tokens=tuple(s for p in parts for s in p.str_tokens),
        positions=torch.cat(positions),
        valid=torch.cat([pad(p.valid, 1, width, False) for p in parts]),
        top_ids=join("top_ids", 1, -1),
        top_logprobs=join("top_logprobs", 1, nan),
        entropy=join("entropy", 1, nan),
        kl_to_final=join("kl_to_final", 1, nan),
        next_ids=join("next_ids", 0, -1),
        next_logprobs=join("next_logprobs", 1, nan),
        next_ranks=join("next_ranks", 1, -1),
        target_ids=join("target_ids", 0, -1),
        target_logprobs=join("target_logprobs", 1, nan),
        target_ranks=join("target_ranks", 1, -1),
    )



# ------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; } .figure { overflow-x: auto; margin: 1em 0; }
.tok { display: inline-block; font-family: monospace; white-space: pre; background: #eef3fa;
       border: 1px solid #c9d6ea; border-radius: 3px; padding: 0 3px; margin: 1px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td code { white-space: pre; } .note { color: #a33; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _tok(token: str) -> str:
    shown = token.replace("\n", "↵").replace("\t", "⇥")
    return f'<span class="tok">{_e(shown)}</span>'


def _figure_html(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    body = pio.to_html(
        fig, full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False}
    )
    return f'<div class="figure">{body}</div>'


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
        cells = "".join(
            f"<td><code>{_e(repr(top[s][prompt][col][r]))}</code> {probs[s][r]:.3f}</td>" for r in range(k)
        )
        cells += f'<td class="num">{float(lens.entropy[s, prompt, col]):.3f}</td>'
        for t in range(len(names)):
            cells += (
                f'<td class="num">{float(lens.target_logprobs[s, prompt, col, t].exp()):.4f}</td>'
                f'<td class="num">{int(lens.target_ranks[s, prompt, col, t])}</td>'
            )
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    header = f"<tr><th>site</th>{''.join(f'<th>top {r + 1}</th>' for r in range(k))}<th>entropy (nats)</th>"
    header += "".join(f"<th>P({_e(repr(n))})</th><th>rank</th>" for n in names) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def check_out(out: str | os.PathLike) -> Path:
    """The report's path, checked before any work: an ``.html`` name in an existing folder."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the report is HTML: give a file name ending in .html, not {str(out)!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {str(out.parent)!r} does not exist; create it or pick another --out")
    return out


def write_report(
    data: ReportData,
    out: str | os.PathLike = "logit_lens_report.html",
    *,
    max_prompts: int = 3,
    title: str | None = None,
) -> Path:
    """Write the figures and tables of ``data`` to one self-contained HTML file; return its path.

    plotly.js is inlined once, so the file opens offline. Heatmaps and tables are drawn for the
    first ``max_prompts`` prompts (a note says how many were left out); trajectories, logit
    differences and attributions use every prompt.
    """
    import plotly.offline

    from tl_logitlens import __version__
    from tl_logitlens.plotting import (
        component_bars_figure,
        head_grid_figure,
        lens_heatmap,
        logit_diff_figure,
        target_trajectory,
        text_heatmap,
        top_token_evolution,
    )

    out = check_out(out)
    lens = data.lens
    n_prompts = len(data.prompts)
    shown = list(range(min(n_prompts, max_prompts)))
    title = title or f"Logit lens report{' — ' + data.model_name if data.model_name else ''}"
    parts = [f"<h1>{_e(title)}</h1>"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(
        f'<p class="meta">model <b>{_e(data.model_name or "?")}</b> · norm <b>{_e(data.norm)}</b> · '
        f"{len(data.sites)} sites ({_e(data.sites[0])} … {_e(data.sites[-1])}) · {n_prompts} prompt(s) · "
        f"top-k {data.top_k}"
        + (f" · target {_tok(data.target)}" if data.target else "")
        + (f" versus {_tok(data.versus)}" if data.versus else "")
        + f" · tl_logitlens {_e(__version__)} · {when}</p>"
    )
    parts.append("<h2>Prompts and tokens</h2>")
    for b in shown:
        toks = "".join(_tok(t) for t in lens.str_tokens[b])
        parts.append(f"<p><b>Prompt {b}</b>: {_e(data.prompts[b])}</p><p>{toks}</p>")
    if n_prompts > len(shown):
        parts.append(
            f'<p class="note">{n_prompts - len(shown)} more prompt(s) are not drawn one by one; they are '
            "in the trajectory and logit-difference figures.</p>"
        )

    figures: list[tuple[str, str, Any]] = []
    for b in shown:
        figures.append(
            (
                f"Logit lens, prompt {b}",
                "Each cell: the top token a layer would predict after that input token; colour: its probability.",
                lens_heatmap(lens, prompt=b),
            )
        )
    figures.append(("Text view, prompt 0", "", text_heatmap(lens, prompt=0)))
    figures.append(
        (
            "The final layer's top tokens across layers (prompt 0, last token)",
            "",
            top_token_evolution(data.evolution, n=EVOLUTION_N),
        )
    )
    if lens.target_ids is not None:
        figures.append(("Targets across layers", "", target_trajectory(lens)))
        figures.append(("Target rank across layers", "", target_trajectory(lens, metric="rank")))
    if data.logit_diff is not None:
        figures.append(
            ("Logit difference", "", logit_diff_figure(data.logit_diff, per_prompt=n_prompts <= 30))
        )
    if data.attribution is not None:
        figures.append(("Direct logit attribution by component", "", component_bars_figure(data.attribution)))
    if data.head_attribution is not None:
        figures.append(("Direct logit attribution by head", "", head_grid_figure(data.head_attribution)))
    parts.append("<h2>Figures</h2>")
    for i, (heading, caption, fig) in enumerate(figures):
        parts.append(f"<h3>{_e(heading)}</h3>")
        if caption:
            parts.append(f"<p>{_e(caption)}</p>")
        parts.append(_figure_html(fig, f"figure-{i}"))

    parts.append("<h2>Tables: top tokens per layer at the last token</h2>")
    for b in shown:
        last = lens.str_tokens[b][-1]
        parts.append(f"<h3>Prompt {b}, after {_tok(last)}</h3>")
        parts.append(top_table_html(lens, b))

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
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
) -> Path:
    """Run the logit lens on ``prompts`` and write one self-contained HTML report; return its path.

    The report holds the prompts and their tokens, the lens heatmap and text view, the final top
    tokens' probabilities across layers, with ``target`` the targets' log-prob and rank across
    layers, with ``versus`` too the logit difference ``target - versus`` across layers and its
    direct logit attribution (components and heads), and the top-k tables. plotly.js is inlined:
    the file opens offline. ``model``: a model object or anything :func:`~tl_logitlens.load_model`
    takes (``"demo"``, a checkpoint folder, a TransformerLens name).
    """
    check_out(out)
    data = compute_report(model, prompts, target=target, versus=versus, top_k=top_k, sites=sites, norm=norm)
    return write_report(data, out, max_prompts=max_prompts, title=title)
