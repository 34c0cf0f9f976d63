"""With ``convention="transformer_lens"``, J-space decomposition, occupancy, fraction of variance, coordinate
patches and swap hooks equal TransformerLens 4.3's own ``JacobianLens`` (``tools/analysis/jacobian_lens.py``)
to 1e-5, on a raw bridge of stories260K read through the shared J-lens it fitted. TransformerLens 3.9 ships
an earlier ``JacobianLens`` with the same operations (its clamp is ``swap_clamp_hooks``, at alpha 1 only);
where a TransformerLens has none of them the comparisons skip, and the raw-bridge test still runs."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SHARED, STORIES, assert_close, require_shared
from tl_logitlens.core import compat as _compat

JLENS = SHARED / "lenses" / "stories260K-jacobian-lens" / "jlens.pt"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends."

try:
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens

    HAS_TOOLS = all(
        hasattr(TLJacobianLens, name)
        for name in ("decompose", "occupancy", "fraction_of_variance", "coordinate_patch", "swap_hooks")
    )
except ImportError:
    HAS_TOOLS = False

needs_tools = pytest.mark.skipif(
    not HAS_TOOLS,
    reason=f"TransformerLens {_compat.TL_VERSION}'s tools.analysis has no JacobianLens decompose/occupancy/"
    "fraction_of_variance/coordinate_patch/swap_hooks (added in 4.3); CI compares on the 4.x venv",
)


@pytest.fixture(scope="module")
def raw():
    """A raw bridge (no compatibility mode): the model TransformerLens 4.3's J-lens tools accept."""
    folder = require_shared(STORIES)
    return _compat.TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(raw):
    return tl.load_lens(require_shared(JLENS), raw)


@pytest.fixture(scope="module")
def theirs(raw):
    lens = TLJacobianLens.load(str(require_shared(JLENS)))
    lens.metadata["model_name"] = raw.cfg.model_name  # it records the path it was fitted from, relative
    return lens


def test_on_a_raw_bridge_both_conventions_decompose(raw, ours):
    """Ours reads raw bridges on TransformerLens 3.9 and 4.x alike; the two conventions differ there
    (the raw W_U has no gain folded in), so the decompositions do."""
    a = tl.decompose(raw, ours, "2_post", PROMPT, position=-1)
    b = tl.decompose(raw, ours, "2_post", PROMPT, position=-1, convention="transformer_lens")
    assert a.support.numel() and b.support.numel()
    assert not torch.equal(a.selected_support, b.selected_support) or not torch.allclose(
        a.coordinates, b.coordinates
    )
    with (
        torch.no_grad(),
        raw.hooks(fwd_hooks=tl.swap_hooks(raw, ours, ["1_post", "2_post"], int(a.support[0]), 42)),
    ):
        swapped = raw(PROMPT)
    assert bool(torch.isfinite(swapped).all())


@needs_tools
def test_the_dictionary_equals_transformer_lens(raw, ours, theirs):
    for layer in (0, 3):
        expected = theirs.lens_vector_dictionary(raw, layer)
        assert_close(
            tl.lens_vector_dictionary(raw, ours, f"{layer}_post", convention="transformer_lens"),
            expected,
            atol=1e-5,
            rtol=1e-5,
        )


@needs_tools
@pytest.mark.parametrize("algorithm", ["omp", "gradient_pursuit"])
def test_decompose_equals_transformer_lens(raw, ours, theirs, algorithm):
    long = {"omp": "nonnegative_orthogonal_matching_pursuit", "gradient_pursuit": "gradient_pursuit"}[
        algorithm
    ]
    for layer in (0, 1, 2, 3):
        for position in (5, 17, -1):
            t = theirs.decompose(raw, PROMPT, layer, position=position, k=8, algorithm=long)
            o = tl.decompose(
                raw,
                ours,
                f"{layer}_post",
                PROMPT,
                position=position,
                k=8,
                algorithm=algorithm,
                convention="transformer_lens",
            )
            where = f"layer {layer}, position {position}"
            assert o.support.tolist() == t.support.tolist(), where
            assert o.selected_support.tolist() == t.selected_support.tolist(), where
            assert_close(o.coordinates, t.coordinates, atol=1e-5, rtol=1e-5, msg=where)
            assert_close(o.reconstruction, t.reconstruction, atol=1e-5, rtol=1e-5, msg=where)
            assert_close(o.j_space_component, t.j_space_component, atol=1e-5, rtol=1e-5, msg=where)
            assert_close(o.residual, t.non_j_space_component, atol=1e-5, rtol=1e-5, msg=where)


@needs_tools
def test_occupancy_equals_transformer_lens(raw, ours, theirs):
    o = tl.occupancy(
        raw,
        ours,
        "2_post",
        PROMPT,
        positions=[9, -1],
        max_atoms=6,
        n_controls=3,
        seed=11,
        convention="transformer_lens",
    )
    for j, position in enumerate((9, -1)):
        t = theirs.occupancy(
            raw, PROMPT, 2, position=position, max_atoms=6, num_control_dictionaries=3, seed=11
        )
        assert int(o.occupancy[0, j]) == t.occupancy
        assert o.support[0, j].tolist() == t.support.tolist()
        assert_close(o.gains[0, j], t.marginal_captured_variance, atol=1e-5, rtol=0)
        assert_close(o.control_gains[0, j], t.control_captured_variance, atol=1e-5, rtol=0)


@needs_tools
def test_fraction_of_variance_equals_transformer_lens(raw, ours, theirs):
    prompts = [PROMPT, "One day, a big dog ran to the little cat and said hello to her."]
    t = theirs.fraction_of_variance(raw, prompts, [1, 3], k=6, skip_first=16)
    o = tl.fraction_of_variance(
        raw, ours, prompts, sites=["1_post", "3_post"], k=6, skip_first=16, convention="transformer_lens"
    )
    for i, layer in enumerate((1, 3)):
        assert_close(o.fractions[i][o.sampled[i]], t.per_position[layer], atol=1e-5, rtol=0)
        assert_close(float(o.median[i]), t.median[layer], atol=1e-5, rtol=0)
        assert_close(float(o.pooled[i]), t.pooled[layer], atol=1e-5, rtol=0)


@needs_tools
@pytest.mark.parametrize("mode", ["substitute", "swap"])
def test_coordinate_patch_equals_transformer_lens(raw, ours, theirs, mode):
    d = tl.decompose(raw, ours, "2_post", PROMPT, position=-1, k=8, convention="transformer_lens")
    source = int(d.support[1])
    for target in (int(d.support[3]), 100):  # active, and appended at 0
        for alpha in (1.0, 0.5):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = theirs.coordinate_patch(
                    raw, PROMPT, 2, source, target, position=-1, k=8, mode=mode, alpha=alpha
                )
                o = tl.coordinate_patch(
                    raw,
                    ours,
                    "2_post",
                    PROMPT,
                    source,
                    target,
                    position=-1,
                    k=8,
                    mode=mode,
                    alpha=alpha,
                    convention="transformer_lens",
                )
            assert o.support.tolist() == t.support_after.tolist()
            assert o.target_was_appended == t.target_was_appended
            assert_close(o.coordinates_after, t.coordinates_after, atol=1e-5, rtol=1e-5)
            assert_close(o.patched, t.patched, atol=1e-5, rtol=1e-5)


@needs_tools
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("clamp", [False, True], ids=["live", "clamp"])
def test_swap_hook_logits_equal_transformer_lens(raw, ours, theirs, alpha, clamp):
    tokens = raw.to_tokens(PROMPT)
    d = tl.decompose(raw, ours, "2_post", tokens, position=-1, convention="transformer_lens")
    source, target = int(d.support[0]), int(d.support[2])
    clean = raw.run_with_cache(tokens)[1] if clamp else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not clamp:
            t = theirs.swap_hooks(raw, source, target, [1, 2], alpha=alpha)
        elif "clamp_to" in inspect.signature(theirs.swap_hooks).parameters:  # 4.3
            t = theirs.swap_hooks(raw, source, target, [1, 2], alpha=alpha, clamp_to=clean)
        elif alpha == 1.0:  # 3.9: the clamp at full strength only
            t = theirs.swap_clamp_hooks(raw, source, target, [1, 2], clean)
        else:
            pytest.skip(f"TransformerLens {_compat.TL_VERSION}'s clamp (swap_clamp_hooks) has no alpha")
        o = tl.swap_hooks(
            raw,
            ours,
            ["1_post", "2_post"],
            source,
            target,
            alpha=alpha,
            clamp_to=clean,
            convention="transformer_lens",
        )
    with torch.no_grad():
        expected = raw.run_with_hooks(tokens, fwd_hooks=t)
        got = raw.run_with_hooks(tokens, fwd_hooks=o)
        plain = raw(tokens)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the swap did something
