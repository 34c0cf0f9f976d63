"""Tuned-lens training throughput: one optimiser step, ours against the loop tuned-lens 0.2.0 runs.

Both take one step of the same lens (SGD Nesterov, gradient clipping) on the same tokens:

- ``train step (streamed KL)``: :func:`tl_logitlens.lenses.tuned_training.lens_kl_sum`, the forward pass stopped
  before the unembedding, every site's translator in one batched matmul, and ``KL(final ‖ lens)`` with
  its exact gradient streamed over vocabulary chunks (no ``[site, token, d_vocab]`` logits);
- ``tuned-lens loop (full logits)``: what tuned-lens's ``train_loop.py`` does, in plain PyTorch: the
  model's full output logits, their log-softmax as the label, then per site in turn the full logits of
  ``unembed(ln_final(h + translator(h)))``, ``Σ q·(log q - log_softmax)`` averaged over tokens, and
  ``backward()`` (the model frozen, as tuned-lens freezes it).

Reported: tokens per second (best of 2 after a warm-up) and peak resident memory above the start. The
loss values of the two are printed too: they must agree.

A third row, ``exact-step floor``, times only the work any exact float32 step must do: the frozen
model's forward pass, and per site the two ``[token, d_model] x [d_model, d_vocab]`` products an exact
KL and its gradient need (the logits, then ``softmax · W_Uᵀ``), plus the final logits. ``ceiling`` is the
loop's time over the floor: the most any exact method can gain over the loop on this machine.

Usage: ``python benchmarks/bench_tuned_lens.py`` (needs ``../shared`` for stories260K; the GPT-2-small
shape has random weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import fix_mmap_threshold, gpt2_small_config, measure, threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def ours(model, lens, tokens):
    from tl_logitlens.core.readout import logit_scale
    from tl_logitlens.lenses.tuned_training import lens_kl_sum

    wt = model.W_U.detach().float().T.contiguous()
    b_u = getattr(model, "b_U", None)
    b_u = None if b_u is None else b_u.detach().float()
    scale = float(logit_scale(model))
    opt = torch.optim.SGD(lens.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lens_kl_sum(model, lens, tokens, wt, b_u, scale) / tokens.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def tuned_lens_loop(model, lens, tokens):
    """tuned-lens 0.2.0's train_loop.py step in plain PyTorch (KL loss, shift 0, sites in turn)."""
    n = model.cfg.n_layers
    translators = torch.nn.ModuleList([torch.nn.Linear(model.cfg.d_model, model.cfg.d_model) for _ in range(n)])
    with torch.no_grad():
        for i, t in enumerate(translators):
            t.weight.copy_(lens.weight[i])
            t.bias.copy_(lens.bias[i])
    opt = torch.optim.SGD(translators.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    w_u, b_u = model.W_U.detach(), model.b_U.detach()
    hooks = [f"blocks.{i}.hook_resid_pre" for i in range(n)]

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            final_logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        labels = final_logits.log_softmax(-1)
        total = 0.0
        for i in range(n):
            h = cache[hooks[i]]
            logits = model.ln_final(h + translators[i](h)) @ w_u + b_u
            loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(translators.parameters(), 1.0)
        opt.step()
        return total

    return step


def exact_floor(model, tokens):
    """The frozen forward pass plus ``2 · sites + 1`` plain vocabulary matmuls: a lower bound on any exact step."""
    from tl_logitlens.lenses.tuned_training import _residual_states

    w_u = model.W_U.detach().float()
    n = model.cfg.n_layers

    def step():
        _, final = _residual_states(model, tokens)
        x = final.float().flatten(0, 1)
        out = [x @ w_u]  # the final logits
        for _ in range(n):  # per site the logits and a contraction back, always from the same states
            out.append((x @ w_u) @ w_u.T)
        return out

    return step


def run(name: str, model, tokens) -> list[str]:
    from tl_logitlens import TunedLens

    torch.manual_seed(0)
    lens = TunedLens.for_model(model)
    with torch.no_grad():  # a lens part-way through training, the same for both
        lens.weight.normal_(std=0.02)
        lens.bias.normal_(std=0.02)
    loss_a = ours(model, _copy(lens), tokens)()
    loss_b = tuned_lens_loop(model, _copy(lens), tokens)()
    a = measure("train step (streamed KL)", ours(model, _copy(lens), tokens), repeats=2)
    b = measure("tuned-lens loop (full logits)", tuned_lens_loop(model, _copy(lens), tokens), repeats=2)
    c = measure("exact-step floor (see docstring)", exact_floor(model, tokens), repeats=2)
    n = tokens.numel()
    lines = [
        f"{name}: {n} tokens per step ({tokens.shape[0]} x {tokens.shape[1]}), {model.cfg.n_layers} sites, "
        f"d_vocab {model.cfg.d_vocab}, {threads()} threads; first-step loss ours {loss_a:.5f}, loop {loss_b:.5f}",
        f"{'':34s} {'tokens/s':>10s} {'peak MiB':>10s}",
    ]
    for m in (a, b, c):
        lines.append(f"{m.name:34s} {n / m.seconds:10.0f} {m.peak_mib:10.1f}")
    lines.append(
        f"speed-up {b.seconds / a.seconds:.2f}x, peak memory {a.peak_mib / max(b.peak_mib, 1e-9):.1%} of the loop's; "
        f"ceiling for an exact step {b.seconds / c.seconds:.2f}x, ours at {c.seconds / a.seconds:.0%} of the floor's speed"
    )
    return lines


def _copy(lens):
    import copy

    return copy.deepcopy(lens)


def main() -> None:
    fix_mmap_threshold()
    from transformer_lens import HookedTransformer

    import tl_logitlens as tl

    out: list[str] = []
    if STORIES.exists():
        model = tl.load_model(STORIES)
        tokens = torch.randint(3, model.cfg.d_vocab, (4, 256), generator=torch.Generator().manual_seed(0))
        tokens[:, 0] = model.tokenizer.bos_token_id
        out += run("stories260K", model, tokens) + [""]
    model = HookedTransformer(gpt2_small_config()).eval()
    tokens = torch.randint(0, 50257, (1, 512), generator=torch.Generator().manual_seed(0))
    out += run("GPT-2-small shape, random weights", model, tokens)
    print("\n".join(out))


if __name__ == "__main__":
    main()
