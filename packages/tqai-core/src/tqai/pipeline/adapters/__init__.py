"""Built-in model adapters (``tqai.adapters``): llm (decoder-only LLMs), dit (diffusers DiTs
with batched CFG), wan (Wan 2.x video transformers with split CFG). Import an adapter from its
module; this package imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
