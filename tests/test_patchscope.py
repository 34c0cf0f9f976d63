"""Patchscopes: every number against a hand-written hook loop (one site and one prompt at a time, an
explicit ``run_with_hooks``), the identities a patch must keep, nnterp 1.3.0's ``patchscope_lens`` on the
real stories260K model (when nnterp is installed), and the errors."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import (
    HAS_HOOKED_TRANSFORMER,
    SENTENCES,
    STORIES,
    assert_close,
    require_shared,
    tiny_bridge,
    tiny_model,
)
from tl_logitlens.analyses.patchscope import PatchscopeLens, TargetPrompt, identity_prompt
from tl_logitlens.core.readout import resolve_sites

PROMPTS = SENTENCES[:2]
TARGET = "The cat sat on the mat"

# float32 forward passes of a stacked batch and of one row differ by rounding: log-probs agree to this
LOGPROB_ATOL = 2e-5


def _models():
    out = [pytest.param(("LN", False), id="LN-unfolded"), pytest.param(("RMS", True), id="RMS-folded")]
    if HAS_HOOKED_TRANSFORMER:  # TL 3.9: the bridge as well (on 4.x tiny_model is the bridge)
        out.append(pytest.param(("bridge", False), id="bridge-LN"))
    return out


_CACHE: dict = {}


def _model(spec):
    if spec not in _CACHE:
        norm, folded = spec
        _CACHE[spec] = tiny_bridge("LN", folded) if norm == "bridge" else tiny_model(norm, folded)
    return _CACHE[spec]


def _reference(model, prompts, sites, target_tokens, patch_pos, target_site=None):
    """Slow and obvious: per site and prompt, the source's last-token state written into the target
    prompt with one hook, the model's own logits at the target's last token, log-softmaxed."""
    out = torch.empty(len(sites), len(prompts), model.cfg.d_vocab)
    for b, prompt in enumerate(prompts):
        _, cache = model.run_with_cache(model.to_tokens(prompt))
        for s, site in enumerate(resolve_sites(model, sites)):
            state = cache[site.hook][0, -1].clone()
            hook = site.hook if target_site is None else resolve_sites(model, [target_site])[0].hook

            def write(act, hook=None, state=state):
                act[0, patch_pos] = state
                return act

            logits = model.run_with_hooks(target_tokens[None], fwd_hooks=[(hook, write)])
            out[s, b] = torch.log_softmax(logits[0, -1].float(), -1)
    return out


@pytest.mark.parametrize("spec", _models())
@pytest.mark.parametrize(
    ("target_site", "position"), [("same", -1), ("0_pre", 2)], ids=["same-site", "fixed-site"]
)
def test_patchscope_equals_a_hook_loop(spec, target_site, position):
    model = _model(spec)
    sites = ["0_pre", "1_mid", "1_post", "final_post"]
    res = tl.patchscope(
        model,
        PROMPTS,
        target=TargetPrompt(TARGET, position),
        source_sites=sites,
        target_site=target_site,
        keep_logprobs=True,
        top_k=3,
    )
    target_tokens = model.to_tokens(TARGET)[0]
    ref = _reference(model, PROMPTS, sites, target_tokens, position, None if target_site == "same" else target_site)
    assert res.labels == tuple(sites) and res.lens_name == "patchscope"
    assert_close(res.full_logprobs[:, :, 0], ref, atol=LOGPROB_ATOL)
    # the kernel's statistics of those distributions, by hand: top-k, entropy, KL(final ‖ site)
    assert torch.equal(res.top_ids[:, :, 0], ref.topk(3, -1).indices)
    assert_close(res.entropy[:, :, 0], -(ref.exp() * ref).sum(-1), atol=LOGPROB_ATOL)
    if target_site == "same":  # the reference is the model's own output at the source's last token
        final = torch.stack([torch.log_softmax(model(model.to_tokens(p))[0, -1].float(), -1) for p in PROMPTS])
    else:  # ... the patchscope of the last layer's state
        final = ref[-1]
    kl = (final.exp() * (final - ref)).sum(-1)
    assert_close(res.kl_to_final[:, :, 0], kl, atol=5e-5)


@pytest.mark.parametrize("spec", _models())
def test_a_patch_of_the_same_prompt_and_position_is_the_models_own_distribution(spec):
    """Writing a state back where it came from changes nothing: at final_post (patched at the last block's
    output, through the hook) and at every site with target_site="same". Tolerance: 2e-5 in log-probs
    (a stacked batch and a single row round differently)."""
    model = _model(spec)
    tokens = model.to_tokens(PROMPTS[0])[0]
    own = torch.log_softmax(model(tokens[None])[0, -1].float(), -1)
    at_final = tl.patchscope(
        model, PROMPTS[0], target=TargetPrompt(tokens, -1), source_sites=["final_post"],
        target_site="final_post", keep_logprobs=True,
    )
    assert_close(at_final.full_logprobs[0, 0, 0], own, atol=LOGPROB_ATOL)
    everywhere = tl.patchscope(
        model, PROMPTS[0], target=TargetPrompt(tokens, -1), source_sites=["resid_pre", "resid_mid"],
        keep_logprobs=True,
    )
    n = len(everywhere.labels)
    assert_close(everywhere.full_logprobs[:, 0, 0], own.expand(n, -1), atol=LOGPROB_ATOL)
    assert_close(everywhere.kl_to_final[:, 0, 0], torch.zeros(n), atol=1e-5)


def test_all_sites_run_in_one_forward_per_batch(ln_model, monkeypatch):
    import tl_logitlens.analyses.patchscope as ps

    calls = []
    forward = ps._forward

    def counting(model, tokens, hooks, **kwargs):
        calls.append(tuple(tokens.shape))
        return forward(model, tokens, hooks, **kwargs)

    monkeypatch.setattr(ps, "_forward", counting)
    sites = "resid_pre"  # 3 layers + final_post: 4 sites, 3 of them patched (final_post is itself)
    whole = tl.patchscope(ln_model, PROMPTS, source_sites=sites)
    # one patched forward of every (site, prompt) row; a HookedTransformer runs only the patched token
    # (the target's tokens before it come from a key-value cache made beside the sources' forward)
    n_tokens = 1 if HAS_HOOKED_TRANSFORMER else ln_model.to_tokens(tl.identity_prompt().prompt).shape[1]
    assert calls == [(3 * len(PROMPTS), n_tokens)]
    calls.clear()
    chunked = tl.patchscope(ln_model, PROMPTS, source_sites=sites, batch_size=4)
    assert [c[0] for c in calls] == [4, 2]
    assert_close(chunked.top_logprobs, whole.top_logprobs, atol=LOGPROB_ATOL)


def test_latents_decode_as_the_source_prompts_do(ln_model):
    sites = ["0_post", "1_post", "final_post"]
    res = tl.patchscope(ln_model, PROMPTS, source_sites=sites, keep_logprobs=True)
    states = {}
    for label in sites:
        hook = resolve_sites(ln_model, [label])[0].hook
        states[label] = torch.stack([ln_model.run_with_cache(ln_model.to_tokens(p))[1][hook][0, -1] for p in PROMPTS])
    from_dict = tl.patchscope(ln_model, latents=states, keep_logprobs=True)
    assert_close(from_dict.full_logprobs, res.full_logprobs, atol=LOGPROB_ATOL)
    assert_close(from_dict.kl_to_final, res.kl_to_final, atol=5e-5)
    assert from_dict.str_tokens == (("<latent>",),) * 2 and bool((from_dict.next_ids == -1).all())
    stacked = torch.stack([states["0_post"], states["1_post"]])
    from_tensor = tl.patchscope(ln_model, latents=stacked, source_sites=["0_post", "1_post"], keep_logprobs=True)
    assert_close(from_tensor.full_logprobs, res.full_logprobs[:2], atol=LOGPROB_ATOL)
    assert bool(from_tensor.kl_to_final.isnan().all())  # no last-layer latent: nothing to compare with


def test_cross_model_patching_needs_the_flag_and_one_width():
    source, target = tiny_model("LN", seed=0), tiny_model("LN", seed=1)
    with pytest.raises(ValueError, match="allow_cross_model=True"):
        tl.patchscope(source, PROMPTS, target_model=target)
    res = tl.patchscope(
        source, PROMPTS, target=TargetPrompt(TARGET, -1), source_sites=["0_post", "final_post"],
        target_model=target, allow_cross_model=True, keep_logprobs=True,
    )
    # the hand loop with the source's states and the target model's forward
    tokens = target.to_tokens(TARGET)[0]
    for b, prompt in enumerate(PROMPTS):
        _, cache = source.run_with_cache(source.to_tokens(prompt))
        for s, label in enumerate(["0_post", "final_post"]):
            hook = resolve_sites(target, [label])[0].hook
            state = cache[hook][0, -1].clone()

            def write(act, hook=None, state=state):
                act[0, -1] = state
                return act

            ref = torch.log_softmax(target.run_with_hooks(tokens[None], fwd_hooks=[(hook, write)])[0, -1].float(), -1)
            assert_close(res.full_logprobs[s, b, 0], ref, atol=LOGPROB_ATOL)
    wide = tiny_model("LN", d_model=48, n_heads=4)
    with pytest.raises(ValueError, match="d_model"):
        tl.patchscope(source, PROMPTS, target_model=wide, allow_cross_model=True)
    with pytest.raises(TypeError, match="allow_cross_model"):
        tl.patchscope(source, PROMPTS, target_model=target, allow_cross_model="yes")


def test_bad_input_is_refused_with_what_to_pass(ln_model):
    n = ln_model.to_tokens(TARGET).shape[1]
    with pytest.raises(ValueError, match=rf"target_position=99 is outside the target prompt, which has {n} tokens"):
        tl.patchscope(ln_model, PROMPTS, target=TARGET, target_position=99)
    with pytest.raises(ValueError, match="target_position"):
        tl.patchscope(ln_model, PROMPTS, target=TargetPrompt(TARGET, -(n + 1)))
    with pytest.raises(ValueError, match="contradicts"):
        tl.patchscope(ln_model, PROMPTS, target=TargetPrompt(TARGET, 1), target_position=2)
    with pytest.raises(ValueError, match="unknown site '7_post'"):
        tl.patchscope(ln_model, PROMPTS, source_sites=["7_post"])
    with pytest.raises(ValueError, match="unknown site '5_pre'"):
        tl.patchscope(ln_model, PROMPTS, target_site="5_pre")
    with pytest.raises(ValueError, match="target_site must be 'same' or one site label"):
        tl.patchscope(ln_model, PROMPTS, target_site="resid_pre")
    with pytest.raises(TypeError, match="target must be 'identity'"):
        tl.patchscope(ln_model, PROMPTS, target=3)
    bad = torch.zeros(2, ln_model.cfg.d_model)
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"latents\['0_post'\] holds NaN or inf \(row 1\)"):
        tl.patchscope(ln_model, latents={"0_post": bad})
    with pytest.raises(ValueError, match="d_model=32"):
        tl.patchscope(ln_model, latents={"0_post": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="either source_inputs"):
        tl.patchscope(ln_model, PROMPTS, latents={"0_post": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="or latents"):
        tl.patchscope(ln_model)
    with pytest.raises(ValueError, match="latents hold 1 sites but source_sites names"):
        tl.patchscope(ln_model, latents=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="batch_size=0"):
        tl.patchscope(ln_model, PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        tl.patchscope_generate(ln_model, PROMPTS, temperature=0.0)


def test_the_lens_object_reads_like_the_function_beside_other_lenses(ln_model):
    lens = PatchscopeLens(ln_model, TargetPrompt(TARGET, -1))
    direct = tl.patchscope(ln_model, PROMPTS, target=TargetPrompt(TARGET, -1), source_sites="resid_post")
    cmp = tl.compare_lenses(ln_model, PROMPTS, lenses=[None, lens], sites="resid_post", positions="last")
    assert cmp.lenses == ("logit lens", "patchscope")
    assert_close(cmp.result("patchscope").top_logprobs, direct.top_logprobs, atol=LOGPROB_ATOL)
    assert_close(cmp.result("patchscope").kl_to_final, direct.kl_to_final, atol=5e-5)
    with pytest.raises(ValueError, match="patches the model it was made with"):
        tl.logit_lens(tiny_model("LN", seed=3), PROMPTS, lens=lens)
    # the report's "lenses side by side" and the command line's --lens patchscope take it as any lens
    from tl_logitlens.cli.commands import _lenses
    from tl_logitlens.reporting.compute import compute_report

    data = compute_report(ln_model, PROMPTS, lens=[None, lens])
    assert data.comparison is not None and data.comparison.lenses == ("logit lens", "patchscope")
    both = _lenses(["logit", "patchscope"], ln_model)
    assert isinstance(both["patchscope"], PatchscopeLens)
    # the result's tables and figure are logit_lens's
    assert set(direct.to_dataframe()["lens"]) == {"patchscope"}
    assert direct.plot() is not None


def test_generate_continues_the_patched_prompt_as_a_hook_loop_does(ln_model):
    sites = ["0_post", "final_post"]
    gen = tl.patchscope_generate(ln_model, PROMPTS, target=TargetPrompt(TARGET, 1), source_sites=sites, max_new_tokens=3)
    assert gen.generated_ids.shape == (2, 2, 1, 3)
    for b, prompt in enumerate(PROMPTS):
        _, cache = ln_model.run_with_cache(ln_model.to_tokens(prompt))
        for s, site in enumerate(resolve_sites(ln_model, sites)):
            state = cache[site.hook][0, -1].clone()

            def write(act, hook=None, state=state):
                act[0, 1] = state
                return act

            tokens = ln_model.to_tokens(TARGET)[0]
            for _ in range(3):
                logits = ln_model.run_with_hooks(tokens[None], fwd_hooks=[(site.hook, write)])
                tokens = torch.cat([tokens, logits[0, -1].argmax()[None]])
            assert gen.generated_ids[s, b, 0].tolist() == tokens[-3:].tolist()
    a = tl.patchscope_generate(ln_model, PROMPTS, temperature=1.0, seed=5, max_new_tokens=4)
    b = tl.patchscope_generate(ln_model, PROMPTS, temperature=1.0, seed=5, max_new_tokens=4)
    assert torch.equal(a.generated_ids, b.generated_ids) and a.seed == 5 and gen.temperature is None
    frame = gen.to_dataframe()
    assert len(frame) == 4 and frame["continuation"].tolist()[0] == gen.texts()[0][0][0]
    assert len(gen.plot(prompt=1).data[0].cells.values[0]) == 2


def test_identity_prompt_is_the_papers():
    assert identity_prompt() == TargetPrompt("king king\n1135 1135\nhello hello\n?", -1)
    assert identity_prompt(["a", "b"], rel="=", sep=";").prompt == "a=a;b=b;?"


def test_equals_nnterp_patchscope_lens_on_stories260K(stories):
    """nnterp 1.3.0's ``patchscope_lens`` (identity prompt, every layer's output, the last token) on the
    same checkpoint gives the same probabilities within 1e-5, and its ``patchscope_generate`` the same greedy
    tokens. The references are computed here, by nnterp."""
    nnterp = pytest.importorskip("nnterp", reason="nnterp is not installed (pip install nnterp==1.3.0 'nnsight>=0.6,<0.7')")
    from nnterp.interventions import patchscope_lens

    path = require_shared(STORIES)
    reference_model = nnterp.StandardizedTransformer(str(path))
    prompts = ["Once upon a time, there was a little", "She loved to play outside in the"]
    # one prompt at a time: nnterp pads on the left, which no row here needs
    expected = torch.cat([patchscope_lens(reference_model, p) for p in prompts]).float()  # [prompt, layer, vocab]
    ours = tl.patchscope(stories, prompts, keep_logprobs=True)  # identity prompt, resid_post: layer outputs
    assert ours.labels == (*(f"{i}_post" for i in range(stories.cfg.n_layers - 1)), "final_post")
    assert_close(ours.full_logprobs[:, :, 0].exp().transpose(0, 1).cpu(), expected, atol=1e-5, rtol=0)
    # greedy continuations: nnterp's patchscope_generate (every layer; it returns the prompt and new tokens)
    from nnterp.interventions import patchscope_generate, repeat_prompt

    theirs = patchscope_generate(reference_model, prompts[:1], repeat_prompt(), max_length=4)
    gen = tl.patchscope_generate(stories, prompts[:1], max_new_tokens=4)
    for layer, ids in theirs.items():
        assert gen.generated_ids[layer, 0, 0].tolist() == ids[0, -4:].tolist(), f"layer {layer}"


def test_a_given_cache_decodes_as_the_run_does(ln_model):
    """With ``cache=`` the sources are not run again and the target's prefix is run on its own."""
    tokens = tl.prepare_inputs(ln_model, PROMPTS).tokens
    _, cache = ln_model.run_with_cache(tokens)
    fresh = tl.patchscope(ln_model, PROMPTS, keep_logprobs=True, targets=[" the"])
    cached = tl.patchscope(ln_model, PROMPTS, cache=cache, keep_logprobs=True, targets=[" the"])
    assert_close(cached.full_logprobs, fresh.full_logprobs, atol=LOGPROB_ATOL)
    assert torch.equal(cached.target_ranks, fresh.target_ranks)
