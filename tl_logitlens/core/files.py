"""Writing files so that nothing is ever half-written, and reading back long jobs' checkpoints.

Every file the package writes goes through :func:`atomic_write`: the bytes go to a temporary file
beside the target (same folder, so the same file system), are flushed to disk, and the temporary file
is moved into place with ``os.replace``, which is atomic on POSIX and Windows. A reader (or a process
killed mid-write) sees the old file or the new one, never a truncated mix. Overwriting an existing
file is allowed: it is what users expect of an output path.

A temporary's name carries the writing process's id (``.{target}.{pid}-{random}.tmp``): a later save
of the same target removes the temporaries of processes that are gone (a save that was killed), and
never those of a process still running (another writer's save in progress).

:class:`Checkpoint` is the one resumable-job mechanism (tuned-lens training, the Jacobian lens fit,
corpus evaluation): a job's state (tensors, numbers, strings, lists and dicts of them) is saved
atomically with ``torch.save``, with a SHA-256 of the state, and read back with
``torch.load(weights_only=True)``; the checksum is verified, every field is validated (type, sign,
shape, finiteness) by the job's own checker, and a job started again with other settings (digests of
its model, lenses and texts included) is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHECKPOINT_FILE = "checkpoint.pt"
TMP_SUFFIX = ".tmp"
# a temporary without a process id (written by an older version) is stale after this long
_OLD_TEMPORARY_S = 3600.0


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def check_path_argument(path: Any, what: str, kind: str = "a path") -> Path:
    """``path`` as a ``Path`` (``~`` expanded), or a TypeError naming ``what`` when it is not a path."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"{what} must be {kind} (a str or os.PathLike), not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} is an empty path; give a file or folder name")
    return Path(text).expanduser()


def check_output_file(path: Any, what: str) -> Path:
    """Where a file will be written: a path (not a folder) in a folder that exists and is writable.

    Raises:
        TypeError: not a path. ValueError: the folder is missing or not writable, or the path is a folder.
    """
    target = check_path_argument(path, what)
    if target.is_dir():
        raise ValueError(f"{what} {str(target)!r} is a folder; give a file name")
    _check_writable_folder(target.parent, f"the folder of {what} {str(target)!r}")
    return target


def _check_writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise ValueError(f"{what} does not exist ({str(folder)!r}); create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} ({str(folder)!r}) is not writable; choose another place")


def ensure_writable_folder(folder: Path, what: str) -> Path:
    """Create ``folder`` (and its parents) if needed and check a file can be written in it, by writing
    and removing one: a long job checks where it will save *before* it starts, not after.

    Raises:
        ValueError: the folder cannot be created or written to (naming ``what`` and the reason).
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe.{os.getpid()}-", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{what} {str(folder)!r} cannot be written to ({err.strerror or first_line(err)}); choose another folder"
        ) from None
    return folder


def temporary_prefix(name: str) -> str:
    """The prefix of this process's temporaries for a target called ``name``."""
    return f".{name}.{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform.startswith("win"):  # os.kill(pid, 0) is not a probe there; leave others' temporaries
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove the temporaries of target ``name`` in ``parent`` that a killed save left: those of a process
    that is gone (and, written by an older version without a process id, those over an hour old).
    Another running process's temporary is never touched."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)-)?[^/]*{re.escape(TMP_SUFFIX)}$")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid = match.group(1)
        try:
            if pid is not None:
                if _process_alive(int(pid)):
                    continue
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime < _OLD_TEMPORARY_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            continue


def _temporary(target: Path) -> Path:
    """A new empty temporary file beside ``target``, named as its stale temporaries are recognised."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(target.name), suffix=TMP_SUFFIX, dir=target.parent)
    except OSError as err:
        raise ValueError(
            f"cannot write {str(target)!r} ({err.strerror or first_line(err)}); choose another place"
        ) from None
    os.close(fd)
    return Path(tmp_name)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to fill, for as long as the ``with`` block runs (a long job writes
    it bit by bit); when the block ends, it is flushed to disk and moved onto ``path``. If the block
    raises (or the process is interrupted), the temporary is removed and ``path`` is left as it was;
    temporaries that killed writes of ``path`` left are removed first.

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: its folder is missing or not writable (no temporary file can be made there), or
            ``path`` is a folder.
        OSError: the write itself failed (a full disk).
    """
    target = check_output_file(path, "the output path")
    remove_stale_temporaries(target.parent, target.name)
    tmp = _temporary(target)
    try:
        # mkstemp's file is private (0600); give it the mode the file has, or a new file would get
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~current_umask())
        yield tmp
        with open(tmp, "rb+") as fh:  # the bytes reach the disk before the name points at them
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:  # an I/O error after the start (a full disk) stays an OSError
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def scratch_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` (named as its temporaries are, so a killed job's is removed by the
    next write of ``path``), for a part of it written before the whole; removed when the block ends."""
    target = check_output_file(path, "the output path")
    tmp = _temporary(target)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it onto ``path``
    (:func:`atomic_output`: nothing is left behind when ``write`` raises). Returns ``path`` as a ``Path``.

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: its folder is missing or not writable (no temporary file can be made there), or
            ``path`` is a folder.
        OSError: the write itself failed (a full disk).
    """
    with atomic_output(path) as tmp:
        write(tmp)
    return check_path_argument(path, "the output path")


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ------------------------------------------------------------------------------------------------
# digests: what binds a checkpoint to the model, lenses and texts it was made with


def tensors_sha256(named: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 of named tensors, in the order given: each one's name, dtype, shape and bytes."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = t.reshape(-1).contiguous().cpu()
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def weights_sha256(module: Any) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and bytes, in named order):
    two models that share a readout but differ anywhere else get different digests."""
    return tensors_sha256([*module.named_parameters(), *module.named_buffers()])


def lens_sha256(lens: Any) -> str | None:
    """SHA-256 of a lens's own tensors (a module's parameters and buffers, a Jacobian lens's matrices),
    or None for a lens with none (the logit lens)."""
    import torch

    if lens is None:
        return None
    if isinstance(lens, torch.nn.Module):
        return weights_sha256(lens)
    tensors = getattr(lens, "jacobians", None)
    if isinstance(tensors, Mapping):
        return tensors_sha256((f"J.{k}", v) for k, v in sorted(tensors.items()))
    return None


def state_sha256(state: Any) -> str:
    """SHA-256 of a checkpoint's state (dicts by sorted key, lists in order, tensors by dtype, shape and
    bytes, numbers and strings by their repr): what :class:`Checkpoint` stores and checks."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(memoryview(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()))
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(f"K{key!r}".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


# ------------------------------------------------------------------------------------------------
# checking a checkpoint's fields (each error names the field)


def field_int(state: Mapping[str, Any], key: str, low: int = 0, high: int = 2**62) -> int:
    """``state[key]``, an int (not a bool) in ``[low, high]``."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} is {_show(value)}, not an int")
    if not low <= value <= high:
        raise ValueError(f"field {key!r} is {_show(value)}, outside [{low}, {high}]")
    return value


def field_float(state: Mapping[str, Any], key: str) -> float:
    """``state[key]``, a finite float or int (not a bool)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"field {key!r} is {_show(value)}, not a finite number")
    return float(value)


def field_str(state: Mapping[str, Any], key: str, pattern: str | None = None) -> str:
    value = state[key]
    if not isinstance(value, str) or (pattern is not None and re.fullmatch(pattern, value) is None):
        raise ValueError(
            f"field {key!r} is {_show(value)}, not {'a string' if pattern is None else 'a hex digest'}"
        )
    return value


def field_tensor(
    state: Mapping[str, Any],
    key: str,
    shape: tuple[int, ...] | None,
    dtype: Any,
    *,
    finite: bool = True,
    low: float | None = None,
) -> Any:
    """``state[key]``, a dense tensor of ``dtype`` and ``shape`` (None: any), finite, at least ``low``."""
    import torch

    value = state[key]
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise ValueError(f"field {key!r} is {_show(value)}, not a dense tensor")
    if value.dtype != dtype:
        raise ValueError(f"field {key!r} is a {value.dtype} tensor, not {dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"field {key!r} has shape {list(value.shape)}, not {list(shape)}")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"field {key!r} holds NaN or inf")
    if low is not None and value.numel() and float(value.min()) < low:
        raise ValueError(f"field {key!r} holds values below {low:g}")
    return value


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON would keep them (tuples become lists), so a saved copy compares equal."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


class Checkpoint:
    """A long job's saved state in ``folder/checkpoint.pt``, tied to the settings that produced it.

    ``settings`` are everything that changes the job's result (hyper-parameters, digests of the model's
    weights, the lenses and the data, ...), as JSON-able values. ``validate(state)`` checks every
    field of a saved state (type, sign, shape, finiteness, consistency), raising ``ValueError`` naming
    the field (``KeyError`` for a missing one is turned into that too). The folder is created and
    checked writable when the checkpoint is made, before the job starts.

    :meth:`load` returns the saved state, or None when the folder holds no checkpoint yet; it refuses
    a file that is not a checkpoint, one whose state does not match its SHA-256 (a flipped byte), one
    of another job or saved with other settings (naming them), and one whose fields do not validate.
    :meth:`save` replaces the checkpoint atomically, so a kill at any moment leaves the previous one.

    Example:
        >>> ckpt = Checkpoint("runs/lens", {"lr": 1.0, "steps": 100}, job="demo")   # doctest: +SKIP
        >>> state = ckpt.load() or {"step": 0}                                     # doctest: +SKIP
        >>> ckpt.save({"step": 10, "weight": w})                                   # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        settings: Mapping[str, Any],
        *,
        job: str,
        validate: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        if not isinstance(folder, (str, os.PathLike)) or isinstance(folder, bytes):
            raise TypeError(
                f"checkpoint_dir must be a folder path (a str or os.PathLike), not {type(folder).__name__}"
            )
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(
                f"checkpoint_dir {str(self.folder)!r} is a file, not a folder; give a folder path"
            )
        ensure_writable_folder(self.folder, "checkpoint_dir")
        self.settings = _plain(settings)
        self.job = job
        self.validate = validate

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"{self.path} {why}; delete it to start again, or use another checkpoint folder")

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet.

        Raises:
            ValueError: the file is not a checkpoint (or not a safe one), fails its checksum, belongs
                to another kind of job, was saved with other settings, or has a field that is missing,
                of the wrong type, sign or shape, or not finite.
        """
        if not os.path.lexists(self.path):
            return None
        if not self.path.is_file():
            raise self._refuse("is not a file")
        import torch

        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or crafted file fails in many ways (zip, unpickling, storage)
            raise self._refuse(f"is not a readable checkpoint ({first_line(err)})") from None
        if not isinstance(saved, dict) or not {"job", "settings", "state"} <= set(saved):
            raise self._refuse("is not a tl_logitlens checkpoint")
        if saved["job"] != self.job:
            raise ValueError(
                f"{self.path} holds a checkpoint of {saved['job']!r}, not of {self.job!r}; use another folder"
            )
        state = saved["state"]
        if not isinstance(state, dict):
            raise self._refuse(f"holds a state of type {type(state).__name__}, not a dict")
        checksum = saved.get("sha256")
        if not isinstance(checksum, str):
            raise self._refuse("carries no checksum (field 'sha256'; written by an older version?)")
        if state_sha256(state) != checksum:
            raise self._refuse("is damaged: its state does not match its SHA-256 checksum")
        if saved["settings"] != self.settings:
            old, new = saved["settings"], self.settings
            if not isinstance(old, dict):
                raise self._refuse("holds settings that are not a dict")
            old, new = _flat(old), _flat(new)
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = ", ".join(f"{k}: {_short(old.get(k))} then, {_short(new.get(k))} now" for k in differ[:4])
            raise ValueError(
                f"{self.path} was saved by a {self.job} with other settings ({shown}); resume with the same "
                "settings, or use another checkpoint folder to start a new one"
            )
        if self.validate is not None:
            try:
                self.validate(state)
            except KeyError as err:
                raise self._refuse(f"lacks the field {err.args[0]!r}") from None
            except (ValueError, TypeError) as err:
                raise self._refuse(f"is not valid: {err}") from None
        return state

    def save(self, state: Mapping[str, Any]) -> Path:
        """Replace the checkpoint with ``state`` (atomically, with its SHA-256)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = dict(state)
        payload = {"job": self.job, "settings": self.settings, "state": state, "sha256": state_sha256(state)}
        return atomic_torch_save(self.path, payload)


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"model.weights_sha256": ...}``, so a refusal names the leaf that differs."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
