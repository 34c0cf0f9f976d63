"""Corpus evaluation against its floor: evaluate_lenses vs the model's unpadded forward plus the lens kernel.

    python benchmarks/bench_eval.py [--model stories|gpt2|both] [--docs 40] [--seq-len 512] [--threads 1]
    python benchmarks/bench_eval.py --fresh-processes [--model stories]   # the allocator's effect
    python benchmarks/bench_eval.py --under-load 3 --model stories --docs 10  # OpenMP's wait policy, busy machine

The *floor* is what no evaluator can beat on these windows: every window run through the model with
no padding and no attention mask (windows grouped by exact length, as many per forward as
evaluate_lenses puts in one), keeping the same hooks, then the lens kernel (``unembed_metrics``, the
tiled float32 unembedding that reduces each row to its statistics) over every position. Its two
parts are timed alone too. ``evaluate_lenses`` adds the scheduling, the padding of its pooled short
windows, the float64 sums and a 1000-replicate bootstrap. The *old batching* row is the evaluator
before #26: windows read 4 batches ahead, sorted, batched ``--batch`` at a time, padded to the longest
and run with an attention mask (TransformerLens's masked attention path), plus the same kernel.
*TL forward* and *HF forward* are the forward alone over the floor's batches, without the final
unembedding: TransformerLens's ``run_with_cache(return_type=None)`` keeping the hooks the lens reads
(what evaluate_lenses runs), and the Hugging Face base model with ``output_hidden_states=True`` (the
states tuned-lens reads), so their ratio is TransformerLens's share.

Corpus: TinyStories documents 900.. (held out from the shared tuned lens's training), the logit lens
at every ``resid_pre`` site and ``final_post``. Times are wall clock after the model is loaded, and CPU time
(``_measure.cpu_clock``: with ``--threads 1`` the calling thread's, which a loaded machine inflates far
less), best of ``--repeats`` interleaved rounds (one warm-up round first); peak is resident memory above the
start, one more sampled run (with every block above 1 MiB mmapped, so that resident memory follows
what is live). The allocator is tuned as ``tl-logitlens`` tunes it
(``--default-allocator``: left alone; then TransformerLens's forward pays page faults on every
large buffer, several times over, and every row is slower). The GPT-2-small-shaped model has random weights and GPT-2's real
tokenizer (TransformerLens 3.x only). ``--fresh-processes`` starts a new Python process per run and
times its first forward over the windows with and without :func:`tl_logitlens.cli.commands.tune_allocator`
(and with the ``MALLOC_*_`` environment variables), best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tl_logitlens.cli.commands import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD

sys.path.insert(0, str(Path(__file__).parent))
from _threads import add_under_load, compare_under_load, print_comparison  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CORPUS = SHARED / "corpora" / "tinystories_1000.json"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
FIRST_DOC = 900
OLD_BUFFER_BATCHES = 4


def load(name: str):
    import tl_logitlens as tl

    if name == "stories":
        return tl.load_model(str(STORIES), device="cpu")
    from _measure import gpt2_small_config
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    return HookedTransformer(gpt2_small_config(device="cpu"), tokenizer=tok).eval()


def load_hf(name: str):
    import transformers

    if name == "stories":
        return transformers.AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return transformers.GPT2LMHeadModel(cfg).eval()


def windows_of(model, texts, seq_len):
    from tl_logitlens.core.corpus import document_windows, tokenize_document

    return [document_windows(tokenize_document(model, t, i).ids, seq_len) for i, t in enumerate(texts)]


def exact_batches(docs, seq_len, batch_size):
    """The floor's batches: windows grouped by exact length, up to batch_size * seq_len tokens each."""
    by_length: dict[int, list[list[int]]] = {}
    for windows in docs:
        for w in windows:
            by_length.setdefault(len(w), []).append(w)
    out = []
    for length, ws in sorted(by_length.items(), reverse=True):
        rows = max(1, batch_size * seq_len // length)
        out += [torch.tensor(ws[i : i + rows]) for i in range(0, len(ws), rows)]
    return out


def old_batches(docs, batch_size):
    """The evaluator's batches before #26, as (tokens, mask): read ahead, sorted, padded to the longest."""
    out, pending = [], []

    def flush(final):
        nonlocal pending
        pending.sort(key=lambda w: -len(w))
        while pending and (final or len(pending) >= batch_size):
            chunk, pending = pending[:batch_size], pending[batch_size:]
            width = len(chunk[0])
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, w in enumerate(chunk):
                tokens[i, : len(w)], mask[i, : len(w)] = torch.tensor(w), True
            out.append((tokens, mask))

    for windows in docs:
        pending.extend(windows)
        if len(pending) >= OLD_BUFFER_BATCHES * batch_size:
            flush(False)
    flush(True)
    return out


class Lens:
    """The logit lens's readout and kernel over a cache, as evaluate_lenses calls them."""

    def __init__(self, model):
        from tl_logitlens.core.readout import Readout, resolve_sites
        from tl_logitlens.lenses import LOGIT_LENS

        self.model = model
        self.readout = Readout(model, LOGIT_LENS, "recompute", True)
        self.sites = resolve_sites(model, "resid_pre")
        self.final = resolve_sites(model, ["final_post"])[0]
        self.hooks = sorted(set(self.readout.hooks([*self.sites, self.final])))

    def forward(self, tokens, mask=None):
        wanted = set(self.hooks)
        kwargs = {"return_type": None} if mask is None else {"return_type": None, "attention_mask": mask.long()}
        with torch.inference_mode():
            return self.model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **kwargs)[1]

    def kernel(self, cache, mask):
        from tl_logitlens.core.kernel import Unembedding, unembed_metrics

        b, p = mask.nonzero(as_tuple=True)
        sites, final, r = self.sites, self.final, self.readout
        finals = frozenset(s for s, site in enumerate(sites) if site.hook == final.hook)
        with torch.inference_mode():
            return unembed_metrics(
                lambda s, sl: r.normed(cache, sites[s], b[sl], p[sl]), len(sites),
                lambda sl: r.normed(cache, final, b[sl], p[sl]), finals, torch.zeros(len(b), 1, dtype=torch.long),
                1, 256, Unembedding.from_model(self.model, include_bias=True), "cpu",
            )


def set_thresholds(size: int) -> None:
    """glibc's mmap and trim thresholds (what tl_logitlens.cli.commands.tune_allocator sets, at any size)."""
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, size) and mallopt(_M_TRIM_THRESHOLD, size)):
        raise RuntimeError("mallopt refused the thresholds")


def padding(batches) -> float:
    slots = sum(m.numel() for _, m in batches)
    return 1 - sum(int(m.sum()) for _, m in batches) / slots


def bench_model(name: str, args) -> None:
    from _measure import _peak_rss_above_start, measure_interleaved

    import tl_logitlens as tl

    model = load(name)
    texts = json.loads(CORPUS.read_text(encoding="utf-8"))[FIRST_DOC : FIRST_DOC + args.docs]
    docs = windows_of(model, texts, args.seq_len)
    n_tokens = sum(len(w) for ws in docs for w in ws)
    floor = exact_batches(docs, args.seq_len, args.batch)
    floor_masks = [torch.ones_like(t, dtype=torch.bool) for t in floor]
    old = old_batches(docs, args.batch)
    lens = Lens(model)
    caches = [lens.forward(t) for t in floor]
    hf = load_hf(name)

    def hf_forward():
        with torch.inference_mode():
            for t in floor:
                hf.base_model(t, output_hidden_states=True)  # no logits, as run_cache asks TransformerLens

    last = {}

    def evaluate():
        last["ev"] = tl.evaluate_lenses(model, texts, seq_len=args.seq_len, batch_size=args.batch, progress=False)

    fns = {
        "evaluate_lenses": evaluate,
        "floor: forward + kernel": lambda: [lens.kernel(lens.forward(t), m) for t, m in zip(floor, floor_masks)],
        "old batching (padded, masked)": lambda: [lens.kernel(lens.forward(t, m), m) for t, m in old],
        "TL forward (floor's batches)": lambda: [lens.forward(t) for t in floor],
        "HF forward (floor's batches)": hf_forward,
        "kernel alone": lambda: [lens.kernel(c, m) for c, m in zip(caches, floor_masks)],
    }
    if args.skip_old:
        del fns["old batching (padded, masked)"]
    peaks = None
    if not args.default_allocator:
        # peaks first, every block above 1 MiB mmapped so resident memory follows what is live; then
        # the allocator as tl-logitlens tunes it (freed blocks kept: resident memory no longer shows peaks)
        set_thresholds(1 << 20)
        peaks = {n: _peak_rss_above_start(fn) / 2**20 for n, fn in fns.items()}
        set_thresholds(ALLOCATOR_THRESHOLD)
    rows = measure_interleaved(fns, repeats=args.repeats)
    if peaks is not None:
        for r in rows:
            r.peak_mib = peaks[r.name]
    times = {r.name: r.seconds for r in rows}
    cpu = {r.name: r.cpu_seconds for r in rows}
    base, base_cpu = times["floor: forward + kernel"], cpu["floor: forward + kernel"]
    ev = last["ev"]
    print(f"\n{name}: {len(texts)} documents, {n_tokens:,} tokens in {sum(len(ws) for ws in docs)} windows of at "
          f"most {args.seq_len}; padding: old batching {padding(old):.1%}, evaluate_lenses {ev.padding_fraction:.1%}")
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute average) on {os.cpu_count()} cores")
    print(f"{'':32s} {'wall s':>8s} {'tok/s':>9s} {'x floor':>8s} {'CPU s':>8s} {'x floor':>8s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r.name:32s} {r.seconds:8.3f} {n_tokens / r.seconds:9,.0f} {r.seconds / base:7.2f}x "
              f"{r.cpu_seconds:8.3f} {r.cpu_seconds / base_cpu:7.2f}x {r.peak_mib:9.1f}")
    tl_row, hf_row = "TL forward (floor's batches)", "HF forward (floor's batches)"
    print(f"TransformerLens forward / Hugging Face forward (same unpadded batches): {times[tl_row] / times[hf_row]:.2f}x "
          f"(CPU {cpu[tl_row] / cpu[hf_row]:.2f}x)")


# ------------------------------------------------------------------------------------------------
# the allocator, in fresh processes


def child(name: str, docs_n: int, seq_len: int, batch: int, tune: bool) -> None:
    """One fresh process: load, optionally tune the allocator, time the first forward over the windows."""
    if tune:
        from tl_logitlens.cli.commands import tune_allocator

        assert tune_allocator(), "tune_allocator changed nothing"
    model = load(name)
    texts = json.loads(CORPUS.read_text(encoding="utf-8"))[FIRST_DOC : FIRST_DOC + docs_n]
    batches = exact_batches(windows_of(model, texts, seq_len), seq_len, batch)
    lens = Lens(model)
    c0, t0 = time.process_time(), time.perf_counter()
    for t in batches:
        lens.forward(t)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}))


def fresh_processes(args) -> None:
    runs = {
        "default glibc": ([], {}),
        "tune_allocator() (the CLI)": (["--tune"], {}),
        "MALLOC_*_THRESHOLD_=1 GiB": ([], {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}),
    }
    for name in (["stories", "gpt2"] if args.model == "both" else [args.model]):
        best = dict.fromkeys(runs, float("inf"))
        best_cpu = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for label, (flags, extra) in runs.items():
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                env.update(extra, OMP_NUM_THREADS=str(args.threads or torch.get_num_threads()))
                cmd = [sys.executable, __file__, "--child", "--model", name, "--docs", str(args.docs),
                       "--seq-len", str(args.seq_len), "--batch", str(args.batch), *flags]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                got = json.loads(out.strip().splitlines()[-1])
                best[label] = min(best[label], got["seconds"])
                best_cpu[label] = min(best_cpu[label], got["cpu_seconds"])
        print(f"\n{name}: first forward over {args.docs} documents' windows in a fresh process, best of "
              f"{args.repeats}; load {os.getloadavg()[0]:.1f}; CPU: user + system (page faults are system time)")
        for label, sec in best.items():
            cpu = best_cpu[label]
            print(f"  {label:30s} {sec:8.2f} s  {best['default glibc'] / sec:5.2f}x faster than default;  "
                  f"CPU {cpu:6.2f} s  {best_cpu['default glibc'] / cpu:5.2f}x")


def load_child(name: str, docs_n: int, seq_len: int, batch: int) -> None:
    """One fresh process of ``--under-load``: ``tl.evaluate_lenses`` over the documents, allocator tuned as
    the CLI tunes it, once after a warm-up on the first document; one JSON line (wall and CPU seconds)."""
    import tl_logitlens as tl
    from tl_logitlens.cli.commands import tune_allocator

    tune_allocator()
    model = load(name)
    texts = json.loads(CORPUS.read_text(encoding="utf-8"))[FIRST_DOC : FIRST_DOC + docs_n]
    tl.evaluate_lenses(model, texts[:1], seq_len=seq_len, batch_size=batch, progress=False)
    c0, t0 = time.process_time(), time.perf_counter()
    tl.evaluate_lenses(model, texts, seq_len=seq_len, batch_size=batch, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("stories", "gpt2", "both"), default="both")
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-old", action="store_true", help="leave out the old batching (slow on GPT-2)")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator as it is (default: tune it as tl-logitlens does, see --fresh-processes)",
    )
    parser.add_argument("--fresh-processes", action="store_true", help="the allocator's effect on a fresh process")
    add_under_load(parser, "evaluate_lenses")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load_child:
        load_child(args.model, args.docs, args.seq_len, args.batch)
        return
    if args.under_load:
        name = "stories" if args.model == "both" else args.model
        argv = [__file__, "--load-child", "--model", name, "--docs", str(args.docs), "--seq-len", str(args.seq_len),
                "--batch", str(args.batch)]
        results = compare_under_load(argv, args.under_load)
        print_comparison(f"evaluate_lenses, {name}, {args.docs} documents, windows of {args.seq_len}", results)
        return
    if args.child:
        child(args.model, args.docs, args.seq_len, args.batch, args.tune)
        return
    from _measure import cpu_line

    print(cpu_line())
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute average) on {os.cpu_count()} cores")
    if args.fresh_processes:
        fresh_processes(args)
        return
    print(f"allocator: {'glibc default' if args.default_allocator else 'tuned as tl-logitlens tunes it'}")
    for name in ["stories", "gpt2"] if args.model == "both" else [args.model]:
        bench_model(name, args)


if __name__ == "__main__":
    main()
