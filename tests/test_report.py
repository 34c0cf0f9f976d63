"""The HTML report: self-contained, every figure renders in a headless Chromium without errors and fits a
1280-px window, causal and masked LMs, plotly.js inline/CDN/shared, and a path checked before any work."""

from __future__ import annotations

import base64
import html
import os
import time

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, assert_not_close, require_browser
from tl_logitlens.core.tokens import display_tokens, visible_token
from tl_logitlens.reporting import (
    MaskedReportData,
    compute_report,
    report,
    top_table_html,
    write_report,
)

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",  # the window every figure and table must fit
)


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module (starting one takes seconds)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = require_browser(driver=True)
    opts = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.binary_location = browser
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path keeps Selenium Manager (which goes online) out of it
    drv = webdriver.Chrome(options=opts, service=Service(chromedriver))
    yield drv
    drv.quit()


# per plot: the number of plotly SVG layers and of drawn things (heatmap images, traces)
_RENDERED = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(e => [
    e.id || e.parentElement.id,
    e.querySelectorAll('svg.main-svg').length,
    e.querySelectorAll('.heatmaplayer image').length + e.querySelectorAll('g.trace').length,
]);
"""



def _rendered(driver, expected: int, timeout: float = 30.0) -> list:
    """The figures on the page once ``expected`` of them have drawn (polled: plotly draws after the
    load event returns, and a loaded CI machine can take seconds for a 5 MB page), or what is there
    when ``timeout`` runs out, for the caller's assertions to report."""
    deadline = time.monotonic() + timeout
    while True:
        rendered = driver.execute_script(_RENDERED)
        done = len(rendered) >= expected and all(svgs >= 1 and drawn >= 1 for _, svgs, drawn in rendered)
        if done or time.monotonic() > deadline:
            return rendered
        time.sleep(0.2)


# the window's width, the page's, and each figure's and table's right edge and own scroll width
_WIDTHS = """
return [window.innerWidth, document.documentElement.clientWidth, document.documentElement.scrollWidth,
    Array.from(document.querySelectorAll('.js-plotly-plot, table, figure')).map(e => [
        e.id || e.tagName, e.getBoundingClientRect().right, e.scrollWidth, e.clientWidth])];
"""


# per figure: its title's box and its mode bar's box (the mode bar is laid out, if transparent, until hover)
_TITLE_AND_MODEBAR = """
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(e => {
    const title = e.querySelector('.gtitle'), bar = e.querySelector('.modebar');
    return [e.id || e.parentElement.id, title && title.textContent, title ? box(title) : null, bar ? box(bar) : null];
});
"""


def _assert_fits(driver) -> None:
    """No figure or table is wider than the 1280-px window, the page does not scroll sideways, and no
    figure's mode bar (its buttons at the top right, shown on hover) lies over its title."""
    inner, client, page, items = driver.execute_script(_WIDTHS)
    assert inner == 1280
    assert page <= client, f"the page is {page} px wide in a {client} px window"
    for name, right, scroll, width in items:
        assert right <= client, f"{name} reaches {right:.0f} px in a {client} px window"
        assert scroll <= width + 1, f"{name} scrolls: {scroll} px of content in {width} px"
    for name, text, title, bar in driver.execute_script(_TITLE_AND_MODEBAR):
        if title is None or bar is None:
            continue
        apart = title[2] <= bar[0] or bar[2] <= title[0] or title[3] <= bar[1] or bar[3] <= title[1]
        assert apart, f"figure {name}: the mode bar {bar} lies over the title {text!r} {title}"


# mean and variance of the screenshot's grey levels, computed in the browser on a canvas
_PIXEL_STATS = """
const done = arguments[arguments.length - 1];
const img = new Image();
img.onload = () => {
    const c = document.createElement('canvas');
    c.width = img.width; c.height = img.height;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let n = 0, s = 0, s2 = 0;
    for (let i = 0; i < d.length; i += 4) {
        const g = (d[i] + d[i + 1] + d[i + 2]) / 3; n += 1; s += g; s2 += g * g;
    }
    const m = s / n;
    done([c.width, c.height, m, s2 / n - m * m]);
};
img.src = 'data:image/png;base64,' + arguments[0];
"""


LONG = " ".join(SENTENCES[:4])  # 57 positions (with BOS): wider than a 1280-px window at a column each


@pytest.fixture(scope="module")
def full_report(ln_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    path = report(ln_model, [LONG, *SENTENCES], target=" the", versus=" and", out=out)
    return path


def test_report_is_one_self_contained_file(full_report):
    page = full_report.read_text(encoding="utf-8")
    assert "<script src" not in page and "http://" not in page.split("<script", 1)[0]
    assert page.count("plotly.js v") >= 1  # the library's banner, inlined once
    assert page.count("Plotly.newPlot") == 11
    assert "<table>" in page and "top tokens per layer" in page.lower()
    # every figure has a caption; the page says how to read it and which lens made it
    assert page.count("<figcaption>") == 11
    assert "How to read this" in page and "final_post" in page and html.escape('norm="cached"') in page
    assert "lens <b>logit lens</b>" in page
    assert "Entropy and KL to the final layer" in page
    # the long prompt is clipped to its last positions, and the caption says so
    assert "Only the last" in page and "of the prompt's 57 positions are drawn" in page
    # the note on prompts left out is not styled as an error
    assert "3 more prompt(s)" in page and "#a33" not in page.split("<style>")[1].split("</style>")[0]


def test_report_renders_every_figure_without_console_errors(driver, full_report, tmp_path):
    driver.get(full_report.resolve().as_uri())
    rendered = _rendered(driver, 11)
    assert len(rendered) == 11  # 3 lens heatmaps, text view, entropy/KL, evolution, 2 trajectories, diff, 2 DLA
    for name, svgs, drawn in rendered:
        assert svgs >= 1 and drawn >= 1, f"figure {name} did not render ({svgs} svg, {drawn} drawn)"
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    _assert_fits(driver)
    png = driver.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    driver.get("about:blank")
    width, height, mean, var = driver.execute_async_script(_PIXEL_STATS, base64.b64encode(png).decode())
    assert (width, height) == (1280, 900) or width * height > 500_000
    assert 100 < mean < 254.5, f"the screenshot is blank or black (mean grey {mean:.1f})"
    assert var > 100, f"the screenshot is nearly uniform (variance {var:.1f})"


def test_report_without_target_has_the_lens_figures_only(driver, ln_model, tmp_path):
    path = report(ln_model, SENTENCES[0], out=tmp_path / "one.html", top_k=3)
    driver.get(path.resolve().as_uri())
    rendered = _rendered(driver, 4)
    assert len(rendered) == 4  # lens heatmap, text view, entropy/KL, evolution
    assert all(svgs >= 1 and drawn >= 1 for _, svgs, drawn in rendered)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    _assert_fits(driver)


def test_batched_results_join_to_the_one_batch_result(ln_model):
    whole = tl.logit_lens(ln_model, SENTENCES, targets=[" the"])
    parts = tl.LensResult.concat(
        [tl.logit_lens(ln_model, SENTENCES[:2], targets=[" the"]), tl.logit_lens(ln_model, SENTENCES[2:], targets=[" the"])]
    )
    for name in (
        "top_ids", "top_logprobs", "entropy", "kl_to_final", "next_ids", "next_logprobs", "next_ranks",
        "target_ids", "target_logprobs", "target_ranks", "valid",
    ):
        a, b = getattr(whole, name), getattr(parts, name)
        assert a.shape == b.shape, name
        assert_close(b.double(), a.double(), atol=1e-6, rtol=0, msg=name, equal_nan=True)  # padding is NaN in both
    assert torch.equal(whole.positions[whole.valid], parts.positions[parts.valid])
    assert whole.str_tokens == parts.str_tokens


def test_compute_report_batches_call_progress_and_match_one_call(ln_model):
    calls = []
    data = compute_report(ln_model, SENTENCES, target=" the", batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    whole = tl.logit_lens(ln_model, SENTENCES, targets=[" the"])
    assert_close(data.lens.target_logprobs, whole.target_logprobs, atol=1e-6, rtol=0, equal_nan=True)
    assert data.logit_diff is None and data.attribution is None
    # the evolution figure's targets are the final layer's top tokens at prompt 0's last token
    first = tl.logit_lens(ln_model, SENTENCES[0], positions="last", top_k=10)
    assert torch.equal(data.evolution.target_ids[0, 0], first.top_ids[-1, 0, 0])


def test_top_table_lists_the_top_tokens_at_the_last_token(ln_model):
    lens = tl.logit_lens(ln_model, SENTENCES[:2], top_k=3)
    table = top_table_html(lens, 1)
    col = int(lens.valid[1].sum()) - 1
    top = lens.top_tokens()
    for s in range(len(lens.labels)):
        p = float(lens.top_probs[s, 1, col, 0])
        assert f"{p:.3f}" in table
        assert f"<code>{html.escape(visible_token(top[s][1][col][0]))}</code> {p:.3f}" in table
    assert table.count("<tr>") == len(lens.labels) + 1


def test_report_errors(ln_model, tmp_path):
    with pytest.raises(ValueError, match="needs a target token too"):
        report(ln_model, SENTENCES[0], versus=" and", out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="not a single token"):
        report(ln_model, SENTENCES[0], target=" elephantine", versus=" and", out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="no prompts were given"):
        report(ln_model, [], out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="is empty"):
        report(ln_model, "  ", out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="plotly_js='svg' is not understood"):
        report(ln_model, SENTENCES[0], out=tmp_path / "r.html", plotly_js="svg")
    with pytest.raises(ValueError, match="mask_positions is for masked LMs"):
        report(ln_model, SENTENCES[0], out=tmp_path / "r.html", mask_positions=2)


class _Boom:
    """A model stand-in that fails if the report starts computing."""

    def __getattr__(self, name):
        raise AssertionError(f"the report computed (read model.{name}) before checking its path")


def test_report_checks_its_path_before_computing(tmp_path):
    folder = tmp_path / "existing.html"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder; give the report a file name"):
        report(_Boom(), SENTENCES[0], out=folder)
    with pytest.raises(ValueError, match="is a folder"):
        report(_Boom(), SENTENCES[0], out=tmp_path)
    with pytest.raises(ValueError, match="ending in .html"):
        report(_Boom(), SENTENCES[0], out=tmp_path / "r.pdf")
    with pytest.raises(ValueError, match="does not exist; create it"):
        report(_Boom(), SENTENCES[0], out=tmp_path / "missing" / "r.html")
    with pytest.raises(TypeError, match="out must be a file path"):
        report(_Boom(), SENTENCES[0], out=3)
    with pytest.raises(ValueError, match="plotly_js"):
        report(_Boom(), SENTENCES[0], out=tmp_path / "r.html", plotly_js="nope")
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="max_prompts must be a positive int"):
            report(_Boom(), SENTENCES[0], out=tmp_path / "r.html", max_prompts=bad)
    if os.geteuid() != 0:  # root may write anywhere, so permissions cannot be tested as root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(ValueError, match="may not be written"):
                report(_Boom(), SENTENCES[0], out=locked / "r.html")
        finally:
            locked.chmod(0o700)
    else:
        with pytest.raises(ValueError, match="may not be written"):
            report(_Boom(), SENTENCES[0], out="/proc/r.html")


def test_plotly_js_inline_cdn_and_directory(ln_model, tmp_path):
    data = compute_report(ln_model, SENTENCES[:2])
    inline = write_report(data, tmp_path / "inline.html")
    cdn = write_report(data, tmp_path / "cdn.html", plotly_js="cdn")
    shared = tmp_path / "shared"
    shared.mkdir()
    first = write_report(data, shared / "a.html", plotly_js="directory")
    second = write_report(data, shared / "b.html", plotly_js="directory")
    import plotly.offline

    js = plotly.offline.get_plotlyjs()
    assert js in inline.read_text(encoding="utf-8") and "<script src" not in inline.read_text(encoding="utf-8")
    page = cdn.read_text(encoding="utf-8")
    version = plotly.offline.get_plotlyjs_version()
    assert f'src="https://cdn.plot.ly/plotly-{version}.min.js"' in page and 'integrity="sha384-' in page
    assert js not in page and cdn.stat().st_size < inline.stat().st_size / 10
    assert (shared / "plotly.min.js").read_text(encoding="utf-8") == js  # one shared copy for both reports
    for path in (first, second):
        text = path.read_text(encoding="utf-8")
        assert 'src="plotly.min.js"' in text and js not in text
    # the reports in the folder are the same page bar the time stamp
    assert first.stat().st_size == second.stat().st_size


def test_shared_plotly_js_report_renders(driver, ln_model, tmp_path):
    path = report(ln_model, SENTENCES[0], out=tmp_path / "light.html", plotly_js="directory")
    driver.get(path.resolve().as_uri())
    rendered = _rendered(driver, 4)
    assert len(rendered) == 4 and all(svgs >= 1 and drawn >= 1 for _, svgs, drawn in rendered)


def test_report_reads_and_names_its_lens(ln_model, tmp_path):
    from tl_logitlens import TunedLens

    lens = TunedLens.for_model(ln_model)
    lens.name = "tuned lens (test)"
    with torch.no_grad():  # translators away from the identity, so the lens changes the numbers
        lens.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    data = compute_report(ln_model, SENTENCES[:2], target=" the", versus=" a", lens=lens)
    direct = tl.logit_lens(ln_model, SENTENCES[:2], top_k=data.top_k, targets=" the", lens=lens)
    assert_close(data.lens.entropy, direct.entropy, atol=0, rtol=0, equal_nan=True)
    plain = tl.logit_lens(ln_model, SENTENCES[:2], top_k=data.top_k, targets=" the")
    assert_not_close(data.lens.entropy[:-1], plain.entropy[:-1], atol=1e-3)
    assert data.lens_name == data.lens.lens_name == data.logit_diff.lens_name == "tuned lens (test)"
    page = write_report(data, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "lens <b>tuned lens (test)</b>" in page and "Lens report (tuned lens (test))" in page


# ------------------------------------------------------------------------------------------------
# masked LMs


@pytest.fixture(scope="module")
def bert():
    return tl.load_model("demo-bert")


@pytest.fixture(scope="module")
def masked_report(bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("masked") / "masked.html"
    prompts = ["The cat sat on the [MASK].", "Tom and Anna went to the shop to buy some bread and milk today."]
    return report(bert, prompts, out=out)


def test_masked_report_holds_the_masked_lens_profiles_and_sliding_mask(bert, masked_report):
    data = compute_report(bert, ["The cat sat on the [MASK].", "The dog ran to the park."])
    assert isinstance(data, MaskedReportData)
    first, second = data.masked
    # prompt 0's hole is its [MASK]; prompt 1 has none, so its last word is masked
    assert first.original_ids[0, 0] == -1 and "[MASK] token(s) in the text" in data.notes[0]
    ref = tl.masked_lens(bert, "The dog ran to the park.", mask_positions="park")
    assert_close(second.top_logprobs, ref.top_logprobs, atol=1e-6)
    assert "last word 'park'" in data.notes[1]
    assert data.profiles[0].target == "max" and data.profiles[1].target == "original token"
    assert data.profiles[1].depths.tolist() == list(range(bert.cfg.n_layers + 1))
    slide = tl.sliding_mask_lens(bert, "The dog ran to the park.")
    assert_close(data.sliding[1].original_logprobs, slide.original_logprobs, atol=1e-6)
    page = masked_report.read_text(encoding="utf-8")
    assert page.count("Plotly.newPlot") == page.count("<figcaption>") == 9
    for heading in ("Masked lens, prompt 0, hole 0", "Depth profile, prompt 1, hole 0", "Sliding mask, prompt 1",
                    "Entropy and KL to the final layer"):
        assert heading in page
    with pytest.raises(ValueError, match="for causal LMs"):
        compute_report(bert, "The cat sat.", target="dog", versus="cat")
    with pytest.raises(ValueError, match="sites, norm and lens do not apply"):
        compute_report(bert, "The cat sat.", norm="cached")


def test_masked_topk_figure_is_the_holes_top_tokens(bert):
    from tl_logitlens.plotting.masked import masked_topk_figure

    res = tl.masked_lens(bert, "The dog ran to the park.", mask_positions="park", top_k=4)
    fig = masked_topk_figure(res)
    hm = fig.data[0]
    assert list(hm.y) == list(res.labels) and list(hm.x) == ["top 1", "top 2", "top 3", "top 4"]
    assert_close(torch.tensor(hm.z, dtype=torch.float64), res.top_logprobs[:, 0, 0].exp().double(), atol=1e-6, rtol=0)
    names = [[visible_token(display_tokens(bert.tokenizer, [int(i)])[0]) for i in row] for row in res.top_ids[:, 0, 0]]
    assert [list(r) for r in hm.text] == names
    position = int(res.mask_positions[0, 0])
    assert fig.layout.title.text == f"Masked lens, prompt 0: the hole at position {position} (was park)"


def test_masked_topk_figure_shows_markup_like_tokens_as_text(bert):
    """A token such as RoBERTa's "</s>" is data: escaped, so plotly draws it instead of reading a tag."""
    import dataclasses

    from tl_logitlens.plotting.masked import masked_topk_figure

    class Angled:
        def convert_ids_to_tokens(self, ids):
            return [f"<t{i}>" for i in ids]

    res = tl.masked_lens(bert, "The dog ran to the park.", mask_positions="park", top_k=2)
    fig = masked_topk_figure(dataclasses.replace(res, tokenizer=Angled()))
    first = int(res.top_ids[0, 0, 0, 0])
    assert fig.data[0].text[0][0] == f"&lt;t{first}&gt;"
    assert f"(was &lt;t{int(res.original_ids[0, 0])}&gt;)" in fig.layout.title.text
    assert "<t" not in fig.layout.title.text


def test_masked_report_renders_and_fits(driver, masked_report):
    driver.get(masked_report.resolve().as_uri())
    rendered = _rendered(driver, 9)
    assert len(rendered) == 9  # per prompt: masked lens, depth profile, sliding mask, sliding profiles; entropy/KL
    for name, svgs, drawn in rendered:
        assert svgs >= 1 and drawn >= 1, f"figure {name} did not render ({svgs} svg, {drawn} drawn)"
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    _assert_fits(driver)


def test_report_closes_with_a_corpus_evaluation_section(driver, ln_model, tmp_path):
    ev = tl.evaluate_lenses(ln_model, SENTENCES, progress=False, n_bootstrap=50)
    path = report(ln_model, SENTENCES[0], out=tmp_path / "eval.html", top_k=3, evaluation=ev)
    html = path.read_text(encoding="utf-8")
    assert html.count('class="lens-evaluation"') == 1 and "Lens evaluation over a corpus" in html
    frame = ev.to_dataframe()
    assert f"{frame['kl_to_final'].iloc[0]:.4f}" in html  # the table holds the evaluation's numbers
    driver.get(path.resolve().as_uri())
    rendered = _rendered(driver, 5)
    assert len(rendered) == 5  # the four lens figures and the evaluation's curves
    assert all(svgs >= 1 and drawn >= 1 for _, svgs, drawn in rendered)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    _assert_fits(driver)
    with pytest.raises(TypeError, match="evaluation must be a LensEvaluation"):
        report(ln_model, SENTENCES[0], out=tmp_path / "bad.html", evaluation={"kl": 1.0})


# the demo report, as `tl-logitlens demo` writes it: what each section shows, read in the browser
_DEMO_PAGE = """
const text = e => e ? e.textContent.trim() : null;
const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
const heading = p => text(p.closest('figure').previousElementSibling);
const howto = document.querySelector('.howto'), howtoH2 = howto.querySelector('h2');
const num = document.querySelector('td.num'), code = document.querySelector('td code');
return {
    h2: Array.from(document.querySelectorAll('h2')).map(text),
    h3: Array.from(document.querySelectorAll('h3')).map(text),
    figures: plots.map(p => [heading(p), p.data.map(t => t.type), p.data.map(t => t.z && t.z[0] ? t.z[0].length : 0)]),
    howto_gap: howtoH2.getBoundingClientRect().top - howto.getBoundingClientRect().top,
    font: [getComputedStyle(code).fontSize, getComputedStyle(num).fontSize],
    comparison: Array.from(document.querySelectorAll('#lens-comparison table tr'))
        .map(tr => Array.from(tr.children).map(text)),
};
"""


@pytest.mark.slow
def test_demo_report_shows_lens_difference_and_heads_in_the_browser(driver, tmp_path, monkeypatch, capsys):
    """``tl-logitlens demo``'s report, drawn in Chromium: the logit lens (heatmap and text view on the
    same positions), the logit difference ' happy' − ' sad' and the heads that write it, the three
    lenses side by side (logit, tuned, Jacobian: heatmaps and the per-site table), and the
    details a reader sees: no gap above "How to read this", tokens in tables as large as the numbers."""
    from tl_logitlens.cli.commands import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo.html"]) == 0
    capsys.readouterr()
    driver.get((tmp_path / "demo.html").resolve().as_uri())
    rendered = _rendered(driver, 10)  # nine of the logit lens, one of the three lenses
    assert len(rendered) == 10 and all(svgs >= 1 and drawn >= 1 for _, svgs, drawn in rendered), rendered
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    _assert_fits(driver)
    page = driver.execute_script(_DEMO_PAGE)
    assert page["h2"][:3] == ["How to read this", "Prompts and tokens", "Figures"]
    headings = [h for h, _, _ in page["figures"]]
    for section in (
        "Logit lens, prompt 0",
        "Text view, prompt 0",
        "The final layer's top tokens across layers (prompt 0, after '…dog. The dog was very')",
        "Targets across layers",
        "Logit difference",
        "Direct logit attribution by component",
        "Direct logit attribution by head",
    ):
        assert section in headings, (section, headings)
    assert "Prompt 0, after '…dog. The dog was very'" in page["h3"]
    # the three lenses side by side: one heatmap per lens on the block outputs, and the per-site table
    assert "Lenses side by side: logit lens, tuned lens, Jacobian lens" in page["h2"]
    types = {h: t for h, t, _ in page["figures"]}
    assert types["3 lenses on prompt 0"] == ["heatmap"] * 3
    table = page["comparison"]
    assert table[0] == ["site", "logit lens", "tuned lens", "Jacobian lens"]
    assert table[1] == ["KL (nats)", "top-1 agreement"] * 3
    assert [row[0] for row in table[2:]] == ["0_post", "1_post", "2_post", "final_post"]
    assert table[-1][1:] == ["0.000", "100.0%"] * 3  # at final_post every lens is the model
    # the heatmap and the text view show the same positions (columns of their cells)
    columns = {h: n for h, _, n in page["figures"]}
    assert columns["Logit lens, prompt 0"][0] == columns["Text view, prompt 0"][-1]
    # no empty band above the box's heading; table tokens the size of the numbers beside them
    assert page["howto_gap"] < 20, page["howto_gap"]
    assert page["font"][0] == page["font"][1], page["font"]
    png = driver.get_screenshot_as_png()
    (tmp_path / "demo.png").write_bytes(png)
    driver.get("about:blank")
    _, _, mean, var = driver.execute_async_script(_PIXEL_STATS, base64.b64encode(png).decode())
    assert 100 < mean < 254.5 and var > 100, (mean, var)
