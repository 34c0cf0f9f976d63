"""The public API: every name in ``tl_logitlens.__all__`` loads, the names of earlier releases are all
still there, and the module paths that moved keep working (with a ``DeprecationWarning``) until 0.3."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import tl_logitlens as tl

# tl_logitlens.__all__ as of 0.1.0 (before the lens family moved into tl_logitlens.lenses)
RELEASED = {
    "TunedLens", "train_tuned_lens", "AttributionResult", "Batch", "component_lens", "ComponentLensResult",
    "direct_logit_attribution", "direction_lens", "DirectionResult", "evaluate_lenses", "display_tokens",
    "LensEvaluation", "LensResult", "load_lens", "load_model", "logit_diff", "logit_lens", "masked_lens",
    "sliding_mask_lens", "depth_profile", "MaskedLensResult", "SlidingMaskResult", "DepthProfile",
    "NORM_VIEWS", "prepare_inputs", "report",
}


def test_every_released_name_is_still_public():
    assert RELEASED <= set(tl.__all__)


@pytest.mark.parametrize("name", tl.__all__)
def test_every_public_name_loads(name):
    obj = getattr(tl, name)
    assert obj is not None
    assert name in dir(tl)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        tl.frobnicate  # noqa: B018


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("tl_logitlens.tuned", "TunedLens", "tl_logitlens.lenses.tuned"),
        ("tl_logitlens.tuned", "readout_fingerprint", "tl_logitlens.lenses.fingerprint"),
        ("tl_logitlens.tuned_io", "load_lens", "tl_logitlens.lenses.loading"),
        ("tl_logitlens.tuned_io", "pack_windows", "tl_logitlens.core.corpus"),
        ("tl_logitlens.tuned_train", "train_tuned_lens", "tl_logitlens.lenses.tuned_training"),
        ("tl_logitlens.tuned_train", "chunked_kl", "tl_logitlens.lenses.tuned_training"),
        ("tl_logitlens.lens", "logit_lens", "tl_logitlens.analyses.predictions"),
        ("tl_logitlens.lens", "LensResult", "tl_logitlens.analyses.predictions"),
    ],
)
def test_moved_modules_forward_with_a_deprecation_warning(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated .* import {name} from {new}"):
        obj = getattr(module, name)
    assert obj is getattr(importlib.import_module(new), name)


def test_a_moved_module_refuses_a_name_it_never_had():
    module = importlib.import_module("tl_logitlens.tuned")
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def test_the_lens_protocol_module_path_is_the_lens_package_now():
    """``tl_logitlens.lenses`` was a module; it is the lens family's package, with the same names, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from tl_logitlens.lenses import LOGIT_LENS, Lens, LogitLens, lens_name, resolve_lens

    assert isinstance(LOGIT_LENS, LogitLens) and isinstance(LOGIT_LENS, Lens)
    assert lens_name(None) == "logit lens" and resolve_lens(None, None) is LOGIT_LENS


def test_importing_the_package_loads_no_torch():
    """Names load on first use, so ``import tl_logitlens`` (and the CLI's ``--help``) stays fast."""
    code = "import sys, tl_logitlens; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
