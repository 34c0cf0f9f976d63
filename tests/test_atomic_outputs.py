"""The report, ``--json`` and ``--csv`` are written atomically (#23, finding 4): a write killed or
interrupted at any moment leaves the old file whole, and ``--help`` says an existing file is replaced."""

from __future__ import annotations

import json
import os
import stat

import pytest

import tl_logitlens as tl
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def report_data():
    from tl_logitlens.reporting import compute_report

    return compute_report(tiny_model("LN", folded=False), "Hello world and the cat", target=7, versus=3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child mid-write")
def test_a_report_write_killed_before_the_rename_leaves_the_old_page(tmp_path, report_data):
    from tl_logitlens.reporting import write_report

    out = tmp_path / "r.html"
    write_report(report_data, out, title="old page", plotly_js="cdn")
    old = out.read_bytes()
    pid = os.fork()
    if pid == 0:
        try:
            os.replace = lambda *a: os._exit(9)  # the new page is written and flushed, not yet in place
            write_report(report_data, out, title="new page", plotly_js="cdn")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert out.read_bytes() == old
    write_report(report_data, out, title="new page", plotly_js="cdn")
    assert b"new page" in out.read_bytes()


def test_written_files_get_the_usual_mode_not_a_private_one(tmp_path, report_data):
    from tl_logitlens.reporting import write_report

    out = write_report(report_data, tmp_path / "r.html", plotly_js="cdn")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    os.chmod(out, 0o640)
    write_report(report_data, out, plotly_js="cdn")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # a replaced file keeps its mode
    lens = tl.TunedLens.for_model(tiny_model("LN", folded=False))
    folder = lens.save(tmp_path / "lens")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_cli_json_and_csv_interrupted_mid_write_leave_the_old_files(tmp_path, monkeypatch, report_data):
    import pandas as pd

    from tl_logitlens.reporting.compute import PromptResults
    from tl_logitlens.reporting.stream import TableWriter, report_header

    csv, js = tmp_path / "t.csv", tmp_path / "t.json"
    csv.write_text("old csv\n")
    js.write_text('{"old": true}\n')
    d = report_data
    results = PromptResults(d.lens, d.logit_diff, d.attribution, d.head_attribution, 0, 0)

    def write(csv_path, json_path, stop=None):
        with TableWriter(csv_path, json_path, masked=False) as writer:
            writer.add(d.prompts, results)
            if stop is not None:  # the rows are written, the document not finished: then Ctrl-C
                raise stop
            writer.finish(report_header(d, d.padding_fraction))

    real_to_csv = pd.DataFrame.to_csv

    def half_then_interrupt(self, path, **kwargs):
        real_to_csv(self.head(1), path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write(str(csv), str(js))
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        write(str(csv), str(js), KeyboardInterrupt())
    with pytest.raises(RuntimeError, match="without finish"):
        with TableWriter(None, str(js), masked=False):
            pass
    assert csv.read_text() == "old csv\n" and js.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.json"]  # no temporary left behind
    write(str(csv), str(js))
    assert csv.read_text().startswith("site,") and json.loads(js.read_text())["target"] == d.target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.json"]


@pytest.mark.parametrize("option", ["--out", "--csv", "--json"])
def test_help_says_an_existing_output_is_replaced(capsys, option):
    from tl_logitlens.cli.commands import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text[text.rindex(option + " "):]  # its entry, after the usage line
    assert "an existing file is replaced" in after[:400]
