"""``tl-logitlens fit jacobian|tuned``: fit a Jacobian lens or train a tuned lens from the terminal and
save it, also under ``torchrun`` (the J-lens fit deals the prompts across processes and sums their
float64 sums; training sums every step's gradients across processes; rank 0 alone writes and prints).

Each command is :func:`tl.fit_jacobian_lens` or :func:`tl.train_tuned_lens` with the options typed, so
the lens written equals the library call's with the same options, bit for bit in one process. What
was typed is checked before torch loads: numbers (finite, in range), the corpus file, and where the
lens goes (a folder that holds another kind of lens is refused, since the save keeps the files it
does not write and the folder would then load as the other lens).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tl_logitlens.cli import shared
from tl_logitlens.core.corpus import MAX_TOKENIZED_CHARS

# the files each lens format writes into its folder (tl_logitlens.lenses.{tuned,jacobian}: STEM, WEIGHTS_FILE,
# CONFIG_FILE, TUNED_LENS_CONFIG, TUNED_LENS_PARAMS; named here so the checks need no torch)
LENS_FILES = {
    "jacobian": ("jacobian_lens.safetensors", "jacobian_lens.json"),
    "tl_logitlens": ("tuned_lens.safetensors", "tuned_lens.json"),
    "tuned-lens": ("config.json", "params.pt"),
}
REFERENCE_SUFFIX = ".pt"  # fit jacobian --out X.pt: the J-lens reference format
TUNED_FORMATS = ("tl_logitlens", "tuned-lens")
# formats other tools read, as the model's raw residual stream (no record of TransformerLens's centring)
FOREIGN_FORMATS = ("jlens", "tuned-lens")
# tl.fit_jacobian_lens's and tl.train_tuned_lens's defaults, as --help states them (a test compares them)
JACOBIAN_DEFAULTS = {"seq_len": 128, "skip_first": 16, "batch_size": 8, "checkpoint_every": 256}
TUNED_DEFAULTS = {
    "tokens_per_step": 2**13, "lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "warmup_steps": 0,
    "grad_clip": 1.0, "seed": 0, "checkpoint_every": 100,
}
DEVICE_HELP = "TransformerLens's choice; under torchrun each rank gets cuda:LOCAL_RANK when CUDA is there"


def _real(low: float, high: float | None = None, *, above: bool = False, below: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` (excluded when ``above``) to ``high`` (excluded
    when ``below``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if above else 'at least'} {low:g}")
        if high is not None and (value > high or (below and value == high)):
            raise argparse.ArgumentTypeError(f"{text} must be {'below' if below else 'at most'} {high:g}")
        return value

    return parse


def _common(p: argparse.ArgumentParser, out_help: str, seq_len_help: str, batch_help: str, every_help: str) -> None:
    """What both fit commands take: the model and device, the corpus, where the lens goes, the sizes,
    the checkpoint, threads and the progress bar."""
    shared._model_and_device(p, DEVICE_HELP)
    p.add_argument("--texts", metavar="FILE|demo", required=True, help=f"the texts to fit on: {shared.TEXTS_HELP}")
    p.add_argument("--out", metavar="PATH", required=True, help=out_help)
    p.add_argument("--seq-len", type=shared._positive, metavar="N", help=seq_len_help)
    p.add_argument("--batch-size", type=shared._positive, metavar="N", help=batch_help)
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the state in DIR as it goes, and resume from DIR when it holds a checkpoint of the same "
        "settings and texts (a finished one returns its lens at once; other settings are refused)",
    )
    p.add_argument("--checkpoint-every", type=shared._positive, metavar="N", help=every_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")
    shared._threads(p)


def _add_jacobian(sub: Any) -> None:
    d = JACOBIAN_DEFAULTS
    p = sub.add_parser(
        "jacobian",
        help="fit a Jacobian lens (J-lens)",
        description=(
            "Fit a Jacobian lens on MODEL (tl.fit_jacobian_lens): for each source layer l, J_l, the mean over "
            "prompts and positions of the Jacobian of the last block's output with respect to block l's "
            "output; the lens reads W_U final_norm(J_l h_l) at resid_post sites. Exact, float64 sums, "
            "deterministic. Each text is one prompt, BOS included, cut to --seq-len tokens; a prompt with no "
            "position after its first --skip-first and before its last is skipped. Under torchrun the "
            "prompts are dealt across processes and their sums added: the same lens as one process."
        ),
        epilog=(
            "examples:\n"
            f"  {shared.PROG} fit jacobian demo --texts demo --seq-len 64 --out demo-j.pt\n"
            "  torchrun --nproc-per-node 4 -m tl_logitlens fit jacobian gpt2 \\\n"
            "      --texts corpus.jsonl --out gpt2-jlens"
        ),
        formatter_class=shared._Formatter,
    )
    _common(
        p,
        out_help="a file ending in .pt: the J-lens reference format (TransformerLens 4.3's JacobianLens.load "
        "and anthropics/jacobian-lens read it), fitted on the model loaded with center_writing_weights=False, "
        "the raw stream those tools read; anything else: a folder in this package's format (safetensors + "
        "JSON, with the model's fingerprint). Either loads with tl.load_lens(PATH, model). An existing lens "
        "there is replaced, whole, once the fit is done",
        seq_len_help=f"tokens per prompt at most, BOS included (default {d['seq_len']})",
        batch_help=f"prompts of equal length per forward pass (default {d['batch_size']})",
        every_help=f"texts between checkpoints (default {d['checkpoint_every']}; with --checkpoint-dir; under "
        "torchrun one checkpoint per rank, in DIR/rankR-of-N)",
    )
    p.add_argument(
        "--skip-first",
        type=shared._natural,
        metavar="N",
        help=f"leading positions left out of the sources and targets (default {d['skip_first']})",
    )
    p.add_argument(
        "--layers",
        type=shared._natural,
        nargs="+",
        metavar="L",
        help="source layers, block indices from 0 to n_layers - 2 (default: every block below the last, "
        "which reads with the identity)",
    )
    p.add_argument("--max-prompts", type=shared._positive, metavar="N", help="use only the first N texts (default: all)")


def _add_tuned(sub: Any) -> None:
    d = TUNED_DEFAULTS
    p = sub.add_parser(
        "tuned",
        help="train a tuned lens",
        description=(
            "Train a tuned lens on MODEL (tl.train_tuned_lens): one affine translator per layer, minimising "
            "KL(final || lens) over the resid_pre sites, the model frozen; SGD with Nesterov momentum, as "
            "tuned-lens 0.2.0 trains. The texts are packed into windows of --seq-len tokens, each starting "
            "with BOS. Under torchrun every step's windows are dealt across processes and the gradients "
            "summed: the same lens as one process."
        ),
        epilog=(
            "examples:\n"
            f"  {shared.PROG} fit tuned demo --texts demo --steps 50 --out demo-tuned\n"
            "  torchrun --nproc-per-node 4 -m tl_logitlens fit tuned gpt2 \\\n"
            "      --texts corpus.jsonl --steps 250 --out gpt2-tuned"
        ),
        formatter_class=shared._Formatter,
    )
    _common(
        p,
        out_help="the folder to save the lens in (this package's format, or tuned-lens 0.2.0's with --format "
        "tuned-lens); load it with tl.load_lens(DIR, model). An existing lens there is replaced, whole, "
        "once training is done",
        seq_len_help="tokens per window, BOS included (default: the model's context)",
        batch_help="windows per forward pass (default: as many as fit in 2048 tokens); gradients are "
        "accumulated over a step",
        every_help=f"steps between checkpoints (default {d['checkpoint_every']}; with --checkpoint-dir)",
    )
    p.add_argument(
        "--format",
        choices=TUNED_FORMATS,
        default=TUNED_FORMATS[0],
        help="tl_logitlens (default: safetensors + JSON, with the model's fingerprint) or tuned-lens "
        "(tuned-lens 0.2.0's config.json + params.pt, to use the lens there; trained on the model loaded "
        "with center_writing_weights=False, the raw stream tuned-lens reads)",
    )
    p.add_argument("--steps", type=shared._positive, metavar="N", help="optimiser steps (default: one pass over the windows)")
    p.add_argument(
        "--tokens-per-step",
        type=shared._positive,
        default=d["tokens_per_step"],
        metavar="N",
        help=f"tokens per step, in whole windows, at least one (default {d['tokens_per_step']})",
    )
    p.add_argument("--lr", type=_real(0.0, 1e38, above=True), default=d["lr"], metavar="X", help=f"learning rate (default {d['lr']:g})")
    p.add_argument(
        "--momentum",
        type=_real(0.0, 1.0, below=True),
        default=d["momentum"],
        metavar="X",
        help=f"Nesterov momentum, from 0 up to 1 excluded (default {d['momentum']:g})",
    )
    p.add_argument(
        "--weight-decay",
        type=_real(0.0, 1e38),
        default=d["weight_decay"],
        metavar="X",
        help=f"weight decay towards the identity translator (default {d['weight_decay']:g})",
    )
    p.add_argument(
        "--warmup-steps",
        type=shared._natural,
        default=d["warmup_steps"],
        metavar="N",
        help=f"steps of linear warm-up before the linear decay to zero (default {d['warmup_steps']})",
    )
    p.add_argument(
        "--grad-clip",
        type=_real(0.0, above=True),
        default=d["grad_clip"],
        metavar="X",
        help=f"largest gradient norm (default {d['grad_clip']:g})",
    )
    p.add_argument("--seed", type=shared._natural, default=d["seed"], metavar="N", help=f"the window order's seed (default {d['seed']})")
    p.add_argument("--max-prompts", type=shared._positive, metavar="N", help="use only the first N texts (default: all)")
    shared._max_tokens(p, f"; needed for a text over {MAX_TOKENIZED_CHARS:,} characters, never tokenised whole")


def _add_fit(sub: Any) -> None:
    fit = sub.add_parser(
        "fit",
        help="fit a Jacobian lens or train a tuned lens on a corpus, and save it",
        description="Fit a lens on MODEL over a corpus and save it (also under torchrun).",
        epilog=f"'{shared.PROG} fit jacobian --help' and '{shared.PROG} fit tuned --help' list their options.",
        formatter_class=shared._Formatter,
    )
    kinds = fit.add_subparsers(dest="kind", metavar="KIND", help="jacobian or tuned", parser_class=type(fit))
    kinds.required = True
    _add_jacobian(kinds)
    _add_tuned(kinds)


# ------------------------------------------------------------------------------------------------


def _check_folder_out(path: str, writes: str) -> None:
    """--out as a lens folder: not a file, in a folder that exists, holding no sub-folder and no file of
    another lens format (``writes`` is the format written)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise shared.UsageError(f"--out {path!r} is a file; this lens is saved as a folder, give a folder path")
    if not p.parent.is_dir():
        raise shared.UsageError(f"the folder for --out {path!r} does not exist; create it first")
    if not p.is_dir():
        return
    for entry in sorted(p.iterdir()):
        if entry.is_dir():
            raise shared.UsageError(f"--out {path!r} holds a folder ({entry.name}); save the lens into a new or empty folder")
        other = [kind for kind, names in LENS_FILES.items() if kind != writes and entry.name in names]
        if other:
            raise shared.UsageError(
                f"--out {path!r} holds {entry.name}, a file of another lens format, which the save would keep "
                "beside the new lens; give a new or empty folder"
            )


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options the user typed (None: left to the library's default)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _fit_command(args: argparse.Namespace) -> int:
    """``fit jacobian`` and ``fit tuned``: the checks, then the fit, then (rank 0) the save and a summary."""
    texts = shared._texts(args.texts)
    jacobian = args.kind == "jacobian"
    if jacobian and args.out.lower().endswith(REFERENCE_SUFFIX):
        shared._check_out(args.out, (REFERENCE_SUFFIX,), "--out")
    elif not jacobian and args.out.lower().endswith(REFERENCE_SUFFIX):
        raise shared.UsageError(f"--out {args.out!r}: a tuned lens is saved as a folder; give a folder name, not a .pt file")
    else:
        _check_folder_out(args.out, "jacobian" if jacobian else args.format)
    shared._check_checkpoint_dir(args.checkpoint_dir)
    # torch loads from here on: every mistake in what was typed is reported before it
    shared.check_device(args.device)
    shared._apply_threads(args)
    with shared._process_group(args.device) as (world, device):
        console, err = shared._consoles()
        fmt = ("jlens" if args.out.lower().endswith(REFERENCE_SUFFIX) else "tl_logitlens") if jacobian else args.format
        # the other tools' formats carry no record of TransformerLens's centring and are read as the raw
        # (Hugging Face) stream: fit on that stream, so the file means there what it means here
        options = {"center_writing_weights": False} if fmt in FOREIGN_FORMATS else {}
        model = shared._load(args.model, device, err, **options)
        progress = not args.no_progress and sys.stderr.isatty()
        lens = (_fit_jacobian if jacobian else _train_tuned)(model, texts, args, progress)
        if not world.is_main:
            return 0
        written = lens.save(args.out, format=fmt)
        for line in _summary(lens, args, world.size):
            console.print(line, markup=False, highlight=False)
        what = {"jlens": "the J-lens reference format", "tuned-lens": "tuned-lens 0.2.0's format"}.get(fmt, "a folder")
        console.print(f"wrote {written} ({what})", markup=False, highlight=False)
        for line in _how_to_load(args, lens, options):
            console.print(line, markup=False, highlight=False)
    return 0


def _fit_jacobian(model: Any, texts: Any, args: argparse.Namespace, progress: bool) -> Any:
    from tl_logitlens.lenses.jacobian_fitting import fit_jacobian_lens

    options = _given(args, ("seq_len", "skip_first", "layers", "max_prompts", "batch_size", "checkpoint_every"))
    with warnings.catch_warnings():
        # the summary says how many prompts were too short
        warnings.filterwarnings("ignore", message=r".* prompts had no valid position", category=UserWarning)
        return fit_jacobian_lens(
            model, texts, progress=progress, checkpoint_dir=args.checkpoint_dir, **options
        )


def _train_tuned(model: Any, texts: Any, args: argparse.Namespace, progress: bool) -> Any:
    from tl_logitlens.lenses.tuned_training import train_tuned_lens

    options = _given(
        args,
        ("steps", "tokens_per_step", "seq_len", "lr", "momentum", "weight_decay", "warmup_steps", "grad_clip",
         "batch_size", "seed", "checkpoint_every", "max_prompts", "max_tokens"),
    )
    return train_tuned_lens(model, texts, progress=progress, checkpoint_dir=args.checkpoint_dir, **options)


def _how_to_load(args: argparse.Namespace, lens: Any, options: dict[str, Any]) -> list[str]:
    """How to use the lens written: from Python and, where the model loads as the CLI loads it, with
    ``run`` (a Jacobian lens reads the outputs of its source layers and of the last block)."""
    sites = ""
    if args.kind == "jacobian":
        every = tuple(lens.source_layers) == tuple(range(lens.n_layers - 1))
        labels = [*(f"{layer}_post" for layer in lens.source_layers), "final_post"]
        sites = " --sites " + ("resid_post" if every else " ".join(labels))
    if not options:
        return [
            f"load it with tl.load_lens({args.out!r}, model), or use it with",
            f"  {shared.PROG} run {args.model} PROMPT --lens {args.out}{sites}",
        ]
    model = f"tl.load_model({args.model!r}, {', '.join(f'{k}={v!r}' for k, v in options.items())})"
    return [
        "fitted on the uncentred stream, as other tools read this format; load it with",
        f"  tl.load_lens({args.out!r}, {model})",
    ]


def _spans(values: Any) -> str:
    """Sorted ints as short runs: 0-3, 5, 7-9."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _summary(lens: Any, args: argparse.Namespace, world_size: int) -> list[str]:
    """What was fitted, in two lines."""
    processes = f" ({world_size} processes)" if world_size > 1 else ""
    model = lens.meta.get("model_name", args.model)
    if args.kind == "jacobian":
        meta, fit = lens.meta, lens.meta["fit"]
        return [
            f"Jacobian lens of {model}{processes}: source layers {_spans(lens.source_layers)} of {lens.n_layers} blocks",
            f"  {lens.n_prompts} prompts averaged of {meta['texts_read']} texts read; {meta['skipped_prompts']} too "
            f"short ({fit['skip_first'] + 1} tokens or fewer)",
        ]
    training = lens.meta["training"]
    losses = training["loss_per_step"]
    return [
        f"tuned lens of {model}{processes}: {training['steps']} steps of {training['tokens_per_step']} tokens, "
        f"from {training['windows']} windows of {training['seq_len']}",
        f"  loss, KL(final || lens) summed over sites: {losses[0]:.4f} -> {losses[-1]:.4f} nats/token",
    ]
