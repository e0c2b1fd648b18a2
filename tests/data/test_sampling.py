"""Task samplers: each strategy's frequencies, exact schedules, and reproducible draws."""

from __future__ import annotations

import math

import pytest
import torch

from hf_mtl.data import SAMPLERS, get_sampler, list_samplers, step_generator

SIZES = [1000, 300, 50]
STEPS = 6000


def _frequencies(sampler, epoch=0, steps=STEPS):
    counts = torch.zeros(len(sampler.sizes), dtype=torch.float64)
    for step in range(steps):
        for group in sampler.draw(step, epoch):
            counts[group] += 1
    return counts / steps


def _assert_close(frequencies, expected, steps=STEPS):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    expected = expected / expected.sum()
    # 5 standard deviations of a binomial frequency: fails by chance with probability < 1e-6
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / steps)
    assert torch.all((frequencies - expected).abs() <= tolerance), (frequencies.tolist(), expected.tolist())


def test_registry():
    assert list_samplers() == ["all", "annealed", "proportional", "round_robin", "temperature", "uniform"]
    with pytest.raises(ValueError, match="unknown task sampling strategy 'sequential'.*all, annealed"):
        get_sampler("sequential", SIZES)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ([], "at least one task group"),
        ([10, 0], "positive integers"),
        ([10, -3], "positive integers"),
        ([2.5], "positive"),
    ],
)
def test_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        get_sampler("proportional", sizes)


def test_bad_temperature():
    with pytest.raises(ValueError, match="`sampling_temperature` must be > 0, got 0"):
        get_sampler("temperature", SIZES, temperature=0)


def test_proportional():
    sampler = get_sampler("proportional", SIZES, seed=1)
    assert torch.allclose(sampler.probabilities(), torch.tensor([1000, 300, 50], dtype=torch.float64) / 1350)
    _assert_close(_frequencies(sampler), SIZES)


def test_temperature_two():
    sampler = get_sampler("temperature", SIZES, seed=2, temperature=2.0)
    expected = [math.sqrt(n) for n in SIZES]  # p ∝ n^(1/T)
    assert torch.allclose(sampler.probabilities(), torch.tensor(expected, dtype=torch.float64) / sum(expected))
    _assert_close(_frequencies(sampler), expected)


def test_temperature_limits():
    # T = 1 is proportional; a very high T tends to uniform
    assert torch.allclose(
        get_sampler("temperature", SIZES, temperature=1.0).probabilities(),
        get_sampler("proportional", SIZES).probabilities(),
    )
    assert torch.allclose(
        get_sampler("temperature", SIZES, temperature=1e6).probabilities(),
        torch.full((3,), 1 / 3, dtype=torch.float64),
        atol=1e-4,
    )


def test_uniform():
    _assert_close(_frequencies(get_sampler("uniform", SIZES, seed=3)), [1, 1, 1])


def test_round_robin_is_exact():
    sampler = get_sampler("round_robin", SIZES)
    assert [sampler.draw(step) for step in range(7)] == [[0], [1], [2], [0], [1], [2], [0]]
    assert [sampler.draw(step, epoch=3) for step in range(3)] == [[0], [1], [2]]


def test_all_draws_every_group():
    sampler = get_sampler("all", SIZES)
    assert all(sampler.draw(step, epoch) == [0, 1, 2] for step in range(50) for epoch in range(3))
    assert sampler.steps_per_epoch([5, 9, 2]) == 9  # one pass over the largest group
    assert get_sampler("uniform", SIZES).steps_per_epoch([5, 9, 2]) == 16  # one pass over all


def test_annealed_exponent():
    sampler = get_sampler("annealed", SIZES, num_epochs=5)
    # α = 1 - 0.8 (e - 1) / (E - 1) for 1-based epochs e = 1..E (Stickland & Murray, 2019)
    assert [round(sampler.exponent(epoch), 10) for epoch in range(5)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert sampler.exponent(9) == pytest.approx(0.2)  # past the last epoch it stays at the last value
    assert get_sampler("annealed", SIZES, num_epochs=1).exponent(0) == 1.0
    for epoch, alpha in ((0, 1.0), (2, 0.6), (4, 0.2)):
        expected = [n**alpha for n in SIZES]
        assert torch.allclose(sampler.probabilities(epoch), torch.tensor(expected, dtype=torch.float64) / sum(expected))
    _assert_close(_frequencies(sampler, epoch=4), [n**0.2 for n in SIZES])
    _assert_close(_frequencies(sampler, epoch=0), SIZES)


@pytest.mark.parametrize("name", ["proportional", "temperature", "uniform", "annealed"])
def test_draws_depend_only_on_seed_epoch_step(name):
    a = get_sampler(name, SIZES, seed=7, num_epochs=3)
    b = get_sampler(name, SIZES, seed=7, num_epochs=3)  # e.g. the sampler of another rank
    steps = list(range(300))
    forward = [a.draw(step, 1) for step in steps]
    assert [b.draw(step, 1) for step in reversed(steps)][::-1] == forward  # any order, any instance
    assert [a.draw(step, 1) for step in steps] == forward  # drawing again repeats (a resumed run)
    other_seed = get_sampler(name, SIZES, seed=8, num_epochs=3)
    assert [other_seed.draw(step, 1) for step in steps] != forward
    assert [a.draw(step, 2) for step in steps] != forward


def test_draws_identical_across_simulated_ranks():
    ranks = [get_sampler("temperature", SIZES, seed=123) for _ in range(4)]
    for step in range(200):
        draws = {tuple(sampler.draw(step)) for sampler in ranks}
        assert len(draws) == 1


def test_step_generator():
    first = torch.rand(4, generator=step_generator(42, 0, 5))
    assert torch.equal(first, torch.rand(4, generator=step_generator(42, 0, 5)))
    assert not torch.equal(first, torch.rand(4, generator=step_generator(43, 0, 5)))
    assert not torch.equal(first, torch.rand(4, generator=step_generator(42, 1, 5)))
    assert not torch.equal(first, torch.rand(4, generator=step_generator(42, 0, 6)))
    # the global RNG is neither used nor disturbed
    state = torch.random.get_rng_state()
    get_sampler("proportional", SIZES).draw(3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_every_registered_sampler_draws_valid_groups():
    for name in list_samplers():
        sampler = SAMPLERS.build(name, sizes=SIZES, seed=0, num_epochs=2)
        probabilities = sampler.probabilities(0)
        assert probabilities.shape == (3,) and torch.all(probabilities > 0)
        for step in range(20):
            groups = sampler.draw(step, 1)
            assert groups and all(0 <= g < 3 for g in groups) and len(set(groups)) == len(groups)
