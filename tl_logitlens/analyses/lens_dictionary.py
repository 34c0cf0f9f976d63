"""The lens vector dictionary: the direction along which a lens reads *every* token at one site.

Row ``t`` of the dictionary is the lens vector of token ``t`` (:func:`~tl_logitlens.lens_vectors`):

- ``convention="ours"`` (the default): ``v_t = Mᵀ P (g ⊙ W_U[:, t])``, the exact direction the lens reads
  ``t`` along (``M`` the lens's map at the site, ``g`` the final norm's gain, ``P`` the centring of a
  LayerNorm model);
- ``convention="transformer_lens"``: ``v_t = Mᵀ W_U[:, t]`` with the model's ``W_U`` as it stands, as
  TransformerLens 4.3's ``JacobianLens.lens_vector_dictionary`` builds it (on a raw bridge its ``W_U``
  has no gain folded in; see docs/jspace.md for why the gain matters).

Both are ``v_t = K W_U[:, t]`` for one ``[d_model, d_model]`` matrix ``K``
(:func:`~tl_logitlens.analyses.steering.readout_matrix`), so the dictionary never needs to be held: a
solver reads it through ``V r = W_Uᵀ (Kᵀ r)`` (one product with ``W_U``, which the model holds anyway)
and the rows it selects, ``K W_U[:, ids]``. Only the atom norms ``‖v_t‖`` need the whole dictionary;
they are computed once in vocabulary tiles (:data:`TILE_BYTES` at a time) and kept (``d_vocab`` floats)
while ``W_U`` and the lens's map are unchanged. :meth:`LensDictionary.dense` materialises the matrix
for those who want it, under a stated memory cap (:data:`DENSE_MAX_BYTES`) with an error that says what
to do above it: at a 256k vocabulary and ``d_model`` 4096 it is 4 GiB of float32.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.steering import check_convention, lens_site, readout_matrix
from tl_logitlens.core.inputs import check_count
from tl_logitlens.core.readout import check_model
from tl_logitlens.lenses import lens_name, resolve_lens

# a vocabulary tile of the dictionary (or of a half-precision W_U cast to float32) is at most this big
TILE_BYTES = 64 * 2**20
# LensDictionary.dense refuses to build a matrix bigger than this unless told otherwise
DENSE_MAX_BYTES = 2**30
# atom norms kept for this many (W_U, lens map, site, convention) combinations
_NORMS_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_NORMS_CACHE_SIZE = 16


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor's contents for the norms cache: where it lives, its version counter (bumped
    by every in-place edit) and a hash of a strided sample of its values."""
    t = tensor.detach()
    flat = t.reshape(-1) if t.is_contiguous() else t.T.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
    return (
        t.data_ptr(),
        t._version,
        tuple(t.shape),
        str(t.dtype),
        str(t.device),
        hashlib.blake2b(sample).hexdigest(),
    )


@dataclass(frozen=True, eq=False, repr=False)
class LensDictionary:
    """The lens vectors of every token at one site, ``V[t] = K W_U[:, t]``, read in vocabulary tiles.

    Attributes:
        site: the site label (``"2_post"``, ``"final_post"``).
        lens_name: the lens's display name.
        convention: ``"ours"`` or ``"transformer_lens"`` (see the module docstring).
        readout: ``K``, ``[d_model, d_model]`` float32 (None: the identity).
        unembed: the model's ``W_U`` ``[d_model, d_vocab]`` (the model's own tensor, not a copy).

    Example:
        >>> d = tl.lens_dictionary(model, jlens, "2_post")
        >>> d.atoms(torch.tensor([5, 9])).shape, d.norms.shape   # ([2, d_model], [d_vocab])
    """

    site: str
    lens_name: str
    convention: str
    readout: Float[torch.Tensor, "d_model d_model"] | None
    unembed: Float[torch.Tensor, "d_model d_vocab"]

    def __repr__(self) -> str:
        return (
            f"LensDictionary(site={self.site!r}, lens={self.lens_name!r}, convention={self.convention!r}, "
            f"d_vocab={self.d_vocab}, d_model={self.d_model})"
        )

    @property
    def d_vocab(self) -> int:
        return int(self.unembed.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.unembed.shape[0])

    @property
    def tile_size(self) -> int:
        """Vocabulary rows per tile: ``TILE_BYTES`` of float32 rows."""
        return max(1, TILE_BYTES // (4 * self.d_model))

    def atoms(self, ids: Int[torch.Tensor, " n"]) -> Float[torch.Tensor, "n d_model"]:
        """The rows ``V[ids]``, float32 on ``W_U``'s device."""
        return self._rows(self.unembed.detach()[:, ids.to(self.unembed.device)])

    def _rows(self, columns: Float[torch.Tensor, "d_model n"]) -> Float[torch.Tensor, "n d_model"]:
        """``(K columns)ᵀ``, formed as ``columnsᵀ Kᵀ`` so the rows come out contiguous (their norms are
        then a contiguous reduction)."""
        rows = columns.T.float()
        return rows if self.readout is None else rows @ self.readout.T

    def correlations(
        self, residuals: Float[torch.Tensor, "row d_model"]
    ) -> Float[torch.Tensor, "row d_vocab"]:
        """``V r`` for every token and row of ``residuals``: ``(r K) W_U``, float32, never forming ``V``."""
        r = residuals.float().to(self.unembed.device)
        y = r if self.readout is None else r @ self.readout
        w = self.unembed.detach()
        if w.dtype == torch.float32:
            return y @ w
        out = torch.empty(y.shape[0], self.d_vocab, device=y.device)
        for start in range(0, self.d_vocab, self.tile_size):
            stop = min(start + self.tile_size, self.d_vocab)
            out[:, start:stop] = y @ w[:, start:stop].float()
        return out

    def tiles(self) -> Iterator[tuple[int, Float[torch.Tensor, "tile d_model"]]]:
        """``(first token id, V[first : first + tile_size])`` over the vocabulary, float32."""
        for start in range(0, self.d_vocab, self.tile_size):
            stop = min(start + self.tile_size, self.d_vocab)
            yield start, self._rows(self.unembed.detach()[:, start:stop])

    @cached_property
    def _key(self) -> tuple:
        readout = b"" if self.readout is None else self.readout.detach().cpu().numpy().tobytes()
        return (self.site, self.convention, _fingerprint(self.unembed), hashlib.blake2b(readout).hexdigest())

    @property
    def norms(self) -> Float[torch.Tensor, " d_vocab"]:
        """``‖v_t‖`` for every token (float32), computed once in tiles and cached while ``W_U`` and the
        lens's map are unchanged (in-place edits are detected)."""
        key = self._key
        cached = _NORMS_CACHE.get(key)
        if cached is None:
            cached = torch.empty(self.d_vocab, device=self.unembed.device)
            for start, tile in self.tiles():
                cached[start : start + tile.shape[0]] = torch.linalg.vector_norm(tile, dim=1)
            _NORMS_CACHE[key] = cached
            while len(_NORMS_CACHE) > _NORMS_CACHE_SIZE:
                _NORMS_CACHE.popitem(last=False)
        _NORMS_CACHE.move_to_end(key)
        return cached

    def dense(self, max_bytes: int = DENSE_MAX_BYTES) -> Float[torch.Tensor, "d_vocab d_model"]:
        """The whole dictionary ``[d_vocab, d_model]`` (float32, on ``W_U``'s device), built in tiles.

        Raises:
            ValueError: it would take more than ``max_bytes``; the message says how much it needs.
        """
        max_bytes = check_count(max_bytes, "max_bytes", 1)
        need = 4 * self.d_vocab * self.d_model
        if need > max_bytes:
            raise ValueError(
                f"the {self.lens_name}'s dictionary at {self.site!r} is d_vocab x d_model = {self.d_vocab} x "
                f"{self.d_model} float32 = {need / 2**30:.2f} GiB, above max_bytes={max_bytes} "
                f"({max_bytes / 2**30:.2f} GiB); tl.decompose, tl.occupancy and tl.fraction_of_variance never need "
                "it (they read it in tiles through LensDictionary.correlations); iterate LensDictionary.tiles(), "
                "or pass a larger max_bytes if the memory is there"
            )
        out = torch.empty(self.d_vocab, self.d_model, device=self.unembed.device)
        for start, tile in self.tiles():
            out[start : start + tile.shape[0]] = tile
        return out


@no_type_check  # checks its own arguments
def lens_dictionary(model: Any, lens: Any, site: str, *, convention: str = "ours") -> LensDictionary:
    """The lens vector dictionary of ``lens`` at ``site``: every token's lens vector, held implicitly
    (``V = (K W_U)ᵀ``; see the module docstring) so it costs no more memory than ``W_U`` itself.

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge`` (compatibility mode or raw).
        lens: ``None`` (the logit lens), a :class:`~tl_logitlens.TunedLens`, a
            :class:`~tl_logitlens.JacobianLens`, or a lens with a ``linear_map(site)`` method.
        site: one site label the lens reads (``"2_post"``, ``"final_post"``).
        convention: ``"ours"`` (the final norm's gain folded in: the exact readout direction) or
            ``"transformer_lens"`` (``Mᵀ W_U[:, t]``, TransformerLens 4.3's numbers).

    Returns:
        A :class:`LensDictionary`.

    Raises:
        ValueError, TypeError: a site the lens does not read, an unknown convention, a masked LM
            (``TypeError``: the lens reads a causal LM's next-token unembedding), a model in training mode.

    Example:
        >>> d = tl.lens_dictionary(model, None, "final_post")
        >>> d.dense().shape   # [d_vocab, d_model]
    """
    check_model(model)
    convention = check_convention(convention)
    lens = resolve_lens(model, lens)
    where = lens_site(model, lens, site)
    return LensDictionary(
        site=where.label,
        lens_name=lens_name(lens),
        convention=convention,
        readout=readout_matrix(model, lens, where.label, convention),
        unembed=model.W_U.detach(),
    )


@no_type_check  # checks its own arguments
def lens_vector_dictionary(
    model: Any, lens: Any, site: str, *, convention: str = "ours", max_bytes: int = DENSE_MAX_BYTES
) -> Float[torch.Tensor, "d_vocab d_model"]:
    """The whole lens vector dictionary ``[d_vocab, d_model]`` as one float32 tensor (TransformerLens
    4.3's ``lens_vector_dictionary``, for every lens and site): ``lens_dictionary(...).dense(max_bytes)``.

    Raises:
        ValueError: as :func:`lens_dictionary`; a dictionary bigger than ``max_bytes`` (default 1 GiB).

    Example:
        >>> V = tl.lens_vector_dictionary(model, jlens, "2_post")   # row t: the lens vector of token t
    """
    return lens_dictionary(model, lens, site, convention=convention).dense(max_bytes)
