"""Depth profiles: the √depth regression against numpy.polyfit, decision sites, tracking, all result kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import SENTENCES, assert_close
from tests.test_masked import tiny_encoder
from tl_logitlens import depth_profile, logit_lens, masked_lens, sliding_mask_lens
from tl_logitlens.profile import decision_sites, fit_sqrt, site_depths


def _polyfit(depths: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    x = np.sqrt(depths.numpy())
    ok = np.isfinite(y.numpy())
    b, a = np.polyfit(x[ok], y.numpy()[ok], 1)
    pred = a + b * x[ok]
    ss_res = ((y.numpy()[ok] - pred) ** 2).sum()
    ss_tot = ((y.numpy()[ok] - y.numpy()[ok].mean()) ** 2).sum()
    return a, b, 1 - ss_res / ss_tot


def test_fit_sqrt_matches_polyfit():
    gen = torch.Generator().manual_seed(0)
    depths = torch.arange(13, dtype=torch.float64)
    values = -8 + 2.5 * depths.sqrt()[:, None] + torch.randn(13, 6, generator=gen, dtype=torch.float64)
    values[3, 2] = float("nan")  # a missing point is left out of that row's fit
    fit = fit_sqrt(depths, values)
    for i in range(6):
        a, b, r2 = _polyfit(depths, values[:, i])
        assert fit.intercept[i].item() == pytest.approx(a, abs=1e-9)
        assert fit.slope[i].item() == pytest.approx(b, abs=1e-9)
        assert fit.r2[i].item() == pytest.approx(r2, abs=1e-9)
    exact = fit_sqrt(depths, (1.5 - 0.5 * depths.sqrt())[:, None])
    assert exact.intercept.item() == pytest.approx(1.5) and exact.slope.item() == pytest.approx(-0.5)
    assert exact.r2.item() == pytest.approx(1.0)
    one_point = torch.full((13, 1), float("nan"), dtype=torch.float64)
    one_point[0] = 1.0
    assert torch.isnan(fit_sqrt(depths, one_point).slope).all()


def test_decision_sites_and_depths():
    top1 = torch.tensor([[5, 7, 7, 1], [7, 7, 3, 1], [3, 7, 7, 1], [7, 7, 7, 1]])  # [site, row]
    assert decision_sites(top1).tolist() == [3, 0, 2, 0]
    assert site_depths(["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]).tolist() == [0, 0.5, 1, 1.5, 2]
    assert site_depths(["0_pre", "1_post", "final_post"]).tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="has no depth"):
        site_depths(["embed"])


def test_causal_profile(ln_model):
    res = logit_lens(ln_model, SENTENCES[:2], targets=[" the", " park"], top_k=5)
    prof = depth_profile(res)
    b, j = res.valid.nonzero(as_tuple=True)
    assert prof.target == "next token" and prof.logprobs.shape == (len(res.labels), len(b))
    assert_close(prof.logprobs, res.next_logprobs[:, b, j], atol=0)
    assert torch.equal(prof.target_ids, res.next_ids[b, j])
    depths = site_depths(res.labels)
    assert depths.tolist() == [0, 1, 2, 3]
    for i in range(0, len(b), 7):
        if torch.isfinite(prof.logprobs[:, i]).all():
            a, s, r2 = _polyfit(depths, prof.logprobs[:, i].double())
            assert prof.intercept[i].item() == pytest.approx(a, abs=1e-5)
            assert prof.slope[i].item() == pytest.approx(s, abs=1e-5)
            assert prof.r2[i].item() == pytest.approx(r2, abs=1e-5)
    park = depth_profile(res, " park")
    assert_close(park.logprobs, res.target_logprobs[:, b, j, 1], atol=0)
    top = depth_profile(res, "max")
    assert_close(top.logprobs, res.top_logprobs[:, b, j, 0], atol=0)
    assert_close(top.slope, prof.max_slope, atol=1e-12)
    # the decision site, written as a loop
    top1 = res.top_ids[:, b, j, 0]
    for i in range(len(b)):
        first = next(s for s in range(top1.shape[0]) if (top1[s:, i] == top1[-1, i]).all())
        assert int(prof.decision_site[i]) == first
    df = prof.to_dataframe()
    assert len(df) == len(res.labels) * len(b)
    assert len(prof.fit_dataframe()) == len(b)


def test_tracking_from_topk_is_exact(ln_model):
    """Tokens ranked by their max probability over layers, from top-k, agree with the full distributions."""
    res = logit_lens(ln_model, SENTENCES[0], top_k=5)
    prof = depth_profile(res)
    with torch.no_grad():
        _, cache = ln_model.run_with_cache(res.tokens)
        states = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(ln_model.cfg.n_layers)]
        states.append(cache[f"blocks.{ln_model.cfg.n_layers - 1}.hook_resid_post"])
        full = torch.stack([(ln_model.ln_final(s) @ ln_model.W_U + ln_model.b_U).log_softmax(-1)[0] for s in states])
    best = full.amax(0).topk(5, dim=-1)
    assert torch.equal(prof.tracked_ids, best.indices)
    known = torch.isfinite(prof.tracked_logprobs)
    expect = full.gather(-1, best.indices[None].expand(full.shape[0], -1, -1))
    assert_close(prof.tracked_logprobs[known], expect[known], atol=1e-4)
    assert known.any(0).all()  # every tracked token is known at the site where it peaks


def test_masked_and_sliding_profiles():
    model = tiny_encoder("bert")
    res = masked_lens(model, "The cat sat on the mat.", mask_positions=[2, 4], targets=["dog"], n_track=4)
    prof = depth_profile(res)
    assert prof.target == "original token" and prof.row_tokens == ("cat", "on")
    assert_close(prof.logprobs, res.original_logprobs[:, 0], atol=0)
    assert_close(prof.tracked_logprobs, res.tracked_logprobs[:, 0], atol=0)
    dog = depth_profile(res, "dog")
    assert_close(dog.logprobs, res.target_logprobs[:, 0, :, 0], atol=0)
    slide = sliding_mask_lens(model, "The cat sat on the mat.")
    sp = depth_profile(slide, n_track=2)
    assert_close(sp.logprobs, slide.original_logprobs, atol=0)
    assert_close(sp.max_logprobs, slide.max_logprobs, atol=0)
    assert sp.tracked_ids.shape == (slide.positions.numel(), 2)
    for i in range(slide.positions.numel()):
        a, b, r2 = _polyfit(sp.depths, slide.original_logprobs[:, i].double())
        assert sp.slope[i].item() == pytest.approx(b, abs=1e-5)
        a, b, r2 = _polyfit(sp.depths, slide.max_logprobs[:, i].double())
        assert sp.max_slope[i].item() == pytest.approx(b, abs=1e-5)
    fig = sp.plot_heatmaps()
    assert len(fig.data) == 4  # two heatmaps, two slope bar series
    assert any("√layer" in (tr.name or "") for tr in sp.plot(row=1).data)


def test_profile_bad_input(ln_model):
    res = logit_lens(ln_model, SENTENCES[0])
    with pytest.raises(ValueError, match="has no targets"):
        depth_profile(res, " park")
    res_t = logit_lens(ln_model, SENTENCES[0], targets=[" park"])
    with pytest.raises(ValueError, match="not among this result's targets"):
        depth_profile(res_t, " dog")
    with pytest.raises(TypeError, match="depth_profile takes a LensResult"):
        depth_profile({"labels": []})
    with pytest.raises(ValueError, match="row 99 is out of range"):
        depth_profile(res).plot(row=99)
