"""The shared pipeline: caches of other tokens are refused everywhere, one display policy, the small
bad inputs of the audit, and the options built on the run (full distributions, final top-k
tracking, the unmasked masked-LM read, bf16 attribution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, STORIES, assert_close, assert_not_close, require_shared

# two prompts of the same token length, so only the identity check can tell their caches apart
SAME_LENGTH = ("The cat sat on the mat.", "The dog ran to the park.")


def _same_length_pair(model):
    a, b = (model.to_tokens(t) for t in SAME_LENGTH)
    if a.shape != b.shape:
        b = torch.cat([a[:, :1], b[:, 1:]], dim=1)[:, : a.shape[1]]
        b = torch.nn.functional.pad(b, (0, a.shape[1] - b.shape[1]), value=int(a[0, -1]))
    assert a.shape == b.shape and not torch.equal(a, b)
    return a, b


CAUSAL_ENTRY_POINTS = {
    "logit_lens": lambda m, t, c: tl.logit_lens(m, t, cache=c),
    "logit_diff": lambda m, t, c: tl.logit_diff(m, t, 5, 7, cache=c),
    "direct_logit_attribution": lambda m, t, c: tl.direct_logit_attribution(m, t, 5, 7, cache=c),
    "component_lens": lambda m, t, c: tl.component_lens(m, t, cache=c),
}


@pytest.mark.parametrize("entry", list(CAUSAL_ENTRY_POINTS), ids=list(CAUSAL_ENTRY_POINTS))
def test_a_cache_of_other_tokens_of_the_same_length_is_refused(ln_model, entry):
    call = CAUSAL_ENTRY_POINTS[entry]
    a, b = _same_length_pair(ln_model)
    _, cache_b = ln_model.run_with_cache(b)
    with pytest.raises(ValueError, match="cache was computed from other tokens"):
        call(ln_model, a, cache_b)
    _, cache_a = ln_model.run_with_cache(a)
    call(ln_model, a, cache_a)  # its own cache is accepted


def test_the_cache_check_catches_a_single_changed_token(ln_model):
    a, _ = _same_length_pair(ln_model)
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % ln_model.cfg.d_vocab
    _, cache_b = ln_model.run_with_cache(b)
    with pytest.raises(ValueError, match="other tokens"):
        tl.logit_lens(ln_model, a, cache=cache_b)


def test_a_cache_without_the_embedding_is_refused_with_what_to_do(ln_model):
    a, _ = _same_length_pair(ln_model)
    _, cache = ln_model.run_with_cache(a, names_filter=lambda n: "resid" in n)
    with pytest.raises(ValueError, match=r"the cache lacks \['hook_embed'\]"):
        tl.logit_lens(ln_model, a, cache=cache)


def test_masked_lens_refuses_a_cache_of_other_tokens(demo_bert):
    text = "tom saw a big dog in the park."
    first = tl.masked_lens(demo_bert, text, mask_positions="dog")
    other = first.tokens.clone()
    other[0, 1] = (other[0, 1] + 1) % demo_bert.cfg.d_vocab  # a token away from the hole
    _, cache = demo_bert.run_with_cache(other)
    with pytest.raises(ValueError, match="does not hold the masked tokens"):
        tl.masked_lens(demo_bert, text, mask_positions="dog", cache=cache)
    _, own = demo_bert.run_with_cache(first.tokens)
    again = tl.masked_lens(demo_bert, text, mask_positions="dog", cache=own)
    assert_close(again.original_logprobs, first.original_logprobs, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def demo_bert():
    return tl.load_model("demo-bert")


# -- one display policy -------------------------------------------------------------------------


def test_padding_cells_display_empty_strings_in_every_result(ln_model):
    prompts = [SENTENCES[0], "Hi there"]
    lens = tl.logit_lens(ln_model, prompts)
    comp = tl.component_lens(ln_model, prompts, positions=None, top_k=2)
    pad_j = int(lens.valid[1].sum())  # first padding column of the short prompt
    assert lens.top_tokens()[0][1][pad_j] == [""] * lens.top_ids.shape[-1]
    assert comp.promoted_tokens()[0][1][pad_j] == ["", ""]
    assert comp.suppressed_tokens()[0][1][pad_j] == ["", ""]


def test_ids_without_a_tokenizer_display_one_way_everywhere(ln_model):
    tokens = ln_model.to_tokens(SENTENCES[0])
    saved = ln_model.tokenizer
    try:
        ln_model.tokenizer = None
        lens = tl.logit_lens(ln_model, tokens, positions="last")
        diff = tl.logit_diff(ln_model, tokens, 5, 7)
        dla = tl.direct_logit_attribution(ln_model, tokens, 5, 7)
    finally:
        ln_model.tokenizer = saved
    top = lens.to_dataframe()["token"].tolist()
    assert all(t.startswith("<id ") for t in top)
    assert diff.to_dataframe()["correct"].iloc[0] == "<id 5>"
    assert dla.to_dataframe()["incorrect"].iloc[0] == "<id 7>"


def test_every_result_has_a_short_repr_and_an_html_repr(ln_model):
    results = [
        tl.logit_lens(ln_model, SENTENCES[:3]),
        tl.logit_diff(ln_model, SENTENCES[:3], 5, 7),
        tl.direct_logit_attribution(ln_model, SENTENCES[:3], 5, 7, unit="head"),
        tl.component_lens(ln_model, SENTENCES[:3]),
    ]
    for res in results:
        text = repr(res)
        assert len(text) < 400, text
        assert "tensor(" not in text and type(res).__name__ in text and "lens=logit lens" in text
        assert "<table>" in res._repr_html_()


def test_masked_results_and_profiles_have_short_reprs_too(demo_bert):
    text = "tom saw a big dog in the park."
    results = [
        tl.masked_lens(demo_bert, text, mask_positions="dog"),
        tl.sliding_mask_lens(demo_bert, text),
        tl.depth_profile(tl.masked_lens(demo_bert, text, mask_positions="dog")),
    ]
    for res in results:
        text_repr = repr(res)
        assert len(text_repr) < 400 and "tensor(" not in text_repr, text_repr
        assert "<table>" in res._repr_html_()


def test_statistics_are_float32_and_results_live_on_the_models_device(ln_model):
    lens = tl.logit_lens(ln_model, SENTENCES[0])
    dla = tl.direct_logit_attribution(ln_model, SENTENCES[0], 5, 7)
    device = torch.device(ln_model.cfg.device)
    for t in (lens.entropy, lens.kl_to_final, lens.top_logprobs, dla.attribution, dla.total):
        assert t.dtype == torch.float32 and t.device.type == device.type


# -- the audit's small bad inputs ---------------------------------------------------------------


def test_numpy_integers_are_accepted_for_positions_and_targets(ln_model):
    plain = tl.logit_lens(ln_model, SENTENCES[0], positions=[1, 2], targets=[5])
    numpy = tl.logit_lens(ln_model, SENTENCES[0], positions=np.array([1, 2]), targets=[np.int64(5)])
    single = tl.logit_lens(ln_model, SENTENCES[0], positions=np.int64(1), targets=np.int32(5))
    # the same ids and positions: equal up to matmul shapes (a bridge's kernels differ by ~5e-7)
    assert_close(numpy.target_logprobs, plain.target_logprobs, atol=1e-6, rtol=0)
    assert_close(single.target_logprobs[:, :, 0], plain.target_logprobs[:, :, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include_bias": "no"}, TypeError, "include_bias must be True or False, not 'no'"),
        ({"prepend_bos": "yes"}, TypeError, "prepend_bos must be True, False or None"),
        ({"sites": 3}, TypeError, "sites must be a kind"),
        ({"sites": ["resid_pre", "3_mid"]}, ValueError, "mixes kinds"),
        ({"keep_logprobs": 1}, TypeError, "keep_logprobs must be True or False"),
        ({"final_top_k": -1}, ValueError, "final_top_k=-1"),
    ],
    ids=["include_bias", "prepend_bos", "sites_int", "mixed_sites", "keep_logprobs", "final_top_k"],
)
def test_bad_options_say_what_to_pass(ln_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        tl.logit_lens(ln_model, SENTENCES[0], **kwargs)


def test_bytes_input_says_to_decode(ln_model):
    with pytest.raises(TypeError, match="bytes; decode it to a str"):
        tl.logit_lens(ln_model, b"hello there")
    with pytest.raises(TypeError, match="prompt 1 is bytes"):
        tl.logit_lens(ln_model, ["hello", b"there"])


def test_sliding_mask_lens_on_a_causal_model_names_itself(ln_model):
    with pytest.raises(TypeError, match="^sliding_mask_lens needs a masked language model"):
        tl.sliding_mask_lens(ln_model, "hello there")


# -- options built on the run -------------------------------------------------------------------


def test_keep_logprobs_gives_the_full_distribution_and_agrees_with_the_metrics(any_model):
    res = tl.logit_lens(any_model, SENTENCES[:2], keep_logprobs=True, top_k=3)
    full = res.full_logprobs
    assert full.shape == (*res.entropy.shape, any_model.cfg.d_vocab)
    v = res.valid
    assert torch.isnan(full[:, ~v]).all()
    top = full[:, v].topk(3, dim=-1)
    assert_close(top.values, res.top_logprobs[:, v], atol=1e-5, rtol=0)
    entropy = -(full[:, v].exp() * full[:, v]).sum(-1)
    assert_close(entropy, res.entropy[:, v], atol=1e-4, rtol=0)


def test_keep_logprobs_refuses_above_its_memory_cap_with_the_size(ln_model):
    with pytest.raises(ValueError, match=r"would keep 0\.\d+ GiB .*raise max_logprobs_bytes"):
        tl.logit_lens(ln_model, SENTENCES[:2], keep_logprobs=True, max_logprobs_bytes=1000)


def test_final_top_k_follows_the_final_sites_top_tokens_across_layers(any_model):
    res = tl.logit_lens(any_model, SENTENCES[:2], final_top_k=4, top_k=4, positions="last")
    # the final site's top tokens, in order, are its own top-k
    assert torch.equal(res.final_top_ids, res.top_ids[-1])
    assert_close(res.final_top_logprobs[-1], res.top_logprobs[-1], atol=1e-6, rtol=0)
    assert (res.final_top_ranks[-1] == torch.arange(1, 5)).all()
    # at every other site: the same numbers as asking for those ids as targets (two lens runs)
    as_targets = tl.logit_lens(any_model, SENTENCES[:2], targets=res.final_top_ids[:, :, 0:1].reshape(2, 1),
                               positions="last")
    assert_close(res.final_top_logprobs[..., 0], as_targets.target_logprobs[..., 0], atol=1e-6, rtol=0)
    assert torch.equal(res.final_top_ranks[..., 0], as_targets.target_ranks[..., 0])


def test_masked_lens_unmasked_read_keeps_the_real_token(demo_bert):
    text = "tom saw a big dog in the park."
    plain = tl.masked_lens(demo_bert, text, mask_positions="dog", mask=False)
    hole = int(plain.positions[0, 0])
    assert int(plain.tokens[0, hole]) == int(plain.original_tokens[0, hole]) == int(plain.original_ids[0, 0])
    assert not plain.masked
    # reference: the MLM head on Hugging Face-free, hand-run cache of the unmasked tokens
    from tl_logitlens.analyses.masked import encoder_sites, mlm_logits

    _, cache = demo_bert.run_with_cache(plain.tokens)
    for s, site in enumerate(encoder_sites(demo_bert)):
        lp = torch.log_softmax(mlm_logits(demo_bert, cache[site.hook][0, hole][None]), -1)[0]
        assert_close(plain.original_logprobs[s, 0, 0], lp[int(plain.original_ids[0, 0])], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mask=False reads given positions"):
        tl.masked_lens(demo_bert, "tom saw a [MASK].", mask=False)


@pytest.mark.slow
def test_bf16_attribution_and_component_lens_are_accepted_and_add_up():
    model = tl.load_model(require_shared(STORIES), dtype="bfloat16")
    prompt = "She loved to play outside in the"
    for unit in ("component", "head", "neuron"):
        res = tl.direct_logit_attribution(model, prompt, "▁p", "▁s", unit=unit)
        # bf16 activations: the rows add up to the model's own difference to bf16 precision
        assert float(res.unexplained.abs().max()) < 0.05 * (1 + float(res.total.abs().max()))
    comp = tl.component_lens(model, prompt, unit="head")
    assert comp.promoted_ids.shape[0] == len(comp.labels)


class _ScaledLens:
    """A minimal lens (the protocol's three members): every non-final state scaled by ``factor``."""

    name = "scaled lens"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def check_model(self, model) -> None:
        return None

    def translate(self, site: str, states: torch.Tensor) -> torch.Tensor:
        return states if site == "final_post" else states * self.factor


def test_masked_lens_takes_a_lens_and_reads_each_state_through_it(demo_bert):
    text = "tom saw a big dog in the park."
    plain = tl.masked_lens(demo_bert, text, mask_positions="dog")
    same = tl.masked_lens(demo_bert, text, mask_positions="dog", lens=_ScaledLens(1.0))
    scaled = tl.masked_lens(demo_bert, text, mask_positions="dog", lens=_ScaledLens(0.5))
    assert same.lens_name == scaled.lens_name == "scaled lens" and plain.lens_name == "logit lens"
    assert_close(same.original_logprobs, plain.original_logprobs, atol=0, rtol=0)
    assert_not_close(scaled.original_logprobs[:-1], plain.original_logprobs[:-1], atol=1e-3)
    assert_close(scaled.original_logprobs[-1], plain.original_logprobs[-1], atol=0, rtol=0)
    # the reference: the MLM head on the scaled cached state
    from tl_logitlens.analyses.masked import encoder_sites, mlm_logits

    _, cache = demo_bert.run_with_cache(scaled.tokens)
    hole, orig = int(scaled.positions[0, 0]), int(scaled.original_ids[0, 0])
    site = encoder_sites(demo_bert)[1]
    lp = torch.log_softmax(mlm_logits(demo_bert, 0.5 * cache[site.hook][0, hole][None]), -1)[0, orig]
    assert_close(scaled.original_logprobs[1, 0, 0], lp, atol=1e-5, rtol=0)


def test_figures_name_the_lens_when_it_is_not_the_logit_lens(ln_model):
    lens = _ScaledLens(0.9)
    # norm="none": the final norm would undo a scaling, the raw unembedding does not
    res = tl.logit_lens(ln_model, SENTENCES[:3], lens=lens, targets=[" the"], positions="last", norm="none")
    diff = tl.logit_diff(ln_model, SENTENCES[:3], " the", " and", lens=lens)
    assert res.plot().layout.title.text.startswith("Scaled lens")
    assert "scaled lens" in diff.plot().layout.title.text
    from tl_logitlens.plotting import target_trajectory

    assert "scaled lens" in target_trajectory(res).layout.title.text
    plain = tl.logit_lens(ln_model, SENTENCES[:3], targets=[" the"], positions="last", norm="none")
    assert plain.plot().layout.title.text.startswith("Logit lens")
    assert_not_close(res.entropy[:-1], plain.entropy[:-1])
