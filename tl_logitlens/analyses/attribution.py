"""Direct logit attribution: how much each component, head or neuron writes along an answer's logit.

Through the final norm's *cached* scale the final norm is linear, so the final logit (difference)
is exactly a sum over everything that writes to the residual stream: the embeddings, each
attention head (plus each layer's ``b_O``), each MLP (or each neuron plus ``b_out``), the final
norm's bias and the unembedding bias. :func:`direct_logit_attribution` returns those rows, which
add up to the model's own final value; :func:`component_lens` shows which tokens each row
promotes and suppresses. The arithmetic is in :mod:`tl_logitlens.analyses.dla_algebra`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.dla_algebra import (
    CachedReadout,
    cached_readout,
    gather_rows,
    head_source_contributions,
    unembed_bias,
    unembed_columns,
    unit_contributions,
    unit_vectors,
)
from tl_logitlens.analyses.token_pairs import Pairs, resolve_pairs
from tl_logitlens.core import compat as _compat
from tl_logitlens.core.devices import ReadoutCache, readout_device, weight_on
from tl_logitlens.core.frames import long_index, position_columns
from tl_logitlens.core.inputs import Inputs, PositionSpec, check_flag, prepare_inputs, resolve_positions
from tl_logitlens.core.kernel import check_finite_cells
from tl_logitlens.core.readout import (
    CachedNorm,
    check_model,
    final_norm_bias,
    has_final_norm,
    logit_scale,
    soft_cap,
    transform_logits,
)
from tl_logitlens.core.results import (
    RowsResult,
    common_fields,
    joined_batches,
    nested_token_strings,
    selected_prompts,
    token_strings,
)
from tl_logitlens.core.run import Run, execute
from tl_logitlens.lenses import LOGIT_LENS

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

UNITS: tuple[str, ...] = ("component", "head", "head_source", "neuron")
LENS_UNITS: tuple[str, ...] = ("component", "head")
_HEAD_UNITS = ("head", "head_source")
DEFAULT_CHUNK_SIZE = 256


# ----------------------------------------------------------------------------------------------
# results


# the prompt-indexed fields: with a read-position dim after the batch dim, and without one
_ATTRIBUTION_DIMS = {"attribution": 1, "total": 0}
_ATTRIBUTION_IDS = ("correct_ids", "incorrect_ids")


@dataclass(frozen=True, kw_only=True, repr=False)
class AttributionResult(RowsResult):
    """Direct logit attribution rows that add up to the model's own final logit (difference).

    Fields (``pos`` runs over the *read* positions: ``positions[b, j]`` is the token position of
    column ``j`` of prompt ``b``; ``pair`` over the correct/incorrect pairs):

    - ``unit``: ``"component"``, ``"head"``, ``"head_source"`` or ``"neuron"``.
    - ``metric``: ``"logit_diff"`` (``logit(correct) - logit(incorrect)``) or ``"logit"``
      (``incorrect=None``). Values are in logits.
    - ``labels``: one per row. Grid rows come first (``"L3H7"`` heads, ``"L3N512"`` neurons), then
      in depth order: ``"embed"``, ``"pos_embed"`` (learned positional embeddings only),
      ``"{l}_attn_out"`` (the sum of layer ``l``'s heads, i.e. its attention output *without*
      ``b_O``; component and neuron units), ``"{l}_attn_b_O"`` (the attention output bias),
      ``"{l}_mlp_out"`` (the MLP's whole output, ``b_out`` included; component and head units),
      ``"{l}_mlp_b_out"`` (neuron unit), ``"final_norm_bias"`` (``ln_final.b``, unfolded LayerNorm
      models), ``"unembed_bias"`` (``b_U``).
    - ``row_layer``, ``row_index``: per row, its layer and its head or neuron index (-1 where
      that does not apply).
    - ``attribution``: ``[row, batch, pos, pair]``; ``attribution.sum(0) == total`` to float
      precision. NaN where ``valid`` is False (padding).
    - ``total``: ``[batch, pos, pair]``, the model's actual final logit (difference): its own final
      norm, unembedding and logit scaling applied to the final residual stream, not the sum of
      the rows.
    - ``grid_size``: ``(n_layers, n_heads)`` or ``(n_layers, d_mlp)``; the first
      ``n_layers * grid_size[1]`` rows are the grid, layer-major. None for ``unit="component"``.
    - ``source_attribution``: ``[layer, head, seq, batch, pos, pair]`` for ``unit="head_source"``:
      head ``(layer, head)``'s row split over the source token it attends to (attention weight ×
      value vector); zero for sources after the read position. Summing over ``seq`` gives the head's
      row. None for other units.
    - ``correct_ids``, ``incorrect_ids``: ``[batch, pair]`` ids (``incorrect_ids`` None for
      ``metric="logit"``); ``pair_labels``: readable labels per pair.
    """

    metric: str
    attribution: Float[torch.Tensor, "row batch pos pair"]
    total: Float[torch.Tensor, "batch pos pair"]
    grid_size: tuple[int, int] | None
    source_attribution: Float[torch.Tensor, "layer head seq batch pos pair"] | None
    correct_ids: Int[torch.Tensor, "batch pair"]
    incorrect_ids: Int[torch.Tensor, "batch pair"] | None
    pair_labels: tuple[str, ...]

    @classmethod
    def concat(cls, parts: Sequence[AttributionResult]) -> AttributionResult:
        """Results of disjoint batches (same unit, rows and pairs) joined along the batch, padded as
        :meth:`LensResult.concat <tl_logitlens.LensResult.concat>` pads.

        Raises:
            ValueError: no parts, parts that differ in unit, metric, rows or pairs, or ``head_source``
                results (their ``seq`` axis is not joined).
        """
        if not parts:
            raise ValueError("concat needs at least one AttributionResult")
        if len({(p.unit, p.metric, p.labels, p.grid_size, p.pair_labels, p.lens_name) for p in parts}) != 1:
            raise ValueError("concat joins results with the same unit, metric, rows and pairs")
        if parts[0].source_attribution is not None:
            raise ValueError("concat does not join unit='head_source' results; attribute those prompts in one call")
        if len(parts) == 1:
            return parts[0]
        return replace(parts[0], **joined_batches(parts, _ATTRIBUTION_DIMS, _ATTRIBUTION_IDS))

    def select_prompts(self, order: Sequence[int]) -> AttributionResult:
        """The prompts ``order[0], order[1], ...`` in that order (axes and padding kept)."""
        if self.source_attribution is not None:
            raise ValueError("select_prompts does not take unit='head_source' results")
        dims = {**_ATTRIBUTION_DIMS, **dict.fromkeys(_ATTRIBUTION_IDS, 0)}
        return replace(self, **selected_prompts(self, order, dims))

    @property
    def unexplained(self) -> Float[torch.Tensor, "batch pos pair"]:
        """``total - attribution.sum(0)``: zero up to float rounding (NaN at padding)."""
        return self.total - self.attribution.sum(0)

    def grid(self) -> Float[torch.Tensor, "layer unit batch pos pair"]:
        """The grid rows as ``[layer, head, batch, pos, pair]`` (or ``[layer, neuron, ...]``)."""
        if self.grid_size is None:
            raise ValueError(f"grid() needs unit 'head', 'head_source' or 'neuron'; this result is {self.unit!r}")
        n_layers, width = self.grid_size
        return self.attribution[: n_layers * width].reshape(n_layers, width, *self.attribution.shape[1:])

    def mean_attribution(self, pair: int = 0) -> Float[torch.Tensor, " row"]:
        """Each row's attribution averaged over prompts and read positions (padding left out)."""
        self._check_pair(pair)
        return torch.nanmean(self.attribution[..., pair].flatten(1), dim=1)

    def _check_pair(self, pair: int) -> None:
        n = self.attribution.shape[-1]
        if isinstance(pair, bool) or not isinstance(pair, int) or not -n <= pair < n:
            raise ValueError(f"pair must be an int in [0, {n}), got {pair!r}")

    def top(self, k: int = 10, *, pair: int = 0, rows: str | None = None, by: str = "abs") -> pd.DataFrame:
        """The ``k`` rows (or head × source cells) with the largest mean attribution (over prompts and
        read positions).

        ``rows``: ``"grid"`` (the unit's own rows: heads for ``unit="head"``/``"head_source"``, neurons
        for ``unit="neuron"``, over all layers), ``"all"`` (every row: also the embeddings, whole
        MLPs or attention layers and the biases) or, for ``unit="head_source"``, ``"source"`` (head ×
        source position cells: which head, reading which position). Default: ``"source"`` for
        ``unit="head_source"``, ``"grid"`` for the other units with a grid (``unit="head"`` ranks heads,
        ``unit="neuron"`` neurons), ``"all"`` for ``unit="component"``. ``by``: ``"abs"`` (largest
        magnitude), ``"positive"`` or ``"negative"``. Columns: ``rank``, ``label``, ``layer``,
        ``index``, ``attribution`` (mean, logits), ``share`` (of the mean total); with
        ``rows="source"`` also ``source`` (the source position) and ``source_token`` (its token, when
        every prompt has the same one there; else empty). A cell's mean counts a read position before
        the source as 0 (it cannot attend there), so a head's cells add up to the head's mean.

        Raises:
            ValueError: ``rows="grid"`` on a component result, ``rows="source"`` on a result that is
                not ``unit="head_source"``; a bad ``k``, ``pair``, ``rows`` or ``by``.

        Example:
            >>> dla = tl.direct_logit_attribution(model, "The dog was very", " happy", " sad", unit="head")
            >>> dla.top(3)  # the three heads with the largest mean |attribution|, e.g. L2H0, L3H1, L1H2
            >>> src = tl.direct_logit_attribution(model, "The dog was very", " happy", " sad", unit="head_source")
            >>> src.top(3)  # head x source cells, e.g. L2H0 reading position 2 ' dog'
        """
        import pandas as pd

        if rows is None:
            rows = "source" if self.unit == "head_source" else "all" if self.grid_size is None else "grid"
        if rows not in ("grid", "all", "source"):
            raise ValueError(f"rows must be 'grid', 'all' or 'source', got {rows!r}")
        if rows == "grid" and self.grid_size is None:
            raise ValueError("rows='grid' needs unit 'head', 'head_source' or 'neuron'")
        if rows == "source" and self.source_attribution is None:
            raise ValueError(f"rows='source' needs unit='head_source'; this result is {self.unit!r}")
        if by not in ("abs", "positive", "negative"):
            raise ValueError(f"by must be 'abs', 'positive' or 'negative', got {by!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if rows == "source":
            return self._top_sources(k, pair, by)
        mean = self.mean_attribution(pair)
        if rows == "grid":
            mean = mean[: self.grid_size[0] * self.grid_size[1]]
        key = {"abs": mean.abs(), "positive": mean, "negative": -mean}[by]
        idx = key.topk(min(k, key.shape[0])).indices.tolist()
        total = float(torch.nanmean(self.total[..., pair]))
        return pd.DataFrame(
            {
                "rank": list(range(1, len(idx) + 1)),
                "label": [self.labels[i] for i in idx],
                "layer": [self.row_layer[i] for i in idx],
                "index": [self.row_index[i] for i in idx],
                "attribution": [float(mean[i]) for i in idx],
                "share": [float(mean[i]) / total if total != 0 else float("nan") for i in idx],
            }
        )

    def mean_source_attribution(self, pair: int = 0) -> Float[torch.Tensor, "layer head seq"]:
        """Each head × source position cell averaged over prompts and read positions (padding left out;
        a read position before the source counts as 0, so a head's cells add up to its mean). Only for
        ``unit="head_source"``."""
        if self.source_attribution is None:
            raise ValueError(f"mean_source_attribution needs unit='head_source'; this result is {self.unit!r}")
        self._check_pair(pair)
        cells = self.source_attribution[..., pair]  # [layer, head, seq, batch, pos]
        return torch.nanmean(cells[..., self.valid.to(cells.device)], dim=-1)

    def _source_token(self, s: int) -> str:
        """The token at source position ``s`` when every prompt that has one there agrees, else ``""``."""
        tokens = {toks[s] for toks in self.str_tokens if s < len(toks)}
        return tokens.pop() if len(tokens) == 1 else ""

    def _top_sources(self, k: int, pair: int, by: str) -> pd.DataFrame:
        import pandas as pd

        mean = self.mean_source_attribution(pair)
        n_layers, n_heads, n_seq = mean.shape
        flat = mean.reshape(-1)
        key = {"abs": flat.abs(), "positive": flat, "negative": -flat}[by]
        key = torch.nan_to_num(key, nan=-float("inf"))
        idx = key.topk(min(k, key.shape[0])).indices.tolist()
        total = float(torch.nanmean(self.total[..., pair]))
        cells = [(i // (n_heads * n_seq), i // n_seq % n_heads, i % n_seq) for i in idx]
        return pd.DataFrame(
            {
                "rank": list(range(1, len(idx) + 1)),
                "label": [f"L{layer}H{head}@{s}" for layer, head, s in cells],
                "layer": [layer for layer, _, _ in cells],
                "index": [head for _, head, _ in cells],
                "source": [s for _, _, s in cells],
                "source_token": [self._source_token(s) for _, _, s in cells],
                "attribution": [float(flat[i]) for i in idx],
                "share": [float(flat[i]) / total if total != 0 else float("nan") for i in idx],
            }
        )

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per attribution row × prompt × read position × pair; padding left out.

        Columns: ``component``, ``row``, ``layer``, ``index``, ``prompt``, ``position``,
        ``input_token``, ``pair``, ``pair_label``, ``correct``, ``incorrect``, ``attribution``,
        ``total``. For ``unit="head_source"`` each head's row is split over the source positions it can
        read (one row per source, up to the read position) and two columns are added: ``source`` (the
        source position; missing, ``<NA>``, on rows that are not heads) and ``source_token``; the
        ``attribution`` of one prompt, position and pair still adds up to ``total``.
        """
        import pandas as pd

        frame = self._rows_frame()
        if self.source_attribution is None:
            return frame
        n_grid = self.grid_size[0] * self.grid_size[1]
        rest = frame[frame["row"] >= n_grid].assign(source=pd.NA, source_token="")
        return pd.concat([self._source_rows(frame.columns), rest], ignore_index=True).astype({"source": "Int64"})

    def _source_rows(self, columns: Any) -> pd.DataFrame:
        """The head rows of :meth:`to_dataframe` split over source positions (``unit="head_source"``)."""
        import pandas as pd

        src = self.source_attribution.cpu()
        n_layers, n_heads, n_seq, n_batch, n_pos, n_pair = src.shape
        positions, valid = self.positions.cpu(), self.valid.cpu()
        seq = torch.arange(n_seq)[None, :, None, None, None]
        readable = valid[None, None, :, :, None] & (seq <= positions[None, None, :, :, None])
        readable = readable.expand(n_layers * n_heads, n_seq, n_batch, n_pos, n_pair)
        r, s, b, j, k = readable.nonzero(as_tuple=True)
        flat = src.reshape(n_layers * n_heads, n_seq, n_batch, n_pos, n_pair)

        def names(ids: torch.Tensor | None) -> list[str]:
            return [""] * len(b) if ids is None else token_strings(self.tokenizer, ids.cpu()[b, k])

        frame = pd.DataFrame(
            {
                "component": [self.labels[i] for i in r.tolist()],
                "row": r.numpy(),
                "layer": (r // n_heads).numpy(),
                "index": (r % n_heads).numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "pair": k.numpy(),
                "pair_label": [self.pair_labels[i] for i in k.tolist()],
                "correct": names(self.correct_ids),
                "incorrect": names(self.incorrect_ids),
                "attribution": flat[r, s, b, j, k].numpy(),
                "total": self.total.cpu()[b, j, k].numpy(),
                "source": s.numpy(),
                "source_token": [self.str_tokens[bb][ss] for bb, ss in zip(b.tolist(), s.tolist())],
            }
        )
        return frame[[*columns, "source", "source_token"]]

    def _rows_frame(self) -> pd.DataFrame:
        import pandas as pd

        r, b, j, k = long_index(self.attribution.shape, self.valid)
        layer = torch.tensor(self.row_layer)
        index = torch.tensor(self.row_index)

        def names(ids: torch.Tensor | None) -> list[str]:
            return [""] * len(b) if ids is None else token_strings(self.tokenizer, ids.cpu()[b, k])

        return pd.DataFrame(
            {
                "component": [self.labels[i] for i in r.tolist()],
                "row": r.numpy(),
                "layer": layer[r].numpy(),
                "index": index[r].numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "pair": k.numpy(),
                "pair_label": [self.pair_labels[i] for i in k.tolist()],
                "correct": names(self.correct_ids),
                "incorrect": names(self.incorrect_ids),
                "attribution": self.attribution.cpu()[r, b, j, k].numpy(),
                "total": self.total.cpu()[b, j, k].numpy(),
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Heads: :func:`tl_logitlens.plotting.head_grid_figure`; heads by source position:
        :func:`tl_logitlens.plotting.head_source_figure` (layer·head × source token); components and
        neurons: :func:`tl_logitlens.plotting.component_bars_figure`. Keyword arguments go to that function."""
        if self.unit == "head_source":
            from tl_logitlens.plotting import head_source_figure

            return head_source_figure(self, **kwargs)
        if self.unit in _HEAD_UNITS:
            from tl_logitlens.plotting import head_grid_figure

            return head_grid_figure(self, **kwargs)
        from tl_logitlens.plotting import component_bars_figure

        return component_bars_figure(self, **kwargs)


@dataclass(frozen=True, kw_only=True, repr=False)
class ComponentLensResult(RowsResult):
    """Per component (or head) and read position: the tokens its output promotes and suppresses.

    Each row's output is read through the final norm's cached scale and ``W_U`` (the direct effect
    of that row on every logit, logit scaling included; rows add up to the model's logits before any
    soft cap). Fields:

    - ``unit``: ``"component"`` or ``"head"``; ``labels``, ``row_layer``, ``row_index`` as in
      :class:`AttributionResult` (for ``"head"``: the heads first, then the other rows).
    - ``promoted_ids``, ``promoted_logits``: ``[row, batch, pos, k]``, the ``k`` tokens whose
      logit the row raises most, in logits, largest first.
    - ``suppressed_ids``, ``suppressed_logits``: the ``k`` it lowers most, most negative first.
    - padding (``valid`` False): ids -1, logits NaN.
    """

    promoted_ids: Int[torch.Tensor, "row batch pos k"]
    promoted_logits: Float[torch.Tensor, "row batch pos k"]
    suppressed_ids: Int[torch.Tensor, "row batch pos k"]
    suppressed_logits: Float[torch.Tensor, "row batch pos k"]

    def promoted_tokens(self) -> list:
        """Promoted tokens as strings, nested ``[row][batch][pos][k]`` (pads: ``""``)."""
        return nested_token_strings(self.tokenizer, self.promoted_ids)

    def suppressed_tokens(self) -> list:
        """Suppressed tokens as strings, nested ``[row][batch][pos][k]`` (pads: ``""``)."""
        return nested_token_strings(self.tokenizer, self.suppressed_ids)

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per component × prompt × position × effect × rank; padding left out.

        Columns: ``component``, ``row``, ``layer``, ``index``, ``prompt``, ``position``,
        ``input_token``, ``effect`` (``"promoted"``/``"suppressed"``), ``rank``, ``token_id``,
        ``token``, ``logit``.
        """
        import pandas as pd

        frames = []
        for effect, ids, vals in (
            ("promoted", self.promoted_ids, self.promoted_logits),
            ("suppressed", self.suppressed_ids, self.suppressed_logits),
        ):
            r, b, j, k = long_index(ids.shape, self.valid)
            sel = ids.cpu()[r, b, j, k]
            frames.append(
                pd.DataFrame(
                    {
                        "component": [self.labels[i] for i in r.tolist()],
                        "row": r.numpy(),
                        "layer": torch.tensor(self.row_layer)[r].numpy(),
                        "index": torch.tensor(self.row_index)[r].numpy(),
                        **position_columns(self.positions, self.str_tokens, b, j),
                        "effect": effect,
                        "rank": (k + 1).numpy(),
                        "token_id": sel.numpy(),
                        "token": token_strings(self.tokenizer, sel),
                        "logit": vals.cpu()[r, b, j, k].numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def plot(self, **kwargs: Any) -> go.Figure:
        """See :func:`tl_logitlens.plotting.component_lens_figure`."""
        from tl_logitlens.plotting import component_lens_figure

        return component_lens_figure(self, **kwargs)


# ----------------------------------------------------------------------------------------------
# checks


def _check_unit(unit: object, allowed: tuple[str, ...]) -> None:
    if unit not in allowed:
        raise ValueError(f"unknown unit {unit!r}; use one of {list(allowed)}")


def _has_pos_embed(model: Any) -> bool:
    """Whether a learned positional embedding is added to the residual stream."""
    return model.cfg.positional_embedding_type == "standard"


def _has_mlp(model: Any) -> bool:
    return not model.cfg.attn_only


def _final_hook(model: Any) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def _hooks(model: Any, unit: str) -> list[str]:
    hooks = ["hook_embed"]
    if _has_pos_embed(model):
        hooks.append("hook_pos_embed")
    for layer in range(model.cfg.n_layers):
        hooks.append(f"blocks.{layer}.hook_attn_out")
        if _has_mlp(model):
            hooks.append(f"blocks.{layer}.hook_mlp_out")
        if unit in _HEAD_UNITS:
            hooks.append(f"blocks.{layer}.attn.hook_z")
        if unit == "head_source":
            hooks += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
        if unit == "neuron":
            hooks.append(f"blocks.{layer}.mlp.hook_post")
    hooks.append(_final_hook(model))
    if has_final_norm(model):
        hooks.append("ln_final.hook_scale")
    return hooks


def _check_unit_support(model: Any, cache: Any, unit: str) -> None:
    """Clear errors for units this model or this cache cannot serve."""
    n_layers = model.cfg.n_layers
    if unit == "neuron":
        if not _has_mlp(model):
            raise ValueError(
                "unit='neuron' attributes to MLP neurons, and this model is attention-only; use "
                "unit='head' or unit='component'"
            )
        for layer, block in enumerate(model.blocks):
            mlp = block.mlp
            if not (hasattr(mlp, "hook_post") and isinstance(getattr(mlp, "W_out", None), torch.Tensor)):
                raise ValueError(
                    f"unit='neuron' needs each MLP's hook_post (the activations W_out multiplies), and "
                    f"layer {layer}'s MLP ({type(mlp).__name__}) has no hook_post with a dense W_out "
                    "(e.g. a mixture of experts); use unit='component'"
                )
    if cache is None:
        return
    keys = set(cache.keys())
    if unit == "head_source":
        missing = [
            h
            for layer in range(n_layers)
            for h in (f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v")
            if h not in keys
        ]
        if missing:
            raise ValueError(
                "unit='head_source' splits each head over source positions with its attention pattern "
                f"and value vectors, and this cache lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                "cache them (run_with_cache without a names_filter that drops hook_pattern/hook_v), "
                "or leave cache=None"
            )
    if unit == "neuron":
        missing = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
        missing = [h for h in missing if h not in keys]
        if missing:
            raise ValueError(
                f"unit='neuron' reads the MLP activations (hook_post), and this cache lacks "
                f"{missing[:4]}{' ...' if len(missing) > 4 else ''}; cache them or leave cache=None"
            )


def _linear_logit_scale(model: Any) -> float:
    """The model's post-unembedding logit scaling (1.0 for most); refuses a soft cap."""
    scale = logit_scale(model)
    if scale is None:
        cap = soft_cap(model)
        what = f"soft-caps its logits (output_logits_soft_cap={cap})" if cap is not None else (
            "transforms its logits non-linearly after the unembedding"
        )
        raise ValueError(
            f"this model {what}, so its final logits are not a sum of component contributions; direct "
            "logit attribution would not add up. Use logit_diff for the per-layer view"
        )
    return scale


def _check_sum(
    actual: torch.Tensor, expected: torch.Tensor, what: str, units: str = "logits", dtype: torch.dtype = torch.float32
) -> None:
    """Guard the identities the attribution rests on; a failure means an unsupported architecture.

    The tolerance follows the model's dtype: the cached activations were rounded to it, so a bf16
    model's parts add up to its whole only to bf16 precision (measured 2e-3 to 7e-3 on stories260K).
    """
    err = float((actual - expected).abs().nan_to_num(0.0).max()) if actual.numel() else 0.0
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    tol = max(1e-3, 4 * eps) * (1.0 + float(expected.abs().nan_to_num(0.0).max()))
    if err > tol:
        raise ValueError(
            f"{what} (off by {err:.3g} {units}): this architecture writes to the residual stream in a "
            "way direct logit attribution does not model here; please report it with the model name"
        )


def _prepared_run(
    model: Any,
    inputs: Inputs,
    cache: Any,
    unit: str,
    positions: PositionSpec,
    prepend_bos: bool | None,
    attention_mask: torch.Tensor | None,
) -> Run:
    batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos, attention_mask=attention_mask)
    pos_index, valid = resolve_positions(positions, batch)
    _check_unit_support(model, cache, unit)
    return execute(model, batch, pos_index, valid, _hooks(model, unit), cache)


# ----------------------------------------------------------------------------------------------
# attribution


@dataclass(frozen=True)
class _Writer:
    """One thing that writes to the residual stream, in the order rows are reported.

    ``kind``: ``"state"`` (cached activations at ``hook``, minus the constant ``value`` when given:
    an attention output without its ``b_O``), ``"vector"`` (a bias added at every position, before
    the final norm), ``"post"`` (the final norm's bias, after it), ``"logit"`` (``b_U``), or a grid
    of a layer's parts: ``"heads"`` (each head, from ``hook_z``) or ``"neurons"`` (each neuron, from
    ``hook_post``), which must add up to ``hook`` (minus ``value``).
    """

    label: str
    layer: int
    kind: str
    hook: str | None = None
    value: torch.Tensor | None = None


def _writers(model: Any, unit: str) -> list[_Writer]:
    """Every row of an attribution (or component lens) with ``unit``, grid layers first.

    Direct logit attribution and the component lens both read this one list, so their rows are
    the same, in the same order, with the same biases.
    """
    d_model = model.cfg.d_model
    grid, rest = [], [_Writer("embed", -1, "state", "hook_embed")]
    if _has_pos_embed(model):
        rest.append(_Writer("pos_embed", -1, "state", "hook_pos_embed"))
    for layer, block in enumerate(model.blocks):
        b_O = weight_on(model, _compat.output_bias(block.attn, "b_O", d_model, model.W_U).detach().float())
        attn_out = f"blocks.{layer}.hook_attn_out"
        if unit in _HEAD_UNITS:
            grid.append(_Writer(f"L{layer}H", layer, "heads", attn_out, b_O))
        else:
            rest.append(_Writer(f"{layer}_attn_out", layer, "state", attn_out, b_O))
        rest.append(_Writer(f"{layer}_attn_b_O", layer, "vector", value=b_O))
        if not _has_mlp(model):
            continue
        mlp_out = f"blocks.{layer}.hook_mlp_out"
        if unit == "neuron":
            b_out = weight_on(model, _compat.output_bias(block.mlp, "b_out", d_model, model.W_U).detach().float())
            grid.append(_Writer(f"L{layer}N", layer, "neurons", mlp_out, b_out))
            rest.append(_Writer(f"{layer}_mlp_b_out", layer, "vector", value=b_out))
        else:
            rest.append(_Writer(f"{layer}_mlp_out", layer, "state", mlp_out))
    b = final_norm_bias(model)
    if b is not None:
        rest.append(_Writer("final_norm_bias", -1, "post", value=b.detach().float()))
    if getattr(model, "b_U", None) is not None:
        rest.append(_Writer("unembed_bias", -1, "logit", value=model.b_U.detach().float()))
    return grid + rest


@dataclass
class _AttributionRows:
    """Attribution rows as they are computed: labels, layers, indices and ``[batch, n, pair]`` values."""

    labels: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    grid_width: int | None = None

    def add(self, label: str, layer: int, value: torch.Tensor, index: int = -1) -> None:
        self.labels.append(label)
        self.layers.append(layer)
        self.index.append(index)
        self.values.append(value)

    def add_grid(self, writer: _Writer, parts: torch.Tensor) -> None:
        self.grid_width = parts.shape[0]
        for i, part in enumerate(parts):
            self.add(f"{writer.label}{i}", writer.layer, part, i)


@torch.inference_mode()
def _attribute(model: Any, cache: Any, unit: str, projector: CachedReadout, pos_index: torch.Tensor) -> _AttributionRows:
    """Each writer's contribution along the direction, with every identity checked on the way."""
    rows = _AttributionRows()
    dtype = model.cfg.dtype

    def at(hook: str) -> torch.Tensor:
        return gather_rows(cache[hook], pos_index)

    def whole(w: _Writer) -> torch.Tensor:
        out = projector.states(at(w.hook))
        return out if w.value is None else out - projector.vector(w.value)

    for w in _writers(model, unit):
        if w.kind == "state":
            rows.add(w.label, w.layer, whole(w))
        elif w.kind == "vector":
            rows.add(w.label, w.layer, projector.vector(w.value))
        elif w.kind == "post":
            rows.add(w.label, w.layer, projector.constant(projector.norm_bias))
        elif w.kind == "logit":
            rows.add(w.label, w.layer, projector.constant(projector.unembed_bias))
        elif w.kind == "heads":
            block = model.blocks[w.layer]
            vecs = unit_vectors(weight_on(model, block.attn.W_O), projector.g)
            heads = unit_contributions(at(f"blocks.{w.layer}.attn.hook_z"), vecs, projector.inv_scale)
            _check_sum(heads.sum(0), whole(w), f"layer {w.layer}'s heads do not add up to its attention output", dtype=dtype)
            rows.add_grid(w, heads)
            if unit == "head_source":
                pattern = cache[f"blocks.{w.layer}.attn.hook_pattern"].permute(0, 2, 1, 3)
                pattern_rows = gather_rows(pattern, pos_index).permute(0, 2, 1, 3)
                v = cache[f"blocks.{w.layer}.attn.hook_v"].float()
                src = head_source_contributions(pattern_rows, v, vecs, projector.inv_scale)
                _check_sum(src.sum(1), heads, f"layer {w.layer}'s source terms do not add up to its heads", dtype=dtype)
                rows.sources.append(src)
        else:  # neurons
            post = at(f"blocks.{w.layer}.mlp.hook_post")[..., None]  # a neuron: a unit of output dimension 1
            vecs = unit_vectors(weight_on(model, model.blocks[w.layer].mlp.W_out)[:, None], projector.g)
            neurons = unit_contributions(post, vecs, projector.inv_scale)
            _check_sum(neurons.sum(0), whole(w), f"layer {w.layer}'s neurons do not add up to its MLP output", dtype=dtype)
            rows.add_grid(w, neurons)
    # the residual stream must be exactly the sum of what was written to it
    written = [v for v, label in zip(rows.values, rows.labels) if label not in ("final_norm_bias", "unembed_bias")]
    _check_sum(
        torch.stack(written).sum(0),
        projector.states(at(_final_hook(model))),
        "the embeddings, attention and MLP outputs do not add up to the final residual stream",
        dtype=dtype,
    )
    return rows


@torch.inference_mode()
def _model_total(
    model: Any, cache: Any, pos_index: torch.Tensor, c_ids: torch.Tensor, i_ids: torch.Tensor | None
) -> Float[torch.Tensor, "batch n pair"]:
    """The model's own final logit (difference): its final norm, unembedding and post-unembedding
    transform on the final stream."""
    final = cache[_final_hook(model)]
    b = torch.arange(final.shape[0], device=final.device)[:, None]
    x = final[b, pos_index]
    normed = (model.ln_final(x) if has_final_norm(model) else x).float()

    def logit(ids: torch.Tensor) -> torch.Tensor:
        raw = torch.matmul(normed, unembed_columns(model, ids).transpose(-1, -2)) + unembed_bias(model, ids)[:, None]
        return transform_logits(model, raw)

    out = logit(c_ids)
    return out if i_ids is None else out - logit(i_ids)


@no_type_check  # checks its own arguments (see lens.logit_lens)
def direct_logit_attribution(
    model: Any,
    inputs: Inputs,
    correct: object,
    incorrect: object = None,
    *,
    unit: str = "component",
    positions: PositionSpec = "last",
    per_prompt: bool = False,
    cache: Any = None,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> AttributionResult:
    """Split the final logit of ``correct`` (minus that of ``incorrect``) into exact direct contributions.

    The final norm is applied with its cached scale (the one the model computed on its final
    residual stream), which makes it linear, so the rows add up to the model's own final value at
    each read position (``result.unexplained`` is float rounding). Every bias is a row of its own:
    each layer's attention output bias, the final norm's bias (unfolded LayerNorm models, through
    ``W_U``) and the unembedding bias; the norm's gain is applied on unfolded models. Units:

    - ``"component"``: embeddings, each layer's attention output (heads only) and MLP output.
    - ``"head"``: one row per (layer, head) from the cached ``z``: ``z · W_O[h] g / s`` with
      ``g = centre(w ⊙ (W_U[:, c] - W_U[:, i]))``, only at the read positions, so the
      ``[layer·head, batch, pos, d_model]`` stack is never built. ``grid()`` gives
      ``[layer, head, batch, pos, pair]``.
    - ``"head_source"``: as ``"head"``, plus each head split over source positions (attention
      weight × value vector) in ``source_attribution``; memory grows as
      ``layer·head·seq·batch·pos``, so read few positions.
    - ``"neuron"``: one row per MLP neuron, ``post · W_out[n] g / s``, where ``post`` is the MLP's
      ``hook_post``: for gated MLPs (LLaMA) TransformerLens stores ``act(x W_gate) * (x W_in) + b_in``
      there, exactly what ``W_out`` multiplies, so gated neurons are exact too. Each layer's
      ``b_out`` is a row; ``top(k)`` ranks neurons over all layers.

    Args:
        correct, incorrect: as in :func:`tl_logitlens.logit_diff`; ``incorrect=None`` attributes
            the logit of ``correct`` alone.
        positions: ``"last"`` (default), ``None`` (all), an int or a list of ints.
        per_prompt: ``correct``/``incorrect`` give one token (or list) per prompt.
        cache: an ``ActivationCache`` of these inputs on this model (computed when omitted).
    """
    _check_unit(unit, UNITS)
    check_model(model)
    check_flag(per_prompt, "per_prompt")
    scale = _linear_logit_scale(model)  # Granite, Cohere: logits scaled after W_U; linear, so rows scale too
    run = _prepared_run(model, inputs, cache, unit, positions, prepend_bos, attention_mask)
    pairs = resolve_pairs(model, correct, incorrect, run.batch.tokens.shape[0], per_prompt=per_prompt, allow_no_incorrect=True)
    return _attribution(model, run, pairs, unit, scale)


def _stream_order(w: _Writer) -> tuple[int, int]:
    """Where a writer writes in the forward pass: (layer, 0 attention / 1 MLP); embeddings first."""
    m = re.match(r"blocks\.(\d+)\.hook_(attn|mlp)_out$", w.hook or "")
    if m is None:
        return (-1, 0) if w.kind == "state" else (1 << 30, 0)
    return int(m.group(1)), int(m.group(2) == "mlp")


def _check_finite(
    model: Any, cache: Any, unit: str, projector: CachedReadout, attribution: torch.Tensor, total: torch.Tensor, run: Run
) -> None:
    """Refuse non-finite attributions, naming where they come from.

    The identity checks skip NaN (``nan_to_num``), so without this a NaN weight or state would give
    rows that look like numbers. A NaN anywhere in the stream also makes the final norm's cached scale
    NaN, which every row is divided by; so on the (rare) error path the direction and then the cached
    writers, in the order the forward pass writes them, are searched for the first non-finite value.
    """
    valid, pos_index = run.valid, run.positions
    keep = valid[None, ..., None]
    if bool(torch.isfinite(torch.where(keep, attribution, 0.0)).all()) and bool(
        torch.isfinite(torch.where(keep[0], total, 0.0)).all()
    ):
        return
    who = "direct logit attribution"
    if not bool(torch.isfinite(projector.g).all()):
        raise ValueError(
            f"{who} met NaN or inf in the direction it reads along (the tokens' unembedding columns W_U and "
            "the final norm's weight): Check the model's weights (a broken checkpoint)"
        )
    for w in sorted(_writers(model, unit), key=_stream_order):
        if w.hook is not None:
            values = gather_rows(cache[w.hook], pos_index)[None]
            check_finite_cells(values, valid, pos_index, lambda _, w=w: f"{w.hook!r} (row {w.label!r})", who)
        elif not bool(torch.isfinite(w.value).all()):
            raise ValueError(f"{who} met NaN or inf in the bias row {w.label!r}: Check the model's weights (a broken checkpoint)")
    check_finite_cells(attribution, valid, pos_index, lambda r: "an attribution row", who)
    check_finite_cells(total[None], valid, pos_index, lambda r: "the model's own final logit", who)


def _attribution(model: Any, run: Run, pairs: Pairs, unit: str, scale: float) -> AttributionResult:
    """The attribution rows of ``pairs`` over the run, and the model's own total beside them."""
    batch, cache, pos_index, valid = run.batch, run.cache, run.positions, run.valid
    # every layer's output meets W_U: read each hook on W_U's device (one move per hook on a spread model)
    cache = ReadoutCache(cache, readout_device(model))
    n_batch = batch.tokens.shape[0]
    direction = unembed_columns(model, pairs.correct)
    bias = unembed_bias(model, pairs.correct)
    if pairs.incorrect is not None:
        direction = direction - unembed_columns(model, pairs.incorrect)
        bias = bias - unembed_bias(model, pairs.incorrect)
    direction, bias = direction * scale, bias * scale
    projector = cached_readout(model, cache, direction, bias, pos_index)
    rows = _attribute(model, cache, unit, projector, pos_index)
    c_ids = pairs.correct.expand(n_batch, -1).clone()
    i_ids = None if pairs.incorrect is None else pairs.incorrect.expand(n_batch, -1).clone()
    total = _model_total(model, cache, pos_index, c_ids, i_ids)

    attribution = torch.stack(rows.values)
    grid_size = None if rows.grid_width is None else (model.cfg.n_layers, rows.grid_width)
    _check_finite(model, cache, unit, projector, attribution, total, run)

    nan = torch.full((), float("nan"), device=attribution.device)
    keep = valid[..., None]
    source = None
    if rows.sources:
        source = torch.stack(rows.sources)  # [layer, head, seq, batch, n, pair]
        source = torch.where(keep, source, nan)
    return AttributionResult(
        unit=unit,
        metric="logit" if i_ids is None else "logit_diff",
        labels=tuple(rows.labels),
        row_layer=tuple(rows.layers),
        row_index=tuple(rows.index),
        attribution=torch.where(keep, attribution, nan),
        total=torch.where(keep, total, nan),
        grid_size=grid_size,
        source_attribution=source,
        correct_ids=c_ids,
        incorrect_ids=i_ids,
        pair_labels=pairs.labels,
        **common_fields(model, batch, pos_index, valid, LOGIT_LENS.name),
    )


# ----------------------------------------------------------------------------------------------
# component lens


def _lens_terms(model: Any, cache: Any, unit: str, pos_index: torch.Tensor) -> Iterator[tuple[_Writer, int, torch.Tensor]]:
    """The component lens's rows: each writer with its index in its grid (-1 elsewhere) and its value
    in the residual stream (``[batch, n, d_model]`` states, a ``[d_model]`` vector, or ``b_U``)."""
    for w in _writers(model, unit):
        if w.kind == "heads":
            z = gather_rows(cache[f"blocks.{w.layer}.attn.hook_z"], pos_index)
            result = torch.einsum("bnhe,hem->hbnm", z, weight_on(model, model.blocks[w.layer].attn.W_O.detach().float()))
            for h in range(result.shape[0]):
                yield replace(w, label=f"{w.label}{h}", kind="state"), h, result[h]
        elif w.kind == "state":
            value = gather_rows(cache[w.hook], pos_index)
            yield w, -1, value if w.value is None else value - w.value
        else:
            yield w, -1, w.value


@torch.inference_mode()
def _term_logits(
    kind: str, value: torch.Tensor, norm: CachedNorm, sl: slice, w_u: torch.Tensor, scale: float
) -> Float[torch.Tensor, "rows d_vocab"]:
    """A row's direct effect on every logit at the flattened read rows ``sl``."""
    n_rows = norm.inv_scale[sl].shape[0]
    if kind == "logit":
        return (value * scale)[None].expand(n_rows, -1)
    if kind == "post":
        return (value @ w_u)[None].expand(n_rows, -1)
    x = value.expand(n_rows, -1) if kind == "vector" else value.reshape(-1, value.shape[-1])[sl]
    rows = CachedNorm(norm.inv_scale[sl], norm.gain, None, norm.centre)
    return rows.apply(x.float(), bias=False) @ w_u


@no_type_check  # checks its own arguments (see lens.logit_lens)
def component_lens(
    model: Any,
    inputs: Inputs,
    *,
    unit: str = "component",
    top_k: int = 10,
    positions: PositionSpec = "last",
    cache: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> ComponentLensResult:
    """The tokens each component's (or head's) output promotes and suppresses, per read position.

    Each row (the same rows as :func:`direct_logit_attribution` with ``unit="component"`` or
    ``"head"``) is centred (LayerNorm), divided by the final norm's cached scale, multiplied by its
    gain, projected with ``W_U`` and multiplied by the model's logit scaling where it has one
    (Granite, Cohere): its direct effect on every logit, in logits. The rows' effects add up to the
    model's logits (before the soft cap, on soft-capped models). ``chunk_size`` read rows are projected to the
    vocabulary at a time, so memory stays at ``chunk_size · d_vocab`` floats per step.
    """
    check_model(model)
    _check_unit(unit, LENS_UNITS)
    d_vocab = model.cfg.d_vocab
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k must be an int between 1 and d_vocab={d_vocab}, got {top_k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    run = _prepared_run(model, inputs, cache, unit, positions, prepend_bos, attention_mask)
    return _component_lens(model, run, unit, top_k, chunk_size)


def _component_lens(model: Any, run: Run, unit: str, top_k: int, chunk_size: int) -> ComponentLensResult:
    """Each writer's direct effect on every logit, reduced to its top and bottom ``top_k`` tokens."""
    batch, cache, pos_index, valid = run.batch, run.cache, run.positions, run.valid
    cache = ReadoutCache(cache, readout_device(model))  # as in _attribution
    n_batch, n = pos_index.shape
    rows = run.all_rows()
    norm = CachedNorm.of(model, cache, rows.b, rows.p)
    # a logit scaling after W_U (Granite, Cohere) is linear and applies to every row; a soft cap is not
    scale = logit_scale(model) or 1.0
    w_u = model.W_U.detach().float() * scale
    labels, layers, index = [], [], []
    top_i, top_v, bot_i, bot_v = [], [], [], []
    written = torch.zeros(n_batch, n, model.cfg.d_model, device=pos_index.device)
    with torch.inference_mode():
        for term, i, value in _lens_terms(model, cache, unit, pos_index):
            if term.kind in ("state", "vector"):
                written = written + value.float()
            labels.append(term.label)
            layers.append(term.layer)
            index.append(i)
            parts = [[], [], [], []]
            for start in range(0, n_batch * n, chunk_size):
                logits = _term_logits(term.kind, value, norm, slice(start, start + chunk_size), w_u, scale)
                hi = logits.topk(top_k, dim=-1)
                lo = logits.topk(top_k, dim=-1, largest=False)
                for p, t in zip(parts, (hi.indices, hi.values, lo.indices, lo.values)):
                    p.append(t)
            for acc, p in zip((top_i, top_v, bot_i, bot_v), parts):
                acc.append(torch.cat(p).reshape(n_batch, n, top_k))
        final = gather_rows(cache[_final_hook(model)], pos_index).float()
        _check_sum(
            torch.where(valid[..., None], written, 0.0),
            torch.where(valid[..., None], final, 0.0),
            "the embeddings, attention and MLP outputs do not add up to the final residual stream",
            units="in the residual stream",
            dtype=model.cfg.dtype,
        )

    # topk ranks NaN above every number, so a NaN would show as a "promoted" token: refuse it
    for parts in (top_v, bot_v):
        check_finite_cells(torch.stack(parts), valid, pos_index, lambda r: f"row {labels[r]!r}", "the component lens")
    keep = valid[None, ..., None]

    def finish(parts: list[torch.Tensor], fill: float | int) -> torch.Tensor:
        t = torch.stack(parts)
        return torch.where(keep, t, torch.full((), fill, dtype=t.dtype, device=t.device))

    nan = float("nan")
    return ComponentLensResult(
        unit=unit,
        labels=tuple(labels),
        row_layer=tuple(layers),
        row_index=tuple(index),
        promoted_ids=finish(top_i, -1),
        promoted_logits=finish(top_v, nan),
        suppressed_ids=finish(bot_i, -1),
        suppressed_logits=finish(bot_v, nan),
        **common_fields(model, batch, pos_index, valid, LOGIT_LENS.name),
    )
