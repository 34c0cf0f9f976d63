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

import torch
from jaxtyping import Bool, Int

from tl_logitlens import _compat
from tl_logitlens.inputs import Batch

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


def run_cache(model: Any, tokens: torch.Tensor, mask: torch.Tensor, hooks: Sequence[str]) -> Any:
    """A forward pass that keeps only ``hooks`` (the attention mask is passed only when there is padding)."""
    wanted = set(hooks)
    kwargs: dict[str, Any] = {"names_filter": lambda name: name in wanted}
    if not bool(mask.all()):
        if _compat.is_encoder(model) and not _compat.is_bridge(model):
            kwargs["one_zero_attention_mask"] = mask.long()
        else:
            kwargs["attention_mask"] = mask.long()
    if _compat.is_encoder(model):
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
