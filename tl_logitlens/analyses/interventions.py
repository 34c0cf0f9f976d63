"""Steering you can trust: a norm-matched random placebo for any intervention, alpha sweeps in one call,
and generation under hooks.

**The placebo.** An intervention is a forward hook that changes a site's states, ``h ← h + δ(h)``
(:func:`~tl_logitlens.steer`: ``δ = α v̂``; :func:`~tl_logitlens.ablate`: ``δ = −Q Qᵀ h``; a swap hook:
``δ = V(σ(c) − c)``). Its placebo, :func:`placebo`, changes each state by a vector of exactly the same
norm along a random direction: ``h ← h + ‖δ(h)‖ r̂``, per position, so a steering vector's effect is
compared with what any push of that size does. ``r̂`` is drawn once from a standard normal with
``seed`` (float64, on the CPU, so every device draws the same), then made orthogonal to

- the directions the intervention moves along (``orthogonal_to``, e.g. the lens vectors it uses; when
  not given, each position's own ``δ``), so the placebo never moves along the token it controls for;
- on LayerNorm models, the all-ones direction: every reader of a LayerNorm model's residual stream
  removes the mean, so a push along it does nothing and would make a weaker control than it looks;

and normalised. Where ``δ`` is zero (``alpha=0``, positions not intervened on) the placebo adds zero.

**Sweeps.** :func:`steering_sweep` steers along a token's lens vector at every ``alpha`` of a list, and
along the placebo direction at the same ``alpha``, in batched forward passes (one row per prompt,
``alpha`` and direction), and measures what the model's output does: the final log-prob of the token
and ``KL(unsteered ‖ steered)`` at the read positions.

**Generation.** :func:`generate` samples from the model with any forward hooks on (steering, ablation,
swaps, placebos), greedily or with a seeded generator. Each step runs the whole sequence so far (no
key-value cache), so a hook sees, and changes, every position at every step exactly as in a plain
forward pass; it costs a forward pass per new token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.steering import lens_vectors
from tl_logitlens.core.compat import normalization_type
from tl_logitlens.core.inputs import (
    Inputs,
    PositionSpec,
    check_count,
    prepare_inputs,
    resolve_positions,
    resolve_token,
)
from tl_logitlens.core.readout import check_model, resolve_sites
from tl_logitlens.core.results import ResultBase, common_fields, token_strings
from tl_logitlens.lenses import lens_name, resolve_lens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

Hook = tuple[str, Callable[..., torch.Tensor]]
DIRECTIONS = ("lens", "placebo")


def _is_centred_stream(model: Any) -> bool:
    """Every reader of the residual stream removes its mean (LayerNorm models)."""
    return normalization_type(model) in ("LN", "LNPre")


def random_direction(
    model: Any, *, seed: int = 0, orthogonal_to: torch.Tensor | None = None
) -> Float[torch.Tensor, " d_model"]:
    """The placebo's raw direction (float64, CPU, unnormalised): a standard normal draw with ``seed``,
    made orthogonal to the rows of ``orthogonal_to`` and, on LayerNorm models, to the all-ones vector.

    Raises:
        ValueError: ``orthogonal_to`` spans the whole residual stream (no direction is left).
    """
    seed = check_count(seed, "seed", 0)
    d = int(model.cfg.d_model)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(d, generator=gen, dtype=torch.float64)
    rows = []
    if orthogonal_to is not None:
        rows.append(orthogonal_to.detach().reshape(-1, d).double().cpu())
    if _is_centred_stream(model):
        rows.append(torch.ones(1, d, dtype=torch.float64))
    if rows:
        basis = _orthonormal_rows(torch.cat(rows))
        z = z - basis.T @ (basis @ z)
    if not float(z.norm()) > 1e-8 * math.sqrt(d):
        raise ValueError(
            "the directions to avoid span the whole residual stream; there is no room for a placebo"
        )
    return z


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as rows) of the span of ``rows`` (float64), rank-revealing."""
    q, r = torch.linalg.qr(rows.T)
    diag = r.diagonal().abs()
    keep = diag > 1e-10 * float(diag.max()) if diag.numel() else diag.bool()
    return q[:, keep].T


def placebo_step(
    delta: Float[torch.Tensor, "*cells d_model"],
    direction: Float[torch.Tensor, " d_model"],
    per_cell: bool,
    centred: bool,
) -> Float[torch.Tensor, "*cells d_model"]:
    """``‖δ‖ r̂`` per cell (float32): ``direction`` made unit, and first orthogonal to each cell's own ``δ``
    (its mean removed on a centred stream) when ``per_cell``."""
    r = direction.to(device=delta.device, dtype=torch.float32)
    norm = delta.norm(dim=-1, keepdim=True)
    if per_cell:
        d = delta - delta.mean(-1, keepdim=True) if centred else delta
        d_norm = d.norm(dim=-1, keepdim=True)
        unit = torch.where(d_norm > 0, d / d_norm.clamp(min=1e-30), torch.zeros((), device=d.device))
        r = r - (unit @ r)[..., None] * unit
    r_unit = r / r.norm(dim=-1, keepdim=True)
    return norm * r_unit


@no_type_check  # checks its own arguments
def placebo(model: Any, hook: Hook, *, seed: int = 0, orthogonal_to: torch.Tensor | None = None) -> Hook:
    """The norm-matched random-direction placebo of a forward hook: ``h ← h + ‖δ(h)‖ r̂`` where the hook
    itself would do ``h ← h + δ(h)``, at every position (see the module docstring for ``r̂``).

    Args:
        model: the model the hook is for.
        hook: ``(hook_name, fn)``, e.g. from :func:`~tl_logitlens.steer`, :func:`~tl_logitlens.ablate` or
            a swap.
        seed: the random direction's seed.
        orthogonal_to: ``[n, d_model]`` directions the placebo must not move along (the lens vectors the
            intervention uses); default: each position's own ``δ``.

    Returns:
        A hook ``(hook_name, fn)`` for ``model.hooks(fwd_hooks=[...])``.

    Raises:
        TypeError: ``hook`` is not a ``(name, fn)`` pair.
        ValueError: as :func:`random_direction`.

    Example:
        >>> real = tl.steer(model, None, "1_post", " happy", 8.0)
        >>> with model.hooks(fwd_hooks=[tl.placebo(model, real, seed=0)]):    # doctest: +SKIP
        ...     control = model("The dog was very")
    """
    check_model(model)
    if not (isinstance(hook, tuple) and len(hook) == 2 and isinstance(hook[0], str) and callable(hook[1])):
        raise TypeError("hook must be a (hook_name, fn) pair, as tl.steer and tl.ablate return")
    name, fn = hook
    direction = random_direction(model, seed=seed, orthogonal_to=orthogonal_to)
    per_cell, centred = orthogonal_to is None, _is_centred_stream(model)

    def run(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        changed = fn(activation, hook=hook)
        if changed is None:  # a hook that edited the activation in place
            raise ValueError(
                "the hook changed its activation in place; a placebo needs a hook that returns the new one"
            )
        h = activation.float()
        delta = changed.float() - h
        return (h + placebo_step(delta, direction, per_cell, centred)).to(activation.dtype)

    return name, run


# ------------------------------------------------------------------------------------------------
# alpha sweeps


@dataclass(frozen=True, kw_only=True, repr=False)
class SteeringSweep(ResultBase):
    """What steering along a token's lens vector does to the model's output, at each ``alpha``, with the
    norm-matched placebo beside it.

    Fields (``direction`` 0 is the lens vector, 1 the placebo; ``pos`` the read positions):

    - ``alphas``: ``[alpha]``, in the residual stream's units (``h ← h + α v̂``).
    - ``token_id``, ``site``: the token steered towards and where.
    - ``logprobs``: ``[direction, alpha, batch, pos]``, the model's final log-prob of the token (nats).
    - ``base_logprobs``: ``[batch, pos]``, the same without steering.
    - ``kl``: ``[direction, alpha, batch, pos]``, ``KL(unsteered ‖ steered)`` of the final distribution (nats).
    - ``seed``: the placebo's seed.
    """

    alphas: Float[torch.Tensor, " alpha"]
    token_id: int
    site: str
    logprobs: Float[torch.Tensor, "direction alpha batch pos"]
    base_logprobs: Float[torch.Tensor, "batch pos"]
    kl: Float[torch.Tensor, "direction alpha batch pos"]
    seed: int

    @property
    def token(self) -> str:
        return token_strings(self.tokenizer, [self.token_id])[0]

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per direction × alpha × prompt × read position: ``direction``
        (``"lens"``/``"placebo"``), ``alpha``, ``prompt``, ``position``, ``input_token``, ``token``,
        ``logprob``, ``delta_logprob`` (steered − unsteered), ``kl``, ``site``, ``lens``."""
        import pandas as pd

        n_dir, n_alpha, n_batch, n_pos = self.logprobs.shape
        grid = torch.cartesian_prod(
            torch.arange(n_dir), torch.arange(n_alpha), torch.arange(n_batch), torch.arange(n_pos)
        )
        d, a, b, j = grid.reshape(-1, 4).unbind(-1)
        valid = self.valid.cpu()[b, j]
        d, a, b, j = d[valid], a[valid], b[valid], j[valid]
        lp = self.logprobs.cpu()[d, a, b, j]
        inputs = self.input_tokens()
        return pd.DataFrame(
            {
                "direction": [DIRECTIONS[i] for i in d.tolist()],
                "alpha": self.alphas.cpu()[a].numpy(),
                "prompt": b.numpy(),
                "position": self.positions.cpu()[b, j].numpy(),
                "input_token": [inputs[x][y] for x, y in zip(b.tolist(), j.tolist())],
                "token": self.token,
                "logprob": lp.numpy(),
                "delta_logprob": (lp - self.base_logprobs.cpu()[b, j]).numpy(),
                "kl": self.kl.cpu()[d, a, b, j].numpy(),
                "site": self.site,
                "lens": self.lens_name,
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """The mean change of the token's log-prob and the mean KL against ``alpha``, lens vector and
        placebo; see :func:`tl_logitlens.plotting.interventions.sweep_figure`."""
        from tl_logitlens.plotting.interventions import sweep_figure

        return sweep_figure(self, **kwargs)


def check_alpha(alpha: object, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(float(alpha)):
        raise ValueError(f"{name} must be a finite number, not {alpha!r}")
    return float(alpha)


def _alphas(alphas: object) -> torch.Tensor:
    if isinstance(alphas, torch.Tensor):
        alphas = alphas.tolist()
    if isinstance(alphas, (int, float)) and not isinstance(alphas, bool):
        alphas = [alphas]
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or len(alphas) == 0:
        raise ValueError("alphas must be a non-empty list of finite numbers, e.g. [0, 2, 4, 8]")
    return torch.tensor([check_alpha(a, "every alpha") for a in alphas], dtype=torch.float32)


@no_type_check  # checks its own arguments
@torch.no_grad()
def steering_sweep(
    model: Any,
    inputs: Inputs,
    token: object,
    alphas: Sequence[float],
    *,
    site: str,
    lens: Any = None,
    positions: PositionSpec = None,
    read: PositionSpec = "last",
    seed: int = 0,
    batch_size: int = 32,
    prepend_bos: bool | None = None,
) -> SteeringSweep:
    """Steer along ``token``'s lens vector at every ``alpha`` in one call, and along a norm-matched
    random placebo direction at the same ``alpha``: ``h ← h + α v̂`` (exactly :func:`~tl_logitlens.steer`)
    and ``h ← h + α r̂`` (exactly :func:`placebo` of that hook with ``orthogonal_to`` the lens vector).

    Rows (prompt × alpha × direction) run ``batch_size`` at a time; ``alpha=0`` is an exact no-op.

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge``.
        inputs: a prompt, a list of prompts, or token ids.
        token: the token to steer towards (text of exactly one token, or an id).
        alphas: the steering strengths, in the residual stream's units (negative steers away).
        site: one site label the lens reads, e.g. ``"1_post"``.
        lens: ``None`` (the logit lens), a tuned or Jacobian lens.
        positions: where to steer: ``None`` (every position, the default), ``"last"``, an int or a list of
            ints (negative from each prompt's end).
        read: where to measure the output: ``"last"`` (default), ``None``, an int or a list of ints.
        seed: the placebo direction's seed.
        batch_size: rows per forward pass.

    Returns:
        A :class:`SteeringSweep`.

    Raises:
        ValueError: a NaN or infinite alpha, an empty list of alphas, a site the lens does not read, a
            token that is not one token, a zero lens vector.
        TypeError: an encoder (masked LM) model; a lens that is not a lens.

    Example:
        >>> sweep = tl.steering_sweep(model, "The dog was very", " sad", [0, 4, 8, 16], site="1_post")
        >>> sweep.plot()                                                            # doctest: +SKIP
    """
    check_model(model)
    resolved = resolve_lens(model, lens)
    alpha_t = _alphas(alphas)
    tid = resolve_token(model, token, "token")
    seed = check_count(seed, "seed", 0)
    batch_size = check_count(batch_size, "batch_size", 1)
    v = lens_vectors(model, resolved, site, [tid])[0]
    norm = float(v.norm())
    if not norm > 0:
        raise ValueError(
            f"the lens vector of {token!r} at {site!r} is zero; there is no direction to steer along"
        )
    unit = v / norm
    r = random_direction(model, seed=seed, orthogonal_to=v[None])
    r_unit = (r / r.norm()).float().to(unit.device)
    hook_name = resolve_sites(model, [site])[0].hook
    batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos)
    read_pos, read_valid = resolve_positions(read, batch)
    if positions is None:
        steered = batch.mask.clone()
    else:
        steer_pos, _ = resolve_positions(positions, batch)
        steered = torch.zeros_like(batch.mask)
        steered.scatter_(1, steer_pos, True)
    n_batch, n_alpha = batch.tokens.shape[0], alpha_t.shape[0]
    base = _final_logprobs(model, batch.tokens, None, None, read_pos)  # [batch, pos, vocab]
    # rows: direction-major, then alpha, then prompt
    d_idx, a_idx, b_idx = (
        g.reshape(-1)
        for g in torch.meshgrid(torch.arange(2), torch.arange(n_alpha), torch.arange(n_batch), indexing="ij")
    )
    device = unit.device
    # the placebo pushes by |alpha| (placebo() matches the step's norm, not its sign)
    size = alpha_t[a_idx].to(device)
    size = torch.where(d_idx.to(device) == 0, size, size.abs())
    steps = torch.where(d_idx[:, None].to(device) == 0, unit[None], r_unit[None]) * size[:, None]
    logprobs = torch.empty(2 * n_alpha * n_batch, read_pos.shape[1])
    kl = torch.empty_like(logprobs)
    for start in range(0, len(b_idx), batch_size):
        rows = slice(start, start + batch_size)
        b = b_idx[rows].to(batch.tokens.device)
        out = _final_logprobs(model, batch.tokens[b], (hook_name, steps[rows], steered[b]), None, read_pos[b])
        ref = base[b.to(base.device)]
        logprobs[rows] = out[..., tid].cpu()
        kl[rows] = (ref.exp() * (ref - out)).sum(-1).cpu()
    shape = (2, n_alpha, n_batch, read_pos.shape[1])
    nan = torch.tensor(float("nan"))
    valid = read_valid.cpu()
    logprobs = torch.where(valid, logprobs.reshape(shape), nan)
    kl = torch.where(valid, kl.reshape(shape), nan)
    return SteeringSweep(
        **common_fields(model, batch, read_pos, read_valid, lens_name(resolved)),
        alphas=alpha_t,
        token_id=tid,
        site=site,
        logprobs=logprobs,
        base_logprobs=torch.where(valid, base[..., tid].cpu(), nan),
        kl=kl,
        seed=seed,
    )


def _final_logprobs(
    model: Any,
    tokens: Int[torch.Tensor, "row seq"],
    steer: tuple[str, torch.Tensor, torch.Tensor] | None,
    extra: Sequence[Hook] | None,
    read_pos: Int[torch.Tensor, "row pos"],
) -> Float[torch.Tensor, "row pos d_vocab"]:
    """The model's final log-probs (float32) at ``read_pos`` of each row, with ``steer = (hook_name,
    steps [row, d_model], where [row, seq])`` adding ``steps[row]`` at the positions ``where`` marks."""
    hooks = list(extra or [])
    if steer is not None:
        name, steps, where = steer

        def add(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            h = activation.float()
            moved = h + steps.to(h.device)[:, None, :]
            return torch.where(where[..., None].to(h.device), moved, h).to(activation.dtype)

        hooks.append((name, add))
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    rows = torch.arange(tokens.shape[0], device=logits.device)[:, None]
    return torch.log_softmax(logits[rows, read_pos.to(logits.device)].float(), dim=-1)


# ------------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True, kw_only=True, repr=False)
class Generation(ResultBase):
    """Text generated under forward hooks.

    Fields: ``new_ids`` ``[batch, step]`` (-1 after a prompt stopped at EOS), ``new_logprobs``
    ``[batch, step]`` (the log-prob, in nats, the hooked model gave each chosen token, after
    ``temperature``; NaN after a stop), ``completions`` (each prompt's new text), ``temperature``,
    ``seed`` and ``n_hooks`` (how many hooks were on).
    """

    new_ids: Int[torch.Tensor, "batch step"]
    new_logprobs: Float[torch.Tensor, "batch step"]
    completions: tuple[str, ...]
    temperature: float
    seed: int
    n_hooks: int

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt × generated token: ``prompt``, ``step``, ``token_id``, ``token``, ``logprob``."""
        import pandas as pd

        b, s = (self.new_ids >= 0).nonzero(as_tuple=True)
        ids = self.new_ids[b, s]
        return pd.DataFrame(
            {
                "prompt": b.numpy(),
                "step": s.numpy(),
                "token_id": ids.numpy(),
                "token": token_strings(self.tokenizer, ids),
                "logprob": self.new_logprobs[b, s].numpy(),
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Each chosen token's log-prob by step; see :func:`tl_logitlens.plotting.interventions.generation_figure`."""
        from tl_logitlens.plotting.interventions import generation_figure

        return generation_figure(self, **kwargs)


@no_type_check  # checks its own arguments
@torch.no_grad()
def generate(
    model: Any,
    inputs: Inputs,
    *,
    fwd_hooks: Sequence[Hook] = (),
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    prepend_bos: bool | None = None,
) -> Generation:
    """Continue each prompt with ``fwd_hooks`` on: greedy (``temperature=0``, the default) or sampled
    from ``softmax(logits / temperature)`` (the ``top_k`` most likely tokens only, when given) with a
    ``torch.Generator`` seeded by ``seed`` (on the CPU, so the draws do not depend on the device).

    Every step is a plain forward pass over the whole sequence so far with the hooks on (no key-value
    cache), so a hook acts at every step exactly as it does in ``model.hooks(...)``: positions count in
    the sequence so far (``positions=[-1]`` is the newest token). Prompts of equal length run together;
    each other length in its own batch (no padding, so positions mean the same in every row).

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge`` (3.x or 4.x).
        inputs: a prompt, a list of prompts, or token ids ``[batch, pos]`` (each row one prompt).
        fwd_hooks: ``(hook_name, fn)`` pairs: :func:`~tl_logitlens.steer`, :func:`~tl_logitlens.ablate`,
            :func:`placebo`, swap hooks, your own.
        max_new_tokens: tokens to add (at most; fewer where EOS stops a prompt).
        temperature: 0 for greedy, else the sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens only (None: all).
        seed: the sampler's seed (ignored when greedy).
        stop_at_eos: stop a prompt once it emits the tokenizer's EOS (the EOS is kept).

    Returns:
        A :class:`Generation`.

    Raises:
        ValueError: a negative, NaN or infinite temperature; ``max_new_tokens`` or ``top_k`` below 1;
            prompts that would outgrow the model's context.
        TypeError: an encoder (masked LM); hooks that are not ``(name, fn)`` pairs.

    Example:
        >>> out = tl.generate(model, "The dog was", fwd_hooks=[tl.steer(model, None, "1_post", " sad", 8.0)])
        >>> out.completions[0]                                                        # doctest: +SKIP
    """
    check_model(model)
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens", 1)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number of 0 or more (0: greedy), not {temperature!r}")
    if top_k is not None:
        top_k = check_count(top_k, "top_k", 1, int(model.cfg.d_vocab))
    seed = check_count(seed, "seed", 0)
    hooks = list(fwd_hooks)
    for h in hooks:
        if not (isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) and callable(h[1])):
            raise TypeError("fwd_hooks must be (hook_name, fn) pairs, as tl.steer and tl.ablate return")
    batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos)
    lengths = batch.lengths.tolist()
    if max(lengths) + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"the longest prompt ({max(lengths)} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {model.cfg.n_ctx} tokens; ask for fewer tokens"
        )
    tok = getattr(model, "tokenizer", None)
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    gen = torch.Generator().manual_seed(seed)
    n_batch = len(lengths)
    new_ids = torch.full((n_batch, max_new_tokens), -1, dtype=torch.long)
    new_lp = torch.full((n_batch, max_new_tokens), float("nan"))
    for length in sorted(set(lengths)):  # one batch per prompt length, in a fixed order (the draws' order)
        rows = [b for b in range(n_batch) if lengths[b] == length]
        seq = batch.tokens[rows, :length]
        done = torch.zeros(len(rows), dtype=torch.bool)
        for step in range(max_new_tokens):
            with model.hooks(fwd_hooks=hooks):
                logits = model(seq)[:, -1].float().cpu()
            if temperature > 0:
                logits = logits / temperature
            logp = torch.log_softmax(logits, dim=-1)
            if temperature == 0:
                nxt = logp.argmax(-1)
            else:
                weights = logp.exp()
                if top_k is not None:
                    kth = weights.topk(top_k, dim=-1).values[:, -1:]
                    weights = torch.where(weights >= kth, weights, torch.zeros(()))
                nxt = torch.multinomial(weights, 1, generator=gen)[:, 0]
            live = ~done
            new_ids[rows, step] = torch.where(live, nxt, -1)
            new_lp[rows, step] = torch.where(live, logp.gather(-1, nxt[:, None])[:, 0], float("nan"))
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()):
                break
            seq = torch.cat([seq, nxt.to(seq.device)[:, None]], dim=1)
    completions = tuple(
        "" if tok is None else tok.decode([i for i in row if i >= 0]) for row in new_ids.tolist()
    )
    positions = (batch.lengths - 1)[:, None]
    return Generation(
        **common_fields(
            model, batch, positions, torch.ones_like(positions, dtype=torch.bool), "none (the model's output)"
        ),
        new_ids=new_ids,
        new_logprobs=new_lp,
        completions=completions,
        temperature=float(temperature),
        seed=seed,
        n_hooks=len(hooks),
    )
