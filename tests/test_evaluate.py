"""evaluate_lenses against a slow loop over documents, against logit_lens, and sharded over 2 processes."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, SHARED, assert_close, require_shared, tiny_model
from tl_logitlens.analyses.evaluate import STATISTICS, LensEvaluation, evaluate_lenses
from tl_logitlens.core.corpus import document_windows, tokenize_document

STORIES_JSON = SHARED / "corpora" / "tinystories_1000.json"
# documents of different lengths, some longer than the windows used below
DOCS = [" ".join(SENTENCES[i % 5 : i % 5 + 1 + i % 3]) for i in range(7)]


def _final_post(model, cache):
    return cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]


def _slow_reference(model, texts, seq_len, sites_hooks):
    """Per site: sums of KL(final‖site), CE, entropy, top-1 agreement, by full float64 log-softmax."""
    sums = torch.zeros(len(sites_hooks), 4, dtype=torch.float64)
    n_tok = n_pred = n_bytes = 0
    for text in texts:
        doc = tokenize_document(model, text)
        n_bytes += len(model.tokenizer.decode(list(doc.ids[1:])).encode("utf-8"))
        for window in document_windows(doc.ids, seq_len):
            tokens = torch.tensor([window])
            logits, cache = model.run_with_cache(tokens)
            final = torch.log_softmax(logits[0].double(), -1)
            for s, hook in enumerate(sites_hooks):
                resid = cache[hook][0]
                z = model.ln_final(resid[None])[0] @ model.W_U + model.b_U
                logp = torch.log_softmax(z.double(), -1)
                kl = (final.exp() * (final - logp)).sum(-1)
                ent = -(logp.exp() * logp).sum(-1)
                nxt = torch.tensor(window[1:])
                ce = -logp[:-1].gather(-1, nxt[:, None])[:, 0]
                agree = (logp.argmax(-1) == final.argmax(-1)).double()
                sums[s] += torch.stack([kl.sum(), ce.sum(), ent.sum(), agree.sum()])
            n_tok += len(window)
            n_pred += len(window) - 1
    return sums, n_tok, n_pred, n_bytes


def _hooks(model):
    n = model.cfg.n_layers
    return [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


@pytest.mark.parametrize(("normalization", "folded"), [("LN", False), ("RMS", True)], ids=["LN-unfolded", "RMS-folded"])
def test_every_statistic_matches_a_slow_loop_over_documents(normalization, folded):
    model = tiny_model(normalization, folded)
    ev = evaluate_lenses(model, DOCS, seq_len=7, batch_size=3, progress=False, n_bootstrap=50)
    sums, n_tok, n_pred, n_bytes = _slow_reference(model, DOCS, 7, _hooks(model))
    assert (ev.n_tokens, ev.n_predicted, ev.n_bytes, ev.n_documents) == (n_tok, n_pred, n_bytes, len(DOCS))
    assert ev.sites == ("0_pre", "1_pre", "2_pre", "final_post")
    den = torch.tensor([n_tok, n_pred, n_tok, n_tok], dtype=torch.float64)
    n_stat = len(STATISTICS)
    assert_close(ev.mean[0, :, :n_stat], sums / den, atol=2e-5, rtol=1e-5)
    assert_close(ev.sums[0], sums, atol=1e-4 * n_tok, rtol=1e-5)
    # the final site is the model: KL 0, agreement 1, cross-entropy the model's loss
    assert_close(ev.value("kl_to_final", "logit lens", "final_post"), 0.0, atol=1e-5)
    assert float(ev.value("top1_agreement", site="final_post")[0]) == 1.0
    # then the bits-per-byte forms of KL, cross-entropy and entropy: sums in bits over the bytes
    assert_close(ev.mean[0, :, n_stat:], sums[:, :3] / math.log(2) / n_bytes, atol=1e-5, rtol=1e-5)
    assert_close(ev.value("cross_entropy_bpb", "logit lens"), sums[:, 1] / math.log(2) / n_bytes, atol=1e-5, rtol=1e-5)


def test_equals_logit_lens_on_the_same_windows(ln_model):
    model = ln_model
    ev = evaluate_lenses(model, DOCS, seq_len=9, progress=False, n_bootstrap=0)
    windows = [w for t in DOCS for w in document_windows(tokenize_document(model, t).ids, 9)]
    width = max(len(w) for w in windows)
    tokens = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.long)
    for i, w in enumerate(windows):
        tokens[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = 1
    res = tl.logit_lens(model, tokens, attention_mask=mask, top_k=1)
    valid = res.valid
    kl = res.kl_to_final[:, valid].double().sum(-1)
    ent = res.entropy[:, valid].double().sum(-1)
    ce = -res.next_logprobs[:, valid].double().nansum(-1)
    agree = (res.top_ids[:, valid, 0] == res.top_ids[-1, valid, 0]).double().sum(-1)
    assert_close(ev.sums[0], torch.stack([kl, ce, ent, agree], -1), atol=1e-4, rtol=1e-6)
    assert ev.n_tokens == int(valid.sum()) and ev.n_windows == len(windows)
    assert ev.n_predicted == int((res.next_ids >= 0).sum())


def test_window_and_bos_rules(ln_model):
    model = ln_model
    docs = [tokenize_document(model, t) for t in DOCS]
    for seq_len in (2, 5, 64):
        ev = evaluate_lenses(model, DOCS, seq_len=seq_len, progress=False, n_bootstrap=0)
        windows = [document_windows(d.ids, seq_len) for d in docs]
        n_windows = sum(len(w) for w in windows)
        body = sum(len(d.ids) - 1 for d in docs)
        assert ev.n_windows == n_windows
        assert ev.n_predicted == body  # every token after BOS is predicted exactly once
        assert ev.n_tokens == body + n_windows  # each window adds its BOS position
        assert ev.seq_len == seq_len


def test_max_tokens_cuts_the_corpus_in_order(ln_model):
    model = ln_model
    first = len(tokenize_document(model, DOCS[0]).ids)
    ev = evaluate_lenses(model, DOCS, max_tokens=first + 3, progress=False, n_bootstrap=0)
    assert ev.n_documents == 2 and ev.n_tokens == first + 3 and ev.n_predicted == first + 1
    whole = evaluate_lenses(model, DOCS[:1], progress=False, n_bootstrap=0)
    cut = evaluate_lenses(model, DOCS, max_tokens=first, progress=False, n_bootstrap=0)
    assert_close(cut.mean, whole.mean, atol=1e-12, rtol=0)


def test_bootstrap_intervals_are_seeded_contain_the_mean_and_shrink_with_more_documents(ln_model):
    texts = [f"{SENTENCES[i % 5]} {SENTENCES[(i * 3 + 1) % 5]}"[: 20 + (i * 7) % 40] for i in range(160)]
    small = evaluate_lenses(ln_model, texts[:20], progress=False, n_bootstrap=300)
    large = evaluate_lenses(ln_model, texts, progress=False, n_bootstrap=300)
    again = evaluate_lenses(ln_model, texts[:20], progress=False, n_bootstrap=300)
    other = evaluate_lenses(ln_model, texts[:20], progress=False, n_bootstrap=300, seed=1)
    assert torch.equal(small.low, again.low) and torch.equal(small.high, again.high)
    assert not torch.equal(small.low, other.low)
    for ev in (small, large):
        inner = slice(0, -1)  # final_post's KL is 0 and its agreement 1 in every replicate
        assert bool((ev.low[:, inner] <= ev.mean[:, inner]).all() and (ev.mean[:, inner] <= ev.high[:, inner]).all())
        assert bool((ev.low[:, inner, :3] < ev.high[:, inner, :3]).all())  # agreement may be 0 throughout
    width_small = (small.high - small.low)[:, :-1, :3]
    width_large = (large.high - large.low)[:, :-1, :3]
    assert bool((width_large < width_small).all())


def test_two_lenses_side_by_side_and_outputs(ln_model, tmp_path):
    class Shifted:
        name = "shifted"

        def check_model(self, model):
            return None

        def translate(self, site, states):
            # a shift (a scale would be undone by the final norm)
            return states if site == "final_post" else states + torch.linspace(-1, 1, states.shape[-1])

    ev = evaluate_lenses(ln_model, DOCS, lenses={"logit": None, "half": Shifted()}, progress=False, n_bootstrap=20)
    assert ev.lenses == ("logit", "half")
    assert float((ev.mean[0, :-1, :3] - ev.mean[1, :-1, :3]).abs().max()) > 1e-2
    assert_close(ev.mean[0, -1], ev.mean[1, -1], atol=0, rtol=0)
    frame = ev.to_dataframe()
    assert len(frame) == 2 * len(ev.sites)
    for stat in STATISTICS:
        assert {stat, f"{stat}_low", f"{stat}_high"} <= set(frame.columns)
    assert {"site", "lens", "n_tokens", "cross_entropy_bpb"} <= set(frame.columns)
    assert ev.to_json(str(tmp_path / "ev.json")) == tmp_path / "ev.json"  # the path, not 10 kB of text in a REPL
    payload = json.loads((tmp_path / "ev.json").read_text())
    assert payload == json.loads(ev.to_json())
    assert payload["n_tokens"] == ev.n_tokens and len(payload["results"]) == len(frame)
    assert "token-weighted" in payload["definition"]
    fig = ev.plot()
    names = {t.name for t in fig.data if t.showlegend is not False}
    assert {"logit", "half"} <= names
    assert len(repr(ev)) < 300
    assert ev.to_html(str(tmp_path / "ev.html")) == tmp_path / "ev.html"
    page = (tmp_path / "ev.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script src" not in page and "Plotly.newPlot" in page
    assert page.count("<tr>") == 1 + len(frame)
    section = ev.to_html(include_plotlyjs=False)
    assert section.startswith("<section") and len(section) < len(page) / 10


def test_streaming_dataset_gives_the_same_numbers(ln_model):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS})
    a = evaluate_lenses(ln_model, DOCS, progress=False, n_bootstrap=20)
    b = evaluate_lenses(ln_model, ds.to_iterable_dataset(), progress=False, n_bootstrap=20)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.low, b.low)


class _OtherModelLens:
    name = "tuned lens (other model)"

    def check_model(self, model):
        raise ValueError("this lens was trained for a model with d_model=64, not 32; load the lens made for it")

    def translate(self, site, states):
        return states


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"texts": []}, ValueError, "holds no text"),
        ({"texts": ["", "  "]}, ValueError, "holds no text"),
        ({"texts": ["fine", 7]}, TypeError, "document 1 of the corpus is a int"),
        ({"texts": 3.5}, TypeError, "list or iterable of strings"),
        ({"lenses": _OtherModelLens()}, ValueError, "trained for a model with d_model=64"),
        ({"lenses": {"x": _OtherModelLens()}}, ValueError, "trained for a model"),
        ({"lenses": "tuned"}, TypeError, "load the lens first"),
        ({"lenses": {}}, ValueError, "empty dict"),
        ({"seq_len": 65}, ValueError, "above the model's context of 64"),
        ({"seq_len": 1}, ValueError, "at least 2"),
        ({"seq_len": 4.0}, TypeError, "seq_len must be an int"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"max_tokens": 0}, ValueError, "max_tokens=0"),
        ({"sites": "resid_everything"}, ValueError, "unknown site"),
        ({"confidence": 95}, ValueError, "between 0 and 1"),
    ],
    ids=lambda v: str(v)[:30] if not isinstance(v, dict) else "-".join(map(str, v)),
)
def test_bad_input(ln_model, kwargs, error, match):
    args = {"texts": DOCS, **kwargs}
    texts = args.pop("texts")
    with pytest.raises(error, match=match):
        evaluate_lenses(ln_model, texts, progress=False, **args)


def test_file_that_is_not_a_corpus(ln_model, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"d_model": 32}), encoding="utf-8")
    with pytest.raises(ValueError, match="holds a JSON dict, not a list"):
        evaluate_lenses(ln_model, path, progress=False)
    (tmp_path / "weights.safetensors").write_bytes(b"\0\1")
    with pytest.raises(ValueError, match="not a corpus file"):
        evaluate_lenses(ln_model, tmp_path / "weights.safetensors", progress=False)


# -------------------------------------------------------------------------------------------------
# sharded == unsharded: 2 gloo processes on localhost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_model("LN", False)
        results = {
            "all": evaluate_lenses(model, DOCS, seq_len=7, batch_size=2, progress=False, n_bootstrap=200),
            "one_doc": evaluate_lenses(model, DOCS[:1], seq_len=7, progress=False, n_bootstrap=50),
        }
        try:
            evaluate_lenses(model, DOCS + [5], progress=False, n_bootstrap=0)
            results["error"] = ""
        except ValueError as err:
            results["error"] = str(err)
        torch.save(
            {k: v if isinstance(v, str) else {f: getattr(v, f) for f in ("mean", "low", "high", "n_tokens", "n_documents", "world_size")} for k, v in results.items()},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(ln_model, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = {
        "all": evaluate_lenses(ln_model, DOCS, seq_len=7, batch_size=2, progress=False, n_bootstrap=200),
        "one_doc": evaluate_lenses(ln_model, DOCS[:1], seq_len=7, progress=False, n_bootstrap=50),
    }
    for key, ev in single.items():
        for got in ranks:  # every rank returns the same result, equal to one process's
            assert got[key]["world_size"] == 2
            assert (got[key]["n_tokens"], got[key]["n_documents"]) == (ev.n_tokens, ev.n_documents)
            # float32 forward passes over differently composed batches differ by rounding (~1e-7)
            for f in ("mean", "low", "high"):
                assert_close(got[key][f], getattr(ev, f), atol=2e-6, rtol=1e-6, msg=f"{key}.{f}")
        assert torch.equal(ranks[0][key]["mean"], ranks[1][key]["mean"])
    # a rank whose share holds a bad document stops every rank with the same error
    assert all("document 7 of the corpus is a int" in r["error"] for r in ranks)


@pytest.mark.slow
def test_stories_corpus_kl_falls_with_depth(stories):
    texts = json.loads(require_shared(STORIES_JSON).read_text(encoding="utf-8"))[:30]
    ev = evaluate_lenses(stories, texts, seq_len=256, progress=False, n_bootstrap=200)
    kl = ev.value("kl_to_final", "logit lens")
    assert bool((kl[1:] < kl[:-1]).all()) and float(kl[-1]) < 1e-4
    # the model's loss on TinyStories is 1.32 nats/token (shared/README.md)
    assert 1.1 < float(ev.value("cross_entropy", site="final_post")[0]) < 1.5
    sums, n_tok, n_pred, n_bytes = _slow_reference(stories, texts[:3], 256, _hooks(stories))
    few = evaluate_lenses(stories, texts[:3], seq_len=256, progress=False, n_bootstrap=0)
    den = torch.tensor([n_tok, n_pred, n_tok, n_tok], dtype=torch.float64)
    assert_close(few.mean[0, :, : len(STATISTICS)], sums / den, atol=5e-5, rtol=1e-5)
    assert isinstance(ev, LensEvaluation)


# -------------------------------------------------------------------------------------------------
# batches without padding waste: the same numbers as each window run alone


def _corpus(n: int) -> list[str]:
    """``n`` documents of many lengths: some one short window, some several windows of 7 tokens."""
    return [" ".join(SENTENCES[(i + j) % 5] for j in range(1 + i % 4))[: 8 + (i * 37) % 200] for i in range(n)]


def _windows_alone(model, texts, seq_len, lenses):
    """Per document ``[lens, site, stat]`` sums and counts, each window through logit_lens alone (no padding)."""
    per_doc = []
    for text in texts:
        doc = tokenize_document(model, text)
        stats = torch.zeros(len(lenses), model.cfg.n_layers + 1, 4, dtype=torch.float64)
        counts = torch.zeros(5, dtype=torch.float64)
        windows = document_windows(doc.ids, seq_len)
        for window in windows:
            for k, lens in enumerate(lenses):
                res = tl.logit_lens(model, torch.tensor([window]), lens=lens, top_k=1)
                top = res.top_ids[:, 0, :, 0]
                stats[k] += torch.stack(
                    [
                        res.kl_to_final[:, 0].double().sum(-1),
                        -res.next_logprobs[:, 0].double().nansum(-1),
                        res.entropy[:, 0].double().sum(-1),
                        (top == top[-1]).double().sum(-1),
                    ],
                    -1,
                )
            counts[:2] += torch.tensor([len(window), len(window) - 1], dtype=torch.float64)
        counts[2:] = torch.tensor([len(model.tokenizer.decode(list(doc.ids[1:])).encode("utf-8")), 1, len(windows)])
        per_doc.append((stats, counts))
    return per_doc


def _reference_intervals(per_doc, seed, n_bootstrap, confidence):
    """Token-weighted means (statistics, then bits per byte) and percentile intervals of Poisson(1)
    replicates over documents, each document's weights drawn from numpy's generator seeded (seed, index)."""
    import numpy as np

    stats = torch.stack([s for s, _ in per_doc])  # [doc, lens, site, stat]
    counts = torch.stack([c for _, c in per_doc])  # [doc, count]
    weights = torch.ones(1 + n_bootstrap, len(per_doc), dtype=torch.float64)
    for i in range(len(per_doc)):
        weights[1:, i] = torch.from_numpy(np.random.default_rng([seed, i]).poisson(1.0, n_bootstrap)).double()
    s = torch.einsum("rd,dlsk->rlsk", weights, stats)
    c = weights @ counts  # [replicate, count]
    den = torch.stack([c[:, 0], c[:, 1], c[:, 0], c[:, 0]], -1)[:, None, None, :]
    bits = s[..., :3] / math.log(2) / c[:, 2, None, None, None]
    ratio = torch.cat([s / den, bits], -1)
    q = np.quantile(ratio[1:].numpy(), [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return ratio[0], torch.from_numpy(q[0]), torch.from_numpy(q[1]), c[0]


class _Shift:
    name = "shifted"

    def check_model(self, model):
        return None

    def translate(self, site, states):
        return states if site == "final_post" else states + torch.linspace(-1, 1, states.shape[-1])


@pytest.mark.parametrize(("normalization", "folded"), [("LN", False), ("RMS", True)], ids=["LN-unfolded", "RMS-folded"])
def test_every_statistic_equals_each_window_run_alone(normalization, folded):
    """Full windows, pooled tails of many lengths and a second lens: every mean, interval bound and
    count equals a reference that runs each window alone (no batch, no padding) to 1e-6."""
    model = tiny_model(normalization, folded)
    texts = _corpus(40)
    ev = evaluate_lenses(
        model, texts, lenses={"logit lens": None, "shifted": _Shift()}, seq_len=7, batch_size=2,
        progress=False, n_bootstrap=200, seed=3,
    )
    per_doc = _windows_alone(model, texts, 7, [None, _Shift()])
    mean, low, high, counts = _reference_intervals(per_doc, 3, 200, 0.95)
    assert (ev.n_tokens, ev.n_predicted, ev.n_bytes, ev.n_documents, ev.n_windows) == tuple(int(c) for c in counts)
    assert_close(ev.mean, mean, atol=1e-6, rtol=1e-6)
    assert_close(ev.low, low, atol=1e-6, rtol=1e-6)
    assert_close(ev.high, high, atol=1e-6, rtol=1e-6)
    # the tails were pooled and batched by length: some padding, far less than one batch per document
    assert ev.n_computed == ev.n_tokens + ev.n_padded
    assert 0 < ev.padding_fraction < 0.25
    assert ev.to_dict()["padding_fraction"] == ev.padding_fraction


def test_full_windows_compute_no_padding(ln_model):
    model = ln_model
    # documents whose tokens after BOS fill whole windows of seq_len - 1
    texts = []
    for t in _corpus(30):
        ids = tokenize_document(model, t).ids
        keep = (len(ids) - 1) // 6 * 6
        if keep:
            texts.append(model.tokenizer.decode(list(ids[1 : 1 + keep])))
    assert all((len(tokenize_document(model, t).ids) - 1) % 6 == 0 for t in texts)
    ev = evaluate_lenses(model, texts, seq_len=7, batch_size=3, progress=False, n_bootstrap=0)
    assert ev.n_padded == 0 and ev.padding_fraction == 0.0 and ev.n_computed == ev.n_tokens


def test_no_output_when_stderr_is_not_a_terminal(ln_model, capfd):
    evaluate_lenses(ln_model, DOCS, progress=True, n_bootstrap=0)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _break_mlp(model, layer: int):
    """A NaN in one weight of block ``layer``'s MLP: every state after it is NaN. (HookedTransformer:
    ``blocks.1.mlp.W_in``; a bridge: ``layers.1._original_component.mlp...weight``.)"""
    import re

    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.match(rf"(blocks|layers)\.{layer}\.", name) and ".mlp" in name and p.ndim == 2:
                p[0, 0] = float("nan")
                return model
    raise AssertionError("no MLP weight found")


def test_nan_weight_is_an_error_naming_lens_site_document_and_token():
    model = _break_mlp(tiny_model("LN", False), 1)
    with pytest.raises(ValueError, match=r"lens 'logit lens', site '2_pre', document \d+, token \d+ \(window \d+, position \d+\)"):
        evaluate_lenses(model, DOCS, seq_len=9, progress=False, n_bootstrap=0)


# -------------------------------------------------------------------------------------------------
# checkpoints: interrupt after k documents, resume, get the uninterrupted result


class _Interrupted(ValueError):
    pass


def _stop_after(texts, k):
    """An iterable corpus that raises after yielding ``k`` documents (a kill, for the test)."""
    for i, text in enumerate(texts):
        if i == k:
            raise _Interrupted(f"interrupted after {k} documents")
        yield text


_FIELDS = ("mean", "low", "high", "sums")


def test_resumed_evaluation_equals_an_uninterrupted_one(ln_model, tmp_path):
    model, texts = ln_model, _corpus(23)
    kwargs = {"seq_len": 7, "batch_size": 2, "progress": False, "n_bootstrap": 100, "checkpoint_every": 5}
    whole = evaluate_lenses(model, texts, checkpoint_dir=tmp_path / "whole", **kwargs)
    with pytest.raises(_Interrupted):
        evaluate_lenses(model, _stop_after(texts, 13), checkpoint_dir=tmp_path / "ckpt", **kwargs)
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["state"]
    assert saved["next_document"] == 10  # the last checkpoint before the interruption
    resumed = evaluate_lenses(model, texts, checkpoint_dir=tmp_path / "ckpt", **kwargs)
    for f in _FIELDS:  # the same batches in the same order: the same bits
        assert torch.equal(getattr(resumed, f), getattr(whole, f)), f
    assert (resumed.n_tokens, resumed.n_documents, resumed.n_padded) == (whole.n_tokens, whole.n_documents, whole.n_padded)
    plain = evaluate_lenses(model, texts, seq_len=7, batch_size=2, progress=False, n_bootstrap=100)
    for f in _FIELDS:  # without checkpoints the batches differ: float32 rounding only
        assert_close(getattr(resumed, f), getattr(plain, f), atol=1e-6, rtol=1e-6, msg=f)
    # a finished evaluation resumed returns its result without scoring again
    again = evaluate_lenses(model, _stop_after(texts, len(texts)), checkpoint_dir=tmp_path / "ckpt", **kwargs)
    assert torch.equal(again.mean, whole.mean) and torch.equal(again.high, whole.high)


def test_resume_with_max_tokens(ln_model, tmp_path):
    model, texts = ln_model, _corpus(20)
    kwargs = {"seq_len": 9, "progress": False, "n_bootstrap": 30, "checkpoint_every": 4, "max_tokens": 150}
    whole = evaluate_lenses(model, texts, checkpoint_dir=tmp_path / "a", **kwargs)
    with pytest.raises(_Interrupted):
        evaluate_lenses(model, _stop_after(texts, 9), checkpoint_dir=tmp_path / "b", **kwargs)
    resumed = evaluate_lenses(model, texts, checkpoint_dir=tmp_path / "b", **kwargs)
    assert resumed.n_tokens == whole.n_tokens and resumed.n_documents == whole.n_documents < 12
    assert torch.equal(resumed.mean, whole.mean) and torch.equal(resumed.low, whole.low)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, "other settings .*seed"),
        ({"seq_len": 8}, "other settings .*seq_len"),
        ({"lenses": {"logit lens": None, "shifted": _Shift()}}, "other settings .*lenses"),
        ({"texts": "other"}, "the corpus differs"),
        ({"texts": "shorter"}, "the corpus has 3 documents"),
    ],
    ids=["seed", "seq_len", "lenses", "other-texts", "fewer-texts"],
)
def test_resume_with_other_settings_or_texts_is_refused(ln_model, tmp_path, change, match):
    model, texts = ln_model, _corpus(12)
    kwargs = {"seq_len": 7, "progress": False, "n_bootstrap": 10, "checkpoint_every": 4, "checkpoint_dir": tmp_path}
    with pytest.raises(_Interrupted):
        evaluate_lenses(model, _stop_after(texts, 9), **kwargs)
    change = dict(change)
    which = change.pop("texts", None)
    if which == "other":
        texts = [texts[0] + " changed", *texts[1:]]
    elif which == "shorter":
        texts = texts[:3]
    with pytest.raises(ValueError, match=match):
        evaluate_lenses(model, texts, **{**kwargs, **change})


def test_a_changed_model_is_refused(tmp_path):
    model, texts = tiny_model("LN", False), _corpus(8)
    kwargs = {"seq_len": 7, "progress": False, "n_bootstrap": 0, "checkpoint_every": 3, "checkpoint_dir": tmp_path}
    with pytest.raises(_Interrupted):
        evaluate_lenses(model, _stop_after(texts, 5), **kwargs)
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)
    with pytest.raises(ValueError, match="other settings .*model"):
        evaluate_lenses(model, texts, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every=0"),
        ({"checkpoint_every": 2.5}, TypeError, "checkpoint_every must be an int"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
        ({"text_field": 3}, TypeError, "text_field must be a string"),
        ({"n_bootstrap": -1}, ValueError, "n_bootstrap=-1"),
        ({"confidence": float("nan")}, ValueError, "strictly between 0 and 1"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"chunk_size": 0}, ValueError, "chunk_size=0"),
        ({"checkpoint_dir": 5}, TypeError, "checkpoint_dir must be a folder path"),
    ],
    ids=["every-0", "every-float", "progress-str", "field-int", "boot-neg", "conf-nan", "seed-bool", "chunk-0", "dir-int"],
)
def test_bad_numeric_and_checkpoint_options(ln_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate_lenses(ln_model, DOCS, **{"progress": False, **kwargs})


def test_outputs_are_written_atomically(ln_model, tmp_path, monkeypatch):
    ev = evaluate_lenses(ln_model, DOCS, progress=False, n_bootstrap=0)
    path = tmp_path / "ev.json"
    path.write_text("old", encoding="utf-8")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", lambda *a, **k: "x" * 10)
    monkeypatch.setattr("tl_logitlens.core.files.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        ev.to_json(str(path))
    assert path.read_text(encoding="utf-8") == "old"  # the old file, whole
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, texts = tiny_model("LN", False), _corpus(23)
        kwargs = {"seq_len": 7, "batch_size": 2, "progress": False, "n_bootstrap": 100, "checkpoint_every": 5}
        try:
            evaluate_lenses(model, _stop_after(texts, 13), checkpoint_dir=f"{out}/ckpt", **kwargs)
            error = ""
        except ValueError as err:
            error = str(err)
        ev = evaluate_lenses(model, texts, checkpoint_dir=f"{out}/ckpt", **kwargs)
        torch.save({"error": error, **{f: getattr(ev, f) for f in ("mean", "low", "high", "n_tokens", "world_size")}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_resumed_equal_one(ln_model, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_resume_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]  # one per rank
    single = evaluate_lenses(ln_model, _corpus(23), seq_len=7, batch_size=2, progress=False, n_bootstrap=100)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "interrupted after 13 documents" in got["error"]
        assert got["world_size"] == 2 and got["n_tokens"] == single.n_tokens
        for f in ("mean", "low", "high"):
            assert_close(got[f], getattr(single, f), atol=1e-6, rtol=1e-6, msg=f"rank {rank} {f}")
