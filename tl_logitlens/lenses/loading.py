"""Loading a lens from disk or by a built-in name, whatever its format.

:func:`load_lens` recognises a lens by what the path holds, not by what it is called:

- a folder with ``tuned_lens.safetensors``: this package's tuned lens (:meth:`TunedLens.save`);
- a folder with ``jacobian_lens.safetensors``: this package's Jacobian lens (:meth:`JacobianLens.save`);
- a folder with ``config.json`` + ``params.pt``: a tuned-lens 0.2.0 checkpoint;
- a ``.pt`` file holding ``"J"``: a Jacobian lens in the reference format (``anthropics/jacobian-lens``,
  TransformerLens 4.3), or ``"jacobian_sum"``: a TransformerLens fit checkpoint;
- a built-in name: ``"demo"``, the tuned lens shipped for ``load_model("demo")``, and
  ``"demo-jacobian"``, the Jacobian lens shipped for it (``scripts/fit_demo_jacobian.py``; its card,
  ``demo_models/demo/jacobian_lens/LENS_CARD.md``, gives held-out KL and top-1 agreement of all three);
- a published lens, ``"jlens:NAME"`` or ``"tuned:NAME"``: a file on the Hugging Face hub that this
  package's registry lists (:mod:`tl_logitlens.lenses.published`), fetched through the hub's cache and
  checked (size, checksum) before it is read as above.

Every file is read as data (safetensors, ``torch.load(weights_only=True)``, JSON); every size in it is
checked against the model before anything of that size is built; every lens is checked against the
model before it is returned (:meth:`Lens.check_model`: shapes, and where the file carries one, the
readout fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tl_logitlens.lenses import jacobian, published, tuned
from tl_logitlens.lenses.files import read_torch_file
from tl_logitlens.lenses.fingerprint import readout_fingerprint
from tl_logitlens.lenses.jacobian import JacobianLens
from tl_logitlens.lenses.tuned import TunedLens

_DEMO_MODELS = Path(__file__).resolve().parent.parent / "demo_models"
BUILTIN_LENSES = {
    "demo": _DEMO_MODELS / "demo" / "tuned_lens",
    "demo-jacobian": _DEMO_MODELS / "demo" / "jacobian_lens",
}
# this package's own formats always carry the readout fingerprint; the others never do
_OWN_FORMATS = (tuned.FORMAT, jacobian.FORMAT)


def _check_model_argument(model: Any, spec: str) -> None:
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"load_lens takes the model object, not {os.fspath(model)!r}; load it first: "
            f"model = tl.load_model({os.fspath(model)!r}); tl.load_lens({spec!r}, model)"
        )
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "d_model") or not hasattr(cfg, "n_layers") or not hasattr(model, "W_U"):
        raise TypeError(
            f"load_lens needs a TransformerLens model (from tl.load_model) to check the lens against, not "
            f"{type(model).__name__}"
        )


def _read(path: Path, model: Any) -> TunedLens | JacobianLens:
    """The lens at ``path``, by what it holds (sizes checked against ``model``, nothing else yet)."""
    if path.is_dir():
        if tuned.is_own_folder(path):
            return tuned.read_own(path, model)
        if jacobian.is_own_folder(path):
            return jacobian.read_own(path, model)
        if tuned.is_tuned_lens_folder(path):
            return tuned.read_tuned_lens_format(path, model)
        raise ValueError(
            f"{str(path)!r} holds no lens: expected {tuned.WEIGHTS_FILE} or {jacobian.WEIGHTS_FILE} (this package), "
            f"or {tuned.TUNED_LENS_CONFIG} + {tuned.TUNED_LENS_PARAMS} (tuned-lens 0.2.0)"
        )
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is neither a folder nor a regular file; pass a lens folder or a .pt file")
    if path.name in (tuned.WEIGHTS_FILE, jacobian.WEIGHTS_FILE, tuned.TUNED_LENS_PARAMS, tuned.TUNED_LENS_CONFIG):
        return _read(path.parent, model)  # a file of a lens folder: the folder is the lens
    payload = read_torch_file(path)
    if jacobian.is_reference_payload(payload):
        return jacobian.read_reference(path, model, payload)
    raise ValueError(
        f"{path} is not a lens file this package reads: a .pt file must hold a Jacobian lens ('J', the reference "
        "format, or 'jacobian_sum', a TransformerLens fit checkpoint); a tuned lens is a folder"
    )


def _read_published(entry: published.PublishedLens, model: Any) -> TunedLens | JacobianLens:
    """A published lens: its files fetched (from the cache, or downloaded into it) and checked (size,
    checksum) before they are read; its metadata records where it came from."""
    paths, checks = published.fetch(entry)
    if entry.kind == "jlens":
        lens: TunedLens | JacobianLens = jacobian.read_reference(paths[entry.files[0].path], model)
        file_meta = lens.meta.get("reference_metadata") or {}
    else:
        config = next(f.path for f in entry.files if f.path.endswith(tuned.TUNED_LENS_CONFIG))
        folders = {paths[f.path].parent for f in entry.files}
        if len(folders) != 1:  # a branch that moved between the two downloads: two commits' files
            raise ValueError(
                f"{entry.key}'s config.json and params.pt came from different commits of {entry.repo_id} "
                f"(revision {entry.revision!r} moved while they downloaded); pass revision= a commit hash"
            )
        lens = tuned.read_tuned_lens_format(paths[config].parent, model)
        file_meta = {"model_name": lens.meta.get("model_name"), "model_revision": lens.meta.pop("model_revision", None)}
    record = entry.record()
    file_name = file_meta.get("model_name")
    record["file_model_names"] = [file_name] if isinstance(file_name, str) and file_name else []
    revision = file_meta.get("model_revision")
    record["model_revision"] = revision if isinstance(revision, str) and revision else None
    record["checks"] = checks
    lens.meta["published"] = record
    lens.meta["model_name"] = entry.model or str(lens.meta.get("model_name", ""))
    lens.meta["source"] = f"{entry.key} ({entry.repo_id}@{entry.revision[:12]})"
    return lens


def _resolve(spec: str, model: Any, revision: str | None, repo_id: str | None, filename: str | None,
             repo_type: str | None) -> Path | published.PublishedLens:
    """Where ``spec`` points, in the documented order: a local path, a built-in name, a published name
    (the registry), an explicit hub file (``repo_id=`` + ``filename=``)."""
    hub_args = {"revision": revision, "repo_id": repo_id, "filename": filename, "repo_type": repo_type}
    path = Path(spec).expanduser()
    if spec in BUILTIN_LENSES or path.exists():
        given = [k for k, v in hub_args.items() if v is not None]
        if given:
            raise ValueError(
                f"{spec!r} is a local lens; {', '.join(f'{k}=' for k in given)} go with a lens from the hub "
                "('jlens:NAME', 'tuned:NAME', or repo_id= and filename=)"
            )
        return BUILTIN_LENSES.get(spec, path)
    parsed = published.parse_spec(spec)
    if repo_id is not None or filename is not None:
        if parsed is None or parsed[1]:
            raise ValueError(
                "repo_id= and filename= load a lens the registry does not list; the first argument then says "
                f"only its kind, 'jlens' or 'tuned', not {spec!r}"
            )
        if repo_id is None or filename is None:
            raise ValueError("a lens from the hub by location needs both repo_id= and filename=")
        return published.explicit(parsed[0], repo_id, filename, repo_type=repo_type, revision=revision)
    if repo_type is not None:
        raise ValueError("repo_type= goes with repo_id= and filename=; a registry name knows its repo")
    if parsed is not None:
        return published.resolve(spec, model, revision=revision)
    if revision is not None:
        raise ValueError(f"revision= goes with a lens from the hub ('jlens:NAME', 'tuned:NAME'); {spec!r} is neither")
    raise ValueError(
        f"no lens at {spec!r}: pass a folder saved by TunedLens.save or JacobianLens.save, a tuned-lens "
        f"0.2.0 folder, a Jacobian lens .pt file, a built-in name ({', '.join(sorted(BUILTIN_LENSES))}), or a "
        "published lens, 'jlens:NAME' or 'tuned:NAME' (`tl-logitlens lenses` lists them)"
    )


def load_lens(
    path_or_name: Any,
    model: Any,
    *,
    check_fingerprint: bool = True,
    revision: str | None = None,
    repo_id: str | None = None,
    filename: str | None = None,
    repo_type: str | None = None,
) -> TunedLens | JacobianLens:
    """A lens for ``model``, on the model's device: from a path, a built-in name, or the hub.

    ``path_or_name`` is resolved in this order:

    1. a local path: any lens format (see :mod:`tl_logitlens.lenses.loading`): this package's tuned or
       Jacobian lens folder, a tuned-lens 0.2.0 folder, or a Jacobian lens ``.pt`` in the reference format;
    2. a built-in name: ``"demo"``, the tuned lens shipped for ``load_model("demo")``, and
       ``"demo-jacobian"``, its Jacobian lens;
    3. a published lens in this package's registry (:func:`~tl_logitlens.lenses.published.published_lenses`,
       ``tl-logitlens lenses``): ``"jlens:NAME"``, Neuronpedia's fitted J-lens, or ``"tuned:NAME"``,
       tuned-lens's trained lens, where ``NAME`` is the short name, the model's hub id or an alias
       (``"jlens:gpt2"``, ``"tuned:EleutherAI/pythia-70m-deduped"``); ``"jlens"`` or ``"tuned"`` alone
       looks up the model's own name. Fetched at the registry's pinned commit, or at ``revision``;
    4. ``repo_id=`` and ``filename=`` (with ``path_or_name`` the kind, ``"jlens"`` or ``"tuned"``): a file the
       registry does not list, at ``revision`` (default: the repo's main branch); ``repo_type="space"``
       for a Space.

    Hub files go through ``huggingface_hub``'s cache: a cached file at a pinned commit is read with no
    network call and nothing printed (``HF_HUB_OFFLINE=1`` works); a download shows its progress bar.
    Each file's size and checksum are checked before it is read (:func:`~tl_logitlens.lenses.published.verify`).

    This package's files carry a readout fingerprint of the model they were made for, and a file whose
    fingerprint is missing is refused: it may be a lens for another model of the same shape. A published
    lens records the model it was made for (``meta["published"]``: hub id, aliases, the repo, revision
    and checks) and is refused on a model of another name or hub revision. Pass ``check_fingerprint=False``
    to load either on your own authority; the lens then carries no fingerprint. Other tools' formats never
    carry a fingerprint: they are checked by shape and layer count, and the lens records this model's
    fingerprint from then on.

    Published lenses read the residual stream as Hugging Face computes it. On a model whose weights
    TransformerLens processed (``fold_ln``, ``center_unembed``: the readout function is unchanged;
    ``center_writing_weights`` on a LayerNorm model: the stream loses its mean) a J-lens is read exactly,
    since its matrices carry the all-ones direction through (checked at load); a tuned lens is refused
    with how to load the model uncentred. ``docs/published-lenses.md`` states the maths.

    Args:
        path_or_name: a path, a built-in name, ``"jlens:NAME"``/``"tuned:NAME"``, or the kind with ``repo_id=``.
        model: the model (from :func:`tl.load_model`) the lens is checked against.
        check_fingerprint: False to load a lens made for another model (or another name of it).
        revision: the hub revision (commit, branch or tag) of a published or explicit lens.
        repo_id: a hub repo holding a lens the registry does not list (with ``filename=``).
        filename: the lens's file in ``repo_id`` (a tuned lens: its folder, or either of its two files).
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``, with ``repo_id=``.

    Returns:
        A :class:`TunedLens` or :class:`JacobianLens` on the model's device.

    Example:
        >>> lens = tl.load_lens("demo", tl.load_model("demo"))   # doctest: +SKIP
        >>> jlens = tl.load_lens("jlens:gpt2", tl.load_model("gpt2"))   # doctest: +SKIP

    Raises:
        TypeError: ``model`` is not a model object (e.g. a name: load it first with ``tl.load_model``).
        ValueError: no lens at that path or under that name; hub options with a local lens; a published
            file missing from the cache while offline (the message gives the ``hf download`` command); a
            truncated or corrupt download; a malformed, damaged or unsafe file (the message names it and
            what is wrong); a lens made for another model (name, revision, sizes, readout fingerprint) or for
            another centring of a LayerNorm model's stream; a file of this package's format without its
            fingerprint (unless ``check_fingerprint=False``).
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"load_lens takes a path or a built-in name like 'demo', not {type(path_or_name).__name__}")
    spec = os.fspath(path_or_name)
    _check_model_argument(model, spec)
    if not isinstance(check_fingerprint, bool):
        raise TypeError(f"check_fingerprint must be True or False, not {check_fingerprint!r}")
    for key, value in (("revision", revision), ("repo_id", repo_id), ("filename", filename), ("repo_type", repo_type)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{key} must be a string or None, not {type(value).__name__}")
    where = _resolve(spec, model, revision, repo_id, filename, repo_type)
    if isinstance(where, published.PublishedLens):
        if check_fingerprint:  # before anything is fetched: a lens for another model is not downloaded
            published.check_published_for(model, where.record(), published.KINDS[where.kind])
        lens = _read_published(where, model)
        path: Path | str = lens.meta["source"]
    else:
        path = where
        lens = _read(where, model)
    own = lens.meta.get("format") in _OWN_FORMATS
    if not check_fingerprint:
        lens.meta.pop("fingerprint", None)
        lens.meta["fingerprint_skipped"] = True
    elif own and "fingerprint" not in lens.meta:
        raise ValueError(
            f"{path} is in this package's format but carries no readout fingerprint (it was removed or the file "
            "was edited), so nothing ties it to a model; if you know it was made for this model, pass "
            "check_fingerprint=False"
        )
    elif "published" in lens.meta:
        published.check_published_for(model, lens.meta["published"], lens.name)
    lens.check_model(model)
    if not own and "fingerprint" not in lens.meta and check_fingerprint:
        # other tools' files carry none: from here on the lens is tied to the model it was checked against
        lens.meta["fingerprint"] = readout_fingerprint(model)
        lens.meta["d_vocab"] = int(model.W_U.shape[-1])
    return lens.to(model.W_U.device)
