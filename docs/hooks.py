"""MkDocs hooks: the API pages come from ``__all__``, the tutorial pages from ``tutorials/*.ipynb``, the
guides from ``docs/*.md`` and the home page from README.md, so no page list is kept by hand.

- API: every public name in ``tl_logitlens.__all__`` (and ``tl_logitlens.plotting.__all__``) goes on
  the page of the module that defines it, as a ``::: tl_logitlens.<name>`` mkdocstrings entry.
- Tutorials: each committed (executed) notebook is added as a page; mkdocs-jupyter renders it
  without running it again (its PNG outputs show without JavaScript).
- Home: ``docs/index.md`` is the docs' entry page on GitHub (how to build the site, what it holds);
  on the site its ``<!-- github -->`` part is dropped and the README takes its place, with its links
  made to point inside the site (notebooks) or at the repository (other files), and its line about
  the docs site saying where the tutorials and the API reference are.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


# the API pages' titles, in words, and their order in the navigation: what a reader looks for first.
# A module not listed here (a new one) gets its own name in words ("lenses.jacobian" → "Lenses: jacobian"),
# after these; tests/test_docs.py checks every title is words.
TITLES = {
    "models": "Loading models",
    "inputs": "Inputs and batches",
    "tokens": "Tokens",
    "predictions": "Logit lens",
    "directions": "Logit difference and directions",
    "tl_logitlens": "Norm views",
    "attribution": "Direct logit attribution",
    "masked": "Masked-LM lens",
    "profile": "Depth profiles",
    "lenses.protocol": "Lenses: the protocol",
    "lenses.tuned": "Tuned lens",
    "lenses.tuned_training": "Tuned lens: training",
    "lenses.jacobian": "Jacobian lens",
    "lenses.jacobian_fitting": "Jacobian lens: fitting",
    "lenses.loading": "Lenses: loading from files",
    "lenses.published": "Lenses: published on the hub",
    "lens_comparison": "Comparing lenses",
    "evaluate": "Evaluating lenses on a corpus",
    "steering": "Lens directions and steering",
    "decode": "Decoding vectors",
    "interventions": "Steering: placebos and sweeps",
    "faithfulness": "Faithfulness",
    "corpus": "Demo texts",
    "reporting": "HTML report",
    "plotting": "Figures",
}


def _page_title(short: str) -> str:
    """``short`` (a module path below the package) as its navigation title, in words."""
    if short in TITLES:
        return TITLES[short]
    words = short.replace("_", " ").replace(".", ": ")
    return words[:1].upper() + words[1:]


def _api_pages() -> dict[str, tuple[str, list[str]]]:
    """``{page path: (title, [qualified names])}``, one page per defining module, in the order of
    :data:`TITLES` (then any other module by name), names in ``__all__`` order."""
    pages: dict[str, tuple[str, list[str]]] = {}
    for package in ("tl_logitlens", "tl_logitlens.plotting"):
        mod = importlib.import_module(package)
        for name in mod.__all__:
            obj = getattr(mod, name)
            home = getattr(obj, "__module__", None)
            if not isinstance(home, str) or not home.startswith("tl_logitlens") or package.endswith("plotting"):
                home = package  # constants and the plotting package: one page for their package
            short = home.removeprefix("tl_logitlens.").lstrip("_") or "tl_logitlens"
            # core/ and analyses/ are the floors, not what a reader looks up: "analyses.predictions" → "predictions"
            short = short.removeprefix("core.").removeprefix("analyses.")
            path = f"api/{short.replace('.', '_')}.md"
            pages.setdefault(path, (_page_title(short), []))[1].append(f"{package}.{name}")
    order = [f"api/{short.replace('.', '_')}.md" for short in TITLES]

    def rank(path: str) -> tuple[int, str]:
        return (order.index(path), path) if path in order else (len(order), path)

    return {path: pages[path] for path in sorted(pages, key=rank)}


def _title(nb: Path) -> str:
    """The notebook's own title, its first markdown heading up to a colon ("5 · Tuned lens"), so the
    nav says what the tutorial says (file names lose capitals: "masked lm")."""
    for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            first = "".join(cell["source"]).strip().splitlines()[0]
            if first.startswith("# "):
                return first[2:].split(":")[0].strip()
            break
    return nb.stem


# the guides that come first in the navigation, in reading order; every other docs/*.md page follows,
# by file name, so a new page is on the site without being listed anywhere
GUIDE_ORDER = (
    "lenses", "published-lenses", "jspace", "intervening", "faithfulness", "patchscopes", "token-sets",
    "lens-files", "reliability", "evaluation", "models", "half-precision", "devices", "exactness", "how-it-works",
    "performance", "benchmarks",
)


def _guide_pages() -> dict[str, str]:
    """``{page: title}`` for every ``docs/*.md`` but the home page, the title its first ``# `` heading."""
    pages = [p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"]

    def rank(p: Path) -> tuple[int, str]:
        return (GUIDE_ORDER.index(p.stem), p.name) if p.stem in GUIDE_ORDER else (len(GUIDE_ORDER), p.name)

    out = {}
    for page in sorted(pages, key=rank):
        heading = next((line[2:].strip() for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("# ")), "")
        out[page.name] = heading or page.stem.replace("-", " ").capitalize()
    return out


def on_config(config):
    api = _api_pages()
    config["nav"] = [
        {"Home": "index.md"},
        {"Guides": [{title: page} for page, title in _guide_pages().items()]},
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

    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, text)
    # the README's pointer to this site, read on the site itself: where things are
    first_tutorial = f"tutorials/{TUTORIALS[0].name}" if TUTORIALS else "index.md"
    first_api = next(iter(_api_pages()), "index.md")
    here = (
        f"**Documentation:** this site: the [tutorials]({first_tutorial}) (executed, every figure shown) and "
        f"the [API reference]({first_api}) (every public name, one page per module) are in the navigation."
    )
    return re.sub(r"^\*\*Documentation:\*\*.*?(?=\n\n)", here, text, count=1, flags=re.S | re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md":
        markdown = re.sub(r"<!-- github -->.*?<!-- /github -->\n?", "", markdown, flags=re.S)
        return re.sub(r"<!-- On the site,.*?\{\{ README \}\} -->", lambda _: _readme_for_site(), markdown, flags=re.S)
    return markdown
