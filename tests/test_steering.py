"""Lens directions and the interventions along them: the exact identity (ablating a token's lens
direction leaves its logit at the bias) on LN and RMS models, for the logit, tuned and Jacobian lenses."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import assert_close, tiny_model

MODELS = [("LN", False), ("LN", True), ("RMS", False), ("RMS", True)]
IDS = ["LN", "LN-folded", "RMS", "RMS-folded"]
TOKEN = 7


def bias_logit(model, t: int) -> torch.Tensor:
    """What the final logit of ``t`` is when the normalised state has no component along it."""
    out = model.b_U[t].float() if getattr(model, "b_U", None) is not None else torch.tensor(0.0)
    beta = getattr(model.ln_final, "b", None)
    return out + (0.0 if beta is None else (model.W_U[:, t].float() @ beta.float()))


@pytest.mark.parametrize("normalization, folded", MODELS, ids=IDS)
def test_ablating_the_logit_lens_direction_at_the_end_leaves_the_bias(normalization, folded):
    model = tiny_model(normalization, folded=folded)
    with torch.no_grad(), model.hooks(fwd_hooks=[tl.ablate(model, None, "final_post", TOKEN)]):
        logits = model("Hello world, how are you")
    plain = model("Hello world, how are you")
    assert_close(logits[0, :, TOKEN], bias_logit(model, TOKEN).expand(logits.shape[1]), atol=1e-4)
    assert (plain[0, :, TOKEN] - bias_logit(model, TOKEN)).abs().max() > 1e-2  # it did something


def _lens_logit(model, lens, site, h, t):
    """The slow way: the lens's map by hand, the final norm, W_U and b_U."""
    if isinstance(lens, tl.JacobianLens):
        x = h @ lens.jacobians[lens.layer_of(site)].T
    else:
        x = lens.translate(site, h)
    return (model.ln_final(x[None])[0] @ model.W_U + model.b_U)[:, t]


@pytest.mark.parametrize("normalization, folded", MODELS, ids=IDS)
@pytest.mark.parametrize("kind", ["tuned", "jacobian"])
def test_a_state_orthogonal_to_the_lens_vector_reads_the_bias(normalization, folded, kind):
    model = tiny_model(normalization, folded=folded)
    d, n = model.cfg.d_model, model.cfg.n_layers
    gen = torch.Generator().manual_seed(1)
    if kind == "tuned":
        lens = tl.TunedLens.for_model(model)
        with torch.no_grad():
            lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=gen))  # bias stays 0: a linear map
        site = "1_post"
    else:
        lens = tl.JacobianLens({layer: torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen) for layer in range(n - 1)},
                               n_prompts=1, d_model=d, n_layers=n)
        site = "0_post"
    v = tl.lens_vectors(model, lens, site, [TOKEN])[0]
    h = 3 * torch.randn(5, d, generator=gen)
    h_perp = h - (h @ v)[:, None] * v / (v @ v)
    with torch.no_grad():
        assert_close(_lens_logit(model, lens, site, h_perp, TOKEN), bias_logit(model, TOKEN).expand(5), atol=1e-4)
        assert (_lens_logit(model, lens, site, h, TOKEN) - bias_logit(model, TOKEN)).abs().max() > 1e-2


def test_steering_along_a_token_raises_its_logit_monotonically():
    model = tiny_model("LN", folded=False)
    logit = []
    for alpha in (0.0, 2.0, 8.0):
        with torch.no_grad(), model.hooks(fwd_hooks=[tl.steer(model, None, "final_post", TOKEN, alpha)]):
            logit.append(float(model("Hello world")[0, -1, TOKEN]))
    assert logit[0] < logit[1] < logit[2]


def test_steering_only_the_positions_asked():
    model = tiny_model("RMS", folded=False)
    with torch.no_grad():
        plain = model("Hello world, how are you")
        with model.hooks(fwd_hooks=[tl.steer(model, None, "final_post", TOKEN, 5.0, positions=[-1])]):
            steered = model("Hello world, how are you")
    assert_close(steered[0, :-1], plain[0, :-1], atol=1e-6)
    assert float(steered[0, -1, TOKEN]) > float(plain[0, -1, TOKEN])


def test_ablating_several_tokens_removes_the_whole_span():
    model = tiny_model("LN", folded=False)
    tokens = [3, 7, 11]
    with torch.no_grad(), model.hooks(fwd_hooks=[tl.ablate(model, None, "final_post", tokens)]):
        logits = model("Hello world")
    for t in tokens:
        assert_close(logits[0, :, t], bias_logit(model, t).expand(logits.shape[1]), atol=1e-4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: tl.lens_vectors(m, None, "resid_post", 7), ValueError, "one site label"),
        (lambda m: tl.lens_vectors(m, None, "final_post", " not one token"), ValueError, "not a single token"),
        (lambda m: tl.lens_vectors(m, None, "final_post", []), ValueError, "non-empty list"),
        (lambda m: tl.steer(m, None, "final_post", 7, float("nan")), ValueError, "finite number"),
        (lambda m: tl.steer(m, None, "final_post", 7, 1.0, positions="last"), TypeError, "positions must be"),
        (lambda m: tl.lens_vectors(m, tl.JacobianLens({0: torch.eye(32)}, n_prompts=1, d_model=32), "1_mid", 7),
         ValueError, "reads the outputs of blocks"),
    ],
    ids=["kind-not-label", "multi-token", "no-tokens", "nan-alpha", "positions-string", "site-lens-does-not-read"],
)
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_model("LN", folded=False))
