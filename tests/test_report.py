"""The HTML report: self-contained, and every figure renders in a headless Chromium without errors."""

from __future__ import annotations

import base64
import time

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SENTENCES, assert_close, require_browser
from tl_logitlens.reporting import compute_report, concat_lens, report, top_table_html

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
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


@pytest.fixture(scope="module")
def full_report(ln_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    path = report(ln_model, SENTENCES, target=" the", versus=" and", out=out)
    return path


def test_report_is_one_self_contained_file(full_report):
    page = full_report.read_text(encoding="utf-8")
    assert "<script src" not in page and "http://" not in page.split("<script", 1)[0]
    assert page.count("plotly.js v") >= 1  # the library's banner, inlined once
    assert page.count("Plotly.newPlot") == 10
    assert "<table>" in page and "top tokens per layer" in page.lower()


def test_report_renders_every_figure_without_console_errors(driver, full_report, tmp_path):
    driver.get(full_report.resolve().as_uri())
    rendered = _rendered(driver, 10)
    assert len(rendered) == 10  # 3 lens heatmaps, text view, evolution, 2 trajectories, diff, 2 DLA
    for name, svgs, drawn in rendered:
        assert svgs >= 1 and drawn >= 1, f"figure {name} did not render ({svgs} svg, {drawn} drawn)"
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    png = driver.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    driver.get("about:blank")
    width, height, mean, var = driver.execute_async_script(_PIXEL_STATS, base64.b64encode(png).decode())
    assert (width, height) == (1400, 1000) or width * height > 500_000
    assert 100 < mean < 254.5, f"the screenshot is blank or black (mean grey {mean:.1f})"
    assert var > 100, f"the screenshot is nearly uniform (variance {var:.1f})"


def test_report_without_target_has_the_lens_figures_only(driver, ln_model, tmp_path):
    path = report(ln_model, SENTENCES[0], out=tmp_path / "one.html", top_k=3)
    driver.get(path.resolve().as_uri())
    rendered = _rendered(driver, 3)
    assert len(rendered) == 3  # lens heatmap, text view, evolution
    assert all(svgs >= 1 and drawn >= 1 for _, svgs, drawn in rendered)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_batched_results_join_to_the_one_batch_result(ln_model):
    whole = tl.logit_lens(ln_model, SENTENCES, targets=[" the"])
    parts = concat_lens(
        [tl.logit_lens(ln_model, SENTENCES[:2], targets=[" the"]), tl.logit_lens(ln_model, SENTENCES[2:], targets=[" the"])]
    )
    for name in (
        "top_ids", "top_logprobs", "entropy", "kl_to_final", "next_ids", "next_logprobs", "next_ranks",
        "target_ids", "target_logprobs", "target_ranks", "valid",
    ):
        a, b = getattr(whole, name), getattr(parts, name)
        assert a.shape == b.shape, name
        assert_close(b.double(), a.double(), atol=1e-6, rtol=0, msg=name)
    assert torch.equal(whole.positions[whole.valid], parts.positions[parts.valid])
    assert whole.str_tokens == parts.str_tokens


def test_compute_report_batches_call_progress_and_match_one_call(ln_model):
    calls = []
    data = compute_report(ln_model, SENTENCES, target=" the", batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    whole = tl.logit_lens(ln_model, SENTENCES, targets=[" the"])
    assert_close(data.lens.target_logprobs, whole.target_logprobs, atol=1e-6, rtol=0)
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
        assert repr(top[s][1][col][0]).replace("'", "&#x27;") in table
    assert table.count("<tr>") == len(lens.labels) + 1


def test_report_errors(ln_model, tmp_path):
    with pytest.raises(ValueError, match="needs a target token too"):
        report(ln_model, SENTENCES[0], versus=" and", out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="not a single token"):
        report(ln_model, SENTENCES[0], target=" elephantine", out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="ending in .html"):
        report(ln_model, SENTENCES[0], out=tmp_path / "r.pdf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report(ln_model, SENTENCES[0], out=tmp_path / "missing" / "r.html")
    with pytest.raises(ValueError, match="no prompts were given"):
        report(ln_model, [], out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="is empty"):
        report(ln_model, "  ", out=tmp_path / "r.html")
