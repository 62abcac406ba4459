"""Chunked prefill attention over packed TurboQuant codes (Triton): a chunk's queries against
the compressed history, the full-precision segments and the chunk itself, causally.

Reference: :func:`tqai.attention.compressed_attention` with the causal mask of the chunk (the
parity tests compare against it).

How: every query token of the chunk is one row of the decode kernel (:mod:`.decode_attention`):
the chunk's ``C`` tokens become ``C`` one-token query rows per sequence (``rows_per_seq=C``: row
``r`` reads sequence ``r // C``'s history, nothing copied), and each row's visible range
(``valid_until``) ends at its own position, which makes the suffix (window + the chunk's own
staged tokens) causal. So a long prompt is processed chunk by chunk without ever holding
its history in full precision: only the packed codes and one chunk are read.

Cost: the history is read once per query token (from L2 for short histories) and each program
scores the GQA group of one token (padded to 16 rows for the tensor cores), so this is a
correct first kernel for prompts continued on a compressed cache (chat turns, chunked prefill,
speculative verification), not a flash-attention-class prefill: ``benchmarks/NOTES.md`` has
its numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from tqai.container import QuantizedTensor
from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

__all__ = ["prefill_attention_triton"]


def prefill_attention_triton(
    query: torch.Tensor,
    keys: QuantizedTensor,
    values: QuantizedTensor,
    key_quantizer: Any,
    value_quantizer: Any,
    *,
    scale: float,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    suffix: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kernel_options: Any,
) -> torch.Tensor:
    """Causal attention of a chunk ``query (B, Hq, C, D)`` whose tokens are the last ``C`` of
    ``suffix``.

    Positions: ``prefix`` (sinks, ``(B, Hkv, P, D)``), then the packed history (``T`` tokens),
    then ``suffix`` (``(B, Hkv, W + C, D)``: the full-precision window, then the chunk). Query
    ``c`` sees every position up to its own, ``P + T + W + c``. Same inputs and output as
    :func:`tqai.attention.compressed_attention` with that causal mask; ``kernel_options`` go to
    :func:`~tqai_torch.kernels.triton.decode_attention.decode_attention_triton`.

    Returns:
        ``(B, Hq, C, D)`` in ``query``'s dtype.
    """
    b, _, c, _ = query.shape
    n_suffix = 0 if suffix is None else suffix[0].shape[2]
    if suffix is None or n_suffix < c:
        raise ValueError(
            f"suffix must end with the chunk's {c} tokens (window + chunk), got "
            f"{n_suffix} suffix tokens"
        )
    n_prefix = 0 if prefix is None else prefix[0].shape[2]
    first_own = n_prefix + keys.shape[2] + n_suffix - c  # position of the chunk's token 0
    until = torch.arange(first_own + 1, first_own + c + 1, device=query.device)
    # (B, Hq, C, D) -> (B * C, Hq, 1, D): row b * C + i is token i of sequence b
    rows = query.transpose(1, 2).reshape(b * c, query.shape[1], 1, query.shape[3])
    out = decode_attention_triton(
        rows,
        keys,
        values,
        key_quantizer,
        value_quantizer,
        scale=scale,
        prefix=prefix,
        suffix=suffix,
        valid_until=until.repeat(b),
        rows_per_seq=c,
        **kernel_options,
    )
    return out.reshape(b, c, query.shape[1], query.shape[3]).transpose(1, 2)
