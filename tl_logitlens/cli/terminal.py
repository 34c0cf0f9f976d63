"""The command line's tables: they fit the terminal's width (80 columns and up), dropping or
abbreviating columns with a legend rather than wrapping tokens over several lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

TOKEN_CHARS = 10  # a token longer than this is cut with "…" in the terminal table
N_ATTRIBUTIONS = 8
WIDE = 110  # at least this many columns: evaluation tables show their intervals
TAIL_CHARS = 16  # terminal titles quote the end of the prompt: "after '…The dog was very'"
POSITIVE, NEGATIVE = "blue", "red"  # the package's signed-colour convention (plotting/_common.py) in ANSI


def new_table(title: str, width: int) -> Any:
    """A borderless rich table with a left-aligned title, at least as wide as its title allows."""
    return Table(
        title=Text(title),
        min_width=min(width, len(title)),
        box=None,
        header_style="bold",
        pad_edge=False,
        title_justify="left",
    )


def legend_lines(legend: Sequence[str], width: int) -> list[str]:
    """The legend as lines of at most ``width`` columns, broken between its phrases (the parts of an
    entry separated by ``"; "``), never inside one; a phrase wider than ``width`` gets a line of its own."""
    lines: list[str] = []
    for entry in legend:
        line = ""
        for phrase in entry.split("; "):
            joined = f"{line}; {phrase}" if line else phrase
            if line and len(joined) > width:
                lines.append(line + ";")
                line = phrase
            else:
                line = joined
        lines.append(line)
    return lines


def _visible(token: str) -> str:
    from tl_logitlens.core.tokens import visible_token

    text = visible_token(token)
    return text if len(text) <= TOKEN_CHARS else text[: TOKEN_CHARS - 1] + "…"


def prompt_lines(prompts: Sequence[str], shown: int) -> list[str]:
    """The prompts as the terminal prints them above the tables: ``prompt: ...`` (``prompt 0: ...``
    for several, the first ``shown`` of them), whitespace other than spaces drawn."""
    from tl_logitlens.core.tokens import visible_token

    def text(p: str) -> str:
        return "".join(ch if ch == " " else visible_token(ch) for ch in p)

    if len(prompts) == 1:
        return [f"prompt: {text(prompts[0])}"]
    return [f"prompt {b}: {text(p)}" for b, p in enumerate(prompts[:shown])]


def _fit(widths: Sequence[int], fixed: int, available: int) -> int:
    """How many of the optional columns (``widths``, in order) fit beside ``fixed`` characters."""
    used, n = fixed, 0
    for w in widths:
        if used + 2 + w > available:
            break
        used += 2 + w
        n += 1
    return n


def _top_table(
    title: str,
    labels: Sequence[str],
    tops: Sequence[Sequence[tuple[str, float]]],
    entropy: Sequence[float],
    targets: Sequence[tuple[str, Sequence[float], Sequence[int]]],
    width: int,
) -> tuple[Any, list[str]]:
    """A table of the top tokens per site that fits ``width`` columns, and its legend lines.

    ``tops[s]`` are (token, probability) pairs, best first; ``targets`` are (name, probability per
    site, rank per site). Top-k columns are dropped from the right until the table fits.
    """
    cells = [[f"{_visible(tok)} {p:.2f}" for tok, p in row] for row in tops]
    k = len(cells[0]) if cells else 0
    top_w = [max(len(f"top {r + 1}"), *(len(c[r]) for c in cells)) for r in range(k)]
    label_w = max(5, *(len(lab) for lab in labels))
    fixed = label_w + 2 + 5  # the site and H columns
    target_cols = []
    for name, _, ranks in targets:
        head = f"P({_visible(name)})"
        rank_w = max(2, *(len(str(r)) for r in ranks))
        target_cols.append((head, rank_w))
        fixed += 2 + max(len(head), 5) + 2 + rank_w
    n_top = max(1, _fit(top_w, fixed, width))
    table = new_table(title, width)
    table.add_column("layer", style="bold", no_wrap=True)
    for r in range(n_top):
        table.add_column(f"top {r + 1}", no_wrap=True, overflow="ellipsis")
    table.add_column("H", justify="right", no_wrap=True)
    for head, _ in target_cols:
        table.add_column(Text(head), justify="right", no_wrap=True)
        table.add_column("rk", justify="right", no_wrap=True)
    for s, label in enumerate(labels):
        row: list[Any] = [label, *(Text(c) for c in cells[s][:n_top]), f"{entropy[s]:.2f}"]
        for _, probs, ranks in targets:
            row += [f"{probs[s]:.3f}", str(ranks[s])]
        table.add_row(*row)
    legend = ["H: entropy (nats); ␣ is a space, ↵ a newline"]
    if targets:
        legend.append("P(t), rk: the probability and rank of token t")
    if n_top < k:
        legend.append(f"top {n_top} of {k} shown to fit {width} columns; all of them in --csv/--json")
    return table, legend


def lens_table(data: Any, prompt: int, width: int) -> tuple[Any, list[str]]:
    """The causal lens at prompt ``prompt``'s last token."""
    from tl_logitlens.core.tokens import display_tokens, text_before
    from tl_logitlens.lenses import LOGIT_LENS

    lens = data.lens
    col = int(lens.valid[prompt].sum()) - 1
    top = lens.top_tokens()
    probs = lens.top_probs[:, prompt, col].tolist()
    k = lens.top_ids.shape[-1]
    tops = [[(top[s][prompt][col][r], probs[s][r]) for r in range(k)] for s in range(len(lens.labels))]
    targets = []
    if lens.target_ids is not None:
        names = display_tokens(lens.tokenizer, lens.target_ids[prompt, col])
        for t, name in enumerate(names):
            targets.append(
                (
                    name,
                    lens.target_logprobs[:, prompt, col, t].exp().tolist(),
                    lens.target_ranks[:, prompt, col, t].tolist(),
                )
            )
    which = "" if data.lens_name == LOGIT_LENS.name else f", {data.lens_name}"
    title = f"Top tokens per layer after '{text_before(lens, prompt, chars=TAIL_CHARS)}' (prompt {prompt}{which})"
    return _top_table(title, lens.labels, tops, lens.entropy[:, prompt, col].tolist(), targets, width)


def comparison_table(cmp: Any, prompt: int, width: int) -> tuple[Any, list[str]]:
    """Several lenses at prompt ``prompt``'s last token, compactly: per site (rows) and lens (columns)
    the lens's top-1 token and its probability, and whether it is the model's final top-1 token."""
    from tl_logitlens.core.tokens import text_before

    first = cmp.results[0]
    col = int(cmp.valid[prompt].sum()) - 1
    tops = [r.top_tokens() for r in cmp.results]
    probs = cmp.top_logprobs[:, :, prompt, col, 0].exp().tolist()
    agree = cmp.top1_agreement[:, :, prompt, col].tolist()
    title = f"{len(cmp.lenses)} lenses, top token per layer after '{text_before(first, prompt, chars=TAIL_CHARS)}'"
    table = new_table(title, width)
    table.add_column("layer", style="bold", no_wrap=True)
    for name in cmp.lenses:
        table.add_column(Text(name), no_wrap=True, overflow="ellipsis")
    for s, label in enumerate(cmp.labels):
        cells = []
        for k in range(len(cmp.lenses)):
            mark = "" if agree[k][s] == 1.0 else " ·"
            cells.append(Text(f"{_visible(tops[k][s][prompt][col][0])} {probs[k][s]:.2f}{mark}"))
        table.add_row(label, *cells)
    legend = ["·: not the model's final top token"] if any(a != 1.0 for row in agree for a in row) else []
    return table, legend


def masked_table(data: Any, width: int) -> tuple[Any, list[str]]:
    """The masked lens at prompt 0's first hole."""
    from tl_logitlens.core.tokens import display_tokens

    res = data.masked[0]
    tops = []
    for s in range(len(res.labels)):
        ids = res.top_ids[s, 0, 0]
        names = display_tokens(res.tokenizer, ids.clamp(min=0))
        tops.append(list(zip(names, res.top_logprobs[s, 0, 0].exp().tolist())))
    title = f"Top tokens per layer at the first hole of prompt 0 ({data.lens_name})"
    return _top_table(title, res.labels, tops, res.entropy[:, 0, 0].tolist(), [], width)


def _signed_bar(v: float, scale: float, half: int) -> Text:
    """``v`` as a bar from a zero axis ``│``: right (blue) when positive, left (red) when negative."""
    n = min(half, round(abs(v) / scale * half)) if scale > 0 else 0
    left = " " * half if v >= 0 else " " * (half - n) + "█" * n
    right = "█" * n + " " * (half - n) if v >= 0 else " " * half
    return Text.assemble((left, NEGATIVE), ("│", "dim"), (right, POSITIVE))


def versus_tables(data: Any, width: int) -> list[Any]:
    """With --versus: the logit difference per layer at prompt 0's last token (and the mean over
    prompts) with a bar either side of zero, then the components and, in a table of their own, the
    heads with the largest direct logit attribution."""
    from tl_logitlens.core.tokens import text_before

    out = []
    ld = data.logit_diff
    values = ld.values[:, 0, -1, 0].tolist()
    many = ld.values.shape[1] > 1
    target, versus = f"'{_visible(data.target)}'", f"'{_visible(data.versus)}'"
    pair = f"{target} − {versus}"
    title = f"Logit difference {pair} per layer after '{text_before(data.lens, 0, chars=TAIL_CHARS)}' (logits)"
    table = new_table(title, width)
    table.add_column("layer", style="bold", no_wrap=True)
    table.add_column("prompt 0", justify="right", no_wrap=True)
    if many:
        table.add_column(f"mean of {ld.values.shape[1]} [{ld.confidence:.0%} CI]", justify="right", no_wrap=True)
    half = max(4, min(15, (width - 12 - 10 - (28 if many else 0) - 1) // 2))
    table.add_column(Text(f"{'−':<{half}}0{'+':>{half}}"), no_wrap=True)
    scale = max((abs(v) for v in values), default=1.0) or 1.0
    for s, label in enumerate(ld.labels):
        v = values[s]
        row: list[Any] = [label, f"{v:+.3f}"]
        if many:
            m, lo, hi = (float(t[s, -1, 0]) for t in (ld.mean, ld.low, ld.high))
            row.append(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        table.add_row(*row, _signed_bar(v, scale, half))
    table.caption = Text(
        f"bars: right of 0 (+, {POSITIVE}) the layer favours {target}, left (−, {NEGATIVE}) {versus}", style="dim"
    )
    table.caption_justify = "left"
    out.append(table)
    for result, what, column in ((data.attribution, "components", "component"), (data.head_attribution, "heads", "head")):
        if result is None:
            continue
        top = result.top(N_ATTRIBUTIONS)  # a head result's top() is its heads
        att = new_table(f"Top {what} by direct logit attribution to {pair}", width)
        att.add_column("#", justify="right")
        att.add_column(column, no_wrap=True)
        att.add_column("logits", justify="right")
        att.add_column("share", justify="right")
        for _, row in top.iterrows():
            att.add_row(str(row["rank"]), str(row["label"]), f"{row['attribution']:+.3f}", f"{row['share']:.0%}")
        out.append(att)
    return out


def eval_tables(ev: Any, width: int) -> tuple[list[Any], list[str]]:
    """One table per lens: a row per site, the four statistics (and intervals when wide enough)."""
    from tl_logitlens.core.measures import MEASURES, STATISTICS

    wide = width >= WIDE
    heads = {"kl_to_final": "KL", "cross_entropy": "CE", "entropy": "H", "top1_agreement": "top-1"}
    ce_bpb = MEASURES.index("cross_entropy_bpb")
    tables = []
    for k, lens in enumerate(ev.lenses):
        title = f"{lens}: {ev.n_documents:,} documents, {ev.n_document_tokens:,} tokens, windows of {ev.seq_len}"
        table = new_table(title, width)
        table.add_column("site", style="bold", no_wrap=True)
        for stat in STATISTICS:
            table.add_column(heads[stat], justify="right", no_wrap=True)
            if stat == "cross_entropy":
                table.add_column("CE b/B", justify="right", no_wrap=True)
        for s, site in enumerate(ev.sites):
            row = [site]
            for i, stat in enumerate(STATISTICS):
                m, lo, hi = float(ev.mean[k, s, i]), float(ev.low[k, s, i]), float(ev.high[k, s, i])
                cell = f"{m:.3f}"
                if wide and ev.n_bootstrap > 0:
                    cell += f" [{lo:.3f}, {hi:.3f}]"
                row.append(cell)
                if stat == "cross_entropy":
                    row.append(f"{float(ev.mean[k, s, ce_bpb]):.3f}")
            table.add_row(*row)
        tables.append(table)
    legend = [
        "KL: KL(final ‖ site); CE: next-token cross-entropy; H: entropy (all in nats)",
        "CE b/B: cross-entropy in bits per byte; top-1: agreement with the final layer",
    ]
    if ev.n_tokens != ev.n_document_tokens:
        legend.append(f"{ev.n_tokens:,} positions scored: each further window of a long document starts with BOS")
    if ev.n_bootstrap > 0:
        ci = f"[low, high]: {ev.confidence:.0%} bootstrap intervals over documents"
        legend.append(ci if wide else f"{ev.confidence:.0%} bootstrap intervals: in --json/--csv, here from {WIDE} columns")
    return tables, legend
