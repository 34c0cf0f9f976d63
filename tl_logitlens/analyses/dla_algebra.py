"""The linear algebra of direct logit attribution, shared by every attribution unit.

With the final norm's scale ``s`` taken from the cache, the final norm is linear in the residual
stream: ``norm(x) = centre(x) / s * w + b`` (``centre`` only for LayerNorm, ``w``/``b`` only on
unfolded models). The logit difference along ``D = W_U[:, correct] - W_U[:, incorrect]`` is then

    norm(x) · D + (b_U[c] - b_U[i]) = x · g / s + b · D + (b_U[c] - b_U[i]),    g = centre(w ⊙ D)

because centring is a symmetric projection. So every component ``x`` of the residual stream
contributes ``x · g / s``, and no component ever has to be normalised or unembedded: a head's
contribution is ``z · (W_O g) / s``, a neuron's ``post · (W_out g) / s`` (one computation,
:func:`unit_contributions`: a neuron is a unit with a one-dimensional output).

Tensors named ``[#batch, pair, ...]`` have a leading dimension of 1 when the pairs are shared by all
prompts, so the per-direction products (``W_O g``) are computed once, not once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.readout import CachedNorm


def gather_rows(t: torch.Tensor, pos_index: Int[torch.Tensor, "batch n"]) -> torch.Tensor:
    """``t[b, pos_index[b, j], ...]`` for a ``[batch, seq, ...]`` tensor, as float32 ``[batch, n, ...]``."""
    b = torch.arange(t.shape[0], device=t.device)[:, None]
    return t[b, pos_index.to(t.device)].float()


def unembed_columns(model: Any, ids: Int[torch.Tensor, "B pair"]) -> Float[torch.Tensor, "B pair d_model"]:
    """``W_U[:, id]`` for each id, float32."""
    return model.W_U.detach().T[ids].float()


def unembed_bias(model: Any, ids: Int[torch.Tensor, "B pair"]) -> Float[torch.Tensor, "B pair"]:
    """``b_U[id]`` for each id (zeros when the model has no unembedding bias)."""
    b_U = getattr(model, "b_U", None)
    if b_U is None:
        return torch.zeros(ids.shape, device=ids.device)
    return b_U.detach()[ids].float()


@dataclass(frozen=True)
class CachedReadout:
    """Everything needed to read components along ``D`` through the final norm's cached scale.

    ``g`` is ``centre(w ⊙ D)`` (the vector a pre-norm component is dotted with); ``inv_scale`` is
    ``1 / s`` at each read row (1 when the model has no final norm); ``norm_bias`` is ``b · D`` for
    the final norm's bias ``b`` (0 when it has none); ``unembed_bias`` is the ``b_U`` difference.
    """

    g: Float[torch.Tensor, "#batch pair d_model"]
    inv_scale: Float[torch.Tensor, "batch n"]
    norm_bias: Float[torch.Tensor, "#batch pair"]
    unembed_bias: Float[torch.Tensor, "#batch pair"]

    def states(self, x: Float[torch.Tensor, "batch n d_model"]) -> Float[torch.Tensor, "batch n pair"]:
        """Contribution of per-row pre-norm vectors ``x``."""
        return torch.matmul(x, self.g.transpose(-1, -2)) * self.inv_scale[..., None]

    def vector(self, v: Float[torch.Tensor, " d_model"]) -> Float[torch.Tensor, "batch n pair"]:
        """Contribution of a constant pre-norm vector (a bias) added at every position."""
        return (self.g @ v.float())[:, None, :] * self.inv_scale[..., None]

    def constant(self, c: Float[torch.Tensor, "#batch pair"]) -> Float[torch.Tensor, "batch n pair"]:
        """A post-norm constant (``b · D`` or the ``b_U`` difference) broadcast to every row."""
        return c[:, None, :].expand(self.inv_scale.shape[0], self.inv_scale.shape[1], -1)


def cached_readout(
    model: Any,
    cache: Any,
    direction: Float[torch.Tensor, "B pair d_model"],
    bias_diff: Float[torch.Tensor, "B pair"],
    pos_index: Int[torch.Tensor, "batch n"],
) -> CachedReadout:
    """Build the :class:`CachedReadout` for ``direction`` (unembedding columns or their difference)."""
    n_batch, n = pos_index.shape
    rows_b = torch.arange(n_batch, device=pos_index.device).repeat_interleave(n)
    norm = CachedNorm.of(model, cache, rows_b, pos_index.reshape(-1))
    norm_bias = torch.zeros(direction.shape[:2], device=direction.device)
    if norm.bias is not None:
        norm_bias = direction @ norm.bias.float()
    return CachedReadout(
        g=norm.pullback(direction),
        inv_scale=norm.inv_scale.reshape(n_batch, n),
        norm_bias=norm_bias,
        unembed_bias=bias_diff,
    )


def unit_vectors(
    W_out: Float[torch.Tensor, "unit d_unit d_model"], g: Float[torch.Tensor, "#batch pair d_model"]
) -> Float[torch.Tensor, "#batch unit d_unit pair"]:
    """``W_out[u] @ g``: the direction pulled back through each unit's output matrix (a head's ``W_O``
    ``[d_head, d_model]``; a neuron's row of the MLP's ``W_out``, as ``[1, d_model]``)."""
    return torch.einsum("uem,bkm->buek", W_out.detach().float(), g)


def unit_contributions(
    acts: Float[torch.Tensor, "batch n unit d_unit"],
    unit_vecs: Float[torch.Tensor, "#batch unit d_unit pair"],
    inv_scale: Float[torch.Tensor, "batch n"],
) -> Float[torch.Tensor, "unit batch n pair"]:
    """Each unit's contribution ``act · (W_out g) / s`` at the read rows: a head's ``z``
    (``d_unit = d_head``), a neuron's ``post`` (``d_unit = 1``)."""
    acts = acts.permute(0, 2, 1, 3)  # [batch, unit, n, d_unit]
    # a neuron's product is an outer product, which broadcasting does ~3x faster than a batched matmul
    out = acts * unit_vecs if acts.shape[-1] == 1 else torch.matmul(acts, unit_vecs)  # [batch, unit, n, pair]
    out = out * inv_scale[:, None, :, None]
    return out.permute(1, 0, 2, 3)


def head_source_contributions(
    pattern_rows: Float[torch.Tensor, "batch head n src"],
    v: Float[torch.Tensor, "batch src kv_head d_head"],
    head_vecs: Float[torch.Tensor, "#batch head d_head pair"],
    inv_scale: Float[torch.Tensor, "batch n"],
) -> Float[torch.Tensor, "head src batch n pair"]:
    """Each head's contribution split over source positions: ``pattern[q, s] · v[s] · (W_O g) / s_q``.

    ``z[q] = Σ_s pattern[q, s] v[s]``, so the sum over sources is the head's contribution. Under
    grouped-query attention query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``.
    """
    n_heads, n_kv = head_vecs.shape[1], v.shape[2]
    if n_kv != n_heads:
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
    vv = torch.matmul(v.permute(0, 2, 1, 3), head_vecs)  # [batch, head, src, pair]
    out = pattern_rows[..., None] * vv[:, :, None]  # [batch, head, n, src, pair]
    out = out * inv_scale[:, None, :, None, None]
    return out.permute(1, 3, 0, 2, 4)
