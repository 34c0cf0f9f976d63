"""Guarded access to the parts of TransformerLens that differ between 3.x and 4.x.

TransformerLens 4.x removed ``HookedTransformer`` (and ``HookedEncoder``); 3.9 ships both and the
``TransformerBridge``. Nothing in this package imports those classes unguarded: this module is the one
place that knows which of them exist.
"""

from __future__ import annotations

from importlib import metadata

import transformer_lens

TL_VERSION: str = metadata.version("transformer_lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

try:  # 3.x
    from transformer_lens import HookedTransformer
except ImportError:  # 4.x: bridge only
    HookedTransformer = None  # type: ignore[assignment,misc]

try:
    from transformer_lens import HookedEncoder
except ImportError:
    HookedEncoder = None  # type: ignore[assignment,misc]

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # very old TransformerLens
    TransformerBridge = None  # type: ignore[assignment,misc]

ActivationCache = transformer_lens.ActivationCache


def is_hooked_transformer(model: object) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


def is_encoder(model: object) -> bool:
    return HookedEncoder is not None and isinstance(model, HookedEncoder)


def is_bridge(model: object) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)
