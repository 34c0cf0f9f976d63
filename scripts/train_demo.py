"""Train the built-in causal demo model (``load_model("demo")``) on the TinyStories sample, on CPU.

A GPT-2-architecture language model (LayerNorm, learned positions, GELU, tied embeddings) with a
byte-level BPE vocabulary trained here with ``tokenizers``. Everything is seeded; the split is the one
in ``demo_data.py`` (the last 100 stories of a seeded shuffle are held out, never seen by the tokenizer
or the model). Writes ``tl_logitlens/demo_models/demo/``: weights, config, tokenizer, ``metrics.json``
and ``MODEL_CARD.md``.

Evaluation (also recomputed by ``tests/test_demo_models.py``): every held-out story, in split order, is
written as ``<|endoftext|>`` followed by its tokens; the concatenation is cut into consecutive,
non-overlapping windows of ``n_ctx`` tokens (the last one shorter); within each window every token
after the first is predicted from the ones before it. Loss is the mean next-token cross-entropy in
nats over all predicted tokens. The unigram baseline is the cross-entropy, on the same predicted
tokens, of the training-stream unigram distribution with add-one smoothing,
``p(t) = (count(t) + 1) / (N + V)``.

Usage: ``/work/venv3/bin/python scripts/train_demo.py`` (208 steps: a few minutes on 2 idle CPU cores, about
20 minutes on the busy shared machine it was trained on). ``--card-only`` recomputes the lens figures and
rewrites the card from the saved model.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import CORPUS, N_HELD_OUT, ROOT, SPLIT_SEED, load_split  # noqa: E402

DEFAULT_OUT = ROOT / "tl_logitlens" / "demo_models" / "demo"
OUT = DEFAULT_OUT
SPECIAL = "<|endoftext|>"
SETTINGS = {
    "seed": 0,
    "vocab_size": 4096,
    "tokenizer_min_frequency": 2,
    "n_layer": 4,
    "n_embd": 128,
    "n_head": 4,
    "n_inner": 512,
    "n_positions": 256,
    "activation_function": "gelu",
    "dropout": 0.0,
    "seq_len": 256,
    "batch_size": 16,
    "epochs": 4,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "torch_threads": 2,
}

# Story prompts for the card's lens figures, each with the answer word a reader expects next: story
# formulas the model has learnt, one next word it gets only at its last layer, and one it misses.
LENS_PROMPTS = [
    ("Once upon a time, there", " was"),
    ("Once upon a time, there was a little girl named", " Lily"),
    ('Lily smiled and said, "Thank', " you"),
    ("One day, Lily went to the park with her", " mom"),
    ("Once upon a time, there was a little girl named Lily. She loved to play outside in the", " park"),
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SETTINGS["vocab_size"],
        min_frequency=SETTINGS["tokenizer_min_frequency"],
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        unk_token=SPECIAL,
        model_max_length=SETTINGS["n_positions"],
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    # name the generic fast-tokenizer class, which transformers 4 and 5 both resolve
    config_path = OUT / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(OUT)


def story_stream(tokenizer, stories: list[str]) -> list[int]:
    """``<|endoftext|>`` + tokens of each story, concatenated in the given order."""
    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    stream: list[int] = []
    for ids in tokenizer(stories, add_special_tokens=False)["input_ids"]:
        stream.append(eos)
        stream.extend(ids)
    return stream


@torch.inference_mode()
def evaluate(model, stream: list[int], n_ctx: int) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over consecutive non-overlapping windows; and the count."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(stream), n_ctx):
        window = torch.tensor(stream[start : start + n_ctx])[None]
        if window.shape[1] < 2:
            continue
        logits = model(window).logits.double()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += float(nll)
        count += window.shape[1] - 1
    return total / count, count


def eval_targets(stream: list[int], n_ctx: int) -> list[int]:
    """The tokens ``evaluate`` predicts: each window's tokens after its first."""
    return [t for start in range(0, len(stream), n_ctx) for t in stream[start + 1 : start + n_ctx]]


def unigram_loss(train_stream: list[int], targets: list[int], vocab: int) -> float:
    counts = np.bincount(np.array(train_stream), minlength=vocab).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))
    return float(-logp[np.array(targets)].mean())


def lr_at(step: int, total: int) -> float:
    s = SETTINGS
    if step < s["warmup_steps"]:
        return s["lr"] * (step + 1) / s["warmup_steps"]
    progress = (step - s["warmup_steps"]) / max(1, total - s["warmup_steps"])
    ratio = s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))
    return s["lr"] * ratio


def train(model, train_stream: list[int], held_stream: list[int]) -> tuple[float, list[dict]]:
    s = SETTINGS
    seq, bs = s["seq_len"], s["batch_size"]
    data = torch.tensor(train_stream)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s["lr"],
        betas=tuple(s["betas"]),
    )
    gen = torch.Generator().manual_seed(s["seed"])
    steps_per_epoch = (len(train_stream) - seq) // seq // bs
    total = steps_per_epoch * s["epochs"]
    history = []
    step = 0
    t0 = time.time()
    for epoch in range(s["epochs"]):
        # a fresh random offset and block order each epoch, so block boundaries move between epochs
        offset = int(torch.randint(0, seq, (1,), generator=gen))
        n_blocks = (len(data) - offset) // seq
        blocks = data[offset : offset + n_blocks * seq].view(n_blocks, seq)
        order = torch.randperm(n_blocks, generator=gen)
        model.train()
        running = 0.0
        for i in range(steps_per_epoch):
            batch = blocks[order[i * bs : (i + 1) * bs]]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total)
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
            opt.step()
            running += float(loss.detach())
            step += 1
            if step % 20 == 0:
                print(f"  step {step}/{total} loss {float(loss):.3f} lr {lr_at(step, total):.2e} "
                      f"{time.time() - t0:.0f}s", flush=True)
        held, _ = evaluate(model, held_stream, s["n_positions"])
        row = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "held_out_loss": held,
               "seconds": round(time.time() - t0, 1)}
        history.append(row)
        print(f"epoch {epoch + 1}: train {row['train_loss']:.4f} held-out {held:.4f} ({row['seconds']}s)",
              flush=True)
    return time.time() - t0, history


def lens_figures() -> list[dict]:
    """Per-layer top-1 token and the answer's rank and log-prob at the last position of each prompt."""
    from tl_logitlens import load_model, logit_lens

    model = load_model("demo" if OUT == DEFAULT_OUT else str(OUT))
    rows = []
    for prompt, answer in LENS_PROMPTS:
        res = logit_lens(model, prompt, positions="last", targets=[answer], top_k=1)
        top = res.top_tokens()
        rows.append({
            "prompt": prompt,
            "answer": answer,
            "layers": [
                {
                    "site": label,
                    "top1": top[s][0][0][0],
                    "top1_prob": float(res.top_logprobs[s, 0, 0, 0].exp()),
                    "answer_rank": int(res.target_ranks[s, 0, 0, 0]),
                    "answer_logprob": float(res.target_logprobs[s, 0, 0, 0]),
                }
                for s, label in enumerate(res.labels)
            ],
        })
    return rows


def write_card(metrics: dict, history: list[dict], lens: list[dict]) -> None:
    s = SETTINGS
    lines = [
        "# tl_logitlens demo model (`load_model(\"demo\")`)",
        "",
        "A small GPT-2-architecture causal language model trained on CPU by `scripts/train_demo.py`, "
        "shipped so that the logit lens can be tried offline in seconds. It is a toy: it writes "
        "TinyStories-like English and nothing else.",
        "",
        "## Data",
        f"- File: `../shared/corpora/{CORPUS.name}` (1000 TinyStories, Eldan & Li 2023, CDLA-Sharing-1.0), "
        f"sha256 `{metrics['data']['sha256']}`.",
        f"- Split: the 1000 story indices shuffled with `random.Random({SPLIT_SEED}).shuffle`; the last "
        f"{N_HELD_OUT} of the shuffled order are held out (never seen by the tokenizer or the model), the "
        f"other 900 are for training. The held-out indices are listed in `metrics.json`.",
        f"- Training stream: each training story as `<|endoftext|>` + its tokens, concatenated: "
        f"{metrics['data']['train_tokens']} tokens.",
        "",
        "## Model and tokenizer",
        f"- `GPT2LMHeadModel`: {s['n_layer']} layers, d_model {s['n_embd']}, {s['n_head']} heads, d_mlp "
        f"{s['n_inner']}, n_positions = n_ctx = {s['n_positions']}, GELU (exact, `gelu`), LayerNorm, "
        f"learned absolute positions, tied input/output embeddings; {metrics['n_params']} parameters, float32.",
        f"- Tokenizer: byte-level BPE (GPT-2 style, `Ġ` marks a leading space), vocabulary {s['vocab_size']} "
        f"trained with `tokenizers` on the 900 training stories (min frequency {s['tokenizer_min_frequency']}); "
        "`<|endoftext|>` (id 0) is BOS, EOS, PAD and UNK.",
        "",
        "## Training",
        f"- Seed {s['seed']} (`random`, `numpy`, `torch`; `torch.use_deterministic_algorithms(True)`), "
        f"{s['torch_threads']} CPU threads, torch {torch.__version__}.",
        f"- AdamW (betas {tuple(s['betas'])}, weight decay {s['weight_decay']} on matrices only), peak lr "
        f"{s['lr']}, {s['warmup_steps']} linear warm-up steps then cosine decay to {s['min_lr_ratio']} x peak, "
        f"gradient clipping {s['grad_clip']}, dropout {s['dropout']}.",
        f"- {s['epochs']} epochs of {metrics['steps_per_epoch']} steps, batch {s['batch_size']} x "
        f"{s['seq_len']} tokens (each epoch the stream is cut into blocks at a fresh random offset and the "
        f"blocks are shuffled); {metrics['steps']} steps in all.",
        f"- Training time: {metrics['training_seconds']:.0f} s on a 2-core CPU shared with other jobs (a "
        "few minutes when the cores are idle).",
        "",
        "| epoch | train loss | held-out loss |",
        "| ---: | ---: | ---: |",
        *[f"| {h['epoch']} | {h['train_loss']:.4f} | {h['held_out_loss']:.4f} |" for h in history],
        "",
        "## Held-out evaluation",
        f"- Held-out loss: **{metrics['held_out_loss']:.4f} nats/token** "
        f"({metrics['held_out_loss'] / math.log(2):.3f} bits/token, perplexity "
        f"{math.exp(metrics['held_out_loss']):.1f}).",
        f"- Unigram baseline: **{metrics['unigram_loss']:.4f} nats/token**: the cross-entropy on the same "
        "held-out tokens of the training stream's unigram distribution with add-one smoothing, "
        "`p(t) = (count(t) + 1) / (N + V)`.",
        f"- On: all {N_HELD_OUT} held-out stories, {metrics['eval']['n_predicted_tokens']} predicted tokens. "
        "Each story is written as `<|endoftext|>` + its tokens, in split order, concatenated; the stream is "
        f"cut into consecutive non-overlapping windows of {metrics['eval']['window']} tokens (the last one "
        "shorter); every token after a window's first is predicted from the ones before it in that window. "
        "`tests/test_demo_models.py` recomputes this figure from the shipped weights.",
        "",
        "## Logit lens on story prompts",
        "`tl_logitlens.logit_lens(load_model(\"demo\"), prompt, positions=\"last\", targets=[answer])` "
        "(norm `recompute`: each layer's residual stream through the final LayerNorm and the unembedding). "
        "`resid_pre L` is the input of block L; `final_post` is the model's output. Rank 1 is the top token (ranks over the full vocabulary).",
        "",
    ]
    for row in lens:
        lines += [f"**{row['prompt']!r}** → answer `{row['answer']!r}`", "",
                  "| site | top-1 token | top-1 prob | answer rank | answer log-prob |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for layer in row["layers"]:
            lines.append(f"| {layer['site']} | `{layer['top1']!r}` | {layer['top1_prob']:.3f} | "
                         f"{layer['answer_rank']} | {layer['answer_logprob']:.2f} |")
        lines.append("")
    lines += [
        "## Limits",
        "A toy trained on about 0.9M tokens (4 passes over 217k): it has learnt the stories' formulas "
        "(\"Once upon a time, there was\", names, \"Thank you\") but little copying from context, so a word "
        "that only the story itself makes likely (the ball a dog ran away with) is often missed. Its lens "
        "is good for seeing the mechanics (the embedding row predicts the current token, the answer "
        "appears after the first block and sharpens with depth, sometimes only at the last layer), not "
        "for claims about larger models.",
        "",
        "## Reproduce",
        "`python scripts/train_demo.py` (needs `../shared`; see the training time above). Float "
        "summation order differs between machines and thread counts, so a rerun elsewhere gives close, "
        "not bit-identical, weights.",
        "",
    ]
    (OUT / "MODEL_CARD.md").write_text("\n".join(lines))


def main() -> None:
    import argparse

    from transformers import GPT2Config, GPT2LMHeadModel

    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's)")
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="for a quick smoke run only")
    parser.add_argument(
        "--card-only", action="store_true", help="recompute the lens figures and the card from the saved model"
    )
    args = parser.parse_args()
    OUT = args.out
    SETTINGS["epochs"] = args.epochs
    s = SETTINGS
    if args.card_only:
        metrics = json.loads((OUT / "metrics.json").read_text())
        metrics["lens"] = lens_figures()
        (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_card(metrics, metrics["history"], metrics["lens"])
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(s["torch_threads"])
    seed_everything(s["seed"])
    split = load_split()
    print(f"train {len(split.train)} stories, held out {len(split.held_out)}", flush=True)
    tokenizer = train_tokenizer(split.train)
    train_stream = story_stream(tokenizer, split.train)
    held_stream = story_stream(tokenizer, split.held_out)
    print(f"train tokens {len(train_stream)}, held-out tokens {len(held_stream)}", flush=True)
    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=s["n_positions"],
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        n_inner=s["n_inner"],
        activation_function=s["activation_function"],
        resid_pdrop=s["dropout"],
        embd_pdrop=s["dropout"],
        attn_pdrop=s["dropout"],
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters", flush=True)
    seconds, history = train(model, train_stream, held_stream)
    held, n_tokens = evaluate(model, held_stream, s["n_positions"])
    unigram = unigram_loss(train_stream, eval_targets(held_stream, s["n_positions"]), len(tokenizer))
    print(f"held-out loss {held:.4f} nats/token, unigram {unigram:.4f}, {n_tokens} tokens", flush=True)

    model.config.architectures = ["GPT2LMHeadModel"]
    model.save_pretrained(OUT)
    config_path = OUT / "config.json"
    saved = json.loads(config_path.read_text())
    saved["n_ctx"] = s["n_positions"]  # TransformerLens reads n_ctx; transformers 5 does not write it
    saved.pop("_attn_implementation", None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    steps_per_epoch = (len(train_stream) - s["seq_len"]) // s["seq_len"] // s["batch_size"]
    metrics = {
        "model": "demo",
        "held_out_loss": held,
        "unigram_loss": unigram,
        "units": "nats/token",
        "n_params": n_params,
        "training_seconds": round(seconds, 1),
        "steps_per_epoch": steps_per_epoch,
        "steps": steps_per_epoch * s["epochs"],
        "settings": s,
        "history": history,
        "data": {
            "file": f"shared/corpora/{CORPUS.name}",
            "sha256": split.sha256,
            "split_seed": SPLIT_SEED,
            "split": f"random.Random({SPLIT_SEED}).shuffle(list(range(1000))); last {N_HELD_OUT} held out",
            "held_out_indices": split.held_out_idx,
            "train_tokens": len(train_stream),
        },
        "eval": {
            "stories": "all held-out stories, in held_out_indices order",
            "story_format": "<|endoftext|> + tokenizer(story, add_special_tokens=False) ids, concatenated",
            "window": s["n_positions"],
            "windows": "consecutive non-overlapping windows of `window` tokens, last one shorter; "
                       "each window's tokens after its first are predicted",
            "n_predicted_tokens": n_tokens,
            "unigram": "training-stream unigram counts, add-one smoothing (count + 1) / (N + V), "
                       "cross-entropy on the same predicted tokens",
            "dtype": "float32 model, log-softmax in float64",
        },
    }
    (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lens = lens_figures()
    for row in lens:
        print(row["prompt"][-40:], [(la["top1"], la["answer_rank"]) for la in row["layers"]], flush=True)
    metrics["lens"] = lens
    (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(metrics, history, lens)
    (OUT / "generation_config.json").unlink(missing_ok=True)
    print(f"wrote {OUT}", flush=True)


if __name__ == "__main__":
    main()
