"""Default sites follow the lens: with no ``sites=`` every entry point that takes ``lens=`` reads the
lens's ``default_sites`` (the Jacobian lens: ``resid_post``; the logit and tuned lenses: ``resid_pre``,
bit for bit what the old default read); a ``sites=`` given is read as given, and a wrong one is refused."""

from __future__ import annotations

import json

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, tiny_model
from tl_logitlens.lenses import default_sites, lens_default_sites, named_lenses
from tl_logitlens.reporting import compute_report

FIELDS = ("top_ids", "top_logprobs", "entropy", "kl_to_final", "next_logprobs", "next_ranks")


def jacobian_for(model, seed: int = 0) -> tl.JacobianLens:
    d, n = model.cfg.d_model, model.cfg.n_layers
    gen = torch.Generator().manual_seed(seed)
    return tl.JacobianLens({layer: torch.eye(d) + 0.2 * torch.randn(d, d, generator=gen) for layer in range(n - 1)},
                           n_prompts=1, d_model=d, n_layers=n)


def tuned_for(model, seed: int = 1) -> tl.TunedLens:
    gen = torch.Generator().manual_seed(seed)
    lens = tl.TunedLens.for_model(model)
    with torch.no_grad():
        lens.weight.copy_(0.1 * torch.randn(lens.weight.shape, generator=gen))
        lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=gen))
    return lens


def post_labels(model) -> tuple[str, ...]:
    return (*(f"{layer}_post" for layer in range(model.cfg.n_layers - 1)), "final_post")


def pre_labels(model) -> tuple[str, ...]:
    return (*(f"{layer}_pre" for layer in range(model.cfg.n_layers)), "final_post")


class ProtocolOnlyLens:
    """A lens written against the protocol before ``default_sites`` existed."""

    name = "my lens"

    def check_model(self, model):
        return None

    def translate(self, site, states):
        return 2.0 * states


def test_each_lens_says_its_default_sites():
    model = tiny_model("LN")
    assert lens_default_sites(None) == "resid_pre"
    assert lens_default_sites(tl.TunedLens.for_model(model)) == "resid_pre"
    assert lens_default_sites(jacobian_for(model)) == "resid_post"
    lens = ProtocolOnlyLens()
    assert isinstance(lens, tl.Lens)  # default_sites is optional: older lenses still are lenses
    assert lens_default_sites(lens) == "resid_pre"


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        (("logit",), "resid_pre"),
        (("logit", "tuned"), "resid_pre"),
        (("jacobian",), "resid_post"),
        (("logit", "jacobian"), "resid_post"),  # resid_pre first, but the J-lens cannot read it
        (("jacobian", "logit", "tuned"), "resid_post"),
    ],
    ids=["logit", "logit+tuned", "jacobian", "logit+jacobian", "jacobian+logit+tuned"],
)
def test_several_lenses_default_to_the_first_default_all_of_them_read(which, expected):
    model = tiny_model("LN")
    make = {"logit": lambda: None, "tuned": lambda: tuned_for(model), "jacobian": lambda: jacobian_for(model)}
    assert default_sites(model, [make[w]() for w in which]) == expected


def test_lenses_with_no_default_in_common_are_refused():
    model = tiny_model("LN")

    class MidOnly(ProtocolOnlyLens):
        name = "mid lens"
        default_sites = "resid_mid"

        def translate(self, site, states):
            if not site.endswith("_mid") and site != "final_post":
                raise ValueError(f"the mid lens reads resid_mid only, not {site!r}")
            return states

    with pytest.raises(ValueError, match="read no site kind in common by default.*pass sites="):
        default_sites(model, [jacobian_for(model), MidOnly()])

    class Broken(ProtocolOnlyLens):
        default_sites = "resid_everywhere"

    with pytest.raises(ValueError, match="default_sites must be one of"):
        tl.logit_lens(model, "Hello", lens=Broken())


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_logit_lens_with_a_jacobian_lens_reads_resid_post_by_default(normalization):
    model = tiny_model(normalization)
    jlens = jacobian_for(model)
    res = tl.logit_lens(model, SENTENCES[:2], lens=jlens)
    assert res.labels == post_labels(model)
    explicit = tl.logit_lens(model, SENTENCES[:2], lens=jlens, sites="resid_post")
    for field in FIELDS:
        assert_close(getattr(res, field), getattr(explicit, field), atol=0, rtol=0, equal_nan=True, msg=field)


@pytest.mark.parametrize("which", ["logit", "tuned", "protocol-only"])
def test_logit_and_tuned_lens_defaults_are_bit_identical_to_resid_pre(which):
    model = tiny_model("LN")
    lens = {"logit": None, "tuned": tuned_for(model), "protocol-only": ProtocolOnlyLens()}[which]
    res = tl.logit_lens(model, SENTENCES[:2], lens=lens, targets=[" w"])
    old = tl.logit_lens(model, SENTENCES[:2], lens=lens, targets=[" w"], sites="resid_pre")
    assert res.labels == pre_labels(model)
    for field in (*FIELDS, "target_logprobs"):
        assert_close(getattr(res, field), getattr(old, field), atol=0, rtol=0, equal_nan=True, msg=field)
    diff = tl.logit_diff(model, SENTENCES[:2], 5, 7, lens=lens, n_bootstrap=2)
    old_diff = tl.logit_diff(model, SENTENCES[:2], 5, 7, lens=lens, n_bootstrap=2, sites="resid_pre")
    assert diff.labels == pre_labels(model)
    assert_close(diff.values, old_diff.values, atol=0, rtol=0, equal_nan=True)


def test_explicit_sites_are_read_as_given_and_a_wrong_one_is_refused():
    model = tiny_model("LN")
    jlens = jacobian_for(model)
    res = tl.logit_lens(model, "Hello there", lens=jlens, sites=["1_post", "final_post"])
    assert res.labels == ("1_post", "final_post")
    tuned = tl.logit_lens(model, "Hello there", lens=tuned_for(model), sites="resid_post")
    assert tuned.labels == post_labels(model)
    for call in (
        lambda: tl.logit_lens(model, "Hello there", lens=jlens, sites="resid_pre"),
        lambda: tl.logit_diff(model, "Hello there", 5, 7, lens=jlens, sites="resid_pre"),
        lambda: tl.compare_lenses(model, "Hello there", lenses=[None, jlens], sites="resid_pre"),
        lambda: tl.evaluate_lenses(model, ["Hello there"], lenses=jlens, sites="resid_pre", progress=False),
    ):
        with pytest.raises(ValueError, match="reads the outputs of blocks .* pass sites='resid_post'"):
            call()


def test_logit_diff_and_direction_lens_with_a_jacobian_lens():
    model = tiny_model("RMS")
    jlens = jacobian_for(model)
    diff = tl.logit_diff(model, SENTENCES[:2], 5, 7, lens=jlens, n_bootstrap=2)
    assert diff.labels == post_labels(model)
    explicit = tl.logit_diff(model, SENTENCES[:2], 5, 7, lens=jlens, n_bootstrap=2, sites="resid_post")
    assert_close(diff.values, explicit.values, atol=0, rtol=0, equal_nan=True)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    dl = tl.direction_lens(model, SENTENCES[:2], direction, lens=jlens, n_bootstrap=2)
    assert dl.labels == post_labels(model)
    dl_explicit = tl.direction_lens(model, SENTENCES[:2], direction, lens=jlens, n_bootstrap=2, sites="resid_post")
    assert_close(dl.values, dl_explicit.values, atol=0, rtol=0, equal_nan=True)
    plain = tl.direction_lens(model, SENTENCES[:2], direction, n_bootstrap=2)
    assert plain.labels == pre_labels(model)


def test_compare_lenses_defaults():
    model = tiny_model("LN")
    jlens, tuned = jacobian_for(model), tuned_for(model)
    cmp = tl.compare_lenses(model, SENTENCES[:2], lenses=[None, tuned, jlens])
    assert cmp.labels == post_labels(model)
    two = tl.compare_lenses(model, SENTENCES[:2], lenses=[None, tuned])
    assert two.labels == pre_labels(model)  # as logit_lens reads them by default
    alone = tl.logit_lens(model, SENTENCES[:2], lens=tuned)
    for field in FIELDS:
        assert_close(getattr(two, field)[1], getattr(alone, field), atol=0, rtol=0, equal_nan=True, msg=field)


def test_evaluate_lenses_defaults():
    model = tiny_model("LN")
    jlens, tuned = jacobian_for(model), tuned_for(model)
    texts = [s for s in SENTENCES[:3]]
    kw = {"n_bootstrap": 0, "progress": False}
    ev = tl.evaluate_lenses(model, texts, lenses=[None, tuned, jlens], **kw)
    assert ev.sites == post_labels(model)
    explicit = tl.evaluate_lenses(model, texts, lenses=[None, tuned, jlens], sites="resid_post", **kw)
    assert_close(ev.mean, explicit.mean, atol=0, rtol=0, equal_nan=True)
    assert tl.evaluate_lenses(model, texts, lenses=jlens, **kw).sites == post_labels(model)
    plain = tl.evaluate_lenses(model, texts, lenses=[None, tuned], **kw)
    old = tl.evaluate_lenses(model, texts, lenses=[None, tuned], sites="resid_pre", **kw)
    assert plain.sites == pre_labels(model)
    assert_close(plain.mean, old.mean, atol=0, rtol=0, equal_nan=True)


def test_compute_report_with_a_jacobian_lens_reads_resid_post():
    model = tiny_model("LN")
    jlens = jacobian_for(model)
    data = compute_report(model, SENTENCES[:2], lens=jlens, target=5, versus=7)
    assert data.sites == post_labels(model)
    assert data.logit_diff.labels == post_labels(model)
    assert data.evolution.labels == post_labels(model)
    plain = compute_report(model, SENTENCES[:2], target=5, versus=7)
    old = compute_report(model, SENTENCES[:2], target=5, versus=7, sites="resid_pre")
    assert plain.sites == pre_labels(model)
    for field in FIELDS:
        assert_close(getattr(plain.lens, field), getattr(old.lens, field), atol=0, rtol=0, equal_nan=True, msg=field)
    assert_close(plain.logit_diff.values, old.logit_diff.values, atol=0, rtol=0, equal_nan=True)


def test_cli_run_with_a_jacobian_lens_reads_resid_post(tmp_path, monkeypatch, capsys):
    from tl_logitlens.cli.commands import main
    from tl_logitlens.lenses.fingerprint import model_record

    model = tl.load_model("demo")
    jlens = jacobian_for(model)
    jlens.meta.update(model_record(model))
    path = jlens.save(tmp_path / "jlens")
    monkeypatch.chdir(tmp_path)
    code = main(["run", "demo", "The dog was very", "--lens", str(path), "--no-report", "--json", "out.json"])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert tuple(payload["sites"]) == post_labels(model)
    assert payload["lens_name"] == "Jacobian lens"
    assert "0_post" in capsys.readouterr().out
    code = main(["run", "demo", "The dog was very", "--lens", str(path), "--sites", "resid_pre", "--no-report"])
    assert code == 2
    assert "reads the outputs of blocks" in capsys.readouterr().err


def test_names_must_differ_wherever_lenses_are_shown_side_by_side():
    model = tiny_model("LN")
    a, b = tuned_for(model, 1), tuned_for(model, 2)
    how = r"both called 'tuned lens'.*lens_b.name = 'tuned lens B'.*or pass a dict"
    for call in (
        lambda: named_lenses(model, [a, b]),
        lambda: tl.compare_lenses(model, "Hello", lenses=[a, b]),
        lambda: tl.evaluate_lenses(model, ["Hello there"], lenses=[None, a, b], progress=False),
        lambda: compute_report(model, "Hello", lens=[None, a, b]),
    ):
        with pytest.raises(ValueError, match=how):
            call()
    b.name = "tuned lens B"
    assert tl.compare_lenses(model, "Hello", lenses=[a, b]).lenses == ("tuned lens", "tuned lens B")
    assert list(named_lenses(model, {"A": a, "B": b})) == ["A", "B"]
    # the logit lens's name is taken too
    c = tuned_for(model)
    c.name = "logit lens"
    with pytest.raises(ValueError, match="both called 'logit lens'"):
        tl.compare_lenses(model, "Hello", lenses=[None, c])


def test_cli_run_takes_several_lenses_and_shows_them_side_by_side(tmp_path, monkeypatch, capsys):
    from tl_logitlens.cli.commands import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    args = ["run", "demo", "The dog was very", "--no-report", "--json", "out.json"]
    assert main([*args, "--lens", "logit", "--lens", "demo", "--lens", "demo-jacobian"]) == 0
    out = capsys.readouterr().out
    table = out.split("3 lenses, top token per layer after 'The dog was very'")[1].split("\n\n")[0]
    assert table.splitlines()[1].split() == ["layer", "logit", "lens", "tuned", "lens", "Jacobian", "lens"]
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["0_post", "1_post", "2_post", "final_post"]
    assert all(len(line) <= 80 for line in out.splitlines())
    payload = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert payload["lens_name"] == "logit lens" and payload["sites"][0] == "0_pre"  # the first lens's tables
    # two lenses of one name are told apart by what was typed, as eval does
    assert main([*args, "--lens", "demo", "--lens", "demo"]) == 0
    assert "tuned lens (demo)" in capsys.readouterr().out
