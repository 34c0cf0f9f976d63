"""The logit lens for masked language models (BERT, RoBERTa: ``HookedEncoder`` on 3.x, bridge on 4.x).

Mask a word, then read every layer's guess for the hole: each residual state is sent through the
model's own masked-LM head (``dense → GELU → LayerNorm → W_U + b_U``), exactly as the model treats
its last layer, so the last site reproduces the model's logits.

What post-LN means for this lens: in BERT and RoBERTa every block ends with a LayerNorm, so each
state between blocks is already normalised, and there is no final LayerNorm to choose how to apply
(the ``norm`` option of the causal lens has no counterpart here). The MLM head's own LayerNorm comes
*after* its dense layer and GELU, so it is part of the readout, applied to every site alike. The
sites are the embedding output (after the embedding LayerNorm, label ``0_pre``), the input of each
later block (``l_pre`` = output of block ``l - 1``), and the last block's output (``final_post``).
The labels match the causal lens's default ``resid_pre`` sites, so depth indices line up.

Log-probs and entropies are in nats; ranks count from 1 (the top token) over the full vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union, no_type_check

import torch
from jaxtyping import Bool, Float, Int

from tl_logitlens.core import compat as _compat
from tl_logitlens.core.inputs import (
    Batch,
    Targets,
    check_count,
    check_flag,
    check_position,
    is_integer,
    prepare_inputs,
)
from tl_logitlens.core.kernel import (
    BlockMetrics,
    NonFiniteError,
    Workspace,
    block_metrics,
    check_finite,
    final_distribution,
)
from tl_logitlens.core.readout import Site
from tl_logitlens.core.results import (
    DepthRows,
    LensStatistics,
    ShortRepr,
    common_fields,
    every_layer_count,
    labels_summary,
)
from tl_logitlens.core.run import Rows, execute, run_cache
from tl_logitlens.core.token_sets import Targets as TargetIds
from tl_logitlens.core.token_sets import TokenSet, resolve_target, stack_targets
from tl_logitlens.core.tokens import display_tokens
from tl_logitlens.lenses import LOGIT_LENS, Lens, resolve_lens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

MaskSpec = Union[None, int, str, Sequence[Union[int, str]]]
DEFAULT_CHUNK_SIZE = 16


def encoder_sites(model: Any) -> tuple[Site, ...]:
    """The embedding output and every block's output, in depth order.

    The last block's output (after its closing LayerNorm) is ``hook_normalized_resid_post`` on a
    ``HookedEncoder`` and ``hook_resid_post`` on a bridge (where it equals Hugging Face's last hidden state).
    """
    n = model.cfg.n_layers
    last = "hook_resid_post" if _compat.is_bridge(model) else "hook_normalized_resid_post"
    sites = [Site(f"{layer}_pre", f"blocks.{layer}.hook_resid_pre") for layer in range(n)]
    sites.append(Site("final_post", f"blocks.{n - 1}.{last}"))
    return tuple(sites)


def mlm_logits(model: Any, states: Float[torch.Tensor, "row d_model"]) -> Float[torch.Tensor, "row d_vocab"]:
    """The model's masked-LM head on residual states, as float32 logits (the model's own modules)."""
    if _compat.is_bridge(model):
        return _compat.masked_lm_head(model)(states[None])[0].float()
    return model.unembed(model.mlm_head(states[None]))[0].float()


def check_encoder(model: Any, what: str = "masked_lens") -> None:
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_cache"):
        raise TypeError(
            f"{what} expects a TransformerLens HookedEncoder, not {type(model).__name__}; load one with "
            "tl_logitlens.load_model('bert-base-cased') or a local *ForMaskedLM folder"
        )
    if not _compat.is_encoder(model):
        raise TypeError(
            f"{what} needs a masked language model (BERT or RoBERTa as a HookedEncoder or masked-LM bridge), but got a "
            f"{type(model).__name__}, which predicts the next token; use tl_logitlens.logit_lens for it"
        )
    if model.training:
        raise ValueError("the model is in training mode, where dropout changes the numbers; call model.eval() first")
    if getattr(model, "tokenizer", None) is None or model.tokenizer.mask_token_id is None:
        raise ValueError("the model has no tokenizer with a mask token; set one with model.set_tokenizer(...)")


def _encode(model: Any, inputs: object, attention_mask: torch.Tensor | None) -> Batch:
    """The masked LM's input batch (special tokens added, offsets kept), its tensors on the CPU for
    the position bookkeeping."""
    batch = prepare_inputs(model, inputs, attention_mask=attention_mask, special_tokens=True)
    return replace(batch, tokens=batch.tokens.cpu(), mask=batch.mask.cpu())


def _forbidden_ids(tok: Any) -> set[int]:
    """Special tokens that are never a word to mask: [CLS]/[SEP]/<s>/</s>/pad (not [MASK] or [UNK])."""
    keep = {tok.mask_token_id, tok.unk_token_id}
    return {int(i) for i in tok.all_special_ids if i not in keep}


def _word_position(enc: Batch, tok: Any, b: int, word: str) -> int:
    if enc.texts is None or enc.offsets is None:
        raise ValueError(
            f"the word {word!r} can only be found in text (with a fast tokenizer); for token tensors give "
            "mask_positions as integers"
        )
    text, offs = enc.texts[b], enc.offsets[b]
    spans = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text)]
    if not spans:
        raise ValueError(f"the word {word!r} does not occur in prompt {b} ({text!r}); pass a word of the text")
    if len(spans) > 1:
        raise ValueError(
            f"the word {word!r} occurs {len(spans)} times in prompt {b}; pass the position to mask as an int"
        )
    start, end = spans[0]
    hit = [i for i, (s, e) in enumerate(offs) if e > s and s < end and e > start]
    if len(hit) != 1:
        pieces = display_tokens(tok, [int(enc.tokens[b, i]) for i in hit])
        raise ValueError(
            f"the word {word!r} is {len(hit)} tokens here {pieces}; mask one of them by position, or choose a "
            "one-token word"
        )
    return hit[0]


def _mask_positions(
    spec: MaskSpec, enc: Batch, tok: Any
) -> tuple[Int[torch.Tensor, "batch n"], Bool[torch.Tensor, "batch n"]]:
    """Positions to read in each prompt, and which are real (prompts may hold different numbers of masks)."""
    n_batch = enc.tokens.shape[0]
    lengths = enc.mask.sum(-1).tolist()
    per_row: list[list[int]] = []
    if spec is None:
        for b in range(n_batch):
            row = (enc.tokens[b, : lengths[b]] == tok.mask_token_id).nonzero().reshape(-1).tolist()
            if not row:
                raise ValueError(
                    f"prompt {b} has no mask token ({tok.mask_token!r}) and no mask_positions were given; write "
                    f"{tok.mask_token} in the text, or pass mask_positions (an int position or a word of the text)"
                )
            per_row.append(row)
    else:
        items = [spec] if isinstance(spec, (int, str)) else spec
        if isinstance(items, torch.Tensor):
            items = items.reshape(-1).tolist()
        if not isinstance(items, Sequence) or len(items) == 0:
            raise ValueError("mask_positions must be an int, a word, or a non-empty list of them")
        forbidden = _forbidden_ids(tok)
        for b in range(n_batch):
            row = []
            for item in items:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise TypeError(f"mask positions are ints or words, not {item!r}")
                if isinstance(item, str):
                    p = _word_position(enc, tok, b, item)
                else:
                    p = check_position(item, lengths[b], b, "mask position")
                tid = int(enc.tokens[b, p])
                if tid in forbidden:
                    raise ValueError(
                        f"mask position {item} of prompt {b} holds the special token "
                        f"{tok.convert_ids_to_tokens(tid)!r}; mask a word of the text instead"
                    )
                if p in row:
                    raise ValueError(f"mask_positions names position {p} twice")
                row.append(p)
            per_row.append(row)
    width = max(len(r) for r in per_row)
    positions = torch.zeros(n_batch, width, dtype=torch.long)
    valid = torch.zeros(n_batch, width, dtype=torch.bool)
    for b, row in enumerate(per_row):
        positions[b, : len(row)] = torch.tensor(row)
        valid[b, : len(row)] = True
    return positions, valid


def resolve_mlm_target(model: Any, target: object) -> int:
    """One token id from a word that is exactly one token (no special tokens added) or an id."""
    d_vocab = model.cfg.d_vocab
    if isinstance(target, bool):
        raise TypeError(f"target {target!r} is a bool; pass a word or a token id")
    if is_integer(target):
        target = int(target)
        if not 0 <= target < d_vocab:
            raise ValueError(f"target id {target} is outside the vocabulary [0, {d_vocab})")
        return target
    if isinstance(target, str):
        if not target:
            raise ValueError("target is an empty string; pass one word")
        ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = display_tokens(model.tokenizer, ids)
            raise ValueError(
                f"target {target!r} is {len(ids)} tokens {pieces}, not one; pass a one-token word or a token id "
                "(byte-level vocabularies such as RoBERTa's spell a word after a space as ' word')"
            )
        tok = model.tokenizer
        if ids[0] == tok.unk_token_id and target != tok.unk_token:
            raise ValueError(
                f"target {target!r} is not in the vocabulary (it becomes {tok.unk_token!r}); pass a word the "
                "tokenizer knows, or a token id"
            )
        return int(ids[0])
    raise TypeError(f"target must be a word or a token id, not {type(target).__name__}")


@dataclass(frozen=True)
class _HoleMetrics:
    """Lens metrics at every hole (row) and site, from the shared kernel, plus the tracked tokens."""

    top_ids: torch.Tensor  # [site, row, k]
    top_logprobs: torch.Tensor
    entropy: torch.Tensor  # [site, row]
    kl_to_final: torch.Tensor
    query_logprobs: torch.Tensor  # [site, row, q]
    query_ranks: torch.Tensor
    tracked_ids: torch.Tensor  # [row, n_track]
    tracked_logprobs: torch.Tensor  # [site, row, n_track]
    full_logprobs: torch.Tensor | None  # [site, row, d_vocab]


@torch.inference_mode()
def _hole_metrics(
    model: Any,
    lens: Lens,
    cache: Any,
    sites: Sequence[Site],
    rows: Rows,
    query: Int[torch.Tensor, "row q"],
    top_k: int,
    n_track: int,
    chunk_size: int,
    keep_logprobs: bool,
) -> _HoleMetrics:
    """Project each (site, hole) through the MLM head and reduce it with the lens's metric kernel.

    The final site is the last of ``sites``. A chunk's logits stay for every site, because the
    tracked tokens are those with the largest probability at *any* site (few holes, so small).
    """
    n_rows, n_sites = len(rows), len(sites)
    d_vocab = model.cfg.d_vocab
    ws = Workspace(min(chunk_size, max(n_rows, 1)), d_vocab, query.device)
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in _HoleMetrics.__dataclass_fields__}
    for start in range(0, n_rows, chunk_size):
        sl = slice(start, start + chunk_size)
        b, p, q = rows.b[sl], rows.p[sl], query[sl]
        z = torch.stack(  # [site, chunk, d_vocab]
            [mlm_logits(model, lens.translate(s.label, cache[s.hook][b, p])) for s in sites]
        )
        final = final_distribution(z[-1], ws)
        per_site = [block_metrics(z[s], final, q, top_k, ws) for s in range(n_sites)]
        stacked = {name: torch.stack([getattr(m, name) for m in per_site]) for name in BlockMetrics.__dataclass_fields__}
        try:  # the final site is one of the sites, so its own statistics are checked with theirs
            check_finite(None, stacked, start)
        except NonFiniteError as err:
            where = f"site {sites[err.site].label!r}, prompt {int(rows.b[err.row])}, position {int(rows.p[err.row])}"
            raise err.explain(where, "the masked-LM lens") from None
        for name, value in stacked.items():
            outs[name].append(value)
        lp = torch.log_softmax(z, dim=-1)
        tracked = lp.amax(0).topk(n_track, dim=-1).indices  # [chunk, n_track]
        outs["tracked_ids"].append(tracked)
        outs["tracked_logprobs"].append(lp.gather(-1, tracked[None].expand(n_sites, -1, -1)))
        if keep_logprobs:
            outs["full_logprobs"].append(lp)
    cat = {k: torch.cat(v, dim=0 if k == "tracked_ids" else 1) for k, v in outs.items() if v}
    return _HoleMetrics(**{k: cat.get(k) for k in _HoleMetrics.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True, repr=False)
class MaskedLensResult(LensStatistics):
    """Per site, prompt and masked position: the MLM head's prediction for the hole.

    Tensors are indexed ``[site, batch, mask]``; ``positions[b, j]`` (also ``mask_positions``) is the
    token position of hole ``j`` in prompt ``b`` and ``valid`` marks real holes (prompts may hold
    different numbers). ``masked`` says whether the holes held the mask token (``mask=False``: the
    unmasked read, each layer's view of the real token).
    ``original_ids`` is the token that stood there before masking (-1 where the text already held
    the mask token). ``tracked_ids`` are the ``n_track`` tokens with the largest probability at
    *any* site (their maximum over layers), and ``tracked_logprobs`` their log-probs at every site.
    Invalid entries: ids -1, values NaN. Log-probs and entropy in nats; ranks from 1.
    """

    original_tokens: Int[torch.Tensor, "batch seq"]
    masked: bool = True
    original_ids: Int[torch.Tensor, "batch pos"]
    original_logprobs: Float[torch.Tensor, "site batch pos"]
    original_ranks: Int[torch.Tensor, "site batch pos"]
    target_ids: Int[torch.Tensor, " target"] | None
    tracked_ids: Int[torch.Tensor, "batch pos track"]
    tracked_logprobs: Float[torch.Tensor, "site batch pos track"]

    @property
    def mask_positions(self) -> Int[torch.Tensor, "batch pos"]:
        """The token position of each hole (``positions``), -1 at padding."""
        return self.positions

    @property
    def predicted_ids(self) -> Int[torch.Tensor, "site batch pos"]:
        return self.top_ids[..., 0]

    def top_tokens(self, prompt: int = 0, mask: int = 0) -> list[list[str]]:
        """The top-k tokens of one hole at each site, ``[site][k]``."""
        return [display_tokens(self.tokenizer, self.top_ids[s, prompt, mask]) for s in range(len(self.labels))]

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × prompt × hole × top-k rank.

        Columns: ``site``, ``site_index``, ``prompt``, ``mask_index``, ``position``, ``original_token``,
        ``rank``, ``token_id``, ``token``, ``logprob``, ``prob``, ``entropy``, ``kl_to_final``,
        ``original_logprob``, ``original_rank``.
        """
        import pandas as pd

        rows = []
        for s, label in enumerate(self.labels):
            for b, j in self.valid.nonzero().tolist():
                orig = int(self.original_ids[b, j])
                orig_tok = display_tokens(self.tokenizer, [orig])[0] if orig >= 0 else ""
                ids = self.top_ids[s, b, j].tolist()
                for r, (tid, tok) in enumerate(zip(ids, display_tokens(self.tokenizer, ids))):
                    lp = float(self.top_logprobs[s, b, j, r])
                    rows.append(
                        {
                            "site": label, "site_index": s, "prompt": b, "mask_index": j,
                            "position": int(self.mask_positions[b, j]), "original_token": orig_tok,
                            "rank": r + 1, "token_id": tid, "token": tok, "logprob": lp,
                            "prob": float(torch.tensor(lp).exp()),
                            "entropy": float(self.entropy[s, b, j]), "kl_to_final": float(self.kl_to_final[s, b, j]),
                            "original_logprob": float(self.original_logprobs[s, b, j]),
                            "original_rank": int(self.original_ranks[s, b, j]),
                        }
                    )
        return pd.DataFrame(rows)

    def depth_rows(self) -> DepthRows:
        """One row per hole (see :class:`~tl_logitlens.core.results.DepthRows`); a hole the text already held
        (``[MASK]``) has no original token and shows the mask token itself."""
        b, j = self.valid.nonzero(as_tuple=True)
        toks = display_tokens(self.tokenizer, self.original_ids[b, j].clamp(min=0))
        held = display_tokens(self.tokenizer, self.tokens.cpu()[b, self.mask_positions.cpu()[b, j]])
        toks = [t if o >= 0 else h for t, h, o in zip(toks, held, self.original_ids[b, j].tolist())]
        return DepthRows(torch.stack([b, j]), b, self.mask_positions[b, j], toks, "masked", every_layer_count(self.labels))

    def plot(self, **kwargs: Any) -> go.Figure:
        """The laminar profile of one hole; see :func:`tl_logitlens.plotting.masked.profile_figure`."""
        from tl_logitlens.analyses.profile import depth_profile

        target = kwargs.pop("target", None)
        return depth_profile(self, target=target).plot(**kwargs)

    def plot_vocab(self, site: str | int = -1, prompt: int = 0, mask: int = 0, **kwargs: Any) -> go.Figure:
        """The full-vocabulary log-softmax at one site, target highlighted (needs ``keep_logprobs=True``);
        see :func:`tl_logitlens.plotting.vocab_figure`."""
        from tl_logitlens.plotting.masked import vocab_figure

        return vocab_figure(self, site=site, prompt=prompt, mask=mask, **kwargs)


def _check_common(model: Any, top_k: object, chunk_size: object, n_track: object, what: str = "masked_lens") -> None:
    check_encoder(model, what)
    check_count(top_k, "top_k", 1, model.cfg.d_vocab)
    check_count(chunk_size, "chunk_size", 1)
    check_count(n_track, "n_track", 1, model.cfg.d_vocab)


@no_type_check  # checks its own arguments with messages that say what to do
def masked_lens(
    model: Any,
    inputs: str | Sequence[str] | torch.Tensor,
    *,
    mask_positions: MaskSpec = None,
    mask: bool = True,
    targets: Targets = None,
    top_k: int = 5,
    n_track: int = 5,
    cache: Any = None,
    lens: Any = None,
    attention_mask: torch.Tensor | None = None,
    keep_logprobs: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MaskedLensResult:
    """The logit lens of a masked LM at its holes: every layer's guess for each masked token.

    Args:
        model: a masked LM (BERT, RoBERTa) in eval mode: a ``HookedEncoder``, or on TransformerLens 4.x
            the compatibility-mode bridge ``tl_logitlens.load_model`` returns for a ``*ForMaskedLM``.
        inputs: a string, a list of strings (right-padded, masked from attention), or token ids
            including the special tokens ([CLS]/[SEP], <s>/</s>).
        mask_positions: where to put the hole: a token position (counting the leading special token;
            negative counts back from the end), a word of the text (it must occur once and be one
            token), or a list of these (several holes at once). ``None``: the text already holds the
            mask token, and every mask token is read.
        mask: ``True`` (default) replaces the token at each of ``mask_positions`` with the mask token;
            ``False`` reads those positions with their real tokens in place (the unmasked read: how
            each layer sees a word it is given).
        targets: words (each one token), ids or word-level token sets (:func:`~tl_logitlens.token_set`:
            the summed probability of their tokens, their best rank) reported at each hole.
        n_track: how many tokens to track by their maximum probability over the sites.
        cache: an ``ActivationCache`` of the *masked* tokens (``result.tokens``) on this model.
        lens: ``None`` (the logit lens: each state through the MLM head as it is) or a lens object
            whose ``translate`` maps each site's states before the MLM head reads them.
        keep_logprobs: keep the full ``[site, batch, mask, d_vocab]`` log-softmax (for ``plot_vocab``).
        chunk_size: rows projected at once; peak memory about ``3 · n_sites · chunk_size · d_vocab · 4`` bytes.
    """
    _check_common(model, top_k, chunk_size, n_track)
    check_flag(mask, "mask")
    check_flag(keep_logprobs, "keep_logprobs")
    if not mask and mask_positions is None:
        raise ValueError("mask=False reads given positions unmasked; pass mask_positions (ints or words)")
    enc = _encode(model, inputs, attention_mask)
    positions, valid = _mask_positions(mask_positions, enc, model.tokenizer)
    target_ids = _mlm_targets(model, targets)
    lens = resolve_lens(model, lens)
    return _masked(model, enc, positions, valid, mask, target_ids, cache, lens, (top_k, n_track, chunk_size, keep_logprobs))


def _masked(
    model: Any,
    enc: Batch,
    positions: torch.Tensor,
    valid: torch.Tensor,
    mask: bool,
    target_ids: TargetIds | None,
    cache: Any,
    lens: Lens,
    settings: tuple[int, int, int, bool],
) -> MaskedLensResult:
    """Mask (or not) the holes, run (or check the cache), read every site through the MLM head."""
    top_k, n_track, chunk_size, keep_logprobs = settings
    tok = model.tokenizer
    rows_b, rows_j = valid.nonzero(as_tuple=True)
    original = enc.tokens[rows_b, rows_p := positions[rows_b, rows_j]]
    read = enc.tokens.clone()
    if mask:
        read[rows_b, rows_p] = tok.mask_token_id
    known = original != tok.mask_token_id
    sites = encoder_sites(model)
    device = torch.device(model.cfg.device)
    batch = Batch(
        tokens=read.to(device),
        mask=enc.mask.to(device),
        str_tokens=tuple(tuple(display_tokens(tok, row[m].tolist())) for row, m in zip(read, enc.mask)),
    )
    run = execute(
        model, batch, torch.where(valid, positions, -1).to(device), valid.to(device), [s.hook for s in sites], cache
    )
    query = original.clamp(min=0)[:, None]
    if target_ids is not None:  # every target's tokens (a token set's all), the same at every hole
        query = torch.cat([query, target_ids.query(*[torch.zeros(len(original), dtype=torch.long)] * 2).to(query.device)], dim=-1)
    rows = Rows(rows_b.to(device), rows_j.to(device), rows_p.to(device))
    r = _hole_metrics(model, lens, run.cache, sites, rows, query.to(device), top_k, n_track, chunk_size, keep_logprobs)
    shape = tuple(positions.shape)

    def scatter(values: torch.Tensor, fill: float | int) -> torch.Tensor:
        return rows.scatter(values, shape, fill)

    nan = float("nan")
    known = known.to(device)
    target_lp = target_rank = None
    if target_ids is not None:  # a token set's tokens reduced to one log-prob and rank
        zeros = torch.zeros(len(original), dtype=torch.long, device=device)
        target_ids = replace(target_ids, members=target_ids.members.to(device))
        target_lp, target_rank = target_ids.reduce(r.query_logprobs[..., 1:], r.query_ranks[..., 1:], zeros, zeros)
    return MaskedLensResult(
        **common_fields(model, batch, run.positions, run.valid, lens.name),
        labels=tuple(s.label for s in sites),
        original_tokens=enc.tokens.to(device),
        masked=mask,
        original_ids=scatter(torch.where(known, original.to(device), -1)[None], -1)[0],
        top_ids=scatter(r.top_ids, -1),
        top_logprobs=scatter(r.top_logprobs, nan),
        entropy=scatter(r.entropy, nan),
        kl_to_final=scatter(r.kl_to_final, nan),
        original_logprobs=scatter(torch.where(known, r.query_logprobs[..., 0], nan), nan),
        original_ranks=scatter(torch.where(known, r.query_ranks[..., 0], -1), -1),
        target_ids=None if target_ids is None else target_ids.ids[0, 0].to(device),
        target_logprobs=None if target_lp is None else scatter(target_lp, nan),
        target_ranks=None if target_rank is None else scatter(target_rank, -1),
        target_sets=None if target_ids is None else target_ids.sets,
        tracked_ids=scatter(r.tracked_ids[None], -1)[0],
        tracked_logprobs=scatter(r.tracked_logprobs, nan),
        full_logprobs=None if r.full_logprobs is None else scatter(r.full_logprobs, nan),
    )


def _mlm_targets(model: Any, targets: object) -> TargetIds | None:
    """The masked lens's targets: one-token words or ids (read by the tokenizer, as the MLM sees them)
    and token sets, the same at every hole."""
    if targets is None:
        return None
    single = isinstance(targets, (str, TokenSet)) or is_integer(targets)
    items = [targets] if single else list(targets)
    if not items:
        raise ValueError("targets is empty; pass a word, an id, a token set, or a list of them")
    read = [resolve_target(model, t) if isinstance(t, TokenSet) else resolve_mlm_target(model, t) for t in items]
    return stack_targets([read], 1, "cpu")


@dataclass(frozen=True, repr=False)
class SlidingMaskResult(ShortRepr):
    """Each non-special token of one text masked in turn, read at its own hole at every site.

    Tensors are indexed ``[site, pos]`` where ``pos`` runs over the masked positions
    (``positions[j]`` is the token position). ``predicted_ids`` is the top-1 token; ``max_logprobs``
    its log-prob (the maximum log-prob over the vocabulary); ``original_logprobs``/``original_ranks``
    are those of the token that stood there. Log-probs in nats; ranks from 1.
    """

    labels: tuple[str, ...]
    tokens: Int[torch.Tensor, " seq"]
    str_tokens: tuple[str, ...]
    positions: Int[torch.Tensor, " pos"]
    original_ids: Int[torch.Tensor, " pos"]
    top_ids: Int[torch.Tensor, "site pos k"]
    top_logprobs: Float[torch.Tensor, "site pos k"]
    entropy: Float[torch.Tensor, "site pos"]
    original_logprobs: Float[torch.Tensor, "site pos"]
    original_ranks: Int[torch.Tensor, "site pos"]
    tracked_ids: Int[torch.Tensor, "pos track"]
    tracked_logprobs: Float[torch.Tensor, "site pos track"]
    model_name: str = ""
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def predicted_ids(self) -> Int[torch.Tensor, "site pos"]:
        return self.top_ids[..., 0]

    @property
    def max_logprobs(self) -> Float[torch.Tensor, "site pos"]:
        return self.top_logprobs[..., 0]

    def depth_rows(self) -> DepthRows:
        """One row per masked position (see :class:`~tl_logitlens.core.results.DepthRows`)."""
        n = self.positions.shape[0]
        rows = torch.arange(n)
        return DepthRows(rows, torch.zeros(n, dtype=torch.long), self.positions, self.original_tokens(), "sliding",
                         every_layer_count(self.labels))

    def original_tokens(self) -> list[str]:
        return display_tokens(self.tokenizer, self.original_ids)

    def _summary(self) -> dict[str, str]:
        return {
            "model": self.model_name or "?",
            "tokens": str(len(self.str_tokens)),
            "masked positions": str(int(self.positions.shape[0])),
            "sites": labels_summary(self.labels),
        }

    def predicted_tokens(self) -> list[list[str]]:
        """The top-1 token at each site and position, ``[site][pos]``."""
        return [display_tokens(self.tokenizer, row) for row in self.predicted_ids]

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × masked position.

        Columns: ``site``, ``site_index``, ``position``, ``original_token``, ``predicted_token``,
        ``predicted_id``, ``max_logprob``, ``original_logprob``, ``original_rank``, ``entropy``.
        """
        import pandas as pd

        originals = self.original_tokens()
        predicted = self.predicted_tokens()
        rows = []
        for s, label in enumerate(self.labels):
            for j, p in enumerate(self.positions.tolist()):
                rows.append(
                    {
                        "site": label, "site_index": s, "position": p, "original_token": originals[j],
                        "predicted_token": predicted[s][j], "predicted_id": int(self.predicted_ids[s, j]),
                        "max_logprob": float(self.max_logprobs[s, j]),
                        "original_logprob": float(self.original_logprobs[s, j]),
                        "original_rank": int(self.original_ranks[s, j]), "entropy": float(self.entropy[s, j]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, **kwargs: Any) -> go.Figure:
        """The text heatmap; see :func:`tl_logitlens.plotting.masked.sliding_text_heatmap`."""
        from tl_logitlens.plotting.masked import sliding_text_heatmap

        return sliding_text_heatmap(self, **kwargs)


@no_type_check
def sliding_mask_lens(
    model: Any,
    text: str | torch.Tensor,
    *,
    top_k: int = 1,
    n_track: int = 3,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SlidingMaskResult:
    """Mask each non-special token of ``text`` in turn and read every layer's guess at the hole.

    All masked copies (one per non-special token) go through the model in one batched forward; copy
    ``j`` is read only at its own hole. Special tokens ([CLS], [SEP], <s>, </s>, pads) are never masked.
    """
    _check_common(model, top_k, chunk_size, n_track, what="sliding_mask_lens")
    tok = model.tokenizer
    if isinstance(text, torch.Tensor):
        if text.ndim == 2 and text.shape[0] == 1:
            text = text[0]
        if text.ndim != 1:
            raise ValueError(f"sliding_mask_lens reads one text; pass a string or a [pos] tensor, not {tuple(text.shape)}")
    elif not isinstance(text, str):
        raise TypeError(f"sliding_mask_lens reads one text (a string or a [pos] token tensor), not {type(text).__name__}")
    enc = _encode(model, text, None)
    tokens = enc.tokens[0]
    forbidden = _forbidden_ids(tok)
    positions = torch.tensor([i for i, t in enumerate(tokens.tolist()) if t not in forbidden], dtype=torch.long)
    if positions.numel() == 0:
        raise ValueError("the text has no token to mask (only special tokens)")
    n = positions.shape[0]
    copies = tokens[None].repeat(n, 1)
    index = torch.arange(n)
    copies[index, positions] = tok.mask_token_id
    original = tokens[positions]
    device = torch.device(model.cfg.device)
    sites = encoder_sites(model)
    cache = run_cache(model, copies.to(device), torch.ones_like(copies, dtype=torch.bool).to(device), [s.hook for s in sites])
    rows = Rows(index.to(device), torch.zeros_like(index).to(device), positions.to(device))
    r = _hole_metrics(model, LOGIT_LENS, cache, sites, rows, original[:, None].to(device), top_k, n_track, chunk_size, False)
    known = (original != tok.mask_token_id).to(device)
    return SlidingMaskResult(
        labels=tuple(s.label for s in sites),
        tokens=tokens.to(device),
        str_tokens=tuple(display_tokens(tok, tokens)),
        positions=positions.to(device),
        original_ids=original.to(device),
        top_ids=r.top_ids,
        top_logprobs=r.top_logprobs,
        entropy=r.entropy,
        original_logprobs=torch.where(known, r.query_logprobs[..., 0], float("nan")),
        original_ranks=torch.where(known, r.query_ranks[..., 0], -1),
        tracked_ids=r.tracked_ids,
        tracked_logprobs=r.tracked_logprobs,
        model_name=getattr(model.cfg, "model_name", ""),
        tokenizer=tok,
    )
