"""Models load by hub name through TransformerLens's own by-name path, offline, and the lens is exact.

A Hugging Face hub cache is built once per session in a temporary folder: tiny random models saved
with transformers' own classes (2 layers, d_model 64) under the real hub names, in the hub's layout
(``hub/models--ORG--NAME/snapshots/<sha>/`` with ``refs/main``). While this module runs, ``HF_HOME``
and ``HF_HUB_CACHE`` point there and the hub is offline (``HF_HUB_OFFLINE=1``,
``TRANSFORMERS_OFFLINE=1``); all of it is restored afterwards. ``tl.load_model(name)`` then runs
TransformerLens's own loading code end to end (``HookedTransformer.from_pretrained`` on 3.x,
``TransformerBridge.boot_transformers`` on 4.x), and the lens's ``final_post`` site must equal the
Hugging Face model's own log-probs (1e-4).

TransformerLens 3.9 hard-codes the shapes of some names (every Llama and Gemma name): a tiny model
cannot load under them. There the Llama family is tested as ``01-ai/Yi-6B`` (a LlamaForCausalLM whose
config 3.9 reads), ``meta-llama/Llama-3.2-1B`` must give a clear error, and Gemma 2 is tested as the
cached snapshot folder (3.9 loads it through its bridge). On 4.x those names load as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tests.encoder_helpers import hf_bert, hf_roberta, roberta_tokenizer, wordpiece_tokenizer
from tests.helpers import GPT2_TOKENIZER, STORIES, assert_close, require_shared
from tl_logitlens.core import compat as _compat

ON_3X = _compat.HookedTransformer is not None
TEXT = "Once upon a time, there was a little girl named Lily."
MASKED_TEXT = "The capital of France is Paris and the dog likes the park."
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)


@dataclass(frozen=True)
class Family:
    name: str  # the hub name it is saved and loaded under
    build: Callable[[], torch.nn.Module]
    tokenizer: str  # "gpt2", "sentencepiece" (stories260K), "wordpiece" or "roberta" (encoder_helpers)
    on_3x: bool = True  # False: 3.9 hard-codes this name's shape (tested below for its clear error)
    on_4x: bool = True


def _t():
    import transformers

    return transformers


def _gpt2():
    return _t().GPT2LMHeadModel(_t().GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128))


CAUSAL = [
    Family("gpt2", _gpt2, "gpt2"),
    Family("EleutherAI/pythia-70m", lambda: _t().GPTNeoXForCausalLM(
        _t().GPTNeoXConfig(**_SMALL, vocab_size=50304, rotary_pct=0.25, tie_word_embeddings=False)), "gpt2"),
    Family("microsoft/phi-1_5", lambda: _t().PhiForCausalLM(
        _t().PhiConfig(**_SMALL, vocab_size=50304, partial_rotary_factor=0.5)), "gpt2"),
    Family("microsoft/phi-2", lambda: _t().PhiForCausalLM(
        _t().PhiConfig(**_SMALL, vocab_size=50304, partial_rotary_factor=0.4)), "gpt2"),
    Family("Qwen/Qwen2-0.5B", lambda: _t().Qwen2ForCausalLM(
        _t().Qwen2Config(**_SMALL, num_key_value_heads=2, vocab_size=50304, tie_word_embeddings=True)), "gpt2"),
    Family("facebook/opt-125m", lambda: _t().OPTForCausalLM(_t().OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
        max_position_embeddings=128, vocab_size=50272)), "gpt2"),
    Family("EleutherAI/gpt-neo-125M", lambda: _t().GPTNeoForCausalLM(_t().GPTNeoConfig(
        hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4,
        max_position_embeddings=128, vocab_size=50257)), "gpt2"),
    Family("01-ai/Yi-6B", lambda: _t().LlamaForCausalLM(
        _t().LlamaConfig(**_SMALL, num_key_value_heads=2, vocab_size=512)), "sentencepiece"),
    Family("meta-llama/Llama-3.2-1B", lambda: _t().LlamaForCausalLM(
        _t().LlamaConfig(**_SMALL, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)),
        "sentencepiece", on_3x=False),
    Family("mistralai/Mistral-7B-v0.1", lambda: _t().MistralForCausalLM(
        _t().MistralConfig(**_SMALL, num_key_value_heads=2, vocab_size=512, sliding_window=None)), "sentencepiece"),
    Family("google/gemma-2-2b", lambda: _t().Gemma2ForCausalLM(_t().Gemma2Config(
        **_SMALL, num_key_value_heads=2, head_dim=16, vocab_size=512, query_pre_attn_scalar=16,
        final_logit_softcapping=5.0, sliding_window=4)), "sentencepiece", on_3x=False),
    # a hub id TransformerLens does not list: 4.x loads it through the bridge, 3.x refuses clearly
    Family("my-lab/tiny-gpt2-unlisted", _gpt2, "gpt2", on_3x=False),
]
MASKED = [
    Family("google-bert/bert-base-uncased", lambda: hf_bert(n_layers=2, d_model=64)[0], "wordpiece"),
    Family("FacebookAI/roberta-large", lambda: hf_roberta(n_layers=2, d_model=64)[0], "roberta"),
]
# listed by TransformerLens, but the cache holds only its config.json (no weights, no tokenizer)
CONFIG_ONLY = "gpt2-medium"


def _snapshot(hub: Path, name: str) -> Path:
    repo = hub / f"models--{name.replace('/', '--')}"
    sha = hashlib.sha1(name.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _save(hub: Path, family: Family, seed: int) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = family.build()
    with torch.no_grad():  # non-trivial norm gains and biases
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = _snapshot(hub, family.name)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "gpt2":  # the real GPT-2 config.json has n_ctx (transformers 5 drops it)
        config["n_ctx"] = config["n_positions"]
        (folder / "config.json").write_text(json.dumps(config))
    if family.tokenizer == "gpt2":
        AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(folder)
    elif family.tokenizer == "sentencepiece":
        for file in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(STORIES / file, folder / file)
    else:
        {"wordpiece": wordpiece_tokenizer, "roberta": roberta_tokenizer}[family.tokenizer]().save_pretrained(folder)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """``HF_HOME`` of an offline hub cache holding every family of this module (built once)."""
    require_shared(GPT2_TOKENIZER)
    require_shared(STORIES)
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    for seed, family in enumerate(CAUSAL + MASKED):
        _save(hub, family, seed)
    config_only = _snapshot(hub, CONFIG_ONLY)
    _t().GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, n_ctx=128,
                    architectures=["GPT2LMHeadModel"]).save_pretrained(config_only)
    return home


@pytest.fixture(scope="module", autouse=True)
def offline_hub(hub_cache):
    """The hub cache as the Hugging Face cache, offline, for this module; everything restored after.

    ``huggingface_hub`` reads these variables once, at import, into ``huggingface_hub.constants``,
    which transformers and TransformerLens consult at call time: both are set.
    """
    from huggingface_hub import constants

    hub = str(hub_cache / "hub")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in [("HF_HOME", str(hub_cache)), ("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1"),
                           ("TRANSFORMERS_OFFLINE", "1")]:
            mp.setenv(var, value)
        mp.setattr(constants, "HF_HOME", str(hub_cache))
        mp.setattr(constants, "HF_HUB_CACHE", hub)
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield hub_cache
    assert constants.HF_HUB_CACHE != hub and os.environ.get("HF_HUB_CACHE") != hub


def _hf_causal(name_or_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path).eval()


def _check_final_site(model, hf, text: str = TEXT, top_k: int = 20) -> None:
    """The lens's final_post equals the Hugging Face model's log-probs: top-k, next token, entropy."""
    tokens = model.to_tokens(text)
    lens = tl.logit_lens(model, tokens, sites="resid_post", top_k=top_k)
    final = lens.labels.index("final_post")
    with torch.no_grad():
        ref = hf(tokens.to("cpu")).logits.float().log_softmax(-1)[0]
    assert ref.std() > 0.01  # non-trivial logits
    top = ref.topk(top_k, dim=-1)
    assert_close(lens.top_logprobs[final, 0].cpu(), top.values, atol=1e-4, rtol=0)
    assert (lens.top_ids[final, 0, :, 0].cpu() == top.indices[:, 0]).all()
    nxt = ref[:-1].gather(-1, tokens[0, 1:, None].cpu())[:, 0]
    assert_close(lens.next_logprobs[final, 0, :-1].cpu(), nxt, atol=1e-4, rtol=0)
    assert_close(lens.entropy[final, 0].cpu(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=0)


def _ids(family: Family) -> str:
    return family.name


@pytest.mark.parametrize("family", [f for f in CAUSAL if (f.on_3x if ON_3X else f.on_4x)], ids=_ids)
def test_causal_family_by_name_matches_hugging_face(family):
    model = tl.load_model(family.name)
    assert not model.training
    assert _compat.is_hooked_transformer(model) == ON_3X  # TransformerLens's own by-name path
    _check_final_site(model, _hf_causal(family.name))


@pytest.mark.parametrize("family", MASKED, ids=_ids)
def test_masked_family_by_name_matches_hugging_face(family):
    from transformers import AutoModelForMaskedLM

    model = tl.load_model(family.name)
    assert _compat.is_encoder(model) and not model.training
    hf = AutoModelForMaskedLM.from_pretrained(family.name).eval()
    res = tl.masked_lens(model, MASKED_TEXT, mask_positions=3, keep_logprobs=True)
    final = res.labels.index("final_post")
    with torch.no_grad():
        ref = hf(input_ids=res.tokens.cpu()).logits.log_softmax(-1)[0, 3]
    assert res.tokens[0, 3] == model.tokenizer.mask_token_id
    assert res.tokens[0, -1] == model.tokenizer.sep_token_id  # [SEP] / </s> kept
    assert_close(res.full_logprobs[final, 0, 0].cpu(), ref, atol=1e-4, rtol=0)


def test_gemma2_soft_cap_lens_is_exact_and_attribution_refuses():
    """Gemma 2 by name on 4.x; on 3.9 (which hard-codes every Gemma 2 name's shape) as the cached
    snapshot folder, which 3.9 loads through its bridge."""
    from huggingface_hub import snapshot_download

    name = "google/gemma-2-2b"
    source = snapshot_download(name) if ON_3X else name
    model = tl.load_model(source)
    hf = _hf_causal(name)
    assert hf.config.final_logit_softcapping == 5.0
    _check_final_site(model, hf)
    with pytest.raises(ValueError, match="soft-caps its logits"):
        tl.direct_logit_attribution(model, TEXT, " girl")


@pytest.mark.skipif(not ON_3X, reason="TransformerLens 3.9 only: 4.x reads every name's config")
def test_names_whose_shape_3x_hard_codes_are_a_clear_error():
    for name in ("meta-llama/Llama-3.2-1B", "google/gemma-2-2b"):
        with pytest.raises(ValueError, match=r"shape fixed by its name \(\d+ layers.*passing its folder"):
            tl.load_model(name)


@pytest.mark.skipif(not ON_3X, reason="TransformerLens 3.9 only: 4.x loads unlisted hub ids through its bridge")
def test_unlisted_hub_id_is_a_clear_error_on_3x():
    with pytest.raises(ValueError, match="loads by name only the models it lists.*snapshot_download"):
        tl.load_model("my-lab/tiny-gpt2-unlisted")


def test_unknown_and_uncached_names():
    with pytest.raises(ValueError, match="neither a local folder nor a model TransformerLens knows"):
        tl.load_model("no-such-model-anywhere")
    # listed by TransformerLens, absent from the cache, hub offline
    with pytest.raises(ValueError, match=r"could not load 'distilgpt2'.*offline.*snapshot_download"):
        tl.load_model("distilgpt2")
    # listed, cached config but no weights
    with pytest.raises(ValueError, match=rf"could not load '{CONFIG_ONLY}'.*snapshot_download"):
        tl.load_model(CONFIG_ONLY)
    if not ON_3X:  # an unlisted hub id that is not cached
        with pytest.raises(ValueError, match=r"could not load 'my-lab/absent'.*offline"):
            tl.load_model("my-lab/absent")
