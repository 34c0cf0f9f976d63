"""MkDocs hooks: the API pages come from ``__all__``, the tutorial pages from ``tutorials/*.ipynb``,
and the home page from README.md, so no page list is kept by hand.

- API: every public name in ``tl_logitlens.__all__`` (and ``tl_logitlens.plotting.__all__``) goes on
  the page of the module that defines it, as a ``::: tl_logitlens.<name>`` mkdocstrings entry.
- Tutorials: each committed (executed) notebook is added as a page; mkdocs-jupyter renders it
  without running it again (its PNG outputs show without JavaScript).
- Home: ``docs/index.md`` holds ``{{ README }}``, replaced by README.md with its links made to
  point inside the site (notebooks) or at the repository (other files).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def _api_pages() -> dict[str, tuple[str, list[str]]]:
    """``{page path: (title, [qualified names])}``, one page per defining module, in ``__all__`` order."""
    pages: dict[str, tuple[str, list[str]]] = {}
    for package in ("tl_logitlens", "tl_logitlens.plotting"):
        mod = importlib.import_module(package)
        for name in mod.__all__:
            obj = getattr(mod, name)
            home = getattr(obj, "__module__", None)
            if not isinstance(home, str) or not home.startswith("tl_logitlens") or package.endswith("plotting"):
                home = package  # constants and the plotting package: one page for their package
            short = home.removeprefix("tl_logitlens.").lstrip("_") or "tl_logitlens"
            path = f"api/{short.replace('.', '_')}.md"
            title = short.replace("_", " ").replace(".", " · ")
            pages.setdefault(path, (title, []))[1].append(f"{package}.{name}")
    return dict(sorted(pages.items()))


def _title(nb: Path) -> str:
    stem = nb.stem
    number, _, rest = stem.partition("_")
    return f"{number} · {rest.replace('_', ' ').capitalize()}" if number.isdigit() else stem


def on_config(config):
    api = _api_pages()
    config["nav"] = [
        {"Home": "index.md"},
        {"Tutorials": [{_title(nb): f"tutorials/{nb.name}"} for nb in TUTORIALS]},
        {"API reference": [{title: path} for path, (title, _) in api.items()]},
    ]
    return config


@event_priority(100)  # before mkdocs-jupyter looks for notebooks among the files
def on_files(files: Files, config) -> Files:
    for path, (title, names) in _api_pages().items():
        body = [f"# {title}", ""]
        for name in names:
            body += [f"::: {name}", ""]
        files.append(File.generated(config, path, content="\n".join(body)))
    for nb in TUTORIALS:
        files.append(
            File(f"tutorials/{nb.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                 use_directory_urls=config["use_directory_urls"])
        )
    return files


def _readme_for_site() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^# .*\n", "", text, count=1)  # the page has its own title

    def link(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+://|#|mailto:", target):
            return match.group(0)
        if target.startswith("tutorials/") and target.endswith(".ipynb"):
            return f"[{label}]({target})"  # a page of this site
        if target.startswith("docs/"):
            return f"[{label}]({target.removeprefix('docs/')})"
        return f"{label} (`{target}` in the repository)"

    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md":
        return markdown.replace("{{ README }}", _readme_for_site())
    return markdown
