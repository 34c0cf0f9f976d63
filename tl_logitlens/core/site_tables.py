"""What the corpus results share: a table of statistics per site × lens with bootstrap intervals.

:class:`~tl_logitlens.analyses.evaluate.LensEvaluation` and
:class:`~tl_logitlens.analyses.faithfulness.Faithfulness` hold ``mean``, ``low`` and ``high`` as
``[lens, site, statistic]``; their long-format rows, HTML tables and written files are made here, once.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_logitlens.core.files import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd


def site_lens_frame(
    sites: Sequence[str],
    lenses: Sequence[str],
    statistics: Sequence[str],
    mean: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    **constants: Any,
) -> pd.DataFrame:
    """One row per site × lens: ``site``, ``site_index``, ``lens``, each statistic with ``_low``/``_high``
    (``[lens, site, statistic]`` tensors), then ``constants`` (counts) on every row."""
    import pandas as pd

    rows = []
    for s, site in enumerate(sites):
        for k, lens in enumerate(lenses):
            row: dict[str, Any] = {"site": site, "site_index": s, "lens": lens}
            for i, stat in enumerate(statistics):
                row[stat] = float(mean[k, s, i])
                row[f"{stat}_low"] = float(low[k, s, i])
                row[f"{stat}_high"] = float(high[k, s, i])
            row.update(constants)
            rows.append(row)
    return pd.DataFrame(rows)


def html_table(
    frame: pd.DataFrame, statistics: Sequence[str], extra: Sequence[tuple[str, Callable[[Any], str]]] = ()
) -> str:
    """``frame``'s rows as an HTML table: site, lens, each statistic with its interval, then each
    ``(heading, cell)`` of ``extra``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("site", "lens", *statistics, *(h for h, _ in extra)))
    rows = []
    for _, r in frame.iterrows():
        cells = [html.escape(str(r["site"])), html.escape(str(r["lens"]))]
        cells += [f"{r[s]:.4f} <small>[{r[f'{s}_low']:.4f}, {r[f'{s}_high']:.4f}]</small>" for s in statistics]
        cells += [cell(r) for _, cell in extra]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        f'<table style="border-collapse:collapse;font-size:13px"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def html_page(title: str, section: str) -> str:
    """A self-contained page around a result's section."""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:16px}"
        "td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}</style></head>"
        f"<body>{section}</body></html>"
    )


def text_or_file(text: str, path: str | os.PathLike | None) -> str | Path:
    """``text``, or, given ``path``, ``text`` written there (atomically: a file already there is replaced
    whole, never left half-written) and the path returned, so a REPL shows a path, not the whole file."""
    if path is None:
        return text
    atomic_write_text(path, text)
    return Path(path)
