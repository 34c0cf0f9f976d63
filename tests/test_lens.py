"""The logit lens against a slow reference: an explicit loop over sites with a full log-softmax."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, assert_same_top_ids, tiny_model
from tl_logitlens.core.readout import resolve_sites


def reference_lens(model, tokens, norm="recompute", include_bias=True, mask=None):
    """Every site, every position: full log-softmax, computed the obvious way, one site at a time."""
    kwargs = {} if mask is None else {"attention_mask": mask.long()}
    _, cache = model.run_with_cache(tokens, **kwargs)
    n_layers = model.cfg.n_layers
    states = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n_layers)]
    states.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    out = []
    for x in states:
        if norm == "recompute":
            normed = model.ln_final(x)
        elif norm == "cached":
            if model.cfg.normalization_type in ("LN", "LNPre"):
                x = x - x.mean(-1, keepdim=True)
            normed = x / cache["ln_final.hook_scale"]
            if hasattr(model.ln_final, "w"):
                normed = normed * model.ln_final.w
            if hasattr(model.ln_final, "b"):
                normed = normed + model.ln_final.b
        else:
            normed = x
        logits = normed @ model.W_U
        if include_bias:
            logits = logits + model.b_U
        out.append(logits.log_softmax(-1))
    return torch.stack(out)  # [site, batch, pos, d_vocab]


def check_against_reference(result, ref_logprobs, atol=1e-4):
    """Compare every metric of ``result`` with the full log-softmax ``ref_logprobs``."""
    k = result.top_ids.shape[-1]
    ref_final = ref_logprobs[-1]
    for s in range(ref_logprobs.shape[0]):
        for b, j in result.valid.nonzero().tolist():
            p = int(result.positions[b, j])
            lp = ref_logprobs[s, b, p]
            vals, ids = lp.topk(k)
            assert_close(result.top_logprobs[s, b, j], vals, atol=atol)
            assert result.top_ids[s, b, j].tolist() == ids.tolist()
            probs = lp.exp()
            assert_close(result.entropy[s, b, j], -(probs * lp).sum(), atol=atol)
            q = ref_final[b, p]
            assert_close(result.kl_to_final[s, b, j], (q.exp() * (q - lp)).sum(), atol=atol)
            nxt = int(result.next_ids[b, j])
            if nxt >= 0:
                assert_close(result.next_logprobs[s, b, j], lp[nxt], atol=atol)
                assert int(result.next_ranks[s, b, j]) == 1 + int((lp > lp[nxt]).sum())
            if result.target_ids is not None:
                for t, tid in enumerate(result.target_ids[b, j].tolist()):
                    assert_close(result.target_logprobs[s, b, j, t], lp[tid], atol=atol)
                    assert int(result.target_ranks[s, b, j, t]) == 1 + int((lp > lp[tid]).sum())


@pytest.mark.parametrize("norm", ["recompute", "cached", "none"])
def test_lens_matches_slow_reference(any_model, norm):
    tokens = any_model.to_tokens(SENTENCES[0])
    result = tl.logit_lens(any_model, tokens, norm=norm, top_k=4, targets=[" the", " park"], chunk_size=7)
    check_against_reference(result, reference_lens(any_model, tokens, norm=norm))


def test_include_bias_false_leaves_out_b_U(any_model):
    tokens = any_model.to_tokens(SENTENCES[1])
    result = tl.logit_lens(any_model, tokens, include_bias=False, top_k=3)
    check_against_reference(result, reference_lens(any_model, tokens, include_bias=False))


@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_final_site_reproduces_model_logprobs(any_model, norm):
    """Identity: the lens of ``final_post`` is the model's own output distribution (to 1e-4)."""
    tokens = any_model.to_tokens(SENTENCES[2])
    result = tl.logit_lens(any_model, tokens, norm=norm, top_k=10)
    model_lp = any_model(tokens).log_softmax(-1)[0]
    vals, ids = model_lp.topk(10)
    assert result.labels[-1] == "final_post"
    assert_close(result.top_logprobs[-1, 0], vals, atol=1e-4)
    assert_same_top_ids(result.top_ids[-1, 0], result.top_logprobs[-1, 0], ids, vals, atol=1e-4)
    assert_close(result.kl_to_final[-1], torch.zeros_like(result.kl_to_final[-1]), atol=1e-4)
    nxt = tokens[0, 1:]
    assert_close(result.next_logprobs[-1, 0, :-1], model_lp[:-1].gather(-1, nxt[:, None])[:, 0], atol=1e-4)


def test_recompute_equals_cache_apply_ln_to_stack(any_model):
    """Our normalisation is TransformerLens's ``apply_ln_to_stack(recompute_ln=True)``."""
    tokens = any_model.to_tokens(SENTENCES[3])
    _, cache = any_model.run_with_cache(tokens)
    stack = cache.accumulated_resid()
    normed = cache.apply_ln_to_stack(stack, recompute_ln=True)
    logprobs = (normed @ any_model.W_U + any_model.b_U).log_softmax(-1)
    result = tl.logit_lens(any_model, tokens, cache=cache, top_k=5)
    assert_close(result.top_logprobs[:, 0], logprobs[:, 0].topk(5).values, atol=1e-4)


def test_cached_norm_matches_apply_ln_to_stack_on_folded_models():
    """On folded models TransformerLens's cached ``apply_ln_to_stack`` is right; ours agrees."""
    for normalization in ("LN", "RMS"):
        model = tiny_model(normalization, folded=True)
        tokens = model.to_tokens(SENTENCES[0])
        _, cache = model.run_with_cache(tokens)
        stack = cache.accumulated_resid()
        logprobs = (cache.apply_ln_to_stack(stack) @ model.W_U + model.b_U).log_softmax(-1)
        result = tl.logit_lens(model, tokens, cache=cache, norm="cached", top_k=5)
        assert_close(result.top_logprobs[:, 0], logprobs[:, 0].topk(5).values, atol=1e-4)


def test_cached_norm_on_unfolded_ln_applies_gain_and_bias(ln_model):
    """TransformerLens's cached ``apply_ln_to_stack`` drops ``ln_final.w``/``b``: the final site then
    no longer equals the model's output. Ours keeps them, so the final site is exact."""
    tokens = ln_model.to_tokens(SENTENCES[0])
    logits, cache = ln_model.run_with_cache(tokens)
    tl_final = cache.apply_ln_to_stack(cache.accumulated_resid()[-1:])[0] @ ln_model.W_U + ln_model.b_U
    assert not torch.allclose(tl_final.log_softmax(-1), logits.log_softmax(-1), atol=1e-2)
    result = tl.logit_lens(ln_model, tokens, cache=cache, norm="cached", top_k=3)
    assert_close(result.top_logprobs[-1, 0], logits.log_softmax(-1)[0].topk(3).values, atol=1e-4)


def test_padding_never_changes_a_real_position(any_model):
    batch = tl.logit_lens(any_model, SENTENCES[:3], targets=" the")
    assert batch.valid.sum(-1).tolist() == [len(t) for t in batch.str_tokens]
    for i, text in enumerate(SENTENCES[:3]):
        alone = tl.logit_lens(any_model, text, targets=" the")
        n = alone.positions.shape[1]
        assert_close(batch.top_logprobs[:, i, :n], alone.top_logprobs[:, 0], atol=1e-5)
        assert_close(batch.kl_to_final[:, i, :n], alone.kl_to_final[:, 0], atol=1e-5)
        assert_close(batch.target_logprobs[:, i, :n], alone.target_logprobs[:, 0], atol=1e-5)
        assert torch.equal(batch.next_ranks[:, i, :n], alone.next_ranks[:, 0])
        pads = ~batch.valid[i]
        assert bool(batch.entropy[:, i, pads].isnan().all())
        assert bool((batch.top_ids[:, i, pads] == -1).all())


def test_padded_batch_matches_reference_with_mask(ln_model):
    result = tl.logit_lens(ln_model, SENTENCES[:2], top_k=3)
    ref = reference_lens(ln_model, result.tokens, mask=result.valid)
    check_against_reference(result, ref)


def test_positions_last_int_list_and_negative(ln_model):
    full = tl.logit_lens(ln_model, SENTENCES[:2])
    last = tl.logit_lens(ln_model, SENTENCES[:2], positions="last")
    lengths = full.valid.sum(-1)
    assert last.positions[:, 0].tolist() == (lengths - 1).tolist()
    for b in range(2):
        assert_close(last.top_logprobs[:, b, 0], full.top_logprobs[:, b, int(lengths[b]) - 1])
    two = tl.logit_lens(ln_model, SENTENCES[:2], positions=[1, -2])
    assert two.positions[:, 0].tolist() == [1, 1]
    assert two.positions[:, 1].tolist() == (lengths - 2).tolist()
    assert_close(two.entropy[:, 1, 1], full.entropy[:, 1, int(lengths[1]) - 2])
    one = tl.logit_lens(ln_model, SENTENCES[0], positions=3)
    assert_close(one.entropy[:, 0, 0], full.entropy[:, 0, 3])
    # the last position has no next token
    assert int(last.next_ids[0, 0]) == -1 and bool(last.next_logprobs.isnan().all())


def test_chunk_size_does_not_change_numbers(ln_model):
    a = tl.logit_lens(ln_model, SENTENCES[:2], chunk_size=1, targets=[" the"])
    b = tl.logit_lens(ln_model, SENTENCES[:2], chunk_size=10_000, targets=[" the"])
    # padding cells are NaN in both
    assert_close(a.top_logprobs, b.top_logprobs, equal_nan=True)
    assert_close(a.kl_to_final, b.kl_to_final, equal_nan=True)
    assert_close(a.target_logprobs, b.target_logprobs, equal_nan=True)


def test_sites_kinds_and_labels(ln_model):
    n = ln_model.cfg.n_layers
    assert tl.logit_lens(ln_model, SENTENCES[0]).labels == tuple(f"{i}_pre" for i in range(n)) + ("final_post",)
    both = tl.logit_lens(ln_model, SENTENCES[0], sites=["resid_pre", "resid_mid"])
    assert both.labels == ("0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post")
    post = resolve_sites(ln_model, "resid_post")
    assert [s.label for s in post] == ["0_post", "1_post", "final_post"]
    picked = tl.logit_lens(ln_model, SENTENCES[0], sites=["2_mid", "0_pre"])
    assert picked.labels == ("2_mid", "0_pre")
    assert_close(picked.entropy[0], both.entropy[both.labels.index("2_mid")])
    # resid_post of layer l is resid_pre of layer l + 1
    post_res = tl.logit_lens(ln_model, SENTENCES[0], sites="resid_post")
    pre_res = tl.logit_lens(ln_model, SENTENCES[0])
    assert_close(post_res.entropy[0], pre_res.entropy[1])


def test_per_row_targets(ln_model):
    texts = SENTENCES[:2]
    ids = torch.tensor([[5], [17]])  # [batch, 1]: one id per prompt
    per_prompt = tl.logit_lens(ln_model, texts, targets=ids, positions="last")
    shared = tl.logit_lens(ln_model, texts, targets=[5, 17], positions="last")
    assert_close(per_prompt.target_logprobs[:, 0, 0, 0], shared.target_logprobs[:, 0, 0, 0])
    assert_close(per_prompt.target_logprobs[:, 1, 0, 0], shared.target_logprobs[:, 1, 0, 1])
    grid = torch.randint(0, ln_model.cfg.d_vocab, (2, 4))
    per_row = tl.logit_lens(ln_model, texts, targets=grid, positions=[0, 1, 2, 3])
    assert per_row.target_ids[..., 0].tolist() == grid.tolist()


def test_a_1d_target_tensor_is_ambiguous_and_refused(ln_model):
    # its length equals the batch here, so it could be one id per prompt or two shared targets
    with pytest.raises(ValueError, match="1-D target tensor .* ambiguous"):
        tl.logit_lens(ln_model, SENTENCES[:2], targets=torch.tensor([5, 17]), positions="last")


def test_result_is_immutable_and_selects_sites(ln_model):
    result = tl.logit_lens(ln_model, SENTENCES[0])
    with pytest.raises(AttributeError):
        result.norm = "none"
    sub = result.select_sites(["final_post", "0_pre"])
    assert sub.labels == ("final_post", "0_pre")
    assert_close(sub.entropy[0], result.entropy[-1])
    with pytest.raises(ValueError, match="not in this result"):
        result.select_sites(["7_pre"])


def test_dataframe_long_format(ln_model):
    result = tl.logit_lens(ln_model, SENTENCES[:2], top_k=3, targets=[" the", " a"])
    df = result.to_dataframe()
    n_valid = int(result.valid.sum())
    assert len(df) == len(result.labels) * n_valid * 3
    assert {"site", "prompt", "position", "input_token", "rank", "token", "logprob", "prob", "entropy",
            "kl_to_final", "next_token", "next_logprob", "next_rank"} <= set(df.columns)
    row = df[(df.site == "1_pre") & (df.prompt == 1) & (df.position == 2) & (df["rank"] == 2)].iloc[0]
    assert row.token_id == int(result.top_ids[1, 1, 2, 1])
    assert row.token == result.top_tokens()[1][1][2][1]
    assert row.input_token == result.str_tokens[1][2]
    assert abs(row.logprob - float(result.top_logprobs[1, 1, 2, 1])) < 1e-6
    tdf = result.target_dataframe()
    assert len(tdf) == len(result.labels) * n_valid * 2
    assert set(tdf.target) == {" the", " a"}


def test_top_tokens_show_leading_space(ln_model):
    result = tl.logit_lens(ln_model, SENTENCES[0], targets=" the")
    assert result.str_tokens[0][2] == " upon"
    assert tl.display_tokens(ln_model.tokenizer, result.target_ids[0, 0]) == [" the"]


def test_low_precision_model_keeps_float32_statistics():
    model = tiny_model("LN", folded=True, dtype=torch.bfloat16)
    tokens = model.to_tokens(SENTENCES[0])
    result = tl.logit_lens(model, tokens, top_k=3)
    assert result.top_logprobs.dtype == torch.float32 and result.entropy.dtype == torch.float32
    model_lp = model(tokens).float().log_softmax(-1)[0]
    # bf16 logits of size ~5 carry rounding of ~2^-8 * 5 = 0.02: the tolerance is bf16's, not ours
    assert_close(result.top_logprobs[-1, 0], model_lp.topk(3).values, atol=5e-2)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, kwargs, err, match",
    [
        ("", {}, ValueError, "empty"),
        ("   ", {}, ValueError, "empty"),
        ([], {}, ValueError, "list of prompts is empty"),
        (["ok", ""], {}, ValueError, "prompt 1 is empty"),
        (["ok", 3], {}, TypeError, "prompt 1 is a int"),
        (3.5, {}, TypeError, "inputs must be"),
        ("the cat " * 60, {}, ValueError, "context is 64 tokens"),
        (torch.tensor([[1, 2, 10_000]]), {}, ValueError, "outside the vocabulary"),
        (torch.tensor([[1.0, 2.0]]), {}, TypeError, "integer ids"),
        ("the cat", {"targets": " the cat"}, ValueError, r"not a single token: it splits into 2 tokens \[' the', ' cat'\]"),
        ("the cat", {"targets": 99_999}, ValueError, "outside the vocabulary"),
        ("the cat", {"targets": ""}, ValueError, "empty string"),
        ("the cat", {"top_k": 0}, ValueError, "top_k=0"),
        ("the cat", {"top_k": 10_000}, ValueError, "top_k=10000"),
        ("the cat", {"positions": 50}, ValueError, "position 50 is out of range for prompt 0"),
        ("the cat", {"positions": -9}, ValueError, "out of range"),
        ("the cat", {"positions": "first"}, ValueError, "not understood"),
        ("the cat", {"sites": "resid_foo"}, ValueError, "unknown site 'resid_foo'"),
        ("the cat", {"sites": ["9_pre"]}, ValueError, "unknown site '9_pre'"),
        ("the cat", {"norm": "layer"}, ValueError, "unknown norm 'layer'"),
        ("the cat", {"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_bad_input_is_a_clear_error(ln_model, inputs, kwargs, err, match):
    with pytest.raises(err, match=match):
        tl.logit_lens(ln_model, inputs, **kwargs)


def test_cache_from_another_model_is_refused(ln_model):
    other = tiny_model("RMS", seed=1)
    tokens = ln_model.to_tokens(SENTENCES[0])
    _, cache = other.run_with_cache(tokens)
    with pytest.raises(ValueError, match="another model"):
        tl.logit_lens(ln_model, tokens, cache=cache)


def test_cache_missing_hooks_or_other_inputs_is_refused(ln_model):
    tokens = ln_model.to_tokens(SENTENCES[0])
    _, partial = ln_model.run_with_cache(tokens, names_filter=lambda n: "resid_pre" in n)
    with pytest.raises(ValueError, match="the cache lacks"):
        tl.logit_lens(ln_model, tokens, cache=partial)
    _, cache = ln_model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="same inputs"):
        tl.logit_lens(ln_model, SENTENCES[1], cache=cache)
    with pytest.raises(TypeError, match="ActivationCache"):
        tl.logit_lens(ln_model, tokens, cache={"blocks.0.hook_resid_pre": 1})


def test_model_in_training_mode_is_refused():
    model = tiny_model("LN").train()
    with pytest.raises(ValueError, match="training mode"):
        tl.logit_lens(model, "the cat")


def test_not_a_model_is_refused():
    with pytest.raises(TypeError, match="TransformerLens model"):
        tl.logit_lens(object(), "the cat")


@pytest.mark.parametrize("where", ["W_in", "W_U", "W_U column"], ids=["nan-in-mlp", "inf-in-unembed", "nan-column"])
def test_non_finite_values_are_an_error_not_numbers(where):
    """A NaN or inf anywhere on the way gives a ValueError naming the site and position, never top ids or
    ranks that look real (the kernel checks every block's log-sum-exp, entropy and KL)."""
    model = tiny_model("LN", folded=False)
    with torch.no_grad():
        if where == "W_in":
            model.blocks[1].mlp.W_in[0, 0] = float("nan")
        elif where == "W_U":
            model.W_U[0, 7] = float("inf")
        else:
            model.W_U[:, 3] = float("nan")
    first = "'2_pre'" if where == "W_in" else "'0_pre'"
    with pytest.raises(ValueError, match=rf"NaN or inf at site {first}, prompt 0, position 0: .*Check the model's weights"):
        tl.logit_lens(model, "Hello world")
