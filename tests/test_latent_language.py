"""tl.latent_language (Wendler et al., 2024): the answer and latent word sets' mass per layer, bootstrapped."""

from __future__ import annotations

import copy

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import assert_close, tiny_model

PROMPTS = [
    "She loved to play outside in the",
    "The cat sat on the",
    "Tom and Anna went to the",
    "The sun was warm and the",
]
ANSWERS = ["park", "mat", "shop", ["trees", "birds"]]  # the last prompt pools two words into one set
LATENT = ["dog", "ball", "bread", "sun"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("LN")


def _hand_probs(model, prompt, words, lens=None):
    """The slow way: the whole log-softmax of every site at the last token, its set's tokens summed."""
    ids = torch.tensor(tl.token_set(model, words).ids)
    full = tl.logit_lens(model, prompt, lens=lens, positions="last", keep_logprobs=True).full_logprobs[
        :, 0, 0
    ]
    return full[:, ids].exp().sum(-1)


def test_latent_language_against_a_hand_loop(model):
    res = tl.latent_language(model, PROMPTS, ANSWERS, LATENT, n_bootstrap=200, seed=3, names=("fr", "en"))
    n_sites = len(res.labels)
    assert res.probs.shape == (n_sites, len(PROMPTS), 2) and res.mean.shape == (n_sites, 2)
    for b, prompt in enumerate(PROMPTS):
        assert_close(res.probs[:, b, 0], _hand_probs(model, prompt, ANSWERS[b]), atol=1e-7, rtol=1e-5)
        assert_close(res.probs[:, b, 1], _hand_probs(model, prompt, LATENT[b]), atol=1e-7, rtol=1e-5)
    # the bootstrap, by hand: prompts resampled with replacement, the mean of each resample, percentiles
    assert_close(res.mean, res.probs.mean(1), atol=1e-7, rtol=1e-6)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(len(PROMPTS), (200, len(PROMPTS)), generator=gen)
    replicates = torch.stack([res.probs[:, i].mean(1) for i in idx])  # [replicate, site, language]
    low, high = torch.quantile(replicates, torch.tensor([0.025, 0.975]), dim=0)
    assert_close(res.low, low, atol=1e-6, rtol=1e-5)
    assert_close(res.high, high, atol=1e-6, rtol=1e-5)
    assert bool((res.low <= res.mean + 1e-7).all()) and bool((res.mean <= res.high + 1e-7).all())
    assert res.answer_sets[3].words == ("trees", "birds") and res.latent_sets[0].label == "{dog}"
    frame = res.to_dataframe()
    assert len(frame) == n_sites * len(PROMPTS) * 2 and set(frame["language"]) == {"fr", "en"}
    summary = res.summary_dataframe()
    assert len(summary) == n_sites * 2 and (summary["n_prompts"] == len(PROMPTS)).all()


def test_latent_language_reads_through_a_lens():
    demo = tl.load_model("demo")
    lens = tl.load_lens("demo", demo)
    prompts = ["The dog was very", "Once upon a time there was a"]
    res = tl.latent_language(demo, prompts, ["happy", "girl"], ["sad", "boy"], lens=lens, n_bootstrap=10)
    assert res.lens_name == lens.name
    for b, prompt in enumerate(prompts):
        assert_close(
            res.probs[:, b, 0],
            _hand_probs(demo, prompt, ["happy", "girl"][b], lens=lens),
            atol=1e-7,
            rtol=1e-5,
        )


def test_latent_language_figure(model):
    from tl_logitlens.plotting.style import NEGATIVE_COLOUR, PALETTE, POSITIVE_COLOUR

    res = tl.latent_language(model, PROMPTS, ANSWERS, LATENT, n_bootstrap=50, names=("zh", "en"))
    fig = res.plot(show_prompts=True)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert [t.name for t in lines] == ["P(zh)", "P(en)"] and len(bands) == 2
    colours = {t.line.color for t in lines}
    assert len(colours) == 2 and not colours & {POSITIVE_COLOUR, NEGATIVE_COLOUR, PALETTE[0], PALETTE[1]}
    assert list(lines[0].x) == list(range(len(res.labels)))
    assert "95% bootstrap intervals over prompts" in fig.layout.title.text
    few = tl.latent_language(model, PROMPTS[:2], ANSWERS[:2], LATENT[:2], n_bootstrap=10).plot()
    assert not [t for t in few.data if t.fill == "toself"]  # two prompts: no band, and the title says so
    assert "too few for a band" in few.layout.title.text


def test_latent_language_bad_input(model):
    cases = [
        (dict(answer_words=["park", "mat"]), ValueError, "answer_words has 2 entries for 4 prompts"),
        (dict(latent_words=[[], "ball", "bread", "sun"]), ValueError, "words is empty"),
        (dict(latent_words=["dog", "ball", "   ", "sun"]), ValueError, "only whitespace"),
        (
            dict(answer_words=["park", "mat", "shop", "park"], latent_words=["park", "ball", "bread", "sun"]),
            ValueError,
            "prompt 0: the answer set {park} and the latent set {park} share tokens",
        ),
        (dict(prompts=[]), ValueError, "non-empty list of prompts"),
        (dict(names=("fr",)), ValueError, "names must be two"),
        (dict(n_bootstrap=0), ValueError, "n_bootstrap=0"),
        (dict(answer_words=3), TypeError, "one word .* per prompt"),
    ]
    base = dict(prompts=PROMPTS, answer_words=ANSWERS, latent_words=LATENT)
    for change, err, match in cases:
        kwargs = {**base, **change}
        with pytest.raises(err, match=match):
            tl.latent_language(
                model, kwargs.pop("prompts"), kwargs.pop("answer_words"), kwargs.pop("latent_words"), **kwargs
            )
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.W_U[:, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tl.latent_language(broken, PROMPTS, ANSWERS, LATENT)
