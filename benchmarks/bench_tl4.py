"""Our logit lens vs TransformerLens 4.x's own ``tools.analysis.logit_lens``, on one bridge.

    python benchmarks/bench_tl4.py [--batch 4] [--seq 64]        (TransformerLens 4.x only)

A GPT-2-small-shaped TL-native bridge (random weights, folded with ``enable_compatibility_mode``).
Both read the same precomputed cache over every position and site. Ours computes top-5, entropy,
KL to the final layer and the next token's log-prob and rank; theirs is run twice, as it takes one
selector per call: top-5 (with entropy) and the next token as per-row targets (log-prob and rank).
Times are best of 3 after a warm-up, in one process; peak memory is resident memory above the level
before each call (benchmarks/_measure.py).
"""

from __future__ import annotations

import argparse

import torch
from _measure import fix_mmap_threshold, measure, print_table, threads

import tl_logitlens as tl
from tl_logitlens.core import compat as _compat


def gpt2_small_bridge():
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN", seed=0, device="cpu",
    )
    bridge = _compat.TransformerBridge.boot_native(cfg, device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def main() -> None:
    fix_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    try:
        from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens
    except ImportError:
        raise SystemExit(f"TransformerLens {_compat.TL_VERSION} has no tools.analysis.logit_lens; run with 4.x") from None
    torch.manual_seed(0)
    model = gpt2_small_bridge()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    next_ids = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # per-row targets, one per position

    def ours(chunk_size=128):
        return lambda: tl.logit_lens(model, tokens, cache=cache, top_k=5, chunk_size=chunk_size)

    def theirs_top():
        return tl_logit_lens(model, cache=cache, positions=None, top_k=5, return_type="log_probs")

    def theirs_both():
        top = theirs_top()
        nxt = tl_logit_lens(model, cache=cache, positions=None, targets=next_ids, return_type="log_probs")
        return top, nxt

    a, b = ours()(), theirs_top()  # same numbers before timing them
    torch.testing.assert_close(a.top_logprobs, b.readout.values, atol=1e-4, rtol=0)

    n_sites = model.cfg.n_layers + 1
    print(f"TransformerLens {_compat.TL_VERSION}; GPT-2-small-shaped bridge, random weights; "
          f"batch {args.batch} x {args.seq} tokens, {n_sites} sites, {threads()} threads")
    results = [
        measure("tl_logitlens.logit_lens (all metrics)", ours()),
        measure("tl_logitlens.logit_lens (chunk_size=64)", ours(64)),
        measure("TL 4.x logit_lens (top-5 + entropy)", theirs_top),
        measure("TL 4.x logit_lens (top-5, then next-token)", theirs_both),
    ]
    print_table(results, baseline=results[0].name)
    print(f"\nTL 4.x (top-5 + next token, two calls) / ours: time {results[3].seconds / results[0].seconds:.2f}x; "
          f"peak MiB ours {results[0].peak_mib:.0f} (chunk 128), {results[1].peak_mib:.0f} (chunk 64), "
          f"TL {results[3].peak_mib:.0f} (chunk 64). Ours also gives KL to the final layer, which TL's does not.")


if __name__ == "__main__":
    main()
