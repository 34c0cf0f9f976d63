"""The logit lens: what each layer of the residual stream would predict if the model stopped there.

Memory is bounded by ``chunk_size``: states are projected to the vocabulary ``chunk_size`` rows at a
time and each ``[rows, d_vocab]`` block is reduced to its metrics at once (:mod:`tl_logitlens.core.kernel`),
so the full ``[site, batch, pos, d_vocab]`` tensor never exists unless asked for (``keep_logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.frames import long_index, position_columns
from tl_logitlens.core.inputs import (
    Inputs,
    PositionSpec,
    Targets,
    check_count,
    check_flag,
    prepare_inputs,
    resolve_positions,
)
from tl_logitlens.core.kernel import NonFiniteError, Unembedding, unembed_metrics
from tl_logitlens.core.readout import Readout, Site, check_model, check_norm, final_site, resolve_sites
from tl_logitlens.core.results import (
    DepthRows,
    LensStatistics,
    common_fields,
    joined_batches,
    nested_token_strings,
    selected_prompts,
    token_strings,
)
from tl_logitlens.core.run import Run, execute
from tl_logitlens.core.token_sets import Targets as TargetIds
from tl_logitlens.core.token_sets import resolve_targets
from tl_logitlens.lenses import resolve_lens, sites_or_default

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

DEFAULT_CHUNK_SIZE = 256
# keep_logprobs=True refuses a [site, batch, pos, d_vocab] tensor above this many bytes unless raised
DEFAULT_MAX_LOGPROBS_BYTES = 2 * 1024**3

_SITE_FIELDS = (
    "top_ids", "top_logprobs", "entropy", "kl_to_final", "next_logprobs", "next_ranks",
    "target_logprobs", "target_ranks", "final_top_logprobs", "final_top_ranks", "full_logprobs",
)
# each prompt-indexed tensor field and its batch dim (the read-position dim comes right after it)
_BATCH_DIMS = {**dict.fromkeys(_SITE_FIELDS, 1), "next_ids": 0, "target_ids": 0, "final_top_ids": 0}


@dataclass(frozen=True, kw_only=True, repr=False)
class LensResult(LensStatistics):
    """Per site, prompt and read position: the lens's prediction and how it compares.

    Tensors are indexed ``[site, batch, pos]`` where ``pos`` runs over the *read* positions
    (``positions[b, j]`` is the token position of column ``j`` in prompt ``b``). Entries where
    ``valid`` is False are padding: ids are -1 and values NaN. Log-probs and entropies are in nats;
    ranks count from 1 (the top token) over the full vocabulary.

    ``final_top_ids`` (with ``final_top_k=n``) are the final site's top-``n`` tokens at each read
    position, and ``final_top_logprobs``/``final_top_ranks`` their log-prob and rank at every site:
    the probability-evolution view in one call. ``full_logprobs`` (with ``keep_logprobs=True``) is the
    whole log-softmax, ``[site, batch, pos, d_vocab]``.
    """

    next_ids: Int[torch.Tensor, "batch pos"]
    next_logprobs: Float[torch.Tensor, "site batch pos"]
    next_ranks: Int[torch.Tensor, "site batch pos"]
    target_ids: Int[torch.Tensor, "batch pos target"] | None
    norm: str
    include_bias: bool
    final_top_ids: Int[torch.Tensor, "batch pos n"] | None = None
    final_top_logprobs: Float[torch.Tensor, "site batch pos n"] | None = None
    final_top_ranks: Int[torch.Tensor, "site batch pos n"] | None = None

    @property
    def top_probs(self) -> Float[torch.Tensor, "site batch pos k"]:
        return self.top_logprobs.exp()

    def top_tokens(self) -> list[list[list[list[str]]]]:
        """Top-k predictions as readable strings, nested ``[site][batch][pos][k]`` (pads: ``""``)."""
        return nested_token_strings(self.tokenizer, self.top_ids)

    def select_sites(self, labels: Sequence[str]) -> LensResult:
        """A result holding only the named sites, in the given order."""
        missing = [lab for lab in labels if lab not in self.labels]
        if missing:
            raise ValueError(f"sites {missing} are not in this result; it has {list(self.labels)}")
        idx = torch.tensor([self.labels.index(lab) for lab in labels])
        picked = {name: getattr(self, name) for name in _SITE_FIELDS}
        picked = {name: None if t is None else t[idx.to(t.device)] for name, t in picked.items()}
        return replace(self, labels=tuple(labels), **picked)

    @classmethod
    def concat(cls, parts: Sequence[LensResult]) -> LensResult:
        """Lens results of disjoint batches (same sites, settings, targets) joined along the batch.

        Shorter batches are padded along ``pos`` (and ``seq``) exactly as ``logit_lens`` pads a
        batch: ``valid`` False, ids -1, values NaN, ranks -1.
        """
        if not parts:
            raise ValueError("concat needs at least one LensResult")
        if len({(p.labels, p.norm, p.include_bias, p.lens_name) for p in parts}) != 1:
            raise ValueError("concat joins results with the same sites, norm, include_bias and lens")
        if len(parts) == 1:
            return parts[0]
        return replace(parts[0], **joined_batches(parts, _BATCH_DIMS))

    def select_prompts(self, order: Sequence[int]) -> LensResult:
        """The prompts ``order[0], order[1], ...`` of this result, in that order (axes and padding kept)."""
        return replace(self, **selected_prompts(self, order, _BATCH_DIMS))

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × prompt × position × top-k rank.

        Columns: ``site``, ``site_index``, ``prompt``, ``position``, ``input_token``, ``rank``,
        ``token_id``, ``token``, ``logprob``, ``prob``, ``entropy``, ``kl_to_final``,
        ``next_token``, ``next_logprob``, ``next_rank``, ``lens``. Padding is left out.
        """
        import pandas as pd

        s, b, j, r = long_index(self.top_ids.shape, self.valid)
        ids = self.top_ids.cpu()[s, b, j, r]
        lp = self.top_logprobs.cpu()[s, b, j, r]
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "rank": (r + 1).numpy(),
                "token_id": ids.numpy(),
                "token": token_strings(self.tokenizer, ids),
                "logprob": lp.numpy(),
                "prob": lp.exp().numpy(),
                "entropy": self.entropy.cpu()[s, b, j].numpy(),
                "kl_to_final": self.kl_to_final.cpu()[s, b, j].numpy(),
                "next_token": token_strings(self.tokenizer, self.next_ids.cpu()[b, j]),
                "next_logprob": self.next_logprobs.cpu()[s, b, j].numpy(),
                "next_rank": self.next_ranks.cpu()[s, b, j].numpy(),
                "lens": self.lens_name,
            }
        )

    def target_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × prompt × position × target, with log-prob, prob and rank.

        A token-set target is named by its label (``{park}``) in ``target``; ``target_id`` is its
        first token and ``n_tokens`` how many tokens its probability sums (1 for a single token)."""
        import pandas as pd

        if self.target_ids is None:
            raise ValueError("this result has no targets; pass targets=... to logit_lens")
        s, b, j, t = long_index(self.target_logprobs.shape, self.valid)
        ids = self.target_ids.cpu()[b, j, t]
        lp = self.target_logprobs.cpu()[s, b, j, t]
        sets = self.target_sets or (None,) * self.target_ids.shape[-1]
        names = token_strings(self.tokenizer, ids)
        names = [n if sets[i] is None else sets[i].label for n, i in zip(names, t.tolist())]
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "target_index": t.numpy(),
                "target_id": ids.numpy(),
                "target": names,
                "n_tokens": [1 if sets[i] is None else len(sets[i]) for i in t.tolist()],
                "logprob": lp.numpy(),
                "prob": lp.exp().numpy(),
                "rank": self.target_ranks.cpu()[s, b, j, t].numpy(),
                "lens": self.lens_name,
            }
        )

    def depth_rows(self) -> DepthRows:
        """One row per read position (see :class:`~tl_logitlens.core.results.DepthRows`). The layer count is
        never guessed from the sites: a lens may read any subset of them."""
        b, j = self.valid.cpu().nonzero(as_tuple=True)
        inputs = self.input_tokens()
        shown = [inputs[x][y] for x, y in zip(b.tolist(), j.tolist())]
        return DepthRows(torch.stack([b, j]), b, self.positions.cpu()[b, j], shown, "causal", None)

    def plot(self, **kwargs: Any) -> go.Figure:
        """The layers × positions heatmap: keyword arguments go to
        :func:`tl_logitlens.plotting.lens_heatmap` (``color=`` "prob", "logprob", "entropy", "rank"
        or "kl"; ``prompt=``; ``max_positions=``; colour-scale options; see its docstring)."""
        from tl_logitlens.plotting import lens_heatmap

        return lens_heatmap(self, **kwargs)


# Entry points check their own arguments with messages that say what to do; the run-time type
# checker used under pytest would pre-empt those messages, so it skips them (not their internals).
@no_type_check
def logit_lens(
    model: Any,
    inputs: Inputs,
    *,
    cache: Any = None,
    lens: Any = None,
    sites: str | Sequence[str] | None = None,
    norm: str = "recompute",
    include_bias: bool = True,
    top_k: int = 5,
    targets: Targets = None,
    final_top_k: int = 0,
    positions: PositionSpec = None,
    keep_logprobs: bool = False,
    max_logprobs_bytes: int = DEFAULT_MAX_LOGPROBS_BYTES,
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
        inputs: a string, a list of strings (right-padded and run without an attention mask: no real
            token attends to a later pad; padding cells are marked in ``valid``), or a token tensor.
        cache: an ``ActivationCache`` of these inputs on this model; computed when omitted.
        lens: ``None`` (the logit lens) or a lens object (e.g. a :class:`~tl_logitlens.TunedLens`)
            whose ``translate`` maps each site's states before the final norm reads them.
        sites: a kind, ``"resid_pre"`` (every layer's input, then ``final_post``) or
            ``"resid_post"`` (every block's output), a list of kinds (add ``"resid_mid"`` to split
            attention from MLP), or explicit labels. Default (``None``): the lens's own
            ``default_sites``: ``"resid_pre"`` for the logit and tuned lenses, ``"resid_post"`` for the
            Jacobian lens (the sites it reads). Sites given are read as given.
        targets: token strings, ids or word-level token sets (:func:`~tl_logitlens.token_set`; a set's
            log-prob is the log of its tokens' summed probability, its rank their best) shared by
            every row, or a ``[batch, 1]``/``[batch, pos]`` tensor with one id per prompt or per read
            position. A string of several tokens counts as the set of its first token, with a
            :class:`~tl_logitlens.core.token_sets.MultiTokenTargetWarning`
            (:func:`~tl_logitlens.single_token` raises instead).
        final_top_k: also follow the final site's top-``n`` tokens at every site
            (``final_top_ids``, ``final_top_logprobs``, ``final_top_ranks``).
        positions: ``None`` (all), ``"last"`` (last real token of each prompt), an int or a list.
        keep_logprobs: keep the whole log-softmax as ``full_logprobs``; refused with its size above
            ``max_logprobs_bytes`` (2 GiB by default; raise it if you have the memory).
        chunk_size: rows projected at once; peak extra memory is about
            ``4 · chunk_size · d_vocab · 4`` bytes (about 200 MB for GPT-2 at the default 256).

    Raises:
        ValueError, TypeError: bad arguments, with what to pass instead; a ``cache`` computed
            from other inputs or another model; a site the lens does not read (the message names the
            sites it reads).

    Example:
        >>> lens = tl.logit_lens(model, "The Eiffel Tower is in the city of", targets=[" Paris"])
        >>> lens.top_tokens()[-1][0][-1]      # the model's own top-5 at the last position
    """
    check_model(model)
    check_norm(norm)
    check_flag(include_bias, "include_bias")
    check_flag(keep_logprobs, "keep_logprobs")
    d_vocab = model.cfg.d_vocab
    check_count(top_k, "top_k", 1, d_vocab)
    check_count(final_top_k, "final_top_k", 0, d_vocab)
    check_count(chunk_size, "chunk_size", 1)
    readout = Readout(model, resolve_lens(model, lens), norm, include_bias)
    site_list = resolve_sites(model, sites_or_default(model, sites, [readout.lens]))
    batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos, attention_mask=attention_mask)
    pos_index, valid = resolve_positions(positions, batch)
    target_ids = resolve_targets(model, targets, *pos_index.shape)
    if keep_logprobs:
        check_count(max_logprobs_bytes, "max_logprobs_bytes", 1)
        size = len(site_list) * int(valid.sum()) * d_vocab * 4
        if size > max_logprobs_bytes:
            raise ValueError(
                f"keep_logprobs=True would keep {size / 2**30:.2f} GiB of log-probs ([site, batch, pos, "
                f"d_vocab] float32), over max_logprobs_bytes={max_logprobs_bytes}; read fewer positions or "
                "sites, or raise max_logprobs_bytes"
            )
    final = final_site(model)
    run = execute(model, batch, pos_index, valid, readout.hooks([*site_list, final]), cache)
    return _lens(run, readout, site_list, final, target_ids, top_k, final_top_k, keep_logprobs, chunk_size)


def _lens(
    run: Run,
    readout: Readout,
    site_list: Sequence[Site],
    final: Site,
    target_ids: TargetIds | None,
    top_k: int,
    final_top_k: int,
    keep_logprobs: bool,
    chunk_size: int,
) -> LensResult:
    """The lens of every site at the run's read rows, reduced by the metric kernel into a result."""
    model, batch, cache = readout.model, run.batch, run.cache
    tokens, lengths = batch.tokens, batch.lengths
    has_next = run.valid & (run.positions + 1 < lengths[:, None])
    next_ids = torch.where(has_next, tokens.gather(1, (run.positions + 1).clamp(max=tokens.shape[1] - 1)), -1)
    rows = run.valid_rows()

    def logits(site: Site, sl: slice) -> torch.Tensor:
        return readout.logits(cache, site, rows.b[sl], rows.p[sl])

    # per row: the next token (0 where none), the targets, the final site's top tokens
    query = [next_ids[rows.b, rows.j].clamp(min=0)[:, None]]
    if target_ids is not None:
        query.append(target_ids.query(rows.b, rows.j))
    final_top = None
    if final_top_k:
        final_top = torch.cat(
            [logits(final, slice(i, i + chunk_size)).topk(final_top_k, -1).indices for i in range(0, len(rows), chunk_size)]
        ) if len(rows) else torch.empty(0, final_top_k, dtype=torch.long, device=tokens.device)
        query.append(final_top)

    def normed(site: Site, sl: slice) -> torch.Tensor:
        return readout.normed(cache, site, rows.b[sl], rows.p[sl])

    # the unembedding is folded one vocabulary tile at a time: logits never leave the cache
    try:
        m = unembed_metrics(
            lambda s, sl: normed(site_list[s], sl),
            len(site_list),
            lambda sl: normed(final, sl),
            frozenset(s for s, site in enumerate(site_list) if site.hook == final.hook),
            torch.cat(query, dim=-1),
            top_k,
            chunk_size,
            Unembedding.from_model(model, readout.include_bias),
            tokens.device,
        )
    except NonFiniteError as err:
        b, p = int(rows.b[err.row]), int(rows.p[err.row])
        label = final.label if err.site is None else site_list[err.site].label
        raise err.explain(f"site {label!r}, prompt {b}, position {p}") from None
    n_t = 0 if target_ids is None else target_ids.n_queries
    shape = tuple(run.positions.shape)

    def scatter(values: torch.Tensor, fill: float | int) -> torch.Tensor:
        return rows.scatter(values, shape, fill)

    nan = float("nan")
    next_lp, next_rank = scatter(m.query_logprobs[..., 0], nan), scatter(m.query_ranks[..., 0], -1)
    next_lp[:, ~has_next] = nan
    next_rank[:, ~has_next] = -1
    targeted = slice(1, 1 + n_t)
    tracked = slice(1 + n_t, None)
    target_lp = target_rank = None
    if target_ids is not None:  # a token set's tokens reduced to one log-prob and rank
        target_lp, target_rank = target_ids.reduce(m.query_logprobs[..., targeted], m.query_ranks[..., targeted], rows.b, rows.j)
    full = None
    if keep_logprobs:
        with torch.no_grad():  # a result holds values, not the autograd graph of [site, row, d_vocab] blocks
            full = torch.stack(
                [torch.cat([torch.log_softmax(logits(site, slice(i, i + chunk_size)), -1)
                            for i in range(0, len(rows), chunk_size)]) for site in site_list]
            )
        full = scatter(full, nan)
    return LensResult(
        **common_fields(model, batch, run.positions, run.valid, readout.name),
        labels=tuple(s.label for s in site_list),
        top_ids=scatter(m.top_ids, -1),
        top_logprobs=scatter(m.top_logprobs, nan),
        entropy=scatter(m.entropy, nan),
        kl_to_final=scatter(m.kl_to_final, nan),
        next_ids=next_ids,
        next_logprobs=next_lp,
        next_ranks=next_rank,
        target_ids=None if target_ids is None else torch.where(run.valid[..., None], target_ids.ids, -1),
        target_logprobs=None if target_lp is None else scatter(target_lp, nan),
        target_ranks=None if target_rank is None else scatter(target_rank, -1),
        target_sets=None if target_ids is None else target_ids.sets,
        final_top_ids=None if final_top is None else scatter(final_top[None], -1)[0],
        final_top_logprobs=None if final_top is None else scatter(m.query_logprobs[..., tracked], nan),
        final_top_ranks=None if final_top is None else scatter(m.query_ranks[..., tracked], -1),
        full_logprobs=full,
        norm=readout.norm,
        include_bias=readout.include_bias,
    )
