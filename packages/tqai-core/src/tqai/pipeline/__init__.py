"""The paper playground: scorer -> strategy -> quantizer -> monitor, every piece a plugin.

A :class:`~tqai.pipeline.pipeline.CompressionPipeline` compresses one tensor of one layer at one
step: a scorer (``tqai.scorers``) rates every token, a strategy (``tqai.strategies``) decides how
to spend bits on them with the core's TurboQuant quantizers, and a monitor (``tqai.monitors``)
watches the result and moves the bit width of later steps. A model adapter (``tqai.adapters``)
says what a "layer" and a "step" are for a model family. Every built-in is one module under this
package and one entry-point line in tqai-core's ``pyproject.toml``, the same path a third-party
plugin takes; nothing here imports a plugin until a config names it.

Example:
    >>> import numpy as np
    >>> from tqai.pipeline import build_pipeline
    >>> pipe = build_pipeline({"scorer": "palm", "strategy": "tiered", "bits_k": 3})
    >>> keys = np.random.default_rng(0).standard_normal((1, 2, 16, 64)).astype(np.float32)
    >>> result = pipe.compress(keys, layer=0, stream="k")
    >>> result.reconstruction.shape, result.n_bits
    ((1, 2, 16, 64), 3)
    >>> build_pipeline(None) is None        # the plain path: no pipeline, no overhead
    True
"""

from __future__ import annotations

from tqai.pipeline.bank import QuantizerBank
from tqai.pipeline.pipeline import (
    CONFIG_KEYS,
    CompressionPipeline,
    PipelineConfigError,
    build_pipeline,
)
from tqai.pipeline.protocols import (
    FEATURES,
    CompressionResult,
    ModelAdapter,
    Monitor,
    Quantizer,
    QuantizerSource,
    Scorer,
    Strategy,
)

__all__ = [
    "CONFIG_KEYS",
    "FEATURES",
    "CompressionPipeline",
    "CompressionResult",
    "ModelAdapter",
    "Monitor",
    "PipelineConfigError",
    "Quantizer",
    "QuantizerBank",
    "QuantizerSource",
    "Scorer",
    "Strategy",
    "build_pipeline",
]
