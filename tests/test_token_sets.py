"""Word-level token sets (tl.token_set) and targets= reading them: one target, summed probability, best rank."""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import (
    GPT2_TOKENIZER,
    STORIES,
    assert_close,
    require_shared,
    requires_hooked_encoder,
    tiny_bridge,
    tiny_model,
    tiny_tokenizer,
)

PROMPTS = ["She loved to play outside in the", "The cat sat on the"]
# a word list with plain words, names, capitals, punctuation, digits and characters outside ASCII
WORDS = [
    "park",
    "Paris",
    "cat",
    "dog",
    "happy",
    "the",
    "a",
    "tree",
    "Lily",
    "ball",
    "x",
    "'s",
    "123",
    "Park",
    "sun",
    "Rome",
]


def _hf_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_shared(path)), **kwargs)


@pytest.mark.parametrize(
    "path", [GPT2_TOKENIZER, STORIES], ids=["gpt2-byte-bpe", "stories260K-sentencepiece"]
)
def test_token_set_equals_nnterp_get_first_tokens(path):
    """nnterp 1.3.0's get_first_tokens ("word" and " word") on the tokenizer nnterp itself loads
    (add_prefix_space=False); token_set reads the model's own tokenizer as it is."""
    prompt_utils = pytest.importorskip(
        "nnterp.prompt_utils", reason="nnterp is not installed (pip install nnterp==1.3.0)"
    )
    reference = _hf_tokenizer(path, add_prefix_space=False)
    ours = _hf_tokenizer(path)
    expected = prompt_utils.get_first_tokens(WORDS, reference)
    assert list(tl.token_set(ours, WORDS, variants=("word", " word")).ids) == expected
    for word in WORDS:
        assert list(
            tl.token_set(ours, [word], variants=("word", " word")).ids
        ) == prompt_utils.get_first_tokens(word, reference)


# nnterp 1.3.0's get_first_tokens on these tokenizers, recorded (and the tokens they are)
_RECORDED = {
    "gpt2-byte-bpe": (
        GPT2_TOKENIZER,
        {
            "park": ([20928, 3952], ["park", " park"]),
            "Paris": ([40313, 6342], ["Paris", " Paris"]),
            "Lily": ([43, 20037], ["L", " Lily"]),
            "'s": ([338, 705], ["'s", " '"]),
            "école": ([2634, 38251], ["é", " é"]),
        },
    ),
    "stories260K-sentencepiece": (
        STORIES,
        {
            "park": ([427, 282], ["p", " p"]),  # no dummy prefix on the no-space spelling
            "Paris": ([460], ["P"]),  # " Paris" starts with a bare "▁": left out
            "happy": ([415, 393], ["h", " happy"]),
            "Lily": ([438, 317], ["L", " Lily"]),
            "x": ([444], ["x"]),
        },
    ),
}


@pytest.mark.parametrize("case", list(_RECORDED), ids=list(_RECORDED))
def test_token_set_hand_written_expectations(case):
    path, expected = _RECORDED[case]
    tok = _hf_tokenizer(path)
    for word, (ids, tokens) in expected.items():
        got = tl.token_set(tok, [word], variants=("word", " word"))
        assert (list(got.ids), list(got.tokens)) == (ids, tokens), word


def test_token_set_default_variants_on_byte_bpe_and_wordpiece():
    """Always runs (no ../shared): the tiny byte-level BPE of the tests and the built-in BERT's WordPiece."""
    tok = tiny_tokenizer()
    park = tl.token_set(tok, ["park"])
    assert park.tokens == ("p", " park", "P")  # "park", " park", "Park"; " Park" starts with a bare space
    assert park.words == ("park",) and park.variants == ("word", " word", "Word", " Word")
    assert park.ids == tuple(tok.convert_tokens_to_ids(["p", "Ġpark", "P"]))
    assert tl.token_set(tok, ["zebra"]).tokens == ("z", "Z")  # " zebra" and " Zebra" start with a bare space
    both = tl.token_set(tok, ["park", "dog"], variants=("word", " word"))
    assert both.tokens == ("p", " park", "do", " dog") and both.label == "{park, dog}"
    assert len(both) == 4 and list(both) == list(both.ids) and both.ids[0] in both
    bert = tl.load_model("demo-bert").tokenizer  # uncased WordPiece: every spelling is the word-initial piece
    assert tl.token_set(bert, ["park"]).tokens == ("park",)
    assert tl.token_set(bert, ["Paris"]).ids == (bert.convert_tokens_to_ids("par"),)


def test_token_set_bad_input():
    tok = tiny_tokenizer()
    cases = [
        ([], ValueError, "words is empty"),
        (["park", ""], ValueError, "word '' is empty"),
        (["   "], ValueError, "only whitespace"),
        ([3], TypeError, "must be strings"),
        (b"park", TypeError, "words must be a string or a list"),
    ]
    for words, err, match in cases:
        with pytest.raises(err, match=match):
            tl.token_set(tok, words)
    with pytest.raises(ValueError, match="variants .* not understood"):
        tl.token_set(tok, ["park"], variants=("word", "w0rd"))
    with pytest.raises(ValueError, match="variants must be a non-empty"):
        tl.token_set(tok, ["park"], variants=())
    with pytest.raises(ValueError, match="needs a tokenizer|token sets need a tokenizer"):
        tl.token_set(object(), ["park"])
    bert = tl.load_model("demo-bert").tokenizer
    with pytest.raises(ValueError, match=r"word '☃' has no sensible first token.*\[UNK\]"):
        tl.token_set(bert, ["☃"])


def test_token_set_refuses_a_word_that_starts_with_a_bare_space_piece():
    tok = _hf_tokenizer(STORIES)
    with pytest.raises(ValueError, match=r"word 'Paris' has no sensible first token.*' Paris' → \[' ', 'P'"):
        tl.token_set(tok, ["Paris"], variants=(" word", " Word"))


def _models():
    return [("hooked-or-bridge", lambda: tiny_model("LN")), ("bridge-rms", lambda: tiny_bridge("RMS"))]


@pytest.mark.parametrize("make", [m for _, m in _models()], ids=[n for n, _ in _models()])
def test_set_probability_is_the_sum_and_rank_the_best(make):
    model = make()
    park = tl.token_set(model, ["park", "ball"])
    assert len(park) >= 3
    lens = tl.logit_lens(model, PROMPTS, targets=[park, " the", 5])
    each = tl.logit_lens(model, PROMPTS, targets=list(park.ids))  # every token of the set on its own
    valid = lens.valid
    summed = each.target_logprobs.exp().sum(-1)
    assert_close(lens.target_logprobs[..., 0].exp()[:, valid], summed[:, valid], atol=1e-7, rtol=1e-5)
    assert torch.equal(lens.target_ranks[..., 0][:, valid], each.target_ranks.amin(-1)[:, valid])
    # the single targets beside the set are what they are alone
    alone = tl.logit_lens(model, PROMPTS, targets=[" the", 5])
    assert_close(lens.target_logprobs[..., 1:][:, valid], alone.target_logprobs[:, valid])
    assert torch.equal(lens.target_ranks[..., 1:][:, valid], alone.target_ranks[:, valid])
    # and a slow reference: the full log-softmax of every site
    full = tl.logit_lens(model, PROMPTS, keep_logprobs=True).full_logprobs
    assert not full.requires_grad  # values, not an autograd graph over every site's logits
    ids = torch.tensor(park.ids)
    assert_close(
        lens.target_logprobs[..., 0][:, valid], full[..., ids].logsumexp(-1)[:, valid], atol=1e-5, rtol=1e-5
    )
    ranks = 1 + (full[..., None, :] > full[..., ids, None]).sum(-1)  # per token: logits strictly above, +1
    assert torch.equal(lens.target_ranks[..., 0][:, valid], ranks.amin(-1)[:, valid])
    assert lens.target_sets[0] is park and lens.target_sets[1:] == (None, None)


def test_set_labels_in_tables_and_figures(ln_model):
    from tl_logitlens.plotting.style import target_names

    park = tl.token_set(ln_model, ["park"])
    lens = tl.logit_lens(ln_model, PROMPTS, targets=[park, " the"], positions="last")
    frame = lens.target_dataframe()
    assert set(frame["target"]) == {"{park}", " the"}
    assert set(frame.loc[frame["target"] == "{park}", "n_tokens"]) == {len(park)}
    assert target_names(lens) == ["{park}", " the"]
    from tl_logitlens.plotting import target_trajectory, top_token_evolution

    assert any("{park}" in (t.name or "") for t in target_trajectory(lens).data)
    assert "{park}" in str(top_token_evolution(lens).data[0].y) + str(
        top_token_evolution(lens).layout.yaxis.ticktext
    )
    assert lens.target_labels(lens.target_ids[0, 0]) == ["{park}", " the"]
    # several prompts batched apart and joined keep the sets
    joined = tl.LensResult.concat([lens.select_prompts([0]), lens.select_prompts([1])])
    assert joined.target_sets == lens.target_sets


def test_multi_token_string_becomes_its_first_token_set_with_a_note(ln_model):
    text = " parks"
    pieces = ln_model.to_tokens(text, prepend_bos=False)[0].tolist()
    assert len(pieces) > 1
    with pytest.warns(
        tl.MultiTokenTargetWarning, match=r"target ' parks' is \d+ tokens .*scoring its first token"
    ):
        lens = tl.logit_lens(ln_model, PROMPTS, targets=[text])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tl.logit_lens(ln_model, PROMPTS, targets=text)
    assert len(caught) == 1 and caught[0].filename == __file__  # one line, pointing at the caller
    first = tl.logit_lens(ln_model, PROMPTS, targets=[pieces[0]])
    assert_close(lens.target_logprobs[:, lens.valid], first.target_logprobs[:, lens.valid])
    assert lens.target_sets[0].ids == (pieces[0],)
    with pytest.raises(ValueError, match=r"first token ' ' is only whitespace"):
        tl.logit_lens(ln_model, PROMPTS, targets=" elephantine")  # a bare-space first token says nothing
    # the strict reading stays available
    with pytest.raises(ValueError, match=r"not a single token: it splits into \d+ tokens"):
        tl.single_token(ln_model, text)
    with pytest.raises(ValueError, match=r"not a single token"):
        tl.logit_lens(ln_model, PROMPTS, targets=[tl.single_token(ln_model, text)])
    assert tl.single_token(ln_model, " the") == ln_model.to_single_token(" the")


def test_targets_bad_input(ln_model):
    cases = [
        ([], ValueError, "non-empty list"),
        ([""], ValueError, "empty string"),
        ([99_999], ValueError, "outside the vocabulary"),
        ([1.5], TypeError, "token string or an integer id"),
        (torch.tensor([1, 2]), ValueError, "1-D target tensor"),
    ]
    for targets, err, match in cases:
        with pytest.raises(err, match=match):
            tl.logit_lens(ln_model, PROMPTS, targets=targets)
    big = tl.TokenSet(ids=(1, 10**6), tokens=("a", "b"), words=("ab",), variants=("word",))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tl.logit_lens(ln_model, PROMPTS, targets=[big])


def test_set_through_a_nan_model_is_an_error(ln_model):
    import copy

    broken = copy.deepcopy(ln_model)
    with torch.no_grad():
        broken.W_U[:, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tl.logit_lens(broken, PROMPTS, targets=[tl.token_set(broken, ["park"])])


def test_compare_lenses_takes_a_set(ln_model):
    park = tl.token_set(ln_model, ["park"])
    comparison = tl.compare_lenses(ln_model, PROMPTS, lenses={"logit": None}, targets=[park])
    direct = tl.logit_lens(ln_model, PROMPTS, targets=[park])
    assert_close(comparison.target_logprobs[0][:, direct.valid], direct.target_logprobs[:, direct.valid])


def test_patchscope_takes_a_set(ln_model):
    if not hasattr(tl, "patchscope"):
        pytest.skip("this tree has no tl.patchscope")
    park = tl.token_set(ln_model, ["park", "ball"])
    with_set = tl.patchscope(ln_model, PROMPTS, targets=[park, " the"])
    each = tl.patchscope(ln_model, PROMPTS, targets=list(park.ids))
    valid = with_set.valid
    assert_close(with_set.target_logprobs[..., 0].exp()[:, valid], each.target_logprobs.exp().sum(-1)[:, valid], atol=1e-7, rtol=1e-5)
    assert torch.equal(with_set.target_ranks[..., 0][:, valid], each.target_ranks.amin(-1)[:, valid])
    assert with_set.target_dataframe()["target"].iloc[0] == "{park, ball}"


@requires_hooked_encoder
def test_masked_lens_takes_a_set():
    bert = tl.load_model("demo-bert")
    text = "The dog ran to the [MASK] with the ball."
    pets = tl.token_set(bert, ["park", "house", "garden"])
    assert len(pets) == 3  # WordPiece: one word-initial piece per word
    with_set = tl.masked_lens(bert, text, targets=[pets, "park"])
    each = tl.masked_lens(bert, text, targets=list(pets.ids))
    valid = with_set.valid
    assert_close(with_set.target_logprobs[..., 0].exp()[:, valid], each.target_logprobs.exp().sum(-1)[:, valid], atol=1e-7, rtol=1e-5)
    assert torch.equal(with_set.target_ranks[..., 0][:, valid], each.target_ranks.amin(-1)[:, valid])
    assert_close(with_set.target_logprobs[..., 1][:, valid], each.target_logprobs[..., 0][:, valid])
    assert with_set.target_sets[0] is pets and with_set.target_labels(with_set.target_ids) == ["{park, house, garden}", "park"]
