"""TransformerLens 3.x only: the same weights as a HookedTransformer and as a TransformerBridge give the
same numbers in every analysis (to 1e-4).

TransformerLens 4.x removed HookedTransformer, so there is nothing to compare with there; on 4.x the
bridge is checked against the Hugging Face model and slow references in tests/test_bridge.py, and
tests/helpers.tiny_model builds the bridge this module shows equal to the HookedTransformer.
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
    hooked_parameter_shapes,
    require_shared,
    tiny_bridge,
    tiny_model,
    tiny_tokenizer,
)
from tests.test_bridge import PROMPT, boot, save_random_gpt2
from tl_logitlens.core import compat as _compat

pytestmark = pytest.mark.skipif(
    _compat.HookedTransformer is None,
    reason=f"TransformerLens {_compat.TL_VERSION} has no HookedTransformer (removed in 4.0) to compare with",
)

LENS_FIELDS = ("top_logprobs", "entropy", "kl_to_final", "next_logprobs", "target_logprobs")
EXACT_FIELDS = ("top_ids", "next_ids", "next_ranks", "target_ranks", "tokens", "valid")


def assert_same_lens(a, b, atol: float = 1e-4) -> None:
    assert a.labels == b.labels and a.str_tokens == b.str_tokens
    for name in LENS_FIELDS + EXACT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        if name in LENS_FIELDS:
            assert_close(x, y, atol=atol, msg=name, equal_nan=True)  # padding cells are NaN on both sides
        else:
            assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_pair")
    save_random_gpt2(folder)
    return tl.load_model(folder), boot(folder)


@pytest.mark.parametrize("norm", ["recompute", "cached", "none"])
def test_gpt2_lens_hooked_equals_bridge(gpt2_pair, norm):
    hooked, bridge = gpt2_pair
    assert _compat.is_hooked_transformer(hooked) and _compat.is_compatibility_bridge(bridge)
    kwargs = dict(norm=norm, top_k=5, targets=[" the", " park"], sites=["resid_pre", "resid_mid"])
    assert_same_lens(tl.logit_lens(hooked, SENTENCES[:3], **kwargs), tl.logit_lens(bridge, SENTENCES[:3], **kwargs))


def test_gpt2_logit_diff_and_attribution_hooked_equals_bridge(gpt2_pair):
    hooked, bridge = gpt2_pair
    a = tl.logit_diff(hooked, SENTENCES[:2], " the", " a", positions=None, n_bootstrap=20)
    b = tl.logit_diff(bridge, SENTENCES[:2], " the", " a", positions=None, n_bootstrap=20)
    assert_close(a.values, b.values, atol=1e-4, equal_nan=True)  # NaN at padding in both
    for unit in ("component", "head", "neuron"):
        a = tl.direct_logit_attribution(hooked, PROMPT, " the", " a", unit=unit)
        b = tl.direct_logit_attribution(bridge, PROMPT, " the", " a", unit=unit)
        assert a.labels == b.labels
        assert_close(a.attribution, b.attribution, atol=1e-4, msg=unit)
        assert_close(a.total, b.total, atol=1e-4)


@pytest.mark.slow
def test_stories_hooked_equals_bridge():
    hooked = tl.load_model(require_shared(STORIES))
    bridge = boot(require_shared(STORIES))
    kwargs = dict(top_k=5, targets=["▁p"])
    assert_same_lens(tl.logit_lens(hooked, [PROMPT, SENTENCES[1]], **kwargs), tl.logit_lens(bridge, [PROMPT, SENTENCES[1]], **kwargs))
    a = tl.direct_logit_attribution(hooked, PROMPT, "▁p", "▁the", unit="head")
    b = tl.direct_logit_attribution(bridge, PROMPT, "▁p", "▁the", unit="head")
    assert_close(a.attribution, b.attribution, atol=1e-4)


CONFIGS = [
    dict(),
    dict(gated_mlp=True, act_fn="silu", positional_embedding_type="rotary", n_key_value_heads=2),
    dict(attn_only=True),
]


@pytest.mark.parametrize("extra", CONFIGS, ids=["standard", "rotary-gated-gqa", "attn-only"])
@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_parameter_shapes_are_hooked_transformers(normalization, extra):
    """tiny_bridge draws its weights in HookedTransformer's parameter order: same seed, same model."""
    model = tiny_model(normalization, **extra)
    shapes = hooked_parameter_shapes(
        normalization, n_layers=3, d_model=32, n_heads=4, d_vocab=len(tiny_tokenizer()), n_ctx=64,
        gated_mlp=extra.get("gated_mlp", False),
        positional_embedding_type=extra.get("positional_embedding_type", "standard"),
        n_key_value_heads=extra.get("n_key_value_heads"), attn_only=extra.get("attn_only", False),
    )
    assert shapes == [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@pytest.mark.parametrize("normalization, folded", NORM_VARIANTS, ids=NORM_IDS)
def test_tiny_bridge_is_tiny_model(normalization, folded):
    """The tiny bridge (what tests/helpers.tiny_model gives on 4.x) computes what the tiny
    HookedTransformer does: same logits, same lens in every norm."""
    hooked, bridge = tiny_model(normalization, folded), tiny_bridge(normalization, folded)
    tokens = hooked.to_tokens(SENTENCES[0])
    assert torch.equal(tokens, bridge.to_tokens(SENTENCES[0]))
    assert_close(hooked(tokens).log_softmax(-1), bridge(tokens).log_softmax(-1), atol=1e-4)
    for norm in ("recompute", "cached", "none"):
        assert_same_lens(tl.logit_lens(hooked, tokens, norm=norm), tl.logit_lens(bridge, tokens, norm=norm))


def test_tiny_attention_only_bridge_is_tiny_model():
    hooked, bridge = tiny_model("LN", attn_only=True), tiny_bridge("LN", attn_only=True)
    tokens = hooked.to_tokens(SENTENCES[2])
    assert_close(hooked(tokens).log_softmax(-1), bridge(tokens).log_softmax(-1), atol=1e-4)
    a = tl.direct_logit_attribution(hooked, tokens, " the", " a", unit="head")
    b = tl.direct_logit_attribution(bridge, tokens, " the", " a", unit="head")
    assert a.labels == b.labels
    assert_close(a.attribution, b.attribution, atol=1e-4)


def test_tiny_bridge_rotary_gated_gqa_is_tiny_model():
    kwargs = dict(gated_mlp=True, act_fn="silu", positional_embedding_type="rotary", n_key_value_heads=2)
    for folded in (False, True):
        hooked, bridge = tiny_model("RMS", folded, **kwargs), tiny_bridge("RMS", folded, **kwargs)
        tokens = hooked.to_tokens(SENTENCES[1])
        assert_close(hooked(tokens).log_softmax(-1), bridge(tokens).log_softmax(-1), atol=1e-4)
        assert_same_lens(tl.logit_lens(hooked, tokens), tl.logit_lens(bridge, tokens))
        for unit in ("component", "head"):
            a = tl.direct_logit_attribution(hooked, tokens, " the", " a", unit=unit)
            b = tl.direct_logit_attribution(bridge, tokens, " the", " a", unit=unit)
            assert a.labels == b.labels
            assert_close(a.attribution, b.attribution, atol=1e-4)
        # neurons: the bridge's b_in sits in b_out (tests/helpers.tiny_bridge), so rows differ by it
        a = tl.direct_logit_attribution(hooked, tokens, " the", " a", unit="neuron")
        b = tl.direct_logit_attribution(bridge, tokens, " the", " a", unit="neuron")
        assert_close(a.total, b.total, atol=1e-4)
