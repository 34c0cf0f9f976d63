"""Writing files so that nothing is ever half-written, and reading back long jobs' checkpoints.

Every file the package writes goes through :func:`atomic_write`: the bytes go to a temporary file
beside the target (same folder, so the same file system), are flushed to disk, and the temporary file
is moved into place with ``os.replace``, which is atomic on POSIX and Windows. A reader (or a process
killed mid-write) sees the old file or the new one, never a truncated mix. Overwriting an existing
file is allowed: it is what users expect of an output path.

:class:`Checkpoint` is the one resumable-job mechanism (tuned-lens training, the Jacobian lens fit,
corpus evaluation): a job's state (tensors, numbers, strings, lists and dicts of them) is saved
atomically with ``torch.save`` and read back with ``torch.load(weights_only=True)``, together with
the settings that produced it; a job started again with other settings is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CHECKPOINT_FILE = "checkpoint.pt"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it onto ``path``.

    The temporary file is removed if ``write`` raises (or the process is interrupted), so a failed
    write leaves the old file, if any, as it was. Returns ``path`` as a ``Path``.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp's file is private (0600); give it the mode the file has, or a new file would get
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~current_umask())
        write(tmp)
        with open(tmp, "rb+") as fh:  # the bytes reach the disk before the name points at them
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


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


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON would keep them (tuples become lists), so a saved copy compares equal."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


class Checkpoint:
    """A long job's saved state in ``folder/checkpoint.pt``, tied to the settings that produced it.

    ``settings`` are everything that changes the job's result (data, hyper-parameters, model
    fingerprint, ...), as JSON-able values. :meth:`load` returns the saved state, or None when the
    folder holds no checkpoint yet; it refuses a checkpoint saved with other settings, naming them,
    because resuming it would silently mix two jobs. :meth:`save` replaces the checkpoint atomically,
    so a kill at any moment leaves the previous checkpoint readable.

    Example:
        >>> ckpt = Checkpoint("runs/lens", {"lr": 1.0, "steps": 100})   # doctest: +SKIP
        >>> state = ckpt.load() or {"step": 0}                          # doctest: +SKIP
        >>> ckpt.save({"step": 10, "weight": w})                        # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike, settings: Mapping[str, Any], *, job: str) -> None:
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a folder path, not {type(folder).__name__}")
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint_dir {str(self.folder)!r} is a file, not a folder; give a folder path")
        self.settings = _plain(settings)
        self.job = job

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet.

        Raises:
            ValueError: the file is not a checkpoint (or not a safe one), belongs to another kind of
                job, or was saved with other settings.
        """
        if not self.path.is_file():
            return None
        import pickle

        import torch

        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise ValueError(
                f"{self.path} is not a readable checkpoint ({str(err).splitlines()[0][:200]}); delete it to "
                "start again"
            ) from err
        if not isinstance(saved, dict) or not {"job", "settings", "state"} <= set(saved):
            raise ValueError(f"{self.path} is not a tl_logitlens checkpoint; delete it or choose another folder")
        if saved["job"] != self.job:
            raise ValueError(
                f"{self.path} holds a checkpoint of {saved['job']!r}, not of {self.job!r}; use another folder"
            )
        if saved["settings"] != self.settings:
            old, new = saved["settings"], self.settings
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in differ[:4])
            raise ValueError(
                f"{self.path} was saved by a {self.job} with other settings ({shown}); resume with the same "
                "settings, or use another checkpoint folder to start a new one"
            )
        return saved["state"]

    def save(self, state: Mapping[str, Any]) -> Path:
        """Replace the checkpoint with ``state`` (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return atomic_torch_save(self.path, {"job": self.job, "settings": self.settings, "state": dict(state)})
