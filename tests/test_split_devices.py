"""Every analysis on a model spread over two devices gives the single-device numbers, and moves each
site's states across devices a number of times that does not depend on the vocabulary tiling.

The second device is ``tests/elsewhere.py``'s: tensors that compute on the CPU but report another
device and, like CUDA, refuse to meet a CPU tensor in one operation. So a lens vector made on the CPU
and added to a state on the other device fails here as it would on two GPUs, and the numbers are the
CPU's own kernels on the same data: equal to the single-device model's to float32 rounding (1e-6).
The model is split as accelerate's device maps split it (each module moving its inputs to its own
device), both ways round: the readout (final norm, unembedding) with the last blocks, as
TransformerLens's ``n_devices`` places it, and the readout on the first device, as
``benchmarks/gpu_check.py`` does. The lenses are made on the CPU, so they also sit on another device
than the readout in one layout and the first blocks in the other (see ``docs/devices.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pandas as pd
import pytest
import torch

import tl_logitlens as tl
from tests import elsewhere
from tests.helpers import HAS_HOOKED_TRANSFORMER, SENTENCES, tiny_bridge, tiny_model
from tests.test_jspace import _lens
from tl_logitlens.analyses import lens_dictionary as lens_dictionary_module
from tl_logitlens.core import kernel
from tl_logitlens.core.devices import PlacedCopies, block_devices, readout_device

PROMPT = SENTENCES[0]
SITE = "1_post"
ATOL = 1e-6  # the same CPU kernels on the same numbers: equal to float32 rounding


def _decomposed(m, lenses):
    return tl.decompose(m, lenses["jacobian"], SITE, PROMPT, position=-1, k=4)


def _patch(m, lenses):
    d = _decomposed(m, lenses)
    return tl.coordinate_patch(m, lenses["jacobian"], SITE, PROMPT, int(d.support[0]), 9, position=-1, k=4)


def _run(m, hooks):
    return m.run_with_hooks(m.to_tokens(PROMPT), fwd_hooks=hooks)


TOOLS = {
    "logit_lens": lambda m, ls: tl.logit_lens(m, SENTENCES[:2], lens=ls["tuned"]),
    "lens_dictionary": lambda m, ls: tl.lens_dictionary(m, ls["jacobian"], SITE).atoms(torch.tensor([3, 5])),
    "lens_vector_dictionary": lambda m, ls: tl.lens_vector_dictionary(m, ls["tuned"], SITE),
    "decompose": _decomposed,
    "occupancy": lambda m, ls: tl.occupancy(
        m, ls["jacobian"], SITE, PROMPT, positions=[2, -1], max_atoms=3, n_controls=2
    ),
    "fraction_of_variance": lambda m, ls: tl.fraction_of_variance(m, ls["jacobian"], PROMPT, sites="resid_post", k=3),
    "coordinate_patch": _patch,
    "coordinate_patch_hook": lambda m, ls: _run(m, [_patch(m, ls).hook()]),
    "swap_hooks": lambda m, ls: _run(m, tl.swap_hooks(m, ls["jacobian"], [SITE, "0_post"], 4, 9, alpha=2.0)),
    "decode_vector": lambda m, ls: tl.decode_vector(
        m, torch.randn(2, m.cfg.d_model, generator=torch.Generator().manual_seed(0)), site=SITE, lens=ls["jacobian"]
    ),
    "steer": lambda m, ls: _run(m, [tl.steer(m, ls["tuned"], SITE, " the", 3.0)]),
    "steering_sweep": lambda m, ls: tl.steering_sweep(
        m, PROMPT, 7, [0.0, 3.0], site=SITE, lens=ls["jacobian"], positions=[-1, -2], seed=5
    ),
    "placebo": lambda m, ls: _run(m, [tl.placebo(m, tl.steer(m, ls["jacobian"], SITE, 7, 5.0), seed=3)]),
    "generate": lambda m, ls: tl.generate(
        m, PROMPT, fwd_hooks=[tl.steer(m, None, SITE, 7, 2.0)], max_new_tokens=3, temperature=1.0, seed=1
    ),
    "faithfulness": lambda m, ls: tl.faithfulness(
        m, SENTENCES[:3], lenses={"j": ls["jacobian"], "t": ls["tuned"]}, seq_len=16, n_bootstrap=0
    ),
    "patchscope": lambda m, ls: tl.patchscope(m, SENTENCES[:2], source_sites=["0_post", SITE], keep_logprobs=True),
    "patchscope_generate": lambda m, ls: tl.patchscope_generate(
        m, SENTENCES[:2], source_sites=["0_post"], max_new_tokens=2, temperature=1.0
    ),
    "latent_language": lambda m, ls: tl.latent_language(
        m, SENTENCES[:2], [" the", " and"], [" a", " she"], lens=ls["tuned"], n_bootstrap=10
    ),
}


def assert_same(got, want, where: str = "result") -> None:
    """``got`` (from the split model) equals ``want`` field by field: tensors on the CPU to ``ATOL``
    (integers exactly), NaN where ``want`` has NaN; numbers likewise; text, ints and flags exactly."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        got, want = got.cpu(), want.cpu()
        assert got.dtype == want.dtype and got.shape == want.shape, where
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL, equal_nan=True, msg=where)
        else:
            assert torch.equal(got, want), where
    elif dataclasses.is_dataclass(want) and not isinstance(want, type):
        assert type(got) is type(want), where
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=ATOL, abs_tol=ATOL), where
    elif isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want, rtol=ATOL, atol=ATOL)
    elif isinstance(want, (str, int, bool, type(None), torch.device, torch.dtype)):
        assert got == want, where
    # anything else (a tokenizer the result keeps for display) is the same object on both sides


def _model():
    """The tiny model the J-space tests use: a HookedTransformer where TransformerLens has one, else a bridge."""
    return tiny_model("LN") if HAS_HOOKED_TRANSFORMER else tiny_bridge("LN")


@pytest.fixture(scope="module")
def setting():
    one = _model()
    lenses = {"jacobian": _lens(one, "jacobian"), "tuned": _lens(one, "tuned")}
    with elsewhere.elsewhere():
        split = {True: elsewhere.split(one, True), False: elsewhere.split(one, False)}
    return one, lenses, split, {}


@pytest.mark.parametrize("readout_elsewhere", [True, False], ids=["readout-with-last-blocks", "readout-first"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_each_tool_on_a_split_model_gives_the_single_device_numbers(setting, tool, readout_elsewhere):
    one, lenses, split, wanted = setting
    two = split[readout_elsewhere]
    assert {d.type for d in block_devices(two)} == {"cpu", "meta"}
    assert readout_device(two).type == ("meta" if readout_elsewhere else "cpu")
    if tool not in wanted:
        wanted[tool] = TOOLS[tool](one, lenses)
    with elsewhere.elsewhere():
        assert_same(TOOLS[tool](two, lenses), wanted[tool], tool)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_each_tool_moves_the_same_tensors_whatever_the_vocabulary_tiling(setting, tool, monkeypatch):
    """States cross devices once per site (and forward pass), never once per vocabulary tile: the moves
    with the default tiles and with 16-token tiles (23 of them) are the same."""
    one, lenses, split, _ = setting
    two = split[True]
    with elsewhere.elsewhere():
        TOOLS[tool](two, lenses)  # the lens maps are copied to the readout device once, and kept
        elsewhere.MOVES.clear()
        TOOLS[tool](two, lenses)
        default = list(elsewhere.MOVES)
        monkeypatch.setattr(lens_dictionary_module, "TILE_BYTES", 16 * 4 * one.cfg.d_model)
        monkeypatch.setattr(kernel, "DEFAULT_TILE_SIZE", 16)
        elsewhere.MOVES.clear()
        TOOLS[tool](two, lenses)
        assert elsewhere.MOVES == default
    assert one.cfg.d_vocab // 16 > 20


def _device_maps() -> list:
    layers = [f"model.layers.{i}" for i in range(5)]  # stories260K: a 5-layer Llama
    whole = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    offload = pytest.mark.skipif(
        HAS_HOOKED_TRANSFORMER,
        reason="TransformerLens 3.9's bridge refuses 'disk' device-map targets (only CPU and CUDA ones); 4.x "
        "accepts them with offload_folder",
    )
    return [
        pytest.param({"": "cpu"}, id="all-cpu"),
        pytest.param({name: "cpu" for name in whole + layers}, id="each-module-cpu"),
        # accelerate's AlignDevicesHook loads the last two blocks' weights from disk for each forward pass;
        # their parameters report the meta device, and the states they write are on the CPU
        pytest.param({**{name: "cpu" for name in whole + layers[:3]}, **dict.fromkeys(layers[3:], "disk")},
                     id="later-blocks-offloaded", marks=offload),
    ]


def _boot(folder, processed: bool, **options):
    """A bridge booted from a local folder as a user boots one, in compatibility mode: with the weight
    processing tl.load_model applies (fold_ln, centring), or without (``no_processing``, which 4.x
    requires of a bridge with offloaded modules)."""
    from tl_logitlens.core import compat

    bridge = compat.TransformerBridge.boot_transformers(str(folder), dtype=torch.float32, **options)
    bridge.enable_compatibility_mode(disable_warnings=True, **({} if processed else {"no_processing": True}))
    return bridge.eval()


@pytest.fixture(scope="module")
def plain_bridges():
    from tests.helpers import STORIES, require_shared

    folder = require_shared(STORIES)
    return folder, {processed: _boot(folder, processed, device="cpu") for processed in (True, False)}


@pytest.mark.parametrize("device_map", _device_maps())
def test_a_bridge_booted_with_a_device_map_gives_the_plain_bridges_numbers(plain_bridges, device_map, tmp_path):
    """``boot_transformers(folder, device_map=...)`` (accelerate places the modules): the lens, the
    evaluation and the J-space tools equal the bridge booted with ``device="cpu"`` (1e-6)."""
    folder, plains = plain_bridges
    offloaded = "disk" in device_map.values()
    plain = plains[not offloaded]
    lenses = {"jacobian": _lens(plain, "jacobian"), "tuned": _lens(plain, "tuned")}
    options = {"offload_folder": str(tmp_path)} if offloaded else {}
    mapped = _boot(folder, not offloaded, device_map=device_map, **options)
    assert readout_device(mapped).type == "cpu"
    assert {d.type for d in block_devices(mapped)} == ({"cpu", "meta"} if offloaded else {"cpu"})
    for tool in ("logit_lens", "decompose", "coordinate_patch_hook", "steering_sweep", "faithfulness"):
        assert_same(TOOLS[tool](mapped, lenses), TOOLS[tool](plain, lenses), tool)
    settings = {"seq_len": 16, "progress": False, "n_bootstrap": 0, "lenses": lenses}
    pd.testing.assert_frame_equal(
        tl.evaluate_lenses(mapped, SENTENCES, **settings).to_dataframe(),
        tl.evaluate_lenses(plain, SENTENCES, **settings).to_dataframe(),
        rtol=ATOL,
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "tool", ["logit_lens", "lens_vector_dictionary", "decompose", "steering_sweep", "faithfulness", "latent_language"]
)
def test_lenses_on_another_device_than_the_model_are_read_where_the_states_are(setting, tool):
    """A model on one device and its lenses on the other (``lens.to(device)``): each lens moves its maps to
    the states it reads (a Jacobian lens keeps the copy), so the numbers are those of lenses beside the model."""
    one, lenses, _, wanted = setting
    if tool not in wanted:
        wanted[tool] = TOOLS[tool](one, lenses)
    with elsewhere.elsewhere():
        there = {name: copy.deepcopy(lens).to("meta") for name, lens in lenses.items()}
        assert there["jacobian"].jacobians[0].device.type == "meta" and there["tuned"].weight.device.type == "meta"
        assert_same(TOOLS[tool](one, there), wanted[tool], tool)


def test_a_placed_copy_crosses_devices_on_its_first_call_only():
    """PlacedCopies moves a lens map to another device once: later calls read the kept copy and move
    nothing (finding where the map is must not move it), and on the map's own device it is the map."""
    placed, weight = PlacedCopies(), torch.randn(4, 4)
    with elsewhere.elsewhere():
        elsewhere.MOVES.clear()
        first = placed.on("weight", weight, elsewhere.ELSEWHERE)
        assert elsewhere.MOVES == [((4, 4), "cpu", "meta")]
        assert placed.on("weight", weight, elsewhere.ELSEWHERE) is first
        assert placed.on("weight", weight, "cpu") is weight
        assert len(elsewhere.MOVES) == 1
