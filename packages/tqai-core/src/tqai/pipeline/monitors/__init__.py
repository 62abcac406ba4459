"""Built-in monitors (``tqai.monitors``): stability (attention-entropy shift) and lyapunov
(finite-time divergence rate). Import a monitor from its module; this package imports neither.
"""

from __future__ import annotations

__all__: list[str] = []
