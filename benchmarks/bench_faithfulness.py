"""Faithfulness against one evaluation pass: tl.faithfulness vs tl.evaluate_lenses, same lenses, same texts.

    python benchmarks/bench_faithfulness.py [--docs 100] [--repeats 2] [--threads 1] [--intervention ablate]

The target (#31): the faithfulness benchmark on the 100 demo stories within 3x one ``evaluate_lenses`` pass
of the same lenses. Both read the demo model through the logit lens, its tuned lens and its Jacobian lens
at the sites they share by default (``resid_post``), with 1000 bootstrap replicates. ``evaluate_lenses``
scores every position of every story; ``faithfulness`` intervenes at each story's last position, for each
lens and site, along the lens's top-1 vector and its placebo: one forward pass per intervention row (rows
batched, the story cut after the position), none for ``final_post``. Wall and CPU time
(``_measure.cpu_clock``), best of ``--repeats`` interleaved rounds after a warm-up round, and peak resident
memory above the start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from _measure import cpu_line, load_line, measure_interleaved, print_table

    import tl_logitlens as tl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--intervention", choices=("ablate", "swap"), default="ablate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tl.load_model("demo")
    lenses = {
        "logit lens": None,
        "tuned lens": tl.load_lens("demo", model),
        "Jacobian lens": tl.load_lens("demo-jacobian", model),
    }
    texts = tl.demo_texts()[: args.docs]
    print(cpu_line())
    print(load_line())
    print(f"demo model, {len(texts)} stories, lenses {list(lenses)}, intervention {args.intervention}")
    rows = measure_interleaved(
        {
            "evaluate_lenses (every position)": lambda: tl.evaluate_lenses(
                model, texts, lenses=lenses, progress=False
            ),
            f"faithfulness ({args.intervention}, last position)": lambda: tl.faithfulness(
                model, texts, lenses=lenses, intervention=args.intervention
            ),
        },
        repeats=args.repeats,
    )
    print_table(rows, "evaluate_lenses (every position)")
    print(load_line())


if __name__ == "__main__":
    main()
