"""Per-head attribution of a logit difference: ours vs TransformerLens's route, on the same cache.

    python benchmarks/bench_attribution.py [--batch 16] [--seq 128] [--tl-batch N] [--threads N]

GPT-2-small shape, random weights, one answer/distractor pair per prompt (IOI style). Both read
one precomputed cache, so the forward pass is excluded. TransformerLens's route is
``cache.stack_head_results(pos_slice=...)`` (which first computes every head's output vector,
``[batch, pos, head, d_model]`` per layer, through an elementwise product that briefly holds
``[batch, pos, head, d_head, d_model]``: about 4.8 GB per layer at 16 x 128, for every position
even when only the last is read) followed by ``cache.logit_attrs(...)`` (which applies the
final norm's cached scale and dots with the unembedding difference). Note that
``stack_head_results(apply_ln=True)`` followed by ``logit_attrs`` divides by the scale *twice*;
the route timed here applies it once. Ours contracts the cached ``z`` with the direction pulled
back through ``W_U`` and each ``W_O``, at the read positions only. The numbers are checked to agree
before anything is timed. ``--tl-batch`` times TransformerLens on fewer prompts when the full batch
would not fit in memory (say so when reporting); ours always runs at the full size.
"""

from __future__ import annotations

import argparse

import torch
from _measure import fix_mmap_threshold, gpt2_small_config, measure, print_table, threads
from transformer_lens import HookedTransformer

import tl_logitlens as tl


def tl_route(model, cache, correct, incorrect, last: bool):
    """TransformerLens 3.9's per-head direct logit attribution, ``[layer*head, batch(, pos)]``."""
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):  # head results are cached by TL; recompute them every call
        cache.cache_dict.pop(f"blocks.{layer}.attn.hook_result", None)
    with torch.inference_mode():
        if last:
            stack = cache.stack_head_results(layer=-1, pos_slice=-1)
            out = cache.logit_attrs(stack, correct, incorrect, pos_slice=-1)
        else:
            seq = cache["hook_embed"].shape[1]
            stack = cache.stack_head_results(layer=-1)
            out = cache.logit_attrs(
                stack, correct[:, None].expand(-1, seq), incorrect[:, None].expand(-1, seq)
            )
    for layer in range(n_layers):
        cache.cache_dict.pop(f"blocks.{layer}.attn.hook_result", None)
    return out


def ours(model, tokens, cache, correct, incorrect, last: bool):
    return tl.direct_logit_attribution(
        model, tokens, correct, incorrect, unit="head", per_prompt=True,
        positions="last" if last else None, cache=cache,
    )


def main() -> None:
    fix_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tl-batch", type=int, default=None, help="prompts for TransformerLens's route")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedTransformer(gpt2_small_config()).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq))
    correct = torch.randint(0, model.cfg.d_vocab, (args.batch,))
    incorrect = (correct + 1 + torch.randint(0, 1000, (args.batch,))) % model.cfg.d_vocab
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    tl_b = args.tl_batch or args.batch
    tl_cache = cache if tl_b == args.batch else cache.apply_slice_to_batch_dim(slice(0, tl_b))
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    c_list, i_list = correct.tolist(), incorrect.tolist()

    print(
        f"GPT-2-small shape, random weights; batch {args.batch} x {args.seq} tokens, {n_heads} heads, "
        f"{threads()} threads; TransformerLens route on batch {tl_b}"
    )
    for last in (True, False):
        where = "last position" if last else "all positions"
        # the numbers agree (on TransformerLens's prompts) before anything is timed
        mine = ours(model, tokens, cache, c_list, i_list, last)
        theirs = tl_route(model, tl_cache, correct[:tl_b], incorrect[:tl_b], last)
        grid = mine.grid()[..., 0].reshape(n_heads, args.batch, -1)[:, :tl_b]
        theirs = theirs.reshape(n_heads, tl_b, -1)
        err = float((grid - theirs).abs().max())
        assert err < 1e-3 * (1 + float(theirs.abs().max())), f"{where}: ours and TL differ by {err}"
        assert float(mine.unexplained.abs().max()) < 1e-3, "rows do not add up to the model's logit diff"
        del mine, theirs, grid

        rows = [
            measure(
                f"TL stack_head_results+logit_attrs, b={tl_b}",
                lambda last=last: tl_route(model, tl_cache, correct[:tl_b], incorrect[:tl_b], last),
                repeats=args.repeats,
            ),
            measure(
                f"tl_logitlens unit='head', b={args.batch}",
                lambda last=last: ours(model, tokens, cache, c_list, i_list, last),
                repeats=args.repeats,
            ),
        ]
        print(f"\n{where} (max |ours - TL| = {err:.2e} logits)")
        print_table(rows, baseline=rows[0].name)
        tl_m, our_m = rows
        scale = args.batch / tl_b  # TL's cost grows linearly with the batch
        note = "" if tl_b == args.batch else f" (TL scaled x{scale:g} to the full batch)"
        tl_peak = tl_m.peak_mib * scale
        if our_m.peak_mib >= 1.0:
            mem = f"ours {our_m.peak_mib:.1f} MiB vs TL {tl_peak:.1f} MiB ({tl_peak / our_m.peak_mib:.0f}x less)"
        else:
            mem = f"ours < 1 MiB above baseline (below what RSS sampling resolves) vs TL {tl_peak:.1f} MiB"
        print(f"speed-up: {tl_m.seconds * scale / our_m.seconds:.0f}x   peak memory: {mem}{note}")


if __name__ == "__main__":
    main()
