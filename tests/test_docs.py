"""The documentation site builds with ``mkdocs build --strict`` and documents every public name.

Needs the ``docs`` extra (``pip install -e ".[docs]"``; CI installs it). Without mkdocs the test is
skipped with that reason, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tl_logitlens
import tl_logitlens.plotting

ROOT = Path(__file__).resolve().parent.parent


def _need_mkdocs() -> None:
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers", "mkdocs_jupyter") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"the docs extra is not installed (missing {missing}): pip install -e '.[docs]'"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _need_mkdocs()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_docs_build_strict_documents_every_public_name(site):
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("index.html"))
    anchors = set(re.findall(r'id="(tl_logitlens\.[A-Za-z_.]+)"', pages))
    public = [f"tl_logitlens.{n}" for n in tl_logitlens.__all__]
    public += [f"tl_logitlens.plotting.{n}" for n in tl_logitlens.plotting.__all__]
    missing = [n for n in public if n not in anchors]
    assert not missing, f"public names without an API entry: {missing}"


@pytest.mark.slow
def test_docs_site_has_the_tutorials_with_their_figures_and_the_readme(site):
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        page = (site / "tutorials" / nb.stem / "index.html").read_text(encoding="utf-8")
        assert "<img" in page and "data:image/png;base64," in page, f"{nb.name}: no PNG figure on its page"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "{{ README }}" not in home and "Quickstart" in home
    # hooks and extensions are build code, not pages
    assert not list(site.rglob("*.py"))


@pytest.mark.slow
def test_plot_methods_list_the_options_they_pass_on(site):
    """``LensResult.plot(**kwargs)``'s entry lists lens_heatmap's options (docs/griffe_plot_options.py)."""
    page = (site / "api" / "predictions" / "index.html").read_text(encoding="utf-8")
    entry = page.split('id="tl_logitlens.LensResult.plot"')[1].split('id="tl_logitlens.LensResult.')[0]
    for option in ("color", "max_positions", "zmin", "zmax", "target"):
        assert f"<code>{option}</code>" in entry, option


@pytest.mark.slow
def test_the_home_page_points_at_the_tutorials_and_the_api_reference(site):
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="tutorials/01_logit_lens_basics/"' in home and 'href="api/models/"' in home
    assert "mkdocs serve" not in home.split("Documentation:")[1][:400]  # the GitHub-only part is gone


def _docs_hooks():
    """docs/hooks.py as a module; it imports mkdocs, so without the docs extra the test skips (fails under CI)."""
    _need_mkdocs()
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return hooks


def test_navigation_labels_are_words():
    """"Tuned lens: training", not "lenses · tuned_train": every API page has a title in words."""
    pages = _docs_hooks()._api_pages()
    titles = [title for title, _ in pages.values()]
    assert "Tuned lens: training" in titles and "Logit lens" in titles
    for title in titles:
        assert re.fullmatch(r"[A-Z][A-Za-z -]*(: [a-z][A-Za-z -]*)?", title), title
    assert len(set(titles)) == len(titles)


def test_readme_links_the_docs_entry_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/index.md)" in readme
    assert (ROOT / "docs" / "index.md").is_file() and (ROOT / "mkdocs.yml").is_file()
