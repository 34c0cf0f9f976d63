"""Depth profiles: how a token's log-probability climbs through the layers, and where the model decides.

For each read row (a prompt's position in a causal lens, a hole in a masked lens, a masked
position in a sliding-mask run) the profile holds the target's log-prob at every site, and fits

    logp(d) ≈ a + b · sqrt(d)

by least squares over the site depths ``d`` (``l_pre`` → l, ``l_mid`` → l + ½, ``l_post`` → l + 1,
``final_post`` → ``n_layers``: the last block's output, whichever sites the result holds). It reports the intercept ``a`` (nats), the slope
``b`` (nats per √layer) and r². The same fit is made to the maximum log-prob over the vocabulary at
each site (the top-1 token's, whichever it is). The *decision site* is the first site from which
the top-1 token equals the final top-1 and stays so through every later site.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.results import DepthRows, ShortRepr, labels_summary
from tl_logitlens.core.tokens import display_tokens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

_LABEL = re.compile(r"^(\d+)_(pre|mid|post)$")
_OFFSET = {"pre": 0.0, "mid": 0.5, "post": 1.0}


def site_depths(labels: Sequence[str], n_layers: int | None = None) -> Float[torch.Tensor, " site"]:
    """Depth of each site label in layers: ``l_pre`` → l, ``l_mid`` → l + ½, ``l_post`` → l + 1.

    ``final_post`` is the last block's output, depth ``n_layers`` (the model's layer count, not the
    deepest layer named: ``resid_post`` sites name layers up to ``n_layers - 2``). It needs
    ``n_layers``; the other labels do not.

    Raises:
        ValueError: a label that is not a site, ``final_post`` without ``n_layers``, or a layer
            at or past ``n_layers``.
    """
    if n_layers is not None and (isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1):
        raise ValueError(f"n_layers must be a positive int (the model's cfg.n_layers), got {n_layers!r}")
    out: list[float] = []
    for lab in labels:
        m = _LABEL.match(lab)
        if m:
            layer = int(m.group(1))
            if n_layers is not None and layer >= n_layers:
                raise ValueError(f"site {lab!r} is past the model's last layer (n_layers={n_layers})")
            out.append(layer + _OFFSET[m.group(2)])
        elif lab == "final_post":
            if n_layers is None:
                raise ValueError(
                    "'final_post' sits at depth n_layers, and this result does not record the model's layer "
                    "count: pass n_layers=model.cfg.n_layers"
                )
            out.append(float(n_layers))
        else:
            raise ValueError(f"site label {lab!r} has no depth; expected labels like '3_pre' or 'final_post'")
    return torch.tensor(out, dtype=torch.float64)


def result_n_layers(result: Any, n_layers: int | None = None) -> int | None:
    """The model's layer count for a lens result: ``n_layers`` if given, else the result's own.

    A result that records ``n_layers`` must agree with the one given. Masked-LM results
    (``MaskedLensResult``, ``SlidingMaskResult``) always hold every layer's input and the last output
    (``0_pre`` … ``{n-1}_pre``, ``final_post``), so their count is exact from their labels. A causal
    ``LensResult`` may hold any subset of sites (``sites=``, ``select_sites``), so its count is never
    guessed from the labels: without a recorded or given ``n_layers`` this returns None, and
    :func:`site_depths` refuses ``final_post``.
    """
    own = getattr(result, "n_layers", None)
    if own is None:
        own = _rows_of(result).n_layers
    if n_layers is None:
        return own
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int (the model's cfg.n_layers), got {n_layers!r}")
    if own is not None and own != n_layers:
        raise ValueError(f"n_layers={n_layers} disagrees with the result, which comes from a {own}-layer model")
    return n_layers


@dataclass(frozen=True)
class SqrtFit:
    """Least-squares fit ``y ≈ intercept + slope · sqrt(depth)`` per row (NaN where < 2 finite points)."""

    intercept: Float[torch.Tensor, " row"]
    slope: Float[torch.Tensor, " row"]
    r2: Float[torch.Tensor, " row"]


def fit_sqrt(depths: Float[torch.Tensor, " site"], values: Float[torch.Tensor, "site row"]) -> SqrtFit:
    """Fit ``values ≈ a + b·sqrt(depths)`` for each row separately, ignoring non-finite values.

    Closed form of simple linear regression on ``x = sqrt(depth)``: ``b = Σ(x-x̄)(y-ȳ) / Σ(x-x̄)²``,
    ``a = ȳ - b·x̄``, ``r² = 1 - SS_res / SS_tot`` (1 when the row is constant and fitted exactly).
    """
    x = depths.double().sqrt()[:, None].expand_as(values)
    y = values.double()
    ok = torch.isfinite(y)
    n = ok.sum(0)
    w = ok.double()
    y0 = torch.where(ok, y, 0.0)
    xm = (x * w).sum(0) / n.clamp(min=1)
    ym = (y0 * w).sum(0) / n.clamp(min=1)
    dx, dy = (x - xm) * w, (y0 - ym) * w
    sxx = (dx * dx).sum(0)
    slope = (dx * dy).sum(0) / sxx
    intercept = ym - slope * xm
    resid = (y0 - intercept - slope * x) * w
    ss_res, ss_tot = (resid * resid).sum(0), (dy * dy).sum(0)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-300), torch.where(ss_res < 1e-20, 1.0, 0.0))
    bad = (n < 2) | (sxx == 0)
    nan = torch.full_like(slope, float("nan"))
    return SqrtFit(
        intercept=torch.where(bad, nan, intercept),
        slope=torch.where(bad, nan, slope),
        r2=torch.where(bad, nan, r2),
    )


def decision_sites(top1: Int[torch.Tensor, "site row"]) -> Int[torch.Tensor, " row"]:
    """First site from which the top-1 token equals the final top-1 at every later site."""
    agree = top1 == top1[-1:]
    stays = agree.flip(0).long().cumprod(0).flip(0).bool()  # agreement from this site to the end
    return stays.long().argmax(0)


@dataclass(frozen=True, repr=False)
class DepthProfile(ShortRepr):
    """A target's log-prob across depth per row, its √depth fit, the max-token profile and decisions.

    Indexed ``[site, row]``; each row is one read (``prompts[i]``, ``positions[i]``, whose token is
    ``row_tokens[i]``). ``target_ids[i]`` is the profiled token (-1 for the max profile). Log-probs in
    nats; ``slope`` in nats per √layer. ``decision_site[i]`` indexes ``labels``. ``tracked_ids`` are
    tokens chosen by their maximum probability over the sites; their log-probs are NaN at sites the
    source result did not record (a causal ``LensResult`` records only each site's top-k).
    """

    labels: tuple[str, ...]
    depths: Float[torch.Tensor, " site"]
    prompts: Int[torch.Tensor, " row"]
    positions: Int[torch.Tensor, " row"]
    row_tokens: tuple[str, ...]
    target: str
    target_ids: Int[torch.Tensor, " row"]
    logprobs: Float[torch.Tensor, "site row"]
    intercept: Float[torch.Tensor, " row"]
    slope: Float[torch.Tensor, " row"]
    r2: Float[torch.Tensor, " row"]
    max_ids: Int[torch.Tensor, "site row"]
    max_logprobs: Float[torch.Tensor, "site row"]
    max_intercept: Float[torch.Tensor, " row"]
    max_slope: Float[torch.Tensor, " row"]
    max_r2: Float[torch.Tensor, " row"]
    decision_site: Int[torch.Tensor, " row"]
    tracked_ids: Int[torch.Tensor, "row track"]
    tracked_logprobs: Float[torch.Tensor, "site row track"]
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def fitted(self, depths: Float[torch.Tensor, " d"] | None = None) -> Float[torch.Tensor, "d row"]:
        """The fitted curve ``a + b·sqrt(d)`` at ``depths`` (the sites' depths by default)."""
        d = self.depths if depths is None else depths.double()
        return self.intercept[None] + self.slope[None] * d.sqrt()[:, None]

    def decision_labels(self) -> list[str]:
        return [self.labels[i] for i in self.decision_site.tolist()]

    def _summary(self) -> dict[str, str]:
        return {"rows": str(len(self.row_tokens)), "sites": labels_summary(self.labels), "target": self.target}

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × row, with the target's and the max token's log-probs and fits."""
        import pandas as pd

        fit = self.fitted()
        max_fit = self.max_intercept[None] + self.max_slope[None] * self.depths.sqrt()[:, None]
        max_tokens = display_tokens(self.tokenizer, self.max_ids.clamp(min=0))
        n_rows = len(self.row_tokens)
        records = []
        for s, label in enumerate(self.labels):
            for i in range(n_rows):
                records.append(
                    {
                        "site": label, "site_index": s, "depth": float(self.depths[s]),
                        "row": i, "prompt": int(self.prompts[i]), "position": int(self.positions[i]),
                        "token": self.row_tokens[i], "target": self.target, "target_id": int(self.target_ids[i]),
                        "logprob": float(self.logprobs[s, i]), "fitted_logprob": float(fit[s, i]),
                        "max_token": max_tokens[s * n_rows + i], "max_logprob": float(self.max_logprobs[s, i]),
                        "fitted_max_logprob": float(max_fit[s, i]),
                    }
                )
        return pd.DataFrame(records)

    def fit_dataframe(self) -> pd.DataFrame:
        """One row per read: the fits (intercept, slope, r²) of the target and of the max token, and the decision site."""
        import pandas as pd

        labels = self.decision_labels()
        return pd.DataFrame(
            {
                "row": range(len(self.row_tokens)), "prompt": self.prompts.numpy(), "position": self.positions.numpy(),
                "token": list(self.row_tokens), "target": self.target,
                "intercept": self.intercept.numpy(), "slope": self.slope.numpy(), "r2": self.r2.numpy(),
                "max_intercept": self.max_intercept.numpy(), "max_slope": self.max_slope.numpy(),
                "max_r2": self.max_r2.numpy(), "decision_site": self.decision_site.numpy(),
                "decision_label": labels, "decision_depth": self.depths[self.decision_site].numpy(),
            }
        )

    def plot(self, row: int = 0, **kwargs: Any) -> go.Figure:
        """The laminar profile of one row; see :func:`tl_logitlens.plotting.masked.profile_figure`."""
        from tl_logitlens.plotting.masked import profile_figure

        return profile_figure(self, row=row, **kwargs)

    def plot_heatmaps(self, **kwargs: Any) -> go.Figure:
        """Target and max log-prob heatmaps with the slope panel; see :func:`tl_logitlens.plotting.profile_heatmaps`."""
        from tl_logitlens.plotting.masked import profile_heatmaps

        return profile_heatmaps(self, **kwargs)


TargetArg = Union[None, str, int]


def _rows_of(result: Any) -> DepthRows:
    """The rows of a lens result, as the result itself says (its ``depth_rows()``): this module reads
    results by that one method and never imports the analyses that make them."""
    rows = getattr(result, "depth_rows", None)
    if not callable(rows):
        raise TypeError(
            f"depth_profile takes a LensResult, MaskedLensResult or SlidingMaskResult, not {type(result).__name__}"
        )
    return rows()


def _pick(t: torch.Tensor, select: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of a [site, batch, pos, ...] (or [site, pos, ...] for sliding) tensor as [site, row, ...]."""
    t = t.cpu()
    if kind == "sliding":
        return t[:, select]
    return t[:, select[0], select[1]]


@no_type_check
def depth_profile(
    result: Any, target: TargetArg = None, *, n_track: int | None = None, n_layers: int | None = None
) -> DepthProfile:
    """The depth profile of ``target`` in every row of a lens result, with its √depth fit.

    ``target``: ``None`` profiles the natural token (the next token for a causal ``LensResult``, the
    original token at the hole for masked results); ``"max"`` the maximum log-prob at each site; a
    token string or id must be one of the result's ``targets`` (pass ``targets=[...]`` to the lens).
    ``n_track``: how many tracked tokens to keep (default: all the result holds).
    ``n_layers``: the model's layer count, which places ``final_post`` (depth ``n_layers``); needed
    only when the result does not record it (see :func:`result_n_layers`).

    Raises:
        ValueError: ``final_post`` among the sites and the layer count unknown; a target the result
            does not hold; a bad ``n_track``.
    """
    select, prompts, positions, row_tokens, kind, _ = _rows_of(result)
    depths = site_depths(result.labels, result_n_layers(result, n_layers))
    top_ids = _pick(result.top_ids, select, kind)
    top_lp = _pick(result.top_logprobs, select, kind)
    max_ids, max_lp = top_ids[..., 0], top_lp[..., 0]
    n_rows = max_ids.shape[1]
    if target is None:
        if kind == "causal":
            lp = _pick(result.next_logprobs, select, kind)
            ids = result.next_ids.cpu()[select[0], select[1]]
            name = "next token"
        else:
            lp = _pick(result.original_logprobs, select, kind)
            ids = result.original_ids.cpu()[select] if kind == "sliding" else result.original_ids[select[0], select[1]]
            name = "original token"
    elif isinstance(target, str) and target == "max":
        lp, ids, name = max_lp, torch.full((n_rows,), -1, dtype=torch.long), "max"
    else:
        lp, ids, name = _target_column(result, target, select, kind)
    fit = fit_sqrt(depths, lp)
    max_fit = fit_sqrt(depths, max_lp)
    if kind == "causal":
        tracked_ids, tracked_lp = _track_from_topk(top_ids, top_lp)
    else:
        tracked_ids = result.tracked_ids[select] if kind == "sliding" else result.tracked_ids[select[0], select[1]]
        tracked_lp = _pick(result.tracked_logprobs, select, kind)
    if n_track is not None:
        if isinstance(n_track, bool) or not isinstance(n_track, int) or n_track < 1:
            raise ValueError(f"n_track must be a positive int, got {n_track!r}")
        tracked_ids, tracked_lp = tracked_ids[:, :n_track], tracked_lp[..., :n_track]
    return DepthProfile(
        labels=tuple(result.labels),
        depths=depths,
        prompts=prompts,
        positions=positions,
        row_tokens=tuple(row_tokens),
        target=name,
        target_ids=ids.long(),
        logprobs=lp.float(),
        intercept=fit.intercept,
        slope=fit.slope,
        r2=fit.r2,
        max_ids=max_ids,
        max_logprobs=max_lp.float(),
        max_intercept=max_fit.intercept,
        max_slope=max_fit.slope,
        max_r2=max_fit.r2,
        decision_site=decision_sites(max_ids),
        tracked_ids=tracked_ids,
        tracked_logprobs=tracked_lp.float(),
        tokenizer=result.tokenizer,
    )


def _target_column(result: Any, target: object, select: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    target_ids = getattr(result, "target_ids", None)
    if target_ids is None:
        raise ValueError(
            f"target {target!r}: this result has no targets; run the lens with targets=[{target!r}], or use "
            "target=None (the next/original token) or 'max'"
        )
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise TypeError(f"target must be None, 'max', a token string or an id, not {type(target).__name__}")
    tok = result.tokenizer
    if kind == "causal":
        per_row = target_ids.cpu()[select[0], select[1]]  # [row, target]
    else:
        per_row = target_ids.cpu()[None].expand(select.shape[1], -1)
    shown = [display_tokens(tok, per_row[:, t]) for t in range(per_row.shape[1])]
    for t in range(per_row.shape[1]):
        col = per_row[:, t]
        if isinstance(target, int):
            hit = bool((col == target).all())
        else:
            raw = tok.convert_ids_to_tokens(col.tolist()) if tok is not None else []
            hit = all(s == target for s in shown[t]) or (bool(raw) and all(r == target for r in raw))
        if hit:
            return _pick(result.target_logprobs, select, kind)[..., t], col, display_tokens(tok, col[:1])[0]
    have = sorted({s for col in shown for s in col})
    raise ValueError(f"target {target!r} is not among this result's targets {have}; pass it to the lens as a target")


def _track_from_topk(
    top_ids: Int[torch.Tensor, "site row k"], top_lp: Float[torch.Tensor, "site row k"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ranked by their max log-prob over sites, from each site's top-k.

    Exact for the first k tokens: a token among the n best by maximum probability is in the top-n
    of the site where it peaks (any token above it there peaks higher still). Their log-probs are
    known only where they are in a site's top-k; elsewhere NaN.
    """
    n_sites, n_rows, k = top_ids.shape
    ids_out = torch.full((n_rows, k), -1, dtype=torch.long)
    lp_out = torch.full((n_sites, n_rows, k), float("nan"))
    for i in range(n_rows):
        flat_ids, flat_lp = top_ids[:, i].reshape(-1), top_lp[:, i].reshape(-1)
        if bool((flat_ids < 0).all()):
            continue
        best: dict[int, float] = {}
        for tid, v in zip(flat_ids.tolist(), flat_lp.tolist()):
            if tid >= 0 and v > best.get(tid, float("-inf")):
                best[tid] = v
        chosen = sorted(best, key=lambda t: -best[t])[:k]
        ids_out[i, : len(chosen)] = torch.tensor(chosen)
        for c, tid in enumerate(chosen):
            hit = top_ids[:, i] == tid  # [site, k]
            lp_out[:, i, c] = torch.where(hit.any(-1), (top_lp[:, i] * hit).sum(-1), float("nan"))
    return ids_out, lp_out
