"""Shared test helpers: one ``assert_close``, tiny random models, and the path to ``../shared``."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tl_logitlens.core import compat as _compat

# TransformerLens 4.x has no HookedTransformer: there the tiny models are TransformerBridges
# (see tiny_bridge), with exactly the weights the HookedTransformer would get on 3.x.
HAS_HOOKED_TRANSFORMER = _compat.HookedTransformer is not None

# The one feature TransformerLens 4.x lacks here: HookedEncoder (masked language models), which
# tl_logitlens.core.encoders and tl_logitlens.analyses.masked are built on. Test modules about them carry this mark.
requires_hooked_encoder = pytest.mark.skipif(
    _compat.HookedEncoder is None,
    reason=f"TransformerLens {_compat.TL_VERSION} has no HookedEncoder (removed in 4.0): the BERT/RoBERTa "
    "converter runs with TransformerLens 3.9 (on 4.x, BERT loads as a bridge instead)",
)

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


def assert_close(
    actual, expected, atol: float = 1e-5, rtol: float = 1e-5, msg: str = "", *, equal_nan: bool = False
) -> None:
    """``torch.testing.assert_close`` with the tolerance stated at the call, strictly.

    When both sides are tensors (or arrays) their dtypes must match: cast one explicitly at the call,
    so a float64 reference is never silently rounded to float32 (or the other way). Python numbers
    and lists take ``actual``'s dtype. NaN equals NaN only with ``equal_nan=True`` (say so where
    padding cells are NaN on both sides), never by default.
    """
    actual = torch.as_tensor(actual)
    if isinstance(expected, (torch.Tensor, np.ndarray, np.generic)):
        expected = torch.as_tensor(expected)
        if expected.dtype != actual.dtype:
            raise AssertionError(
                f"dtypes differ: actual {actual.dtype}, expected {expected.dtype}; cast one at the call"
                + (f" ({msg})" if msg else "")
            )
    else:
        expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(
        actual, expected.to(actual.device), atol=atol, rtol=rtol, equal_nan=equal_nan, msg=msg or None
    )


def assert_not_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5, msg: str = "") -> None:
    """The two must differ somewhere by more than the tolerance (a test that a change changes something)."""
    try:
        assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError:
        return
    raise AssertionError(f"expected a difference above atol={atol}, rtol={rtol}, found none" + (f" ({msg})" if msg else ""))


def assert_same_top_ids(got_ids, got_values, want_ids, want_values, atol: float = 1e-5, msg: str = "") -> None:
    """Top-k ids from two computations agree, rank by rank, except at near ties.

    Two kernels (a tiled one and a reference, or one CPU's instruction set and another's) round
    differently, so two tokens whose scores are within that rounding may come out in either order. Where
    the ids differ, the two computations' values at that rank must agree to ``atol`` (each picked a token
    scoring the same: a tie); the caller checks the values themselves with ``assert_close``. Shapes:
    ``[..., k]``.
    """
    got_ids, want_ids = torch.as_tensor(got_ids).cpu(), torch.as_tensor(want_ids).cpu()
    assert got_ids.shape == want_ids.shape, f"shapes differ: {tuple(got_ids.shape)} vs {tuple(want_ids.shape)} {msg}"
    differ = got_ids != want_ids
    if not bool(differ.any()):
        return
    gap = (torch.as_tensor(got_values).cpu().double() - torch.as_tensor(want_values).cpu().double()).abs()
    bad = differ & ~(gap <= atol)
    assert not bool(bad.any()), f"top ids differ at {bad.nonzero().tolist()[:5]}, not tied within {atol} {msg}"


def assert_rank_close(got_rank, scores, token_id: int, atol: float = 1e-5, msg: str = "") -> None:
    """A 1-based rank of ``token_id`` among ``scores`` (``[vocab]``) computed by another kernel: between the
    rank counting only the tokens above it by more than ``atol`` and the one counting every near tie."""
    scores = torch.as_tensor(scores).cpu().double()
    s = scores[token_id]
    lo = 1 + int((scores > s + atol).sum())
    hi = max(lo, int((scores > s - atol).sum()))  # the token itself is among those counted
    assert lo <= int(got_rank) <= hi, f"rank {int(got_rank)} outside [{lo}, {hi}] (ties within {atol}) {msg}"


def require_shared(path: Path) -> Path:
    """The path in ``../shared``; fails under CI when it is missing, skips with a reason otherwise."""
    if path.exists():
        return path
    reason = f"{path} is missing: tests on real weights need the project's ../shared folder"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# Tests that drive a real browser (the HTML report in selenium, static figure export with kaleido) need
# Chromium. On a bare machine they skip with a reason; CI (.ci/run installs Chromium) sets this
# variable to 1, which makes a missing browser a failure instead.
REQUIRE_BROWSER = "TL_LOGITLENS_REQUIRE_BROWSER"
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def require_browser(driver: bool = False) -> tuple[str, str | None]:
    """Paths of a Chromium browser and, with ``driver=True``, of ``chromedriver``.

    Skips the test with a reason when they are not on PATH, or fails when ``TL_LOGITLENS_REQUIRE_BROWSER=1``.
    """
    browser = os.environ.get("BROWSER_PATH") or next(filter(None, map(shutil.which, _BROWSER_NAMES)), None)
    chromedriver = shutil.which("chromedriver") if driver else None
    missing = [name for name, path in (("chromium", browser), ("chromedriver", chromedriver if driver else "-")) if not path]
    if not missing:
        return browser, chromedriver
    reason = (
        f"no {' or '.join(missing)} on PATH: this test drives a headless browser "
        "(apt-get install chromium chromium-driver)"
    )
    if os.environ.get(REQUIRE_BROWSER, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_BROWSER} is set, so the browser is required")
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
    output_logits_soft_cap: float = -1.0,
    attn_only: bool = False,
) -> Any:
    """A random model with every weight and bias non-trivial (norm gains and biases included).

    ``folded=True`` folds the norms into the following weights the way ``from_pretrained`` does,
    which leaves the logits unchanged and turns ``LN``/``RMS`` into ``LNPre``/``RMSPre``.
    On TransformerLens 4.x this is a compatibility-mode ``TransformerBridge`` with the same weights
    (:func:`tiny_bridge`).
    """
    if not HAS_HOOKED_TRANSFORMER:
        return tiny_bridge(
            normalization, folded, seed=seed, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            act_fn=act_fn, gated_mlp=gated_mlp, positional_embedding_type=positional_embedding_type,
            n_key_value_heads=n_key_value_heads, dtype=dtype, output_logits_soft_cap=output_logits_soft_cap,
            attn_only=attn_only,
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

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
        output_logits_soft_cap=output_logits_soft_cap,
        attn_only=attn_only,
    )
    model = HookedTransformer(cfg, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random_value(name, tuple(p.shape), gen))
    if folded:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model.eval()


def _random_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tiny model's weight: norm gains 1 ± 0.3, biases ± 0.2, matrices ~ 1.5 / sqrt(last dim)."""
    if name.endswith(".w") and ("ln" in name):
        return 1 + 0.3 * torch.randn(shape, generator=gen)
    if name.endswith(".b") or name.startswith("b_") or ".b_" in name:
        return 0.2 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / max(shape[-1], 1) ** 0.5 * 1.5


def hooked_parameter_shapes(
    normalization: str,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_vocab: int,
    n_ctx: int,
    gated_mlp: bool,
    positional_embedding_type: str,
    n_key_value_heads: int | None,
    attn_only: bool = False,
) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes of ``HookedTransformer``'s parameters for :func:`tiny_model`'s configs, in
    its ``named_parameters()`` order (tests/test_bridge.py checks this on 3.x), so that the same seed
    gives the same weights on TransformerLens 4.x, which has no ``HookedTransformer``."""
    d_head, d_mlp = d_model // n_heads, 4 * d_model
    kv, gqa = n_key_value_heads or n_heads, n_key_value_heads is not None
    out: list[tuple[str, tuple[int, ...]]] = [("embed.W_E", (d_vocab, d_model))]
    if positional_embedding_type == "standard":
        out.append(("pos_embed.W_pos", (n_ctx, d_model)))

    def norm(prefix: str) -> None:
        out.append((f"{prefix}.w", (d_model,)))
        if normalization == "LN":
            out.append((f"{prefix}.b", (d_model,)))

    for i in range(n_layers):
        b = f"blocks.{i}"
        norm(f"{b}.ln1")
        if not attn_only:
            norm(f"{b}.ln2")
        k = "_" if gqa else ""
        out += [
            (f"{b}.attn.W_Q", (n_heads, d_model, d_head)),
            (f"{b}.attn.W_O", (n_heads, d_head, d_model)),
            (f"{b}.attn.b_Q", (n_heads, d_head)),
            (f"{b}.attn.b_O", (d_model,)),
            (f"{b}.attn.{k}W_K", (kv, d_model, d_head)),
            (f"{b}.attn.{k}W_V", (kv, d_model, d_head)),
            (f"{b}.attn.{k}b_K", (kv, d_head)),
            (f"{b}.attn.{k}b_V", (kv, d_head)),
        ]
        if attn_only:
            continue
        if gated_mlp:
            out += [
                (f"{b}.mlp.W_in", (d_model, d_mlp)),
                (f"{b}.mlp.W_out", (d_mlp, d_model)),
                (f"{b}.mlp.W_gate", (d_model, d_mlp)),
                (f"{b}.mlp.b_in", (d_mlp,)),
                (f"{b}.mlp.b_out", (d_model,)),
            ]
        else:
            out += [
                (f"{b}.mlp.W_in", (d_model, d_mlp)),
                (f"{b}.mlp.b_in", (d_mlp,)),
                (f"{b}.mlp.W_out", (d_mlp, d_model)),
                (f"{b}.mlp.b_out", (d_model,)),
            ]
    norm("ln_final")
    out += [("unembed.W_U", (d_model, d_vocab)), ("unembed.b_U", (d_vocab,))]
    return out


def hooked_to_bridge_state_dict(weights: dict[str, torch.Tensor], rotary: bool = False) -> dict[str, torch.Tensor]:
    """``HookedTransformer``-format weights as the state dict of a TL-native ``TransformerBridge``
    (``TransformerBridge.boot_native``): per-head tensors flattened, ``[in, out]`` matrices transposed
    to ``nn.Linear``'s ``[out, in]``.

    ``rotary``: HookedTransformer rotates the pairs ``(i, i + d_head/2)`` of each head, the native
    model the adjacent pairs ``(2i, 2i+1)`` at the same frequencies; reordering the query and key
    dimensions of every head (``2i <- i``, ``2i+1 <- i + d_head/2``) maps one onto the other and leaves
    every attention score unchanged.
    """
    from einops import rearrange

    out = {}
    for name, t in weights.items():
        prefix, leaf = name.rsplit(".", 1)
        leaf = leaf.lstrip("_")
        if rotary and leaf in ("W_Q", "W_K", "b_Q", "b_K"):
            d_head = t.shape[-1]
            t = t[..., torch.arange(d_head).reshape(2, d_head // 2).T.reshape(-1)]
        if leaf in ("W_Q", "W_K", "W_V"):
            out[f"{prefix}.{leaf[-1].lower()}.weight"] = rearrange(t, "h m d -> (h d) m")
        elif leaf in ("b_Q", "b_K", "b_V"):
            out[f"{prefix}.{leaf[-1].lower()}.bias"] = rearrange(t, "h d -> (h d)")
        elif leaf == "W_O":
            out[f"{prefix}.o.weight"] = rearrange(t, "h d m -> m (h d)")
        elif leaf == "b_O":
            out[f"{prefix}.o.bias"] = t
        elif leaf in ("W_in", "W_out", "W_gate"):
            out[f"{prefix}.{leaf[2:]}.weight"] = t.T.contiguous()
        elif leaf in ("b_in", "b_out"):
            out[f"{prefix}.{leaf[2:]}.bias"] = t
        elif leaf == "W_U":
            out[f"{prefix}.weight"] = t.T.contiguous()
        elif leaf in ("b_U", "b"):
            out[f"{prefix}.bias"] = t
        elif leaf in ("W_E", "W_pos", "w"):
            out[f"{prefix}.weight"] = t
        else:
            raise ValueError(f"no bridge name for {name}")
    return out


def tiny_bridge(
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
    output_logits_soft_cap: float = -1.0,
    attn_only: bool = False,
) -> Any:
    """:func:`tiny_model`'s model as a compatibility-mode ``TransformerBridge`` (3.9 and 4.x).

    A TL-native bridge (``TransformerBridge.boot_native``, no Hugging Face model) carrying exactly the
    weights ``tiny_model`` draws for the ``HookedTransformer``; ``folded=True`` folds them with
    ``enable_compatibility_mode()`` (fold_ln, centring), unfolded keeps them as drawn
    (``no_processing=True``). Either way the legacy hook names (``blocks.0.hook_resid_pre``) work.
    """
    from transformer_lens.config import TransformerBridgeConfig

    tokenizer = tiny_tokenizer()
    n_ctx = 64
    cfg = TransformerBridgeConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=len(tokenizer),
        n_ctx=n_ctx,
        act_fn=act_fn,
        normalization_type=normalization,
        gated_mlp=gated_mlp,
        positional_embedding_type=positional_embedding_type,
        n_key_value_heads=n_key_value_heads,
        seed=seed,
        device="cpu",
        dtype=dtype,
        default_prepend_bos=True,
        model_name=f"tiny-{normalization}",
        output_logits_soft_cap=output_logits_soft_cap,
        attn_only=attn_only,
    )
    bridge = _compat.TransformerBridge.boot_native(
        cfg, tokenizer=tokenizer, device="cpu", dtype=dtype, model_name=f"tiny-{normalization}"
    )
    if gated_mlp:
        # The TL-native gated MLP is bias-free. HookedTransformer's computes act(x W_gate) * (x W_in)
        # + b_in, then W_out, b_out: b_in is added after the product, so it goes into out's bias as
        # W_out b_in (same function; hook_post then lacks b_in, which the b_out row carries instead).
        for layer in bridge.original_model.layers:
            out = layer.mlp.out
            out.bias = torch.nn.Parameter(torch.zeros(out.out_features, dtype=dtype))
    gen = torch.Generator().manual_seed(seed)
    shapes = hooked_parameter_shapes(
        normalization, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=len(tokenizer),
        n_ctx=n_ctx, gated_mlp=gated_mlp, positional_embedding_type=positional_embedding_type,
        n_key_value_heads=n_key_value_heads, attn_only=attn_only,
    )
    # drawn in float32 then rounded, as HookedTransformer's copy_ into its own dtype does
    weights = {name: _random_value(name, shape, gen).to(dtype) for name, shape in shapes}
    state = hooked_to_bridge_state_dict(weights, rotary=positional_embedding_type == "rotary")
    if gated_mlp:
        for i in range(n_layers):
            b_in = state.pop(f"blocks.{i}.mlp.in.bias")
            state[f"blocks.{i}.mlp.out.bias"] = state[f"blocks.{i}.mlp.out.bias"] + state[f"blocks.{i}.mlp.out.weight"] @ b_in
    result = bridge.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"tiny_bridge weights do not fit: {result}")
    if folded:
        bridge.enable_compatibility_mode(disable_warnings=True)
    else:
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return bridge.eval()


NORM_VARIANTS = [("LN", False), ("LN", True), ("RMS", False), ("RMS", True)]
NORM_IDS = ["LN-unfolded", "LN-folded", "RMS-unfolded", "RMS-folded"]


def torchrun_command(nproc: int = 2) -> list[str]:
    """``torchrun --nproc-per-node nproc`` with this interpreter (``python -m torch.distributed.run``), on a
    free local port; append the script or ``-m module`` and its arguments."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(port)]
