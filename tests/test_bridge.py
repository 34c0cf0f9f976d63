"""TransformerBridge, on TransformerLens 3.9 and 4.x: every analysis gives the model's own numbers.

The same checkpoint folders (a seeded random GPT-2 with the real GPT-2 tokenizer, and stories260K) are
booted as compatibility-mode bridges on whichever TransformerLens is installed; the lens is checked
against the Hugging Face model's own log-probs at the final site and against the slow reference of
tests/test_lens.py at every site; the attribution rows add up to the model's logit differences and
agree with TransformerLens's own ``direct_logit_attribution``. tests/test_bridge_vs_hooked.py
compares the bridge with ``HookedTransformer`` (3.x); tests/test_tl4_tools.py compares with
TransformerLens 4.x's own ``logit_lens``.
"""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import GPT2_TOKENIZER, SENTENCES, STORIES, assert_close, require_shared
from tests.test_lens import reference_lens
from tl_logitlens.core import compat as _compat

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the"
# Over GPT-2's 50257 tokens the float32 entropy and KL (blocked dot products in lens._rowdot) agree
# with a float32 log-softmax reference to ~1e-5 nats; 1e-4 is the suite's identity tolerance.
GPT2_ATOL = 1e-4


def check_against_reference(result, ref_logprobs, atol: float) -> None:
    """tests/test_lens.py's check, with ranks compared up to ties: over 50257 tokens, logits closer than
    float32 rounding (1e-5) are common deep in the distribution, so a rank may differ by the number of
    reference log-probs within 1e-5 of the token's, and by no more."""
    k = result.top_ids.shape[-1]
    for s in range(ref_logprobs.shape[0]):
        for b, j in result.valid.nonzero().tolist():
            p = int(result.positions[b, j])
            lp, q = ref_logprobs[s, b, p], ref_logprobs[-1, b, p]
            vals, ids = lp.topk(k)
            assert_close(result.top_logprobs[s, b, j], vals, atol=atol)
            assert result.top_ids[s, b, j].tolist() == ids.tolist()
            assert_close(result.entropy[s, b, j], -(lp.exp() * lp).sum(), atol=atol)
            assert_close(result.kl_to_final[s, b, j], (q.exp() * (q - lp)).sum(), atol=atol)
            queries = [(int(result.next_ids[b, j]), result.next_logprobs[s, b, j], result.next_ranks[s, b, j])]
            if result.target_ids is not None:
                for t, tid in enumerate(result.target_ids[b, j].tolist()):
                    queries.append((tid, result.target_logprobs[s, b, j, t], result.target_ranks[s, b, j, t]))
            for tid, our_lp, our_rank in queries:
                if tid < 0:
                    continue
                assert_close(our_lp, lp[tid], atol=atol)
                ties = int(((lp - lp[tid]).abs() < 1e-5).sum()) - 1
                assert abs(int(our_rank) - (1 + int((lp > lp[tid]).sum()))) <= ties


def save_random_gpt2(folder) -> None:
    """A seeded random ``GPT2LMHeadModel`` with non-trivial norm gains and biases, and GPT-2's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # initializer_range 0.3 spreads the logits (about ±10): at the default 0.02 the 50257 log-probs sit
    # within 1e-3 of log(1/50257), closer than float rounding, and ranks would be decided by rounding
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257, initializer_range=0.3)
    hf = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    hf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(require_shared(GPT2_TOKENIZER)).save_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_random_bridge")
    save_random_gpt2(folder)
    return folder


def boot(folder, **compat) -> object:
    """A compatibility-mode bridge booted from a local folder (offline), as a user would build it."""
    bridge = _compat.TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    return bridge.eval()


def hf_logprobs(folder, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Hugging Face model's own next-token log-probs (eager attention, as the bridge runs)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens, attention_mask=mask).logits.float().log_softmax(-1)


@pytest.fixture(scope="module")
def gpt2_bridge(gpt2_folder):
    return boot(gpt2_folder)


@pytest.fixture(scope="module")
def stories_bridge():
    return boot(require_shared(STORIES))


def test_load_model_gives_this_versions_model(gpt2_folder):
    model = tl.load_model(gpt2_folder)
    if _compat.HookedTransformer is not None:
        assert _compat.is_hooked_transformer(model)
    else:
        assert _compat.is_compatibility_bridge(model)
        assert model.cfg.model_name == gpt2_folder.name  # not the staged temporary folder
    assert _compat.normalization_type(model) == "LNPre" and not model.training
    # a bridge the user built is accepted as it is
    bridge = boot(gpt2_folder)
    assert tl.load_model(bridge) is bridge


@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_gpt2_bridge_final_site_is_hugging_face(gpt2_folder, gpt2_bridge, norm):
    """Identity: the lens at ``final_post`` is the Hugging Face model's distribution, padded batch included."""
    result = tl.logit_lens(gpt2_bridge, SENTENCES[:3], norm=norm, top_k=6)
    mask = torch.zeros_like(result.tokens)
    for b, toks in enumerate(result.str_tokens):
        mask[b, : len(toks)] = 1
    ref = hf_logprobs(gpt2_folder, result.tokens, mask)
    for b, j in result.valid.nonzero().tolist():
        vals, ids = ref[b, j].topk(6)
        assert_close(result.top_logprobs[-1, b, j], vals, atol=1e-4)
        assert result.top_ids[-1, b, j].tolist() == ids.tolist()
    assert_close(result.kl_to_final[-1][result.valid], torch.zeros(int(result.valid.sum())), atol=1e-4)


@pytest.mark.parametrize("norm", ["recompute", "cached", "none"])
def test_gpt2_bridge_every_site_matches_slow_reference(gpt2_bridge, norm):
    tokens = gpt2_bridge.to_tokens(SENTENCES[1])
    result = tl.logit_lens(gpt2_bridge, tokens, norm=norm, top_k=3, targets=[" the", " park"], chunk_size=5)
    check_against_reference(result, reference_lens(gpt2_bridge, tokens, norm=norm), atol=GPT2_ATOL)


def test_unfolded_bridge_the_user_built(gpt2_folder):
    """A bridge without weight processing (``no_processing=True``): ln_final keeps its gain and bias,
    and both norms still give the Hugging Face distribution at the final site."""
    bridge = boot(gpt2_folder, no_processing=True)
    assert _compat.normalization_type(bridge) == "LN"
    tokens = bridge.to_tokens(SENTENCES[2])
    ref = hf_logprobs(gpt2_folder, tokens)[0]
    for norm in ("recompute", "cached"):
        result = tl.logit_lens(bridge, tokens, norm=norm, top_k=4)
        assert_close(result.top_logprobs[-1, 0], ref.topk(4).values, atol=1e-4)
        check_against_reference(result, reference_lens(bridge, tokens, norm=norm), atol=GPT2_ATOL)


@pytest.mark.slow
def test_stories_bridge_matches_hugging_face_and_reference(stories_bridge):
    """Llama architecture (RMSNorm, rotary, grouped-query attention) through the bridge."""
    folder = require_shared(STORIES)
    tokens = stories_bridge.to_tokens(PROMPT)
    result = tl.logit_lens(stories_bridge, tokens, top_k=5, targets=["▁p"])
    ref = hf_logprobs(folder, tokens)[0]
    assert_close(result.top_logprobs[-1, 0], ref.topk(5).values, atol=1e-4)
    assert tl.display_tokens(stories_bridge.tokenizer, result.top_ids[-1, 0, -1, :1]) == [" p"]
    check_against_reference(result, reference_lens(stories_bridge, tokens), atol=1e-4)


def test_logit_diff_on_bridge_is_the_models_difference(gpt2_folder, gpt2_bridge):
    tokens = gpt2_bridge.to_tokens(SENTENCES[0])
    result = tl.logit_diff(gpt2_bridge, tokens, " the", " a", positions=None, n_bootstrap=10)
    ref = hf_logprobs(gpt2_folder, tokens)[0]
    the, a = gpt2_bridge.to_single_token(" the"), gpt2_bridge.to_single_token(" a")
    assert_close(result.values[-1, 0, :, 0], ref[:, the] - ref[:, a], atol=1e-4)


@pytest.mark.parametrize("unit", ["component", "head"])
def test_attribution_on_bridge_adds_up_and_matches_transformer_lens(gpt2_bridge, unit):
    """Our rows add up to the model's logit difference; TransformerLens's own DLA (3.9 and 4.x) gives
    the same per-component values: its ``{l}_attn_out`` is our ``{l}_attn_out + {l}_attn_b_O``, and it
    leaves out ``b_U`` (our ``unembed_bias`` row)."""
    from transformer_lens.tools.analysis import direct_logit_attribution as tl_dla

    tokens = gpt2_bridge.to_tokens(PROMPT)
    ours = tl.direct_logit_attribution(gpt2_bridge, tokens, " the", " a", unit=unit)
    logits = gpt2_bridge(tokens)[0, -1]
    the, a = gpt2_bridge.to_single_token(" the"), gpt2_bridge.to_single_token(" a")
    assert_close(ours.attribution.sum(0)[0, 0, 0], logits[the] - logits[a], atol=1e-4)
    theirs = tl_dla(gpt2_bridge, tokens, " the", " a", unit="component")
    mine = dict(zip(ours.labels, ours.attribution[:, 0, 0, 0].tolist()))
    n_layers = gpt2_bridge.cfg.n_layers
    for label, value in zip(theirs.labels, theirs.attribution.reshape(len(theirs.labels), -1)[:, 0].tolist()):
        if label.endswith("_attn_out"):
            layer = label.split("_")[0]
            if unit == "head":
                heads = [v for lab, v in mine.items() if lab.startswith(f"L{layer}H")]
                expected = sum(heads) + mine[f"{layer}_attn_b_O"]
            else:
                expected = mine[label] + mine[f"{layer}_attn_b_O"]
        else:
            expected = mine[label]
        assert abs(value - expected) < 1e-4, (label, value, expected)
    assert len(theirs.labels) == 2 + 2 * n_layers  # embed, pos_embed, attn and mlp per layer


@pytest.fixture(scope="module")
def granite_folder(tmp_path_factory):
    """A seeded random ``GraniteForCausalLM``: its logits are ``lm_head(x) / logits_scaling`` (4 here),
    a scaling after the unembedding that the bridge's adapter applies and ``W_U`` does not hold. The
    embedding and residual multipliers stay 1: TransformerLens 3.9's Granite bridge leaves them out of
    its hooks (attribution's sum check refuses such a model; that is not what is tested here)."""
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    folder = tmp_path_factory.mktemp("granite_random_bridge")
    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, logits_scaling=4.0, embedding_multiplier=1.0,
        residual_multiplier=1.0, attention_multiplier=0.1, tie_word_embeddings=False, initializer_range=0.3,
    )
    GraniteForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(require_shared(GPT2_TOKENIZER)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def granite_bridge(granite_folder):
    return boot(granite_folder)


def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


def test_logit_scaling_is_in_logit_diff_and_attribution(granite_folder, granite_bridge):
    """A model that scales its logits after ``W_U`` (Granite: / logits_scaling): the logit difference at
    ``final_post``, the attribution's total and its rows' sum are all the Hugging Face model's own
    difference, not the unscaled ``W_U`` difference (4x larger here)."""
    from tl_logitlens.core.readout import logit_scale

    assert logit_scale(granite_bridge) == pytest.approx(0.25, rel=1e-6)
    tokens = granite_bridge.to_tokens(PROMPT)
    logits = hf_logits(granite_folder, tokens)[0]
    the, a = granite_bridge.to_single_token(" the"), granite_bridge.to_single_token(" a")
    expected = logits[:, the] - logits[:, a]
    assert float(expected.abs().max()) > 0.1  # a scaling error would show

    lens = tl.logit_lens(granite_bridge, tokens, top_k=4)
    assert_close(lens.top_logprobs[-1, 0], logits.log_softmax(-1).topk(4).values, atol=1e-4)
    for norm in ("recompute", "cached"):
        diff = tl.logit_diff(granite_bridge, tokens, " the", " a", positions=None, norm=norm, n_bootstrap=10)
        assert_close(diff.values[-1, 0, :, 0], expected, atol=1e-4)
    for unit in ("component", "head", "neuron"):
        dla = tl.direct_logit_attribution(granite_bridge, tokens, " the", " a", unit=unit, positions=None)
        assert_close(dla.total[0, :, 0], expected, atol=1e-4)
        assert_close(dla.attribution.sum(0)[0, :, 0], expected, atol=1e-4)


def test_component_lens_rows_add_up_to_scaled_logits(granite_folder, granite_bridge):
    """Every row's effect on every logit, over the whole vocabulary, adds up to the model's own logits
    (scaling included)."""
    tokens = granite_bridge.to_tokens(PROMPT)
    d_vocab = granite_bridge.cfg.d_vocab
    result = tl.component_lens(granite_bridge, tokens, top_k=d_vocab, positions="last")
    summed = torch.zeros(d_vocab)
    for r in range(len(result.labels)):
        summed.scatter_add_(0, result.promoted_ids[r, 0, 0], result.promoted_logits[r, 0, 0])
    with torch.no_grad():
        own = granite_bridge(tokens)[0, -1]
    assert_close(summed, own, atol=1e-4)
    # and the model's logits are Hugging Face's up to the constant that centring W_U removes
    hf = hf_logits(granite_folder, tokens)[0, -1]
    assert_close(summed - summed.mean(), hf - hf.mean(), atol=1e-4)


def test_non_linear_logit_transform_is_applied_per_token_and_refused_by_attribution(granite_bridge, monkeypatch):
    """An adapter that soft-caps its logits after ``W_U``: the logit difference caps each token's logit
    before subtracting, as the model does; no sum of rows can equal a capped logit, so attribution refuses."""
    from tl_logitlens.core.readout import logit_scale

    cap = 0.5
    monkeypatch.setattr(granite_bridge.adapter, "apply_output_logits_transform", lambda x: cap * torch.tanh(x / cap))
    assert logit_scale(granite_bridge) is None
    with pytest.raises(ValueError, match="non-linearly after the unembedding"):
        tl.direct_logit_attribution(granite_bridge, PROMPT, " the", " a")
    tokens = granite_bridge.to_tokens(PROMPT)
    with torch.no_grad():  # the bridge's forward is Granite's own (W_U's logits / 4); the patch is not in it
        raw = granite_bridge(tokens)[0, -1] * 4.0
    the, a = granite_bridge.to_single_token(" the"), granite_bridge.to_single_token(" a")
    expected = cap * torch.tanh(raw[the] / cap) - cap * torch.tanh(raw[a] / cap)
    diff = tl.logit_diff(granite_bridge, tokens, " the", " a", n_bootstrap=10)
    assert_close(diff.values[-1, 0, 0, 0], expected, atol=1e-4)
