"""tqai's diffusers hooks, one module per method (diffusers' ``hooks/<method>.py`` layout).

- :mod:`~tqai_diffusers.hooks.kv_compression`: K/V of self-attention through the core pipeline
  (hook name ``"tqai_kv"``).
- :mod:`~tqai_diffusers.hooks.attention_reuse`: attention-output reuse across denoising steps
  (hook name ``"tqai_window"``).

:func:`tqai_diffusers.apply_tqai` registers them from one :class:`~tqai_diffusers.TqaiConfig`.
"""

from __future__ import annotations

from tqai_diffusers.hooks._state import TqaiStats
from tqai_diffusers.hooks.attention_reuse import _TQAI_WINDOW_HOOK, AttentionReuseHook
from tqai_diffusers.hooks.kv_compression import _TQAI_KV_HOOK, KVCompressionHook

__all__ = [
    "HOOK_NAMES",
    "AttentionReuseHook",
    "KVCompressionHook",
    "TqaiStats",
]

HOOK_NAMES: tuple[str, ...] = (_TQAI_KV_HOOK, _TQAI_WINDOW_HOOK)
"""Every hook name tqai registers (what :func:`tqai_diffusers.remove_tqai` removes)."""
