"""The tuned lens (Belrose et al., 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens"): an affine translator per layer, ``h + W h + b``, trained so that the final norm and unembedding
of the translated state match the model's own output distribution.

:class:`TunedLens` implements the :class:`~tl_logitlens.lenses.Lens` protocol, so every analysis that
takes ``lens=`` reads through it: translator ``i`` maps ``blocks.{i}.hook_resid_pre`` (site ``"{i}_pre"``;
``"{l}_post"`` is the same stream as ``"{l+1}_pre"``), ``final_post`` is the identity. Train one with
:func:`~tl_logitlens.tuned_train.train_tuned_lens`, save it with :meth:`TunedLens.save`, load it (or a
tuned-lens 0.2.0 checkpoint) with :func:`~tl_logitlens.tuned_io.load_lens`.

A lens is tied to the residual stream it was trained on. Two checks guard that: a *fingerprint* of the
model's readout (its final norm and unembedding, as log-probs of a few seeded probe states, which
TransformerLens's weight processing ``fold_ln``/``center_unembed`` and the TransformerLens version
leave unchanged) and, on LayerNorm models, whether the writing weights were centred
(``center_writing_weights``, which removes the stream's mean that the translators read).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from jaxtyping import Float

from tl_logitlens._compat import normalization_type
from tl_logitlens.readout import normalise, unembed

FORMAT_VERSION = 1
_SITE_RE = re.compile(r"^(\d+)_(pre|mid|post)$")
_PROBE_SEED = 0
_N_PROBES = 4
_PROBE_TOP = 8
_PROBE_RANDOM = 8
# fingerprint tolerance (nats, max abs log-prob difference): float32 readouts of the same weights agree
# to ~1e-5 across TransformerLens versions and weight processing; a 16-bit model rounds its norm and W_U
FINGERPRINT_ATOL = {torch.float32: 1e-3, torch.float64: 1e-3}
FINGERPRINT_ATOL_16BIT = 0.25
# a row is "centred" when its mean is below this fraction of its root mean square
_CENTRED_RTOL = 1e-3


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
        cfg = model.cfg
        meta = {
            "format": "tl_logitlens tuned lens",
            "format_version": FORMAT_VERSION,
            "model_name": str(getattr(cfg, "model_name", "")),
            "d_model": int(cfg.d_model),
            "n_layers": int(cfg.n_layers),
            "d_vocab": int(model.W_U.shape[-1]),
            "normalization_type": str(normalization_type(model)),
            "stream_centred": writing_weights_centred(model),
            "fingerprint": readout_fingerprint(model),
        }
        return cls(cfg.d_model, cfg.n_layers, meta=meta).to(model.W_U.device)

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
        w = self.weight[index].to(h.device)
        b = self.bias[index].to(h.device)
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
        fingerprint = self.meta.get("fingerprint")
        if fingerprint is not None:
            d_vocab = int(model.W_U.shape[-1])
            if d_vocab != self.meta.get("d_vocab", d_vocab):
                raise ValueError(
                    f"this tuned lens was made for a model with a vocabulary of {self.meta['d_vocab']} "
                    f"({self.meta.get('model_name')!r}), not {d_vocab}; train one for this model"
                )
            diff = fingerprint_distance(model, fingerprint)
            atol = FINGERPRINT_ATOL.get(model.W_U.dtype, FINGERPRINT_ATOL_16BIT)
            if not diff <= atol:
                raise ValueError(
                    f"this tuned lens was made for another model ({self.meta.get('model_name')!r}): its final "
                    f"norm and unembedding read probe states {diff:.3g} nats apart (tolerance {atol:g}); "
                    "load the lens made for this model, or train one with tl.train_tuned_lens(model, texts)"
                )
        expected = self.meta.get("stream_centred")
        if expected is None or normalization_type(model) not in ("LN", "LNPre"):
            return
        actual = writing_weights_centred(model)
        if actual and not expected:
            raise ValueError(
                "this tuned lens reads the uncentred residual stream (a tuned-lens checkpoint, or a lens "
                "trained on a model loaded without centring), but this LayerNorm model was loaded with "
                "TransformerLens's centred writing weights, which remove the stream's mean the translators "
                "read (the lens would be off by ~1e-2); load the model with "
                "tl.load_model(..., center_writing_weights=False)"
            )
        if expected and not actual:
            raise ValueError(
                "this tuned lens was trained on the model loaded with TransformerLens's centred writing "
                "weights (tl.load_model's default), but this LayerNorm model's writing weights are not "
                "centred; load it with the default center_writing_weights=True"
            )

    def save(self, folder: Any) -> None:
        """Write ``tuned_lens.safetensors`` (``"{i}.weight"``, ``"{i}.bias"``, float32) and
        ``tuned_lens.json`` (what the lens was made for, how it was trained) into ``folder``."""
        from tl_logitlens.tuned_io import save_lens

        save_lens(self, folder)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, d_model={self.d_model}, n_layers={self.n_layers}, model={self.meta.get('model_name')!r}"


def _probe_logprobs(model: Any) -> Float[torch.Tensor, "probe d_vocab"]:
    """Float32 log-probs of the model's readout (final norm, ``W_U``, ``b_U``, logit transform) at
    ``_N_PROBES`` seeded standard-normal states."""
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    probes = torch.randn(_N_PROBES, model.cfg.d_model, generator=gen)
    probes = probes.to(device=model.W_U.device, dtype=model.W_U.dtype)
    rows = torch.zeros(_N_PROBES, dtype=torch.long, device=probes.device)
    with torch.inference_mode():
        normed = normalise(model, None, probes[None], "recompute", rows, rows)[0]
        return unembed(model, normed, True).float().log_softmax(-1)


def readout_fingerprint(model: Any) -> dict[str, Any]:
    """The log-probs of a few seeded probe states at a few token ids (each probe's top tokens and a seeded
    sample): the same for every loading of the same weights, different for another model."""
    logp = _probe_logprobs(model)
    d_vocab = logp.shape[-1]
    gen = torch.Generator().manual_seed(_PROBE_SEED + 1)
    ids = set(logp.topk(min(_PROBE_TOP, d_vocab), -1).indices.flatten().tolist())
    ids |= set(torch.randint(0, d_vocab, (_PROBE_RANDOM,), generator=gen).tolist())
    ids_sorted = sorted(ids)
    return {
        "probe_seed": _PROBE_SEED,
        "n_probes": _N_PROBES,
        "token_ids": ids_sorted,
        "logprobs": logp[:, ids_sorted].cpu().tolist(),
    }


def fingerprint_distance(model: Any, fingerprint: dict[str, Any]) -> float:
    """Max abs difference (nats) between the model's probe log-probs and a stored fingerprint."""
    if fingerprint.get("probe_seed") != _PROBE_SEED or fingerprint.get("n_probes") != _N_PROBES:
        raise ValueError("the lens's fingerprint was made with other probes; re-save the lens with this version")
    logp = _probe_logprobs(model)
    ids = torch.tensor(fingerprint["token_ids"], dtype=torch.long, device=logp.device)
    if int(ids.max()) >= logp.shape[-1]:
        return float("inf")
    stored = torch.tensor(fingerprint["logprobs"], dtype=torch.float32, device=logp.device)
    return float((logp[:, ids] - stored).abs().max())


def _rows_centred(w: torch.Tensor) -> bool:
    w = w.detach().float().reshape(-1, w.shape[-1])
    rms = w.pow(2).mean(-1).sqrt()
    return bool((w.mean(-1).abs() <= _CENTRED_RTOL * rms + 1e-12).all())


def writing_weights_centred(model: Any) -> bool | None:
    """Whether a LayerNorm model's writing weights are centred (TransformerLens's
    ``center_writing_weights``): every row of ``W_E`` (and ``W_pos``) and every output of ``W_O`` and
    ``W_out`` has zero mean over ``d_model``. None for models without LayerNorm (nothing is centred)."""
    if normalization_type(model) not in ("LN", "LNPre"):
        return None
    with torch.no_grad():
        if not _rows_centred(model.W_E):
            return False
        for name in ("W_pos", "W_O", "W_out"):
            try:
                w = getattr(model, name)
            except (AttributeError, NotImplementedError, RuntimeError, ValueError):
                continue
            if isinstance(w, torch.Tensor) and w.numel() and not _rows_centred(w):
                return False
    return True
