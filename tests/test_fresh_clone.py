"""What a new user met on a fresh clone (issue #34): the command's threads on a busy machine, messages
that said something false, and small confusions (``dir(tl)``, ``to_json``'s return, legend lines,
report headings, series colours)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tl_logitlens.cli.commands import _report_note, build_parser, main, passive_wait_policy
from tl_logitlens.cli.terminal import legend_lines

ROOT = Path(__file__).resolve().parents[1]

# what the child reports: the policy main() left in the environment, and whether torch was loaded
# before main() ran (then setting the policy would be too late: OpenMP reads it when torch loads it)
_PROBE = """
import os, sys
sys.argv = ["tl-logitlens", *sys.argv[1:]]
from tl_logitlens.cli import main
before = "torch" in sys.modules
code = main()
print(code, os.environ.get("OMP_WAIT_POLICY"), before)
"""


def _probe(argv: list[str], **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    return done.stdout.split()


# a command that stops at its first check (the report must end in .html), before any model is loaded
_BAD_OUT = ["run", "demo", "The dog was very", "--out", "report.txt"]


def test_the_command_sets_a_passive_wait_policy_before_torch_loads():
    code, policy, torch_was_loaded = _probe(_BAD_OUT)
    assert code == "2" and policy == "PASSIVE" and torch_was_loaded == "False"


def test_a_wait_policy_the_user_set_stands():
    assert _probe(_BAD_OUT, OMP_WAIT_POLICY="ACTIVE")[1] == "ACTIVE"


def test_called_from_python_the_command_leaves_the_policy_alone(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(_BAD_OUT) == 2
    assert "OMP_WAIT_POLICY" not in os.environ
    # and once torch is loaded (here it is) setting it would change nothing: the helper says so
    assert passive_wait_policy() is False and "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize(
    "argv",
    [["demo"], ["run", "demo", "x"], ["eval", "demo", "--texts", "demo"], ["fit", "jacobian", "demo", "--texts", "demo",
     "--out", "j.pt"], ["fit", "tuned", "demo", "--texts", "demo", "--out", "t"]],
    ids=["demo", "run", "eval", "fit-jacobian", "fit-tuned"],
)
def test_every_command_takes_threads(argv):
    assert build_parser().parse_args([*argv, "--threads", "3"]).threads == 3


def test_run_sets_torch_threads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        assert main(["run", "demo", "The dog was very", "--no-report", "--threads", "1", "--top-k", "2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_report_line_says_what_viewing_needs():
    assert "works offline" in _report_note("inline")
    cdn = _report_note("cdn")
    assert "offline" not in cdn.replace("offline its figures are blank", "") and "cdn.plot.ly" in cdn
    assert "plotly.min.js" in _report_note("directory")


def test_legend_lines_break_between_phrases_only():
    legend = ["KL: KL(final ‖ site); CE: next-token cross-entropy; H: entropy (all in nats)", "short"]
    lines = legend_lines(legend, 40)
    assert lines == ["KL: KL(final ‖ site);", "CE: next-token cross-entropy;", "H: entropy (all in nats)", "short"]
    assert legend_lines(legend, 200) == legend
    assert legend_lines(["one phrase wider than the width"], 10) == ["one phrase wider than the width"]


def test_dir_lists_the_public_names_not_the_modules_helpers():
    names = dir(tl)
    assert set(tl.__all__) <= set(names) and "__version__" in names
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib", "_EXPORTS"} & set(names)
    for name in names:  # everything listed is there
        assert getattr(tl, name) is not None


def test_series_colours_are_neither_blue_nor_red():
    """Blue and red mean the sign (plotting/style.py); an unsigned series must not look like one."""
    from tl_logitlens.plotting.style import NEGATIVE_COLOUR, PALETTE, POSITIVE_COLOUR

    def rgb(c: str) -> tuple[int, ...]:
        return tuple(int(c[i : i + 2], 16) for i in (1, 3, 5))

    for colour in PALETTE:
        for sign in (POSITIVE_COLOUR, NEGATIVE_COLOUR, "#1f77b4", "#d62728"):  # the house's and plotly's
            assert sum((a - b) ** 2 for a, b in zip(rgb(colour), rgb(sign))) ** 0.5 > 80, (colour, sign)
    r0, _, b0 = rgb(PALETTE[0])
    r1, _, b1 = rgb(PALETTE[1])
    assert not (b0 > r0 + 60 and r1 > b1 + 60), "the first two series read as a blue/red pair"


def test_evaluation_counts_document_tokens_as_max_tokens_does(tmp_path):
    model = tl.load_model("demo")
    ev = tl.evaluate_lenses(model, tl.demo_texts(), max_tokens=300, seq_len=64, n_bootstrap=0, progress=False)
    assert ev.n_document_tokens == 300  # each document's BOS once: what max_tokens counted
    assert ev.n_tokens == 300 + ev.n_windows - ev.n_documents > 300  # every further window starts with BOS
    path = ev.to_json(tmp_path / "ev.json")
    assert path == tmp_path / "ev.json" and path.read_text().startswith("{")
    assert ev.to_json().startswith("{")


def test_the_report_heads_the_lens_figure_with_the_lens_it_draws():
    from tl_logitlens.reporting import compute_report
    from tl_logitlens.reporting.figures import figures

    model = tl.load_model("demo")
    data = compute_report(model, ["The dog was very"], lens=tl.load_lens("demo", model))
    headings = [f.heading for f in figures(data, [0])]
    assert "Tuned lens, prompt 0" in headings and "Logit lens, prompt 0" not in headings


# ------------------------------------------------------------------------------------------------
# unit="head_source": a source-position table


def _head_source(model):
    prompts = ["The cat sat on the mat and looked at the big red ball", "Tom went to the shop"]
    return tl.direct_logit_attribution(model, prompts, " the", " and", unit="head_source")


def test_head_source_frame_splits_each_head_over_its_sources(ln_model):
    res = _head_source(ln_model)
    frame = res.to_dataframe()
    assert {"source", "source_token"} <= set(frame.columns)
    heads = frame[frame["source"].notna()]
    rest = frame[frame["source"].isna()]
    n_grid = res.grid_size[0] * res.grid_size[1]
    assert set(heads["row"]) == set(range(n_grid)) and (rest["row"] >= n_grid).all()
    assert (heads["source"] <= heads["position"]).all()  # a head reads no later source
    # slow reference: every cell read back from the tensor, one at a time
    for row in heads.sample(50, random_state=0).itertuples():
        layer, head = divmod(int(row.row), res.grid_size[1])
        j = int((res.positions[row.prompt] == row.position).nonzero()[0, 0])
        want = float(res.source_attribution[layer, head, int(row.source), row.prompt, j, row.pair])
        assert row.attribution == pytest.approx(want, abs=1e-7)
        assert row.source_token == res.str_tokens[row.prompt][int(row.source)]
    # one prompt, position and pair: the split rows still add up to the model's own total
    sums = frame.groupby(["prompt", "position", "pair"]).agg(attribution=("attribution", "sum"), total=("total", "first"))
    assert (sums["attribution"] - sums["total"]).abs().max() < 1e-4


def test_head_source_top_ranks_head_by_source_cells(ln_model):
    res = _head_source(ln_model)
    top = res.top(5)
    assert list(top.columns) == ["rank", "label", "layer", "index", "source", "source_token", "attribution", "share"]
    # slow reference: each cell's mean over every real read position, a source after the read counting 0
    n_layers, n_heads = res.grid_size
    cells = {}
    for layer in range(n_layers):
        for head in range(n_heads):
            for s in range(res.source_attribution.shape[2]):
                values = [float(res.source_attribution[layer, head, s, b, j, 0])
                          for b in range(res.valid.shape[0]) for j in range(res.valid.shape[1]) if res.valid[b, j]]
                cells[(layer, head, s)] = sum(values) / len(values)
    ranked = sorted(cells.items(), key=lambda kv: -abs(kv[1]))[:5]
    assert [(r.layer, r.index, r.source) for r in top.itertuples()] == [key for key, _ in ranked]
    assert top["attribution"].tolist() == pytest.approx([v for _, v in ranked], abs=1e-6)
    assert top["label"][0] == f"L{ranked[0][0][0]}H{ranked[0][0][1]}@{ranked[0][0][2]}"
    # a head's cells add up to the head's own mean: the two rankings agree on what they share
    heads = res.top(3, rows="grid")
    for row in heads.itertuples():
        cell_sum = sum(v for (layer, head, _), v in cells.items() if (layer, head) == (row.layer, row.index))
        assert cell_sum == pytest.approx(row.attribution, abs=1e-5)
    with pytest.raises(ValueError, match="rows='source' needs unit='head_source'"):
        tl.direct_logit_attribution(ln_model, "The cat sat", " the", " and", unit="head").top(rows="source")


def test_head_source_figure_width_follows_the_prompt(ln_model):
    res = _head_source(ln_model)
    wide = res.plot(prompt=0)
    assert 600 <= wide.layout.width <= 1400
    short = res.plot(prompt=1)
    assert short.layout.width < wide.layout.width or short.layout.width == 600
    assert res.plot(prompt=0, width=900).layout.width == 900
    long = tl.direct_logit_attribution(ln_model, " ".join(["the cat sat on the mat"] * 8), " the", " and", unit="head_source")
    assert long.plot().layout.width <= 1400  # not 260 + 64 px per source
