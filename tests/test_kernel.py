"""The tiled metric kernel (tl_logitlens.core.kernel) against the whole-block definition and float64 truth.

``unembed_metrics`` computes logits one vocabulary tile at a time from states and an unembedding. It
must give :func:`block_metrics`' numbers on the full logits (and those are checked against a float64
log-softmax), whatever the tile and chunk sizes, with a soft cap, in bfloat16, with and without the
final site among the sites.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, assert_same_top_ids
from tl_logitlens.core.kernel import (
    Unembedding,
    Workspace,
    block_metrics,
    final_distribution,
    unembed_metrics,
)

FIELDS = ("top_logprobs", "entropy", "kl_to_final", "query_logprobs")


def make_problem(n_sites=3, rows=37, d_model=16, d_vocab=5000, n_q=2, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(n_sites, rows, d_model, generator=gen).to(dtype)
    W_U = (3 * torch.randn(d_model, d_vocab, generator=gen) / d_model**0.5).to(dtype)
    b_U = torch.randn(d_vocab, generator=gen).to(dtype) if bias else None
    query = torch.randint(0, d_vocab, (rows, n_q), generator=gen)
    return states, W_U, b_U, query


def reference(states, unembedding, final_index, query, top_k):
    """Full logits per site, reduced by block_metrics (the whole-block definition)."""
    logits = [unembedding.logits(x, slice(None)) for x in states]
    ws = Workspace(logits[0].shape[0], logits[0].shape[1], "cpu")
    final = final_distribution(logits[final_index], ws)
    blocks = [block_metrics(z, final, query, top_k, ws) for z in logits]
    return logits, final, {f: torch.stack([getattr(b, f) for b in blocks]) for f in (*FIELDS, "top_ids", "query_ranks")}


def check(result, ref, logits, query, final_sites, atol=1e-5):
    for f in FIELDS:
        assert_close(getattr(result, f), ref[f], atol=atol, rtol=1e-5, msg=f)
    assert_same_top_ids(result.top_ids, result.top_logprobs, ref["top_ids"], ref["top_logprobs"], atol=atol)
    for s in final_sites:
        assert bool((result.kl_to_final[s] == 0).all())
    for s, z in enumerate(logits):
        q = z.gather(1, query)
        # ranks: exact, up to logits tied with the query's within float32 rounding
        ties = ((z[:, None, :] - q[:, :, None]).abs() <= 1e-6 * q.abs()[:, :, None].clamp(min=1)).sum(-1) - 1
        assert bool(((result.query_ranks[s] - ref["query_ranks"][s]).abs() <= ties).all())


CASES = {
    "final-among-sites": dict(final_sites=frozenset({2}), tile_size=1024, chunk_size=16),
    "final-not-a-site": dict(final_sites=frozenset(), tile_size=640, chunk_size=37),
    "one-tile": dict(final_sites=frozenset({0}), tile_size=10_000, chunk_size=5),
    "narrow-tiles": dict(final_sites=frozenset({2}), tile_size=448, chunk_size=100),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_unembed_metrics_equal_block_metrics(case):
    opts = CASES[case]
    states, W_U, b_U, query = make_problem()
    unembedding = Unembedding(W_U, b_U)
    final_index = min(opts["final_sites"], default=2)
    logits, final, ref = reference(states, unembedding, final_index, query, top_k=5)
    result = unembed_metrics(
        lambda s, sl: states[s, sl], 3, lambda sl: states[final_index, sl], opts["final_sites"], query, 5,
        opts["chunk_size"], unembedding, "cpu", tile_size=opts["tile_size"],
    )
    check(result, ref, logits, query, opts["final_sites"])
    best = logits[final_index].detach().max(-1)
    chosen = logits[final_index].detach().gather(-1, result.final_top1[..., None].long())[..., 0]
    assert_same_top_ids(result.final_top1, chosen, best.indices, best.values, atol=1e-5)


def test_soft_cap_applies_per_tile():
    states, W_U, b_U, query = make_problem()
    unembedding = Unembedding(W_U, b_U, transform=lambda z: 4.0 * torch.tanh(z / 4.0))
    logits, _, ref = reference(states, unembedding, 2, query, top_k=3)
    assert float(logits[0].abs().max()) < 4.0  # the cap is in force
    result = unembed_metrics(
        lambda s, sl: states[s, sl], 3, lambda sl: states[2, sl], frozenset({2}), query, 3, 16, unembedding, "cpu",
        tile_size=1024,
    )
    check(result, ref, logits, query, {2})


def test_bfloat16_rounds_as_the_full_matmul():
    states, W_U, b_U, query = make_problem(dtype=torch.bfloat16)
    unembedding = Unembedding(W_U, b_U)
    logits, _, ref = reference(states, unembedding, 2, query, top_k=5)
    assert logits[0].dtype == torch.float32
    result = unembed_metrics(
        lambda s, sl: states[s, sl], 3, lambda sl: states[2, sl], frozenset({2}), query, 5, 16, unembedding, "cpu",
        tile_size=1024,
    )
    for f in ("top_logprobs", "entropy", "kl_to_final"):
        assert_close(getattr(result, f), ref[f], atol=1e-5, msg=f)
    # bfloat16 logits tie often; a query's logit from the gather-matmul may round one bf16 step away
    assert_close(result.query_logprobs, ref["query_logprobs"], atol=0.1)
    for s, z in enumerate(logits):
        lo = 1 + (z[:, None, :] > result.query_logprobs[s][:, :, None] + 0.1 + logits_lse(z)).sum(-1)
        hi = 1 + (z[:, None, :] > result.query_logprobs[s][:, :, None] - 0.1 + logits_lse(z)).sum(-1)
        assert bool(((result.query_ranks[s] >= lo) & (result.query_ranks[s] <= hi)).all())


def logits_lse(z):
    return z.logsumexp(-1)[:, None, None]


def test_large_top_k_and_no_bias():
    states, W_U, _, query = make_problem(bias=False)
    unembedding = Unembedding(W_U, None)
    logits, _, ref = reference(states, unembedding, 2, query, top_k=40)
    result = unembed_metrics(
        lambda s, sl: states[s, sl], 3, lambda sl: states[2, sl], frozenset({2}), query, 40, 16, unembedding, "cpu",
        tile_size=1024,
    )
    check(result, ref, logits, query, {2})


def test_accuracy_over_gpt2_vocabulary():
    """Over 50257 tokens, entropy and KL agree with a float64 log-softmax to 1e-5 nats."""
    states, W_U, b_U, query = make_problem(n_sites=2, rows=24, d_model=32, d_vocab=50257, n_q=1)
    unembedding = Unembedding(W_U, b_U)
    result = unembed_metrics(
        lambda s, sl: states[s, sl], 2, lambda sl: states[1, sl], frozenset({1}), query, 5, 16, unembedding, "cpu"
    )
    lp = [unembedding.logits(x, slice(None)).double().log_softmax(-1) for x in states]
    q = lp[1]
    for s in range(2):
        assert_close(result.entropy[s].double(), -(lp[s].exp() * lp[s]).sum(-1), atol=1e-5)
        assert_close(result.kl_to_final[s].double(), (q.exp() * (q - lp[s])).sum(-1), atol=1e-5)
        assert_close(result.top_logprobs[s].double(), lp[s].topk(5).values, atol=1e-5)


def test_bad_tile_size():
    states, W_U, b_U, query = make_problem()
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        unembed_metrics(
            lambda s, sl: states[s, sl], 3, lambda sl: states[2, sl], frozenset(), query, 5, 16,
            Unembedding(W_U, b_U), "cpu", tile_size=0,
        )


def test_unembed_metrics_on_a_model_equal_its_logits(any_model):
    """On a model: the states path (Readout.normed + Unembedding.from_model), the way logit_lens calls
    it, gives the numbers of block_metrics on the model's full logits (Readout.logits)."""
    from tl_logitlens.core.readout import Readout, Site, resolve_sites
    from tl_logitlens.lenses import resolve_lens

    tokens = torch.randint(0, any_model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    _, cache = any_model.run_with_cache(tokens)
    readout = Readout(any_model, resolve_lens(any_model, None), "recompute", True)
    sites = resolve_sites(any_model, "resid_pre")
    final = Site("final_post", f"blocks.{any_model.cfg.n_layers - 1}.hook_resid_post")
    rows_b, rows_p = torch.arange(2).repeat_interleave(9), torch.arange(9).repeat(2)
    query = tokens.reshape(-1, 1)
    final_sites = frozenset({len(sites) - 1})
    args = (len(sites),)
    tiled = unembed_metrics(
        lambda s, sl: readout.normed(cache, sites[s], rows_b[sl], rows_p[sl]), *args,
        lambda sl: readout.normed(cache, final, rows_b[sl], rows_p[sl]), final_sites, query, 3, 7,
        Unembedding.from_model(any_model, include_bias=True), "cpu", tile_size=128,
    )
    logits = [readout.logits(cache, site, rows_b, rows_p) for site in sites]
    ws = Workspace(rows_b.shape[0], any_model.cfg.d_vocab, "cpu")
    final_dist = final_distribution(readout.logits(cache, final, rows_b, rows_p), ws)
    per_site = [block_metrics(z, final_dist, query, 3, ws) for z in logits]
    blocks = {f: torch.stack([getattr(b, f) for b in per_site]) for f in (*FIELDS, "top_ids", "query_ranks")}
    best = logits[-1].detach().max(-1)
    chosen = logits[-1].detach().gather(-1, tiled.final_top1[..., None].long())[..., 0]
    assert_same_top_ids(tiled.final_top1, chosen, best.indices, best.values, atol=1e-5)
    for f in (*FIELDS, "top_ids", "query_ranks"):
        assert_close(getattr(tiled, f), blocks[f], atol=1e-5, msg=f)

