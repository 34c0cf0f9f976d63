"""Logit differences and arbitrary directions read at every site of the residual stream.

:func:`logit_diff` answers "from which layer on does the model prefer the answer to the
distractor?"; :func:`direction_lens` reads the normalised residual stream along any vector (a token
pair's unembedding difference, a probe, a steering vector). Both return a :class:`DirectionResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Bool, Float, Int

from tl_logitlens.analyses.dla_algebra import unembed_bias, unembed_columns
from tl_logitlens.analyses.token_pairs import Pairs, check_direction, resolve_pairs
from tl_logitlens.core.frames import long_index, position_columns
from tl_logitlens.core.inputs import Inputs, PositionSpec, check_flag, prepare_inputs, resolve_positions
from tl_logitlens.core.kernel import check_finite_cells
from tl_logitlens.core.readout import Readout, Site, check_model, check_norm, resolve_sites, transform_logits
from tl_logitlens.core.results import (
    BootstrapInterval,
    BootstrapSettings,
    ResultBase,
    check_bootstrap,
    common_fields,
    interval_fields,
    joined_batches,
    percentile_interval,
    selected_prompts,
    token_strings,
)
from tl_logitlens.core.run import Run, execute
from tl_logitlens.lenses import resolve_lens, sites_or_default

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

# the prompt-indexed fields with no read-position dim
_STACKED = ("correct_ids", "incorrect_ids")

NORM_VIEWS = (
    'norm="recompute" (the default) is the lens view: each site\'s residual state goes through the '
    "final norm with its own statistics, exactly as if the model stopped there, so the value at a "
    "site is what an early exit would score. It is non-linear: the values of two sites do not "
    "differ by what the layers between them wrote, and they are not sums of components. "
    'norm="cached" divides every state by the scale the final norm computed on the final residual '
    "stream (LayerNorm centring, the norm's gain and bias included); that is linear, so the value "
    "at a site is exactly the sum of the direct logit attributions of the components written before "
    "it (plus the bias rows), and the difference between two sites is what the layers between them "
    "wrote directly. Both agree at final_post, where they equal the model's own logit difference; "
    "earlier they can differ in size and even in sign, because an early state's own norm is not the "
    "final one. Use recompute to ask 'what would the model say here', cached to ask 'how much of the "
    "final answer has been written by here'."
)


@dataclass(frozen=True, kw_only=True, repr=False)
class DirectionResult(BootstrapInterval, ResultBase):
    """A scalar per site, prompt, read position and pair (or direction).

    Fields (dims as in TransformerLens; ``pos`` runs over the *read* positions, ``positions[b, j]``
    is the token position of column ``j`` of prompt ``b``):

    - ``kind``: ``"logit_diff"`` (``logit(correct) - logit(incorrect)``, in logits) or
      ``"direction"`` (the normalised residual stream dotted with a user vector, in that vector's
      units: logits when it is an unembedding difference).
    - ``labels``: site labels, as in :class:`~tl_logitlens.analyses.predictions.LensResult` (``"0_pre"``, ...,
      ``"final_post"``).
    - ``values``: ``[site, batch, pos, pair]``; NaN where ``valid`` is False (padding).
    - ``mean``, ``low``, ``high``: ``[site, pos, pair]``, the mean over prompts and a percentile
      bootstrap interval for it (``n_bootstrap`` resamples of the prompts with replacement,
      ``confidence`` coverage, seeded with ``seed``; with one prompt the interval collapses to the
      mean). :class:`~tl_logitlens.LensEvaluation` names its interval the same way.
    - ``pair_labels``: one readable label per pair (``"' Paris' - ' Rome'"``) or direction.
    - ``correct_ids``, ``incorrect_ids``: ``[batch, pair]`` token ids (None for directions).
    - ``norm``: ``"recompute"``, ``"cached"`` or ``"none"`` (see :data:`NORM_VIEWS`);
      ``include_bias``: whether ``b_U`` is in the logits (logit differences only).
    """

    kind: str
    labels: tuple[str, ...]
    values: Float[torch.Tensor, "site batch pos pair"]
    pair_labels: tuple[str, ...]
    correct_ids: Int[torch.Tensor, "batch pair"] | None
    incorrect_ids: Int[torch.Tensor, "batch pair"] | None
    norm: str
    include_bias: bool

    @classmethod
    def concat(cls, parts: Sequence[DirectionResult]) -> DirectionResult:
        """Results of disjoint batches (same sites, settings, pairs) joined along the batch, padded as
        :meth:`LensResult.concat <tl_logitlens.LensResult.concat>` pads; ``mean``/``low``/``high`` are
        drawn again over every prompt, with the parts' bootstrap settings, as one call on all of them draws them.
        """
        if not parts:
            raise ValueError("concat needs at least one DirectionResult")
        keys = {(p.kind, p.labels, p.pair_labels, p.norm, p.include_bias, p.lens_name, p.n_bootstrap, p.confidence, p.seed) for p in parts}
        if len(keys) != 1:
            raise ValueError("concat joins results with the same kind, sites, pairs, norm, lens and bootstrap settings")
        if len(parts) == 1:
            return parts[0]
        return parts[0]._with(joined_batches(parts, {"values": 1}, _STACKED))

    def select_prompts(self, order: Sequence[int]) -> DirectionResult:
        """The prompts ``order[0], order[1], ...`` in that order; the interval is drawn again over them."""
        return self._with(selected_prompts(self, order, {"values": 1, **dict.fromkeys(_STACKED, 0)}))

    def _with(self, batch_fields: dict[str, Any]) -> DirectionResult:
        """This result with other prompts' fields, its summary over prompts computed again for them."""
        settings = BootstrapSettings(self.n_bootstrap, self.confidence, self.seed)
        summary = bootstrap_mean(batch_fields["values"], batch_fields["valid"], settings)
        return replace(self, **batch_fields, **interval_fields(*summary, settings))

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per site × prompt × read position × pair; padding left out.

        Columns: ``site``, ``site_index``, ``prompt``, ``position``, ``input_token``, ``pair``,
        ``pair_label``, ``correct``, ``incorrect`` (token strings; empty for directions), ``value``.
        """
        import pandas as pd

        s, b, j, k = long_index(self.values.shape, self.valid)

        def names(ids: torch.Tensor | None) -> list[str]:
            return [""] * len(b) if ids is None else token_strings(self.tokenizer, ids.cpu()[b, k])

        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "pair": k.numpy(),
                "pair_label": [self.pair_labels[i] for i in k.tolist()],
                "correct": names(self.correct_ids),
                "incorrect": names(self.incorrect_ids),
                "value": self.values.cpu()[s, b, j, k].numpy(),
                "lens": self.lens_name,
            }
        )

    def summary_dataframe(self) -> pd.DataFrame:
        """One row per site × read-position column × pair: ``mean``, ``low``, ``high``, ``n_prompts``."""
        import pandas as pd

        s_n, p_n, k_n = self.mean.shape
        grid = torch.cartesian_prod(torch.arange(s_n), torch.arange(p_n), torch.arange(k_n)).reshape(-1, 3)
        s, j, k = grid.unbind(-1)
        n_valid = self.valid.cpu().sum(0)
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                "pos_column": j.numpy(),
                "pair": k.numpy(),
                "pair_label": [self.pair_labels[i] for i in k.tolist()],
                "mean": self.mean.cpu()[s, j, k].numpy(),
                "low": self.low.cpu()[s, j, k].numpy(),
                "high": self.high.cpu()[s, j, k].numpy(),
                "n_prompts": n_valid[j].numpy(),
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Mean value per site with its confidence band; see :func:`tl_logitlens.plotting.logit_diff_figure`."""
        from tl_logitlens.plotting import logit_diff_figure

        return logit_diff_figure(self, **kwargs)


def bootstrap_mean(
    values: Float[torch.Tensor, "site batch pos pair"],
    valid: Bool[torch.Tensor, "batch pos"],
    settings: BootstrapSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over prompts and its percentile bootstrap interval (prompts resampled with replacement).

    Resample ``r`` weights prompt ``b`` by how often it was drawn, ``counts[r, b]``; its mean is
    ``Σ_b counts·value / Σ_b counts·valid``, one matmul for all resamples.
    """
    n_batch = values.shape[1]
    w = valid.float().to(values.device)
    filled = torch.where(w[None, :, :, None] > 0, values, torch.zeros((), device=values.device))
    mean = filled.sum(1) / w.sum(0)[None, :, None]
    n_boot = settings.n_bootstrap
    gen = torch.Generator().manual_seed(settings.seed)
    idx = torch.randint(n_batch, (n_boot, n_batch), generator=gen)
    counts = torch.zeros(n_boot, n_batch).scatter_add_(1, idx, torch.ones(n_boot, n_batch))
    counts = counts.to(values.device)
    num = torch.einsum("rb,sbjk->rsjk", counts, filled)
    den = counts @ w  # [r, pos]
    return (mean, *percentile_interval(num / den[:, None, :, None], settings.confidence))


def _prepare(
    model: Any,
    inputs: Inputs,
    cache: Any,
    lens: Any,
    sites: str | Sequence[str] | None,
    norm: str,
    positions: PositionSpec,
    prepend_bos: bool | None,
    attention_mask: torch.Tensor | None,
    include_bias: bool = True,
) -> tuple[Readout, Sequence[Site], Run]:
    """The readout, the sites and the run that :func:`logit_diff` and :func:`direction_lens` read."""
    check_model(model)
    check_norm(norm)
    check_flag(include_bias, "include_bias")
    readout = Readout(model, resolve_lens(model, lens), norm, include_bias)
    site_list = resolve_sites(model, sites_or_default(model, sites, [readout.lens]))
    batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos, attention_mask=attention_mask)
    pos_index, valid = resolve_positions(positions, batch)
    return readout, site_list, execute(model, batch, pos_index, valid, readout.hooks(site_list), cache)


@torch.inference_mode()
def _normed_sites(readout: Readout, run: Run, site_list: Sequence[Site]) -> list[torch.Tensor]:
    """Each site's normalised state at every read cell, ``[batch, n, d_model]`` float32."""
    rows = run.all_rows()
    shape = (*run.positions.shape, -1)
    return [readout.normed(run.cache, site, rows.b, rows.p).float().reshape(shape) for site in site_list]


def _direction_result(
    kind: str,
    values: torch.Tensor,
    run: Run,
    readout: Readout,
    site_list: Sequence[Site],
    bootstrap: BootstrapSettings,
    **fields: Any,
) -> DirectionResult:
    """Values at padding set to NaN, the bootstrap summary over prompts, and the common fields."""
    valid = run.valid
    check_finite_cells(values, valid, run.positions, lambda s: f"site {site_list[s].label!r}")
    values = torch.where(valid[None, :, :, None], values, torch.full((), float("nan"), device=values.device))
    return DirectionResult(
        **common_fields(readout.model, run.batch, run.positions, valid, readout.name),
        **interval_fields(*bootstrap_mean(values, valid, bootstrap), bootstrap),
        kind=kind,
        labels=tuple(s.label for s in site_list),
        values=values,
        norm=readout.norm,
        **fields,
    )


@no_type_check  # checks its own arguments (see lens.logit_lens)
def logit_diff(
    model: Any,
    inputs: Inputs,
    correct: object,
    incorrect: object,
    *,
    positions: PositionSpec = "last",
    norm: str = "recompute",
    sites: str | Sequence[str] | None = None,
    include_bias: bool = True,
    per_prompt: bool = False,
    cache: Any = None,
    lens: Any = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> DirectionResult:
    """``logit(correct) - logit(incorrect)`` read at every site of the residual stream, in logits.

    Each site's state is normalised (``norm``), unembedded with ``W_U`` (plus ``b_U`` when
    ``include_bias``; then the model's own soft cap or logit scaling, where it has one) and the
    two logits subtracted; at ``final_post`` this is the model's own logit difference.

    norm="recompute" (the default) is the lens view: each site's residual state goes through the
    final norm with its own statistics, exactly as if the model stopped there, so the value at a
    site is what an early exit would score. It is non-linear: the values of two sites do not differ
    by what the layers between them wrote, and they are not sums of components. norm="cached"
    divides every state by the scale the final norm computed on the final residual stream
    (LayerNorm centring, the norm's gain and bias included); that is linear, so the value at a site
    is exactly the sum of the direct logit attributions of the components written before it (plus
    the bias rows), and the difference between two sites is what the layers between them wrote
    directly. Both agree at final_post, where they equal the model's own logit difference; earlier
    they can differ in size and even in sign, because an early state's own norm is not the final
    one. Use recompute to ask "what would the model say here", cached to ask "how much of the final
    answer has been written by here". (The same paragraph is :data:`NORM_VIEWS`.)

    Args:
        correct, incorrect: the answer and the distractor: token strings (each exactly one token)
            or ids; lists of equal length for several pairs shared by every prompt; or, with
            ``per_prompt=True``, one token (or one list of tokens) per prompt, e.g. IOI batches
            where each prompt has its own names. A tensor ``[batch]``/``[batch, pair]`` of ids
            also works with ``per_prompt=True``.
        positions: ``"last"`` (each prompt's last real token, the default), ``None`` (all), an int
            or a list of ints (negative counts back from each prompt's end).
        sites: as in :func:`~tl_logitlens.logit_lens`; default (``None``): the lens's
            ``default_sites`` (``"resid_pre"``, every layer's input then ``final_post``, for the logit
            and tuned lenses; ``"resid_post"`` for the Jacobian lens). Sites given are read as given.
        lens: ``None`` (the logit lens) or a lens object (e.g. a tuned lens) applied to each site's
            state before the final norm.
        n_bootstrap, confidence, seed: the percentile bootstrap over prompts behind ``low``/``high``.

    Returns:
        A :class:`DirectionResult` with ``values[site, batch, pos, pair]``.
    """
    bootstrap = check_bootstrap(n_bootstrap, confidence, seed, min_replicates=1)
    readout, site_list, run = _prepare(
        model, inputs, cache, lens, sites, norm, positions, prepend_bos, attention_mask, include_bias
    )
    pairs = resolve_pairs(model, correct, incorrect, run.batch.tokens.shape[0], per_prompt=per_prompt)
    return _logit_diff(readout, run, site_list, pairs, bootstrap)


def _logit_diff(
    readout: Readout, run: Run, site_list: Sequence[Site], pairs: Pairs, bootstrap: BootstrapSettings
) -> DirectionResult:
    """Each site's normalised state read along the pairs' unembedding columns (the model's own logit
    transform applied to each logit, so ``final_post`` is the model's own difference)."""
    model, include_bias = readout.model, readout.include_bias
    n_batch = run.batch.tokens.shape[0]
    w_c, w_i = unembed_columns(model, pairs.correct), unembed_columns(model, pairs.incorrect)
    zero = torch.zeros(pairs.correct.shape, device=w_c.device)
    b_c = unembed_bias(model, pairs.correct) if include_bias else zero
    b_i = unembed_bias(model, pairs.incorrect) if include_bias else zero
    values = []
    for normed in _normed_sites(readout, run, site_list):
        l_c = torch.matmul(normed, w_c.transpose(-1, -2)) + b_c[:, None, :]
        l_i = torch.matmul(normed, w_i.transpose(-1, -2)) + b_i[:, None, :]
        values.append(transform_logits(model, l_c) - transform_logits(model, l_i))
    return _direction_result(
        "logit_diff",
        torch.stack(values),
        run,
        readout,
        site_list,
        bootstrap,
        pair_labels=pairs.labels,
        correct_ids=pairs.correct.expand(n_batch, -1).clone(),
        incorrect_ids=pairs.incorrect.expand(n_batch, -1).clone(),
        include_bias=include_bias,
    )


@no_type_check  # checks its own arguments (see lens.logit_lens)
def direction_lens(
    model: Any,
    inputs: Inputs,
    direction: object,
    *,
    direction_labels: Sequence[str] | None = None,
    positions: PositionSpec = "last",
    norm: str = "recompute",
    sites: str | Sequence[str] | None = None,
    cache: Any = None,
    lens: Any = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> DirectionResult:
    """Each site's normalised residual stream dotted with ``direction``.

    ``direction`` is a ``[d_model]`` vector (or ``[n, d_model]`` for several) in the space the
    unembedding reads, i.e. *after* the final norm: ``W_U[:, a] - W_U[:, b]`` gives the logit
    difference of ``a`` over ``b`` without ``b_U``; a probe or steering vector trained on the raw
    residual stream is read with ``norm="none"``. ``norm`` is as in :func:`logit_diff` (the final
    norm's bias is part of the normalised state). The result's ``pair`` dimension runs over the
    directions. ``sites`` and ``lens`` are as in :func:`logit_diff` (by default the sites the lens
    reads by default: ``"resid_post"`` for the Jacobian lens, ``"resid_pre"`` otherwise).
    """
    bootstrap = check_bootstrap(n_bootstrap, confidence, seed, min_replicates=1)
    dirs = check_direction(model, direction)
    if direction_labels is None:
        direction_labels = tuple(f"direction {i}" for i in range(dirs.shape[0]))
    else:
        if isinstance(direction_labels, str) or len(direction_labels) != dirs.shape[0]:
            raise ValueError(
                f"direction_labels must be a list with one label per direction ({dirs.shape[0]})"
            )
        direction_labels = tuple(str(s) for s in direction_labels)
    readout, site_list, run = _prepare(
        model, inputs, cache, lens, sites, norm, positions, prepend_bos, attention_mask
    )
    values = torch.stack([normed @ dirs.T for normed in _normed_sites(readout, run, site_list)])
    return _direction_result(
        "direction",
        values,
        run,
        readout,
        site_list,
        bootstrap,
        pair_labels=direction_labels,
        correct_ids=None,
        incorrect_ids=None,
        include_bias=False,
    )
