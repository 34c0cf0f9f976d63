"""``tl-logitlens lenses``: the published lenses that ``--lens`` and ``tl.load_lens`` take by name
(``jlens:NAME``, Neuronpedia's fitted J-lenses; ``tuned:NAME``, tuned-lens's trained lenses), each with
the model it was made for, its size and whether it is already in the Hugging Face cache.

Listing touches no network: sizes are the registry's (exact, or ``~`` rounded from the hub's pages;
``?`` where it records none) or, for a cached lens, its files' own.
"""

from __future__ import annotations

import argparse
from typing import Any

from tl_logitlens.cli import shared

KIND_TITLES = {"jlens": "Jacobian lenses (Neuronpedia)", "tuned": "tuned lenses (tuned-lens)"}


def _add_lenses(sub: Any) -> None:
    p = sub.add_parser(
        "lenses",
        help="list the published lenses --lens takes by name (jlens:NAME, tuned:NAME)",
        description=(
            "List the published lenses that --lens and tl.load_lens take by name: Neuronpedia's fitted "
            "J-lenses (jlens:NAME) and tuned-lens's trained lenses (tuned:NAME), each pinned to a hub commit, "
            "with the model it was made for, its size, and whether it is in the Hugging Face cache "
            "(a cached lens loads offline)."
        ),
        epilog=(
            f"examples:\n  {shared.PROG} lenses --kind jlens\n"
            f'  {shared.PROG} run gpt2 "The Eiffel Tower is in" --lens jlens:gpt2 --lens tuned:gpt2'
        ),
        formatter_class=shared._Formatter,
    )
    p.add_argument("--kind", choices=("jlens", "tuned"), help="one kind only (default: both)")
    p.add_argument("--cached", action="store_true", help="only the lenses already in the Hugging Face cache")


def _human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"  # pragma: no cover


def _size(entry: Any, cached: dict[str, Any] | None) -> str:
    """The cached files' size, else the registry's: exact where it records the lens's weights file (the
    last file; a tuned lens's config.json is a few hundred bytes), ``~`` rounded, or ``?``."""
    if cached is not None:
        return _human(sum(path.resolve().stat().st_size for path in cached.values()))
    weights = entry.files[-1]
    if weights.size is not None:
        return _human(sum(f.size or 0 for f in entry.files))
    return f"~{weights.approx_size}" if weights.approx_size else "?"


def _lenses_command(args: argparse.Namespace) -> int:
    from tl_logitlens.cli.terminal import new_table
    from tl_logitlens.lenses.published import cached_files, published_lenses

    console, _ = shared._consoles()
    width = console.width
    kinds = [args.kind] if args.kind else list(KIND_TITLES)
    for kind in kinds:
        entries = published_lenses(kind)
        rows = []
        for entry in entries:
            cached = cached_files(entry)
            if args.cached and cached is None:
                continue
            model = "" if entry.name.startswith(entry.model) else entry.model  # shown where the name hides it
            rows.append((f"{kind}:{entry.name}", model, _size(entry, cached), "yes" if cached else "no"))
        revisions = sorted({e.revision[:7] for e in entries})
        repos = sorted({f"{'space ' if e.repo_type == 'space' else ''}{e.repo_id}" for e in entries})
        table = new_table(f"{KIND_TITLES[kind]}: {len(rows)} of {len(entries)}", width)
        table.add_column("--lens", no_wrap=True, overflow="ellipsis", ratio=3)
        table.add_column("size", justify="right", no_wrap=True, min_width=8)
        table.add_column("cached", no_wrap=True, min_width=6)
        with_model = any(row[1] for row in rows)
        if with_model:
            table.add_column("model", no_wrap=True, overflow="ellipsis", ratio=2)
        for name, model, size, cached in rows:
            table.add_row(name, size, cached, *([model] if with_model else []))
        console.print(table)
        console.print(f"from {', '.join(repos)} at {', '.join(revisions)}")
        console.print()
    console.print(
        "size: ? not recorded until fetched, ~ rounded. A lens not cached is fetched on first use "
        "(tl.load_lens('jlens:NAME', model)), or beforehand with the command a missing lens's error gives."
    )
    return 0
