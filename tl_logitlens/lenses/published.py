"""Published lenses: the field's fitted J-lenses and trained tuned lenses, by name, pinned, cached,
offline-safe.

Two sources, both on the Hugging Face hub and both listed in this package's own registry
(``registry.json`` beside this module), every entry pinned to one hub commit:

- ``"jlens:NAME"``: Neuronpedia's fitted Jacobian lenses in the model repo ``neuronpedia/jacobian-lens``
  (one ``.pt`` file each, the reference format), every entry of TransformerLens 4.3's own registry;
- ``"tuned:NAME"``: tuned-lens's trained lenses in the Space ``AlignmentResearch/tuned-lens``
  (``lens/NAME/config.json`` and ``lens/NAME/params.pt``, tuned-lens 0.2.0's format).

``NAME`` is the registry's short name, the model's hub id or one of its aliases (``"jlens:gpt2"``,
``"jlens:openai-community/gpt2"``, ``"tuned:EleutherAI/pythia-70m-deduped"``); ``"jlens"`` or
``"tuned"`` alone looks the model up by its own name. Files go through ``huggingface_hub`` into its
cache: a cached file at the pinned commit is read without touching the network (``HF_HUB_OFFLINE=1``
works), a missing one while offline is a ``ValueError`` naming the file and the ``hf download`` command
that fetches it. Before a file is read its size and checksum are checked against what is known
offline: the registry's size and sha256 where it records them, and the hub cache's own content
address (a file's blob is named by its LFS sha256, or by its git blob sha1 for small files), so a
truncated or corrupt file in the cache is refused, not loaded.

``TL_LOGITLENS_LENS_REGISTRY`` may name a JSON file in the registry's format whose entries are added to
(or replace, by key) the packaged ones: a private mirror, a lens of your own, the tests' entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_PATH = Path(__file__).resolve().with_name("registry.json")
REGISTRY_ENV = "TL_LOGITLENS_LENS_REGISTRY"
REGISTRY_FORMAT_VERSION = 1
KINDS = {"jlens": "Jacobian lens", "tuned": "tuned lens"}
_REPO_TYPES = ("model", "dataset", "space")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 24
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class PublishedFile:
    """One file of a published lens: its path in the repo and, where known, its exact size (bytes) and
    sha256 at the entry's pinned revision; ``approx_size`` is a rounded size for listings."""

    path: str
    size: int | None = None
    sha256: str | None = None
    approx_size: str | None = None


@dataclass(frozen=True)
class PublishedLens:
    """A registry entry: which lens (``kind``, ``name``), which model it was made for (``model``, its hub
    id, and ``aliases``), and where its files are (``repo_id``, ``repo_type``, ``revision``, ``files``).

    Example:
        >>> entry = tl.published_lenses("jlens")[0]          # doctest: +SKIP
        >>> entry.key, entry.model, entry.fetch_command()    # doctest: +SKIP
    """

    kind: str
    name: str
    model: str
    aliases: tuple[str, ...]
    repo_id: str
    repo_type: str
    revision: str
    files: tuple[PublishedFile, ...]
    corpus: str | None = None

    @property
    def key(self) -> str:
        """``"kind:name"``, what ``load_lens`` and ``--lens`` take."""
        return f"{self.kind}:{self.name}"

    def names(self) -> tuple[str, ...]:
        """Every name this entry answers to: its short name, its model's hub id, the aliases."""
        return tuple(dict.fromkeys((self.name, self.model, *self.aliases)))

    def fetch_command(self, cache_dir: str | os.PathLike | None = None) -> str:
        """The one ``hf download`` command that puts this entry's files into the cache."""
        parts = ["hf", "download", self.repo_id, *(f.path for f in self.files)]
        if self.repo_type != "model":
            parts += ["--repo-type", self.repo_type]
        parts += ["--revision", self.revision]
        if cache_dir is not None:
            parts += ["--cache-dir", os.fspath(cache_dir)]
        return " ".join(parts)

    def at_revision(self, revision: str) -> PublishedLens:
        """The same files at another revision (their recorded sizes and checksums are the pinned
        revision's, so they are dropped)."""
        if revision == self.revision:
            return self
        files = tuple(PublishedFile(f.path) for f in self.files)
        return dataclasses.replace(self, revision=revision, files=files)

    def record(self) -> dict[str, Any]:
        """Plain values for a lens's metadata (``meta["published"]``)."""
        return {
            "key": self.key,
            "model": self.model,
            "aliases": list(self.aliases),
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "files": [f.path for f in self.files],
            "corpus": self.corpus,
        }


def _entry(raw: Any, where: str) -> PublishedLens:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a registry entry is a JSON object, not {type(raw).__name__}")
    kind, name = raw.get("kind"), raw.get("name")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind is {kind!r}; a registry entry's kind is one of {sorted(KINDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: an entry needs a non-empty string name")
    where = f"{where} ({kind}:{name})"
    model = raw.get("model", name)
    aliases = raw.get("aliases", [])
    repo_id, repo_type, revision = raw.get("repo_id"), raw.get("repo_type", "model"), raw.get("revision")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: model must be the model's hub id (a string)")
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ValueError(f"{where}: aliases must be a list of names")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"{where}: repo_id must be 'owner/name', not {repo_id!r}")
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"{where}: repo_type must be one of {list(_REPO_TYPES)}, not {repo_type!r}")
    if not isinstance(revision, str) or not _COMMIT.match(revision):
        raise ValueError(f"{where}: revision must pin a commit (40 hex digits), not {revision!r}")
    files_raw = raw.get("files")
    if not isinstance(files_raw, list) or not files_raw:
        raise ValueError(f"{where}: files must be a non-empty list of {{'path': ...}}")
    files = []
    for f in files_raw:
        if (
            not isinstance(f, dict)
            or not isinstance(f.get("path"), str)
            or not f["path"]
            or f["path"].startswith("/")
        ):
            raise ValueError(f"{where}: every file needs a relative 'path' in the repo")
        size, sha = f.get("size"), f.get("sha256")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"{where}: {f['path']}: size must be a byte count")
        if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
            raise ValueError(f"{where}: {f['path']}: sha256 must be 64 lowercase hex digits")
        approx = f.get("approx_size")
        files.append(PublishedFile(f["path"], size, sha, approx if isinstance(approx, str) else None))
    if kind == "jlens" and len(files) != 1:
        raise ValueError(f"{where}: a J-lens entry has one file (the .pt)")
    if kind == "tuned" and sorted(Path(f.path).name for f in files) != ["config.json", "params.pt"]:
        raise ValueError(f"{where}: a tuned-lens entry has two files, .../config.json and .../params.pt")
    if kind == "tuned" and len({str(Path(f.path).parent) for f in files}) != 1:
        raise ValueError(f"{where}: a tuned lens's config.json and params.pt must sit in one folder")
    corpus = raw.get("corpus")
    return PublishedLens(
        kind,
        name,
        model,
        tuple(aliases),
        repo_id,
        repo_type,
        revision,
        tuple(files),
        corpus if isinstance(corpus, str) else None,
    )


def read_registry(path: str | os.PathLike) -> tuple[PublishedLens, ...]:
    """The entries of a registry file (``registry.json``'s format).

    Raises:
        ValueError: not a registry (not JSON, another format version, a malformed entry, a key twice).
    """
    from tl_logitlens.lenses.files import read_json_object

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"no lens registry at {str(path)!r} (set by {REGISTRY_ENV}?); give a JSON file in registry.json's format"
        )
    data = read_json_object(path)
    if data.get("format_version") != REGISTRY_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version is {data.get('format_version')!r}; this version reads {REGISTRY_FORMAT_VERSION}"
        )
    raw = data.get("lenses")
    if not isinstance(raw, list):
        raise ValueError(f"{path}: 'lenses' must be a list of entries")
    entries = [_entry(e, f"{path} entry {i}") for i, e in enumerate(raw)]
    seen: set[str] = set()
    for e in entries:
        if e.key in seen:
            raise ValueError(f"{path}: {e.key} is listed twice")
        seen.add(e.key)
    return tuple(entries)


def published_lenses(kind: str | None = None) -> list[PublishedLens]:
    """The published lenses ``load_lens`` resolves by name: the packaged registry, plus the entries of
    the file ``TL_LOGITLENS_LENS_REGISTRY`` names (they replace packaged ones of the same key).

    Args:
        kind: ``"jlens"`` or ``"tuned"`` for one kind; None for both.

    Returns:
        The entries, in the registry's order.

    Raises:
        ValueError: an unknown ``kind``; a malformed registry file.

    Example:
        >>> [e.key for e in tl.published_lenses("tuned")][:2]
        ['tuned:gpt2', 'tuned:gpt2-large']
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)} or None, not {kind!r}")
    entries = {e.key: e for e in read_registry(REGISTRY_PATH)}
    extra = os.environ.get(REGISTRY_ENV)
    if extra:
        entries.update({e.key: e for e in read_registry(extra)})
    return [e for e in entries.values() if kind is None or e.kind == kind]


def _norm(name: str) -> str:
    return name.strip().lower()


def _last(name: str) -> str:
    return _norm(name).rstrip("/").rsplit("/", 1)[-1]


def parse_spec(spec: str) -> tuple[str, str] | None:
    """``("jlens", "gpt2")`` for ``"jlens:gpt2"``, ``("tuned", "")`` for ``"tuned"``; None when ``spec``
    names no published lens."""
    kind, sep, name = spec.partition(":")
    if kind in KINDS and (sep or not name):
        return kind, name.strip()
    return None


def model_names(model: Any) -> list[str]:
    """The names a model goes by: TransformerLens's ``cfg.model_name`` and the Hugging Face model's
    ``name_or_path`` where the model wraps one (a bridge)."""
    names = [str(getattr(getattr(model, "cfg", None), "model_name", "") or "")]
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    hf_name = str(getattr(hf_config, "_name_or_path", "") or "")
    if _HUB_ID.match(hf_name) and not Path(hf_name).exists():  # a hub id, not the folder it was read from
        names.append(hf_name)
    return [n for n in dict.fromkeys(names) if n]


def model_revision(model: Any) -> str | None:
    """The hub commit the model's weights came from, where the model records it (a bridge's Hugging
    Face config); None otherwise."""
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    revision = getattr(hf_config, "_commit_hash", None)
    return revision if isinstance(revision, str) and _COMMIT.match(revision) else None


def _matches(entry: PublishedLens, name: str) -> int:
    """How well ``name`` names ``entry``: 3 its short name, 2 its model or an alias, 1 the last part of
    one of those (``"pythia-70m-deduped"`` for ``"EleutherAI/pythia-70m-deduped"``), 0 not at all."""
    if name == entry.name:
        return 3
    if name in entry.names():
        return 2
    n = _norm(name)
    if n in {_norm(x) for x in entry.names()}:
        return 2
    if _last(name) in {_last(x) for x in entry.names()}:
        return 1
    return 0


def resolve(
    spec: str,
    model: Any = None,
    *,
    revision: str | None = None,
    entries: Sequence[PublishedLens] | None = None,
) -> PublishedLens:
    """The registry entry ``spec`` (``"jlens:NAME"``, ``"tuned:NAME"``, or ``"jlens"``/``"tuned"`` with
    the model's own name) names, at ``revision`` (default: the entry's pinned commit).

    Raises:
        ValueError: ``spec`` names no published lens, or several equally well (the message lists them
            and says where the full list is).
    """
    parsed = parse_spec(spec)
    if parsed is None:
        raise ValueError(f"{spec!r} is not a published lens name; write 'jlens:NAME' or 'tuned:NAME'")
    kind, name = parsed
    pool = [e for e in (published_lenses() if entries is None else entries) if e.kind == kind]
    wanted = [name] if name else (model_names(model) if model is not None else [])
    if not wanted:
        raise ValueError(
            f"{spec!r} names no model and the model has no name to look up; write '{kind}:NAME' "
            f"(`tl-logitlens lenses` lists them)"
        )
    for candidate in wanted:
        scored = [(s, e) for e in pool if (s := _matches(e, candidate))]
        if not scored:
            continue
        best = max(s for s, _ in scored)
        hits = [e for s, e in scored if s == best]
        if len(hits) > 1:
            exact = [e for e in hits if e.name == e.model]  # the default lens of a model with variants
            if len(exact) == 1:
                hits = exact
        if len(hits) > 1:
            raise ValueError(
                f"{candidate!r} names several published {KINDS[kind]}es: "
                f"{', '.join(e.key for e in hits)}; pass one of those"
            )
        entry = hits[0]
        return entry.at_revision(revision) if revision is not None else entry
    close = [
        e.key
        for e in pool
        if any(_last(w)[:4] and _last(w)[:4] in _norm(x) for w in wanted for x in e.names())
    ]
    hint = f" (close: {', '.join(close[:6])})" if close else ""
    raise ValueError(
        f"no published {KINDS[kind]} for {', '.join(map(repr, wanted))}{hint}; `tl-logitlens lenses` lists "
        f"the {len(pool)} there are, or load one from the hub with repo_id= and filename="
    )


def explicit(
    kind: str, repo_id: str, filename: str, *, repo_type: str | None = None, revision: str | None = None
) -> PublishedLens:
    """An entry for a file the registry does not list: ``filename`` in ``repo_id`` (for a tuned lens,
    its ``config.json`` or ``params.pt``, or their folder: both are fetched).

    Raises:
        ValueError: an unknown ``kind``, a malformed ``repo_id`` or ``filename``.
    """
    if kind not in KINDS:
        raise ValueError(
            f"with repo_id= the first argument says the lens's kind: 'jlens' or 'tuned', not {kind!r}"
        )
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be a hub repo 'owner/name', not {repo_id!r}")
    if not isinstance(filename, str) or not filename.strip("/"):
        raise ValueError(f"with repo_id= pass filename=, the lens's path in the repo, not {filename!r}")
    repo_type = repo_type or "model"
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type must be one of {list(_REPO_TYPES)}, not {repo_type!r}")
    filename = filename.strip("/")
    if kind == "tuned":
        folder = (
            str(Path(filename).parent) if Path(filename).name in ("config.json", "params.pt") else filename
        )
        prefix = "" if folder in ("", ".") else folder + "/"
        files = (PublishedFile(f"{prefix}config.json"), PublishedFile(f"{prefix}params.pt"))
    else:
        files = (PublishedFile(filename),)
    # the model it was made for is unknown: only its shapes are checked
    return PublishedLens(kind, f"{repo_id}/{filename}", "", (), repo_id, repo_type, revision or "main", files)


def _hub() -> Any:
    import huggingface_hub

    return huggingface_hub


def _cache_dir() -> str:
    return str(_hub().constants.HF_HUB_CACHE)


def _offline() -> bool:
    return bool(_hub().constants.HF_HUB_OFFLINE)


def cached_files(entry: PublishedLens) -> dict[str, Path] | None:
    """The entry's files in the Hugging Face cache at its revision, or None when any is missing
    (nothing is downloaded, checked or printed)."""
    out = {}
    for f in entry.files:
        path = _hub().try_to_load_from_cache(
            entry.repo_id, f.path, revision=entry.revision, repo_type=entry.repo_type
        )
        if not isinstance(path, str):
            return None
        out[f.path] = Path(path)
    return out


def download(entry: PublishedLens) -> dict[str, Path]:
    """The entry's files, from the Hugging Face cache or downloaded into it (``hf_hub_download``: a
    file cached at a pinned commit is returned without a network call; a download shows its progress
    bar). Nothing is checked here; :func:`verify` does that.

    Raises:
        ValueError: offline (``HF_HUB_OFFLINE=1`` or no network) and not cached: the message names the
            file and the ``hf download`` command that fetches it; the hub has no such repo, revision or
            file; any other hub error (the message names the file).
    """
    hub = _hub()
    errors = hub.errors
    out = {}
    for f in entry.files:
        what = f"{f.path} of {entry.repo_id} ({'space ' if entry.repo_type == 'space' else ''}revision {entry.revision[:12]})"
        try:
            path = hub.hf_hub_download(
                entry.repo_id, f.path, repo_type=entry.repo_type, revision=entry.revision
            )
        except errors.LocalEntryNotFoundError as err:
            reason = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
            raise ValueError(
                f"the {entry.key} lens needs {what}, which is not in the Hugging Face cache ({_cache_dir()}) and "
                f"{reason}; fetch it once with a network: {entry.fetch_command()}"
            ) from err
        except errors.GatedRepoError as err:
            raise ValueError(
                f"{entry.repo_id} is gated: accept its terms on the hub and log in (hf auth login) to fetch {what}"
            ) from err
        except errors.RepositoryNotFoundError as err:
            raise ValueError(
                f"the hub has no repo {entry.repo_id!r} ({entry.repo_type}) for {entry.key}"
            ) from err
        except errors.RevisionNotFoundError as err:
            raise ValueError(
                f"{entry.repo_id} has no revision {entry.revision!r}; pass an existing commit, branch or tag as revision="
            ) from err
        except errors.EntryNotFoundError as err:
            raise ValueError(
                f"{entry.repo_id} has no file {f.path} at revision {entry.revision[:12]}; check filename= (or revision=)"
            ) from err
        except (errors.HfHubHTTPError, OSError) as err:
            raise ValueError(
                f"fetching {what} failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); try again, or fetch it with: {entry.fetch_command()}"
            ) from err
        out[f.path] = Path(path)
    return out


def _git_blob_sha1(path: Path, size: int) -> str:
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _damaged(entry: PublishedLens, f: PublishedFile, path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path} ({f.path} of {entry.repo_id}) is damaged or incomplete: {what}; it is not loaded. "
        f"Fetch it again: {entry.fetch_command()} --force-download"
    )


def verify(entry: PublishedLens, paths: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """Check each file against what is known of it before it is read, and return what was checked
    (``{path: {"size": ..., "sha256" or "git_sha1": ..., "checked": [...]}}``).

    Known offline: the registry's size and sha256 (at the pinned revision), and the hub cache's own
    content address: ``hf_hub_download`` stores a file as ``blobs/<etag>``, the etag being the file's
    LFS sha256 (64 hex digits) or, for a small file kept in git, its git blob sha1 (40). A file whose
    blob is not so named (a cache without symlinks copies files) is checked by the registry's values
    only, and where it records none, by nothing: ``"checked": []`` says so. ``"checked"`` lists
    ``"sha256"``/``"git_sha1"`` (the hub's checksum) and ``"registry size"``/``"registry sha256"``.

    Raises:
        ValueError: a size or checksum differs (a truncated or corrupt download; the message names the
            file and the command that fetches it again), or a file whole by the hub's checksum differs
            from the registry's record (the message says the record is wrong and how to load the file by
            location instead).
    """
    out = {}
    for f in entry.files:
        path = Path(paths[f.path])
        blob = path.resolve()
        size = blob.stat().st_size
        checked: list[str] = []
        info: dict[str, Any] = {"size": size}

        etag = blob.name if blob.parent.name == "blobs" else ""
        actual = None
        if _SHA256.match(etag):  # the hub's own checksum: the LFS sha256 the blob is named by
            actual = _sha256(blob)
            if actual != etag:
                raise _damaged(
                    entry, f, path, f"sha256 {actual[:16]}…, not the hub's {etag[:16]}… ({size} bytes)"
                )
            info["sha256"] = actual
            checked.append("sha256")
        elif _COMMIT.match(etag):  # a small file kept in git: its git blob sha1
            sha1 = _git_blob_sha1(blob, size)
            if sha1 != etag:
                raise _damaged(
                    entry, f, path, f"git blob sha1 {sha1[:12]}…, not the hub's {etag[:12]}… ({size} bytes)"
                )
            info["git_sha1"] = sha1
            checked.append("git_sha1")
        wrong = []
        if f.size is not None:
            if size != f.size:
                wrong.append(f"{size} bytes, but the registry records {f.size}")
            checked.append("registry size")
        if f.sha256 is not None:
            actual = actual or _sha256(blob)
            if actual != f.sha256:
                wrong.append(f"sha256 {actual[:16]}…, but the registry records {f.sha256[:16]}…")
            checked.append("registry sha256")
        if wrong and checked[0] in ("sha256", "git_sha1"):
            # whole by the hub's own checksum, yet not what the registry records: the record is wrong
            raise ValueError(
                f"{path} ({f.path} of {entry.repo_id}) matches the hub's checksum but not this package's registry "
                f"({'; '.join(wrong)}): the registry's record for {entry.key} is wrong, please report it. To use "
                f"the hub's file, load it by location: tl.load_lens({entry.kind!r}, model, repo_id="
                f"{entry.repo_id!r}, filename={f.path!r}, revision={entry.revision!r}"
                + (", repo_type='space')" if entry.repo_type == "space" else ")")
            )
        if wrong:
            raise _damaged(entry, f, path, "; ".join(wrong))
        info["checked"] = checked
        out[f.path] = info
    return out


def fetch(entry: PublishedLens) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """:func:`download` then :func:`verify`: the entry's local files, each checked, and what was checked."""
    paths = download(entry)
    return paths, verify(entry, paths)


def check_published_for(model: Any, record: Mapping[str, Any], kind: str) -> None:
    """Raise ``ValueError`` when ``model`` is not the model a published lens was made for: its name is
    none of the entry's names (short name, hub id, aliases; compared case-insensitively, by the last
    part of a hub id), or both record a hub revision and they differ. A model without a name, or a
    lens from a file the registry does not list (no model recorded), is checked by its shapes only.

    ``record`` is the lens's ``meta["published"]``; ``kind`` names the lens in the message.
    """
    names = [
        n for n in (record.get("model"), *record.get("aliases", ()), *record.get("file_model_names", ())) if n
    ]
    mine = model_names(model)
    if names and mine and not {_last(n) for n in names} & {_last(n) for n in mine}:
        raise ValueError(
            f"this {kind} ({record.get('key')}) was published for {record.get('model')!r}, but this model is "
            f"{mine[0]!r}: a lens reads only the residual stream of the model it was made for. Load it onto "
            f"that model (tl.load_model({record.get('model')!r})); if this model is those weights under another "
            "name, pass check_fingerprint=False"
        )
    wanted, actual = record.get("model_revision"), model_revision(model)
    if wanted and actual and wanted != actual:
        raise ValueError(
            f"this {kind} ({record.get('key')}) was made for revision {wanted[:12]} of {record.get('model')!r}, but "
            f"this model is revision {actual[:12]}; load that revision (revision= when loading the model), or "
            "pass check_fingerprint=False if the weights did not change"
        )
