"""Codebook solvers beside Lloyd-Max, one module each (``tqai.codebooks`` entry points).

Every solver is a function ``(d, n_bits, **options) -> tqai.codebooks.Codebook`` for the same
coordinate density ``f_d`` of a randomly rotated unit vector that :mod:`tqai.codebooks` solves
exactly, and sets ``Codebook.kind`` to its own name:

- :mod:`tqai.solvers.cmaes`: CMA-ES refinement of a start codebook (Lloyd-Max by default) under
  the exact distortion or any caller-given objective; never worse than its start.
- :mod:`tqai.solvers.fuzzy_cmeans`: fuzzy c-means with the fuzzifier annealed toward 1.
- :mod:`tqai.solvers.attention_aware`: softmax-score preservation (APTQ, arXiv:2402.14866).

All solving is float64 host numpy; quantizers move the centroids to their array namespace. The
modules are imported on demand through the plugin registry, so this package imports nothing.
"""

from __future__ import annotations

__all__: list[str] = []
