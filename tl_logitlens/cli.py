"""The ``tl-logitlens`` command: the logit lens from a terminal, with a table and an HTML report.

``tl-logitlens demo`` runs the built-in demo model on a story prompt; ``tl-logitlens run MODEL
PROMPT`` any model. Mistakes in what was typed (an unknown model, a missing file, a target that is
not one token, an empty prompt) end with one line on stderr saying what to do, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "tl-logitlens"
# the demo model settles on " happy" from its second layer on; the input token " very" wins at layer 0
DEMO_PROMPT = "Tom and his mom went to the park. Tom saw a big dog. The dog was very"
EXIT_USAGE = 2
SHOWN_PROMPTS = 3


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (with a pointer to --help) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The logit lens for TransformerLens models: what each layer would predict.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def outputs(p: argparse.ArgumentParser, default_out: str | None) -> None:
        p.add_argument("--top-k", type=_positive, default=5, help="top tokens per layer (default 5)")
        p.add_argument(
            "--out",
            default=default_out,
            help="HTML report to write (default: logit_lens_report.html in the current folder)",
        )
        p.add_argument("--no-report", action="store_true", help="print the table only, write no HTML")
        p.add_argument("--csv", help="also write the lens table (one row per layer, position, rank) as CSV")
        p.add_argument("--json", help="also write the settings and tables as JSON")

    demo = sub.add_parser("demo", help="run the lens on the built-in demo model (offline, seconds)")
    outputs(demo, "logit_lens_report.html")

    run = sub.add_parser("run", help="run the lens on a model and prompt(s)")
    run.add_argument("model", metavar="MODEL", help="'demo', a local checkpoint folder, or a model name like 'gpt2'")
    run.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt (or use --prompts-file)")
    run.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per line")
    run.add_argument("--target", metavar="TOKEN", help="a token to follow across layers (exactly one token)")
    run.add_argument("--versus", metavar="TOKEN", help="a comparison token: adds logit difference and attribution")
    run.add_argument(
        "--sites",
        nargs="+",
        default=["resid_pre"],
        metavar="SITE",
        help="resid_pre (default), resid_mid, resid_post, or labels like 0_pre final_post",
    )
    run.add_argument("--norm", choices=("recompute", "cached", "none"), default="recompute")
    run.add_argument("--device", help="torch device, e.g. cpu or cuda (default: TransformerLens's choice)")
    outputs(run, "logit_lens_report.html")
    return parser


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None and args.prompt is not None:
        raise UsageError("give either a PROMPT or --prompts-file, not both")
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"no prompts file at {str(path)!r}; give a text file with one prompt per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"{str(path)!r} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"{str(path)!r} holds no prompts; write one prompt per line")
        return prompts
    if args.prompt is None:
        raise UsageError("give a PROMPT (in quotes) or --prompts-file FILE")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; give at least one word of text, in quotes")
    return [args.prompt]


def _check_out(path: str | None, suffixes: Sequence[str], what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {path!r} should end in {' or '.join(suffixes)}")
    if not p.parent.is_dir():
        raise UsageError(f"the folder for {what} {path!r} does not exist; create it first")


def _table(data: Any, prompt: int) -> Any:
    """A rich table: per site, the top-k tokens (and targets) at the prompt's last token."""
    from rich.table import Table
    from rich.text import Text

    lens = data.lens
    col = int(lens.valid[prompt].sum()) - 1
    top = lens.top_tokens()
    probs = lens.top_probs[:, prompt, col].tolist()
    k = lens.top_ids.shape[-1]
    last = lens.str_tokens[prompt][-1]
    table = Table(
        title=Text(f"Top tokens per layer after {last!r} (prompt {prompt})"),
        box=None,
        header_style="bold",
        pad_edge=False,
    )
    table.add_column("layer", style="bold")
    for r in range(k):
        table.add_column(f"top {r + 1}")
    table.add_column("entropy", justify="right")
    names = []
    if lens.target_ids is not None:
        from tl_logitlens.tokens import display_tokens

        names = display_tokens(lens.tokenizer, lens.target_ids[prompt, col])
        for n in names:
            table.add_column(Text(f"P({n!r})"), justify="right")
            table.add_column("rank", justify="right")
    for s, label in enumerate(lens.labels):
        cells: list[Any] = [label]
        cells += [Text(f"{top[s][prompt][col][r]!r} {probs[s][r]:.2f}") for r in range(k)]
        cells.append(f"{float(lens.entropy[s, prompt, col]):.2f}")
        for t in range(len(names)):
            cells.append(f"{float(lens.target_logprobs[s, prompt, col, t].exp()):.3f}")
            cells.append(str(int(lens.target_ranks[s, prompt, col, t])))
        table.add_row(*cells)
    return table


def _write_tables(data: Any, csv: str | None, json_path: str | None) -> None:
    frame = data.lens.to_dataframe()
    if csv is not None:
        frame.to_csv(csv, index=False)
    if json_path is not None:
        import json

        payload = {
            "model": data.model_name,
            "norm": data.norm,
            "sites": list(data.sites),
            "top_k": data.top_k,
            "target": data.target,
            "versus": data.versus,
            "prompts": list(data.prompts),
            "lens": json.loads(frame.to_json(orient="records")),
            "targets": None
            if data.lens.target_ids is None
            else json.loads(data.lens.target_dataframe().to_json(orient="records")),
            "logit_diff": None
            if data.logit_diff is None
            else json.loads(data.logit_diff.to_dataframe().to_json(orient="records")),
        }
        Path(json_path).write_text(json.dumps(payload, indent=1), encoding="utf-8")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.command == "demo":
        model_name, prompts = "demo", [DEMO_PROMPT]
        target = versus = None
        sites, norm, device = ["resid_pre"], "recompute", None
    else:
        model_name, prompts = args.model, _read_prompts(args)
        target, versus = args.target, args.versus
        sites, norm, device = args.sites, args.norm, args.device
        if versus is not None and target is None:
            raise UsageError("--versus needs --target: the logit difference is target minus versus")
    out = None if args.no_report else args.out
    _check_out(out, (".html", ".htm"), "the report")
    _check_out(args.csv, (".csv",), "--csv")
    _check_out(args.json, (".json",), "--json")

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    err = Console(stderr=True, highlight=False)
    with err.status(f"loading {model_name} ..."):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one status line is enough
        from tl_logitlens.models import load_model

        model = load_model(model_name, device=device)
    from tl_logitlens.reporting import compute_report, write_report

    settings = {"target": target, "versus": versus, "top_k": args.top_k, "sites": sites, "norm": norm}
    if len(prompts) > 1:
        from rich.progress import Progress

        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("logit lens", total=len(prompts))
            data = compute_report(
                model, prompts, **settings, progress=lambda done, total: progress.update(task, completed=done)
            )
    else:
        data = compute_report(model, prompts, **settings)
    console.print(_table(data, 0))
    if len(prompts) > 1:
        console.print(f"({len(prompts) - 1} more prompt(s); see the report or --csv/--json for all of them)")
    _write_tables(data, args.csv, args.json)
    for path, what in ((args.csv, "table"), (args.json, "JSON")):
        if path is not None:
            console.print(f"wrote {what}: {path}")
    if out is not None:
        path = write_report(data, out, max_prompts=SHOWN_PROMPTS)
        console.print(f"wrote report: {path}  (open it in a browser; it works offline)")
    return 0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tl-logitlens``; returns the exit status (0 ok, 2 a usage mistake)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
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
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
