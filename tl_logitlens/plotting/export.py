"""Save figures for papers and pages: PNG, SVG, PDF through kaleido, self-contained HTML."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

IMAGE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp")
_NO_BROWSER = (
    "static export needs a Chromium-based browser for kaleido: install one (Debian/Ubuntu: "
    "'apt-get install chromium'), or point kaleido at an existing one with the BROWSER_PATH "
    "environment variable, or run 'plotly_get_chrome'"
)


def _format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt != "html" and fmt not in IMAGE_FORMATS:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix; use one of "
            f"{['.html'] + ['.' + f for f in IMAGE_FORMATS]}"
        )
    return fmt


def save_figure(fig: go.Figure, path: str | os.PathLike, *, scale: float | int = 2.0) -> Path:
    """Write ``fig`` to ``path``; the format follows the suffix.

    ``.html`` is self-contained (plotly.js inlined, opens offline). ``.png``, ``.svg``, ``.pdf``,
    ``.jpg``, ``.webp`` are rendered by kaleido in a headless Chromium at the figure's own width
    and height; ``scale`` multiplies the pixel size of raster formats.
    """
    return save_figures([fig], [path], scale=scale)[0]


def save_figures(
    figs: Sequence[go.Figure], paths: Sequence[str | os.PathLike], *, scale: float | int = 2.0
) -> list[Path]:
    """Write each figure to its path (see :func:`save_figure`); images share one browser start."""
    if len(figs) != len(paths):
        raise ValueError(f"got {len(figs)} figures but {len(paths)} paths; give one path per figure")
    out = [Path(p) for p in paths]
    formats = [_format(p) for p in out]
    for p in out:
        if not p.parent.is_dir():
            raise FileNotFoundError(f"the folder {str(p.parent)!r} does not exist; create it first")
    for p in out:
        p.unlink(missing_ok=True)  # so a stale file cannot pass for a fresh one
    images = [(f, p, fmt) for f, p, fmt in zip(figs, out, formats) if fmt != "html"]
    for f, p, fmt in zip(figs, out, formats):
        if fmt == "html":
            f.write_html(p, include_plotlyjs=True, full_html=True)
    if images:
        import plotly.io as pio

        try:
            from kaleido.errors import ChromeNotFoundError
        except ImportError as err:
            raise RuntimeError("static export needs kaleido>=1: pip install 'kaleido>=1'") from err
        try:
            pio.write_images(
                [f for f, _, _ in images],
                [p for _, p, _ in images],
                format=[fmt for _, _, fmt in images],
                width=[f.layout.width for f, _, _ in images],
                height=[f.layout.height for f, _, _ in images],
                scale=scale,
            )
        except ChromeNotFoundError as err:
            raise RuntimeError(_NO_BROWSER) from err
        except RuntimeError as err:
            if "chrome" in str(err).lower():
                raise RuntimeError(_NO_BROWSER) from err
            raise
        # kaleido reports a figure plotly.js could not draw by logging it, not raising: check
        missing = [str(p) for _, p, _ in images if not p.is_file()]
        if missing:
            raise RuntimeError(f"kaleido did not write {missing}: plotly.js could not render those figures")
    return out


def show(fig: go.Figure, *, png: bool = True, scale: float | int = 1.0) -> None:
    """Display ``fig`` in a notebook as one output holding the interactive figure *and* a PNG of it.

    Jupyter and VS Code draw the interactive plotly figure; GitHub, nbconvert and the docs site,
    which cannot run plotly.js, show the PNG (rendered by kaleido, as :func:`save_figure`). With
    ``png=False``, or where kaleido cannot find a browser, only the interactive figure is kept.
    """
    from IPython.display import display

    bundle = {"application/vnd.plotly.v1+json": fig.to_plotly_json(), "text/plain": "<plotly figure>"}
    if png:
        try:
            bundle["image/png"] = fig.to_image(
                format="png", width=fig.layout.width, height=fig.layout.height, scale=scale
            )
        except Exception as err:  # no browser for kaleido: the interactive figure alone
            import warnings

            warnings.warn(f"no PNG for this figure ({err}); showing the interactive figure only", stacklevel=2)
    display(bundle, raw=True)


def figure_div(fig: go.Figure, div_id: str) -> str:
    """``fig`` as an HTML ``<div>`` (and the script that draws it) for a page that loads plotly.js once."""
    import plotly.io as pio

    return pio.to_html(
        fig, full_html=False, include_plotlyjs=False, div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def plotly_js_source() -> str:
    """The minified plotly.js that this plotly draws with (about 5 MB of text)."""
    import plotly.offline

    return plotly.offline.get_plotlyjs()


def plotly_js_version() -> str:
    """The version of :func:`plotly_js_source` (as in ``cdn.plot.ly/plotly-<version>.min.js``)."""
    import plotly.offline

    return plotly.offline.get_plotlyjs_version()
