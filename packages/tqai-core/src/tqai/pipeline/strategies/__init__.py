"""Built-in strategies (``tqai.strategies``): one module per method, each loaded only when named.

tiered (score-routed dual bit widths), delta (first-order inter-step prediction), delta2
(second-order prediction with fallback), window (similarity-gated reuse of the previous step),
cfg_sharing (one CFG half coded from the other). Import a strategy from its module; this package
imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
