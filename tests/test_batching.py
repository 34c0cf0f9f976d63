"""Batches without padding waste: the forward planner, length buckets joined back into one cache, and
the analyses that batch many prompts giving each prompt's own numbers in the user's order."""

from __future__ import annotations

import itertools

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, tiny_model
from tl_logitlens.core.run import ForwardPlan, plan_forwards, run_cache

# prompts of very different lengths, in an order that is not sorted by length
MIXED = [
    SENTENCES[0],
    "The",
    " ".join(SENTENCES[1:4]),
    "Tom and Anna went",
    SENTENCES[4] + " " + SENTENCES[2],
    "She loved to play",
    SENTENCES[3],
]


def _brute_force_cost(lengths: list[int], overhead: int) -> int:
    """The least slots + overhead over every split of the longest-first order into consecutive groups."""
    ordered = sorted(lengths, reverse=True)
    best = None
    n = len(ordered)
    for cuts in itertools.product([False, True], repeat=n - 1):
        cost, start = 0, 0
        for i, cut in enumerate([*cuts, True]):
            if cut:
                group = ordered[start : i + 1]
                cost += len(group) * group[0] + overhead
                start = i + 1
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("overhead", [0, 5, 64], ids=["no-overhead", "overhead-5", "overhead-64"])
def test_causal_plan_is_the_cheapest_split(overhead):
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        lengths = torch.randint(1, 30, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        plan = plan_forwards(lengths, causal=True, overhead=overhead)
        assert sorted(i for g in plan.groups for i in g) == list(range(len(lengths)))  # every row once
        for group, width in zip(plan.groups, plan.widths):
            assert width == max(lengths[i] for i in group)
        assert not plan.masked and plan.n_real == sum(lengths)
        assert plan.n_slots + overhead * len(plan.groups) == _brute_force_cost(lengths, overhead)


def test_plan_padding_fraction_and_bidirectional_groups():
    plan = plan_forwards([4, 4, 2], causal=True, overhead=10**6)  # one forward: 12 slots, 10 real
    assert plan.groups == ((0, 1, 2),) and plan.n_slots == 12 and plan.padding_fraction == pytest.approx(2 / 12)
    assert plan_forwards([4, 4, 4], causal=True).padding_fraction == 0.0
    encoder = plan_forwards([3, 5, 3, 2], causal=False)
    assert encoder.groups == ((1,), (0, 2), (3,)) and encoder.padding_fraction == 0.0 and not encoder.masked
    kept = plan_forwards([3, 5], causal=False, split=False)  # a cache that cannot be split: one masked forward
    assert kept.masked and kept.groups == ((0, 1),)
    assert plan_forwards([], causal=True) == ForwardPlan((), (), 0)


def _alone(model, prompt, hooks):
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    return cache


@pytest.mark.parametrize("overhead", [0, 10**6], ids=["buckets", "one-forward"])
def test_run_cache_equals_each_prompt_alone(ln_model, overhead):
    model = ln_model
    hooks = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post", "ln_final.hook_scale"]
    rows = [model.to_tokens(p)[0] for p in MIXED]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    plan = plan_forwards([len(r) for r in rows], causal=True, overhead=overhead)
    assert len(plan.groups) == (1 if overhead else len({len(r) for r in rows}))
    cache = run_cache(model, tokens, mask, hooks, plan)
    for i, prompt in enumerate(MIXED):
        alone = _alone(model, prompt, hooks)
        n = len(rows[i])
        for hook in hooks:
            assert cache[hook].shape[:2] == (len(rows), width)
            # float32 rounding of other batch shapes, on states of magnitude up to ~30
            assert_close(cache[hook][i, :n], alone[hook][0], atol=5e-5, rtol=1e-5, msg=f"prompt {i} {hook}")
            assert bool(torch.isfinite(cache[hook][i]).all())  # padding cells too


def test_padded_attention_mask_path_equals_the_unmasked_one(ln_model):
    """What run_cache no longer does (a masked forward over right padding) gives the same real states."""
    model = ln_model
    batch = [model.to_tokens(p)[0] for p in MIXED]
    width = max(len(r) for r in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    hook = "blocks.2.hook_resid_post"
    _, masked = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n == hook)
    plain = run_cache(model, tokens, mask.bool(), [hook])
    real = mask.bool()
    assert_close(plain[hook][real], masked[hook][real], atol=5e-5, rtol=1e-5)


_LENS_FIELDS = ("top_ids", "top_logprobs", "entropy", "kl_to_final", "next_logprobs", "next_ranks", "target_logprobs", "target_ranks")


@pytest.mark.parametrize(("normalization", "folded"), [("LN", False), ("RMS", True)], ids=["LN-unfolded", "RMS-folded"])
def test_logit_lens_on_mixed_lengths_equals_each_prompt_alone_in_order(normalization, folded):
    model = tiny_model(normalization, folded)
    together = tl.logit_lens(model, MIXED, targets=[" the"], top_k=3)
    assert together.str_tokens == tuple(s for p in MIXED for s in tl.logit_lens(model, p).str_tokens)
    for i, prompt in enumerate(MIXED):
        alone = tl.logit_lens(model, prompt, targets=[" the"], top_k=3)
        n = alone.valid.shape[1]
        assert bool(together.valid[i, :n].all()) and not bool(together.valid[i, n:].any())
        for name in _LENS_FIELDS:
            got, want = getattr(together, name)[:, i, :n], getattr(alone, name)[:, 0]
            if got.dtype.is_floating_point:
                assert_close(got, want, atol=2e-5, rtol=1e-5, equal_nan=True, msg=f"prompt {i} {name}")
            else:
                assert torch.equal(got, want), f"prompt {i} {name}"


def test_logit_diff_and_attribution_on_mixed_lengths_equal_each_prompt_alone(ln_model):
    model = ln_model
    together = tl.logit_diff(model, MIXED, " the", " a")
    # head_source reads attention patterns ([batch, head, query, key]): one forward, still unmasked
    units = ("head", "head_source")
    dla = {u: tl.direct_logit_attribution(model, MIXED, " the", " a", unit=u) for u in units}
    for i, prompt in enumerate(MIXED):
        alone = tl.logit_diff(model, prompt, " the", " a")
        assert_close(together.values[:, i], alone.values[:, 0], atol=2e-5, rtol=1e-5, msg=f"prompt {i}")
        for unit in units:
            one = tl.direct_logit_attribution(model, prompt, " the", " a", unit=unit)
            assert_close(dla[unit].attribution[:, i], one.attribution[:, 0], atol=2e-5, rtol=1e-5, msg=f"{unit} {i}")


def test_report_batches_prompts_by_length_and_keeps_their_order(ln_model):
    from tl_logitlens.reporting import compute_report

    prompts = MIXED * 3
    data = compute_report(ln_model, prompts, batch_size=4)
    together = tl.logit_lens(ln_model, prompts, top_k=5)
    assert data.lens.str_tokens == together.str_tokens  # the user's order
    assert torch.equal(data.lens.valid, together.valid) and torch.equal(data.lens.tokens, together.tokens)
    for name in ("top_ids", "top_logprobs", "kl_to_final", "next_logprobs"):
        got, want = getattr(data.lens, name), getattr(together, name)
        if got.dtype.is_floating_point:
            assert_close(got, want, atol=2e-5, rtol=1e-5, equal_nan=True, msg=name)
        else:
            assert torch.equal(got, want), name
    # sorted batches of 4 pad less than batches of 4 in the user's order
    lengths = together.valid.sum(-1).tolist()
    unsorted = [plan_forwards(lengths[i : i + 4], causal=True) for i in range(0, len(prompts), 4)]
    before = 1 - sum(p.n_real for p in unsorted) / sum(p.n_slots for p in unsorted)
    assert 0 <= data.padding_fraction < before


def test_select_prompts_reorders_every_axis(ln_model):
    res = tl.logit_lens(ln_model, MIXED[:3], targets=[" the"], final_top_k=2)
    back = res.select_prompts([2, 0, 1])
    assert back.str_tokens == (res.str_tokens[2], res.str_tokens[0], res.str_tokens[1])
    assert torch.equal(back.top_ids[:, 1], res.top_ids[:, 0]) and torch.equal(back.final_top_ids[0], res.final_top_ids[2])
    assert torch.equal(back.positions[2], res.positions[1]) and torch.equal(back.target_ids[0], res.target_ids[2])
    with pytest.raises(ValueError, match="prompt indices in"):
        res.select_prompts([3])
