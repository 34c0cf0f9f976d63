"""Issue 34's reliability audit, one test per class of failure it found on main (each failed there).

1. a failed training never replaces a good lens; nothing non-finite is written, by any lens kind;
2. a checkpoint is bound to its texts, the model's weights (every one), the lenses and the settings;
3. checkpoints and lens files carry SHA-256 checksums, and every checkpoint field is validated
   (the tampering test: each kind of field of every checkpoint kind);
4. a save swaps a whole folder: no lens of another format survives in it, no writer deletes another's
   temporary, and two writers and a reader never meet an empty or mixed folder (processes, ~3 s);
5. ``positions=`` out of range is refused, naming the prompt's length, never wrapped;
6. reading is bounded: a fit tokenises a prompt's first tokens, a prompt too long for the context is
   refused before it is tokenised, ``run --prompts-file`` is counted in chunks and read lazily, stale temporaries are removed;
7. what raised a raw traceback is a one-line error naming the argument;
8. a collective whose peer stopped or died fails within its timeout, in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES
from tests.test_cli import _in_process
from tl_logitlens.core import files as core_files
from tl_logitlens.core.files import CHECKPOINT_FILE, Checkpoint, state_sha256
from tl_logitlens.lenses import JacobianLens, TunedLens, load_lens
from tl_logitlens.lenses.files import read_lens_folder, write_lens_folder

TEXTS = [*SENTENCES, *SENTENCES]
J_KW = {"seq_len": 8, "skip_first": 2, "layers": [0, 2], "batch_size": 2, "progress": False, "checkpoint_every": 4}
T_KW = {"steps": 2, "tokens_per_step": 64, "seq_len": 16, "batch_size": 2, "lr": 0.5, "progress": False}
E_KW = {"seq_len": 16, "n_bootstrap": 2, "progress": False, "checkpoint_every": 2}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tl.load_model("demo")


@pytest.fixture(scope="module")
def other_model():
    """The demo model with block 1's MLP output scaled by 1.5: another model, whose readout (final norm,
    unembedding) is the same, so the readout fingerprint alone cannot tell them apart."""
    m = tl.load_model("demo")
    with torch.no_grad():
        m.blocks[1].mlp.W_out.mul_(1.5)
    return m


@pytest.fixture(scope="module")
def good_tuned(model):
    return tl.train_tuned_lens(model, TEXTS, **T_KW)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. a failed training never overwrites a good lens ----------------------------------------------


def test_training_that_turns_the_lens_non_finite_stops_with_an_error(model):
    with pytest.raises(ValueError, match=r"(parameters hold NaN or inf after step|loss is) .*lr=1e\+30"):
        tl.train_tuned_lens(model, TEXTS, **{**T_KW, "lr": 1e30})


@pytest.mark.parametrize(
    ("flag", "fragment"),
    [(["--lr", "1e30"], "NaN or inf"), (["--lr", "1e308"], "at most 1e+38"), (["--weight-decay", "1e300"], "at most 1e+38")],
)
def test_cli_training_that_fails_exits_non_zero_and_keeps_the_good_lens(tmp_path, monkeypatch, capsys, good_tuned, flag, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS), encoding="utf-8")
    good_tuned.save(tmp_path / "good_lens")
    before = {p.name: p.read_bytes() for p in (tmp_path / "good_lens").iterdir()}
    args = ["fit", "tuned", "demo", "--texts", "texts.json", "--steps", "2", "--tokens-per-step", "64",
            "--seq-len", "16", *flag, "--out", "good_lens", "--no-progress"]
    res = _in_process(args, capsys)
    assert res.returncode != 0
    assert fragment in _one_line(res.stderr) and "wrote" not in res.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "good_lens").iterdir()} == before


def _poison(lens):
    if isinstance(lens, TunedLens):
        with torch.no_grad():
            lens.bias[1, 3] = float("inf")
    else:
        lens.jacobians[0][2, 2] = float("nan")  # bypasses the constructor's check, as a later edit would
    return lens


@pytest.mark.parametrize(("kind", "fmt", "name"), [
    ("tuned", "tl_logitlens", "lens"), ("tuned", "tuned-lens", "lens"),
    ("jacobian", "tl_logitlens", "lens"), ("jacobian", "jlens", "lens.pt"),
])
def test_no_lens_kind_writes_nan_over_a_file(tmp_path, model, good_tuned, kind, fmt, name):
    good = TunedLens.for_model(model) if kind == "tuned" else JacobianLens({0: torch.eye(128)}, n_prompts=1, d_model=128, n_layers=4)
    target = good.save(tmp_path / name, format=fmt)
    before = sorted((p.name, p.read_bytes()) for p in (target.iterdir() if target.is_dir() else [target]))
    bad = TunedLens.for_model(model) if kind == "tuned" else JacobianLens({0: torch.eye(128)}, n_prompts=1, d_model=128, n_layers=4)
    with pytest.raises(ValueError, match="holds NaN or inf, so .* was not written"):
        _poison(bad).save(tmp_path / name, format=fmt)
    assert sorted((p.name, p.read_bytes()) for p in (target.iterdir() if target.is_dir() else [target])) == before


# --- 2. checkpoints bound to what they resume -------------------------------------------------------


def test_a_jacobian_fit_refuses_a_checkpoint_of_other_texts_of_the_same_count(model, tmp_path):
    ckpt = tmp_path / "ck"
    tl.fit_jacobian_lens(model, TEXTS, checkpoint_dir=ckpt, **J_KW)
    others = [t.upper() for t in TEXTS]
    with pytest.raises(ValueError, match=r"the corpus differs from the one .*checkpoint.pt was saved on"):
        tl.fit_jacobian_lens(model, others, checkpoint_dir=ckpt, **J_KW)


def test_a_jacobian_fit_interrupted_on_texts_a_does_not_resume_on_texts_b(model, tmp_path):
    ckpt = tmp_path / "ck"

    def stopped():
        yield from TEXTS[:5]
        raise KeyboardInterrupt

    settings = {**J_KW, "batch_size": 1}  # blocks of 4 texts: a checkpoint after the fourth
    with pytest.raises(KeyboardInterrupt):
        tl.fit_jacobian_lens(model, stopped(), checkpoint_dir=ckpt, **settings)
    assert torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["state"]["position"] == 4
    with pytest.raises(ValueError, match="the corpus differs"):
        tl.fit_jacobian_lens(model, [*reversed(TEXTS)], checkpoint_dir=ckpt, **settings)


@pytest.mark.parametrize("job", ["jacobian", "tuned", "evaluate"])
def test_a_checkpoint_of_another_model_with_the_same_readout_is_refused(model, other_model, tmp_path, job):
    run = {
        "jacobian": lambda m: tl.fit_jacobian_lens(m, TEXTS, checkpoint_dir=tmp_path, **J_KW),
        "tuned": lambda m: tl.train_tuned_lens(m, TEXTS, checkpoint_dir=tmp_path, **T_KW),
        "evaluate": lambda m: tl.evaluate_lenses(m, TEXTS, checkpoint_dir=tmp_path, **E_KW),
    }[job]
    run(model)
    with pytest.raises(ValueError, match=r"other settings \((model_sha256|model.weights_sha256): "):
        run(other_model)


def test_an_evaluation_refuses_another_jacobian_lens_of_the_same_name(model, tmp_path):
    a = JacobianLens({i: torch.eye(128) for i in range(3)}, n_prompts=1, d_model=128, n_layers=4, name="J")
    b = JacobianLens({i: (1.01 if i == 1 else 1.0) * torch.eye(128) for i in range(3)}, n_prompts=1, d_model=128,
                     n_layers=4, name="J")
    tl.evaluate_lenses(model, TEXTS[:3], lenses=a, checkpoint_dir=tmp_path, **E_KW)
    with pytest.raises(ValueError, match=r"other settings \(lenses.J: "):
        tl.evaluate_lenses(model, TEXTS[:3], lenses=b, checkpoint_dir=tmp_path, **E_KW)


# --- 3. checksums, and every checkpoint field validated (the tampering test) -------------------------


def _run(job, model, folder):
    if job == "jacobian":
        return tl.fit_jacobian_lens(model, TEXTS, checkpoint_dir=folder, **J_KW)
    if job == "tuned":
        return tl.train_tuned_lens(model, TEXTS, checkpoint_dir=folder, **T_KW)
    return tl.evaluate_lenses(model, TEXTS, checkpoint_dir=folder, **E_KW)


# per checkpoint kind: a statistic (float tensor), a count, a position, a digest string
FIELDS = {
    "jacobian": {"statistic": "sums", "count": "n_prompts", "position": "position", "digest": "texts_sha256"},
    "tuned": {"statistic": "weight", "count": "step", "position": "step", "digest": "history"},
    "evaluate": {"statistic": "stats", "count": "real", "position": "next_document", "digest": "texts_sha256"},
}


def _flip_byte(state, f):
    t = state[f["statistic"]]
    t.view(torch.uint8).view(-1)[t.element_size() - 1] ^= 0x40  # an exponent bit of the first value


def _double(state, f):
    state[f["statistic"]].mul_(2)


def _set(key, value):
    return lambda state, f: state.__setitem__(f[key], value(state[f[key]]) if callable(value) else value)


# (what is changed, how, whether the checksum is recomputed as a forger would, what the refusal names)
TAMPERING = {
    "flipped exponent byte": (_flip_byte, False, "does not match its SHA-256"),
    "doubled statistic": (_double, False, "does not match its SHA-256"),
    "NaN statistic": (_set("statistic", lambda t: torch.full_like(t, float("nan"))), True, "field '{statistic}' holds NaN"),
    "int-typed statistic": (_set("statistic", lambda t: t.long()), True, "field '{statistic}' is a torch.int64 tensor"),
    "statistic of another shape": (_set("statistic", lambda t: t.reshape(-1)), True, "field '{statistic}' has shape"),
    "negative count": (_set("count", -1), True, "field '{count}' is -1"),
    "count of 10**30": (_set("count", 10**30), True, "field '{count}' is"),
    "position -5": (_set("position", -5), True, "field '{position}' is -5"),
    "position as a string": (_set("position", "x"), True, "field '{position}' is 'x', not an int"),
    "float count": (_set("count", 1.0), True, "field '{count}' is 1.0, not an int"),
    "missing field": (lambda state, f: state.pop(f["digest"]), True, "lacks the field '{digest}'"),
}


@pytest.fixture(scope="module")
def finished_checkpoints(model, tmp_path_factory):
    """One finished checkpoint of each kind (its bytes), made once."""
    out = {}
    for job in FIELDS:
        folder = tmp_path_factory.mktemp(job)
        _run(job, model, folder)
        out[job] = (folder / CHECKPOINT_FILE).read_bytes()
    return out


@pytest.mark.parametrize("case", list(TAMPERING))
@pytest.mark.parametrize("job", list(FIELDS))
def test_every_tampered_field_of_every_checkpoint_is_refused_naming_it(model, tmp_path, finished_checkpoints, job, case):
    change, recompute, message = TAMPERING[case]
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(finished_checkpoints[job])
    payload = torch.load(path, weights_only=True)
    change(payload["state"], FIELDS[job])
    if recompute:
        payload["sha256"] = state_sha256(payload["state"])
    torch.save(payload, path)
    with pytest.raises(ValueError, match=message.format(**FIELDS[job]).replace("(", r"\(")) as err:
        _run(job, model, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "is not a readable checkpoint"),
        (lambda p: p.write_text("just some text\n"), "is not a readable checkpoint"),
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: torch.save({"job": "J", "settings": {}, "state": [1, 2], "sha256": "0"}, p), "holds a state of type list"),
        (lambda p: torch.save({"job": "J", "settings": {}, "state": {}}, p), "carries no checksum"),
    ],
    ids=["empty file", "text file", "a folder named checkpoint.pt", "state as a list", "no checksum"],
)
def test_a_checkpoint_file_that_is_not_one_is_a_one_line_error(tmp_path, make, message):
    make(tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=message) as err:
        Checkpoint(tmp_path, {}, job="J").load()
    assert "\n" not in str(err.value)


def test_a_value_changed_in_a_jlens_file_is_refused(model, tmp_path):
    JacobianLens({0: torch.eye(128)}, n_prompts=1, d_model=128, n_layers=4).save(tmp_path / "j.pt", format="jlens")
    payload = torch.load(tmp_path / "j.pt", weights_only=True)
    payload["J"][0][3, 3] = 1.001
    torch.save(payload, tmp_path / "j.pt")
    with pytest.raises(ValueError, match="do not match the SHA-256 checksum in its metadata"):
        load_lens(tmp_path / "j.pt", model, check_fingerprint=False)


def test_a_byte_flipped_in_a_lens_files_tensor_data_is_refused(model, good_tuned, tmp_path):
    folder = good_tuned.save(tmp_path / "lens")
    data = bytearray((folder / "tuned_lens.safetensors").read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes
    (folder / "tuned_lens.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256 checksum in its header"):
        load_lens(folder, model)


# --- 4. folders that mix or vanish ------------------------------------------------------------------


def test_saving_one_lens_kind_into_anothers_folder_leaves_only_the_new_lens(model, good_tuned, tmp_path):
    folder = tmp_path / "lens"
    good_tuned.save(folder)
    (folder / "NOTES.txt").write_text("mine")
    jlens = JacobianLens({0: torch.eye(128)}, n_prompts=1, d_model=128, n_layers=4, meta=good_tuned.meta)
    jlens.save(folder)
    assert isinstance(load_lens(folder, model, check_fingerprint=False), JacobianLens)
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "jacobian_lens.json", "jacobian_lens.safetensors"]
    good_tuned.save(folder, format="tuned-lens")
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "config.json", "params.pt"]
    assert load_lens(folder, tl.load_model("demo", center_writing_weights=False)).meta["format"] == "tuned-lens 0.2.0"


def test_a_save_removes_dead_writers_temporaries_never_a_running_ones(tmp_path):
    dead, live = tmp_path / f".lens.{_dead_pid()}-abc.tmp", tmp_path / f".lens.{os.getppid()}-def.tmp"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "tuned_lens.safetensors").write_bytes(b"half")
    write_lens_folder(tmp_path / "lens", "tuned_lens", {"w": torch.ones(2)}, {"format": "x"})
    assert not dead.exists() and live.exists()
    dead_file = tmp_path / f".j.pt.{_dead_pid()}-xyz.tmp"
    dead_file.write_bytes(b"x" * 1000)
    core_files.atomic_write_bytes(tmp_path / "j.pt", b"new")
    assert not dead_file.exists() and (tmp_path / "j.pt").read_bytes() == b"new"


RACE_S = 3.0


def _writer(folder, value, start, results):
    n = 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < start + RACE_S:
        write_lens_folder(folder, "tuned_lens", {"w": torch.full((64, 64), value)}, {"format": "test", "value": value})
        n += 1
    results.put(("writes", n, []))


def _reader(folder, start, results):
    reads, bad = 0, []
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < start + RACE_S:
        try:
            tensors, meta = read_lens_folder(folder, "tuned_lens")
        except ValueError as err:
            bad.append(f"FAILED {err}")
            continue
        values = set(tensors["w"].unique().tolist())
        if values != {meta["value"]}:
            bad.append(f"MIXED {values} with metadata {meta['value']}")
        reads += 1
    results.put(("reads", reads, bad[:5] + [f"... {len(bad)} in all"] if bad else []))


@pytest.mark.skipif(sys.platform.startswith("win"), reason="forks the test process (Linux, macOS)")
def test_two_writers_and_a_reader_never_meet_an_empty_or_mixed_folder(tmp_path):
    import multiprocessing

    folder = tmp_path / "lens"
    write_lens_folder(folder, "tuned_lens", {"w": torch.zeros(64, 64)}, {"format": "test", "value": 0.0})
    ctx = multiprocessing.get_context("fork")  # torch is imported already: the race starts at once
    results = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_writer, args=(folder, v, start, results)) for v in (1.0, 2.0)]
    procs.append(ctx.Process(target=_reader, args=(folder, start, results)))
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    writes = [n for kind, n, _ in got if kind == "writes"]
    (reads, bad), = [(n, b) for kind, n, b in got if kind == "reads"]
    assert bad == [], bad
    assert len(writes) == 2 and min(writes) > 0 and reads > 0, (writes, reads)
    assert [p.name for p in tmp_path.iterdir()] == ["lens"]  # no temporary left behind


# --- 5. positions out of range ----------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["steer", "ablate"])
@pytest.mark.parametrize("positions", [-100, [5], [100], [0, 6]])
def test_steer_and_ablate_refuse_positions_beyond_the_prompt(model, tool, positions):
    tokens = model.to_tokens("The cat sat on")
    assert tokens.shape[1] == 5
    hook = tl.steer(model, None, "1_pre", " the", 4.0, positions=positions) if tool == "steer" else tl.ablate(
        model, None, "1_pre", [" the"], positions=positions)
    with pytest.raises(ValueError, match=r"out of range for the prompt, which has 5 tokens; use positions in \[-5, 4\]"):
        with model.hooks(fwd_hooks=[hook]):
            model(tokens)


@pytest.mark.parametrize("positions", [-5, [4], [-1, 0]])
def test_steer_changes_the_positions_asked_for_and_no_other(model, positions):
    tokens = model.to_tokens("The cat sat on")
    plain = model(tokens)
    with model.hooks(fwd_hooks=[tl.steer(model, None, "1_pre", " the", 4.0, positions=positions)]):
        steered = model(tokens)
    asked = {p % 5 for p in ([positions] if isinstance(positions, int) else positions)}
    changed = {int(p) for p in (steered - plain).abs().amax(-1)[0].nonzero().flatten()}
    assert min(changed) == min(asked)  # causal: the first steered position is the first that changes


# --- 6. bounded reading -----------------------------------------------------------------------------


def test_a_jacobian_fit_tokenises_a_prefix_of_a_huge_document(model, monkeypatch):
    longest = []
    real = model.to_tokens

    def spy(text, *args, **kwargs):
        longest.append(len(text) if isinstance(text, str) else 0)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(model, "to_tokens", spy)
    huge = "Once upon a time there was a cat. " * 150_000  # 5 MB on one line
    tl.fit_jacobian_lens(model, [huge, *TEXTS], max_prompts=1, **{**J_KW, "layers": [0]})
    assert max(longest) < 100_000, max(longest)


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenised(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenised")

    monkeypatch.setattr(model, "to_tokens", refuse)
    with pytest.raises(ValueError, match=r"prompt 0 is 2,000,000 characters long, more than the model's context"):
        tl.logit_lens(model, "ab" * 1_000_000)


def test_every_prompt_entry_refuses_a_prompt_too_long_for_the_context_before_tokenising(model, monkeypatch):
    """The same pre-check on every entry that tokenises prompts: a report of more prompts than a batch
    (which measured every prompt's length with to_tokens first), patchscope and generation."""
    def refuse(text, *args, **kwargs):
        if isinstance(text, str) and len(text) > 100_000:
            raise AssertionError("tokenised")
        return real(text, *args, **kwargs)

    real = model.to_tokens
    monkeypatch.setattr(model, "to_tokens", refuse)
    huge = "ab" * 1_000_000
    message = r"prompt \d+ is 2,000,000 characters long, more than the model's context"
    from tl_logitlens.analyses.interventions import generate
    from tl_logitlens.reporting.compute import compute_report

    with pytest.raises(ValueError, match=message):
        compute_report(model, [*(f"Once upon a time {i}" for i in range(20)), huge])
    with pytest.raises(ValueError, match=message):
        tl.patchscope(model, huge)
    with pytest.raises(ValueError, match=message):
        generate(model, huge, max_new_tokens=1)


def test_run_counts_a_prompts_file_in_chunks_and_reads_it_lazily(tmp_path):
    """run --prompts-file takes a file of any length (it streams, tests/test_run_stream.py): the count
    for its progress is a binary pass in chunks, and the prompts are read as they are used."""
    from tl_logitlens.cli.prompts import PromptsFile

    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(100_000)), encoding="utf-8")
    started = time.perf_counter()
    prompts = PromptsFile.open(str(path))
    assert prompts.n_prompts == 100_000
    assert time.perf_counter() - started < 5
    lines = prompts.prompts()
    assert [next(lines), next(lines)] == ["prompt number 0", "prompt number 1"]
    lines.close()


def test_fit_tuned_takes_max_prompts(model):
    lens = tl.train_tuned_lens(model, ["Once upon a time " * 200, *TEXTS], max_prompts=1, **T_KW)
    first = tl.train_tuned_lens(model, ["Once upon a time " * 200], **T_KW)
    assert lens.meta["training"]["windows"] == first.meta["training"]["windows"]
    assert torch.equal(lens.weight, first.weight)


# --- 7. raw tracebacks become one-line errors naming the argument ---------------------------------------


@pytest.mark.parametrize("kind", ["tuned", "jacobian"])
@pytest.mark.parametrize("path", [None, 123])
def test_save_to_something_that_is_not_a_path(model, kind, path):
    lens = TunedLens.for_model(model) if kind == "tuned" else JacobianLens({0: torch.eye(128)}, n_prompts=1, d_model=128)
    with pytest.raises(TypeError, match=r"(folder|path) must be a path \(a str or os.PathLike\), not"):
        lens.save(path)


def test_saves_where_nothing_can_be_written_are_one_line_errors(model, tmp_path):
    jlens = JacobianLens({0: torch.eye(128)}, n_prompts=1, d_model=128)
    with pytest.raises(ValueError, match="does not exist"):
        jlens.save(tmp_path / "missing" / "j.pt", format="jlens")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        jlens.save(tmp_path / "dir.pt", format="jlens")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        TunedLens.for_model(model).save(tmp_path / "file")
    for target, fmt in (("/proc/tl_lens", "tl_logitlens"), ("/proc/tl_lens.pt", "jlens")):
        with pytest.raises(ValueError, match="cannot (save|write)|not writable") as err:
            jlens.save(target, format=fmt)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("job", ["jacobian", "tuned", "evaluate"])
def test_a_checkpoint_dir_is_checked_before_the_work_starts(model, monkeypatch, job):
    import tl_logitlens.lenses.jacobian_fitting as jf
    import tl_logitlens.lenses.tuned_training as tt

    def never(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(jf, "prompt_jacobian_sums", never)
    monkeypatch.setattr(tt, "lens_kl_sum", never)
    with pytest.raises(TypeError, match="checkpoint_dir must be a folder path"):
        _run(job, model, 5)
    with pytest.raises(ValueError, match="checkpoint_dir '/proc/tl_x' cannot be written to"):
        _run(job, model, "/proc/tl_x")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--threads", "5000"], "more than 8 threads per CPU core"),
        (["--lr", "inf"], "not a finite number"),
    ],
)
def test_cli_numbers_out_of_range_are_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    res = _in_process(["fit", "tuned", "demo", "--texts", "demo", "--out", "x", *args], capsys)
    assert res.returncode == 2 and fragment in res.stderr and "Traceback" not in res.stderr


def test_a_sparse_tensor_or_a_huge_count_in_a_pt_lens_is_refused(model, tmp_path):
    sparse = torch.eye(128).to_sparse()
    torch.save({"J": {0: sparse}, "n_prompts": 1, "d_model": 128}, tmp_path / "sparse.pt")
    with pytest.raises(ValueError, match="sparse_coo tensor; a lens holds dense tensors"):
        load_lens(tmp_path / "sparse.pt", model)
    for key in ("n_prompts", "n_done"):
        payload = {"J": {0: torch.eye(128)}, "d_model": 128} if key == "n_prompts" else {"jacobian_sum": {0: torch.eye(128)}}
        torch.save({**payload, key: 10**30}, tmp_path / f"{key}.pt")
        with pytest.raises(ValueError, match=rf"{key} is 1e\+30, not a count"):
            load_lens(tmp_path / f"{key}.pt", model)


# --- 8. distributed: a stopped or killed peer -------------------------------------------------------

PEERS = """
import os, sys, time, torch, torch.distributed as dist
from tl_logitlens.core.distributed import World, sum_over_ranks, DistributedError, collective_timeout
rank, mode, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=collective_timeout())
dist.barrier()  # both connected
if rank == 1:
    if mode == "killed":
        os._exit(9)
    time.sleep(30)   # stopped: never joins the collective
    os._exit(0)
started = time.time()
try:
    sum_over_ranks(torch.ones(3), World(0, 2))
except DistributedError as err:
    print("ONE LINE", round(time.time() - started), str(err), flush=True)  # os._exit skips the stdio flush
    os._exit(0)
print("NO ERROR", flush=True)
"""


@pytest.mark.parametrize("mode", ["stopped", "killed"])
def test_a_collective_whose_peer_stopped_or_died_fails_in_one_line_within_its_timeout(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TL_LOGITLENS_TIMEOUT_S": "3"}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", PEERS, str(rank), mode, str(store)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=90)
    finally:
        for proc in procs:
            proc.kill()
    assert "ONE LINE" in out, out + err
    line = out.split("ONE LINE", 1)[1].strip()
    assert "\n" not in line and "rank 0 of 2: summing over the ranks failed" in line and "3 s" in line


STOP_AFTER_CHECKPOINT = """
import os, signal, sys
from tl_logitlens.cli import main
from tl_logitlens.core.files import Checkpoint

if os.environ["RANK"] == "1":  # rank 1 hangs (SIGSTOP) once it has saved a checkpoint: it is fitting
    save = Checkpoint.save

    def save_then_stop(self, state):
        path = save(self, state)
        with open(sys.argv[1] + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        os.kill(os.getpid(), signal.SIGSTOP)
        return path

    Checkpoint.save = save_then_stop
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_under_torchrun_a_stopped_rank_makes_rank_0_fail_in_one_line_within_the_timeout(tmp_path):
    """A real run: torchrun, 2 gloo processes, fit jacobian demo with TL_LOGITLENS_TIMEOUT_S=6. Rank 1 stops
    itself (SIGSTOP: a hung peer, which nothing else reports) right after saving its first checkpoint.
    Rank 0 finishes its share, waits at the first collective, and exits with code 1 within the timeout
    plus its remaining work: one line (no traceback) naming the timeout and the lost peer."""
    import signal

    from tests.helpers import torchrun_command

    timeout_s = 6
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TL_LOGITLENS_TIMEOUT_S": str(timeout_s)}
    logs, pid_file, script = tmp_path / "logs", tmp_path / "rank1.pid", tmp_path / "stop_after_checkpoint.py"
    script.write_text(STOP_AFTER_CHECKPOINT, encoding="utf-8")
    args = ["fit", "jacobian", "demo", "--texts", "demo", "--max-prompts", "40", "--seq-len", "32", "--out", "j",
            "--checkpoint-dir", "ck", "--checkpoint-every", "1", "--no-progress"]
    run = subprocess.Popen([*torchrun_command(2), "--log-dir", str(logs), "--redirects", "3", str(script),
                            str(pid_file), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    rank0_log: list[Path] = []
    try:
        started = time.monotonic()
        while not pid_file.exists():
            assert run.poll() is None and time.monotonic() - started < 120, "rank 1 saved no checkpoint"
            time.sleep(0.05)
        stopped = time.monotonic()
        # rank 0's line appears in its log once the collective has timed out (torchrun keeps the job
        # alive: it waits for the stopped rank 1, so rank 1 is killed here once rank 0 has spoken)
        while not (rank0_log and rank0_log[0].read_text().strip()):
            assert run.poll() is None, "torchrun ended before rank 0 reported the stopped rank"
            assert time.monotonic() - stopped < timeout_s + 60, "rank 0 still waits for the stopped rank"
            time.sleep(0.05)
            rank0_log = list(logs.glob("*/attempt_0/0/stderr.log"))
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a stopped worker would not take SIGTERM
        _, summary = run.communicate(timeout=90)
    assert run.returncode != 0, summary[-2000:]
    lines = [line for line in rank0_log[0].read_text().splitlines() if line.strip()]
    assert len(lines) == 1, (lines, summary[-3000:])
    assert lines[0].startswith("tl-logitlens: error: rank 0 of 2: ")
    assert f"another rank stopped, was killed or did not answer within {timeout_s} s (TL_LOGITLENS_TIMEOUT_S)" in lines[0]
    assert not (tmp_path / "j").exists()


def test_the_cli_reports_a_failed_collective_in_one_line(monkeypatch, capsys):
    from tl_logitlens.cli import commands
    from tl_logitlens.core.distributed import DistributedError

    def fail(args):
        raise DistributedError("rank 0 of 2: summing over the ranks failed, so another rank stopped")

    monkeypatch.setattr(commands, "_fit_command", fail)
    res = _in_process(["fit", "tuned", "demo", "--texts", "demo", "--out", "x"], capsys)
    assert res.returncode == 1 and "another rank stopped" in _one_line(res.stderr)


def test_a_timeout_that_is_not_a_number_is_refused(monkeypatch):
    from tl_logitlens.core.distributed import collective_timeout

    monkeypatch.setenv("TL_LOGITLENS_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="TL_LOGITLENS_TIMEOUT_S='soon' must be a number of seconds"):
        collective_timeout()
