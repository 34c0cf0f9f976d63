"""Fit the Jacobian lens shipped for the built-in demo model (``tl.load_lens("demo-jacobian", tl.load_model("demo"))``).

Fitted with :func:`tl_logitlens.fit_jacobian_lens` on the demo model's own training stories (the split of
``demo_data.py``: the first ``N_PROMPTS`` of the 900 training stories; the 100 held-out stories,
``tl.demo_texts()``, are never read), then the three lenses (logit, the shipped tuned lens ``"demo"``,
this J-lens) are scored on the held-out stories with :func:`tl_logitlens.evaluate_lenses` at every
``resid_post`` site (the sites all three read): mean ``KL(final ‖ site)`` in nats per token and top-1
agreement with the final layer. Writes ``tl_logitlens/demo_models/demo/jacobian_lens/``:
``jacobian_lens.safetensors``, ``jacobian_lens.json`` (with the evaluation under ``"evaluation"``) and
``LENS_CARD.md``.

Usage: ``python scripts/fit_demo_jacobian.py`` (10-25 minutes on 2 busy CPU cores; it keeps a checkpoint
in ``/tmp/fit_demo_jacobian_checkpoint`` and resumes from it, then ``--fit-seconds=S`` records the first
run's time); ``--card-only`` re-evaluates the saved lens and rewrites its metadata and card; ``--check`` prints the recomputed point
estimates as JSON and writes nothing (``tests/test_demo_jacobian.py`` compares them with the recorded ones).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import CORPUS, N_HELD_OUT, ROOT, SPLIT_SEED, load_split  # noqa: E402

OUT = ROOT / "tl_logitlens" / "demo_models" / "demo" / "jacobian_lens"
N_PROMPTS = 192
SETTINGS = {"seq_len": 128, "skip_first": 16, "torch_threads": 1}
# what the card's evaluation runs: tests/test_demo_jacobian.py recomputes it with these settings
EVAL_SETTINGS = {"sites": "resid_post", "n_bootstrap": 1000, "seed": 0}
LENS_ORDER = ("logit lens", "tuned lens", "Jacobian lens")


def evaluate(model: Any, jlens: Any, n_bootstrap: int | None = None) -> dict[str, Any]:
    """The three lenses on ``tl.demo_texts()`` by ``tl.evaluate_lenses``: per lens and ``resid_post``
    site, KL(final ‖ site) (nats/token) and top-1 agreement, with 95% bootstrap intervals
    (``n_bootstrap``: replicates, default ``EVAL_SETTINGS``'s; the point estimates do not depend on it)."""
    import tl_logitlens as tl

    settings = dict(EVAL_SETTINGS) if n_bootstrap is None else {**EVAL_SETTINGS, "n_bootstrap": n_bootstrap}
    lenses = {"logit lens": None, "tuned lens": tl.load_lens("demo", model), "Jacobian lens": jlens}
    ev = tl.evaluate_lenses(model, tl.demo_texts(), lenses=lenses, progress=False, **settings)
    frame = ev.to_dataframe()
    out: dict[str, Any] = {"sites": list(ev.sites), "tokens": int(ev.n_tokens), "documents": int(ev.n_documents),
                           "settings": settings, "lenses": {}}
    for name in LENS_ORDER:
        rows = frame[frame.lens == name].set_index("site").loc[list(ev.sites)]
        out["lenses"][name] = {
            "kl_to_final": [float(v) for v in rows.kl_to_final],
            "kl_to_final_low": [float(v) for v in rows.kl_to_final_low],
            "kl_to_final_high": [float(v) for v in rows.kl_to_final_high],
            "top1_agreement": [float(v) for v in rows.top1_agreement],
        }
    return out


def card(meta: dict[str, Any]) -> str:
    """The lens card, from the lens's metadata alone (so a test can rebuild it and compare)."""
    fit, ev = meta["fit"], meta["evaluation"]
    lenses = ev["lenses"]
    kl_rows, agree_rows = [], []
    for s, site in enumerate(ev["sites"]):
        kl_rows.append(f"| {site} | " + " | ".join(f"{lenses[n]['kl_to_final'][s]:.3f}" for n in LENS_ORDER) + " |")
        agree_rows.append(f"| {site} | " + " | ".join(f"{lenses[n]['top1_agreement'][s]:.1%}" for n in LENS_ORDER) + " |")
    header = "| site | logit lens | tuned lens (`\"demo\"`) | Jacobian lens |"
    rule = "| --- | ---: | ---: | ---: |"
    lines = [
        "# Jacobian lens for the demo model (`tl.load_lens(\"demo-jacobian\", tl.load_model(\"demo\"))`)",
        "",
        "One `[d_model, d_model]` matrix `J_l` per block below the last (Gurnee et al. 2026): the average "
        "first-order effect of block l's output (`blocks.{l}.hook_resid_post`) on the last block's output; "
        "the lens reads `W_U · final_norm(J_l h_l)`. Fitted by `scripts/fit_demo_jacobian.py` with "
        "`tl.fit_jacobian_lens`. It reads `resid_post` sites (its default: `tl.logit_lens(model, prompt, "
        "lens=jlens)` reads them without `sites=`), and the stream of the model as `tl.load_model(\"demo\")` "
        "loads it; `load_lens` refuses it for another model.",
        "",
        "## Data",
        f"- `../shared/corpora/{CORPUS.name}`, the demo model's split (`random.Random({SPLIT_SEED}).shuffle` of "
        f"the story indices, the last {N_HELD_OUT} held out): the first {meta['n_prompts']} of the 900 training "
        "stories, one prompt each (BOS + its tokens, no packing). The held-out stories (`tl.demo_texts()`) "
        "are never read.",
        "",
        "## Fit",
        f"- `seq_len={fit['seq_len']}`, `skip_first={fit['skip_first']}`: each prompt's first {fit['seq_len']} "
        f"tokens; sources and targets at positions {fit['skip_first']} to the last but one; layers "
        f"{fit['layers']}; exact (no sampled cotangents), summed in float64.",
        f"- {meta['n_prompts']} prompts averaged; fit time {meta['fit_seconds']:.0f} s on one CPU thread of a "
        "2-core machine shared with other jobs.",
        "",
        "## Held-out evaluation: the three lenses",
        f"`tl.evaluate_lenses(model, tl.demo_texts(), lenses={{...}}, sites=\"resid_post\")` over the "
        f"{ev['documents']} held-out stories ({ev['tokens']} tokens, windows of the model's context): token-"
        "weighted means at each `resid_post` site (`L_post` is the output of block L; the last block's is "
        "`final_post`, the model's own output).",
        "",
        "KL(final ‖ lens), nats per token (lower is closer to the model's output):",
        "",
        header,
        rule,
        *kl_rows,
        "",
        "Top-1 agreement with the final layer (the lens's top token is the model's):",
        "",
        header,
        rule,
        *agree_rows,
        "",
        "`jacobian_lens.json` holds these numbers under `\"evaluation\"`, with 95% bootstrap intervals "
        "(1000 replicates over documents, seed 0); `tests/test_demo_jacobian.py` recomputes them.",
        "",
        "## Reproduce",
        "`python scripts/fit_demo_jacobian.py` (needs `../shared`); `--card-only` re-evaluates the saved lens. "
        "Float summation order differs between machines and thread counts, so a refit elsewhere gives close, "
        "not bit-identical, matrices.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    import tl_logitlens as tl
    from tl_logitlens.core.files import atomic_write_text

    torch.set_num_threads(SETTINGS["torch_threads"])
    model = tl.load_model("demo")
    if "--check" in sys.argv:  # recompute the point estimates, print them as JSON, write nothing
        print(json.dumps(evaluate(model, tl.load_lens(OUT, model), n_bootstrap=0)))
        return
    if "--card-only" in sys.argv:
        jlens = tl.load_lens(OUT, model)
    else:
        split = load_split()
        held = set(tl.demo_texts())
        texts = split.train[:N_PROMPTS]
        if held & set(texts):
            raise SystemExit("a held-out story is among the fitting texts; the split is broken")
        t0 = time.time()
        jlens = tl.fit_jacobian_lens(
            model, texts, seq_len=SETTINGS["seq_len"], skip_first=SETTINGS["skip_first"],
            checkpoint_dir="/tmp/fit_demo_jacobian_checkpoint",
        )
        # a fit resumed from its checkpoint is timed by the run that did the work: --fit-seconds=S
        given = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--fit-seconds=")]
        jlens.meta["fit_seconds"] = float(given[0]) if given else round(time.time() - t0, 1)
        jlens.meta["train_indices"] = split.train_idx[:N_PROMPTS]
    jlens.meta["n_prompts"] = jlens.n_prompts
    jlens.meta["evaluation"] = evaluate(model, jlens)
    jlens.save(OUT)
    atomic_write_text(OUT / "LENS_CARD.md", card(jlens.meta))
    print(json.dumps(jlens.meta["evaluation"]["lenses"], indent=1))


if __name__ == "__main__":
    main()
