"""Sparse nonnegative pursuit over a lens dictionary: the numerics behind :func:`tl_logitlens.decompose`,
:func:`tl_logitlens.occupancy` and :func:`tl_logitlens.fraction_of_variance`.

Model-free: a dictionary here is anything with ``correlations(r)`` (``V r`` for every atom, ``[row,
atom]``), ``atoms(ids)`` (the rows ``V[ids]``) and ``norms`` (``‖v_t‖``); :class:`~tl_logitlens.analyses.
lens_dictionary.LensDictionary` is one, built in vocabulary tiles so no ``[d_vocab, d_model]`` matrix is
ever held, and :class:`DenseAtoms` wraps a plain matrix (the random control dictionaries, the tests).

The greedy rule (Gurnee et al., 2026, after orthogonal matching pursuit, Pati et al. 1993): at each of at
most ``k`` steps, select the unselected atom whose *unit* direction is most correlated with the residual
(``v_t · r / ‖v_t‖``, so a long atom is not preferred for its length), and stop early once that
correlation is at most ``sqrt(eps_float32) · ‖x‖`` (under nonnegativity an atom that does not correlate
positively cannot reduce the residual; the threshold is the float32 noise floor of the residual, so a
full-rank target stops instead of selecting noise). After each selection the coefficients are updated by

- ``"omp"``: nonnegative least squares over the selected atoms (Lawson & Hanson, 1974), solved in
  float64: the exact nonnegative fit on that set;
- ``"gradient_pursuit"``: one exact-line-search gradient step on the selected coefficients, projected
  onto ``c ≥ 0`` (Blumensath & Davies, 2008), the new atom entering at 0; where the projection makes
  the fit worse the step is halved (at most 20 times) and otherwise the old coefficients are kept.

The selected atoms whose contribution ``c_t ‖v_t‖`` exceeds ``sqrt(eps_float64) · ‖x‖`` are the active
``support``; the ``j_space_component`` is the orthogonal projection of ``x`` onto the span of *every*
selected atom (rank decided on unit columns in float64 at the same relative tolerance). These rules and
tolerances are TransformerLens 4.3's (``jacobian_lens_decomposition.py``), so supports agree with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int

ALGORITHMS = {
    "omp": "omp",
    "nonnegative_orthogonal_matching_pursuit": "omp",
    "gradient_pursuit": "gradient_pursuit",
}
# float64 relative tolerance of the NNLS solve, its rank decisions and the activity test
REL_TOL_64 = math.sqrt(torch.finfo(torch.float64).eps)
# the selection stops once the best unit correlation is at most this fraction of ‖x‖ (float32 noise floor)
SELECT_TOL = math.sqrt(torch.finfo(torch.float32).eps)
_BACKTRACK_STEPS = 20


class Atoms(Protocol):
    """A dictionary of ``n_atoms`` rows of width ``d_model``, read without holding it whole."""

    @property
    def norms(self) -> Float[torch.Tensor, " atom"]: ...

    def correlations(
        self, residuals: Float[torch.Tensor, "row d_model"]
    ) -> Float[torch.Tensor, "row atom"]: ...

    def atoms(self, ids: Int[torch.Tensor, " n"]) -> Float[torch.Tensor, "n d_model"]: ...


@dataclass(frozen=True, eq=False)
class DenseAtoms:
    """A dictionary held as a ``[atom, d_model]`` float32 matrix."""

    matrix: Float[torch.Tensor, "atom d_model"]

    @property
    def norms(self) -> Float[torch.Tensor, " atom"]:
        return torch.linalg.vector_norm(self.matrix, dim=1)

    def correlations(self, residuals: Float[torch.Tensor, "row d_model"]) -> Float[torch.Tensor, "row atom"]:
        return residuals @ self.matrix.T

    def atoms(self, ids: Int[torch.Tensor, " n"]) -> Float[torch.Tensor, "n d_model"]:
        return self.matrix[ids.to(self.matrix.device)]


def check_algorithm(algorithm: object) -> str:
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'omp' or 'gradient_pursuit', not {algorithm!r}")
    return ALGORITHMS[algorithm]


# --------------------------------------------------------------------------------------------------
# coefficient updates (one target, float64 inside)


def nnls(
    atoms: Float[torch.Tensor, "d_model n"], target: Float[torch.Tensor, " d_model"]
) -> Float[torch.Tensor, " n"]:
    """``argmin_{c ≥ 0} ‖atoms c − target‖`` by the Lawson–Hanson active-set method, in float64.

    An atom enters the free set when it is the zeroed atom most positively correlated with the residual;
    when the unconstrained fit on the free set has a negative coordinate, the method steps toward it until
    a coordinate reaches zero and releases it. Returns float64 coefficients; RuntimeError if it does not
    converge in ``3 n + 3`` admissions (a safeguard against numerical cycling, never reached in tests).
    """
    a = atoms.double()
    b = target.double()
    n = a.shape[1]
    coef = torch.zeros(n, dtype=torch.float64, device=a.device)
    if n == 0:
        return coef
    norms = torch.linalg.vector_norm(a, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    free = torch.zeros(n, dtype=torch.bool, device=a.device)
    for _ in range(3 * n + 3):
        scale = float(torch.linalg.vector_norm(b)) + float(torch.linalg.vector_norm(a.abs() @ coef.abs()))
        dual = a.T @ (b - a @ coef)
        dual_tol = REL_TOL_64 * norms * max(scale, torch.finfo(torch.float64).tiny)
        candidates = (~free) & (dual > dual_tol)
        if not bool(candidates.any()):
            return coef
        free[int(torch.argmax(torch.where(candidates, dual, torch.full_like(dual, -math.inf))))] = True
        for _ in range(n + 1):
            cols = free.nonzero(as_tuple=True)[0]
            trial = torch.zeros_like(coef)
            trial[cols] = torch.linalg.pinv(a[:, cols], rtol=REL_TOL_64) @ b
            coef_tol = REL_TOL_64 * max(scale, torch.finfo(torch.float64).tiny) / norms
            negative = free & (trial <= coef_tol)
            if not bool(negative.any()):
                coef = trial
                break
            # step from coef toward trial until the first free coordinate reaches zero
            ratio = coef / (coef - trial)
            step = float(
                torch.where(negative & (coef - trial > 0), ratio, torch.full_like(ratio, math.inf)).min()
            )
            step = min(max(step if math.isfinite(step) else 0.0, 0.0), 1.0)
            coef = coef + step * (trial - coef)
            free = free & (coef > coef_tol)
            coef = torch.where(free, coef, torch.zeros_like(coef))
    raise RuntimeError(
        "nonnegative least squares did not converge; the selected atoms are numerically degenerate"
    )


def gradient_pursuit_step(
    atoms: Float[torch.Tensor, "d_model n"],
    target: Float[torch.Tensor, " d_model"],
    coef: Float[torch.Tensor, " n"],
) -> Float[torch.Tensor, " n"]:
    """One projected gradient-pursuit update of ``coef`` (the newest atom entering at 0), float64."""
    a, b, c = atoms.double(), target.double(), coef.double()
    residual = b - a @ c
    direction = a.T @ residual
    moved = a @ direction
    denominator = float(moved @ moved)
    if denominator <= 0.0:
        return c.clamp_min(0.0)
    step = float(moved @ residual) / denominator
    current = float(residual @ residual)
    for _ in range(_BACKTRACK_STEPS + 1):
        trial = (c + step * direction).clamp_min(0.0)
        fit = b - a @ trial
        if float(fit @ fit) <= current:
            return trial
        step *= 0.5
    return c.clamp_min(0.0)


# --------------------------------------------------------------------------------------------------
# greedy pursuit, many targets at once (the selection is one matmul over the dictionary for all rows)


@dataclass(frozen=True)
class Pursuit:
    """One target's decomposition (float32 vectors; ``coordinates`` aligned with ``support``)."""

    target: torch.Tensor
    selected: torch.Tensor
    support: torch.Tensor
    coordinates: torch.Tensor
    reconstruction: torch.Tensor
    j_space_component: torch.Tensor


def pursue(
    dictionary: Any, targets: Float[torch.Tensor, "row d_model"], k: int, algorithm: str
) -> list[Pursuit]:
    """The greedy nonnegative decomposition (see the module docstring) of every row of ``targets``.

    Rows are independent: each stops on its own. All rows still running at a step are read against the
    dictionary in one product, and their coefficients re-solved together: under ``"omp"`` one batched
    float64 least-squares solve, which *is* the NNLS solution for every row whose coefficients all come
    out positive (the unconstrained optimum is then feasible); only the other rows run Lawson–Hanson.
    """
    x = targets.float()
    n_rows, d_model = x.shape
    device = x.device
    norms = dictionary.norms.to(device)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    chosen = torch.full((n_rows, k), -1, dtype=torch.long, device=device)
    coefs = torch.zeros(n_rows, k, dtype=torch.float64, device=device)
    count = torch.zeros(n_rows, dtype=torch.long, device=device)
    residual = x.clone()
    running = torch.ones(n_rows, dtype=torch.bool, device=device)
    for step in range(k):
        rows = running.nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            break
        corr = dictionary.correlations(residual[rows]) / norms
        if step:
            corr.scatter_(1, chosen[rows, :step], -math.inf)
        best, index = corr.max(dim=1)
        go = best > SELECT_TOL * x_norm[rows]
        running[rows[~go]] = False
        rows, index = rows[go], index[go]
        if rows.numel() == 0:
            break
        chosen[rows, step] = index
        count[rows] = step + 1
        n = step + 1
        atoms = (
            dictionary.atoms(chosen[rows, :n].reshape(-1))
            .reshape(len(rows), n, d_model)
            .transpose(1, 2)
            .float()
        )
        if algorithm == "omp":
            coefs[rows, :n] = _batched_nnls(atoms, x[rows])
        else:
            for i, row in enumerate(rows.tolist()):
                coefs[row, :n] = gradient_pursuit_step(atoms[i], x[row], coefs[row, :n])
        residual[rows] = x[rows] - (atoms @ coefs[rows, :n].float()[:, :, None])[:, :, 0]
    out: list[Pursuit | None] = [None] * n_rows
    for n in count.unique().tolist():
        rows = (count == n).nonzero(as_tuple=True)[0]
        ids = chosen[rows, :n].cpu()
        if n == 0:
            for row in rows.tolist():
                zero = x.new_zeros(d_model)
                out[row] = Pursuit(x[row], ids[0], ids[0], x.new_zeros(0), zero, zero)
            continue
        atoms = (
            dictionary.atoms(chosen[rows, :n].reshape(-1))
            .reshape(len(rows), n, d_model)
            .transpose(1, 2)
            .float()
        )
        coef = coefs[rows, :n]
        active = (
            coef * torch.linalg.vector_norm(atoms.double(), dim=1) > REL_TOL_64 * x_norm[rows, None].double()
        )
        projection = _batched_projection(atoms, x[rows])
        for i, row in enumerate(rows.tolist()):
            keep = active[i]
            coordinates = coef[i][keep].float()
            out[row] = Pursuit(
                target=x[row],
                selected=ids[i],
                support=ids[i][keep.cpu()],
                coordinates=coordinates,
                reconstruction=atoms[i][:, keep] @ coordinates,
                j_space_component=projection[i],
            )
    return out  # type: ignore[return-value]


def _batched_nnls(
    atoms: Float[torch.Tensor, "row d_model n"], targets: Float[torch.Tensor, "row d_model"]
) -> Float[torch.Tensor, "row n"]:
    """NNLS of each row: one batched float64 least-squares solve, accepted where every coefficient is
    materially positive (then it is the NNLS optimum); :func:`nnls` for the rest."""
    a, b = atoms.double(), targets.double()
    solution = torch.linalg.lstsq(a, b[:, :, None]).solution[:, :, 0]
    scale = torch.linalg.vector_norm(b, dim=1) + torch.linalg.vector_norm(
        a.abs() @ solution.abs()[:, :, None], dim=(1, 2)
    )
    tol = (
        REL_TOL_64
        * scale[:, None]
        / torch.linalg.vector_norm(a, dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    )
    ok = (solution > tol).all(dim=1) & torch.isfinite(solution).all(dim=1)
    for i in (~ok).nonzero(as_tuple=True)[0].tolist():
        solution[i] = nnls(atoms[i], targets[i])
    return solution


def _batched_projection(
    atoms: Float[torch.Tensor, "row d_model n"], targets: Float[torch.Tensor, "row d_model"]
) -> Float[torch.Tensor, "row d_model"]:
    """:func:`project` of each row onto its atoms' span, batched (float64 SVD of unit columns)."""
    a = atoms.double()
    unit = a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    u, s, _ = torch.linalg.svd(unit, full_matrices=False)
    keep = (s > REL_TOL_64 * s.max(dim=1, keepdim=True).values).double()
    basis = u * keep[:, None, :]
    return (basis @ (basis.transpose(1, 2) @ targets.double()[:, :, None]))[:, :, 0].float()


# --------------------------------------------------------------------------------------------------
# captured variance by greedy projection (occupancy)


def captured_variance(
    dictionary: Any, targets: Float[torch.Tensor, "row d_model"], max_atoms: int
) -> tuple[Float[torch.Tensor, "row step"], Int[torch.Tensor, "row step"]]:
    """Select exactly ``max_atoms`` atoms per row greedily (largest *signed* unit correlation with the
    residual, no early stop), the residual being ``x`` minus its orthogonal projection onto the span so
    far; return the per-step gain in captured variance ``‖Π_S x‖² / ‖x‖²`` and the atoms selected.

    This is TransformerLens 4.3's occupancy recurrence (``_greedy_captured_variance_gains``): the same
    selection rule as :func:`pursue`, with a projection residual instead of a nonnegative fit."""
    x = targets.float()
    n_rows = x.shape[0]
    norms = dictionary.norms.to(x.device)
    total = (x * x).sum(1)
    chosen = torch.zeros(n_rows, 0, dtype=torch.long, device=x.device)
    residual = x.clone()
    gains = torch.zeros(n_rows, max_atoms, dtype=torch.float32)
    previous = torch.zeros(n_rows, dtype=torch.float64)
    for step in range(max_atoms):
        corr = dictionary.correlations(residual) / norms
        if step:
            corr.scatter_(1, chosen, -math.inf)
        chosen = torch.cat([chosen, corr.argmax(dim=1, keepdim=True)], dim=1)
        atoms = dictionary.atoms(chosen.reshape(-1)).reshape(n_rows, step + 1, -1).double()  # [row, n, d]
        unit = atoms / torch.linalg.vector_norm(atoms, dim=2, keepdim=True).clamp_min(
            torch.finfo(torch.float64).tiny
        )
        u, s, _ = torch.linalg.svd(unit.transpose(1, 2), full_matrices=False)  # u: [row, d, n]
        keep = (s > REL_TOL_64 * s.max(dim=1, keepdim=True).values).double()
        basis = u * keep[:, None, :]
        projection = (basis @ (basis.transpose(1, 2) @ x.double()[:, :, None]))[:, :, 0].float()
        captured = ((projection * projection).sum(1) / total).double().cpu()
        gains[:, step] = (captured - previous).float()
        previous = captured
        residual = x - projection
    return gains, chosen.cpu()
