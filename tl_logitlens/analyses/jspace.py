"""J-space analyses: what a lens reads in a residual state, as a sparse sum of its lens vectors
(Gurnee et al., 2026, "Verbalizable Representations Form a Global Workspace in Language Models").

- :func:`decompose`: one state as a sparse nonnegative combination of lens vectors (orthogonal matching
  pursuit with a nonnegative least-squares re-solve, or gradient pursuit; :mod:`~tl_logitlens.analyses.
  pursuit`), with its ``j_space_component`` (the projection onto the selected lens vectors' span);
- :func:`occupancy`: how many lens vectors are meaningfully active in a state, against seeded random
  control dictionaries of the same size;
- :func:`fraction_of_variance`: the share of the residual stream's variance in J-space, per position and
  pooled, over prompts or a corpus.

Every lens reads: the dictionary is the lens's own (:func:`~tl_logitlens.lens_dictionary`), ``M = I`` for
the logit lens, ``I + W`` for a tuned-lens translator, ``J_l`` for the Jacobian lens. With
``convention="transformer_lens"`` the numbers are TransformerLens 4.3's (``JacobianLens.decompose``,
``.occupancy``, ``.fraction_of_variance``), tested to 1e-5 on its own J-lens of stories260K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Bool, Float, Int

from tl_logitlens.analyses.lens_dictionary import DENSE_MAX_BYTES, TILE_BYTES, LensDictionary, lens_dictionary
from tl_logitlens.analyses.pursuit import DenseAtoms, captured_variance, check_algorithm, pursue
from tl_logitlens.analyses.steering import lens_site
from tl_logitlens.core.inputs import check_count, is_integer, prepare_inputs, resolve_positions
from tl_logitlens.core.readout import Site, check_model, resolve_sites
from tl_logitlens.core.results import ResultBase, ShortRepr, common_fields, token_strings
from tl_logitlens.core.run import run_cache
from tl_logitlens.lenses import resolve_lens, sites_or_default

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

DEFAULT_K = 8


# --------------------------------------------------------------------------------------------------
# inputs: one activation, or the states of a site at read positions


def check_activation(activation: object, d_model: int, name: str = "activation") -> torch.Tensor:
    """A finite float ``[d_model]`` tensor, as float32 (TypeError / ValueError naming ``name`` otherwise)."""
    if not isinstance(activation, torch.Tensor):
        raise TypeError(
            f"{name} must be a float tensor of shape [{d_model}], not {type(activation).__name__}"
        )
    if not activation.is_floating_point():
        raise TypeError(
            f"{name} must be a float tensor (float16/32/64), not {activation.dtype}; to read a prompt's state, "
            "pass its text or [1, seq] token ids"
        )
    if tuple(activation.shape) != (d_model,):
        raise ValueError(
            f"{name} has shape {list(activation.shape)}; it must be one residual state of shape [{d_model}]"
        )
    if not bool(torch.isfinite(activation).all()):
        raise ValueError(f"{name} holds NaN or inf; decompose a finite residual state")
    return activation.detach().float()


def _is_raw_activation(value: object) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.ndim == 1)


@dataclass(frozen=True)
class _State:
    """One residual state and where it was read (``position`` None for a raw activation)."""

    activation: torch.Tensor
    position: int | None
    input_token: str
    hook: str


def one_state(model: Any, where: Site, value: object, position: object, prepend_bos: bool | None) -> _State:
    """A raw ``[d_model]`` activation (``position`` must be None), or one prompt's state at ``where`` and
    ``position`` (None: its last token)."""
    d_model = int(model.cfg.d_model)
    if _is_raw_activation(value):
        if position is not None:
            raise ValueError(
                "position is for inputs (a prompt); a raw activation is one state, pass position=None"
            )
        return _State(check_activation(value, d_model), None, "", where.hook)
    batch = prepare_inputs(model, value, prepend_bos=prepend_bos)
    if batch.tokens.shape[0] != 1:
        raise ValueError(f"pass one prompt, not {batch.tokens.shape[0]}; a decomposition reads one state")
    if position is not None and not is_integer(position):
        raise TypeError(f"position must be None (the last token) or an int, not {type(position).__name__}")
    index, _ = resolve_positions("last" if position is None else int(position), batch)
    pos = int(index[0, 0])
    cache = run_cache(model, batch.tokens, batch.mask, [where.hook])
    state = cache[where.hook][0, pos].detach().float()
    if not bool(torch.isfinite(state).all()):
        raise ValueError(f"the model's state at {where.label!r}, position {pos} holds NaN or inf")
    return _State(state, pos, batch.str_tokens[0][pos], where.hook)


def _dictionary(model: Any, lens: Any, site: object, convention: str) -> tuple[LensDictionary, Site]:
    check_model(model)
    resolved = resolve_lens(model, lens)
    where = lens_site(model, resolved, site)
    return lens_dictionary(model, resolved, where.label, convention=convention), where


# --------------------------------------------------------------------------------------------------
# decompose


@dataclass(frozen=True, kw_only=True, repr=False)
class Decomposition(ShortRepr):
    """One residual state as a sparse nonnegative combination of a lens's vectors at one site.

    Fields:

    - ``activation``: the state decomposed, ``x`` (float32, ``[d_model]``).
    - ``support``: token ids of the numerically *active* atoms (``c_t ‖v_t‖ > sqrt(eps64) ‖x‖``), in the
      order they were selected; ``support_tokens`` their text; ``coordinates`` their coefficients
      (positive, aligned with ``support``): ``reconstruction = Σ c_t v_t``.
    - ``selected_support``: every atom the greedy pursuit selected (``⊇ support``, at most ``k``), with
      ``selected_tokens``; it stops early once no atom correlates positively with the residual.
    - ``j_space_component``: the orthogonal projection of ``x`` onto the span of the selected atoms (the
      paper's "J-space component"); ``residual = x − j_space_component`` is orthogonal to that span.
    - ``explained_variance``: ``1 − ‖x − reconstruction‖² / ‖x‖²``; ``j_space_fraction``:
      ``‖j_space_component‖² / ‖x‖²`` (equal when every selected atom is active under ``"omp"``).
    - ``site``, ``lens_name``, ``convention``, ``algorithm``, ``k``; ``position`` and ``input_token``
      where the state was read from a prompt (None and ``""`` for a raw activation).
    """

    activation: Float[torch.Tensor, " d_model"]
    support: Int[torch.Tensor, " active"]
    support_tokens: tuple[str, ...]
    coordinates: Float[torch.Tensor, " active"]
    selected_support: Int[torch.Tensor, " selected"]
    selected_tokens: tuple[str, ...]
    reconstruction: Float[torch.Tensor, " d_model"]
    j_space_component: Float[torch.Tensor, " d_model"]
    residual: Float[torch.Tensor, " d_model"]
    atom_norms: Float[torch.Tensor, " selected"]
    explained_variance: float
    j_space_fraction: float
    site: str
    lens_name: str
    convention: str
    algorithm: str
    k: int
    position: int | None = None
    input_token: str = ""
    model_name: str = ""

    def _summary(self) -> dict[str, str]:
        return {
            "site": self.site,
            "lens": self.lens_name,
            "support": ", ".join(repr(t) for t in self.support_tokens[:6])
            + (", ..." if len(self.support_tokens) > 6 else ""),
            "explained variance": f"{self.explained_variance:.3f}",
            "J-space fraction": f"{self.j_space_fraction:.3f}",
            "algorithm": self.algorithm,
            "convention": self.convention,
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per selected atom, in selection order: ``step``, ``token_id``, ``token``, ``active``,
        ``coordinate`` (0 for an inactive atom), ``atom_norm`` (``‖v_t‖``), ``contribution``
        (``coordinate · atom_norm``: the length of its part of the reconstruction), ``site``, ``lens``."""
        import pandas as pd

        active = dict(zip(self.support.tolist(), self.coordinates.cpu().tolist()))
        ids = self.selected_support.tolist()
        coordinate = [active.get(t, 0.0) for t in ids]
        norms = self.atom_norms.cpu().tolist()
        return pd.DataFrame(
            {
                "step": list(range(len(ids))),
                "token_id": ids,
                "token": list(self.selected_tokens),
                "active": [t in active for t in ids],
                "coordinate": coordinate,
                "atom_norm": norms,
                "contribution": [c * n for c, n in zip(coordinate, norms)],
                "site": self.site,
                "lens": self.lens_name,
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """The active atoms' contributions as bars; see :func:`tl_logitlens.plotting.jspace.decomposition_figure`."""
        from tl_logitlens.plotting.jspace import decomposition_figure

        return decomposition_figure(self, **kwargs)


def _decomposition(
    dictionary: LensDictionary, state: _State, k: int, algorithm: str, tokenizer: Any, model_name: str
) -> Decomposition:
    x = state.activation.to(dictionary.unembed.device)
    if not float(x.norm()) > 0:
        raise ValueError("the activation is zero; there is nothing to decompose")
    (p,) = pursue(dictionary, x[None], k, algorithm)
    total = float(x @ x)
    miss = x - p.reconstruction
    return Decomposition(
        activation=x,
        support=p.support,
        support_tokens=tuple(token_strings(tokenizer, p.support)),
        coordinates=p.coordinates,
        selected_support=p.selected,
        selected_tokens=tuple(token_strings(tokenizer, p.selected)),
        reconstruction=p.reconstruction,
        j_space_component=p.j_space_component,
        residual=x - p.j_space_component,
        atom_norms=dictionary.norms[p.selected.to(x.device)].cpu(),
        explained_variance=1.0 - float(miss @ miss) / total,
        j_space_fraction=float(p.j_space_component @ p.j_space_component) / total,
        site=dictionary.site,
        lens_name=dictionary.lens_name,
        convention=dictionary.convention,
        algorithm=algorithm,
        k=k,
        position=state.position,
        input_token=state.input_token,
        model_name=model_name,
    )


@no_type_check  # checks its own arguments
def decompose(
    model: Any,
    lens: Any,
    site: str,
    activation_or_inputs: object,
    *,
    position: int | None = None,
    k: int = DEFAULT_K,
    algorithm: str = "omp",
    convention: str = "ours",
    prepend_bos: bool | None = None,
) -> Decomposition:
    """Decompose a residual state at ``site`` into a sparse nonnegative combination of ``lens``'s lens
    vectors (its J-space coordinates).

    At each of at most ``k`` steps the token whose lens vector (as a unit direction) is most correlated
    with the residual is selected, and the coefficients are re-solved: ``algorithm="omp"`` by exact
    nonnegative least squares over the selected vectors (float64), ``"gradient_pursuit"`` by one projected
    gradient step. Selection stops early once no vector correlates positively with the residual. The
    full-vocabulary dictionary is read in tiles, never held (:class:`~tl_logitlens.analyses.
    lens_dictionary.LensDictionary`).

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge`` (compatibility mode or raw).
        lens: ``None`` (the logit lens), a tuned lens or a Jacobian lens.
        site: one site label the lens reads (``"2_post"``; the Jacobian lens reads ``"{l}_post"``).
        activation_or_inputs: a float ``[d_model]`` residual state, or one prompt (a string or a
            ``[1, seq]`` token tensor) whose state at ``site`` and ``position`` is decomposed.
        position: with a prompt, the token position (negative counts from the end; None: the last).
        k: the most lens vectors to select (1 to d_vocab).
        algorithm: ``"omp"`` or ``"gradient_pursuit"``.
        convention: ``"ours"`` or ``"transformer_lens"`` (see :func:`~tl_logitlens.lens_dictionary`).
        prepend_bos: as in :func:`~tl_logitlens.logit_lens`, for text.

    Returns:
        A :class:`Decomposition`.

    Raises:
        ValueError, TypeError: a site the lens does not read; ``k`` not in [1, d_vocab]; an unknown
            algorithm or convention; an activation of the wrong size or dtype, NaN/inf or zero; a position
            with a raw activation; several prompts; a masked LM (TypeError).

    Example:
        >>> d = tl.decompose(model, jlens, "2_post", "The cat sat on the", k=5)
        >>> d.support_tokens, d.coordinates, d.j_space_fraction
    """
    algorithm = check_algorithm(algorithm)
    dictionary, where = _dictionary(model, lens, site, convention)
    k = check_count(k, "k", 1, dictionary.d_vocab)
    state = one_state(model, where, activation_or_inputs, position, prepend_bos)
    return _decomposition(
        dictionary,
        state,
        k,
        algorithm,
        getattr(model, "tokenizer", None),
        getattr(model.cfg, "model_name", "") or "",
    )


# --------------------------------------------------------------------------------------------------
# states at read positions (occupancy, fraction of variance)


@dataclass(frozen=True)
class _Grid:
    """The states of several sites at the read cells of a batch (``raw``: user activations, one prompt)."""

    fields: dict
    states: list[torch.Tensor]  # per site [batch, pos, d_model] float32
    valid: torch.Tensor


def _grid(
    model: Any,
    sites: Sequence[Site],
    value: object,
    positions: object,
    skip_first: int,
    prepend_bos: bool | None,
    batch_size: int,
    lens_label: str,
) -> _Grid:
    """Raw activations ``[d_model]`` / ``[row, d_model]`` (one prompt of ``row`` cells, no tokens), or
    the states of ``sites`` at the read positions of the inputs (run ``batch_size`` prompts at a time)."""
    d_model = int(model.cfg.d_model)
    if _is_raw_activation(value):
        if positions is not None:
            raise ValueError("positions are for inputs (prompts); with raw activations pass positions=None")
        rows = value[None] if value.ndim == 1 else value
        if rows.ndim != 2:
            raise ValueError(f"activations must be [d_model] or [row, d_model], not {list(value.shape)}")
        rows = torch.stack([check_activation(r, d_model, f"activation {i}") for i, r in enumerate(rows)])
        n = rows.shape[0]
        fields = {
            "tokens": torch.full((1, n), -1, dtype=torch.long),
            "str_tokens": (("",) * n,),
            "positions": torch.arange(n)[None],
            "valid": torch.ones(1, n, dtype=torch.bool),
            "model_name": getattr(model.cfg, "model_name", "") or "",
            "n_layers": int(model.cfg.n_layers),
            "lens_name": lens_label,
            "tokenizer": getattr(model, "tokenizer", None),
        }
        return _Grid(fields, [rows[None] for _ in sites], fields["valid"])
    batch = prepare_inputs(model, value, prepend_bos=prepend_bos)
    index, valid = resolve_positions(positions, batch)
    valid = valid & (index >= skip_first)
    hooks = sorted({s.hook for s in sites})
    states = [torch.zeros(*index.shape, d_model) for _ in sites]
    for start in range(0, batch.tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        cache = run_cache(model, batch.tokens[rows], batch.mask[rows], hooks)
        for i, s in enumerate(sites):
            h = cache[s.hook]
            states[i][rows] = (
                h.gather(1, index[rows, :, None].to(h.device).expand(-1, -1, d_model)).float().cpu()
            )
        del cache
    fields = common_fields(model, batch, index, valid, lens_label)
    return _Grid(fields, states, valid)


def _row_chunk(d_vocab: int) -> int:
    """Rows whose ``[row, d_vocab]`` float32 correlations fit in :data:`TILE_BYTES`."""
    return max(1, TILE_BYTES // (4 * d_vocab))


# --------------------------------------------------------------------------------------------------
# occupancy


@dataclass(frozen=True, kw_only=True, repr=False)
class Occupancy(ResultBase):
    """How many lens vectors are meaningfully active in each state, against random controls.

    For each read cell (``[batch, pos]``), exactly ``max_atoms`` lens vectors are selected greedily, the
    residual being the state minus its projection onto their span; ``gains[..., s]`` is the share of the
    state's variance (``‖Π x‖² / ‖x‖²``) that step ``s`` adds. ``control_gains`` is the same recurrence on
    ``n_controls`` dictionaries of as many random unit vectors (Gaussian, drawn from a CPU generator
    seeded with ``seed``), averaged. ``occupancy`` is the step at which the real cumulative captured
    variance leads the control's most (1 to ``max_atoms``): past it, lens vectors capture no more than
    random directions would. Invalid cells (padding, before ``skip_first``) hold -1 and NaN.

    ``median``: the median occupancy over valid cells; ``pooled``: the occupancy of the mean curves.
    """

    site: str
    occupancy: Int[torch.Tensor, "batch pos"]
    gains: Float[torch.Tensor, "batch pos step"]
    control_gains: Float[torch.Tensor, "batch pos step"]
    support: Int[torch.Tensor, "batch pos step"]
    max_atoms: int
    n_controls: int
    seed: int
    convention: str

    @property
    def median(self) -> float:
        return float(self.occupancy[self.valid].float().quantile(0.5))

    @property
    def pooled(self) -> int:
        real = self.gains[self.valid].mean(0).cumsum(0)
        control = self.control_gains[self.valid].mean(0).cumsum(0)
        return int((real - control).argmax()) + 1

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        out.update(
            site=self.site, median=f"{self.median:g}", pooled=str(self.pooled), controls=str(self.n_controls)
        )
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per valid cell × step: ``prompt``, ``position``, ``input_token``, ``step`` (1-based),
        ``token_id``, ``token``, ``gain``, ``control_gain``, ``cumulative``, ``control_cumulative``,
        ``occupancy``, ``site``, ``lens``."""
        import pandas as pd

        from tl_logitlens.core.frames import position_columns

        b, j = self.valid.nonzero(as_tuple=True)
        n = self.max_atoms
        b, j = b.repeat_interleave(n), j.repeat_interleave(n)
        s = torch.arange(n).repeat(len(b) // n)
        return pd.DataFrame(
            {
                **position_columns(self.positions, self.str_tokens, b, j),
                "step": (s + 1).numpy(),
                "token_id": self.support[b, j, s].numpy(),
                "token": token_strings(self.tokenizer, self.support[b, j, s]),
                "gain": self.gains[b, j, s].numpy(),
                "control_gain": self.control_gains[b, j, s].numpy(),
                "cumulative": self.gains.cumsum(-1)[b, j, s].numpy(),
                "control_cumulative": self.control_gains.cumsum(-1)[b, j, s].numpy(),
                "occupancy": self.occupancy[b, j].numpy(),
                "site": self.site,
                "lens": self.lens_name,
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Mean cumulative captured variance, lens vectors against random controls; see
        :func:`tl_logitlens.plotting.jspace.occupancy_figure`."""
        from tl_logitlens.plotting.jspace import occupancy_figure

        return occupancy_figure(self, **kwargs)


def _control_gains(
    x: Float[torch.Tensor, "row d_model"],
    d_vocab: int,
    max_atoms: int,
    n_controls: int,
    seed: int,
    max_bytes: int,
) -> Float[torch.Tensor, "row step"]:
    """The mean captured-variance gains of ``n_controls`` random unit dictionaries ``[d_vocab, d_model]``,
    drawn one after another from one CPU generator seeded with ``seed`` (TransformerLens 4.3's draws, so
    the same seed gives its numbers); each is drawn in vocabulary tiles (the same stream as one draw) and
    held while its ``max_atoms`` steps run."""
    d_model = x.shape[1]
    need = 4 * d_vocab * d_model
    if need > max_bytes:
        raise ValueError(
            f"each random control dictionary is d_vocab x d_model = {d_vocab} x {d_model} float32 = "
            f"{need / 2**30:.2f} GiB, above max_bytes={max_bytes} ({max_bytes / 2**30:.2f} GiB); controls are "
            "drawn and held one at a time, so pass max_bytes of at least that if the memory is there"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros(x.shape[0], max_atoms)
    rows_per_tile = max(1, TILE_BYTES // (4 * d_model))
    for _ in range(n_controls):
        atoms = torch.empty(d_vocab, d_model, device=x.device)
        for start in range(0, d_vocab, rows_per_tile):
            tile = torch.randn(min(rows_per_tile, d_vocab - start), d_model, generator=generator)
            atoms[start : start + tile.shape[0]] = (tile / (tile * tile).sum(1, keepdim=True).sqrt()).to(
                x.device
            )
        gains, _ = captured_variance(_UnitAtoms(atoms), x, max_atoms)
        total += gains
        del atoms
    return total / n_controls


@dataclass(frozen=True, eq=False)
class _UnitAtoms(DenseAtoms):
    """A dictionary of unit rows: norms are ones (not recomputed)."""

    @property
    def norms(self) -> Float[torch.Tensor, " atom"]:
        return torch.ones(self.matrix.shape[0], device=self.matrix.device)


@no_type_check  # checks its own arguments
def occupancy(
    model: Any,
    lens: Any,
    site: str,
    activation_or_inputs: object,
    *,
    positions: object = None,
    max_atoms: int = DEFAULT_K,
    n_controls: int = 32,
    seed: int = 0,
    skip_first: int = 0,
    convention: str = "ours",
    batch_size: int = 8,
    max_bytes: int = DENSE_MAX_BYTES,
    prepend_bos: bool | None = None,
) -> Occupancy:
    """How many of ``lens``'s vectors are meaningfully active in residual states at ``site``: the step of
    greatest lead of their cumulative captured variance over random control dictionaries' (see
    :class:`Occupancy`).

    Args:
        activation_or_inputs: a float ``[d_model]`` state or ``[row, d_model]`` states, or prompts (text,
            a list of texts, or token ids), read at ``positions``.
        positions: for prompts: None (every position, the default), ``"last"``, an int or a list.
        max_atoms: steps of the greedy recurrence (1 to d_vocab).
        n_controls: random control dictionaries averaged (each ``[d_vocab, d_model]``, drawn one at a time).
        seed: seeds the controls' CPU generator (the same seed, the same controls, on every device).
        skip_first: leave out positions before this one (the first tokens' outsized states).
        convention: ``"ours"`` or ``"transformer_lens"``.
        batch_size: prompts per forward pass.
        max_bytes: the most memory one control dictionary may take (default 1 GiB).

    Returns:
        An :class:`Occupancy`.

    Raises:
        ValueError, TypeError: as :func:`decompose`; ``max_atoms``, ``n_controls`` or ``seed`` out of
            range; a control dictionary above ``max_bytes``; a zero state.

    Example:
        >>> occ = tl.occupancy(model, jlens, "2_post", "Once upon a time there was", n_controls=8)
        >>> occ.occupancy, occ.median
    """
    dictionary, where = _dictionary(model, lens, site, convention)
    max_atoms = check_count(max_atoms, "max_atoms", 1, dictionary.d_vocab)
    n_controls = check_count(n_controls, "n_controls", 1)
    seed = check_count(seed, "seed", 0)
    skip_first = check_count(skip_first, "skip_first", 0)
    batch_size = check_count(batch_size, "batch_size", 1)
    max_bytes = check_count(max_bytes, "max_bytes", 1)
    grid = _grid(
        model,
        [where],
        activation_or_inputs,
        positions,
        skip_first,
        prepend_bos,
        batch_size,
        dictionary.lens_name,
    )
    states = grid.states[0]
    cells = grid.valid.nonzero(as_tuple=True)
    x = states[cells].to(dictionary.unembed.device)
    zero = (x * x).sum(1) == 0
    if bool(zero.any()):
        b, j = cells[0][zero][0], cells[1][zero][0]
        raise ValueError(
            f"the state of prompt {int(b)}, position {int(grid.fields['positions'][b, j])} is zero; occupancy is undefined"
        )
    shape = (*grid.valid.shape, max_atoms)
    gains = torch.full(shape, float("nan"))
    control = torch.full(shape, float("nan"))
    support = torch.full(shape, -1, dtype=torch.long)
    if x.shape[0]:
        real, chosen = [], []
        for start in range(0, x.shape[0], _row_chunk(dictionary.d_vocab)):
            g, c = captured_variance(dictionary, x[start : start + _row_chunk(dictionary.d_vocab)], max_atoms)
            real.append(g)
            chosen.append(c)
        gains[cells] = torch.cat(real)
        support[cells] = torch.cat(chosen)
        control[cells] = _control_gains(x, dictionary.d_vocab, max_atoms, n_controls, seed, max_bytes)
    lead = gains.cumsum(-1) - control.cumsum(-1)
    occ = torch.where(grid.valid, lead.nan_to_num(-float("inf")).argmax(-1) + 1, torch.full((), -1))
    return Occupancy(
        **grid.fields,
        site=where.label,
        occupancy=occ,
        gains=gains,
        control_gains=control,
        support=support,
        max_atoms=max_atoms,
        n_controls=n_controls,
        seed=seed,
        convention=dictionary.convention,
    )


# --------------------------------------------------------------------------------------------------
# fraction of variance


@dataclass(frozen=True, kw_only=True, repr=False)
class JSpaceVariance(ResultBase):
    """The share of the residual stream's variance in J-space, per site and read cell.

    At each valid cell the state ``x`` is decomposed (:func:`decompose`, ``k`` atoms) and
    ``fractions = ‖j_space_component‖² / ‖x‖²`` recorded (the projection onto the selected atoms' span,
    not the nonnegative reconstruction). ``j_space_norm2`` and ``total_norm2`` are the two squared norms;
    ``pooled[site] = Σ ‖j‖² / Σ ‖x‖²`` over cells (the paper's "fraction of total variance") and
    ``median[site]`` the median of the fractions (under ``convention="transformer_lens"`` the lower
    median, as ``torch.median`` and TransformerLens 4.3 take it). Cells not read (padding, positions
    before ``skip_first``, zero states) hold NaN and are False in ``sampled``.
    """

    labels: tuple[str, ...]
    fractions: Float[torch.Tensor, "site batch pos"]
    j_space_norm2: Float[torch.Tensor, "site batch pos"]
    total_norm2: Float[torch.Tensor, "site batch pos"]
    sampled: Bool[torch.Tensor, "site batch pos"]
    pooled: Float[torch.Tensor, " site"]
    median: Float[torch.Tensor, " site"]
    k: int
    algorithm: str
    convention: str

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        out["pooled"] = ", ".join(f"{v:.3f}" for v in self.pooled.tolist())
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per site × sampled cell: ``site``, ``site_index``, ``prompt``, ``position``,
        ``input_token``, ``fraction``, ``j_space_norm2``, ``total_norm2``, ``lens``."""
        import pandas as pd

        from tl_logitlens.core.frames import position_columns

        s, b, j = self.sampled.nonzero(as_tuple=True)
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                **position_columns(self.positions, self.str_tokens, b, j),
                "fraction": self.fractions[s, b, j].numpy(),
                "j_space_norm2": self.j_space_norm2[s, b, j].numpy(),
                "total_norm2": self.total_norm2[s, b, j].numpy(),
                "lens": self.lens_name,
            }
        )

    def summary_dataframe(self) -> pd.DataFrame:
        """One row per site: ``site``, ``pooled``, ``median``, ``n_positions``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "site": list(self.labels),
                "pooled": self.pooled.numpy(),
                "median": self.median.numpy(),
                "n_positions": self.sampled.flatten(1).sum(1).numpy(),
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Per-position fractions and their pooled and median summaries per site; see
        :func:`tl_logitlens.plotting.jspace.variance_figure`."""
        from tl_logitlens.plotting.jspace import variance_figure

        return variance_figure(self, **kwargs)


@no_type_check  # checks its own arguments
def fraction_of_variance(
    model: Any,
    lens: Any,
    inputs: object,
    *,
    sites: str | Sequence[str] | None = None,
    k: int = DEFAULT_K,
    positions: object = None,
    skip_first: int = 1,
    algorithm: str = "omp",
    convention: str = "ours",
    batch_size: int = 8,
    prepend_bos: bool | None = None,
) -> JSpaceVariance:
    """The fraction of the residual stream's variance that lies in J-space (the span of the ``k`` lens
    vectors a decomposition selects), per site and position, pooled and median over prompts or a corpus.

    Args:
        inputs: prompts (text, a list of texts — a corpus runs ``batch_size`` at a time — or token ids),
            or raw float states ``[d_model]`` / ``[row, d_model]`` (one site only).
        sites: site labels or a kind; default: the lens's default sites (``resid_post`` for the
            Jacobian lens, ``resid_pre`` otherwise). Every site must be one the lens reads.
        k, algorithm, convention: as in :func:`decompose`.
        positions: None (every position, the default), ``"last"``, an int or a list.
        skip_first: leave out positions before this one (default 1: the first token, whose state is
            outsized; TransformerLens 4.3's default is 16).

    Returns:
        A :class:`JSpaceVariance`.

    Raises:
        ValueError, TypeError: as :func:`decompose`; a site the lens does not read; no position sampled.

    Example:
        >>> fov = tl.fraction_of_variance(model, jlens, tl.demo_texts()[:4], k=8)
        >>> fov.summary_dataframe()
    """
    algorithm = check_algorithm(algorithm)
    check_model(model)
    resolved = resolve_lens(model, lens)
    site_list = resolve_sites(model, sites_or_default(model, sites, [resolved]))
    if _is_raw_activation(inputs) and len(site_list) != 1:
        raise ValueError("raw activations belong to one site; pass sites='<label>' with them")
    skip_first = check_count(skip_first, "skip_first", 0)
    batch_size = check_count(batch_size, "batch_size", 1)
    dictionaries = [lens_dictionary(model, resolved, s.label, convention=convention) for s in site_list]
    k = check_count(k, "k", 1, dictionaries[0].d_vocab)
    grid = _grid(
        model, site_list, inputs, positions, skip_first, prepend_bos, batch_size, dictionaries[0].lens_name
    )
    shape = (len(site_list), *grid.valid.shape)
    j_norm2 = torch.full(shape, float("nan"))
    total = torch.full(shape, float("nan"))
    cells = grid.valid.nonzero(as_tuple=True)
    for i, (dictionary, states) in enumerate(zip(dictionaries, grid.states)):
        x = states[cells].to(dictionary.unembed.device)
        chunk = _row_chunk(dictionary.d_vocab)
        parts = []
        for start in range(0, x.shape[0], chunk):
            parts += pursue(dictionary, x[start : start + chunk], k, algorithm)
        total[i][cells] = (x * x).sum(1).cpu()
        j_norm2[i][cells] = torch.tensor([float(p.j_space_component @ p.j_space_component) for p in parts])
    sampled = grid.valid[None] & (total > 0)
    if not bool(sampled.any()):
        raise ValueError(
            f"no position was sampled: every read position is before skip_first={skip_first} or a zero state; "
            "pass longer prompts or a smaller skip_first"
        )
    fractions = torch.where(sampled, j_norm2 / total, torch.full((), float("nan")))
    j_sum = torch.where(sampled, j_norm2, torch.zeros(())).double().flatten(1).sum(1)
    t_sum = torch.where(sampled, total, torch.zeros(())).double().flatten(1).sum(1)
    pooled = torch.where(t_sum > 0, j_sum / t_sum, torch.full((), float("nan"), dtype=torch.float64)).float()
    median = torch.stack([_median(fractions[i][sampled[i]], convention) for i in range(len(site_list))])
    return JSpaceVariance(
        **grid.fields,
        labels=tuple(s.label for s in site_list),
        fractions=fractions,
        j_space_norm2=torch.where(sampled, j_norm2, torch.full((), float("nan"))),
        total_norm2=torch.where(sampled, total, torch.full((), float("nan"))),
        sampled=sampled,
        pooled=pooled,
        median=median,
        k=k,
        algorithm=algorithm,
        convention=dictionaries[0].convention,
    )


def _median(values: torch.Tensor, convention: str) -> torch.Tensor:
    if values.numel() == 0:
        return torch.tensor(float("nan"))
    return values.median() if convention == "transformer_lens" else values.quantile(0.5)
