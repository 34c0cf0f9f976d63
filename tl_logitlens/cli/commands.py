"""The ``tl-logitlens`` command: the logit lens from a terminal, with a table and an HTML report.

``tl-logitlens demo`` runs the built-in demo model on a story prompt; ``tl-logitlens run MODEL
PROMPT`` any model; ``tl-logitlens eval MODEL --texts FILE`` scores lenses over a corpus (also
under ``torchrun``, sharded over processes). Mistakes in what was typed (an unknown model, a
missing file, a target that is not one token, an empty prompt, a device this machine lacks) end
with one line on stderr saying what to do, and exit code 2. Tables fit the terminal (80 columns
and up): columns that do not fit are left out and a legend says so.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from tl_logitlens.cli.faithfulness import _add_faithfulness, _faithfulness_command
from tl_logitlens.cli.fit import _add_fit, _fit_command
from tl_logitlens.cli.lenses import _add_lenses, _lenses_command
from tl_logitlens.cli.prompts import PromptProgress, PromptsFile
from tl_logitlens.cli.shared import (
    PROG,
    TEXTS_HELP,
    UsageError,
    _apply_threads,
    _check_checkpoint_dir,
    _check_out,
    _consoles,
    _Formatter,
    _load,
    _max_tokens,
    _model_and_device,
    _natural,
    _positive,
    _process_group,
    _texts,
    _threads,
    check_device,
    corpus_settings,
    load_lens_spec,
    scored_lenses,
    write_site_table,
)

# the demo model settles on " happy" from its second layer on; the input token " very" wins at layer 0.
# " sad" (its rank 2-4 from layer 1 on) is the comparison: the logit difference and the heads writing it
DEMO_PROMPT = "Tom and his mom went to the park. Tom saw a big dog. The dog was very"
DEMO_TARGET, DEMO_VERSUS = " happy", " sad"
DEMO_LENSES = ("demo", "demo-jacobian")  # the lenses shipped for the demo model, shown beside the logit lens
LOGIT_SPEC = "logit"  # --lens logit: the logit lens, e.g. beside others
EXIT_USAGE = 2
SHOWN_PROMPTS = 3
COMMANDS = ("demo", "run", "eval", "fit", "faithfulness", "lenses")
# the report's plotly.js choices (reporting.page.PLOTLY_JS, kept here so --help needs no import)
PLOTLY_JS = ("inline", "cdn", "directory")
PLOTLY_JS_FILE = "plotly.min.js"
# prompts per block of run --prompts-file, the first block the report's (reporting.stream.REPORT_PROMPTS, for --help)
REPORT_PROMPTS = 2048

EPILOG = f"""\
examples (offline, on the built-in demo model and texts):
  {PROG} demo
  {PROG} run demo "The dog was very" --target " happy" --versus " sad"
  {PROG} run demo "The dog was very" --lens demo --plotly-js directory
  {PROG} eval demo --texts demo --lens demo --max-tokens 2000 \\
      --json eval.json
  {PROG} fit jacobian demo --texts demo --seq-len 64 --out demo-j.pt
examples (a model from the hub, your own files):
  {PROG} run gpt2 "The Eiffel Tower is in the city of" \\
      --target " Paris" --versus " Rome"
  {PROG} run ./my-checkpoint --prompts-file prompts.txt \\
      --sites resid_pre resid_mid --csv lens.csv
  torchrun --nproc-per-node 4 -m tl_logitlens eval gpt2 \\
      --texts corpus.jsonl --json eval.json

'{PROG} COMMAND --help' lists a command's options.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (with a pointer to --help) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# keep freed tensor buffers up to this size in the heap instead of returning them to the OS
ALLOCATOR_THRESHOLD = 1 << 30


def tune_allocator() -> bool:
    """Keep freed tensor buffers in the process (glibc ``mallopt``), so the next forward pass does not
    page its buffers in again; a no-op where the C library is not glibc, or where the user set
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (their choice stands). Returns whether it
    changed anything.

    glibc serves each allocation above its mmap threshold (128 KiB at start, raised on the fly up to
    32 MiB) with its own ``mmap`` and returns it with ``munmap`` when freed, so every forward pass
    of a fresh process page-faults its activations in again. Called once by the CLI, which owns
    its process; importing tl_logitlens never changes the allocator.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD) == 1 and done


def passive_wait_policy() -> bool:
    """Have OpenMP's idle worker threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless
    the user chose a policy; a no-op once torch is loaded. Returns whether it set the policy.

    By default the OpenMP runtime under torch's CPU kernels lets a thread that has finished its share
    spin for a while before it sleeps, hoping for the next parallel region. On a machine whose cores are
    busy with other work, the spinning threads take the cores from the threads that still have work, and
    a fit or an evaluation of many small operations becomes several times slower, from run to run
    unpredictably (docs/performance.md has the figures). The runtime reads the variable once, when
    torch loads it, so this runs first thing in :func:`main`. Called only by the CLI, which owns its
    process; importing tl_logitlens never changes it.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tl_logitlens")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        from tl_logitlens import __version__

        return __version__



def _sites(p: argparse.ArgumentParser) -> None:
    """--sites, as run and eval take it."""
    p.add_argument(
        "--sites",
        nargs="+",
        default=None,
        metavar="SITE",
        help="resid_pre (every layer's input, then final_post), resid_mid, resid_post, or labels like "
        "0_pre final_post (default: the lens's own: resid_pre for the logit and tuned lenses, resid_post "
        "for a Jacobian lens)",
    )


def _outputs(p: argparse.ArgumentParser) -> None:
    """What demo and run write: the table's size, the report, CSV and JSON."""
    p.add_argument("--top-k", type=_positive, default=5, help="top tokens per layer (default 5)")
    p.add_argument(
        "--out",
        default="logit_lens_report.html",
        help="HTML report to write (default: logit_lens_report.html in the current folder; an existing file is "
        "replaced, whole, once the report is ready). One file "
        "of about 5 MB, most of it plotly.js, so it opens offline; see --plotly-js",
    )
    p.add_argument(
        "--plotly-js",
        choices=PLOTLY_JS,
        default="inline",
        help="where the report gets plotly.js: inline (default; ~5 MB, works offline), cdn (a few hundred "
        "kB; the browser loads plotly.js from cdn.plot.ly, so viewing needs the internet) or directory "
        f"(one shared {PLOTLY_JS_FILE} written beside the report)",
    )
    p.add_argument("--no-report", action="store_true", help="print the table only, write no HTML")
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="also write the lens table as CSV: one row per layer, prompt, position and rank, with "
        "the target's (and --versus token's) probability and rank (an existing file is replaced)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write the settings, tables, logit differences and attributions as JSON (an existing "
        "file is replaced)",
    )


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the lens on the built-in demo model (offline, seconds)",
        description=(
            f"The built-in demo model on a story prompt ({DEMO_PROMPT!r}): the logit lens layer by layer, "
            "the three lenses side by side (logit, the shipped tuned lens 'demo' and Jacobian lens "
            f"'demo-jacobian'), the logit difference {DEMO_TARGET!r} − {DEMO_VERSUS!r} and the "
            "heads that write it, in the terminal and in an HTML report. Offline, seconds."
        ),
        formatter_class=_Formatter,
    )
    _outputs(demo)
    _threads(demo)


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run the lens on a model and prompt(s)",
        description="What each layer of MODEL predicts after the last token of each prompt. A --prompts-file "
        "of any length streams through in bounded memory.",
        epilog=f"example:\n  {PROG} run gpt2 \"The Eiffel Tower is in the city of\" \\\n      --target \" Paris\" --versus \" Rome\"",
        formatter_class=_Formatter,
    )
    _model_and_device(run, "TransformerLens's choice")
    run.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt, in quotes (or use --prompts-file)")
    run.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="a UTF-8 text file with one prompt per line (blank lines skipped), of any length: streamed, "
        f"{REPORT_PROMPTS:,} prompts at a time in bounded memory, with progress on stderr; every prompt's "
        "rows go to --csv/--json as it runs (moved into place at the end), the table and the report show "
        f"the first {REPORT_PROMPTS:,}",
    )
    run.add_argument(
        "--batch-size", type=_positive, default=16, metavar="N", help="prompts per forward pass (default 16)"
    )
    run.add_argument(
        "--target",
        metavar="TOKEN",
        help="a token to follow across layers, as text (mind the leading space, e.g. ' Paris') or as "
        "its integer id; text of several tokens is read as the set of its first token, with a note",
    )
    run.add_argument(
        "--versus",
        metavar="TOKEN",
        help="a comparison token (text or id): adds the logit difference target - versus per layer and "
        "its direct logit attribution",
    )
    _sites(run)
    run.add_argument(
        "--norm",
        choices=("recompute", "cached", "none"),
        default="recompute",
        help="how a layer's state is normalised before the unembedding: recompute (default; the final "
        "norm with the state's own statistics, the logit lens), cached (the final layer's scale, linear: "
        "the attribution view) or none (raw, to show why the norm matters)",
    )
    run.add_argument(
        "--lens",
        metavar="PATH|NAME",
        action="append",
        default=[],
        help="read the layers through a lens: a tuned or Jacobian lens folder or .pt file, 'demo' or "
        "'demo-jacobian' (the demo model's), a published lens 'jlens:NAME' or 'tuned:NAME' (see "
        f"'{PROG} lenses'), 'patchscope' (the model decodes each state from the identity prompt), or "
        "'logit' (default: the logit lens). Repeat it to compare "
        "several side by side: the first is read in every table, all of them in a comparison",
    )
    _outputs(run)
    _threads(run)


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="score lenses over a corpus (KL, cross-entropy, entropy, top-1 agreement per layer)",
        description=(
            "Evaluate the logit lens (and --lens) over a corpus: per site, KL(final || site), next-token "
            "cross-entropy, entropy (nats; bits per byte in --json/--csv) and top-1 agreement with the "
            "final layer, token-weighted, with 95% bootstrap intervals over documents. Under torchrun "
            "the documents are split across processes (gloo on CPU, nccl on CUDA)."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} eval demo --texts demo --lens demo --max-tokens 2000 \\\n"
            "      --json eval.json\n"
            "  torchrun --nproc-per-node 2 -m tl_logitlens eval gpt2 \\\n"
            "      --texts corpus.txt --csv eval.csv"
        ),
        formatter_class=_Formatter,
    )
    _model_and_device(ev, "TransformerLens's choice; under torchrun each rank gets cuda:LOCAL_RANK when CUDA is there")
    ev.add_argument(
        "--texts",
        metavar="FILE|demo",
        required=True,
        help=f"the corpus: {TEXTS_HELP}",
    )
    ev.add_argument("--text-field", default="text", metavar="NAME", help="the field holding text in JSON objects (default: text)")
    ev.add_argument(
        "--lens",
        metavar="PATH|NAME",
        action="append",
        default=[],
        help="a lens to evaluate beside the logit lens: a tuned or Jacobian lens folder or .pt file, the "
        "demo model's 'demo' (tuned) or 'demo-jacobian', or a published lens 'jlens:NAME' or 'tuned:NAME' "
        f"(see '{PROG} lenses'; repeat for several)",
    )
    _sites(ev)
    ev.add_argument("--seq-len", type=_positive, metavar="N", help="longest window in tokens, BOS included (default: the model's context)")
    _max_tokens(ev, "; the positions scored add a BOS for each further window of a long document")
    ev.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="windows per forward pass (default 8)")
    ev.add_argument("--bootstrap", type=_natural, default=1000, metavar="N", help="bootstrap replicates (default 1000; 0: no intervals)")
    ev.add_argument("--seed", type=_natural, default=0, help="the bootstrap's seed (default 0)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")
    _threads(ev)
    ev.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the running sums in DIR every --checkpoint-every documents, and resume from DIR when "
        "it holds a checkpoint of the same settings and corpus (under torchrun: one per rank, in "
        "DIR/rank-R-of-N)",
    )
    ev.add_argument(
        "--checkpoint-every",
        type=_positive,
        default=1000,
        metavar="N",
        help="documents between checkpoints (default 1000; with --checkpoint-dir)",
    )
    ev.add_argument(
        "--json",
        metavar="FILE",
        help="write the settings, definition, padding fraction and per-site results (with intervals) as "
        "JSON; an existing FILE is replaced (atomically)",
    )
    ev.add_argument(
        "--csv",
        metavar="FILE",
        help="write the per-site results as CSV (one row per site and lens); an existing FILE is replaced (atomically)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The logit lens for TransformerLens models: what each layer would predict.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_demo, _add_run, _add_eval, _add_fit, _add_faithfulness, _add_lenses):
        add(sub)
    return parser


def _read_prompts(args: argparse.Namespace) -> PromptsFile | list[str]:
    """The prompts of ``run`` (the PROMPT, or the --prompts-file, counted and read later) or ``demo``."""
    if args.command == "demo":
        return [DEMO_PROMPT]
    if args.prompts_file is not None and args.prompt is not None:
        raise UsageError("give either a PROMPT or --prompts-file, not both")
    if args.prompts_file is not None:
        return PromptsFile.open(args.prompts_file)
    if args.prompt is None:
        raise UsageError("give a PROMPT (in quotes) or --prompts-file FILE")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; give at least one word of text, in quotes")
    return [args.prompt]


def _token_arg(text: str | None) -> str | int | None:
    """A --target/--versus value: digits are a token id (the hint for multi-token targets says
    "pass one of those pieces or its id"); anything else is token text."""
    if text is not None and text.strip().isdigit() and text == text.strip():
        return int(text)
    return text




def _lenses(specs: Sequence[str], model: Any, demo: bool = False) -> Any:
    """What ``--lens`` asks for: None (the logit lens), one lens, or several as ``{name: lens}`` (the
    first read in every table); ``logit`` is the logit lens. Two lenses of one name are told apart by
    what was typed, ``"tuned lens (b/)"``, as ``eval`` does. ``demo``: the demo's lenses, each left out
    where this version ships none."""
    lenses: dict[str, Any] = {}
    for spec in specs:
        if spec == LOGIT_SPEC:
            lens = None
        else:
            try:
                lens = load_lens_spec(spec, model)
            except (ValueError, OSError):
                if demo:
                    continue
                raise
        from tl_logitlens.lenses import lens_name

        name = lens_name(lens)
        lenses[name if name not in lenses else f"{name} ({spec})"] = lens
    if not lenses:
        return None
    return next(iter(lenses.values())) if len(lenses) == 1 else lenses


def _print_legend(console: Any, legend: Sequence[str]) -> None:
    from tl_logitlens.cli.terminal import legend_lines

    for line in legend_lines(legend, console.width):
        console.print(line, style="dim", markup=False)


def _print_table(console: Any, table: Any, legend: Sequence[str]) -> None:
    console.print(table)
    _print_legend(console, legend)


def _report_note(plotly_js: str) -> str:
    """What opening the report needs, for the line that says where it was written."""
    if plotly_js == "cdn":
        return "open it in a browser online: it loads plotly.js from cdn.plot.ly, and offline its figures are blank"
    if plotly_js == "directory":
        return f"open it in a browser; keep {PLOTLY_JS_FILE} beside it, the figures need it"
    return "open it in a browser; it works offline"


def _lens_command(args: argparse.Namespace) -> int:
    """``demo`` and ``run``: the lens on prompts, a terminal table, the report and the tables. The prompts
    stream through (:func:`~tl_logitlens.reporting.stream.stream_report`): every prompt's rows go to
    --csv/--json as they are computed, the table and the report show the first block of them."""
    prompts = _read_prompts(args)
    if args.command == "demo":
        model_name, target, versus = "demo", DEMO_TARGET, DEMO_VERSUS
        sites, norm, device, lens_specs, batch_size = None, "recompute", None, [LOGIT_SPEC, *DEMO_LENSES], 16
    else:
        model_name, target, versus = args.model, _token_arg(args.target), _token_arg(args.versus)
        sites, norm, device, lens_specs, batch_size = args.sites, args.norm, args.device, args.lens, args.batch_size
        if versus is not None and target is None:
            raise UsageError("--versus needs --target: the logit difference is target minus versus")
    out = None if args.no_report else args.out
    _check_out(out, (".html", ".htm"), "the report")
    _check_out(args.csv, (".csv",), "--csv")
    _check_out(args.json, (".json",), "--json")
    check_device(device)  # imports torch (when a device is named): after every check that does not need it
    _apply_threads(args)
    from tl_logitlens.cli.terminal import (
        comparison_table,
        lens_table,
        masked_table,
        prompt_lines,
        versus_tables,
    )

    console, err = _consoles()
    model = _load(model_name, device, err)
    lens = _lenses(lens_specs, model, demo=args.command == "demo")
    from tl_logitlens.lenses import lens_name
    from tl_logitlens.reporting import ReportData, write_report
    from tl_logitlens.reporting.stream import stream_report

    settings = {"target": target, "versus": versus, "top_k": args.top_k, "sites": sites, "norm": norm, "lens": lens}
    tables = {"csv": args.csv, "json_path": args.json, "batch_size": batch_size}
    if isinstance(prompts, PromptsFile):
        name = lens_name(lens) if not isinstance(lens, dict) else next(iter(lens))
        with PromptProgress(err, prompts.n_prompts, name) as progress:
            run = stream_report(model, prompts.prompts(), **settings, **tables, progress=progress)
    else:
        run = stream_report(model, prompts, **settings, **tables)
    data, n_prompts = run.data, run.n_prompts
    width = console.width
    for line in prompt_lines(data.prompts, 1):
        console.print(line, markup=False)
    console.print()
    if isinstance(data, ReportData):
        _print_table(console, *lens_table(data, 0, width))
        if data.comparison is not None:
            console.print()
            _print_table(console, *comparison_table(data.comparison, 0, width))
        if data.logit_diff is not None:
            for table in versus_tables(data, width):
                console.print()
                console.print(table)
    else:
        _print_table(console, *masked_table(data, width))
    if n_prompts > 1:
        tables_asked = args.csv is not None or args.json is not None
        console.print(_more_prompts(n_prompts, len(data.prompts), out is not None, tables_asked), style="dim")
    for path, what in ((args.csv, "table"), (args.json, "JSON")):
        if path is not None:
            console.print(f"wrote {what}: {path}")
    if out is not None:
        path = write_report(data, out, max_prompts=SHOWN_PROMPTS, plotly_js=args.plotly_js, n_prompts=n_prompts)
        console.print(f"wrote report: {path}  ({_report_note(args.plotly_js)})")
    return 0


def _more_prompts(n_prompts: int, n_kept: int, report: bool, tables: bool) -> str:
    """The line under the table: where the other prompts are (the report holds the first ``n_kept``)."""
    if n_kept >= n_prompts:
        where = " and ".join(["the report"] * report + ["--csv/--json"] * tables) or "--csv/--json (give them to keep them)"
        return f"{n_prompts - 1:,} more prompt(s) in {where}"
    kept = f"the report covers the first {n_kept:,} of the {n_prompts:,}" if report else f"{n_prompts:,} in all"
    rows = "every prompt is in --csv/--json" if tables else "give --csv/--json to keep every prompt"
    return f"{n_prompts - 1:,} more prompt(s): {kept}; {rows}"


# ------------------------------------------------------------------------------------------------
# eval


def _eval_command(args: argparse.Namespace) -> int:
    """``eval``: lenses scored over a corpus, a table per lens, JSON/CSV."""
    texts = _texts(args.texts)
    _check_out(args.csv, (".csv",), "--csv")
    _check_out(args.json, (".json",), "--json")
    _check_checkpoint_dir(args.checkpoint_dir)
    # torch loads from here on: every mistake in what was typed is reported before it
    check_device(args.device)
    _apply_threads(args)
    with _process_group(args.device) as (world, device):
        console, err = _consoles()
        model = _load(args.model, device, err)
        lenses = scored_lenses(args.lens, model)
        from tl_logitlens.analyses.evaluate import evaluate_lenses

        ev = evaluate_lenses(model, texts, lenses=lenses, **corpus_settings(args))
        if not world.is_main:
            return 0
        from tl_logitlens.cli.terminal import eval_tables

        tables, legend = eval_tables(ev, console.width)
        for i, table in enumerate(tables):
            if i:
                console.print()
            console.print(table)
        _print_legend(console, legend)
        console.print(f"padding: {ev.padding_fraction:.1%} of the {ev.n_computed:,} token slots computed", style="dim")
        write_site_table(ev, args, console)
        return 0


# ------------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def _misplaced_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """An unknown option before the command (``tl-logitlens --frobnicate``) is reported as such,
    not as a missing command (argparse checks required arguments first)."""
    for arg in argv:
        if not arg.startswith("-"):
            return
        if arg.split("=", 1)[0] not in ("-h", "--help", "--version"):
            parser.error(f"unrecognized option {arg!r}; put a command first: {', '.join(COMMANDS)}")


def _show_note(show: Any, message: Any, category: type, *rest: Any, **kwargs: Any) -> None:
    """A multi-token ``--target`` read as its first token's set is a one-line note, not a Python
    warning; other warnings go to ``show`` (the one in place before)."""
    if category.__name__ == "MultiTokenTargetWarning":  # by name: the CLI imports no torch before it must
        sys.stderr.write(f"{PROG}: note: {message}\n")
    else:
        show(message, category, *rest, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tl-logitlens``; returns the exit status (0 ok, 2 a usage mistake).

    Started as a command (``argv`` None: the console script, ``python -m tl_logitlens``, torchrun),
    it owns its process: it sets OpenMP's passive wait policy before torch loads
    (:func:`passive_wait_policy`) and tunes the allocator (:func:`tune_allocator`); called from Python
    with ``argv``, it leaves the caller's process as it is.
    """
    owns_process = argv is None
    if owns_process:
        passive_wait_policy()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _misplaced_option(parser, argv)
    args = parser.parse_args(argv)
    if owns_process:
        tune_allocator()
    try:
        commands = {"eval": _eval_command, "fit": _fit_command, "faithfulness": _faithfulness_command, "lenses": _lenses_command}
        command = commands.get(args.command, _lens_command)
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = functools.partial(_show_note, warnings.showwarning)
            return command(args)
    except (UsageError, ValueError, TypeError) as err:
        sys.stderr.write(f"{PROG}: error: {_one_line(err)}\n")
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        sys.stderr.write(f"{PROG}: error: {err.strerror or _one_line(err)}{where}; check the path\n")
        return EXIT_USAGE
    except OSError as err:  # e.g. a hub download that failed: say so, no traceback
        sys.stderr.write(f"{PROG}: error: {_one_line(err)}\n")
        return EXIT_USAGE
    except RuntimeError as err:
        from tl_logitlens.core.distributed import DistributedError  # torch is loaded once a collective ran

        if not isinstance(err, DistributedError):
            raise
        sys.stderr.write(f"{PROG}: error: {_one_line(err)}\n")  # a peer under torchrun stopped: one line
        from tl_logitlens.core.distributed import launched_by_torchrun

        if launched_by_torchrun():
            # gloo's threads may still wait on the lost peer, and the interpreter's teardown of them can
            # abort the process (SIGABRT, "terminate called without an active exception", seen under load
            # after a timed-out send): the line is written, so leave now with its exit code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130

