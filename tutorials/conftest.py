"""Every notebook here runs under pytest through nbmake (see pyproject's addopts).

The one exception is version-dependent: TransformerLens 4.0 removed ``HookedEncoder``. On 4.x
``tl_logitlens.load_model`` gives a ``BertForMaskedLM`` as a compatibility-mode bridge and the masked-LM
lens runs on it, but RoBERTa is loaded with TransformerLens 3.9 only (4.x's RoBERTa bridge replaces the
tokenizer). So on 4.x a notebook is skipped, with that reason, when it uses the masked-LM lens on RoBERTa;
which notebooks do is read from their code, not from a hand-kept list.
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
    return any(call in source for call in _ENCODER_CALLS) and "roberta" in source.lower()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _compat.HookedEncoder is not None:
        return
    skip = pytest.mark.skip(
        reason=f"TransformerLens {_compat.TL_VERSION} has no HookedEncoder (removed in 4.0) and its RoBERTa "
        "bridge replaces the tokenizer; the masked-LM lens on RoBERTa runs with TransformerLens 3.9"
    )
    here = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.suffix == ".ipynb" and path.parent == here and _needs_hooked_encoder(path):
            item.add_marker(skip)
