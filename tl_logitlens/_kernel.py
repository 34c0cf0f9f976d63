"""The lens's metric kernel: one block of float32 logits reduced to every statistic the lens reports.

Every analysis that turns a site's logits into a distribution (the causal lens, the masked-LM lens,
the corpus evaluator) reduces them here, so all of them are exactly as accurate as each other. The
driver :func:`site_metrics` projects ``chunk_size`` rows at a time, so the full
``[site, row, d_vocab]`` tensor never exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

RowLogits = Callable[[int, slice], Float[torch.Tensor, "row d_vocab"]]


@dataclass(frozen=True)
class FinalDistribution:
    """The distribution every site is compared with (the model's own output), for one block of rows.

    ``probs`` are its probabilities, ``neg_entropy`` is ``Σ q·log q`` (nats), ``top1`` its argmax.
    """

    probs: Float[torch.Tensor, "row d_vocab"]
    neg_entropy: Float[torch.Tensor, " row"]
    top1: Int[torch.Tensor, " row"]


@dataclass(frozen=True)
class BlockMetrics:
    """The lens statistics of one block of rows (see :func:`block_metrics`)."""

    top_ids: Int[torch.Tensor, "row k"]
    top_logprobs: Float[torch.Tensor, "row k"]
    entropy: Float[torch.Tensor, " row"]
    kl_to_final: Float[torch.Tensor, " row"]
    query_logprobs: Float[torch.Tensor, "row q"]
    query_ranks: Int[torch.Tensor, "row q"]


class Workspace:
    """Scratch buffers reused by every block: one ``[rows, d_vocab]`` float32 block and a ones vector."""

    def __init__(self, rows: int, d_vocab: int, device: torch.device | str) -> None:
        self.scratch = torch.empty(rows, d_vocab, device=device)
        self.ones = torch.ones(d_vocab, 1, device=device)

    def block(self, rows: int) -> Float[torch.Tensor, "row d_vocab"]:
        return self.scratch[:rows]


@torch.inference_mode()
def final_distribution(z: Float[torch.Tensor, "row d_vocab"], ws: Workspace) -> FinalDistribution:
    """The reference distribution of float32 logits ``z``."""
    probs = torch.softmax(z, dim=-1)
    top1 = z.argmax(-1, keepdim=True)
    lse = _lse_from_top(z, probs, top1)
    neg_entropy = _rowdot(probs, torch.sub(z, lse[:, None], out=ws.block(z.shape[0])))
    return FinalDistribution(probs=probs, neg_entropy=neg_entropy, top1=top1[:, 0])


@torch.inference_mode()
def block_metrics(
    z: Float[torch.Tensor, "row d_vocab"],
    final: FinalDistribution,
    query_ids: Int[torch.Tensor, "row q"],
    top_k: int,
    ws: Workspace,
) -> BlockMetrics:
    """Reduce one block of float32 logits to the lens metrics.

    With ``log p = z - logsumexp(z)`` written once into the workspace: entropy ``H = -Σ p·log p``,
    ``KL(final ‖ p) = Σ q·log q - Σ q·log p`` for the final distribution ``q``; the rank of a token
    is 1 + the number of tokens with a strictly larger logit. Summing ``p·log p`` rather than
    ``p·z`` keeps every term small, so the float32 sums stay accurate to ~1e-5 nats over a 50k
    vocabulary.
    """
    top_vals, top_ids = z.topk(top_k, dim=-1)
    probs = torch.softmax(z, dim=-1)
    lse = _lse_from_top(z, probs, top_ids[:, :1])
    logp = torch.sub(z, lse[:, None], out=ws.block(z.shape[0]))
    entropy = -_rowdot(probs, logp)
    del probs
    kl = final.neg_entropy - _rowdot(final.probs, logp)
    q_logits = z.gather(-1, query_ids)
    # counting in float32 through a mat-vec is 4x faster than summing a bool tensor, and exact:
    # counts stay far below 2**24 (the workspace is free again once the log-probs are used)
    above = ws.block(z.shape[0])
    ranks = torch.empty_like(q_logits, dtype=torch.long)
    for i in range(q_logits.shape[1]):
        torch.gt(z, q_logits[:, i : i + 1], out=above)
        ranks[:, i] = 1 + (above @ ws.ones).reshape(-1).long()
    return BlockMetrics(
        top_ids=top_ids,
        top_logprobs=top_vals - lse[:, None],
        entropy=entropy,
        kl_to_final=kl,
        query_logprobs=q_logits - lse[:, None],
        query_ranks=ranks,
    )


def _lse_from_top(
    z: Float[torch.Tensor, "row d_vocab"], probs: Float[torch.Tensor, "row d_vocab"], top: Int[torch.Tensor, "row 1"]
) -> Float[torch.Tensor, " row"]:
    """``logsumexp(z)`` read off the top entry: ``log p_top = z_top - lse``; ``p_top >= 1/d_vocab``
    keeps the log well conditioned, and it saves a pass over the block."""
    return (z.gather(-1, top) - probs.gather(-1, top).log()).squeeze(-1)


def _rowdot(
    a: Float[torch.Tensor, "row n"], b: Float[torch.Tensor, "row n"], block: int = 4096
) -> Float[torch.Tensor, " row"]:
    """``(a * b).sum(-1)`` without a ``[row, n]`` temporary, accurate in float32.

    One mat-vec over 50k terms accumulates ~1e-4 of rounding; summing ``block``-long batched
    mat-vec partials keeps the error at the level of a pairwise ``sum`` (~1e-5 nats on GPT-2's
    vocabulary), and is faster than either (the blocks stay in cache).
    """
    parts = [
        torch.bmm(a[:, j : j + block, None].transpose(1, 2), b[:, j : j + block, None]).reshape(-1)
        for j in range(0, a.shape[1], block)
    ]
    return torch.stack(parts, -1).sum(-1)


@dataclass(frozen=True)
class SiteMetrics:
    """:class:`BlockMetrics` of every site, stacked ``[site, row, ...]``, and the final top-1 ``[row]``."""

    top_ids: Int[torch.Tensor, "site row k"]
    top_logprobs: Float[torch.Tensor, "site row k"]
    entropy: Float[torch.Tensor, "site row"]
    kl_to_final: Float[torch.Tensor, "site row"]
    query_logprobs: Float[torch.Tensor, "site row q"]
    query_ranks: Int[torch.Tensor, "site row q"]
    final_top1: Int[torch.Tensor, " row"]


@torch.inference_mode()
def site_metrics(
    site_logits: RowLogits,
    n_sites: int,
    final_logits: Callable[[slice], Float[torch.Tensor, "row d_vocab"]],
    final_sites: frozenset[int],
    query: Int[torch.Tensor, "row q"],
    top_k: int,
    chunk_size: int,
    d_vocab: int,
    device: torch.device | str,
) -> SiteMetrics:
    """Reduce ``n_sites`` sites over ``query.shape[0]`` rows, ``chunk_size`` rows at a time.

    ``site_logits(s, rows)`` gives site ``s``'s float32 logits at a slice of the rows and
    ``final_logits(rows)`` the model's own; sites in ``final_sites`` *are* the final distribution,
    whose logits are computed once per chunk and freed before the other sites are projected.
    """
    n_rows, n_q = query.shape
    out = {
        "top_ids": torch.empty(n_sites, n_rows, top_k, dtype=torch.long, device=device),
        "top_logprobs": torch.empty(n_sites, n_rows, top_k, device=device),
        "entropy": torch.empty(n_sites, n_rows, device=device),
        "kl_to_final": torch.empty(n_sites, n_rows, device=device),
        "query_logprobs": torch.empty(n_sites, n_rows, n_q, device=device),
        "query_ranks": torch.empty(n_sites, n_rows, n_q, dtype=torch.long, device=device),
    }
    final_top1 = torch.empty(n_rows, dtype=torch.long, device=device)
    ws = Workspace(min(chunk_size, max(n_rows, 1)), d_vocab, device)

    def reduce_into(s: int, sl: slice, z: torch.Tensor, final: FinalDistribution) -> None:
        m = block_metrics(z, final, query[sl], top_k, ws)
        for name, buf in out.items():
            buf[s, sl] = getattr(m, name)

    for start in range(0, n_rows, chunk_size):
        sl = slice(start, min(start + chunk_size, n_rows))
        zf = final_logits(sl)
        final = final_distribution(zf, ws)
        final_top1[sl] = final.top1
        for s in sorted(final_sites):
            reduce_into(s, sl, zf, final)
        del zf
        for s in range(n_sites):
            if s not in final_sites:
                reduce_into(s, sl, site_logits(s, sl), final)
    return SiteMetrics(**out, final_top1=final_top1)
