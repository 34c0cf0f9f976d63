"""Integration: the lens on a real trained model (stories260K: Llama architecture, RMSNorm, GQA)."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import assert_close, assert_same_top_ids

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the"


def test_final_layer_predicts_park_and_earlier_layers_disagree(stories):
    result = tl.logit_lens(stories, PROMPT, positions="last", targets=["▁p", " p"])
    top1 = [site[0][0][0] for site in result.top_tokens()]
    assert top1[-1] == " p"
    assert any(t != " p" for t in top1[:-1])
    # the target's rank falls to 1 by the final layer
    assert int(result.target_ranks[-1, 0, 0, 0]) == 1
    assert int(result.target_ranks[0, 0, 0, 0]) > 1
    assert result.target_ids[0, 0, 0] == result.target_ids[0, 0, 1]  # '▁p' and ' p' name one token


def test_final_site_is_the_models_own_distribution(stories):
    tokens = stories.to_tokens([PROMPT])
    result = tl.logit_lens(stories, tokens, top_k=8)
    model_lp = stories(tokens).log_softmax(-1)[0]
    assert_close(result.top_logprobs[-1, 0], model_lp.topk(8).values, atol=1e-4)
    top = model_lp.topk(8)
    assert_same_top_ids(result.top_ids[-1, 0], result.top_logprobs[-1, 0], top.indices, top.values, atol=1e-4)


def test_lens_gets_better_with_depth(stories):
    """On real text the next token's log-prob rises and KL to the final layer falls with depth."""
    import json

    from tests.helpers import SHARED, require_shared

    stories_json = require_shared(SHARED / "corpora" / "tinystories_1000.json")
    texts = [t[:200] for t in json.loads(stories_json.read_text())[-8:]]
    result = tl.logit_lens(stories, texts)
    mean_lp = torch.nanmean(result.next_logprobs.flatten(1), dim=1)
    mean_kl = torch.nanmean(result.kl_to_final.flatten(1), dim=1)
    assert mean_lp[-1] > mean_lp[0] + 1.0
    assert mean_kl[0] > mean_kl[-2] > mean_kl[-1] - 1e-6
    assert abs(float(mean_kl[-1])) < 1e-4
    # the model's mean loss on this text is what the final site reports
    assert 0.5 < -float(mean_lp[-1]) < 2.5
