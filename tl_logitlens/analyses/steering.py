"""Lens directions, and interventions along them: how the Jacobian-lens paper checks that what a lens
reads is causal.

A lens with a linear map ``M`` (the identity for the logit lens; ``I + W_i`` for tuned-lens translator
``i``; ``J_l`` for the Jacobian lens) reads token ``t`` off a state ``h`` as
``W_U[:, t] · final_norm(M h + c) + b_U[t]``. The final norm divides by the state's own scale and (LayerNorm)
removes its mean, then multiplies by the gain ``g``; so, up to that positive scale and an offset, the lens
reads ``t`` along one residual-stream direction:

    v_t = Mᵀ · P (g ⊙ W_U[:, t])        (P: centring, for LayerNorm models only)

:func:`lens_vectors` returns these directions. :func:`steer` and :func:`ablate` build forward hooks that
add a multiple of one (``h ← h + α·v̂``) or project a set of them out (``h ← h − Q Qᵀ h``, ``Q`` an
orthonormal basis of their span); use them with ``model.hooks(fwd_hooks=[...])`` or
``model.run_with_hooks(..., fwd_hooks=[...])``. Exact identity, tested: ablating a token's logit-lens
direction at the final residual stream sets that token's final logit to its bias (``b_U[t]``, plus
``W_U[:, t] · β`` where the final LayerNorm has a bias ``β``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, no_type_check

import torch
from jaxtyping import Float

from tl_logitlens.core.compat import normalization_type
from tl_logitlens.core.inputs import check_position, is_integer, resolve_token
from tl_logitlens.core.readout import Site, check_model, resolve_sites
from tl_logitlens.lenses import JacobianLens, LogitLens, TunedLens, resolve_lens

Hook = tuple[str, Callable[..., torch.Tensor]]


def _site(model: Any, site: object) -> Site:
    if not isinstance(site, str):
        raise TypeError(f"site must be one site label such as '2_post' or 'final_post', not {type(site).__name__}")
    sites = resolve_sites(model, [site])
    if len(sites) != 1 or sites[0].label != site:
        raise ValueError(f"site must be one site label such as '2_post' or 'final_post', not the kind {site!r}")
    return sites[0]


def lens_site(model: Any, lens: Any, site: object) -> Site:
    """One site label that ``lens`` (a resolved lens object) reads; the lens's own error otherwise."""
    where = _site(model, site)
    lens.translate(where.label, torch.zeros(1, model.cfg.d_model, dtype=model.W_U.dtype, device=model.W_U.device))
    return where


CONVENTIONS = ("ours", "transformer_lens")


def check_convention(convention: object) -> str:
    """``"ours"`` (lens vectors with the final norm's gain folded in) or ``"transformer_lens"``
    (``Mᵀ W_U[:, t]``, TransformerLens 4.3's); see :func:`readout_matrix`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be 'ours' or 'transformer_lens', not {convention!r}")
    return str(convention)


@torch.no_grad()
def readout_matrix(model: Any, lens: Any, site: str, convention: str = "ours") -> Float[torch.Tensor, "d_model d_model"] | None:
    """``K`` with lens vector ``v_t = K W_U[:, t]`` at ``site`` (float32, on ``W_U``'s device; None for
    the identity): ``Mᵀ P diag(g)`` under ``convention="ours"`` (``g`` the final norm's gain, ``P`` the
    centring of LayerNorm models), ``Mᵀ`` under ``"transformer_lens"``. ``lens`` is a resolved lens
    object. Formed in O(d_model²): ``Mᵀ P diag(g) = Mᵀ diag(g) − (Mᵀ 1) gᵀ / d_model``."""
    matrix = linear_map(lens, site)
    device = model.W_U.device
    mt = None if matrix is None else matrix.to(device).float().T
    if convention == "transformer_lens":
        return mt
    kind = normalization_type(model)
    gain = getattr(model.ln_final, "w", None) if kind in ("LN", "RMS") else None
    centre = kind in ("LN", "LNPre")
    if gain is None and not centre:
        return mt
    d = int(model.cfg.d_model)
    g = torch.ones(d, device=device) if gain is None else gain.detach().float().to(device)
    if mt is None:
        k = torch.diag(g)
        return k - g[None, :] / d if centre else k
    k = mt * g[None, :]
    return k - torch.outer(mt.sum(1), g) / d if centre else k


def linear_map(lens: Any, site: str) -> Float[torch.Tensor, "d_model d_model"] | None:
    """The matrix ``M`` of the lens's map at ``site`` (``h ↦ M h + c``), or None where the map is the
    identity. Known lenses: the logit lens, :class:`~tl_logitlens.TunedLens`,
    :class:`~tl_logitlens.JacobianLens`; another lens may define ``linear_map(site)`` itself.

    Raises:
        TypeError: a lens whose map is not known to be linear.
    """
    if isinstance(lens, LogitLens):
        return None
    if isinstance(lens, TunedLens):
        index = lens.translator_index(site)
        if index is None:
            return None
        w = lens.weight[index].detach().float()
        return torch.eye(w.shape[0], device=w.device) + w
    if isinstance(lens, JacobianLens):
        layer = lens.layer_of(site)
        return None if layer is None else lens.jacobians[layer].float()
    own = getattr(lens, "linear_map", None)
    if callable(own):
        return own(site)
    raise TypeError(
        f"{type(lens).__name__} has no known linear map, so it reads no token along one direction; lens "
        "directions exist for the logit lens, TunedLens, JacobianLens, or a lens with a linear_map(site) method"
    )


def _token_ids(model: Any, tokens: object) -> list[int]:
    if isinstance(tokens, (str, torch.Tensor)) or is_integer(tokens):
        tokens = [tokens]
    if not isinstance(tokens, Sequence) or not tokens:
        raise ValueError("tokens must be a token (text or id) or a non-empty list of them")
    return [resolve_token(model, t, "token") for t in tokens]


# Entry points check their own arguments (see predictions.logit_lens).
@no_type_check
@torch.no_grad()
def lens_vectors(
    model: Any, lens: Any, site: str, tokens: object, *, convention: str = "ours"
) -> Float[torch.Tensor, "token d_model"]:
    """The residual-stream direction along which ``lens`` reads each of ``tokens`` at ``site``:
    ``v_t = Mᵀ P (g ⊙ W_U[:, t])`` (see the module docstring), float32, on the model's device.
    ``convention="transformer_lens"`` gives TransformerLens 4.3's ``Mᵀ W_U[:, t]`` instead (no gain, no
    centring; :func:`readout_matrix`).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        lens: ``None`` (the logit lens: ``W_U`` columns with the final norm's gain folded in and,
            on LayerNorm models, centred), a :class:`~tl_logitlens.TunedLens` or a
            :class:`~tl_logitlens.JacobianLens` (through the map of the site's layer).
        site: one site label the lens reads (``"2_post"``, ``"final_post"``).
        tokens: a token (text or id) or a list of them; text must be exactly one token.
        convention: ``"ours"`` (the default) or ``"transformer_lens"``.

    Raises:
        ValueError, TypeError: a site the lens does not read, a token that is not one token, a lens
            with no linear map, an unknown convention.

    Example:
        >>> v = tl.lens_vectors(model, None, "final_post", [" happy", " sad"])   # [2, d_model]
    """
    check_model(model)
    convention = check_convention(convention)
    lens = resolve_lens(model, lens)
    where = lens_site(model, lens, site)
    ids = torch.tensor(_token_ids(model, tokens), device=model.W_U.device)
    columns = model.W_U.detach()[:, ids].float()  # [d_model, token]
    k = readout_matrix(model, lens, where.label, convention)
    return (columns if k is None else k @ columns).T


def _positions_hook(
    transform: Callable[[torch.Tensor], torch.Tensor], positions: Sequence[int] | None, d_model: int
) -> Callable[..., torch.Tensor]:
    """A TransformerLens forward hook applying ``transform`` (float32) to the residual stream at
    ``positions`` (all when None; negative counts from the end) and returning it in its own dtype."""

    def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if activation.ndim != 3 or activation.shape[-1] != d_model:
            raise ValueError(f"expected a [batch, pos, {d_model}] residual stream, got {list(activation.shape)}")
        out = activation.clone()
        idx = slice(None) if positions is None else [check_position(p, activation.shape[1]) for p in positions]
        out[:, idx] = transform(activation[:, idx].float()).to(activation.dtype)
        return out

    return hook


def _check_positions(positions: object) -> list[int] | None:
    if positions is None:
        return None
    if is_integer(positions):
        positions = [positions]
    if not isinstance(positions, Sequence) or not positions or not all(is_integer(p) for p in positions):
        raise TypeError("positions must be None (all), an int, or a non-empty list of ints")
    return [int(p) for p in positions]


@no_type_check
def steer(
    model: Any,
    lens: Any,
    site: str,
    token: object,
    alpha: float,
    *,
    positions: object = None,
    convention: str = "ours",
) -> Hook:
    """A forward hook ``(hook_name, fn)`` that adds ``alpha`` times the unit lens vector of ``token`` to
    the residual stream at ``site``.

    - ``convention="ours"`` (the default): ``h ← h + α·v̂_t`` with our lens vector (the final norm's gain
      folded in, :func:`lens_vectors`); ``α`` is in the residual stream's own units, the same at every
      position and in every prompt, so a sweep over ``α`` means the same push everywhere.
    - ``convention="transformer_lens"``: TransformerLens 4.3's ``JacobianLens.steering_hooks``:
      ``h ← h + α·median‖h‖·v̂_t`` with its lens vector ``Mᵀ W_U[:, t]`` (no gain), the median taken over the
      steered positions of the batch at each call, so ``α`` is in units of the stream's typical norm
      (``α ≈ 1`` moves the state by about its own size). The scale then depends on the batch it runs on.

    Use it as ``with model.hooks(fwd_hooks=[tl.steer(...)]): model(tokens)``.

    Raises:
        ValueError, TypeError: as :func:`lens_vectors`; a non-finite ``alpha``; a zero lens vector; an
            unknown ``convention``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not torch.isfinite(torch.tensor(float(alpha))):
        raise ValueError(f"alpha must be a finite number, not {alpha!r}")
    convention = check_convention(convention)
    where = _site(model, site)
    v = lens_vectors(model, lens, site, token, convention=convention)[0]
    norm = float(v.norm())
    if not norm > 0:
        raise ValueError(f"the lens vector of {token!r} at {site!r} is zero; there is no direction to steer along")
    unit = v / norm
    if convention == "transformer_lens":

        def transform(h: torch.Tensor) -> torch.Tensor:
            return h + (float(alpha) * h.norm(dim=-1).median()) * unit.to(h.device)

    else:
        step = float(alpha) * unit

        def transform(h: torch.Tensor) -> torch.Tensor:
            return h + step.to(h.device)

    return where.hook, _positions_hook(transform, _check_positions(positions), model.cfg.d_model)


@no_type_check
def ablate(model: Any, lens: Any, site: str, tokens: object, *, positions: object = None) -> Hook:
    """A forward hook ``(hook_name, fn)`` that projects the lens vectors of ``tokens`` out of the residual
    stream at ``site``: ``h ← h − Q Qᵀ h``, ``Q`` an orthonormal basis of their span (lens vectors of
    related tokens are far from orthogonal, so removing them one by one would not remove them all).

    Raises:
        ValueError, TypeError: as :func:`lens_vectors`.
    """
    where = _site(model, site)
    vectors = lens_vectors(model, lens, site, tokens)  # [token, d_model]
    q, r = torch.linalg.qr(vectors.double().T)  # columns of q span the vectors
    keep = r.diagonal().abs() > 1e-10 * float(r.diagonal().abs().max())
    basis = q[:, keep].float()
    if basis.shape[1] == 0:
        raise ValueError(f"the lens vectors of {tokens!r} at {site!r} are zero; there is nothing to ablate")
    return where.hook, _positions_hook(
        lambda h: h - (h @ basis.to(h.device)) @ basis.T.to(h.device), _check_positions(positions), model.cfg.d_model
    )
