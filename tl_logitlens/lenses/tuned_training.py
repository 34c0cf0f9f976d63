"""Training a :class:`~tl_logitlens.lenses.tuned.TunedLens`: text packed into windows, the frozen model's
residual stream, and ``KL(final ‖ lens)`` summed over sites, with the vocabulary streamed in chunks.

The loss never builds the ``[site, token, d_vocab]`` logits. For a normalised state ``x`` with logits
``z = s·(x W_U + b_U)`` (``s`` the model's logit scale, 1 for most) and the final distribution ``q``
(logits ``z_f`` from ``x_f``)::

    KL(q ‖ softmax z) = s·(x_f - x)·E_q[w] + logsumexp(z) - logsumexp(z_f)
    ∂KL/∂x            = s·(E_p[w] - E_q[w])

where ``w`` is a column of ``W_U`` and ``E_p[w] = softmax(z) @ W_Uᵀ``. Both ``logsumexp`` and ``E_p[w]`` come
from one pass over vocabulary chunks with a running maximum (the online softmax of flash attention), so
the loss and its exact gradient cost two ``[row, d_model] x [d_model, chunk]`` matmuls per chunk and
``O(rows · chunk)`` memory. ``E_q[w]`` and ``logsumexp(z_f)`` are computed once per batch for all sites.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from typing import Any, no_type_check

import torch
from jaxtyping import Float

from tl_logitlens.core.compat import normalization_type
from tl_logitlens.core.corpus import iter_texts, pack_windows
from tl_logitlens.core.devices import readout_device, to_device
from tl_logitlens.core.distributed import World, current_world, sum_over_ranks
from tl_logitlens.core.files import Checkpoint, check_path_argument, field_int, field_tensor, weights_sha256
from tl_logitlens.core.inputs import check_count, check_flag, check_real
from tl_logitlens.core.readout import check_model as check_causal_model
from tl_logitlens.core.readout import logit_scale, soft_cap
from tl_logitlens.lenses.tuned import TunedLens

# Rows and vocabulary entries per block of the streamed softmax: a [rows, chunk] float32 block of
# 2 MiB stays in cache while it is exponentiated and multiplied back.
ROW_BLOCK = 512
VOCAB_CHUNK = 1024
# the largest learning rate or weight decay taken: a float32 factor (a lens trained with more diverges)
MAX_REAL = 1e38


class _Stop(Exception):
    """Raised from the last hook: the unembedding is not needed."""


@torch.no_grad()
def softmax_stats(
    x: Float[torch.Tensor, "row d_model"],
    wt: Float[torch.Tensor, "d_vocab d_model"],
    b: Float[torch.Tensor, " d_vocab"] | None,
    scale: float,
    *,
    row_block: int = ROW_BLOCK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[Float[torch.Tensor, " row"], Float[torch.Tensor, "row d_model"]]:
    """``logsumexp(z)`` and ``softmax(z) @ wt`` for ``z = scale·(x @ wt.T + b)``, streamed over the vocabulary."""
    n_rows, d = x.shape
    lse = torch.empty(n_rows, device=x.device)
    expect = torch.empty(n_rows, d, device=x.device)
    for r0 in range(0, n_rows, row_block):
        xr = x[r0 : r0 + row_block]
        m = torch.full((xr.shape[0],), -math.inf, device=x.device)
        total = torch.zeros(xr.shape[0], device=x.device)
        acc = torch.zeros(xr.shape[0], d, device=x.device)
        for v0 in range(0, wt.shape[0], vocab_chunk):
            w = wt[v0 : v0 + vocab_chunk]
            z = xr @ w.T if b is None else torch.addmm(b[v0 : v0 + vocab_chunk], xr, w.T)
            if scale != 1.0:
                z.mul_(scale)
            m_new = torch.maximum(m, z.amax(-1))
            alpha = torch.exp(m - m_new)
            z.sub_(m_new[:, None]).exp_()
            total = total * alpha + z.sum(-1)
            acc.mul_(alpha[:, None]).addmm_(z, w)
            m = m_new
        lse[r0 : r0 + row_block] = m + total.log()
        expect[r0 : r0 + row_block] = acc / total[:, None]
    return lse, expect


class _ChunkedKL(torch.autograd.Function):
    """``KL(final ‖ site)`` per row (nats) with its exact gradient in ``x``, never holding full logits."""

    @staticmethod
    def forward(ctx, x, x_final, lse_final, expect_final, wt, b, scale, row_block, vocab_chunk):  # type: ignore[override]
        lse, expect = softmax_stats(x, wt, b, scale, row_block=row_block, vocab_chunk=vocab_chunk)
        kl = scale * ((x_final - x) * expect_final).sum(-1) + (lse - lse_final)
        ctx.save_for_backward(scale * (expect - expect_final))
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        (grad_x,) = ctx.saved_tensors
        return grad_kl[:, None] * grad_x, None, None, None, None, None, None, None, None


def chunked_kl(
    x: Float[torch.Tensor, "site_row d_model"],
    x_final: Float[torch.Tensor, "row d_model"],
    wt: Float[torch.Tensor, "d_vocab d_model"],
    b: Float[torch.Tensor, " d_vocab"] | None,
    scale: float = 1.0,
    *,
    row_block: int = ROW_BLOCK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> Float[torch.Tensor, " site_row"]:
    """``KL(softmax z_final ‖ softmax z)`` per row in nats, differentiable in ``x``, where
    ``z = scale·(x @ wt.T + b)`` and likewise ``z_final`` from ``x_final`` (no gradient). ``x`` stacks
    any number of sites' rows, each site's in the order of ``x_final``'s."""
    if x.shape[0] % x_final.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, not a multiple of x_final's {x_final.shape[0]}")
    lse_f, expect_f = softmax_stats(x_final, wt, b, scale, row_block=row_block, vocab_chunk=vocab_chunk)
    reps = x.shape[0] // x_final.shape[0]
    return _ChunkedKL.apply(
        x, x_final.repeat(reps, 1), lse_f.repeat(reps), expect_f.repeat(reps, 1), wt, b, scale, row_block,
        vocab_chunk,
    )


def final_norm_f32(model: Any, y: Float[torch.Tensor, "*rows d_model"]) -> Float[torch.Tensor, "*rows d_model"]:
    """The model's final norm in float32, differentiable in ``y`` (the model's own parameters stay
    out of the graph): LayerNorm centres, both divide by ``sqrt(mean(y²) + eps)``, then gain and bias."""
    kind = normalization_type(model)
    if kind not in ("LN", "LNPre", "RMS", "RMSPre"):
        return y
    if kind in ("LN", "LNPre"):
        y = y - y.mean(-1, keepdim=True)
    y = y / (y.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    ln = model.ln_final
    w, b = getattr(ln, "w", None), getattr(ln, "b", None)
    if w is not None:  # a device map may put the final norm apart from W_U, where y is
        y = y * to_device(w.detach().float(), y.device)
    if b is not None and kind == "LN":
        y = y + to_device(b.detach().float(), y.device)
    return y


def _residual_states(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``resid_pre`` (stacked ``[layer, batch, pos, d_model]``) and the final ``resid_post``, in the
    model's dtype, on ``W_U``'s device, from a forward pass stopped before the unembedding (a block on
    another device hands its states over once, as they are made)."""
    n = model.cfg.n_layers
    states: dict[int, torch.Tensor] = {}
    device = readout_device(model)

    def keep(i: int):
        def hook(act: torch.Tensor, hook: Any = None) -> None:
            states[i] = to_device(act.detach(), device)
            if i == n:
                raise _Stop

        return hook

    hooks = [(f"blocks.{i}.hook_resid_pre", keep(i)) for i in range(n)]
    hooks.append((f"blocks.{n - 1}.hook_resid_post", keep(n)))
    with torch.no_grad():
        try:
            model.run_with_hooks(tokens, fwd_hooks=hooks)
        except _Stop:
            pass
    if len(states) != n + 1:
        raise RuntimeError(f"the forward pass ran {sorted(states)} of the {n + 1} residual hooks it needs")
    return torch.stack([states[i] for i in range(n)]), states[n]


def lens_kl_sum(
    model: Any,
    lens: TunedLens,
    tokens: torch.Tensor,
    wt: Float[torch.Tensor, "d_vocab d_model"],
    b_u: torch.Tensor | None,
    scale: float,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """``Σ_sites Σ_tokens KL(final ‖ lens)`` (nats) on ``tokens``, differentiable in the lens's parameters:
    one forward pass of the frozen model, every site's translator applied in one batched matmul."""
    pre, final = _residual_states(model, tokens)
    h = pre.float().flatten(1, 2)  # [layer, row, d_model]
    y = h + torch.baddbmm(lens.bias[:, None, :], h, lens.weight.transpose(1, 2))
    x = final_norm_f32(model, y).flatten(0, 1)
    x_final = final_norm_f32(model, final.float().flatten(0, 1))
    return chunked_kl(x, x_final, wt, b_u, scale, vocab_chunk=vocab_chunk).sum()


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """tuned-lens's schedule: linear warm-up over ``warmup`` steps, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Every numeric option of :func:`train_tuned_lens`, checked: finite, in range, an int where it counts
    something (a TypeError or ValueError naming the option; no ``x or default`` for a user's value)."""
    out = dict(settings)
    if out["steps"] is not None:
        out["steps"] = check_count(out["steps"], "steps", 1)
    out["tokens_per_step"] = check_count(out["tokens_per_step"], "tokens_per_step", 1)
    if out["seq_len"] is not None:
        out["seq_len"] = check_count(out["seq_len"], "seq_len", 2)
    # at most MAX_REAL: torch's SGD multiplies float32 tensors by them (1e308 would not even convert)
    out["lr"] = check_real(out["lr"], "lr", 0.0, MAX_REAL, low_open=True)
    out["momentum"] = check_real(out["momentum"], "momentum", 0.0, 1.0, high_open=True)
    out["weight_decay"] = check_real(out["weight_decay"], "weight_decay", 0.0, MAX_REAL)
    out["warmup_steps"] = check_count(out["warmup_steps"], "warmup_steps", 0)
    out["grad_clip"] = check_real(out["grad_clip"], "grad_clip", 0.0, low_open=True)
    if out["batch_size"] is not None:
        out["batch_size"] = check_count(out["batch_size"], "batch_size", 1)
    out["seed"] = check_count(out["seed"], "seed", 0, 2**63 - 1)
    out["vocab_chunk"] = check_count(out["vocab_chunk"], "vocab_chunk", 1)
    out["checkpoint_every"] = check_count(out["checkpoint_every"], "checkpoint_every", 1)
    if out["max_prompts"] is not None:
        out["max_prompts"] = check_count(out["max_prompts"], "max_prompts", 1)
    if out["max_tokens"] is not None:
        out["max_tokens"] = check_count(out["max_tokens"], "max_tokens", 1)
    check_flag(out["progress"], "progress")
    return out


def _digest(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' bytes: ties a checkpoint to the data (and starting lens) it was made on."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _state_checker(lens: TunedLens, n_steps: int, n_windows: int, rng_shape: Any) -> Any:
    """The checker of a training checkpoint's fields (:class:`~tl_logitlens.core.files.Checkpoint`):
    every tensor's dtype, shape and finiteness, the step within the run, one finite loss per step done,
    the window order's ids within the corpus, the optimiser's momentum buffers."""
    weight_shape, bias_shape = tuple(lens.weight.shape), tuple(lens.bias.shape)

    def check(state: dict[str, Any]) -> None:
        step = field_int(state, "step", 0, n_steps)
        field_tensor(state, "weight", weight_shape, torch.float32)
        field_tensor(state, "bias", bias_shape, torch.float32)
        field_tensor(state, "rng", tuple(rng_shape), torch.uint8)
        order = field_tensor(state, "order", None, torch.int64)
        if (
            order.ndim != 1
            or order.numel() > n_windows
            or (order.numel() and not 0 <= int(order.min()) <= int(order.max()) < n_windows)
        ):
            raise ValueError(
                f"field 'order' must be window ids from 0 to {n_windows - 1}, at most {n_windows} of them"
            )
        history = state["history"]
        if not isinstance(history, list) or len(history) != step:
            raise ValueError(f"field 'history' must be a list of {step} losses (one per step done)")
        for i, loss in enumerate(history):
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
                raise ValueError(f"field 'history' holds {loss!r} at step {i + 1}, not a finite loss")
        if not isinstance(state["schedule"], dict):
            raise ValueError("field 'schedule' is not a dict")
        optimizer = state["optimizer"]
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
            raise ValueError("field 'optimizer' is not an optimiser's state dict")
        shapes = (weight_shape, bias_shape)
        for key, slot in optimizer["state"].items():
            buffer = slot.get("momentum_buffer") if isinstance(slot, dict) else None
            if key not in (0, 1) or (buffer is not None and not isinstance(buffer, torch.Tensor)):
                raise ValueError("field 'optimizer' holds a state that is not the two translators' momentum")
            if buffer is not None:
                field_tensor({"optimizer momentum": buffer}, "optimizer momentum", shapes[key], torch.float32)

    return check


def _all_reduce_gradients(lens: TunedLens, world: World) -> None:
    """Sum every rank's gradient (each already divided by the step's total token count, so the sum is
    the mean over the whole step's tokens, as one process computes it), added in rank order."""
    grads = []
    for p in lens.parameters():
        if p.grad is None:  # a rank with no window this step contributes zeros
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = sum_over_ranks(torch.cat([g.reshape(-1) for g in grads]), world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@no_type_check  # checks its own arguments, with messages that say what to pass
def train_tuned_lens(
    model: Any,
    texts: Any,
    *,
    steps: int | None = None,
    tokens_per_step: int = 2**13,
    seq_len: int | None = None,
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    lens: TunedLens | None = None,
    vocab_chunk: int = VOCAB_CHUNK,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    max_prompts: int | None = None,
    max_tokens: int | None = None,
) -> TunedLens:
    """Train a tuned lens for ``model`` on ``texts``: minimise ``KL(final ‖ lens)`` (nats per token)
    summed over the ``resid_pre`` sites, the model frozen.

    The optimiser is the paper's (tuned-lens 0.2.0's defaults): SGD with Nesterov momentum ``momentum``,
    learning rate ``lr · (1 - momentum)`` (PyTorch's momentum scales steps by ``1/(1 - momentum)``),
    weight decay ``weight_decay`` (towards the identity translator), linear decay to zero after
    ``warmup_steps``, the gradient norm clipped to ``grad_clip``.

    Under ``torchrun`` (a process group initialised by the caller) each rank runs its share of every
    step's windows and the gradients are summed across ranks before the step, so the same total batch
    gives the same lens as one process (to float rounding of the sums' order).

    Precision (bf16 and fp16 models): the model's forward pass runs in its own dtype, with no
    gradient (the model is frozen, so no backward pass goes through it). Everything the optimiser sees
    is float32: the residual states are cast to float32 as they leave the model, and the translators,
    their gradients, the optimiser's momentum, the final norm, ``W_U``/``b_U`` and the streamed
    KL are float32; each step's loss is summed in float64. So a 16-bit model differs from its float32
    twin only through its rounded states and weights: measured on the demo model after 20 steps
    (``docs/half-precision.md``), the translators are within 4e-3 to 7e-3 (bfloat16) and 5e-4 to
    8e-4 (float16) of the float32 model's, relative Frobenius error per layer.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode, in any floating dtype (see
            *Precision* below); its weights are never changed. The lens trains on ``W_U``'s device; the
            model's blocks may sit on other devices (TransformerLens 3.9's ``n_devices``, a bridge booted
            with ``device_map``): each site's states are moved to ``W_U``'s device once per batch.
        texts: a list or iterable of strings, a ``.txt``/``.json``/``.jsonl`` file, or a Hugging Face
            ``datasets`` split with a ``"text"`` column. Each text is written as BOS + its tokens (the
            model's BOS; EOS where the model prepends none), concatenated and cut into windows of
            ``seq_len`` tokens (default ``n_ctx``), each window starting with BOS as a prompt would.
        steps: optimiser steps; default one pass over the windows.
        tokens_per_step: tokens per optimiser step (whole windows, at least one).
        lr, momentum, weight_decay, warmup_steps, grad_clip: the optimiser (finite; ``lr`` and
            ``grad_clip`` above 0, ``momentum`` in [0, 1), ``weight_decay`` 0 or more).
        batch_size: windows per forward pass (default: as many as fit in 2048 tokens); gradients
            are accumulated over a step.
        seed: the window order; runs are deterministic for a seed.
        lens: a lens to continue training (default: a new one at the logit lens).
        vocab_chunk: vocabulary entries per block of the streamed loss.
        checkpoint_dir: a folder to keep a checkpoint in (:class:`~tl_logitlens.core.files.Checkpoint`): every
            ``checkpoint_every`` steps, and at the end, the translators, the optimiser's momentum, the
            schedule, the window order's random state and position, and the loss so far are saved
            atomically (the folder is checked writable before training starts). Called again with the same folder and settings, training resumes there and
            ends with the lens an uninterrupted run gives, bit for bit on the CPU (a finished run
            returns its lens at once). Other settings, data or model (any of its weights) are refused,
            and so is a checkpoint whose checksum or fields do not hold.
        max_prompts: use only the first ``max_prompts`` texts (default all).
        max_tokens: cut the texts after ``max_tokens`` document tokens (each text's BOS counted once, the
            last text shortened to fit; default all), as ``evaluate_lenses`` cuts them: a long text is
            then tokenised only as far as the cut, so time and memory are bounded by ``max_tokens``.
            Without it a text over :data:`~tl_logitlens.core.corpus.MAX_TOKENIZED_CHARS` characters is
            refused before it is tokenised.

    Returns:
        The trained :class:`~tl_logitlens.lenses.tuned.TunedLens`; ``lens.meta["training"]`` records the
        settings and the loss per step.

    Raises:
        ValueError: no usable text, a text too long to tokenise whole without ``max_tokens`` (named),
            a soft-capped model, a ``seq_len`` over ``n_ctx``, an option out of range or not finite, a
            checkpoint made with other settings, a loss or lens parameters that are not finite (the step is named: lower ``lr``, or check the model and texts; no lens is
            returned, so a broken one is never saved over a good one).
        TypeError: ``texts`` of the wrong type; an option of the wrong type.

    Example:
        >>> lens = tl.train_tuned_lens(model, "stories.json", steps=250, checkpoint_dir="runs/lens")  # doctest: +SKIP
    """
    check_causal_model(model)
    if soft_cap(model) is not None or logit_scale(model) is None:
        raise ValueError("training a tuned lens on a model that soft-caps its logits (Gemma 2) is not supported")
    opts = _check_settings(
        {"steps": steps, "tokens_per_step": tokens_per_step, "seq_len": seq_len, "lr": lr, "momentum": momentum,
         "weight_decay": weight_decay, "warmup_steps": warmup_steps, "grad_clip": grad_clip,
         "batch_size": batch_size, "seed": seed, "vocab_chunk": vocab_chunk, "checkpoint_every": checkpoint_every,
         "progress": progress, "max_prompts": max_prompts, "max_tokens": max_tokens}
    )
    if lens is not None and not isinstance(lens, TunedLens):
        raise TypeError(f"lens must be a TunedLens to continue training, or None, not {type(lens).__name__}")
    chosen = texts if opts["max_prompts"] is None else itertools.islice(iter_texts(texts), opts["max_prompts"])
    windows = pack_windows(model, chosen, opts["seq_len"], max_tokens=opts["max_tokens"])
    n_windows, window_len = windows.shape
    per_step = max(1, opts["tokens_per_step"] // window_len)
    batch = opts["batch_size"] if opts["batch_size"] is not None else max(1, 2048 // window_len)
    n_steps = opts["steps"] if opts["steps"] is not None else max(1, math.ceil(n_windows / per_step))
    lr, momentum, warmup = opts["lr"], opts["momentum"], opts["warmup_steps"]
    world = current_world()

    device = model.W_U.device
    if lens is None:
        lens = TunedLens.for_model(model)
    else:
        lens.check_model(model)
    lens = lens.to(device)
    scale = float(logit_scale(model))
    wt = model.W_U.detach().float().T.contiguous()  # [d_vocab, d_model]: contiguous rows per chunk
    b_u = getattr(model, "b_U", None)
    b_u = None if b_u is None else b_u.detach().float()

    opt = torch.optim.SGD(lens.parameters(), lr=lr * (1 - momentum), momentum=momentum,
                          nesterov=momentum > 0, weight_decay=opts["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, n_steps, warmup))
    gen = torch.Generator().manual_seed(opts["seed"])
    order = torch.empty(0, dtype=torch.long)
    history: list[float] = []
    done = 0

    ckpt = None
    if checkpoint_dir is not None:
        settings = {
            **{k: v for k, v in opts.items() if k not in ("progress", "checkpoint_every")},
            "steps": n_steps, "batch_size": batch, "windows": _digest(windows), "world_size": world.size,
            "fingerprint": lens.meta.get("fingerprint"), "start": _digest(lens.weight, lens.bias),
            "model_sha256": weights_sha256(model),
        }
        validate = _state_checker(lens, n_steps, n_windows, gen.get_state().shape)
        ckpt = Checkpoint(
            check_path_argument(checkpoint_dir, "checkpoint_dir", "a folder path"),
            settings,
            job="tuned lens training",
            validate=validate,
        )
        state = ckpt.load()
        if state is not None:
            try:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["schedule"])
                gen.set_state(state["rng"])
            except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as err:
                raise ValueError(
                    f"{ckpt.path} has an optimiser, schedule or random state this run cannot take "
                    f"({str(err).splitlines()[0][:120] if str(err) else type(err).__name__}); delete it "
                    "to start again"
                ) from None
            with torch.no_grad():
                lens.weight.copy_(state["weight"])
                lens.bias.copy_(state["bias"])
            order, history, done = state["order"], list(state["history"]), int(state["step"])

    def save_checkpoint(step: int) -> None:
        if ckpt is not None and world.is_main:
            ckpt.save({
                "step": step, "weight": lens.weight.detach().cpu(), "bias": lens.bias.detach().cpu(),
                "optimizer": opt.state_dict(), "schedule": sched.state_dict(), "rng": gen.get_state(),
                "order": order, "history": history,
            })

    from tqdm.auto import tqdm

    bar = tqdm(range(done, n_steps), desc="tuned lens", disable=not opts["progress"] or not world.is_main, unit="step",
               initial=done, total=n_steps)
    for step in bar:
        if len(order) < per_step:
            order = torch.cat([order, torch.randperm(n_windows, generator=gen)])
        step_windows, order = order[:per_step], order[per_step:]
        n_tokens = len(step_windows) * window_len
        mine = step_windows[world.rank :: world.size]  # this rank's share (all of it in one process)
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(mine), batch):
            tokens = windows[mine[i : i + batch]].to(device)
            loss = lens_kl_sum(model, lens, tokens, wt, b_u, scale, opts["vocab_chunk"]) / n_tokens
            loss.backward()
            step_loss += float(loss.detach())
        if world.size > 1:
            _all_reduce_gradients(lens, world)
            step_loss = sum_over_ranks(step_loss, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(lens.parameters(), opts["grad_clip"]))
        for what, value in (("loss", float(step_loss)), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                raise ValueError(
                    f"the tuned lens's {what} is {value} at step {step + 1} of {n_steps}: training stopped (the "
                    f"lens is left as it was after step {step}). A learning rate too large for these texts "
                    f"(lr={lr:g}; try a smaller one) or a model whose outputs are not finite on them (check "
                    "its weights and dtype)"
                )
        opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in lens.parameters()):
            raise ValueError(
                f"the tuned lens's parameters hold NaN or inf after step {step + 1} of {n_steps} (loss "
                f"{float(step_loss):.4g}): training stopped and no lens is returned, so none is saved. The "
                f"learning rate (lr={lr:g}) or weight decay ({opts['weight_decay']:g}) is too large for these "
                "texts; try a smaller one"
            )
        sched.step()
        history.append(float(step_loss))
        bar.set_postfix(loss=f"{float(step_loss):.4f}")
        if (step + 1) % opts["checkpoint_every"] == 0 and step + 1 < n_steps:
            save_checkpoint(step + 1)
    bar.close()
    if done < n_steps:
        save_checkpoint(n_steps)
    lens.meta["training"] = {
        "objective": "KL(final || lens), nats per token, summed over resid_pre sites",
        "optimizer": "SGD (Nesterov)", "lr": lr, "momentum": momentum, "weight_decay": opts["weight_decay"],
        "warmup_steps": warmup, "grad_clip": opts["grad_clip"], "steps": n_steps, "seed": opts["seed"],
        "tokens_per_step": per_step * window_len, "seq_len": window_len, "windows": n_windows,
        "max_prompts": opts["max_prompts"], "max_tokens": opts["max_tokens"], "loss_per_step": history,
    }
    return lens
