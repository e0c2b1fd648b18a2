"""Small K x K solvers shared by the Gramian methods (MGDA, CAGrad, Nash-MTL, FairGrad, UPGrad, DualProj,
ConFIG, IMTL).

Everything here works on NumPy float64 arrays: the Gramian is tiny (K x K), the solvers are
sequential, and SciPy / quadprog take NumPy input. Each method module converts at its boundary.
The exception is `cosine_pseudoinverse` (ConFIG, IMTL), a single torch call on a float64 tensor.

A non-finite Gramian (an overflowed float16 gradient, a NaN loss) is not solved: the solvers return
the uniform weights, so the update stays non-finite and the trainer's overflow handling sees it,
instead of raising from inside NumPy / quadprog.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._simplex import project_onto_simplex

#: A row whose squared norm is below this fraction of the largest squared row norm is treated as a
#: zero row by the solvers that need a positive squared norm (Nash-MTL, FairGrad): a norm ratio of
#: 1e-12, far below float32's resolution of the other rows.
ZERO_ROW_RTOL = 1e-24


def gramian_to_numpy(gramian: Tensor) -> np.ndarray:
    """The Gramian as a symmetric float64 NumPy array (symmetrised to remove rounding asymmetry)."""
    gram = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    return 0.5 * (gram + gram.T)


def weights_to_tensor(weights: np.ndarray, like: Tensor) -> Tensor:
    """``weights`` as a tensor on ``like``'s device with ``like``'s dtype."""
    return torch.as_tensor(np.ascontiguousarray(weights), dtype=like.dtype, device=like.device)


def nearest_psd(gram: np.ndarray) -> np.ndarray:
    """``gram`` with its negative eigenvalues (rounding noise of a float32 Gramian) set to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    if eigenvalues.min() >= 0.0:
        return gram
    clamped = (eigenvectors * np.clip(eigenvalues, 0.0, None)) @ eigenvectors.T
    return 0.5 * (clamped + clamped.T)


# ---------------------------------------------------------------------------------------------- MGDA
def min_norm_pair(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """``argmin_{γ∈[0,1]} ||γ x1 + (1-γ) x2||²`` and its value, from the three inner products.

    Sener & Koltun (2018), Algorithm 1, with the clip to [0, 1] of the paper (the reference code
    clips to [0.001, 0.999]).
    """
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    gamma = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def _next_point(current: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The reference's projected step: move along ``direction`` (projected onto ``Σ w = 0``) until
    the first coordinate leaves [0, 1], then project back onto the simplex."""
    projected = direction - direction.mean()
    negative, positive = projected < 0, projected > 0
    steps = np.concatenate([-current[negative] / projected[negative], (1.0 - current[positive]) / projected[positive]])
    steps = steps[steps > 1e-7]
    step = steps.min() if steps.size else 1.0
    return project_onto_simplex(torch.from_numpy(current + step * projected)).numpy()


def min_norm_weights(gram: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> tuple[np.ndarray, int]:
    """MGDA's min-norm point of the convex hull of the rows: ``argmin_{w∈Δ} wᵀ G w``.

    The solver of Sener & Koltun's reference code (``MinNormSolver.find_min_norm_element``): start
    from the best pair's closed form, then iterate a projected-gradient step followed by an exact
    line search, until the L1 change of ``w`` is below ``tol`` or ``max_iter`` iterations; then
    `_finish_min_norm` makes the point exact.

    Returns:
        The weights (shape (K,), on the simplex) and the number of iterations run.
    """
    num_tasks = gram.shape[0]
    trace = np.trace(gram)
    if num_tasks == 1:
        return np.ones(1), 0
    if not np.isfinite(gram).all() or not trace > 0:
        return np.full(num_tasks, 1.0 / num_tasks), 0
    gram = gram / trace  # scale-free: the reference's `dmin = 1e8` start breaks for large gradients
    best = None
    for i in range(num_tasks):
        for j in range(i + 1, num_tasks):
            gamma, cost = min_norm_pair(gram[i, i], gram[i, j], gram[j, j])
            if best is None or cost < best[0]:
                best = (cost, i, j, gamma)
    _, i, j, gamma = best
    weights = np.zeros(num_tasks)
    weights[i], weights[j] = gamma, 1.0 - gamma
    if num_tasks == 2:
        return weights, 0
    iterations = max_iter
    for iteration in range(1, max_iter + 1):
        new_point = _next_point(weights, -(gram @ weights))
        gram_w, gram_n = gram @ weights, gram @ new_point
        gamma, _ = min_norm_pair(weights @ gram_w, weights @ gram_n, new_point @ gram_n)
        new_weights = gamma * weights + (1.0 - gamma) * new_point
        change = np.abs(new_weights - weights).sum()
        weights = new_weights
        if change < tol:
            iterations = iteration
            break
    return _finish_min_norm(gram, weights), iterations


def _affine_min_norm(gram: np.ndarray, support: list[int]) -> np.ndarray:
    """``argmin ||Σ_{i∈S} y_i g_i||²`` subject to ``Σ y_i = 1`` (y may be negative), by its KKT system
    ``G_SS y = λ 1``, ``1ᵀ y = 1``; least squares picks one solution when the rows are affinely dependent."""
    size = len(support)
    system = np.zeros((size + 1, size + 1))
    system[:size, :size] = gram[np.ix_(support, support)]
    system[:size, size] = -1.0
    system[size, :size] = 1.0
    rhs = np.zeros(size + 1)
    rhs[size] = 1.0
    solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return solution[:size]


def _finish_min_norm(gram: np.ndarray, weights: np.ndarray, opt_tol: float = 1e-12) -> np.ndarray:
    """Finishes the min-norm problem exactly from a feasible ``weights`` with Wolfe's active-set steps
    (Wolfe 1976, "Finding the nearest point in a polytope"): minimise over the affine hull of the
    current support, step back to the simplex when that leaves it, add the most violating row while
    the KKT condition ``(G w)_j ≥ wᵀ G w`` fails. Returns ``weights`` unchanged if it cannot improve."""
    num_tasks = gram.shape[0]
    support = sorted(np.nonzero(weights > 1e-12)[0].tolist())
    current = np.zeros(num_tasks)
    current[support] = weights[support] / weights[support].sum()
    for _ in range(4 * num_tasks + 4):
        target = _affine_min_norm(gram, support)
        if target.min() >= -1e-15:  # the affine minimiser lies in the simplex: take it
            current = np.zeros(num_tasks)
            current[support] = np.clip(target, 0.0, None)
            current /= current.sum()
            gradient = gram @ current
            value = current @ gradient
            outside = [j for j in range(num_tasks) if j not in support]
            if not outside:
                break
            j = min(outside, key=lambda k: gradient[k])
            if gradient[j] >= value - opt_tol:
                break  # KKT holds: optimal
            support = sorted([*support, j])
            continue
        # move from `current` toward `target` until the first weight reaches 0, and drop it
        now = current[support]
        shrinking = target < now
        ratios = now[shrinking] / (now[shrinking] - target[shrinking])
        step = min(1.0, ratios.min())
        moved = now + step * (target - now)
        current = np.zeros(num_tasks)
        current[support] = np.clip(moved, 0.0, None)
        support = [i for i in support if current[i] > 1e-15]
        current /= current.sum()
    if current @ gram @ current <= weights @ gram @ weights:
        return current
    return weights


# -------------------------------------------------------------------------------------------- CAGrad
def cagrad_dual_weights(gram: np.ndarray, c: float, ftol: float = 1e-15, max_iter: int = 500) -> np.ndarray:
    """CAGrad's dual ``w* = argmin_{w∈Δ} g_wᵀ g₀ + c ||g₀|| ||g_w||`` on the Gramian.

    With ``b = 1/K`` (so ``g₀ = Jᵀ b``): ``g_wᵀ g₀ = wᵀ G b``, ``||g_w|| = sqrt(wᵀ G w)``,
    ``||g₀|| = sqrt(bᵀ G b)``. Solved like the reference (SciPy SLSQP from the uniform start, box
    [0, 1] and ``Σ w = 1``) but on the trace-normalised Gramian, with the analytic gradient and a
    tight ``ftol``. Returns ``b`` when ``g₀ = 0`` (then any ``w`` is optimal).
    """
    from scipy.optimize import minimize

    num_tasks = gram.shape[0]
    uniform = np.full(num_tasks, 1.0 / num_tasks)
    trace = np.trace(gram)
    if num_tasks == 1 or not np.isfinite(gram).all() or not trace > 0:
        return uniform
    gram = gram / trace
    linear = gram @ uniform
    mean_sq_norm = uniform @ linear
    if not mean_sq_norm > 1e-20:
        return uniform
    scale = c * np.sqrt(mean_sq_norm)
    smoothing = 1e-16  # keeps sqrt differentiable where g_w = 0

    def objective(w: np.ndarray) -> float:
        return float(w @ linear + scale * np.sqrt(max(w @ gram @ w, 0.0) + smoothing))

    def gradient(w: np.ndarray) -> np.ndarray:
        gram_w = gram @ w
        return linear + scale * gram_w / np.sqrt(max(w @ gram_w, 0.0) + smoothing)

    result = minimize(
        objective,
        uniform,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * num_tasks,
        constraints={"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones_like(w)},
        options={"ftol": ftol, "maxiter": max_iter},
    )
    weights = np.clip(result.x, 0.0, None)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        return uniform
    weights = weights / total
    # SLSQP can stop at a worse point than its start on degenerate problems; never do worse than uniform
    return weights if objective(weights) <= objective(uniform) else uniform


# ---------------------------------------------------------------------------- Nash-MTL and FairGrad
def _potential(weights: np.ndarray, power: float) -> np.ndarray:
    """``φ_p(w)`` with ``φ_p'(w) = w^{-p}``: ``log w`` for p = 1, ``w^{1-p} / (1-p)`` otherwise."""
    if power == 1.0:
        return np.log(weights)
    return weights ** (1.0 - power) / (1.0 - power)


def _optimal_scale(direction: np.ndarray, matrix: np.ndarray, power: float) -> float:
    """``argmin_t f(t u)`` for ``f(w) = ½ wᵀ A w - Σ φ_p(w_i)``: ``t^{1+p} = Σ u_i^{1-p} / uᵀ A u``."""
    quadratic = direction @ matrix @ direction
    return float((np.sum(direction ** (1.0 - power)) / quadratic) ** (1.0 / (1.0 + power)))


def check_power_balance_settings(reg_eps: float, max_iter: int, tol: float) -> None:
    """Checks the `power_balance_weights` settings that Nash-MTL and FairGrad expose (raises `ValueError`)."""
    if not reg_eps >= 0:
        raise ValueError(f"`reg_eps` must be >= 0, got {reg_eps!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}")


def power_balance_weights(
    gram: np.ndarray,
    power: float,
    reg_eps: float,
    start: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[np.ndarray, int, float]:
    """Solves ``(G w)_i = w_i^{-p}``, ``w > 0`` (Nash-MTL: p = 1; FairGrad: p = 1/α) by damped Newton.

    It is the stationarity condition of the strictly convex ``f(w) = ½ wᵀ A w - Σ_i φ_p(w_i)`` with
    ``φ_p' = w^{-p}`` (``log w`` for p = 1), whose Hessian ``A + diag(p w^{-p-1})`` is positive
    definite. ``A`` is the Gramian projected onto the PSD cone (float32 rounding) plus
    ``reg_eps · diag(G)``: the regularisation makes ``f`` bounded below when some non-negative
    combination of the rows vanishes (opposite rows, a zero row), where the equation has no positive
    solution, and is proportional to each task's own squared norm, so it commutes with rescaling a
    task. Rows with ``G_ii ≤ ZERO_ROW_RTOL · max G_jj`` get weight 0 (they cannot satisfy the equation).

    The problem is solved on ``G / trace(G)`` and mapped back by ``w = trace^{-1/(1+p)} ŵ``, so the
    result does not depend on the gradients' overall scale. Newton steps stay inside ``w > 0``
    (fraction to the boundary 0.99) with Armijo backtracking while the Newton decrement exceeds
    1e-6 and full steps below it (the quadratic phase, where ``f``'s rounding would stall Armijo);
    the linear systems are solved with Jacobi scaling, which keeps them well conditioned when the
    rows' norms differ by many orders.

    Args:
        gram: the K x K Gramian (float64).
        power: ``p > 0``.
        reg_eps: relative regularisation ``≥ 0``.
        start: a previous solution (warm start) in the units of ``gram``; the start actually used is
            the better (lower ``f``) of it and the diagonal solution, each optimally rescaled.
        tol: stop when ``max_i |w_i^p (A w)_i - 1| < tol``.
        max_iter: at most this many Newton steps.

    Returns:
        ``(weights, iterations, residual)``, with ``residual = max_i |w_i^p (A w)_i - 1|``.
    """
    num_tasks = gram.shape[0]
    if not np.isfinite(gram).all():
        return np.full(num_tasks, 1.0 / num_tasks), 0, float("nan")
    weights = np.zeros(num_tasks)
    diagonal = np.diag(gram)
    largest = diagonal.max()
    if not largest > 0:
        return weights, 0, 0.0
    keep = diagonal > ZERO_ROW_RTOL * largest
    trace = diagonal[keep].sum()
    sub = gram[np.ix_(keep, keep)] / trace
    matrix = nearest_psd(sub) + reg_eps * np.diag(np.diag(sub))

    def objective(w: np.ndarray) -> float:
        return float(0.5 * w @ matrix @ w - _potential(w, power).sum())

    def residual(w: np.ndarray) -> float:
        return float(np.abs(w**power * (matrix @ w) - 1.0).max())

    candidates = [np.diag(matrix) ** (-1.0 / (1.0 + power))]
    if start is not None:
        previous = np.asarray(start, dtype=np.float64)[keep] * trace ** (1.0 / (1.0 + power))
        if np.all(np.isfinite(previous)) and np.all(previous > 0):
            candidates.append(previous)
    scaled = [u * _optimal_scale(u, matrix, power) for u in candidates]
    current = min(scaled, key=objective)

    iterations = 0
    error = residual(current)
    while error >= tol and iterations < max_iter:
        iterations += 1
        gradient = matrix @ current - current ** (-power)
        hessian = matrix + np.diag(power * current ** (-power - 1.0))
        jacobi = 1.0 / np.sqrt(np.diag(hessian))
        try:
            factor = np.linalg.cholesky(jacobi[:, None] * hessian * jacobi[None, :])
        except np.linalg.LinAlgError:
            break
        step = -jacobi * np.linalg.solve(factor.T, np.linalg.solve(factor, jacobi * gradient))
        slope = gradient @ step
        if not slope < 0:
            break
        shrinking = step < 0
        length = 1.0
        if shrinking.any():
            length = min(1.0, 0.99 * float(np.min(-current[shrinking] / step[shrinking])))
        if -slope > 1e-6:  # damped phase; below, the Newton decrement is small enough for full steps
            value = objective(current)
            while length > 1e-12 and objective(current + length * step) > value + 1e-4 * length * slope:
                length *= 0.5
        if length <= 1e-12:
            break
        current = current + length * step
        error = residual(current)
    weights[keep] = current * trace ** (-1.0 / (1.0 + power))
    return weights, iterations, error


# ------------------------------------------------------------------------------------ ConFIG, IMTL
def cosine_pseudoinverse(gram: Tensor) -> tuple[Tensor, Tensor]:
    """For a float64 Gramian ``G``: the inverse row norms ``N⁻¹`` (``1 / ||g_i||``, 0 for a zero row) and
    the pseudo-inverse of the cosine matrix ``C = N⁻¹ G N⁻¹`` (a zero row's row and column are 0).

    The Gramian is formed in float32 (float64 for float64 input, which may still hold float32
    gradients): ``C⁺`` drops the eigenvalues below ``max eig · K · eps(float32)``, which are noise.
    """
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    nonzero = norms > 0
    inverse_norms = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 0.0)
    cosines = inverse_norms[:, None] * gram * inverse_norms[None, :]
    rtol = gram.shape[0] * torch.finfo(torch.float32).eps
    return inverse_norms, torch.linalg.pinv(cosines, rtol=rtol, hermitian=True)


# -------------------------------------------------------------------------------- UPGrad, DualProj
#: How UPGrad / DualProj regularise the Gramian before the QP (see `project_preferences`).
REGULARIZATIONS = ("trace", "per_task")


def normalize_and_regularize(gram: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """TorchJD's preprocessing (``_utils/gramian.py``): divide by the trace (the squared Frobenius
    norm of J), or replace by 0 when the trace is below ``norm_eps``; then add ``reg_eps · I``.

    Negative eigenvalues (float32 rounding of the Gramian) are clipped to 0 first, so the result is
    positive definite whenever ``reg_eps > 0`` and quadprog always accepts it.
    """
    num_tasks = gram.shape[0]
    trace = np.trace(gram)
    if not trace >= norm_eps or not trace > 0:
        normalized = np.zeros_like(gram)
    else:
        normalized = nearest_psd(gram / trace)
    return normalized + reg_eps * np.eye(num_tasks)


def dual_cone_weights(gram: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """Weights ``v`` with ``Jᵀ v = π_J(Jᵀ u)``, the projection of ``Jᵀ u`` onto the dual cone
    ``{x : J x ≥ 0}``, for each row ``u`` of ``preference`` (shape (..., K)).

    Quinton & Rey (2024), Proposition 1: ``v = argmin_{v ≥ u} vᵀ G v``, a K-variable QP solved with
    quadprog (``min ½ vᵀ G v`` subject to ``I v ≥ u``), as TorchJD's ``_utils/dual_cone.py``.
    ``gram`` must be positive definite (see `normalize_and_regularize`).
    """
    import quadprog

    num_tasks = gram.shape[0]
    linear = np.zeros(num_tasks)
    constraints = np.eye(num_tasks)
    rows = np.atleast_2d(preference)
    solutions = np.stack(
        [quadprog.solve_qp(gram, linear, constraints, np.asarray(u, dtype=np.float64))[0] for u in rows]
    )
    return solutions.reshape(np.shape(preference))


def dual_cone_weights_per_task(gram: np.ndarray, preference: np.ndarray, reg_eps: float) -> np.ndarray:
    """`dual_cone_weights` for ``G + reg_eps · diag(G)`` instead of ``G / trace + reg_eps · I``.

    Solved in correlation form: with ``n_i = ||g_i||`` and ``y = n ⊙ v`` the QP becomes
    ``min yᵀ (C + reg_eps I) y`` subject to ``y ≥ n ⊙ u``, ``C = N⁻¹ G N⁻¹`` (unit diagonal), which is
    well conditioned however much the rows' norms differ, and the relaxation it leaves,
    ``d · g_i ≥ -reg_eps ||g_i|| y_i``, is relative to each task's own norm. Zero rows (see
    ``ZERO_ROW_RTOL``) keep ``v_i = u_i``: they constrain nothing and contribute nothing.
    """
    import quadprog

    diagonal = np.diag(gram)
    rows = np.atleast_2d(preference).astype(np.float64)
    solutions = rows.copy()
    largest = diagonal.max()
    if not largest > 0:
        return solutions.reshape(np.shape(preference))
    keep = diagonal > ZERO_ROW_RTOL * largest
    norms = np.sqrt(diagonal[keep])
    correlation = nearest_psd(gram[np.ix_(keep, keep)] / np.outer(norms, norms)) + reg_eps * np.eye(int(keep.sum()))
    linear = np.zeros(int(keep.sum()))
    constraints = np.eye(int(keep.sum()))
    for solution, u in zip(solutions, rows, strict=True):
        scaled = quadprog.solve_qp(correlation, linear, constraints, norms * u[keep])[0]
        solution[keep] = scaled / norms
    return solutions.reshape(np.shape(preference))


def project_preferences(
    gram: np.ndarray, preference: np.ndarray, norm_eps: float, reg_eps: float, regularization: str
) -> np.ndarray:
    """The dual-cone projection weights of UPGrad / DualProj for each row of ``preference``.

    ``regularization="trace"`` is TorchJD's ``G / trace(G) + reg_eps · I`` (``G`` zeroed below
    ``norm_eps``); ``"per_task"`` is ``G + reg_eps · diag(G)`` (`dual_cone_weights_per_task`), with the
    same ``norm_eps`` rule (a trace below it gives ``v = u``).
    """
    if not np.isfinite(gram).all():
        return np.array(preference, dtype=np.float64)
    if regularization == "trace":
        return dual_cone_weights(normalize_and_regularize(gram, norm_eps, reg_eps), preference)
    trace = np.trace(gram)
    if not trace >= norm_eps or not trace > 0:
        return np.array(preference, dtype=np.float64)
    return dual_cone_weights_per_task(gram / trace, preference, reg_eps)
