"""Corpus-scale lens evaluation: how close each site's readout is to the model, over a corpus.

:func:`evaluate_lenses` scores every position of every document through each lens with the same
chunked kernel as :func:`tl_logitlens.logit_lens` (so the numbers agree with it to float32
rounding), keeps float64 running sums, and returns a :class:`LensEvaluation` with token-weighted
means, bits per byte and bootstrap confidence intervals over documents. Under ``torch.distributed``
(``torchrun``) documents are dealt to the ranks and the sums are added across them. Full windows
run with no padding and no attention mask, shorter ones pooled by length (the padding computed is
reported); with ``checkpoint_dir`` the sums are checkpointed and a stopped evaluation resumes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, no_type_check

import numpy as np
import torch
from jaxtyping import Float

from tl_logitlens.core import compat as _compat
from tl_logitlens.core.corpus import HashedTexts, corpus_length, document_windows, documents
from tl_logitlens.core.distributed import World, broadcast_error, current_world, sum_over_ranks
from tl_logitlens.core.files import (
    Checkpoint,
    check_path_argument,
    field_int,
    field_str,
    field_tensor,
    lens_sha256,
    weights_sha256,
)
from tl_logitlens.core.inputs import check_count, check_flag
from tl_logitlens.core.kernel import DEFAULT_TILE_SIZE, NonFiniteError, Unembedding, unembed_metrics
from tl_logitlens.core.measures import (  # noqa: F401 (TITLES: re-exported, figures used to read it here)
    BPB_STATISTICS,
    DEFINITION,
    MEASURES,
    STATISTICS,
    TITLES,
    UNITS,
)
from tl_logitlens.core.readout import Readout, Site, check_model, resolve_sites
from tl_logitlens.core.results import BootstrapInterval, check_bootstrap, interval_fields, percentile_interval
from tl_logitlens.core.run import ForwardPlan, plan_forwards, run_cache
from tl_logitlens.core.site_tables import html_page, html_table, site_lens_frame, text_or_file
from tl_logitlens.lenses import lens_name, named_lenses, sites_or_default

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

# per-document counts (LensEvaluation's fields of these names), in this order: positions scored,
# positions with a next token, bytes, 1, windows
_COUNTS = ("n_tokens", "n_predicted", "n_bytes", "n_documents", "n_windows")
# the count each measure is a mean over: cross-entropy over the positions with a next token, the other
# statistics over every position scored, the bits-per-byte forms (sums in bits) over the bytes
_PER: dict[str, str] = {
    **{s: "n_tokens" for s in STATISTICS},
    "cross_entropy": "n_predicted",
    **{f"{s}_bpb": "n_bytes" for s in BPB_STATISTICS},
}
DEFAULT_BATCH_SIZE = 8
DEFAULT_BOOTSTRAP = 1000
DEFAULT_CHUNK_SIZE = 256
DEFAULT_CHECKPOINT_EVERY = 1000
# shorter windows wait in a pool of this many batches' worth of tokens, to be batched with others of their length
_TAIL_POOL = 8

@dataclass(frozen=True)
class LensEvaluation(BootstrapInterval):
    """Corpus means of each lens at each site, with bootstrap intervals.

    ``mean``/``low``/``high`` are ``[lens, site, measure]`` in the order of :data:`MEASURES`: the
    :data:`STATISTICS` (nats, except ``top1_agreement``, a fraction), then ``kl_to_final_bpb``,
    ``cross_entropy_bpb`` and ``entropy_bpb`` in bits per byte (:data:`UNITS`). ``low``/``high``
    bound a ``confidence`` interval from ``n_bootstrap`` bootstrap replicates over documents (the
    same fields as :class:`~tl_logitlens.DirectionResult`'s interval). The definition is
    :data:`DEFINITION`. ``n_computed`` is the token slots the forward passes computed, ``n_padded``
    of them padding (see :attr:`padding_fraction`); they describe the run, not the statistics.
    """

    lenses: tuple[str, ...]
    sites: tuple[str, ...]
    n_tokens: int
    n_predicted: int
    n_bytes: int
    n_documents: int
    n_windows: int
    seq_len: int
    model_name: str = ""
    world_size: int = 1
    n_padded: int = 0
    n_computed: int = 0
    sums: Float[torch.Tensor, "lens site stat"] | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (
            f"LensEvaluation(lenses={list(self.lenses)}, sites={len(self.sites)} ({self.sites[0]} .. "
            f"{self.sites[-1]}), n_documents={self.n_documents}, n_tokens={self.n_tokens}, "
            f"seq_len={self.seq_len}, model={self.model_name!r})"
        )

    @property
    def n_document_tokens(self) -> int:
        """The documents' tokens read, each document's BOS counted once: what ``max_tokens`` counts.
        ``n_tokens`` (positions scored) is larger by one BOS for each further window of a long document."""
        return self.n_tokens - self.n_windows + self.n_documents

    @property
    def padding_fraction(self) -> float:
        """The share of the token slots computed that were padding (0 when every batch was full)."""
        return 0.0 if self.n_computed == 0 else self.n_padded / self.n_computed

    def value(self, statistic: str, lens: str | None = None, site: str | None = None) -> Float[torch.Tensor, ...]:
        """The mean of ``statistic`` (any of :data:`MEASURES`), for one lens and/or site or all of them."""
        if statistic not in MEASURES:
            raise ValueError(f"unknown statistic {statistic!r}; use one of {list(MEASURES)}")
        out = self.mean[..., MEASURES.index(statistic)]
        if lens is not None:
            out = out[self._lens_index(lens)]
        if site is not None:
            if site not in self.sites:
                raise ValueError(f"site {site!r} is not in this evaluation; it has {list(self.sites)}")
            out = out[..., self.sites.index(site)]
        return out

    def _lens_index(self, lens: str) -> int:
        if lens not in self.lenses:
            raise ValueError(f"lens {lens!r} is not in this evaluation; it has {list(self.lenses)}")
        return self.lenses.index(lens)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per site × lens: ``site``, ``lens``, each statistic with ``_low``/``_high``, the
        bits-per-byte forms (``*_bpb``), ``n_tokens`` (positions scored) and ``n_predicted``."""
        return site_lens_frame(
            self.sites, self.lenses, MEASURES, self.mean, self.low, self.high,
            n_tokens=self.n_tokens, n_predicted=self.n_predicted,
        )

    def to_dict(self) -> dict[str, Any]:
        """Settings, counts, the definition and the table (as :meth:`to_dataframe` records)."""
        return {
            "model": self.model_name,
            "lenses": list(self.lenses),
            "sites": list(self.sites),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "n_bootstrap": self.n_bootstrap,
            "confidence": self.confidence,
            "n_documents": self.n_documents,
            "n_windows": self.n_windows,
            "n_tokens": self.n_tokens,
            "n_predicted": self.n_predicted,
            "n_bytes": self.n_bytes,
            "world_size": self.world_size,
            "padding_fraction": self.padding_fraction,
            "n_computed": self.n_computed,
            "n_padded": self.n_padded,
            "units": UNITS,
            "definition": DEFINITION,
            "results": json.loads(self.to_dataframe().to_json(orient="records")),
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str | Path:
        """:meth:`to_dict` as JSON text, or, given ``path``, written there (atomically) and the path
        returned, so a REPL shows a path, not the whole file."""
        text = json.dumps(self.to_dict(), indent=1)
        return text if path is None else text_or_file(text + "\n", path)

    def to_html(self, path: str | os.PathLike | None = None, *, include_plotlyjs: bool | str = True) -> str | Path:
        """A self-contained HTML page (the figure, the table with intervals, the definition), or,
        with ``include_plotlyjs=False``, a section to put in a page that loads plotly itself. Given
        ``path``, written there instead (atomically, replacing a file already there) and the path
        returned."""
        import html

        fig = self.plot(width=1100)
        figure = fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs, config={"responsive": True})
        table = html_table(
            self.to_dataframe(), STATISTICS, [("cross-entropy (bits/byte)", lambda r: f"{r['cross_entropy_bpb']:.4f}")]
        )
        section = (
            '<section class="lens-evaluation"><h2>Lens evaluation over a corpus</h2>'
            f"<p>{self.n_documents:,} documents, {self.n_tokens:,} tokens scored, windows of {self.seq_len} "
            f"tokens; {self.confidence:.0%} bootstrap intervals over documents ({self.n_bootstrap} replicates, "
            f"seed {self.seed}).</p>{figure}{table}"
            f"<p><small>{html.escape(DEFINITION)}</small></p></section>"
        )
        return text_or_file(section if include_plotlyjs is False else html_page("Lens evaluation", section), path)

    def plot(self, statistics: Sequence[str] = STATISTICS, **kwargs: Any) -> go.Figure:
        """Per-site curves with their intervals, one panel per statistic, lenses side by side;
        see :func:`tl_logitlens.plotting.evaluation.evaluation_figure`."""
        from tl_logitlens.plotting.evaluation import evaluation_figure

        return evaluation_figure(self, statistics=statistics, **kwargs)


def _bootstrap_weights(seed: int, index: int, n: int) -> np.ndarray:
    """Document ``index``'s Poisson(1) weight in each of ``n`` replicates: fixed by (seed, index)."""
    return np.random.default_rng([seed, index]).poisson(1.0, n)


@dataclass
class _Accumulator:
    """Float64 sums of every statistic and count, unweighted (row 0) and per bootstrap replicate."""

    stats: torch.Tensor  # [1 + n_boot, lens, site, stat]
    counts: torch.Tensor  # [1 + n_boot, count]
    seed: int

    def add(self, index: int, stats: torch.Tensor, counts: torch.Tensor) -> None:
        n_boot = self.stats.shape[0] - 1
        w = torch.ones(1 + n_boot, dtype=torch.float64)
        w[1:] = torch.from_numpy(_bootstrap_weights(self.seed, index, n_boot)).double()
        self.stats += w[:, None, None, None] * stats
        self.counts += w[:, None] * counts


@dataclass
class _Open:
    """A document whose windows are not all scored yet."""

    stats: torch.Tensor
    counts: torch.Tensor
    remaining: int


@dataclass(frozen=True)
class _Window:
    """Window ``number`` of document ``doc``: its token ids, BOS first."""

    doc: int
    number: int
    ids: list[int]


class _Reporter:
    """A rich progress bar on stderr (rank 0, a terminal only): tokens, tokens/s, padding, time left."""

    def __init__(self, enabled: bool, total_tokens: int | None, total_docs: int | None) -> None:
        self.enabled = enabled
        self.tokens = 0
        self.new_tokens = 0
        self.docs = 0
        self.start = time.perf_counter()
        self.total_tokens, self.total_docs = total_tokens, total_docs
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("evaluating"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        total = total_tokens if total_tokens is not None else total_docs
        self.task = self.progress.add_task("eval", total=total, info="")
        self.progress.start()

    def resumed(self, tokens: int, docs: int) -> None:
        """Count what a checkpoint already scored (not in tokens/s)."""
        self.tokens += tokens
        self.docs += docs

    def update(self, tokens: int, docs: int, world: int, padding: float) -> None:
        self.tokens += tokens * world
        self.new_tokens += tokens * world
        self.docs += docs * world
        if not self.enabled:
            return
        rate = self.new_tokens / max(time.perf_counter() - self.start, 1e-9)
        info = f"{self.tokens:,} tok  {rate:,.0f} tok/s  padding {padding:.1%}"
        if self.total_docs is not None and self.total_tokens is None:
            info += f"  {min(self.docs, self.total_docs):,}/{self.total_docs:,} docs"
        completed = self.tokens if self.total_tokens is not None else self.docs
        self.progress.update(self.task, completed=completed, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def _score_batch(
    model: Any,
    readouts: Sequence[Readout],
    names: Sequence[str],
    sites: Sequence[Site],
    final: Site,
    windows: Sequence[_Window],
    seq_len: int,
    chunk_size: int,
    unembedding: Unembedding,
) -> tuple[torch.Tensor, torch.Tensor, ForwardPlan]:
    """Sums of each statistic per window ``[window, lens, site, stat]`` (float64), the positions and
    next-token positions per window, and the forward plan the batch ran with.

    The batch is right-padded and run as :func:`~tl_logitlens.core.run.plan_forwards` plans it: a causal
    model needs no attention mask for right padding, and the plan's length buckets keep the padding
    computed small.
    """
    device = model.cfg.device
    lengths = torch.tensor([len(w.ids) for w in windows])
    width = int(lengths.max())
    tokens = torch.zeros(len(windows), width, dtype=torch.long)
    for i, w in enumerate(windows):
        tokens[i, : len(w.ids)] = torch.tensor(w.ids)
    mask = torch.arange(width)[None] < lengths[:, None]
    tokens, mask = tokens.to(device), mask.to(device)
    hooks = sorted({h for r in readouts for h in r.hooks([*sites, final])})
    plan = plan_forwards(lengths.tolist(), causal=not _compat.is_encoder(model))
    cache = run_cache(model, tokens, mask, hooks, plan)
    rows_b, rows_p = mask.nonzero(as_tuple=True)
    has_next = rows_p + 1 < lengths.to(device)[rows_b]
    next_ids = torch.where(has_next, tokens[rows_b, (rows_p + 1).clamp(max=width - 1)], 0)
    finals = frozenset(s for s, site in enumerate(sites) if site.hook == final.hook)
    out = torch.zeros(len(windows), len(readouts), len(sites), len(STATISTICS), dtype=torch.float64, device=device)
    for k, readout in enumerate(readouts):
        # the lens's own tiled kernel: logits are folded one vocabulary tile at a time
        try:
            m = unembed_metrics(
                lambda s, sl, r=readout: r.normed(cache, sites[s], rows_b[sl], rows_p[sl]),
                len(sites),
                lambda sl, r=readout: r.normed(cache, final, rows_b[sl], rows_p[sl]),
                finals,
                next_ids[:, None],
                1,
                chunk_size,
                unembedding,
                device,
            )
        except NonFiniteError as err:
            w, p = windows[int(rows_b[err.row])], int(rows_p[err.row])
            label = final.label if err.site is None else sites[err.site].label
            token = 0 if p == 0 else w.number * (seq_len - 1) + p
            raise err.explain(
                f"lens {names[k]!r}, site {label!r}, document {w.doc}, token {token} (window {w.number}, "
                f"position {p})"
            ) from None
        per_row = torch.stack(
            [
                m.kl_to_final.double(),
                torch.where(has_next, -m.query_logprobs[..., 0].double(), 0.0),
                m.entropy.double(),
                (m.top_ids[..., 0] == m.final_top1).double(),
            ],
            dim=-1,
        )  # [site, row, stat]
        out[:, k].index_add_(0, rows_b, per_row.transpose(0, 1))
    positions = lengths.double()
    return out.cpu(), torch.stack([positions, positions - 1], dim=-1), plan


class _Scorer:
    """Scores one rank's documents into an accumulator, in batches without padding waste.

    Windows of exactly ``seq_len`` tokens (most of a long corpus) go ``batch_size`` at a time: no
    padding, no attention mask. Shorter windows (each document's last, or only, one) wait in a pool
    of about ``_TAIL_POOL`` batches' worth of tokens; the longest of them leave first, as many as fit
    ``batch_size · seq_len`` tokens, so the windows of a batch have nearly the same length. A
    document's statistics are added to the accumulator once all its windows are scored.
    """

    def __init__(
        self,
        model: Any,
        readouts: Sequence[Readout],
        names: Sequence[str],
        sites: Sequence[Site],
        final: Site,
        seq_len: int,
        batch_size: int,
        chunk_size: int,
        acc: _Accumulator,
        reporter: _Reporter,
        world: World,
    ) -> None:
        self.model, self.readouts, self.names, self.sites, self.final = model, readouts, names, sites, final
        self.acc, self.reporter, self.world = acc, reporter, world
        self.unembedding = Unembedding.from_model(model, include_bias=True)
        # a vocabulary narrower than one kernel tile: as many more rows per chunk, so a tile holds as many
        # logits (the same memory) and the kernel's per-call overhead does not set the pace (stories260K,
        # 512 tokens: 23% less kernel time, the same bits)
        chunk_size *= max(1, DEFAULT_TILE_SIZE // self.unembedding.d_vocab)
        self.seq_len, self.batch_size, self.chunk_size = seq_len, batch_size, chunk_size
        self.budget = batch_size * seq_len  # tokens per forward pass
        self.open: dict[int, _Open] = {}
        self.full: list[_Window] = []
        self.tails: list[_Window] = []
        self.tail_tokens = 0
        self.real = 0  # token slots computed for real tokens, and for padding (this rank)
        self.padded = 0

    def add(self, index: int, ids: Sequence[int], n_bytes: int) -> None:
        """Queue document ``index``'s windows, scoring whatever batches are ready."""
        windows = document_windows(tuple(ids), self.seq_len)
        counts = torch.zeros(len(_COUNTS), dtype=torch.float64)
        counts[2], counts[3], counts[4] = n_bytes, 1, len(windows)
        self.open[index] = _Open(
            torch.zeros(len(self.readouts), len(self.sites), len(STATISTICS), dtype=torch.float64),
            counts,
            len(windows),
        )
        for number, ids_ in enumerate(windows):
            window = _Window(index, number, ids_)
            if len(ids_) == self.seq_len:
                self.full.append(window)
            else:
                self.tails.append(window)
                self.tail_tokens += len(ids_)
        while len(self.full) >= self.batch_size:
            self._score(self.full[: self.batch_size])
            self.full = self.full[self.batch_size :]
        while self.tail_tokens > _TAIL_POOL * self.budget:
            self._score_tails(1)

    def flush(self) -> None:
        """Score everything queued (the end of the corpus, or a checkpoint)."""
        if self.full:
            self._score(self.full)
            self.full = []
        self._score_tails(None)
        assert not self.open, "every window of every document was scored"

    def _score_tails(self, n_batches: int | None) -> None:
        """Score the ``n_batches`` longest batches of the pool (None: all of it)."""
        self.tails.sort(key=lambda w: -len(w.ids))
        done = 0
        while self.tails and (n_batches is None or done < n_batches):
            rows = max(1, self.budget // len(self.tails[0].ids))
            batch, self.tails = self.tails[:rows], self.tails[rows:]
            self.tail_tokens -= sum(len(w.ids) for w in batch)
            self._score(batch)
            done += 1

    def _score(self, batch: Sequence[_Window]) -> None:
        sums, counts, plan = _score_batch(
            self.model, self.readouts, self.names, self.sites, self.final, batch, self.seq_len, self.chunk_size,
            self.unembedding,
        )
        self.real += plan.n_real
        self.padded += plan.n_slots - plan.n_real
        done = 0
        for window, s, c in zip(batch, sums, counts):
            doc = self.open[window.doc]
            doc.stats += s
            doc.counts[:2] += c
            doc.remaining -= 1
            if doc.remaining == 0:
                self.acc.add(window.doc, doc.stats, doc.counts)
                del self.open[window.doc]
                done += 1
        padding = self.padded / max(self.real + self.padded, 1)
        self.reporter.update(int(counts[:, 0].sum()), done, self.world.size, padding)


def _interval(num: torch.Tensor, den: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point estimate ``num[0] / den[0]`` and the percentile interval of the replicates' ratios
    (``[replicate, ...]``, replicate 0 the whole corpus)."""
    ratio = torch.where(den > 0, num / den.clamp(min=1e-300), torch.nan)
    point = ratio[0]
    if ratio.shape[0] == 1:  # no replicates
        return point, torch.full_like(point, torch.nan), torch.full_like(point, torch.nan)
    return (point, *percentile_interval(ratio[1:], confidence))


# Entry points check their own arguments (see lens.logit_lens).
@no_type_check
def evaluate_lenses(
    model: Any,
    texts: Any,
    *,
    lenses: Any = None,
    sites: str | Sequence[str] | None = None,
    seq_len: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
    progress: bool = True,
    seed: int = 0,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    text_field: str = "text",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> LensEvaluation:
    """Evaluate lenses over a corpus: per site, KL to the final distribution, next-token
    cross-entropy, entropy and top-1 agreement with the final layer, with bootstrap intervals.

    Definition (also :data:`DEFINITION`): each text is tokenised with the model's BOS and its
    tokens after BOS are cut into consecutive windows of at most ``seq_len`` tokens, each led by
    BOS (see :func:`tl_logitlens.core.corpus.document_windows`). Every position is scored:
    ``KL(final ‖ site)`` and the site's entropy (nats), and top-1 agreement (the site's argmax
    equals the final layer's); the next-token cross-entropy ``-log p_site(next token)`` (nats)
    where the window holds a next token, so each token of a document is predicted once. Means are
    token-weighted (sums over the corpus / counts). Bits per byte (``*_bpb``) are the sums in bits
    over the UTF-8 bytes of the decoded documents. The ``confidence`` intervals are percentile
    intervals of ``n_bootstrap`` Poisson-bootstrap replicates over documents, seeded by ``seed``
    and each document's index. Each statistic goes through the same chunked float32 kernel as
    :func:`~tl_logitlens.logit_lens` and is summed in float64; memory does not grow with the corpus
    (sums, not per-token values, are kept).

    Speed: windows of exactly ``seq_len`` tokens run ``batch_size`` at a time with no padding and no
    attention mask; shorter windows (documents' last pieces) are pooled, sorted by length and run up
    to ``batch_size · seq_len`` tokens at a time, right-padded without a mask (a causal model never
    attends to later positions). ``padding_fraction`` of the result says what share of the token
    slots computed was padding. How windows are batched changes the numbers only by float32
    rounding (about 1e-7 relative). The torch thread count is the caller's
    (``torch.set_num_threads``); this function never changes it.

    In a process with an initialised ``torch.distributed`` process group (e.g. under
    ``torchrun``), document ``i`` is scored by rank ``i % world_size`` and the sums are added
    across ranks in rank order: every rank returns the same result, equal to one process's up to
    float64 summation order, with the same bootstrap replicates. Every rank must pass the same
    corpus; a rank with no document still takes part.

    With ``checkpoint_dir``, the float64 sums (with every bootstrap replicate), the counts and the
    position in the corpus are saved atomically (:class:`tl_logitlens.core.files.Checkpoint`) after every
    ``checkpoint_every`` documents and at the end; a later call with the same folder and settings
    resumes after the last checkpoint and returns the result an uninterrupted run with the same
    checkpoints gives, bit for bit (and a run without checkpoints to float32 rounding). The settings
    saved with it, which a resumed call must match, are the model (name, shape, dtype and a SHA-256 of
    its weights), each lens (name, and a SHA-256 of its weights when it is a ``torch.nn.Module``;
    another lens object by its type and name only), sites, ``seq_len``, ``max_tokens``, ``seed``,
    ``n_bootstrap``, ``text_field`` and the process's rank and world size; the texts already read
    must be the same (a SHA-256 of them is checked as they are read again). Under ``torchrun`` each
    rank keeps its own checkpoint, in ``checkpoint_dir/rank-R-of-N``; resume with the same number
    of processes.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` in eval mode, with a tokenizer.
        texts: a list or iterable of strings, a ``.txt``/``.json``/``.jsonl`` path, or a Hugging
            Face ``datasets`` split, streaming or not (see :func:`tl_logitlens.core.corpus.iter_texts`).
        lenses: ``None`` (the logit lens), one lens, a list of lenses, or a dict ``{name: lens}``.
            Lenses are labelled by name, so names must differ (two tuned lenses: set ``lens.name`` on
            one, or pass a dict; see :func:`~tl_logitlens.lenses.named_lenses`).
        sites: as in :func:`~tl_logitlens.logit_lens`; default (``None``): the sites the lenses read
            by default (:func:`~tl_logitlens.lenses.default_sites`): ``"resid_pre"`` (every layer's
            input, then ``final_post``) for the logit and tuned lenses, ``"resid_post"`` when a Jacobian
            lens is among them (every lens here reads block outputs). Sites given are read as given.
        seq_len: the longest window, BOS included (default and maximum: the model's ``n_ctx``).
        batch_size: full windows per forward pass; shorter windows fill ``batch_size · seq_len`` tokens.
        max_tokens: stop after this many document tokens (BOS included), in corpus order; the
            document that crosses the limit is cut.
        progress: show a progress bar (tokens, tokens/s, padding, time left) on stderr, on rank 0
            only, and only when stderr is a terminal (nothing is written otherwise).
        seed: the bootstrap's seed.
        n_bootstrap: bootstrap replicates (0: no intervals, they are NaN).
        confidence: the intervals' coverage.
        chunk_size: rows projected to the vocabulary at once (memory, not results); with a vocabulary
            smaller than the kernel's 2048-column tile, proportionally more (the same memory).
        text_field: the field or column holding text in JSON objects and data sets.
        checkpoint_dir: a folder to save checkpoints in and resume from (None: no checkpoints).
        checkpoint_every: documents of the corpus between checkpoints.

    Raises:
        ValueError: an empty corpus, a file that is not a corpus, ``seq_len`` above ``n_ctx``, a
            lens made for another model; NaN or inf in a lens's logits (naming the lens, site,
            document and token); a checkpoint saved with other settings or another corpus.
        TypeError: a text that is not a string; a lens that is not a lens; an option of the wrong type.

    Example:
        >>> ev = tl.evaluate_lenses(model, ["Once upon a time, there was a girl."], progress=False)
        >>> ev.to_dataframe()[["site", "lens", "kl_to_final", "cross_entropy"]]  # doctest: +SKIP
    """
    check_model(model)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("evaluate_lenses reads text, and this model has no tokenizer; set one with model.set_tokenizer(...)")
    n_ctx = model.cfg.n_ctx
    seq_len = n_ctx if seq_len is None else check_count(seq_len, "seq_len", 2)
    if seq_len > n_ctx:
        raise ValueError(f"seq_len={seq_len} is above the model's context of {n_ctx} tokens; use at most {n_ctx}")
    batch_size = check_count(batch_size, "batch_size", 1)
    if max_tokens is not None:
        max_tokens = check_count(max_tokens, "max_tokens", 1)
    chunk_size = check_count(chunk_size, "chunk_size", 1)
    check_flag(progress, "progress")
    checkpoint_every = check_count(checkpoint_every, "checkpoint_every", 1)
    if not isinstance(text_field, str):
        raise TypeError(f"text_field must be a string, not {type(text_field).__name__}")
    bootstrap = check_bootstrap(n_bootstrap, confidence, seed, min_replicates=0)
    named = named_lenses(model, lenses)
    readouts = [Readout(model, lens, "recompute", True) for lens in named.values()]
    site_list = resolve_sites(model, sites_or_default(model, sites, list(named.values())))
    final = resolve_sites(model, ["final_post"])[0]
    world = current_world()
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint_dir = check_path_argument(checkpoint_dir, "checkpoint_dir", "a folder path")
        settings = _checkpoint_settings(
            model, named, site_list, seq_len, max_tokens, bootstrap.seed, bootstrap.n_bootstrap, text_field, world
        )
        folder = Path(checkpoint_dir) if world.size == 1 else Path(checkpoint_dir) / f"rank-{world.rank}-of-{world.size}"
        checkpoint = Checkpoint(folder, settings, job="evaluate_lenses")

    n_lens, n_sites = len(readouts), len(site_list)
    acc = _Accumulator(
        stats=torch.zeros(1 + bootstrap.n_bootstrap, n_lens, n_sites, len(STATISTICS), dtype=torch.float64),
        counts=torch.zeros(1 + bootstrap.n_bootstrap, len(_COUNTS), dtype=torch.float64),
        seed=bootstrap.seed,
    )
    if checkpoint is not None:
        checkpoint.validate = _state_checker(acc)
    total_docs = corpus_length(texts) if max_tokens is None else None
    reporter = _Reporter(progress and world.is_main and sys.stderr.isatty(), max_tokens, total_docs)
    scorer = _Scorer(
        model, readouts, list(named), site_list, final, seq_len, batch_size, chunk_size, acc, reporter, world
    )
    _score_on_every_rank(model, texts, world, max_tokens, text_field, scorer, checkpoint, checkpoint_every, reporter)

    stats = sum_over_ranks(acc.stats, world)
    counts = sum_over_ranks(acc.counts, world)
    slots = sum_over_ranks(torch.tensor([scorer.real, scorer.padded], dtype=torch.float64), world)
    totals = {name: int(round(float(c))) for name, c in zip(_COUNTS, counts[0])}  # the count fields
    # one numerator and denominator per measure (MEASURES' order): the sums, then the bpb forms in bits
    bpb_idx = [STATISTICS.index(s) for s in BPB_STATISTICS]
    num = torch.cat([stats, stats[..., bpb_idx] / math.log(2)], dim=-1)
    den = counts[:, [_COUNTS.index(_PER[m]) for m in MEASURES]][:, None, None, :].expand_as(num)
    return LensEvaluation(
        lenses=tuple(named),
        sites=tuple(s.label for s in site_list),
        **interval_fields(*_interval(num, den, bootstrap.confidence), bootstrap),
        **totals,
        seq_len=seq_len,
        model_name=str(getattr(model.cfg, "model_name", "")),
        world_size=world.size,
        n_padded=int(slots[1]),
        n_computed=int(slots[0] + slots[1]),
        sums=stats[0],
    )


def _score_on_every_rank(
    model: Any,
    texts: Any,
    world: World,
    max_tokens: int | None,
    text_field: str,
    scorer: Any,
    checkpoint: Checkpoint | None,
    checkpoint_every: int,
    reporter: Any,
    per_document: int | None = None,
) -> None:
    """:func:`_score_corpus` on this rank; under torch.distributed a rank's bad input stops every rank
    (each raises ``ValueError`` naming it) instead of leaving the others waiting in a collective."""
    error: str | None = None
    try:
        _score_corpus(model, texts, world, max_tokens, text_field, scorer, checkpoint, checkpoint_every, per_document)
    except (ValueError, TypeError, OSError) as err:
        if world.size == 1:
            raise
        error = f"{type(err).__name__}: {err}"
    finally:
        reporter.close()
    error = broadcast_error(error, world)
    if error is not None:
        raise ValueError(f"a rank stopped with {error}")


def _score_corpus(
    model: Any,
    texts: Any,
    world: World,
    max_tokens: int | None,
    text_field: str,
    scorer: Any,  # a _Scorer, or any scorer with its add/flush/acc/real/padded/reporter (faithfulness's)
    checkpoint: Checkpoint | None,
    every: int,
    per_document: int | None = None,
) -> None:
    """Score this rank's documents, resuming from and saving ``checkpoint`` when there is one; with
    ``per_document`` (a scorer that reads no more) only each document's first tokens are tokenised."""
    state = None if checkpoint is None else checkpoint.load()
    start = 0
    corpus = HashedTexts(texts, text_field)
    if state is not None:
        start = int(state["next_document"])
        scorer.acc.stats.copy_(state["stats"])
        scorer.acc.counts.copy_(state["counts"])
        scorer.real, scorer.padded = int(state["real"]), int(state["padded"])
        corpus.expect(start, str(state["texts_sha256"]), checkpoint.path)
        scorer.reporter.resumed(int(round(float(state["counts"][0, 0]))), int(round(float(state["counts"][0, 3]))))

    def save(position: int) -> None:
        scorer.flush()
        checkpoint.save(
            {
                "next_document": position,
                "texts_sha256": corpus.digest(),
                "stats": scorer.acc.stats,
                "counts": scorer.acc.counts,
                "real": scorer.real,
                "padded": scorer.padded,
            }
        )

    saved = start
    owns = world.owns if start == 0 else (lambda i: i >= start and world.owns(i))
    for doc in documents(model, corpus, text_field=text_field, max_tokens=max_tokens, owns=owns, per_document=per_document):
        scorer.add(doc.index, doc.ids, doc.n_bytes)
        if checkpoint is not None and doc.index + 1 - saved >= every:
            saved = doc.index + 1
            save(saved)
    scorer.flush()
    corpus.check_complete()
    if checkpoint is not None and corpus.count > saved:
        save(corpus.count)


def _state_checker(acc: _Accumulator) -> Any:
    """The checker of an evaluation checkpoint's fields: the sums' and counts' dtype, shape and finiteness,
    counts that are not negative and do not exceed the documents read, whole-number positions."""
    stats_shape, counts_shape = tuple(acc.stats.shape), tuple(acc.counts.shape)

    def check(state: dict[str, Any]) -> None:
        position = field_int(state, "next_document", 0, 2**53)
        field_str(state, "texts_sha256", "[0-9a-f]{64}")
        field_tensor(state, "stats", stats_shape, torch.float64)
        counts = field_tensor(state, "counts", counts_shape, torch.float64, low=0.0)
        field_int(state, "real", 0, 2**53)
        field_int(state, "padded", 0, 2**53)
        if float(counts[0, _COUNTS.index("n_documents")]) > position:
            raise ValueError(f"field 'counts' counts more documents than the {position} read (field 'next_document')")

    return check


def _checkpoint_settings(
    model: Any,
    lenses: Mapping[str, Any],
    sites: Sequence[Site],
    seq_len: int,
    max_tokens: int | None,
    seed: int,
    n_bootstrap: int,
    text_field: str,
    world: World,
) -> dict[str, Any]:
    """What changes an evaluation's sums (see :func:`evaluate_lenses`), as JSON-able values."""
    cfg = model.cfg

    def lens_id(lens: Any) -> str:
        # a lens is its class, its name and its tensors (a module's weights, a Jacobian lens's matrices)
        kind = f"{type(lens).__module__}.{type(lens).__qualname__}:{lens_name(lens)}"
        digest = lens_sha256(lens)
        return kind if digest is None else f"{kind}:{digest}"

    return {
        "format": 1,
        "model": {
            "name": str(getattr(cfg, "model_name", "")),
            "n_layers": int(cfg.n_layers),
            "d_model": int(cfg.d_model),
            "d_vocab": int(cfg.d_vocab),
            "dtype": str(getattr(cfg, "dtype", "")),
            "weights_sha256": weights_sha256(model),
        },
        "lenses": {name: lens_id(lens) for name, lens in lenses.items()},
        "sites": [s.label for s in sites],
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "text_field": text_field,
        "rank": world.rank,
        "world_size": world.size,
    }
