"""fisher: the runtime ``mean(x^2)`` proxy for diagonal-Fisher token importance.

The diagonal Fisher information of an activation ``x_i`` is ``F_i = E[(dL/dx_i)^2]``, and the
second-order estimate of the loss increase from perturbing it by ``delta_i`` is
``F_i * delta_i^2 / 2`` (LeCun et al., "Optimal Brain Damage", NeurIPS 1989). Gradients are not
available during inference, so this scorer uses the activation energy instead::

    score_i = mean_d x_id^2

It is free, stateless and works on any stream, and it does capture one real effect: TurboQuant's
error of a vector scales with its squared norm, so a high-energy token loses more in absolute
terms.

Known weakness (kept on purpose, and measured in tests/core/test_pipeline_scorers.py): it tracks
*magnitude*, not *sensitivity*. The gradient factor ``(dL/dx_i)^2`` is missing entirely, so

- scaling a token by ``c`` scales its score by ``c^2`` although TurboQuant's *relative* error of
  that token does not change at all;
- a value vector with a large norm that no query attends to has a large score and zero effect
  on the attention output (its sensitivity is ``a_i^2 ||v_i||^2`` with attention weight
  ``a_i ~ 0``), so bits routed by this score can go exactly where they matter least.

``fisher_static`` (offline gradients, per layer and head) fixes the missing factor.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops

__all__ = ["FisherScorer"]


class FisherScorer:
    """Runtime diagonal-Fisher proxy: each token's mean squared activation.

    Example:
        >>> import numpy as np
        >>> x = np.ones((1, 3, 4), dtype=np.float32)
        >>> x[0, 1] *= 10
        >>> FisherScorer().score(x).tolist()
        [[1.0, 100.0, 1.0]]
    """

    name: ClassVar[str] = "fisher"
    description: ClassVar[str] = (
        "runtime mean(x^2) Fisher proxy (tracks magnitude, not sensitivity)"
    )

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """``(..., T, D) -> (..., T)``: ``mean(x**2, axis=-1)`` in float32 (float64 input: 64)."""
        _ops.check_tokens(x, "fisher")
        return _ops.token_energy(x, xp=_xp.namespace(x))

    def reset(self) -> None:
        """Stateless: nothing to forget."""
