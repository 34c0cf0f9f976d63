"""Helpers every figure shares: visible token labels, the house style, colour scales, picking columns.

**Signed values: blue is positive, red is negative.** Every figure of a signed quantity (direct logit
attribution heatmaps and head grids, head × source, the component lens, attribution bars, the
terminal's logit-difference bars) draws positive values in blue (:data:`POSITIVE_COLOUR`) and
negative values in red (:data:`NEGATIVE_COLOUR`), on one diverging scale (:data:`DIVERGING`, ColorBrewer's
RdBu: white at zero, symmetric about it, so equal magnitudes get equal depth). For a logit difference
``logit(target) − logit(versus)`` positive means *towards the target*: blue raises the target over the
comparison token, red lowers it. Captions, colour bars and hover text say it in those words
(:func:`sign_note`), and ``tests/test_plotting.py`` checks each figure's scale against its caption.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from tl_logitlens.core.results import LensStatistics, ResultBase
from tl_logitlens.core.tokens import visible_token
from tl_logitlens.lenses import LOGIT_LENS

# plotly draws text as a small subset of HTML: '<b>' makes bold, '\n' breaks the line, '&amp;' is an
# entity. Tokens are data, not markup, so these characters are escaped, and whitespace and control
# characters are drawn with the package's one convention (tokens.visible_token: "␣", "↵", "⇥", "\xNN").
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def cell_text(token: str) -> str:
    """A token as plotly should show it: :func:`~tl_logitlens.core.tokens.visible_token` (whitespace drawn,
    control characters, which SVG cannot hold, as ``\\xNN``), then ``& < >`` escaped.

    Plotly turns the entities back into the characters on screen, so what is drawn is the token
    itself; the escaping only stops ``"<b>"`` being read as markup.
    """
    return "".join(_ESCAPES.get(ch, ch) for ch in visible_token(token))


CELL_CHARS = 12  # the most characters a heatmap cell shows; longer tokens end in "…" (hover has them whole)


def clip(text: str, n: int = CELL_CHARS) -> str:
    """``text`` cut to ``n`` visible characters with a trailing ``…`` (entities count as one)."""
    parts = re.findall(r"&[a-z]+;|.", text, flags=re.S)
    return text if len(parts) <= n else "".join(parts[: n - 1]) + "…"


def quoted(token: str) -> str:
    """A token in quotes for hover text and titles (whitespace drawn as in :func:`cell_text`)."""
    return "'" + cell_text(token) + "'"


def after_quote(result: ResultBase, prompt: int, column: int) -> str:
    """The text up to read-position ``column`` of ``prompt`` in quotes, for titles: ``'…The dog was
    very'`` (:func:`~tl_logitlens.core.tokens.text_before`: spaces as spaces, special tokens left out),
    markup escaped."""
    from tl_logitlens.core.tokens import text_before

    text = text_before(result, prompt, int(result.positions[prompt, column]))
    return "'" + "".join(_ESCAPES.get(ch, ch) for ch in text) + "'"


def check_index(name: str, value: object, n: int) -> int:
    """``value`` as an index into ``n`` items (negative counts from the end), checked: an int in ``[-n, n)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int index, not {type(value).__name__}")
    if not -n <= value < n:
        raise ValueError(f"{name}={value} is out of range: the result holds {n} {name}(s)")
    return value % n


def check_prompt(result: ResultBase, prompt: int) -> int:
    """The prompt index, checked against the result's batch."""
    return check_index("prompt", prompt, result.top_ids.shape[1])


def valid_columns(result: ResultBase, prompt: int) -> list[int]:
    """The read-position columns of one prompt that hold real tokens, in order."""
    return [j for j, ok in enumerate(result.valid[prompt].tolist()) if ok]


def column_at(result: ResultBase, prompt: int, position: int) -> int:
    """The column of ``result`` that read token ``position`` of ``prompt`` (``-1``: its last token).

    Negative positions count back from the prompt's own last real token, as in ``logit_lens``.
    """
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int, not {type(position).__name__}")
    length = len(result.str_tokens[prompt])
    pos = position + length if position < 0 else position
    cols = [j for j in valid_columns(result, prompt) if int(result.positions[prompt, j]) == pos]
    if not cols:
        read = [int(result.positions[prompt, j]) for j in valid_columns(result, prompt)]
        raise ValueError(
            f"position {position} of prompt {prompt} was not read by this result (it read positions "
            f"{read}); run logit_lens with positions=None or include that position"
        )
    return cols[0]


def target_index(result: LensStatistics, target: str | int, prompt: int | None = None) -> int:
    """Which of the result's targets ``target`` names: a token string (as displayed) or a token id."""
    if result.target_ids is None:
        raise ValueError(
            f"target={target!r} was given but this result has no targets; pass targets=[...] to logit_lens"
        )
    rows = range(result.target_ids.shape[0]) if prompt is None else [prompt]
    names = target_names(result)
    for t in range(result.target_ids.shape[-1]):
        ids = {int(result.target_ids[b, j, t]) for b in rows for j in valid_columns(result, b)}
        if isinstance(target, int) and not isinstance(target, bool) and ids == {target}:
            return t
        if isinstance(target, str) and names[t] == target:
            return t
    raise ValueError(f"target {target!r} is not one of this result's targets {names}; pick one of those")


def target_names(result: LensStatistics) -> list[str]:
    """A readable name per target: the token when every row shares it, else ``target <t>``."""
    from tl_logitlens.core.tokens import display_tokens

    if result.target_ids is None:
        return []
    names = []
    for t in range(result.target_ids.shape[-1]):
        ids = result.target_ids[..., t][result.valid]
        unique = torch.unique(ids).tolist()
        if len(unique) == 1:
            names.append(display_tokens(result.tokenizer, unique)[0])
        else:
            names.append(f"target {t}")
    return names


def as_list(values: torch.Tensor) -> list:
    """A tensor as nested Python lists of floats, NaN as ``None`` (a gap, for plotly)."""
    flat = values.detach().cpu().double()
    return _nan_to_none(flat.tolist())


def _nan_to_none(x: object) -> object:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x



def band_trace(x: list, low: list, high: list, colour: str, name: str, group: str) -> go.Scatter:
    """A filled band between ``low`` and ``high`` along ``x`` (a confidence interval), hover off."""
    return go.Scatter(
        x=x + x[::-1],
        y=high + low[::-1],
        mode="lines",
        fill="toself",
        fillcolor=colour,
        opacity=0.2,
        line={"width": 0},
        name=name,
        legendgroup=group,
        hoverinfo="skip",
    )


def line_trace(
    x: list, y: list, colour: str, name: str, group: str, *, hover: str | None = None, opacity: float | None = None
) -> go.Scatter:
    """One line of a line chart, hovering as ``hover`` (default ``name``) and the value. With
    ``opacity`` a thin, faint line left out of the legend (one prompt's values); without, a bold
    line with markers (their mean)."""
    faint = opacity is not None
    return go.Scatter(
        x=x,
        y=y,
        mode="lines" if faint else "lines+markers",
        line={"color": colour, "width": 1 if faint else 3},
        opacity=opacity,
        name=name,
        legendgroup=group,
        showlegend=False if faint else None,
        hovertemplate=f"{hover or name}<br>%{{y:.4g}}<extra></extra>",
    )


# ---------------------------------------------------------------------------------------------------
# House style: one template, one font, titles that wrap instead of running off the figure.

FONT = "Inter, 'Helvetica Neue', Helvetica, Arial, sans-serif"
MONO = "'DejaVu Sans Mono', Menlo, Consolas, monospace"
# unsigned series (groups, lenses, sites): no blue and no red, which the house keeps for sign
# (POSITIVE_COLOUR, NEGATIVE_COLOUR below), so two series never read as "positive" and "negative"
PALETTE = ("#2ca02c", "#ff7f0e", "#9467bd", "#e377c2", "#7f7f7f", "#bcbd22", "#8c6d31", "#444444")
LINE_CHART = {"width": 780, "height": 460, "legend_below": True}  # the size of every line chart across layers
MIN_BAND_N = 3  # fewer prompts than this: no confidence band is drawn (it would say nothing)
_TITLE_PX = 9.0  # average width of a title character at 16 px
_SUB_PX = 6.6  # ... of a <sup> subtitle character
_MODEBAR_PX = 22  # the mode bar's row at the top of a figure (its buttons are 23 px tall from 2 px down)


def _plain_length(text: str) -> int:
    return len(re.sub(r"<[^>]+>", "", re.sub(r"&[a-z]+;", "x", text)))


def wrap_title(title: str, width: int) -> list[str]:
    """``title``'s lines (split at ``<br>``), each wrapped at spaces to fit ``width`` pixels."""
    lines = []
    for part in title.split("<br>"):
        sub = part.startswith("<sup>")
        inner = part[5:-6] if sub and part.endswith("</sup>") else part
        limit = max(20, int((width - 60) / (_SUB_PX if sub else _TITLE_PX)))
        words, line = inner.split(" "), ""
        for word in words:
            if line and _plain_length(line) + 1 + _plain_length(word) > limit:
                lines.append(f"<sup>{line}</sup>" if sub else line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(f"<sup>{line}</sup>" if sub else line)
    return lines


def house_style(fig: go.Figure, *, title: str, width: int, height: int, legend_below: bool = False) -> go.Figure:
    """The look every figure here shares: white template, one font, a left-aligned wrapped title.

    The title wraps to the figure's ``width`` (so nothing is cut at the export size) and the top
    margin and height grow by one line per extra title line. The title starts below the row of the
    mode bar (plotly's buttons at the top right, shown on hover), which would otherwise lie over a
    long title in a narrow figure.
    """
    lines = wrap_title(title, width)
    extra = 22 * (len(lines) - 1) + _MODEBAR_PX
    fig.update_layout(
        template="plotly_white",
        font={"family": FONT, "size": 13, "color": "#222"},
        title={
            "text": "<br>".join(lines),
            "x": 0.0,
            "xanchor": "left",
            "xref": "paper",
            "y": 1.0,
            "yanchor": "bottom",
            "yref": "container",
            "pad": {"t": 12},
            "font": {"size": 16},
        },
        width=width,
        height=height + extra,
        margin={"t": 70 + extra, "l": 80, "r": 30, "b": 70},
        hoverlabel={"font": {"family": FONT}},
    )
    # the title sits in the top margin, under the mode bar's row: anchor it from the container top
    fig.update_layout(title={"y": 1 - (12 + _MODEBAR_PX) / (height + extra), "yanchor": "top"})
    if legend_below:
        fig.update_layout(legend={"orientation": "h", "x": 0.0, "y": -0.22, "yanchor": "top"})
    return fig


def pair_name(result: object, k: int, *, short: bool = False) -> str:
    """A readable name of pair ``k`` of a logit-difference result, whitespace visible.

    Built from ``correct_ids``/``incorrect_ids`` and the tokenizer: ``'␣play' − '␣happy'`` when every
    prompt shares the pair; with per-prompt pairs, the distinct pairs (up to three). Results with
    no ids (directions) use their ``pair_labels``. ``short=True`` (for legends) names per-prompt
    pairs ``pair k`` instead of listing them.
    """
    from tl_logitlens.core.tokens import display_tokens

    c_ids = getattr(result, "correct_ids", None)
    tokenizer = getattr(result, "tokenizer", None)
    if c_ids is None or tokenizer is None:
        return cell_text(result.pair_labels[k])
    i_ids = getattr(result, "incorrect_ids", None)
    rows = []
    for b in range(c_ids.shape[0]):
        c = int(c_ids[b, k])
        i = None if i_ids is None else int(i_ids[b, k])
        if (c, i) not in rows:
            rows.append((c, i))

    def one(c: int, i: int | None) -> str:
        text = quoted(display_tokens(tokenizer, [c])[0])
        return text if i is None else f"{text} − {quoted(display_tokens(tokenizer, [i])[0])}"

    if len(rows) == 1:
        return one(*rows[0])
    if short:
        return f"pair {k}"
    shown = ", ".join(one(c, i) for c, i in rows[:3]) + (", …" if len(rows) > 3 else "")
    what = "correct" if i_ids is None else "correct − incorrect"
    return f"{what} per prompt ({shown})"


# ---------------------------------------------------------------------------------------------------
# Signed values: one diverging convention (see the module docstring).

POSITIVE_COLOUR = "#2166ac"  # blue: positive, raises the value (towards the target)
NEGATIVE_COLOUR = "#b2182b"  # red: negative, lowers it (towards the comparison token)
POSITIVE_NAME, NEGATIVE_NAME = "blue", "red"  # the words captions use for them
# ColorBrewer RdBu (plotly.colors.diverging.RdBu), red at the low end, blue at the high end
DIVERGING: tuple[tuple[float, str], ...] = (
    (0.0, "rgb(103,0,31)"), (0.1, "rgb(178,24,43)"), (0.2, "rgb(214,96,77)"), (0.3, "rgb(244,165,130)"),
    (0.4, "rgb(253,219,199)"), (0.5, "rgb(247,247,247)"), (0.6, "rgb(209,229,240)"), (0.7, "rgb(146,197,222)"),
    (0.8, "rgb(67,147,195)"), (0.9, "rgb(33,102,172)"), (1.0, "rgb(5,48,97)"),
)


def signed_colour(value: float | None) -> str:
    """A bar's colour for ``value``: :data:`POSITIVE_COLOUR` from zero up, :data:`NEGATIVE_COLOUR` below."""
    return POSITIVE_COLOUR if (value or 0.0) >= 0 else NEGATIVE_COLOUR


def sign_note(positive: str = "raises the value", negative: str = "lowers it") -> str:
    """The caption's sentence for the colour convention: ``"blue is positive (…), red negative (…)"``."""
    return f"{POSITIVE_NAME} is positive ({positive}), {NEGATIVE_NAME} negative ({negative})"


def sign_words(result: Any, pair: int, prompt: int | None = None) -> tuple[str, str]:
    """What a positive and a negative value of ``pair`` mean, in words: ``("towards '␣happy'",
    "towards '␣sad'")`` for a logit difference every prompt shares (or for one ``prompt``'s own
    pair), else in general terms. Takes an attribution (``metric``) or a direction result (``kind``)."""
    from tl_logitlens.core.tokens import display_tokens

    def one(ids: torch.Tensor | None) -> str | None:
        if ids is None or result.tokenizer is None:
            return None
        rows = ids[:, pair] if prompt is None else ids[prompt : prompt + 1, pair]
        unique = torch.unique(rows).tolist()
        return quoted(display_tokens(result.tokenizer, unique)[0]) if len(unique) == 1 else None

    metric = getattr(result, "metric", None) or getattr(result, "kind", None)
    if metric not in ("logit_diff", "logit"):
        return "along the direction", "against it"
    correct, incorrect = one(result.correct_ids), one(result.incorrect_ids)
    if metric == "logit_diff":
        return (
            f"towards {correct or 'the correct token'}",
            f"towards {incorrect or 'the incorrect token'}",
        )
    return f"raises the logit of {correct or 'the token'}", "lowers it"


def signed_bound(values: torch.Tensor) -> float:
    """The symmetric colour range ``±bound`` of ``values``: their largest finite magnitude (1 if none)."""
    finite = values.detach()[torch.isfinite(values.detach())]
    bound = float(finite.abs().max()) if finite.numel() else 0.0
    return bound or 1.0


# ---------------------------------------------------------------------------------------------------
# Colour scales: adaptive to the cells shown, linear or log, the range overridable.

SCALES = ("linear", "log")


@dataclass(frozen=True)
class ColourScale:
    """What a heatmap draws: ``z`` (the values, or their ``log10``), its range and colour-bar ticks."""

    z: torch.Tensor
    zmin: float
    zmax: float
    log: bool
    tickvals: list[float] | None
    ticktext: list[str] | None


def colour_bar(title: str, drawn: ColourScale | None = None) -> dict:
    """A colour bar titled ``title`` on its right; on a log scale (``drawn.log``) its ticks are
    labelled in the values (1, 10, 100), not their ``log10``."""
    bar: dict = {"title": {"text": title, "side": "right"}}
    if drawn is not None and drawn.log:
        bar.update(tickvals=drawn.tickvals, ticktext=drawn.ticktext)
    return bar


def _number(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:g}"
    return f"{v:.10f}".rstrip("0")


MAX_LOG_TICKS = 13  # decades and half-decades up to ~6 decades (1 .. 1e6); decades only beyond


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Tick positions (``log10``) and labels (the values) between ``lo`` and ``hi``.

    Every decade and half-decade (1, 3, 10, 30, 100, ...: a rank of 25 sits between labelled
    ticks), as long as that is at most :data:`MAX_LOG_TICKS` ticks; decades only over wider ranges.
    """
    lo_e, hi_e = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)

    def inside(steps: tuple[int, ...]) -> list[float]:
        values = [m * 10.0**e for e in range(lo_e, hi_e + 1) for m in steps]
        return [v for v in values if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]

    ticks = inside((1, 3))
    if len(ticks) > MAX_LOG_TICKS:
        ticks = inside((1,))
    return [math.log10(v) for v in ticks], [_number(v) for v in ticks]


def colour_scale(
    values: torch.Tensor,
    *,
    scale: str,
    zmin: float | None,
    zmax: float | None,
    floor: float | None = None,
    lower: float | None = None,
    log_decades: float = 4.0,
) -> ColourScale:
    """The colour range of ``values`` (NaN: no cell), adapted to the finite values shown.

    ``scale="linear"``: from ``zmin`` (default: ``lower`` if given, else the smallest value) to
    ``zmax`` (default: the largest value). ``scale="log"``: ``log10`` of the values, from ``zmin``
    (default: ``floor`` if given, else the smallest positive value but at most ``log_decades``
    decades below the largest) to ``zmax``; values below the range are drawn at its bottom.
    ``zmin``/``zmax`` are in the values' own units in both cases.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {list(SCALES)}")
    for name, v in (("zmin", zmin), ("zmax", zmax)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise TypeError(f"{name} must be a finite number or None, got {v!r}")
    vals = values.detach().cpu().double()
    finite = vals[torch.isfinite(vals)]
    if scale == "linear":
        lo = zmin if zmin is not None else lower if lower is not None else float(finite.min()) if finite.numel() else 0.0
        hi = zmax if zmax is not None else float(finite.max()) if finite.numel() else lo + 1.0
        if hi <= lo:
            hi = lo + (abs(lo) * 1e-3 or 1e-3)
        return ColourScale(vals, float(lo), float(hi), False, None, None)
    positive = finite[finite > 0]
    if zmin is not None and zmin <= 0 or zmax is not None and zmax <= 0:
        raise ValueError(f"scale='log' needs positive zmin/zmax, got zmin={zmin!r}, zmax={zmax!r}")
    if zmax is None and positive.numel() == 0:
        raise ValueError("scale='log' needs positive values, and none of the cells shown is positive; use scale='linear'")
    hi = zmax if zmax is not None else float(positive.max())
    if zmin is not None:
        lo = zmin
    elif floor is not None:
        lo = floor
    else:
        lo = max(float(positive.min()) if positive.numel() else hi, hi * 10.0 ** (-log_decades))
    if hi <= lo:
        hi = lo * 10.0
    z = torch.where(torch.isfinite(vals), vals.clamp(min=lo).log10(), vals)
    tickvals, ticktext = log_ticks(lo, hi)
    return ColourScale(z, math.log10(lo), math.log10(hi), True, tickvals, ticktext)


def lens_note(result: Any) -> str:
    """``" · tuned lens"`` for a result made with another lens than the logit lens, else ``""``: default
    titles name the lens whenever it is not the logit lens."""
    return "" if result.lens_name == LOGIT_LENS.name else f" · {result.lens_name}"
