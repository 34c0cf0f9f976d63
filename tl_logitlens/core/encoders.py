"""Masked language models (BERT, RoBERTa) as TransformerLens ``HookedEncoder`` models, built offline.

TransformerLens 3.9 ships ``HookedEncoder`` (BERT) but loads it only by hub name, from
``BertForPreTraining``; it has no RoBERTa. This module converts a Hugging Face ``BertForMaskedLM``
or ``RobertaForMaskedLM`` (an object, a local folder, or a hub name) into a ``HookedEncoder``
whose logits equal the Hugging Face model's (checked to 1e-4 in ``tests/test_encoders.py``).

Architecture, as ``HookedEncoder`` computes it::

    x_0     = LN_embed(W_E[tok] + W_pos[pos] + W_type[type])      blocks.0.hook_resid_pre
    mid_l   = LN1_l(x_l + Attn_l(x_l))                             (post-LN block)
    x_{l+1} = LN2_l(mid_l + MLP_l(mid_l))                          blocks.l.hook_normalized_resid_post
    logits  = LN_head(act(x_L @ W_head + b_head)) @ W_U + b_U      mlm_head, then unembed

BERT is *post-LN*: each block ends with a LayerNorm, so every state ``x_l`` that flows between
blocks is already normalised, and there is no final LayerNorm (no ``ln_final``). Note that a
``BertBlock``'s ``hook_resid_post`` is taken *before* its closing LayerNorm; the block's output is
``hook_normalized_resid_post`` (equal to the next block's ``hook_resid_pre``).

RoBERTa differs from BERT in three places, all absorbed by the conversion:

- positions start at ``padding_idx + 1`` (position ids ``padding_idx + 1 + i``), so ``W_pos`` is the
  Hugging Face table from row ``padding_idx + 1`` on, and the context is ``padding_idx + 1`` shorter;
- it has no token types (a one-row type table, always row 0): that row is added into ``W_pos`` and
  the encoder's type table is zero, so any token-type ids give the same output;
- its LM head is ``dense → gelu → LayerNorm → decoder + bias``, the same computation as BERT's MLM
  head, so it maps onto ``HookedEncoder.mlm_head`` and ``unembed``.

RoBERTa's padded positions get the padding row of the position table in Hugging Face and a shifted
row here; padding is masked out of attention, so the real tokens' outputs are the same.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import einops
import torch

from tl_logitlens.core import compat as _compat

# Hugging Face activation names -> TransformerLens activation names (same function).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_fast": "gelu_fast",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_ENCODER_NAME_RE = re.compile(r"^(bert-|roberta-|distilroberta-|xlm-roberta-)", re.IGNORECASE)


def _encoder_class() -> type:
    if _compat.HookedEncoder is None:
        raise ImportError(
            f"this TransformerLens ({_compat.TL_VERSION}) has no HookedEncoder; masked language models "
            "need TransformerLens 3.x (pip install 'transformer_lens>=3.9,<4')"
        )
    return _compat.HookedEncoder


def is_encoder_name(name: str) -> bool:
    """True for hub names of BERT/RoBERTa masked LMs (``bert-base-cased``, ``FacebookAI/roberta-base``)."""
    return bool(_ENCODER_NAME_RE.match(name.rsplit("/", 1)[-1]))


def _config(hf_config: Any, *, n_ctx: int, device: Any, dtype: torch.dtype, name: str, arch: str) -> Any:
    from transformer_lens import HookedTransformerConfig

    act = getattr(hf_config, "hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"hidden_act={act!r} has no TransformerLens equivalent; supported: {sorted(_ACTIVATIONS)}"
        )
    pos_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pos_type != "absolute":
        raise ValueError(
            f"position_embedding_type={pos_type!r} is not supported; HookedEncoder has absolute positions only"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // hf_config.num_attention_heads,
        n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=n_ctx,
        eps=hf_config.layer_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=_ACTIVATIONS[act],
        attention_dir="bidirectional",
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture=arch,
        model_name=name,
        device=str(device),
        dtype=dtype,
    )


def _layer_weights(layers: Any, n_heads: int) -> dict[str, torch.Tensor]:
    """Encoder blocks: Hugging Face BERT and RoBERTa layers have the same structure."""
    sd: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        att = layer.attention
        for tl_name, lin in (("Q", att.self.query), ("K", att.self.key), ("V", att.self.value)):
            sd[f"blocks.{i}.attn.W_{tl_name}"] = einops.rearrange(
                lin.weight, "(head d_head) d_model -> head d_model d_head", head=n_heads
            )
            sd[f"blocks.{i}.attn.b_{tl_name}"] = einops.rearrange(
                lin.bias, "(head d_head) -> head d_head", head=n_heads
            )
        sd[f"blocks.{i}.attn.W_O"] = einops.rearrange(
            att.output.dense.weight, "d_model (head d_head) -> head d_head d_model", head=n_heads
        )
        sd[f"blocks.{i}.attn.b_O"] = att.output.dense.bias
        sd[f"blocks.{i}.ln1.w"] = att.output.LayerNorm.weight
        sd[f"blocks.{i}.ln1.b"] = att.output.LayerNorm.bias
        sd[f"blocks.{i}.mlp.W_in"] = layer.intermediate.dense.weight.T
        sd[f"blocks.{i}.mlp.b_in"] = layer.intermediate.dense.bias
        sd[f"blocks.{i}.mlp.W_out"] = layer.output.dense.weight.T
        sd[f"blocks.{i}.mlp.b_out"] = layer.output.dense.bias
        sd[f"blocks.{i}.ln2.w"] = layer.output.LayerNorm.weight
        sd[f"blocks.{i}.ln2.b"] = layer.output.LayerNorm.bias
    return sd


def _build(cfg: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any) -> Any:
    cls = _encoder_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedEncoder warns that 4.x drops it
        model = cls(cfg, tokenizer, move_to_device=False)
    own = model.state_dict()
    missing = [k for k in state_dict if k not in own]
    if missing:  # a bug in the conversion, not user input
        raise RuntimeError(f"conversion produced unknown parameters {missing}")
    full = {k: torch.zeros_like(v) for k, v in own.items()}  # pooler and NSP head: unused, zero
    full.update({k: v.detach().to(cfg.dtype).clone() for k, v in state_dict.items()})
    model.load_state_dict(full, strict=True)
    model.to(cfg.device, print_details=False)
    return model.eval()


def bert_to_hooked_encoder(hf_model: Any, tokenizer: Any = None, *, device: Any = None) -> Any:
    """A ``HookedEncoder`` with the weights of a Hugging Face ``BertForMaskedLM`` (same logits)."""
    if not (hasattr(hf_model, "bert") and hasattr(hf_model, "cls")):
        raise TypeError(f"expected a transformers BertForMaskedLM, not {type(hf_model).__name__}")
    hf_cfg = hf_model.config
    act = getattr(hf_cfg, "hidden_act", "gelu")
    if act != "gelu":  # HookedEncoder's MLM head applies exact GELU; BERT's head uses hidden_act
        raise ValueError(
            f"this BERT uses hidden_act={act!r} in its MLM head, but HookedEncoder's head is fixed to "
            "GELU; only hidden_act='gelu' converts exactly"
        )
    dtype = next(hf_model.parameters()).dtype
    cfg = _config(
        hf_cfg,
        n_ctx=hf_cfg.max_position_embeddings,
        device=device,
        dtype=dtype,
        name=getattr(hf_cfg, "_name_or_path", "") or "bert",
        arch="BertForMaskedLM",
    )
    emb = hf_model.bert.embeddings
    types = emb.token_type_embeddings.weight
    if types.shape[0] == 1:  # one type only: pad the table so ids 0 and 1 both exist
        types = torch.cat([types, types], 0)
    if types.shape[0] != 2:
        raise ValueError(f"HookedEncoder takes 2 token types; this BERT has {types.shape[0]}")
    head = hf_model.cls.predictions
    sd = {
        "embed.embed.W_E": emb.word_embeddings.weight,
        "embed.pos_embed.W_pos": emb.position_embeddings.weight,
        "embed.token_type_embed.W_token_type": types,
        "embed.ln.w": emb.LayerNorm.weight,
        "embed.ln.b": emb.LayerNorm.bias,
        "mlm_head.W": head.transform.dense.weight.T,
        "mlm_head.b": head.transform.dense.bias,
        "mlm_head.ln.w": head.transform.LayerNorm.weight,
        "mlm_head.ln.b": head.transform.LayerNorm.bias,
        "unembed.W_U": head.decoder.weight.T,
        "unembed.b_U": head.decoder.bias,
        **_layer_weights(hf_model.bert.encoder.layer, cfg.n_heads),
    }
    return _build(cfg, sd, tokenizer)


def roberta_to_hooked_encoder(hf_model: Any, tokenizer: Any = None, *, device: Any = None) -> Any:
    """A ``HookedEncoder`` with the weights of a Hugging Face ``RobertaForMaskedLM`` (same logits).

    Position ``i`` of the input reads row ``padding_idx + 1 + i`` of RoBERTa's position table; the
    single token-type row is added into the positions; the LM head maps onto ``mlm_head`` and
    ``unembed``. Pass token ids without token types (any token-type ids give the same output).
    """
    if not (hasattr(hf_model, "roberta") and hasattr(hf_model, "lm_head")):
        raise TypeError(f"expected a transformers RobertaForMaskedLM, not {type(hf_model).__name__}")
    hf_cfg = hf_model.config
    emb = hf_model.roberta.embeddings
    offset = int(emb.padding_idx) + 1
    pos_table = emb.position_embeddings.weight
    n_ctx = pos_table.shape[0] - offset
    if n_ctx < 1:
        raise ValueError(f"max_position_embeddings={pos_table.shape[0]} leaves no positions after the offset {offset}")
    types = emb.token_type_embeddings.weight
    if types.shape[0] != 1:
        raise ValueError(
            f"this RoBERTa has {types.shape[0]} token types; the converter supports RoBERTa's single type"
        )
    dtype = next(hf_model.parameters()).dtype
    cfg = _config(
        hf_cfg,
        n_ctx=n_ctx,
        device=device,
        dtype=dtype,
        name=getattr(hf_cfg, "_name_or_path", "") or "roberta",
        arch="RobertaForMaskedLM",
    )
    head = hf_model.lm_head
    sd = {
        "embed.embed.W_E": emb.word_embeddings.weight,
        "embed.pos_embed.W_pos": pos_table[offset:] + types[0],
        "embed.token_type_embed.W_token_type": torch.zeros(2, cfg.d_model, dtype=dtype),
        "embed.ln.w": emb.LayerNorm.weight,
        "embed.ln.b": emb.LayerNorm.bias,
        "mlm_head.W": head.dense.weight.T,
        "mlm_head.b": head.dense.bias,
        "mlm_head.ln.w": head.layer_norm.weight,
        "mlm_head.ln.b": head.layer_norm.bias,
        "unembed.W_U": head.decoder.weight.T,
        "unembed.b_U": head.decoder.bias,
        **_layer_weights(hf_model.roberta.encoder.layer, cfg.n_heads),
    }
    model = _build(cfg, sd, tokenizer)
    model.to_tokens = _to_tokens_without_types.__get__(model)  # RoBERTa tokenizers give no type ids
    return model


def _to_tokens_without_types(
    self: Any, input: str | list[str], move_to_device: bool = True, truncate: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``HookedEncoder.to_tokens`` for tokenizers that return no ``token_type_ids`` (all zeros)."""
    enc = self.tokenizer(
        input, return_tensors="pt", padding=True, truncation=truncate, max_length=self.cfg.n_ctx if truncate else None
    )
    tokens, mask = enc["input_ids"], enc["attention_mask"]
    types = torch.zeros_like(tokens)
    if move_to_device:
        tokens, types, mask = (t.to(self.cfg.device) for t in (tokens, types, mask))
    return tokens, types, mask


def load_encoder(
    name_or_path: str | os.PathLike,
    *,
    device: Any = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Any:
    """A ``HookedEncoder`` in eval mode from a local ``*ForMaskedLM`` folder or a BERT/RoBERTa hub name.

    On TransformerLens 4.x (no ``HookedEncoder``) the same call returns a ``TransformerBridge`` in
    compatibility mode with no weight processing, whose logits equal the Hugging Face model's.

    The Hugging Face model is loaded with ``AutoModelForMaskedLM`` (a hub name downloads; a folder
    does not) and converted by :func:`bert_to_hooked_encoder` or :func:`roberta_to_hooked_encoder`.
    Encoders take no weight processing: ``fold_ln``, ``center_writing_weights`` and friends are
    errors here, since a post-LN block's closing LayerNorm cannot be folded.
    """
    if kwargs:
        raise ValueError(
            f"masked language models take no loading options, got {sorted(kwargs)}; HookedEncoder has no "
            "weight processing (BERT's post-LN LayerNorms cannot be folded)"
        )
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    dtype = dtype or torch.float32
    source = os.fspath(name_or_path)
    if _compat.HookedEncoder is None:  # 4.x: a compatibility-mode bridge over the Hugging Face model
        model = _load_bridge(source, device=device, dtype=dtype, tokenizer=AutoTokenizer.from_pretrained(source))
    else:
        hf_model = AutoModelForMaskedLM.from_pretrained(source, dtype=dtype).eval()
        model = _convert(hf_model, AutoTokenizer.from_pretrained(source), device=device, source=source)
    model.cfg.model_name = Path(source).name if Path(source).exists() else source
    return model


def encoder_from_hf(hf_model: Any, tokenizer: Any, *, device: Any = None, source: str = "", **kwargs: Any) -> Any:
    """A masked LM from a Hugging Face ``BertForMaskedLM``/``RobertaForMaskedLM`` object and its tokenizer:
    a converted ``HookedEncoder`` on 3.x, a bridge wrapping ``hf_model`` on 4.x (so pass a copy if the
    object must stay as it is). ``source``: a folder holding its ``config.json`` (the 4.x bridge reads
    the architecture there, offline)."""
    if kwargs:
        raise ValueError(
            f"masked language models take no loading options, got {sorted(kwargs)}; their post-LN "
            "LayerNorms cannot be folded"
        )
    if _compat.HookedEncoder is None:
        dtype = next(hf_model.parameters()).dtype
        return _load_bridge(source, device=device, dtype=dtype, tokenizer=tokenizer, hf_model=hf_model)
    return _convert(hf_model, tokenizer, device=device, source=source or type(hf_model).__name__)


_MASKED_TYPES = ("bert", "roberta", "xlm-roberta")


def _convert(hf_model: Any, tokenizer: Any, *, device: Any, source: str) -> Any:
    model_type = hf_model.config.model_type
    if model_type == "bert":
        return bert_to_hooked_encoder(hf_model, tokenizer, device=device)
    if model_type in ("roberta", "xlm-roberta"):
        return roberta_to_hooked_encoder(hf_model, tokenizer, device=device)
    raise ValueError(
        f"{source!r} is a {type(hf_model).__name__} (model_type {model_type!r}); tl_logitlens converts "
        "BERT and RoBERTa masked LMs only"
    )


def _load_bridge(source: str, *, device: Any, dtype: torch.dtype, tokenizer: Any, hf_model: Any = None) -> Any:
    """TransformerLens 4.x: the bridge over a BERT or RoBERTa masked LM, with the checkpoint's own
    tokenizer (the bridge's replacement drops BERT's [CLS]/[SEP] and RoBERTa's </s>)."""
    if hf_model is None:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(source).model_type
    else:
        model_type = hf_model.config.model_type
    if model_type not in _MASKED_TYPES:
        raise ValueError(
            f"{source!r} has model_type {model_type!r}; tl_logitlens loads BERT and RoBERTa masked LMs only"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _compat.load_masked_lm_bridge(source, device=device, dtype=dtype, tokenizer=tokenizer, hf_model=hf_model)
    if not _compat.is_masked_lm_bridge(model):  # a bug in the bridge's adapter, not user input
        raise RuntimeError(f"TransformerLens loaded {source!r} without its masked-LM head")
    return model
