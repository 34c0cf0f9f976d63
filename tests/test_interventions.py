"""decode_vector, the placebo, alpha sweeps and generation under hooks, each against a slow reference:
the lens's own translate and the final norm's gain by hand, explicit norms and dot products, one forward
per alpha with tl.steer, and a token-by-token loop with the hooks on."""

from __future__ import annotations

from functools import cache, lru_cache

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import (
    HAS_HOOKED_TRANSFORMER,
    NORM_IDS,
    NORM_VARIANTS,
    assert_close,
    assert_not_close,
    tiny_bridge,
    tiny_model,
)

PROMPT = "Once upon a time, there was a little girl"
TOKEN = 7


@cache
def model_of(normalization: str, folded: bool):
    return tiny_model(normalization, folded=folded)


def tuned_lens(model):
    """A tuned lens with a non-zero weight *and* bias (an affine map: decode_vector reads its linear part)."""
    lens = tl.TunedLens.for_model(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=gen))
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=gen))
    return lens


def jacobian_lens(model):
    d, n = model.cfg.d_model, model.cfg.n_layers
    gen = torch.Generator().manual_seed(4)
    mats = {layer: torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen) for layer in range(n - 1)}
    return tl.JacobianLens(mats, n_prompts=1, d_model=d, n_layers=n)


LENSES = {
    "logit": (lambda m: None, "1_post"),
    "tuned": (tuned_lens, "1_post"),
    "jacobian": (jacobian_lens, "0_post"),
}


def reference_scores(model, lens, site, x):
    """The slow way: the lens's own map on x minus on 0 (its linear part), the final norm's centring
    and gain as the model holds them, then one dot product per token with W_U's column."""
    zero = torch.zeros_like(x)
    moved = x if lens is None else lens.translate(site, x) - lens.translate(site, zero)
    kind = model.cfg.normalization_type
    ln = model.ln_final
    w = getattr(ln, "w", None)
    folded_bridge = (
        w is not None and bool((w == 1).all()) and not bool(getattr(ln, "b", torch.zeros(1)).any())
    )
    if kind in ("LN", "LNPre"):
        moved = moved - moved.mean(-1, keepdim=True)
    if kind in ("LN", "RMS") and w is not None and not folded_bridge:
        moved = moved * w.detach()
    return torch.stack(
        [torch.stack([row @ model.W_U[:, t].detach() for t in range(model.cfg.d_vocab)]) for row in moved]
    )


@pytest.mark.parametrize("normalization, folded", NORM_VARIANTS, ids=NORM_IDS)
@pytest.mark.parametrize("kind", list(LENSES))
def test_decode_vector_equals_the_slow_reference(normalization, folded, kind):
    model = model_of(normalization, folded)
    make, site = LENSES[kind]
    lens = make(model)
    x = torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference_scores(model, lens, site, x)
    out = tl.decode_vector(model, x, site=site, lens=lens, top_k=4, labels=["a", "b"])
    assert_close(out.scores, expected.float(), atol=1e-4, rtol=1e-4)
    order = expected.argsort(dim=-1, descending=True)
    assert out.top_ids.tolist() == order[:, :4].tolist()
    assert out.bottom_ids.tolist() == expected.argsort(dim=-1)[:, :4].tolist()
    # each score is the lens vector's dot product (lens_vectors is the per-token form of the same reading)
    v = tl.lens_vectors(model, lens, site, [3, 9])
    assert_close(out.scores[:, [3, 9]], x @ v.T, atol=1e-4, rtol=1e-4)
    frame = out.to_dataframe()
    assert len(frame) == 2 * 2 * 4 and set(frame["end"]) == {"positive", "negative"}
    # TransformerLens 4.3's lens vectors (M^T W_U[:, t], no gain, no centring) read the same way
    tl_out = tl.decode_vector(model, x, site=site, lens=lens, convention="transformer_lens")
    v_tl = tl.lens_vectors(model, lens, site, [3, 9], convention="transformer_lens")
    assert_close(tl_out.scores[:, [3, 9]], x @ v_tl.T, atol=1e-4, rtol=1e-4)


def test_decode_vector_normalize_divides_by_the_norm():
    model = model_of("LN", False)
    x = 3.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    raw = tl.decode_vector(model, x, top_k=3)
    unit = tl.decode_vector(model, x, top_k=3, normalize=True)
    assert_close(unit.scores, raw.scores / x.norm(), atol=1e-5)
    assert raw.tokens(0) == unit.tokens(0)
    assert raw.plot().data  # the figure draws


@lru_cache(maxsize=1)
def encoder():
    return tl.load_model("demo-bert")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: tl.decode_vector(m, torch.zeros(5)), ValueError, "d_model=32"),
        (lambda m: tl.decode_vector(m, torch.ones(32, dtype=torch.long)), TypeError, "floats"),
        (lambda m: tl.decode_vector(m, torch.full((32,), float("nan"))), ValueError, "NaN"),
        (lambda m: tl.decode_vector(m, torch.zeros(32)), ValueError, "zero"),
        (lambda m: tl.decode_vector(m, torch.ones(32), top_k=0), ValueError, "top_k"),
        (lambda m: tl.decode_vector(m, torch.ones(32), convention="tl"), ValueError, "convention"),
        (lambda m: tl.decode_vector(m, torch.ones(32), site="resid_post"), ValueError, "one site label"),
        (
            lambda m: tl.decode_vector(m, torch.ones(32), site="1_mid", lens=jacobian_lens(m)),
            ValueError,
            "reads the outputs of blocks",
        ),
        (lambda m: tl.decode_vector(encoder(), torch.ones(32)), TypeError, "masked language model"),
        (
            lambda m: tl.steering_sweep(m, PROMPT, TOKEN, [0.0, float("nan")], site="1_post"),
            ValueError,
            "finite",
        ),
        (lambda m: tl.steering_sweep(m, PROMPT, TOKEN, [], site="1_post"), ValueError, "non-empty"),
        (
            lambda m: tl.steering_sweep(m, PROMPT, TOKEN, [1.0], site="1_mid", lens=jacobian_lens(m)),
            ValueError,
            "reads the outputs of blocks",
        ),
        (
            lambda m: tl.steering_sweep(encoder(), "The [MASK] ran", 7, [1.0], site="0_post"),
            TypeError,
            "masked language model",
        ),
        (lambda m: tl.generate(m, PROMPT, temperature=float("nan")), ValueError, "temperature"),
        (lambda m: tl.generate(m, PROMPT, temperature=-1.0), ValueError, "temperature"),
        (lambda m: tl.generate(m, PROMPT, max_new_tokens=0), ValueError, "max_new_tokens"),
        (lambda m: tl.generate(m, PROMPT, fwd_hooks=[lambda h, hook: h]), TypeError, "pairs"),
        (lambda m: tl.generate(encoder(), "The [MASK] ran"), TypeError, "masked language model"),
        (lambda m: tl.placebo(m, "not a hook"), TypeError, "pair"),
    ],
    ids=[
        "decode-wrong-size",
        "decode-int-dtype",
        "decode-nan",
        "decode-zero",
        "decode-top-k-0",
        "decode-convention",
        "decode-kind-not-label",
        "decode-site-lens-does-not-read",
        "decode-encoder",
        "sweep-nan-alpha",
        "sweep-no-alphas",
        "sweep-site-lens-does-not-read",
        "sweep-encoder",
        "generate-nan-temperature",
        "generate-negative-temperature",
        "generate-no-tokens",
        "generate-bad-hooks",
        "generate-encoder",
        "placebo-not-a-hook",
    ],
)
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call(model_of("LN", False))


# ------------------------------------------------------------------------------------------------
# the placebo


def _activation(model, seed=0):
    return torch.randn(2, 6, model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("normalization, folded", NORM_VARIANTS, ids=NORM_IDS)
def test_the_placebo_is_norm_matched_and_orthogonal(normalization, folded):
    model = model_of(normalization, folded)
    h = _activation(model)
    centred = normalization == "LN"
    vectors = tl.lens_vectors(model, None, "1_post", [3, 7, 11])
    for hook, avoid in (
        (tl.steer(model, None, "1_post", 7, 5.0, positions=[1, 4]), None),
        (tl.ablate(model, None, "1_post", [3, 7, 11]), vectors),
    ):
        real = hook[1](h) - h
        fake = tl.placebo(model, hook, seed=2, orthogonal_to=avoid)[1](h) - h
        assert hook[0] == "blocks.1.hook_resid_post"
        assert_close(
            fake.norm(dim=-1), real.norm(dim=-1), atol=1e-5, rtol=1e-5
        )  # the same size, cell by cell
        moved = fake.norm(dim=-1) > 0
        assert int(moved.sum()) > 0
        span = vectors if avoid is not None else tl.lens_vectors(model, None, "1_post", [7])
        assert_close(
            fake[moved] @ span.T, torch.zeros(int(moved.sum()), span.shape[0]), atol=1e-4
        )  # orthogonal
        if centred:  # nothing along the mean, which every LayerNorm reader removes
            assert_close(fake[moved].sum(-1), torch.zeros(int(moved.sum())), atol=1e-4)
        # the direction is the documented seeded draw, made orthogonal, and one direction for every cell
        z = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        rows = [span.double()] + ([torch.ones(1, model.cfg.d_model, dtype=torch.float64)] if centred else [])
        q, _ = torch.linalg.qr(torch.cat(rows).T)
        r = z - q @ (q.T @ z)
        unit = fake[moved] / fake[moved].norm(dim=-1, keepdim=True)
        assert_close(unit, (r / r.norm()).float().expand_as(unit), atol=1e-4)
    other = tl.placebo(model, tl.steer(model, None, "1_post", 7, 5.0), seed=3)[1](h) - h
    same = tl.placebo(model, tl.steer(model, None, "1_post", 7, 5.0), seed=2)[1](h) - h
    assert_not_close(other, same)


def test_alpha_zero_is_an_exact_no_op():
    model = model_of("LN", False)
    h = _activation(model)
    for hook in (
        tl.steer(model, None, "1_post", TOKEN, 0.0),
        tl.placebo(model, tl.steer(model, None, "1_post", TOKEN, 0.0)),
    ):
        assert torch.equal(hook[1](h), h)
    with torch.no_grad():
        plain = model(PROMPT)
        with model.hooks(fwd_hooks=[tl.steer(model, None, "1_post", TOKEN, 0.0)]):
            steered = model(PROMPT)
    assert torch.equal(plain, steered)
    sweep = tl.steering_sweep(model, PROMPT, TOKEN, [0.0, 3.0], site="1_post")
    assert_close(sweep.logprobs[:, 0], sweep.base_logprobs.expand(2, -1, -1), atol=1e-6)
    assert_close(sweep.kl[:, 0], torch.zeros(2, 1, 1), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# sweeps


@pytest.mark.parametrize("kind", list(LENSES))
def test_the_sweep_equals_one_steered_forward_per_alpha(kind):
    model = model_of("LN", False)
    make, site = LENSES[kind]
    lens = make(model)
    alphas = [-4.0, 0.0, 2.0, 8.0]
    sweep = tl.steering_sweep(model, PROMPT, TOKEN, alphas, site=site, lens=lens, positions=[-1, -2], seed=5)
    v = tl.lens_vectors(model, lens, site, [TOKEN])
    with torch.no_grad():
        base = torch.log_softmax(model(PROMPT)[0, -1].float(), -1)
        for a, alpha in enumerate(alphas):
            real = tl.steer(model, lens, site, TOKEN, alpha, positions=[-1, -2])
            for d, hook in enumerate((real, tl.placebo(model, real, seed=5, orthogonal_to=v))):
                with model.hooks(fwd_hooks=[hook]):
                    lp = torch.log_softmax(model(PROMPT)[0, -1].float(), -1)
                assert_close(
                    sweep.logprobs[d, a, 0, 0], lp[TOKEN], atol=1e-4, msg=f"direction {d}, alpha {alpha}"
                )
                assert_close(sweep.kl[d, a, 0, 0], (base.exp() * (base - lp)).sum(), atol=1e-4)
    assert (
        float(sweep.logprobs[0, -1, 0, 0])
        > float(sweep.logprobs[0, 2, 0, 0])
        > float(sweep.base_logprobs[0, 0])
    )
    frame = sweep.to_dataframe()
    assert len(frame) == 2 * len(alphas) and set(frame["direction"]) == {"lens", "placebo"}
    assert len(sweep.plot().data) == 4


def test_a_sweep_over_prompts_of_different_lengths_reads_each_prompts_own_last_token():
    model = model_of("RMS", False)
    prompts = [PROMPT, "The cat sat"]
    both = tl.steering_sweep(model, prompts, TOKEN, [3.0], site="0_post")
    for b, prompt in enumerate(prompts):
        alone = tl.steering_sweep(model, prompt, TOKEN, [3.0], site="0_post")
        assert_close(both.logprobs[:, :, b], alone.logprobs[:, :, 0], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# generation


def _loop(model, prompt, hooks, n, gen=None, temperature=0.0):
    """Token by token: the whole sequence through the model with the hooks on, the argmax (or a draw)."""
    seq = model.to_tokens(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(seq)[0, -1].float()
        if gen is None:
            nxt = int(logits.argmax())
        else:
            nxt = int(
                torch.multinomial(torch.softmax(logits / temperature, -1)[None], 1, generator=gen)[0, 0]
            )
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], dim=1)
    return out


MODELS = {"model": lambda: model_of("LN", False), "bridge": lambda: tiny_bridge("RMS", folded=True)}


@pytest.mark.parametrize("which", list(MODELS))
def test_greedy_generation_equals_a_token_by_token_loop_with_the_hooks(which):
    model = MODELS[which]()
    hooks = [
        tl.steer(model, None, "1_post", TOKEN, 6.0, positions=[-1]),
        tl.ablate(model, None, "0_post", [3]),
    ]
    out = tl.generate(model, [PROMPT, "The cat"], fwd_hooks=hooks, max_new_tokens=6, stop_at_eos=False)
    for b, prompt in enumerate([PROMPT, "The cat"]):
        assert out.new_ids[b].tolist() == _loop(model, prompt, hooks, 6)
    plain = tl.generate(model, PROMPT, max_new_tokens=6, stop_at_eos=False)
    assert plain.new_ids[0].tolist() == _loop(model, PROMPT, [], 6)
    assert plain.new_ids[0].tolist() != out.new_ids[0].tolist()  # the hooks changed the text
    assert len(out.to_dataframe()) == 12 and out.plot().data


def test_sampled_generation_is_seeded_and_equals_the_loop():
    model = model_of("LN", False)
    hooks = [tl.steer(model, None, "1_post", TOKEN, 3.0)]
    first = tl.generate(
        model, PROMPT, fwd_hooks=hooks, max_new_tokens=8, temperature=1.5, seed=11, stop_at_eos=False
    )
    again = tl.generate(
        model, PROMPT, fwd_hooks=hooks, max_new_tokens=8, temperature=1.5, seed=11, stop_at_eos=False
    )
    other = tl.generate(
        model, PROMPT, fwd_hooks=hooks, max_new_tokens=8, temperature=1.5, seed=12, stop_at_eos=False
    )
    assert torch.equal(first.new_ids, again.new_ids)
    assert not torch.equal(first.new_ids, other.new_ids)
    gen = torch.Generator().manual_seed(11)
    assert first.new_ids[0].tolist() == _loop(model, PROMPT, hooks, 8, gen=gen, temperature=1.5)


def test_generation_stops_at_eos_and_keeps_it():
    model = model_of("LN", False)
    eos = model.tokenizer.eos_token_id
    # steer hard towards EOS at the last position: the first new token is EOS, then the prompt stops
    out = tl.generate(
        model,
        PROMPT,
        fwd_hooks=[tl.steer(model, None, "final_post", eos, 500.0, positions=[-1])],
        max_new_tokens=5,
    )
    assert out.new_ids[0].tolist() == [eos, -1, -1, -1, -1]


@pytest.mark.skipif(
    not HAS_HOOKED_TRANSFORMER, reason="TransformerLens 4.x has no HookedTransformer to compare with"
)
def test_the_bridge_and_the_hooked_transformer_generate_the_same_text():
    hooked, bridge = tiny_model("LN", folded=False), tiny_bridge("LN", folded=False)
    a = tl.generate(
        hooked, PROMPT, fwd_hooks=[tl.steer(hooked, None, "1_post", TOKEN, 4.0)], max_new_tokens=5
    )
    b = tl.generate(
        bridge, PROMPT, fwd_hooks=[tl.steer(bridge, None, "1_post", TOKEN, 4.0)], max_new_tokens=5
    )
    assert torch.equal(a.new_ids, b.new_ids)
