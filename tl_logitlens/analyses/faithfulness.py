"""Causal faithfulness across lenses: is what a lens reads at a site what the model uses?

For each lens, site and read position of each document, :func:`faithfulness` takes the lens's own top-1
token ``t`` there and intervenes on the site's state ``h`` at that one position along the lens's vector
for ``t`` (:func:`~tl_logitlens.lens_vectors`, ``v_t = Mᵀ P (g ⊙ W_U[:, t])``):

- ``intervention="ablate"``: ``h ← h − (h · v̂_t) v̂_t``, the lens's reading of ``t`` removed
  (:func:`~tl_logitlens.ablate` at that position);
- ``intervention="swap"``: with ``u`` the lens's runner-up there, the lens's two readings are exchanged:
  ``h ← h + δ`` with ``δ`` in the span of ``v_t`` and ``v_u`` such that ``v_t · (h + δ) = v_u · h`` and
  ``v_u · (h + δ) = v_t · h`` (so the lens now reads ``u`` where it read ``t``, up to the final norm's common
  scale and the tokens' biases; the J-lens paper's live swap exchanges coordinates in a dictionary's basis
  instead, which need not change what the lens reads first);

then runs the model on and measures, at the same position, the change of the model's final log-prob of
``t`` (``Δ log p``, nats; negative when the intervention removed what the model was going to say) and
``KL(clean ‖ intervened)`` of the final distribution (nats). The same is done with a norm-matched random
direction (:func:`~tl_logitlens.placebo`): ``h ← h + ‖δ‖ r̂``, ``δ`` the real intervention's change at that
position, ``r̂`` a standard normal draw made orthogonal to ``V``'s columns (and, on LayerNorm models, to
the all-ones vector, which every reader of the stream removes) and normalised. A lens whose vectors the
model uses shows effects well beyond the placebo's: the ``ratio`` (effect / placebo) is far above 1.

**Reported** per lens and site: the mean effect, the placebo's mean effect, their ratio, for ``Δ log p``
and for KL, each with a percentile bootstrap interval over documents (Poisson weights fixed by the seed
and each document's index, the same replicates as :func:`~tl_logitlens.evaluate_lenses`; the ratio's
interval is the replicates' ratios of sums).

**Random draws** (reproducible, whatever the batching, device or number of processes): document ``i``'s
placebo directions are ``numpy.random.default_rng([seed, i]).standard_normal((n_cells, n_lenses, n_sites,
d_model))``, ``n_cells`` its read positions in order.

**Cost.** An intervention at position ``p`` changes every later position, so each (position, lens, site)
and its placebo needs a forward pass of its own; it runs on the document cut after ``p`` (a causal model's
output at ``p`` does not depend on later tokens), many rows per forward pass. Interventions at
``final_post`` need no forward pass (nothing runs after it). Reading every position (``positions=None``)
costs about ``n²/2`` token slots per document and (lens, site); the default reads each document's last
position.
"""

from __future__ import annotations

import html
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, no_type_check

import numpy as np
import torch
from jaxtyping import Float

from tl_logitlens.analyses.evaluate import (
    _Accumulator,
    _checkpoint_settings,
    _Reporter,
    _score_on_every_rank,
)
from tl_logitlens.analyses.steering import lens_vectors
from tl_logitlens.core.compat import normalization_type
from tl_logitlens.core.corpus import corpus_length
from tl_logitlens.core.devices import to_device
from tl_logitlens.core.distributed import current_world, sum_over_ranks
from tl_logitlens.core.files import Checkpoint
from tl_logitlens.core.inputs import check_count, check_flag, is_integer
from tl_logitlens.core.readout import Readout, Site, check_model, resolve_sites
from tl_logitlens.core.results import BootstrapInterval, check_bootstrap, interval_fields, percentile_interval
from tl_logitlens.core.run import plan_forwards, run_cache
from tl_logitlens.core.site_tables import html_page, html_table, site_lens_frame, text_or_file
from tl_logitlens.lenses import LOGIT_LENS, check_reads, named_lenses, sites_or_default

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

INTERVENTIONS = ("ablate", "swap")
# the reported statistics, in the order of the result's last axis
STATISTICS = ("effect_logprob", "placebo_logprob", "ratio_logprob", "effect_kl", "placebo_kl", "ratio_kl")
UNITS = {
    "effect_logprob": "nats",
    "placebo_logprob": "nats",
    "ratio_logprob": "ratio",
    "effect_kl": "nats",
    "placebo_kl": "nats",
    "ratio_kl": "ratio",
}
DEFINITION = (
    "For each lens, site and read position: the lens's top-1 token t there; the site's state at that "
    "position changed along the lens's vector for t (ablate: its component removed; swap: the lens's "
    "readings of t and of its runner-up exchanged); effect = the change of the model's final log-prob of t "
    "at that position (nats) and KL(clean || intervened) of the final distribution (nats); placebo = the "
    "same with a change of equal norm along a seeded random direction orthogonal to the lens vectors; "
    "ratio = effect / placebo (of the means). Intervals: percentile bootstrap over documents."
)
# per-document sums kept (their order in the accumulator's last axis)
_SUMS = ("logprob", "placebo_logprob", "kl", "placebo_kl")
# per-document counts, laid out as evaluate_lenses's (tokens first, documents fourth: its progress and
# resume code read them there)
_COUNTS = ("n_tokens", "n_positions", "n_bytes", "n_documents", "n_forward_rows")
DEFAULT_CHECKPOINT_EVERY = 100


@dataclass(frozen=True)
class Faithfulness(BootstrapInterval):
    """How much intervening along each lens's vectors changes the model's output, against a placebo.

    ``mean``/``low``/``high`` are ``[lens, site, statistic]`` in the order of :data:`STATISTICS`:
    ``effect_logprob`` (mean ``Δ log p`` of the lens's top-1 token, nats), ``placebo_logprob``,
    ``ratio_logprob`` (their ratio), ``effect_kl``, ``placebo_kl`` (mean KL, nats), ``ratio_kl``. The
    definition is :data:`DEFINITION` (and the module docstring); ``n_positions`` interventions were made
    per lens and site, over ``n_documents`` documents.
    """

    lenses: tuple[str, ...]
    sites: tuple[str, ...]
    intervention: str
    n_positions: int
    n_documents: int
    n_tokens: int
    seq_len: int
    positions: str
    model_name: str = ""
    world_size: int = 1
    statistics: tuple[str, ...] = STATISTICS
    sums: Float[torch.Tensor, "lens site sum"] | None = field(default=None, repr=False, compare=False)

    def value(
        self, statistic: str, lens: str | None = None, site: str | None = None
    ) -> Float[torch.Tensor, ...]:
        """The point estimate of ``statistic`` (one of :data:`STATISTICS`), for one lens and/or site or all."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; use one of {list(STATISTICS)}")
        out = self.mean[..., STATISTICS.index(statistic)]
        if lens is not None:
            if lens not in self.lenses:
                raise ValueError(f"lens {lens!r} is not in this result; it has {list(self.lenses)}")
            out = out[self.lenses.index(lens)]
        if site is not None:
            if site not in self.sites:
                raise ValueError(f"site {site!r} is not in this result; it has {list(self.sites)}")
            out = out[..., self.sites.index(site)]
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per site × lens: ``site``, ``site_index``, ``lens``, each statistic with ``_low``/``_high``,
        ``n_positions``."""
        return site_lens_frame(
            self.sites, self.lenses, STATISTICS, self.mean, self.low, self.high, n_positions=self.n_positions
        )

    def to_dict(self) -> dict[str, Any]:
        """Settings, counts, units, the definition and the table (as :meth:`to_dataframe` records)."""
        return {
            "model": self.model_name,
            "intervention": self.intervention,
            "lenses": list(self.lenses),
            "sites": list(self.sites),
            "positions": self.positions,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "n_bootstrap": self.n_bootstrap,
            "confidence": self.confidence,
            "n_documents": self.n_documents,
            "n_positions": self.n_positions,
            "n_tokens": self.n_tokens,
            "world_size": self.world_size,
            "units": UNITS,
            "definition": DEFINITION,
            "results": json.loads(self.to_dataframe().to_json(orient="records")),
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str | Path:
        """:meth:`to_dict` as JSON text, or, given ``path``, written there (atomically) and the path
        returned, as :meth:`LensEvaluation.to_json <tl_logitlens.LensEvaluation.to_json>` does."""
        text = json.dumps(self.to_dict(), indent=1)
        return text if path is None else text_or_file(text + "\n", path)

    def to_markdown(self, digits: int = 3) -> str:
        """The table as Markdown: one row per site and lens, ``Δ log p`` and KL with the placebo and ratio
        (intervals in brackets)."""
        head = "| site | lens | Δ log p | placebo Δ log p | ratio | KL | placebo KL | ratio |"
        lines = [head, "|" + "---|" * 8]

        def cell(k: int, s: int, stat: str) -> str:
            i = STATISTICS.index(stat)
            m, lo, hi = (float(t[k, s, i]) for t in (self.mean, self.low, self.high))
            if self.n_bootstrap == 0:
                return f"{m:.{digits}f}"
            return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

        for s, site in enumerate(self.sites):
            for k, lens in enumerate(self.lenses):
                cells = [cell(k, s, stat) for stat in STATISTICS]
                lines.append(f"| {site} | {lens} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_html(self, path: str | os.PathLike | None = None, *, include_plotlyjs: bool | str = True) -> str | Path:
        """The "Which lens is causal?" section (figure, table with intervals, definition) as a page, or,
        with ``include_plotlyjs=False``, a section for a page that loads plotly itself (the report's).
        Given ``path``, written there instead (atomically) and the path returned."""
        fig = self.plot(width=1100)
        figure = fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs, config={"responsive": True})
        table = html_table(self.to_dataframe(), STATISTICS)
        section = (
            '<section id="faithfulness" class="faithfulness"><h2>Which lens is causal?</h2>'
            f"<p>Intervention: <b>{html.escape(self.intervention)}</b> along each lens's vector for its own top-1 "
            f"token, at {self.n_positions:,} positions ({html.escape(self.positions)}) of {self.n_documents:,} "
            f"documents, against a norm-matched random placebo; {self.confidence:.0%} bootstrap intervals over "
            f"documents ({self.n_bootstrap} replicates, seed {self.seed}). A lens whose effect is far beyond the "
            f"placebo's (ratio well above 1) reads directions the model uses.</p>{figure}{table}"
            f"<p><small>{html.escape(DEFINITION)}</small></p></section>"
        )
        return text_or_file(section if include_plotlyjs is False else html_page("Which lens is causal?", section), path)

    def plot(self, **kwargs: Any) -> go.Figure:
        """Effect and placebo per site, one colour per lens; see
        :func:`tl_logitlens.plotting.interventions.faithfulness_figure`."""
        from tl_logitlens.plotting.interventions import faithfulness_figure

        return faithfulness_figure(self, **kwargs)


def _positions_label(positions: object) -> str:
    if positions is None:
        return "every position"
    if positions == "last":
        return "the last position"
    return f"positions {positions}"


def _check_positions(positions: object) -> tuple[int, ...] | None:
    """``None`` (all), or a tuple of ints (``"last"`` is ``(-1,)``)."""
    if positions is None:
        return None
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(
                f"positions={positions!r} is not understood; use None, 'last', an int or a list of ints"
            )
        return (-1,)
    if isinstance(positions, bool):
        raise TypeError("positions must be None, 'last', an int or a list of ints, not a bool")
    if is_integer(positions):
        return (int(positions),)
    if not isinstance(positions, Sequence) or len(positions) == 0:
        raise ValueError("positions must be None, 'last', an int or a non-empty list of ints")
    if not all(is_integer(p) and not isinstance(p, bool) for p in positions):
        raise TypeError(f"positions must be integers, got {list(positions)!r}")
    return tuple(int(p) for p in positions)


def _cells(n: int, positions: tuple[int, ...] | None) -> list[int]:
    """The read positions of a document of ``n`` tokens (negative: from its end), in order, each once;
    positions past its end are skipped."""
    if positions is None:
        return list(range(n))
    out = []
    for p in positions:
        q = p + n if p < 0 else p
        if 0 <= q < n and q not in out:
            out.append(q)
    return out


def _orthonormal_columns(
    columns: Float[torch.Tensor, "row d_model m"],
) -> Float[torch.Tensor, "row d_model m"]:
    """Per row, an orthonormal basis of the span of ``columns`` (float64; Gram–Schmidt twice, columns that
    add nothing come out zero)."""
    out = torch.zeros_like(columns)
    for j in range(columns.shape[-1]):
        c = columns[..., j]
        for _ in range(2):
            c = c - (out * (out * c[..., None]).sum(-2, keepdim=True)).sum(-1)
        norm = c.norm(dim=-1, keepdim=True)
        scale = c.abs().amax(dim=-1, keepdim=True).clamp(min=1e-300)
        ok = norm > 1e-10 * scale * columns.shape[1] ** 0.5
        out[..., j] = torch.where(ok, c / norm.clamp(min=1e-300), torch.zeros((), dtype=c.dtype))
    return out


def intervention_delta(
    h: Float[torch.Tensor, "row d_model"], vectors: Float[torch.Tensor, "row m d_model"], intervention: str
) -> Float[torch.Tensor, "row d_model"]:
    """The change ``δ`` (float32) each row's state gets. Ablate (``m = 1``): ``−(h · v̂) v̂``. Swap
    (``m = 2``, ``V = [v_t; v_u]``): the change within their span that exchanges the two readings,
    ``V (h + δ) = σ(V h)``: ``δ = Vᵀ (V Vᵀ)⁺ (σ(s) − s)`` with ``s = V h``, ``σ`` exchanging the two."""
    h = h.float()
    if intervention == "ablate":
        v = vectors[:, 0].float()
        unit = v / v.norm(dim=-1, keepdim=True)
        return -(h * unit).sum(-1, keepdim=True) * unit
    v = vectors.double()  # [row, 2, d]
    readings = (v * h.double()[:, None, :]).sum(-1)  # [row, 2]
    gram = v @ v.transpose(1, 2)  # [row, 2, 2]
    coeffs = (torch.linalg.pinv(gram) @ (readings.flip(-1) - readings)[..., None])[..., 0]  # [row, 2]
    return (coeffs[..., None] * v).sum(1).float()


def placebo_directions(
    model: Any, draws: Float[torch.Tensor, "row d_model"], vectors: Float[torch.Tensor, "row m d_model"]
) -> Float[torch.Tensor, "row d_model"]:
    """Unit placebo directions (float32): each row's draw made orthogonal to its vectors (and, on LayerNorm
    models, to the all-ones vector), then normalised."""
    avoid = vectors.double()
    d = avoid.shape[-1]
    if normalization_type(model) in ("LN", "LNPre"):
        ones = torch.full((avoid.shape[0], 1, d), d**-0.5, dtype=torch.float64, device=avoid.device)
        avoid = torch.cat([ones, avoid], dim=1)
    basis = _orthonormal_columns(avoid.transpose(1, 2))  # [row, d, m]
    z = draws.double().to(avoid.device)
    z = z - (basis * (basis * z[..., None]).sum(-2, keepdim=True)).sum(-1)
    return (z / z.norm(dim=-1, keepdim=True)).float()


@dataclass
class _Doc:
    index: int
    ids: list[int]
    cells: list[int]
    stats: torch.Tensor  # [lens, site, len(_SUMS)] float64
    counts: torch.Tensor  # [len(_COUNTS)] float64


@dataclass
class _Rows:
    """Intervention rows waiting for a forward pass: per row the document, position, lens, site,
    placebo flag, token, the vectors and the placebo direction."""

    doc: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    site: list[int] = field(default_factory=list)
    placebo: list[bool] = field(default_factory=list)
    token: list[int] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)  # the clean final log-probs at the cell [d_vocab]
    vectors: list[torch.Tensor] = field(default_factory=list)  # [m, d_model]
    direction: list[torch.Tensor] = field(default_factory=list)  # [d_model]


class _Scorer:
    """Scores one rank's documents into an accumulator, ``batch_size`` documents per clean forward pass
    and about ``batch_size · seq_len`` token slots per intervention forward pass. Has the interface
    :func:`~tl_logitlens.analyses.evaluate._score_corpus` drives (``add``, ``flush``, ``acc``, ``real``,
    ``padded``, ``reporter``)."""

    def __init__(
        self,
        model: Any,
        readouts: Sequence[Readout],
        names: Sequence[str],
        sites: Sequence[Site],
        final: Site,
        intervention: str,
        positions: tuple[int, ...] | None,
        seq_len: int,
        batch_size: int,
        seed: int,
        acc: _Accumulator,
        reporter: _Reporter,
        world_size: int,
    ) -> None:
        self.model, self.readouts, self.names, self.sites, self.final = model, readouts, names, sites, final
        self.intervention, self.positions, self.seq_len, self.batch_size = (
            intervention,
            positions,
            seq_len,
            batch_size,
        )
        self.seed, self.acc, self.reporter, self.world_size = seed, acc, reporter, world_size
        self.final_readout = Readout(model, LOGIT_LENS, "recompute", True)
        self.queue: list[_Doc] = []
        self.real = 0
        self.padded = 0
        self.m = 1 if intervention == "ablate" else 2
        self.device = model.W_U.device

    def add(self, index: int, ids: Sequence[int], n_bytes: int) -> None:
        ids = list(ids)[: self.seq_len]
        n_l, n_s = len(self.readouts), len(self.sites)
        counts = torch.zeros(len(_COUNTS), dtype=torch.float64)
        counts[0], counts[2], counts[3] = len(ids), n_bytes, 1
        cells = _cells(len(ids), self.positions)
        self.queue.append(
            _Doc(index, ids, cells, torch.zeros(n_l, n_s, len(_SUMS), dtype=torch.float64), counts)
        )
        if len(self.queue) >= self.batch_size:
            self._score(self.queue)
            self.queue = []

    def flush(self) -> None:
        if self.queue:
            self._score(self.queue)
            self.queue = []

    @torch.no_grad()
    def _score(self, docs: list[_Doc]) -> None:
        model, device = self.model, self.device
        lengths = [len(d.ids) for d in docs]
        width = max(lengths)
        tokens = torch.zeros(len(docs), width, dtype=torch.long)
        for i, d in enumerate(docs):
            tokens[i, : len(d.ids)] = torch.tensor(d.ids)
        mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
        tokens, mask = tokens.to(device), mask.to(device)
        hooks = sorted({h for r in self.readouts for h in r.hooks([*self.sites, self.final])})
        plan = plan_forwards(lengths, causal=True)
        cache = run_cache(model, tokens, mask, hooks, plan)
        self.real += plan.n_real
        self.padded += plan.n_slots - plan.n_real
        rows_b = torch.tensor(
            [i for i, d in enumerate(docs) for _ in d.cells], dtype=torch.long, device=device
        )
        rows_p = torch.tensor([p for d in docs for p in d.cells], dtype=torch.long, device=device)
        rows = _Rows()
        if len(rows_b):
            clean = self._logprobs(
                self.final_readout.logits(cache, self.final, rows_b, rows_p), docs, rows_b, rows_p, None
            )
            self._queue_rows(docs, cache, rows_b, rows_p, clean, rows)
        self._run_rows(docs, rows, cache)
        for d in docs:
            d.counts[1] = len(d.cells)
            self.acc.add(d.index, d.stats, d.counts)
        self.reporter.update(
            int(sum(lengths)), len(docs), self.world_size, self.padded / max(self.real + self.padded, 1)
        )

    def _logprobs(
        self,
        logits: torch.Tensor,
        docs: list[_Doc],
        rows_b: torch.Tensor,
        rows_p: torch.Tensor,
        where: str | None,
    ) -> torch.Tensor:
        """Log-softmax of float32 logits, checked finite first."""
        self._check_finite(logits, docs, rows_b, rows_p, where)
        return torch.log_softmax(logits.float(), dim=-1)

    @staticmethod
    def _check_finite(
        logits: torch.Tensor, docs: list[_Doc], rows_b: torch.Tensor, rows_p: torch.Tensor, where: str | None
    ) -> None:
        """``ValueError`` naming the place at the first row of ``logits`` that is not finite."""
        bad = ~torch.isfinite(logits).all(-1)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            doc = docs[int(rows_b[r])]
            what = "the model's final output" if where is None else where
            raise ValueError(
                f"NaN or inf in {what} at document {doc.index}, position {int(rows_p[r])}: the residual state, the "
                "final norm, W_U/b_U or the lens's weights hold non-finite values there; check the model's weights "
                "and dtype (float16 overflows; load float32 or bfloat16) and the lens's"
            )

    def _queue_rows(
        self,
        docs: list[_Doc],
        cache: Any,
        rows_b: torch.Tensor,
        rows_p: torch.Tensor,
        clean: torch.Tensor,
        rows: _Rows,
    ) -> None:
        """Every cell's intervention rows (real and placebo, per lens and site); final_post rows are scored here."""
        n_l, n_s, d_model = len(self.readouts), len(self.sites), int(self.model.cfg.d_model)
        # the placebo draws, per document in corpus order: [cell, lens, site, d_model]
        draws = torch.cat(
            [
                torch.from_numpy(
                    np.random.default_rng([self.seed, d.index]).standard_normal(
                        (len(d.cells), n_l, n_s, d_model)
                    )
                )
                for d in docs
            ]
        )
        cell_doc = rows_b.tolist()
        for k, readout in enumerate(self.readouts):
            for s, site in enumerate(self.sites):
                logits = readout.logits(cache, site, rows_b, rows_p)
                self._check_finite(
                    logits, docs, rows_b, rows_p, f"lens {self.names[k]!r} at site {site.label!r}"
                )
                top = logits.topk(self.m, dim=-1).indices  # [cell, m]: the lens's top-1 (and runner-up)
                unique, inverse = torch.unique(top, return_inverse=True)
                table = lens_vectors(self.model, readout.lens, site.label, unique.tolist())  # [u, d]
                vectors = table[inverse.to(table.device)]  # [cell, m, d]
                directions = placebo_directions(self.model, draws[:, k, s], vectors)
                if site.hook == self.final.hook:
                    self._score_final(
                        docs, cache, rows_b, rows_p, clean, k, s, top[:, 0], vectors, directions
                    )
                    continue
                for c in range(len(cell_doc)):
                    for placebo in (False, True):
                        rows.doc.append(cell_doc[c])
                        rows.pos.append(int(rows_p[c]))
                        rows.lens.append(k)
                        rows.site.append(s)
                        rows.placebo.append(placebo)
                        rows.token.append(int(top[c, 0]))
                        rows.clean.append(clean[c])
                        rows.vectors.append(vectors[c])
                        rows.direction.append(directions[c])

    def _score_final(
        self,
        docs: list[_Doc],
        cache: Any,
        rows_b: torch.Tensor,
        rows_p: torch.Tensor,
        clean: torch.Tensor,
        k: int,
        s: int,
        token: torch.Tensor,
        vectors: torch.Tensor,
        directions: torch.Tensor,
    ) -> None:
        """Interventions on the final residual stream: the model's output is its readout, no forward pass."""
        h = cache[self.final.hook][rows_b, rows_p].float()
        delta = intervention_delta(h, vectors, self.intervention)
        for placebo in (False, True):
            step = delta.norm(dim=-1, keepdim=True) * directions if placebo else delta
            state = (h + step).to(cache[self.final.hook].dtype)
            n = state.shape[0]
            logits = self.final_readout.logits(
                {self.final.hook: state[:, None]},
                self.final,
                torch.arange(n, device=state.device),
                torch.zeros(n, dtype=torch.long, device=state.device),
            )
            self._accumulate(
                docs, rows_b.tolist(), [k] * n, [s] * n, [placebo] * n, token, clean, logits, rows_p
            )

    def _accumulate(
        self,
        docs: list[_Doc],
        doc_of: list[int],
        lens_of: list[int],
        site_of: list[int],
        placebo_of: list[bool],
        token: torch.Tensor,
        clean: torch.Tensor,
        logits: torch.Tensor,
        pos: torch.Tensor,
    ) -> None:
        lp = self._logprobs(
            logits, docs, torch.tensor(doc_of), pos, "the model's output after an intervention"
        )
        token = token.to(lp.device)
        delta = (lp.gather(-1, token[:, None])[:, 0] - clean.gather(-1, token[:, None])[:, 0]).double().cpu()
        kl = (clean.exp() * (clean - lp)).sum(-1).double().cpu()
        for r, (b, k, s, placebo) in enumerate(zip(doc_of, lens_of, site_of, placebo_of)):
            stats = docs[b].stats[k, s]
            stats[1 if placebo else 0] += delta[r]
            stats[3 if placebo else 2] += kl[r]

    def _run_rows(self, docs: list[_Doc], rows: _Rows, cache: Any) -> None:
        """The intervention rows, longest first, about ``batch_size · seq_len`` token slots per forward pass."""
        if not rows.doc:
            return
        order = sorted(range(len(rows.doc)), key=lambda r: -rows.pos[r])
        budget = self.batch_size * self.seq_len
        start = 0
        while start < len(order):
            width = rows.pos[order[start]] + 1
            n = max(1, budget // width)
            chunk = order[start : start + n]
            start += n
            self._forward_rows(docs, rows, chunk, width)

    def _forward_rows(self, docs: list[_Doc], rows: _Rows, chunk: list[int], width: int) -> None:
        model, device = self.model, self.device
        n = len(chunk)
        tokens = torch.zeros(n, width, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids = docs[rows.doc[r]].ids[: rows.pos[r] + 1]
            tokens[i, : len(ids)] = torch.tensor(ids)
        tokens = tokens.to(device)
        pos = torch.tensor([rows.pos[r] for r in chunk], device=device)
        vectors = torch.stack([rows.vectors[chunk[i]] for i in range(n)]).to(device)
        directions = torch.stack([rows.direction[chunk[i]] for i in range(n)]).to(device)
        placebo = torch.tensor([rows.placebo[r] for r in chunk], device=device)
        site_of = [rows.site[r] for r in chunk]
        arange = torch.arange(n, device=device)
        captured: list[torch.Tensor] = []

        def intervene(members: torch.Tensor) -> Any:
            def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
                # the rows' indices and vectors go to the site's own device (its block's), once per call
                b, p, v, d, is_placebo = (
                    to_device(t[members], activation.device) for t in (arange, pos, vectors, directions, placebo)
                )
                h = activation[b, p].float()
                delta = intervention_delta(h, v, self.intervention)
                step = torch.where(is_placebo[:, None], delta.norm(dim=-1, keepdim=True) * d, delta)
                out = activation.clone()
                out[b, p] = (h + step).to(activation.dtype)
                return out

            return hook

        def capture(activation: torch.Tensor, hook: Any = None) -> None:
            captured.append(activation[to_device(arange, activation.device), to_device(pos, activation.device)].clone())

        fwd = []
        for s in sorted(set(site_of)):
            members = torch.tensor([i for i in range(n) if site_of[i] == s], device=device)
            fwd.append((self.sites[s].hook, intervene(members)))
        fwd.append((self.final.hook, capture))  # after any intervention on the same hook
        with torch.inference_mode(), model.hooks(fwd_hooks=fwd):
            model(tokens, return_type=None)
        self.real += int(pos.sum()) + n
        self.padded += n * width - (int(pos.sum()) + n)
        state = captured[0]
        logits = self.final_readout.logits(
            {self.final.hook: state[:, None]}, self.final, arange, torch.zeros_like(arange)
        )
        token = torch.tensor([rows.token[r] for r in chunk], device=device)
        clean = torch.stack([rows.clean[r] for r in chunk])
        self._accumulate(
            docs,
            [rows.doc[r] for r in chunk],
            [rows.lens[r] for r in chunk],
            site_of,
            [rows.placebo[r] for r in chunk],
            token,
            clean,
            logits,
            pos,
        )
        for d in {rows.doc[r] for r in chunk}:
            docs[d].counts[4] += sum(1 for r in chunk if rows.doc[r] == d)


# Entry points check their own arguments.
@no_type_check
def faithfulness(
    model: Any,
    texts: Any,
    *,
    lenses: Any = None,
    sites: str | Sequence[str] | None = None,
    intervention: str = "ablate",
    positions: Any = "last",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    text_field: str = "text",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> Faithfulness:
    """Which lens is causal: intervene along each lens's vector for its own top-1 token, at each site and
    read position, and compare what that does to the model's output with a norm-matched random placebo
    (the definition, the random draws and the cost are in the module docstring).

    Documents are read as :func:`~tl_logitlens.evaluate_lenses` reads them (BOS first), each cut to its
    first ``seq_len`` tokens. Under ``torch.distributed`` (``torchrun``) document ``i`` is scored by rank
    ``i % world_size`` and the sums are added across ranks; with ``checkpoint_dir`` the sums are saved
    every ``checkpoint_every`` documents and a stopped run resumes, as :func:`~tl_logitlens.evaluate_lenses`
    does (the settings a resumed run must match: the model's weights, each lens, the sites, ``seq_len``,
    ``max_tokens``, ``seed``, ``n_bootstrap``, ``text_field``, ``intervention``, ``positions``, the rank and
    world size, and the texts already read).

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge`` in eval mode, with a tokenizer.
        texts: a list of strings, a ``.txt``/``.json``/``.jsonl`` path, or a ``datasets`` split.
        lenses: ``None`` (the logit lens), one lens, a list (``None`` in it is the logit lens) or a dict
            ``{name: lens}``; names must differ.
        sites: as in :func:`~tl_logitlens.evaluate_lenses` (default: the sites the lenses read by default).
        intervention: ``"ablate"`` or ``"swap"`` (with the lens's runner-up).
        positions: ``"last"`` (each document's last token, the default), ``None`` (every position), an int
            or a list of ints (negative from the document's end; past a document's end: skipped).
        seq_len: the longest document prefix read (default and maximum: the model's ``n_ctx``).
        batch_size: documents per clean forward pass; intervention passes hold about
            ``batch_size · seq_len`` token slots.
        max_tokens: stop after this many document tokens read (each document's first ``seq_len`` at most),
            in corpus order.
        progress: a progress bar on stderr (rank 0, a terminal only).
        seed: the placebo draws' and the bootstrap's seed.
        n_bootstrap: bootstrap replicates over documents (0: no intervals, they are NaN).
        confidence: the intervals' coverage.
        text_field: the field holding text in JSON objects and data sets.
        checkpoint_dir: a folder to save checkpoints in and resume from.
        checkpoint_every: documents between checkpoints.

    Returns:
        A :class:`Faithfulness`.

    Raises:
        ValueError: no texts; an unknown intervention; a site a lens does not read; ``seq_len`` above the
            context; NaN or inf in a lens's or the model's logits (naming where); a checkpoint of other settings.
        TypeError: an encoder (masked LM), which has no next-token output to intervene on; a lens that is
            not a lens; an option of the wrong type.

    Example:
        >>> model = tl.load_model("demo")
        >>> res = tl.faithfulness(model, tl.demo_texts()[:8], lenses=[None, tl.load_lens("demo", model)])
        >>> res.to_dataframe()[["site", "lens", "effect_logprob", "placebo_logprob"]]   # doctest: +SKIP
    """
    check_model(model)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(
            "faithfulness reads text, and this model has no tokenizer; set one with model.set_tokenizer(...)"
        )
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {list(INTERVENTIONS)}, not {intervention!r}")
    n_ctx = int(model.cfg.n_ctx)
    seq_len = n_ctx if seq_len is None else check_count(seq_len, "seq_len", 2)
    if seq_len > n_ctx:
        raise ValueError(
            f"seq_len={seq_len} is above the model's context of {n_ctx} tokens; use at most {n_ctx}"
        )
    batch_size = check_count(batch_size, "batch_size", 1)
    if max_tokens is not None:
        max_tokens = check_count(max_tokens, "max_tokens", 1)
    check_flag(progress, "progress")
    checkpoint_every = check_count(checkpoint_every, "checkpoint_every", 1)
    if not isinstance(text_field, str):
        raise TypeError(f"text_field must be a string, not {type(text_field).__name__}")
    if isinstance(texts, str) and not Path(texts).is_file():
        raise TypeError("texts must be a list of strings or a corpus file; wrap one text in a list: [text]")
    cells = _check_positions(positions)
    bootstrap = check_bootstrap(n_bootstrap, confidence, seed, min_replicates=0)
    named = named_lenses(model, lenses)
    site_list = resolve_sites(model, sites_or_default(model, sites, list(named.values())))
    check_reads(model, list(named.values()), site_list)
    readouts = [Readout(model, lens, "recompute", True) for lens in named.values()]
    final = resolve_sites(model, ["final_post"])[0]
    world = current_world()
    checkpoint = None
    if checkpoint_dir is not None:
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a folder path, not {type(checkpoint_dir).__name__}")
        settings = _checkpoint_settings(
            model,
            named,
            site_list,
            seq_len,
            max_tokens,
            bootstrap.seed,
            bootstrap.n_bootstrap,
            text_field,
            world,
        )
        settings.update({"intervention": intervention, "positions": None if cells is None else list(cells)})
        folder = (
            Path(checkpoint_dir)
            if world.size == 1
            else Path(checkpoint_dir) / f"rank-{world.rank}-of-{world.size}"
        )
        checkpoint = Checkpoint(folder, settings, job="faithfulness")
    n_l, n_s = len(readouts), len(site_list)
    acc = _Accumulator(
        stats=torch.zeros(1 + bootstrap.n_bootstrap, n_l, n_s, len(_SUMS), dtype=torch.float64),
        counts=torch.zeros(1 + bootstrap.n_bootstrap, len(_COUNTS), dtype=torch.float64),
        seed=bootstrap.seed,
    )
    total_docs = corpus_length(texts) if max_tokens is None else None
    reporter = _Reporter(progress and world.is_main and sys.stderr.isatty(), max_tokens, total_docs)
    scorer = _Scorer(
        model,
        readouts,
        list(named),
        site_list,
        final,
        intervention,
        cells,
        seq_len,
        batch_size,
        bootstrap.seed,
        acc,
        reporter,
        world.size,
    )
    # a document's first seq_len tokens are all the scorer reads, so only they are tokenised
    _score_on_every_rank(
        model, texts, world, max_tokens, text_field, scorer, checkpoint, checkpoint_every, reporter, per_document=seq_len
    )
    stats = sum_over_ranks(acc.stats, world)
    counts = sum_over_ranks(acc.counts, world)
    n_pos = counts[:, 1][:, None, None].expand(-1, n_l, n_s)
    # numerators and denominators of each statistic, STATISTICS' order, [1 + n_boot, lens, site, stat]
    num = torch.stack(
        [stats[..., 0], stats[..., 1], stats[..., 0], stats[..., 2], stats[..., 3], stats[..., 2]], dim=-1
    )
    den = torch.stack([n_pos, n_pos, stats[..., 1], n_pos, n_pos, stats[..., 3]], dim=-1)
    if int(counts[0, 1]) == 0:
        raise ValueError(
            "no position was read: the texts are empty or every position asked for is past their end"
        )
    return Faithfulness(
        lenses=tuple(named),
        sites=tuple(s.label for s in site_list),
        intervention=intervention,
        **interval_fields(*_ratio_interval(num, den, bootstrap.confidence), bootstrap),
        n_positions=int(round(float(counts[0, 1]))),
        n_documents=int(round(float(counts[0, 3]))),
        n_tokens=int(round(float(counts[0, 0]))),
        seq_len=seq_len,
        positions=_positions_label(positions),
        model_name=str(getattr(model.cfg, "model_name", "") or ""),
        world_size=world.size,
        sums=stats[0],
    )


def _ratio_interval(num: torch.Tensor, den: torch.Tensor, confidence: float) -> tuple[torch.Tensor, ...]:
    """Point estimate ``num[0] / den[0]`` and the percentile interval of the replicates' ratios
    (replicate 0 the whole corpus), as :func:`~tl_logitlens.analyses.evaluate._interval` computes them, but
    for denominators of either sign (the placebo's mean ``Δ log p``); a zero denominator gives NaN."""
    ratio = num / torch.where(den == 0, torch.nan, den)
    point = ratio[0]
    if ratio.shape[0] == 1:  # no replicates
        return point, torch.full_like(point, torch.nan), torch.full_like(point, torch.nan)
    return (point, *percentile_interval(ratio[1:], confidence))
