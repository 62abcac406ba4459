"""cfg_sharing: code one half of a classifier-free-guidance pair from the other.

With classifier-free guidance a DiT runs every step twice, conditioned and unconditioned, and the
two passes' K/V and attention outputs are highly similar; DiTFastAttn (Yuan et al.,
arXiv:2406.08552, "attention sharing across CFG") reuses one for the other. Here the first tensor
of a pair (the *primary*) is quantized in full and the second (the *partner*) is coded as its
residual from the primary's reconstruction, with a per-vector fallback to full coding (one bit per
vector) where the halves disagree. With ``share_threshold`` set, partner rows (per batch element
and head) whose cosine similarity to the primary's rows reaches it reuse the primary's
reconstruction outright, costing only a flag per row (DiTFastAttn's sharing).

Modes (the model's CFG layout; the ``dit`` and ``wan`` adapters state theirs):

- ``"batched"``: one call with batch ``2B``; the first ``B`` rows (diffusers puts the
  unconditional half first) are the primary, the last ``B`` the partner.
- ``"split"``: two calls per step and layer, primary then partner, back to back per
  ``(layer, stream)`` (Wan pipelines run the passes separately). A call whose shape differs from
  the pending primary starts a new pair.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult, Quantizer, QuantizerSource

__all__ = ["MODES", "CfgSharingStrategy"]

MODES: tuple[str, ...] = ("batched", "split")


class CfgSharingStrategy:
    """Quantize the primary CFG half in full and the partner half relative to it.

    Args:
        mode: ``"batched"`` (one ``2B`` batch per call) or ``"split"`` (two calls per step).
        share_threshold: cosine similarity at or above which a partner row reuses the primary
            row outright; ``None`` (default) always codes the residual.

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.bank import QuantizerBank
        >>> cond = np.random.default_rng(0).standard_normal((1, 2, 16, 64)).astype(np.float32)
        >>> pair = np.concatenate([cond, cond * 1.02])           # (2B, H, T, D)
        >>> res = CfgSharingStrategy().compress(pair, None, QuantizerBank(), n_bits=3)
        >>> res.info["partner_modes"]                              # (full, residual) vectors
        (0, 32)
    """

    name: ClassVar[str] = "cfg_sharing"
    description: ClassVar[str] = "code one CFG half from the other (DiTFastAttn, 2406.08552)"
    needs_scores: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"cfg"})

    def __init__(self, *, mode: str = "batched", share_threshold: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if share_threshold is not None and not -1.0 <= share_threshold <= 1.0:
            raise ValueError(f"share_threshold must be None or in [-1, 1], got {share_threshold}")
        self.mode = mode
        self.share_threshold = share_threshold
        self._pending: dict[tuple[Any, Any], tuple[tuple[int, ...], str, Any, Any]] = {}

    def compress(
        self,
        x: Any,
        scores: Any,
        quantizers: QuantizerSource,
        *,
        n_bits: int,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> CompressionResult:
        """Code ``x`` (a CFG pair, or one half of it in split mode); scores are not used."""
        _ops.check_tokens(x, "cfg_sharing")
        xp = _xp.namespace(x)
        quantizer = quantizers.get(x.shape[-1], n_bits)
        xc = xp.astype(x, _ops.compute_dtype(x, xp))
        if self.mode == "batched":
            if x.ndim < 3 or x.shape[0] % 2:
                raise ValueError(
                    "cfg_sharing(mode='batched') needs a (2B, ..., T, D) batch holding the "
                    f"unconditional then the conditional half, got shape {tuple(x.shape)}"
                )
            half = x.shape[0] // 2
            qt, rec_primary = _ops.roundtrip(quantizer, xc[:half, ...], xp=xp)
            payload, rec_partner, side, info = self._code_partner(
                xc[half:, ...], xc[:half, ...], rec_primary, quantizer, xp=xp
            )
            rec = xp.concat([rec_primary, rec_partner], axis=0)
            return _ops.result(x, rec, (qt, *payload), side_bits=side, n_bits=n_bits, xp=xp, **info)
        key = (layer, stream)
        shape, dtype = tuple(x.shape), str(x.dtype)
        pending = self._pending.pop(key, None)
        if pending is None or pending[:2] != (shape, dtype):
            qt, rec = _ops.roundtrip(quantizer, xc, xp=xp)
            self._pending[key] = (shape, dtype, xc, rec)
            return _ops.result(x, rec, (qt,), side_bits=0, n_bits=n_bits, xp=xp, role="primary")
        payload, rec, side, info = self._code_partner(xc, pending[2], pending[3], quantizer, xp=xp)
        return _ops.result(
            x, rec, payload, side_bits=side, n_bits=n_bits, xp=xp, role="partner", **info
        )

    def _code_partner(
        self, partner: Any, primary: Any, reference: Any, quantizer: Quantizer, *, xp: ModuleType
    ) -> tuple[tuple[Any, ...], Any, int, dict[str, Any]]:
        """Code ``partner`` from the primary's reconstruction ``reference`` (same shapes).

        The sharing decision compares the two originals (the encoder has both); the residual is
        taken against the reconstruction (what the decoder has).

        Returns:
            ``(payload, partner reconstruction, side bits, info)``.
        """
        shape = tuple(partner.shape)
        rows = math.prod(shape[:-2])
        t, d = shape[-2], shape[-1]
        p3 = xp.reshape(partner, (rows, t, d))
        r3 = xp.reshape(reference, (rows, t, d))
        side = 0
        n_shared = 0
        if self.share_threshold is None:
            order = None
            fresh_p, fresh_r = p3, r3
        else:
            o3 = xp.reshape(primary, (rows, t, d))
            shared = _ops.flat_cosine(p3, o3, lead=1, xp=xp) >= self.share_threshold
            n_shared = _ops.count_true(shared, xp=xp)
            order = xp.argsort(xp.astype(shared, xp.int32), axis=-1)  # coded rows first
            fresh = order[: rows - n_shared]
            fresh_p = _ops.gather_rows(p3, fresh, xp=xp)
            fresh_r = _ops.gather_rows(r3, fresh, xp=xp)
            side += rows
        n_vectors = (rows - n_shared) * t
        payload: tuple[Any, ...] = ()
        modes = (0, 0)
        rec_fresh = fresh_r
        if n_vectors:
            flat_p = xp.reshape(fresh_p, (n_vectors, d))
            flat_r = xp.reshape(fresh_r, (n_vectors, d))
            pred, mode = _ops.best_prediction(flat_p, [flat_r], xp=xp)
            qt, rec_residual = _ops.roundtrip(quantizer, flat_p - pred, xp=xp)
            payload = (qt,)
            rec_fresh = xp.reshape(pred + rec_residual, (rows - n_shared, t, d))
            n_delta = _ops.count_true(mode == 1, xp=xp)
            modes = (n_vectors - n_delta, n_delta)
            side += n_vectors
        if order is not None:
            kept = _ops.gather_rows(r3, order[rows - n_shared :], xp=xp)
            rec_fresh = _ops.merge_rows([rec_fresh, kept], order, xp=xp)
        info = {"partner_modes": modes, "shared_rows": n_shared}
        return payload, xp.reshape(rec_fresh, shape), side, info

    def reset(self) -> None:
        """Forget pending primaries (split mode)."""
        self._pending.clear()
