"""``run --prompts-file``: the file counted first (cheaply, for a total), then read lazily, one prompt a
line, while its progress is shown on stderr.

Standard library only at import (``rich`` loads when a bar is drawn): the file is checked before torch loads.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_logitlens.cli.shared import PROG, UsageError

# the counting pass reads the file in chunks of this many bytes (one long line never sits in memory)
COUNT_CHUNK = 1 << 20
# without a terminal: a progress line each time another tenth of the prompts is done, but none sooner
# than PLAIN_MIN_S after the start or the last line (a short job prints none), and one at least every
# PLAIN_MAX_S seconds (a long job is never silent for minutes)
PLAIN_STEP = 0.1
PLAIN_MIN_S = 5.0
PLAIN_MAX_S = 60.0


def _not_utf8(path: Path) -> UsageError:
    return UsageError(f"{str(path)!r} is not UTF-8 text; save it as UTF-8, one prompt per line")


@dataclass(frozen=True)
class PromptsFile:
    """A prompts file, checked and counted: ``n_prompts`` is its number of lines holding more than
    ASCII whitespace (the prompts :meth:`prompts` yields, up to lines of other whitespace alone, which
    are skipped too: the count is for progress only)."""

    path: Path
    n_prompts: int

    @classmethod
    def open(cls, name: str) -> PromptsFile:
        """The file ``name``, checked to exist, to be UTF-8 and to hold a prompt, and counted: a binary
        pass in chunks, fast (a second for millions of lines) and in constant memory.

        Raises:
            UsageError: no such file, not UTF-8, no prompts.
        """
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no prompts file at {str(path)!r}; give a text file with one prompt per line")
        decoder = codecs.getincrementaldecoder("utf-8")()
        n, open_line = 0, False  # open_line: the line the last chunk ended in holds a prompt so far
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(COUNT_CHUNK):
                    decoder.decode(chunk)
                    pieces = chunk.split(b"\n")
                    for piece in pieces[:-1]:
                        n += open_line or bool(piece.strip())
                        open_line = False
                    open_line = open_line or bool(pieces[-1].strip())
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        n += open_line
        if n == 0:
            raise UsageError(f"{str(path)!r} holds no prompts; write one prompt per line")
        return cls(path, n)

    def prompts(self) -> Iterator[str]:
        """The file's prompts, read line by line (blank lines skipped, line ends dropped)."""
        try:
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield line.rstrip("\r\n")
        except UnicodeDecodeError:  # the file changed since it was counted
            raise _not_utf8(self.path) from None


class PromptProgress:
    """How far a run is, on stderr: a rich bar on a terminal; otherwise (piped, captured, a log file) a
    plain line now and then (:data:`PLAIN_STEP`, :data:`PLAIN_MIN_S`, :data:`PLAIN_MAX_S`), so a long job
    never stays silent for minutes. ``with`` it, and call it with the prompts done so far."""

    def __init__(self, err: Any, total: int, name: str) -> None:
        self.err, self.total, self.name = err, total, name
        self.start = self.last = time.monotonic()
        self.next_step = PLAIN_STEP
        self.bar: Any = None
        if err.is_terminal:
            from rich.progress import Progress

            self.bar = Progress(console=err, transient=True)
            self.task = self.bar.add_task(name, total=total)

    def __enter__(self) -> PromptProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int) -> None:
        total = max(self.total, done)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        now = time.monotonic()
        fraction = done / total
        if now - self.last < PLAIN_MIN_S or (fraction < self.next_step and now - self.last < PLAIN_MAX_S):
            return
        while self.next_step <= fraction:
            self.next_step += PLAIN_STEP
        self.last = now
        elapsed = now - self.start
        left = f", about {_duration(elapsed * (total - done) / done)} left" if 0 < done < total else ""
        sys.stderr.write(
            f"{PROG}: {self.name}: {done:,} of {total:,} prompts ({fraction:.0%}), {_duration(elapsed)}{left}\n"
        )
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
