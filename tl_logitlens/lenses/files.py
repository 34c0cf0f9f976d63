"""The files of a lens: this package's own folder format, and reading other tools' files safely.

A lens saved by this package is a folder with two files, written atomically one after the other:

- ``{stem}.safetensors``: the tensors, and in the safetensors header (``__metadata__``) the lens's
  whole metadata as JSON under the key ``"tl_logitlens"``. This file alone *is* the lens: weights and
  metadata (what it was made for, the readout fingerprint, how it was fitted) are replaced together,
  so a folder always holds one saved lens, old or new, even if a save is killed at any moment;
- ``{stem}.json``: the same metadata, indented, for people to read. It is written second and read
  only when the weights file has no metadata (format version 1, before the metadata moved into it).

Tensors are stored as safetensors (never a pickle); reading another tool's ``.pt`` goes through
:func:`read_torch_file`, which refuses anything but plain tensors and containers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tl_logitlens._files import atomic_write, atomic_write_text

METADATA_KEY = "tl_logitlens"


def write_lens_folder(folder: str | os.PathLike, stem: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``{stem}.safetensors`` (the tensors, float32, with ``meta`` in the header) and then
    ``{stem}.json`` into ``folder`` (created if needed), each atomically. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file; a lens is saved as a folder, give a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(meta), indent=1)
    plain = {k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}
    header = {METADATA_KEY: json.dumps(dict(meta)), "format": str(meta.get("format", ""))}
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(plain, tmp, metadata=header))
    atomic_write_text(folder / f"{stem}.json", text + "\n")
    return folder


def read_lens_folder(folder: Path, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata that :func:`write_lens_folder` wrote (or a version-1 folder: metadata
    in ``{stem}.json`` only).

    Raises:
        ValueError: a missing or unreadable file, metadata that is not a JSON object.
    """
    from safetensors import SafetensorError, safe_open

    weights, card = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if not weights.is_file():
        raise ValueError(f"{str(folder)!r} has no {weights.name}; it is not a complete saved lens")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); save the lens again") from err
    if METADATA_KEY in header:
        meta = _json_object(header[METADATA_KEY], f"the metadata in {weights}")
    elif card.is_file():
        meta = _json_object(card.read_text(encoding="utf-8"), str(card))
    else:
        raise ValueError(f"{str(folder)!r} has {weights.name} without its metadata ({card.name}); save the lens again")
    return tensors, meta


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds a JSON {type(value).__name__}, not an object")
    return value


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and containers of
    them, never arbitrary objects (a pickle that needs more is refused, not run).

    Raises:
        ValueError: the file is not such a checkpoint; the message names it.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, OSError, ValueError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) refused it: {first}); "
            "refusing to unpickle anything else"
        ) from err
