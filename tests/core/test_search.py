"""GA policy search over pipeline configs: determinism, optimality, bookkeeping, bad input."""

from __future__ import annotations

import math

import pytest

from tqai.pipeline.search import genetic_search, validate_space

SPACE = {
    "bits_k": [2, 3, 4, 5],
    "bits_v": [2, 3, 4],
    "scorer": ["palm", "snr", "fisher", "sheaf", "bsa"],
    "strategy": ["tiered", "delta", "delta2", "window"],
    "threshold": [0.1, 0.2, 0.3, 0.5, 0.8],
    "skip_first": [True, False],
}


def _tradeoff(genome: dict) -> float:
    """A stand-in for -(nmse) - lambda * bits with interacting genes."""
    nmse = 2.0 ** (-genome["bits_k"]) + 2.0 ** (-genome["bits_v"])
    nmse *= {"palm": 1.0, "snr": 0.9, "fisher": 1.1, "sheaf": 0.95, "bsa": 1.05}[genome["scorer"]]
    nmse *= 0.8 if genome["strategy"] == "delta2" and genome["threshold"] <= 0.3 else 1.0
    bits = genome["bits_k"] + genome["bits_v"] - 0.5 * genome["skip_first"]
    return -nmse - 0.01 * bits


def test_fixed_seed_returns_the_same_best_genome_and_history():
    first = genetic_search(SPACE, _tradeoff, seed=11, generations=15)
    again = genetic_search(SPACE, _tradeoff, seed=11, generations=15)
    assert first.best == again.best
    assert first.best_fitness == again.best_fitness
    assert first.history == again.history
    assert first.evaluations == again.evaluations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_optimum_of_a_separable_fitness(seed):
    targets = {f"g{i}": (3 * i + seed) % 7 for i in range(6)}
    space = {name: list(range(7)) for name in targets}  # 7**6 = 117649 genomes

    def fitness(genome: dict) -> float:
        return -sum((genome[n] - t) ** 2 for n, t in targets.items())

    result = genetic_search(space, fitness, population_size=30, generations=40, seed=seed)
    assert result.best == targets
    assert result.best_fitness == 0.0
    assert result.evaluations < 7**6 // 50  # it searched, it did not enumerate


def test_history_is_monotone_and_counts_distinct_evaluations():
    calls: list[dict] = []

    def fitness(genome: dict) -> float:
        calls.append(genome)
        return _tradeoff(genome)

    result = genetic_search(SPACE, fitness, population_size=12, generations=10, elite=2, seed=4)
    assert len(result.history) == 11
    assert [r.generation for r in result.history] == list(range(11))
    best = [r.best_fitness for r in result.history]
    assert best == sorted(best)
    for earlier, later in zip(result.history, result.history[1:], strict=False):
        assert later.population_best >= earlier.population_best  # the elite survives
    assert result.evaluations == len(calls) == result.history[-1].evaluations
    assert len({tuple(g.items()) for g in calls}) == len(calls)  # never the same genome twice
    assert result.best_fitness == _tradeoff(result.best)


def test_infeasible_genomes_are_avoided():
    def fitness(genome: dict) -> float:
        if genome["bits_k"] + genome["bits_v"] > 6:
            return -math.inf  # over the memory budget
        return _tradeoff(genome)

    result = genetic_search(SPACE, fitness, population_size=16, generations=20, seed=0)
    assert result.best["bits_k"] + result.best["bits_v"] <= 6
    assert math.isfinite(result.best_fitness)


def test_single_choice_genes_and_tuple_choices():
    space = {"bits_k": (4,), "strategy": ("tiered", "delta")}
    result = genetic_search(
        space, lambda g: float(g["strategy"] == "delta"), population_size=4, generations=3
    )
    assert result.best == {"bits_k": 4, "strategy": "delta"}


@pytest.mark.parametrize(
    ("space", "error", "match"),
    [
        ([("bits_k", [2, 3])], TypeError, "space must be a mapping"),
        ({}, ValueError, "space is empty"),
        ({"bits_k": []}, ValueError, r"space\['bits_k'\] has no choices"),
        ({"bits_k": "234"}, TypeError, r"space\['bits_k'\] must be a list or tuple"),
        ({"bits_k": 3}, TypeError, "must be a list or tuple"),
        ({3: [1, 2]}, TypeError, "names must be non-empty strings"),
        ({"": [1, 2]}, TypeError, "names must be non-empty strings"),
        ({"bits_k": [2, 3, 2]}, ValueError, "lists the choice 2 more than once"),
    ],
)
def test_bad_search_spaces_give_clear_errors(space, error, match):
    with pytest.raises(error, match=match):
        validate_space(space)
    with pytest.raises(error, match=match):
        genetic_search(space, _tradeoff)


def test_equal_choices_of_different_types_are_distinct():
    assert validate_space({"x": [1, 1.0, True]}) == {"x": [1, 1.0, True]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population_size": 1}, "population_size"),
        ({"generations": -1}, "generations"),
        ({"tournament_size": 0}, "tournament_size"),
        ({"population_size": 4, "tournament_size": 5}, "must not exceed population_size"),
        ({"crossover_rate": 1.5}, "crossover_rate"),
        ({"mutation_rate": -0.1}, "mutation_rate"),
        ({"population_size": 4, "elite": 4}, "elite"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_give_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        genetic_search(SPACE, _tradeoff, **kwargs)


@pytest.mark.parametrize(
    ("fitness", "error", "match"),
    [
        (lambda g: math.nan, ValueError, "fitness returned nan"),
        (lambda g: "good", TypeError, "fitness must return a number"),
        ("not callable", TypeError, "fitness must be a callable"),
    ],
)
def test_bad_fitness_gives_clear_errors(fitness, error, match):
    with pytest.raises(error, match=match):
        genetic_search(SPACE, fitness, population_size=4, generations=1)
