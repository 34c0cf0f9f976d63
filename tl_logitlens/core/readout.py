"""Read residual-stream states from an ``ActivationCache``, normalise them, project them to logits.

These are the primitives every analysis shares. The three normalisations:

``"recompute"``
    Each state goes through the model's own final norm (``ln_final``) with statistics computed from
    that state: exactly what the model would output had it stopped there. This is the logit lens,
    and it is what ``cache.apply_ln_to_stack(..., recompute_ln=True)`` does.
``"cached"``
    Each state is centred (LayerNorm only) and divided by the *final* layer's cached scale
    (``ln_final.hook_scale``), then multiplied by the norm's weight and shifted by its bias when the
    model is unfolded. This is linear in the state, so the contributions of components add up to the
    final logits: it is the view of direct logit attribution. (``cache.apply_ln_to_stack`` without
    ``recompute_ln`` does the same but leaves out the weight and bias, which is only right on a
    folded model.)
``"none"``
    The raw state times ``W_U``. Wrong for every normalised model, kept to show why the norm matters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.compat import normalization_type, output_logits_transform
from tl_logitlens.core.devices import readout_device, site_rows, to_device

NORMS: tuple[str, ...] = ("recompute", "cached", "none")
SITE_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
_LABEL_RE = re.compile(r"^(\d+)_(pre|mid|post)$")
_SUFFIX = {"resid_pre": "pre", "resid_mid": "mid", "resid_post": "post"}
_KIND = {v: k for k, v in _SUFFIX.items()}


@dataclass(frozen=True)
class Site:
    """One residual-stream state: its label (as TransformerLens spells it) and its cache hook."""

    label: str
    hook: str


def resolve_sites(model: Any, sites: object) -> tuple[Site, ...]:
    """Sites from kinds (``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``) or explicit labels.

    Kinds give that state of every layer in depth order, followed by ``final_post`` (the stream
    the unembedding reads). Labels (``"0_pre"``, ``"3_mid"``, ``"final_post"``) give exactly those.
    """
    n_layers = model.cfg.n_layers
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, Sequence) or not all(isinstance(s, str) for s in sites):
        raise TypeError(
            f"sites must be a kind ('resid_pre', 'resid_mid', 'resid_post'), a list of kinds, or a list of "
            f"labels like '0_pre' and 'final_post', not {sites!r}"
        )
    sites = list(sites)
    if not sites:
        raise ValueError("sites is empty; pass e.g. 'resid_pre' or ['resid_pre', 'resid_mid']")
    kinds = [s for s in sites if s in SITE_KINDS]
    if kinds and len(kinds) != len(sites):
        raise ValueError(
            f"sites {sites} mixes kinds {kinds} with labels; pass either kinds (every layer of each) or "
            "labels (exactly those sites), e.g. ['resid_pre'] or ['0_pre', '2_mid', 'final_post']"
        )
    if kinds:
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites {sites} lists a kind twice")
        order = [k for k in SITE_KINDS if k in sites]
        out = []
        for layer in range(n_layers):
            for kind in order:
                if kind == "resid_post" and layer == n_layers - 1:
                    continue
                out.append(Site(f"{layer}_{_SUFFIX[kind]}", f"blocks.{layer}.hook_{kind}"))
        out.append(final_site(model))
        return tuple(out)
    out = []
    for s in sites:
        if s == "final_post":
            out.append(final_site(model))
            continue
        m = _LABEL_RE.match(s) if isinstance(s, str) else None
        if m is None or int(m.group(1)) >= n_layers:
            raise ValueError(
                f"unknown site {s!r}; use the kinds {list(SITE_KINDS)} or labels like '0_pre', "
                f"'{n_layers - 1}_mid', 'final_post' (this model has {n_layers} layers)"
            )
        layer, suffix = int(m.group(1)), m.group(2)
        out.append(Site(s, f"blocks.{layer}.hook_{_KIND[suffix]}"))
    if len({s.label for s in out}) != len(out):
        raise ValueError(f"sites {sites} lists a site twice")
    return tuple(out)


def final_site(model: Any) -> Site:
    """``final_post``: the last block's output, the stream the final norm and unembedding read."""
    return Site("final_post", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {list(NORMS)}")


def has_final_norm(model: Any) -> bool:
    return model.cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre")


def required_hooks(model: Any, sites: Sequence[Site], norm: str) -> list[str]:
    hooks = sorted({s.hook for s in sites})
    if norm == "cached" and has_final_norm(model):
        hooks.append("ln_final.hook_scale")
    return hooks


def check_model(model: Any) -> None:
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_cache"):
        raise TypeError(
            f"expected a TransformerLens model (HookedTransformer or TransformerBridge), not "
            f"{type(model).__name__}; load one with tl_logitlens.load_model(...)"
        )
    from tl_logitlens.core.compat import is_encoder

    if is_encoder(model):
        raise TypeError(
            "this is a masked language model (HookedEncoder: BERT, RoBERTa), which predicts masked tokens, "
            "not the next one; use tl_logitlens.masked_lens or tl_logitlens.sliding_mask_lens"
        )
    if model.training:
        raise ValueError(
            "the model is in training mode, where dropout changes the numbers; call model.eval() first"
        )


def normalise(
    model: Any,
    cache: Any,
    states: Float[torch.Tensor, "site row d_model"],
    norm: str,
    batch_index: Int[torch.Tensor, " row"],
    pos_index: Int[torch.Tensor, " row"],
    *,
    norm_bias: bool = True,
) -> Float[torch.Tensor, "site row d_model"]:
    """Apply the final norm to residual states gathered at ``(batch_index, pos_index)``.

    ``norm_bias=False`` leaves out the final norm's additive bias (attribution counts it as a
    component of its own); it matters only for ``"cached"`` on an unfolded LayerNorm model.
    """
    if norm == "none" or not has_final_norm(model):
        return states
    ln = model.ln_final
    if norm == "recompute":
        flat = states.reshape(1, -1, states.shape[-1])
        return ln(flat).reshape(states.shape)
    # cached: the final layer's own scale, linear in the state
    return CachedNorm.of(model, cache, batch_index, pos_index).apply(states, bias=norm_bias)


@dataclass(frozen=True)
class CachedNorm:
    """The final norm with the scale it computed on the final residual stream: a linear map.

    ``norm(x) = centre(x) · inv_scale · gain + bias`` (``centre`` for LayerNorm only; ``gain`` and
    ``bias`` only on unfolded models; ``inv_scale`` is 1 where the model has no final norm). The lens's
    ``norm="cached"``, direct logit attribution and the component lens all read through this one map.
    """

    inv_scale: Float[torch.Tensor, " row"]
    gain: Float[torch.Tensor, " d_model"] | None
    bias: Float[torch.Tensor, " d_model"] | None
    centre: bool

    @classmethod
    def of(
        cls, model: Any, cache: Any, batch_index: Int[torch.Tensor, " row"], pos_index: Int[torch.Tensor, " row"]
    ) -> CachedNorm:
        if not has_final_norm(model):
            return cls(torch.ones(batch_index.shape[0], device=batch_index.device), None, None, False)
        ln = model.ln_final
        scale = site_rows(cache["ln_final.hook_scale"], batch_index, pos_index, readout_device(model))[..., 0]
        gain, bias = getattr(ln, "w", None), getattr(ln, "b", None)
        return cls(
            inv_scale=1.0 / scale.float(),
            gain=None if gain is None else gain.detach(),
            bias=None if bias is None else bias.detach(),
            centre=model.cfg.normalization_type in ("LN", "LNPre"),
        )

    def apply(self, states: Float[torch.Tensor, "*site row d_model"], bias: bool = True) -> torch.Tensor:
        """The normalised states (in their own dtype), one row per ``inv_scale`` entry."""
        if self.centre:
            states = states - states.mean(-1, keepdim=True)
        out = states * self.inv_scale[:, None].to(states.dtype)
        if self.gain is not None:
            out = out * self.gain.to(out.dtype)
        if bias and self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def pullback(self, direction: Float[torch.Tensor, "*any d_model"]) -> Float[torch.Tensor, "*any d_model"]:
        """``g = centre(gain ⊙ D)``: a pre-norm state ``x`` reads ``norm(x) · D = (x · g) · inv_scale
        (+ bias · D)``, because centring is a symmetric projection."""
        g = direction.float()
        if self.gain is not None:
            g = g * self.gain.float()
        return g - g.mean(-1, keepdim=True) if self.centre else g


def final_norm_bias(model: Any) -> torch.Tensor | None:
    """The final norm's additive bias (unfolded LayerNorm), or None.

    A folded bridge keeps a zero ``ln_final.b`` where a folded HookedTransformer has none: None too.
    """
    if not has_final_norm(model) or normalization_type(model) in ("LNPre", "RMSPre"):
        return None
    return getattr(model.ln_final, "b", None)


def soft_cap(model: Any) -> float | None:
    """``cfg.output_logits_soft_cap`` where the model soft-caps its logits (Gemma 2), else None."""
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    return cap if cap > 0 else None


def transform_logits(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """What the model does to its logits after the unembedding, applied elementwise to ``logits``.

    A bridge's adapter transform (Gemma 2's soft cap; the logit scaling of Granite, Cohere and
    Falcon-H1) or a ``HookedTransformer``'s ``cfg.output_logits_soft_cap``. TransformerLens's
    transforms act on each logit alone, so they apply equally to the full vocabulary or to a few
    chosen tokens' logits.
    """
    transform = output_logits_transform(model)
    if transform is not None:
        return transform(logits)
    cap = soft_cap(model)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def logit_scale(model: Any) -> float | None:
    """The factor the model multiplies its logits by after the unembedding, or None if that step is
    not a scaling.

    1.0 for most models; ``1 / logits_scaling`` for Granite, ``logit_scale`` for Cohere, and so on.
    None for a soft cap (``tanh``), which no per-component sum can pass through. Found by sending
    probe logits through :func:`transform_logits`: the factor must hold for every probe to 1e-6.
    """
    if soft_cap(model) is not None:
        return None
    if output_logits_transform(model) is None:
        return 1.0
    probe = torch.tensor([-1000.0, -3.0, -1.0, 0.0, 1.0, 2.5, 1000.0], device=model.W_U.device)
    out = transform_logits(model, probe.clone()).float()
    scale = float(out[4])
    if not torch.allclose(out, probe * scale, rtol=1e-6, atol=1e-6):
        return None
    return scale


def unembed(
    model: Any, normed: Float[torch.Tensor, "*rows d_model"], include_bias: bool
) -> Float[torch.Tensor, "*rows d_vocab"]:
    """Logits in float32: ``normed @ W_U (+ b_U)``, then the model's own post-unembedding transform
    (:func:`transform_logits`: a soft cap or a logit scaling, where the model has one)."""
    b_U = getattr(model, "b_U", None)
    if include_bias and b_U is not None:
        flat = normed.reshape(-1, normed.shape[-1])
        logits = torch.addmm(b_U, flat, model.W_U).reshape(*normed.shape[:-1], -1)
    else:
        logits = normed @ model.W_U
    return transform_logits(model, logits.float())


@dataclass(frozen=True)
class Readout:
    """A lens bound to a model, a normalisation and the ``b_U`` choice: site states in, logits out.

    ``lens.translate`` maps the states (the identity for the logit lens), :func:`normalise` applies
    the final norm as ``norm`` says, :func:`unembed` projects with ``W_U`` (+ ``b_U``) and the model's
    own logit transform. Every causal analysis reads the residual stream through one of these.
    """

    model: Any
    lens: Any  # a tl_logitlens.lenses.Lens, as resolve_lens returns it (core does not import lenses)
    norm: str
    include_bias: bool = True

    @property
    def name(self) -> str:
        return self.lens.name

    def hooks(self, sites: Sequence[Site]) -> list[str]:
        return required_hooks(self.model, sites, self.norm)

    def normed(
        self,
        cache: Any,
        site: Site,
        rows_b: Int[torch.Tensor, " row"],
        rows_p: Int[torch.Tensor, " row"],
        *,
        norm_bias: bool = True,
    ) -> Float[torch.Tensor, "row d_model"]:
        """The site's states at rows ``(rows_b, rows_p)``, translated by the lens and normalised, on the
        readout device (``W_U``'s): the rows are gathered where the site's block left them and moved
        once (:func:`~tl_logitlens.core.devices.site_rows`), so a model spread over devices reads alike."""
        device = readout_device(self.model)
        states = site_rows(cache[site.hook], rows_b, rows_p, device)
        states = to_device(self.lens.translate(site.label, states).to(states.dtype), device)
        rows_b, rows_p = to_device(rows_b, device), to_device(rows_p, device)
        normed = normalise(self.model, cache, states[None], self.norm, rows_b, rows_p, norm_bias=norm_bias)[0]
        return to_device(normed, device)  # a device map may put the final norm apart from W_U

    def logits(
        self, cache: Any, site: Site, rows_b: Int[torch.Tensor, " row"], rows_p: Int[torch.Tensor, " row"]
    ) -> Float[torch.Tensor, "row d_vocab"]:
        """Float32 logits of the site at rows ``(rows_b, rows_p)``."""
        return unembed(self.model, self.normed(cache, site, rows_b, rows_p), self.include_bias)
