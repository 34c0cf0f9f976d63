"""Guarded access to the parts of TransformerLens that differ between 3.x and 4.x.

TransformerLens 4.x removed ``HookedTransformer`` (and ``HookedEncoder``); 3.9 ships both and the
``TransformerBridge``. Nothing in this package imports those classes unguarded: this module is the one
place that knows which of them exist.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
import transformer_lens

TL_VERSION: str = metadata.version("transformer_lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

try:  # 3.x
    from transformer_lens import HookedTransformer
except ImportError:  # 4.x: bridge only
    HookedTransformer = None  # type: ignore[assignment,misc]

try:
    from transformer_lens import HookedEncoder
except ImportError:
    HookedEncoder = None  # type: ignore[assignment,misc]

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # very old TransformerLens
    TransformerBridge = None  # type: ignore[assignment,misc]

ActivationCache = transformer_lens.ActivationCache


def is_hooked_transformer(model: object) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


def is_encoder(model: object) -> bool:
    """A masked language model: a 3.x ``HookedEncoder``, or a 4.x bridge over a ``*ForMaskedLM``."""
    return (HookedEncoder is not None and isinstance(model, HookedEncoder)) or is_masked_lm_bridge(model)


def is_masked_lm_bridge(model: object) -> bool:
    """A ``TransformerBridge`` over a Hugging Face ``*ForMaskedLM`` (BERT, RoBERTa) with its MLM head."""
    return (
        is_bridge(model)
        and str(architecture(model) or "").endswith("ForMaskedLM")
        and hasattr(model, "mlm_head")
    )


def load_masked_lm_bridge(
    source: str, *, device: Any, dtype: torch.dtype, tokenizer: Any, hf_model: Any = None
) -> Any:
    """A compatibility-mode bridge in eval mode over a local ``*ForMaskedLM`` folder, a hub name, or
    (``hf_model=``) a loaded Hugging Face model, which the bridge then wraps (4.x).

    No weight processing (``no_processing=True``): BERT is post-LN, its LayerNorms cannot be folded,
    and the bridge's logits then equal the Hugging Face model's. ``tokenizer`` (a fresh, unshared one)
    replaces the one the bridge sets up, which drops BERT's [CLS]/[SEP] and RoBERTa's </s>.
    """
    if TransformerBridge is None:
        raise ImportError(f"this TransformerLens ({TL_VERSION}) has no TransformerBridge")
    extra = {} if hf_model is None else {"hf_model": hf_model}
    bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **extra)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    _set_tokenizer_as_is(bridge, tokenizer)
    return bridge.eval()


def _set_tokenizer_as_is(bridge: Any, tokenizer: Any) -> None:
    """Give a bridge this tokenizer unchanged, with the BOS/EOS flags its setter would record.

    The bridge's ``tokenizer`` setter re-runs TransformerLens's tokenizer setup, which reloads a
    tokenizer that has a BOS token with ``add_bos_token=True``: RoBERTa's then encodes ``<s> text``
    without the closing ``</s>`` that the model was trained with. So the attribute behind the
    property is set directly.
    """
    from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos

    if not hasattr(bridge, "_tokenizer"):  # a TransformerLens this code does not know
        raise RuntimeError(f"TransformerLens {TL_VERSION}'s bridge keeps its tokenizer elsewhere")
    bridge._tokenizer = tokenizer
    bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = detect_tokenizer_bos_eos(tokenizer)
    if bridge.tokenizer is not tokenizer:  # a bug in this TransformerLens, not user input
        raise RuntimeError("the bridge did not take the checkpoint's own tokenizer")


def masked_lm_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A masked-LM bridge's whole MLM head as the Hugging Face model runs it (dense, activation,
    LayerNorm, decoder): ``cls.predictions`` for BERT, ``lm_head`` for RoBERTa."""
    hf = model.original_model
    head = getattr(getattr(hf, "cls", None), "predictions", None) or getattr(hf, "lm_head", None)
    if head is None:
        raise TypeError(f"{type(hf).__name__} has no masked-LM head (cls.predictions or lm_head)")
    return head


def encoder_embeddings(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The embedding output (after the embedding LayerNorm) of an encoder, ``blocks.0.hook_resid_pre``."""
    if is_bridge(model):
        return model.original_model.base_model.embeddings(input_ids=tokens)
    return model.embed(tokens)


def is_bridge(model: object) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def is_compatibility_bridge(model: object) -> bool:
    """A ``TransformerBridge`` in compatibility mode (HookedTransformer hook names and numerics)."""
    return is_bridge(model) and bool(getattr(model, "compatibility_mode", False))


def normalization_type(model: Any) -> str | None:
    """The model's normalisation as ``HookedTransformer`` names it.

    ``HookedTransformer`` renames a folded ``LN``/``RMS`` to ``LNPre``/``RMSPre``; a bridge keeps
    ``cfg.normalization_type`` after ``enable_compatibility_mode()`` folds it and leaves unit gains
    (and zero biases) in ``ln_final``. Both read the same here: ``...Pre`` when the final norm carries
    no gain or bias.
    """
    kind = model.cfg.normalization_type
    if kind not in ("LN", "RMS") or not is_bridge(model):
        return kind
    ln = model.ln_final
    w, b = getattr(ln, "w", None), getattr(ln, "b", None)
    with torch.no_grad():
        affine_free = (w is None or bool((w == 1).all())) and (b is None or not bool(b.any()))
    return f"{kind}Pre" if affine_free else kind


def architecture(model: Any) -> str | None:
    """The Hugging Face architecture the model was loaded from (``"GPT2LMHeadModel"``), if known."""
    cfg = model.cfg
    return getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)


def official_model_name(name: str) -> str:
    """The model name TransformerLens loads for ``name`` (aliases resolved); ValueError if unknown.

    3.x resolves through ``loading_from_pretrained`` (removed in 4.0); 4.x through
    ``supported_models``, and also accepts any hub id in the bridge's model registry.
    """
    if TL_MAJOR < 4:
        from transformer_lens import loading_from_pretrained

        return loading_from_pretrained.get_official_model_name(name)
    from transformer_lens import supported_models

    try:
        return supported_models.get_official_model_name(name)
    except ValueError:
        if name in _bridge_registry():
            return name
        raise


def _bridge_registry() -> frozenset[str]:
    """Hub ids listed in TransformerLens 4.x's model registry (empty where it is absent)."""
    try:
        from transformer_lens.tools.model_registry.registry_io import load_supported_models_raw

        return frozenset(m["model_id"] for m in load_supported_models_raw().get("models", []))
    except (ImportError, OSError, KeyError, TypeError):
        return frozenset()


def output_logits_transform(model: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A bridge's post-unembedding transform (``adapter.apply_output_logits_transform``: the soft cap
    of Gemma 2, the logit scaling of Granite and Cohere); None for a ``HookedTransformer``, whose only
    such transform is ``cfg.output_logits_soft_cap``."""
    if not is_bridge(model):
        return None
    return getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)


def output_bias(module: Any, name: str, d_model: int, like: torch.Tensor) -> torch.Tensor:
    """``module.b_O`` / ``module.b_out``, or zeros: a ``HookedTransformer`` always has these biases
    (zeros for bias-free models such as Llama), a bridge gives None where the checkpoint has none."""
    b = getattr(module, name, None)
    return torch.zeros(d_model, dtype=like.dtype, device=like.device) if b is None else b
