"""GradVac (docs/methods.md, "GradVac"): corrections to the cosine target, the EMA, the groups."""

from __future__ import annotations

import math

import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import assert_private_generator_resumes


def _gradvac_reference(jacobian: torch.Tensor, phi_hat: torch.Tensor, beta: float, generator: torch.Generator):
    """The paper's loop on the rows themselves (one group), drawing the orders as hf_mtl does."""
    rows = jacobian.to(torch.float64)
    projected = rows.clone()
    num_tasks = rows.shape[0]
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        for position in torch.randperm(len(others), generator=generator).tolist():
            j = others[position]
            phi = projected[i] @ rows[j] / (projected[i].norm() * rows[j].norm())
            target = phi_hat[i, j]
            if phi < target:
                scale = (target * (1 - phi**2).sqrt() - phi * (1 - target**2).sqrt()) / (1 - target**2).sqrt()
                projected[i] += rows[j] * projected[i].norm() * scale / rows[j].norm()
            phi_hat[i, j] = (1 - beta) * target + beta * phi
    return projected.sum(dim=0)


def test_first_step_on_two_tasks_is_pcgrad() -> None:
    # φ̂ = 0: a conflicting pair is corrected to cosine 0, i.e. projected as PCGrad does
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        jacobian = torch.randn(2, 6, generator=generator)
        torch.testing.assert_close(
            get_method("gradvac", num_tasks=2).aggregate(jacobian), get_method("pcgrad").aggregate(jacobian)
        )


def test_correction_to_a_positive_target_by_hand() -> None:
    # g1 ⊥ g2, φ̂ = 0.5: w = ||g1|| (0.5 · 1 - 0 · √0.75) / (||g2|| √0.75) = 1/√3, and cos(g1 + w g2, g2) = 0.5
    method = get_method("gradvac", num_tasks=2)
    method.phi_hat = torch.full((2, 2, 1), 0.5)
    update = method.aggregate(torch.eye(2))
    torch.testing.assert_close(update, torch.full((2,), 1 + 1 / math.sqrt(3)))
    # the EMA then moves toward the observed cosine 0: 0.5 · 0.5 + 0.5 · 0
    torch.testing.assert_close(method.phi_hat[0, 1, 0], torch.tensor(0.25))


def test_corrected_rows_reach_the_target_cosine() -> None:
    jacobian = torch.randn(2, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    method = get_method("gradvac", num_tasks=2)
    targets = torch.tensor([[0.0, 0.9], [0.8, 0.0]])
    method.phi_hat = targets[:, :, None].clone()
    method.aggregate(jacobian)
    # with two tasks the weights separate: g1^PC = g1 + (w2 - 1) g2 and g2^PC = g2 + (w1 - 1) g1
    w = method.last_weights.double()
    first, second = jacobian[0] + (w[1] - 1) * jacobian[1], jacobian[1] + (w[0] - 1) * jacobian[0]
    cosine = lambda a, b: a @ b / (a.norm() * b.norm())  # noqa: E731
    torch.testing.assert_close(cosine(first, jacobian[1]), torch.tensor(0.9, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(cosine(second, jacobian[0]), torch.tensor(0.8, dtype=torch.float64), rtol=0, atol=1e-5)


def test_ema_follows_every_pair() -> None:
    # agreeing rows (cos 0.6): no correction, the EMA still moves to β · 0.6 (paper, TorchJD; not LibMTL)
    agreeing = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    method = get_method("gradvac", num_tasks=2)
    torch.testing.assert_close(method.aggregate(agreeing), agreeing.sum(dim=0))
    torch.testing.assert_close(method.phi_hat[:, :, 0], torch.tensor([[0.0, 0.3], [0.3, 0.0]]))
    # conflicting rows (cos -0.6): corrected, and φ̂ = 0.5 · (-0.6)
    conflicting = torch.tensor([[1.0, 0.0], [-0.6, 0.8]])
    method = get_method("gradvac", num_tasks=2, beta=0.5)
    method.aggregate(conflicting)
    torch.testing.assert_close(method.phi_hat[:, :, 0], torch.tensor([[0.0, -0.3], [-0.3, 0.0]]))


def test_matches_the_reference_loop_over_several_steps() -> None:
    generator = torch.Generator().manual_seed(2)
    method = get_method("gradvac", num_tasks=4, beta=0.3)
    phi_hat = torch.zeros(4, 4, dtype=torch.float64)
    for step in range(4):
        jacobian = torch.randn(4, 9, generator=generator, dtype=torch.float64)
        update = method.aggregate(jacobian, generator=torch.Generator().manual_seed(step))
        expected = _gradvac_reference(jacobian, phi_hat, 0.3, torch.Generator().manual_seed(step))
        # hf_mtl forms the Gramians in float32
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.phi_hat[:, :, 0].double(), phi_hat, rtol=1e-5, atol=1e-6)


LAYOUT = [("a.weight", 2), ("a.bias", 1), ("b.weight", 3)]


@pytest.mark.parametrize(
    ("group_type", "blocks"),
    [("whole", [(0, 6)]), ("layer", [(0, 3), (3, 6)]), ("matrix", [(0, 2), (2, 3), (3, 6)])],
)
def test_groups_act_on_their_columns(group_type: str, blocks: list[tuple[int, int]]) -> None:
    jacobian = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    method = get_method("gradvac", num_tasks=2, group_type=group_type)
    method.bind_parameter_layout(LAYOUT)
    update = method.aggregate(jacobian)
    assert method.phi_hat.shape == (2, 2, len(blocks))
    # with two tasks there is no order to draw: each group is GradVac on its own columns
    expected = torch.cat([get_method("gradvac", num_tasks=2).aggregate(jacobian[:, s:e]) for s, e in blocks])
    torch.testing.assert_close(update, expected)


def test_layer_groups_follow_module_names() -> None:
    # a module's weight and bias form one group; a parameter without a module prefix is its own group
    layout = [("enc.0.weight", 4), ("enc.0.bias", 2), ("enc.1.weight", 4), ("scale", 1), ("x.w", 0)]
    method = get_method("gradvac", group_type="layer")
    method.bind_parameter_layout(layout)
    jacobian = torch.randn(2, 11, generator=torch.Generator().manual_seed(5))
    update = method.aggregate(jacobian)
    assert method.phi_hat.shape == (2, 2, 3)
    expected = torch.cat([get_method("gradvac").aggregate(jacobian[:, s:e]) for s, e in [(0, 6), (6, 10), (10, 11)]])
    torch.testing.assert_close(update, expected)


def test_state_loads_into_a_fresh_instance() -> None:
    generator = torch.Generator().manual_seed(4)
    method = get_method("gradvac", num_tasks=3, group_type="layer")
    method.bind_parameter_layout(LAYOUT)
    for seed in range(3):
        method.aggregate(torch.randn(3, 6, generator=generator), generator=torch.Generator().manual_seed(seed))
    restored = get_method("gradvac", num_tasks=3, group_type="layer")
    restored.load_state_dict(method.state_dict())  # before any call, before the layout is bound
    restored.bind_parameter_layout(LAYOUT)
    jacobian = torch.randn(3, 6, generator=generator)
    torch.testing.assert_close(
        restored.aggregate(jacobian, generator=torch.Generator().manual_seed(9)),
        method.aggregate(jacobian, generator=torch.Generator().manual_seed(9)),
    )
    mismatched = get_method("gradvac", num_tasks=3, group_type="matrix")
    mismatched.load_state_dict(method.state_dict())
    mismatched.bind_parameter_layout(LAYOUT)
    with pytest.raises(ValueError, match=r"`phi_hat` has shape \(3, 3, 2\), this call needs \(3, 3, 3\)"):
        mismatched.aggregate(jacobian)


def test_absent_tasks_keep_their_targets() -> None:
    method = get_method("gradvac", num_tasks=3)
    method.aggregate(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), task_ids=torch.tensor([2, 0]))
    expected = torch.zeros(3, 3)
    expected[2, 0] = expected[0, 2] = 0.3
    torch.testing.assert_close(method.phi_hat[:, :, 0], expected)
    with pytest.raises(ValueError, match="`num_tasks` is required"):
        get_method("gradvac").aggregate(torch.eye(2), task_ids=torch.tensor([0, 1]))


def test_order_from_the_generator_and_seed() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-2.0, -2.0], [-2.0, -1.0]])
    outputs = {
        tuple(get_method("gradvac").aggregate(jacobian, generator=torch.Generator().manual_seed(s)).tolist())
        for s in range(20)
    }
    assert len(outputs) > 1
    assert_private_generator_resumes("gradvac", jacobian, seed=5, restored_seed=6, calls=1, checks=4)


def test_positively_homogeneous_and_zero_rows() -> None:
    jacobian = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    update = get_method("gradvac").aggregate(jacobian, generator=torch.Generator().manual_seed(0))
    scaled = get_method("gradvac").aggregate(1e3 * jacobian, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled, 1e3 * update)
    # a zero row has no cosine: no correction and no EMA update for its pairs
    method = get_method("gradvac")
    torch.testing.assert_close(method.aggregate(torch.tensor([[1.0, 2.0], [0.0, 0.0]])), torch.tensor([1.0, 2.0]))
    assert torch.equal(method.phi_hat, torch.zeros(2, 2, 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 1.5}, "`beta`"), ({"group_type": "block"}, "`group_type`"), ({"seed": 1.0}, "`seed`")],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("gradvac", **kwargs)


def test_layout_must_cover_the_columns() -> None:
    method = get_method("gradvac")
    method.bind_parameter_layout(LAYOUT)
    with pytest.raises(ValueError, match="`jacobian` has 5 columns"):
        method.aggregate(torch.randn(2, 5))
