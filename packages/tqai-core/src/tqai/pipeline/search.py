"""Genetic-algorithm policy search over pipeline configs (seeded, deterministic).

A pipeline config is a handful of discrete choices (``bits_k``, ``bits_v``, ``scorer``,
``strategy``, thresholds...) whose effect on quality and memory interacts, and whose fitness is
costly (a compression run, a perplexity). :func:`genetic_search` runs a plain generational genetic
algorithm (J. H. Holland, "Adaptation in Natural and Artificial Systems", 1975; operators as in
D. E. Goldberg, "Genetic Algorithms in Search, Optimization and Machine Learning", 1989) over a
user-given search space ``{name: [choice, ...]}`` with a user-given fitness ``genome -> float``
(higher is better, e.g. ``-nmse - lam * bits_per_coord``):

- a genome is one choice per name (a dict), encoded as choice indices;
- tournament selection (the best of ``tournament_size`` genomes drawn at random),
- uniform crossover (each gene from either parent) with probability ``crossover_rate``,
- mutation: each gene is replaced by a different choice with probability ``mutation_rate``
  (default ``1 / len(space)``),
- elitism: the ``elite`` best genomes pass unchanged to the next generation.

Fitness values are cached per genome (the fitness is assumed deterministic), so a genome is never
evaluated twice and ``evaluations`` counts distinct genomes. All randomness comes from
``numpy.random.default_rng(seed)`` and ties are broken by first occurrence, so the same space,
fitness and seed give the same result and history on every run.

Example:
    >>> space = {"bits_k": [2, 3, 4], "bits_v": [2, 3, 4], "scorer": ["palm", "snr"]}
    >>> def fitness(g):
    ...     return -abs(g["bits_k"] - 3) - abs(g["bits_v"] - 2) - (g["scorer"] != "snr")
    >>> result = genetic_search(space, fitness, population_size=8, generations=10, seed=0)
    >>> result.best, result.best_fitness
    ({'bits_k': 3, 'bits_v': 2, 'scorer': 'snr'}, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GenerationRecord", "SearchResult", "genetic_search", "validate_space"]

Genome = dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRecord:
    """One generation of the search.

    Attributes:
        generation: 0 for the initial population.
        best: best genome found so far (over all generations up to this one).
        best_fitness: its fitness.
        population_best: best fitness within this generation's population.
        population_mean: mean fitness of this generation's population (``-inf`` entries count as
            such; ``nan`` if the whole population is ``-inf`` and ``+inf`` mixed).
        evaluations: distinct genomes evaluated so far.
    """

    generation: int
    best: Genome
    best_fitness: float
    population_best: float
    population_mean: float
    evaluations: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchResult:
    """What :func:`genetic_search` returns.

    Attributes:
        best: the best genome found (``{name: choice}``).
        best_fitness: its fitness.
        history: one :class:`GenerationRecord` per generation, the initial population first.
        evaluations: distinct genomes evaluated.
    """

    best: Genome
    best_fitness: float
    history: tuple[GenerationRecord, ...] = field(repr=False)
    evaluations: int


def validate_space(space: object) -> dict[str, list[Any]]:
    """Check a search space and return it as ``{name: list of choices}`` (insertion order kept).

    Raises:
        TypeError: ``space`` is not a mapping, a name is not a string, or a choice list is not a
            list or tuple.
        ValueError: the space is empty, a name is empty, a choice list is empty, or a choice is
            repeated.
    """
    if not isinstance(space, Mapping):
        raise TypeError(
            f"space must be a mapping of name -> list of choices, got {type(space).__name__}"
        )
    if not space:
        raise ValueError("space is empty: give at least one name -> list of choices")
    checked: dict[str, list[Any]] = {}
    for name, choices in space.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"space names must be non-empty strings, got {name!r}")
        if not isinstance(choices, list | tuple):
            raise TypeError(
                f"space[{name!r}] must be a list or tuple of choices, got {type(choices).__name__}"
            )
        if not choices:
            raise ValueError(f"space[{name!r}] has no choices")
        for i, choice in enumerate(choices):
            if any(_same(choice, earlier) for earlier in choices[:i]):
                raise ValueError(f"space[{name!r}] lists the choice {choice!r} more than once")
        checked[name] = list(choices)
    return checked


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # an == that raises (arrays) counts as different
        return False


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _tournament(rng: np.random.Generator, scores: np.ndarray, size: int) -> int:
    """Index of the fittest of ``size`` distinct genomes drawn at random (first on ties)."""
    entrants = rng.choice(scores.size, size=size, replace=False)
    return int(entrants[int(np.argmax(scores[entrants]))])


def genetic_search(
    space: Mapping[str, Sequence[Any]],
    fitness: Callable[[Genome], float],
    *,
    population_size: int = 24,
    generations: int = 30,
    tournament_size: int = 3,
    crossover_rate: float = 0.9,
    mutation_rate: float | None = None,
    elite: int = 2,
    seed: int = 0,
) -> SearchResult:
    """Maximize ``fitness`` over ``space`` with a seeded genetic algorithm (module docstring).

    Args:
        space: ``{name: [choice, ...]}``, e.g. ``{"bits_k": [2, 3, 4], "scorer": ["palm",
            "snr"]}``; see :func:`validate_space`.
        fitness: ``genome -> float``, higher is better; called once per distinct genome with a
            fresh ``{name: choice}`` dict. ``-inf`` marks an infeasible genome; ``nan`` is an
            error.
        population_size: genomes per generation (>= 2).
        generations: generations after the initial population (>= 0).
        tournament_size: genomes per selection tournament (1..population_size).
        crossover_rate: probability that two parents are crossed (uniform crossover).
        mutation_rate: per-gene probability of switching to another choice; default
            ``1 / len(space)``.
        elite: best genomes copied unchanged into the next generation (0..population_size - 1).
        seed: seed of ``numpy.random.default_rng``; the same arguments give the same result.

    Returns:
        The best genome, its fitness and the per-generation history.

    Raises:
        TypeError, ValueError: a bad space or option (the message names it); ``fitness``
            returned a non-number or ``nan``.
    """
    choices = validate_space(space)
    names = list(choices)
    sizes = np.array([len(choices[n]) for n in names])
    population_size = _check_int(population_size, "population_size", 2)
    generations = _check_int(generations, "generations", 0)
    tournament_size = _check_int(tournament_size, "tournament_size", 1)
    if tournament_size > population_size:
        raise ValueError(
            f"tournament_size ({tournament_size}) must not exceed population_size "
            f"({population_size})"
        )
    crossover_rate = _check_rate(crossover_rate, "crossover_rate")
    mutation_rate = _check_rate(
        1 / len(names) if mutation_rate is None else mutation_rate, "mutation_rate"
    )
    elite = _check_int(elite, "elite", 0)
    if elite >= population_size:
        raise ValueError(f"elite ({elite}) must be smaller than population_size")
    if not callable(fitness):
        raise TypeError(f"fitness must be a callable genome -> float, got {fitness!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], float] = {}

    def decode(genes: tuple[int, ...]) -> Genome:
        return {name: choices[name][i] for name, i in zip(names, genes, strict=True)}

    def evaluate(genes: tuple[int, ...]) -> float:
        if genes not in cache:
            value = fitness(decode(genes))
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
                raise TypeError(f"fitness must return a number, got {value!r} for {decode(genes)}")
            if math.isnan(value):
                raise ValueError(f"fitness returned nan for {decode(genes)}")
            cache[genes] = float(value)
        return cache[genes]

    def mutate(genes: np.ndarray) -> np.ndarray:
        for i in np.flatnonzero(rng.random(genes.size) < mutation_rate):
            if sizes[i] > 1:  # shift by 1..size-1: always a different choice
                genes[i] = (genes[i] + rng.integers(1, sizes[i])) % sizes[i]
        return genes

    population = [tuple(int(g) for g in rng.integers(0, sizes)) for _ in range(population_size)]
    best_genes, best_fit = population[0], -math.inf
    history: list[GenerationRecord] = []
    for generation in range(generations + 1):
        scores = np.array([evaluate(genes) for genes in population])
        top = int(np.argmax(scores))  # first occurrence on ties: deterministic
        if scores[top] > best_fit or generation == 0:
            best_genes, best_fit = population[top], float(scores[top])
        with np.errstate(invalid="ignore"):
            mean = float(np.mean(scores))
        history.append(
            GenerationRecord(
                generation=generation,
                best=decode(best_genes),
                best_fitness=best_fit,
                population_best=float(scores[top]),
                population_mean=mean,
                evaluations=len(cache),
            )
        )
        if generation == generations:
            break
        order = np.argsort(-scores, kind="stable")
        children = [population[i] for i in order[:elite]]
        while len(children) < population_size:
            mother = np.array(population[_tournament(rng, scores, tournament_size)])
            father = np.array(population[_tournament(rng, scores, tournament_size)])
            if rng.random() < crossover_rate:
                take = rng.random(len(names)) < 0.5
                mother, father = np.where(take, mother, father), np.where(take, father, mother)
            for child in (mutate(mother), mutate(father)):
                if len(children) < population_size:
                    children.append(tuple(int(g) for g in child))
        population = children
    return SearchResult(
        best=decode(best_genes),
        best_fitness=best_fit,
        history=tuple(history),
        evaluations=len(cache),
    )
