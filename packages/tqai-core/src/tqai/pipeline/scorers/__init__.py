"""Built-in scorers (``tqai.scorers``): one module per paper, each loaded only when named.

palm (EMA novelty), snr (Min-SNR step weighting), fisher (runtime mean(x^2) proxy),
fisher_static (offline calibration JSON), sheaf (Laplacian harmonicity), bsa (block centroid
saliency). Import a scorer from its module; this package imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
