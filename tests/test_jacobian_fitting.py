"""Fitting the Jacobian lens: the fit equals a slow reference (an explicit Jacobian per prompt, averaged
by hand), TransformerLens 4.3's own fit and its published artifact; processed and raw weights give the
same lens; the fit is deterministic, resumes bit for bit, and gives one process's lens under torchrun;
every bad input is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import (
    NORM_IDS,
    NORM_VARIANTS,
    SENTENCES,
    SHARED,
    STORIES,
    assert_close,
    require_shared,
    tiny_model,
)
from tl_logitlens.core import compat as _compat
from tl_logitlens.lenses.jacobian_fitting import resid_post_hook

ROOT = Path(__file__).resolve().parents[1]
JLENS_DIR = SHARED / "lenses" / "stories260K-jacobian-lens"
STORIES_JSON = SHARED / "corpora" / "tinystories_1000.json"
# the settings of the shared artifact (shared/README.md): stories 0-7, max_seq_len 64, skip 16
ARTIFACT_SETTINGS = {"seq_len": 64, "skip_first": 16}
# the texts of the tiny-model tests: five sentences of 11-14 tokens, one long text cut to seq_len, and
# one too short to have a valid position at skip_first=3 (BOS + 3 tokens)
TEXTS = [*SENTENCES, " ".join(SENTENCES), "The cat"]
TINY = {"seq_len": 24, "skip_first": 3, "progress": False}


def fit(model, texts=TEXTS, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*were skipped", category=UserWarning)
        return tl.fit_jacobian_lens(model, texts, **{**TINY, **kwargs})


def slow_jacobian_lens(model, texts, seq_len: int, skip_first: int, layers) -> dict[int, torch.Tensor]:
    """The estimator written out: for each prompt and source layer, the full Jacobian
    ``d h_final[t', i] / d h_l[t, j]`` from ``torch.autograd.functional.jacobian`` (the model run from
    ``h_l`` on), then row i = mean over t in V of the sum over t' in V, then the mean over prompts."""
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    sums = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in layers}
    n_prompts = 0
    for text in texts:
        tokens = model.to_tokens(text, prepend_bos=True, truncate=False)[:, :seq_len]
        n = tokens.shape[1]
        if n <= skip_first + 1:
            continue
        n_prompts += 1
        valid = range(skip_first, n - 1)
        for layer in layers:
            source, target = resid_post_hook(model, layer), resid_post_hook(model, n_layers - 1)
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens, names_filter=[source])
            h = cache[source][0].detach()

            def from_source(x, source=source, target=target, tokens=tokens):
                box = {}

                def put(act, hook):
                    return x[None]

                def grab(act, hook):
                    box["y"] = act

                model.run_with_hooks(tokens, fwd_hooks=[(source, put), (target, grab)])
                return box["y"][0]

            full = torch.autograd.functional.jacobian(from_source, h).double()  # [t', i, t, j]
            rows = torch.zeros(d, d, dtype=torch.float64)
            for t in valid:
                for t_out in valid:
                    rows += full[t_out, :, t, :]
            sums[layer] += rows / len(valid)
    return {layer: (s / n_prompts).float() for layer, s in sums.items()}


# --- the estimator --------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization, folded", NORM_VARIANTS, ids=NORM_IDS)
def test_fit_equals_the_slow_reference(normalization, folded):
    model = tiny_model(normalization, folded)
    texts = TEXTS[:2] + TEXTS[5:]  # two sentences, the long text (cut to seq_len), the short one (skipped)
    lens = fit(model, texts, batch_size=2)
    reference = slow_jacobian_lens(model, texts, TINY["seq_len"], TINY["skip_first"], [0, 1])
    assert lens.n_prompts == 3 and lens.meta["skipped_prompts"] == 1
    assert lens.source_layers == (0, 1)
    for layer in (0, 1):
        assert_close(lens.jacobians[layer], reference[layer], atol=1e-5, rtol=1e-5, msg=f"J_{layer}")


def test_chosen_layers_and_cotangent_passes_give_the_same_rows(ln_model):
    full = fit(ln_model, batch_size=3)
    one_layer = fit(ln_model, layers=[1], batch_size=3, dims_per_pass=5)  # 7 passes, the last of 2 rows
    one_per_pass = fit(ln_model, layers=[0], batch_size=1, dims_per_pass=1)
    assert one_layer.source_layers == (1,) and one_layer.meta["fit"]["layers"] == [1]
    assert_close(one_layer.jacobians[1], full.jacobians[1], atol=1e-6, rtol=1e-6)
    assert_close(one_per_pass.jacobians[0], full.jacobians[0], atol=1e-6, rtol=1e-6)


def test_fit_is_bit_exact_deterministic_and_leaves_the_model_as_it_was(ln_model):
    flags = [p.requires_grad for p in ln_model.parameters()]
    a, b = fit(ln_model), fit(ln_model)
    for layer in a.source_layers:
        assert torch.equal(a.jacobians[layer], b.jacobians[layer])
    assert [p.requires_grad for p in ln_model.parameters()] == flags
    assert all(p.grad is None for p in ln_model.parameters())
    assert not ln_model.training


def test_parameters_are_restored_after_an_error():
    model = tiny_model("LN")
    first = next(model.parameters())
    first.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]

    def texts():
        yield from TEXTS[:5]
        raise RuntimeError("the corpus broke")

    with pytest.raises(RuntimeError, match="the corpus broke"):
        fit(model, texts(), batch_size=1)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_skipped_prompts_are_counted_warned_and_recorded(ln_model):
    with pytest.warns(UserWarning, match=r"1 of 7 prompts had no valid position \(at most skip_first \+ 1 = 4"):
        lens = tl.fit_jacobian_lens(ln_model, TEXTS, **TINY)
    assert (lens.n_prompts, lens.meta["skipped_prompts"], lens.meta["texts_read"]) == (6, 1, 7)


def test_metadata_records_the_model_the_settings_and_the_texts(ln_model, tmp_path):
    lens = fit(ln_model, max_prompts=4)
    meta = lens.meta
    assert (meta["d_model"], meta["n_layers"], meta["d_vocab"]) == (32, 3, ln_model.cfg.d_vocab)
    assert meta["normalization_type"] == "LN" and meta["stream_centred"] is False
    assert meta["weights_basis"] == "raw" and meta["fit_dtype"] == "float32"
    assert meta["fit"] == {
        "estimator": "jacobian_lens", "seq_len": 24, "skip_first": 3, "layers": [0, 1],
        "target": "blocks.2.hook_resid_post",
    }
    assert meta["texts"] == "list of 7 texts" and meta["texts_read"] == 4 and lens.n_prompts == 4
    assert json.loads(json.dumps(meta)) == meta  # plain JSON-able values
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(TEXTS[:5]), encoding="utf-8")
    from_file = fit(ln_model, str(corpus))
    assert from_file.meta["texts"] == str(corpus) and from_file.n_prompts == 5
    for layer in from_file.source_layers:  # a file's texts are the list's
        assert torch.equal(from_file.jacobians[layer], fit(ln_model, TEXTS[:5]).jacobians[layer])


def test_merging_fits_on_disjoint_halves_is_the_fit_on_all(ln_model):
    first, second, whole = fit(ln_model, TEXTS[:3]), fit(ln_model, TEXTS[3:]), fit(ln_model)
    merged = tl.JacobianLens.merge([first, second])
    assert merged.n_prompts == whole.n_prompts == 6
    for layer in whole.source_layers:
        assert_close(merged.jacobians[layer], whole.jacobians[layer], atol=1e-6, rtol=1e-6)


# --- processed weights ----------------------------------------------------------------------------


def test_folding_rms_norm_scales_leaves_the_lens_unchanged():
    raw, folded = tiny_model("RMS", folded=False), tiny_model("RMS", folded=True)
    a, b = fit(raw), fit(folded)
    assert a.meta["weights_basis"] == "raw"
    assert b.meta["weights_basis"].startswith("processed by TransformerLens (fold_ln")
    for layer in a.source_layers:
        assert_close(b.jacobians[layer], a.jacobians[layer], atol=1e-5, rtol=1e-5)
    # and each reads the other's model: the same log-probs on both
    on_raw = tl.logit_lens(raw, SENTENCES[:2], lens=b, sites="resid_post", keep_logprobs=True)
    on_folded = tl.logit_lens(folded, SENTENCES[:2], lens=a, sites="resid_post", keep_logprobs=True)
    assert_close(on_raw.full_logprobs, on_folded.full_logprobs, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_a_lens_of_either_layernorm_stream_reads_the_other_exactly():
    """Centring writing weights removes the stream's mean m: h_c = h - m·1. A fitted J carries 1 to 1
    (every block reads through a LayerNorm, which ignores the mean, so the mean rides the residual stream
    to the end), hence J h_c = J h - m·1, which the final LayerNorm removes: a lens of one stream reads
    the other exactly, and load checks J·1 = 1 rather than refusing (a lens that breaks it is refused,
    tests/test_published_lenses.py)."""
    raw, centred = tiny_model("LN", folded=False), tiny_model("LN", folded=True)
    uncentred_lens, centred_lens = fit(raw), fit(centred)
    assert centred_lens.meta["stream_centred"] is True
    assert "center_writing_weights" in centred_lens.meta["weights_basis"]
    for lens in (uncentred_lens, centred_lens):
        on_raw = tl.logit_lens(raw, "Hello world", lens=lens, sites="resid_post", keep_logprobs=True)
        on_centred = tl.logit_lens(centred, "Hello world", lens=lens, sites="resid_post", keep_logprobs=True)
        assert_close(on_raw.full_logprobs, on_centred.full_logprobs, atol=1e-4, rtol=1e-4, equal_nan=True)


# --- resuming and torch.distributed ---------------------------------------------------------------


def test_a_resumed_fit_equals_an_uninterrupted_one_bit_for_bit(ln_model, tmp_path):
    texts = [*TEXTS, *TEXTS, *TEXTS[:4]]  # 18 texts; with batch_size=2, blocks of 8
    settings = {"batch_size": 2, "checkpoint_dir": tmp_path / "ckpt", "checkpoint_every": 8}

    def interrupted():
        yield from texts[:13]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(ln_model, interrupted(), **settings)
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["state"]
    assert saved["position"] == 8
    # the first 8 texts are hashed, not fitted again: others there are refused (issue 34), the same resume
    with pytest.raises(ValueError, match="the corpus differs from the one .* was saved on"):
        fit(ln_model, ["Other words entirely, a different prompt."] * 8 + texts[8:], **settings)
    resumed = fit(ln_model, texts, **settings)
    whole = fit(ln_model, texts, batch_size=2)
    assert (resumed.n_prompts, resumed.meta["skipped_prompts"]) == (whole.n_prompts, whole.meta["skipped_prompts"])
    for layer in whole.source_layers:
        assert torch.equal(resumed.jacobians[layer], whole.jacobians[layer])
    # a finished fit's checkpoint gives the same lens again without fitting
    again = fit(ln_model, texts, **settings)
    assert torch.equal(again.jacobians[0], whole.jacobians[0])
    with pytest.raises(ValueError, match=r"other settings \(fit\.skip_first: 3 then, 2 now"):
        fit(ln_model, texts, **{**settings, "skip_first": 2})


TORCHRUN_SCRIPT = """
import sys, warnings
import torch
import torch.distributed as dist
import tl_logitlens as tl
from tests.helpers import tiny_model
from tests.test_jacobian_fitting import TEXTS, TINY

warnings.simplefilter("ignore")
dist.init_process_group("gloo")
rank = dist.get_rank()
lens = tl.fit_jacobian_lens(tiny_model("LN"), TEXTS * 2, batch_size=2, **TINY)
torch.save({"J": lens.jacobians, "n_prompts": lens.n_prompts, "skipped": lens.meta["skipped_prompts"]},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(ln_model, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), str(script), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    one = fit(ln_model, TEXTS * 2, batch_size=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for got in ranks:
        assert (got["n_prompts"], got["skipped"]) == (one.n_prompts, one.meta["skipped_prompts"]) == (12, 2)
        for layer in one.source_layers:
            assert torch.equal(got["J"][layer], ranks[0]["J"][layer])  # every rank returns the same bits
            assert_close(got["J"][layer], one.jacobians[layer], atol=1e-7, rtol=1e-6)


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 65}, r"seq_len must be an int from 2 to 64 \(the model's n_ctx is 64\), not 65"),
        ({"skip_first": -1}, "skip_first must be an int from 0 to 22"),
        ({"seq_len": 10, "skip_first": 9}, r"skip_first must be an int from 0 to 8 \(a prompt of seq_len=10"),
        ({"layers": [2]}, r"layer 2 is not a source layer of this 3-layer model: pass block indices from 0 to 1"),
        ({"layers": [-1]}, "layer -1 is not a source layer"),
        ({"layers": [0, 1, 0]}, r"layers lists \[0\] more than once"),
        ({"layers": []}, "layers is empty"),
        ({"layers": "0"}, "layers must be a list of ints"),
        ({"layers": [True]}, "layer True is not a source layer"),
        ({"batch_size": 0}, "batch_size must be an int of 1 or more, not 0"),
        ({"batch_size": True}, "batch_size must be an int of 1 or more, not True"),
        ({"dims_per_pass": 33}, r"dims_per_pass must be an int from 1 to 32 \(d_model is 32\)"),
        ({"dims_per_pass": 0}, "dims_per_pass must be an int from 1 to 32"),
        ({"max_prompts": 0}, "max_prompts must be an int of 1 or more"),
        ({"checkpoint_every": 0}, "checkpoint_every must be an int of 1 or more"),
        ({"name": " "}, "name must be a non-empty string"),
    ],
    ids=[
        "seq-len-over-n-ctx", "skip-negative", "skip-leaves-no-position", "layer-last",
        "layer-negative", "layer-twice", "layers-empty", "layers-string", "layer-bool", "batch-zero",
        "batch-bool", "dims-over-d-model", "dims-zero", "max-prompts-zero", "checkpoint-every-zero",
        "name-blank",
    ],
)
def test_bad_settings_are_refused(ln_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tl.fit_jacobian_lens(ln_model, TEXTS, **{**TINY, **kwargs})


def test_settings_of_the_wrong_type_are_refused_without_a_type_checker():
    # under pytest, jaxtyping's import hook type-checks the signature first (a TypeCheckError); a user
    # without it gets these errors from the function's own checks
    from tl_logitlens.lenses import jacobian_fitting as fitting

    with pytest.raises(ValueError, match=r"seq_len must be an int from 2 to 64, not 24\.0"):
        fitting._int_setting("seq_len", 24.0, 2, 64)
    with pytest.raises(ValueError, match="batch_size must be an int of 1 or more, not '8'"):
        fitting._int_setting("batch_size", "8", 1)
    with pytest.raises(ValueError, match="progress must be True or False, not 'yes'"):
        fitting._check_flag("progress", "yes")


def test_no_prompt_long_enough_is_refused(ln_model):
    with pytest.raises(ValueError, match=r"no prompt was long enough: each needs more than skip_first \+ 1 = 17"):
        tl.fit_jacobian_lens(ln_model, ["The cat", "A dog."], seq_len=40, skip_first=16, progress=False)


def test_texts_of_the_wrong_type_are_refused(ln_model):
    with pytest.raises(TypeError, match="the corpus must be a list or iterable of strings"):
        tl.fit_jacobian_lens(ln_model, 42, **TINY)
    with pytest.raises(TypeError, match="document 1 of the corpus is a int"):
        tl.fit_jacobian_lens(ln_model, ["Hello there", 3], **TINY)


def test_a_model_in_training_mode_is_refused():
    model = tiny_model("LN")
    model.train()
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        tl.fit_jacobian_lens(model, TEXTS, **TINY)
    model.eval()
    next(iter(model.blocks)).train()  # one submodule is enough for dropout to change the numbers
    with pytest.raises(ValueError, match=r"modules are in training mode \(e\.g\. 'blocks\.0'.*model\.eval\(\)"):
        tl.fit_jacobian_lens(model, TEXTS, **TINY)


def test_non_causal_attention_and_non_models_are_refused():
    model = tiny_model("LN")
    model.cfg.attention_dir = "bidirectional"
    with pytest.raises(ValueError, match="needs causal attention.*'bidirectional'"):
        tl.fit_jacobian_lens(model, TEXTS, **TINY)
    with pytest.raises(TypeError, match="expected a TransformerLens model"):
        tl.fit_jacobian_lens(torch.nn.Linear(2, 2), TEXTS, **TINY)


def test_an_encoder_is_refused():
    from tests.encoder_helpers import hf_bert

    hf, tokenizer = hf_bert()
    encoder = tl.load_model(hf, tokenizer=tokenizer)  # a HookedEncoder on 3.9, a masked-LM bridge on 4.x
    with pytest.raises(TypeError, match="masked language model"):
        tl.fit_jacobian_lens(encoder, TEXTS, **TINY)


# --- real weights: stories260K and TransformerLens 4.3's artifact ----------------------------------


def _artifact() -> tl.JacobianLens:
    saved = torch.load(require_shared(JLENS_DIR) / "jlens.pt", weights_only=True)
    return tl.JacobianLens(saved["J"], n_prompts=saved["n_prompts"], d_model=saved["d_model"], n_layers=5)


def _stories_texts(n: int) -> list[str]:
    return json.loads(require_shared(STORIES_JSON).read_text(encoding="utf-8"))[:n]


@pytest.fixture(scope="module")
def stories_raw():
    return tl.load_model(require_shared(STORIES), fold_ln=False, center_writing_weights=False, center_unembed=False)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["processed", "raw"])
def test_fit_on_stories260k_equals_transformer_lens_43s_artifact(weights, stories, stories_raw):
    """The shared jlens.pt was fitted by TransformerLens 4.3 on a raw bridge (stories 0-7, 64 tokens,
    skip 16); our fit on TL 3.9 or 4.x, raw or processed weights, gives the same matrices."""
    model = stories if weights == "processed" else stories_raw
    lens = tl.fit_jacobian_lens(model, _stories_texts(8), **ARTIFACT_SETTINGS, progress=False)
    artifact = _artifact()
    assert lens.n_prompts == artifact.n_prompts == 8
    for layer in artifact.source_layers:
        # measured: 4e-7 max abs (processed), 1.2e-7 (raw); the entries are O(1)
        assert_close(lens.jacobians[layer], artifact.jacobians[layer], atol=2e-6, rtol=1e-5, msg=f"J_{layer}")


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["processed", "raw"])
def test_artifact_readout_equals_transformer_lens_43s_lens_logits(weights, stories, stories_raw):
    """reference.pt holds TL 4.3's own readout of story 10 through jlens.pt; ours, through the same
    matrices, on processed or raw weights, gives the same log-probs (float32: 1e-4 nats)."""
    model = stories if weights == "processed" else stories_raw
    reference = torch.load(require_shared(JLENS_DIR) / "reference.pt", weights_only=True)
    result = tl.logit_lens(model, reference["input_ids"], lens=_artifact(), sites="resid_post", keep_logprobs=True)
    assert result.labels == ("0_post", "1_post", "2_post", "3_post", "final_post")
    for index, layer in enumerate(range(5)):
        expected = reference["lens_logits"][layer].float().log_softmax(-1)
        assert_close(result.full_logprobs[index, 0], expected, atol=1e-4, rtol=1e-4, msg=f"layer {layer}")
    assert_close(result.full_logprobs[-1, 0], reference["model_logits"].log_softmax(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(_compat.TL_MAJOR < 4, reason="TransformerLens 3.9 has no JacobianLens (new in 4.3); CI runs this on 4.x")
def test_fit_on_a_raw_bridge_equals_transformer_lens_43s_fit():
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens

    bridge = _compat.TransformerBridge.boot_transformers(
        str(require_shared(STORIES)), device="cpu", dtype=torch.float32
    ).eval()
    texts = [*_stories_texts(3), "Once upon a time"]  # the last is too short for both: skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TLJacobianLens.fit(
            bridge, texts, corpus="test", source_layers=[1, 3], dim_batch=16, max_seq_len=48,
            skip_first_positions=12, show_progress=False,
        )
        ours = tl.fit_jacobian_lens(bridge, texts, seq_len=48, skip_first=12, layers=[1, 3], progress=False)
    assert ours.meta["weights_basis"] == "raw"
    assert ours.n_prompts == theirs.n_prompts == 3 and ours.meta["skipped_prompts"] == 1
    assert ours.source_layers == tuple(theirs.source_layers)
    for layer in ours.source_layers:
        assert_close(ours.jacobians[layer], theirs._matrix_on(layer, "cpu").float(), atol=2e-6, rtol=1e-5)
