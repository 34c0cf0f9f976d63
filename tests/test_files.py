"""Files the package writes are replaced atomically, and checkpoints refuse what they should."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tl_logitlens.core.files import Checkpoint, atomic_write, atomic_write_text


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half of the new conte")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_checkpoint_round_trip_and_first_run(tmp_path):
    ckpt = Checkpoint(tmp_path / "ck", {"lr": 1.0, "layers": (0, 1)}, job="test job")
    assert ckpt.load() is None
    state = {"step": 3, "weight": torch.randn(4, 4, dtype=torch.float64), "rng": torch.Generator().get_state()}
    ckpt.save(state)
    again = Checkpoint(tmp_path / "ck", {"layers": [0, 1], "lr": 1.0}, job="test job").load()  # tuple == list
    assert again["step"] == 3 and torch.equal(again["weight"], state["weight"]) and torch.equal(again["rng"], state["rng"])


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    Checkpoint(tmp_path, {"lr": 1.0, "steps": 10}, job="test job").save({"step": 1})
    with pytest.raises(ValueError, match=r"other settings \(lr: 1.0 then, 0.5 now\)"):
        Checkpoint(tmp_path, {"lr": 0.5, "steps": 10}, job="test job").load()
    with pytest.raises(ValueError, match="holds a checkpoint of 'test job', not of 'other job'"):
        Checkpoint(tmp_path, {"lr": 1.0, "steps": 10}, job="other job").load()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_malicious_checkpoint_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"job": "x", "settings": {}, "state": _Evil()}))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        Checkpoint(tmp_path, {}, job="x").load()
    assert not (tmp_path / "pwned.txt").exists()


def test_a_checkpoint_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Checkpoint(tmp_path / "f", {}, job="x")
