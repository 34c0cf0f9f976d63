"""The lens protocol, the logit lens, and how an analysis turns its ``lens=`` argument into a lens.

A *lens* is what every analysis accepts as ``lens=``. It maps a site's residual states to states the
model's own final norm and unembedding then read (:class:`tl_logitlens.readout.Readout` does that
part, the same for every lens):

- :class:`LogitLens` (``lens=None``): the identity. The state is read as it is, as if the model
  stopped at that site (nostalgebraist, 2020).
- a tuned lens (Belrose et al., 2023, :mod:`tl_logitlens.lenses.tuned`): an affine translator per
  site, ``h + W h + b``.

A new lens implements the :class:`Lens` protocol: a ``name`` for figures and tables, a
``check_model(model)`` that refuses a model it was not made for, and ``translate(site, states)``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float

from tl_logitlens._results import LOGIT_LENS_NAME


@runtime_checkable
class Lens(Protocol):
    """A map from a site's residual states to the states the final norm and unembedding read."""

    name: str

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when this lens was not made for ``model``."""

    def translate(self, site: str, states: Float[torch.Tensor, "row d_model"]) -> Float[torch.Tensor, "row d_model"]:
        """The states of site ``site`` (a label: ``"0_pre"``, ..., ``"final_post"``) as the final norm
        should read them. ``final_post`` must come back unchanged (it *is* what the model reads)."""


class LogitLens:
    """The logit lens: every state is read as it is."""

    name = LOGIT_LENS_NAME

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
