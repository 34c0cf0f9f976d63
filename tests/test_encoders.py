"""The BERT/RoBERTa -> HookedEncoder conversion is exact, and load_model routes masked LMs to it."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens
from tests.encoder_helpers import hf_bert, hf_roberta, save_folder
from tests.encoder_helpers import tiny_encoder as _hooked_encoder
from tests.helpers import SENTENCES, assert_close, requires_hooked_encoder
from tl_logitlens.core import compat as _compat
from tl_logitlens.core.encoders import bert_to_hooked_encoder, is_encoder_name, roberta_to_hooked_encoder

KINDS = ["bert", "roberta"]
TEXTS = ["The cat sat on the mat.", SENTENCES[0]]


def _hf(kind: str):
    return hf_bert() if kind == "bert" else hf_roberta()


@requires_hooked_encoder  # the HookedEncoder converter
@pytest.mark.parametrize("kind", KINDS)
def test_converter_logits_equal_hugging_face(kind):
    hf, tok = _hf(kind)
    model = _hooked_encoder(kind)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert bool((enc["attention_mask"] == 0).any()), "the batch must exercise padding"
    with torch.no_grad():
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        out = model(enc["input_ids"], one_zero_attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert ref.std() > 0.5  # non-trivial logits
    assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    # one unpadded prompt, no attention mask
    single = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert_close(model(single), hf(input_ids=single).logits, atol=1e-4, rtol=1e-4)


@requires_hooked_encoder  # the HookedEncoder converter
def test_roberta_positions_offset_and_no_token_types():
    hf, tok = hf_roberta()
    model = _hooked_encoder("roberta")
    emb = hf.roberta.embeddings
    offset = emb.padding_idx + 1
    assert model.cfg.n_ctx == emb.position_embeddings.weight.shape[0] - offset
    assert_close(model.W_pos, emb.position_embeddings.weight[offset:] + emb.token_type_embeddings.weight[0], atol=0)
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        zeros = model(ids, token_type_ids=torch.zeros_like(ids))
        ones = model(ids, token_type_ids=torch.ones_like(ids))
    assert_close(ones, zeros, atol=0)
    # text through the encoder's own to_tokens (RoBERTa tokenizers return no token types)
    with torch.no_grad():
        assert_close(model(TEXTS[0]), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@requires_hooked_encoder  # the HookedEncoder converter
@pytest.mark.parametrize("kind", KINDS)
def test_post_ln_hooks(kind):
    """The block output is hook_normalized_resid_post (= next hook_resid_pre); there is no ln_final."""
    model = _hooked_encoder(kind)
    assert not hasattr(model, "ln_final")
    _, cache = model.run_with_cache(torch.tensor([[2, 10, 11, 12, 3]]))
    for layer in range(model.cfg.n_layers - 1):
        assert_close(cache[f"blocks.{layer}.hook_normalized_resid_post"], cache[f"blocks.{layer + 1}.hook_resid_pre"], atol=0)
    with torch.no_grad():  # hook_resid_post is the block's sum *before* its closing LayerNorm
        normed = model.blocks[0].ln2(cache["blocks.0.hook_resid_post"])
    assert_close(cache["blocks.0.hook_normalized_resid_post"], normed, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_from_local_folder(kind):
    hf, tok = _hf(kind)
    model = tl_logitlens.load_model(save_folder(hf, tok))
    assert _compat.is_encoder(model) and not model.training
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_load_model_routes_encoder_names(monkeypatch):
    import tl_logitlens.core.encoders as encoders

    calls = []
    monkeypatch.setattr(encoders, "load_encoder", lambda name, **kw: calls.append(name) or "encoder")
    assert tl_logitlens.load_model("bert-base-cased") == "encoder"
    assert tl_logitlens.load_model("FacebookAI/roberta-base") == "encoder"
    assert calls == ["bert-base-cased", "FacebookAI/roberta-base"]
    assert is_encoder_name("roberta-large") and is_encoder_name("bert-base-uncased")
    assert not is_encoder_name("gpt2") and not is_encoder_name("distilbert-base-uncased")


@requires_hooked_encoder  # the HookedEncoder converter
def test_bad_conversions():
    hf_b, tok_b = hf_bert()
    hf_r, tok_r = hf_roberta()
    with pytest.raises(TypeError, match="expected a transformers BertForMaskedLM"):
        bert_to_hooked_encoder(hf_r, tok_r)
    with pytest.raises(TypeError, match="expected a transformers RobertaForMaskedLM"):
        roberta_to_hooked_encoder(hf_b, tok_b)


def test_load_model_takes_no_loading_options():
    with pytest.raises(ValueError, match="take no loading options"):
        tl_logitlens.load_model(save_folder(*hf_bert()), fold_ln=True)


@pytest.mark.parametrize("kind", KINDS)
def test_sites_are_hugging_face_hidden_states(kind):
    """What the lens reads: the embedding output and each block's output equal HF's hidden states."""
    from tl_logitlens.analyses.masked import encoder_sites

    hf, tok = _hf(kind)
    model = tl_logitlens.load_model(save_folder(hf, tok))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    hooks = [s.hook for s in encoder_sites(model)]
    kw = {"attention_mask" if _compat.is_bridge(model) else "one_zero_attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        _, cache = model.run_with_cache(enc["input_ids"], **kw)
    assert len(hooks) == len(ref.hidden_states) == model.cfg.n_layers + 1
    for hook, state in zip(hooks, ref.hidden_states):
        assert_close(cache[hook][real], state[real], atol=1e-4, rtol=1e-4)
