"""What every result shares: the inputs it was computed on, where it read, and how to show it.

One policy for every analysis, stated once:

- **statistics in float32**: the lens's unembedding runs in the model's own dtype, exactly as the
  model's forward pass does; everything computed from it (log-probs, entropy, KL, ranks, logit
  differences, attributions) is float32;
- **results live on the model's device**, like the ``ActivationCache`` they come from (``.cpu()``
  them, or read ``to_dataframe()``, which is on the CPU);
- **padding cells** (``valid`` False) hold ids -1 and NaN values, and display as ``""``;
- **ids without a tokenizer** display as ``<id N>``, everywhere;
- **bootstrap intervals** have the same fields wherever they appear (:class:`BootstrapInterval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from html import escape
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int

from tl_logitlens.core.frames import input_tokens
from tl_logitlens.core.inputs import check_count
from tl_logitlens.core.tokens import display_tokens

# the name results, figures and tables give the logit lens (tl_logitlens.lenses.LogitLens.name)
LOGIT_LENS_NAME = "logit lens"


def token_strings(tokenizer: Any, ids: torch.Tensor | Sequence[int]) -> list[str]:
    """Readable strings for ids, ``""`` for the -1 of padding cells (see :func:`display_tokens`)."""
    flat = torch.as_tensor(ids).reshape(-1).cpu()
    shown = display_tokens(tokenizer, flat.clamp(min=0))
    return ["" if i < 0 else t for i, t in zip(flat.tolist(), shown)]


def nested_token_strings(tokenizer: Any, ids: torch.Tensor) -> list:
    """:func:`token_strings` of an id tensor, nested like the tensor (``tolist`` shape)."""
    flat = iter(token_strings(tokenizer, ids))

    def build(shape: Sequence[int]) -> Any:
        if not shape:
            return next(flat)
        return [build(shape[1:]) for _ in range(shape[0])]

    return build(tuple(ids.shape))


class ShortRepr:
    """A repr of a few facts (shapes and settings) and the names of the tensors, never their contents;
    an HTML table of the same facts in notebooks. Subclasses say which facts in ``_summary``."""

    def _summary(self) -> dict[str, str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self._summary().items())
        tensors = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return f"{type(self).__name__}({body}; tensors: {', '.join(tensors)})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{escape(k)}</th><td style='text-align:left'>{escape(v)}</td></tr>"
            for k, v in self._summary().items()
        )
        return f"<b>{escape(type(self).__name__)}</b><table>{rows}</table>"


def labels_summary(labels: Sequence[str]) -> str:
    """``"5 (0_pre, 1_pre, 2_pre, ..., final_post)"``: how many labels, and the first and last ones."""
    shown = ", ".join(labels) if len(labels) <= 6 else f"{', '.join(labels[:3])}, ..., {labels[-1]}"
    return f"{len(labels)} ({shown})"


@dataclass(frozen=True, kw_only=True, repr=False)
class ResultBase(ShortRepr):
    """The fields every result has: the inputs, the read positions and how the numbers were made.

    ``tokens`` are the (right-padded) input ids, ``str_tokens`` each prompt's tokens as text,
    ``positions[b, j]`` the token position of read column ``j`` in prompt ``b``, ``valid`` the real
    (not padding) read cells. ``model_name``, ``n_layers`` and ``lens_name`` (``"logit lens"``,
    ``"tuned lens"``, ...) say what made it, for figures and tables.
    """

    tokens: Int[torch.Tensor, "batch seq"]
    str_tokens: tuple[tuple[str, ...], ...]
    positions: Int[torch.Tensor, "batch pos"]
    valid: Bool[torch.Tensor, "batch pos"]
    model_name: str = ""
    n_layers: int | None = None
    lens_name: str = LOGIT_LENS_NAME
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def input_tokens(self) -> list[list[str]]:
        """The input token at each read position, ``[batch][pos]`` (pads: ``""``)."""
        return input_tokens(self.positions, self.str_tokens)

    def _summary(self) -> dict[str, str]:
        """The few facts a repr shows: shapes and settings, never tensor contents."""
        n_batch, n_pos = self.valid.shape
        out = {"model": self.model_name or "?", "prompts": str(n_batch), "read positions": str(n_pos)}
        labels = getattr(self, "labels", None)
        if labels:
            out["sites" if "final_post" in labels else "rows"] = labels_summary(labels)
        for name in ("unit", "kind", "metric", "norm"):
            value = getattr(self, name, None)
            if isinstance(value, str):
                out[name] = value
        out["lens"] = self.lens_name
        return out


@dataclass(frozen=True, kw_only=True, repr=False)
class LensStatistics(ResultBase):
    """What every lens result holds per site and read cell (``[site, batch, pos, ...]``): the top-k
    tokens and their log-probs, the entropy and ``KL(final ‖ site)`` (nats), and the log-prob and
    rank of each target; ``full_logprobs`` is the whole log-softmax when it was kept.

    ``target_sets[t]`` is target ``t``'s :class:`~tl_logitlens.core.token_sets.TokenSet` when it is a
    word-level token set (its log-prob is the log of its tokens' summed probability, its rank the best
    of theirs), None when it is one token."""

    labels: tuple[str, ...]
    top_ids: Int[torch.Tensor, "site batch pos k"]
    top_logprobs: Float[torch.Tensor, "site batch pos k"]
    entropy: Float[torch.Tensor, "site batch pos"]
    kl_to_final: Float[torch.Tensor, "site batch pos"]
    target_logprobs: Float[torch.Tensor, "site batch pos target"] | None = None
    target_ranks: Int[torch.Tensor, "site batch pos target"] | None = None
    target_sets: tuple[Any, ...] | None = None

    def target_labels(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Readable names of targets ``0, 1, ...`` whose ids at one read cell are ``ids``: a token
        set's label (``{park}``), else the token (see :func:`display_tokens`)."""
        shown = token_strings(self.tokenizer, ids)
        sets = self.target_sets or ()
        return [sets[t].label if t < len(sets) and sets[t] is not None else s for t, s in enumerate(shown)]
    full_logprobs: Float[torch.Tensor, "site batch pos d_vocab"] | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class RowsResult(ResultBase):
    """A result with one row per component, head or neuron: ``labels``, and per row its layer and its
    head or neuron index (-1 where that does not apply); ``unit`` names the kind of rows."""

    unit: str
    labels: tuple[str, ...]
    row_layer: tuple[int, ...]
    row_index: tuple[int, ...]


@dataclass(frozen=True, kw_only=True, repr=False)
class BootstrapInterval:
    """A mean with a percentile bootstrap interval, named alike in every result that has one.

    ``mean`` is the point estimate; ``low`` and ``high`` bound a ``confidence`` interval (e.g. 0.95:
    the 2.5th and 97.5th percentiles of the replicates' means) from ``n_bootstrap`` replicates drawn
    from a generator seeded with ``seed``, so the same call draws the same interval. The result says
    what is resampled (prompts, documents) and the shape of the three tensors.
    """

    mean: Float[torch.Tensor, "*shape"]
    low: Float[torch.Tensor, "*shape"]
    high: Float[torch.Tensor, "*shape"]
    confidence: float
    n_bootstrap: int
    seed: int


class DepthRows(NamedTuple):
    """The rows a depth profile (:func:`tl_logitlens.analyses.profile.depth_profile`) reads from a lens result:
    one per read position of a causal lens, per hole of a masked lens, per masked position of a
    sliding mask.

    ``select`` indexes the result's read grid (``[2, row]`` batch and column indices, or ``[row]``
    positions for a sliding mask: ``kind`` says which); ``prompts`` and ``positions`` place each row
    in the inputs and ``tokens`` shows it. ``n_layers`` is the model's layer count where the result's
    sites fix it (the masked lenses always read every layer's input and the last output), else None.
    """

    select: torch.Tensor
    prompts: torch.Tensor
    positions: torch.Tensor
    tokens: list[str]
    kind: str
    n_layers: int | None


def every_layer_count(labels: Sequence[str]) -> int | None:
    """``n`` when ``labels`` are exactly ``0_pre`` … ``{n-1}_pre``, ``final_post`` (every layer's input
    and the last output), else None."""
    n = len(labels) - 1
    if n >= 1 and tuple(labels) == (*(f"{i}_pre" for i in range(n)), "final_post"):
        return n
    return None


class BootstrapSettings(NamedTuple):
    """How a :class:`BootstrapInterval` is drawn (its non-tensor fields)."""

    n_bootstrap: int
    confidence: float
    seed: int


def check_bootstrap(n_bootstrap: object, confidence: object, seed: object, *, min_replicates: int) -> BootstrapSettings:
    """The settings of a :class:`BootstrapInterval`, checked: at least ``min_replicates`` replicates,
    a float confidence strictly between 0 and 1, a seed of 0 or more."""
    n_bootstrap = check_count(n_bootstrap, "n_bootstrap", min_replicates)
    if isinstance(confidence, bool) or not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be a float strictly between 0 and 1, e.g. 0.95")
    return BootstrapSettings(n_bootstrap, confidence, check_count(seed, "seed", 0))


def percentile_interval(replicates: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``low``, ``high``: the percentile interval at ``confidence`` of bootstrap replicates
    ``[replicate, ...]`` (NaN replicates left out)."""
    alpha = (1.0 - confidence) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=replicates.dtype, device=replicates.device)
    low, high = torch.nanquantile(replicates, q, dim=0)
    return low, high


def interval_fields(mean: torch.Tensor, low: torch.Tensor, high: torch.Tensor, settings: BootstrapSettings) -> dict[str, Any]:
    """The :class:`BootstrapInterval` fields of a result: the three tensors and the settings that drew them."""
    return {"mean": mean, "low": low, "high": high, **settings._asdict()}


def common_fields(model: Any, batch: Any, positions: torch.Tensor, valid: torch.Tensor, lens_name: str) -> dict:
    """The :class:`ResultBase` fields of a result computed on ``model`` over ``batch``."""
    return {
        "tokens": batch.tokens,
        "str_tokens": batch.str_tokens,
        "positions": positions,
        "valid": valid,
        "model_name": getattr(model.cfg, "model_name", "") or "",
        "n_layers": int(model.cfg.n_layers),
        "lens_name": lens_name,
        "tokenizer": getattr(model, "tokenizer", None),
    }


def _pad_to(t: torch.Tensor, dim: int, size: int, fill: float | int) -> torch.Tensor:
    """``t`` padded with ``fill`` along ``dim`` up to ``size``."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)


def joined_batches(parts: Sequence[Any], padded: dict[str, int], stacked: Sequence[str] = ()) -> dict[str, Any]:
    """The :class:`ResultBase` fields and the named tensors of results of disjoint batches, joined along the
    batch (for a result's ``concat``).

    ``padded`` maps a tensor field to its batch dim; its read-position dim (the next one) is padded to the
    widest part exactly as a batch pads it: ids -1, values NaN, ``valid`` False, positions counting on.
    ``stacked`` fields (``[batch, ...]`` with no position dim, e.g. ``correct_ids``) are concatenated as
    they are. A field that is None in the first part is None in the result.
    """
    width = max(p.positions.shape[1] for p in parts)
    seq = max(p.tokens.shape[1] for p in parts)

    def join(name: str, dim: int) -> torch.Tensor | None:
        first = getattr(parts[0], name)
        if first is None:
            return None
        fill = -1 if not first.dtype.is_floating_point else float("nan")
        return torch.cat([_pad_to(getattr(p, name), dim + 1, width, fill) for p in parts], dim=dim)

    positions = []
    for p in parts:
        n = p.positions.shape[1]
        extra = torch.arange(n, width, device=p.positions.device).expand(p.positions.shape[0], -1)
        positions.append(torch.cat([p.positions, extra], dim=1))
    out: dict[str, Any] = {name: join(name, dim) for name, dim in padded.items()}
    for name in stacked:
        out[name] = None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
    return {
        **out,
        "tokens": torch.cat([_pad_to(p.tokens, 1, seq, 0) for p in parts]),
        "str_tokens": tuple(s for p in parts for s in p.str_tokens),
        "positions": torch.cat(positions),
        "valid": torch.cat([_pad_to(p.valid, 1, width, False) for p in parts]),
    }


def selected_prompts(result: Any, order: Sequence[int], batch_dims: dict[str, int]) -> dict[str, Any]:
    """The :class:`ResultBase` fields and the named tensors (``{field: batch dim}``) of ``result`` for the
    prompts ``order[0], order[1], ...`` (for a result's ``select_prompts``; axes and padding kept).

    Raises:
        ValueError: an index outside the result's prompts.
    """
    index = torch.as_tensor(list(order), dtype=torch.long)
    n = len(result.str_tokens)
    if index.ndim != 1 or (len(index) and (int(index.min()) < 0 or int(index.max()) >= n)):
        raise ValueError(f"order must list prompt indices in [0, {n}), got {list(order)[:8]}")

    def take(name: str, dim: int) -> torch.Tensor | None:
        t = getattr(result, name)
        return None if t is None else t.index_select(dim, index.to(t.device))

    dims = {**batch_dims, "tokens": 0, "positions": 0, "valid": 0}
    return {
        **{name: take(name, dim) for name, dim in dims.items()},
        "str_tokens": tuple(result.str_tokens[i] for i in index.tolist()),
    }
