"""Several lenses side by side on the same run: the logit lens, the tuned lens, the Jacobian lens, ...

:func:`compare_lenses` runs the model once, reads every site through each lens with the same kernel as
:func:`~tl_logitlens.logit_lens`, and returns a :class:`LensComparison` with a lens axis: the same
statistics, and per site how close each lens is to the model's own output (``KL(final ‖ site)``) and how
often its top-1 token is the model's (top-1 agreement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.predictions import DEFAULT_CHUNK_SIZE, LensResult, logit_lens
from tl_logitlens.core.frames import long_index
from tl_logitlens.core.inputs import Inputs, PositionSpec, Targets, prepare_inputs
from tl_logitlens.core.readout import Readout, check_model, final_site, resolve_sites
from tl_logitlens.core.results import LOGIT_LENS_NAME, ResultBase, labels_summary
from tl_logitlens.core.run import EMBED_HOOK, run_cache
from tl_logitlens.lenses import check_reads, named_lenses, sites_or_default

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


@dataclass(frozen=True, kw_only=True, repr=False)
class LensComparison(ResultBase):
    """Lenses read on the same run, stacked along a leading ``lens`` axis.

    ``results[k]`` is the :class:`~tl_logitlens.LensResult` of lens ``lenses[k]`` (its ``lens_name``); the
    stacked tensors are ``[lens, site, batch, pos, ...]`` over the same sites and read positions, padding
    cells NaN (ids -1). ``top1_agreement`` is 1.0 where the lens's top-1 token at a site is the final
    layer's top-1 token at that position, 0.0 where not, NaN in padding.
    """

    lenses: tuple[str, ...]
    labels: tuple[str, ...]
    results: tuple[LensResult, ...] = field(compare=False)

    def _stack(self, name: str) -> torch.Tensor:
        return torch.stack([getattr(r, name) for r in self.results])

    @property
    def top_ids(self) -> Int[torch.Tensor, "lens site batch pos k"]:
        return self._stack("top_ids")

    @property
    def top_logprobs(self) -> Float[torch.Tensor, "lens site batch pos k"]:
        return self._stack("top_logprobs")

    @property
    def entropy(self) -> Float[torch.Tensor, "lens site batch pos"]:
        return self._stack("entropy")

    @property
    def kl_to_final(self) -> Float[torch.Tensor, "lens site batch pos"]:
        return self._stack("kl_to_final")

    @property
    def next_logprobs(self) -> Float[torch.Tensor, "lens site batch pos"]:
        return self._stack("next_logprobs")

    @property
    def next_ranks(self) -> Int[torch.Tensor, "lens site batch pos"]:
        return self._stack("next_ranks")

    @property
    def target_ranks(self) -> Int[torch.Tensor, "lens site batch pos target"] | None:
        return None if self.results[0].target_ranks is None else self._stack("target_ranks")

    @property
    def target_logprobs(self) -> Float[torch.Tensor, "lens site batch pos target"] | None:
        return None if self.results[0].target_logprobs is None else self._stack("target_logprobs")

    @property
    def top1_agreement(self) -> Float[torch.Tensor, "lens site batch pos"]:
        final_top1 = self.results[0].final_top_ids[..., 0]  # [batch, pos], the model's own top-1
        agree = (self.top_ids[..., 0] == final_top1).float()
        return torch.where(self.valid, agree, torch.nan)

    def result(self, lens: str) -> LensResult:
        """The :class:`~tl_logitlens.LensResult` of one lens, by name."""
        if lens not in self.lenses:
            raise ValueError(f"lens {lens!r} is not in this comparison; it has {list(self.lenses)}")
        return self.results[self.lenses.index(lens)]

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        out.pop("lens", None)
        out["lenses"] = ", ".join(self.lenses)
        out["sites"] = labels_summary(self.labels)
        return out

    def site_table(self) -> pd.DataFrame:
        """One row per site × lens: the mean ``kl_to_final`` (nats), ``top1_agreement`` (fraction) and
        ``entropy`` (nats) over the read positions (padding left out), and ``n_positions``."""
        import pandas as pd

        valid = self.valid.cpu()
        n = int(valid.sum())
        kl, agree, entropy = (t.cpu().double() for t in (self.kl_to_final, self.top1_agreement, self.entropy))
        rows = []
        for s, site in enumerate(self.labels):
            for k, lens in enumerate(self.lenses):
                rows.append(
                    {
                        "site": site,
                        "site_index": s,
                        "lens": lens,
                        "kl_to_final": float(kl[k, s][valid].mean()),
                        "top1_agreement": float(agree[k, s][valid].mean()),
                        "entropy": float(entropy[k, s][valid].mean()),
                        "n_positions": n,
                    }
                )
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, as :meth:`LensResult.to_dataframe` for every lens, one after the other: one row per
        lens × site × prompt × position × top-k rank, with a ``lens`` column and ``top1_agreement``."""
        import pandas as pd

        agree = self.top1_agreement.cpu()
        frames = []
        for k, result in enumerate(self.results):
            frame = result.to_dataframe()
            s, b, j, _ = long_index(result.top_ids.shape, self.valid)  # the frame's own row order
            frame["top1_agreement"] = agree[k, s, b, j].numpy()
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def plot(self, **kwargs: Any) -> go.Figure:
        """One heatmap per lens on a shared colour scale; see
        :func:`tl_logitlens.plotting.lens_comparison.lens_comparison_figure` (``color=``, ``prompt=``,
        ``max_positions=``)."""
        from tl_logitlens.plotting.lens_comparison import lens_comparison_figure

        return lens_comparison_figure(self, **kwargs)


# Entry points check their own arguments (see predictions.logit_lens).
@no_type_check
def compare_lenses(
    model: Any,
    inputs: Inputs,
    *,
    lenses: Any = (None,),
    sites: str | Sequence[str] | None = None,
    cache: Any = None,
    top_k: int = 5,
    targets: Targets = None,
    positions: PositionSpec = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
) -> LensComparison:
    """Read the same run through several lenses: per lens, site and read position the top-k tokens,
    entropy, ``KL(final ‖ site)`` (nats), next-token and target log-probs, and top-1 agreement with the
    final layer.

    The model runs once (or ``cache`` is used, checked as everywhere); each lens is then read exactly as
    ``logit_lens(model, inputs, lens=lens, sites=sites, ...)`` reads it, and the results are stacked.

    Args:
        lenses: a list (``None`` is the logit lens; each lens's own ``name`` labels it, and two lenses
            may not share a name: set ``lens.name`` on one, or pass a dict) or a dict ``{name: lens}``.
        sites: default (``None``): the sites the lenses read by default
            (:func:`~tl_logitlens.lenses.default_sites`): ``"resid_pre"`` for the logit and tuned
            lenses, ``"resid_post"`` when a Jacobian lens is among them (it reads block outputs only;
            the tuned lens reads ``{l}_post`` through translator ``l + 1``). Sites given are read as
            given.
        Other arguments as :func:`~tl_logitlens.logit_lens`.

    Raises:
        ValueError, TypeError: bad arguments; two lenses with the same name; a lens made for another
            model; a site a lens does not read (the message names the sites it reads).

    Example:
        >>> cmp = tl.compare_lenses(model, "The dog was very", lenses=[None, tl.load_lens("demo", model)])
        >>> cmp.site_table()        # KL to the final layer and top-1 agreement, per site and lens
    """
    check_model(model)
    named = named_lenses(model, lenses)
    sites = sites_or_default(model, sites, list(named.values()))
    site_list = resolve_sites(model, sites)
    check_reads(model, list(named.values()), site_list)  # a site a lens cannot read is refused before the model runs
    if cache is None:
        batch = prepare_inputs(model, inputs, prepend_bos=prepend_bos, attention_mask=attention_mask)
        # every lens's hooks, and the embedding, by which logit_lens checks that the cache is of these inputs
        hooks = {h for lens in named.values() for h in Readout(model, lens, "recompute").hooks([*site_list, final_site(model)])}
        hooks = sorted(hooks | {EMBED_HOOK})
        cache = run_cache(model, batch.tokens, batch.mask, hooks)
    common = {
        "cache": cache, "sites": sites, "top_k": top_k, "targets": targets, "positions": positions,
        "final_top_k": 1, "chunk_size": chunk_size, "prepend_bos": prepend_bos, "attention_mask": attention_mask,
    }
    results = tuple(
        replace(logit_lens(model, inputs, lens=lens, **common), lens_name=name) for name, lens in named.items()
    )
    first = results[0]
    return LensComparison(
        tokens=first.tokens,
        str_tokens=first.str_tokens,
        positions=first.positions,
        valid=first.valid,
        model_name=first.model_name,
        n_layers=first.n_layers,
        lens_name=", ".join(named) if len(named) > 1 else next(iter(named), LOGIT_LENS_NAME),
        tokenizer=first.tokenizer,
        lenses=tuple(named),
        labels=first.labels,
        results=results,
    )

