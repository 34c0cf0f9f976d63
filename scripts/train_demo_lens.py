"""Train the tuned lens shipped for the built-in demo model (``tl.load_lens("demo", tl.load_model("demo"))``).

Trained with :func:`tl_logitlens.train_tuned_lens` on the demo model's own training stories (the split of
``demo_data.py``: the last 100 stories of a seeded shuffle are held out, never seen by the model or the
lens), then evaluated on the held-out stories: mean ``KL(final ‖ lens)`` in nats per token at every
``resid_pre`` site, for the logit lens and the tuned lens, computed by ``tl.logit_lens`` (the package's
exact float32 kernel) over every position of the held-out windows. Writes
``tl_logitlens/demo_models/demo/tuned_lens/``: ``tuned_lens.safetensors``, ``tuned_lens.json`` (with
the evaluation) and ``LENS_CARD.md``.

Usage: ``python scripts/train_demo_lens.py`` (a few minutes on 2 CPU cores); ``--card-only`` re-evaluates
the saved lens and rewrites the card.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import CORPUS, N_HELD_OUT, ROOT, SPLIT_SEED, load_split  # noqa: E402

OUT = ROOT / "tl_logitlens" / "demo_models" / "demo" / "tuned_lens"
SETTINGS = {"steps": 200, "tokens_per_step": 2048, "seq_len": 256, "seed": 0, "torch_threads": 1}


def held_out_kl(model, windows: torch.Tensor, lens, batch: int = 16) -> list[float]:
    """Mean KL(final ‖ site) (nats/token) per resid_pre site over every position of ``windows``."""
    import tl_logitlens as tl

    total = None
    for i in range(0, len(windows), batch):
        res = tl.logit_lens(model, windows[i : i + batch], lens=lens, top_k=1)
        part = res.kl_to_final[:-1].double().sum((1, 2))
        total = part if total is None else total + part
    return (total / windows.numel()).tolist()


def write_card(meta: dict, evaluation: dict) -> None:
    t = meta["training"]
    rows = [
        f"| {site} | {lo:.3f} | {tu:.3f} |"
        for site, lo, tu in zip(evaluation["sites"], evaluation["logit_lens_kl"], evaluation["tuned_lens_kl"])
    ]
    lines = [
        "# Tuned lens for the demo model (`tl.load_lens(\"demo\", tl.load_model(\"demo\"))`)",
        "",
        "An affine translator per `resid_pre` site (`h + W h + b`, Belrose et al. 2023) for the built-in demo "
        "model, trained by `scripts/train_demo_lens.py` with `tl.train_tuned_lens`. It reads the stream of the "
        "model as `tl.load_model(\"demo\")` loads it (centred writing weights, TransformerLens's default); "
        "`load_lens` refuses it for another model or another centring.",
        "",
        "## Data",
        f"- `../shared/corpora/{CORPUS.name}`, the demo model's split (`random.Random({SPLIT_SEED}).shuffle` of "
        f"the story indices, the last {N_HELD_OUT} held out): the lens is trained on the other 900 stories "
        "only, as the model was.",
        f"- Each story as `<|endoftext|>` (BOS) + its tokens, concatenated and cut into windows of {t['seq_len']} "
        f"tokens, each starting with BOS: {t['windows']} training windows.",
        "",
        "## Training",
        f"- Objective: KL(final ‖ lens) in nats per token, summed over the {meta['n_layers']} `resid_pre` sites.",
        f"- SGD with Nesterov momentum {t['momentum']}, lr {t['lr']} x (1 - momentum), weight decay "
        f"{t['weight_decay']}, linear decay to zero, gradient norm clipped to {t['grad_clip']} (tuned-lens's "
        f"defaults); {t['steps']} steps of {t['tokens_per_step']} tokens, seed {t['seed']}.",
        f"- Loss: {t['loss_per_step'][0]:.3f} at the first step (the logit lens), "
        f"{sum(t['loss_per_step'][-10:]) / 10:.3f} over the last 10.",
        f"- Training time: {evaluation['training_seconds']:.0f} s on one CPU thread of a 2-core machine shared with other jobs.",
        "",
        "## Held-out KL per site",
        f"Mean `KL(final ‖ lens)` in nats per token over all {evaluation['tokens']} positions of the "
        f"{N_HELD_OUT} held-out stories (packed as above into {evaluation['windows']} windows), from "
        "`tl.logit_lens(model, windows, lens=...).kl_to_final`. `resid_pre L` is the input of block L.",
        "",
        "| site | logit lens | tuned lens |",
        "| --- | ---: | ---: |",
        *rows,
        "",
        "## Reproduce",
        "`python scripts/train_demo_lens.py` (needs `../shared`). Float summation order differs between "
        "machines and thread counts, so a rerun elsewhere gives close, not bit-identical, translators.",
        "",
    ]
    (OUT / "LENS_CARD.md").write_text("\n".join(lines))


def main() -> None:
    import tl_logitlens as tl
    from tl_logitlens.core.corpus import pack_windows

    torch.set_num_threads(SETTINGS["torch_threads"])
    split = load_split()
    model = tl.load_model("demo")
    t0 = time.time()
    if "--card-only" in sys.argv:
        lens = tl.load_lens(OUT, model)
        seconds = json.loads((OUT / "tuned_lens.json").read_text())["evaluation"]["training_seconds"]
    else:
        lens = tl.train_tuned_lens(
            model, split.train, steps=SETTINGS["steps"], tokens_per_step=SETTINGS["tokens_per_step"],
            seq_len=SETTINGS["seq_len"], seed=SETTINGS["seed"],
        )
        seconds = time.time() - t0
    windows = pack_windows(model, split.held_out, SETTINGS["seq_len"])
    evaluation = {
        "sites": [f"{i}_pre" for i in range(model.cfg.n_layers)],
        "logit_lens_kl": held_out_kl(model, windows, None),
        "tuned_lens_kl": held_out_kl(model, windows, lens),
        "tokens": windows.numel(),
        "windows": len(windows),
        "held_out_indices": split.held_out_idx,
        "training_seconds": round(seconds, 1),
    }
    lens.meta["evaluation"] = evaluation
    lens.save(OUT)
    write_card(lens.meta, evaluation)
    for site, lo, tu in zip(evaluation["sites"], evaluation["logit_lens_kl"], evaluation["tuned_lens_kl"]):
        print(f"{site}: logit {lo:.3f}  tuned {tu:.3f}")


if __name__ == "__main__":
    main()
