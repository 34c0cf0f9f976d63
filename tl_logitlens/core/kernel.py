"""The lens's metric kernel: a site's logits reduced to every statistic the lens reports.

Every analysis that turns a site's logits into a distribution (the causal lens, the masked-LM lens,
the corpus evaluator) reduces them here, so all of them are exactly as accurate as each other.

:func:`unembed_metrics` takes normalised states and an :class:`Unembedding` and computes the
logits one vocabulary tile (``tile_size`` columns) at a time, folding each tile into running
statistics while it is still in cache (online log-sum-exp, entropy and KL terms with a stable
rescaling, a running top-k, rank counts), so one ``[chunk_size, d_vocab]`` block is never written
to main memory: the reductions cost a few percent of the unembedding matmul. It works
``chunk_size`` rows at a time, so the full ``[site, row, d_vocab]`` tensor never exists.
:func:`block_metrics` is the whole-block version, kept as the readable definition (and the tests'
reference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.devices import to_device


class NonFiniteError(ValueError):
    """A site's logits hold NaN or inf, so its statistics would be meaningless.

    Raised by the kernel with the site (an index into the sites it was given, or None for the final
    distribution every site is compared with) and the row; the analysis that called it knows what
    they are and re-raises with :meth:`explain`, which names the site, prompt and position. It is a
    ``ValueError``, so nothing computed from non-finite values is ever returned.
    """

    def __init__(self, site: int | None, row: int) -> None:
        super().__init__(f"non-finite logits (NaN or inf) at {'the final site' if site is None else f'site {site}'}, row {row}")
        self.site = site
        self.row = row

    def explain(self, where: str, who: str = "the lens") -> ValueError:
        """A ``ValueError`` saying where (``where``: e.g. "site '2_pre', prompt 0, position 5") and what to check;
        ``who`` met the values ("the lens", "direct logit attribution")."""
        return ValueError(
            f"{who} met NaN or inf at {where}: the residual state, the final norm, W_U/b_U or the lens's "
            "weights hold non-finite values there, so no statistic is computed from it. Check the model's "
            "weights (a broken checkpoint), its dtype (float16 overflows; load float32 or bfloat16) and the "
            "lens's weights"
        )


def check_finite(final_lse: torch.Tensor | None, statistics: dict[str, torch.Tensor], row0: int) -> None:
    """Raise :class:`NonFiniteError` where the statistics of a block of rows (numbered from ``row0``) are
    not finite: at the shallowest site whose own log-probs or entropy are not (where a NaN first
    appears), else at the final distribution (``final_lse``, its log-sum-exp), else at a site whose KL
    is not. A few reductions over ``[site, row]`` values: free next to the unembedding."""
    own = torch.isfinite(statistics["top_logprobs"][..., 0]) & torch.isfinite(statistics["entropy"])
    if not bool(own.all()):
        site, row = (~own).nonzero()[0].tolist()  # site-major: the shallowest site first
        raise NonFiniteError(site, row0 + row)
    if final_lse is not None and not bool(torch.isfinite(final_lse).all()):
        raise NonFiniteError(None, row0 + int((~torch.isfinite(final_lse)).nonzero()[0, 0]))
    kl = torch.isfinite(statistics["kl_to_final"])
    if not bool(kl.all()):
        site, row = (~kl).nonzero()[0].tolist()
        raise NonFiniteError(site, row0 + row)


def check_finite_cells(
    values: Float[torch.Tensor, "row batch pos *rest"],
    valid: torch.Tensor,
    positions: Int[torch.Tensor, "batch pos"],
    row_name: Callable[[int], str],
    who: str = "the lens",
    order: Sequence[int] | None = None,
) -> None:
    """Raise ``ValueError`` (:meth:`NonFiniteError.explain`) at the first non-finite value of a linear
    readout's ``[row, batch, pos, ...]`` grid (a site, an attribution row) among the ``valid`` cells,
    naming the row (``row_name``), the prompt and the token position (``positions[b, j]``). Rows are
    searched in ``order`` (default: as given, shallowest site first), so the name is where a NaN first
    appears. Padding cells are not checked. One reduction over values already computed: free next to
    what produced them."""
    bad = ~torch.isfinite(values) & valid.reshape(1, *valid.shape, *([1] * (values.ndim - 3))).to(values.device)
    bad_cells = bad.flatten(3).any(-1)  # [row, batch, pos]
    bad_rows = bad_cells.flatten(1).any(-1).tolist()
    if not any(bad_rows):
        return
    row = next(r for r in (range(len(bad_rows)) if order is None else order) if bad_rows[r])
    b, j = bad_cells[row].nonzero()[0].tolist()
    where = f"{row_name(row)}, prompt {b}, position {int(positions[b, j])}"
    raise NonFiniteError(row, b).explain(where, who)


@dataclass(frozen=True)
class FinalDistribution:
    """The distribution every site is compared with (the model's own output), for one block of rows.

    ``probs`` are its probabilities, ``neg_entropy`` is ``Σ q·log q`` (nats), ``top1`` its argmax.
    """

    probs: Float[torch.Tensor, "row d_vocab"]
    neg_entropy: Float[torch.Tensor, " row"]
    top1: Int[torch.Tensor, " row"]


@dataclass(frozen=True)
class BlockMetrics:
    """The lens statistics of one block of rows, ``[row, ...]`` (see :func:`block_metrics`); in
    :class:`SiteMetrics` the same fields stacked over sites, ``[site, row, ...]``."""

    top_ids: Int[torch.Tensor, "*site row k"]
    top_logprobs: Float[torch.Tensor, "*site row k"]
    entropy: Float[torch.Tensor, "*site row"]
    kl_to_final: Float[torch.Tensor, "*site row"]
    query_logprobs: Float[torch.Tensor, "*site row q"]
    query_ranks: Int[torch.Tensor, "*site row q"]


class Workspace:
    """Scratch buffers reused by every block: one ``[rows, d_vocab]`` float32 block and a ones vector."""

    def __init__(self, rows: int, d_vocab: int, device: torch.device | str) -> None:
        self.scratch = torch.empty(rows, d_vocab, device=device)
        self.ones = torch.ones(d_vocab, 1, device=device)

    def block(self, rows: int) -> Float[torch.Tensor, "row d_vocab"]:
        return self.scratch[:rows]


@torch.inference_mode()
def final_distribution(z: Float[torch.Tensor, "row d_vocab"], ws: Workspace) -> FinalDistribution:
    """The reference distribution of float32 logits ``z``."""
    probs = torch.softmax(z, dim=-1)
    top1 = z.argmax(-1, keepdim=True)
    lse = _lse_from_top(z, probs, top1)
    neg_entropy = _rowdot(probs, torch.sub(z, lse[:, None], out=ws.block(z.shape[0])))
    return FinalDistribution(probs=probs, neg_entropy=neg_entropy, top1=top1[:, 0])


@torch.inference_mode()
def block_metrics(
    z: Float[torch.Tensor, "row d_vocab"],
    final: FinalDistribution,
    query_ids: Int[torch.Tensor, "row q"],
    top_k: int,
    ws: Workspace,
) -> BlockMetrics:
    """Reduce one block of float32 logits to the lens metrics.

    With ``log p = z - logsumexp(z)`` written once into the workspace: entropy ``H = -Σ p·log p``,
    ``KL(final ‖ p) = Σ q·log q - Σ q·log p`` for the final distribution ``q``; the rank of a token
    is 1 + the number of tokens with a strictly larger logit. Summing ``p·log p`` rather than
    ``p·z`` keeps every term small, so the float32 sums stay accurate to ~1e-5 nats over a 50k
    vocabulary.
    """
    top_vals, top_ids = z.topk(top_k, dim=-1)
    probs = torch.softmax(z, dim=-1)
    lse = _lse_from_top(z, probs, top_ids[:, :1])
    logp = torch.sub(z, lse[:, None], out=ws.block(z.shape[0]))
    entropy = -_rowdot(probs, logp)
    del probs
    kl = final.neg_entropy - _rowdot(final.probs, logp)
    q_logits = z.gather(-1, query_ids)
    # counting in float32 through a mat-vec is 4x faster than summing a bool tensor, and exact:
    # counts stay far below 2**24 (the workspace is free again once the log-probs are used)
    above = ws.block(z.shape[0])
    ranks = torch.empty_like(q_logits, dtype=torch.long)
    for i in range(q_logits.shape[1]):
        torch.gt(z, q_logits[:, i : i + 1], out=above)
        ranks[:, i] = 1 + (above @ ws.ones).reshape(-1).long()
    return BlockMetrics(
        top_ids=top_ids,
        top_logprobs=top_vals - lse[:, None],
        entropy=entropy,
        kl_to_final=kl,
        query_logprobs=q_logits - lse[:, None],
        query_ranks=ranks,
    )


def _lse_from_top(
    z: Float[torch.Tensor, "row d_vocab"], probs: Float[torch.Tensor, "row d_vocab"], top: Int[torch.Tensor, "row 1"]
) -> Float[torch.Tensor, " row"]:
    """``logsumexp(z)`` read off the top entry: ``log p_top = z_top - lse``; ``p_top >= 1/d_vocab``
    keeps the log well conditioned, and it saves a pass over the block."""
    return (z.gather(-1, top) - probs.gather(-1, top).log()).squeeze(-1)


def _rowdot(
    a: Float[torch.Tensor, "row n"], b: Float[torch.Tensor, "row n"], block: int = 4096
) -> Float[torch.Tensor, " row"]:
    """``(a * b).sum(-1)`` without a ``[row, n]`` temporary, accurate in float32.

    One mat-vec over 50k terms accumulates ~1e-4 of rounding; summing ``block``-long batched
    mat-vec partials keeps the error at the level of a pairwise ``sum`` (~1e-5 nats on GPT-2's
    vocabulary), and is faster than either (the blocks stay in cache).
    """
    parts = [
        torch.bmm(a[:, j : j + block, None].transpose(1, 2), b[:, j : j + block, None]).reshape(-1)
        for j in range(0, a.shape[1], block)
    ]
    return torch.stack(parts, -1).sum(-1)


@dataclass(frozen=True)
class SiteMetrics(BlockMetrics):
    """:class:`BlockMetrics` of every site, stacked ``[site, row, ...]``, and the final top-1 ``[row]``."""

    final_top1: Int[torch.Tensor, " row"]


# Vocabulary columns per tile: a [256, 2048] float32 block is 2 MiB, so the few blocks a fold uses
# stay in the last-level cache.
DEFAULT_TILE_SIZE = 2048
# Rows per matmul: each tile's logits of a group of sites come from one matmul of their stacked states
# (a chunk's rows of up to GROUP_ROWS // chunk_size sites), so W_U's tile is read and packed once per group
# rather than once per site, and the matmul is tall enough to run at full speed. unembed_metrics over 13
# GPT-2-small sites of 2 x 256 rows on one AVX-512 BF16 core (best of 3, interleaved), over the matmul floor
# of the model's dtype: bf16 1.30x one site per matmul, 1.19x with 4096 rows; fp32 0.84x and 0.79x. The
# group's output is the largest buffer: [4096, 2048] in W_U's dtype (16 MiB in bf16, 32 MiB in float32).
GROUP_ROWS = 4096


# The tile's top-k is found among the top-k groups of _GROUP columns (by group maximum): one cheap
# pass instead of a full per-row top-k, which costs as much as the rest of the fold together.
_GROUP = 64
_LOG2_E = 1.4426950408889634  # log2(e)
_LN_2 = 0.6931471805599453  # ln(2) = 1 / log2(e)


@dataclass(frozen=True)
class Unembedding:
    """What turns normalised states into float32 logits: ``transform(float(x @ W_U + b_U))``.

    The matmul runs in ``W_U``'s dtype (the model's), its result is rounded to that dtype and then
    converted to float32, exactly as :func:`tl_logitlens.core.readout.unembed` does; ``transform`` is the
    model's own elementwise post-unembedding step (a soft cap or a logit scaling) or None. Because
    it is elementwise it applies to one tile of columns, or to a few gathered columns, alike.
    """

    W_U: Float[torch.Tensor, "d_model d_vocab"]
    b_U: Float[torch.Tensor, " d_vocab"] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_model(cls, model: Any, include_bias: bool = True) -> Unembedding:
        """The unembedding of a TransformerLens model, as :func:`~tl_logitlens.core.readout.unembed` applies it."""
        from tl_logitlens.core.compat import output_logits_transform
        from tl_logitlens.core.readout import soft_cap, transform_logits

        has_transform = output_logits_transform(model) is not None or soft_cap(model) is not None
        b_U = getattr(model, "b_U", None) if include_bias else None
        return cls(
            W_U=model.W_U,
            b_U=b_U,
            transform=(lambda z: transform_logits(model, z)) if has_transform else None,
        )

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]

    def logits(self, x: Float[torch.Tensor, "row d_model"], cols: slice) -> Float[torch.Tensor, "row col"]:
        """Float32 logits of the columns ``cols``."""
        return self.to_float(self.matmul(x, cols))

    def matmul(
        self, x: Float[torch.Tensor, "row d_model"], cols: slice, out: torch.Tensor | None = None
    ) -> Float[torch.Tensor, "row col"]:
        """``x @ W_U[:, cols] (+ b_U[cols])`` in ``W_U``'s dtype (into ``out`` when given): the logits before
        :meth:`to_float`."""
        w = self.W_U[:, cols]
        if self.b_U is not None:
            return torch.addmm(self.b_U[cols], x, w, out=out)
        return torch.mm(x, w, out=out)

    def to_float(
        self, z: Float[torch.Tensor, "row col"], out: Float[torch.Tensor, "row col"] | None = None
    ) -> Float[torch.Tensor, "row col"]:
        """:meth:`matmul`'s result as float32 logits (converted into ``out`` when given and needed), then
        transformed."""
        if z.dtype != torch.float32:
            z = z.float() if out is None else out.copy_(z)
        return z if self.transform is None else self.transform(z).float()

    def gather_logits(
        self, x: Float[torch.Tensor, "*site row d_model"], ids: Int[torch.Tensor, "row q"]
    ) -> Float[torch.Tensor, "*site row q"]:
        """Float32 logits of the tokens ``ids[r]`` of each row ``r``: ``x[..., r, :] @ W_U[:, ids[r]]``, a small
        gather-matmul (float32 accumulation, rounded to the model's dtype as the full matmul is). Leading
        dimensions of ``x`` (sites) share one gather of ``W_U``'s columns: the gather, strided over a
        ``[d_model, d_vocab]`` matrix, costs as much as all the small matmuls together."""
        w = self.W_U[:, ids].permute(1, 0, 2).float()  # [row, d_model, q]
        lead = x.shape[:-2]
        xs = x.float().reshape(-1, *x.shape[-2:]).transpose(0, 1)  # [row, site, d_model]
        z = torch.bmm(xs, w).transpose(0, 1).reshape(*lead, *ids.shape)
        if self.b_U is not None:
            z = z + self.b_U[ids].float()
        z = z.to(self.W_U.dtype).float()
        return z if self.transform is None else self.transform(z).float()


class _Buffers:
    """Scratch reused by every fold: the output of one stacked matmul (a group of sites' logits for one
    tile, ``[group_rows, tile]`` in ``W_U``'s dtype), and ``[rows, tile]`` float32 blocks: a work block
    (comparisons, a site's ``exp`` and its products), the final distribution's ``exp`` (which every
    site's fold reads) and, where ``W_U`` is not float32, one site's logits converted to float32 (a
    float32 matmul's output is folded where it lies). Views are cut from flat storage, so a narrower
    last tile or a shorter last chunk is still contiguous."""

    WORK, FINAL_EXP, LOGITS = range(3)

    def __init__(self, rows: int, group_rows: int, tile: int, device: torch.device | str, mm_dtype: torch.dtype) -> None:
        self.tile = tile
        self._f32 = torch.empty(2 if mm_dtype == torch.float32 else 3, rows * tile, device=device)
        self._mm = torch.empty(group_rows * tile, dtype=mm_dtype, device=device)

    def get(self, which: int, rows: int, cols: int) -> torch.Tensor:
        return self._f32[which, : rows * cols].view(rows, cols)

    def matmul(self, rows: int, cols: int) -> torch.Tensor:
        return self._mm[: rows * cols].view(rows, cols)

    def logits(self, rows: int, cols: int) -> torch.Tensor | None:
        """The block a 16-bit site's logits are converted into; None for a float32 matmul (folded in place)."""
        return None if self._mm.dtype == torch.float32 else self.get(self.LOGITS, rows, cols)


def _site_tiles(
    unembedding: Unembedding, xs: Float[torch.Tensor, "site row d_model"], cols: slice, per_group: int, buffers: _Buffers
) -> Iterator[Float[torch.Tensor, "row col"]]:
    """Each site's float32 logits of the columns ``cols``, in ``xs``'s order: one matmul per ``per_group`` sites
    (their states stacked), each site's part converted as it is asked for (the next overwrites it)."""
    rows, width = xs.shape[1], cols.stop - cols.start
    for g in range(0, len(xs), per_group):
        group = xs[g : g + per_group].flatten(0, 1)
        raw = unembedding.matmul(group, cols, buffers.matmul(group.shape[0], width))
        for part in raw.split(rows):
            yield unembedding.to_float(part, buffers.logits(rows, width))


class _Running:
    """One site's statistics over the vocabulary tiles folded so far, for a block of rows.

    With ``m`` the running maximum logit: ``s = Σ exp(z - m)``, ``t = Σ exp(z - m)·(z - m)`` and
    ``u = Σ exp(zf - mf)·(z - m)`` against the final distribution's own running ``mf``; ``count``
    holds, per query, the number of logits strictly above the query's logit (float32 counts are
    exact below 2**24); ``top_v``/``top_i`` the running top-k; ``own`` the tiles' logits at the
    query's own column (one ``[row, q]`` gather per tile; the query's tile is picked once at the end).
    """

    def __init__(
        self, q_logits: torch.Tensor | None, q_ids: torch.Tensor | None, tile: int, rows: int, k: int, device: Any
    ) -> None:
        self.m: torch.Tensor | None = None
        self.s = self.t = self.u = None
        # -inf until the first tile fills them: every tile is merged the same way
        self.top_v = torch.full((rows, k), float("-inf"), device=device)
        self.top_i = torch.zeros(rows, k, dtype=torch.long, device=device)
        self.q_logits = q_logits
        self.q_ids = q_ids
        self.count = None if q_logits is None else torch.zeros_like(q_logits)
        self.tile = tile
        self.q_local = None if q_ids is None else q_ids % tile
        self.own: list[torch.Tensor] = []

    def own_correction(self) -> None:
        """Take the query's own column out of its count: it is not above itself, even where the gathered
        logit rounds differently from the tile's."""
        own = torch.stack(self.own, -1).gather(-1, (self.q_ids // self.tile)[..., None])[..., 0]
        self.count -= (own > self.q_logits).float()


def _fold_topk(run: _Running, z: Float[torch.Tensor, "row col"], col0: int, top_k: int) -> torch.Tensor:
    """Merge tile ``z``'s values into ``run``'s running top-k; returns the tile's row maxima.

    One pass takes the maxima of groups of ``_GROUP`` columns; the tile's top-k values lie in its
    ``top_k`` groups with the largest maxima, so only those groups' values are merged (one ``topk`` of
    the group maxima, one of the running values and the candidates). And only the rows with a group
    maximum above their running k-th value can change (after the first tiles a minority: the running
    values only rise), so on a CPU only those rows are merged: a ``topk`` there costs ~0.5 µs a row, as
    much as a pass over an 8192-column tile, and searching every row of every tile cost 10-15% of the
    bf16 matmul.
    """
    rows, cols = z.shape
    grouped = cols % _GROUP == 0 and cols // _GROUP >= 2 * top_k
    if grouped:
        group_max = z.view(rows, cols // _GROUP, _GROUP).amax(-1)
        tile_max = group_max.amax(-1)
    else:  # a narrow tile (the last one): every value is a candidate
        group_max, tile_max = None, z.amax(-1)
    if z.device.type == "cpu":
        hit = ((z if group_max is None else group_max) > run.top_v[:, top_k - 1 : top_k]).any(-1)
        if not bool(hit.any()):
            return tile_max
        sel = None if bool(hit.all()) else hit.nonzero()[:, 0]  # None: every row
    else:  # an accelerator searches its rows in parallel; choosing them would wait on the device twice a tile
        sel = None

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if sel is None else t[sel]

    if grouped:
        _, gi = pick(group_max).topk(top_k, dim=-1)
        groups = z.view(rows, cols // _GROUP, _GROUP)
        cand = groups.gather(1, gi[:, :, None].expand(-1, -1, _GROUP)) if sel is None else groups[sel[:, None], gi]
        cand = cand.reshape(-1, top_k * _GROUP)
    else:
        cand = pick(z)
    v, best = torch.cat([pick(run.top_v), cand], 1).topk(top_k, dim=-1)
    c = (best - top_k).clamp(min=0)  # the candidates' own positions
    new_ids = (gi.gather(1, c // _GROUP) * _GROUP + c % _GROUP if grouped else c) + col0
    ids = torch.where(best < top_k, pick(run.top_i).gather(1, best.clamp(max=top_k - 1)), new_ids)
    if sel is None:
        run.top_v, run.top_i = v, ids
    else:
        run.top_v[sel], run.top_i[sel] = v, ids
    return tile_max


def _fold(
    run: _Running,
    z: Float[torch.Tensor, "row col"],
    col0: int,
    top_k: int,
    buffers: _Buffers,
    *,
    final: bool,
    ef: torch.Tensor | None = None,
    af: torch.Tensor | None = None,
    sf_seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of float32 logits (columns ``col0 : col0 + cols``) into ``run``.

    When the running maximum rises from ``m`` to ``m'``, the sums so far are rescaled by
    ``a = exp(m - m')``: ``s ← a·s``, ``t ← a·(t + (m - m')·s)``; ``u`` is rescaled by the final
    distribution's own factor ``af`` and shift (its sum so far ``sf_seen``). Every summed term is
    ``exp(·)·(z - m)`` with ``z - m <= 0``, as small as the old ``p·log p`` terms, and each tile is
    summed by ``torch.sum``'s cascade, so the float32 totals stay accurate to ~1e-5 nats over a 50k
    vocabulary. ``z`` is overwritten. Returns the tile's ``exp(z - m')`` (kept only for the final
    distribution: a site's is overwritten by its products) and the rescale factor and previous ``s``
    (which the sites need from the final distribution's fold).
    """
    rows, cols = z.shape
    work = buffers.get(buffers.WORK, rows, cols)
    # ranks: count before shifting, so each comparison is between the logits themselves
    if run.count is not None:
        for i in range(run.count.shape[1]):
            run.count[:, i] += torch.gt(z, run.q_logits[:, i : i + 1], out=work).sum(-1)
        run.own.append(z.gather(1, run.q_local if cols == buffers.tile else run.q_local.clamp(max=cols - 1)))
    m_new = _fold_topk(run, z, col0, top_k)
    if run.m is not None:
        m_new = torch.maximum(run.m, m_new)
    # d = (z - m')·log2 e in one pass, and exp(z - m') as exp2(d): torch's float32 exp2 runs 3x faster
    # than its exp on x86 CPUs (0.29 against 0.87 ns an element on one AVX-512 core). Rounding z·log2 e
    # and m'·log2 e moves d by about |z|·2⁻²³ at most (2e-6 at |z| = 20), the float32 rounding of z - lse
    # itself; the tile's sums over d are turned back into nats (·ln 2) once per row. Every pass writes into z's or the work
    # block (a site's exp is not needed past its own sums), so the fold touches three tile-sized blocks
    d = torch.add(m_new[:, None] * -_LOG2_E, z, alpha=_LOG2_E, out=z)
    e = torch.exp2(d, out=buffers.get(buffers.FINAL_EXP, rows, cols) if final else work)
    e_sum = e.sum(-1)
    t_tile = torch.mul(e, d, out=work).sum(-1) * _LN_2
    u_tile = None if ef is None else torch.mul(ef, d, out=work).sum(-1) * _LN_2
    if run.m is None:
        a, s_old = torch.ones_like(m_new), torch.zeros_like(m_new)
        run.s, run.t, run.u = e_sum, t_tile, u_tile
    else:
        delta = run.m - m_new
        a, s_old = delta.exp(), run.s
        run.s = a * s_old + e_sum
        run.t = a * (run.t + delta * s_old) + t_tile
        if ef is not None:
            run.u = af * (run.u + delta * sf_seen) + u_tile
    run.m = m_new
    return e, a, s_old


def _block_statistics(
    runs: list[_Running], final: _Running, final_sites: frozenset[int], n_sites: int, top_k: int
) -> dict[str, torch.Tensor]:
    """Per-site statistics of one block of rows from the folded sums (see :class:`_Running`)."""
    neg_entropy_f = final.t / final.s - final.s.log()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in _FIELDS}
    site_runs = iter(runs)
    for s in range(n_sites):
        is_final = s in final_sites
        run = final if is_final else next(site_runs)
        log_s = run.s.log()
        lse = run.m + log_s
        out["top_ids"].append(run.top_i[:, :top_k])
        out["top_logprobs"].append(run.top_v[:, :top_k] - lse[:, None])
        out["entropy"].append(log_s - run.t / run.s)
        # KL(final ‖ p) = Σ q·log q - Σ q·log p, with Σ q·log p = u / sf - log s
        kl = torch.zeros_like(lse) if is_final else neg_entropy_f - run.u / final.s + log_s
        out["kl_to_final"].append(kl)
        out["query_logprobs"].append(run.q_logits - lse[:, None])
        out["query_ranks"].append(1 + run.count.long())
    return {k: torch.stack(v) for k, v in out.items()}


_FIELDS = ("top_ids", "top_logprobs", "entropy", "kl_to_final", "query_logprobs", "query_ranks")


def _empty_out(n_sites: int, n_rows: int, n_q: int, top_k: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {
        "top_ids": torch.empty(n_sites, n_rows, top_k, dtype=torch.long, device=device),
        "top_logprobs": torch.empty(n_sites, n_rows, top_k, device=device),
        "entropy": torch.empty(n_sites, n_rows, device=device),
        "kl_to_final": torch.empty(n_sites, n_rows, device=device),
        "query_logprobs": torch.empty(n_sites, n_rows, n_q, device=device),
        "query_ranks": torch.empty(n_sites, n_rows, n_q, dtype=torch.long, device=device),
    }


def _check_tile_size(tile_size: int | None) -> None:
    if tile_size is None:
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")


@torch.inference_mode()
def unembed_metrics(
    site_states: Callable[[int, slice], Float[torch.Tensor, "row d_model"]],
    n_sites: int,
    final_states: Callable[[slice], Float[torch.Tensor, "row d_model"]],
    final_sites: frozenset[int],
    query: Int[torch.Tensor, "row q"],
    top_k: int,
    chunk_size: int,
    unembedding: Unembedding,
    device: torch.device | str,
    tile_size: int | None = None,
) -> SiteMetrics:
    """The lens metrics of ``n_sites`` sites from their normalised states, one vocabulary tile at a time.

    ``site_states(s, rows)`` gives site ``s``'s normalised states (the input of the unembedding, in
    the model's dtype) at a slice of the rows and ``final_states(rows)`` the final layer's; sites in
    ``final_sites`` *are* the final distribution and are not projected twice. For each chunk of
    ``chunk_size`` rows the query tokens' logits come first (a small gather-matmul, so ranks can be
    counted tile by tile); then each ``tile_size``-column tile (default :data:`DEFAULT_TILE_SIZE`) of the
    final logits and of every site's logits is computed, one matmul for a group of sites (their states
    stacked, :data:`GROUP_ROWS` rows at most), and each site's is folded into running statistics at once
    (see :func:`_fold`). The numbers are those of :func:`block_metrics` on ``unembedding``'s full logits,
    to float32 rounding. Extra memory: the chunk's states of every site, the group's logits
    (``[GROUP_ROWS, tile_size]`` at most, in ``W_U``'s dtype) and two ``[chunk_size, tile_size]`` float32
    blocks (three for a 16-bit ``W_U``). The tiles, the running statistics and the query
    ids live on ``W_U``'s device (where the states come: see :mod:`~tl_logitlens.core.devices`); the
    statistics are written to ``device``, one chunk at a time.

    Raises:
        NonFiniteError: a site's (or the final) logits hold NaN or inf at some row.
    """
    _check_tile_size(tile_size)
    readout = unembedding.W_U.device
    n_rows, n_q = query.shape
    d_vocab = unembedding.d_vocab
    out = _empty_out(n_sites, n_rows, n_q, top_k, device)
    final_top1 = torch.empty(n_rows, dtype=torch.long, device=device)
    if n_rows == 0:
        return SiteMetrics(**out, final_top1=final_top1)
    tile = min(DEFAULT_TILE_SIZE if tile_size is None else tile_size, d_vocab)
    others = [s for s in range(n_sites) if s not in final_sites]
    chunk_rows = min(chunk_size, n_rows)
    per_group = min(max(1, GROUP_ROWS // chunk_rows), 1 + len(others))  # sites per matmul, the final's included
    buffers = _Buffers(chunk_rows, per_group * chunk_rows, tile, readout, unembedding.W_U.dtype)
    k_final = top_k if final_sites else 1
    for start in range(0, n_rows, chunk_size):
        sl = slice(start, min(start + chunk_size, n_rows))
        ids = to_device(query[sl], readout)
        rows = ids.shape[0]
        # the final states first, then every other site's: [1 + site, row, d_model]
        xs = torch.stack([final_states(sl), *(site_states(s, sl) for s in others)])
        # the query tokens' logits of every site at once (the final states' only where they are a site):
        # one gather of W_U's columns per chunk
        q_logits = list(unembedding.gather_logits(xs if final_sites else xs[1:], ids))
        if final_sites:
            final = _Running(q_logits.pop(0), ids, tile, rows, k_final, readout)
        else:
            final = _Running(None, None, tile, rows, k_final, readout)
        runs = [_Running(q, ids, tile, rows, top_k, readout) for q in q_logits]
        for col0 in range(0, d_vocab, tile):
            tiles = _site_tiles(unembedding, xs, slice(col0, min(col0 + tile, d_vocab)), per_group, buffers)
            ef, af, sf_seen = _fold(final, next(tiles), col0, k_final, buffers, final=True)
            for run, z in zip(runs, tiles):
                _fold(run, z, col0, top_k, buffers, final=False, ef=ef, af=af, sf_seen=sf_seen)
        for run in (final, *runs) if final_sites else runs:
            run.own_correction()
        block = _block_statistics(runs, final, final_sites, n_sites, top_k)
        check_finite(final.m + final.s.log(), block, start)
        for name, buf in out.items():
            buf[:, sl] = block[name]
        final_top1[sl] = final.top_i[:, 0]
    return SiteMetrics(**out, final_top1=final_top1)
