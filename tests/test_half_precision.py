"""Half-precision models, full-precision statistics: a bf16 (or fp16) model fits a Jacobian lens and trains
a tuned lens, and both land within a stated relative error of the fit of the same weights in float32.

The float32 twin holds exactly the 16-bit model's weights (each rounded value cast up), so the error
measured is the 16-bit forward/backward pass's alone, not a difference of weights."""

from __future__ import annotations

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, tiny_model
from tl_logitlens.core import kernel
from tl_logitlens.core.kernel import Unembedding, unembed_metrics
from tl_logitlens.lenses.jacobian_fitting import _check_finite_sums

TEXTS = [*SENTENCES, " ".join(SENTENCES)]
FIT = {"seq_len": 24, "skip_first": 3, "progress": False}
TRAIN = {"steps": 4, "tokens_per_step": 64, "seq_len": 16, "progress": False}
# Relative Frobenius error per layer against the float32 twin. bfloat16 keeps 8 bits of mantissa (a
# relative rounding of 2^-9 = 2e-3 per operation), float16 11. Measured on these tiny random models,
# whose weights (~1.5/sqrt(d)) amplify rounding more than a trained model's: J-lens 3.9e-2 and 2.0e-2
# (bf16), 3.6e-3 and 1.8e-3 (fp16); tuned-lens translators 1.4e-2 to 2.6e-2 (bf16). The bounds leave
# about 2.5x room; on the trained demo model the errors are 4e-4 to 9e-4 (bf16 J-lens), see
# docs/half-precision.md.
JLENS_BOUND = {torch.bfloat16: 0.1, torch.float16: 1e-2}
TUNED_BOUND = {torch.bfloat16: 0.065}


def _twins(dtype: torch.dtype, normalization: str = "LN") -> tuple[object, object]:
    """A random ``dtype`` model and its float32 twin with exactly the same (rounded) weights."""
    low = tiny_model(normalization, dtype=dtype)
    full = tiny_model(normalization, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in low.state_dict().items()}
    full.load_state_dict(state)
    assert low.W_U.dtype == dtype and full.W_U.dtype == torch.float32
    return low, full


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_16_bit_model_fits_a_jacobian_lens_close_to_its_float32_twin(dtype):
    low, full = _twins(dtype)
    lens_low = tl.fit_jacobian_lens(low, TEXTS, **FIT)
    lens_full = tl.fit_jacobian_lens(full, TEXTS, **FIT)
    assert lens_low.meta["fit_dtype"] == str(dtype).removeprefix("torch.")
    assert lens_low.source_layers == lens_full.source_layers == (0, 1)
    for layer, reference in lens_full.jacobians.items():
        matrix = lens_low.jacobians[layer]
        assert matrix.dtype == torch.float32 and bool(torch.isfinite(matrix).all())
        error = _relative_error(matrix, reference)
        assert 0 < error < JLENS_BOUND[dtype], f"layer {layer}: relative error {error:.2e}"
    # the 16-bit lens reads the 16-bit model
    result = tl.logit_lens(low, SENTENCES[:1], lens=lens_low)
    assert bool(torch.isfinite(result.entropy).all())


def test_a_bf16_model_trains_a_tuned_lens_close_to_its_float32_twin():
    low, full = _twins(torch.bfloat16, "RMS")
    lens_low = tl.train_tuned_lens(low, TEXTS, **TRAIN)
    lens_full = tl.train_tuned_lens(full, TEXTS, **TRAIN)
    # translators, their optimiser and the loss are float32 whatever the model's dtype
    assert lens_low.weight.dtype == lens_low.bias.dtype == torch.float32
    for layer in range(lens_full.n_layers):
        got = torch.cat([lens_low.weight[layer].detach().flatten(), lens_low.bias[layer].detach()])
        want = torch.cat([lens_full.weight[layer].detach().flatten(), lens_full.bias[layer].detach()])
        error = _relative_error(got, want)
        assert 0 < error < TUNED_BOUND[torch.bfloat16], f"translator {layer}: relative error {error:.2e}"
    losses_low = torch.tensor(lens_low.meta["training"]["loss_per_step"])
    losses_full = torch.tensor(lens_full.meta["training"]["loss_per_step"])
    assert float((losses_low - losses_full).abs().max() / losses_full.abs().max()) < 2e-2


@pytest.mark.parametrize(
    ("dtype", "hint"),
    [
        (torch.float16, r"float16 holds values up to 65504.*bfloat16"),
        (torch.bfloat16, r"check the model's weights"),
    ],
    ids=["fp16", "bf16"],
)
def test_non_finite_jacobian_sums_are_refused_saying_why(dtype, hint):
    sums = torch.zeros(2, 4, 4, dtype=torch.float64)
    _check_finite_sums(sums, dtype, 3)  # finite: nothing to say
    sums[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=rf"hold NaN or inf after 3 prompts.*{hint}"):
        _check_finite_sums(sums, dtype, 3)


def test_an_overflowing_float16_fit_is_refused():
    """A float16 model whose activations overflow: the fit raises instead of averaging inf."""
    low = tiny_model("LN", dtype=torch.float16)
    with torch.no_grad():
        low.blocks[0].mlp.W_out.mul_(4e4)  # the MLP's output overflows float16's 65504
    with pytest.raises(ValueError, match=r"float16 holds values up to 65504"):
        tl.fit_jacobian_lens(low, TEXTS, **FIT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sites_stacked_into_one_matmul_give_the_numbers_of_one_matmul_each(dtype, monkeypatch):
    """Each tile's logits of a group of sites come from one matmul of their stacked states (GROUP_ROWS): the
    same statistics as one matmul per site, to float32 rounding, and the same ranks, on a 20000-token
    vocabulary, with groups that do and do not divide the sites."""
    gen = torch.Generator().manual_seed(0)
    d_model, d_vocab, rows, n_sites = 16, 20_000, 40, 5
    W_U = (3 * torch.randn(d_model, d_vocab, generator=gen) / d_model**0.5).to(dtype)
    b_U = (0.5 * torch.randn(d_vocab, generator=gen)).to(dtype)
    states = torch.randn(n_sites, rows, d_model, generator=gen).to(dtype)
    query = torch.randint(0, d_vocab, (rows, 2), generator=gen)

    def run(group_rows):
        monkeypatch.setattr(kernel, "GROUP_ROWS", group_rows)
        return unembed_metrics(
            lambda s, sl: states[s, sl],
            n_sites,
            lambda sl: states[-1, sl],
            frozenset({n_sites - 1}),
            query,
            5,
            16,
            Unembedding(W_U, b_U),
            "cpu",
        )

    one_each = run(16)  # chunks of 16 rows: one site per matmul
    for group_rows in (kernel.GROUP_ROWS, 32, 48):  # every site at once; 2 sites a matmul; 3 (5 = 3 + 2)
        stacked = run(group_rows)
        # bf16 logits tie often (8 bits of mantissa): tied top tokens may come in another order, their values not
        assert torch.equal(stacked.query_ranks, one_each.query_ranks)
        assert (stacked.top_ids == one_each.top_ids).float().mean() > 0.9
        for name in ("top_logprobs", "entropy", "kl_to_final", "query_logprobs"):
            assert_close(getattr(stacked, name), getattr(one_each, name), atol=2e-5, msg=name)
