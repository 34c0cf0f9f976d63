"""Shared test helpers: one ``assert_close``, tiny random models, and the path to ``../shared``."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"

SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her dog.",
    "The cat sat on the mat and looked at the big red ball.",
    "Tom and Anna went to the shop to buy some bread and milk.",
    "The sun was warm and the birds sang in the tall green trees.",
]


def assert_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5, msg: str = "") -> None:
    """``torch.testing.assert_close`` on anything tensor-like, with the tolerance stated at the call."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected).to(actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=msg or None)


def require_shared(path: Path) -> Path:
    """The path in ``../shared``; fails under CI when it is missing, skips with a reason otherwise."""
    if path.exists():
        return path
    reason = f"{path} is missing: tests on real weights need the project's ../shared folder"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained in memory on ``SENTENCES`` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    # TransformerLens reloads tokenizers by path, so the tokenizer must live in a folder
    folder = tempfile.mkdtemp(prefix="tl_logitlens_tok_")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(
    normalization: str = "LN",
    folded: bool = False,
    *,
    seed: int = 0,
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    act_fn: str = "gelu",
    gated_mlp: bool = False,
    positional_embedding_type: str = "standard",
    n_key_value_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """A random model with every weight and bias non-trivial (norm gains and biases included).

    ``folded=True`` folds the norms into the following weights the way ``from_pretrained`` does,
    which leaves the logits unchanged and turns ``LN``/``RMS`` into ``LNPre``/``RMSPre``.
    """
    tokenizer = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=len(tokenizer),
        n_ctx=64,
        act_fn=act_fn,
        normalization_type=normalization,
        gated_mlp=gated_mlp,
        positional_embedding_type=positional_embedding_type,
        n_key_value_heads=n_key_value_heads,
        seed=seed,
        device="cpu",
        dtype=dtype,
        default_prepend_bos=True,
    )
    model = HookedTransformer(cfg, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") and ("ln" in name):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".b") or name.startswith("b_") or ".b_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5 * 1.5)
    if folded:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model.eval()


NORM_VARIANTS = [("LN", False), ("LN", True), ("RMS", False), ("RMS", True)]
NORM_IDS = ["LN-unfolded", "LN-folded", "RMS-unfolded", "RMS-folded"]
