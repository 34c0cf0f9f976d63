"""Depth profiles: the √depth regression against numpy.polyfit, decision sites, tracking, all result kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import SENTENCES, assert_close
from tests.test_masked import tiny_encoder
from tl_logitlens import depth_profile, logit_lens, masked_lens, sliding_mask_lens
from tl_logitlens.analyses.profile import decision_sites, fit_sqrt, site_depths


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
    assert site_depths(["0_pre", "0_mid", "1_pre", "1_mid", "final_post"], 2).tolist() == [0, 0.5, 1, 1.5, 2]
    # final_post is the last block's output: depth n_layers, not one past the deepest layer named
    assert site_depths(["0_pre", "1_post", "final_post"], 4).tolist() == [0, 2, 4]
    assert site_depths(["final_post"], 5).tolist() == [5]
    assert site_depths(["2_mid", "0_post"]).tolist() == [2.5, 1]  # no final_post: no layer count needed
    with pytest.raises(ValueError, match="has no depth"):
        site_depths(["embed"], 3)
    with pytest.raises(ValueError, match="pass n_layers=model.cfg.n_layers"):
        site_depths(["0_pre", "final_post"])
    with pytest.raises(ValueError, match="past the model's last layer"):
        site_depths(["3_pre"], 3)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        site_depths(["0_pre"], 0)


# hand-written depths of each site selection on tiny_model's 3 layers: final_post is always 3
_DEPTHS = {
    "resid_pre": [0, 1, 2, 3],
    "resid_post": [1, 2, 3],
    "resid_mid": [0.5, 1.5, 2.5, 3],
    "final_post": [3],
    "0_pre+final_post": [0, 3],
}


@pytest.mark.parametrize("sites", list(_DEPTHS))
def test_final_post_sits_at_n_layers_whatever_the_sites(ln_model, sites):
    assert ln_model.cfg.n_layers == 3
    spec = sites.split("+") if "+" in sites or sites == "final_post" else sites
    res = logit_lens(ln_model, SENTENCES[0], sites=spec, top_k=3)
    prof = depth_profile(res, n_layers=ln_model.cfg.n_layers)
    assert prof.depths.tolist() == _DEPTHS[sites]
    b, j = res.valid.nonzero(as_tuple=True)
    for i in range(len(b)):
        y = res.next_logprobs[:, b[i], j[i]].double()
        if not torch.isfinite(y).all():  # the last position has no next token
            assert torch.isnan(prof.slope[i])
        elif len(_DEPTHS[sites]) >= 2:
            _, slope, _ = _polyfit(torch.tensor(_DEPTHS[sites], dtype=torch.float64), y)
            assert prof.slope[i].item() == pytest.approx(slope, abs=1e-5)
        else:
            assert torch.isnan(prof.slope[i])  # one point: no line


def test_final_post_depth_after_select_sites(ln_model):
    res = logit_lens(ln_model, SENTENCES[0], sites="resid_post").select_sites(["1_post", "final_post"])
    assert depth_profile(res, n_layers=3).depths.tolist() == [2, 3]
    only = res.select_sites(["final_post"])
    assert depth_profile(only, n_layers=3).depths.tolist() == [3]


def test_resid_post_slope_on_the_demo_model():
    """The audit's case: resid_post on the demo model has depths [1, 2, 3, 4] (its 4 layers)."""
    from tl_logitlens import load_model

    demo = load_model("demo")
    n = demo.cfg.n_layers
    assert n == 4
    res = logit_lens(demo, "Once upon a time, there was a little girl", sites="resid_post")
    prof = depth_profile(res, n_layers=n)
    hand = torch.arange(1, n + 1, dtype=torch.float64)  # l_post -> l + 1; final_post -> n
    assert prof.depths.tolist() == hand.tolist()
    row = int(res.valid[0].sum()) - 2  # the last position with a next token ("girl" after "little")
    a, b, r2 = _polyfit(hand, res.next_logprobs[:, 0, row].double())
    assert prof.slope[row].item() == pytest.approx(b, abs=1e-6)
    assert prof.intercept[row].item() == pytest.approx(a, abs=1e-6)
    assert prof.r2[row].item() == pytest.approx(r2, abs=1e-6)
    _, wrong, _ = _polyfit(torch.tensor([1.0, 2, 3, 3], dtype=torch.float64), res.next_logprobs[:, 0, row].double())
    assert abs(prof.slope[row].item() - wrong) > 1e-3  # the old depths give another slope


def test_layer_count_comes_from_the_result_or_the_caller(ln_model):
    res = logit_lens(ln_model, SENTENCES[0], top_k=3)
    if getattr(res, "n_layers", None) is None:  # until results record it, the caller must say
        with pytest.raises(ValueError, match="pass n_layers=model.cfg.n_layers"):
            depth_profile(res)
    else:
        assert depth_profile(res).depths.tolist() == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="disagrees with the result"):
            depth_profile(res, n_layers=7)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        depth_profile(res, n_layers=True)
    # without final_post no layer count is needed
    assert depth_profile(res.select_sites(["0_pre", "2_pre"])).depths.tolist() == [0, 2]


def test_causal_profile(ln_model):
    res = logit_lens(ln_model, SENTENCES[:2], targets=[" the", " park"], top_k=5)
    prof = depth_profile(res, n_layers=3)
    b, j = res.valid.nonzero(as_tuple=True)
    assert prof.target == "next token" and prof.logprobs.shape == (len(res.labels), len(b))
    assert_close(prof.logprobs, res.next_logprobs[:, b, j], atol=0, equal_nan=True)  # no next token: NaN in both
    assert torch.equal(prof.target_ids, res.next_ids[b, j])
    depths = site_depths(res.labels, 3)
    assert depths.tolist() == [0, 1, 2, 3]
    for i in range(0, len(b), 7):
        if torch.isfinite(prof.logprobs[:, i]).all():
            a, s, r2 = _polyfit(depths, prof.logprobs[:, i].double())
            assert prof.intercept[i].item() == pytest.approx(a, abs=1e-5)
            assert prof.slope[i].item() == pytest.approx(s, abs=1e-5)
            assert prof.r2[i].item() == pytest.approx(r2, abs=1e-5)
    park = depth_profile(res, " park", n_layers=3)
    assert_close(park.logprobs, res.target_logprobs[:, b, j, 1], atol=0)
    top = depth_profile(res, "max", n_layers=3)
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
    prof = depth_profile(res, n_layers=3)
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
    prof = depth_profile(res)  # a masked result holds every layer, so its layer count is exact
    n = model.cfg.n_layers
    assert prof.depths.tolist() == list(range(n + 1))
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
    held = depth_profile(masked_lens(model, "The cat sat on the [MASK]."))
    assert held.row_tokens == ("[MASK]",) and held.target_ids.tolist() == [-1]
    fig = sp.plot_heatmaps()
    assert len(fig.data) == 4  # two heatmaps, two slope bar series
    assert any("√layer" in (tr.name or "") for tr in sp.plot(row=1).data)


def test_profile_bad_input(ln_model):
    res = logit_lens(ln_model, SENTENCES[0])
    with pytest.raises(ValueError, match="has no targets"):
        depth_profile(res, " park", n_layers=3)
    res_t = logit_lens(ln_model, SENTENCES[0], targets=[" park"])
    with pytest.raises(ValueError, match="not among this result's targets"):
        depth_profile(res_t, " dog", n_layers=3)
    with pytest.raises(TypeError, match="depth_profile takes a LensResult"):
        depth_profile({"labels": []})
    with pytest.raises(ValueError, match="row 99 is out of range"):
        depth_profile(res, n_layers=3).plot(row=99)
