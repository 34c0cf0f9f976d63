"""What the ``tl-logitlens`` commands share: the usage error, argument types and options, the corpus
and device checks, the consoles, the model loader and the process group under ``torchrun``.

Standard library only at import: ``--help`` and argument errors are answered before torch loads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "tl-logitlens"
DEMO_TEXTS = "demo"  # --texts demo: the shipped held-out stories (tl.demo_texts())
TEXTS_HELP = (
    ".txt (documents separated by blank lines), .json (a list of strings) or .jsonl (one string or "
    "{\"text\": ...} per line), or 'demo' for the 100 TinyStories shipped with the package, which the demo "
    "model never saw (tl.demo_texts())"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Prose in descriptions and epilogs is wrapped to the terminal; indented lines (example
    commands, already broken to fit 80 columns) are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(
            line if not line or line[0].isspace() else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines()
        )


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1" if low == 1 else f"{value} must be 0 or more")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1)


def _natural(text: str) -> int:
    return _whole(text, 0)


def _thread_count(text: str) -> int:
    """--threads: a whole number from 1 to 8 per CPU core (thousands of threads exhaust the system)."""
    value = _whole(text, 1)
    cores = os.cpu_count() or 1
    if value > 8 * cores:
        raise argparse.ArgumentTypeError(f"{value} is more than 8 threads per CPU core; this machine has {cores}, give at most {8 * cores}")
    return value


def _threads(p: argparse.ArgumentParser) -> None:
    """--threads, for every command (each runs tensor work on the CPU)."""
    p.add_argument(
        "--threads",
        type=_thread_count,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core). On a busy machine fewer "
        "threads can be faster: the progress bar shows tokens/s",
    )


def _max_tokens(p: argparse.ArgumentParser, note: str = "") -> None:
    """--max-tokens, as ``eval``, ``faithfulness`` and ``fit tuned`` take it (the library's ``max_tokens``)."""
    p.add_argument(
        "--max-tokens",
        type=_positive,
        metavar="N",
        help="stop after N document tokens, in corpus order (each document's BOS counted once, the last "
        "document cut short; a long document is tokenised only as far as the cut)" + note,
    )


def _apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from --threads (the command owns the process; the library never does this)."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def _model_and_device(p: argparse.ArgumentParser, device_help: str) -> None:
    """MODEL and --device, as run and eval take them."""
    p.add_argument("model", metavar="MODEL", help="'demo', a local checkpoint folder, or a model name like 'gpt2'")
    p.add_argument("--device", help=f"torch device, e.g. cpu, cuda or cuda:1 (default: {device_help})")


def _check_out(path: str | None, suffixes: Sequence[str], what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {path!r} should end in {' or '.join(suffixes)}")
    if not p.parent.is_dir():
        raise UsageError(f"the folder for {what} {path!r} does not exist; create it first")
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a folder; give a file name")


def check_device(device: str | None) -> None:
    """Refuse a device string torch does not know, or a device this machine does not have."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: tl-logitlens runs on cpu, cuda or mps")


def _consoles() -> tuple[Any, Any]:
    from rich.console import Console

    # a terminal (or COLUMNS) sets the width; output piped to a file gets 120 columns
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
    return Console(width=width, highlight=False), Console(stderr=True, highlight=False)


def _load(model_name: str, device: str | None, err: Any, **options: Any) -> Any:
    """The model, with a status line while it loads; ``options`` go to :func:`tl.load_model`."""
    with err.status(f"loading {model_name} ..."):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one status line is enough
        from tl_logitlens.core.models import load_model

        return load_model(model_name, device=device, **options)


def _is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _texts(spec: str) -> Any:
    """The corpus --texts names: the shipped stories for 'demo' (a list), else the file's path,
    refused here (before torch loads) when it is not a file."""
    if spec == DEMO_TEXTS:
        from tl_logitlens.core.corpus import demo_texts

        return demo_texts()
    if not Path(spec).is_file():
        raise UsageError(f"no corpus at {spec!r}; give a .txt, .json or .jsonl file, or 'demo' for the shipped stories")
    return Path(spec)


def _check_checkpoint_dir(path: str | None) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"--checkpoint-dir {path!r} is a file; give a folder")


@contextlib.contextmanager
def _process_group(device: str | None) -> Iterator[tuple[Any, str | None]]:
    """Under ``torchrun``, the process group for the command (started here unless the caller started
    one, and then ended here): yields this rank's world and the device to load the model on."""
    from tl_logitlens.core import distributed as _distributed
    started = not (_distributed.launched_by_torchrun() and _is_initialized())
    world, device = _distributed.init_from_env(device)
    try:
        yield world, device
    finally:
        if world.size > 1 and started:
            import torch.distributed as dist

            with contextlib.suppress(Exception):  # after a peer died it may fail too; the first error is the one
                dist.destroy_process_group()


PATCHSCOPE_SPEC = "patchscope"  # --lens patchscope: the model decodes its own states (identity prompt)


def load_lens_spec(spec: str, model: Any) -> Any:
    """The lens one ``--lens`` names: ``patchscope``, or anything :func:`tl_logitlens.load_lens` resolves
    (a folder or file, ``demo``/``demo-jacobian``, a published ``jlens:``/``tuned:`` name)."""
    if spec == PATCHSCOPE_SPEC:
        from tl_logitlens.analyses.patchscope import PatchscopeLens

        return PatchscopeLens(model)
    from tl_logitlens.lenses import load_lens

    return load_lens(spec, model)


def scored_lenses(specs: Sequence[str], model: Any) -> dict[str, Any]:
    """What ``eval`` and ``faithfulness`` score: the logit lens first, then each ``--lens`` under its
    name, two of one name told apart by what was typed (``"tuned lens (b/)"``)."""
    from tl_logitlens.lenses import lens_name

    lenses: dict[str, Any] = {lens_name(None): None}
    for spec in specs:
        lens = load_lens_spec(spec, model)
        name = str(getattr(lens, "name", spec))
        lenses[name if name not in lenses else f"{name} ({spec})"] = lens
    return lenses


def corpus_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``eval`` and ``faithfulness`` share, as the keywords their functions take."""
    return {
        "sites": args.sites,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "progress": not args.no_progress,
        "seed": args.seed,
        "n_bootstrap": args.bootstrap,
        "text_field": args.text_field,
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": args.checkpoint_every,
    }


def write_site_table(result: Any, args: argparse.Namespace, console: Any) -> None:
    """``--json`` and ``--csv`` of a corpus result (``eval``'s or ``faithfulness``'s), each written whole."""
    if args.json is not None:
        result.to_json(args.json)
        console.print(f"wrote JSON: {args.json}")
    if args.csv is not None:
        from tl_logitlens.core.files import atomic_write

        frame = result.to_dataframe()
        atomic_write(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
        console.print(f"wrote table: {args.csv}")
