"""Fitting the Jacobian lens: ours against TransformerLens 4.3's ``JacobianLens.fit``, and against the floor.

    python benchmarks/bench_jacobian_lens.py [--shape stories|gpt2|both] [--repeats 3] [--gpt2-repeats 1]
                                             [--threads N]
    python benchmarks/bench_jacobian_lens.py --under-load 3 [--repeats 2]   # OpenMP's wait policy on a busy machine

Shapes:

- ``stories``: stories260K (``../shared``), 8 prompts x 64 tokens (TinyStories 0-7, the shared artifact's
  settings: ``seq_len=64``, ``skip_first=16``, every source layer);
- ``gpt2``: a GPT-2-small-shaped random model (``GPT2LMHeadModel(GPT2Config())``: 12 layers, d_model
  768, d_vocab 50257), 1 prompt x 64 tokens (the first TinyStories text of 64 GPT-2 tokens or more).

Rows, on one model, in one process, interleaved, best of ``--repeats``:

- TransformerLens 4.x: on one raw bridge (``TransformerBridge.boot_transformers``, no processing),
  ``tl.fit_jacobian_lens`` (default ``dims_per_pass``), TL 4.3's ``JacobianLens.fit`` at its default
  ``dim_batch=8`` and at ``dim_batch=64``, and the floor;
- TransformerLens 3.9 (no ``JacobianLens``): ``tl.fit_jacobian_lens`` on a ``HookedTransformer`` and on
  3.9's raw bridge holding the same weights, and the floor on each.

The floor is the estimator's work done one row at a time: per prompt one forward pass, then ``d_model``
plain backward passes (a one-hot cotangent at every valid position, gradients to every source layer,
``retain_graph``), nothing accumulated. Times are wall clock and CPU time (``_measure.cpu_clock``: with ``--threads 1``, the
calling thread's, which a loaded machine inflates far less). Every J is checked against the first row's (max abs difference,
and relative Frobenius norm of the difference). Peak memory is resident memory above the level before
each call (``_measure.py``), measured in one more run of each after the timed rounds with glibc set to
mmap every block of 1 MiB or more (``mmap_large_blocks``); the timed rounds run with glibc's default,
which keeps freed blocks for reuse as a long fit does (with every block mmapped, a fit of many small
batches pays a page fault per page of every block, which is not what users see). Calls on the GPT-2
shape take minutes: there every round runs with blocks mmapped, the warm-up round is skipped, memory is
sampled during the timed runs, and ``--gpt2-repeats`` (default 1) sets the rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import cpu_line, load_line, measure_interleaved, mmap_large_blocks, print_table, threads  # noqa: E402
from _threads import add_under_load, compare_under_load, print_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
STORIES_JSON = SHARED / "corpora" / "tinystories_1000.json"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
SEQ_LEN, SKIP_FIRST = 64, 16


def floor(model, texts: list[str]):
    """``d_model`` plain backward passes per prompt: the estimator's FLOPs with no batching."""
    from tl_logitlens.lenses import jacobian_fitting as jf

    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    hooks = [jf.resid_post_hook(model, layer) for layer in range(n_layers - 1)]
    target = jf.resid_post_hook(model, n_layers - 1)

    captured: dict[str, torch.Tensor] = {}

    def run() -> None:
        with jf.frozen_parameters(model):
            for text in texts:
                tokens = model.to_tokens(text, prepend_bos=True, truncate=False)[:, :SEQ_LEN]
                captured.clear()

                def keep(name):
                    def hook(act, hook=None):
                        if name == hooks[0]:
                            act = act.detach().requires_grad_(True)
                        captured[name] = act
                        if name == target:
                            raise jf._Stop
                        return act

                    return hook

                with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep(n)) for n in [*hooks, target]]):
                    try:
                        model(tokens, return_type=None)
                    except jf._Stop:
                        pass
                    out, sources = captured[target], [captured[n] for n in hooks]
                    cotangent = torch.zeros_like(out)
                    for i in range(d_model):
                        cotangent.zero_()
                        cotangent[:, SKIP_FIRST : tokens.shape[1] - 1, i] = 1.0
                        torch.autograd.grad(out, sources, cotangent, retain_graph=True)

    return run


def ours(model, texts: list[str]):
    import tl_logitlens as tl

    return lambda: tl.fit_jacobian_lens(model, texts, seq_len=SEQ_LEN, skip_first=SKIP_FIRST, progress=False)


def transformer_lens_fit(model, texts: list[str], dim_batch: int):
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return JacobianLens.fit(model, texts, corpus="bench", dim_batch=dim_batch, max_seq_len=SEQ_LEN,
                                    skip_first_positions=SKIP_FIRST, show_progress=False)

    return run


def matrices(lens) -> dict[int, torch.Tensor]:
    if hasattr(lens, "jacobians"):
        return lens.jacobians
    return {layer: lens._matrix_on(layer, "cpu").float() for layer in lens.source_layers}


def agreement(a, b) -> str:
    ja, jb = matrices(a), matrices(b)
    assert sorted(ja) == sorted(jb), (sorted(ja), sorted(jb))
    max_abs = max(float((ja[k] - jb[k]).abs().max()) for k in ja)
    rel = max(float((ja[k] - jb[k]).norm() / jb[k].norm()) for k in ja)
    return f"max abs {max_abs:.1e}, relative {rel:.1e}"


def stories_models(tl4: bool):
    import tl_logitlens as tl
    from tl_logitlens.core import compat as _compat
    texts = json.loads(STORIES_JSON.read_text(encoding="utf-8"))[:8]
    bridge = _compat.TransformerBridge.boot_transformers(str(STORIES), device="cpu", dtype=torch.float32).eval()
    models = {"raw bridge": bridge}
    if not tl4:
        models = {"HookedTransformer": tl.load_model(STORIES, fold_ln=False, center_writing_weights=False,
                                                      center_unembed=False), **models}
    return "stories260K, 8 prompts x 64 tokens", texts, models


def gpt2_models(tl4: bool):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import tl_logitlens as tl
    from tl_logitlens.core import compat as _compat
    torch.manual_seed(0)
    config = GPT2Config()
    hf = GPT2LMHeadModel(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    folder = tempfile.mkdtemp(prefix="bench_jlens_gpt2_")  # the bridge reads the config from a folder: offline
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = json.loads(STORIES_JSON.read_text(encoding="utf-8"))
    text = next(t for t in texts if len(tokenizer(t)["input_ids"]) >= SEQ_LEN)
    bridge = _compat.TransformerBridge.boot_transformers(folder, hf_model=hf, device="cpu", dtype=torch.float32)
    models = {"raw bridge": bridge.eval()}
    if not tl4:
        hooked = tl.load_model(hf, tokenizer=tokenizer, fold_ln=False, center_writing_weights=False,
                               center_unembed=False)
        models = {"HookedTransformer": hooked, **models}
    return "GPT-2-small shape (random weights), 1 prompt x 64 tokens", [text], models


def run_shape(shape: str, repeats: int) -> None:
    from tl_logitlens.core import compat as _compat
    tl4 = _compat.HookedTransformer is None
    title, texts, models = (stories_models if shape == "stories" else gpt2_models)(tl4)
    fns = {}
    for name, model in models.items():
        fns[f"ours ({name})"] = ours(model, texts)
    if tl4:
        bridge = models["raw bridge"]
        for dim_batch in (8, 64):
            fns[f"TL 4.3 fit, dim_batch={dim_batch}"] = transformer_lens_fit(bridge, texts, dim_batch)
    for name, model in models.items():
        fns[f"floor ({name}): d_model backward passes"] = floor(model, texts)
    outputs: dict[str, object] = {}

    def keeping(name, fn):
        def run():
            outputs[name] = fn()

        return run

    first = next(iter(fns))
    big = shape == "gpt2"
    if big:  # calls of minutes: page faults of mmapped blocks cost nothing next to them
        mmap_large_blocks()
    rows = measure_interleaved({name: keeping(name, fn) for name, fn in fns.items()}, repeats=repeats,
                               warmup=not big, sample_timed=big, before_peaks=mmap_large_blocks)
    for name, out in outputs.items():
        if out is not None and name != first:
            print(f"J of {name} vs {first}: {agreement(out, outputs[first])}")
    print(f"\n{title}; TransformerLens {_compat.TL_VERSION}; {threads()} threads; {load_line()}")
    print_table(rows, baseline=first)
    by_name = {r.name: r for r in rows}
    ours_row = by_name[first]
    for name, row in by_name.items():
        if name.startswith("TL"):
            print(f"  {name} / ours: time {row.seconds / ours_row.seconds:.2f}x (CPU "
                  f"{row.cpu_seconds / ours_row.cpu_seconds:.2f}x), peak memory "
                  f"{row.peak_mib / max(ours_row.peak_mib, 1e-9):.2f}x")
        if name.startswith("floor"):
            mine = by_name[f"ours ({name[len('floor ('):name.index(')')]})"]
            print(f"  {mine.name} / {name}: {mine.seconds / row.seconds:.2f}x (CPU "
                  f"{mine.cpu_seconds / row.cpu_seconds:.2f}x)")
    print(flush=True)


def load_child(repeats: int) -> None:
    """One fresh process of ``--under-load``: ``tl.fit_jacobian_lens`` on stories260K's raw bridge, a warm-up
    then the best of ``repeats``; one JSON line (wall and CPU seconds)."""
    import time

    from tl_logitlens.core import compat as _compat

    _, texts, models = stories_models(_compat.HookedTransformer is None)
    fit = ours(models["raw bridge"], texts)
    fit()
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fit()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    print(json.dumps({"seconds": best[0], "cpu_seconds": best[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["stories", "gpt2", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds on stories260K (after a warm-up)")
    parser.add_argument("--gpt2-repeats", type=int, default=1, help="timed rounds on the GPT-2 shape (no warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    add_under_load(parser, "ours on stories260K")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.load_child:
        load_child(args.repeats)
        return
    if args.under_load:
        print(cpu_line())
        results = compare_under_load([__file__, "--load-child", "--repeats", str(args.repeats)], args.under_load)
        print_comparison(f"tl.fit_jacobian_lens, stories260K 8 x 64 (best of {args.repeats} per process)", results)
        return
    print(cpu_line())
    for shape in ("stories", "gpt2") if args.shape == "both" else (args.shape,):
        if shape == "stories" and not STORIES.exists():
            print(f"skipping stories260K: {STORIES} is missing")
            continue
        run_shape(shape, args.repeats if shape == "stories" else args.gpt2_repeats)


if __name__ == "__main__":
    main()
