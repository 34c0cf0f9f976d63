"""``tl-logitlens fit jacobian|tuned``: the lens written is the library call's with the same options, bit
for bit; both output formats load back; every usage mistake is one line with exit code 2; an
interrupted fit resumes from --checkpoint-dir to the same bits; under torchrun two processes write
one process's lens (J to 1e-6 relative with the same prompt count, the tuned lens to 1e-6)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, torchrun_command
from tests.test_cli import _in_process, _lines_fit, _one_line_error
from tl_logitlens.cli import fit as fit_commands
from tl_logitlens.core.files import Checkpoint

# one text too short for skip_first=2 (BOS + 1 token), so the skipped count is exercised; batches of one
# prompt make blocks of 4 texts, so a checkpoint falls inside the fit
TEXTS = [*SENTENCES, "Hi"]
J_ARGS = ["--seq-len", "8", "--skip-first", "2", "--layers", "0", "2", "--batch-size", "1"]
J_KWARGS = {"seq_len": 8, "skip_first": 2, "layers": [0, 2], "batch_size": 1}
T_ARGS = ["--steps", "3", "--tokens-per-step", "96", "--seq-len", "16", "--batch-size", "1", "--lr", "0.5"]
T_KWARGS = {"steps": 3, "tokens_per_step": 96, "seq_len": 16, "batch_size": 1, "lr": 0.5}


@pytest.fixture(scope="module")
def model():
    return tl.load_model("demo")


@pytest.fixture(scope="module")
def raw_model():
    """The demo model as the CLI loads it to write another tool's format: the stream uncentred."""
    return tl.load_model("demo", center_writing_weights=False)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    (tmp_path / "corpus.json").write_text(json.dumps(TEXTS), encoding="utf-8")
    return tmp_path / "corpus.json"


@pytest.fixture(scope="module")
def jlens(model):
    return tl.fit_jacobian_lens(model, TEXTS, progress=False, **J_KWARGS)


@pytest.fixture(scope="module")
def tuned(model):
    return tl.train_tuned_lens(model, TEXTS, progress=False, **T_KWARGS)


def _same_jacobian_lens(got, want) -> None:
    assert type(got).__name__ == "JacobianLens"
    assert (got.n_prompts, got.source_layers) == (want.n_prompts, want.source_layers)
    for layer in want.source_layers:
        assert torch.equal(got.jacobians[layer].cpu(), want.jacobians[layer]), layer


def _same_tuned_lens(got, want) -> None:
    assert type(got).__name__ == "TunedLens"
    assert torch.equal(got.weight.detach().cpu(), want.weight.detach().cpu())
    assert torch.equal(got.bias.detach().cpu(), want.bias.detach().cpu())


# --- end to end -----------------------------------------------------------------------------------


def test_fit_jacobian_writes_the_library_lens_in_a_folder(corpus, capsys, model, jlens):
    res = _in_process(["fit", "jacobian", "demo", "--texts", "corpus.json", "--out", "lens", *J_ARGS], capsys)
    assert res.returncode == 0, res.stderr
    _lines_fit(res.stdout, 80)
    assert "Jacobian lens of demo: source layers 0, 2 of 4 blocks" in res.stdout
    assert "5 prompts averaged of 6 texts read; 1 too short (3 tokens or fewer)" in res.stdout
    assert "wrote lens (a folder)" in res.stdout and "tl.load_lens('lens', model)" in res.stdout
    assert "tl-logitlens run demo PROMPT --lens lens --sites 0_post 2_post final_post" in res.stdout
    assert (corpus.parent / "lens" / "jacobian_lens.safetensors").is_file()
    _same_jacobian_lens(tl.load_lens("lens", model), jlens)


def test_fit_jacobian_writes_the_reference_pt_of_the_uncentred_stream(corpus, capsys, raw_model):
    """The .pt is read by other tools as the raw stream: the CLI fits on the model loaded uncentred."""
    res = _in_process(["fit", "jacobian", "demo", "--texts", "corpus.json", "--out", "lens.pt", *J_ARGS], capsys)
    assert res.returncode == 0, res.stderr
    _lines_fit(res.stdout, 80)
    assert "wrote lens.pt (the J-lens reference format)" in res.stdout
    assert "tl.load_lens('lens.pt', tl.load_model('demo', center_writing_weights=False))" in res.stdout
    payload = torch.load(corpus.parent / "lens.pt", weights_only=True)  # one torch.save dict, read as data
    assert {"J", "n_prompts", "source_layers", "d_model"} <= set(payload) and payload["n_prompts"] == 5
    want = tl.fit_jacobian_lens(raw_model, TEXTS, progress=False, **J_KWARGS)
    _same_jacobian_lens(tl.load_lens("lens.pt", raw_model), want)


def test_fit_tuned_writes_the_library_lens(corpus, capsys, model, tuned):
    res = _in_process(["fit", "tuned", "demo", "--texts", "corpus.json", "--out", "lens", *T_ARGS], capsys)
    assert res.returncode == 0, res.stderr
    _lines_fit(res.stdout, 80)
    assert "tuned lens of demo: 3 steps of 96 tokens" in res.stdout and "nats/token" in res.stdout
    assert sorted(p.name for p in (corpus.parent / "lens").iterdir()) == ["tuned_lens.json", "tuned_lens.safetensors"]
    _same_tuned_lens(tl.load_lens("lens", model), tuned)


def test_fit_tuned_max_tokens_is_the_library_call_s_and_reads_a_huge_line_bounded(corpus, capsys, model):
    """--max-tokens is train_tuned_lens's max_tokens (the same lens, bit for bit); a one-line text over
    MAX_TOKENIZED_CHARS is refused without it (one line naming the document and --max-tokens, exit 2, no
    lens written), and read with it; eval refuses it alike."""
    from tl_logitlens.core.corpus import MAX_TOKENIZED_CHARS

    res = _in_process([*_T, "--out", "lens", *T_ARGS, "--max-tokens", "60"], capsys)
    assert res.returncode == 0, res.stderr
    want = tl.train_tuned_lens(model, TEXTS, progress=False, max_tokens=60, **T_KWARGS)
    _same_tuned_lens(tl.load_lens("lens", model), want)
    assert want.meta["training"]["windows"] == 3  # 60 tokens, 5 texts' BOS of which 4 are separators: 3 x 15
    assert want.meta["training"]["max_tokens"] == 60
    word = "the little dog ran to the park and saw a big red ball "
    (corpus.parent / "huge.txt").write_text(word * (MAX_TOKENIZED_CHARS // len(word) + 1), encoding="utf-8")
    huge = ["--texts", "huge.txt"]
    for args in (["fit", "tuned", "demo", *huge, "--out", "big", *T_ARGS], ["eval", "demo", *huge]):
        _one_line_error(_in_process(args, capsys), "document 0 is 10,000,044 characters long", "--max-tokens")
    assert not (corpus.parent / "big").exists()
    res = _in_process(["fit", "tuned", "demo", *huge, "--out", "big", *T_ARGS, "--max-tokens", "2000"], capsys)
    assert res.returncode == 0, res.stderr
    assert tl.load_lens("big", model).meta["training"]["windows"] == 1999 // 15


def test_fit_tuned_in_tuned_lens_format_loads_back(corpus, capsys, raw_model):
    """tuned-lens reads the raw stream: the CLI trains on the model loaded uncentred, and says so."""
    args = ["fit", "tuned", "demo", "--texts", "corpus.json", "--out", "lens", "--format", "tuned-lens", *T_ARGS]
    res = _in_process(args, capsys)
    assert res.returncode == 0, res.stderr
    _lines_fit(res.stdout, 80)
    assert "wrote lens (tuned-lens 0.2.0's format)" in res.stdout and "center_writing_weights=False" in res.stdout
    assert sorted(p.name for p in (corpus.parent / "lens").iterdir()) == ["config.json", "params.pt"]
    want = tl.train_tuned_lens(raw_model, TEXTS, progress=False, **T_KWARGS)
    _same_tuned_lens(tl.load_lens("lens", raw_model), want)


def test_texts_demo_is_the_shipped_stories_and_an_existing_lens_is_replaced(corpus, capsys, raw_model):
    args = ["fit", "jacobian", "demo", "--texts", "demo", "--out", "lens.pt", "--max-prompts", "3", *J_ARGS]
    (corpus.parent / "lens.pt").write_bytes(b"an older file")  # replaced, as --help says
    res = _in_process(args, capsys)
    assert res.returncode == 0, res.stderr
    want = tl.fit_jacobian_lens(raw_model, tl.demo_texts(), max_prompts=3, progress=False, **J_KWARGS)
    _same_jacobian_lens(tl.load_lens("lens.pt", raw_model), want)
    assert "3 prompts averaged of 3 texts read" in res.stdout and "reference format" in res.stdout


# --- usage mistakes -------------------------------------------------------------------------------

_J = ["fit", "jacobian", "demo", "--texts", "corpus.json"]
_T = ["fit", "tuned", "demo", "--texts", "corpus.json"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["fit"], ["required: KIND"]),
        (["fit", "lens"], ["invalid choice: 'lens'"]),
        (["fit", "jacobian", "demo", "--texts", "corpus.json"], ["required: --out"]),
        (["fit", "tuned", "demo", "--out", "lens"], ["required: --texts"]),
        (["fit", "jacobian", "demo", "--texts", "missing.json", "--out", "j.pt"], ["no corpus at 'missing.json'"]),
        ([*_J, "--out", "j.pt", "--seq-len", "0"], ["--seq-len", "at least 1"]),
        ([*_J, "--out", "j.pt", "--seq-len", "ten"], ["--seq-len", "'ten' is not a whole number"]),
        ([*_J, "--out", "j.pt", "--skip-first", "-1"], ["--skip-first", "0 or more"]),
        ([*_J, "--out", "j.pt", "--layers", "x"], ["--layers", "'x' is not a whole number"]),
        ([*_J, "--out", "j.pt", "--max-prompts", "0"], ["--max-prompts", "at least 1"]),
        ([*_J, "--out", "j.pt", "--checkpoint-every", "0"], ["--checkpoint-every", "at least 1"]),
        ([*_J, "--out", "j.pt", "--threads", "0"], ["--threads", "at least 1"]),
        ([*_T, "--out", "lens", "--lr", "0"], ["--lr", "0 must be above 0"]),
        ([*_T, "--out", "lens", "--lr", "inf"], ["--lr", "'inf' is not a finite number"]),
        ([*_T, "--out", "lens", "--lr", "fast"], ["--lr", "'fast' is not a number"]),
        ([*_T, "--out", "lens", "--momentum", "1"], ["--momentum", "1 must be below 1"]),
        ([*_T, "--out", "lens", "--momentum", "-0.1"], ["--momentum", "must be at least 0"]),
        ([*_T, "--out", "lens", "--weight-decay", "-1"], ["--weight-decay", "must be at least 0"]),
        ([*_T, "--out", "lens", "--grad-clip", "0"], ["--grad-clip", "must be above 0"]),
        ([*_T, "--out", "lens", "--steps", "0"], ["--steps", "at least 1"]),
        ([*_T, "--out", "lens", "--warmup-steps", "-1"], ["--warmup-steps", "0 or more"]),
        ([*_T, "--out", "lens", "--max-tokens", "0"], ["--max-tokens", "at least 1"]),
        ([*_T, "--out", "lens", "--max-tokens", "1e6"], ["--max-tokens", "'1e6' is not a whole number"]),
        ([*_T, "--out", "lens", "--format", "npz"], ["--format", "invalid choice"]),
        ([*_T, "--out", "lens.pt"], ["a tuned lens is saved as a folder", "not a .pt file"]),
        ([*_J, "--out", "corpus.json"], ["--out 'corpus.json' is a file", "give a folder path"]),
        ([*_T, "--out", "corpus.json"], ["--out 'corpus.json' is a file"]),
        ([*_J, "--out", "missing/j.pt"], ["the folder for --out 'missing/j.pt' does not exist"]),
        ([*_J, "--out", "missing/lens"], ["the folder for --out 'missing/lens' does not exist"]),
        ([*_J, "--out", "held"], ["--out 'held' holds a folder (inner)"]),
        ([*_J, "--out", "tuned_here"], ["holds tuned_lens.safetensors, a file of another lens format"]),
        ([*_T, "--out", "tuned_here", "--format", "tuned-lens"], ["holds tuned_lens.safetensors"]),
        ([*_J, "--out", "j.pt", "--checkpoint-dir", "corpus.json"], ["--checkpoint-dir 'corpus.json' is a file"]),
        ([*_J, "--out", "j.pt", "--device", "tpu:x"], ["--device 'tpu:x' is not a torch device"]),
    ],
    ids=[
        "no-kind", "unknown-kind", "no-out", "no-texts", "missing-corpus", "seq-len-zero", "seq-len-word",
        "skip-negative", "layers-word", "max-prompts-zero", "checkpoint-every-zero", "threads-zero", "lr-zero",
        "lr-inf", "lr-word", "momentum-one", "momentum-negative", "weight-decay-negative", "grad-clip-zero",
        "steps-zero", "warmup-negative", "max-tokens-zero", "max-tokens-float", "unknown-format", "tuned-pt", "jacobian-folder-is-a-file",
        "tuned-folder-is-a-file", "pt-parent-missing", "folder-parent-missing", "folder-holds-a-folder",
        "folder-holds-another-lens", "tuned-lens-format-over-own-format", "checkpoint-dir-is-a-file",
        "bad-device",
    ],
)
def test_usage_mistakes_are_one_line_with_exit_code_2(corpus, capsys, args, fragments):
    (corpus.parent / "held" / "inner").mkdir(parents=True)
    (corpus.parent / "tuned_here").mkdir()
    (corpus.parent / "tuned_here" / "tuned_lens.safetensors").write_bytes(b"")
    _one_line_error(_in_process(args, capsys), *fragments)
    assert not (corpus.parent / "j.pt").exists() and not (corpus.parent / "lens").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ([*_J, "--out", "j.pt", "--layers", "3"], ["layer 3 is not a source layer of this 4-layer model"]),
        ([*_J, "--out", "j.pt", "--seq-len", "257"], ["seq_len must be an int from 2 to 256"]),
        ([*_J, "--out", "j.pt", "--skip-first", "20"], ["no prompt was long enough"]),
    ],
    ids=["layer-out-of-range", "seq-len-over-n-ctx", "no-prompt-long-enough"],
)
def test_what_the_model_refuses_is_one_line_and_nothing_is_written(corpus, capsys, args, fragments):
    _one_line_error(_in_process(args, capsys), *fragments)
    assert not (corpus.parent / "j.pt").exists()


def test_help_states_the_library_defaults_and_lens_file_names():
    """--help states the defaults as numbers (no torch import to read them): they must be the library's;
    the folder check names the files each lens format writes: they must be the lens modules'."""
    from tl_logitlens.lenses import jacobian, tuned

    for func, stated in ((tl.fit_jacobian_lens, fit_commands.JACOBIAN_DEFAULTS), (tl.train_tuned_lens, fit_commands.TUNED_DEFAULTS)):
        params = inspect.signature(func).parameters
        assert {name: params[name].default for name in stated} == stated, func.__name__
    assert fit_commands.LENS_FILES == {
        "jacobian": (jacobian.WEIGHTS_FILE, f"{jacobian.STEM}.json"),
        "tl_logitlens": (tuned.WEIGHTS_FILE, tuned.CONFIG_FILE),
        "tuned-lens": (tuned.TUNED_LENS_CONFIG, tuned.TUNED_LENS_PARAMS),
    }


# --- resuming -------------------------------------------------------------------------------------


def _interrupt_after_first_save(monkeypatch):
    """The process is stopped (Ctrl-C) right after the first checkpoint is written."""
    save = Checkpoint.save

    def save_then_stop(self, state):
        save(self, state)
        monkeypatch.setattr(Checkpoint, "save", save)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)


@pytest.mark.parametrize("kind", ["jacobian", "tuned"])
def test_an_interrupted_fit_resumes_from_the_checkpoint_to_the_same_bits(corpus, capsys, monkeypatch, model, jlens, tuned, kind):
    every = ["--checkpoint-dir", "ckpt", "--checkpoint-every", "1"]
    args = [*(_J if kind == "jacobian" else _T), "--out", "lens", *(J_ARGS if kind == "jacobian" else T_ARGS), *every]
    _interrupt_after_first_save(monkeypatch)
    first = _in_process(args, capsys)
    assert first.returncode == 130 and "interrupted" in first.stderr
    assert (corpus.parent / "ckpt").is_dir() and not (corpus.parent / "lens").exists()
    res = _in_process(args, capsys)
    assert res.returncode == 0, res.stderr
    if kind == "jacobian":
        _same_jacobian_lens(tl.load_lens("lens", model), jlens)
    else:
        _same_tuned_lens(tl.load_lens("lens", model), tuned)
    # the same folder with other settings is refused, in one line
    other = [*args, "--seq-len", "10"]
    _one_line_error(_in_process(other, capsys), "checkpoint")


# --- torchrun -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_write_one_process_lens(tmp_path, model, jlens, tuned):
    """Each command under torchrun x2: the J-lens fit deals the prompts and adds the ranks' float64 sums
    (J to 1e-6 relative, the same n_prompts); training sums the ranks' gradients (6 windows a step,
    3 per rank; to 1e-6). Rank 0 alone prints and writes."""
    (tmp_path / "corpus.json").write_text(json.dumps(TEXTS), encoding="utf-8")
    env = dict(os.environ, COLUMNS="80", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    runs = {
        "jacobian": ["fit", "jacobian", "demo", "--texts", "corpus.json", "--out", "j", *J_ARGS],
        "tuned": ["fit", "tuned", "demo", "--texts", "corpus.json", "--out", "tuned", *T_ARGS],
    }
    procs = [  # started together: each pays its imports and model load while the other computes
        subprocess.Popen([*torchrun_command(2), "-m", "tl_logitlens", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in runs.values()
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        assert out.count("wrote ") == 1 and "(2 processes)" in out, out  # rank 0 alone prints
    two = tl.load_lens(tmp_path / "j", model)
    assert (two.n_prompts, two.source_layers) == (jlens.n_prompts, jlens.source_layers) == (5, (0, 2))
    for layer in jlens.source_layers:
        assert_close(two.jacobians[layer], jlens.jacobians[layer], atol=1e-7, rtol=1e-6)
    lens = tl.load_lens(tmp_path / "tuned", model)
    assert_close(lens.weight.detach(), tuned.weight.detach(), atol=1e-6, rtol=0)
    assert_close(lens.bias.detach(), tuned.bias.detach(), atol=1e-6, rtol=0)
    assert lens.meta["training"]["loss_per_step"] == pytest.approx(tuned.meta["training"]["loss_per_step"], rel=1e-6)

