"""The run: inputs → batch → read positions → cache, shared by every analysis.

A :class:`Run` is built once per call. It holds the checked batch, the positions to read in each
prompt (with ``valid`` marking padding), and an ``ActivationCache`` with the hooks the analysis
needs: computed here, or the user's own after checking that it was computed from *these* tokens on
*this* model. The masked-LM lens builds its run from the masked tokens the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int

from tl_logitlens.core import compat as _compat
from tl_logitlens.core.inputs import Batch

EMBED_HOOK = "hook_embed"


@dataclass(frozen=True)
class Rows:
    """Cells of the ``[batch, pos]`` read grid flattened into rows: prompt ``b``, column ``j``,
    token position ``p``."""

    b: Int[torch.Tensor, " row"]
    j: Int[torch.Tensor, " row"]
    p: Int[torch.Tensor, " row"]

    def __len__(self) -> int:
        return int(self.b.shape[0])

    def scatter(self, values: torch.Tensor, shape: tuple[int, int], fill: float | int) -> torch.Tensor:
        """``[site, row, ...]`` values put back on the ``[site, batch, pos, ...]`` grid of ``shape``
        (``[batch, pos]``), with ``fill`` in the cells these rows do not cover (padding)."""
        out = torch.full((values.shape[0], *shape, *values.shape[2:]), fill, dtype=values.dtype, device=values.device)
        out[:, self.b, self.j] = values
        return out


@dataclass(frozen=True)
class Run:
    """A checked batch, its read positions and a cache over its tokens."""

    batch: Batch
    positions: Int[torch.Tensor, "batch pos"]
    valid: Bool[torch.Tensor, "batch pos"]
    cache: Any

    def valid_rows(self) -> Rows:
        """The real (not padding) read cells, row-major."""
        b, j = self.valid.nonzero(as_tuple=True)
        return Rows(b, j, self.positions[b, j])

    def all_rows(self) -> Rows:
        """Every read cell, row-major (padding cells read position 0 of their prompt)."""
        n_batch, n = self.positions.shape
        device = self.positions.device
        b = torch.arange(n_batch, device=device).repeat_interleave(n)
        j = torch.arange(n, device=device).repeat(n_batch)
        return Rows(b, j, self.positions.reshape(-1))


def execute(
    model: Any,
    batch: Batch,
    positions: Int[torch.Tensor, "batch pos"],
    valid: Bool[torch.Tensor, "batch pos"],
    hooks: Sequence[str],
    cache: Any = None,
) -> Run:
    """The run over ``batch``: a forward pass keeping ``hooks``, or the user's ``cache`` once it is
    shown to hold ``hooks`` over exactly these tokens."""
    if cache is None:
        cache = run_cache(model, batch.tokens, batch.mask, hooks)
    else:
        check_cache(cache, model, hooks, batch)
    return Run(batch=batch, positions=positions, valid=valid, cache=cache)


# A forward pass costs about this many token slots besides its tokens (hooks, Python, kernel launches):
# the bucket planner merges two lengths into one padded forward when padding costs less than this.
FORWARD_OVERHEAD_TOKENS = 64
# hooks whose tensors have a second position axis ([batch, head, query, key]): batches that read them
# are not split into length buckets (a split cache would need its own fill rule for the key axis)
_TWO_POSITION_HOOKS = ("hook_pattern", "hook_attn_scores")


@dataclass(frozen=True)
class ForwardPlan:
    """How a right-padded batch is run: ``groups`` of rows, each one forward pass over its rows cut to
    the group's longest (``widths``), with no attention mask unless ``masked``.

    A causal model never lets a real token attend to a later one, so right padding needs no attention
    mask: the real positions' states are those of the unpadded prompt (TransformerLens's masked
    attention costs several times the work of its plain path). A bidirectional encoder would attend to
    the pads, so its groups hold prompts of one length each. ``padding_fraction`` is the share of the
    token slots computed that are padding.
    """

    groups: tuple[tuple[int, ...], ...]
    widths: tuple[int, ...]
    n_real: int
    masked: bool = False

    @property
    def n_slots(self) -> int:
        """Token slots the forward passes compute (real tokens and padding)."""
        return sum(len(g) * w for g, w in zip(self.groups, self.widths))

    @property
    def padding_fraction(self) -> float:
        slots = self.n_slots
        return 0.0 if slots == 0 else 1.0 - self.n_real / slots


def plan_forwards(
    lengths: Sequence[int], *, causal: bool, split: bool = True, overhead: int = FORWARD_OVERHEAD_TOKENS
) -> ForwardPlan:
    """The forward passes for right-padded prompts of these ``lengths`` (see :class:`ForwardPlan`).

    Causal: the rows sorted longest first are cut into consecutive groups that minimise the token slots
    computed plus ``overhead`` per forward (an exact dynamic programme over the distinct lengths), so
    padding stays small without one forward per length. Bidirectional: one group per length, no mask;
    where ``split`` is False (the cache cannot be split) and lengths differ, one masked forward.
    """
    lengths = [int(n) for n in lengths]
    n_real = sum(lengths)
    if not lengths:
        return ForwardPlan((), (), 0)
    width = max(lengths)
    everything = (tuple(range(len(lengths))),)
    if not split or len(set(lengths)) == 1:
        masked = not causal and len(set(lengths)) > 1
        return ForwardPlan(everything, (width,), n_real, masked)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    values = sorted(set(lengths), reverse=True)
    if not causal:
        groups = tuple(tuple(i for i in order if lengths[i] == v) for v in values)
        return ForwardPlan(groups, tuple(values), n_real)
    counts = np.array([lengths.count(v) for v in values], dtype=np.int64)
    before = np.concatenate([[0], np.cumsum(counts)])  # rows longer than values[k]
    value = np.array(values, dtype=np.int64)
    best = np.zeros(len(values) + 1, dtype=np.int64)  # best[m]: cost of the first m distinct lengths
    start = np.zeros(len(values) + 1, dtype=np.int64)
    for m in range(1, len(values) + 1):
        # the last group holds the lengths values[k..m-1], padded to values[k]
        cost = best[:m] + (before[m] - before[:m]) * value[:m] + overhead
        k = int(np.argmin(cost))
        best[m], start[m] = cost[k], k
    cuts, m = [], len(values)
    while m > 0:
        cuts.append((int(start[m]), m))
        m = int(start[m])
    groups, widths = [], []
    for k, m in reversed(cuts):
        groups.append(tuple(order[int(before[k]) : int(before[m])]))
        widths.append(values[k])
    return ForwardPlan(tuple(groups), tuple(widths), n_real)


def run_cache(
    model: Any, tokens: torch.Tensor, mask: torch.Tensor, hooks: Sequence[str], plan: ForwardPlan | None = None
) -> Any:
    """A forward pass that keeps only ``hooks``, over right-padded ``tokens`` (``mask``: the real ones).

    The batch runs as :func:`plan_forwards` plans it (``plan``: a plan already made for these lengths):
    without an attention mask wherever the model cannot see the padding, in length buckets whose caches
    are joined back into one ``[batch, pos, ...]`` cache in the rows' own order. A padding cell of a
    joined cache repeats its row's last real position (finite, and never read as a token's state).
    """
    if plan is None:
        plan = plan_forwards(
            mask.sum(-1).tolist(),
            causal=not _compat.is_encoder(model),
            split=not any(h.endswith(_TWO_POSITION_HOOKS) for h in hooks),
        )
    if len(plan.groups) == 1:
        return _forward(model, tokens, mask if plan.masked else None, hooks)
    return _joined(model, tokens, plan, hooks)


@torch.inference_mode()
def _joined(model: Any, tokens: torch.Tensor, plan: ForwardPlan, hooks: Sequence[str]) -> Any:
    """One forward per group of ``plan``, joined into one cache over ``tokens``'s ``[batch, pos]``."""
    joined: dict[str, torch.Tensor] = {}
    for rows, width in zip(plan.groups, plan.widths):
        index = torch.tensor(rows, device=tokens.device)
        part = _forward(model, tokens[index, :width], None, hooks)
        for name in part.keys():
            value = part[name]
            if value.shape[:2] != (len(rows), width):
                raise RuntimeError(f"cannot join length buckets: {name} is {list(value.shape)}, not [batch, pos, ...]")
            if name not in joined:
                joined[name] = value.new_empty((tokens.shape[0], tokens.shape[1], *value.shape[2:]))
            joined[name][index, :width] = value
            joined[name][index, width:] = value[:, width - 1 : width]
        del part
    return _compat.ActivationCache(joined, model)


def _forward(model: Any, tokens: torch.Tensor, mask: torch.Tensor | None, hooks: Sequence[str]) -> Any:
    """``model.run_with_cache`` keeping ``hooks``, with ``mask`` as the attention mask when given."""
    wanted = set(hooks)
    kwargs: dict[str, Any] = {"names_filter": lambda name: name in wanted}
    if mask is not None:
        if _compat.is_encoder(model) and not _compat.is_bridge(model):
            kwargs["one_zero_attention_mask"] = mask.long()
        else:
            kwargs["attention_mask"] = mask.long()
    # no logits: every analysis reads the cached states, and the final unembedding ([batch, pos, d_vocab])
    # is a third of GPT-2 small's forward
    kwargs["return_type"] = None
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, **kwargs)
    return cache


def check_cache(cache: Any, model: Any, hooks: Sequence[str], batch: Batch) -> None:
    """A precomputed cache must be an ``ActivationCache`` of this model, over these tokens, with ``hooks``.

    Same shape is not enough: the cached embedding must be the embedding of these tokens at every
    real position (one gather and one comparison, cheap next to any analysis), so a cache of other
    tokens of the same length is refused instead of giving silently wrong numbers.
    """
    if not isinstance(cache, _compat.ActivationCache):
        raise TypeError(
            f"cache must be a transformer_lens ActivationCache (from model.run_with_cache), not "
            f"{type(cache).__name__}"
        )
    if getattr(cache, "model", model) is not model:
        raise ValueError(
            "the cache came from another model; run model.run_with_cache(...) on the model you pass, "
            "or leave cache=None"
        )
    keys = set(cache.keys())
    needed = [*hooks, _embedding_hook(model)]
    missing = [h for h in dict.fromkeys(needed) if h not in keys]
    if missing:
        raise ValueError(
            f"the cache lacks {missing}; run model.run_with_cache without a names_filter that drops "
            "them, or leave cache=None"
        )
    shape = tuple(cache[hooks[0]].shape[:2])
    if shape != tuple(batch.tokens.shape):
        raise ValueError(
            f"the cache holds [batch, pos] = {list(shape)} but the inputs tokenize to "
            f"{list(batch.tokens.shape)}; pass the same inputs the cache was computed from"
        )
    if not _same_embedding(model, cache, batch):
        if _compat.is_encoder(model):
            raise ValueError(
                "the cache was computed from other tokens: it does not hold the masked tokens of these "
                "inputs (its embeddings differ); compute it on the masked input "
                "(model.run_with_cache(result.tokens)), or leave cache=None"
            )
        raise ValueError(
            "the cache was computed from other tokens: its embeddings differ from these inputs' at "
            "some position; pass the inputs the cache was computed from, or leave cache=None"
        )


def _embedding_hook(model: Any) -> str:
    # encoders: the embedding output (LayerNorm'd token + position embeddings) is block 0's input
    return "blocks.0.hook_resid_pre" if _compat.is_encoder(model) else EMBED_HOOK


@torch.inference_mode()
def _same_embedding(model: Any, cache: Any, batch: Batch) -> bool:
    b, p = batch.mask.nonzero(as_tuple=True)
    cached = cache[_embedding_hook(model)][b, p].float()
    if _compat.is_encoder(model):
        expected = _compat.encoder_embeddings(model, batch.tokens)[b, p].float()
        return bool(torch.allclose(cached, expected, atol=1e-4, rtol=1e-4))
    expected = model.W_E.detach()[batch.tokens[b, p]].float()
    # some models scale the embedding by a constant (Gemma: sqrt(d_model)): compare up to it
    scale = (cached * expected).sum() / (expected * expected).sum().clamp(min=1e-30)
    tol = 1e-4 if cached.dtype == torch.float32 and model.W_E.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(cached, scale * expected, atol=tol * float(expected.abs().max()), rtol=tol))
