"""The tuned lens (Belrose et al., 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens"): an affine translator per layer, ``h + W h + b``, trained so that the final norm and unembedding
of the translated state match the model's own output distribution.

:class:`TunedLens` implements the :class:`~tl_logitlens.lenses.Lens` protocol, so every analysis that
takes ``lens=`` reads through it: translator ``i`` maps ``blocks.{i}.hook_resid_pre`` (site ``"{i}_pre"``;
``"{l}_post"`` is the same stream as ``"{l+1}_pre"``), ``final_post`` is the identity. Train one with
:func:`~tl_logitlens.lenses.tuned_training.train_tuned_lens`, save it with :meth:`TunedLens.save`, load
it (or a tuned-lens 0.2.0 checkpoint) with :func:`~tl_logitlens.lenses.loading.load_lens`.

Its files, both read here:

- this package's: ``tuned_lens.safetensors`` (``"{i}.weight"`` ``[d_model, d_model]``, ``"{i}.bias"``
  ``[d_model]``, float32) and ``tuned_lens.json`` (model name, shapes, the readout fingerprint, whether
  the stream was centred, the training settings), written by :meth:`TunedLens.save`;
- tuned-lens 0.2.0's: ``config.json`` and ``params.pt`` with the same keys, translator ``i`` reading
  ``blocks.{i}.hook_resid_pre`` of the model as Hugging Face computes it (uncentred). ``params.pt`` is
  read with ``torch.load(weights_only=True)``: a pickle that needs anything but tensors is refused.

A lens is tied to the residual stream it was trained on; :mod:`tl_logitlens.lenses.fingerprint` holds
the two checks that guard that (the readout fingerprint, the stream's centring).
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, no_type_check

import torch
from jaxtyping import Float

from tl_logitlens.core.devices import PlacedCopies
from tl_logitlens.core.files import check_path_argument
from tl_logitlens.lenses.files import (
    check_finite_tensors,
    check_size,
    check_tensor,
    model_sizes,
    read_json_object,
    read_lens_folder,
    read_torch_file,
    write_folder,
    write_lens_folder,
)
from tl_logitlens.lenses.fingerprint import check_fingerprint, check_made_for, model_record

# version 2: the metadata lives in the weights file's header too (lenses.files), so a save replaces both at once
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
FORMAT = "tl_logitlens tuned lens"
STEM = "tuned_lens"
WEIGHTS_FILE = f"{STEM}.safetensors"
CONFIG_FILE = f"{STEM}.json"
# tuned-lens 0.2.0's files
TUNED_LENS_CONFIG = "config.json"
TUNED_LENS_PARAMS = "params.pt"
_SITE_RE = re.compile(r"^(\d+)_(pre|mid|post)$")


class TunedLens(torch.nn.Module):
    """An affine translator per ``resid_pre`` site: ``h ↦ h + h Wᵢᵀ + bᵢ`` (float32), read through the
    model's own final norm and unembedding.

    ``weight[i]`` and ``bias[i]`` are translator ``i`` in ``torch.nn.Linear``'s convention (tuned-lens's
    ``"{i}.weight"`` / ``"{i}.bias"``). Both start at zero, where the tuned lens *is* the logit lens.
    ``meta`` records what the lens was made for (model name, shapes, readout fingerprint, stream
    centring) and how it was trained; :meth:`check_model` refuses a model it was not made for.

    Example:
        >>> lens = tl.train_tuned_lens(model, stories)            # doctest: +SKIP
        >>> tl.logit_lens(model, "Once upon a time", lens=lens)   # doctest: +SKIP
    """

    # the sites analyses read through it when given no sites= (it reads resid_post too)
    default_sites = "resid_pre"

    def __init__(self, d_model: int, n_layers: int, *, meta: dict[str, Any] | None = None,
                 name: str = "tuned lens") -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))
        self.name = name
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def d_model(self) -> int:
        return self.weight.shape[-1]

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def for_model(cls, model: Any) -> TunedLens:
        """A lens at initialisation (every translator zero: the logit lens) made for ``model``."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **model_record(model)}
        return cls(model.cfg.d_model, model.cfg.n_layers, meta=meta).to(model.W_U.device)

    def translator_index(self, site: str) -> int | None:
        """The translator that reads site ``site`` (a label), or None where the lens is the identity."""
        if site == "final_post":
            return None
        m = _SITE_RE.match(site)
        if m is None:
            raise ValueError(f"unknown site {site!r}; the tuned lens reads labels like '0_pre', '2_post', 'final_post'")
        layer, kind = int(m.group(1)), m.group(2)
        if kind == "mid":
            raise ValueError(
                f"the tuned lens has translators for resid_pre/resid_post sites only, not {site!r} "
                "(resid_mid); pass sites='resid_pre' or 'resid_post', or use the logit lens (lens=None) there"
            )
        index = layer if kind == "pre" else layer + 1
        if index > self.n_layers or (kind == "pre" and index >= self.n_layers):
            raise ValueError(f"site {site!r} is beyond this lens's {self.n_layers} layers")
        return None if index == self.n_layers else index

    @torch.no_grad()
    def translate(self, site: str, states: Float[torch.Tensor, "row d_model"]) -> Float[torch.Tensor, "row d_model"]:
        """``states + states @ W.T + b`` of the site's translator, computed in float32 and returned in
        the states' dtype; ``final_post`` (and ``{n-1}_post``, the same stream) unchanged."""
        index = self.translator_index(site)
        if index is None:
            return states
        h = states.float()
        placed = self.__dict__.setdefault("_placed", PlacedCopies())  # maps copied to h's device once
        w = placed.on("weight", self.weight, h.device)[index]
        b = placed.on("bias", self.bias, h.device)[index]
        return (h + torch.addmm(b, h, w.T)).to(states.dtype)

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when ``model`` is not the model this lens was made for.

        Checks, in order: ``d_model`` and ``n_layers``; the vocabulary size and the readout fingerprint
        (lenses saved by this package); on LayerNorm models, that the writing weights are centred
        exactly when they were for training (tuned-lens checkpoints read the uncentred stream).
        """
        cfg = model.cfg
        if (cfg.d_model, cfg.n_layers) != (self.d_model, self.n_layers):
            raise ValueError(
                f"this tuned lens was made for a model with d_model {self.d_model} and {self.n_layers} layers "
                f"({self.meta.get('model_name') or 'unnamed'}), not this one (d_model {cfg.d_model}, "
                f"{cfg.n_layers} layers); train one for it with tl.train_tuned_lens(model, texts)"
            )
        check_made_for(model, self.meta, "tuned lens", "train one with tl.train_tuned_lens(model, texts)")

    @no_type_check  # checks its own arguments, with messages that say what to pass
    def save(self, folder: str | os.PathLike, format: str = "tl_logitlens") -> Path:
        """Save the lens into ``folder`` and return it. An existing lens there is replaced.

        ``format="tl_logitlens"`` (the default): ``tuned_lens.safetensors`` (``"{i}.weight"``,
        ``"{i}.bias"``, float32, with the metadata in its header: what the lens was made for, the readout
        fingerprint, how it was trained) and ``tuned_lens.json`` (the same metadata, for people).
        ``format="tuned-lens"``: tuned-lens 0.2.0's ``config.json`` and ``params.pt`` (the same tensors,
        float32), so the lens can be used with tuned-lens; that format carries no fingerprint.

        Either way the folder is written whole and swapped into place (:func:`~tl_logitlens.lenses.files.write_folder`):
        a save killed at any moment leaves the old lens or the new one, never a mix.

        Raises:
            TypeError: ``folder`` is not a path.
            ValueError: an unknown ``format``; ``folder`` is a file or cannot be written; the lens holds
                NaN or inf (nothing is written: a lens already there is kept).
        """
        folder = check_path_argument(folder, "folder")
        tensors = {}
        for i in range(self.n_layers):
            tensors[f"{i}.weight"] = self.weight[i].detach().float().cpu().contiguous()
            tensors[f"{i}.bias"] = self.bias[i].detach().float().cpu().contiguous()
        check_finite_tensors(tensors, f"the lens folder {str(folder)!r}")
        if format == "tl_logitlens":
            meta = {**self.meta, "name": self.name, "format": FORMAT, "format_version": FORMAT_VERSION}
            return write_lens_folder(folder, STEM, tensors, meta)
        if format == "tuned-lens":
            config = {
                "base_model_name_or_path": str(self.meta.get("model_name", "")),
                "d_model": self.d_model,
                "num_hidden_layers": self.n_layers,
                "bias": True,
                "base_model_revision": None,
                "unembed_hash": self.meta.get("unembed_hash"),
                "lens_type": "linear_tuned_lens",
            }

            def write(tmp: Path) -> None:
                (tmp / TUNED_LENS_CONFIG).write_text(json.dumps(config), encoding="utf-8")
                torch.save(OrderedDict(tensors), tmp / TUNED_LENS_PARAMS)

            return write_folder(folder, write)
        raise ValueError(f"format must be 'tl_logitlens' (this package's) or 'tuned-lens' (tuned-lens 0.2.0's), not {format!r}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, d_model={self.d_model}, n_layers={self.n_layers}, model={self.meta.get('model_name')!r}"


def is_own_folder(folder: Path) -> bool:
    """A folder written by :meth:`TunedLens.save` (its weights file is the lens; the JSON is a card)."""
    return (folder / WEIGHTS_FILE).is_file()


def is_tuned_lens_folder(folder: Path) -> bool:
    """A folder in tuned-lens 0.2.0's format."""
    return (folder / TUNED_LENS_CONFIG).is_file() and (folder / TUNED_LENS_PARAMS).is_file()


def _stack(state: dict[str, Any], n_layers: int, d_model: int, bias: bool, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The translators of a checkpoint as ``[layer, d_model, d_model]`` and ``[layer, d_model]`` float32
    (``n_layers`` and ``d_model`` already checked against the model)."""
    expected = {f"{i}.weight" for i in range(n_layers)} | ({f"{i}.bias" for i in range(n_layers)} if bias else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(map(str, set(state) - expected))
        raise ValueError(f"{where} does not hold {n_layers} translators: missing {missing[:4]}, unexpected {extra[:4]}")
    for key, t in state.items():
        check_tensor(t, (d_model, d_model) if key.endswith("weight") else (d_model,), key, where)
    weight = torch.stack([state[f"{i}.weight"].float() for i in range(n_layers)])
    zeros = torch.zeros(d_model)
    b = torch.stack([state[f"{i}.bias"].float() if bias else zeros for i in range(n_layers)])
    return weight, b


def _with_weights(lens: TunedLens, weight: torch.Tensor, bias: torch.Tensor) -> TunedLens:
    with torch.no_grad():
        lens.weight.copy_(weight)
        lens.bias.copy_(bias)
    return lens


def read_own(folder: Path, model: Any) -> TunedLens:
    """The lens :meth:`TunedLens.save` wrote into ``folder``; its sizes are checked against ``model``
    before anything is built (its fingerprint is checked by :meth:`TunedLens.check_model`)."""
    tensors, meta = read_lens_folder(folder, STEM)
    where = str(folder / WEIGHTS_FILE)
    if meta.get("format_version") not in READS_VERSIONS:
        raise ValueError(
            f"{where} has format version {meta.get('format_version')!r}; this version of "
            f"tl_logitlens reads versions {list(READS_VERSIONS)}"
        )
    sizes = model_sizes(model)
    d_model = check_size(meta.get("d_model"), "d_model", sizes["d_model"], where, "tuned lens")
    n_layers = check_size(meta.get("n_layers"), "n_layers", sizes["n_layers"], where, "tuned lens")
    if "fingerprint" in meta:
        check_fingerprint(meta["fingerprint"], where)
    weight, bias = _stack(tensors, n_layers, d_model, True, where)
    name = meta.pop("name", "tuned lens")
    return _with_weights(TunedLens(d_model, n_layers, meta=meta, name=str(name)), weight, bias)


def read_tuned_lens_format(folder: Path, model: Any) -> TunedLens:
    """A tuned-lens 0.2.0 checkpoint (``config.json`` + ``params.pt``), its translators reading the
    uncentred stream. The config's sizes are checked against ``model`` before ``params.pt`` is read,
    and that is read with ``torch.load(weights_only=True)`` only."""
    where = folder / TUNED_LENS_CONFIG
    config = read_json_object(where)
    sizes = model_sizes(model)
    d_model = check_size(config.get("d_model"), "d_model", sizes["d_model"], str(where), "tuned lens")
    n_layers = check_size(config.get("num_hidden_layers"), "num_hidden_layers", sizes["n_layers"], str(where), "tuned lens")
    lens_type = config.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise ValueError(f"{folder} holds a tuned-lens {lens_type!r}; only 'linear_tuned_lens' is read")
    bias = config.get("bias", True)
    if not isinstance(bias, bool):
        raise ValueError(f"{where}: bias is {bias!r}, not true or false")
    state = read_torch_file(folder / TUNED_LENS_PARAMS)
    if not isinstance(state, dict):
        raise ValueError(f"{folder / TUNED_LENS_PARAMS} holds a {type(state).__name__}, not a dict of tensors")
    weight, b = _stack(state, n_layers, d_model, bias, str(folder / TUNED_LENS_PARAMS))
    meta = {
        "format": "tuned-lens 0.2.0",
        "model_name": str(config.get("base_model_name_or_path", "")),
        "d_model": d_model,
        "n_layers": n_layers,
        # tuned-lens reads Hugging Face's residual stream, which TransformerLens's centring changes
        "stream_centred": False,
        "unembed_hash": config.get("unembed_hash") if isinstance(config.get("unembed_hash"), str) else None,
        "source": str(folder),
        "stored_dtype": str(state["0.weight"].dtype).removeprefix("torch."),
    }
    revision = config.get("base_model_revision")
    if isinstance(revision, str) and revision:  # the model's hub commit it was trained on, where it says
        meta["model_revision"] = revision
    return _with_weights(TunedLens(d_model, n_layers, meta=meta), weight, b)
