"""load_model: local checkpoint folders load offline and give the Hugging Face model's logits."""

from __future__ import annotations

import shutil

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import GPT2_TOKENIZER, SENTENCES, STORIES, assert_close, require_shared
from tl_logitlens import _compat


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A small random ``GPT2LMHeadModel`` saved as a checkpoint folder, with the real GPT-2 tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2_random")
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257))
    with torch.no_grad():  # non-trivial norm gains and biases, so folding is really exercised
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(require_shared(GPT2_TOKENIZER)).save_pretrained(folder)
    return folder


def hf_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(tokens).logits


def test_gpt2_folder_matches_hugging_face(gpt2_folder):
    model = tl.load_model(gpt2_folder)
    assert _compat.normalization_type(model) == "LNPre" and model.cfg.positional_embedding_type == "standard"
    assert not model.training
    tokens = model.to_tokens(SENTENCES[0])
    ours = model(tokens).log_softmax(-1)
    theirs = hf_logits(gpt2_folder, tokens).log_softmax(-1)
    assert_close(ours, theirs, atol=1e-4)


def test_unfolded_load_matches_too(gpt2_folder):
    model = tl.load_model(gpt2_folder, fold_ln=False, center_writing_weights=False, center_unembed=False)
    assert _compat.normalization_type(model) == "LN"
    tokens = model.to_tokens(SENTENCES[1])
    assert_close(model(tokens), hf_logits(gpt2_folder, tokens), atol=1e-4)


def test_folder_whose_path_names_another_family(gpt2_folder, tmp_path):
    """TransformerLens guesses the architecture from the path; a 'llama' folder must still load as GPT-2."""
    misleading = tmp_path / "my_llama_experiments" / "gpt2_small"
    shutil.copytree(gpt2_folder, misleading)
    model = tl.load_model(misleading)
    assert _compat.architecture(model) == "GPT2LMHeadModel"
    tokens = model.to_tokens(SENTENCES[2])
    assert_close(model(tokens).log_softmax(-1), hf_logits(gpt2_folder, tokens).log_softmax(-1), atol=1e-4)


@pytest.mark.slow
def test_stories260k_matches_hugging_face(stories):
    assert _compat.normalization_type(stories) == "RMSPre"
    assert stories.cfg.n_key_value_heads == 4 and stories.cfg.positional_embedding_type == "rotary"
    tokens = stories.to_tokens(SENTENCES[0])
    ours = stories(tokens).log_softmax(-1)
    theirs = hf_logits(require_shared(STORIES), tokens).log_softmax(-1)
    assert_close(ours, theirs, atol=1e-4)


def test_model_object_is_returned_in_eval_mode(ln_model):
    ln_model.train()
    assert tl.load_model(ln_model) is ln_model and not ln_model.training


def test_bad_names_and_folders(tmp_path):
    with pytest.raises(ValueError, match="no folder at"):
        tl.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint folder"):
        tl.load_model(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint folder"):
        tl.load_model(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="neither a local folder nor a model TransformerLens knows"):
        tl.load_model("no-such-model-anywhere")
    with pytest.raises(TypeError, match="model name, a local folder or a model object"):
        tl.load_model(42)
    with pytest.raises(ValueError, match="not a torch dtype"):
        tl.load_model("gpt2", dtype="float99")
