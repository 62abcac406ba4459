"""Attention-aware codebooks: keep softmax attention scores, not MSE (plugin ``attention_aware``).

APTQ (Guan et al., "APTQ: Attention-aware Post-Training Mixed-Precision Quantization for Large
Language Models", DAC 2024, arXiv:2402.14866) observes that what a quantized key must preserve is
the attention distribution it feeds, not its own squared error. Applied to TurboQuant's scalar
codebook ``C`` (centroids ``c``, decision cells from ``C.boundaries``) the objective is:

**Definition.** Let ``u_1, ..., u_n`` be i.i.d. uniform on ``S^{d-1}`` (rotated unit keys: a Haar
rotation makes any unit key uniform) and ``w`` uniform on ``S^{d-1}`` (a rotated unit query; as
``q.k = (Pi q).(Pi k)`` the query may be taken rotated too), all independent. Exact and quantized
logits are ``l_j = s sqrt(d) (w . u_j)`` and ``l^_j = s sqrt(d) (w . c(u_j))``, where ``c(.)``
replaces every coordinate by its centroid (what ``TurboQuantMSE`` stores; the key norm is kept
apart and, with the query norm and attention's ``1/sqrt(d)``, folds into ``s = logit_scale``, the
standard deviation of each exact logit). Then

    J(C) = E[ KL( softmax(l) || softmax(l^) ) ]        (divergence="kl", the default)
    J(C) = E[ || softmax(l) - softmax(l^) ||_2^2 ]      (divergence="l2")

:func:`sampled_attention_loss` estimates ``J`` directly by sampling keys and queries.

**The form the solver minimizes.** Given ``w``, ``l_j`` and ``l^_j`` are sums over ``d`` weakly
dependent coordinates, so for the head dims of interest the pair is bivariate normal with
covariance ``s^2 [[1, beta], [beta, gamma]]``, where ``beta = d E[T c(T)]`` and
``gamma = d E[c(T)^2]`` for ``T ~ f_d`` (exact moments, :mod:`tqai.codebooks`), the same for every
``w``. Hence ``J(C) = J_inf(beta_C, gamma_C)`` with

    J_inf = E[ KL( softmax(s X) || softmax(s (beta X + sqrt(gamma - beta^2) Z)) ) ],
    X, Z i.i.d. N(0, I_n),

which :class:`AttentionObjective` estimates with a fixed seeded sample (common random numbers).
Unlike a sample of keys, it is a smooth function of the centroids and the boundaries, so the
optimizer cannot overfit the sample's boundary crossings. Lloyd-Max has ``beta = gamma = 1 - D``
(``D`` = its distortion): its logits are the conditional mean of the exact ones given the codes,
and softmax of a conditional mean is sharper than the conditional mean of softmax, so at low bit
widths the KL optimum shrinks the centroids (at 1 bit by about 10% for ``s = 2``).

:func:`attention_aware_codebook` refines Lloyd-Max by CMA-ES (:mod:`tqai.solvers.cmaes`) on
``J_inf``, so it is never worse than Lloyd-Max on that objective.
"""

from __future__ import annotations

import math

import numpy as np

from tqai.codebooks import Codebook, _moments, validate_dim, validate_n_bits
from tqai.solvers.cmaes import cmaes_codebook

__all__ = [
    "DIVERGENCES",
    "AttentionObjective",
    "attention_aware_codebook",
    "logit_moments",
    "sampled_attention_loss",
]

DIVERGENCES = ("kl", "l2")
"""Supported divergences between exact and quantized attention distributions."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _divergence(exact: np.ndarray, quantized: np.ndarray, divergence: str) -> float:
    """Mean over rows of KL(softmax(exact) || softmax(quantized)) or of the squared L2 distance."""
    log_p, log_q = _log_softmax(exact), _log_softmax(quantized)
    p = np.exp(log_p)
    if divergence == "kl":
        return float(np.mean(np.sum(p * (log_p - log_q), axis=-1)))
    return float(np.mean(np.sum((p - np.exp(log_q)) ** 2, axis=-1)))


def _check_options(num_keys: object, logit_scale: object, divergence: object) -> None:
    if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 2:
        raise ValueError(f"num_keys must be an integer >= 2, got {num_keys!r}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, int | float):
        raise TypeError(f"logit_scale must be a positive number, got {logit_scale!r}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def logit_moments(codebook: Codebook) -> tuple[float, float]:
    """``(beta, gamma) = (d E[T c(T)], d E[c(T)^2])`` for ``T ~ f_d`` (exact, float64).

    ``beta`` is the covariance of exact and quantized logits and ``gamma`` the variance of the
    quantized ones, both in units of ``s^2``. Lloyd-Max codebooks have ``beta = gamma = 1 - D``.
    """
    d = codebook.d
    edges = np.concatenate([[-1.0], codebook.boundaries, [1.0]])
    mass, first, _ = (np.diff(m) for m in _moments(edges, d))
    c = codebook.centroids
    return float(d * np.sum(c * first)), float(d * np.sum(c * c * mass))


class AttentionObjective:
    """``J_inf(C)``: the softmax-score loss of a codebook in its Gaussian form (module docstring).

    A fixed, seeded sample of ``num_samples`` softmax rows of ``num_keys`` logits each; calling
    the objective costs two exact moments of the codebook plus one pass over that sample.

    Args:
        d: key size (>= 2); codebooks passed in must be for this ``d``.
        num_samples: rows ``(X, Z)`` in the sample.
        num_keys: keys ``n`` per softmax row.
        logit_scale: standard deviation ``s`` of the exact logits (> 0); larger is peakier.
        divergence: ``"kl"`` (``KL(exact || quantized)``) or ``"l2"``.
        seed: sample seed.

    Example:
        >>> from tqai.codebooks import lloyd_max_codebook
        >>> objective = AttentionObjective(64)
        >>> 0 < objective(lloyd_max_codebook(64, 3)) < objective(lloyd_max_codebook(64, 1))
        True
    """

    def __init__(
        self,
        d: int,
        *,
        num_samples: int = 2048,
        num_keys: int = 32,
        logit_scale: float = 2.0,
        divergence: str = "kl",
        seed: int = 0,
    ) -> None:
        self.d = validate_dim(d)
        _check_options(num_keys, logit_scale, divergence)
        self.num_samples = _check_count(num_samples, "num_samples")
        self.num_keys = num_keys
        self.logit_scale = float(logit_scale)
        self.divergence = divergence
        self.seed = seed
        rng = np.random.default_rng([seed, 0xA77E])
        self._x = rng.standard_normal((num_samples, num_keys))  # (S, n) exact logits / s
        self._z = rng.standard_normal((num_samples, num_keys))  # (S, n) independent noise

    def __repr__(self) -> str:
        return (
            f"AttentionObjective(d={self.d}, num_samples={self.num_samples}, "
            f"num_keys={self.num_keys}, logit_scale={self.logit_scale}, "
            f"divergence={self.divergence!r}, seed={self.seed})"
        )

    def __call__(self, codebook: Codebook) -> float:
        """``J_inf(codebook)`` (float): mean divergence over the sample."""
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook must be a tqai.codebooks.Codebook, got {codebook!r}")
        if codebook.d != self.d:
            raise ValueError(f"codebook is for d={codebook.d}, this objective for d={self.d}")
        beta, gamma = logit_moments(codebook)
        noise = math.sqrt(max(gamma - beta * beta, 0.0))
        s = self.logit_scale
        return _divergence(s * self._x, s * (beta * self._x + noise * self._z), self.divergence)


def sampled_attention_loss(
    codebook: Codebook,
    *,
    num_queries: int = 1024,
    num_keys: int = 32,
    logit_scale: float = 2.0,
    divergence: str = "kl",
    seed: int = 0,
) -> float:
    """Monte Carlo estimate of ``J(C)`` from sampled unit keys and queries (no approximation).

    Samples ``num_queries`` query directions with ``num_keys`` keys each, uniform on
    ``S^{d-1}``, quantizes every key coordinate with ``codebook`` (nearest-centroid cells given by
    its boundaries, a tie goes to the lower cell, as in :func:`tqai.quantizers.nearest_codes`) and
    averages the divergence of the softmax scores. Memory is ``num_queries * num_keys * d``
    float64. Use a seed not used for solving to measure on held-out data.

    Returns:
        The mean divergence (float).
    """
    if not isinstance(codebook, Codebook):
        raise TypeError(f"codebook must be a tqai.codebooks.Codebook, got {codebook!r}")
    _check_options(num_keys, logit_scale, divergence)
    _check_count(num_queries, "num_queries")
    d = codebook.d
    rng = np.random.default_rng([seed, d, 0x5A3])
    keys = rng.standard_normal((num_queries, num_keys, d))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)  # (Q, n, d)
    queries = rng.standard_normal((num_queries, d))
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)  # (Q, d)
    quantized = codebook.centroids[np.searchsorted(codebook.boundaries, keys, side="left")]
    gain = logit_scale * math.sqrt(d)
    exact = gain * np.einsum("qnd,qd->qn", keys, queries)
    approx = gain * np.einsum("qnd,qd->qn", quantized, queries)
    return _divergence(exact, approx, divergence)


def attention_aware_codebook(
    d: int,
    n_bits: int,
    *,
    num_samples: int = 2048,
    num_keys: int = 32,
    logit_scale: float = 2.0,
    divergence: str = "kl",
    seed: int = 0,
    max_evals: int | None = None,
) -> Codebook:
    """A symmetric key codebook minimizing the softmax-score loss (APTQ, arXiv:2402.14866).

    CMA-ES refinement of Lloyd-Max on a seeded :class:`AttentionObjective`, so it is never worse
    than Lloyd-Max on that objective. Meant for keys: values enter attention linearly, so their
    MSE codebook (Lloyd-Max) is already the right one.

    Args:
        d: key size (>= 2).
        n_bits: bits per coordinate, 1..8.
        num_samples, num_keys, logit_scale, divergence: the objective (:class:`AttentionObjective`).
        seed: seed of the objective's sample and of CMA-ES.
        max_evals: CMA-ES objective-call budget (default:
            :func:`tqai.solvers.cmaes.cmaes_codebook`'s).

    Returns:
        A sorted, exactly symmetric :class:`~tqai.codebooks.Codebook` with
        ``kind="attention_aware"``.

    Example:
        >>> from tqai.codebooks import lloyd_max_codebook
        >>> cb = attention_aware_codebook(64, 1)
        >>> sampled_attention_loss(cb, seed=1) < sampled_attention_loss(
        ...     lloyd_max_codebook(64, 1), seed=1
        ... )
        True
    """
    d = validate_dim(d)
    n_bits = validate_n_bits(n_bits)
    objective = AttentionObjective(
        d,
        num_samples=num_samples,
        num_keys=num_keys,
        logit_scale=logit_scale,
        divergence=divergence,
        seed=seed,
    )
    return cmaes_codebook(
        d, n_bits, objective=objective, seed=seed, max_evals=max_evals, kind="attention_aware"
    )
