"""The Jacobian lens shipped for the demo model: it loads by name, is tied to the demo model, is in the
package's data, and its card's numbers are what ``tl.evaluate_lenses`` gives on the held-out stories."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import assert_close
from tl_logitlens.lenses.fingerprint import fingerprint_distance
from tl_logitlens.lenses.loading import BUILTIN_LENSES

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tl_logitlens" / "demo_models" / "demo" / "jacobian_lens"


def _script():
    """scripts/fit_demo_jacobian.py as a module (its card and evaluation, not its fit)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("fit_demo_jacobian", ROOT / "scripts" / "fit_demo_jacobian.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_it_loads_by_name_for_the_demo_model_only():
    model = tl.load_model("demo")
    jlens = tl.load_lens("demo-jacobian", model)
    assert isinstance(jlens, tl.JacobianLens)
    assert BUILTIN_LENSES["demo-jacobian"] == FOLDER
    assert jlens.source_layers == tuple(range(model.cfg.n_layers - 1))
    assert jlens.d_model == model.cfg.d_model and jlens.n_prompts > 0
    # the stored fingerprint was computed on another CPU: its log-probs agree to float32 rounding of
    # another kernel (9.5e-7 apart on an AVX-512 machine), far inside the load check's 1e-3; not to the bit
    stored = jlens.meta["fingerprint"]
    assert fingerprint_distance(model, stored) < 1e-5
    assert jlens.default_sites == "resid_post"
    res = tl.logit_lens(model, "The dog was very", lens=jlens)  # default sites: the ones it reads
    assert res.labels[0] == "0_post"


def test_it_is_small_and_in_the_package_data():
    size = sum(f.stat().st_size for f in FOLDER.iterdir())
    assert size < 400_000, size
    assert {p.name for p in FOLDER.iterdir()} == {"jacobian_lens.safetensors", "jacobian_lens.json", "LENS_CARD.md"}
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'packages = ["tl_logitlens"]' in pyproject  # the wheel takes the package folder whole


def test_it_was_fitted_on_training_stories_never_on_the_held_out_ones():
    meta = json.loads((FOLDER / "jacobian_lens.json").read_text(encoding="utf-8"))
    held_out = set(tl.demo_texts())
    corpus = ROOT.parent / "shared" / "corpora" / "tinystories_1000.json"
    if corpus.is_file():
        stories = json.loads(corpus.read_text(encoding="utf-8"))
        assert not held_out & {stories[i] for i in meta["train_indices"]}
    assert len(meta["train_indices"]) == meta["n_prompts"]


def test_the_card_is_written_from_the_recorded_numbers():
    meta = json.loads((FOLDER / "jacobian_lens.json").read_text(encoding="utf-8"))
    assert (FOLDER / "LENS_CARD.md").read_text(encoding="utf-8") == _script().card(meta)


@pytest.mark.slow
def test_the_recorded_numbers_are_what_evaluate_lenses_gives():
    """The script's ``--check`` (``tl.evaluate_lenses`` on the 100 held-out stories, point estimates only:
    the bootstrap's replicates do not change them) in a process of its own: under pytest the run-time
    shape checks of every kernel call make it several times slower (about 3 minutes outside, under load)."""
    model = tl.load_model("demo")
    recorded = tl.load_lens("demo-jacobian", model).meta["evaluation"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fit_demo_jacobian.py"), "--check"],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again["sites"] == recorded["sites"] and again["tokens"] == recorded["tokens"]
    for name, stats in recorded["lenses"].items():
        for stat in ("kl_to_final", "top1_agreement"):
            # float32 rounding of the forward and the kernel's block sums: far below the card's 3 decimals
            assert_close(torch.tensor(again["lenses"][name][stat]), torch.tensor(stats[stat]), atol=1e-5, rtol=1e-4,
                         msg=f"{name} {stat}")
