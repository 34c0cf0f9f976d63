"""compare_lenses: each lens's part is exactly logit_lens(lens=...) on the same run; top-1 agreement and
the site table against a slow computation from the final layer's logits; names, sites and the figure."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, tiny_model

FIELDS = ("top_ids", "top_logprobs", "entropy", "kl_to_final", "next_logprobs", "next_ranks", "target_logprobs")


def lenses_for(model):
    d, n = model.cfg.d_model, model.cfg.n_layers
    gen = torch.Generator().manual_seed(0)
    tuned = tl.TunedLens.for_model(model)
    with torch.no_grad():
        tuned.weight.copy_(0.1 * torch.randn(tuned.weight.shape, generator=gen))
        tuned.bias.copy_(0.1 * torch.randn(tuned.bias.shape, generator=gen))
    jlens = tl.JacobianLens({layer: torch.eye(d) + 0.2 * torch.randn(d, d, generator=gen) for layer in range(n - 1)},
                            n_prompts=1, d_model=d, n_layers=n)
    return [None, tuned, jlens]


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_each_lens_is_logit_lens_on_the_same_run(normalization):
    model = tiny_model(normalization, folded=False)
    lenses = lenses_for(model)
    cmp = tl.compare_lenses(model, SENTENCES[:3], lenses=lenses, targets=[" w"])
    assert cmp.lenses == ("logit lens", "tuned lens", "Jacobian lens")
    for k, lens in enumerate(lenses):
        alone = tl.logit_lens(model, SENTENCES[:3], lens=lens, sites="resid_post", targets=[" w"])
        for field in FIELDS:
            assert_close(getattr(cmp, field)[k], getattr(alone, field), atol=0, rtol=0, equal_nan=True, msg=field)
        assert cmp.result(cmp.lenses[k]).lens_name == cmp.lenses[k]


def test_top1_agreement_and_site_table_against_the_final_logits():
    model = tiny_model("LN", folded=False)
    cmp = tl.compare_lenses(model, SENTENCES[:2], lenses=lenses_for(model))
    logits = model(cmp.tokens, attention_mask=cmp.valid.long())  # [batch, pos, vocab]
    final_top1 = logits.argmax(-1)
    for k in range(3):
        for s in range(len(cmp.labels)):
            agree = (cmp.top_ids[k, s, ..., 0] == final_top1).float()
            assert_close(cmp.top1_agreement[k, s][cmp.valid], agree[cmp.valid])
    table = cmp.site_table()
    row = table[(table.site == "0_post") & (table.lens == "Jacobian lens")].iloc[0]
    assert row.kl_to_final == pytest.approx(float(cmp.kl_to_final[2, 0][cmp.valid].double().mean()), rel=1e-9)
    assert row.n_positions == int(cmp.valid.sum())
    final = table[table.site == "final_post"]
    assert (final.top1_agreement == 1.0).all() and (final.kl_to_final.abs() < 1e-5).all()
    frame = cmp.to_dataframe()
    assert set(frame.lens) == set(cmp.lenses) and "top1_agreement" in frame
    assert len(frame) == sum(len(r.to_dataframe()) for r in cmp.results)


def test_two_lenses_with_one_name_need_a_dict():
    model = tiny_model("LN", folded=False)
    a, b = tl.TunedLens.for_model(model), tl.TunedLens.for_model(model)
    with pytest.raises(ValueError, match="both called 'tuned lens'.*or pass a dict"):
        tl.compare_lenses(model, "Hello", lenses=[a, b])
    cmp = tl.compare_lenses(model, "Hello", lenses={"lens A": a, "lens B": b})
    assert cmp.lenses == ("lens A", "lens B")


def test_a_site_a_lens_cannot_read_is_refused_before_the_model_runs():
    model = tiny_model("LN", folded=False)
    with pytest.raises(ValueError, match="reads the outputs of blocks"):
        tl.compare_lenses(model, "Hello", lenses=lenses_for(model), sites="resid_pre")


def test_the_figure_has_one_panel_per_lens_on_one_colour_scale():
    model = tiny_model("LN", folded=False)
    fig = tl.compare_lenses(model, SENTENCES[0], lenses=lenses_for(model)).plot(color="entropy")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 3
    assert len({(t.zmin, t.zmax) for t in heatmaps}) == 1
    assert sum(bool(t.showscale) for t in heatmaps) == 1
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:3] == ["<b>logit lens</b>", "<b>tuned lens</b>", "<b>Jacobian lens</b>"]
