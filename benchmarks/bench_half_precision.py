"""How far a Jacobian lens and a tuned lens of a bf16/fp16 model are from those of the float32 model.

    python benchmarks/bench_half_precision.py [--models demo stories] [--dtypes bfloat16 float16]
                                              [--prompts 16] [--steps 20] [--markdown out.md]

For each model, the float32 model and its copies loaded in each 16-bit dtype (``tl.load_model(...,
dtype=...)``: the checkpoint's weights rounded, as a user gets them) fit a J-lens on the same texts
(``--prompts`` texts, ``seq_len=64``, ``skip_first=16``) and train a tuned lens with the same settings
(``--steps`` steps of 1024 tokens, seed 0). Per layer: the relative Frobenius error
``‖A₁₆ − A₃₂‖_F / ‖A₃₂‖_F`` of the J-lens matrix ``J_l``, and of the tuned lens's translator
``[W_i | b_i]``; then the last step's loss of each run. The error includes the weights' rounding (the
16-bit model *is* another model, slightly): it is what a user who loads the model in bf16 gets. Times
are one run each (fp16 matmuls on a CPU without AVX-512 FP16 are emulated and slow; on a GPU both 16-bit
dtypes run faster than float32).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _measure import cpu_line, threads

import tl_logitlens as tl

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
STORIES_TEXTS = ROOT.parent / "shared" / "corpora" / "tinystories_1000.json"


def _model_and_texts(name: str, dtype: str, n: int):
    if name == "demo":
        return tl.load_model("demo", dtype=dtype), tl.demo_texts()[:n]
    texts = json.loads(STORIES_TEXTS.read_text(encoding="utf-8"))[:n]
    return tl.load_model(str(STORIES), dtype=dtype), texts


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(name: str, dtype: str, args) -> dict:
    model, texts = _model_and_texts(name, dtype, args.prompts)
    t0 = time.perf_counter()
    jlens = tl.fit_jacobian_lens(model, texts, seq_len=64, skip_first=16, progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lens = tl.train_tuned_lens(
        model, texts, steps=args.steps, tokens_per_step=1024, seq_len=128, seed=0, progress=False
    )
    train_s = time.perf_counter() - t0
    translators = torch.cat([lens.weight.detach().flatten(1), lens.bias.detach()], 1)
    return {
        "J": jlens.jacobians,
        "T": translators,
        "loss": lens.meta["training"]["loss_per_step"][-1],
        "fit_s": fit_s,
        "train_s": train_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["demo", "stories"], choices=["demo", "stories"])
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"]
    )
    parser.add_argument("--prompts", type=int, default=16, help="texts for the J-lens fit and the tuned lens")
    parser.add_argument("--steps", type=int, default=20, help="tuned-lens training steps")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    lines = [
        f"<!-- {cpu_line()}; {threads()} threads; {args.prompts} texts, J-lens seq_len 64 skip_first 16, "
        f"tuned lens {args.steps} steps of 1024 tokens -->",
        "| model | dtype | layer | J-lens rel. error | tuned-lens rel. error |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    summary = []
    for name in args.models:
        ref = run(name, "float32", args)
        summary.append(
            f"{name} float32: fit {ref['fit_s']:.1f} s, training {ref['train_s']:.1f} s, "
            f"last loss {ref['loss']:.4f}"
        )
        for dtype in args.dtypes:
            got = run(name, dtype, args)
            summary.append(
                f"{name} {dtype}: fit {got['fit_s']:.1f} s, training {got['train_s']:.1f} s, "
                f"last loss {got['loss']:.4f}"
            )
            for layer in range(ref["T"].shape[0]):
                j = f"{_relative(got['J'][layer], ref['J'][layer]):.1e}" if layer in ref["J"] else "–"
                t = _relative(got["T"][layer], ref["T"][layer])
                lines.append(f"| {name} | {dtype} | {layer} | {j} | {t:.1e} |")
    table = "\n".join(lines)
    print(table)
    print("\n".join(summary))
    if args.markdown:
        Path(args.markdown).write_text(
            table + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n", encoding="utf-8"
        )


if __name__ == "__main__":
    main()
