"""What a word-level target costs: ``tl.logit_lens`` with token sets against the same tokens as separate
targets, no targets, and the naive way (the whole log-softmax kept, the sets summed from it), in one process
(interleaved, best of N).

- ``no targets``: the lens alone (top-k, entropy, KL to the final layer, next-token rank);
- ``4 token sets``: four words, each ``tl.token_set`` of its four default spellings, as four targets;
- ``same tokens, separate``: every token of the four sets as its own target (what a set adds is the reduction);
- ``full log-probs, summed``: ``keep_logprobs=True`` and the sets' probabilities summed from the
  ``[site, batch, pos, d_vocab]`` tensor (as nnterp's ``get_target_probs`` reads a full distribution).

Model: the built-in demo model (GPT-2 architecture, 4 layers, d_vocab 4096) or ``--model PATH``. Run:
``PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_token_sets.py [--repeats 5] [--prompts 16]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import cpu_line, load_line, measure_interleaved, print_table  # noqa: E402

import tl_logitlens as tl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tl.load_model(args.model)
    prompts = [t[:160] for t in tl.demo_texts()[: args.prompts]]
    sets = [tl.token_set(model, [w]) for w in ("park", "happy", "dog", "ball")]
    flat = [i for s in sets for i in s.ids]
    ids = [torch.tensor(s.ids) for s in sets]

    def naive() -> torch.Tensor:
        full = tl.logit_lens(model, prompts, keep_logprobs=True).full_logprobs
        return torch.stack([full[..., i].logsumexp(-1) for i in ids], -1)

    fns = {
        "no targets": lambda: tl.logit_lens(model, prompts),
        "4 token sets": lambda: tl.logit_lens(model, prompts, targets=sets),
        f"same {len(flat)} tokens, separate": lambda: tl.logit_lens(model, prompts, targets=flat),
        "full log-probs, summed": naive,
    }
    print(cpu_line())
    print(load_line())
    print(f"model {args.model}: d_vocab {model.cfg.d_vocab}; {len(prompts)} prompts; sets of {[len(s) for s in sets]} tokens")
    print_table(measure_interleaved(fns, repeats=args.repeats), "no targets")
    a = tl.logit_lens(model, prompts, targets=sets)
    b = naive()
    err = (a.target_logprobs - b)[:, a.valid].abs().max().item()
    print(f"max |log P(set)| difference, sets vs the full log-softmax: {err:.2e} nats")


if __name__ == "__main__":
    main()
