"""``run --prompts-file`` streamed: every prompt's rows in --csv/--json equal the in-memory results, the
report covers the first block, memory stays flat in the file's length, progress shows without a terminal,
and an interruption leaves no file behind.

The block (``stream.REPORT_PROMPTS``) is made small here so that a few dozen prompts span several blocks.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tl_logitlens as tl
import tl_logitlens.cli.prompts as cli_prompts
import tl_logitlens.reporting.compute as compute
import tl_logitlens.reporting.stream as stream
from tests.helpers import assert_close, requires_hooked_encoder
from tl_logitlens.cli.commands import REPORT_PROMPTS, main
from tl_logitlens.cli.prompts import PromptsFile
from tl_logitlens.reporting import compute_masked_report, compute_report

WORDS = "the dog cat ran to park and was very happy sad big small Tom mom saw a ball red".split()
# prompts of 1 to 14 words, in no order of length, and blank lines between some
PROMPTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 5) % 14)) for i in range(23)]
FILE_TEXT = "".join(p + ("\n\n" if i % 6 == 5 else "\n") for i, p in enumerate(PROMPTS))
BLOCK = 8  # prompts per block in these tests: 23 prompts are three blocks, the report holds the first 8
ATOL = 2e-4  # batches of other sizes and paddings run other kernels: values agree to float32 rounding


@pytest.fixture(scope="module")
def demo():
    return tl.load_model("demo")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(stream, "REPORT_PROMPTS", BLOCK)


def _in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _records(frame: pd.DataFrame) -> list[dict]:
    """A frame's rows as the JSON holds them (pandas' own JSON writer)."""
    return json.loads(frame.to_json(orient="records"))


def _same_rows(actual: pd.DataFrame, expected: pd.DataFrame, what: str) -> None:
    """The same rows, in any order: the columns not floats equal, the floats within ATOL."""
    assert list(actual.columns) == list(expected.columns), what
    assert len(actual) == len(expected), what
    floats = [c for c in expected.columns if pd.api.types.is_float_dtype(expected[c])]
    keys = [c for c in expected.columns if c not in floats]
    actual = actual.sort_values(keys, kind="stable").reset_index(drop=True)
    expected = expected.sort_values(keys, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(actual[keys], expected[keys], check_dtype=False, obj=what)
    for c in floats:
        # NaN on both sides only where the table has no number (next_logprob at the last position)
        assert_close(actual[c].to_numpy(np.float64, copy=True), expected[c].to_numpy(np.float64, copy=True), atol=ATOL,
                     rtol=1e-4, msg=f"{what}.{c}", equal_nan=True)


def _same_records(actual: list[dict], expected: pd.DataFrame, what: str) -> None:
    _same_rows(pd.DataFrame(actual), pd.DataFrame(_records(expected)), what)


@pytest.mark.parametrize(
    "tokens",
    [pytest.param([], id="lens-only"), pytest.param(["--target", " happy"], id="target"),
     pytest.param(["--target", " happy", "--versus", " sad"], id="target-versus")],
)
def test_streamed_csv_and_json_equal_compute_report(demo, small_blocks, tokens, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text(FILE_TEXT, encoding="utf-8")
    res = _in_process(
        ["run", "demo", "--prompts-file", "prompts.txt", *tokens, "--batch-size", "3", "--out", "r.html",
         "--csv", "lens.csv", "--json", "lens.json"],
        capsys,
    )
    assert res.returncode == 0, res.stderr
    target = tokens[1] if tokens else None
    versus = tokens[3] if len(tokens) > 2 else None
    ref = compute_report(demo, PROMPTS, target=target, versus=versus, batch_size=3)
    doc = json.loads(Path("lens.json").read_text(encoding="utf-8"))
    assert doc["prompts"] == PROMPTS  # every prompt, in the file's order
    for key in ("model", "lens_name", "top_k", "target", "norm", "versus"):
        assert doc[key] == getattr(ref, key if key != "model" else "model_name"), key
    assert doc["sites"] == list(ref.sites) and 0 <= doc["padding_fraction"] < 0.5
    _same_records(doc["lens"], ref.lens.to_dataframe(), "lens")
    if target is None:
        assert doc["targets"] is None
    else:
        _same_records(doc["targets"], ref.lens.target_dataframe(), "targets")
    for name in ("logit_diff", "attribution", "head_attribution"):
        if versus is None:
            assert doc[name] is None, name
        else:
            _same_records(doc[name], getattr(ref, name).to_dataframe(), name)
    # the CSV: the lens table with the targets' columns, every prompt's rows, as pandas writes them
    expected = pd.read_csv(io.StringIO(stream.lens_csv_frame(ref.lens).to_csv(index=False)))
    csv = pd.read_csv("lens.csv")
    _same_rows(csv, expected, "csv")
    assert sorted(set(csv["prompt"])) == list(range(len(PROMPTS)))
    # the report and the terminal say the report holds the first block only
    html = Path("r.html").read_text(encoding="utf-8")
    assert f"the first {BLOCK} of {len(PROMPTS)} prompts" in html
    assert f"This report covers the first {BLOCK} of the run's {len(PROMPTS)} prompts" in html
    assert f"the report covers the first {BLOCK} of the {len(PROMPTS)}; every prompt is in --csv/--json" in " ".join(res.stdout.split())  # wrapped at a narrow console
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.csv", "lens.json", "prompts.txt", "r.html"]


def test_a_file_within_one_block_gets_the_in_memory_report(demo, tmp_path):
    """At most REPORT_PROMPTS prompts are one block, run as compute_report runs them: the same batches,
    so the same numbers (bit for bit: the same kernels on the same data in one process)."""
    prompts = PROMPTS[:10]
    run = stream.stream_report(demo, iter(prompts), target=" happy", versus=" sad", batch_size=3)
    ref = compute_report(demo, prompts, target=" happy", versus=" sad", batch_size=3)
    assert run.n_prompts == len(prompts) and not run.partial
    data = run.data
    assert data.prompts == ref.prompts and data.padding_fraction == ref.padding_fraction
    for name in ("top_ids", "top_logprobs", "entropy", "kl_to_final", "target_logprobs", "valid", "positions"):
        torch.testing.assert_close(getattr(data.lens, name), getattr(ref.lens, name), atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(data.logit_diff.values, ref.logit_diff.values, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(data.logit_diff.low, ref.logit_diff.low, atol=0, rtol=0)
    torch.testing.assert_close(data.head_attribution.attribution, ref.head_attribution.attribution, atol=0, rtol=0)
    assert torch.equal(data.evolution.top_ids, ref.evolution.top_ids)
    assert REPORT_PROMPTS == stream.REPORT_PROMPTS  # --help's copy of the block size


def test_batched_logit_diff_and_attribution_equal_one_call(demo):
    """compute_report now runs logit_diff and the attributions per batch: joined, they are one call's
    numbers (values to float rounding; the bootstrap drawn again over every prompt)."""
    prompts = PROMPTS[:7]
    one = tl.logit_diff(demo, prompts, " happy", " sad")
    parts = [tl.logit_diff(demo, prompts[i : i + 3], " happy", " sad") for i in range(0, 7, 3)]
    joined = type(one).concat(parts)
    torch.testing.assert_close(joined.values[:, :, :1], one.values, atol=1e-5, rtol=1e-5, equal_nan=True)
    for name in ("mean", "low", "high"):
        torch.testing.assert_close(getattr(joined, name), getattr(one, name), atol=1e-5, rtol=1e-5)
    back = joined.select_prompts([2, 0])
    torch.testing.assert_close(back.values[:, 1], joined.values[:, 0], atol=0, rtol=0, equal_nan=True)
    heads = tl.direct_logit_attribution(demo, prompts, " happy", " sad", unit="head")
    hparts = [tl.direct_logit_attribution(demo, prompts[i : i + 3], " happy", " sad", unit="head") for i in range(0, 7, 3)]
    hjoined = type(heads).concat(hparts)
    torch.testing.assert_close(hjoined.attribution, heads.attribution, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hjoined.total, heads.total, atol=1e-5, rtol=1e-5)
    assert hjoined.str_tokens == heads.str_tokens and torch.equal(hjoined.tokens, heads.tokens)
    with pytest.raises(ValueError, match="same unit"):
        type(heads).concat([hparts[0], tl.direct_logit_attribution(demo, prompts[:2], " happy", " sad")])


@requires_hooked_encoder
def test_a_masked_lm_streams_one_prompt_at_a_time(small_blocks, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompts = [f"The {w} was very happy." for w in WORDS[:11]]
    Path("prompts.txt").write_text("\n".join(prompts), encoding="utf-8")
    res = _in_process(
        ["run", "demo-bert", "--prompts-file", "prompts.txt", "--no-report", "--csv", "m.csv", "--json", "m.json"],
        capsys,
    )
    assert res.returncode == 0, res.stderr
    ref = compute_masked_report("demo-bert", prompts)
    doc = json.loads(Path("m.json").read_text(encoding="utf-8"))
    assert doc["prompts"] == prompts and len(doc["masked"]) == len(prompts)
    csv = pd.read_csv("m.csv")
    for b, m in enumerate(ref.masked):
        frame = m.to_dataframe().assign(prompt=b)  # each prompt numbered by its place in the file
        _same_records(doc["masked"][b], frame, f"masked[{b}]")
        expected = pd.read_csv(io.StringIO(frame.to_csv(index=False)))
        _same_rows(csv[csv["prompt"] == b].reset_index(drop=True), expected, f"csv prompt {b}")


def test_progress_lines_without_a_terminal(demo, small_blocks, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_prompts, "PLAIN_MIN_S", 0.0)
    Path("prompts.txt").write_text(FILE_TEXT, encoding="utf-8")
    res = _in_process(["run", "demo", "--prompts-file", "prompts.txt", "--no-report", "--batch-size", "4"], capsys)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert lines and all(line.startswith("tl-logitlens: logit lens: ") for line in lines), res.stderr
    assert lines[-1].startswith(f"tl-logitlens: logit lens: {len(PROMPTS)} of {len(PROMPTS)} prompts (100%)")
    assert len(lines) >= 5  # a line for each tenth passed (batches of 4: 17%, 35%, ...)
    assert "more prompt(s): 23 in all; give --csv/--json to keep every prompt" in " ".join(res.stdout.split())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interruption_leaves_no_table_and_no_temporary(demo, small_blocks, interrupt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text(FILE_TEXT, encoding="utf-8")
    Path("old.csv").write_text("old\n", encoding="utf-8")
    calls = []
    real = compute.causal_batch

    def fail_later(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in the second block, after the first block's rows were written
            raise interrupt("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "causal_batch", fail_later)
    args = ["run", "demo", "--prompts-file", "prompts.txt", "--batch-size", "3", "--csv", "old.csv", "--json", "new.json"]
    if interrupt is KeyboardInterrupt:
        res = _in_process(args, capsys)
        assert res.returncode == 130 and "interrupted" in res.stderr
    else:
        with pytest.raises(RuntimeError, match="stop"):
            main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv", "prompts.txt"]
    assert Path("old.csv").read_text(encoding="utf-8") == "old\n"


def test_the_prompts_file_is_counted_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_prompts, "COUNT_CHUNK", 3)  # lines cut across chunks everywhere
    path = tmp_path / "p.txt"
    path.write_bytes(b"a b\r\n\n   \n  xy  \nlong line here\n\t\nlast")
    pf = PromptsFile.open(str(path))
    assert list(pf.prompts()) == ["a b", "  xy  ", "long line here", "last"] and pf.n_prompts == 4
    path.write_bytes(b"ok\n" + "é".encode()[:1] + b"\n")
    with pytest.raises(Exception, match="is not UTF-8 text"):
        PromptsFile.open(str(path))


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys
    import tl_logitlens.cli.commands as commands
    import tl_logitlens.reporting.stream as stream

    stream.REPORT_PROMPTS = 64
    load, models = commands._load, {}

    def load_once(name, device, err):  # one model for both runs: loading a second is not the stream's memory
        if name not in models:
            models[name] = load(name, device, err)
        return models[name]

    commands._load = load_once
    main = commands.main
    args = ["run", "demo", "--prompts-file", None, "--no-report", "--top-k", "200", "--batch-size", "32"]
    peaks = []
    for path in sys.argv[1:]:
        args[3] = path
        assert main(args) == 0
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print("PEAKS", *peaks)
    """
)


@pytest.mark.slow
def test_memory_stays_flat_in_the_files_length(demo, tmp_path):
    """Peak RSS after a file of 20 blocks exceeds the peak after one of 5 blocks (which warms the allocator
    up) by far less than the results of the 1,280 prompts would take if they were held (top-200 tokens at
    every site and position: some 250 MB)."""
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("".join(f"{PROMPTS[i % 23]}\n" for i in range(320)), encoding="utf-8")
    big.write_text("".join(f"{PROMPTS[i % 23]}\n" for i in range(1280)), encoding="utf-8")
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(small), str(big)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    base, peak = (int(x) * 1024 for x in res.stdout.split("PEAKS")[1].split())  # ru_maxrss: KiB on Linux
    one = tl.logit_lens(demo, PROMPTS, top_k=200)
    per_prompt = sum(t.numel() * t.element_size() for t in (one.top_ids, one.top_logprobs)) / len(PROMPTS)
    every_prompt = per_prompt * 1280
    assert every_prompt > 200e6  # what holding every prompt would cost: the bound below means something
    assert peak - base < every_prompt / 4, (peak - base, every_prompt)
