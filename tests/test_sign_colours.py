"""Colours that match their words: every figure of a signed quantity draws positive values in the colour
its caption names for "positive", and negative values in the other.

The colour a value gets is read from the figure itself (the heatmap's colour scale at that value,
interpolated between its stops as plotly does, or the bar's own colour) and named by its hue; the
caption's claim is read from its text ("blue is positive ..., red negative ..."). The report once said
"red pushes towards the target" over a heatmap whose positive cells were blue.
"""

from __future__ import annotations

import html
import re

import pytest

import tl_logitlens as tl
from tests.helpers import SENTENCES
from tl_logitlens.plotting import (
    component_bars_figure,
    component_lens_figure,
    head_grid_figure,
    head_source_figure,
    logit_diff_figure,
)
from tl_logitlens.plotting.style import DIVERGING, NEGATIVE_COLOUR, POSITIVE_COLOUR

CORRECT, INCORRECT = " the", " and"


def _rgb(colour: str) -> tuple[float, float, float]:
    if colour.startswith("#"):
        return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    return tuple(float(v) for v in re.findall(r"[\d.]+", colour)[:3])  # type: ignore[return-value]


def _hue(colour: str) -> str:
    """'blue', 'red' or 'neither' (greys, white), by which of the two channels clearly dominates."""
    r, _, b = _rgb(colour)
    return "blue" if b > r + 10 else "red" if r > b + 10 else "neither"


def _scale_colour(scale, frac: float) -> tuple[float, float, float]:
    """The colour at ``frac`` in [0, 1] of a plotly colour scale, linearly between its stops."""
    stops = [(float(p), _rgb(c)) for p, c in scale]
    for (p0, c0), (p1, c1) in zip(stops, stops[1:]):
        if p0 <= frac <= p1:
            t = 0.0 if p1 == p0 else (frac - p0) / (p1 - p0)
            return tuple(a + t * (b - a) for a, b in zip(c0, c1))  # type: ignore[return-value]
    raise AssertionError(f"{frac} is outside the colour scale")


def _drawn(heatmap, value: float) -> str:
    """The hue the heatmap draws ``value`` in."""
    frac = (value - heatmap.zmin) / (heatmap.zmax - heatmap.zmin)
    r, g, b = _scale_colour(heatmap.colorscale, min(1.0, max(0.0, frac)))
    return _hue(f"rgb({r},{g},{b})")


def _claim(text: str) -> tuple[str, str]:
    """The colours the caption names for positive and for negative values."""
    plain = html.unescape(re.sub(r"<[^>]+>", " ", text))
    pos = re.search(r"\b(blue|red)\b is positive", plain)
    neg = re.search(r"\b(blue|red)\b negative", plain)
    assert pos and neg, f"the caption states no colour for the sign: {plain!r}"
    return pos.group(1), neg.group(1)


def _values(heatmap) -> list[float]:
    return [v for row in heatmap.z for v in row if v is not None]


def _check_heatmap(fig, caption: str) -> None:
    """Every cell of at least a tenth of the scale's range is drawn in its sign's named colour (smaller
    ones are near white, whose hue says nothing), and so are the two ends of the scale."""
    (hm,) = [t for t in fig.data if t.type == "heatmap"]
    values = _values(hm)
    assert max(values) > 0 > min(values), "the test needs both signs drawn"
    positive, negative = _claim(caption)
    assert hm.zmin == pytest.approx(-hm.zmax)  # symmetric: equal magnitudes, equal depth
    assert (_drawn(hm, hm.zmax), _drawn(hm, hm.zmin)) == (positive, negative), caption
    visible = [v for v in values if abs(v) >= 0.1 * hm.zmax]
    assert visible
    assert all(_drawn(hm, v) == (positive if v > 0 else negative) for v in visible), caption
    assert _drawn(hm, 0.0) == "neither"  # zero is white


@pytest.fixture(scope="module")
def head_dla(ln_model):
    return tl.direct_logit_attribution(ln_model, SENTENCES[:3], CORRECT, INCORRECT, unit="head_source")


def test_the_convention_itself():
    assert _hue(POSITIVE_COLOUR) == "blue" and _hue(NEGATIVE_COLOUR) == "red"
    assert _hue(DIVERGING[-1][1]) == "blue" and _hue(DIVERGING[0][1]) == "red"


def test_head_grid_caption_and_hover_match_its_colours(head_dla):
    fig = head_grid_figure(head_dla)
    _check_heatmap(fig, fig.layout.title.text)
    (hm,) = fig.data
    # hover text reads the sign in the same words: a positive cell is "towards '␣the'"
    cells = [(v, h) for zrow, hrow in zip(hm.z, hm.hovertext) for v, h in zip(zrow, hrow) if v]
    assert all(("towards '␣the'" in h) == (v > 0) for v, h in cells)
    assert all(("towards '␣and'" in h) == (v < 0) for v, h in cells)


def test_head_source_caption_matches_its_colours(head_dla):
    fig = head_source_figure(head_dla, prompt=1)
    _check_heatmap(fig, fig.layout.title.text)


def test_component_lens_caption_matches_its_colours(ln_model):
    fig = component_lens_figure(tl.component_lens(ln_model, SENTENCES[:2], top_k=3))
    _check_heatmap(fig, fig.layout.title.text)


@pytest.mark.parametrize("unit", ["component", "head", "neuron"], ids=["component", "head", "neuron"])
def test_attribution_bars_caption_matches_their_colours(ln_model, unit):
    res = tl.direct_logit_attribution(ln_model, SENTENCES[:3], CORRECT, INCORRECT, unit=unit)
    fig = component_bars_figure(res, n_grid=4)
    (bars,) = fig.data
    positive, negative = _claim(fig.layout.title.text)
    drawn = list(zip(bars.y[:-1], bars.marker.color[:-1]))  # the last bar is the model's total, grey
    assert any(v > 0 for v, _ in drawn) and any(v < 0 for v, _ in drawn)
    assert all(_hue(c) == (positive if v >= 0 else negative) for v, c in drawn)
    assert _hue(bars.marker.color[-1]) == "neither"


def test_logit_difference_figure_says_which_side_is_which(ln_model):
    fig = logit_diff_figure(tl.logit_diff(ln_model, SENTENCES[:3], CORRECT, INCORRECT))
    assert "above 0: towards '␣the'; below 0: towards '␣and'" in fig.layout.title.text


def test_report_captions_match_the_figures_they_describe(ln_model):
    """The report's own captions (HTML under each figure) make the same claim the figure draws."""
    from tl_logitlens.reporting import compute_report
    from tl_logitlens.reporting.figures import figures

    data = compute_report(ln_model, SENTENCES[:3], target=CORRECT, versus=INCORRECT)
    signed = {f.heading: f for f in figures(data, [0]) if "attribution" in f.heading.lower()}
    assert set(signed) == {"Direct logit attribution by component", "Direct logit attribution by head"}
    head = signed["Direct logit attribution by head"]
    _check_heatmap(head.fig, head.caption)
    assert "towards '␣the'" in html.unescape(head.caption)
    bars = signed["Direct logit attribution by component"]
    positive, negative = _claim(bars.caption)
    (trace,) = bars.fig.data
    assert all(_hue(c) == (positive if v >= 0 else negative) for v, c in zip(trace.y[:-1], trace.marker.color[:-1]))


def test_terminal_logit_difference_bars_show_the_sign_by_side_and_colour():
    from tl_logitlens.cli.terminal import NEGATIVE, POSITIVE, _signed_bar

    up, down = _signed_bar(0.5, 1.0, 10), _signed_bar(-0.5, 1.0, 10)
    for bar in (up, down):
        assert bar.plain.index("│") == 10 and len(bar.plain) == 21
    assert up.plain == " " * 10 + "│" + "█" * 5 + " " * 5  # right of the axis
    assert down.plain == " " * 5 + "█" * 5 + "│" + " " * 10  # left of it

    def style_of_blocks(bar):
        return {str(span.style) for span in bar.spans if "█" in bar.plain[span.start : span.end]}

    assert style_of_blocks(up) == {POSITIVE} and style_of_blocks(down) == {NEGATIVE}
    assert (POSITIVE, NEGATIVE) == ("blue", "red")
    assert _signed_bar(0.0, 1.0, 10).plain.strip() == "│"
