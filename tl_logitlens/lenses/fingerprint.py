"""What ties a lens to a model: a fingerprint of the model's readout, and whether its residual stream
was centred.

A lens reads the residual stream of the model it was made for. Two checks guard that, shared by every
lens that carries a map of its own (tuned, Jacobian):

- the *readout fingerprint*: the log-probs of a few seeded probe states through the model's final norm
  and unembedding. TransformerLens's weight processing (``fold_ln``, ``center_unembed``) and the
  TransformerLens version leave it unchanged; another model changes it;
- on LayerNorm models, whether the *writing weights are centred* (TransformerLens's
  ``center_writing_weights``, which removes the stream's mean that a lens fitted on the raw stream reads).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float

from tl_logitlens.core.compat import normalization_type
from tl_logitlens.core.readout import normalise, unembed

_PROBE_SEED = 0
_N_PROBES = 4
_PROBE_TOP = 8
_PROBE_RANDOM = 8
# fingerprint tolerance (nats, max abs log-prob difference): float32 readouts of the same weights agree
# to ~1e-5 across TransformerLens versions and weight processing; a 16-bit model rounds its norm and W_U
FINGERPRINT_ATOL = {torch.float32: 1e-3, torch.float64: 1e-3}
FINGERPRINT_ATOL_16BIT = 0.25
# a row is "centred" when its mean is below this fraction of its root mean square, or below the dtype's
# epsilon: a centred float32 row rounded to bfloat16 keeps a mean of up to ~0.25 eps·rms (measured 1.9e-3 on
# the demo model, eps 7.8e-3), while an uncentred row's mean is ~rms/sqrt(d_model) and far more at its max
_CENTRED_RTOL = 1e-3


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


def check_fingerprint(fingerprint: Any, where: str) -> dict[str, Any]:
    """A stored readout fingerprint, checked to be well formed (as :func:`readout_fingerprint` writes it).

    Raises:
        ValueError: made with other probes, or malformed (ids that are not token ids from 0, log-probs
            that are not a finite ``[n_probes, n_ids]`` table); the message names ``where``.
    """
    if not isinstance(fingerprint, dict):
        raise ValueError(f"{where}: the readout fingerprint is a {type(fingerprint).__name__}, not an object; the file is damaged")
    if fingerprint.get("probe_seed") != _PROBE_SEED or fingerprint.get("n_probes") != _N_PROBES:
        raise ValueError(f"{where}: the lens's fingerprint was made with other probes; re-save the lens with this version")
    ids, logprobs = fingerprint.get("token_ids"), fingerprint.get("logprobs")
    if (
        not isinstance(ids, list)
        or not 0 < len(ids) <= _N_PROBES * (_PROBE_TOP + _PROBE_RANDOM)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        raise ValueError(f"{where}: the readout fingerprint's token_ids must be a short list of token ids (ints from 0); the file is damaged")
    if (
        not isinstance(logprobs, list)
        or len(logprobs) != _N_PROBES
        or not all(isinstance(row, list) and len(row) == len(ids) for row in logprobs)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for row in logprobs for v in row)
    ):
        raise ValueError(
            f"{where}: the readout fingerprint's logprobs must be {_N_PROBES} rows of {len(ids)} finite numbers; "
            "the file is damaged"
        )
    return fingerprint


def fingerprint_distance(model: Any, fingerprint: dict[str, Any]) -> float:
    """Max abs difference (nats) between the model's probe log-probs and a stored fingerprint (inf where
    it names token ids beyond the model's vocabulary)."""
    check_fingerprint(fingerprint, "the lens")
    logp = _probe_logprobs(model)
    ids = torch.tensor(fingerprint["token_ids"], dtype=torch.long, device=logp.device)
    if int(ids.max()) >= logp.shape[-1]:
        return float("inf")
    stored = torch.tensor(fingerprint["logprobs"], dtype=torch.float32, device=logp.device)
    return float((logp[:, ids] - stored).abs().max())


def _rows_centred(w: torch.Tensor) -> bool:
    rtol = max(_CENTRED_RTOL, torch.finfo(w.dtype).eps) if w.is_floating_point() else _CENTRED_RTOL
    w = w.detach().float().reshape(-1, w.shape[-1])
    rms = w.pow(2).mean(-1).sqrt()
    return bool((w.mean(-1).abs() <= rtol * rms + 1e-12).all())


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


def model_record(model: Any) -> dict[str, Any]:
    """What a lens records about the model it is made for (plain JSON-able values): its name, shapes,
    normalisation, whether a LayerNorm stream is centred, and the readout fingerprint; what
    :func:`check_made_for` reads back."""
    cfg = model.cfg
    return {
        "model_name": str(getattr(cfg, "model_name", "")),
        "d_model": int(cfg.d_model),
        "n_layers": int(cfg.n_layers),
        "d_vocab": int(model.W_U.shape[-1]),
        "normalization_type": str(normalization_type(model)),
        "stream_centred": writing_weights_centred(model),
        "fingerprint": readout_fingerprint(model),
    }


def check_made_for(
    model: Any, meta: dict[str, Any], kind: str, remedy: str, mean_leak: Callable[[], str | None] | None = None
) -> None:
    """Raise ``ValueError`` when a lens whose metadata is ``meta`` was not made for ``model``.

    Checks the vocabulary size and the readout fingerprint (when ``meta`` has one: lenses saved by this
    package) and, on LayerNorm models, that the writing weights are centred exactly when they were
    where the lens was made (``meta["stream_centred"]``; other tools' lenses read the uncentred stream
    of the model as Hugging Face computes it). ``kind`` names the lens in messages ("tuned lens") and
    ``remedy`` says how to get one for this model.

    ``mean_leak``, where a lens can tell, says whether its map reads the stream's mean: None when it does
    not (then a lens made on one centring reads the other exactly, see ``docs/published-lenses.md``), or
    a phrase saying by how much it does (added to the refusal).
    """
    fingerprint = meta.get("fingerprint")
    if fingerprint is not None:
        d_vocab = int(model.W_U.shape[-1])
        if d_vocab != meta.get("d_vocab", d_vocab):
            raise ValueError(
                f"this {kind} was made for a model with a vocabulary of {meta['d_vocab']} "
                f"({meta.get('model_name')!r}), not {d_vocab}; {remedy}"
            )
        diff = fingerprint_distance(model, fingerprint)
        atol = FINGERPRINT_ATOL.get(model.W_U.dtype, FINGERPRINT_ATOL_16BIT)
        if not diff <= atol:
            raise ValueError(
                f"this {kind} was made for another model ({meta.get('model_name')!r}): its final norm and "
                f"unembedding read probe states {diff:.3g} nats apart (tolerance {atol:g}); load the lens made "
                f"for this model, or {remedy}"
            )
    expected = meta.get("stream_centred")
    if expected is None or normalization_type(model) not in ("LN", "LNPre"):
        return
    actual = writing_weights_centred(model)
    if bool(actual) == bool(expected):
        return
    leak = mean_leak() if mean_leak is not None else "it would be off by ~1e-2"
    if leak is None:
        return  # the lens's map ignores the stream's mean: it reads either centring exactly
    if actual and not expected:
        raise ValueError(
            f"this {kind} reads the uncentred residual stream (another tool's checkpoint, or a lens made on a "
            "model loaded without centring), but this LayerNorm model was loaded with TransformerLens's "
            f"centred writing weights, which remove the stream's mean the lens reads ({leak}); load the model "
            "with tl.load_model(..., center_writing_weights=False)"
        )
    raise ValueError(
        f"this {kind} was made on the model loaded with TransformerLens's centred writing weights "
        "(tl.load_model's default), but this LayerNorm model's writing weights are not centred "
        f"({leak}); load it with the default center_writing_weights=True"
    )
