"""Every notebook here runs under pytest through nbmake (see pyproject's addopts).

The one exception is version-dependent: notebooks that use the masked-LM lens need TransformerLens's
``HookedEncoder``, which TransformerLens 4.0 removed; on 4.x they are skipped with that reason, exactly
as the masked-LM tests are (tests/helpers.py: requires_hooked_encoder). Which notebooks need it is read
from their code, not from a hand-kept list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tl_logitlens import _compat

_ENCODER_CALLS = ("masked_lens(", "sliding_mask_lens(")


def _needs_hooked_encoder(path: Path) -> bool:
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    source = "".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
    return any(call in source for call in _ENCODER_CALLS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _compat.HookedEncoder is not None:
        return
    skip = pytest.mark.skip(
        reason=f"TransformerLens {_compat.TL_VERSION} has no HookedEncoder (removed in 4.0); the masked-LM "
        "lens runs with TransformerLens 3.9"
    )
    here = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.suffix == ".ipynb" and path.parent == here and _needs_hooked_encoder(path):
            item.add_marker(skip)
