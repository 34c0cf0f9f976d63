"""Module paths that moved, kept working for one release with a ``DeprecationWarning``.

``tl_logitlens.tuned``, ``tuned_io``, ``tuned_train`` and ``lens`` moved into the lens family's
package (:mod:`tl_logitlens.lenses`) and :mod:`tl_logitlens.analyses.predictions`. Each old module is a stub whose
``__getattr__`` (PEP 562) comes from :func:`forwarder`: reading a name warns once per call site and
returns the object from its new home, so ``from tl_logitlens.tuned import TunedLens`` still works.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

REMOVED_IN = "0.3"


def forwarder(old: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the stub ``old``: ``homes`` maps each name to the module it moved to."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old} is deprecated and will be removed in tl_logitlens {REMOVED_IN}: import {name} from "
            f"{home} (public names are also in tl_logitlens itself)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)

    return __getattr__
