"""Valid input that was refused (#23, finding 8): a masked LM from the command line, a bf16 model with
its own tuned lens."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl


def test_cli_runs_a_masked_lm(tmp_path, monkeypatch, capsys):
    """The CLI's default --sites is a list (["resid_pre"]); the report's masked-LM check compared it with
    the string "resid_pre" and refused every masked-LM run with "sites, norm and lens do not apply"."""
    from tl_logitlens.cli.commands import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "demo-bert", "The cat sat on the [MASK].", "--json", "out.json", "--no-report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "out.json").is_file()


@pytest.mark.parametrize("sites", ["resid_pre", ["resid_pre"], ("resid_pre",)], ids=["str", "list", "tuple"])
def test_report_on_a_masked_lm_takes_the_default_sites_in_any_spelling(sites):
    from tl_logitlens.reporting import MaskedReportData, compute_report

    data = compute_report("demo-bert", "The cat sat on the [MASK].", sites=sites)
    assert isinstance(data, MaskedReportData)
    with pytest.raises(ValueError, match="sites, norm and lens do not apply"):
        compute_report("demo-bert", "The cat sat on the [MASK].", sites=["resid_mid"])


def test_bf16_demo_model_takes_its_own_tuned_lens():
    """The centring check's tolerance follows the dtype: the demo model's centred rows, rounded to bf16,
    keep a mean of 1.9e-3 of their RMS (above the float32 tolerance of 1e-3, below bf16's eps 7.8e-3)."""
    model = tl.load_model("demo", dtype="bfloat16")
    lens = tl.load_lens("demo", model)
    result = tl.logit_lens(model, "The dog was very", lens=lens)
    assert torch.isfinite(result.top_logprobs[result.valid[None].expand_as(result.top_logprobs[..., 0])]).all()
    # and the uncentred model is still told apart at bf16
    uncentred = tl.load_model("demo", dtype="bfloat16", center_writing_weights=False)
    with pytest.raises(ValueError, match="writing weights are not centred"):
        tl.load_lens("demo", uncentred)
