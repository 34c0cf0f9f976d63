"""load_model: local checkpoint folders load offline and give the Hugging Face model's logits."""

from __future__ import annotations

import shutil

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import GPT2_TOKENIZER, SENTENCES, STORIES, assert_close, require_shared
from tl_logitlens.core import compat as _compat


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


def _final_logprobs_match(model, hf, text: str = SENTENCES[0]) -> None:
    """The lens's final_post (top-k and next-token log-probs) equals the Hugging Face model's log-probs."""
    tokens = model.to_tokens(text)
    lens = tl.logit_lens(model, tokens, sites="resid_post", top_k=10)
    final = lens.labels.index("final_post")
    with torch.no_grad():
        ref = hf(tokens).logits.log_softmax(-1)[0]
    assert_close(lens.top_logprobs[final, 0], ref.topk(10).values, atol=1e-4, rtol=0)
    nxt = ref[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    assert_close(lens.next_logprobs[final, 0, :-1], nxt, atol=1e-4, rtol=0)


def test_bad_devices_are_clear_errors_before_loading(gpt2_folder):
    # 'gpt2' would need the hub: the device is refused before anything is read
    with pytest.raises(ValueError, match="'foo' is not a torch device; use 'cpu'"):
        tl.load_model("gpt2", device="foo")
    with pytest.raises(ValueError, match="not a torch device"):
        tl.load_model(gpt2_folder, device="cuda:x")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:999' does not exist"):
            tl.load_model(gpt2_folder, device="cuda:999")
    else:
        with pytest.raises(ValueError, match=r"'cuda' was asked for, but torch .* no usable cuda.*device='cpu'"):
            tl.load_model("gpt2", device="cuda")
        with pytest.raises(ValueError, match="no usable cuda"):
            tl.load_model(gpt2_folder, device=torch.device("cuda", 0))
    with pytest.raises(TypeError, match="device"):  # under pytest the run-time type check answers first
        tl.load_model(gpt2_folder, device=0.5)
    assert tl.load_model(gpt2_folder, device="cpu").cfg.device in ("cpu", torch.device("cpu"))


def test_gpt2_with_n_inner_not_four_times_n_embd(tmp_path):
    """TransformerLens 3.9 assumes d_mlp = 4 * n_embd; the checkpoint's n_inner is read instead."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=96, n_positions=64)).eval()
    hf.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(require_shared(GPT2_TOKENIZER)).save_pretrained(tmp_path)
    model = tl.load_model(tmp_path)
    assert model.cfg.d_mlp == 96
    _final_logprobs_match(model, hf)


def _lm_head_input(hf, tokens):
    """The checkpoint's final residual stream (the input of ln_f) and its raw logits."""
    seen = {}

    def keep_input(module, args, output):  # returns None: the output is left alone
        seen["resid"] = args[0]

    handle = hf.transformer.ln_f.register_forward_hook(keep_input)
    with torch.no_grad():
        logits = hf(tokens).logits
    handle.remove()
    return seen["resid"], logits


def test_weight_processing_and_the_uncentred_view(gpt2_folder, tmp_path):
    """Default processing: a single-logit attribution total is the raw logit minus the mean logit, and
    norm='none' is not the raw lm_head; without centring (and folding) both are the checkpoint's own."""
    hf = _hf_model(gpt2_folder)
    with torch.no_grad():  # one direction shared by every token's unembedding: a real mean logit, as trained
        hf.lm_head.weight.add_(torch.randn(hf.config.n_embd, generator=torch.Generator().manual_seed(4)))
    hf.save_pretrained(tmp_path)
    for file in gpt2_folder.iterdir():
        if file.name.startswith(("vocab", "merges", "tokenizer", "special")):
            shutil.copy(file, tmp_path / file.name)
    gpt2_folder = tmp_path
    text, target = SENTENCES[0], " park"
    centred = tl.load_model(gpt2_folder)
    tokens = centred.to_tokens(text)
    resid, raw = _lm_head_input(hf, tokens)
    target_id = centred.to_single_token(target)
    raw_last = raw[0, -1]
    total = tl.direct_logit_attribution(centred, tokens, target).total[0, -1, 0]
    assert_close(total, raw_last[target_id] - raw_last.mean(), atol=1e-4, rtol=0)
    assert abs(float(raw_last.mean())) > 0.1  # the difference is real on this checkpoint

    uncentred = tl.load_model(gpt2_folder, center_unembed=False, center_writing_weights=False)
    total = tl.direct_logit_attribution(uncentred, tokens, target).total[0, -1, 0]
    assert_close(total, raw_last[target_id], atol=1e-4, rtol=0)
    with torch.no_grad():
        assert_close(uncentred(tokens), raw, atol=1e-4, rtol=1e-4)

    raw_head = hf.lm_head(resid).log_softmax(-1)[0].detach()  # the raw lm_head on the raw stream
    def none_view(model):
        lens = tl.logit_lens(model, tokens, sites="resid_post", norm="none", top_k=5)
        return lens.top_logprobs[lens.labels.index("final_post"), 0]

    unprocessed = tl.load_model(gpt2_folder, fold_ln=False, center_unembed=False, center_writing_weights=False)
    assert_close(none_view(unprocessed), raw_head.topk(5).values, atol=1e-4, rtol=0)
    assert (none_view(centred) - raw_head.topk(5).values).abs().max() > 1e-2


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_hugging_face_causal_model_objects(gpt2_folder):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    hf = _hf_model(gpt2_folder)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = tl.load_model(hf)  # its tokenizer comes from hf.name_or_path (the folder)
    assert not model.training and model.cfg.d_model == 64
    _final_logprobs_match(model, hf)
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items()), "load_model modified the object"
    # built from a config: no name to find a tokenizer by, so tokenizer= is needed
    torch.manual_seed(2)
    fresh = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64)).eval()
    with pytest.raises(ValueError, match="no tokenizer for this GPT2LMHeadModel.*tokenizer="):
        tl.load_model(fresh)
    for tok in (AutoTokenizer.from_pretrained(require_shared(GPT2_TOKENIZER)), require_shared(GPT2_TOKENIZER)):
        _final_logprobs_match(tl.load_model(fresh, tokenizer=tok), fresh)
    with pytest.raises(TypeError, match="tokenizer= takes a transformers tokenizer"):
        tl.load_model(fresh, tokenizer=42)
    with pytest.raises(ValueError, match="no tokenizer found at"):
        tl.load_model(fresh, tokenizer=gpt2_folder / "missing")
    with pytest.raises(ValueError, match="with their head .* not a GPT2Model"):
        tl.load_model(hf.transformer)
    with pytest.raises(ValueError, match="tokenizer= goes with a Hugging Face model object"):
        tl.load_model(gpt2_folder, tokenizer=require_shared(GPT2_TOKENIZER))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_hugging_face_masked_lm_objects(kind):
    from tests.encoder_helpers import hf_bert, hf_roberta

    hf, tok = hf_bert() if kind == "bert" else hf_roberta()
    with pytest.raises(ValueError, match="no tokenizer for this"):
        tl.load_model(hf)  # built from a config, no name or folder
    model = tl.load_model(hf, tokenizer=tok)
    assert _compat.is_encoder(model)
    res = tl.masked_lens(model, "The cat sat on the mat.", mask_positions=2, keep_logprobs=True)
    with torch.no_grad():
        ref = hf(input_ids=res.tokens).logits.log_softmax(-1)[0, 2]
    assert_close(res.full_logprobs[res.labels.index("final_post"), 0, 0], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="take no loading options"):
        tl.load_model(hf, tokenizer=tok, fold_ln=True)


def test_architecture_hooked_transformer_lacks_loads_through_the_bridge(tmp_path):
    """Granite (logit scaling): HookedTransformer 3.9 has no converter; the bridge (3.9 and 4.x) loads it."""
    import shutil as sh

    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(3)
    hf = GraniteForCausalLM(GraniteConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=512, max_position_embeddings=128, logits_scaling=4.0, residual_multiplier=0.5,
        embedding_multiplier=2.0, attention_multiplier=0.2,
    )).eval()
    hf.save_pretrained(tmp_path)
    for file in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        sh.copy(require_shared(STORIES) / file, tmp_path / file)
    model = tl.load_model(tmp_path)
    assert _compat.is_bridge(model)
    _final_logprobs_match(model, hf)


def test_loading_the_demo_models_prints_nothing():
    """No "Loading weights 100%" bar (transformers') on every ``load_model("demo")`` in a Python session:
    a local checkpoint downloads nothing. The bars' setting is left as the caller had it."""
    import subprocess
    import sys

    code = (
        "from transformers.utils import logging\n"
        "import tl_logitlens as tl\n"
        "tl.load_model('demo'); tl.load_model('demo-bert')\n"
        "assert logging.is_progress_bar_enabled()\n"
        "logging.disable_progress_bar(); tl.load_model('demo')\n"
        "assert not logging.is_progress_bar_enabled()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (res.stdout, res.stderr) == ("", "")
