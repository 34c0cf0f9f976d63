"""Train the built-in masked-LM demo model (``load_model("demo-bert")``) on the TinyStories sample, on CPU.

A BERT-architecture masked language model (``BertForMaskedLM``: post-LN, learned absolute positions,
2 token types, exact GELU, tied decoder) with a lowercase WordPiece vocabulary trained here with
``tokenizers``, on the same seeded split as the causal demo (``demo_data.py``). The config stays inside
what TransformerLens 3.9's ``HookedEncoder`` represents (``hidden_act="gelu"``, absolute positions,
``type_vocab_size=2``, tied word embeddings). Writes ``tl_logitlens/demo_models/demo-bert/``.

Sequences: each story's WordPiece ids (no special tokens) are cut into consecutive chunks of
``max_len - 2`` ids; each chunk becomes ``[CLS] chunk [SEP]``, right-padded with ``[PAD]`` to
``max_len``. Masking (BERT's recipe): every non-special, non-pad position is selected with probability
0.15; a selected position becomes ``[MASK]`` with probability 0.8, a uniformly random non-special token
with probability 0.1, and stays itself otherwise. For the held-out figures the draws are, in this order,
on the whole ``[n_chunks, max_len]`` tensor with ``g = torch.Generator().manual_seed(EVAL_SEED)``:
``u = torch.rand(shape, generator=g)`` (selected where ``u < 0.15``), ``r = torch.rand(shape, generator=g)``
(``[MASK]`` where ``r < 0.8``, random where ``0.8 <= r < 0.9``), ``rand_ids = torch.randint(n_special,
vocab, shape, generator=g)``. Loss is the mean cross-entropy (nats) of the original token over the
selected positions, accuracy the fraction of selected positions whose top-1 prediction is the original.

Usage: ``python scripts/train_demo_bert.py`` (13,200 steps: about 32 minutes on 2 idle CPU cores).
``--card-only`` rewrites the card (and the lens check in ``metrics.json``) from the saved model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import CORPUS, N_HELD_OUT, ROOT, SPLIT_SEED, load_split  # noqa: E402

DEFAULT_OUT = ROOT / "tl_logitlens" / "demo_models" / "demo-bert"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
EVAL_SEED = 2024
SETTINGS = {
    "seed": 0,
    "vocab_size": 4096,
    "lowercase": True,
    "num_hidden_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 128,
    "max_len": 128,
    "hidden_act": "gelu",
    "dropout": 0.0,
    "mask_prob": 0.15,
    "mask_token_prob": 0.8,
    "random_token_prob": 0.1,
    "batch_size": 16,
    "epochs": 100,
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "betas": [0.9, 0.98],
    "grad_clip": 1.0,
    "torch_threads": 2,
}
EXAMPLES = [
    "once upon a time, there was a little girl named lily. she loved to play in the [MASK].",
    "tom was very [MASK] because he lost his toy.",
    "the cat drank some [MASK] from a bowl.",
    "she gave her mom a big [MASK] and said thank you.",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=SETTINGS["lowercase"])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=SETTINGS["vocab_size"], special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    # the standard BERT tokenizer over the trained vocabulary: the same pipeline, the usual files
    bert_tok = BertTokenizer(vocab=vocab, do_lower_case=SETTINGS["lowercase"], model_max_length=SETTINGS["max_len"])
    out.mkdir(parents=True, exist_ok=True)
    bert_tok.save_pretrained(out)
    ordered = sorted(vocab, key=vocab.get)
    (out / "vocab.txt").write_text("\n".join(ordered) + "\n")
    loaded = AutoTokenizer.from_pretrained(out)
    for text in texts[:50]:
        if loaded(text, add_special_tokens=False)["input_ids"] != tok.encode(text, add_special_tokens=False).ids:
            raise SystemExit("the saved BertTokenizer does not reproduce the trained WordPiece tokenizer")
    return loaded


def make_chunks(tokenizer, stories: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] chunk [SEP]`` rows padded to ``max_len``; and the 0/1 attention mask."""
    cls, sep, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    rows = []
    for ids in tokenizer(stories, add_special_tokens=False)["input_ids"]:
        for start in range(0, len(ids), max_len - 2):
            rows.append([cls, *ids[start : start + max_len - 2], sep])
    tokens = torch.full((len(rows), max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), max_len), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return tokens, mask


def apply_masking(
    tokens: torch.Tensor, gen: torch.Generator, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 15% / 80-10-10 masking: (masked input ids, boolean selected positions)."""
    s = SETTINGS
    n_special = len(SPECIALS)
    u = torch.rand(tokens.shape, generator=gen)
    r = torch.rand(tokens.shape, generator=gen)
    rand_ids = torch.randint(n_special, vocab, tokens.shape, generator=gen)
    selected = (u < s["mask_prob"]) & (tokens >= n_special)
    to_mask = selected & (r < s["mask_token_prob"])
    to_rand = selected & (r >= s["mask_token_prob"]) & (r < s["mask_token_prob"] + s["random_token_prob"])
    inputs = tokens.clone()
    inputs[to_mask] = SPECIALS.index("[MASK]")
    inputs[to_rand] = rand_ids[to_rand]
    return inputs, selected


@torch.inference_mode()
def evaluate(model, tokens: torch.Tensor, attn: torch.Tensor, vocab: int) -> dict:
    model.eval()
    inputs, selected = apply_masking(tokens, torch.Generator().manual_seed(EVAL_SEED), vocab)
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(tokens), 64):
        sl = slice(start, start + 64)
        logits = model(input_ids=inputs[sl], attention_mask=attn[sl]).logits.double()
        sel = selected[sl]
        target = tokens[sl][sel]
        total += float(torch.nn.functional.cross_entropy(logits[sel], target, reduction="sum"))
        correct += int((logits[sel].argmax(-1) == target).sum())
        count += int(sel.sum())
    return {"loss": total / count, "accuracy": correct / count, "n_masked": count}


def baselines(train_tokens: torch.Tensor, held_tokens: torch.Tensor, vocab: int) -> dict:
    """Context-free references on the evaluation's selected positions: the most frequent training token
    (accuracy) and the training unigram distribution with add-one smoothing (cross-entropy, nats)."""
    _, selected = apply_masking(held_tokens, torch.Generator().manual_seed(EVAL_SEED), vocab)
    target = held_tokens[selected]
    counts = torch.bincount(train_tokens[train_tokens >= len(SPECIALS)], minlength=vocab).double()
    p = (counts + 1) / (counts.sum() + vocab)
    return {
        "most_frequent_token_accuracy": float((target == counts.argmax()).double().mean()),
        "unigram_loss": float(-p[target].log().mean()),
    }


def lr_at(step: int, total: int) -> float:
    s = SETTINGS
    if step < s["warmup_steps"]:
        return s["lr"] * (step + 1) / s["warmup_steps"]
    progress = (step - s["warmup_steps"]) / max(1, total - s["warmup_steps"])
    return s["lr"] * (s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokens, attn, held, vocab: int) -> tuple[float, list[dict]]:
    s = SETTINGS
    bs = s["batch_size"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s["lr"],
        betas=tuple(s["betas"]),
    )
    gen = torch.Generator().manual_seed(s["seed"])
    steps_per_epoch = len(tokens) // bs
    total = steps_per_epoch * s["epochs"]
    history, step, t0 = [], 0, time.time()
    for epoch in range(s["epochs"]):
        model.train()
        order = torch.randperm(len(tokens), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            batch, batch_attn = tokens[idx], attn[idx]
            inputs, selected = apply_masking(batch, gen, vocab)  # fresh masks every step
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total)
            hidden = model.bert(input_ids=inputs, attention_mask=batch_attn).last_hidden_state
            # the MLM head on the selected positions only: the same loss as model(..., labels=...)
            logits = model.cls(hidden[selected])
            loss = torch.nn.functional.cross_entropy(logits, batch[selected])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
            opt.step()
            running += float(loss.detach())
            step += 1
            if step % 20 == 0:
                print(f"  step {step}/{total} loss {float(loss):.3f} {time.time() - t0:.0f}s", flush=True)
        ev = evaluate(model, *held, vocab)
        row = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "held_out_loss": ev["loss"],
               "held_out_accuracy": ev["accuracy"], "seconds": round(time.time() - t0, 1)}
        history.append(row)
        print(f"epoch {epoch + 1}: train {row['train_loss']:.4f} held-out loss {ev['loss']:.4f} "
              f"acc {ev['accuracy']:.4f} ({row['seconds']}s)", flush=True)
    return time.time() - t0, history


def lens_sentences(tokenizer, stories: list[str]) -> list[str]:
    """The lens check's sentences: each story's first sentence, kept when it ends with a word of letters
    that is one WordPiece token, then ``.`` (so ``[CLS] ... word . [SEP]``: the word is at position -3)."""
    kept = []
    for story in stories:
        sentence = re.split(r"(?<=[.!?])\s+", story.strip())[0]
        match = re.fullmatch(r".*\b([A-Za-z]+)\.", sentence, flags=re.DOTALL)
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(sentence)["input_ids"])
        if match and pieces[-3:-1] == [match.group(1).lower(), "."]:
            kept.append(sentence)
    return kept


def lens_check(out: Path, held_out: list[str]) -> dict:
    """The masked-LM lens on held-out sentences (``tl_logitlens.masked_lens`` on the saved model): each
    sentence's last word masked, its rank (1 = top) and log-prob at every site."""
    import tl_logitlens as tl

    model = tl.load_model(str(out))
    sentences = lens_sentences(model.tokenizer, held_out)
    res = tl.masked_lens(model, sentences, mask_positions=-3, top_k=1)
    ranks, logprobs = res.original_ranks[:, :, 0], res.original_logprobs[:, :, 0]
    return {
        "sentences": "each held-out story's first sentence (split after . ! ? and whitespace), kept when it "
                     "ends with a word of letters that is one WordPiece token, then '.'",
        "masked": "that last word (position -3 of [CLS] ... word . [SEP])",
        "n_sentences": len(sentences),
        "sites": list(res.labels),
        "improved": int((ranks[-1] < ranks[0]).sum()),
        "improved_fraction": float((ranks[-1] < ranks[0]).double().mean()),
        "median_rank": [int(r) for r in ranks.median(dim=1).values],
        "mean_logprob": [float(v) for v in logprobs.double().mean(dim=1)],
        "top1_fraction": [float(v) for v in (ranks == 1).double().mean(dim=1)],
    }


@torch.inference_mode()
def fill_mask_examples(model, tokenizer) -> list[dict]:
    model.eval()
    rows = []
    for text in EXAMPLES:
        enc = tokenizer(text, return_tensors="pt")
        logits = model(**enc).logits[0]
        pos = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])
        probs = logits[pos].softmax(-1)
        top = probs.topk(5)
        rows.append({"text": text, "top5": [(tokenizer.convert_ids_to_tokens(int(i)), round(float(p), 3))
                                            for p, i in zip(top.values, top.indices)]})
    return rows


def write_card(out: Path, metrics: dict, history: list[dict], examples: list[dict]) -> None:
    s = SETTINGS
    ev = metrics["eval"]
    lc = metrics["lens_check"]
    lines = [
        "# tl_logitlens demo masked LM (`load_model(\"demo-bert\")`)",
        "",
        "A small BERT-architecture masked language model trained on CPU by `scripts/train_demo_bert.py`, "
        "shipped so that the masked-LM lens can be tried offline. It is a toy trained on 900 short stories.",
        "",
        "## Data",
        f"- File: `../shared/corpora/{CORPUS.name}` (1000 TinyStories, Eldan & Li 2023, CDLA-Sharing-1.0), "
        f"sha256 `{metrics['data']['sha256']}`.",
        f"- Split (the same as the causal demo's): story indices shuffled with `random.Random({SPLIT_SEED})"
        f".shuffle`, the last {N_HELD_OUT} held out (never seen by the tokenizer or the model); indices in "
        "`metrics.json`.",
        f"- Sequences: each story's WordPiece ids cut into consecutive chunks of {s['max_len'] - 2}, each "
        f"`[CLS] chunk [SEP]` padded to {s['max_len']}: {metrics['data']['train_sequences']} training "
        f"sequences ({metrics['data']['train_tokens']} WordPiece tokens).",
        "",
        "## Model and tokenizer",
        f"- `BertForMaskedLM`: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads, intermediate {s['intermediate_size']}, max positions "
        f"{s['max_position_embeddings']}, `hidden_act` `gelu` (exact), absolute positions, 2 token types, "
        f"post-LN, MLM decoder tied to the word embeddings (with its own bias), no pooler or NSP head; "
        f"{metrics['n_params']} parameters, float32.",
        f"- Tokenizer: lowercase WordPiece (`##` continuation), vocabulary {s['vocab_size']} trained with "
        "`tokenizers` on the training stories; `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `[MASK]` 4; saved "
        "as a standard `BertTokenizer`.",
        "",
        "## Training",
        f"- Seed {s['seed']} (`random`, `numpy`, `torch`, deterministic algorithms), {s['torch_threads']} CPU "
        f"threads, torch {torch.__version__}.",
        f"- Masking: {s['mask_prob']:.0%} of non-special tokens selected, of which {s['mask_token_prob']:.0%} "
        f"`[MASK]`, {s['random_token_prob']:.0%} a random non-special token, the rest unchanged; fresh masks "
        "every step from a seeded generator.",
        f"- AdamW (betas {tuple(s['betas'])}, weight decay {s['weight_decay']} on matrices), peak lr {s['lr']}, "
        f"{s['warmup_steps']} warm-up steps then cosine to {s['min_lr_ratio']} x peak, clipping "
        f"{s['grad_clip']}, dropout {s['dropout']}; {s['epochs']} epochs x {metrics['steps_per_epoch']} steps "
        f"of batch {s['batch_size']}.",
        f"- Training time: {metrics['training_seconds']:.0f} s on a shared 2-core CPU.",
        "",
        "| epoch | train loss | held-out loss | held-out accuracy |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {h['epoch']} | {h['train_loss']:.4f} | {h['held_out_loss']:.4f} | {h['held_out_accuracy']:.4f} |"
          for h in history if len(history) <= 20 or h["epoch"] == 1 or h["epoch"] % 5 == 0],
        "",
        *(["Every fifth epoch shown; `metrics.json` has them all.", ""] if len(history) > 20 else []),
        "## Held-out evaluation",
        f"- Masked-token accuracy: **{metrics['held_out_accuracy']:.4f}** (top-1 prediction equals the "
        "original token).",
        f"- Masked-token loss: **{metrics['held_out_loss']:.4f} nats/token** (cross-entropy of the original "
        "token).",
        f"- Context-free baselines on the same positions: always guessing the most frequent training token "
        f"scores accuracy {metrics['baselines']['most_frequent_token_accuracy']:.4f}; the training unigram "
        f"distribution (add-one smoothing, special tokens left out of the counts) has cross-entropy "
        f"{metrics['baselines']['unigram_loss']:.4f} nats/token.",
        f"- On: all {N_HELD_OUT} held-out stories, {ev['n_sequences']} sequences, {ev['n_masked']} selected "
        f"positions, masked once with BERT's recipe from `torch.Generator().manual_seed({EVAL_SEED})`: "
        "`u = rand`, `r = rand`, `rand_ids = randint(5, vocab)`, each over the whole `[n_sequences, "
        f"{s['max_len']}]` tensor in that order; selected where `u < 0.15` on non-special tokens; `[MASK]` "
        "where `r < 0.8`, random where `0.8 <= r < 0.9`. Averages are over the selected positions (also "
        "the 10% left unchanged and the 10% replaced). `tests/test_demo_models.py` recomputes both figures.",
        "",
        "## Fill-mask examples",
        "",
        "| text | top 5 (probability) |",
        "| --- | --- |",
        *[f"| {e['text']} | {', '.join(f'`{t}` {p:.3f}' for t, p in e['top5'])} |" for e in examples],
        "",
        "## What the lens shows",
        f"`tl_logitlens.masked_lens` on the first sentence of each held-out story that ends with a one-token "
        f"word and a full stop ({lc['n_sentences']} sentences), that last word masked: its rank (1 = top) "
        "and log-prob at every site, read through the MLM head. At `0_pre` (the embeddings) every hole "
        "holds the same `[MASK]` embedding and differs only by its position, so the rank there is a "
        "context-free guess; each block then brings in the context.",
        "",
        f"- Masked word ranked better at the last site than at the first: **{lc['improved_fraction']:.4f}** "
        f"({lc['improved']} of {lc['n_sentences']} sentences).",
        "",
        "| site | median rank | mean log-prob (nats) | top-1 |",
        "| --- | ---: | ---: | ---: |",
        *[f"| `{site}` | {rank} | {lp:.3f} | {top1:.3f} |" for site, rank, lp, top1 in zip(
            lc["sites"], lc["median_rank"], lc["mean_logprob"], lc["top1_fraction"])],
        "",
        "`tests/test_demo_models.py` recomputes these ranks from Hugging Face's own hidden states and MLM head.",
        "",
        "## Limits",
        f"A toy: {s['epochs']} passes over 0.2M WordPiece tokens of 900 stories. Masked LMs trained from "
        "scratch first sit on a plateau where they guess frequent words and punctuation everywhere; the "
        "table shows this one creeping along it and then leaving it once it learns to use the context. It "
        "now fills holes typical of the stories (see the examples) but misses many, and its training loss "
        f"ended {history[-1]['held_out_loss'] - history[-1]['train_loss']:.2f} nats below its held-out loss, "
        "the sign of a corpus this small. Its lens is worth reading (the masked word is often found in the "
        "middle blocks and loses some probability again in the last ones, see the table above), but it is "
        "not a model to draw conclusions about BERT from.",
        "",
        "## Reproduce",
        "`python scripts/train_demo_bert.py` (needs `../shared`). Float summation order differs between "
        "machines and thread counts, so a rerun elsewhere gives close, not bit-identical, weights. The "
        "WordPiece trainer of `tokenizers` is not deterministic across processes (it breaks frequency ties "
        "in hash-map order, and its `##` alphabet ids follow that order), so a rerun learns a vocabulary that "
        "differs in a few entries and in id order; the shipped tokenizer is the one this model was trained "
        "with.",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def main() -> None:
    from transformers import BertConfig, BertForMaskedLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's)")
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="for a quick smoke run only")
    parser.add_argument("--card-only", action="store_true", help="rewrite the card from the saved model")
    args = parser.parse_args()
    out: Path = args.out
    s = SETTINGS
    s["epochs"] = args.epochs
    if args.card_only:
        from transformers import AutoTokenizer

        metrics = json.loads((out / "metrics.json").read_text())
        s.update(metrics["settings"])  # the card describes the saved model's run, not this invocation's
        tokenizer = AutoTokenizer.from_pretrained(out)
        split = load_split()
        metrics["baselines"] = baselines(
            make_chunks(tokenizer, split.train, s["max_len"])[0],
            make_chunks(tokenizer, split.held_out, s["max_len"])[0],
            len(tokenizer),
        )
        saved = BertForMaskedLM.from_pretrained(out)
        metrics["examples"] = fill_mask_examples(saved, AutoTokenizer.from_pretrained(out))
        metrics["lens_check"] = lens_check(out, split.held_out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_card(out, metrics, metrics["history"], metrics["examples"])
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(s["torch_threads"])
    seed_everything(s["seed"])
    split = load_split()
    tokenizer = train_tokenizer(split.train, out)
    vocab = len(tokenizer)
    tokens, attn = make_chunks(tokenizer, split.train, s["max_len"])
    held = make_chunks(tokenizer, split.held_out, s["max_len"])
    print(f"{len(tokens)} training sequences, {len(held[0])} held-out sequences, vocab {vocab}", flush=True)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        intermediate_size=s["intermediate_size"],
        max_position_embeddings=s["max_position_embeddings"],
        type_vocab_size=2,
        hidden_act=s["hidden_act"],
        hidden_dropout_prob=s["dropout"],
        attention_probs_dropout_prob=s["dropout"],
        pad_token_id=SPECIALS.index("[PAD]"),
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    model = BertForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters", flush=True)
    seconds, history = train(model, tokens, attn, held, vocab)
    ev = evaluate(model, *held, vocab)
    print(f"held-out masked loss {ev['loss']:.4f} nats, accuracy {ev['accuracy']:.4f}, {ev['n_masked']} masked",
          flush=True)
    model.config.architectures = ["BertForMaskedLM"]
    model.save_pretrained(out)
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("_attn_implementation", None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").unlink(missing_ok=True)
    examples = fill_mask_examples(model, tokenizer)
    for e in examples:
        print(e["text"], e["top5"], flush=True)
    metrics = {
        "model": "demo-bert",
        "held_out_loss": ev["loss"],
        "held_out_accuracy": ev["accuracy"],
        "units": "nats/token over selected (masked) positions",
        "n_params": n_params,
        "training_seconds": round(seconds, 1),
        "steps_per_epoch": len(tokens) // s["batch_size"],
        "settings": s,
        "history": history,
        "data": {
            "file": f"shared/corpora/{CORPUS.name}",
            "sha256": split.sha256,
            "split_seed": SPLIT_SEED,
            "split": f"random.Random({SPLIT_SEED}).shuffle(list(range(1000))); last {N_HELD_OUT} held out",
            "held_out_indices": split.held_out_idx,
            "train_sequences": len(tokens),
            "train_tokens": int(attn.sum()),
        },
        "eval": {
            "stories": "all held-out stories, in held_out_indices order",
            "sequences": "per story: tokenizer(story, add_special_tokens=False) ids cut into consecutive "
                         "chunks of max_len - 2; [CLS] chunk [SEP], right-padded with [PAD] to max_len",
            "max_len": s["max_len"],
            "n_sequences": len(held[0]),
            "n_masked": ev["n_masked"],
            "mask_seed": EVAL_SEED,
            "masking": "g = torch.Generator().manual_seed(mask_seed); u = torch.rand(shape, generator=g); "
                       "r = torch.rand(shape, generator=g); rand_ids = torch.randint(n_special, vocab, shape, "
                       "generator=g); selected = (u < mask_prob) & (id >= n_special); [MASK] where selected & "
                       "r < mask_token_prob; rand_ids where selected & mask_token_prob <= r < "
                       "mask_token_prob + random_token_prob",
            "n_special": len(SPECIALS),
            "mask_prob": s["mask_prob"],
            "mask_token_prob": s["mask_token_prob"],
            "random_token_prob": s["random_token_prob"],
            "forward": "model(input_ids, attention_mask) over the whole padded sequences, float32",
        },
        "examples": examples,
        "baselines": baselines(tokens, held[0], vocab),
        "lens_check": lens_check(out, split.held_out),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(out, metrics, history, examples)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
