"""The Jacobian lens as a map: J = I is the logit lens exactly, sites it does not read are refused,
merging weights by prompts, and broken matrices never make a lens."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import assert_close, assert_not_close, tiny_model


def identity_lens(model, layers=None) -> tl.JacobianLens:
    n, d = model.cfg.n_layers, model.cfg.d_model
    layers = range(n - 1) if layers is None else layers
    return tl.JacobianLens({layer: torch.eye(d) for layer in layers}, n_prompts=1, d_model=d, n_layers=n)


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_identity_jacobians_are_the_logit_lens_exactly(normalization):
    model = tiny_model(normalization, folded=False)
    prompts = ["Hello world, this is", "A short one"]
    ours = tl.logit_lens(model, prompts, lens=identity_lens(model), sites="resid_post", targets=[" w"])
    plain = tl.logit_lens(model, prompts, sites="resid_post", targets=[" w"])
    for field in ("top_ids", "top_logprobs", "entropy", "kl_to_final", "next_logprobs", "target_logprobs"):
        assert_close(getattr(ours, field), getattr(plain, field), atol=0, rtol=0, equal_nan=True, msg=field)
    assert ours.lens_name == "Jacobian lens"


def test_a_jacobian_changes_the_reading_at_its_layer_only():
    model = tiny_model("LN", folded=False)
    gen = torch.Generator().manual_seed(0)
    jlens = identity_lens(model)
    d = model.cfg.d_model
    jlens.jacobians[1] = torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen)
    ours = tl.logit_lens(model, "Hello world", lens=jlens, sites="resid_post")
    plain = tl.logit_lens(model, "Hello world", sites="resid_post")
    by_site = dict(zip(ours.labels, range(len(ours.labels))))
    assert_close(ours.entropy[by_site["0_post"]], plain.entropy[by_site["0_post"]], atol=0, rtol=0)
    assert_not_close(ours.entropy[by_site["1_post"]], plain.entropy[by_site["1_post"]])
    # the slow way: translate by hand, final norm, unembed, log-softmax
    _, cache = model.run_with_cache("Hello world")
    h = cache["blocks.1.hook_resid_post"][0]
    logp = (model.ln_final(h @ jlens.jacobians[1].T) @ model.W_U + model.b_U).log_softmax(-1)
    assert_close(ours.top_logprobs[by_site["1_post"], 0, :, 0], logp.max(-1).values, atol=1e-5)


@pytest.mark.parametrize("site", ["0_pre", "1_mid", "resid_pre"], ids=["pre", "mid", "pre-kind"])
def test_sites_it_does_not_read_are_refused_by_name(site):
    model = tiny_model("LN", folded=False)
    with pytest.raises(ValueError, match=r"reads the outputs of blocks '0_post', '1_post' and 'final_post'.*sites='resid_post'"):
        tl.logit_lens(model, "Hello world", lens=identity_lens(model), sites=site)


def test_the_last_block_reads_with_the_identity():
    model = tiny_model("LN", folded=False)
    n = model.cfg.n_layers
    jlens = identity_lens(model)
    states = torch.randn(4, model.cfg.d_model)
    assert jlens.translate(f"{n - 1}_post", states) is states
    assert jlens.translate("final_post", states) is states


def test_merge_is_the_prompt_weighted_mean():
    a = tl.JacobianLens({0: torch.ones(2, 2)}, n_prompts=1, d_model=2, n_layers=2)
    b = tl.JacobianLens({0: torch.full((2, 2), 4.0)}, n_prompts=3, d_model=2, n_layers=2)
    merged = tl.JacobianLens.merge([a, b])
    assert merged.n_prompts == 4
    assert_close(merged.jacobians[0], torch.full((2, 2), 3.25))
    with pytest.raises(ValueError, match="share source layers"):
        tl.JacobianLens.merge([a, tl.JacobianLens({0: torch.ones(3, 3)}, n_prompts=1, d_model=3, n_layers=2)])
    with pytest.raises(ValueError, match="n_prompts of 1 or more"):
        tl.JacobianLens.merge([a, tl.JacobianLens({0: torch.ones(2, 2)}, n_prompts=0, d_model=2, n_layers=2)])
    with pytest.raises(ValueError, match="non-empty list"):
        tl.JacobianLens.merge([])


@pytest.mark.parametrize(
    "jacobians, kwargs, message",
    [
        ({}, {}, "at least one matrix"),
        ({0: torch.full((2, 2), float("nan"))}, {}, r"J\[0\] holds NaN or inf"),
        ({0: torch.ones(2, 3)}, {}, r"J\[0\] has shape \[2, 3\]"),
        ({1: torch.ones(2, 2)}, {"n_layers": 2}, "source layers are 0 to 0"),
        ({-1: torch.ones(2, 2)}, {}, "ints from 0"),
        ({0: torch.ones(2, 2, dtype=torch.long)}, {}, "must be a float tensor"),
    ],
    ids=["empty", "nan", "shape", "last-layer", "negative", "integer"],
)
def test_broken_matrices_are_refused(jacobians, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tl.JacobianLens(jacobians, n_prompts=1, d_model=2, **kwargs)


def test_a_lens_for_another_model_is_refused():
    model = tiny_model("LN", folded=False)
    with pytest.raises(ValueError, match="d_model 5"):
        tl.logit_lens(model, "Hi", lens=tl.JacobianLens({0: torch.eye(5)}, n_prompts=1, d_model=5), sites="resid_post")
    wrong = tl.JacobianLens({0: torch.eye(model.cfg.d_model)}, n_prompts=1, d_model=model.cfg.d_model, n_layers=7)
    with pytest.raises(ValueError, match="7-layer model"):
        tl.logit_lens(model, "Hi", lens=wrong, sites="resid_post")
