"""The files of a lens: this package's own folder format, and reading other tools' files safely.

A lens saved by this package is a folder with two files:

- ``{stem}.safetensors``: the tensors, and in the safetensors header (``__metadata__``) the lens's
  whole metadata as JSON under the key ``"tl_logitlens"``. This file alone *is* the lens: weights and
  metadata (what it was made for, the readout fingerprint, how it was fitted) are replaced together;
- ``{stem}.json``: the same metadata, indented, for people to read. It is read only when the weights
  file has no metadata (format version 1, before the metadata moved into it).

Every lens folder (this package's, tuned-lens's two files) is written whole into a temporary folder
beside the target and swapped into place (:func:`write_folder`): a reader, or a save killed at any
moment, sees the old lens or the new one, never a mix of the two and never nothing.

Tensors are stored as safetensors (never a pickle); reading another tool's ``.pt`` goes through
:func:`read_torch_file`, which refuses anything but plain tensors and containers. Every parse error
(a truncated file, JSON that is not an object or not UTF-8, a pickle that needs code) is a
``ValueError`` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tl_logitlens.core.files import (
    TMP_SUFFIX,
    check_path_argument,
    current_umask,
    first_line,
    remove_stale_temporaries,
    temporary_prefix,
    tensors_sha256,
)

METADATA_KEY = "tl_logitlens"
# the header key of the SHA-256 of the tensors (names, dtypes, shapes, bytes; lenses saved since it was added)
CHECKSUM_KEY = "tl_logitlens_sha256"


# every file a lens format of this package or tuned-lens writes into its folder: a save drops the old
# folder's copies of these (another format's lens would otherwise load instead of the new one)
LENS_FILE_NAMES = frozenset(
    {"tuned_lens.safetensors", "tuned_lens.json", "jacobian_lens.safetensors", "jacobian_lens.json", "config.json", "params.pt"}
)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing folders (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system has no such call, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def write_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary folder beside ``folder``, then put it in ``folder``'s place
    atomically: a reader (or a save killed at any moment) sees the old folder or the new one, whole.

    The new folder holds what ``write`` wrote, and of the old folder's files only those that are no
    lens's (a note a user put there): a lens file of another format is never carried over, so the folder
    cannot load as the old lens after a save of another kind. The temporary folder's name carries this
    process's id; a later save removes those of saves that were killed, never another running writer's.

    On Linux the two folders are exchanged with one ``renameat2(RENAME_EXCHANGE)``: a reader resolving
    ``folder`` at any instant finds a whole lens. Where the system has no such call (macOS, Windows,
    some network file systems) the old folder is renamed aside for the instant the new one is renamed
    in: a reader in that instant finds no folder (and is told to retry), never a mix of two saves.
    Returns the folder.

    Raises:
        TypeError: ``folder`` is not a path.
        ValueError: ``folder`` is a file, or holds sub-folders (a lens folder holds files only), or no
            temporary folder can be made beside it (a missing or read-only place).
        OSError: the write itself failed (a full disk).
    """
    folder = check_path_argument(folder, "the lens folder")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file; a lens is saved as a folder, give a folder path")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, folder.name)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder.name), suffix=TMP_SUFFIX, dir=parent))
    except OSError as err:
        raise ValueError(f"cannot save a lens into {str(folder)!r} ({err.strerror or first_line(err)}); choose another place") from None
    try:
        # mkdtemp's folder is private (0700); give it the mode the folder has, or a new folder would get
        os.chmod(tmp, folder.stat().st_mode & 0o7777 if folder.exists() else 0o777 & ~current_umask())
        write(tmp)
        if folder.is_dir():
            for old in folder.iterdir():
                if old.is_dir():
                    raise ValueError(
                        f"{str(folder)!r} holds a folder ({old.name}); save the lens into a new or empty folder"
                    )
                if old.name not in LENS_FILE_NAMES and not (tmp / old.name).exists():
                    try:
                        os.link(old, tmp / old.name)
                    except OSError:
                        shutil.copy2(old, tmp / old.name)
        _fsync_folder(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder.name), suffix=TMP_SUFFIX, dir=parent))
            os.rmdir(aside)
            os.rename(folder, aside)
            os.rename(tmp, folder)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:  # an I/O error after the start (a full disk) stays an OSError
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse to write NaN or inf: a failed fit must never replace a good lens with a broken one.

    Raises:
        ValueError: naming the first tensor that holds NaN or inf.
    """
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{key} holds NaN or inf, so {where} was not written (any lens already there is kept); the "
                "lens is broken: fit or train it again (a smaller learning rate?)"
            )


def write_lens_folder(
    folder: str | os.PathLike,
    stem: str,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``{stem}.safetensors`` (the tensors in ``dtype``, float32 by default, with ``meta`` and a
    SHA-256 of the stored tensors in the header) and ``{stem}.json`` into ``folder`` (created if
    needed), swapping the folder in whole (:func:`write_folder`).

    Raises:
        ValueError: a tensor holds NaN or inf once stored in ``dtype`` (nothing is written).
    """
    from safetensors.torch import save_file

    text = json.dumps(dict(meta), indent=1)
    plain = {k: t.detach().to(dtype).cpu().contiguous() for k, t in tensors.items()}
    check_finite_tensors(plain, f"the lens folder {os.fspath(folder)!r}")
    header = {
        METADATA_KEY: json.dumps(dict(meta)),
        "format": str(meta.get("format", "")),
        CHECKSUM_KEY: tensors_sha256(sorted(plain.items())),
    }

    def write(tmp: Path) -> None:
        save_file(plain, tmp / f"{stem}.safetensors", metadata=header)
        (tmp / f"{stem}.json").write_text(text + "\n", encoding="utf-8")

    return write_folder(folder, write)


# reads of a lens file that a concurrent save replaced are repeated this many times
_READ_TRIES = 20


def _identity(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten (None: no such file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_safetensors(weights: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as err:  # safetensors raises its own error types on a crafted or truncated file
        raise ValueError(f"{weights} is not a readable safetensors file ({first_line(err)}); save the lens again") from err
    return header, tensors


def read_lens_folder(folder: Path, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata that :func:`write_lens_folder` wrote (or a version-1 folder: metadata
    in ``{stem}.json`` only).

    Raises:
        ValueError: a missing or unreadable file, metadata that is not a JSON object.
    """
    weights, card = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    for attempt in range(_READ_TRIES):
        if attempt:
            time.sleep(0.01 * attempt)
        before = _identity(weights)
        if before is None:
            continue  # a save elsewhere than Linux renames the folder aside for an instant
        try:
            header, tensors = _read_safetensors(weights)
        except ValueError:
            if _identity(weights) != before:
                continue
            raise
        # safetensors opens the file again by name for the tensors: if a save replaced it meanwhile, the
        # header and the tensors may come from two saves; read again until the file stayed the same
        if _identity(weights) == before:
            break
    else:
        if _identity(weights) is None:
            raise ValueError(f"{str(folder)!r} has no {weights.name}; it is not a complete saved lens")
        raise ValueError(f"{weights} kept being replaced while it was read (another process saving it?); try again")
    checksum = header.get(CHECKSUM_KEY)
    if checksum is not None and checksum != tensors_sha256(sorted(tensors.items())):
        raise ValueError(
            f"{weights}: the tensor data does not match the SHA-256 checksum in its header; the file is damaged "
            "(save, copy or download the lens again)"
        )
    if METADATA_KEY in header:
        meta = json_object(header[METADATA_KEY], f"the metadata in {weights}")
    elif card.is_file():
        meta = read_json_object(card)
    else:
        raise ValueError(f"{str(folder)!r} has {weights.name} without its metadata ({card.name}); save the lens again")
    return tensors, meta


def json_object(text: str, where: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; ``where`` names it in errors.

    Raises:
        ValueError: not JSON, nested too deeply to parse, or not an object.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a lens's metadata") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds a JSON {type(value).__name__}, not an object")
    return value


def read_json_object(path: Path, limit: int = 1 << 24) -> dict[str, Any]:
    """A small JSON file (at most ``limit`` bytes: a config or a card) holding an object.

    Raises:
        ValueError: too large, not UTF-8, not JSON, or not an object; the message names the file.
    """
    try:
        if path.stat().st_size > limit:
            raise ValueError(f"{path} is {path.stat().st_size} bytes; a lens's JSON is small (at most {limit})")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); is it a lens's JSON file?") from None
    except OSError as err:
        raise ValueError(f"{path} could not be read ({err.strerror})") from err
    return json_object(text, str(path))


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and containers of
    them, never arbitrary objects (a pickle that needs more is refused, not run).

    Raises:
        ValueError: the file is not such a checkpoint; the message names it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a crafted file fails in many ways (unpickling, zip, storage): all one answer
        raise ValueError(
            f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) refused it: {first_line(err)}); "
            "refusing to unpickle anything else"
        ) from err


def model_sizes(model: Any) -> dict[str, int]:
    """The sizes a lens file must match: ``d_model`` and ``n_layers``."""
    return {"d_model": int(model.cfg.d_model), "n_layers": int(model.cfg.n_layers)}


def check_size(value: Any, key: str, expected: int, where: str, what: str) -> int:
    """A size read from a lens file (``key`` in ``where``), checked to be a whole number equal to the
    model's ``expected`` *before* anything of that size is allocated.

    Raises:
        ValueError: not a whole number, or not the model's.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} is {value!r}, not a whole number; the file is damaged")
    if value != expected:
        raise ValueError(
            f"{where}: {key} is {value}, but the model's is {expected}; this {what} was made for another model"
        )
    return value


def check_tensor(t: Any, shape: tuple[int, ...], key: str, where: str) -> torch.Tensor:
    """A lens tensor ``key`` from ``where``: a float tensor of ``shape`` holding finite values.

    Raises:
        ValueError: another type, shape or dtype, or NaN/inf (naming the file and the tensor).
    """
    if isinstance(t, torch.Tensor) and t.layout != torch.strided:
        raise ValueError(f"{where}: {key} is a {t.layout} tensor; a lens holds dense tensors (save it with .to_dense())")
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
        got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where}: {key} should be a float tensor of shape {list(shape)}, not {got}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{where}: {key} holds NaN or inf; the lens file is broken (re-train or re-save it), so it is not loaded"
        )
    return t
