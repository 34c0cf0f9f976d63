"""Loading a lens from disk or by a built-in name, whatever its format.

:func:`load_lens` recognises a lens by what the path holds, not by what it is called:

- a folder with ``tuned_lens.safetensors``: this package's tuned lens (:meth:`TunedLens.save`);
- a folder with ``config.json`` + ``params.pt``: a tuned-lens 0.2.0 checkpoint;
- a built-in name: ``"demo"``, the tuned lens shipped for ``load_model("demo")``.

Every lens is checked against the model before it is returned (:meth:`Lens.check_model`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_logitlens.lenses.tuned import (
    TUNED_LENS_CONFIG,
    TUNED_LENS_PARAMS,
    WEIGHTS_FILE,
    TunedLens,
    is_own_folder,
    is_tuned_lens_folder,
    read_own,
    read_tuned_lens_format,
)

_DEMO_MODELS = Path(__file__).resolve().parent.parent / "demo_models"
BUILTIN_LENSES = {"demo": _DEMO_MODELS / "demo" / "tuned_lens"}


def load_lens(folder_or_name: Any, model: Any) -> TunedLens:
    """A lens for ``model`` from a folder (this package's tuned-lens format or tuned-lens 0.2.0's) or a
    built-in name (``"demo"``: the lens shipped for ``load_model("demo")``), on the model's device.

    Example:
        >>> lens = tl.load_lens("demo", tl.load_model("demo"))   # doctest: +SKIP

    Raises:
        ValueError: no lens at that path; a malformed or unsafe checkpoint; a lens made for another
            model (shapes, readout fingerprint) or for another centring of a LayerNorm model's stream.
    """
    if not isinstance(folder_or_name, (str, os.PathLike)):
        raise TypeError(f"load_lens takes a folder or a built-in name like 'demo', not {type(folder_or_name).__name__}")
    name = os.fspath(folder_or_name)
    folder = BUILTIN_LENSES.get(name, Path(name).expanduser())
    if not folder.is_dir():
        raise ValueError(
            f"no tuned lens at {name!r}: pass a folder holding {WEIGHTS_FILE} (TunedLens.save), "
            f"or tuned-lens's {TUNED_LENS_CONFIG} + {TUNED_LENS_PARAMS}, or a built-in name ({sorted(BUILTIN_LENSES)})"
        )
    if is_own_folder(folder):
        lens = read_own(folder)
    elif is_tuned_lens_folder(folder):
        lens = read_tuned_lens_format(folder)
    else:
        raise ValueError(
            f"{str(folder)!r} holds no tuned lens: expected {WEIGHTS_FILE} (this package) or "
            f"{TUNED_LENS_CONFIG} + {TUNED_LENS_PARAMS} (tuned-lens 0.2.0)"
        )
    lens.check_model(model)
    return lens.to(model.W_U.device)
