"""``tl-logitlens faithfulness MODEL --texts FILE|demo --lens ...``: which lens is causal, from a terminal.

:func:`tl.faithfulness` with the options typed: the logit lens and each ``--lens``, intervened on along
their own top-1 vectors at every site, against a norm-matched random placebo; a table in the terminal
(80 columns and up), and ``--json``/``--csv``/``--html``. Resumable (``--checkpoint-dir``, bound to the
texts, model, lenses and settings as ``eval``'s) and runnable under ``torchrun`` (documents dealt to the
ranks, sums added; rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
from typing import Any

from tl_logitlens.cli import shared

INTERVENTIONS = ("ablate", "swap")  # tl.faithfulness's (named here so --help needs no torch)
DEFAULT_CHECKPOINT_EVERY = 100


def _positions(text: str) -> Any:
    """--positions: 'last', 'all', or integers (negative from each document's end)."""
    if text in ("last", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'last', 'all' or an integer") from None


def _add_faithfulness(sub: Any) -> None:
    p = sub.add_parser(
        "faithfulness",
        help="which lens is causal: intervene along each lens's top-1 vector vs a random placebo",
        description=(
            "For the logit lens and each --lens, at every site and read position of each text: intervene on the "
            "site's state along the lens's vector for its own top-1 token (ablate it, or swap it with the "
            "runner-up), and measure the change of the model's final log-prob of that token and the KL of its "
            "output; the same with a norm-matched random direction (the placebo). Per site and lens: the means, "
            "their ratio, and 95% bootstrap intervals over documents. Under torchrun the documents are split "
            "across processes."
        ),
        epilog=(
            "examples:\n"
            f"  {shared.PROG} faithfulness demo --texts demo --lens demo \\\n"
            "      --lens demo-jacobian --json faith.json\n"
            f"  torchrun --nproc-per-node 2 -m tl_logitlens faithfulness gpt2 \\\n"
            "      --texts corpus.txt --csv faith.csv"
        ),
        formatter_class=shared._Formatter,
    )
    shared._model_and_device(
        p, "TransformerLens's choice; under torchrun each rank gets cuda:LOCAL_RANK when CUDA is there"
    )
    p.add_argument("--texts", metavar="FILE|demo", required=True, help=f"the corpus: {shared.TEXTS_HELP}")
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the field holding text in JSON objects (default: text)",
    )
    p.add_argument(
        "--lens",
        metavar="PATH|NAME",
        action="append",
        default=[],
        help="a lens beside the logit lens: a tuned or Jacobian lens folder or .pt file, or the demo model's "
        "'demo' (tuned) or 'demo-jacobian' (repeat for several)",
    )
    p.add_argument(
        "--sites",
        nargs="+",
        default=None,
        metavar="SITE",
        help="resid_pre, resid_mid, resid_post, or labels like 0_post final_post (default: the sites the lenses "
        "read by default: resid_post when a Jacobian lens is among them)",
    )
    p.add_argument("--intervention", choices=INTERVENTIONS, default="ablate", help="ablate (default) or swap")
    p.add_argument(
        "--positions",
        nargs="+",
        type=_positions,
        default=["last"],
        metavar="POS",
        help="read positions: last (default), all (every position: about n²/2 token slots per document, "
        "lens and site), or integers (negative from each document's end; past its end: skipped)",
    )
    p.add_argument(
        "--seq-len",
        type=shared._positive,
        metavar="N",
        help="read each document's first N tokens (default: the model's context)",
    )
    shared._max_tokens(p)
    p.add_argument(
        "--batch-size",
        type=shared._positive,
        default=8,
        metavar="N",
        help="documents per clean forward pass (default 8)",
    )
    p.add_argument(
        "--bootstrap",
        type=shared._natural,
        default=1000,
        metavar="N",
        help="bootstrap replicates (default 1000; 0: no intervals)",
    )
    p.add_argument(
        "--seed", type=shared._natural, default=0, help="the placebo's and the bootstrap's seed (default 0)"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (none is drawn when stderr is not a terminal)",
    )
    shared._threads(p)
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the running sums in DIR every --checkpoint-every documents, and resume from DIR when it holds "
        "a checkpoint of the same texts, model, lenses and settings (under torchrun: one per rank)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=shared._positive,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="N",
        help=f"documents between checkpoints (default {DEFAULT_CHECKPOINT_EVERY}; with --checkpoint-dir)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="write the settings, definition and table as JSON (replaced atomically)",
    )
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="write the table as CSV, one row per site and lens (replaced atomically)",
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        help="write the 'Which lens is causal?' page (figure and table; replaced atomically)",
    )


def _positions_arg(values: list[Any]) -> Any:
    if "all" in values or "last" in values:
        if len(values) > 1:
            raise shared.UsageError("--positions takes 'last', 'all', or integers, not a mix")
        return None if values[0] == "all" else "last"
    return [int(v) for v in values]


def faithfulness_table(res: Any, width: int) -> tuple[Any, list[str]]:
    """One table, a row per site and lens: the mean Δ log p with its placebo, the mean KL with its placebo
    and their ratio (intervals from 110 columns)."""
    from tl_logitlens.analyses.faithfulness import STATISTICS
    from tl_logitlens.cli.terminal import WIDE, new_table

    wide = width >= WIDE and res.n_bootstrap > 0
    title = f"Which lens is causal? {res.intervention}, {res.n_positions:,} positions of {res.n_documents:,} documents"
    table = new_table(title, width)
    for name, justify in (
        ("site", "left"),
        ("lens", "left"),
        ("Δlog p", "right"),
        ("placebo", "right"),
        ("KL", "right"),
        ("placebo", "right"),
        ("KL ratio", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)

    def cell(k: int, s: int, stat: str) -> str:
        i = STATISTICS.index(stat)
        text = f"{float(res.mean[k, s, i]):.3f}"
        if wide:
            text += f" [{float(res.low[k, s, i]):.3f}, {float(res.high[k, s, i]):.3f}]"
        return text

    for s, site in enumerate(res.sites):
        for k, lens in enumerate(res.lenses):
            table.add_row(
                site if k == 0 else "",
                lens,
                *(
                    cell(k, s, stat)
                    for stat in ("effect_logprob", "placebo_logprob", "effect_kl", "placebo_kl", "ratio_kl")
                ),
            )
    legend = [  # each line under 80 columns
        "Δlog p: change of the model's log-prob of the lens's top-1 token (nats)",
        "KL: KL(clean ‖ intervened) of the model's output (nats)",
        "placebo: a change of the same norm, random direction; KL ratio: KL / placebo",
    ]
    if res.n_bootstrap > 0 and not wide:
        legend.append(
            f"{res.confidence:.0%} bootstrap intervals: in --json/--csv/--html, here from {WIDE} columns"
        )
    return table, legend


def _faithfulness_command(args: argparse.Namespace) -> int:
    texts = shared._texts(args.texts)
    for path, suffixes, what in (
        (args.csv, (".csv",), "--csv"),
        (args.json, (".json",), "--json"),
        (args.html, (".html", ".htm"), "--html"),
    ):
        shared._check_out(path, suffixes, what)
    shared._check_checkpoint_dir(args.checkpoint_dir)
    positions = _positions_arg(args.positions)
    shared.check_device(args.device)
    shared._apply_threads(args)
    with shared._process_group(args.device) as (world, device):
        console, err = shared._consoles()
        model = shared._load(args.model, device, err)
        lenses = shared.scored_lenses(args.lens, model)
        from tl_logitlens.analyses.faithfulness import faithfulness

        res = faithfulness(
            model,
            texts,
            lenses=lenses,
            intervention=args.intervention,
            positions=positions,
            **shared.corpus_settings(args),
        )
        if not world.is_main:
            return 0
        table, legend = faithfulness_table(res, console.width)
        console.print(table)
        for line in legend:
            console.print(line, style="dim", markup=False)
        shared.write_site_table(res, args, console)
        if args.html is not None:
            res.to_html(args.html)
            console.print(f"wrote page: {args.html}")
        return 0
