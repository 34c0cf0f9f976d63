"""Interventions in a lens's coordinates: edit what the lens reads, keep the rest of the state.

- :func:`coordinate_patch`: decompose one state (:func:`~tl_logitlens.decompose`) and move one token's
  coordinate to another (``mode="substitute"``: the target takes the source's coordinate and the source
  drops to 0; ``"swap"``: the two exchange), by a fraction ``alpha`` of the way; the rest of the
  decomposition and the residual ``x − reconstruction`` are untouched. ``result.hook()`` puts the edited
  state back into a forward pass.
- :func:`swap_hooks`: forward hooks for several sites at once that exchange two tokens' coordinates in the
  span of their lens vectors ``V = [v_s, v_t]`` (Gurnee et al., 2026): with ``c = V⁺ h``,
  ``h ← h + α V (σ(c) − c)``, ``σ`` the exchange; the part of ``h`` orthogonal to the span is untouched.
  Live (``σ(c)`` re-read from the state each hook sees: at ``α = 1`` a swap applied twice is the identity)
  or clamped to a clean run (``clamp_to=``: ``σ`` of the clean run's coordinates, fixed when the hooks are
  built; at ``α = 1`` each hook sets the coordinates to them whatever the state, the paper's clamp
  protocol). ``α = 2`` is the paper's double-strength swap; ``α = 0`` changes nothing.

These are TransformerLens 4.3's ``JacobianLens.coordinate_patch`` and ``swap_hooks`` (with
``convention="transformer_lens"`` they give its numbers), for every lens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.jspace import DEFAULT_K, Decomposition, _decomposition, _dictionary, one_state
from tl_logitlens.analyses.lens_dictionary import lens_dictionary
from tl_logitlens.analyses.pursuit import check_algorithm
from tl_logitlens.analyses.steering import Hook, _check_positions, _positions_hook, _token_ids, lens_site
from tl_logitlens.core.inputs import check_count, check_real
from tl_logitlens.core.readout import check_model, resolve_sites
from tl_logitlens.core.results import ShortRepr, token_strings
from tl_logitlens.lenses import resolve_lens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

MODES = ("substitute", "swap")
# two lens vectors whose |cosine| reaches these are nearly one direction: a swap between them is close to
# a no-op (warned) or, where V⁺ must be formed, numerically meaningless (refused); TransformerLens's policy
WARN_COSINE = 0.99
REFUSE_COSINE = 0.999


def _alpha(alpha: object) -> float:
    return check_real(alpha, "alpha", -math.inf)


def _pair(model: Any, source: object, target: object) -> tuple[int, int]:
    """Two distinct token ids."""
    ids = []
    for name, token in (("source", source), ("target", target)):
        resolved = _token_ids(model, token)
        if len(resolved) != 1:
            raise ValueError(
                f"{name} must be one token (text of one token, or an id), not {len(resolved)} of them"
            )
        ids.append(resolved[0])
    source_id, target_id = ids
    if source_id == target_id:
        raise ValueError(
            f"source and target are the same token (id {source_id}); a coordinate swap or substitution of a "
            "token with itself changes nothing; pass two different tokens"
        )
    return source_id, target_id


def _cosine(vectors: Float[torch.Tensor, "two d_model"]) -> float:
    norms = torch.linalg.vector_norm(vectors, dim=1)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        raise ValueError("a lens vector of the pair is zero or not finite; there is no coordinate to move")
    return float((vectors[0] @ vectors[1]) / (norms[0] * norms[1]))


# --------------------------------------------------------------------------------------------------
# coordinate_patch


@dataclass(frozen=True, kw_only=True, repr=False)
class CoordinatePatch(ShortRepr):
    """One state with one J-space coordinate moved (see :func:`coordinate_patch`).

    Fields: ``support`` (token ids of the edit frame: the decomposition's active support, with the target
    appended at coordinate 0 when it was not in it; ``target_was_appended`` says so) and ``support_tokens``;
    ``coordinates_before`` and ``coordinates_after`` in that frame (``after = before + α (edited −
    before)``); ``delta = V_frame (after − before)``; ``activation`` (``x``) and ``patched = x + delta``;
    ``reconstruction_before`` and ``reconstruction_after = reconstruction_before + delta``;
    ``source_id``/``target_id`` and their tokens, ``source_slot``/``target_slot`` in the frame;
    ``mode``, ``alpha``, ``site``, ``hook_name``, ``position`` (None for a raw activation),
    ``lens_name``, ``convention``; ``decomposition``, the decomposition edited.
    """

    activation: Float[torch.Tensor, " d_model"]
    patched: Float[torch.Tensor, " d_model"]
    delta: Float[torch.Tensor, " d_model"]
    support: Int[torch.Tensor, " frame"]
    support_tokens: tuple[str, ...]
    coordinates_before: Float[torch.Tensor, " frame"]
    coordinates_after: Float[torch.Tensor, " frame"]
    reconstruction_before: Float[torch.Tensor, " d_model"]
    reconstruction_after: Float[torch.Tensor, " d_model"]
    source_id: int
    target_id: int
    source_token: str
    target_token: str
    source_slot: int
    target_slot: int
    target_was_appended: bool
    source_target_cosine: float
    mode: str
    alpha: float
    site: str
    hook_name: str
    position: int | None
    lens_name: str
    convention: str
    decomposition: Decomposition

    def _summary(self) -> dict[str, str]:
        return {
            "site": self.site,
            "lens": self.lens_name,
            "edit": f"{self.mode} {self.source_token!r} -> {self.target_token!r}, alpha={self.alpha:g}",
            "|delta|": f"{float(self.delta.norm()):.4g}",
            "convention": self.convention,
        }

    def hook(self) -> Hook:
        """A forward hook ``(hook_name, fn)`` adding ``delta`` at this site and position: run the model with
        it (``model.hooks(fwd_hooks=[patch.hook()])``) and the state there is ``patched``.

        Raises:
            ValueError: a patch of a raw activation (no position to put it back at).
        """
        if self.position is None:
            raise ValueError(
                "this patch edited a raw activation, so it has no position to put it back at; patch a prompt "
                "(tl.coordinate_patch(model, lens, site, prompt, ..., position=p)) to get a hook"
            )
        delta = self.delta
        return self.hook_name, _positions_hook(
            lambda h: h + delta.to(h.device), [self.position], delta.shape[0]
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per atom of the edit frame: ``slot``, ``token_id``, ``token``, ``before``, ``after``,
        ``change``, ``role`` (``"source"``, ``"target"`` or ``""``), ``site``, ``lens``."""
        import pandas as pd

        before, after = self.coordinates_before.cpu(), self.coordinates_after.cpu()
        roles = [
            "source" if i == self.source_slot else "target" if i == self.target_slot else ""
            for i in range(len(before))
        ]
        return pd.DataFrame(
            {
                "slot": list(range(len(before))),
                "token_id": self.support.tolist(),
                "token": list(self.support_tokens),
                "before": before.numpy(),
                "after": after.numpy(),
                "change": (after - before).numpy(),
                "role": roles,
                "site": self.site,
                "lens": self.lens_name,
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Coordinates before and after the edit; see :func:`tl_logitlens.plotting.jspace.patch_figure`."""
        from tl_logitlens.plotting.jspace import patch_figure

        return patch_figure(self, **kwargs)


@no_type_check  # checks its own arguments
def coordinate_patch(
    model: Any,
    lens: Any,
    site: str,
    activation_or_inputs: object,
    source: object,
    target: object,
    *,
    position: int | None = None,
    mode: str = "substitute",
    alpha: float = 1.0,
    k: int = DEFAULT_K,
    algorithm: str = "omp",
    decomposition: Decomposition | None = None,
    convention: str = "ours",
    prepend_bos: bool | None = None,
) -> CoordinatePatch:
    """Move one token's J-space coordinate to another in a residual state, leaving the rest fixed.

    The state ``x`` is decomposed (:func:`~tl_logitlens.decompose`, or ``decomposition`` when given); in the
    frame of its active support (the target appended at 0 if absent), ``mode="substitute"`` gives the
    target the source's coordinate and the source 0, ``mode="swap"`` exchanges them; the coordinates move
    ``alpha`` of the way there (``alpha=0``: nothing changes; outside ``[0, 1]`` a coordinate may turn
    negative, which is warned). The state becomes ``x + V_frame (c_after − c_before)``: the other
    coordinates and the residual ``x − reconstruction`` are unchanged.

    Args:
        model, lens, site, activation_or_inputs, position, k, algorithm, convention, prepend_bos: as in
            :func:`~tl_logitlens.decompose`.
        source: the token whose coordinate moves (text of one token, or an id); it must be in the
            decomposition's active support.
        target: the token that receives it (distinct from ``source``).
        mode: ``"substitute"`` or ``"swap"``.
        alpha: a finite number.
        decomposition: a :class:`~tl_logitlens.analyses.jspace.Decomposition` of this state at this site
            (from :func:`~tl_logitlens.decompose`), to skip solving again.

    Returns:
        A :class:`CoordinatePatch`; ``.hook()`` runs the model with the patched state.

    Raises:
        ValueError, TypeError: as :func:`~tl_logitlens.decompose`; a source not in the active support (the
            message lists it); the same source and target; a non-finite ``alpha``; an unknown mode; a
            ``decomposition`` of another state, site, lens or convention.

    Example:
        >>> p = tl.coordinate_patch(model, jlens, "2_post", "The cat sat on the", " mat", " dog", mode="swap")
        >>> with model.hooks(fwd_hooks=[p.hook()]):
        ...     logits = model("The cat sat on the")
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'substitute' or 'swap', not {mode!r}")
    alpha = _alpha(alpha)
    algorithm = check_algorithm(algorithm)
    dictionary, where = _dictionary(model, lens, site, convention)
    k = check_count(k, "k", 1, dictionary.d_vocab)
    source_id, target_id = _pair(model, source, target)
    state = one_state(model, where, activation_or_inputs, position, prepend_bos)
    tokenizer = getattr(model, "tokenizer", None)
    if decomposition is None:
        decomposition = _decomposition(
            dictionary, state, k, algorithm, tokenizer, getattr(model.cfg, "model_name", "") or ""
        )
    else:
        _check_decomposition(decomposition, dictionary, state)
    x = decomposition.activation
    ids = decomposition.support.tolist()
    if source_id not in ids:
        shown = ", ".join(f"{t!r} ({i})" for t, i in zip(decomposition.support_tokens, ids))
        raise ValueError(
            f"source {token_strings(tokenizer, [source_id])[0]!r} (id {source_id}) is not in the decomposition's "
            f"active support [{shown}] at {where.label!r}; patch a token that is, or raise k"
        )
    appended = target_id not in ids
    frame = ids + [target_id] if appended else ids
    before = (
        torch.cat([decomposition.coordinates, x.new_zeros(1)])
        if appended
        else decomposition.coordinates.clone()
    )
    s, t = frame.index(source_id), frame.index(target_id)
    edited = before.clone()
    edited[t] = before[s]
    edited[s] = before[t] if mode == "swap" else 0.0
    after = before + alpha * (edited - before)
    if not bool((after >= 0).all()):
        warnings.warn(
            f"alpha={alpha:g} takes a coordinate below 0: the patched state is an extrapolation beyond a "
            "nonnegative decomposition",
            UserWarning,
            stacklevel=2,
        )
    atoms = dictionary.atoms(torch.tensor(frame, device=x.device))  # [frame, d_model]
    cosine = _cosine(atoms[[s, t]])
    if abs(cosine) >= WARN_COSINE:
        warnings.warn(
            f"the lens vectors of source and target have cosine {cosine:.4f}: nearly one direction, so the edit "
            "is close to a no-op",
            UserWarning,
            stacklevel=2,
        )
    delta = (after - before) @ atoms
    return CoordinatePatch(
        activation=x,
        patched=x + delta,
        delta=delta,
        support=torch.tensor(frame, dtype=torch.long),
        support_tokens=tuple(token_strings(tokenizer, frame)),
        coordinates_before=before,
        coordinates_after=after,
        reconstruction_before=decomposition.reconstruction,
        reconstruction_after=decomposition.reconstruction + delta,
        source_id=source_id,
        target_id=target_id,
        source_token=token_strings(tokenizer, [source_id])[0],
        target_token=token_strings(tokenizer, [target_id])[0],
        source_slot=s,
        target_slot=t,
        target_was_appended=appended,
        source_target_cosine=cosine,
        mode=mode,
        alpha=alpha,
        site=where.label,
        hook_name=where.hook,
        position=state.position,
        lens_name=dictionary.lens_name,
        convention=dictionary.convention,
        decomposition=decomposition,
    )


def _check_decomposition(decomposition: object, dictionary: Any, state: Any) -> None:
    if not isinstance(decomposition, Decomposition):
        raise TypeError(
            f"decomposition must be what tl.decompose returns, not {type(decomposition).__name__}"
        )
    if (decomposition.site, decomposition.lens_name, decomposition.convention) != (
        dictionary.site,
        dictionary.lens_name,
        dictionary.convention,
    ):
        raise ValueError(
            f"decomposition is of site {decomposition.site!r}, {decomposition.lens_name!r}, convention "
            f"{decomposition.convention!r}; this patch is at {dictionary.site!r}, {dictionary.lens_name!r}, "
            f"{dictionary.convention!r}: decompose this state with the same lens, site and convention"
        )
    x = state.activation.to(decomposition.activation.device)
    if not torch.allclose(decomposition.activation, x, rtol=1e-6, atol=1e-6 * float(x.abs().max())):
        raise ValueError(
            "decomposition is of another state than this one; decompose this state, or pass none"
        )


# --------------------------------------------------------------------------------------------------
# swap hooks


def _site_list(model: Any, lens: Any, sites: object) -> list:
    """The sites of ``sites`` (labels or a kind), each one ``lens`` reads."""
    return [lens_site(model, lens, s.label) for s in resolve_sites(model, sites)]


def _clean_state(clamp_to: object, site: Any) -> torch.Tensor:
    """The clean run's ``[batch, pos, d_model]`` state at ``site`` from an ``ActivationCache`` or a dict,
    under its TransformerLens name (``blocks.{l}.hook_resid_post``) or a raw bridge's (``hook_out``)."""
    if not isinstance(clamp_to, Mapping) and not hasattr(clamp_to, "__getitem__"):
        raise TypeError(
            f"clamp_to must be the ActivationCache (or dict) of a clean run, not {type(clamp_to).__name__}"
        )
    names = [site.hook, site.hook.replace("hook_resid_post", "hook_out")]
    for name in names:
        if name in clamp_to:
            return clamp_to[name]
    raise ValueError(
        f"clamp_to has no state for site {site.label!r} (looked for {names}); run the clean model with "
        f"model.run_with_cache(tokens, names_filter=[{site.hook!r}, ...]) and pass that cache"
    )


@no_type_check  # checks its own arguments
def swap_hooks(
    model: Any,
    lens: Any,
    sites: str | Sequence[str],
    source: object,
    target: object,
    *,
    alpha: float = 1.0,
    positions: object = None,
    clamp_to: object = None,
    convention: str = "ours",
) -> list[Hook]:
    """Forward hooks that exchange two tokens' coordinates in the span of their lens vectors, at every
    site of ``sites`` (see the module docstring): ``h ← h + α V (σ(c) − c)``, ``c = V⁺ h``,
    ``V = [v_source, v_target]``.

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge`` (compatibility mode or raw).
        lens: ``None`` (the logit lens), a tuned lens or a Jacobian lens.
        sites: a site label, a list of them, or a kind (``"resid_post"``); each must be read by the lens.
        source, target: two different tokens (text of one token, or ids).
        alpha: a finite number: ``1`` the swap, ``2`` the paper's double-strength swap, ``0`` nothing; with
            ``clamp_to``, the fraction of the way to the clamped coordinates.
        positions: None (all), an int or a list of ints (negative counts from the end).
        clamp_to: the ``ActivationCache`` (or dict) of a clean run over the same tokens holding every
            site's state: the clamp protocol, ``σ`` of the clean coordinates instead of the live ones.
        convention: ``"ours"`` or ``"transformer_lens"`` (see :func:`~tl_logitlens.lens_dictionary`).

    Returns:
        ``[(hook_name, fn), ...]`` for ``model.hooks(fwd_hooks=...)`` or ``model.run_with_hooks``.

    Raises:
        ValueError, TypeError: a site the lens does not read; the same source and target; a non-finite
            alpha; lens vectors nearly parallel (``|cos| ≥ 0.999``: ``V⁺`` is meaningless); a ``clamp_to``
            without a site's state or of another shape.

    Example:
        >>> hooks = tl.swap_hooks(model, jlens, ["1_post", "2_post"], " cat", " dog", alpha=2.0)
        >>> logits = model.run_with_hooks("The cat sat on the", fwd_hooks=hooks)
    """
    check_model(model)
    alpha = _alpha(alpha)
    resolved = resolve_lens(model, lens)
    site_list = _site_list(model, resolved, sites)
    source_id, target_id = _pair(model, source, target)
    pos = _check_positions(positions)
    d_model = int(model.cfg.d_model)
    ids = torch.tensor([source_id, target_id], device=model.W_U.device)
    hooks = []
    for where in site_list:
        vectors = lens_dictionary(model, resolved, where.label, convention=convention).atoms(
            ids
        )  # [2, d_model]
        cosine = _cosine(vectors)
        if abs(cosine) >= REFUSE_COSINE:
            raise ValueError(
                f"the lens vectors of source and target at {where.label!r} are nearly parallel (cosine {cosine:.5f}); "
                "their coordinates cannot be told apart, so a swap is meaningless: choose other tokens"
            )
        if abs(cosine) >= WARN_COSINE:
            warnings.warn(
                f"the lens vectors of source and target at {where.label!r} have cosine {cosine:.4f}: the swap is "
                "poorly conditioned and may be amplified",
                UserWarning,
                stacklevel=2,
            )
        basis = vectors.T  # [d_model, 2]
        pinv = torch.linalg.pinv(basis)  # [2, d_model]
        clamped = None
        if clamp_to is not None:
            clean = _clean_state(clamp_to, where)
            if not isinstance(clean, torch.Tensor) or clean.ndim != 3 or clean.shape[-1] != d_model:
                raise ValueError(f"clamp_to's state at {where.label!r} must be [batch, pos, {d_model}]")
            if pos is not None:
                clean = clean[:, [p % clean.shape[1] for p in pos]]
            clamped = (clean.float().to(pinv.device) @ pinv.T)[..., [1, 0]]
        hooks.append((where.hook, _positions_hook(_swap(basis, pinv, clamped, alpha), pos, d_model)))
    return hooks


def _swap(basis: torch.Tensor, pinv: torch.Tensor, clamped: torch.Tensor | None, alpha: float):
    """``h ↦ h + α (c* − V⁺h) Vᵀ`` on ``[batch, pos, d_model]`` float32 states."""

    def transform(h: torch.Tensor) -> torch.Tensor:
        coords = h @ pinv.T.to(h.device)
        if clamped is None:
            goal = coords[..., [1, 0]]
        else:
            goal = clamped.to(h.device)
            if goal.shape[1] != h.shape[1] or goal.shape[0] not in (1, h.shape[0]):
                raise ValueError(
                    f"clamp_to's states ({list(goal.shape[:2])} batch x positions) do not match the run's "
                    f"({list(h.shape[:2])}); clamp to a clean run over the same tokens"
                )
        return h + alpha * ((goal - coords) @ basis.T.to(h.device))

    return transform
