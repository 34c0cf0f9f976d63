"""The Jacobian lens (J-lens; Gurnee et al., 2026, "Verbalizable Representations Form a Global Workspace
in Language Models", Transformer Circuits Thread).

For each source layer ``l`` the lens holds one ``[d_model, d_model]`` matrix ``J_l``: the average first-order
effect of the output of block ``l`` (``blocks.{l}.hook_resid_post``, site ``"{l}_post"``) on the output of
the last block before the final norm. A state is read as ``W_U · final_norm(J_l h)``: the lens maps
``h ↦ J_l h`` and the model's own final norm and unembedding do the rest (:class:`~tl_logitlens.readout.Readout`),
so every analysis that takes ``lens=`` reads through it. The logit lens is the special case ``J_l = I``.

:class:`JacobianLens` is the map and its bookkeeping; fitting it is
:mod:`tl_logitlens.lenses.jacobian_fitting`; its files are read and written here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float

from tl_logitlens.lenses.fingerprint import check_made_for

_POST_RE = re.compile(r"^(\d+)_post$")
NAME = "Jacobian lens"


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

    Example:
        >>> jlens = tl.fit_jacobian_lens(model, tl.demo_texts()[:8])             # doctest: +SKIP
        >>> tl.logit_lens(model, "The dog was very", lens=jlens, sites="resid_post")  # doctest: +SKIP
    """

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
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 0:
            raise ValueError(f"n_prompts must be an int of 0 or more, not {n_prompts!r}")
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
        matrix = self.jacobians[layer].to(states.device)
        return (states.float() @ matrix.T).to(states.dtype)

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
        check_made_for(model, self.meta, self.name, remedy)

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
