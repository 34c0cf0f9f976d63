"""Loading a lens from disk or by a built-in name, whatever its format.

:func:`load_lens` recognises a lens by what the path holds, not by what it is called:

- a folder with ``tuned_lens.safetensors``: this package's tuned lens (:meth:`TunedLens.save`);
- a folder with ``jacobian_lens.safetensors``: this package's Jacobian lens (:meth:`JacobianLens.save`);
- a folder with ``config.json`` + ``params.pt``: a tuned-lens 0.2.0 checkpoint;
- a ``.pt`` file holding ``"J"``: a Jacobian lens in the reference format (``anthropics/jacobian-lens``,
  TransformerLens 4.3), or ``"jacobian_sum"``: a TransformerLens fit checkpoint;
- a built-in name: ``"demo"``, the tuned lens shipped for ``load_model("demo")``, and
  ``"demo-jacobian"``, the Jacobian lens shipped for it (``scripts/fit_demo_jacobian.py``; its card,
  ``demo_models/demo/jacobian_lens/LENS_CARD.md``, gives held-out KL and top-1 agreement of all three).

Every file is read as data (safetensors, ``torch.load(weights_only=True)``, JSON); every size in it is
checked against the model before anything of that size is built; every lens is checked against the
model before it is returned (:meth:`Lens.check_model`: shapes, and where the file carries one, the
readout fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_logitlens.lenses import jacobian, tuned
from tl_logitlens.lenses.files import read_torch_file
from tl_logitlens.lenses.fingerprint import readout_fingerprint
from tl_logitlens.lenses.jacobian import JacobianLens
from tl_logitlens.lenses.tuned import TunedLens

_DEMO_MODELS = Path(__file__).resolve().parent.parent / "demo_models"
BUILTIN_LENSES = {
    "demo": _DEMO_MODELS / "demo" / "tuned_lens",
    "demo-jacobian": _DEMO_MODELS / "demo" / "jacobian_lens",
}
# this package's own formats always carry the readout fingerprint; the others never do
_OWN_FORMATS = (tuned.FORMAT, jacobian.FORMAT)


def _check_model_argument(model: Any, spec: str) -> None:
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"load_lens takes the model object, not {os.fspath(model)!r}; load it first: "
            f"model = tl.load_model({os.fspath(model)!r}); tl.load_lens({spec!r}, model)"
        )
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "d_model") or not hasattr(cfg, "n_layers") or not hasattr(model, "W_U"):
        raise TypeError(
            f"load_lens needs a TransformerLens model (from tl.load_model) to check the lens against, not "
            f"{type(model).__name__}"
        )


def _read(path: Path, model: Any) -> TunedLens | JacobianLens:
    """The lens at ``path``, by what it holds (sizes checked against ``model``, nothing else yet)."""
    if path.is_dir():
        if tuned.is_own_folder(path):
            return tuned.read_own(path, model)
        if jacobian.is_own_folder(path):
            return jacobian.read_own(path, model)
        if tuned.is_tuned_lens_folder(path):
            return tuned.read_tuned_lens_format(path, model)
        raise ValueError(
            f"{str(path)!r} holds no lens: expected {tuned.WEIGHTS_FILE} or {jacobian.WEIGHTS_FILE} (this package), "
            f"or {tuned.TUNED_LENS_CONFIG} + {tuned.TUNED_LENS_PARAMS} (tuned-lens 0.2.0)"
        )
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is neither a folder nor a regular file; pass a lens folder or a .pt file")
    if path.name in (tuned.WEIGHTS_FILE, jacobian.WEIGHTS_FILE, tuned.TUNED_LENS_PARAMS, tuned.TUNED_LENS_CONFIG):
        return _read(path.parent, model)  # a file of a lens folder: the folder is the lens
    payload = read_torch_file(path)
    if jacobian.is_reference_payload(payload):
        return jacobian.read_reference(path, model, payload)
    raise ValueError(
        f"{path} is not a lens file this package reads: a .pt file must hold a Jacobian lens ('J', the reference "
        "format, or 'jacobian_sum', a TransformerLens fit checkpoint); a tuned lens is a folder"
    )


def load_lens(path_or_name: Any, model: Any, *, check_fingerprint: bool = True) -> TunedLens | JacobianLens:
    """A lens for ``model``, on the model's device, from a path or a built-in name.

    The path may hold any lens format (see :mod:`tl_logitlens.lenses.loading`): this package's tuned or
    Jacobian lens folder, a tuned-lens 0.2.0 folder, or a Jacobian lens ``.pt`` in the reference format.
    ``"demo"`` is the tuned lens shipped for ``load_model("demo")``, ``"demo-jacobian"`` the Jacobian lens.

    This package's files carry a readout fingerprint of the model they were made for, and a file whose
    fingerprint is missing is refused: it may be a lens for another model of the same shape. Pass
    ``check_fingerprint=False`` to load such a file (or one made for a model whose readout changed) on
    your own authority; the lens then carries no fingerprint. Other tools' formats never carry one: they
    are checked by shape and layer count, and the lens records this model's fingerprint from then on.

    Example:
        >>> lens = tl.load_lens("demo", tl.load_model("demo"))   # doctest: +SKIP

    Raises:
        TypeError: ``model`` is not a model object (e.g. a name: load it first with ``tl.load_model``).
        ValueError: no lens at that path; a malformed, damaged or unsafe file (the message names it and
            what is wrong); a lens made for another model (sizes, readout fingerprint) or for another
            centring of a LayerNorm model's stream; a file of this package's format without its
            fingerprint (unless ``check_fingerprint=False``).
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"load_lens takes a path or a built-in name like 'demo', not {type(path_or_name).__name__}")
    spec = os.fspath(path_or_name)
    _check_model_argument(model, spec)
    if not isinstance(check_fingerprint, bool):
        raise TypeError(f"check_fingerprint must be True or False, not {check_fingerprint!r}")
    path = BUILTIN_LENSES.get(spec, Path(spec).expanduser())
    if not path.exists():
        raise ValueError(
            f"no lens at {spec!r}: pass a folder saved by TunedLens.save or JacobianLens.save, a tuned-lens "
            f"0.2.0 folder, a Jacobian lens .pt file, or a built-in name ({', '.join(sorted(BUILTIN_LENSES))})"
        )
    lens = _read(path, model)
    own = lens.meta.get("format") in _OWN_FORMATS
    if not check_fingerprint:
        lens.meta.pop("fingerprint", None)
        lens.meta["fingerprint_skipped"] = True
    elif own and "fingerprint" not in lens.meta:
        raise ValueError(
            f"{path} is in this package's format but carries no readout fingerprint (it was removed or the file "
            "was edited), so nothing ties it to a model; if you know it was made for this model, pass "
            "check_fingerprint=False"
        )
    lens.check_model(model)
    if not own and "fingerprint" not in lens.meta and check_fingerprint:
        # other tools' files carry none: from here on the lens is tied to the model it was checked against
        lens.meta["fingerprint"] = readout_fingerprint(model)
        lens.meta["d_vocab"] = int(model.W_U.shape[-1])
    return lens.to(model.W_U.device)
