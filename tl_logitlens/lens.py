"""The logit lens: what each layer of the residual stream would predict if the model stopped there.

Memory is bounded by ``chunk_size``: states are projected to the vocabulary ``chunk_size`` rows at a
time and each ``[rows, d_vocab]`` block is reduced to its metrics at once, so the full
``[site, batch, pos, d_vocab]`` tensor never exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union, no_type_check

import torch
from jaxtyping import Bool, Float, Int

from tl_logitlens._frames import input_tokens, long_index, position_columns
from tl_logitlens._kernel import site_metrics
from tl_logitlens.inputs import (
    Batch,
    Inputs,
    PositionSpec,
    TokenLike,
    prepare_inputs,
    resolve_positions,
    resolve_token,
)
from tl_logitlens.lenses import resolve_lens
from tl_logitlens.readout import (
    Readout,
    Site,
    check_cache,
    check_model,
    check_norm,
    resolve_sites,
    run_cache,
)
from tl_logitlens.tokens import display_tokens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

Targets = Union[None, TokenLike, Sequence[TokenLike], torch.Tensor]

DEFAULT_CHUNK_SIZE = 256


@dataclass(frozen=True)
class LensResult:
    """Per site, prompt and read position: the lens's prediction and how it compares.

    Tensors are indexed ``[site, batch, pos]`` where ``pos`` runs over the *read* positions
    (``positions[b, j]`` is the token position of column ``j`` in prompt ``b``). Entries where
    ``valid`` is False are padding: ids are -1 and values NaN. Log-probs and entropies are in nats;
    ranks count from 1 (the top token) over the full vocabulary.
    """

    labels: tuple[str, ...]
    tokens: Int[torch.Tensor, "batch seq"]
    str_tokens: tuple[tuple[str, ...], ...]
    positions: Int[torch.Tensor, "batch pos"]
    valid: Bool[torch.Tensor, "batch pos"]
    top_ids: Int[torch.Tensor, "site batch pos k"]
    top_logprobs: Float[torch.Tensor, "site batch pos k"]
    entropy: Float[torch.Tensor, "site batch pos"]
    kl_to_final: Float[torch.Tensor, "site batch pos"]
    next_ids: Int[torch.Tensor, "batch pos"]
    next_logprobs: Float[torch.Tensor, "site batch pos"]
    next_ranks: Int[torch.Tensor, "site batch pos"]
    target_ids: Int[torch.Tensor, "batch pos target"] | None
    target_logprobs: Float[torch.Tensor, "site batch pos target"] | None
    target_ranks: Int[torch.Tensor, "site batch pos target"] | None
    norm: str
    include_bias: bool
    lens_name: str = "logit lens"
    model_name: str = ""
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def top_probs(self) -> Float[torch.Tensor, "site batch pos k"]:
        return self.top_logprobs.exp()

    def top_tokens(self) -> list[list[list[list[str]]]]:
        """Top-k predictions as readable strings, nested ``[site][batch][pos][k]`` (pads: ``""``)."""
        flat = display_tokens(self.tokenizer, self.top_ids.clamp(min=0))
        out: list = []
        s_n, b_n, p_n, k = self.top_ids.shape
        it = iter(flat)
        valid = self.valid.tolist()
        for _ in range(s_n):
            site_rows = []
            for b in range(b_n):
                row = []
                for j in range(p_n):
                    toks = [next(it) for _ in range(k)]
                    row.append(toks if valid[b][j] else [""] * k)
                site_rows.append(row)
            out.append(site_rows)
        return out

    def input_tokens(self) -> list[list[str]]:
        """The input token at each read position, ``[batch][pos]`` (pads: ``""``)."""
        return input_tokens(self.positions, self.str_tokens)

    def select_sites(self, labels: Sequence[str]) -> LensResult:
        """A result holding only the named sites, in the given order."""
        missing = [lab for lab in labels if lab not in self.labels]
        if missing:
            raise ValueError(f"sites {missing} are not in this result; it has {list(self.labels)}")
        idx = torch.tensor([self.labels.index(lab) for lab in labels])

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return replace(
            self,
            labels=tuple(labels),
            top_ids=pick(self.top_ids),
            top_logprobs=pick(self.top_logprobs),
            entropy=pick(self.entropy),
            kl_to_final=pick(self.kl_to_final),
            next_logprobs=pick(self.next_logprobs),
            next_ranks=pick(self.next_ranks),
            target_logprobs=pick(self.target_logprobs),
            target_ranks=pick(self.target_ranks),
        )

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × prompt × position × top-k rank.

        Columns: ``site``, ``site_index``, ``prompt``, ``position``, ``input_token``, ``rank``,
        ``token_id``, ``token``, ``logprob``, ``prob``, ``entropy``, ``kl_to_final``,
        ``next_token``, ``next_logprob``, ``next_rank``. Padding is left out.
        """
        import pandas as pd

        s, b, j, r = long_index(self.top_ids.shape, self.valid)
        next_ids = self.next_ids.cpu()[b, j]
        ids = self.top_ids.cpu()[s, b, j, r]
        lp = self.top_logprobs.cpu()[s, b, j, r]
        labels = list(self.labels)
        return pd.DataFrame(
            {
                "site": [labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "rank": (r + 1).numpy(),
                "token_id": ids.numpy(),
                "token": display_tokens(self.tokenizer, ids),
                "logprob": lp.numpy(),
                "prob": lp.exp().numpy(),
                "entropy": self.entropy.cpu()[s, b, j].numpy(),
                "kl_to_final": self.kl_to_final.cpu()[s, b, j].numpy(),
                "next_token": [
                    "" if i < 0 else t
                    for i, t in zip(next_ids.tolist(), display_tokens(self.tokenizer, next_ids.clamp(min=0)))
                ],
                "next_logprob": self.next_logprobs.cpu()[s, b, j].numpy(),
                "next_rank": self.next_ranks.cpu()[s, b, j].numpy(),
            }
        )

    def target_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × prompt × position × target, with log-prob, prob and rank."""
        import pandas as pd

        if self.target_ids is None:
            raise ValueError("this result has no targets; pass targets=... to logit_lens")
        s, b, j, t = long_index(self.target_logprobs.shape, self.valid)
        ids = self.target_ids.cpu()[b, j, t]
        lp = self.target_logprobs.cpu()[s, b, j, t]
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "target_index": t.numpy(),
                "target_id": ids.numpy(),
                "target": display_tokens(self.tokenizer, ids),
                "logprob": lp.numpy(),
                "prob": lp.exp().numpy(),
                "rank": self.target_ranks.cpu()[s, b, j, t].numpy(),
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """The layers × positions heatmap; see :func:`tl_logitlens.plotting.lens_heatmap`."""
        from tl_logitlens.plotting import lens_heatmap

        return lens_heatmap(self, **kwargs)


def _resolve_targets(
    model: Any, targets: Targets, n_batch: int, n_pos: int
) -> Int[torch.Tensor, "batch pos target"] | None:
    """Shared targets (a token or list of tokens) or one id per row (a ``[batch]`` or ``[batch, pos]`` tensor)."""
    if targets is None:
        return None
    device = model.cfg.device
    if isinstance(targets, torch.Tensor) and targets.ndim >= 1:
        if targets.dtype.is_floating_point:
            raise TypeError(f"target ids must be integers, not {targets.dtype}")
        if targets.ndim == 1:
            if targets.shape[0] != n_batch:
                raise ValueError(
                    f"a 1-D target tensor gives one id per prompt; it has {targets.shape[0]} ids for "
                    f"{n_batch} prompts (for shared targets pass a list)"
                )
            targets = targets[:, None].expand(n_batch, n_pos)
        if targets.ndim != 2 or tuple(targets.shape) != (n_batch, n_pos):
            raise ValueError(
                f"per-row targets must be [batch] or [batch, pos] = [{n_batch}, {n_pos}], "
                f"got {list(targets.shape)}"
            )
        bad = (targets < 0) | (targets >= model.cfg.d_vocab)
        if bool(bad.any()):
            raise ValueError(
                f"target id {int(targets[bad][0])} is outside the vocabulary [0, {model.cfg.d_vocab})"
            )
        return targets.to(device).long()[..., None]
    if isinstance(targets, (str, int)) or isinstance(targets, torch.Tensor):
        targets = [targets]
    if not isinstance(targets, Sequence) or len(targets) == 0:
        raise ValueError("targets must be a token, a non-empty list of tokens, or a tensor of ids")
    ids = torch.tensor([resolve_token(model, t) for t in targets], device=device)
    return ids.expand(n_batch, n_pos, -1)


# Entry points check their own arguments with messages that say what to do; the run-time type
# checker used under pytest would pre-empt those messages, so it skips them (not their internals).
@no_type_check
def logit_lens(
    model: Any,
    inputs: Inputs,
    *,
    cache: Any = None,
    lens: Any = None,
    sites: str | Sequence[str] = "resid_pre",
    norm: str = "recompute",
    include_bias: bool = True,
    top_k: int = 5,
    targets: Targets = None,
    positions: PositionSpec = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> LensResult:
    """Run the logit lens over every site of the residual stream and every read position.

    Each residual state is normalised (``norm``: ``"recompute"`` is the logit lens, ``"cached"``
    the linear attribution view, ``"none"`` raw), projected with ``W_U`` (plus ``b_U`` when
    ``include_bias``), and reduced to: the top-k tokens and their log-probs, the entropy (nats), the
    KL divergence from the final layer's distribution to this one, ``KL(final ‖ site)`` (nats), the
    log-prob and rank of the actual next token, and of each of ``targets``.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        inputs: a string, a list of strings (right-padded and masked), or a token tensor.
        cache: an ``ActivationCache`` of these inputs on this model; computed when omitted.
        lens: ``None`` (the logit lens) or a lens object (e.g. a :class:`~tl_logitlens.TunedLens`)
            whose ``translate`` maps each site's states before the final norm reads them.
        sites: ``"resid_pre"`` (every layer's input, then ``final_post``), a list of kinds
            (add ``"resid_mid"`` to split attention from MLP), or explicit labels.
        targets: token strings or ids shared by every row, or a ``[batch]``/``[batch, pos]``
            tensor with one id per row.
        positions: ``None`` (all), ``"last"`` (last real token of each prompt), an int or a list.
        chunk_size: rows projected at once; peak extra memory is about
            ``4 · chunk_size · d_vocab · 4`` bytes (about 200 MB for GPT-2 at the default 256).
    """
    check_model(model)
    check_norm(norm)
    readout = Readout(model, resolve_lens(model, lens), norm, include_bias)
    d_vocab = model.cfg.d_vocab
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, not {type(top_k).__name__}")
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k={top_k} must be between 1 and d_vocab={d_vocab}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    site_list = resolve_sites(model, sites)
    batch: Batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos, attention_mask=attention_mask)
    pos_index, valid = resolve_positions(positions, batch)
    n_batch, n_pos = pos_index.shape
    target_ids = _resolve_targets(model, targets, n_batch, n_pos)
    final_site = Site("final_post", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    hooks = readout.hooks([*site_list, final_site])
    if cache is None:
        cache = run_cache(model, batch.tokens, batch.mask if batch.padded else None, hooks)
    else:
        check_cache(cache, model, hooks, batch.tokens)

    device = batch.tokens.device
    lengths = batch.lengths
    nxt_pos = pos_index + 1
    has_next = valid & (nxt_pos < lengths[:, None])
    next_ids = torch.where(
        has_next, batch.tokens.gather(1, nxt_pos.clamp(max=batch.tokens.shape[1] - 1)), -1
    )

    rows_b, rows_j = valid.nonzero(as_tuple=True)
    rows_p = pos_index[rows_b, rows_j]
    n_sites = len(site_list)
    # query ids per row: the next token (0 where none) then the targets
    query = next_ids[rows_b, rows_j].clamp(min=0)[:, None]
    if target_ids is not None:
        query = torch.cat([query, target_ids[rows_b, rows_j]], dim=-1)
    metrics = site_metrics(
        lambda s, sl: readout.logits(cache, site_list[s], rows_b[sl], rows_p[sl]),
        n_sites,
        lambda sl: readout.logits(cache, final_site, rows_b[sl], rows_p[sl]),
        frozenset(s for s, site in enumerate(site_list) if site.hook == final_site.hook),
        query,
        top_k,
        chunk_size,
        d_vocab,
        device,
    )
    out_ids, out_lp, out_h, out_kl = metrics.top_ids, metrics.top_logprobs, metrics.entropy, metrics.kl_to_final
    out_qlp, out_qrank = metrics.query_logprobs, metrics.query_ranks

    def scatter(values: torch.Tensor, fill: float | int) -> torch.Tensor:
        full = torch.full(
            (n_sites, n_batch, n_pos, *values.shape[2:]), fill, dtype=values.dtype, device=device
        )
        full[:, rows_b, rows_j] = values
        return full

    nan = float("nan")
    next_lp = scatter(out_qlp[..., 0], nan)
    next_rank = scatter(out_qrank[..., 0], -1)
    no_next = ~has_next
    next_lp[:, no_next] = nan
    next_rank[:, no_next] = -1
    return LensResult(
        labels=tuple(s.label for s in site_list),
        tokens=batch.tokens,
        str_tokens=batch.str_tokens,
        positions=pos_index,
        valid=valid,
        top_ids=scatter(out_ids, -1),
        top_logprobs=scatter(out_lp, nan),
        entropy=scatter(out_h, nan),
        kl_to_final=scatter(out_kl, nan),
        next_ids=next_ids,
        next_logprobs=next_lp,
        next_ranks=next_rank,
        target_ids=None if target_ids is None else torch.where(valid[..., None], target_ids, -1),
        target_logprobs=None if target_ids is None else scatter(out_qlp[..., 1:], nan),
        target_ranks=None if target_ids is None else scatter(out_qrank[..., 1:], -1),
            norm=norm,
        include_bias=include_bias,
        lens_name=readout.name,
        model_name=getattr(model.cfg, "model_name", ""),
        tokenizer=getattr(model, "tokenizer", None),
    )
