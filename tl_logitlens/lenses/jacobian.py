"""The Jacobian lens (J-lens; Gurnee et al., 2026, "Verbalizable Representations Form a Global Workspace
in Language Models", Transformer Circuits Thread).

For each source layer ``l`` the lens holds one ``[d_model, d_model]`` matrix ``J_l``: the average first-order
effect of the output of block ``l`` (``blocks.{l}.hook_resid_post``, site ``"{l}_post"``) on the output of
the last block before the final norm. A state is read as ``W_U · final_norm(J_l h)``: the lens maps
``h ↦ J_l h`` and the model's own final norm and unembedding do the rest (:class:`~tl_logitlens.core.readout.Readout`),
so every analysis that takes ``lens=`` reads through it. The logit lens is the special case ``J_l = I``.

:class:`JacobianLens` is the map and its bookkeeping; fitting it is
:mod:`tl_logitlens.lenses.jacobian_fitting`; its files are read and written here:

- this package's: a folder with ``jacobian_lens.safetensors`` (``"J.{layer}"`` ``[d_model, d_model]``
  float32, or float16 with ``save(dtype=torch.float16)``; the metadata, readout fingerprint included, in
  its header) and ``jacobian_lens.json`` (the same metadata, for people), written whole (:func:`~tl_logitlens.lenses.files.write_folder`);
- the reference format (``anthropics/jacobian-lens``, TransformerLens 4.3's ``JacobianLens.save``/``load``):
  one ``torch.save`` dict with ``"J"`` (``{layer: Tensor[d_model, d_model]}``), ``"n_prompts"``,
  ``"source_layers"``, ``"d_model"`` and optional ``"metadata"`` (plain types), written atomically and
  read with ``torch.load(weights_only=True)``; TransformerLens's fit checkpoints (``"jacobian_sum"``,
  ``"n_done"``) are read too. It carries no fingerprint, so it is checked by shape and layer count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, no_type_check

import torch
from jaxtyping import Float

from tl_logitlens.core.devices import PlacedCopies
from tl_logitlens.core.files import atomic_torch_save, check_path_argument, tensors_sha256
from tl_logitlens.lenses.files import (
    check_finite_tensors,
    check_size,
    check_tensor,
    model_sizes,
    read_lens_folder,
    read_torch_file,
    write_lens_folder,
)
from tl_logitlens.lenses.fingerprint import check_fingerprint, check_made_for

_POST_RE = re.compile(r"^(\d+)_post$")
NAME = "Jacobian lens"
FORMAT = "tl_logitlens Jacobian lens"
FORMAT_VERSION = 1
STEM = "jacobian_lens"
WEIGHTS_FILE = f"{STEM}.safetensors"
REFERENCE_FORMAT = "jlens"
# the precisions a lens is stored in (save's dtype=); read back in float32 whatever they are
_STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# where this package's metadata rides in a reference file's "metadata" (plain types, so it survives there)
_META_KEY = "tl_logitlens"
# beside it, a SHA-256 of the matrices (float32, by layer) that this package checks when it reads the file
_CHECKSUM_KEY = "tl_logitlens_sha256"
# the largest prompt count a file may state (more than any corpus; a float64 sum stays exact below 2**53)
MAX_COUNT = 2**53


class JacobianLens:
    """A Jacobian lens: ``J_l`` per source layer, read as ``W_U · final_norm(J_l h_l)``.

    Attributes:
        jacobians: ``{layer: Tensor[d_model, d_model]}`` (float32, CPU or the device it was moved to);
            ``J_l`` maps the output of block ``l`` to the last block's output (``h ↦ h @ J_l.T``).
        source_layers: the layers with a matrix, sorted.
        n_prompts: how many prompts were averaged into the matrices (merges weight by it).
        d_model: the residual stream's width.
        n_layers: the model's layer count where known (the last block, ``{n_layers - 1}_post``, reads
            with the identity); None for a lens built from a file that does not say (``load_lens`` sets
            it from the model).
        meta: what the lens was made for and how it was fitted (model name, readout fingerprint,
            stream centring, fit settings), plain JSON-able values.
        name: the name figures and tables show.
        default_sites: ``"resid_post"``, the sites every analysis reads through this lens when it is
            given no ``sites=`` (the lens reads block outputs only).

    Example:
        >>> jlens = tl.fit_jacobian_lens(model, tl.demo_texts()[:8])             # doctest: +SKIP
        >>> tl.logit_lens(model, "The dog was very", lens=jlens)   # reads resid_post  # doctest: +SKIP
    """

    default_sites = "resid_post"

    def __init__(
        self,
        jacobians: Mapping[int, torch.Tensor],
        *,
        n_prompts: int,
        d_model: int,
        n_layers: int | None = None,
        meta: Mapping[str, Any] | None = None,
        name: str = NAME,
    ) -> None:
        if not isinstance(jacobians, Mapping) or not jacobians:
            raise ValueError("a Jacobian lens needs at least one matrix: jacobians={layer: Tensor[d_model, d_model]}")
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, not {d_model!r}")
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or not 0 <= n_prompts <= MAX_COUNT:
            raise ValueError(f"n_prompts must be an int from 0 to {MAX_COUNT}, not {_short_int(n_prompts)}")
        if n_layers is not None and (isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2):
            raise ValueError(f"n_layers must be an int of 2 or more (or None), not {n_layers!r}")
        matrices: dict[int, torch.Tensor] = {}
        for layer, matrix in jacobians.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"Jacobian lens layers are ints from 0, not {layer!r}")
            if n_layers is not None and layer >= n_layers - 1:
                raise ValueError(
                    f"layer {layer} has a matrix, but in a {n_layers}-layer model the source layers are 0 to "
                    f"{n_layers - 2} (the last block reads with the identity)"
                )
            if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point():
                raise ValueError(f"J[{layer}] must be a float tensor, not {type(matrix).__name__}")
            if tuple(matrix.shape) != (d_model, d_model):
                raise ValueError(f"J[{layer}] has shape {list(matrix.shape)}, not [d_model, d_model] = [{d_model}, {d_model}]")
            if not bool(torch.isfinite(matrix).all()):
                raise ValueError(f"J[{layer}] holds NaN or inf; the lens is broken (fit or load it again)")
            matrices[layer] = matrix.detach().float()
        self.jacobians = dict(sorted(matrices.items()))
        self.n_prompts = n_prompts
        self.d_model = d_model
        self.n_layers = n_layers
        self.meta: dict[str, Any] = dict(meta or {})
        self.name = name

    @property
    def source_layers(self) -> tuple[int, ...]:
        return tuple(self.jacobians)

    def __repr__(self) -> str:
        layers = self.source_layers
        shown = f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
        return (
            f"JacobianLens(name={self.name!r}, layers={shown} ({len(layers)}), d_model={self.d_model}, "
            f"n_prompts={self.n_prompts}, model={self.meta.get('model_name')!r})"
        )

    def to(self, device: torch.device | str) -> JacobianLens:
        """Move the matrices to ``device`` (in place) and return the lens."""
        self.jacobians = {layer: m.to(device) for layer, m in self.jacobians.items()}
        return self

    def layer_of(self, site: str) -> int | None:
        """The source layer whose matrix reads site ``site`` (a label), or None where the lens is the
        identity (``final_post``, and ``{n_layers - 1}_post``, the same stream).

        Raises:
            ValueError: a site the lens does not read (``resid_pre``, ``resid_mid``, a layer without a
                matrix); the message names the sites it reads.
        """
        if site == "final_post" or (self.n_layers is not None and site == f"{self.n_layers - 1}_post"):
            return None
        m = _POST_RE.match(site)
        if m is None or int(m.group(1)) not in self.jacobians:
            reads = ", ".join(f"'{layer}_post'" for layer in self.source_layers)
            raise ValueError(
                f"the {self.name} reads the outputs of blocks {reads} and 'final_post', not {site!r}; pass "
                "sites='resid_post' (or those labels), or read other sites with the logit lens (lens=None)"
            )
        return int(m.group(1))

    @torch.no_grad()
    def translate(self, site: str, states: Float[torch.Tensor, "row d_model"]) -> Float[torch.Tensor, "row d_model"]:
        """``states @ J_l.T`` for the site's layer, computed in float32 and returned in the states' dtype;
        ``final_post`` unchanged."""
        layer = self.layer_of(site)
        if layer is None:
            return states
        return (states.float() @ self._matrix_on(layer, states.device).T).to(states.dtype)

    def _matrix_on(self, layer: int, device: torch.device) -> torch.Tensor:
        """``J_layer`` on ``device``: a lens fitted on the CPU reading a model on a GPU (or a model spread over
        devices) copies each matrix to the device of the states it reads once, not once per call; the copy
        is kept while ``jacobians[layer]`` is the same, unmodified tensor."""
        return self.__dict__.setdefault("_placed", PlacedCopies()).on(layer, self.jacobians[layer], device)

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when ``model`` is not the model this lens was made for: ``d_model``, the
        layers (every source layer below the last block, ``n_layers`` where the lens records it), the
        vocabulary and readout fingerprint (lenses fitted or saved by this package), and on LayerNorm
        models the stream's centring (a lens fitted on the raw stream cannot read a centred one exactly)."""
        cfg = model.cfg
        remedy = "fit one for it with tl.fit_jacobian_lens(model, texts)"
        if int(cfg.d_model) != self.d_model:
            raise ValueError(
                f"this {self.name} was made for a model with d_model {self.d_model} "
                f"({self.meta.get('model_name') or 'unnamed'}), not {cfg.d_model}; {remedy}"
            )
        n_layers = int(cfg.n_layers)
        if self.n_layers is not None and self.n_layers != n_layers:
            raise ValueError(f"this {self.name} was made for a {self.n_layers}-layer model, not a {n_layers}-layer one; {remedy}")
        beyond = [layer for layer in self.source_layers if layer >= n_layers - 1]
        if beyond:
            raise ValueError(
                f"this {self.name} has matrices for layers {beyond}, but this {n_layers}-layer model's source "
                f"layers are 0 to {n_layers - 2}; {remedy}"
            )
        check_made_for(model, self.meta, self.name, remedy, mean_leak=self.mean_leak)

    def mean_leak(self) -> str | None:
        """None when every matrix carries the all-ones direction to a multiple of itself (``C J_l 1 = 0``,
        ``C = I - 11ᵀ/d``) up to the rounding of the precision it was stored in, so the lens reads a
        LayerNorm model's stream the same whether TransformerLens centred it or not; otherwise how far off
        the worst matrix is (a phrase for an error message).

        Every true Jacobian of a LayerNorm model has ``J 1 = 1``: adding ``c·1`` to a block's output changes
        nothing any later norm reads, so the last block's output moves by ``c·1`` too, and a fitted mean of
        such Jacobians keeps it. Storing ``J`` rounds each entry by at most ``eps/2`` of itself, which moves
        ``(C J 1)_i`` by at most ``eps · max_i Σ_j |J_ij|``: that, for the stored dtype
        (``meta["stored_dtype"]``), plus ``16 eps`` of float32 for the fit's own arithmetic, is the tolerance.
        """
        name = str(self.meta.get("stored_dtype", "float32"))
        stored = getattr(torch, name, None) if name in ("float32", "float16", "bfloat16", "float64") else None
        eps = torch.finfo(stored if isinstance(stored, torch.dtype) else torch.float32).eps
        slack = eps + 16 * torch.finfo(torch.float32).eps
        worst, at, tol_at = 0.0, None, 0.0
        for layer, matrix in self.jacobians.items():
            m = matrix.double()
            carried = m.sum(-1)  # J 1
            leak = float((carried - carried.mean()).abs().max())
            tol = slack * float(m.abs().sum(-1).max())
            if leak > tol and leak - tol > worst - tol_at:
                worst, at, tol_at = leak, layer, tol
        if at is None:
            return None
        return (
            f"its matrix for layer {at} moves the all-ones direction off itself by up to {worst:.2g} "
            f"(rounding allows {tol_at:.2g}), so it reads the stream's mean"
        )

    @no_type_check  # checks its own arguments, with messages that say what to pass
    def save(self, path: str | os.PathLike, format: str = "tl_logitlens", dtype: torch.dtype = torch.float32) -> Path:
        """Save the lens and return the path written. An existing lens there is replaced.

        ``format="tl_logitlens"`` (the default): a folder with ``jacobian_lens.safetensors`` (``"J.{layer}"``,
        in ``dtype``, with the metadata in its header: what the lens was made for, the readout fingerprint,
        how it was fitted) and ``jacobian_lens.json`` (the same, for people), swapped in whole.
        ``format="jlens"``: the reference format, one ``torch.save`` file with ``"J"`` (in ``dtype``),
        ``"n_prompts"``, ``"source_layers"``, ``"d_model"`` and ``"metadata"`` (plain types; this
        package's metadata under ``"tl_logitlens"``), written atomically. TransformerLens 4.3's
        ``JacobianLens.load`` and the reference implementation read it.

        ``dtype`` is the precision the matrices are stored in: float32 (the default, exact), or float16
        (or bfloat16), half the size, as TransformerLens and Neuronpedia store J-lenses (their default:
        the entries are order one, so float16 keeps about three significant digits). The card
        (``jacobian_lens.json``, and the metadata) says which (``"stored_dtype"``); loading reads the
        matrices back in float32.

        Raises:
            TypeError: ``path`` is not a path.
            ValueError: an unknown ``format`` or ``dtype``; metadata that is not plain (JSON-like) values; a
                matrix holding NaN or inf once stored in ``dtype`` (nothing is written); a path that cannot
                be written (a missing or read-only folder, a folder where a ``.pt`` file goes).
        """
        path = check_path_argument(path, "path")
        if dtype not in _STORED_DTYPES:
            raise ValueError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, not {dtype!r}")
        meta = {
            **self.meta,
            "name": self.name,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_prompts": self.n_prompts,
            "source_layers": list(self.source_layers),
            "stored_dtype": str(dtype).removeprefix("torch."),
        }
        _check_plain(meta, "the lens's meta")
        matrices = {layer: m.detach().to(dtype).cpu().contiguous() for layer, m in self.jacobians.items()}
        check_finite_tensors({f"J[{layer}]": m for layer, m in matrices.items()}, repr(str(path)))
        if format == "tl_logitlens":
            return write_lens_folder(path, STEM, {f"J.{layer}": m for layer, m in matrices.items()}, meta, dtype=dtype)
        if format == REFERENCE_FORMAT:
            payload = {
                "J": matrices,
                "n_prompts": self.n_prompts,
                "source_layers": list(self.source_layers),
                "d_model": self.d_model,
                "metadata": {
                    "model_name": str(self.meta.get("model_name", "")),
                    _META_KEY: meta,
                    _CHECKSUM_KEY: _matrices_sha256(matrices),
                },
            }
            return atomic_torch_save(path, payload)
        raise ValueError(f"format must be 'tl_logitlens' (this package's folder) or 'jlens' (the reference .pt), not {format!r}")

    @classmethod
    def merge(cls, lenses: Sequence[JacobianLens]) -> JacobianLens:
        """The ``n_prompts``-weighted mean of lenses fitted on disjoint prompt sets (summed in float64).

        Raises:
            ValueError: no lenses, a lens of zero prompts, or lenses that differ in source layers,
                ``d_model``, ``n_layers``, model (readout fingerprint) or fit settings.
        """
        lenses = list(lenses)
        if not lenses or not all(isinstance(lens, JacobianLens) for lens in lenses):
            raise ValueError("merge takes a non-empty list of JacobianLens objects")
        first = lenses[0]
        for lens in lenses:
            if lens.n_prompts < 1:
                raise ValueError("every merged lens must have n_prompts of 1 or more; a lens of no prompts carries no weight")
            if (lens.source_layers, lens.d_model, lens.n_layers) != (first.source_layers, first.d_model, first.n_layers):
                raise ValueError("merged lenses must share source layers, d_model and n_layers")
            for key in ("fingerprint", "fit"):
                if lens.meta.get(key) != first.meta.get(key):
                    raise ValueError(f"merged lenses must come from the same model and fit settings; their {key!r} differs")
        total = sum(lens.n_prompts for lens in lenses)
        merged = {
            layer: (sum(lens.jacobians[layer].double().cpu() * lens.n_prompts for lens in lenses) / total).float()
            for layer in first.source_layers
        }
        meta = {**first.meta, "n_prompts": total}
        return cls(merged, n_prompts=total, d_model=first.d_model, n_layers=first.n_layers, meta=meta, name=first.name)


def _matrices_sha256(matrices: Mapping[int, torch.Tensor]) -> str:
    return tensors_sha256((f"J.{layer}", m.float()) for layer, m in sorted(matrices.items()))


def _short_int(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12 else repr(value)


def _check_plain(value: Any, where: str) -> None:
    """Refuse what a reference file's metadata cannot hold (``torch.load(weights_only=True)`` and
    TransformerLens accept None, bool, int, float, str, lists, tuples and string-keyed dicts)."""
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{where} has a key {key!r} that is not a string; metadata keys must be strings")
            _check_plain(item, f"{where}.{key}")
        return
    raise ValueError(f"{where} is a {type(value).__name__}; lens metadata holds plain values only (numbers, strings, lists, dicts)")


def _is_plain(value: Any) -> bool:
    try:
        _check_plain(value, "metadata")
    except ValueError:
        return False
    return True


def is_own_folder(folder: Path) -> bool:
    """A folder written by :meth:`JacobianLens.save` in this package's format."""
    return (folder / WEIGHTS_FILE).is_file()


def _layer(key: Any, where: str) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).isdigit():
        raise ValueError(f"{where}: layer {key!r} is not a layer number")
    return int(key)


def _matrices(raw: Any, d_model: int, n_layers: int, where: str, scale: int = 1) -> dict[int, torch.Tensor]:
    """``{layer: J_l}`` from a file's ``{layer: tensor}`` (divided by ``scale``: a checkpoint's prompt
    count), every layer a source layer of the model, every matrix a finite ``[d_model, d_model]``."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: the matrices must be a non-empty {{layer: tensor}} dict, not {type(raw).__name__}")
    if len(raw) > n_layers:
        raise ValueError(f"{where} holds {len(raw)} matrices; the model has {n_layers} layers")
    out = {}
    for key, matrix in raw.items():
        layer = _layer(key, where)
        if layer >= n_layers - 1:
            raise ValueError(
                f"{where}: layer {layer} has a matrix, but this {n_layers}-layer model's source layers are 0 to "
                f"{n_layers - 2}; this Jacobian lens was made for another model"
            )
        out[layer] = check_tensor(matrix, (d_model, d_model), f"J[{layer}]", where).float() / scale
    return out


def _count(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{where}: {key} is {_short_int(value)}, not a count (an int from 0 to {MAX_COUNT})")
    return value


def read_own(folder: Path, model: Any) -> JacobianLens:
    """The lens :meth:`JacobianLens.save` wrote into ``folder`` (this package's format); its sizes are
    checked against ``model`` before anything is built."""
    tensors, meta = read_lens_folder(folder, STEM)
    where = str(folder / WEIGHTS_FILE)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} is {meta.get('format')!r} version {meta.get('format_version')!r}; this version of tl_logitlens "
            f"reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    sizes = model_sizes(model)
    d_model = check_size(meta.get("d_model"), "d_model", sizes["d_model"], where, NAME)
    if meta.get("n_layers") is not None:
        check_size(meta["n_layers"], "n_layers", sizes["n_layers"], where, NAME)
    if "fingerprint" in meta:
        check_fingerprint(meta["fingerprint"], where)
    raw = {}
    for key, t in tensors.items():
        if not key.startswith("J."):
            raise ValueError(f"{where}: unexpected tensor {key!r}; a Jacobian lens holds 'J.{{layer}}' only")
        raw[key[2:]] = t
    jacobians = _matrices(raw, d_model, sizes["n_layers"], where)
    if sorted(jacobians) != list(meta.get("source_layers", sorted(jacobians))):
        raise ValueError(f"{where}: the metadata's source_layers {meta.get('source_layers')} are not the matrices' {sorted(jacobians)}")
    n_prompts = _count(meta.pop("n_prompts", 0), "n_prompts", where)
    meta["stored_dtype"] = _stored_dtype(tensors.values())
    name = str(meta.pop("name", NAME))
    for key in ("d_model", "n_layers", "source_layers"):
        meta.pop(key, None)
    return JacobianLens(jacobians, n_prompts=n_prompts, d_model=d_model, n_layers=sizes["n_layers"], meta=meta, name=name)


def _stored_dtype(tensors: Any) -> str:
    """The precision a file stored its matrices in ("float16", ...; the widest if they differ)."""
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor)}
    widest = max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0, default=torch.float32)
    return str(widest).removeprefix("torch.")


def is_reference_payload(payload: Any) -> bool:
    """A reference-format dict (``"J"``) or a TransformerLens fit checkpoint (``"jacobian_sum"``)."""
    return isinstance(payload, dict) and ("J" in payload or "jacobian_sum" in payload)


def read_reference(path: Path, model: Any, payload: Any = None) -> JacobianLens:
    """A reference-format file (``"J"``, ``"n_prompts"``, ``"source_layers"``, ``"d_model"``, optional
    ``"metadata"``) or a TransformerLens fit checkpoint (``"jacobian_sum"`` over ``"n_done"`` prompts),
    read with ``torch.load(weights_only=True)``; ``d_model`` and the layers are checked against
    ``model`` (the file has no ``n_layers``: the model's is used). A file this package wrote carries its
    metadata (fingerprint included) in ``metadata["tl_logitlens"]``; any other is checked by shape and
    layer count only, and reads the model's raw (uncentred) stream, as the reference fit does."""
    payload = read_torch_file(path) if payload is None else payload
    where = str(path)
    if not is_reference_payload(payload):
        raise ValueError(f"{where} is not a Jacobian lens: expected a dict with 'J' (the reference format) or 'jacobian_sum' (a fit checkpoint)")
    sizes = model_sizes(model)
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: metadata is a {type(metadata).__name__}, not a dict")
    if "J" in payload:
        d_model = check_size(payload.get("d_model"), "d_model", sizes["d_model"], where, NAME)
        n_prompts = _count(payload.get("n_prompts", 0), "n_prompts", where)
        jacobians = _matrices(payload["J"], d_model, sizes["n_layers"], where)
        listed = payload.get("source_layers")
        if listed is not None and (not isinstance(listed, (list, tuple)) or sorted(map(str, listed)) != sorted(map(str, jacobians))):
            raise ValueError(f"{where}: source_layers {listed!r} are not the layers of J ({sorted(jacobians)})")
        fmt = "J-lens reference"
    else:
        n_prompts = _count(payload.get("n_done", payload.get("n_prompts", 0)), "n_done", where)
        if n_prompts < 1:
            raise ValueError(f"{where} is a fit checkpoint of {n_prompts} prompts; it holds no mean to read")
        raw = payload["jacobian_sum"]
        first = next(iter(raw.values()), None) if isinstance(raw, dict) else None
        d_model = check_size(first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else None, "d_model", sizes["d_model"], where, NAME)
        jacobians = _matrices(raw, d_model, sizes["n_layers"], where, scale=n_prompts)
        fmt = "J-lens fit checkpoint"
    checksum = metadata.get(_CHECKSUM_KEY)
    if checksum is not None and "J" in payload and checksum != _matrices_sha256(jacobians):
        raise ValueError(f"{where}: the matrices do not match the SHA-256 checksum in its metadata; the file is damaged")
    stored = _stored_dtype((payload["J"] if "J" in payload else payload["jacobian_sum"]).values())
    own = metadata.get(_META_KEY)
    if isinstance(own, dict):
        meta = dict(own)
        meta.pop(_CHECKSUM_KEY, None)
        if "fingerprint" in meta:
            check_fingerprint(meta["fingerprint"], where)
        name = str(meta.pop("name", NAME))
        for key in ("d_model", "n_layers", "source_layers", "n_prompts"):
            meta.pop(key, None)
    else:
        name = NAME
        meta = {
            "format": fmt,
            "model_name": str(metadata.get("model_name", "")),
            # the reference fit reads the model's raw residual stream, which TransformerLens's centring changes
            "stream_centred": False,
            "reference_metadata": metadata if _is_plain(metadata) else {"note": "held values that are not plain; left out"},
            "source": where,
        }
    meta["stored_dtype"] = stored
    return JacobianLens(jacobians, n_prompts=n_prompts, d_model=d_model, n_layers=sizes["n_layers"], meta=meta, name=name)
