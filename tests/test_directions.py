"""Logit differences and direction reads per site, against an explicit per-site reference."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, tiny_model

C, WRONG = " the", " park"


def site_states(model, cache):
    n_layers = model.cfg.n_layers
    states = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n_layers)]
    return states + [cache[f"blocks.{n_layers - 1}.hook_resid_post"]]


def normed(model, cache, x, norm):
    if norm == "recompute":
        return model.ln_final(x)
    if norm == "none":
        return x
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / cache["ln_final.hook_scale"]
    if hasattr(model.ln_final, "w"):
        x = x * model.ln_final.w
    if hasattr(model.ln_final, "b"):
        x = x + model.ln_final.b
    return x


def reference_logit_diff(model, tokens, c, i, norm, mask=None, include_bias=True):
    """[site, batch, pos]: full logits per site, then the difference of two columns."""
    kwargs = {} if mask is None else {"attention_mask": mask.long()}
    _, cache = model.run_with_cache(tokens, **kwargs)
    out = []
    for x in site_states(model, cache):
        logits = normed(model, cache, x, norm) @ model.W_U
        if include_bias:
            logits = logits + model.b_U
        out.append(logits[..., c] - logits[..., i])
    return torch.stack(out).detach()


@pytest.mark.parametrize("norm", ["recompute", "cached", "none"])
def test_logit_diff_matches_reference_at_every_site_and_position(any_model, norm):
    batch = tl.prepare_inputs(any_model, SENTENCES[:2])
    c, i = any_model.to_single_token(C), any_model.to_single_token(WRONG)
    ref = reference_logit_diff(any_model, batch.tokens, c, i, norm, mask=batch.mask)
    result = tl.logit_diff(any_model, SENTENCES[:2], C, WRONG, norm=norm, positions=None)
    assert result.values.shape == (any_model.cfg.n_layers + 1, 2, batch.tokens.shape[1], 1)
    for b, p in batch.mask.nonzero().tolist():
        assert_close(result.values[:, b, p, 0], ref[:, b, p], atol=1e-4)
    assert torch.isnan(result.values[:, ~batch.mask]).all()  # padding is NaN, not zero


@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_final_site_is_the_models_own_logit_diff(any_model, norm):
    tokens = any_model.to_tokens(SENTENCES[3])
    logits = any_model(tokens)[0, -1]
    c, i = any_model.to_single_token(C), any_model.to_single_token(WRONG)
    result = tl.logit_diff(any_model, tokens, C, WRONG, norm=norm)
    assert result.labels[-1] == "final_post"
    assert_close(result.values[-1, 0, 0, 0], logits[c] - logits[i], atol=1e-4)


def test_include_bias_false_leaves_out_b_U(any_model):
    tokens = any_model.to_tokens(SENTENCES[1])
    c, i = any_model.to_single_token(C), any_model.to_single_token(WRONG)
    ref = reference_logit_diff(any_model, tokens, c, i, "recompute", include_bias=False)
    result = tl.logit_diff(any_model, tokens, C, WRONG, include_bias=False)
    assert_close(result.values[:, 0, 0, 0], ref[:, 0, -1], atol=1e-4)


def test_cached_view_is_the_running_sum_of_attributions(any_model):
    """With norm='cached' the value at layer L's input is the sum of the rows written before L."""
    tokens = any_model.to_tokens(SENTENCES[2])
    ld = tl.logit_diff(any_model, tokens, C, WRONG, norm="cached")
    dla = tl.direct_logit_attribution(any_model, tokens, C, WRONG)
    rows = dict(zip(dla.labels, dla.attribution[:, 0, 0, 0]))
    running = rows["embed"] + rows.get("pos_embed", 0) + rows.get("final_norm_bias", 0) + rows["unembed_bias"]
    for layer in range(any_model.cfg.n_layers):
        assert_close(ld.values[layer, 0, 0, 0], running, atol=1e-4, msg=f"layer {layer}")
        running = running + rows[f"{layer}_attn_out"] + rows[f"{layer}_attn_b_O"] + rows[f"{layer}_mlp_out"]
    assert_close(ld.values[-1, 0, 0, 0], running, atol=1e-4)
    assert_close(ld.values[-1, 0, 0, 0], dla.total[0, 0, 0], atol=1e-4)


def test_direction_lens_with_unembedding_difference_is_logit_diff_without_b_U(any_model):
    c, i = any_model.to_single_token(C), any_model.to_single_token(WRONG)
    direction = (any_model.W_U[:, c] - any_model.W_U[:, i]).detach()
    for norm in ("recompute", "cached"):
        ld = tl.logit_diff(any_model, SENTENCES[:3], C, WRONG, norm=norm, include_bias=False)
        dl = tl.direction_lens(any_model, SENTENCES[:3], direction, norm=norm)
        assert dl.kind == "direction" and dl.incorrect_ids is None
        assert_close(dl.values, ld.values, atol=1e-4)


def test_direction_lens_several_directions_and_labels(ln_model):
    torch.manual_seed(0)
    dirs = torch.randn(3, ln_model.cfg.d_model)
    tokens = ln_model.to_tokens(SENTENCES[0])
    result = tl.direction_lens(ln_model, tokens, dirs, direction_labels=["a", "b", "c"], positions=[1, -1])
    _, cache = ln_model.run_with_cache(tokens)
    for s, x in enumerate(site_states(ln_model, cache)):
        ref = ln_model.ln_final(x)[0] @ dirs.T  # [pos, 3]
        assert_close(result.values[s, 0, 0], ref[1], atol=1e-4)
        assert_close(result.values[s, 0, 1], ref[-1], atol=1e-4)
    assert result.pair_labels == ("a", "b", "c")


def test_per_prompt_pairs_ioi_style(ln_model):
    prompts = SENTENCES[:3]
    correct, incorrect = [" the", " and", " the"], [" park", " the", " sun"]
    result = tl.logit_diff(ln_model, prompts, correct, incorrect, per_prompt=True)
    assert result.values.shape[-1] == 1
    for b, prompt in enumerate(prompts):
        single = tl.logit_diff(ln_model, prompt, correct[b], incorrect[b])
        assert_close(result.values[:, b], single.values[:, 0], atol=1e-5)
        assert int(result.correct_ids[b, 0]) == ln_model.to_single_token(correct[b])
    ids = torch.tensor([ln_model.to_single_token(t) for t in correct])
    bad = torch.tensor([ln_model.to_single_token(t) for t in incorrect])
    as_tensor = tl.logit_diff(ln_model, prompts, ids, bad, per_prompt=True)
    assert_close(as_tensor.values, result.values)


def test_several_shared_pairs(ln_model):
    result = tl.logit_diff(ln_model, SENTENCES[:2], [C, " and"], [WRONG, " sun"])
    assert result.values.shape[-1] == 2
    one = tl.logit_diff(ln_model, SENTENCES[:2], " and", " sun")
    assert_close(result.values[..., 1], one.values[..., 0])
    assert result.pair_labels == ("' the' - ' park'", "' and' - ' sun'")


def reference_bootstrap(values, n_boot, seed, level):
    """Explicit loop over resamples, drawn the way the docstring says (torch.Generator(seed))."""
    n_batch = values.shape[1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_batch, (n_boot, n_batch), generator=gen)
    means = torch.stack([values[:, row].mean(1) for row in idx])
    a = (1 - level) / 2
    return torch.quantile(means, a, dim=0), torch.quantile(means, 1 - a, dim=0)


def test_bootstrap_interval_matches_explicit_loop_and_is_seeded(ln_model):
    prompts = SENTENCES * 2
    result = tl.logit_diff(ln_model, prompts, C, WRONG, n_bootstrap=200, seed=3, confidence=0.9)
    assert_close(result.mean, result.values.mean(1), atol=1e-6)
    low, high = reference_bootstrap(result.values, 200, 3, 0.9)
    assert_close(result.low, low, atol=1e-5)
    assert_close(result.high, high, atol=1e-5)
    assert bool((result.low <= result.mean).all() and (result.mean <= result.high).all())
    again = tl.logit_diff(ln_model, prompts, C, WRONG, n_bootstrap=200, seed=3, confidence=0.9)
    assert torch.equal(again.low, result.low)
    other = tl.logit_diff(ln_model, prompts, C, WRONG, n_bootstrap=200, seed=4, confidence=0.9)
    assert not torch.equal(other.low, result.low)


def test_bootstrap_leaves_padding_out(ln_model):
    result = tl.logit_diff(ln_model, SENTENCES[:3], C, WRONG, positions=None, n_bootstrap=50)
    for j in range(result.values.shape[2]):
        keep = result.valid[:, j]
        assert_close(result.mean[:, j], result.values[:, keep, j].mean(1), atol=1e-5)
    assert not torch.isnan(result.mean).any()


def test_dataframes(ln_model):
    result = tl.logit_diff(ln_model, SENTENCES[:2], [C, " and"], [WRONG, " sun"], n_bootstrap=20)
    df = result.to_dataframe()
    n_sites = ln_model.cfg.n_layers + 1
    assert len(df) == n_sites * 2 * 1 * 2
    row = df[(df.site == "final_post") & (df.prompt == 1) & (df.pair == 1)].iloc[0]
    assert row.correct == " and" and row.incorrect == " sun"
    assert row.value == pytest.approx(float(result.values[-1, 1, 0, 1]))
    summary = result.summary_dataframe()
    assert len(summary) == n_sites * 2
    assert set(summary.columns) >= {"site", "mean", "low", "high", "n_prompts"}


def test_norm_views_paragraph_is_in_the_docstring():
    doc = " ".join(tl.logit_diff.__doc__.split())
    assert " ".join(tl.NORM_VIEWS.split()).replace("'", '"') in doc.replace("'", '"')


# ----------------------------------------------------------------------------------------------
# bad input


def test_same_token_is_an_error(ln_model):
    with pytest.raises(ValueError, match="same token"):
        tl.logit_diff(ln_model, SENTENCES[0], C, C)
    with pytest.raises(ValueError, match="pair 1 of prompt 0"):
        tl.logit_diff(ln_model, SENTENCES[:1], [[C, WRONG]], [[WRONG, WRONG]], per_prompt=True)


def test_multi_token_string_names_its_pieces(ln_model):
    with pytest.raises(ValueError, match=r"not a single token: it splits into \d+ tokens \["):
        tl.logit_diff(ln_model, SENTENCES[0], " thermodynamics", WRONG)


def test_pair_count_must_match_batch(ln_model):
    with pytest.raises(ValueError, match="one entry per prompt: it has 2 for 3 prompts"):
        tl.logit_diff(ln_model, SENTENCES[:3], [C, C], [WRONG, WRONG], per_prompt=True)
    with pytest.raises(ValueError, match="correct has 2 tokens per prompt but incorrect has 1"):
        tl.logit_diff(ln_model, SENTENCES[:3], [C, " and"], [WRONG])
    with pytest.raises(ValueError, match="incorrect is required"):
        tl.logit_diff(ln_model, SENTENCES[0], C, None)


def test_bad_direction(ln_model):
    d = ln_model.cfg.d_model
    with pytest.raises(ValueError, match=f"d_model={d}, got shape \\[{d + 1}\\]"):
        tl.direction_lens(ln_model, SENTENCES[0], torch.randn(d + 1))
    nan = torch.randn(d)
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tl.direction_lens(ln_model, SENTENCES[0], nan)
    with pytest.raises(TypeError, match="floats"):
        tl.direction_lens(ln_model, SENTENCES[0], torch.ones(d, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per direction"):
        tl.direction_lens(ln_model, SENTENCES[0], torch.randn(2, d), direction_labels=["x"])


def test_bad_bootstrap_and_norm(ln_model):
    with pytest.raises(ValueError, match="n_bootstrap"):
        tl.logit_diff(ln_model, SENTENCES[0], C, WRONG, n_bootstrap=0)
    with pytest.raises(ValueError, match="confidence"):
        tl.logit_diff(ln_model, SENTENCES[0], C, WRONG, confidence=95)
    with pytest.raises(ValueError, match="seed"):
        tl.direction_lens(ln_model, SENTENCES[0], torch.ones(ln_model.cfg.d_model), seed=-1)
    with pytest.raises(ValueError, match="unknown norm"):
        tl.logit_diff(ln_model, SENTENCES[0], C, WRONG, norm="final")


def test_soft_capped_logits_are_capped_per_token():
    model = tiny_model("LN", folded=False, output_logits_soft_cap=2.0)
    tokens = model.to_tokens(SENTENCES[0])
    logits = model(tokens)[0, -1]
    c, i = model.to_single_token(C), model.to_single_token(WRONG)
    result = tl.logit_diff(model, tokens, C, WRONG)
    assert_close(result.values[-1, 0, 0, 0], logits[c] - logits[i], atol=1e-5)
