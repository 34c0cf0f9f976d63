"""Models spread over several devices: the logic that picks where each tensor goes, tested on one CPU.

A machine with one device cannot split a model, so these tests check what can be checked here: the
device-resolution functions on modules and tensors that report other devices ("meta": shapes without
storage), that every site's states pass through the one move to the readout device once per block of
rows (never once per vocabulary tile), that a lens's maps are copied to the states' device once, and
that TransformerLens 3.9's ``n_devices`` code path gives the single-device numbers. The real CPU+CUDA
split (half the blocks on each) is in ``benchmarks/gpu_check.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import HAS_HOOKED_TRANSFORMER, SENTENCES, assert_close, tiny_model
from tl_logitlens.core import readout as readout_module
from tl_logitlens.core.devices import (
    ReadoutCache,
    block_devices,
    is_spread,
    readout_device,
    site_rows,
    to_device,
)
from tl_logitlens.core.kernel import Unembedding, unembed_metrics
from tl_logitlens.core.readout import Readout, final_site, resolve_sites
from tl_logitlens.lenses import JacobianLens, resolve_lens

CPU, META = torch.device("cpu"), torch.device("meta")


def test_to_device_leaves_a_tensor_where_it_is_and_moves_it_elsewhere():
    x = torch.ones(2, 3)
    assert to_device(x, "cpu") is x and to_device(x, CPU) is x
    moved = to_device(x, "meta")
    assert moved.device == META and moved.shape == x.shape


def test_site_rows_gathers_on_the_states_device_and_moves_only_the_rows():
    states = torch.randn(2, 5, 3)
    b, p = torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2])
    assert_close(
        site_rows(states, b, p, "cpu"), torch.stack([states[0, 4], states[1, 0], states[1, 2]]), atol=0
    )
    moved = site_rows(
        states, b, p, "meta"
    )  # the gathered [row, d_model] rows, not the [batch, pos, d_model] states
    assert moved.device == META and moved.shape == (3, 3)


def test_block_devices_and_is_spread_see_a_model_over_two_devices():
    """A stand-in model whose last two blocks and unembedding report another device."""
    blocks = [
        torch.nn.Linear(2, 2),
        torch.nn.Linear(2, 2),
        torch.nn.Linear(2, 2, device="meta"),
        torch.nn.LayerNorm(2),
    ]
    blocks[3].to("meta")
    spread = SimpleNamespace(blocks=blocks, W_U=torch.empty(2, 7, device="meta"))
    assert block_devices(spread) == (CPU, CPU, META, META)
    assert readout_device(spread) == META and is_spread(spread)
    assert not is_spread(tiny_model("LN"))
    assert block_devices(tiny_model("LN")) == (CPU,) * 3


def test_readout_cache_moves_each_hook_once():
    cache = {"blocks.0.hook_resid_post": torch.randn(2, 4, 3)}
    on_meta = ReadoutCache(cache, "meta")
    first = on_meta["blocks.0.hook_resid_post"]
    assert first.device == META and on_meta["blocks.0.hook_resid_post"] is first
    assert "blocks.0.hook_resid_post" in on_meta and list(on_meta.keys()) == list(cache)
    assert ReadoutCache(cache, "cpu")["blocks.0.hook_resid_post"] is cache["blocks.0.hook_resid_post"]


def test_each_sites_states_move_once_per_chunk_never_per_tile(monkeypatch):
    """The kernel over 3 chunks of rows and 13 vocabulary tiles: every site's rows go to the readout
    device 3 times (once per chunk), the final site's too; the tiles reuse the moved states."""
    model = tiny_model("LN")
    moves: list[tuple[tuple[int, ...], torch.device]] = []
    real = readout_module.site_rows

    def counting(states, rows_b, rows_p, device):
        moves.append((tuple(states.shape), torch.device(device)))
        return real(states, rows_b, rows_p, device)

    monkeypatch.setattr(readout_module, "site_rows", counting)
    tokens = model.to_tokens(SENTENCES[:2])
    _, cache = model.run_with_cache(tokens)
    readout = Readout(model, resolve_lens(model, None), "recompute", True)
    sites = resolve_sites(model, "resid_pre")
    final = final_site(model)
    n_rows = tokens.numel()
    rows_b = torch.arange(tokens.shape[0]).repeat_interleave(tokens.shape[1])
    rows_p = torch.arange(tokens.shape[1]).repeat(tokens.shape[0])
    chunk = -(-n_rows // 3)
    tile = 16
    n_tiles = -(-model.cfg.d_vocab // tile)
    assert n_tiles > 3
    final_sites = frozenset(s for s, site in enumerate(sites) if site.hook == final.hook)
    unembed_metrics(
        lambda s, sl: readout.normed(cache, sites[s], rows_b[sl], rows_p[sl]),
        len(sites),
        lambda sl: readout.normed(cache, final, rows_b[sl], rows_p[sl]),
        final_sites,
        torch.zeros(n_rows, 1, dtype=torch.long),
        5,
        chunk,
        Unembedding.from_model(model),
        "cpu",
        tile_size=tile,
    )
    n_chunks = -(-n_rows // chunk)
    assert len(moves) == n_chunks * len(sites)  # the other sites and the final one, per chunk
    assert all(device == readout_device(model) for _, device in moves)


def test_a_jacobian_lens_copies_each_matrix_to_the_states_device_once():
    model = tiny_model("LN")
    lens = tl.fit_jacobian_lens(model, SENTENCES, seq_len=16, skip_first=2, progress=False)
    assert isinstance(lens, JacobianLens) and lens.jacobians[0].device == CPU
    first = lens._matrix_on(0, META)
    assert first.device == META and lens._matrix_on(0, META) is first  # kept, not copied per call
    assert lens._matrix_on(0, CPU) is lens.jacobians[0]
    with torch.no_grad():
        lens.jacobians[0].mul_(2.0)  # an edited matrix is copied again
    assert lens._matrix_on(0, META) is not first
    states = torch.randn(4, model.cfg.d_model)
    assert lens.translate("0_post", states.to("meta")).device == META
    assert_close(lens.translate("0_post", states), states @ lens.jacobians[0].T, atol=1e-6)


@pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason="n_devices is TransformerLens 3.x's HookedTransformer")
def test_a_model_built_with_n_devices_gives_the_single_device_numbers(monkeypatch):
    """TransformerLens 3.9's n_devices path (the residual handed between block devices, the modules placed
    by move_model_modules_to_device), on a CPU where every device is the CPU: lens, evaluation, J-lens
    fit, tuned-lens training and steering equal the single-device model's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    one = tiny_model("LN")
    keys = (
        "n_layers",
        "d_model",
        "n_heads",
        "d_head",
        "d_mlp",
        "d_vocab",
        "n_ctx",
        "act_fn",
        "normalization_type",
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the config checks that 2 CUDA devices exist
    cfg = HookedTransformerConfig(
        **{k: getattr(one.cfg, k) for k in keys}, seed=0, device="cpu", n_devices=2, default_prepend_bos=True
    )
    two = HookedTransformer(cfg, one.tokenizer)
    two.load_state_dict(one.state_dict())
    two.move_model_modules_to_device()
    two.eval()
    assert two.cfg.n_devices == 2

    a, b = tl.logit_lens(one, SENTENCES[:2]), tl.logit_lens(two, SENTENCES[:2])
    assert_close(b.top_logprobs, a.top_logprobs, atol=1e-6, equal_nan=True)  # NaN: padding cells
    assert_close(b.kl_to_final, a.kl_to_final, atol=1e-6, equal_nan=True)
    ev_a = tl.evaluate_lenses(one, SENTENCES, seq_len=16, progress=False, n_bootstrap=0)
    ev_b = tl.evaluate_lenses(two, SENTENCES, seq_len=16, progress=False, n_bootstrap=0)
    assert ev_a.to_dataframe().equals(ev_b.to_dataframe())
    fit = {"seq_len": 16, "skip_first": 2, "progress": False}
    j_a, j_b = tl.fit_jacobian_lens(one, SENTENCES, **fit), tl.fit_jacobian_lens(two, SENTENCES, **fit)
    for layer in j_a.jacobians:
        assert_close(j_b.jacobians[layer], j_a.jacobians[layer], atol=1e-6)
    train = {"steps": 2, "tokens_per_step": 32, "seq_len": 16, "progress": False}
    t_a, t_b = tl.train_tuned_lens(one, SENTENCES, **train), tl.train_tuned_lens(two, SENTENCES, **train)
    assert_close(t_b.weight.detach(), t_a.weight.detach(), atol=1e-6)
    tokens = one.to_tokens(SENTENCES[0])
    with one.hooks(fwd_hooks=[tl.steer(one, None, "1_post", " the", 3.0)]):
        steered_a = one(tokens)
    with two.hooks(fwd_hooks=[tl.steer(two, None, "1_post", " the", 3.0)]):
        steered_b = two(tokens)
    assert_close(steered_b, steered_a, atol=1e-5)


def test_a_tuned_lens_copies_its_maps_to_the_states_device_once():
    """Like the Jacobian lens: one copy per device, kept until the weights change (an optimiser step)."""
    model = tiny_model("LN")
    lens = tl.TunedLens.for_model(model)
    with torch.no_grad():
        lens.weight.normal_(0.0, 0.1)
    states = torch.randn(4, model.cfg.d_model)
    want = lens.translate("0_post", states)
    assert_close(want, states + states @ lens.weight[1].detach().T + lens.bias[1].detach(), atol=1e-5)
    assert lens.translate("0_post", states.to("meta")).device == META
    first = lens._placed.on("weight", lens.weight, META)
    lens.translate("1_post", states.to("meta"))
    assert lens._placed.on("weight", lens.weight, META) is first  # kept, not copied per call
    with torch.no_grad():
        lens.weight.mul_(2.0)
    assert lens._placed.on("weight", lens.weight, META) is not first
    assert lens._placed.on("weight", lens.weight, CPU) is lens.weight
