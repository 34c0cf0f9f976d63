"""The lens vector dictionary, J-space decomposition, occupancy, fraction of variance, coordinate patches
and swap hooks, for the logit, tuned and Jacobian lenses, against slow references written out here:
the dictionary by its formula token by token, NNLS by brute force over supports, the greedy selection and
the occupancy recurrence as explicit loops over a dense dictionary, the control draws in one piece."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, requires_hooked_encoder, tiny_model
from tl_logitlens.analyses import lens_dictionary as dictionary_module
from tl_logitlens.analyses import pursuit
from tl_logitlens.analyses.jspace import Decomposition
from tl_logitlens.core.compat import normalization_type

PROMPT = SENTENCES[0]
LENSES = ["logit", "tuned", "jacobian"]
MODELS = [("LN", False), ("RMS", False), ("LN", True)]
MODEL_IDS = ["LN", "RMS", "LN-folded"]


def _lens(model, kind: str):
    d, n = model.cfg.d_model, model.cfg.n_layers
    gen = torch.Generator().manual_seed(5)
    if kind == "logit":
        return None
    if kind == "tuned":
        lens = tl.TunedLens.for_model(model)
        with torch.no_grad():
            lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=gen))
            lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=gen))
        return lens
    return tl.JacobianLens(
        {layer: torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen) for layer in range(n - 1)},
        n_prompts=1,
        d_model=d,
        n_layers=n,
    )


SITE = {"logit": "1_pre", "tuned": "1_post", "jacobian": "1_post"}


@pytest.fixture(scope="module", params=MODELS, ids=MODEL_IDS)
def model(request):
    return tiny_model(*request.param)


@pytest.fixture(scope="module")
def ln_model():
    return tiny_model("LN", folded=False)


def slow_dictionary(model, lens, site, convention) -> torch.Tensor:
    """The dictionary by its formula, one token at a time: ``Mᵀ P (g ⊙ W_U[:, t])`` (ours) or
    ``Mᵀ W_U[:, t]`` (TransformerLens)."""
    d = model.cfg.d_model
    if lens is None:
        m = torch.eye(d)
    elif isinstance(lens, tl.TunedLens):
        index = lens.translator_index(site)
        m = torch.eye(d) if index is None else torch.eye(d) + lens.weight[index].detach().float()
    else:
        layer = lens.layer_of(site)
        m = torch.eye(d) if layer is None else lens.jacobians[layer].float()
    kind = normalization_type(model)
    rows = []
    for t in range(model.cfg.d_vocab):
        u = model.W_U[:, t].detach().double()
        if convention == "ours":
            if kind in ("LN", "RMS"):
                u = u * model.ln_final.w.detach().double()
            if kind in ("LN", "LNPre"):
                u = u - u.mean()
        rows.append(m.double().T @ u)
    return torch.stack(rows).float()


def state_at(model, site: str, prompt: str, position: int) -> torch.Tensor:
    name = {"pre": "hook_resid_pre", "post": "hook_resid_post"}
    layer, kind = site.split("_")
    hook_name = (
        f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        if layer == "final"
        else f"blocks.{layer}.{name[kind]}"
    )
    _, cache = model.run_with_cache(model.to_tokens(prompt))
    return cache[hook_name][0, position].detach().float()


# --------------------------------------------------------------------------------------------------
# the dictionary


@pytest.mark.parametrize("kind", LENSES)
@pytest.mark.parametrize("convention", ["ours", "transformer_lens"])
def test_dictionary_rows_are_the_lens_vectors_by_their_formula(model, kind, convention):
    lens = _lens(model, kind)
    site = SITE[kind]
    d = tl.lens_dictionary(model, lens, site, convention=convention)
    expected = slow_dictionary(model, lens, site, convention)
    assert_close(d.dense(), expected, atol=1e-5, rtol=1e-4)
    assert_close(
        tl.lens_vector_dictionary(model, lens, site, convention=convention), expected, atol=1e-5, rtol=1e-4
    )
    ids = torch.tensor([3, 11, 200])
    assert_close(
        tl.lens_vectors(model, lens, site, ids.tolist(), convention=convention),
        expected[ids],
        atol=1e-5,
        rtol=1e-4,
    )
    assert_close(d.norms, expected.norm(dim=1), atol=1e-5, rtol=1e-4)
    r = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    assert_close(d.correlations(r), r @ expected.T, atol=1e-4, rtol=1e-4)


def test_the_conventions_differ_where_the_final_norm_has_a_gain(ln_model):
    ours = tl.lens_vector_dictionary(ln_model, None, "1_pre")
    theirs = tl.lens_vector_dictionary(ln_model, None, "1_pre", convention="transformer_lens")
    assert_close(theirs, ln_model.W_U.detach().T.float(), atol=0, rtol=0)
    assert (ours - theirs).abs().max() > 1e-2


def test_tiles_give_the_same_dictionary(ln_model, monkeypatch):
    lens = _lens(ln_model, "jacobian")
    expected = tl.lens_dictionary(ln_model, lens, "1_post").dense()
    monkeypatch.setattr(dictionary_module, "TILE_BYTES", 4 * 32 * 7)  # 7 tokens a tile
    tiled = tl.lens_dictionary(ln_model, lens, "1_post")
    assert tiled.tile_size == 7
    starts = [start for start, _ in tiled.tiles()]
    assert starts[:3] == [0, 7, 14] and len(starts) == math.ceil(tiled.d_vocab / 7)
    assert_close(tiled.dense(), expected, atol=1e-6, rtol=1e-6)  # other matmul blocking: float32 rounding


def test_the_norms_cache_sees_an_in_place_edit_of_the_unembedding():
    model = tiny_model("RMS", folded=False, seed=3)
    before = tl.lens_dictionary(model, None, "final_post").norms.clone()
    with torch.no_grad():
        model.W_U.mul_(2.0)
    after = tl.lens_dictionary(model, None, "final_post").norms
    assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)


def test_a_dictionary_above_the_cap_is_refused_with_what_to_do(ln_model):
    d = tl.lens_dictionary(ln_model, None, "final_post")
    with pytest.raises(ValueError, match=r"above max_bytes=1000 .*never need"):
        d.dense(max_bytes=1000)


# --------------------------------------------------------------------------------------------------
# NNLS, gradient pursuit, the greedy selection


def brute_force_nnls(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every support: the unconstrained least squares on it, kept when nonnegative; the best fit wins."""
    n = a.shape[1]
    best, best_err = torch.zeros(n, dtype=torch.float64), float(b @ b)
    for size in range(1, n + 1):
        for cols in itertools.combinations(range(n), size):
            sol = torch.linalg.lstsq(a[:, cols], b[:, None]).solution[:, 0]
            if bool((sol >= 0).all()):
                c = torch.zeros(n, dtype=torch.float64)
                c[list(cols)] = sol
                err = float(((a @ c - b) ** 2).sum())
                if err < best_err - 1e-12:
                    best, best_err = c, err
    return best


@pytest.mark.parametrize("seed", range(8))
def test_nnls_equals_brute_force_over_supports(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 2 + seed % 5
    a = torch.randn(12, n, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    expected = brute_force_nnls(a, b)
    if seed % 2:  # a target the atoms fit with some coefficients truly positive
        b = a @ expected.abs() + 0.01 * b
        expected = brute_force_nnls(a, b)
    assert_close(pursuit.nnls(a, b), expected, atol=1e-9, rtol=1e-9)


def test_batched_pursuit_equals_brute_force_nnls_row_by_row_including_zeroed_atoms():
    """Many targets at once: every row's coordinates are the brute-force NNLS optimum on its selected
    atoms. Half the rows are built so the optimum zeroes an atom picked first (``a3`` leans towards
    ``e1 + e2`` and ``+e3``, the target towards ``-e3``), where the batched least-squares solve is
    infeasible and Lawson-Hanson takes over."""
    gen = torch.Generator().manual_seed(3)
    eye = torch.eye(10)
    a3 = (eye[0] + eye[1]) / 2**0.5 + 0.2 * eye[2]
    filler = torch.cat([torch.zeros(30, 3), torch.randn(30, 7, generator=gen)], dim=1)  # off x's span
    dense = torch.cat([eye[:3], a3[None], filler])
    trap = torch.stack([2 * eye[0] + (1 + 0.1 * i) * eye[1] - 0.05 * eye[2] for i in range(10)])
    targets = torch.cat([trap, torch.randn(10, 10, generator=gen)])
    results = pursuit.pursue(pursuit.DenseAtoms(dense), targets, 5, "omp")
    zeroed = 0
    for x, r in zip(targets, results):
        full = brute_force_nnls(dense[r.selected].double().T, x.double())
        got = torch.zeros(len(r.selected), dtype=torch.float64)
        where = {t: i for i, t in enumerate(r.selected.tolist())}
        for t, c in zip(r.support.tolist(), r.coordinates.tolist()):
            got[where[t]] = c
        assert_close(got, full, atol=1e-5, rtol=1e-5)
        zeroed += len(r.support) < len(r.selected)
    assert zeroed >= 10  # the trap rows: a3 selected first, then zeroed


def slow_greedy_first(dense: torch.Tensor, x: torch.Tensor) -> int:
    """The first atom: the largest ``v_t · x / ‖v_t‖``, by a loop."""
    best, arg = -math.inf, -1
    for t in range(dense.shape[0]):
        c = float(dense[t].double() @ x.double()) / float(dense[t].double().norm())
        if c > best:
            best, arg = c, t
    return arg


@pytest.mark.parametrize("kind", LENSES)
@pytest.mark.parametrize("algorithm", ["omp", "gradient_pursuit"])
def test_decomposition_identities(model, kind, algorithm):
    lens, site = _lens(model, kind), SITE[kind]
    result = tl.decompose(model, lens, site, PROMPT, position=-2, k=6, algorithm=algorithm)
    x = state_at(model, site, PROMPT, -2)
    dense = slow_dictionary(model, lens, site, "ours")
    assert_close(result.activation, x, atol=1e-6, rtol=0)
    assert int(result.selected_support[0]) == slow_greedy_first(dense, x)
    assert set(result.support.tolist()) <= set(result.selected_support.tolist())
    assert 1 <= len(result.support) <= len(result.selected_support) <= 6
    assert bool((result.coordinates > 0).all())
    assert_close(result.reconstruction, result.coordinates @ dense[result.support], atol=1e-4, rtol=1e-4)
    # the J-space component is the projection onto the selected span: the residual is orthogonal to it
    selected = dense[result.selected_support]
    assert_close(result.j_space_component + result.residual, x, atol=1e-5, rtol=0)
    cosines = (selected @ result.residual) / (selected.norm(dim=1) * x.norm())
    assert float(cosines.abs().max()) < 1e-5
    assert_close(
        result.j_space_fraction,
        float(result.j_space_component.norm() ** 2 / x.norm() ** 2),
        atol=1e-6,
        rtol=0,
    )
    miss = x - result.reconstruction
    assert_close(result.explained_variance, 1 - float(miss @ miss / (x @ x)), atol=1e-6, rtol=0)
    if algorithm == "omp":  # exact NNLS on the selected atoms: brute force agrees
        full = brute_force_nnls(selected.double().T, x.double())
        coords = dict(zip(result.support.tolist(), result.coordinates.tolist()))
        expected = [float(v) for v in full]
        got = [coords.get(t, 0.0) for t in result.selected_support.tolist()]
        assert_close(torch.tensor(got), torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=1e-4)
    frame = result.to_dataframe()
    assert list(frame["token_id"]) == result.selected_support.tolist()
    assert frame["active"].sum() == len(result.support)


def test_a_raw_activation_decomposes_as_the_prompt_state_does(ln_model):
    lens = _lens(ln_model, "jacobian")
    from_prompt = tl.decompose(ln_model, lens, "1_post", PROMPT, position=3)
    raw = tl.decompose(ln_model, lens, "1_post", state_at(ln_model, "1_post", PROMPT, 3))
    assert torch.equal(from_prompt.support, raw.support)
    assert_close(raw.coordinates, from_prompt.coordinates, atol=1e-6, rtol=1e-6)
    assert from_prompt.position == 3 and raw.position is None


def test_a_compatibility_bridge_decomposes_as_the_hooked_transformer_with_its_weights():
    from tests.helpers import HAS_HOOKED_TRANSFORMER, tiny_bridge

    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip("TransformerLens 4.x has no HookedTransformer: tiny_model is already the bridge there")
    hooked, bridge = tiny_model("RMS", folded=False), tiny_bridge("RMS", folded=False)
    for model in (hooked, bridge):
        lens = _lens(model, "jacobian")
        result = tl.decompose(model, lens, "1_post", PROMPT, position=-1, k=5)
        if model is hooked:
            expected = result
    assert result.support.tolist() == expected.support.tolist()
    assert_close(result.coordinates, expected.coordinates, atol=1e-4, rtol=1e-4)


def test_selection_stops_when_nothing_correlates(ln_model):
    """A state equal to one lens vector: one atom explains it all, and the pursuit stops there."""
    v = tl.lens_vectors(ln_model, None, "final_post", [17])[0]
    result = tl.decompose(ln_model, None, "final_post", 2.5 * v, k=8)
    assert result.support.tolist() == [17]
    assert_close(result.coordinates, torch.tensor([2.5]), atol=1e-5, rtol=1e-5)
    assert result.explained_variance > 1 - 1e-6


# --------------------------------------------------------------------------------------------------
# coordinate patches


@pytest.mark.parametrize("kind", LENSES)
@pytest.mark.parametrize("mode", ["substitute", "swap"])
def test_coordinate_patch_moves_one_coordinate_and_nothing_else(model, kind, mode):
    lens, site = _lens(model, kind), SITE[kind]
    decomposition = tl.decompose(model, lens, site, PROMPT, position=-1, k=6)
    source, target = int(decomposition.support[0]), int(decomposition.support[-1])
    dense = slow_dictionary(model, lens, site, "ours")
    for tgt in (target, 5 if 5 not in decomposition.support.tolist() else 6):
        if tgt == source:
            continue
        patch = tl.coordinate_patch(model, lens, site, PROMPT, source, tgt, position=-1, k=6, mode=mode)
        before, after = patch.coordinates_before, patch.coordinates_after
        s, t = patch.source_slot, patch.target_slot
        # c + 1·(edited − c) rounds in float32: equal to the edited value to one ulp
        assert_close(after[t], before[s], atol=1e-6, rtol=1e-6)
        assert_close(after[s], before[t] if mode == "swap" else torch.tensor(0.0), atol=1e-6, rtol=1e-6)
        others = [i for i in range(len(before)) if i not in (s, t)]
        assert_close(after[others], before[others], atol=0, rtol=0)
        assert_close(
            patch.patched - patch.activation, (after - before) @ dense[patch.support], atol=1e-5, rtol=1e-4
        )
        # the residual x - reconstruction is preserved
        assert_close(
            patch.patched - patch.reconstruction_after,
            patch.activation - patch.reconstruction_before,
            atol=1e-5,
            rtol=0,
        )
        assert patch.target_was_appended == (tgt not in decomposition.support.tolist())
        half = tl.coordinate_patch(
            model,
            lens,
            site,
            PROMPT,
            source,
            tgt,
            position=-1,
            k=6,
            mode=mode,
            alpha=0.5,
            decomposition=patch.decomposition,
        )
        assert_close(half.delta, patch.delta / 2, atol=1e-6, rtol=1e-5)


def test_alpha_zero_patch_is_an_exact_no_op(ln_model):
    d = tl.decompose(ln_model, None, "1_pre", PROMPT, position=2)
    patch = tl.coordinate_patch(ln_model, None, "1_pre", PROMPT, int(d.support[0]), 9, position=2, alpha=0.0)
    assert torch.equal(patch.patched, patch.activation)


def test_the_patch_hook_puts_the_patched_state_into_the_forward_pass(ln_model):
    lens = _lens(ln_model, "jacobian")
    d = tl.decompose(ln_model, lens, "1_post", PROMPT, position=4)
    patch = tl.coordinate_patch(
        ln_model, lens, "1_post", PROMPT, int(d.support[0]), int(d.support[1]), position=4, mode="swap"
    )
    seen = {}

    def grab(act, hook):
        seen["h"] = act.detach().clone()

    with torch.no_grad(), ln_model.hooks(fwd_hooks=[patch.hook(), ("blocks.1.hook_resid_post", grab)]):
        ln_model(PROMPT)
    assert_close(seen["h"][0, 4], patch.patched, atol=1e-5, rtol=0)
    assert_close(seen["h"][0, 3], state_at(ln_model, "1_post", PROMPT, 3), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# swap hooks


def _apply(hook, h):
    return hook[1](h, None)


@pytest.mark.parametrize("kind", LENSES)
def test_a_live_swap_exchanges_the_coordinates_and_twice_is_the_identity(model, kind):
    lens, site = _lens(model, kind), SITE[kind]
    (hook,) = tl.swap_hooks(model, lens, site, 4, 9)
    v = slow_dictionary(model, lens, site, "ours")[[4, 9]].double()  # [2, d]
    h = 3 * torch.randn(2, 5, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    once = _apply(hook, h)
    pinv = torch.linalg.pinv(v.T)
    c, c1 = h.double() @ pinv.T, once.double() @ pinv.T
    assert_close(c1, c[..., [1, 0]], atol=1e-4, rtol=1e-4)
    orth = torch.eye(model.cfg.d_model, dtype=torch.float64) - v.T @ pinv  # projector off the span
    assert_close((once - h).double() @ orth.T, torch.zeros_like(h, dtype=torch.float64), atol=1e-4, rtol=0)
    assert_close(_apply(hook, once), h, atol=1e-4, rtol=1e-5)
    (double,) = tl.swap_hooks(model, lens, site, 4, 9, alpha=2.0)
    assert_close(_apply(double, h).double() @ pinv.T, 2 * c[..., [1, 0]] - c, atol=1e-4, rtol=1e-4)


def test_alpha_zero_swap_is_an_exact_no_op(ln_model):
    tokens = ln_model.to_tokens(PROMPT)
    hooks = tl.swap_hooks(ln_model, None, ["0_pre", "1_pre", "2_post"], 4, 9, alpha=0.0)
    assert [name for name, _ in hooks] == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.2.hook_resid_post",
    ]
    with torch.no_grad():
        plain = ln_model(tokens)
        swapped = ln_model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert torch.equal(swapped, plain)


def test_the_clamp_sets_the_clean_runs_exchanged_coordinates_and_is_idempotent(ln_model):
    lens = _lens(ln_model, "jacobian")
    tokens = ln_model.to_tokens(PROMPT)
    _, clean = ln_model.run_with_cache(tokens)
    (hook,) = tl.swap_hooks(ln_model, lens, "1_post", 4, 9, clamp_to=clean)
    v = slow_dictionary(ln_model, lens, "1_post", "ours")[[4, 9]].double()
    pinv = torch.linalg.pinv(v.T)
    other = 2 * torch.randn(
        clean["blocks.1.hook_resid_post"].shape, generator=torch.Generator().manual_seed(4)
    )
    once = _apply(hook, other)
    goal = (clean["blocks.1.hook_resid_post"].double() @ pinv.T)[..., [1, 0]]
    assert_close(once.double() @ pinv.T, goal, atol=1e-4, rtol=1e-4)
    assert_close(_apply(hook, once), once, atol=1e-4, rtol=1e-5)


def test_swap_changes_the_output_and_only_where_asked(ln_model):
    tokens = ln_model.to_tokens(PROMPT)
    hooks = tl.swap_hooks(ln_model, None, "1_pre", 4, 9, positions=[-1])
    with torch.no_grad():
        plain = ln_model(tokens)
        swapped = ln_model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(swapped[0, :-1], plain[0, :-1], atol=1e-6, rtol=0)
    assert (swapped[0, -1] - plain[0, -1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# occupancy and fraction of variance


def slow_captured(dense: torch.Tensor, x: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    """The occupancy recurrence written out: signed unit correlation, projection residual."""
    chosen, gains, prev = [], [], 0.0
    residual = x.double()
    unit = dense.double() / dense.double().norm(dim=1, keepdim=True)
    for _ in range(steps):
        corr = unit @ residual
        corr[chosen] = -math.inf
        chosen.append(int(corr.argmax()))
        q, _ = torch.linalg.qr(dense[chosen].double().T)
        proj = q @ (q.T @ x.double())
        cap = float(proj @ proj / (x.double() @ x.double()))
        gains.append(cap - prev)
        prev = cap
        residual = x.double() - proj
    return gains, chosen


@pytest.mark.parametrize("kind", LENSES)
def test_occupancy_equals_the_recurrence_against_controls_drawn_in_one_piece(ln_model, kind, monkeypatch):
    lens, site = _lens(ln_model, kind), SITE[kind]
    monkeypatch.setattr(
        "tl_logitlens.analyses.jspace.TILE_BYTES", 4 * 32 * 50
    )  # controls drawn 50 rows a tile
    occ = tl.occupancy(ln_model, lens, site, PROMPT, positions=[2, -1], max_atoms=4, n_controls=3, seed=7)
    dense = slow_dictionary(ln_model, lens, site, "ours")
    gen = torch.Generator().manual_seed(7)
    controls = [torch.randn(dense.shape, generator=gen) for _ in range(3)]
    for j, pos in enumerate([2, -1]):
        x = state_at(ln_model, site, PROMPT, pos)
        gains, chosen = slow_captured(dense, x, 4)
        assert occ.support[0, j].tolist() == chosen
        assert_close(occ.gains[0, j], torch.tensor(gains, dtype=torch.float32), atol=1e-5, rtol=0)
        control = torch.tensor([slow_captured(c, x, 4)[0] for c in controls]).mean(0).float()
        assert_close(occ.control_gains[0, j], control, atol=1e-5, rtol=0)
        lead = torch.tensor(gains).cumsum(0) - control.double().cumsum(0)
        assert int(occ.occupancy[0, j]) == int(lead.argmax()) + 1
    frame = occ.to_dataframe()
    assert len(frame) == 2 * 4 and set(frame["step"]) == {1, 2, 3, 4}
    assert occ.pooled in range(1, 5)


@pytest.mark.parametrize("kind", LENSES)
def test_fraction_of_variance_is_the_decompositions_fraction_at_every_position(ln_model, kind):
    lens = _lens(ln_model, kind)
    sites = ["0_post", SITE[kind]] if kind != "logit" else ["0_pre", "1_pre"]
    texts = SENTENCES[:2]
    fov = tl.fraction_of_variance(ln_model, lens, texts, sites=sites, k=4, skip_first=2, batch_size=1)
    for i, site in enumerate(sites):
        j_sum = t_sum = 0.0
        values = []
        for b, text in enumerate(texts):
            n = len(ln_model.to_str_tokens(text))
            for p in range(n):
                if p < 2:
                    assert not bool(fov.sampled[i, b, p])
                    continue
                d = tl.decompose(ln_model, lens, site, text, position=p, k=4)
                values.append(d.j_space_fraction)
                assert_close(fov.fractions[i, b, p], torch.tensor(d.j_space_fraction), atol=1e-5, rtol=0)
                j_sum += float(d.j_space_component @ d.j_space_component)
                t_sum += float(d.activation @ d.activation)
        assert_close(fov.pooled[i], torch.tensor(j_sum / t_sum), atol=1e-5, rtol=0)
        assert_close(fov.median[i], torch.tensor(values).quantile(0.5), atol=1e-6, rtol=0)
    assert len(fov.to_dataframe()) == int(fov.sampled.sum())
    assert list(fov.summary_dataframe()["site"]) == sites
    # raw states in place of prompts: one site, every row sampled
    states = torch.stack([state_at(ln_model, sites[0], texts[0], p) for p in (2, 3, 4)])
    raw = tl.fraction_of_variance(ln_model, lens, states, sites=sites[0], k=4)
    assert_close(raw.fractions[0, 0], fov.fractions[0, 0, 2:5], atol=1e-5, rtol=0)


def test_results_plot_with_unsigned_colours(ln_model):
    lens = _lens(ln_model, "jacobian")
    d = tl.decompose(ln_model, lens, "1_post", PROMPT)
    patch = tl.coordinate_patch(ln_model, lens, "1_post", PROMPT, int(d.support[0]), 9)
    occ = tl.occupancy(ln_model, lens, "1_post", PROMPT, positions="last", max_atoms=3, n_controls=2)
    fov = tl.fraction_of_variance(ln_model, lens, PROMPT, sites="resid_post", k=3)
    from tl_logitlens.plotting.style import NEGATIVE_COLOUR, POSITIVE_COLOUR

    for result in (d, patch, occ, fov):
        fig = result.plot()
        assert fig.data and fig.layout.title.text
        colours = {str(getattr(t.marker, "color", None)) for t in fig.data} | {
            str(getattr(getattr(t, "line", None), "color", None)) for t in fig.data
        }
        assert not colours & {POSITIVE_COLOUR, NEGATIVE_COLOUR}
    assert isinstance(d, Decomposition) and "explained variance" in repr(d)


# --------------------------------------------------------------------------------------------------
# bad input


def _bad_cases():
    jl = lambda m: _lens(m, "jacobian")  # noqa: E731
    return [
        (lambda m: tl.decompose(m, jl(m), "1_mid", PROMPT), ValueError, "reads the outputs of blocks"),
        (lambda m: tl.decompose(m, jl(m), "resid_post", PROMPT), ValueError, "one site label"),
        (lambda m: tl.decompose(m, None, "1_pre", PROMPT, k=0), ValueError, "k=0 must be between 1"),
        (lambda m: tl.decompose(m, None, "1_pre", PROMPT, k=-3), ValueError, "k=-3 must be between 1"),
        (lambda m: tl.decompose(m, None, "1_pre", torch.full((32,), float("nan"))), ValueError, "NaN or inf"),
        (
            lambda m: tl.decompose(m, None, "1_pre", torch.tensor([float("inf")] + [1.0] * 31)),
            ValueError,
            "NaN or inf",
        ),
        (lambda m: tl.decompose(m, None, "1_pre", torch.ones(31)), ValueError, r"shape \[31\]"),
        (
            lambda m: tl.decompose(m, None, "1_pre", torch.ones(32, dtype=torch.long)),
            TypeError,
            "float tensor",
        ),
        (lambda m: tl.decompose(m, None, "1_pre", torch.zeros(32)), ValueError, "zero"),
        (
            lambda m: tl.decompose(m, None, "1_pre", torch.ones(32), position=3),
            ValueError,
            "position is for inputs",
        ),
        (lambda m: tl.decompose(m, None, "1_pre", SENTENCES[:2]), ValueError, "one prompt"),
        (
            lambda m: tl.decompose(m, None, "1_pre", PROMPT, algorithm="lasso"),
            ValueError,
            "algorithm must be",
        ),
        (lambda m: tl.decompose(m, None, "1_pre", PROMPT, convention="tl"), ValueError, "convention must be"),
        (lambda m: tl.coordinate_patch(m, None, "1_pre", PROMPT, 4, 4), ValueError, "the same token"),
        (
            lambda m: tl.coordinate_patch(m, None, "1_pre", PROMPT, 4, 9, alpha=float("nan")),
            ValueError,
            "alpha=nan must be a finite",
        ),
        (
            lambda m: tl.coordinate_patch(m, None, "1_pre", PROMPT, 4, 9, mode="move"),
            ValueError,
            "mode must be",
        ),
        (
            lambda m: tl.coordinate_patch(m, None, "1_pre", PROMPT, _absent(m), 9),
            ValueError,
            "not in the decomposition's active support",
        ),
        (
            lambda m: tl.coordinate_patch(m, None, "1_pre", torch.ones(32), _absent(m), 9).hook(),
            ValueError,
            "not in the",
        ),
        (lambda m: tl.swap_hooks(m, None, "1_pre", 4, 4), ValueError, "the same token"),
        (lambda m: tl.swap_hooks(m, None, "1_pre", [4, 5], 9), ValueError, "source must be one token"),
        (
            lambda m: tl.swap_hooks(m, None, "1_pre", 4, 9, alpha=float("inf")),
            ValueError,
            "alpha=inf must be a finite",
        ),
        (
            lambda m: tl.swap_hooks(m, jl(m), ["1_post", "1_pre"], 4, 9),
            ValueError,
            "reads the outputs of blocks",
        ),
        (lambda m: tl.swap_hooks(m, None, "1_pre", 4, 9, clamp_to={}), ValueError, "clamp_to has no state"),
        (lambda m: tl.occupancy(m, None, "1_pre", PROMPT, n_controls=0), ValueError, "n_controls=0"),
        (lambda m: tl.occupancy(m, None, "1_pre", PROMPT, max_bytes=100), ValueError, "above max_bytes=100"),
        (
            lambda m: tl.fraction_of_variance(m, None, "Hi", sites="1_pre", skip_first=40),
            ValueError,
            "no position was sampled",
        ),
    ]


def _absent(model) -> int:
    d = tl.decompose(model, None, "1_pre", PROMPT, k=8)
    return next(t for t in range(model.cfg.d_vocab) if t not in d.support.tolist())


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_is_refused(ln_model, case):
    call, error, message = _bad_cases()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            call(ln_model)


@requires_hooked_encoder
def test_an_encoder_is_refused():
    from tests.encoder_helpers import tiny_encoder

    with pytest.raises(TypeError, match="masked language model"):
        tl.decompose(tiny_encoder("bert"), None, "1_pre", torch.ones(32))
