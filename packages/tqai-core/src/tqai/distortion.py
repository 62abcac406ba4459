"""Measured vs theoretical distortion of TurboQuant, the table of the paper's Theorems 1 and 2.

For unit vectors (arXiv:2504.19874, Section 3):

- mse: ``D_mse = E||x - x~||^2``; the theory of a codebook is its exact Lloyd-Max distortion at
  that ``d`` (:func:`tqai.codebooks.codebook_distortion`); the paper rounds it to
  0.36 / 0.117 / 0.03 / 0.009 for b = 1..4.
- prod: ``d * E(<y, x> - <y, x~>)^2`` for independent random unit ``x`` and ``y``; its theory is
  ``(pi / 2) * D_mse(b - 1)`` (the QJL stage's variance on the MSE residual), ``pi / 2`` at b = 1;
  the paper rounds it to 1.57 / 0.56 / 0.18 / 0.047.
- lower bound: ``4^-b``, Shannon's bound for any quantizer of the unit sphere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from tqai.codebooks import codebook_distortion, lloyd_max_codebook
from tqai.quantizers import TurboQuantMSE, TurboQuantProd

__all__ = [
    "PAPER_MSE",
    "PAPER_PROD",
    "distortion_rows",
    "measure_distortion",
    "theory_distortion",
]

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_PROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}
_BATCH = 4096


def _unit_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def theory_distortion(quantizer: str, d: int, n_bits: int) -> float:
    """The exact expected distortion of the Lloyd-Max TurboQuant quantizer at ``d``, ``n_bits``."""
    if quantizer == "mse":
        return codebook_distortion(lloyd_max_codebook(d, n_bits))
    if quantizer == "prod":
        if n_bits == 1:
            return math.pi / 2
        return math.pi / 2 * codebook_distortion(lloyd_max_codebook(d, n_bits - 1))
    raise ValueError(f"quantizer must be 'mse' or 'prod', got {quantizer!r}")


def measure_distortion(
    quantizer: str, d: int, n_bits: int, *, rotation: str = "haar", n_vectors: int, seed: int = 0
) -> float:
    """Monte-Carlo distortion over ``n_vectors`` random unit vectors (float32, numpy backend)."""
    if n_vectors < 1:
        raise ValueError(f"n_vectors must be >= 1, got {n_vectors}")
    if quantizer == "mse":
        q = TurboQuantMSE(d, n_bits, rotation=rotation, seed=seed)
    elif quantizer == "prod":
        q = TurboQuantProd(d, n_bits, rotation=rotation, seed=seed)
    else:
        raise ValueError(f"quantizer must be 'mse' or 'prod', got {quantizer!r}")
    rng = np.random.default_rng([seed, d, n_bits, 0xD157])
    total = 0.0
    for start in range(0, n_vectors, _BATCH):
        n = min(_BATCH, n_vectors - start)
        x = _unit_vectors(rng, n, d)
        x_hat = q.dequantize(q.quantize(x)).astype(np.float64)
        if quantizer == "mse":
            total += float(np.sum((x_hat - x) ** 2))
        else:
            y = _unit_vectors(rng, n, d).astype(np.float64)
            err = np.sum(y * x, axis=-1) - np.sum(y * x_hat, axis=-1)
            total += float(np.sum(err**2)) * d
    return total / n_vectors


def distortion_rows(
    d: int,
    bits: Iterable[int],
    rotations: Iterable[str],
    n_vectors: int,
    *,
    seed: int = 0,
    quantizers: Iterable[str] = ("mse", "prod"),
    progress: Callable[[], None] | None = None,
) -> list[dict]:
    """One row per (quantizer, rotation, bits): measured, theory, paper and lower bound.

    ``progress`` (if given) is called once after every finished row.
    """
    rows = []
    for quantizer in quantizers:
        paper = PAPER_MSE if quantizer == "mse" else PAPER_PROD
        for rotation in rotations:
            for b in bits:
                measured = measure_distortion(
                    quantizer, d, b, rotation=rotation, n_vectors=n_vectors, seed=seed
                )
                rows.append(
                    {
                        "quantizer": quantizer,
                        "rotation": rotation,
                        "d": d,
                        "bits": b,
                        "measured": measured,
                        "theory": theory_distortion(quantizer, d, b),
                        "paper": paper.get(b),
                        "lower_bound": 4.0**-b,
                    }
                )
                if progress is not None:
                    progress()
    return rows
