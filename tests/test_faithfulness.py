"""tl.faithfulness against a hand-written loop on the demo model (one position, one site, one lens at a
time, plain hooks on the whole text), its bootstrap and ratio, checkpoints, bad input and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import tl_logitlens as tl
from tests.helpers import assert_close, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 24


@lru_cache(maxsize=1)
def demo():
    model = tl.load_model("demo")
    return model, {
        "logit lens": None,
        "tuned lens": tl.load_lens("demo", model),
        "Jacobian lens": tl.load_lens("demo-jacobian", model),
    }


def texts():
    return tl.demo_texts()[:3]


def _unit(v):
    return v / v.norm()


def hand_loop(model, lenses, sites, docs, positions, intervention, seed):
    """The slow, obvious way. For each document, read position, lens and site: the lens's top-2 by its own
    readout; one forward pass of the whole (cut) document with a plain hook that changes the site's state at
    that one position; the final log-prob of the top-1 and the KL at that position. The placebo: the same
    change's norm along the documented seeded draw made orthogonal (QR) to the lens vectors and the ones."""
    d = model.cfg.d_model
    n_l, n_s = len(lenses), len(sites)
    out = {k: torch.zeros(n_l, n_s, dtype=torch.float64) for k in ("lp", "plp", "kl", "pkl")}
    n = 0
    for index, text in enumerate(docs):
        tokens = model.to_tokens(text)[:, :SEQ_LEN]
        cells = [p if p >= 0 else tokens.shape[1] + p for p in positions]
        draws = torch.from_numpy(
            np.random.default_rng([seed, index]).standard_normal((len(cells), n_l, n_s, d))
        )
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(tokens)
        for c, p in enumerate(cells):
            n += 1
            clean = torch.log_softmax(clean_logits[0, p].float(), -1)
            for k, lens in enumerate(lenses):
                for s, site in enumerate(sites):
                    hook = tl.core.readout.resolve_sites(model, [site])[0].hook
                    h0 = cache[hook][0, p].float()
                    state = h0 if lens is None else lens.translate(site, h0[None])[0]
                    lens_logits = model.ln_final(state[None, None])[0, 0] @ model.W_U + model.b_U
                    t, u = lens_logits.topk(2).indices.tolist()
                    if intervention == "ablate":
                        vs = tl.lens_vectors(model, lens, site, [t])
                        delta = -(h0 @ _unit(vs[0])) * _unit(vs[0])
                    else:
                        vs = tl.lens_vectors(model, lens, site, [t, u])
                        s_ = vs.double() @ h0.double()
                        coeffs = torch.linalg.solve(vs.double() @ vs.double().T, s_.flip(0) - s_)
                        delta = (coeffs @ vs.double()).float()
                    avoid = torch.cat([torch.ones(1, d, dtype=torch.float64), vs.double()])  # LayerNorm model
                    q, _ = torch.linalg.qr(avoid.T)
                    z = draws[c, k, s]
                    r = z - q @ (q.T @ z)
                    fake = delta.norm() * _unit(r).float()
                    for step, (lp_key, kl_key) in ((delta, ("lp", "kl")), (fake, ("plp", "pkl"))):

                        def change(act, hook, step=step, p=p):
                            act = act.clone()
                            act[0, p] = act[0, p] + step
                            return act

                        with torch.no_grad():
                            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, change)])
                        lp = torch.log_softmax(logits[0, p].float(), -1)
                        out[lp_key][k, s] += float(lp[t] - clean[t])
                        out[kl_key][k, s] += float((clean.exp() * (clean - lp)).sum())
    return {key: value / n for key, value in out.items()}, n


@pytest.mark.parametrize("intervention", ["ablate", "swap"])
def test_faithfulness_equals_a_hand_written_loop(intervention):
    model, lenses = demo()
    sites = ["0_post", "2_post", "final_post"]
    positions = [-1, 5]
    res = tl.faithfulness(
        model,
        texts(),
        lenses=lenses,
        sites=sites,
        intervention=intervention,
        positions=positions,
        seq_len=SEQ_LEN,
        n_bootstrap=20,
        seed=3,
        batch_size=2,
    )
    ref, n = hand_loop(model, list(lenses.values()), sites, texts(), positions, intervention, seed=3)
    assert res.n_positions == n == 6 and res.n_documents == 3
    assert res.lenses == tuple(lenses) and res.sites == tuple(sites)
    for stat, key in (
        ("effect_logprob", "lp"),
        ("placebo_logprob", "plp"),
        ("effect_kl", "kl"),
        ("placebo_kl", "pkl"),
    ):
        assert_close(res.value(stat).double(), ref[key], atol=2e-4, rtol=1e-3, msg=stat)
    assert_close(res.value("ratio_kl").double(), ref["kl"] / ref["pkl"], atol=1e-3, rtol=1e-3)
    # the ratio of means, exactly (against the loop it is ill-conditioned where the placebo's mean is near 0)
    ratio = res.value("effect_logprob") / res.value("placebo_logprob")
    assert_close(res.value("ratio_logprob"), ratio, atol=1e-6, rtol=1e-5)
    # the intervals hold their point estimates (mean of sums: the same documents, reweighted)
    for i in (0, 1, 3, 4):
        assert bool(
            (res.low[..., i] <= res.mean[..., i] + 1e-6).all()
            and (res.mean[..., i] <= res.high[..., i] + 1e-6).all()
        )
    if (
        intervention == "ablate"
    ):  # removing what a lens reads lowers the model's log-prob of it, far beyond a placebo
        assert bool((res.value("effect_logprob") < 0).all()) and bool((res.value("ratio_kl") > 2).all())


def test_the_result_tables_figure_and_page():
    model, lenses = demo()
    res = tl.faithfulness(model, texts()[:2], lenses=lenses, seq_len=SEQ_LEN, n_bootstrap=0)
    frame = res.to_dataframe()
    assert len(frame) == len(res.sites) * 3 and {"effect_kl", "ratio_kl_low", "n_positions"} <= set(
        frame.columns
    )
    assert frame["effect_kl_low"].isna().all()  # no replicates, no intervals
    assert json.loads(res.to_json())["intervention"] == "ablate"
    assert res.to_markdown().count("\n") == len(frame) + 1
    assert "Which lens is causal?" in res.to_html(include_plotlyjs=False)
    assert len(res.plot().data) == 3 * 2 * 2


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path):
    model, _ = demo()
    docs = tl.demo_texts()[:4]
    settings = {"seq_len": SEQ_LEN, "n_bootstrap": 10, "batch_size": 1, "checkpoint_every": 1}
    whole = tl.faithfulness(model, docs, **settings)

    def stops_after_two():
        yield from docs[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tl.faithfulness(model, stops_after_two(), checkpoint_dir=tmp_path, **settings)
    resumed = tl.faithfulness(model, docs, checkpoint_dir=tmp_path, **settings)
    assert resumed.n_documents == 4
    assert_close(resumed.mean, whole.mean, atol=1e-9, rtol=1e-9, equal_nan=True)
    assert_close(resumed.low, whole.low, atol=1e-9, rtol=1e-9, equal_nan=True)
    with pytest.raises(ValueError, match="other settings"):
        tl.faithfulness(model, docs, checkpoint_dir=tmp_path, intervention="swap", **settings)


def test_only_each_documents_first_seq_len_tokens_are_tokenised(monkeypatch):
    """faithfulness reads a document's first seq_len tokens, so only a prefix of its text is tokenised: a
    document over MAX_TOKENIZED_CHARS (lowered here to 20,000 characters) is read, not refused, and scores as
    its own first 2,000 characters do; n_tokens counts the tokens read."""
    from tl_logitlens.core import corpus

    model, _ = demo()
    story = texts()[0]
    long_doc = " ".join([story] * (30_000 // len(story) + 1))
    monkeypatch.setattr(corpus, "MAX_TOKENIZED_CHARS", 20_000)
    assert len(long_doc) > corpus.MAX_TOKENIZED_CHARS
    got = tl.faithfulness(model, [long_doc], seq_len=SEQ_LEN, n_bootstrap=0)
    want = tl.faithfulness(model, [long_doc[:2000]], seq_len=SEQ_LEN, n_bootstrap=0)
    assert got.n_tokens == want.n_tokens == SEQ_LEN
    assert_close(got.mean, want.mean, atol=1e-9, rtol=1e-9, equal_nan=True)


@lru_cache(maxsize=1)
def encoder():
    return tl.load_model("demo-bert")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: tl.faithfulness(m, []), ValueError, "empty|no text|no document"),
        (lambda m: tl.faithfulness(m, ["   "]), ValueError, "empty|no text|no document|blank"),
        (lambda m: tl.faithfulness(m, ["Hello world"], intervention="patch"), ValueError, "ablate"),
        (
            lambda m: tl.faithfulness(m, ["Hello world"], sites=["1_mid"], lenses=demo()[1]["Jacobian lens"]),
            ValueError,
            "reads the outputs of blocks",
        ),
        (lambda m: tl.faithfulness(m, ["Hello world"], positions=[50]), ValueError, "no position"),
        (lambda m: tl.faithfulness(m, ["Hello world"], positions="first"), ValueError, "positions"),
        (lambda m: tl.faithfulness(m, "Hello world"), TypeError, "list"),
        (lambda m: tl.faithfulness(encoder(), ["The dog ran"]), TypeError, "masked language model"),
    ],
    ids=[
        "empty",
        "blank",
        "unknown-intervention",
        "site-lens-does-not-read",
        "past-the-end",
        "bad-positions",
        "a-string",
        "encoder",
    ],
)
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call(demo()[0])


def test_nan_in_the_model_is_named():
    model = tiny_model("LN", folded=False)
    with torch.no_grad():
        model.W_U[:, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tl.faithfulness(model, ["Once upon a time, there was a little girl"], n_bootstrap=0)


def test_the_command_writes_the_table(tmp_path):
    out = tmp_path / "faith.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tl_logitlens",
            "faithfulness",
            "demo",
            "--texts",
            "demo",
            "--lens",
            "demo",
            "--lens",
            "demo-jacobian",
            "--max-tokens",
            "400",
            "--seq-len",
            "32",
            "--bootstrap",
            "20",
            "--json",
            str(out),
            "--csv",
            str(tmp_path / "faith.csv"),
            "--html",
            str(tmp_path / "faith.html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**__import__("os").environ, "COLUMNS": "80"},
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert (
        data["lenses"] == ["logit lens", "tuned lens", "Jacobian lens"] and data["intervention"] == "ablate"
    )
    assert "Which lens is causal" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    assert "placebo: a change of the same norm, random direction; KL ratio: KL / placebo" in done.stdout  # unwrapped
    assert "Which lens is causal?" in (tmp_path / "faith.html").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "tl_logitlens", "faithfulness", "demo", "--texts", "nowhere.txt"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "no corpus" in bad.stderr


def test_the_report_closes_with_the_faithfulness_section(tmp_path):
    model, lenses = demo()
    res = tl.faithfulness(model, texts()[:1], lenses=lenses, seq_len=SEQ_LEN, n_bootstrap=0)
    path = tl.report(model, "The dog was very", out=tmp_path / "r.html", plotly_js="cdn", faithfulness=res)
    page = path.read_text(encoding="utf-8")
    assert page.index("Which lens is causal?") > page.index("<h2>Figures</h2>")
    with pytest.raises(TypeError, match="Faithfulness"):
        tl.report(model, "The dog was", out=tmp_path / "r2.html", faithfulness="no")


@pytest.mark.parametrize("page", ["faithfulness.md", "intervening.md"])
def test_the_docs_pages_python_blocks_run(page):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    scope: dict = {}
    for block in blocks:
        exec(compile(block, page, "exec"), scope)  # one page, one scope: later blocks use earlier names


@pytest.mark.slow
def test_torchrun_two_processes_give_one_processs_table(tmp_path):
    """Documents dealt to two ranks (gloo on the CPU), sums added: the table one process writes, with the
    same placebo draws and bootstrap replicates (both fixed by each document's index)."""
    import os

    from tests.helpers import SENTENCES, torchrun_command

    (tmp_path / "corpus.txt").write_text("\n\n".join(SENTENCES * 2), encoding="utf-8")
    common = [
        "faithfulness",
        "demo",
        "--texts",
        "corpus.txt",
        "--lens",
        "demo",
        "--bootstrap",
        "50",
        "--no-progress",
        "--positions",
        "-1",
        "3",
    ]
    env = dict(os.environ, COLUMNS="100", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    two = subprocess.run(
        [*torchrun_command(2), "-m", "tl_logitlens", *common, "--json", "two.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    one = subprocess.run(
        [sys.executable, "-m", "tl_logitlens", *common, "--json", "one.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Which lens is causal?") == 1  # rank 0 alone prints
    a = json.loads((tmp_path / "one.json").read_text(encoding="utf-8"))
    b = json.loads((tmp_path / "two.json").read_text(encoding="utf-8"))
    assert b.pop("world_size") == 2 and a.pop("world_size") == 1
    rows_a, rows_b = a.pop("results"), b.pop("results")
    assert a == b and a["n_documents"] == 10
    for ra, rb in zip(rows_a, rows_b):
        for key, value in ra.items():
            if isinstance(value, float):
                # a ratio's placebo mean can be near 0, which magnifies float32 rounding (1e-5 became 1e-5 relative)
                rel = 1e-3 if key.startswith("ratio") else 1e-5
                assert rb[key] == pytest.approx(value, rel=rel, abs=1e-5), key
            else:
                assert rb[key] == value


@pytest.mark.slow
def test_the_docs_table_is_what_faithfulness_gives():
    """``scripts/faithfulness_table.py --check`` in a process of its own (the 100 demo stories, three lenses;
    under pytest's run-time shape checks it would be several times slower): every number of the table in
    docs/faithfulness.md is recomputed and must agree to its last printed digit."""
    import os

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "faithfulness_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["numbers"] == 4 * 3 * 6 * 3
