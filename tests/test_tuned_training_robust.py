"""Training a tuned lens that nothing can silently spoil (#23, findings 2 and 5): every numeric option
checked, a non-finite loss stops training at its step, a checkpoint resumes bit for bit, and under
torchrun the gradients of every rank are summed."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, tiny_model
from tl_logitlens.core import compat as _compat
from tl_logitlens.lenses import tuned_training

TEXTS = SENTENCES * 4
# 6 steps of 4 windows of 16 tokens: one forward pass per step
RUN = {"steps": 6, "tokens_per_step": 64, "seq_len": 16, "progress": False}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model("LN", folded=False)


def _same(a, b) -> None:
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.meta["training"]["loss_per_step"] == b.meta["training"]["loss_per_step"]


class _Interrupt:
    """Replace the loss with one that raises KeyboardInterrupt on its ``at``-th call (one call a step here)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.real = tuned_training.lens_kl_sum

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("interrupt_at", [1, 3, 4, 6], ids=["step-1", "step-3", "step-4", "last-step"])
def test_an_interrupted_run_resumes_to_the_same_lens_bit_for_bit(tmp_path, model, monkeypatch, interrupt_at):
    reference = tl.train_tuned_lens(model, TEXTS, **RUN)
    folder = tmp_path / "ckpt"
    monkeypatch.setattr(tuned_training, "lens_kl_sum", _Interrupt(interrupt_at))
    with pytest.raises(KeyboardInterrupt):
        tl.train_tuned_lens(model, TEXTS, **RUN, checkpoint_dir=folder, checkpoint_every=2)
    monkeypatch.undo()
    saved = (interrupt_at - 1) // 2 * 2  # the last checkpoint before the interrupt
    assert (folder / "checkpoint.pt").is_file() == (saved > 0)
    resumed = tl.train_tuned_lens(model, TEXTS, **RUN, checkpoint_dir=folder, checkpoint_every=2)
    _same(resumed, reference)


def test_a_finished_run_returns_its_lens_at_once_and_other_settings_are_refused(tmp_path, model, monkeypatch):
    folder = tmp_path / "ckpt"
    first = tl.train_tuned_lens(model, TEXTS, **RUN, checkpoint_dir=folder, checkpoint_every=4)
    calls = _Interrupt(at=1)
    monkeypatch.setattr(tuned_training, "lens_kl_sum", calls)
    again = tl.train_tuned_lens(model, TEXTS, **RUN, checkpoint_dir=folder, checkpoint_every=4)
    assert calls.calls == 0
    _same(again, first)
    with pytest.raises(ValueError, match=r"other settings \(lr: 1.0 then, 0.5 now\).*another checkpoint folder"):
        tl.train_tuned_lens(model, TEXTS, **RUN, lr=0.5, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"other settings \(windows: "):
        tl.train_tuned_lens(model, TEXTS[:-1], **RUN, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"other settings \(fingerprint\."):
        tl.train_tuned_lens(tiny_model("LN", folded=False, seed=3), TEXTS, **RUN, checkpoint_dir=folder)


def test_a_non_finite_loss_stops_training_at_its_step(model):
    broken = tiny_model("LN", folded=False)
    with torch.no_grad():
        broken.blocks[1].mlp.W_in[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"loss is nan at step 1 of 6: training stopped"):
        tl.train_tuned_lens(broken, TEXTS, **RUN)
    with pytest.raises(ValueError, match=r"((loss|gradient norm) is (nan|inf) at step|parameters hold NaN or inf after step) [2-6] of 6\b.*lr=1e\+30.*try a smaller one"):
        tl.train_tuned_lens(model, TEXTS, **{**RUN, "lr": 1e30, "grad_clip": 1e30})


BAD_TRAINING = [
    ("lr", math.inf, ValueError, "lr=inf must be a finite number"),
    ("lr", 0.0, ValueError, r"lr=0 must be in \(0, 1e\+38\]"),
    ("lr", "1", TypeError, "lr must be a number, not str"),
    ("weight_decay", math.nan, ValueError, "weight_decay=nan must be a finite number"),
    ("weight_decay", -1e-3, ValueError, r"weight_decay=-0.001 must be in \[0, 1e\+38\]"),
    ("vocab_chunk", -5, ValueError, "vocab_chunk=-5 must be at least 1"),
    ("vocab_chunk", 0, ValueError, "vocab_chunk=0 must be at least 1"),
    ("batch_size", 0, ValueError, "batch_size=0 must be at least 1"),
    ("momentum", 1.0, ValueError, r"momentum=1 must be in \[0, 1\)"),
    ("momentum", math.nan, ValueError, "momentum=nan must be a finite number"),
    ("grad_clip", 0, ValueError, r"grad_clip=0 must be in \(0, inf\)"),
    ("grad_clip", -math.inf, ValueError, "grad_clip=-inf must be a finite number"),
    ("warmup_steps", -1, ValueError, "warmup_steps=-1 must be at least 0"),
    ("warmup_steps", 2.5, TypeError, "warmup_steps must be an int, not float"),
    ("tokens_per_step", 0, ValueError, "tokens_per_step=0 must be at least 1"),
    ("seed", -1, ValueError, "seed=-1 must be between 0 and"),
    ("steps", 0, ValueError, "steps=0 must be at least 1"),
    ("steps", True, TypeError, "steps must be an int, not bool"),
    ("seq_len", 1, ValueError, "seq_len=1 must be at least 2"),
    ("checkpoint_every", 0, ValueError, "checkpoint_every=0 must be at least 1"),
    ("progress", "no", TypeError, "progress must be True or False"),
]


@pytest.mark.parametrize("name, value, error, message", BAD_TRAINING, ids=[f"{n}={v!r}" for n, v, _, _ in BAD_TRAINING])
def test_bad_training_options_are_refused_before_any_work(model, name, value, error, message):
    with pytest.raises(error, match=message):
        tl.train_tuned_lens(model, TEXTS, **{**RUN, name: value})


# --------------------------------------------------------------------------------------------------
# random bad numbers into the public functions: a clear ValueError/TypeError, never another exception,
# never a result

_NOT_NUMBERS = st.sampled_from(["1", "ten", [1], b"1", 1j, {}])  # (None means "the default" for some)
_NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _bad(kind: str):
    """Values that are certainly not valid for an option of ``kind``."""
    common = st.one_of(_NOT_NUMBERS, _NON_FINITE)
    if kind == "count":  # an int of 1 or more
        return st.one_of(common, st.integers(max_value=0), st.floats(allow_nan=False, allow_infinity=False), st.just(True))
    if kind == "natural":  # an int of 0 or more
        return st.one_of(common, st.integers(max_value=-1), st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
    if kind == "positive":  # a finite number above 0
        return st.one_of(common, st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0), st.just(False))
    if kind == "non_negative":  # a finite number of 0 or more
        return st.one_of(common, st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False), st.integers(max_value=-1))
    if kind == "fraction":  # [0, 1)
        return st.one_of(common, st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=-1e-300, allow_nan=False))
    if kind == "open_fraction":  # (0, 1)
        return st.one_of(common, st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=0.0, allow_nan=False))
    raise AssertionError(kind)


TRAINING_OPTIONS = {
    "steps": "count", "tokens_per_step": "count", "batch_size": "count", "vocab_chunk": "count",
    "checkpoint_every": "count", "warmup_steps": "natural", "seed": "natural", "lr": "positive",
    "grad_clip": "positive", "weight_decay": "non_negative", "momentum": "fraction",
}
LENS_OPTIONS = {"top_k": "count", "chunk_size": "count"}
DIFF_OPTIONS = {"n_bootstrap": "count", "confidence": "open_fraction", "seed": "natural"}
EVAL_OPTIONS = {"seq_len": "count", "batch_size": "count", "max_tokens": "count", "n_bootstrap": "natural",
                "seed": "natural", "confidence": "open_fraction", "chunk_size": "count"}

_MODEL = None


def _tiny():
    global _MODEL
    if _MODEL is None:
        _MODEL = tiny_model("LN", folded=False)
    return _MODEL


def _options(table):
    return st.sampled_from(sorted(table)).flatmap(lambda name: st.tuples(st.just(name), _bad(table[name])))


def _refused(call) -> None:
    try:
        call()
    except (ValueError, TypeError):
        return
    raise AssertionError("a bad option was accepted")


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(option=_options(TRAINING_OPTIONS))
def test_random_bad_numbers_to_train_tuned_lens(option):
    name, value = option
    _refused(lambda: tl.train_tuned_lens(_tiny(), TEXTS, **{**RUN, name: value}))


@FUZZ
@given(option=_options(LENS_OPTIONS))
def test_random_bad_numbers_to_logit_lens(option):
    name, value = option
    _refused(lambda: tl.logit_lens(_tiny(), "Hello world", **{name: value}))


@FUZZ
@given(option=_options(DIFF_OPTIONS))
def test_random_bad_numbers_to_logit_diff(option):
    name, value = option
    _refused(lambda: tl.logit_diff(_tiny(), "Hello world", 7, 3, **{name: value}))


@FUZZ
@given(option=_options({"top_k": "count", "chunk_size": "count"}))
def test_random_bad_numbers_to_component_lens_and_attribution_positions(option):
    name, value = option
    _refused(lambda: tl.component_lens(_tiny(), "Hello world", **{name: value}))


@FUZZ
@given(position=st.one_of(
    st.sampled_from(["1", "first", b"1", 1j, {}, [1.5], ["a"], [math.nan]]), _NON_FINITE,
    st.integers(min_value=64), st.integers(max_value=-65), st.floats(allow_nan=False),
))
def test_random_bad_positions_to_direct_logit_attribution(position):
    _refused(lambda: tl.direct_logit_attribution(_tiny(), "Hello world", 7, 3, positions=position))


@FUZZ
@given(option=_options(EVAL_OPTIONS))
def test_random_bad_numbers_to_evaluate_lenses(option):
    name, value = option
    _refused(lambda: tl.evaluate_lenses(_tiny(), TEXTS[:3], progress=False, **{name: value}))


@pytest.mark.skipif(_compat.HookedEncoder is None, reason="the masked-LM lens needs HookedEncoder (TransformerLens 3.9)")
@FUZZ
@given(option=_options({"top_k": "count", "chunk_size": "count", "n_track": "count"}))
def test_random_bad_numbers_to_masked_lens(option):
    from tests.encoder_helpers import tiny_encoder

    name, value = option
    _refused(lambda: tl.masked_lens(tiny_encoder("bert"), "The cat sat on the [MASK].", **{name: value}))


# --------------------------------------------------------------------------------------------------
# torchrun: the gradients of every rank summed, so two processes give one process's lens

_TORCHRUN_SCRIPT = """
import sys, torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.helpers import SENTENCES, tiny_model
import tl_logitlens as tl
dist.init_process_group("gloo")
torch.manual_seed(0)
lens = tl.train_tuned_lens(tiny_model("LN", folded=False), SENTENCES * 4, steps=5, tokens_per_step=96,
                           seq_len=16, batch_size=1, progress=False)
if dist.get_rank() == 0:
    torch.save({{"weight": lens.weight.detach(), "bias": lens.bias.detach(),
                "loss": lens.meta["training"]["loss_per_step"]}}, sys.argv[1])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_train_the_lens_one_process_trains(tmp_path, model):
    """6 windows a step, 3 per rank; the sums over ranks are added in rank order, one process's over
    batches in window order, so the two agree to float32 rounding of that order (stated: 1e-6)."""
    script = tmp_path / "train.py"
    script.write_text(_TORCHRUN_SCRIPT.format(root=str(ROOT)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(script), str(tmp_path / "two.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = tl.train_tuned_lens(model, SENTENCES * 4, steps=5, tokens_per_step=96, seq_len=16, batch_size=1, progress=False)
    assert_close(two["weight"], one.weight.detach(), atol=1e-6, rtol=0)
    assert_close(two["bias"], one.bias.detach(), atol=1e-6, rtol=0)
    assert two["loss"] == pytest.approx(one.meta["training"]["loss_per_step"], rel=1e-6)
    assert one.meta["training"]["loss_per_step"][-1] < one.meta["training"]["loss_per_step"][0]
