"""Full logit lens vs the matmul floor and a naive per-layer loop, on a GPT-2-small-shaped model.

    python benchmarks/bench_lens.py [--batch 8] [--seq 64]

Times are best of 3 after a warm-up, in one process; peak memory is resident memory above the
level before each call. All three read the same precomputed cache, so the forward pass is excluded.
"""

from __future__ import annotations

import argparse

import torch
from _measure import fix_mmap_threshold, gpt2_small_config, measure, print_table, threads
from transformer_lens import HookedTransformer

import tl_logitlens as tl
from tl_logitlens.lens import DEFAULT_CHUNK_SIZE


def naive_lens(model, cache, tokens, top_k=5):
    """The obvious way: one full ``[batch, pos, d_vocab]`` log-softmax per site, kept for KL."""
    stack = cache.accumulated_resid()
    final = model.ln_final(stack[-1]) @ model.W_U + model.b_U
    final_lp = final.log_softmax(-1)
    out = []
    nxt = tokens[:, 1:]
    for x in stack:
        lp = (model.ln_final(x) @ model.W_U + model.b_U).log_softmax(-1)
        top = lp.topk(top_k, dim=-1)
        entropy = -(lp.exp() * lp).sum(-1)
        kl = (final_lp.exp() * (final_lp - lp)).sum(-1)
        next_lp = lp[:, :-1].gather(-1, nxt[..., None])
        rank = 1 + (lp[:, :-1] > next_lp).sum(-1)
        out.append((top, entropy, kl, next_lp, rank))
    return out


def main() -> None:
    fix_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = HookedTransformer(gpt2_small_config()).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    rows = args.batch * args.seq
    n_sites = model.cfg.n_layers + 1
    x = torch.randn(rows, model.cfg.d_model)
    W_U = model.W_U.detach()

    def floor():
        return [x @ W_U for _ in range(n_sites)]

    def ours(chunk_size=DEFAULT_CHUNK_SIZE):
        return lambda: tl.logit_lens(model, tokens, cache=cache, top_k=5, chunk_size=chunk_size)

    def naive():
        with torch.inference_mode():
            return naive_lens(model, cache, tokens)

    print(f"GPT-2-small shape, random weights; batch {args.batch} x {args.seq} tokens, "
          f"{n_sites} sites, {threads()} threads")
    results = [
        measure(f"floor: {n_sites} x [{rows},768]@[768,50257]", floor),
        measure(f"logit_lens (chunk_size={DEFAULT_CHUNK_SIZE}, default)", ours()),
        measure("naive per-layer full log-softmax loop", naive),
        measure("logit_lens (chunk_size=32, lean)", ours(32)),
        measure("logit_lens (chunk_size=512)", ours(512)),
    ]
    print_table(results, baseline=results[0].name)
    ours_m, naive_m = results[1], results[2]
    print(f"\nlogit_lens / floor time: {ours_m.seconds / results[0].seconds:.2f}x   "
          f"naive / logit_lens time: {naive_m.seconds / ours_m.seconds:.2f}x   "
          f"logit_lens peak memory: {ours_m.peak_mib / naive_m.peak_mib:.1%} of naive")


if __name__ == "__main__":
    main()
