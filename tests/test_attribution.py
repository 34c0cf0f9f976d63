"""Direct logit attribution against explicit loops over the cache, the model's own logits, and TL."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, STORIES, assert_close, require_shared, tiny_model
from tl_logitlens.core import compat as _compat
from tl_logitlens.core.readout import final_norm_bias

C, WRONG = " the", " park"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the"


def full_run(model, inputs):
    batch = tl.prepare_inputs(model, inputs)
    kwargs = {"attention_mask": batch.mask.long()} if batch.padded else {}
    logits, cache = model.run_with_cache(batch.tokens, **kwargs)
    return batch, logits.detach(), cache


def readout(model, cache, b, p):
    """The final norm with its cached scale at (b, p), as an explicit function of one vector."""
    s = cache["ln_final.hook_scale"][b, p]
    w = getattr(model.ln_final, "w", None)

    def f(x):
        if model.cfg.normalization_type in ("LN", "LNPre"):
            x = x - x.mean()
        x = x / s
        return x * w if w is not None else x

    return f


def direction(model, c, i):
    d = model.W_U[:, c] - (model.W_U[:, i] if i is not None else 0)
    bias = model.b_U[c] - (model.b_U[i] if i is not None else 0)
    return d, bias


def b_O(model, block):
    """The attention output bias; zeros where a bridge has none (bias-free checkpoints such as Llama)."""
    return _compat.output_bias(block.attn, "b_O", model.cfg.d_model, model.W_U)


def reference_components(model, cache, b, p, c, i):
    """label -> contribution at (b, p), each written out from the cache."""
    f = readout(model, cache, b, p)
    d, bias = direction(model, c, i)
    rows = {"embed": f(cache["hook_embed"][b, p]) @ d}
    if model.cfg.positional_embedding_type == "standard":
        rows["pos_embed"] = f(cache["hook_pos_embed"][b, p]) @ d
    for layer, block in enumerate(model.blocks):
        rows[f"{layer}_attn_out"] = f(cache[f"blocks.{layer}.hook_attn_out"][b, p] - b_O(model, block)) @ d
        rows[f"{layer}_attn_b_O"] = f(b_O(model, block)) @ d
        rows[f"{layer}_mlp_out"] = f(cache[f"blocks.{layer}.hook_mlp_out"][b, p]) @ d
    if final_norm_bias(model) is not None:  # a folded bridge keeps a zero ln_final.b
        rows["final_norm_bias"] = model.ln_final.b @ d
    rows["unembed_bias"] = bias
    return {k: v.detach() for k, v in rows.items()}


def reference_heads(model, cache, b, p, c, i):
    """[layer, head]: each head's output vector z @ W_O[h], read through the cached norm."""
    f = readout(model, cache, b, p)
    d, _ = direction(model, c, i)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer, block in enumerate(model.blocks):
        z = cache[f"blocks.{layer}.attn.hook_z"][b, p]
        for h in range(model.cfg.n_heads):
            out[layer, h] = f(z[h] @ block.attn.W_O[h]) @ d
    return out.detach()


def reference_sources(model, cache, b, p, c, i):
    """[layer, head, src]: pattern[h, p, s] * v[s, kv(h)] @ W_O[h], read through the cached norm."""
    f = readout(model, cache, b, p)
    d, _ = direction(model, c, i)
    n_heads = model.cfg.n_heads
    seq = cache["hook_embed"].shape[1]
    out = torch.zeros(model.cfg.n_layers, n_heads, seq)
    for layer, block in enumerate(model.blocks):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][b]
        v = cache[f"blocks.{layer}.attn.hook_v"][b]
        group = n_heads // v.shape[1]
        for h in range(n_heads):
            for s in range(seq):
                out[layer, h, s] = f(pattern[h, p, s] * v[s, h // group] @ block.attn.W_O[h]) @ d
    return out.detach()


def reference_neurons(model, cache, b, p, c, i):
    """[layer, neuron]: post[n] * W_out[n], read through the cached norm (one einsum per layer)."""
    f = readout(model, cache, b, p)
    d, _ = direction(model, c, i)
    out = []
    for layer, block in enumerate(model.blocks):
        post = cache[f"blocks.{layer}.mlp.hook_post"][b, p]
        vectors = torch.einsum("n,nm->nm", post, block.mlp.W_out)
        out.append(torch.stack([f(vec) @ d for vec in vectors]))
    return torch.stack(out).detach()


def model_value(logits, b, p, c, i):
    return logits[b, p, c] - (logits[b, p, i] if i is not None else 0)


def ids(model, *tokens):
    return [None if t is None else model.to_single_token(t) for t in tokens]


# ----------------------------------------------------------------------------------------------
# exactness on tiny models, all four norm variants


@pytest.mark.parametrize("incorrect", [WRONG, None], ids=["logit_diff", "logit"])
def test_components_match_reference_and_sum_to_the_models_logit(any_model, incorrect):
    batch, logits, cache = full_run(any_model, SENTENCES[:2])
    c, i = ids(any_model, C, incorrect)
    result = tl.direct_logit_attribution(any_model, SENTENCES[:2], C, incorrect, positions=None)
    assert result.metric == ("logit" if incorrect is None else "logit_diff")
    for b, p in batch.mask.nonzero().tolist():
        ref = reference_components(any_model, cache, b, p, c, i)
        assert list(result.labels) == list(ref)
        assert_close(result.attribution[:, b, p, 0], torch.stack(list(ref.values())), atol=1e-4)
        total = model_value(logits, b, p, c, i)
        assert_close(result.total[b, p, 0], total, atol=1e-4)
        assert_close(result.attribution[:, b, p, 0].sum(), total, atol=1e-4)
    assert torch.isnan(result.attribution[:, ~batch.mask]).all()


def test_heads_match_reference_and_add_up(any_model):
    batch, logits, cache = full_run(any_model, SENTENCES[:2])
    c, i = ids(any_model, C, WRONG)
    result = tl.direct_logit_attribution(any_model, SENTENCES[:2], C, WRONG, unit="head", positions=[2, -1])
    comp = tl.direct_logit_attribution(any_model, SENTENCES[:2], C, WRONG, positions=[2, -1])
    n_layers, n_heads = any_model.cfg.n_layers, any_model.cfg.n_heads
    grid = result.grid()
    assert grid.shape == (n_layers, n_heads, 2, 2, 1)
    assert result.labels[:2] == ("L0H0", "L0H1") and result.row_index[1] == 1
    for b in range(2):
        for j in range(2):
            p = int(result.positions[b, j])
            assert_close(grid[:, :, b, j, 0], reference_heads(any_model, cache, b, p, c, i), atol=1e-4)
            assert_close(result.attribution[:, b, j, 0].sum(), model_value(logits, b, p, c, i), atol=1e-4)
    rows = dict(zip(comp.labels, comp.attribution))
    for layer in range(n_layers):  # a layer's heads add up to its attention output (without b_O)
        assert_close(grid[layer].sum(0), rows[f"{layer}_attn_out"], atol=1e-5)
    shared = [lab for lab in result.labels if not lab.startswith("L")]
    for lab in shared:
        assert_close(result.attribution[result.labels.index(lab)], rows[lab])


@pytest.mark.parametrize(
    "kwargs",
    [dict(normalization="LN"), dict(normalization="RMS", n_key_value_heads=2, gated_mlp=True, act_fn="silu")],
    ids=["LN", "RMS-GQA-gated"],
)
def test_head_sources_match_reference_and_sum_to_heads(kwargs):
    model = tiny_model(**kwargs)
    batch, logits, cache = full_run(model, SENTENCES[:2])
    c, i = ids(model, C, WRONG)
    result = tl.direct_logit_attribution(model, SENTENCES[:2], C, WRONG, unit="head_source", positions=[3, -1])
    src = result.source_attribution
    assert src.shape == (model.cfg.n_layers, model.cfg.n_heads, batch.tokens.shape[1], 2, 2, 1)
    for b in range(2):
        for j in range(2):
            p = int(result.positions[b, j])
            assert_close(src[..., b, j, 0], reference_sources(model, cache, b, p, c, i), atol=1e-5)
            assert bool((src[:, :, p + 1 :, b, j] == 0).all())  # causal: nothing from later tokens
    assert_close(src.sum(2), result.grid(), atol=1e-5)
    assert_close(result.unexplained, torch.zeros_like(result.total), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(normalization="LN"), dict(normalization="RMS", folded=True), dict(normalization="RMS", gated_mlp=True, act_fn="silu")],
    ids=["LN", "RMS-folded", "RMS-gated"],
)
def test_neurons_match_reference_and_add_up_to_mlp_rows(kwargs):
    model = tiny_model(**kwargs)
    batch, logits, cache = full_run(model, SENTENCES[:2])
    c, i = ids(model, C, WRONG)
    result = tl.direct_logit_attribution(model, SENTENCES[:2], C, WRONG, unit="neuron")
    comp = tl.direct_logit_attribution(model, SENTENCES[:2], C, WRONG)
    grid = result.grid()
    assert grid.shape == (model.cfg.n_layers, model.cfg.d_mlp, 2, 1, 1)
    rows = dict(zip(result.labels, result.attribution))
    comp_rows = dict(zip(comp.labels, comp.attribution))
    for b in range(2):
        p = int(result.positions[b, 0])
        assert_close(grid[:, :, b, 0, 0], reference_neurons(model, cache, b, p, c, i), atol=1e-5)
        assert_close(result.attribution[:, b, 0, 0].sum(), model_value(logits, b, p, c, i), atol=1e-4)
    for layer in range(model.cfg.n_layers):
        assert_close(grid[layer].sum(0) + rows[f"{layer}_mlp_b_out"], comp_rows[f"{layer}_mlp_out"], atol=1e-5)
    # top(k) ranks neurons over every layer by mean |attribution|
    top = result.top(5)
    flat = grid[..., 0].mean((2, 3)).reshape(-1)
    order = flat.abs().argsort(descending=True)[:5]
    assert top.label.tolist() == [result.labels[int(r)] for r in order]
    assert top.attribution.tolist() == pytest.approx(flat[order].tolist(), abs=1e-6)


def test_per_prompt_pairs_and_several_shared_pairs(ln_model):
    prompts = SENTENCES[:3]
    correct, incorrect = [" the", " and", " the"], [" park", " the", " sun"]
    result = tl.direct_logit_attribution(ln_model, prompts, correct, incorrect, unit="head", per_prompt=True)
    for b in range(3):
        single = tl.direct_logit_attribution(ln_model, prompts[b], correct[b], incorrect[b], unit="head")
        assert_close(result.attribution[:, b], single.attribution[:, 0], atol=1e-5)
        assert_close(result.total[b], single.total[0], atol=1e-5)
    shared = tl.direct_logit_attribution(ln_model, prompts, [C, " and"], [WRONG, " sun"], unit="neuron")
    assert shared.attribution.shape[-1] == 2
    one = tl.direct_logit_attribution(ln_model, prompts, " and", " sun", unit="neuron")
    assert_close(shared.attribution[..., 1], one.attribution[..., 0], atol=1e-6)


def test_padding_does_not_change_a_prompts_rows(any_model):
    alone = tl.direct_logit_attribution(any_model, SENTENCES[1], C, WRONG, unit="head")
    padded = tl.direct_logit_attribution(any_model, [SENTENCES[1], SENTENCES[3]], C, WRONG, unit="head")
    assert_close(padded.attribution[:, :1], alone.attribution, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# TransformerLens's own route


def test_agrees_with_transformer_lens_on_folded_models_except_b_U():
    model = tiny_model("LN", folded=True)
    tokens = model.to_tokens(SENTENCES[0])
    logits, cache = model.run_with_cache(tokens)
    heads = tl.direct_logit_attribution(model, tokens, C, WRONG, unit="head", cache=cache)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    tl_heads = cache.logit_attrs(stack, C, WRONG, pos_slice=-1)[:, 0]
    assert_close(heads.grid()[..., 0, 0, 0].reshape(-1), tl_heads, atol=1e-5)
    # the trap: apply_ln=True *and* logit_attrs divide by the final scale twice
    scale = cache["ln_final.hook_scale"][0, -1]
    twice = cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True), C, WRONG, pos_slice=-1)
    assert_close(twice[:, 0] * scale, tl_heads, atol=1e-5)

    comp = tl.direct_logit_attribution(model, tokens, C, WRONG, cache=cache)
    rows = dict(zip(comp.labels, comp.attribution[:, 0, 0, 0]))
    resid, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    tl_rows = dict(zip(labels, cache.logit_attrs(resid, C, WRONG, pos_slice=-1)[:, 0]))
    for lab, value in tl_rows.items():  # TL's attn_out includes b_O
        ours = rows[lab] + rows[lab.replace("attn_out", "attn_b_O")] if "attn_out" in lab else rows[lab]
        assert_close(ours, value, atol=1e-5, msg=lab)
    c, i = ids(model, C, WRONG)
    truth = logits[0, -1, c] - logits[0, -1, i]
    # TL leaves out the unembedding bias, which a folded LayerNorm model has (ln_final.b folds into it)
    assert abs(float(sum(tl_rows.values()).detach() - truth)) > 1e-2
    assert_close(sum(tl_rows.values()) + rows["unembed_bias"], truth, atol=1e-4)
    assert_close(comp.attribution[:, 0, 0, 0].sum(), truth, atol=1e-4)


def test_transformer_lens_attribution_is_wrong_on_unfolded_layernorm(ln_model):
    """cache.logit_attrs ignores ln_final.w/b and b_U; our rows still add up to the model's logit diff."""
    tokens = ln_model.to_tokens(SENTENCES[2])
    logits, cache = ln_model.run_with_cache(tokens)
    c, i = ids(ln_model, C, WRONG)
    truth = (logits[0, :, c] - logits[0, :, i]).detach()  # every position
    resid = cache.decompose_resid(layer=-1)
    tl_sum = cache.logit_attrs(resid, C, WRONG)[:, 0].sum(0).detach()
    assert float((tl_sum - truth).abs().max()) > 1e-2  # over 100x our tolerance
    ours = tl.direct_logit_attribution(ln_model, tokens, C, WRONG, positions=None, cache=cache)
    assert_close(ours.attribution[:, 0, :, 0].sum(0), truth, atol=1e-4)
    assert "final_norm_bias" in ours.labels and "unembed_bias" in ours.labels


# ----------------------------------------------------------------------------------------------
# component lens


def reference_component_logits(model, cache, b, p, unit):
    """label -> the row's direct effect on every logit at (b, p)."""
    f = readout(model, cache, b, p)
    out = {}
    if unit == "head":
        for layer, block in enumerate(model.blocks):
            z = cache[f"blocks.{layer}.attn.hook_z"][b, p]
            for h in range(model.cfg.n_heads):
                out[f"L{layer}H{h}"] = f(z[h] @ block.attn.W_O[h]) @ model.W_U
    out["embed"] = f(cache["hook_embed"][b, p]) @ model.W_U
    if model.cfg.positional_embedding_type == "standard":
        out["pos_embed"] = f(cache["hook_pos_embed"][b, p]) @ model.W_U
    for layer, block in enumerate(model.blocks):
        if unit == "component":
            out[f"{layer}_attn_out"] = f(cache[f"blocks.{layer}.hook_attn_out"][b, p] - b_O(model, block)) @ model.W_U
        out[f"{layer}_attn_b_O"] = f(b_O(model, block)) @ model.W_U
        out[f"{layer}_mlp_out"] = f(cache[f"blocks.{layer}.hook_mlp_out"][b, p]) @ model.W_U
    if final_norm_bias(model) is not None:
        out["final_norm_bias"] = model.ln_final.b @ model.W_U
    out["unembed_bias"] = model.b_U
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("unit", ["component", "head"])
def test_component_lens_matches_reference(any_model, unit):
    batch, logits, cache = full_run(any_model, SENTENCES[:2])
    result = tl.component_lens(any_model, SENTENCES[:2], unit=unit, top_k=4, positions=[1, -1], chunk_size=3)
    for b in range(2):
        for j in range(2):
            p = int(result.positions[b, j])
            ref = reference_component_logits(any_model, cache, b, p, unit)
            assert list(result.labels) == list(ref)
            # the rows' effects add up to the model's logits
            assert_close(torch.stack(list(ref.values())).sum(0), logits[b, p], atol=1e-4)
            for r, vec in enumerate(ref.values()):
                hi, lo = vec.topk(4), vec.topk(4, largest=False)
                assert_close(result.promoted_logits[r, b, j], hi.values, atol=1e-4)
                assert_close(result.suppressed_logits[r, b, j], lo.values, atol=1e-4)
                assert_close(vec[result.promoted_ids[r, b, j]], hi.values, atol=1e-4)
    df = result.to_dataframe()
    assert len(df) == len(result.labels) * 2 * 2 * 2 * 4
    assert result.promoted_tokens()[0][0][0][0] == df.token.iloc[0]


# ----------------------------------------------------------------------------------------------
# result helpers


def test_dataframe_top_and_grid(ln_model):
    result = tl.direct_logit_attribution(ln_model, SENTENCES[:2], [C, " and"], [WRONG, " sun"], unit="head")
    df = result.to_dataframe()
    assert len(df) == len(result.labels) * 2 * 1 * 2
    sel = df[(df.component == "L1H2") & (df.prompt == 1) & (df.pair == 1)].iloc[0]
    assert sel.attribution == pytest.approx(float(result.grid()[1, 2, 1, 0, 1]))
    assert sel.correct == " and" and sel.layer == 1 and sel["index"] == 2
    top = result.top(3, pair=1, rows="all")
    mean = result.attribution[..., 1].mean((1, 2))
    assert top.attribution.abs().tolist() == pytest.approx(mean.abs().sort(descending=True).values[:3].tolist())
    assert len(result.top(3, rows="grid")) == 3


@pytest.mark.parametrize("unit", ["head", "head_source"], ids=["head", "head_source"])
def test_top_of_a_head_result_ranks_heads_by_default(ln_model, unit):
    """``unit="head"`` answers "which heads": its default ``top()`` is the heads (as ``unit="neuron"``'s is
    the neurons), ranked by mean |attribution| against a sort of the grid; ``rows="all"`` adds the rest."""
    result = tl.direct_logit_attribution(ln_model, SENTENCES[:2], C, WRONG, unit=unit)
    n_heads = ln_model.cfg.n_layers * ln_model.cfg.n_heads
    k = n_heads  # every head: a non-head row anywhere in the ranking would show
    # head_source's default top() ranks head x source cells (tests/test_fresh_clone.py); its heads: rows="grid"
    top = result.top(k, rows="grid") if unit == "head_source" else result.top(k)
    assert all(label.startswith("L") and "H" in label for label in top.label), top.label.tolist()
    assert (top.index >= 0).all() and (top.layer >= 0).all()
    heads = result.grid()[..., 0].mean((2, 3)).reshape(-1)
    order = heads.abs().argsort(descending=True)
    assert top.label.tolist() == [result.labels[int(r)] for r in order]
    assert top.equals(result.top(k, rows="grid"))
    everything = result.top(len(result.labels), rows="all")
    assert {"embed", "unembed_bias"} <= set(everything.label)
    comp = tl.direct_logit_attribution(ln_model, SENTENCES[:2], C, WRONG)
    with pytest.raises(ValueError, match="grid\\(\\) needs unit"):
        comp.grid()
    with pytest.raises(ValueError, match="pair must be"):
        comp.top(3, pair=5)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors(ln_model):
    with pytest.raises(ValueError, match="unknown unit 'layer'"):
        tl.direct_logit_attribution(ln_model, SENTENCES[0], C, WRONG, unit="layer")
    with pytest.raises(ValueError, match="same token"):
        tl.direct_logit_attribution(ln_model, SENTENCES[0], C, C)
    with pytest.raises(ValueError, match=r"splits into \d+ tokens"):
        tl.direct_logit_attribution(ln_model, SENTENCES[0], " thermodynamics")
    with pytest.raises(ValueError, match="one entry per prompt: it has 1 for 2 prompts"):
        tl.direct_logit_attribution(ln_model, SENTENCES[:2], [C], [WRONG], per_prompt=True)
    with pytest.raises(ValueError, match="unknown unit 'neuron'"):
        tl.component_lens(ln_model, SENTENCES[0], unit="neuron")


def test_head_source_needs_patterns_in_the_cache(ln_model):
    tokens = ln_model.to_tokens(SENTENCES[0])
    _, cache = ln_model.run_with_cache(tokens, names_filter=lambda n: "pattern" not in n)
    with pytest.raises(ValueError, match="head_source.*attention pattern.*lacks"):
        tl.direct_logit_attribution(ln_model, tokens, C, WRONG, unit="head_source", cache=cache)
    # the same cache serves unit='head'
    tl.direct_logit_attribution(ln_model, tokens, C, WRONG, unit="head", cache=cache)


def test_neuron_needs_hook_post(ln_model):
    tokens = ln_model.to_tokens(SENTENCES[0])
    _, cache = ln_model.run_with_cache(tokens, names_filter=lambda n: "hook_post" not in n or "resid" in n)
    with pytest.raises(ValueError, match="unit='neuron' reads the MLP activations \\(hook_post\\)"):
        tl.direct_logit_attribution(ln_model, tokens, C, WRONG, unit="neuron", cache=cache)
    attn_only = tiny_model("LN")
    attn_only.cfg.attn_only = True  # read as attention-only: no MLP rows, no neurons
    try:
        with pytest.raises(ValueError, match="attention-only"):
            tl.direct_logit_attribution(attn_only, tokens, C, WRONG, unit="neuron")
    finally:
        attn_only.cfg.attn_only = False


def test_attention_only_model_rows_add_up():
    model = tiny_model("LN", n_layers=2, d_model=16, n_heads=2, seed=1, attn_only=True)
    tokens = model.to_tokens(SENTENCES[0])
    logits = model(tokens)
    c, i = ids(model, C, WRONG)
    result = tl.direct_logit_attribution(model, tokens, C, WRONG, unit="head")
    assert not any("mlp" in lab for lab in result.labels)
    assert_close(result.attribution.sum(), logits[0, -1, c] - logits[0, -1, i], atol=1e-4)
    with pytest.raises(ValueError, match="attention-only"):
        tl.direct_logit_attribution(model, tokens, C, WRONG, unit="neuron")


@pytest.mark.parametrize("unit", ["component", "head"])
def test_component_lens_refuses_rows_that_do_not_add_up(ln_model, unit):
    """Where the rows cannot add up to the final residual stream (here a cache whose embedding was
    changed; in the wild an architecture that scales what it writes outside the hooks), the component
    lens refuses instead of reporting effects that do not sum to the logits, as attribution does."""
    tokens = ln_model.to_tokens(SENTENCES[0])
    _, cache = ln_model.run_with_cache(tokens)
    cache.cache_dict["hook_embed"] = cache["hook_embed"] * 2.0
    with pytest.raises(ValueError, match="do not add up to the final residual stream"):
        tl.component_lens(ln_model, tokens, unit=unit, cache=cache)


def test_soft_capped_model_is_refused():
    model = tiny_model("LN")
    model.cfg.output_logits_soft_cap = 30.0
    try:
        with pytest.raises(ValueError, match="soft-caps its logits"):
            tl.direct_logit_attribution(model, SENTENCES[0], C, WRONG)
    finally:
        model.cfg.output_logits_soft_cap = -1.0


# ----------------------------------------------------------------------------------------------
# real weights: stories260K (LLaMA: RMSNorm, GQA, gated SiLU MLP, rotary, no biases)


@pytest.fixture(scope="module")
def stories_unfolded():
    return tl.load_model(require_shared(STORIES), fold_ln=False)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["folded", "unfolded"])
def test_stories_rows_add_up_for_every_unit(stories, stories_unfolded, which):
    model = stories if which == "folded" else stories_unfolded
    assert _compat.normalization_type(model) == ("RMSPre" if which == "folded" else "RMS")
    logits = model(model.to_tokens(PROMPT))[0, -1]
    c, i = ids(model, "▁p", "▁s")
    truth = logits[c] - logits[i]
    assert float(truth) > 0  # the model prefers " park"-like " p" over " s"
    _, cache = model.run_with_cache(model.to_tokens(PROMPT))
    p = cache["hook_embed"].shape[1] - 1
    for unit in ("component", "head", "head_source", "neuron"):
        result = tl.direct_logit_attribution(model, PROMPT, "▁p", "▁s", unit=unit, cache=cache)
        assert_close(result.total[0, 0, 0], truth, atol=1e-4, msg=unit)
        assert_close(result.attribution[:, 0, 0, 0].sum(), truth, atol=1e-4, msg=unit)
    heads = tl.direct_logit_attribution(model, PROMPT, "▁p", "▁s", unit="head_source", cache=cache)
    assert_close(heads.grid()[..., 0, 0, 0], reference_heads(model, cache, 0, p, c, i), atol=1e-4)
    assert_close(heads.source_attribution.sum(2), heads.grid(), atol=1e-5)
    neurons = tl.direct_logit_attribution(model, PROMPT, "▁p", "▁s", unit="neuron", cache=cache)
    assert_close(neurons.grid()[..., 0, 0, 0], reference_neurons(model, cache, 0, p, c, i), atol=1e-4)
    comp = tl.direct_logit_attribution(model, PROMPT, "▁p", "▁s", cache=cache)
    ref = reference_components(model, cache, 0, p, c, i)
    assert_close(comp.attribution[:, 0, 0, 0], torch.stack(list(ref.values())), atol=1e-4)


@pytest.mark.slow
def test_stories_heads_agree_with_transformer_lens(stories):
    tokens = stories.to_tokens(PROMPT)
    _, cache = stories.run_with_cache(tokens)
    ours = tl.direct_logit_attribution(stories, tokens, "▁p", "▁s", unit="head", cache=cache)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    theirs = cache.logit_attrs(stack, "▁p", "▁s", pos_slice=-1)[:, 0]
    assert_close(ours.grid()[..., 0, 0, 0].reshape(-1), theirs, atol=1e-4)
    ld = tl.logit_diff(stories, tokens, "▁p", "▁s", norm="cached", cache=cache)
    assert_close(ld.values[-1, 0, 0, 0], ours.total[0, 0, 0], atol=1e-4)
    lens = tl.component_lens(stories, tokens, top_k=5, cache=cache)
    assert lens.promoted_ids.shape == (len(lens.labels), 1, 1, 5)


def test_every_result_plots(ln_model):
    import plotly.graph_objects as go

    results = [tl.direct_logit_attribution(ln_model, SENTENCES[:2], C, WRONG, unit=u) for u in
               ("component", "head", "head_source", "neuron")]
    results += [tl.component_lens(ln_model, SENTENCES[:2], top_k=3), tl.logit_diff(ln_model, SENTENCES[:2], C, WRONG)]
    for result in results:
        assert isinstance(result.plot(), go.Figure)
