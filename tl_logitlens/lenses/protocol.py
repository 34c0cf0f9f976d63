"""The lens protocol, the logit lens, and how an analysis turns its ``lens=`` argument into a lens.

A *lens* is what every analysis accepts as ``lens=``. It maps a site's residual states to states the
model's own final norm and unembedding then read (:class:`tl_logitlens.core.readout.Readout` does that
part, the same for every lens):

- :class:`LogitLens` (``lens=None``): the identity. The state is read as it is, as if the model
  stopped at that site (nostalgebraist, 2020).
- a tuned lens (Belrose et al., 2023, :mod:`tl_logitlens.lenses.tuned`): an affine translator per
  site, ``h + W h + b``.

A new lens implements the :class:`Lens` protocol: a ``name`` for figures and tables, a
``check_model(model)`` that refuses a model it was not made for, and ``translate(site, states)``.
It may also say which sites it reads by default, ``default_sites`` (a site kind; ``"resid_pre"`` when
absent): every analysis that takes ``lens=`` and ``sites=`` reads those when ``sites`` is not given
(:func:`default_sites`). The logit and tuned lenses read ``"resid_pre"``, the Jacobian lens
``"resid_post"`` (the only sites it reads), so ``tl.logit_lens(model, prompt, lens=any_lens)`` works for
every lens; a ``sites=`` the user gives is always read as given (and a site a lens cannot read is refused
with an error that names the sites it reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float

from tl_logitlens.core.readout import SITE_KINDS, Site, resolve_sites
from tl_logitlens.core.results import LOGIT_LENS_NAME

# the site kind a lens without a ``default_sites`` reads when the user gives no ``sites=``
DEFAULT_SITES = "resid_pre"


@runtime_checkable
class Lens(Protocol):
    """A map from a site's residual states to the states the final norm and unembedding read.

    Optional attribute (not part of the runtime check, so lenses written before it still work):
    ``default_sites``, the site kind (``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``) the lens
    reads when an analysis is given no ``sites=``; ``"resid_pre"`` when absent.
    """

    name: str

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when this lens was not made for ``model``."""

    def translate(self, site: str, states: Float[torch.Tensor, "row d_model"]) -> Float[torch.Tensor, "row d_model"]:
        """The states of site ``site`` (a label: ``"0_pre"``, ..., ``"final_post"``) as the final norm
        should read them. ``final_post`` must come back unchanged (it *is* what the model reads)."""


class LogitLens:
    """The logit lens: every state is read as it is."""

    name = LOGIT_LENS_NAME
    default_sites = DEFAULT_SITES

    def check_model(self, model: Any) -> None:
        return None

    def translate(self, site: str, states: torch.Tensor) -> torch.Tensor:
        return states

    def __repr__(self) -> str:
        return "LogitLens()"


LOGIT_LENS = LogitLens()


def resolve_lens(model: Any, lens: object) -> Lens:
    """``None`` is the logit lens; anything else must be a :class:`Lens` made for ``model``."""
    if lens is None:
        return LOGIT_LENS
    if isinstance(lens, str):
        raise TypeError(
            f"lens={lens!r} is a string; load the lens first, e.g. tl.load_lens({lens!r}, model), "
            "and pass the object"
        )
    if not isinstance(lens, Lens):
        raise TypeError(
            f"lens must be None (the logit lens) or a lens object such as tl.TunedLens, not "
            f"{type(lens).__name__}"
        )
    lens.check_model(model)
    return lens


def lens_name(lens: object) -> str:
    """The name figures and tables show for a lens (``"logit lens"`` for ``None``)."""
    return LOGIT_LENS.name if lens is None else str(getattr(lens, "name", type(lens).__name__))


def named_lenses(model: Any, lenses: object) -> dict[str, Lens]:
    """``{display name: lens}`` for analyses that show several lenses side by side, each lens checked
    against ``model`` (:func:`resolve_lens`).

    ``lenses`` is ``None`` (the logit lens alone), one lens, a list or tuple of lenses (``None`` in it
    is the logit lens; each is shown under its own ``name``) or a dict ``{name: lens}`` (names of your
    choosing). Names are what tables, figures and the report label the lenses with, so they must
    differ: two lenses of one name (two tuned lenses are both ``"tuned lens"``) are refused, never
    renamed behind your back.

    Raises:
        ValueError: an empty list or dict; two lenses with the same name (the message says how to name
            them); a lens made for another model.
        TypeError: a name that is not a non-empty string; something that is not a lens.
    """
    if lenses is None:
        return {LOGIT_LENS.name: LOGIT_LENS}
    if isinstance(lenses, Mapping):
        if not lenses:
            raise ValueError("lenses is an empty dict; pass None for the logit lens or {name: lens, ...}")
        for name in lenses:
            if not isinstance(name, str) or not name.strip():
                raise TypeError(f"lens names must be non-empty strings, got {name!r}")
        return {name: resolve_lens(model, lens) for name, lens in lenses.items()}
    if isinstance(lenses, (list, tuple)):
        if not lenses:
            raise ValueError("lenses is empty; pass e.g. [None, tuned_lens] (None is the logit lens)")
        names = [lens_name(lens) for lens in lenses]
        doubles = [n for n in dict.fromkeys(names) if names.count(n) > 1]
        if doubles:
            raise ValueError(
                f"two lenses are both called {doubles[0]!r}, and tables and figures label lenses by name; give "
                f"them distinct names: set one's name (e.g. lens_b.name = '{doubles[0]} B'), or pass a dict "
                f"{{'{doubles[0]} A': lens_a, '{doubles[0]} B': lens_b}}"
            )
        return {name: resolve_lens(model, lens) for name, lens in zip(names, lenses)}
    lens = resolve_lens(model, lenses)
    return {lens_name(lens): lens}


def lens_default_sites(lens: object) -> str:
    """The site kind ``lens`` reads when no ``sites=`` is given: its ``default_sites``, else
    ``"resid_pre"`` (``None``, the logit lens: ``"resid_pre"``).

    Raises:
        ValueError: a ``default_sites`` that is not a site kind.
    """
    kind = DEFAULT_SITES if lens is None else getattr(lens, "default_sites", DEFAULT_SITES)
    if kind not in SITE_KINDS:
        raise ValueError(
            f"{lens_name(lens)!r} has default_sites={kind!r}; a lens's default_sites must be one of {list(SITE_KINDS)}"
        )
    return kind


def check_reads(model: Any, lenses: Sequence[object], sites: Sequence[Site]) -> None:
    """Raise the lens's own ``ValueError`` (it names the sites it reads) when one of ``lenses``
    (resolved lens objects) cannot read one of ``sites``; nothing runs but ``translate`` on zeros."""
    zeros = torch.zeros(1, model.cfg.d_model, dtype=model.W_U.dtype, device=model.W_U.device)
    for lens in lenses:
        for site in sites:
            lens.translate(site.label, zeros)  # type: ignore[attr-defined]


def default_sites(model: Any, lenses: Sequence[object]) -> str:
    """The site kind an analysis reads ``lenses`` at when the user gives no ``sites=``.

    One lens (or several that agree): its ``default_sites`` (:func:`lens_default_sites`). Lenses that
    differ (e.g. the logit lens, ``"resid_pre"``, beside the Jacobian lens, ``"resid_post"``): the first
    of their defaults, in the lenses' order, that every one of them reads. ``lenses`` are resolved lens
    objects (or ``None`` for the logit lens).

    Raises:
        ValueError: the lenses read no default kind in common (pass ``sites=`` naming sites they all read).

    Example:
        >>> default_sites(model, [None, tl.load_lens("demo", model)])   # doctest: +SKIP
        'resid_pre'
    """
    kinds = list(dict.fromkeys(lens_default_sites(lens) for lens in lenses))
    if len(kinds) == 1:
        return kinds[0]
    resolved = [LOGIT_LENS if lens is None else lens for lens in lenses]
    for kind in kinds:
        try:
            check_reads(model, resolved, resolve_sites(model, kind))
        except ValueError:
            continue
        return kind
    raise ValueError(
        f"the lenses {[lens_name(lens) for lens in lenses]} read no site kind in common by default (their defaults: "
        f"{kinds}); pass sites= naming sites every one of them reads, or compare them in separate calls"
    )


def sites_or_default(model: Any, sites: object, lenses: Sequence[object]) -> object:
    """``sites`` as given, or where it is ``None`` the lenses' :func:`default_sites`."""
    return default_sites(model, lenses) if sites is None else sites
