"""A report's per-prompt tables written as they are computed: any number of prompts in bounded memory.

:func:`stream_report` reads prompts from any iterable (a file read line by line) in blocks of
:data:`REPORT_PROMPTS`, runs each block in batches of similar length (the batches
:func:`~tl_logitlens.reporting.compute_report` runs, through the same code), writes every prompt's rows
to the CSV and JSON files as its block is done, and keeps only the first block for the report and the
terminal. :class:`TableWriter` writes those files: each goes to a temporary beside its path, moved into
place at the end, so an error or Ctrl-C midway leaves no file, whole or partial, and no temporary behind.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tl_logitlens.core import compat as _compat
from tl_logitlens.core.files import atomic_output, scratch_file
from tl_logitlens.core.models import load_model
from tl_logitlens.reporting.compute import (
    AnyReportData,
    PromptResults,
    ReportData,
    causal_block,
    causal_settings,
    check_report_arguments,
    masked_prompt,
    masked_report_data,
    masked_targets,
    report_data,
)

# prompts per block: a block is sorted by length into batches (little padding) and written back in file
# order, so its results are held together. The first block is also all the report and the terminal show:
# their means and intervals over prompts are settled well within what a figure can show by a couple of
# thousand prompts (an interval narrows as 1/sqrt(n)), while holding them costs about 35 kB a prompt for a
# 12-layer model on 30-token prompts (some 70 MB); a file of at most this many prompts is one block, run
# exactly as compute_report runs it, so its report is the same.
REPORT_PROMPTS = 2048
# prompts per chunk of rows turned into a table and written (the rows of a block, a few at a time)
ROWS_PROMPTS = 64

# the JSON document's lists, in the order they are written
CAUSAL_LISTS = ("prompts", "lens", "targets", "logit_diff", "attribution", "head_attribution")
MASKED_LISTS = ("prompts", "masked")


def lens_csv_frame(lens: Any) -> Any:
    """The lens table with the target's and the comparison token's columns beside each row (the CSV's rows)."""
    frame = lens.to_dataframe()
    if lens.target_ids is None:
        return frame
    return _with_targets(frame, lens.target_dataframe())


def _with_targets(frame: Any, targets: Any) -> Any:
    keys = ["site", "prompt", "position"]
    for t, name in enumerate(("target", "versus")[: int(targets["target_index"].max()) + 1]):
        part = targets[targets["target_index"] == t][[*keys, "target_id", "target", "logprob", "prob", "rank"]]
        part = part.rename(
            columns={
                "target_id": f"{name}_id",
                "target": name,
                "logprob": f"{name}_logprob",
                "prob": f"{name}_prob",
                "rank": f"{name}_rank",
            }
        )
        frame = frame.merge(part, on=keys, how="left")
    return frame


def _shifted(frame: Any, offset: int) -> Any:
    """``frame`` with its prompt indices counted from ``offset`` (a block's place in the whole run)."""
    if offset:
        frame = frame.assign(prompt=frame["prompt"] + offset)
    return frame


def _records_text(frame: Any) -> str:
    """The rows of ``frame`` as JSON objects separated by commas (a JSON list's inside), as
    ``to_json(orient="records")`` writes them."""
    return frame.to_json(orient="records", force_ascii=False)[1:-1]


class TableWriter:
    """The CSV rows and the JSON document of a report, written as results come (``with`` it).

    ``add(prompts, results, offset)`` appends the rows of some prompts (``offset``: the first one's index
    in the run, so every record's ``prompt`` is its place in the whole run); ``finish(header)`` completes
    the JSON document: ``header``'s keys, then every list of :data:`CAUSAL_LISTS` (or
    :data:`MASKED_LISTS`), ``null`` for a list the results do not have. The CSV and each list are written
    to temporaries beside their paths as they come; when the ``with`` block ends they are moved into place,
    and if it raises, every temporary is removed and the paths are left as they were.
    """

    def __init__(self, csv: str | os.PathLike | None, json_path: str | os.PathLike | None, *, masked: bool) -> None:
        self.masked = masked
        self._stack = ExitStack()
        self._csv: TextIO | None = None
        self._json_tmp: Path | None = None
        self._lists: dict[str, TextIO] = {}
        self._has: dict[str, bool] = {}  # whether the results have list name (else it is null)
        self._started: set[str] = set()  # the lists with records written
        self._rows_written = False
        self._finished = False
        try:
            if csv is not None:
                tmp = self._stack.enter_context(atomic_output(csv))
                self._csv = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
            if json_path is not None:
                self._json_tmp = self._stack.enter_context(atomic_output(json_path))
                for name in MASKED_LISTS if masked else CAUSAL_LISTS:
                    spool = self._stack.enter_context(scratch_file(json_path))
                    self._lists[name] = self._stack.enter_context(open(spool, "w+", encoding="utf-8"))
                    self._has[name] = False
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if kind is None and not self._finished and self._json_tmp is not None:
            err = RuntimeError("TableWriter closed without finish(header): the JSON document is incomplete")
            self._stack.__exit__(type(err), err, None)
            raise err
        return bool(self._stack.__exit__(kind, err, tb))

    def _list(self, name: str, text: str | None) -> None:
        """Append ``text`` (records, comma-separated) to JSON list ``name``; None: the results have none."""
        if name not in self._lists:
            return
        if text is None:
            return
        self._has[name] = True
        if text:
            self._lists[name].write(f",\n{text}" if name in self._started else f"\n{text}")
            self._started.add(name)

    def _rows(self, frame: Any) -> None:
        if self._csv is not None and len(frame):
            frame.to_csv(self._csv, header=not self._rows_written, index=False)
            self._rows_written = True

    def add(self, prompts: Sequence[str], results: PromptResults | Sequence[Any], offset: int = 0) -> None:
        """Write the rows of ``prompts`` (prompt ``offset`` on in the run): a causal LM's
        :class:`~tl_logitlens.reporting.compute.PromptResults` of them, or a masked LM's
        :class:`~tl_logitlens.MaskedLensResult` of each."""
        if self._csv is None and not self._lists:  # nothing asked for: no table is made
            return
        if self._lists:
            self._list("prompts", ",\n".join(json.dumps(p, ensure_ascii=False) for p in prompts))
        if self.masked:
            for b, res in enumerate(results):
                frame = _shifted(res.to_dataframe(), offset + b)
                self._rows(frame)
                self._list("masked", f"[{_records_text(frame)}]")
            return
        for start in range(0, len(prompts), ROWS_PROMPTS):
            chunk = results.select_prompts(range(start, min(start + ROWS_PROMPTS, len(prompts))))
            self._causal_rows(chunk, offset + start)

    def _causal_rows(self, results: PromptResults, offset: int) -> None:
        lens = results.lens
        frame = _shifted(lens.to_dataframe(), offset)
        targets = None if lens.target_ids is None else _shifted(lens.target_dataframe(), offset)
        self._rows(frame if targets is None else _with_targets(frame, targets))
        if not self._lists:
            return
        self._list("lens", _records_text(frame))
        self._list("targets", None if targets is None else _records_text(targets))
        for name in ("logit_diff", "attribution", "head_attribution"):
            res = getattr(results, name)
            self._list(name, None if res is None else _records_text(_shifted(res.to_dataframe(), offset)))

    def finish(self, header: dict[str, Any]) -> None:
        """Write the JSON document: ``header``'s keys, then the lists (nothing without a JSON path)."""
        self._finished = True
        if self._json_tmp is None:
            return
        with open(self._json_tmp, "w", encoding="utf-8") as out:
            out.write("{\n")
            for key, value in header.items():
                out.write(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},\n")
            for i, (name, fh) in enumerate(self._lists.items()):
                out.write(f"{json.dumps(name)}: ")
                if self._has[name]:
                    out.write("[")
                    fh.seek(0)
                    shutil.copyfileobj(fh, out, 1 << 20)
                    out.write("\n]")
                else:
                    out.write("null")
                out.write(",\n" if i < len(self._lists) - 1 else "\n")
            out.write("}\n")


def report_header(data: AnyReportData, padding_fraction: float) -> dict[str, Any]:
    """The JSON document's keys besides its lists: the settings, and the padding fraction of the whole run
    (``data`` may hold only its first prompts)."""
    header: dict[str, Any] = {
        "model": data.model_name,
        "lens_name": data.lens_name,
        "sites": list(data.sites),
        "top_k": data.top_k,
        "target": data.target,
    }
    if isinstance(data, ReportData):
        header.update(
            {
                "norm": data.norm,
                "versus": data.versus,
                "padding_fraction": padding_fraction,
            }
        )
    return header


@dataclass(frozen=True)
class StreamedReport:
    """What :func:`stream_report` returns: ``data``, the report of the first ``len(data.prompts)`` prompts,
    and ``n_prompts``, how many prompts the run read (every one of them in the CSV and JSON)."""

    data: AnyReportData
    n_prompts: int

    @property
    def partial(self) -> bool:
        """Whether the report holds fewer prompts than the run read."""
        return self.n_prompts > len(self.data.prompts)


def _blocks(prompts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(prompts)
    while block := list(itertools.islice(it, size)):
        yield block


def stream_report(
    model: Any,
    prompts: Iterable[str],
    *,
    csv: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    target: str | int | None = None,
    versus: str | int | None = None,
    top_k: int = 5,
    sites: str | Sequence[str] | None = None,
    norm: str = "recompute",
    batch_size: int = 16,
    lens: Any = None,
    progress: Callable[[int], None] | None = None,
) -> StreamedReport:
    """Run a report's analyses over ``prompts`` (any iterable, read lazily) in bounded memory: every
    prompt's rows go to ``csv`` and ``json_path`` as they are computed, and the report data kept is that
    of the first :data:`REPORT_PROMPTS` prompts. ``progress(done)`` is called with the prompts done so far.

    The arguments are :func:`~tl_logitlens.reporting.compute_report`'s (several lenses: compared over the
    report's prompts only). The CSV holds :func:`lens_csv_frame` and the JSON the ``to_dataframe()``
    records of every result ``compute_report(model, all_prompts)`` would hold, every record numbered by its
    prompt's place in ``prompts``; the rows come a few prompts at a time, in the prompts'
    order. A masked LM's prompts run one at a time (the sliding mask: the report's first three).

    Raises:
        ValueError: no prompts; bad analysis arguments (before anything is computed or written).
    """
    model = load_model(model)
    masked = _compat.is_encoder(model)
    check_report_arguments(model, target, versus, sites, norm, lens, batch_size, None)
    tick = (lambda done: None) if progress is None else progress
    done, head, head_results, n_real, n_slots = 0, None, None, 0, 0
    if masked:
        target_text, targets = masked_targets(model, target)
    else:
        settings = causal_settings(model, target, versus, top_k, sites, norm, lens)
    with TableWriter(csv, json_path, masked=masked) as writer:
        for block in _blocks(prompts, REPORT_PROMPTS):
            if masked:
                results = []
                for prompt in block:
                    results.append(masked_prompt(model, prompt, done + len(results), targets, top_k, None))
                    tick(done + len(results))
                writer.add(block, [r[0] for r in results], done)
            else:
                results = causal_block(model, block, settings, batch_size, lambda k, d=done: tick(d + k))
                n_real, n_slots = n_real + results.n_real, n_slots + results.n_slots
                writer.add(block, results, done)
            if head is None:
                head, head_results = block, results
            done += len(block)
        if head is None:
            raise ValueError("no prompts were given; pass at least one prompt")
        if masked:
            data = masked_report_data(model, head, head_results, target_text, top_k)
        else:
            data = report_data(model, head, settings, head_results)
        writer.finish(report_header(data, 0.0 if n_slots == 0 else 1.0 - n_real / n_slots))
    return StreamedReport(data, done)
