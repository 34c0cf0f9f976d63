"""Corpus evaluation throughput: evaluate_lenses vs a plain loop, in 1 and 2 processes.

    python benchmarks/bench_eval.py [--model stories|gpt2|both] [--docs 40] [--seq-len 256] [--device cpu]

The plain loop is what one writes by hand: the same windows and batches, one forward pass keeping
every residual stream, then per site the full ``[batch, pos, d_vocab]`` float32 log-softmax, from
which KL to the final layer, cross-entropy, entropy and top-1 agreement are summed. Both score the
same tokens of TinyStories (``../shared/corpora``) with the logit lens, all sites of ``resid_pre``.
Two processes split the documents (gloo, 127.0.0.1); each gets half the CPU threads. Times are
wall clock after the model is loaded, best of ``--repeats``. The GPT-2-small-shaped model has
random weights and GPT-2's real tokenizer (``../shared/tokenizers/gpt2``); TransformerLens 3.x only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CORPUS = SHARED / "corpora" / "tinystories_1000.json"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"


def load(name: str, device: str):
    import tl_logitlens as tl

    if name == "stories":
        return tl.load_model(str(STORIES), device=device)
    from _measure import gpt2_small_config
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    return HookedTransformer(gpt2_small_config(device=device), tokenizer=tok).eval()


def plain_loop(model, texts, seq_len: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Sums [site, 4] (KL, CE, entropy, agreement) by full log-softmax per site."""
    from tl_logitlens.corpus import document_windows, tokenize_document

    n = model.cfg.n_layers
    hooks = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    windows = []
    for i, text in enumerate(texts):
        if i % world == rank:
            windows += document_windows(tokenize_document(model, text).ids, seq_len)
    sums = torch.zeros(len(hooks), 4, dtype=torch.float64)
    device = model.cfg.device
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for j, w in enumerate(chunk):
            tokens[j, : len(w)] = torch.tensor(w)
            mask[j, : len(w)] = True
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, attention_mask=mask.long(), names_filter=lambda h: h in hooks)
            final = (model.ln_final(cache[hooks[-1]]) @ model.W_U + model.b_U).log_softmax(-1)
            has_next = mask[:, 1:]
            for s, hook in enumerate(hooks):
                lp = (model.ln_final(cache[hook]) @ model.W_U + model.b_U).log_softmax(-1)
                kl = (final.exp() * (final - lp)).sum(-1)
                ent = -(lp.exp() * lp).sum(-1)
                ce = -lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
                agree = (lp.argmax(-1) == final.argmax(-1)).double()
                sums[s, 0] += kl[mask].double().sum().cpu()
                sums[s, 1] += ce[has_next].double().sum().cpu()
                sums[s, 2] += ent[mask].double().sum().cpu()
                sums[s, 3] += agree[mask].sum().cpu()
    return sums


def run_once(model, texts, how: str, seq_len: int, batch: int, rank: int = 0, world: int = 1) -> float:
    import tl_logitlens as tl

    if model.cfg.device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    if how == "evaluate_lenses":
        tl.evaluate_lenses(model, texts, seq_len=seq_len, batch_size=batch, progress=False, n_bootstrap=1000)
    else:
        sums = plain_loop(model, texts, seq_len, batch, rank, world)
        if world > 1:
            torch.distributed.all_reduce(sums)
    if model.cfg.device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(max(1, args["threads"] // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = load(args["model"], "cpu")
    texts = args["texts"]
    times = {}
    for how in ("evaluate_lenses", "plain loop"):
        best = float("inf")
        for _ in range(args["repeats"]):
            dist.barrier()
            best = min(best, run_once(model, texts, how, args["seq_len"], args["batch"], rank, world))
        times[how] = best
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def count_tokens(model, texts) -> int:
    from tl_logitlens.corpus import tokenize_document

    return sum(len(tokenize_document(model, t).ids) for t in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("stories", "gpt2", "both"), default="both")
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    texts = json.loads(CORPUS.read_text(encoding="utf-8"))[: args.docs]
    models = ["stories", "gpt2"] if args.model == "both" else [args.model]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.docs} TinyStories documents, windows of {args.seq_len}, batches of {args.batch}")
    print(f"{'model':<10} {'procs':>5} {'how':<16} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs plain':>8}")
    for name in models:
        model = load(name, args.device)
        n_tokens = count_tokens(model, texts)
        for procs in args.procs:
            if procs == 1:
                times = {}
                for how in ("evaluate_lenses", "plain loop"):
                    run_once(model, texts[:2], how, args.seq_len, args.batch)  # warm-up
                    times[how] = min(run_once(model, texts, how, args.seq_len, args.batch) for _ in range(args.repeats))
            else:
                if args.device != "cpu":
                    continue  # one device here: data-parallel runs need one per process
                import tempfile

                import torch.multiprocessing as mp

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "times.json")
                    spec = {"model": name, "texts": texts, "seq_len": args.seq_len, "batch": args.batch,
                            "repeats": args.repeats, "threads": torch.get_num_threads()}
                    mp.spawn(_worker, args=(procs, port, spec, out), nprocs=procs, join=True)
                    times = json.loads(Path(out).read_text())
            for how, sec in times.items():
                ratio = times["plain loop"] / sec
                print(f"{name:<10} {procs:>5} {how:<16} {n_tokens:>8} {sec:>8.2f} {n_tokens / sec:>9.0f} {ratio:>7.2f}x")


if __name__ == "__main__":
    main()
