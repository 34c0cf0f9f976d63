"""Tiny random BERT and RoBERTa masked LMs with in-memory tokenizers (offline, deterministic)."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from tests.helpers import SENTENCES

CORPUS = SENTENCES + [
    "The capital of France is Paris and the dog likes the park.",
    "A little boy played with his red ball in the garden.",
]


@lru_cache(maxsize=1)
def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) trained on the test sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        CORPUS * 4, trainers.WordPieceTrainer(vocab_size=220, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    folder = tempfile.mkdtemp(prefix="tl_logitlens_wp_")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@lru_cache(maxsize=1)
def roberta_tokenizer():
    """A RoBERTa-style byte-level BPE tokenizer (<s> text </s>, pad id 1) trained on the test sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
    )
    folder = tempfile.mkdtemp(prefix="tl_logitlens_rb_")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: LayerNorm gains near 1, biases of size 0.2, matrices of unit gain."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or "layer_norm.weight" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * 1.5)


def hf_bert(seed: int = 0, n_layers: int = 3, d_model: int = 32, n_heads: int = 4):
    from transformers import BertConfig, BertForMaskedLM

    tok = wordpiece_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        intermediate_size=2 * d_model, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(cfg)
    _randomise(model, seed)
    return model.eval(), tok


def hf_roberta(seed: int = 0, n_layers: int = 3, d_model: int = 32, n_heads: int = 4):
    from transformers import RobertaConfig, RobertaForMaskedLM

    tok = roberta_tokenizer()
    cfg = RobertaConfig(
        vocab_size=len(tok), hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        intermediate_size=2 * d_model, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = RobertaForMaskedLM(cfg)
    _randomise(model, seed)
    return model.eval(), tok


@lru_cache(maxsize=2)
def tiny_encoder(kind: str = "bert"):
    """A converted tiny random encoder (cached: treat as read-only)."""
    from tl_logitlens.core.encoders import bert_to_hooked_encoder, roberta_to_hooked_encoder

    if kind == "bert":
        hf, tok = hf_bert()
        return bert_to_hooked_encoder(hf, tok)
    hf, tok = hf_roberta()
    return roberta_to_hooked_encoder(hf, tok)


def save_folder(hf_model, tokenizer) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tl_logitlens_mlm_"))
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
