"""Figures: structure, and that what they draw is exactly the result's fields (read, not recomputed)."""

from __future__ import annotations

import math
from dataclasses import replace

import plotly.graph_objects as go
import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, require_browser
from tl_logitlens.plotting import (
    cell_text,
    component_bars_figure,
    component_lens_figure,
    head_grid_figure,
    head_source_figure,
    lens_heatmap,
    logit_diff_figure,
    save_figures,
    target_trajectory,
    text_heatmap,
    top_token_evolution,
)
from tl_logitlens.plotting.entropy import entropy_kl_figure
from tl_logitlens.plotting.style import check_index, clip, colour_scale, log_ticks, pair_name, wrap_title

PROMPTS = SENTENCES[:3]


@pytest.fixture(scope="module")
def lens(ln_model):
    return tl.logit_lens(ln_model, PROMPTS, targets=[" the", " and"], top_k=4)


@pytest.fixture(scope="module")
def plain(ln_model):
    return tl.logit_lens(ln_model, PROMPTS[0], top_k=3)


def _cols(result, b):
    return [j for j in range(result.valid.shape[1]) if bool(result.valid[b, j])]


def _heatmap(fig):
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Heatmap)
    return fig.data[0]


def _f64(values):
    """A trace's values as a float64 tensor (None, a gap, as NaN)."""
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def _z(trace):
    return torch.tensor([[math.nan if v is None else v for v in row] for row in trace.z], dtype=torch.float64)


def test_cell_text_escapes_markup_and_control_characters():
    assert cell_text(" the") == "␣the"  # whitespace is visible: " w" and "w" differ
    assert cell_text(" ") == "␣" and cell_text("a b\n") == "a␣b↵"
    assert cell_text("<b>x</b>") == "&lt;b&gt;x&lt;/b&gt;"
    assert cell_text("a&b") == "a&amp;b"
    assert cell_text("\n\t\r") == "↵⇥\\x0d"
    assert cell_text("\x1e\x7f\x85") == "\\x1e\\x7f\\x85"  # SVG cannot hold them; any font can draw these


@pytest.mark.parametrize("prompt", [0, 2])
def test_lens_heatmap_cells_are_the_top_tokens_and_colour_is_top_prob(lens, prompt):
    fig = lens_heatmap(lens, prompt=prompt)
    hm = _heatmap(fig)
    cols = _cols(lens, prompt)
    top = lens.top_tokens()
    # rows: sites in depth order, the first at the bottom (plotly draws y from the bottom up)
    assert list(hm.y) == list(lens.labels)
    assert fig.layout.yaxis.autorange in (None, True)
    expected = [[clip(cell_text(top[s][prompt][j][0])) for j in cols] for s in range(len(lens.labels))]
    assert [list(r) for r in hm.text] == expected
    assert any("␣" in t for row in hm.text for t in row)  # leading spaces are drawn
    assert hm.texttemplate == "%{text}"
    assert list(fig.layout.xaxis.ticktext) == [clip(cell_text(lens.input_tokens()[prompt][j])) for j in cols]
    probs = lens.top_logprobs[:, prompt, cols, 0].exp().double()
    assert_close(_z(hm), probs, atol=1e-12, rtol=0)
    # adaptive range: from 0 to the largest probability shown, not a fixed 0..1
    assert hm.zmin == 0.0 and hm.zmax == pytest.approx(float(probs.max()), abs=1e-12)
    assert fig.layout.xaxis.tickangle in (0, -45)
    assert fig.layout.xaxis.title.text.startswith("input token")
    assert fig.layout.yaxis.title.text.startswith("layer")
    # hover: the top-k tokens with their probabilities, for every cell
    s, c = len(lens.labels) - 1, len(cols) - 1
    hover = hm.hovertext[s][c]
    for r in range(lens.top_ids.shape[-1]):
        p = float(lens.top_probs[s, prompt, cols[c], r])
        assert f"{r + 1}. '{cell_text(top[s][prompt][cols[c]][r])}'  {p:.3f}" in hover


@pytest.mark.parametrize(
    ("color", "target", "field"),
    [
        ("logprob", None, lambda r, b, c: r.top_logprobs[:, b, c, 0]),
        ("entropy", None, lambda r, b, c: r.entropy[:, b, c]),
        ("kl", None, lambda r, b, c: r.kl_to_final[:, b, c].double().clamp(min=1e-300)),
        ("prob", " and", lambda r, b, c: r.target_logprobs[:, b, c, 1].exp()),
        ("logprob", " the", lambda r, b, c: r.target_logprobs[:, b, c, 0]),
        ("rank", " and", lambda r, b, c: r.target_ranks[:, b, c, 1].double().log10()),
    ],
)
def test_lens_heatmap_colour_equals_the_metric(lens, color, target, field):
    hm = _heatmap(lens_heatmap(lens, color=color, target=target, prompt=1, scale="linear"))
    cols = _cols(lens, 1)
    values = field(lens, 1, cols).double()
    if color == "rank":  # field gives log10(rank); the linear scale draws the rank itself
        values = 10**values
    if color == "kl":
        values = lens.kl_to_final[:, 1, cols].double()
    assert_close(_z(hm), values, atol=1e-9, rtol=1e-12)
    assert hm.zmax == pytest.approx(float(values.max()))


def test_lens_heatmap_kl_defaults_to_a_log_scale_labelled_in_nats(lens):
    hm = _heatmap(lens_heatmap(lens, color="kl", prompt=1))
    cols = _cols(lens, 1)
    kl = lens.kl_to_final[:, 1, cols].double()
    hi = float(kl.max())
    lo = max(float(kl[kl > 0].min()), hi * 1e-4)
    assert_close(_z(hm), kl.clamp(min=lo).log10(), atol=1e-9, rtol=0)  # final_post (KL 0) sits at the floor
    assert (hm.zmin, hm.zmax) == (pytest.approx(math.log10(lo)), pytest.approx(math.log10(hi)))
    ticks = list(hm.colorbar.ticktext)
    assert [float(t.replace(",", "")) for t in ticks] == pytest.approx([10**v for v in hm.colorbar.tickvals])
    assert "log" in hm.colorbar.title.text and "nats" in hm.colorbar.title.text
    # the user chooses: a linear scale, or a fixed range in nats
    lin = _heatmap(lens_heatmap(lens, color="kl", prompt=1, scale="linear", zmin=0.0, zmax=10.0))
    assert (lin.zmin, lin.zmax) == (0.0, 10.0) and lin.colorbar.tickvals is None


def test_lens_heatmap_prob_on_a_log_scale_and_a_fixed_range(lens):
    fixed = _heatmap(lens_heatmap(lens, zmin=0.0, zmax=1.0))
    assert (fixed.zmin, fixed.zmax) == (0.0, 1.0)
    log = _heatmap(lens_heatmap(lens, scale="log", zmin=1e-3))
    cols = _cols(lens, 0)
    p = lens.top_logprobs[:, 0, cols, 0].exp().double()
    assert_close(_z(log), p.clamp(min=1e-3).log10(), atol=1e-9, rtol=0)
    assert log.zmin == pytest.approx(-3.0) and log.colorbar.ticktext[0] == "0.001"
    assert [float(t) for t in log.colorbar.ticktext] == pytest.approx([10**v for v in log.colorbar.tickvals])
    with pytest.raises(ValueError, match="already on a log scale"):
        lens_heatmap(lens, color="logprob", scale="log")
    with pytest.raises(ValueError, match="scale='cubic' is not one of"):
        lens_heatmap(lens, scale="cubic")
    with pytest.raises(TypeError, match="zmax"):  # our message, or the run-time type check under pytest
        lens_heatmap(lens, zmax="1")


def test_log_ticks_are_decades_and_half_decades_labelled_as_numbers():
    vals, text = log_ticks(1.0, 5000.0)
    assert text == ["1", "3", "10", "30", "100", "300", "1,000", "3,000"]
    assert vals == pytest.approx([math.log10(float(t.replace(",", ""))) for t in text])
    # a rank of 25 sits between two labelled ticks less than half a decade apart
    assert math.log10(30) - math.log10(10) < 0.5
    assert log_ticks(0.03, 0.8)[1] == ["0.03", "0.1", "0.3"]
    # past MAX_LOG_TICKS ticks (about six decades): decades only
    assert log_ticks(1.0, 1e9)[1] == ["1", "10", "100", "1,000", "10,000", "100,000", "1,000,000", "10,000,000",
                                      "100,000,000", "1,000,000,000"]
    scale = colour_scale(torch.tensor([1.0, 10.0, float("nan")]), scale="log", zmin=None, zmax=None, floor=1.0)
    assert scale.z[:2].tolist() == [0.0, 1.0] and math.isnan(scale.z[2])


def test_lens_heatmap_rank_defaults_to_the_next_token_without_targets(plain):
    hm = _heatmap(lens_heatmap(plain, color="rank"))
    ranks = plain.next_ranks[:, 0].double()
    expected = torch.where(ranks > 0, ranks.log10(), torch.nan)  # the last token has no next token
    assert_close(_z(hm), expected, atol=1e-12, rtol=0, equal_nan=True)
    assert torch.isnan(_z(hm)[:, -1]).all()
    # log colour scale from rank 1, its bar labelled 1, 3, 10 (not exponents)
    assert hm.zmin == 0.0 and list(hm.colorbar.ticktext)[:3] == ["1", "3", "10"]


def test_lens_heatmap_target_by_id_matches_target_by_string(lens, ln_model):
    the_id = int(lens.target_ids[0, 0, 0])
    a = _heatmap(lens_heatmap(lens, color="prob", target=the_id))
    b = _heatmap(lens_heatmap(lens, color="prob", target=" the"))
    assert a.z == b.z


@pytest.mark.parametrize("long", ["clip", "stride"])
def test_lens_heatmap_long_prompts_are_clipped_or_strided_with_a_note(lens, long):
    cols = _cols(lens, 0)
    fig = lens_heatmap(lens, max_positions=5, long=long)
    hm = _heatmap(fig)
    shown = len(hm.x)
    assert shown <= 5
    inputs = lens.input_tokens()[0]
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[-1] == clip(cell_text(inputs[cols[-1]]))  # the last position is always shown
    if long == "clip":
        assert ticks == [clip(cell_text(inputs[j])) for j in cols[-5:]]
    notes = [a.text for a in fig.layout.annotations]
    assert len(notes) == 1 and f"of {len(cols)} positions" in notes[0]
    assert fig.layout.annotations[0].font.color == "#555"  # a neutral note, not an error
    assert not lens_heatmap(lens).layout.annotations  # no note when everything fits


def test_lens_heatmap_reads_48_layers_by_40_positions(ln_model):
    long = tl.logit_lens(ln_model, " ".join(SENTENCES[:4]), top_k=2)
    n_pos = long.top_ids.shape[2]
    assert n_pos > 40
    reps = 16  # 4 sites (3 layers + final_post) x 16 = 64 rows, more than 48
    big = replace(
        long,
        labels=tuple(f"{i}_pre" for i in range(4 * reps - 1)) + ("final_post",),
        top_ids=long.top_ids.repeat(reps, 1, 1, 1),
        top_logprobs=long.top_logprobs.repeat(reps, 1, 1, 1),
        entropy=long.entropy.repeat(reps, 1, 1),
        kl_to_final=long.kl_to_final.repeat(reps, 1, 1),
        next_logprobs=long.next_logprobs.repeat(reps, 1, 1),
        next_ranks=long.next_ranks.repeat(reps, 1, 1),
    )
    fig = lens_heatmap(big)
    hm = _heatmap(fig)
    assert len(hm.y) == 64 and len(hm.x) == 40
    assert fig.layout.height >= 20 * 64 and fig.layout.width >= 56 * 40  # at least 20 x 56 px per cell
    assert f"Showing the last 40 of {n_pos} positions" in fig.layout.annotations[0].text


def test_lens_heatmap_errors(lens, plain):
    with pytest.raises(ValueError, match="color='bogus' is not one of"):
        lens_heatmap(lens, color="bogus")
    with pytest.raises(ValueError, match="not one of this result's targets"):
        lens_heatmap(lens, color="prob", target=" cat")
    with pytest.raises(ValueError, match="needs to know which target"):
        lens_heatmap(lens, color="rank")
    with pytest.raises(ValueError, match="this result has no targets"):
        lens_heatmap(plain, color="prob", target=" the")
    with pytest.raises(ValueError, match="prompt=3 is out of range"):
        lens_heatmap(lens, prompt=3)
    with pytest.raises(ValueError, match="max_positions must be a positive int"):
        lens_heatmap(lens, max_positions=0)
    with pytest.raises(ValueError, match="long='wrap' is not understood"):
        lens_heatmap(lens, max_positions=2, long="wrap")


def test_plot_method_returns_the_heatmap(lens):
    fig = lens.plot(color="entropy")
    assert isinstance(fig, go.Figure)
    assert fig.data[0].z == lens_heatmap(lens, color="entropy").data[0].z


def test_target_trajectory_mean_band_and_prompt_lines(lens):
    fig = target_trajectory(lens)
    n_sites, n_batch = len(lens.labels), len(PROMPTS)
    last = [_cols(lens, b)[-1] for b in range(n_batch)]
    names = [t.name for t in fig.data]
    for t, tok in enumerate([" the", " and"]):
        rows = [[float(lens.target_logprobs[s, b, last[b], t]) for b in range(n_batch)] for s in range(n_sites)]
        mean = [sum(r) / n_batch for r in rows]
        sd = [math.sqrt(sum((v - m) ** 2 for v in r) / (n_batch - 1)) for r, m in zip(rows, mean)]
        half = [1.959963984540054 * s / math.sqrt(n_batch) for s in sd]
        (line,) = [tr for tr in fig.data if tr.name == f"'{cell_text(tok)}' mean over {n_batch} prompts"]
        assert_close(_f64(line.y), mean, atol=1e-9, rtol=0)
        (band,) = [tr for tr in fig.data if tr.name == f"'{cell_text(tok)}' 95% band (n={n_batch})"]
        assert_close(_f64(band.y), [m + h for m, h in zip(mean, half)] + [m - h for m, h in zip(mean, half)][::-1], atol=1e-9, rtol=0)
        prompt_lines = [tr for tr in fig.data if tr.name.startswith(f"'{cell_text(tok)}' prompt ")]
        assert len(prompt_lines) == n_batch
        assert_close(_f64(prompt_lines[1].y), [r[1] for r in rows], atol=1e-9, rtol=0)
    assert len(names) == 2 * (n_batch + 2)
    assert fig.layout.yaxis.title.text == "log-prob (nats)"
    assert list(fig.layout.xaxis.ticktext) == list(lens.labels)
    assert fig.layout.title.text.startswith("Log-prob of the targets")


def test_target_trajectory_draws_no_band_below_three_prompts(ln_model):
    two = tl.logit_lens(ln_model, PROMPTS[:2], targets=[" the"], positions="last")
    fig = target_trajectory(two)
    assert not [t for t in fig.data if "band" in t.name]
    assert [t.name for t in fig.data if t.showlegend is not False] == ["'␣the' mean over 2 prompts"]
    assert "too few for a band" in fig.layout.title.text


def test_target_trajectory_rank_is_a_geometric_mean_on_a_log_axis(lens):
    fig = target_trajectory(lens, target=" and", metric="rank", show_prompts=False)
    last = [_cols(lens, b)[-1] for b in range(len(PROMPTS))]
    ranks = torch.stack([lens.target_ranks[:, b, last[b], 1] for b in range(len(PROMPTS))], 1).double()
    (line,) = [tr for tr in fig.data if "geometric mean" in tr.name]
    assert_close(_f64(line.y), 10 ** ranks.log10().mean(1), atol=1e-9, rtol=1e-9)
    assert fig.layout.yaxis.type == "log"
    assert len(fig.data) == 2  # band and mean, no prompt lines
    # the log axis is labelled at decades and half-decades 1, 3, 10, 30 (plotly's own ticks read "10, 2, 5, 100")
    ticks = list(fig.layout.yaxis.ticktext)
    assert ticks[:3] == ["1", "3", "10"] and all(t.replace(",", "").strip("0") in ("1", "3") for t in ticks)
    assert list(fig.layout.yaxis.tickvals) == pytest.approx([float(t.replace(",", "")) for t in ticks])
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.title.text.startswith("Rank of the targets")  # not the log-prob title


def test_target_trajectory_errors(lens, plain, ln_model):
    with pytest.raises(ValueError, match="has no targets"):
        target_trajectory(plain)
    with pytest.raises(ValueError, match="metric='kl' is not one of"):
        target_trajectory(lens, metric="kl")
    with pytest.raises(ValueError, match="was not read by this result"):
        target_trajectory(tl.logit_lens(ln_model, PROMPTS, targets=[" the"], positions="last"), position=0)


def test_top_token_evolution_reads_the_targets_log_probs(ln_model):
    first = tl.logit_lens(ln_model, PROMPTS[1], positions="last", top_k=6)
    ids = first.top_ids[-1, 0, 0].tolist()
    second = tl.logit_lens(ln_model, PROMPTS[1], positions="last", top_k=6, targets=ids)
    fig = top_token_evolution(second, n=6)
    hm = _heatmap(fig)
    assert_close(_z(hm), second.target_logprobs[:, 0, 0, :].exp().T.double(), atol=1e-12, rtol=0)
    names = tl.display_tokens(ln_model.tokenizer, ids)
    assert list(fig.layout.yaxis.ticktext) == [f"{r + 1}. {cell_text(t)}" for r, t in enumerate(names)]
    assert list(hm.x) == list(second.labels)
    assert fig.layout.yaxis.autorange == "reversed"  # the final top-1 token on top
    # at the final site the targets are the top tokens, so their probabilities are the top probs
    assert_close(_z(hm)[:, -1], first.top_probs[-1, 0, 0].double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reads target log-probs"):
        top_token_evolution(first)


def test_text_heatmap_aligns_each_prediction_under_the_token_it_follows(lens):
    fig = text_heatmap(lens, prompt=2)
    assert [type(t) for t in fig.data] == [go.Heatmap, go.Heatmap]
    inputs, preds = fig.data
    assert (inputs.name, preds.name) == ("input", "predictions")
    cols = _cols(lens, 2)
    top = lens.top_tokens()
    n_sites = len(lens.labels)
    assert list(inputs.text[0]) == [cell_text(lens.input_tokens()[2][j]) for j in cols]
    assert [list(r) for r in preds.text] == [[cell_text(top[s][2][j][0]) for j in cols] for s in range(n_sites)]
    probs = lens.top_probs[:, 2, cols, 0].double()
    assert_close(_z(preds), probs, atol=1e-7, rtol=0)
    assert preds.zmin == 0.0 and preds.zmax == pytest.approx(float(probs.max()))
    # one set of column edges for both traces: the prediction after token j sits under token j,
    # and each column is as wide as its longest text
    assert list(inputs.x) == list(preds.x) and len(preds.x) == len(cols) + 1
    widths = [b - a for a, b in zip(preds.x[:-1], preds.x[1:])]
    for c in range(len(cols)):
        longest = max(len(inputs.text[0][c]), *(len(preds.text[s][c]) for s in range(n_sites)))
        assert widths[c] == longest + 2
    # the input row is on top, then the sites from the last down to the first
    assert list(inputs.y) == [n_sites] and list(preds.y) == list(range(n_sites))
    assert list(fig.layout.yaxis.ticktext) == list(lens.labels) + ["input"]
    assert preds.textfont.size >= 12 and "Mono" in preds.textfont.family  # readable, horizontal text


@pytest.fixture(scope="module")
def diff(ln_model):
    return tl.logit_diff(ln_model, SENTENCES[:4], [" the", " a"], [" and", " to"], n_bootstrap=200)


def test_logit_diff_figure_draws_mean_ci_and_prompt_lines(diff):
    fig = logit_diff_figure(diff, per_prompt=True)
    for k, (c, i) in enumerate([(" the", " and"), (" a", " to")]):
        name = f"'{cell_text(c)}' − '{cell_text(i)}'"
        assert pair_name(diff, k) == name
        (mean,) = [t for t in fig.data if t.name.startswith(f"{name} mean")]
        assert_close(_f64(mean.y), diff.mean[:, 0, k].double(), atol=1e-7, rtol=0)
        (band,) = [t for t in fig.data if t.name == f"{name} 95% CI (n=4)"]
        assert_close(_f64(band.y), torch.cat([diff.high[:, 0, k], diff.low[:, 0, k].flip(0)]).double(), atol=1e-7, rtol=0)
        lines = [t for t in fig.data if t.name.startswith(f"{name} prompt ")]
        assert len(lines) == 4
        assert_close(_f64(lines[3].y), diff.values[:, 3, 0, k].double(), atol=1e-7, rtol=0)
    one = logit_diff_figure(diff, pair=1)
    assert len(one.data) == 2
    assert "'␣a' − '␣to'" in one.layout.title.text
    assert fig.layout.yaxis.title.text == "logit difference (logits)"
    assert isinstance(diff.plot(), go.Figure)
    with pytest.raises(ValueError, match="pair=5 is out of range"):
        logit_diff_figure(diff, pair=5)


def test_logit_diff_figure_names_per_prompt_pairs_by_their_tokens_and_skips_small_bands(ln_model):
    per = tl.logit_diff(ln_model, SENTENCES[:2], [" the", " a"], [" and", " to"], per_prompt=True, n_bootstrap=50)
    assert per.pair_labels[0].startswith("correct[0]")  # the core's label; the figure names the tokens
    fig = logit_diff_figure(per)
    assert "'␣the' − '␣and'" in fig.layout.title.text and "correct[" not in fig.layout.title.text
    assert not [t for t in fig.data if "CI" in t.name]  # two prompts: no band
    assert "too few for a band" in fig.layout.title.text
    assert [t.name for t in fig.data] == ["pair 0 mean over 2 prompts"]


def test_entropy_kl_figure_draws_the_mean_over_each_group(lens):
    n_sites = len(lens.labels)
    entropy, kl = lens.entropy.reshape(n_sites, -1), lens.kl_to_final.reshape(n_sites, -1)
    every = lens.valid.reshape(-1)
    first = torch.zeros_like(lens.valid)
    first[0] = lens.valid[0]
    fig = entropy_kl_figure(lens.labels, entropy, kl, [("every", every), ("prompt 0", first.reshape(-1))], "t")
    assert [t.name for t in fig.data] == [f"every (n={int(every.sum())})"] * 2 + [f"prompt 0 (n={int(first.sum())})"] * 2
    assert [t.showlegend for t in fig.data] == [True, False, True, False]  # one legend entry per group
    for trace, values, rows in zip(fig.data, (entropy, kl) * 2, (every, every, first.reshape(-1), first.reshape(-1))):
        # the slow, obvious mean: a loop over the rows read
        expected = [sum(float(values[s, r]) for r in range(len(rows)) if rows[r]) / int(rows.sum()) for s in range(n_sites)]
        assert list(trace.x) == list(lens.labels)
        assert_close(_f64(trace.y), torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)
    assert fig.data[0].line.color != fig.data[2].line.color


def test_check_index_counts_from_the_end_and_refuses_bad_indices():
    assert check_index("pair", -1, 3) == 2 and check_index("pair", 2, 3) == 2
    with pytest.raises(ValueError, match=r"pair=3 is out of range: the result holds 3 pair\(s\)"):
        check_index("pair", 3, 3)
    with pytest.raises(TypeError, match="column must be an int index, not bool"):
        check_index("column", True, 3)


def test_titles_wrap_to_the_figure_width():
    long = "A title that is much too long to fit in a narrow figure of a few hundred pixels wide"
    lines = wrap_title(long + "<br><sup>" + long + "</sup>", 400)
    assert len(lines) >= 4 and all(len(line.replace("<sup>", "").replace("</sup>", "")) <= 60 for line in lines)
    assert " ".join(x.replace("<sup>", "").replace("</sup>", "") for x in lines) == long + " " + long


@pytest.fixture(scope="module")
def head_dla(ln_model):
    return tl.direct_logit_attribution(ln_model, SENTENCES[:3], " the", " and", unit="head")


def test_head_grid_is_layer_by_head_centred_on_zero(head_dla, ln_model):
    fig = head_grid_figure(head_dla)
    hm = _heatmap(fig)
    n_layers, n_heads = ln_model.cfg.n_layers, ln_model.cfg.n_heads
    mean = head_dla.mean_attribution(0)[: n_layers * n_heads].reshape(n_layers, n_heads)
    assert_close(_z(hm), mean.double(), atol=1e-7, rtol=0)
    bound = float(mean.abs().max())
    assert (hm.zmin, hm.zmax) == (pytest.approx(-bound), pytest.approx(bound))  # symmetric about zero
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == ("head", "layer")
    assert hm.hovertext[1][2].startswith("<b>L1H2</b>")
    one = _heatmap(head_grid_figure(head_dla, prompt=1))
    grid = head_dla.grid()[:, :, 1, 0, 0]
    assert_close(_z(one), grid.double(), atol=1e-7, rtol=0)
    assert isinstance(head_dla.plot(), go.Figure)
    comp = tl.direct_logit_attribution(ln_model, SENTENCES[:3], " the", " and")
    with pytest.raises(ValueError, match="needs a result with unit='head'"):
        head_grid_figure(comp)


def test_head_source_figure_is_the_source_attribution(ln_model):
    res = tl.direct_logit_attribution(ln_model, SENTENCES[:2], " the", " and", unit="head_source")
    fig = head_source_figure(res, prompt=1)
    hm = _heatmap(fig)
    n_layers, n_heads = ln_model.cfg.n_layers, ln_model.cfg.n_heads
    col = _cols(res, 1)[-1]
    n_src = int(res.positions[1, col]) + 1
    expected = res.source_attribution[:, :, :n_src, 1, col, 0].reshape(n_layers * n_heads, n_src).double()
    assert_close(_z(hm), expected, atol=1e-7, rtol=0)
    assert list(hm.y) == [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
    assert list(fig.layout.xaxis.ticktext) == [f"{i}:{cell_text(t)}" for i, t in enumerate(res.str_tokens[1][:n_src])]
    bound = float(expected.abs().max())
    assert (hm.zmin, hm.zmax) == (pytest.approx(-bound), pytest.approx(bound))
    # each row sums to that head's entry of the layer x head grid
    assert_close(_z(hm).sum(1), res.grid()[:, :, 1, col, 0].reshape(-1).double(), atol=1e-5, rtol=0)
    head = tl.direct_logit_attribution(ln_model, SENTENCES[:2], " the", " and", unit="head")
    with pytest.raises(ValueError, match="needs a result with unit='head_source'"):
        head_source_figure(head)
    with pytest.raises(ValueError, match="prompt=2 is out of range"):
        head_source_figure(res, prompt=2)
    # the result's own plot() of a head_source attribution is this figure
    assert_close(_z(_heatmap(res.plot(prompt=1))), _z(hm), atol=0, rtol=0)


def test_component_bars_are_the_rows_and_the_total(ln_model, head_dla):
    comp = tl.direct_logit_attribution(ln_model, SENTENCES[:3], " the", " and")
    fig = component_bars_figure(comp)
    (bars,) = fig.data
    assert list(bars.x) == list(comp.labels) + ["total (model)"]
    expected = comp.mean_attribution(0).tolist() + [float(torch.nanmean(comp.total[..., 0]))]
    assert_close(_f64(bars.y), expected, atol=1e-7, rtol=0)
    # the rows add up to the model's total (drawn from the result, checked here)
    assert abs(sum(bars.y[:-1]) - bars.y[-1]) < 1e-4
    colours = list(bars.marker.color)
    assert all((c == "#2166ac") == (v >= 0) for c, v in zip(colours[:-1], bars.y[:-1]))
    # head results: the non-grid rows, the largest heads, one bar for all the other heads, the total
    fig_h = component_bars_figure(head_dla, n_grid=3)
    (bars_h,) = fig_h.data
    labels = list(bars_h.x)
    heads = [lab for lab in labels if lab.startswith("L")]
    assert len(heads) == 3
    assert len(labels) == len(head_dla.labels) - 12 + 3 + 1 + 1
    assert labels[-2] == "other heads (9)"
    mean = head_dla.mean_attribution(0)
    shown = {head_dla.labels.index(lab) for lab in heads}
    others = sum(float(mean[r]) for r in range(12) if r not in shown)  # the slow way: one head at a time
    assert bars_h.y[-2] == pytest.approx(others, abs=1e-6)
    # so the bars add up to the model's total again
    assert abs(sum(bars_h.y[:-1]) - bars_h.y[-1]) < 1e-4
    # every head shown: no "other" bar
    assert "other heads" not in " ".join(component_bars_figure(head_dla, n_grid=12).data[0].x)


def test_component_lens_figure_shows_promoted_and_suppressed_tokens(ln_model):
    res = tl.component_lens(ln_model, SENTENCES[:2], top_k=4)
    fig = component_lens_figure(res, prompt=1, k=3)
    hm = _heatmap(fig)
    prom, sup = res.promoted_tokens(), res.suppressed_tokens()
    for r in range(len(res.labels)):
        assert list(hm.text[r]) == [clip(cell_text(sup[r][1][-1][i])) for i in (2, 1, 0)] + [
            clip(cell_text(prom[r][1][-1][i])) for i in range(3)
        ]
    assert hm.zmin == -hm.zmax
    assert isinstance(res.plot(), go.Figure)


@pytest.mark.slow
def test_static_export_png_svg_html(lens, tmp_path):
    require_browser()  # kaleido draws in a headless Chromium
    figs = [lens_heatmap(lens), text_heatmap(lens), lens_heatmap(lens)]
    paths = save_figures(figs, [tmp_path / "lens.png", tmp_path / "text.svg", tmp_path / "lens.html"], scale=1)
    png = paths[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (figs[0].layout.width, figs[0].layout.height)
    svg = paths[1].read_text()
    assert svg.lstrip().startswith("<svg") and "</svg>" in svg
    assert cell_text(lens.top_tokens()[0][0][1][0]).strip("␣") in svg
    page = paths[2].read_text()
    assert "<script src=" not in page and "Plotly.newPlot" in page and len(page) > 1_000_000
    with pytest.raises(ValueError, match="cannot tell the format"):
        save_figures(figs[:1], [tmp_path / "lens.gif"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_figures(figs[:1], [tmp_path / "nope" / "lens.png"])
