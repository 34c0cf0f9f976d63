"""The report's HTML pieces that are not figures: escaped text, boxed tokens, the prompts and the top-k tables."""

from __future__ import annotations

import html
from collections.abc import Sequence

from tl_logitlens.analyses.lens_comparison import LensComparison
from tl_logitlens.analyses.masked import MaskedLensResult
from tl_logitlens.analyses.predictions import LensResult
from tl_logitlens.core.tokens import display_tokens, text_before, visible_token
from tl_logitlens.reporting.compute import AnyReportData, MaskedReportData, ReportData

MASKED_HOLES_SHOWN = 3  # holes per prompt drawn one by one in a masked-LM report


def escape(text: object) -> str:
    """``text`` as HTML text (``& < > " '`` escaped)."""
    return html.escape(str(text), quote=True)


def token_box(token: str) -> str:
    """A token as a boxed, visible span (``␣`` for a space, ``↵`` for a newline)."""
    return f'<span class="tok">{escape(visible_token(token))}</span>'


def _code(token: str) -> str:
    return f"<code>{escape(visible_token(token))}</code>"


def _topk_table(
    labels: Sequence[str],
    tokens: Sequence[Sequence[str]],
    probs: Sequence[Sequence[float]],
    entropy: Sequence[float],
    tracked: Sequence[tuple[str, Sequence[float], Sequence[int]]],
) -> str:
    """One row per site: its top-k tokens with their probabilities, its entropy (nats), and for each
    tracked token (name, probability per site, rank per site) two more columns."""
    k = len(tokens[0])
    rows = []
    for s, label in enumerate(labels):
        cells = "".join(f"<td>{_code(tokens[s][r])} {probs[s][r]:.3f}</td>" for r in range(k))
        cells += f'<td class="num">{entropy[s]:.3f}</td>'
        cells += "".join(f'<td class="num">{p[s]:.4f}</td><td class="num">{rank[s]}</td>' for _, p, rank in tracked)
        rows.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    header = f"<tr><th>site</th>{''.join(f'<th>top {r + 1}</th>' for r in range(k))}<th>entropy (nats)</th>"
    header += "".join(f"<th>P({_code(name)})</th><th>rank</th>" for name, _, _ in tracked) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def top_table_html(lens: LensResult, prompt: int) -> str:
    """The top-k tokens per site at the prompt's last token, as an HTML table (probabilities)."""
    col = int(lens.valid[prompt].sum()) - 1
    top = lens.top_tokens()
    tracked = []
    if lens.target_ids is not None:
        names = lens.target_labels(lens.target_ids[prompt, col])
        probs = lens.target_logprobs[:, prompt, col].exp().T.tolist()
        ranks = lens.target_ranks[:, prompt, col].T.tolist()
        tracked = list(zip(names, probs, ranks))
    return _topk_table(
        lens.labels,
        [top[s][prompt][col] for s in range(len(lens.labels))],
        lens.top_probs[:, prompt, col].tolist(),
        lens.entropy[:, prompt, col].tolist(),
        tracked,
    )


def masked_table_html(result: MaskedLensResult, prompt: int, hole: int) -> str:
    """The top-k tokens per site at one hole, with the entropy and the original token's probability and rank."""
    orig = int(result.original_ids[prompt, hole])
    tracked = []
    if orig >= 0:
        probs = result.original_logprobs[:, prompt, hole].exp().tolist()
        tracked = [(display_tokens(result.tokenizer, [orig])[0], probs, result.original_ranks[:, prompt, hole].tolist())]
    return _topk_table(
        result.labels,
        [display_tokens(result.tokenizer, result.top_ids[s, prompt, hole]) for s in range(len(result.labels))],
        result.top_logprobs[:, prompt, hole].exp().tolist(),
        result.entropy[:, prompt, hole].tolist(),
        tracked,
    )


def prompts_html(data: AnyReportData, shown: list[int]) -> list[str]:
    """The prompts drawn one by one, as boxed tokens (and, for a masked LM, where its holes are)."""
    masked = isinstance(data, MaskedReportData)
    str_tokens = [m.str_tokens[0] for m in data.masked] if masked else data.lens.str_tokens
    parts = ["<h2>Prompts and tokens</h2>"]
    for b in shown:
        toks = "".join(token_box(t) for t in str_tokens[b])
        parts.append(f"<p><b>Prompt {b}</b>: {escape(data.prompts[b])}</p><p>{toks}</p>")
    n_prompts = len(data.prompts)
    if n_prompts > len(shown):
        where = "the entropy/KL figure" if masked else "the entropy/KL, trajectory and logit-difference figures"
        parts.append(
            f'<p class="note">{n_prompts - len(shown)} more prompt(s) are not drawn one by one; they are in {where}.</p>'
        )
    if masked:
        parts += [f'<p class="note">Prompt {b}, holes: {escape(data.notes[b])}.</p>' for b in shown]
    return parts


def tables_html(data: AnyReportData, shown: list[int]) -> list[str]:
    """The top-k tables: per shown prompt at its last token (causal LM), or at each drawn hole (masked LM)."""
    if isinstance(data, ReportData):
        parts = ["<h2>Tables: top tokens per layer at the last token</h2>"]
        for b in shown:
            quote = escape(f"'{text_before(data.lens, b)}'")
            parts.append(f"<h3>Prompt {b}, after {quote}</h3>")
            parts.append(top_table_html(data.lens, b))
        return parts
    parts = ["<h2>Tables: top tokens per layer at each hole</h2>"]
    for b in shown:
        res = data.masked[b]
        for j in range(min(int(res.valid[0].sum()), MASKED_HOLES_SHOWN)):
            parts.append(f"<h3>Prompt {b}, hole at position {int(res.mask_positions[0, j])}</h3>")
            parts.append(masked_table_html(res, 0, j))
    return parts


def comparison_table_html(comparison: LensComparison) -> str:
    """Per site, for each lens: the mean ``KL(final ‖ site)`` (nats) and top-1 agreement with the final
    layer over every read position of every prompt (:meth:`LensComparison.site_table`)."""
    table = comparison.site_table()
    lenses = list(comparison.lenses)
    head = "<tr><th rowspan='2'>site</th>" + "".join(f"<th colspan='2'>{escape(name)}</th>" for name in lenses) + "</tr>"
    head += "<tr>" + "<th>KL (nats)</th><th>top-1 agreement</th>" * len(lenses) + "</tr>"
    rows = []
    for site in comparison.labels:
        part = table[table.site == site].set_index("lens")
        cells = "".join(
            f'<td class="num">{part.loc[name, "kl_to_final"]:.3f}</td>'
            f'<td class="num">{part.loc[name, "top1_agreement"]:.1%}</td>'
            for name in lenses
        )
        rows.append(f"<tr><th>{escape(site)}</th>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"
