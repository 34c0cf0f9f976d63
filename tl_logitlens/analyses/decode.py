"""Decode a residual-stream vector into the tokens a lens reads off it: the reverse of
:func:`~tl_logitlens.direction_lens`.

:func:`~tl_logitlens.direction_lens` takes a vector and reads it off the model's states, site by site;
:func:`decode_vector` takes a vector (a probe's weights, an SAE decoder row, a steering vector, a
difference of means) and says which tokens a lens reads along it at one site. A lens with linear part
``M`` at that site (the identity for the logit lens, ``I + W_i`` for tuned-lens translator ``i``,
``J_l`` for the Jacobian lens) reads token ``t`` off a state along ``v_t = Mᵀ P (g ⊙ W_U[:, t])``
(:func:`~tl_logitlens.lens_vectors`; ``g`` the final norm's gain, ``P`` its centring on LayerNorm
models), so a vector ``x`` scores

    score_t(x) = v_t · x = (g ⊙ P M x) · W_U[:, t]

for every token at once. This is exactly what adding ``x`` to a state does to the lens's logits with
the final norm's scale held fixed (the linear, ``norm="cached"`` view), per unit of that scale: the
change of token ``t``'s lens logit when ``h`` becomes ``h + x`` is ``score_t(x) / σ(h)``, to first
order in how much ``x`` moves ``σ`` (the norm's scale of the translated state).

A tuned lens is affine, ``h ↦ (I + W) h + b``: only its linear part acts on a vector. The bias ``b``
belongs to where a state sits, not to a direction (adding ``x`` to any state adds ``(I + W) x`` to
the translated state, whatever ``b`` is), so it is left out, as are ``b_U`` and the final norm's
bias. Scores are in logits per unit of the final norm's scale; only their order and ratios are
comparable across vectors of different norms (``normalize=True`` divides by ``‖x‖``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.steering import check_convention, lens_site, readout_matrix
from tl_logitlens.analyses.token_pairs import check_direction
from tl_logitlens.core.inputs import check_count, check_flag
from tl_logitlens.core.readout import check_model
from tl_logitlens.core.results import ShortRepr, token_strings
from tl_logitlens.lenses import lens_name, resolve_lens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

ENDS = ("positive", "negative")


@dataclass(frozen=True, kw_only=True, repr=False)
class DecodedVector(ShortRepr):
    """The tokens a lens reads off each of ``n`` vectors at one site, at both ends.

    Fields:

    - ``site``, ``lens_name``, ``model_name``: where and through what the vectors were read.
    - ``labels``: one label per vector.
    - ``scores``: ``[vector, d_vocab]`` float32, ``v_t · x`` for every token (see the module docstring;
      logits per unit of the final norm's scale; divided by ``‖x‖`` when ``normalized``).
    - ``top_ids``, ``top_scores``: ``[vector, k]``, the ``k`` highest scores, highest first (the tokens
      the vector promotes).
    - ``bottom_ids``, ``bottom_scores``: ``[vector, k]``, the ``k`` lowest, lowest first (the tokens it
      suppresses).
    - ``vector_norms``: ``[vector]``, ``‖x‖``.
    """

    site: str
    lens_name: str
    model_name: str
    labels: tuple[str, ...]
    scores: Float[torch.Tensor, "vector d_vocab"]
    top_ids: Int[torch.Tensor, "vector k"]
    top_scores: Float[torch.Tensor, "vector k"]
    bottom_ids: Int[torch.Tensor, "vector k"]
    bottom_scores: Float[torch.Tensor, "vector k"]
    vector_norms: Float[torch.Tensor, " vector"]
    normalized: bool
    tokenizer: Any = field(default=None, compare=False)

    def _summary(self) -> dict[str, str]:
        return {
            "model": self.model_name or "?",
            "site": self.site,
            "lens": self.lens_name,
            "vectors": str(len(self.labels)),
            "top_k": str(self.top_ids.shape[1]),
        }

    def tokens(self, vector: int = 0, end: str = "positive") -> list[str]:
        """The top (``end="positive"``) or bottom (``"negative"``) tokens of one vector, as text."""
        if end not in ENDS:
            raise ValueError(f"end must be one of {list(ENDS)}, not {end!r}")
        if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector < len(self.labels):
            raise ValueError(f"vector must be an int from 0 to {len(self.labels) - 1}, not {vector!r}")
        ids = self.top_ids if end == "positive" else self.bottom_ids
        return token_strings(self.tokenizer, ids[vector])

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per vector × end × rank: ``vector``, ``label``, ``end``
        (``"positive"``/``"negative"``), ``rank`` (0 is the extreme), ``token_id``, ``token``, ``score``,
        ``site``, ``lens``."""
        import pandas as pd

        rows: dict[str, list] = {
            k: [] for k in ("vector", "label", "end", "rank", "token_id", "token", "score")
        }
        for end, ids, scores in (
            ("positive", self.top_ids, self.top_scores),
            ("negative", self.bottom_ids, self.bottom_scores),
        ):
            ids, scores = ids.cpu(), scores.cpu()
            for v in range(ids.shape[0]):
                names = token_strings(self.tokenizer, ids[v])
                for r in range(ids.shape[1]):
                    rows["vector"].append(v)
                    rows["label"].append(self.labels[v])
                    rows["end"].append(end)
                    rows["rank"].append(r)
                    rows["token_id"].append(int(ids[v, r]))
                    rows["token"].append(names[r])
                    rows["score"].append(float(scores[v, r]))
        frame = pd.DataFrame(rows)
        frame["site"] = self.site
        frame["lens"] = self.lens_name
        return frame

    def plot(self, vector: int = 0, **kwargs: Any) -> go.Figure:
        """Bars of one vector's top and bottom tokens (blue: promoted, red: suppressed); see
        :func:`tl_logitlens.plotting.interventions.decoded_vector_figure`."""
        from tl_logitlens.plotting.interventions import decoded_vector_figure

        return decoded_vector_figure(self, vector, **kwargs)


def _labels(labels: object, n: int) -> tuple[str, ...]:
    if labels is None:
        return tuple(f"vector {i}" for i in range(n))
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != n:
        raise ValueError(f"labels must be a list with one label per vector ({n})")
    return tuple(str(s) for s in labels)


@torch.no_grad()
def vector_scores(
    model: Any, lens: Any, site: str, vectors: Float[torch.Tensor, "n d_model"], convention: str = "ours"
) -> Float[torch.Tensor, "n d_vocab"]:
    """``v_t · x`` for every token ``t`` and each row ``x`` of ``vectors`` (float32): ``(x K) W_U`` with
    ``v_t = K W_U[:, t]`` (:func:`~tl_logitlens.analyses.steering.readout_matrix`: the lens's linear part,
    and under ``convention="ours"`` the centring and the final norm's gain), no bias anywhere. ``lens`` is a
    resolved lens; ``site`` a label it reads."""
    k = readout_matrix(model, lens, site, convention)
    x = vectors.float().to(model.W_U.device)
    return (x if k is None else x @ k) @ model.W_U.detach().float()


@no_type_check  # checks its own arguments
def decode_vector(
    model: Any,
    vector: object,
    *,
    site: str = "final_post",
    lens: Any = None,
    top_k: int = 10,
    labels: Sequence[str] | None = None,
    normalize: bool = False,
    convention: str = "ours",
) -> DecodedVector:
    """The tokens ``lens`` reads off a residual-stream vector at ``site``: its ``top_k`` highest and
    lowest scores ``v_t · x`` over the whole vocabulary (see the module docstring for what a score is,
    and why a tuned lens's bias is left out).

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge``.
        vector: ``[d_model]`` or ``[n, d_model]``, float (a probe's weights, an SAE decoder row, a
            steering vector, a difference of mean states); read as a direction in the residual stream
            at ``site``, before the final norm.
        site: one site label the lens reads (``"2_post"``, ``"final_post"``).
        lens: ``None`` (the logit lens), a :class:`~tl_logitlens.TunedLens` or a
            :class:`~tl_logitlens.JacobianLens` (or any lens with a ``linear_map(site)``).
        top_k: tokens kept at each end.
        labels: one label per vector (default ``"vector 0"``, ...).
        normalize: divide each vector's scores by its norm (scores then compare across vectors).
        convention: ``"ours"`` (the default: the final norm's gain and centring in, the exact readout) or
            ``"transformer_lens"`` (``v_t = Mᵀ W_U[:, t]``, TransformerLens 4.3's lens vectors).

    Returns:
        A :class:`DecodedVector`.

    Raises:
        TypeError: a vector that is not floats; an encoder (masked LM), whose MLM head is not linear; a
            lens with no linear map.
        ValueError: a vector of the wrong width, empty, zero, or holding NaN/inf; a site the lens does not
            read; ``top_k`` not between 1 and the vocabulary size.

    Example:
        >>> model = tl.load_model("demo")
        >>> probe = model.W_U[:, model.to_single_token(" happy")]   # any [d_model] vector
        >>> tl.decode_vector(model, probe, site="2_post", top_k=5).tokens(0)   # doctest: +SKIP
    """
    check_model(model)
    resolved = resolve_lens(model, lens)
    convention = check_convention(convention)
    label = lens_site(model, resolved, site).label
    x = check_direction(model, vector)
    d_vocab = int(model.W_U.shape[-1])
    top_k = check_count(top_k, "top_k", 1, d_vocab)
    check_flag(normalize, "normalize")
    names = _labels(labels, x.shape[0])
    norms = x.norm(dim=-1)
    if not bool((norms > 0).all()):
        raise ValueError("a vector is zero; there is no direction to decode")
    scores = vector_scores(model, resolved, label, x, convention)
    if normalize:
        scores = scores / norms[:, None]
    top = scores.topk(top_k, dim=-1)
    bottom = scores.topk(top_k, dim=-1, largest=False)
    return DecodedVector(
        site=label,
        lens_name=lens_name(resolved),
        model_name=str(getattr(model.cfg, "model_name", "") or ""),
        labels=names,
        scores=scores,
        top_ids=top.indices,
        top_scores=top.values,
        bottom_ids=bottom.indices,
        bottom_scores=bottom.values,
        vector_norms=norms,
        normalized=normalize,
        tokenizer=getattr(model, "tokenizer", None),
    )
