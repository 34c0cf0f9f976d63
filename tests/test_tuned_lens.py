"""The tuned lens: the streamed KL and its gradient, identities with the logit lens, training, saving and
loading (this package's format and tuned-lens 0.2.0's), and every refusal."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, SHARED, STORIES, assert_close, require_shared, tiny_model
from tl_logitlens.core.corpus import pack_windows, read_texts
from tl_logitlens.lenses import TunedLens, load_lens, train_tuned_lens
from tl_logitlens.lenses.files import read_lens_folder, write_lens_folder
from tl_logitlens.lenses.fingerprint import readout_fingerprint, writing_weights_centred
from tl_logitlens.lenses.tuned_training import chunked_kl, final_norm_f32

LENS_DIR = SHARED / "lenses" / "stories260K-tuned-lens"
CORPUS = SHARED / "corpora" / "tinystories_1000.json"
TEXTS = SENTENCES * 3


def _naive_kl(x, x_final, w_u, b, scale):
    """``KL(final ‖ site)`` per row from full float64 log-softmaxes: the slow, obvious reference."""
    z = scale * (x.double() @ w_u.double() + (0 if b is None else b.double()))
    zf = scale * (x_final.double() @ w_u.double() + (0 if b is None else b.double()))
    logq = zf.log_softmax(-1).repeat(x.shape[0] // x_final.shape[0], 1)
    return (logq.exp() * (logq - z.log_softmax(-1))).sum(-1)


@pytest.mark.parametrize("with_bias", [True, False], ids=["b_U", "no-b_U"])
@pytest.mark.parametrize("scale", [1.0, 0.37], ids=["scale-1", "scale-0.37"])
def test_chunked_kl_and_gradient_equal_the_naive_full_logits(with_bias, scale):
    gen = torch.Generator().manual_seed(0)
    d, v, n = 16, 1000, 37
    w_u = torch.randn(d, v, generator=gen) * 0.8
    b = torch.randn(v, generator=gen) if with_bias else None
    x_final = torch.randn(n, d, generator=gen) * 2
    x = (torch.randn(3 * n, d, generator=gen) * 2).requires_grad_()
    wt = w_u.T.contiguous()
    # blocks that divide neither the rows nor the vocabulary
    kl = chunked_kl(x, x_final, wt, b, scale, row_block=10, vocab_chunk=96)
    x64 = x.detach().double().requires_grad_()
    ref = _naive_kl(x64, x_final, w_u, b, scale)
    assert_close(kl, ref.float(), atol=2e-5, rtol=1e-5)
    weights = torch.rand(3 * n, generator=gen)
    (kl * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    assert_close(x.grad, x64.grad.float(), atol=2e-5, rtol=1e-5)
    assert (kl > 0).all()


def test_final_norm_f32_equals_the_models_final_norm(any_model):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(2, 5, any_model.cfg.d_model, generator=gen) * 3 + 1
    with torch.no_grad():
        expected = any_model.ln_final(y)
    assert_close(final_norm_f32(any_model, y), expected, atol=1e-5)


def test_at_initialisation_the_tuned_lens_is_exactly_the_logit_lens(any_model):
    lens = TunedLens.for_model(any_model)
    sites = ["resid_pre", "resid_post"]
    a = tl.logit_lens(any_model, SENTENCES[:2], lens=lens, sites=sites, targets=[" the"])
    b = tl.logit_lens(any_model, SENTENCES[:2], sites=sites, targets=[" the"])
    assert a.lens_name == "tuned lens" and b.lens_name == "logit lens"
    for field in ("top_ids", "top_logprobs", "entropy", "kl_to_final", "next_logprobs", "target_ranks"):
        assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0, msg=field, equal_nan=True)  # NaN padding


def test_translate_maps_sites_to_translators_and_keeps_dtype(ln_model):
    lens = TunedLens.for_model(ln_model)
    with torch.no_grad():
        lens.weight.normal_(generator=torch.Generator().manual_seed(0))
        lens.bias.normal_(generator=torch.Generator().manual_seed(1))
    h = torch.randn(4, ln_model.cfg.d_model)
    for i in range(ln_model.cfg.n_layers):
        expected = h + h @ lens.weight[i].T + lens.bias[i]
        assert_close(lens.translate(f"{i}_pre", h), expected, atol=1e-6)
        if i > 0:  # resid_post of layer i-1 is resid_pre of layer i
            assert torch.equal(lens.translate(f"{i - 1}_post", h), lens.translate(f"{i}_pre", h))
    last = ln_model.cfg.n_layers - 1
    assert torch.equal(lens.translate("final_post", h), h)
    assert torch.equal(lens.translate(f"{last}_post", h), h)
    out = lens.translate("1_pre", h.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), lens.translate("1_pre", h.bfloat16().float()).bfloat16().float(), atol=0)
    with pytest.raises(ValueError, match="translators for resid_pre/resid_post sites"):
        lens.translate("1_mid", h)
    with pytest.raises(ValueError, match="resid_pre/resid_post"):
        tl.logit_lens(ln_model, SENTENCES[0], lens=lens, sites=["resid_pre", "resid_mid"])
    with pytest.raises(ValueError, match="beyond this lens"):
        lens.translate(f"{last + 1}_pre", h)


def _held_out_kl(model, windows, lens):
    """Mean ``KL(final ‖ site)`` per ``resid_pre`` site over every position, from ``logit_lens``."""
    res = tl.logit_lens(model, windows, lens=lens, top_k=1)
    return res.kl_to_final[:-1].mean((1, 2))


def test_training_is_deterministic_keeps_the_model_frozen_and_lowers_kl(ln_model):
    before = {k: v.clone() for k, v in ln_model.state_dict().items()}
    a = train_tuned_lens(ln_model, TEXTS, steps=12, tokens_per_step=64, seq_len=32, progress=False, seed=3)
    b = train_tuned_lens(ln_model, TEXTS, steps=12, tokens_per_step=64, seq_len=32, progress=False, seed=3)
    c = train_tuned_lens(ln_model, TEXTS, steps=12, tokens_per_step=64, seq_len=32, progress=False, seed=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert a.weight.dtype == torch.float32
    for k, v in ln_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in ln_model.parameters())
    losses = a.meta["training"]["loss_per_step"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    windows = pack_windows(ln_model, read_texts(TEXTS), 32)
    assert (_held_out_kl(ln_model, windows, a) < _held_out_kl(ln_model, windows, None)).all()


def test_training_loss_is_the_lens_kl_summed_over_sites(ln_model):
    """The first step's loss (the lens at init) equals the logit lens's mean KL summed over sites."""
    windows = pack_windows(ln_model, read_texts(TEXTS), 32)
    lens = train_tuned_lens(ln_model, TEXTS, steps=1, tokens_per_step=32 * len(windows), seq_len=32,
                            progress=False)
    expected = float(_held_out_kl(ln_model, windows, None).sum())
    assert abs(lens.meta["training"]["loss_per_step"][0] - expected) < 1e-4


def test_bf16_model_trains_float32_translators(ln_model):
    model = tiny_model("RMS", folded=True, dtype=torch.bfloat16)
    lens = train_tuned_lens(model, TEXTS, steps=3, tokens_per_step=64, seq_len=32, progress=False)
    assert lens.weight.dtype == torch.float32 and lens.weight.abs().sum() > 0
    res = tl.logit_lens(model, SENTENCES[:1], lens=lens)
    assert torch.isfinite(res.top_logprobs).all()


def test_save_load_round_trip_is_bit_exact(tmp_path, ln_model):
    lens = train_tuned_lens(ln_model, TEXTS, steps=4, tokens_per_step=64, seq_len=32, progress=False)
    lens.save(tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["tuned_lens.json", "tuned_lens.safetensors"]
    back = load_lens(tmp_path / "lens", ln_model)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.meta == json.loads(json.dumps(lens.meta)) and back.name == lens.name
    meta = json.loads((tmp_path / "lens" / "tuned_lens.json").read_text())
    assert {"model_name", "d_model", "n_layers", "fingerprint", "format_version"} <= set(meta)
    a = tl.logit_lens(ln_model, SENTENCES[:2], lens=lens)
    b = tl.logit_lens(ln_model, SENTENCES[:2], lens=back)
    assert_close(a.top_logprobs, b.top_logprobs, atol=0, rtol=0, equal_nan=True)  # NaN at padding in both


def test_lens_for_another_model_is_refused(tmp_path, ln_model):
    lens = TunedLens.for_model(ln_model)
    other = tiny_model("LN", folded=False, seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="made for another model"):
        lens.check_model(other)
    lens.save(tmp_path / "lens")
    with pytest.raises(ValueError, match="made for another model"):
        load_lens(tmp_path / "lens", other)
    with pytest.raises(ValueError, match="made for another model"):
        tl.logit_lens(other, SENTENCES[0], lens=lens)
    deeper = tiny_model("LN", folded=False, n_layers=4)
    with pytest.raises(ValueError, match="n_layers is 3, but the model's is 4; this tuned lens was made for another model"):
        load_lens(tmp_path / "lens", deeper)


def _write_tuned_lens_checkpoint(folder: Path, model, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tuned-lens 0.2.0 checkpoint (config.json + params.pt) with random translators."""
    gen = torch.Generator().manual_seed(seed)
    d, n = model.cfg.d_model, model.cfg.n_layers
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = torch.randn(d, d, generator=gen) * 0.1
        state[f"{i}.bias"] = torch.randn(d, generator=gen) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "params.pt")
    config = {"base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": n, "bias": True,
              "base_model_revision": None, "unembed_hash": None, "lens_type": "linear_tuned_lens"}
    (folder / "config.json").write_text(json.dumps(config))
    return state


def test_tuned_lens_checkpoint_is_exact_on_an_uncentred_layernorm_model(tmp_path, ln_model):
    """Translator i reads blocks.{i}.hook_resid_pre: checked against an explicit reference."""
    state = _write_tuned_lens_checkpoint(tmp_path / "tl", ln_model)
    lens = load_lens(tmp_path / "tl", ln_model)
    tokens = ln_model.to_tokens(SENTENCES[:1])
    res = tl.logit_lens(ln_model, tokens, lens=lens, top_k=6)
    _, cache = ln_model.run_with_cache(tokens)
    for i in range(ln_model.cfg.n_layers):
        h = cache[f"blocks.{i}.hook_resid_pre"][0]
        translated = h + h @ state[f"{i}.weight"].T + state[f"{i}.bias"]
        logp = (ln_model.ln_final(translated[None])[0] @ ln_model.W_U + ln_model.b_U).log_softmax(-1)
        assert_close(res.top_logprobs[i, 0], logp.topk(6).values, atol=1e-4)


def test_tuned_lens_checkpoint_on_a_centred_layernorm_model_is_refused(tmp_path):
    centred = tiny_model("LN", folded=True)
    assert writing_weights_centred(centred) is True
    assert writing_weights_centred(tiny_model("LN", folded=False)) is False
    assert writing_weights_centred(tiny_model("RMS", folded=True)) is None
    _write_tuned_lens_checkpoint(tmp_path / "tl", centred)
    with pytest.raises(ValueError, match=r"center_writing_weights=False"):
        load_lens(tmp_path / "tl", centred)


def test_own_lens_trained_centred_is_refused_on_the_uncentred_stream(ln_model):
    centred = tiny_model("LN", folded=True)
    lens = TunedLens.for_model(centred)
    assert lens.meta["stream_centred"] is True
    lens.check_model(centred)
    # the same weights unfolded and uncentred read the same probes (fingerprint passes), but the stream differs
    with pytest.raises(ValueError, match="default center_writing_weights=True"):
        lens.check_model(ln_model)


def test_malicious_pickle_is_refused(tmp_path, ln_model):
    folder = tmp_path / "evil"
    _write_tuned_lens_checkpoint(folder, ln_model)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"0.weight": Evil()}, folder / "params.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_lens(folder, ln_model)
    assert not marker.exists()


def test_malformed_checkpoints_are_refused(tmp_path, ln_model):
    state = _write_tuned_lens_checkpoint(tmp_path / "a", ln_model)
    del state["2.bias"]
    torch.save(state, tmp_path / "a" / "params.pt")
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        load_lens(tmp_path / "a", ln_model)
    state = _write_tuned_lens_checkpoint(tmp_path / "b", ln_model)
    state["1.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "b" / "params.pt")
    with pytest.raises(ValueError, match="shape"):
        load_lens(tmp_path / "b", ln_model)
    _write_tuned_lens_checkpoint(tmp_path / "c", ln_model)
    (tmp_path / "c" / "config.json").write_text('{"lens_type": "linear_tuned_lens"}')
    with pytest.raises(ValueError, match=r"config.json: d_model is None, not a whole number"):
        load_lens(tmp_path / "c", ln_model)
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="holds no lens"):
        load_lens(tmp_path / "d", ln_model)
    with pytest.raises(ValueError, match="no lens at"):
        load_lens(tmp_path / "missing", ln_model)
    with pytest.raises(TypeError, match="built-in name"):
        load_lens(3, ln_model)
    TunedLens.for_model(ln_model).save(tmp_path / "e")
    tensors, meta = read_lens_folder(tmp_path / "e", "tuned_lens")
    write_lens_folder(tmp_path / "e", "tuned_lens", tensors, {**meta, "format_version": 99})
    with pytest.raises(ValueError, match="format version 99"):
        load_lens(tmp_path / "e", ln_model)


def test_the_weights_file_carries_the_metadata(tmp_path, ln_model):
    """The lens is its weights file: a stale or missing JSON card (a save killed between the two writes)
    does not change what loads; a folder of format version 1 (metadata in the card only) still loads."""
    lens = TunedLens.for_model(ln_model)
    lens.save(tmp_path / "a")
    (tmp_path / "a" / "tuned_lens.json").write_text('{"format_version": 1, "d_model": 3}')
    assert load_lens(tmp_path / "a", ln_model).meta["fingerprint"] == lens.meta["fingerprint"]
    (tmp_path / "a" / "tuned_lens.json").unlink()
    assert load_lens(tmp_path / "a", ln_model).meta["fingerprint"] == lens.meta["fingerprint"]
    from safetensors.torch import save_file

    tensors, meta = read_lens_folder(tmp_path / "a", "tuned_lens")
    (tmp_path / "v1").mkdir()
    save_file(tensors, tmp_path / "v1" / "tuned_lens.safetensors")
    (tmp_path / "v1" / "tuned_lens.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert load_lens(tmp_path / "v1", ln_model).meta["format_version"] == 1


def test_texts_from_files_lists_and_datasets(tmp_path):
    """Training reads its text through tl_logitlens.core.corpus (tested there); the sources reach it."""
    (tmp_path / "a.txt").write_text("one two three")
    (tmp_path / "a.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "a.jsonl").write_text('"one"\n\n{"text": "two"}\n')
    assert read_texts(tmp_path / "a.txt") == ["one two three"]
    assert read_texts(str(tmp_path / "a.json")) == ["one", "two"]
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts(iter(["a", " ", "b"])) == ["a", "b"]
    datasets = pytest.importorskip("datasets")
    assert read_texts(datasets.Dataset.from_dict({"text": ["x", "y"]})) == ["x", "y"]
    with pytest.raises(ValueError, match="no corpus file"):
        train_tuned_lens(tiny_model("LN"), tmp_path / "nope.txt", progress=False)
    with pytest.raises(TypeError, match="not a string"):
        train_tuned_lens(tiny_model("LN"), ["a", 3], progress=False)
    with pytest.raises(ValueError, match="holds no text"):
        train_tuned_lens(tiny_model("LN"), ["", "  "], progress=False)


def test_windows_start_with_bos_and_hold_the_stream_in_order(ln_model):
    tok = ln_model.tokenizer
    windows = pack_windows(ln_model, SENTENCES, 16)
    bos = tok.bos_token_id
    assert (windows[:, 0] == bos).all() and windows.shape[1] == 16
    stream = []
    for i, s in enumerate(SENTENCES):
        stream += ([bos] if i else []) + tok(s, add_special_tokens=False)["input_ids"]
    assert windows[:, 1:].flatten().tolist() == stream[: windows.shape[0] * 15]
    with pytest.raises(ValueError, match="seq_len must be an int from 2"):
        pack_windows(ln_model, SENTENCES, ln_model.cfg.n_ctx + 1)


def test_bad_training_settings_are_refused(ln_model):
    with pytest.raises(ValueError, match="steps=0 must be at least 1"):
        train_tuned_lens(ln_model, TEXTS, steps=0, progress=False)
    with pytest.raises(ValueError, match="tokens_per_step=0 must be at least 1"):
        train_tuned_lens(ln_model, TEXTS, tokens_per_step=0, progress=False)
    with pytest.raises(ValueError, match="momentum"):
        train_tuned_lens(ln_model, TEXTS, momentum=1.0, progress=False)
    capped = tiny_model("RMS", folded=True, output_logits_soft_cap=30.0)
    with pytest.raises(ValueError, match="soft-caps"):
        train_tuned_lens(capped, TEXTS, steps=1, progress=False)
    with pytest.raises(ValueError, match="training mode"):
        train_tuned_lens(tiny_model("LN").train(), TEXTS, steps=1, progress=False)


# --- real weights -------------------------------------------------------------------------------


def test_tuned_lens_reference_outputs_are_reproduced(stories):
    """tuned-lens 0.2.0's own outputs on stories260K, through load_lens + logit_lens, to 1e-4."""
    ref = torch.load(require_shared(LENS_DIR) / "reference.pt", weights_only=True)
    lens = load_lens(LENS_DIR, stories)
    assert lens.meta["format"] == "tuned-lens 0.2.0"
    ids = ref["input_ids"]
    n_pos = ids.shape[1] - 1
    tuned = tl.logit_lens(stories, ids, lens=lens, top_k=10)
    plain = tl.logit_lens(stories, ids, top_k=10)
    n = stories.cfg.n_layers
    assert tuned.labels[:n] == tuple(f"{i}_pre" for i in range(n))
    assert_close(tuned.top_logprobs[:n], ref["tuned_top_logprobs"], atol=1e-4)
    # ids agree wherever the reference's neighbouring log-probs are not tied within the tolerance
    gaps = ref["tuned_top_logprobs"][..., :-1] - ref["tuned_top_logprobs"][..., 1:]
    clear = torch.cat([gaps > 1e-4, torch.ones_like(gaps[..., :1], dtype=torch.bool)], -1)
    assert torch.equal(tuned.top_ids[:n][clear], ref["tuned_top_ids"][clear])
    assert_close(tuned.next_logprobs[:n, :, :n_pos], ref["tuned_next_logprobs"], atol=1e-4)
    assert_close(plain.next_logprobs[:n, :, :n_pos], ref["logit_next_logprobs"], atol=1e-4)


def _tinystories_split(n_held: int = 100) -> tuple[list[str], list[str]]:
    """The demo models' split: story indices shuffled with ``random.Random(1234)``, the last 100 held out."""
    stories = json.loads(require_shared(CORPUS).read_text())
    order = list(range(len(stories)))
    random.Random(1234).shuffle(order)
    return [stories[i] for i in order[:-n_held]], [stories[i] for i in order[-n_held:]]


@pytest.mark.slow
def test_trained_lens_beats_the_logit_lens_on_stories260k(stories):
    train, held = _tinystories_split()
    lens = train_tuned_lens(stories, train[:200], steps=25, tokens_per_step=512, seq_len=128, progress=False)
    windows = pack_windows(stories, held[:30], 128)
    tuned, logit = _held_out_kl(stories, windows, lens), _held_out_kl(stories, windows, None)
    assert (tuned < logit).all(), (tuned, logit)
    assert tuned[0] < 0.5 * logit[0]


@pytest.mark.slow
def test_trained_lens_beats_the_logit_lens_on_the_demo_model():
    model = tl.load_model("demo")
    train, held = _tinystories_split()
    lens = train_tuned_lens(model, train[:200], steps=25, tokens_per_step=512, seq_len=128, progress=False)
    windows = pack_windows(model, held[:30], 128)
    tuned, logit = _held_out_kl(model, windows, lens), _held_out_kl(model, windows, None)
    assert (tuned < logit).all(), (tuned, logit)


def test_readout_fingerprint_survives_weight_processing_and_dtype(stories):
    require_shared(STORIES)
    fp = readout_fingerprint(stories)
    lens = TunedLens.for_model(stories)
    assert lens.meta["fingerprint"] == fp
    unprocessed = tl.load_model(STORIES, fold_ln=False, center_unembed=False)
    lens.check_model(unprocessed)
    lens.check_model(tl.load_model(STORIES, dtype="bfloat16"))


def test_shipped_demo_lens_loads_for_the_demo_model_only(stories):
    demo = tl.load_model("demo")
    lens = tl.load_lens("demo", demo)
    assert lens.name == "tuned lens" and lens.meta["model_name"] == "demo"
    res = tl.logit_lens(demo, "Once upon a time, there", lens=lens)
    assert res.lens_name == "tuned lens"
    with pytest.raises(ValueError, match="d_model is 128, but the model's is 64; this tuned lens was made for another model"):
        tl.load_lens("demo", stories)


@pytest.mark.slow
def test_shipped_demo_lens_card_figures_reproduce():
    """The held-out KL per site in the lens's json (and card) is recomputed from the shipped files."""
    from tl_logitlens.lenses.loading import BUILTIN_LENSES as DEMO_LENSES

    model = tl.load_model("demo")
    lens = tl.load_lens("demo", model)
    evaluation = lens.meta["evaluation"]
    _, held = _tinystories_split()
    stories = json.loads(require_shared(CORPUS).read_text())
    assert [stories[i] for i in evaluation["held_out_indices"]] == held
    windows = pack_windows(model, held, lens.meta["training"]["seq_len"])
    assert windows.numel() == evaluation["tokens"]
    total_logit = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    total_tuned = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    for i in range(0, len(windows), 16):
        total_logit += tl.logit_lens(model, windows[i : i + 16], top_k=1).kl_to_final[:-1].double().sum((1, 2))
        total_tuned += tl.logit_lens(model, windows[i : i + 16], lens=lens, top_k=1).kl_to_final[:-1].double().sum((1, 2))
    assert_close(total_logit / windows.numel(), torch.tensor(evaluation["logit_lens_kl"], dtype=torch.float64), atol=1e-4)
    assert_close(total_tuned / windows.numel(), torch.tensor(evaluation["tuned_lens_kl"], dtype=torch.float64), atol=1e-4)
    assert (total_tuned < total_logit).all()
    card = (DEMO_LENSES["demo"] / "LENS_CARD.md").read_text()
    for site, lo, tu in zip(evaluation["sites"], evaluation["logit_lens_kl"], evaluation["tuned_lens_kl"]):
        assert f"| {site} | {lo:.3f} | {tu:.3f} |" in card
