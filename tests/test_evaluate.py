"""evaluate_lenses against a slow loop over documents, against logit_lens, and sharded over 2 processes."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, SHARED, assert_close, require_shared, tiny_model
from tl_logitlens.corpus import document_windows, tokenize_document
from tl_logitlens.evaluate import STATISTICS, LensEvaluation, evaluate_lenses

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
    payload = json.loads(ev.to_json(str(tmp_path / "ev.json")))
    assert payload == json.loads((tmp_path / "ev.json").read_text())
    assert payload["n_tokens"] == ev.n_tokens and len(payload["results"]) == len(frame)
    assert "token-weighted" in payload["definition"]
    fig = ev.plot()
    names = {t.name for t in fig.data if t.showlegend is not False}
    assert {"logit", "half"} <= names
    assert len(repr(ev)) < 300
    page = ev.to_html(str(tmp_path / "ev.html"))
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
