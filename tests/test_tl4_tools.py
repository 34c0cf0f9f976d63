"""TransformerLens 4.x's own ``tools.analysis.logit_lens`` and ours agree on the same bridge and inputs.

Theirs reads ``accumulated_resid`` through ``ln_final`` (recomputed statistics) and the unembedding,
as ours does with ``norm="recompute"``; it ranks from 0, ours from 1. (TransformerLens 3.9 has no
``logit_lens`` tool; its ``direct_logit_attribution`` is compared in tests/test_bridge.py.)
"""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import (
    NORM_IDS,
    NORM_VARIANTS,
    SENTENCES,
    STORIES,
    assert_close,
    assert_same_top_ids,
    require_shared,
    tiny_bridge,
)
from tests.test_bridge import PROMPT, boot
from tl_logitlens.core import compat as _compat

try:
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens
except ImportError:
    tl_logit_lens = None

pytestmark = pytest.mark.skipif(
    tl_logit_lens is None,
    reason=f"TransformerLens {_compat.TL_VERSION} has no tools.analysis.logit_lens (added in 4.x)",
)


def compare(model, tokens, atol=1e-4) -> None:
    ours = tl.logit_lens(model, tokens, top_k=5)
    top = tl_logit_lens(model, tokens, positions=None, top_k=5, return_type="log_probs")
    assert top.labels == list(ours.labels)
    assert_close(ours.top_logprobs[:, 0], top.readout.values[:, 0], atol=atol)
    theirs = top.readout
    assert_same_top_ids(ours.top_ids[:, 0], ours.top_logprobs[:, 0], theirs.top_ids[:, 0], theirs.values[:, 0], atol=atol)
    assert_close(ours.entropy[:, 0], top.readout.entropy[:, 0], atol=atol)
    # next-token log-probs and ranks: per-row targets
    nxt = tokens[:, 1:]
    per_row = tl_logit_lens(model, tokens[:, :-1], positions=None, targets=nxt, return_type="log_probs")
    assert_close(ours.next_logprobs[:, 0, :-1], per_row.readout.values[:, 0, :, 0], atol=atol)
    assert torch.equal(ours.next_ranks[:, 0, :-1], per_row.readout.target_ranks[:, 0, :, 0] + 1)


@pytest.mark.parametrize("normalization, folded", NORM_VARIANTS, ids=NORM_IDS)
def test_tiny_bridges(normalization, folded):
    model = tiny_bridge(normalization, folded)
    compare(model, model.to_tokens(SENTENCES[0]))


@pytest.mark.slow
def test_stories_bridge():
    model = boot(require_shared(STORIES))
    compare(model, model.to_tokens(PROMPT))
