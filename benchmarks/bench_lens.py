"""Full logit lens vs the matmul floor and a naive per-layer loop, on a GPT-2-small-shaped model.

    python benchmarks/bench_lens.py [--batch 8] [--seq 64] [--dtypes float32 bfloat16] [--threads N]
                                 [--repeats 3]

For each model dtype: the floor is ``n_sites`` bare ``[rows, 768] @ [768, 50257]`` matmuls of that
dtype, the least any lens can cost; ``logit_lens`` is the public entry point as it is wired;
``unembed_metrics`` is the vocabulary-tiled kernel fed the normalised states (the call ``logit_lens``
makes once it passes states rather than logits). All read the same precomputed cache, so the forward
pass is excluded. ``unembed_metrics, NaN check off`` is the same kernel with
``_kernel.check_finite`` (three ``isfinite`` reductions over ``[site, row]`` values per block) made a
no-op: the last line gives the check's cost. Times are best of ``--repeats``, run round-robin after a warm-up round in one process (the
machine may be shared); peak memory is resident memory above the level before each call. The first line names the CPU and its AMX / AVX-512
flags: the fp32 and bf16 floors, and so every ratio, depend on them.
"""

from __future__ import annotations

import argparse

import torch
from _measure import (
    cpu_line,
    fix_mmap_threshold,
    gpt2_small_config,
    load_line,
    measure_interleaved,
    print_table,
    threads,
)
from transformer_lens import HookedTransformer

import tl_logitlens as tl
from tl_logitlens.analyses.predictions import DEFAULT_CHUNK_SIZE
from tl_logitlens.core import kernel as _kernel
from tl_logitlens.core.kernel import Unembedding, unembed_metrics
from tl_logitlens.core.readout import Readout, Site, resolve_sites
from tl_logitlens.lenses import resolve_lens


def naive_lens(model, cache, tokens, top_k=5):
    """The obvious way: one full ``[batch, pos, d_vocab]`` log-softmax per site, kept for KL."""
    stack = cache.accumulated_resid()
    final = model.ln_final(stack[-1]) @ model.W_U + model.b_U
    final_lp = final.float().log_softmax(-1)
    out = []
    nxt = tokens[:, 1:]
    for x in stack:
        lp = (model.ln_final(x) @ model.W_U + model.b_U).float().log_softmax(-1)
        top = lp.topk(top_k, dim=-1)
        entropy = -(lp.exp() * lp).sum(-1)
        kl = (final_lp.exp() * (final_lp - lp)).sum(-1)
        next_lp = lp[:, :-1].gather(-1, nxt[..., None])
        rank = 1 + (lp[:, :-1] > next_lp).sum(-1)
        out.append((top, entropy, kl, next_lp, rank))
    return out


def kernel_calls(model, cache, tokens, top_k=5):
    """The lens's kernel fed as ``logit_lens`` feeds it: every position, the next token as the query."""
    readout = Readout(model, resolve_lens(model, None), "recompute", True)
    sites = resolve_sites(model, "resid_pre")
    final = Site("final_post", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    n_batch, n_pos = tokens.shape
    rows_b = torch.arange(n_batch).repeat_interleave(n_pos)
    rows_p = torch.arange(n_pos).repeat(n_batch)
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], 1).reshape(-1, 1)
    final_sites = frozenset(s for s, site in enumerate(sites) if site.hook == final.hook)
    unembedding = Unembedding.from_model(model, include_bias=True)

    def tiled(chunk_size=DEFAULT_CHUNK_SIZE):
        return lambda: unembed_metrics(
            lambda s, sl: readout.normed(cache, sites[s], rows_b[sl], rows_p[sl]), len(sites),
            lambda sl: readout.normed(cache, final, rows_b[sl], rows_p[sl]), final_sites, nxt, top_k,
            chunk_size, unembedding, "cpu",
        )

    return tiled


def without_finite_check(fn):
    """``fn`` with the kernel's NaN/inf check (``_kernel.check_finite``) replaced by a no-op."""

    def run():
        real = _kernel.check_finite
        _kernel.check_finite = lambda *args: None
        try:
            return fn()
        finally:
            _kernel.check_finite = real

    return run


def bench_dtype(dtype: torch.dtype, args) -> list:
    torch.manual_seed(0)
    model = HookedTransformer(gpt2_small_config(dtype=dtype)).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    rows = args.batch * args.seq
    n_sites = model.cfg.n_layers + 1
    x = torch.randn(rows, model.cfg.d_model, dtype=dtype)
    W_U = model.W_U.detach()
    tiled = kernel_calls(model, cache, tokens)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))

    def floor():
        return [x @ W_U for _ in range(n_sites)]

    def lens():
        return tl.logit_lens(model, tokens, cache=cache, top_k=5)

    def naive():
        with torch.inference_mode():
            return naive_lens(model, cache, tokens)

    fns = {
        f"{name} floor {n_sites}x[{rows},768]@[768,50257]": floor,
        f"{name} unembed_metrics (tiled)": tiled(),
        f"{name} logit_lens (as wired)": lens,
        f"{name} unembed_metrics, NaN check off": without_finite_check(tiled()),
    }
    if args.all:
        fns[f"{name} unembed_metrics chunk_size=32"] = tiled(32)
        fns[f"{name} naive full log-softmax loop"] = naive
    return measure_interleaved(fns, repeats=args.repeats)


def main() -> None:
    fix_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                        help="default: float32, and bfloat16 where the CPU has AVX-512 BF16 or AMX")
    parser.add_argument("--all", action="store_true", help="also time chunk_size=32 and the naive loop")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up), best taken")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    line = cpu_line()
    print(line)
    if args.dtypes is None:
        # without AVX-512 BF16 or AMX, torch's CPU bf16 matmul runs below 1 GFLOP/s (one floor matmul
        # took 61 s on the AMD EPYC of this project's machines), so the bf16 rows would take hours
        native_bf16 = "AVX-512 BF16 yes" in line or "AMX yes" in line
        args.dtypes = ["float32", "bfloat16"] if native_bf16 else ["float32"]
        if not native_bf16:
            print("bfloat16 rows skipped: this CPU has neither AVX-512 BF16 nor AMX (pass --dtypes bfloat16 to force)")
    print(f"GPT-2-small shape, random weights; batch {args.batch} x {args.seq} tokens, 13 sites, "
          f"{threads()} threads; best of {args.repeats}, interleaved")
    for dtype in args.dtypes:
        results = bench_dtype(getattr(torch, dtype), args)
        print(f"\n{load_line()}")
        print_table(results, baseline=results[0].name)
        floor, tiled, lens, unchecked = results[0], results[1], results[2], results[3]
        print(f"{dtype}: unembed_metrics / floor {tiled.seconds / floor.seconds:.2f}x, "
              f"logit_lens / floor {lens.seconds / floor.seconds:.2f}x, "
              f"NaN/inf check: with / without {tiled.seconds / unchecked.seconds:.3f}x "
              f"(CPU {tiled.cpu_seconds / unchecked.cpu_seconds:.3f}x)")


if __name__ == "__main__":
    main()
