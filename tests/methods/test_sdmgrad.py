"""SDMGrad (official ``OptMN-Lab/sdmgrad`` ``SDMGrad.sdmgrad``; LibMTL ``SDMGrad.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_mtl.methods import get_method


def euclidean_proj_simplex(v: np.ndarray, s: float = 1.0) -> np.ndarray:
    """The official code's simplex projection, line by line (``np.alltrue`` is ``np.all`` today)."""
    v = v.astype(np.float64)
    (n,) = v.shape
    if v.sum() == s and np.all(v >= 0):
        return v
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - s))[0][-1]
    theta = float(cssv[rho] - s) / (rho + 1)
    return (v - theta).clip(min=0)


class ReferenceSDMGrad:
    """``SDMGrad.sdmgrad`` with ``zeta = xi1 = xi2 = J`` (rows = tasks), LibMTL's clamped diagonal in
    the scale normalisation, and the official ``overwrite_grad``'s factor K."""

    def __init__(self, num_tasks: int, lamda: float, niter: int) -> None:
        self.w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        self.lamda, self.niter = lamda, niter

    def update(self, jacobian: torch.Tensor) -> torch.Tensor:
        GG = jacobian @ jacobian.T
        GG_diag = torch.where(torch.diag(GG) < 0, torch.zeros_like(torch.diag(GG)), torch.diag(GG))
        scale = torch.mean(torch.sqrt(GG_diag))
        GG = GG / scale.pow(2)  # LibMTL adds 1e-8 here; hf_mtl does not (scale-free)
        Gg = torch.mean(GG, dim=1)
        w = self.w.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([w], lr=10, momentum=0.5)
        for _ in range(self.niter):
            optimizer.zero_grad()
            w.grad = torch.mv(GG, w.detach()) + self.lamda * Gg
            optimizer.step()
            w.data.copy_(torch.from_numpy(euclidean_proj_simplex(w.data.numpy())))
        self.w = w.detach()
        g0 = torch.mean(jacobian, dim=0)
        gw = (jacobian * self.w.view(-1, 1)).sum(0)
        return jacobian.shape[0] * (gw + self.lamda * g0) / (1 + self.lamda)


@pytest.mark.parametrize("lamda", [0.3, 0.0, 2.0])
def test_matches_reference_over_steps(lamda: float) -> None:
    generator = torch.Generator().manual_seed(0)
    reference = ReferenceSDMGrad(3, lamda=lamda, niter=20)
    method = get_method("sdmgrad", lamda=lamda)
    for _ in range(5):
        jacobian = torch.randn(3, 8, generator=generator, dtype=torch.float64)
        expected = reference.update(jacobian)
        # in float64 the weights agree to rounding; ``aggregate`` forms the Gramian in float32, and
        # the inner SGD (step 10) amplifies that rounding, so it is compared through the weights
        weights = method.weights_from_gramian(jacobian @ jacobian.T)
        assert torch.allclose(weights @ jacobian, expected, atol=1e-9)
        assert torch.allclose(method.task_weights, reference.w, atol=1e-10)


def test_weights_do_not_depend_on_the_scale_of_the_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    jacobian = torch.randn(3, 6, generator=generator, dtype=torch.float64) * 1e-4  # fine-tuning-sized
    small, large = get_method("sdmgrad"), get_method("sdmgrad")
    for _ in range(3):
        small_weights = small.weights_from_gramian(jacobian @ jacobian.T)
        large_weights = large.weights_from_gramian(1e10 * jacobian @ jacobian.T)
        assert torch.allclose(small_weights, large_weights, atol=1e-9)


def test_limits_of_lambda() -> None:
    generator = torch.Generator().manual_seed(2)
    jacobian = torch.randn(2, 5, generator=generator)
    # λ → ∞: the average direction (times K, i.e. the sum of the rows)
    method = get_method("sdmgrad", lamda=1e8)
    assert torch.allclose(method.aggregate(jacobian), jacobian.sum(dim=0), atol=1e-5)
    # λ = 0: w converges to MGDA's min-norm point (closed form for two rows)
    g1, g2 = jacobian
    closed_form = float(((g2 - g1) @ g2) / (g1 - g2).norm() ** 2)
    expected = 2 * torch.tensor([closed_form, 1 - closed_form]).clamp(0, 2)
    method = get_method("sdmgrad", lamda=0.0, lr=1.0)
    for _ in range(30):
        method.aggregate(jacobian)
    assert torch.allclose(method.last_weights, expected, atol=1e-3)


def test_cross_gramian_and_single_task() -> None:
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    weights = get_method("sdmgrad").weights_from_gramian(first @ second.T)
    assert torch.isfinite(weights).all() and torch.isclose(weights.sum(), torch.tensor(3.0))
    row = torch.randn(1, 4, generator=generator)
    assert torch.allclose(get_method("sdmgrad").aggregate(row), row[0])


def test_errors_name_the_argument() -> None:
    for field, value in (("lamda", -1.0), ("n_iter", 0), ("lr", 0.0), ("momentum", 1.0)):
        with pytest.raises(ValueError, match=f"`{field}`"):
            get_method("sdmgrad", **{field: value})
