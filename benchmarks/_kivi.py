"""A KIVI-style peer for the fidelity benchmark (Liu et al. 2024, arXiv:2402.02750).

Asymmetric (affine) integer quantization with an fp16 scale and zero per group: keys per channel
over groups of ``group`` tokens, values per token over groups of ``group`` channels. Tokens of an
incomplete key group stay in full precision (KIVI's residual), so a token is quantized once its
group of ``group`` tokens is complete, keys and values together.

It is a simulation for quality only: the cache holds the dequantized tensors (what attention
reads), and the bits per coordinate are counted from the format, exactly:
``(b_k + b_v + 2 * 2 * 16 / group) / 2`` for quantized tokens (one fp16 scale and one zero per
``group`` values), 16 for the full-precision tail.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["KiviCache", "kivi_bits_per_coord"]


def _affine(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` with min/max affine codes along ``dim`` (fp16 scale and zero)."""
    low = x.amin(dim, keepdim=True).bfloat16().float()
    high = x.amax(dim, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8).bfloat16().float()
    codes = torch.clamp(torch.round((x - low) / scale), 0, 2**bits - 1)
    return codes * scale + low


class _KiviLayer(DynamicLayer):
    def __init__(self, bits_k: int, bits_v: int, group: int) -> None:
        super().__init__()
        self.bits_k, self.bits_v, self.group = bits_k, bits_v, group
        self.done = 0  # leading tokens already quantized

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        b, h, t, d = keys.shape
        g = self.group
        full = (t // g) * g
        if full > self.done:
            k = keys[:, :, self.done : full].float().reshape(b, h, -1, g, d)
            self.keys[:, :, self.done : full] = (
                _affine(k, self.bits_k, 3).reshape(b, h, -1, d).to(keys.dtype)
            )
            v = values[:, :, self.done : full].float().reshape(b, h, -1, d // g, g)
            self.values[:, :, self.done : full] = (
                _affine(v, self.bits_v, 4).reshape(b, h, -1, d).to(values.dtype)
            )
            self.done = full
        return self.keys, self.values


class KiviCache(DynamicCache):
    """KIVI-style quantized cache (simulated) for a transformers model config."""

    def __init__(self, model_config, bits_k: int, bits_v: int, group: int = 32) -> None:
        super().__init__(config=model_config)
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[i] = _KiviLayer(bits_k, bits_v, group)

    def bits_per_coord(self) -> float:
        """Bits per K/V coordinate of the full-attention layers, from the format."""
        quantized = tail = 0
        for layer in self.layers:
            if isinstance(layer, _KiviLayer):
                quantized += layer.done
                tail += layer.keys.shape[2] - layer.done
        return kivi_bits_per_coord(*self._bits(), quantized, tail, self._group())

    def _bits(self) -> tuple[int, int]:
        layer = next(x for x in self.layers if isinstance(x, _KiviLayer))
        return layer.bits_k, layer.bits_v

    def _group(self) -> int:
        return next(x for x in self.layers if isinstance(x, _KiviLayer)).group


def kivi_bits_per_coord(bits_k: int, bits_v: int, quantized: int, tail: int, group: int) -> float:
    per_token = (bits_k + bits_v + 2 * 2 * 16 / group) / 2
    return (quantized * per_token + tail * 16) / max(1, quantized + tail)
