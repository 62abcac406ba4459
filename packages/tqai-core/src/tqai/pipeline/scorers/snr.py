"""snr: Min-SNR step weighting of token energy for diffusion models.

Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023,
arXiv:2303.09556. The paper weights the denoising loss at timestep ``t`` by
``min(SNR(t), gamma)`` (for x0-prediction; ``/ SNR(t)`` for epsilon-prediction and
``/ (SNR(t) + 1)`` for v-prediction), with ``SNR(t) = alpha_bar(t) / (1 - alpha_bar(t))`` and
``gamma = 5``: steps are weighted by how much their error matters, with low-noise steps clipped so
they cannot dominate.

Here the same weight says how much precision a denoising step deserves. The score of token ``i``
at step ``s`` is the Min-SNR weight of that step times the token's relative energy::

    score_i = w(s) * ||x_i||^2 / mean_j ||x_j||^2

The energy factor ranks tokens within a call (TurboQuant's error of a vector scales with its
squared norm, so high-energy tokens gain most from extra bits); the step weight scales the scores
of a whole step, which matters to anything that compares scores across steps.

Schedules (all continuous in the training timestep ``t in [0, num_train_timesteps - 1]``):

- ``"cosine"`` (Nichol & Dhariwal, arXiv:2102.09672):
  ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, ``s = 0.008``.
- ``"linear"`` (Ho et al., DDPM, arXiv:2006.11239): betas linear from 1e-4 to 0.02,
  ``alpha_bar = cumprod(1 - beta)`` (interpolated between integer timesteps).
- ``"flow"`` (rectified flow, used by Wan 2.x): ``x_t = (1 - sigma) x_0 + sigma eps``,
  ``SNR = ((1 - sigma) / sigma)^2``, with the ``shift`` of diffusers'
  ``FlowMatchEulerDiscreteScheduler``: ``sigma' = shift sigma / (1 + (shift - 1) sigma)``.

Sampling step ``s`` of ``num_steps`` runs from the noisiest timestep (``s = 0``) to the cleanest
(``s = num_steps - 1``) evenly. The weights are host-side float64 scalars (one per step).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from tqai import _xp
from tqai.pipeline import _ops

__all__ = ["PREDICTIONS", "SCHEDULES", "SnrScorer", "min_snr_weight", "snr"]

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "flow")
PREDICTIONS: tuple[str, ...] = ("epsilon", "x0", "v")
_COSINE_S = 0.008
_SNR_FLOOR = 1e-12


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def snr(
    t: Any,
    *,
    schedule: str = "cosine",
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
) -> np.ndarray:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at training timesteps ``t``.

    Args:
        t: timesteps in ``[0, num_train_timesteps - 1]`` (scalar or array; fractional allowed).
        schedule: ``"cosine"``, ``"linear"`` or ``"flow"``.
        num_train_timesteps: ``T`` of the schedule.
        shift: timestep shift of the ``"flow"`` schedule (1 = none).

    Returns:
        float64 numpy array of ``t``'s shape, strictly decreasing in ``t``.
    """
    _check_choice("schedule", schedule, SCHEDULES)
    n = int(num_train_timesteps)
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, n - 1)
    if schedule == "cosine":

        def f(u: np.ndarray) -> np.ndarray:
            return np.cos((u / n + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2

        alpha_bar = f(t) / f(np.zeros(()))
    elif schedule == "linear":
        betas = np.linspace(1e-4, 0.02, n)
        alpha_bar = np.interp(t, np.arange(n), np.cumprod(1.0 - betas))
    else:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        sigma = (t + 1) / n  # sigma in [1/T, 1], as diffusers' flow-matching timesteps
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        alpha_bar = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    alpha_bar = np.clip(alpha_bar, 0.0, 1.0 - 1e-12)
    return np.maximum(alpha_bar / (1.0 - alpha_bar), _SNR_FLOOR)


def min_snr_weight(snr_value: Any, *, gamma: float = 5.0, prediction: str = "epsilon") -> Any:
    """The Min-SNR-gamma loss weight of arXiv:2303.09556 for a given SNR.

    ``min(SNR, gamma)`` for x0-prediction, ``min(SNR, gamma) / SNR`` for epsilon-prediction and
    ``min(SNR, gamma) / (SNR + 1)`` for v-prediction.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    s = np.asarray(snr_value, dtype=np.float64)
    clipped = np.minimum(s, gamma)
    if prediction == "x0":
        return clipped
    return clipped / s if prediction == "epsilon" else clipped / (s + 1.0)


class SnrScorer:
    """Min-SNR weight of the denoising step times each token's relative energy.

    Args:
        schedule: ``"cosine"`` (default), ``"linear"`` or ``"flow"``.
        num_steps: sampling steps of the pipeline (step 0 is the noisiest).
        gamma: the Min-SNR clip (5 in the paper).
        prediction: the model's target: ``"epsilon"``, ``"x0"`` or ``"v"``.
        num_train_timesteps: ``T`` of the training schedule (1000 for DDPM-style models).
        shift: flow-matching timestep shift (``"flow"`` only; Wan uses 3 to 5).

    A call without a step (``step=None``) uses weight 1; steps past ``num_steps - 1`` use the
    last step's weight.

    Example:
        >>> scorer = SnrScorer(schedule="cosine", num_steps=50)
        >>> w = [scorer.step_weight(s) for s in (0, 25, 49)]
        >>> w[0] >= w[1] >= w[2]          # epsilon-prediction: clean steps are clipped down
        True
    """

    name: ClassVar[str] = "snr"
    description: ClassVar[str] = "Min-SNR step weight x relative token energy (arXiv:2303.09556)"

    def __init__(
        self,
        *,
        schedule: str = "cosine",
        num_steps: int = 50,
        gamma: float = 5.0,
        prediction: str = "epsilon",
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
    ) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        self.schedule = _check_choice("schedule", schedule, SCHEDULES)
        self.prediction = _check_choice("prediction", prediction, PREDICTIONS)
        self.num_steps = num_steps
        self.gamma = float(gamma)
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        steps = np.arange(num_steps, dtype=np.float64)
        self.weights = min_snr_weight(
            snr(
                self.timestep(steps),
                schedule=schedule,
                num_train_timesteps=self.num_train_timesteps,
                shift=self.shift,
            ),
            gamma=self.gamma,
            prediction=prediction,
        )

    def timestep(self, step: Any) -> np.ndarray:
        """Training timestep of sampling step(s) ``step``: ``T - 1`` at step 0 down to 0."""
        last = self.num_train_timesteps - 1
        if self.num_steps == 1:
            return np.full(np.shape(step), float(last))
        return last * (1.0 - np.asarray(step, dtype=np.float64) / (self.num_steps - 1))

    def step_weight(self, step: int | None) -> float:
        """The Min-SNR weight of sampling step ``step`` (1 for ``None``)."""
        if step is None:
            return 1.0
        return float(self.weights[min(max(int(step), 0), self.num_steps - 1)])

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """``(..., T, D) -> (..., T)``: ``step_weight(step) * energy / mean energy``."""
        _ops.check_tokens(x, "snr")
        xp = _xp.namespace(x)
        energy = _ops.token_energy(x, xp=xp)
        mean = xp.mean(energy)
        relative = energy / xp.where(mean > 0, mean, xp.ones_like(mean))
        return relative * self.step_weight(step)

    def reset(self) -> None:
        """Stateless: nothing to forget."""
