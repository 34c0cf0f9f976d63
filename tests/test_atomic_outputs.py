"""The report, ``--json`` and ``--csv`` are written atomically (#23, finding 4): a write killed or
interrupted at any moment leaves the old file whole, and ``--help`` says an existing file is replaced."""

from __future__ import annotations

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

    from tl_logitlens.cli import commands as cli
    csv, js = tmp_path / "t.csv", tmp_path / "t.json"
    csv.write_text("old csv\n")
    js.write_text('{"old": true}\n')
    real_to_csv = pd.DataFrame.to_csv

    def half_then_interrupt(self, path, **kwargs):
        real_to_csv(self.head(1), path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cli._write_tables(report_data, str(csv), str(js))
    assert csv.read_text() == "old csv\n"
    monkeypatch.undo()
    from tl_logitlens.core import files as _files
    def interrupted_write(path, text):
        def write(tmp):
            tmp.write_text(text[:10])  # part of the new file, then Ctrl-C
            raise KeyboardInterrupt

        return _files.atomic_write(path, write)

    monkeypatch.setattr(_files, "atomic_write_text", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        cli._write_tables(report_data, None, str(js))
    assert js.read_text() == '{"old": true}\n'
    monkeypatch.undo()
    cli._write_tables(report_data, str(csv), str(js))
    assert csv.read_text().startswith("site,") and js.read_text().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.json"]  # no temporary left behind


@pytest.mark.parametrize("option", ["--out", "--csv", "--json"])
def test_help_says_an_existing_output_is_replaced(capsys, option):
    from tl_logitlens.cli.commands import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text[text.rindex(option + " "):]  # its entry, after the usage line
    assert "an existing file is replaced" in after[:400]
