"""``tl-logitlens`` end to end, in subprocesses: exit codes, files written, one-line messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import STORIES, require_shared
from tl_logitlens.cli.commands import DEMO_PROMPT, main

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the"


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="160", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "tl_logitlens", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tl-logitlens")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "demo", ""], ["the prompt is empty"]),
        (["run", "demo", "   "], ["the prompt is empty"]),
        (["run", "demo", "--prompts-file", "no_such_file.txt"], ["no prompts file at 'no_such_file.txt'"]),
        (["run", "demo", "hi", "--versus", " and"], ["--versus needs --target"]),
        (["run", "demo", "hi", "--top-k", "0"], ["--top-k", "at least 1"]),
        (["run", "demo", "hi", "--norm", "layer"], ["--norm", "invalid choice"]),
        (["run", "demo"], ["give a PROMPT"]),
        (["run", "demo", "hi", "--out", "report.pdf"], ["should end in .html"]),
        (["run", "demo", "hi", "--csv", "missing_dir/x.csv"], ["does not exist"]),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
        (["--frobnicate"], ["unrecognized option '--frobnicate'"]),
        (["run", "demo", "hi", "--device", "foo"], ["--device 'foo' is not a torch device"]),
        (["eval", "demo"], ["--texts"]),
        (["eval", "demo", "--texts", "missing.json"], ["no corpus at 'missing.json'"]),
        (["eval", "demo", "--texts", "missing.json", "--seq-len", "0"], ["--seq-len", "at least 1"]),
        (["eval", "demo", "--texts", "missing.json", "--bootstrap", "-1"], ["--bootstrap", "0 or more"]),
    ],
)
def test_usage_mistakes_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, args, fragments):
    # in-process (the package's torch import is paid once); the subprocess runs below cover the rest
    monkeypatch.chdir(tmp_path)
    _one_line_error(_in_process(args, capsys), *fragments)


def _in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


# what a newcomer types first: each answers before torch (or TransformerLens, transformers) is imported
_NO_TORCH_ARGV = [
    ["--help"],
    ["--version"],
    ["demo", "--help"],
    ["run", "--help"],
    ["eval", "--help"],
    ["fit", "--help"],
    ["fit", "jacobian", "--help"],
    ["fit", "tuned", "--help"],
    ["frobnicate"],
    ["run", "demo"],
    ["run", "demo", "hi", "--top-k", "0"],
    ["run", "demo", "hi", "--out", "report.pdf"],
    ["run", "demo", "--prompts-file", "no_such_file.txt"],
    ["eval", "demo", "--texts", "stories.json"],
    ["eval", "demo", "--texts", "demo", "--json", "eval.txt"],
    ["fit", "jacobian", "demo", "--texts", "stories.json", "--out", "j.pt"],
    ["fit", "jacobian", "demo", "--texts", "demo", "--out", "no_such_folder/j.pt"],
    ["fit", "tuned", "demo", "--texts", "demo", "--out", "lens", "--lr", "nan"],
    ["fit", "tuned", "demo", "--texts", "demo", "--out", "lens.pt"],
]
_NO_TORCH_HELP = 8  # the first entries ask for help or the version


def test_help_argument_errors_and_missing_files_answer_before_torch_is_imported(tmp_path):
    """``tl-logitlens --help`` took ~1.5 min on a busy machine when torch loaded first: now help, argument
    errors and missing files are answered from the standard library (and argparse) alone."""
    code = (
        "import json, sys\n"
        "from tl_logitlens.cli.commands import main\n"
        "heavy = ('torch', 'transformer_lens', 'transformers', 'plotly', 'pandas')\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        code = main(argv)\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    out.append([argv, code, sorted(m for m in heavy if m in sys.modules)])\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(_NO_TORCH_ARGV)], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout.strip().splitlines()[-1])
    for argv, exit_code, loaded in answers:
        assert exit_code in (0, 2), (argv, exit_code)
        assert loaded == [], f"tl-logitlens {' '.join(argv)} imported {loaded}"
    assert [code for _, code, _ in answers] == [0] * _NO_TORCH_HELP + [2] * (len(_NO_TORCH_ARGV) - _NO_TORCH_HELP)
    assert "no corpus at 'stories.json'" in res.stderr and "'demo' for the shipped stories" in res.stderr


def test_help_says_the_report_size_and_how_to_make_it_small(capsys):
    from tl_logitlens.cli import commands as cli
    from tl_logitlens.reporting import PLOTLY_JS, PLOTLY_JS_FILE

    assert (cli.PLOTLY_JS, cli.PLOTLY_JS_FILE) == (PLOTLY_JS, PLOTLY_JS_FILE)  # --help's copy of them
    res = _in_process(["demo", "--help"], capsys)
    text = " ".join(res.stdout.split())
    assert "about 5 MB" in text and "--plotly-js {inline,cdn,directory}" in text and "cdn (a few hundred kB" in text


def test_plotly_js_cdn_writes_a_small_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = _in_process(["run", "demo", "The dog was very", "--plotly-js", "cdn", "--out", "small.html"], capsys)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "small.html").read_text(encoding="utf-8")
    assert "https://cdn.plot.ly/plotly-" in page and len(page.encode()) < 1_000_000


def test_eval_on_the_shipped_demo_texts(tmp_path, monkeypatch, capsys):
    import tl_logitlens as tl

    monkeypatch.chdir(tmp_path)
    res = _in_process(
        ["eval", "demo", "--texts", "demo", "--max-tokens", "400", "--bootstrap", "0", "--no-progress",
         "--json", "eval.json"],
        capsys,
    )
    assert res.returncode == 0, res.stderr
    payload = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    ev = tl.evaluate_lenses(tl.load_model("demo"), tl.demo_texts(), max_tokens=400, n_bootstrap=0, progress=False)
    assert payload["n_tokens"] == ev.n_tokens and payload["n_documents"] == ev.n_documents


def test_empty_prompts_file_is_a_usage_mistake(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n  \n", encoding="utf-8")
    _one_line_error(_in_process(["run", "demo", "--prompts-file", "prompts.txt"], capsys), "holds no prompts")


@pytest.mark.slow
def test_multi_token_target_is_read_as_its_first_token_with_a_note(tmp_path, monkeypatch, capsys):
    stories = str(require_shared(STORIES))
    monkeypatch.chdir(tmp_path)
    res = _in_process(["run", stories, PROMPT, "--target", " park", "--no-report"], capsys)
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and "' park' is 3 tokens [' p', 'ar', 'k']" in notes[0], res.stderr
    assert "{␣park" in res.stdout, res.stdout


@pytest.mark.slow
def test_multi_token_versus_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    stories = str(require_shared(STORIES))
    monkeypatch.chdir(tmp_path)
    res = _in_process(["run", stories, PROMPT, "--target", " the", "--versus", " park", "--no-report"], capsys)
    _one_line_error(res, "' park' is not a single token", "[' p', 'ar', 'k']")


def test_unknown_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = _in_process(["run", "no-such-model-anywhere", PROMPT], capsys)
    _one_line_error(res, "'no-such-model-anywhere'", "local folder")
    assert not (tmp_path / "logit_lens_report.html").exists()


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    """The subprocess runs, started together (each pays the package's torch import)."""
    stories = str(require_shared(STORIES))
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "prompts.txt").write_text(f"{PROMPT}\n\nThe cat sat on the\n", encoding="utf-8")
    script = Path(sys.executable).parent / "tl-logitlens"
    assert script.is_file(), "pip install -e . should install the tl-logitlens script"
    procs = {
        "help": subprocess.Popen(
            [str(script), "run", "--help"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
        "empty": _start(["run", stories, "  "], cwd),
        "demo": _start(["demo", "--top-k", "3"], cwd),
        "ok": _start(
            ["run", stories, "--prompts-file", "prompts.txt", "--target", " p", "--versus", " s",
             "--top-k", "3", "--out", "out.html", "--csv", "lens.csv", "--json", "lens.json"],
            cwd,
        ),
    }
    return cwd, {name: _finish(p) for name, p in procs.items()}


@pytest.mark.slow
def test_run_writes_table_report_csv_and_json(model_runs):
    cwd, runs = model_runs
    res = runs["ok"]
    assert res.returncode == 0, res.stderr
    # quiet when not on a terminal: no progress bar, not even the blank line it leaves; a plain progress
    # line only if the run took over cli.prompts.PLAIN_MIN_S (a busy machine)
    assert all(" of 2 prompts (" in line for line in res.stderr.splitlines()), res.stderr
    # the table: one row per site, the last prompt token in the title, targets' columns
    for label in ("0_pre", "4_pre", "final_post", "P(␣p)", "P(␣s)", "after '…outside in the'"):
        assert label in res.stdout
    assert res.stdout.startswith(f"prompt 0: {PROMPT}\n\n")  # the prompt whose table is shown
    final_row = next(line for line in res.stdout.splitlines() if line.startswith("final_post"))
    assert final_row.split()[1] == "␣p"  # the stories model's top guess after '... outside in the'
    assert "1 more prompt" in res.stdout
    # --versus: the logit difference per layer and the top attributions
    assert "Logit difference '␣p' − '␣s' per layer after '…outside in the'" in res.stdout
    assert "Top components by direct logit attribution" in res.stdout
    # the heads table lists heads only (MLPs and biases are in the components table)
    table = res.stdout.split("Top heads by direct logit attribution")[1].split("\n\n")[0]
    rows = [line.split() for line in table.splitlines()[2:]]
    labels = [row[1] for row in rows if len(row) == 4 and row[0].isdigit()]  # rank, head, logits, share
    assert len(labels) == 8 and all(label.startswith("L") and "H" in label for label in labels), labels
    page = (cwd / "out.html").read_text(encoding="utf-8")
    # 2 heatmaps, text, evolution, trajectories, logit difference, attributions (and what the report adds)
    assert page.count("Plotly.newPlot") >= 2 + 1 + 1 + 2 + 1 + 2
    frame = pd.read_csv(cwd / "lens.csv")
    assert set(frame["prompt"]) == {0, 1} and set(frame["rank"]) == {1, 2, 3}
    assert {"site", "position", "token", "prob", "entropy", "kl_to_final"} <= set(frame.columns)
    assert {"target", "target_prob", "target_rank", "versus", "versus_prob", "versus_rank"} <= set(frame.columns)
    assert set(frame["target"]) == {" p"} and set(frame["versus"]) == {" s"}
    payload = json.loads((cwd / "lens.json").read_text(encoding="utf-8"))
    assert payload["target"] == " p" and payload["versus"] == " s" and len(payload["prompts"]) == 2
    assert len(payload["lens"]) == len(frame)
    last = [r for r in payload["targets"] if r["prompt"] == 0 and r["site"] == "final_post" and r["target"] == " p"]
    assert last[-1]["rank"] == 1
    assert payload["attribution"] and {"component", "attribution", "total"} <= set(payload["attribution"][0])


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_the_report(model_runs):
    cwd, runs = model_runs
    res = runs["demo"]
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # no "Loading weights" bar, no blank line
    lines = res.stdout.splitlines()
    assert lines[0] == f"prompt: {DEMO_PROMPT}"  # the prompt itself, then the tables
    assert "Top tokens per layer after '…dog was very'" in lines[2]
    rows = [line for line in lines if line.split(" ")[0] in ("0_pre", "1_pre", "2_pre", "3_pre", "final_post")]
    assert len(rows) == 11  # the logit lens, the logit difference, and the three lenses' final_post
    # the three lenses side by side, compactly: at the block outputs, which all three read
    compare = res.stdout.split("3 lenses, top token per layer after '…dog was very'")[1].split("\n\n")[0]
    header = compare.splitlines()[1].split()
    assert header[0] == "layer" and " ".join(header[1:]) == "logit lens tuned lens Jacobian lens", header
    assert [line.split()[0] for line in compare.splitlines()[2:6]] == ["0_post", "1_post", "2_post", "final_post"]
    assert "Logit difference '␣happy' − '␣sad' per layer after '…dog was very'" in res.stdout
    assert "Top heads by direct logit attribution to '␣happy' − '␣sad'" in res.stdout
    page = (cwd / "logit_lens_report.html").read_text(encoding="utf-8")
    assert "<script src" not in page
    # the logit lens (heatmap, text view, ...), the logit difference and the per-head attribution
    for heading in ("Logit lens, prompt 0", "Text view, prompt 0", "Logit difference", "Direct logit attribution by head",
                    "3 lenses on prompt 0"):
        assert f"<h3>{heading}</h3>" in page
    assert "Lenses side by side: logit lens, tuned lens, Jacobian lens" in page
    assert page.count("Plotly.newPlot") >= 8
    assert "wrote report: logit_lens_report.html" in res.stdout


@pytest.mark.slow
def test_entry_point_is_installed_and_helps(model_runs):
    res = model_runs[1]["help"]
    assert res.returncode == 0, res.stderr
    for option in ("--target", "--versus", "--top-k", "--sites", "--norm", "--out", "--csv", "--json", "--prompts-file",
                   "--batch-size", "--device"):
        assert option in res.stdout


@pytest.mark.slow
def test_empty_prompt_in_a_subprocess_is_a_one_line_error(model_runs):
    _one_line_error(model_runs[1]["empty"], "the prompt is empty")


def test_version_help_texts_and_examples(capsys):
    from tl_logitlens import __version__
    from tl_logitlens.cli.commands import build_parser

    res = _in_process(["--version"], capsys)
    assert res.returncode == 0 and res.stdout.strip() == f"tl-logitlens {__version__}"
    res = _in_process(["--help"], capsys)
    assert res.returncode == 0 and "examples (offline" in res.stdout and "torchrun" in res.stdout
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"demo", "run", "eval", "fit", "faithfulness", "lenses"}
    kinds = next(a for a in subparsers["fit"]._actions if a.dest == "kind").choices
    assert set(kinds) == {"jacobian", "tuned"}
    named = {**subparsers, **{f"fit {kind}": sub for kind, sub in kinds.items()}}
    for name, sub in named.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_cuda_device_on_a_cpu_only_torch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for CPU-only machines")
    monkeypatch.chdir(tmp_path)
    _one_line_error(_in_process(["run", "demo", "hi", "--device", "cuda"], capsys), "--device cuda", "use --device cpu")
    _one_line_error(_in_process(["eval", "demo", "--texts", "demo", "--device", "cuda:0"], capsys), "--device cuda:0")


def _lines_fit(text: str, width: int) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, f"lines wider than {width} columns: {too_long}"


@pytest.mark.parametrize("columns", [80, 132])
def test_demo_table_fits_the_terminal(tmp_path, monkeypatch, capsys, columns):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", str(columns))
    res = _in_process(["demo", "--no-report"], capsys)
    assert res.returncode == 0, res.stderr
    _lines_fit(res.stdout, columns)
    assert "␣happy" in res.stdout and "H: entropy" in res.stdout
    if columns == 80:
        assert "of 5 shown to fit 80 columns" in res.stdout
    else:
        assert "top 5" in res.stdout and "shown to fit" not in res.stdout


def test_eval_prints_a_table_that_fits_and_writes_what_evaluate_lenses_gives(tmp_path, monkeypatch, capsys):
    import tl_logitlens as tl
    from tests.helpers import SENTENCES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    (tmp_path / "corpus.json").write_text(json.dumps(SENTENCES * 2), encoding="utf-8")
    res = _in_process(
        ["eval", "demo", "--texts", "corpus.json", "--seq-len", "8", "--bootstrap", "50", "--json", "ev.json",
         "--csv", "ev.csv", "--no-progress"],
        capsys,
    )
    assert res.returncode == 0, res.stderr
    _lines_fit(res.stdout, 80)
    assert "logit lens: 10 documents" in res.stdout and "final_post" in res.stdout
    payload = json.loads((tmp_path / "ev.json").read_text(encoding="utf-8"))
    ev = tl.evaluate_lenses(tl.load_model("demo"), SENTENCES * 2, seq_len=8, n_bootstrap=50, progress=False)
    assert payload == json.loads(ev.to_json())
    frame = pd.read_csv(tmp_path / "ev.csv")
    assert {"site", "lens", "kl_to_final", "kl_to_final_low", "kl_to_final_high", "n_tokens"} <= set(frame.columns)


@pytest.mark.slow
def test_target_as_a_token_id(tmp_path, monkeypatch, capsys):
    stories = str(require_shared(STORIES))
    monkeypatch.chdir(tmp_path)
    res = _in_process(["run", stories, PROMPT, "--target", "298", "--no-report", "--json", "t.json"], capsys)
    assert res.returncode == 0, res.stderr
    targets = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["targets"]
    assert {r["target_id"] for r in targets} == {298}


@pytest.mark.slow
def test_torchrun_two_processes_write_the_json_one_process_writes(tmp_path):
    from tests.helpers import SENTENCES, torchrun_command

    (tmp_path / "corpus.txt").write_text("\n\n".join(SENTENCES * 3), encoding="utf-8")
    common = ["eval", "demo", "--texts", "corpus.txt", "--seq-len", "6", "--bootstrap", "100", "--no-progress"]
    env = dict(os.environ, COLUMNS="100", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    two = subprocess.Popen(
        [*torchrun_command(2), "-m", "tl_logitlens", *common, "--json", "two.json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    one = subprocess.Popen(
        [sys.executable, "-m", "tl_logitlens", *common, "--json", "one.json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    res_two, res_one = _finish(two, timeout=400), _finish(one, timeout=400)
    assert res_one.returncode == 0, res_one.stderr
    assert res_two.returncode == 0, res_two.stderr
    assert res_two.stdout.count("logit lens: 15 documents") == 1  # rank 0 alone prints
    a = json.loads((tmp_path / "one.json").read_text(encoding="utf-8"))
    b = json.loads((tmp_path / "two.json").read_text(encoding="utf-8"))
    assert b.pop("world_size") == 2 and a.pop("world_size") == 1
    for key in ("padding_fraction", "n_computed", "n_padded"):  # how each run batched, not the statistics
        a.pop(key), b.pop(key)
    rows_a, rows_b = a.pop("results"), b.pop("results")
    assert a == b
    for ra, rb in zip(rows_a, rows_b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-6, abs=2e-6), key
            else:
                assert rb[key] == value


@pytest.mark.parametrize(
    "command",
    [[], ["demo"], ["run"], ["eval"], ["fit"], ["fit", "jacobian"], ["fit", "tuned"]],
    ids=["main", "demo", "run", "eval", "fit", "fit-jacobian", "fit-tuned"],
)
def test_help_fits_80_columns(monkeypatch, capsys, command):
    from tl_logitlens.cli.commands import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    _lines_fit(out, 80)
    assert "%%" not in out and "usage: tl-logitlens" in out
