"""The masked-LM lens against a hand-written MLM head on every cached layer; sliding mask against a loop."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

import tl_logitlens
from tests.encoder_helpers import hf_bert, hf_roberta, save_folder
from tests.encoder_helpers import tiny_encoder as _hooked_encoder
from tests.helpers import assert_close, assert_rank_close, assert_same_top_ids, tiny_model
from tl_logitlens import masked_lens, sliding_mask_lens
from tl_logitlens.core import compat as _compat

KINDS = ["bert", "roberta"]
TEXT = "The cat sat on the mat and looked at the big red ball."


@lru_cache(maxsize=2)
def _hf(kind: str):
    return hf_bert() if kind == "bert" else hf_roberta()


@lru_cache(maxsize=2)
def tiny_encoder(kind: str = "bert"):
    """The tiny random encoder as this TransformerLens loads it: the converted ``HookedEncoder`` on 3.x,
    ``load_model``'s masked-LM bridge on 4.x (same weights; cached, treat as read-only)."""
    if _compat.HookedEncoder is not None:
        return _hooked_encoder(kind)
    return tl_logitlens.load_model(save_folder(*_hf(kind)))


def _hand_head(kind: str, states: torch.Tensor) -> torch.Tensor:
    """The Hugging Face MLM head written out from its weights: dense -> exact GELU -> LayerNorm ->
    decoder, as log-softmax."""
    hf, _ = _hf(kind)
    if kind == "bert":
        dense, ln, dec = hf.cls.predictions.transform.dense, hf.cls.predictions.transform.LayerNorm, hf.cls.predictions.decoder
    else:
        dense, ln, dec = hf.lm_head.dense, hf.lm_head.layer_norm, hf.lm_head.decoder
    x = F.gelu(states @ dense.weight.T + dense.bias)
    x = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, eps=hf.config.layer_norm_eps)
    return torch.log_softmax(x @ dec.weight.T + dec.bias, dim=-1)


def _reference(kind: str, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax of every layer's state, [site, batch, pos, d_vocab], from the Hugging Face model's own
    hidden states (embedding output, then every block's output) through the hand-written head."""
    hf, _ = _hf(kind)
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        return torch.stack([_hand_head(kind, s) for s in out.hidden_states])


@pytest.mark.parametrize("kind", KINDS)
def test_masked_lens_matches_hand_written_head(kind):
    model = tiny_encoder(kind)
    tok = model.tokenizer
    target = "dog" if kind == "bert" else " dog"
    res = masked_lens(model, TEXT, mask_positions=[2, 5], targets=[target, 7], top_k=4, keep_logprobs=True)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    masked = ids.clone()
    masked[[2, 5]] = tok.mask_token_id
    assert torch.equal(res.tokens[0], masked) and torch.equal(res.original_tokens[0], ids)
    ref = _reference(kind, masked[None])[:, 0, [2, 5]]  # [site, hole, vocab]
    assert res.labels == ("0_pre", "1_pre", "2_pre", "final_post")
    assert_close(res.full_logprobs[:, 0], ref, atol=1e-4)
    top_lp, top_ids = ref.topk(4, dim=-1)
    assert_same_top_ids(res.top_ids[:, 0], res.top_logprobs[:, 0], top_ids, top_lp, atol=1e-4)
    assert_close(res.top_logprobs[:, 0], top_lp, atol=1e-4)
    assert_close(res.entropy[:, 0], -(ref.exp() * ref).sum(-1), atol=1e-4)
    assert_close(res.kl_to_final[:, 0], (ref[-1].exp() * (ref[-1] - ref)).sum(-1), atol=1e-4)
    orig = ids[[2, 5]]
    assert torch.equal(res.original_ids[0], orig)
    for s in range(ref.shape[0]):
        for j in range(2):
            lp = ref[s, j]
            assert res.original_logprobs[s, 0, j] == pytest.approx(float(lp[orig[j]]), abs=1e-4)
            assert_rank_close(res.original_ranks[s, 0, j], lp, int(orig[j]), atol=1e-4)
            for t, tid in enumerate(res.target_ids.tolist()):
                assert res.target_logprobs[s, 0, j, t] == pytest.approx(float(lp[tid]), abs=1e-4)
                assert_rank_close(res.target_ranks[s, 0, j, t], lp, tid, atol=1e-4)
    # tracked tokens: the largest maximum probability over the sites
    best_top = ref.amax(0).topk(5, dim=-1)
    best = best_top.indices
    assert_same_top_ids(res.tracked_ids[0], res.tracked_logprobs[:, 0].amax(0), best, best_top.values, atol=1e-4)
    assert_close(res.tracked_logprobs[:, 0], ref.gather(-1, best[None].expand(4, -1, -1)), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_last_site_reproduces_model_logits(kind):
    model = tiny_encoder(kind)
    res = masked_lens(model, TEXT, mask_positions=3, keep_logprobs=True)
    with torch.no_grad():
        logits = model(res.tokens)
        hf_logits = _hf(kind)[0](input_ids=res.tokens).logits
    assert_close(res.full_logprobs[-1, 0, 0], torch.log_softmax(logits[0, 3], -1), atol=1e-4)
    assert_close(res.full_logprobs[-1, 0, 0], torch.log_softmax(hf_logits[0, 3], -1), atol=1e-4)


def test_mask_by_word_token_and_position_agree():
    model = tiny_encoder("bert")
    by_pos = masked_lens(model, TEXT, mask_positions=2)
    by_word = masked_lens(model, TEXT, mask_positions="cat")
    in_text = masked_lens(model, TEXT.replace("cat", "[MASK]"))
    assert int(by_word.mask_positions[0, 0]) == 2
    assert_close(by_word.top_logprobs, by_pos.top_logprobs, atol=0)
    assert_close(in_text.top_logprobs, by_pos.top_logprobs, atol=1e-5)
    assert int(in_text.original_ids[0, 0]) == -1 and torch.isnan(in_text.original_logprobs).all()
    assert by_pos.str_tokens[0][2] == "[MASK]"


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_single_prompts(kind):
    model = tiny_encoder(kind)
    mask = model.tokenizer.mask_token
    texts = [f"The {mask} sat on the mat.", f"Once upon a time, there was a {mask} girl named {mask}."]
    both = masked_lens(model, texts, top_k=3)
    assert both.valid.tolist() == [[True, False], [True, True]]
    for b, text in enumerate(texts):
        one = masked_lens(model, text, top_k=3)
        n = int(one.valid.sum())
        assert torch.equal(both.top_ids[:, b, :n], one.top_ids[:, 0])
        assert_close(both.top_logprobs[:, b, :n], one.top_logprobs[:, 0], atol=1e-4)
    assert (both.top_ids[:, 0, 1] == -1).all() and torch.isnan(both.entropy[:, 0, 1]).all()
    df = both.to_dataframe()
    assert len(df) == 4 * 3 * 3  # sites x real holes x top_k
    assert set(df["prompt"]) == {0, 1}


def test_precomputed_cache():
    model = tiny_encoder("bert")
    fresh = masked_lens(model, TEXT, mask_positions=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(fresh.tokens)
    again = masked_lens(model, TEXT, mask_positions=4, cache=cache)
    assert_close(again.top_logprobs, fresh.top_logprobs, atol=0)
    with torch.no_grad():
        _, unmasked = model.run_with_cache(fresh.original_tokens)
    with pytest.raises(ValueError, match="does not hold the masked tokens"):
        masked_lens(model, TEXT, mask_positions=4, cache=unmasked)


@pytest.mark.parametrize("kind", KINDS)
def test_sliding_mask_matches_loop_of_single_forwards(kind, monkeypatch):
    model = tiny_encoder(kind)
    calls = []
    original = type(model).run_with_cache

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "run_with_cache", counting)
    res = sliding_mask_lens(model, TEXT, top_k=2, n_track=3)
    monkeypatch.undo()
    n_words = len(model.tokenizer(TEXT)["input_ids"]) - 2
    assert len(calls) == 1 and calls[0][0] == n_words  # one batched forward over all copies
    assert res.positions.tolist() == list(range(1, n_words + 1))
    ids = torch.tensor(model.tokenizer(TEXT)["input_ids"])
    for j, p in enumerate(res.positions.tolist()):
        masked = ids.clone()
        masked[p] = model.tokenizer.mask_token_id
        ref = _reference(kind, masked[None])[:, 0, p]  # [site, vocab]
        assert_same_top_ids(res.predicted_ids[:, j], res.max_logprobs[:, j], ref.argmax(-1), ref.amax(-1), atol=1e-4)
        assert_close(res.max_logprobs[:, j], ref.amax(-1), atol=1e-4)
        assert_close(res.original_logprobs[:, j], ref[:, ids[p]], atol=1e-4)
        for s in range(ref.shape[0]):
            assert_rank_close(res.original_ranks[s, j], ref[s], int(ids[p]), atol=1e-4)
        tracked = ref.amax(0).topk(3)
        assert_same_top_ids(res.tracked_ids[j], res.tracked_logprobs[:, j].amax(0), tracked.indices, tracked.values, atol=1e-4)
    df = res.to_dataframe()
    assert len(df) == len(res.labels) * n_words
    assert list(df.columns[:5]) == ["site", "site_index", "position", "original_token", "predicted_token"]


def test_bad_input():
    model = tiny_encoder("bert")
    with pytest.raises(ValueError, match="no mask token .* and no mask_positions"):
        masked_lens(model, TEXT)
    with pytest.raises(ValueError, match="out of range for prompt 0"):
        masked_lens(model, TEXT, mask_positions=99)
    with pytest.raises(ValueError, match=r"special token '\[CLS\]'"):
        masked_lens(model, TEXT, mask_positions=0)
    with pytest.raises(ValueError, match=r"special token '\[SEP\]'"):
        masked_lens(model, TEXT, mask_positions=-1)
    with pytest.raises(ValueError, match=r"target 'parked' is 2 tokens \['park', '##ed'\], not one"):
        masked_lens(model, TEXT, mask_positions=2, targets="parked")
    with pytest.raises(ValueError, match=r"target 'xylophone' is not in the vocabulary \(it becomes '\[UNK\]'\)"):
        masked_lens(model, TEXT, mask_positions=2, targets="xylophone")
    with pytest.raises(ValueError, match="does not occur"):
        masked_lens(model, TEXT, mask_positions="dragon")
    with pytest.raises(ValueError, match="occurs 2 times"):
        masked_lens(model, TEXT, mask_positions="the")
    with pytest.raises(ValueError, match=r"the word 'parked' is 2 tokens here"):
        masked_lens(model, "The dog parked.", mask_positions="parked")
    with pytest.raises(ValueError, match="top_k=0 must be between"):
        masked_lens(model, TEXT, mask_positions=2, top_k=0)


def test_roberta_special_tokens_are_not_masked():
    roberta = tiny_encoder("roberta")
    with pytest.raises(ValueError, match="special token '<s>'"):
        masked_lens(roberta, TEXT, mask_positions=0)
    with pytest.raises(ValueError, match="special token '</s>'"):
        masked_lens(roberta, TEXT, mask_positions=-1)


def test_causal_and_masked_models_are_not_mixed():
    causal = tiny_model()
    with pytest.raises(TypeError, match="needs a masked language model .* use tl_logitlens.logit_lens"):
        masked_lens(causal, "The cat sat.", mask_positions=1)
    with pytest.raises(TypeError, match="needs a masked language model"):
        sliding_mask_lens(causal, "The cat sat.")
    with pytest.raises(TypeError, match="masked language model .* use tl_logitlens.masked_lens"):
        tl_logitlens.logit_lens(tiny_encoder("bert"), "The cat sat.")


def test_figures():
    import plotly.graph_objects as go

    model = tiny_encoder("roberta")
    res = masked_lens(model, TEXT, mask_positions=2, targets=" dog", keep_logprobs=True)
    fig = res.plot_vocab(site="1_pre")
    assert isinstance(fig, go.Figure) and any(tr.name.startswith("target '␣dog': rank ") for tr in fig.data)
    assert len(fig.data[0].y) == model.cfg.d_vocab
    prof = res.plot()
    assert any("√layer" in (tr.name or "") for tr in prof.data)
    with pytest.raises(ValueError, match="keep_logprobs=True"):
        masked_lens(model, TEXT, mask_positions=2).plot_vocab()
    slide = sliding_mask_lens(model, TEXT)
    heat = slide.plot()
    assert heat.data[0].z is not None and len(heat.data[0].x) == slide.positions.numel()
