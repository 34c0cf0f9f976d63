"""No statistic is ever computed from NaN or inf as if it were a number (#23, finding 1).

Each analysis meets a NaN in one ``W_in`` entry, an inf in ``W_U``, a NaN column of ``W_U``, a cache of NaN
residuals and a lens with NaN weights, and must raise a ``ValueError`` naming where it met them (the first
site or attribution row, the prompt and the token position; or the lens file and tensor) and what to
check. Before, each finished with finite-looking top ids, ranks, bootstrap intervals and attributions.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import requires_hooked_encoder, tiny_model

PROMPT = "Hello world and the cat"
CHECK = r"Check the model's weights"


def _broken(where: str):
    """A tiny LN model with one broken weight, and the token id its broken ``W_U`` column belongs to."""
    model = tiny_model("LN", folded=False)
    target = 7
    with torch.no_grad():
        if where == "W_in":
            model.blocks[1].mlp.W_in[0, 0] = float("nan")
        elif where == "W_U":
            model.W_U[0, target] = float("inf")
        else:
            model.W_U[:, target] = float("nan")
    return model, target


CASES = ["W_in", "W_U", "W_U column"]
IDS = ["nan-in-mlp", "inf-in-unembed", "nan-column"]
# where the first non-finite value appears: the MLP of block 1 writes it into 2_pre; a broken W_U column
# breaks the readout of every site
FIRST_SITE = {"W_in": "'2_pre'", "W_U": "'0_pre'", "W_U column": "'0_pre'"}


@pytest.mark.parametrize("where", CASES, ids=IDS)
def test_logit_diff_refuses_non_finite_values(where):
    model, target = _broken(where)
    with pytest.raises(ValueError, match=rf"NaN or inf at site {FIRST_SITE[where]}, prompt 0, position \d+: .*{CHECK}"):
        tl.logit_diff(model, PROMPT, target, 3)


def test_direction_lens_refuses_non_finite_states():
    """(A non-finite direction is refused as an argument; here the states are what is broken.)"""
    model, _ = _broken("W_in")
    with pytest.raises(ValueError, match=rf"NaN or inf at site '2_pre', prompt 0, position \d+: .*{CHECK}"):
        tl.direction_lens(model, PROMPT, torch.ones(model.cfg.d_model))


# where the first non-finite value is written: block 1's MLP output (whichever unit the rows are); a
# broken W_U column is the direction every row is read along
DLA_FIRST = {"W_in": r"'blocks.1.hook_mlp_out' \(row '(1_mlp_out|L1N)'\), prompt 0, position \d+", "W_U": "the direction"}


@pytest.mark.parametrize("unit", ["component", "head", "head_source", "neuron"])
@pytest.mark.parametrize("where", CASES, ids=IDS)
def test_direct_logit_attribution_refuses_non_finite_values(where, unit):
    model, target = _broken(where)
    first = DLA_FIRST.get(where, "the direction")
    with pytest.raises(ValueError, match=rf"direct logit attribution met NaN or inf (at|in) {first}.*{CHECK}"):
        tl.direct_logit_attribution(model, PROMPT, target, 3, unit=unit)


@pytest.mark.parametrize("where", CASES, ids=IDS)
def test_component_lens_refuses_non_finite_values(where):
    model, _ = _broken(where)
    with pytest.raises(ValueError, match=rf"component lens met NaN or inf at row '\w+', prompt 0, position \d+: .*{CHECK}"):
        tl.component_lens(model, PROMPT)


def test_a_cache_of_nan_residuals_is_refused_by_every_analysis():
    model = tiny_model("LN", folded=False)
    _, cache = model.run_with_cache(model.to_tokens(PROMPT))
    cache.cache_dict["blocks.1.hook_resid_pre"][0, 2] = float("nan")
    cache.cache_dict["blocks.1.hook_mlp_out"][0, -1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf at site '1_pre', prompt 0, position 2"):
        tl.logit_lens(model, PROMPT, cache=cache)
    with pytest.raises(ValueError, match=r"NaN or inf at site '1_pre', prompt 0, position 2"):
        tl.logit_diff(model, PROMPT, 7, 3, cache=cache, positions=None)
    n_last = model.to_tokens(PROMPT).shape[1] - 1
    with pytest.raises(ValueError, match=rf"NaN or inf at 'blocks.1.hook_mlp_out' \(row '1_mlp_out'\), prompt 0, position {n_last}"):
        tl.direct_logit_attribution(model, PROMPT, 7, 3, cache=cache)


def test_padding_is_not_mistaken_for_a_non_finite_value():
    """Padding cells hold NaN by design; a batch of unequal prompts on a sound model works."""
    model = tiny_model("LN", folded=False)
    prompts = ["Hello", "Hello world and the cat sat"]
    assert tl.logit_diff(model, prompts, 7, 3, positions=None).values.isnan().any()
    tl.direct_logit_attribution(model, prompts, 7, 3, positions=[0, 1], unit="head")


@pytest.mark.parametrize("where", CASES, ids=IDS)
def test_report_refuses_non_finite_values_and_writes_nothing(tmp_path, where):
    model, target = _broken(where)
    out = tmp_path / "r.html"
    with pytest.raises(ValueError, match=rf"NaN or inf at .*{CHECK}"):
        tl.report(model, PROMPT, target=target, versus=3, out=out)
    assert not out.exists()


def test_cli_run_on_a_broken_model_is_a_one_line_error_exit_2(tmp_path, monkeypatch, capsys):
    from tl_logitlens.cli.commands import main
    from tl_logitlens.core import models

    model, _ = _broken("W_in")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: model)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "broken", PROMPT, "--json", "out.json"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "NaN or inf at site '2_pre', prompt 0" in err and "Check the model's weights" in err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "logit_lens_report.html").exists()


@requires_hooked_encoder
@pytest.mark.parametrize("where", ["W_in", "W_U"], ids=["nan-in-mlp", "inf-in-mlm-head"])
def test_masked_lens_refuses_non_finite_values(where):
    from tests.encoder_helpers import tiny_encoder

    model = copy.deepcopy(tiny_encoder("bert"))  # the helper's model is cached and shared: never poison it
    with torch.no_grad():
        if where == "W_in":
            model.blocks[1].mlp.W_in[0, 0] = float("nan")
        else:
            model.W_U[0, 5] = float("inf")
    first = "'2_pre'" if where == "W_in" else "'0_pre'"
    with pytest.raises(ValueError, match=rf"masked-LM lens met NaN or inf at site {first}, prompt 0, position \d+: .*{CHECK}"):
        tl.masked_lens(model, "The cat sat on the [MASK].")
    with pytest.raises(ValueError, match=r"masked-LM lens met NaN or inf"):
        tl.sliding_mask_lens(model, "The cat sat on the mat.")
