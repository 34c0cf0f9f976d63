"""Patchscope over every layer: ``tl.patchscope`` against nnterp 1.3.0's ``patchscope_lens``, same model,
prompts and layers, in one process (interleaved, best of N).

Both patch the last token's output of every layer into the identity prompt
(``"king king\\n1135 1135\\nhello hello\\n?"``, at ``"?"``) and read the next-token distribution there:

- ``nnterp patchscope_lens``: one nnsight trace of the target prompts per layer, full probabilities
  ``[prompt, layer, d_vocab]`` returned;
- ``tl.patchscope``: one forward pass of the sources, the target's tokens before the patch position run once
  into a frozen key-value cache, then every (layer, prompt) row's patched token in one stacked forward pass;
  reduced by the lens kernel to top-k, entropy, KL to the final layer and next-token rank;
- ``tl.patchscope (full log-probs)``: the same with ``keep_logprobs=True``, the whole distribution kept as
  nnterp returns it.

Models: the shared stories260K (``../shared``) and GPT-2 small's shape with random weights (written once to a
temporary folder, so both libraries load the very same checkpoint). The probabilities of the two are compared
too (one prompt at a time: nnterp pads on the left, which moves GPT-2's absolute positions).

Needs TransformerLens 3.9 (``HookedTransformer``) and nnterp in one environment, e.g. a side venv:
``pip install torch==2.13.0; pip install nnterp==1.3.0 "nnsight>=0.6,<0.7" transformer_lens==3.9.0``, then
``PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_patchscope.py [--repeats 3] [--prompts 8]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import cpu_line, load_line, measure_interleaved, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
PROMPTS = [
    "Once upon a time, there was a little",
    "She loved to play outside in the",
    "The cat sat on the mat and looked at the big red",
    "Tom and Anna went to the shop to buy some",
    "The sun was warm and the birds sang in the tall green",
    "Lily had a toy car that she liked to",
    "One day, a little boy named Tim found a",
    "The dog ran fast to catch the",
]


def random_gpt2_folder(folder: Path) -> Path:
    """GPT-2 small's shape with random weights (seed 0) and the real GPT-2 tokenizer, as a checkpoint."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions", 1024))  # TransformerLens reads n_ctx
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(GPT2_TOKENIZER / name, folder / name)
    return folder


def compare(name: str, path: Path, prompts: list[str], repeats: int, prepend_bos: bool | None = None) -> float:
    """Time both on one checkpoint; ``prepend_bos``: tokenise as the Hugging Face tokenizer nnterp uses does
    (GPT-2's adds no BOS, TransformerLens's default for it does)."""
    import nnterp
    from nnterp.interventions import patchscope_lens

    import tl_logitlens as tl

    ours_model = tl.load_model(str(path))
    nn_model = nnterp.StandardizedTransformer(str(path))
    n_layers = ours_model.cfg.n_layers
    # the same numbers, one prompt at a time
    worst = 0.0
    for prompt in prompts[:2]:
        theirs = patchscope_lens(nn_model, prompt)[0].float()  # [layer, vocab]
        ours = tl.patchscope(ours_model, prompt, keep_logprobs=True, prepend_bos=prepend_bos)
        ours = ours.full_logprobs[:, 0, 0].detach().exp().cpu()
        worst = max(worst, float((theirs - ours).abs().max()))
    print(f"\n{name}: {n_layers} layers, {len(prompts)} prompts, identity prompt; max |p_ours - p_nnterp| = {worst:.2e}")
    rows = measure_interleaved(
        {
            "nnterp patchscope_lens": lambda: patchscope_lens(nn_model, prompts),
            "tl.patchscope": lambda: tl.patchscope(ours_model, prompts, prepend_bos=prepend_bos),
            "tl.patchscope (full log-probs)": lambda: tl.patchscope(
                ours_model, prompts, keep_logprobs=True, prepend_bos=prepend_bos
            ),
        },
        repeats=repeats,
    )
    print_table(rows, "nnterp patchscope_lens")
    ratio = rows[0].seconds / rows[1].seconds
    print(f"{name}: tl.patchscope is {ratio:.1f}x faster than nnterp's patchscope_lens (wall, best of {repeats})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    args = parser.parse_args()
    print(cpu_line())
    print(load_line())
    prompts = PROMPTS[: args.prompts]
    compare("stories260K", STORIES, prompts, args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench_patchscope_") as tmp:
        folder = random_gpt2_folder(Path(tmp) / "gpt2-random")
        compare("GPT-2 small shape (random weights)", folder, prompts, args.repeats, prepend_bos=False)


if __name__ == "__main__":
    main()
