"""The block decode kernel's byte-permute lookups (:mod:`.block_lookup_ptx`), interpreted
instruction by instruction on the CPU (no triton needed): every code gives its fp16 centroid."""

from __future__ import annotations

import numpy as np
import pytest
from ptx_model import run_ptx

from tqai.codebooks import lloyd_max_codebook
from tqai_torch.kernels.triton.block_lookup_ptx import PRMT2, PRMT4, prmt_registers


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_prmt_lookups_match_the_table(bits, d):
    """One packing group (8 codes, operand ``$8``) and the table registers (``$9``-``$12``) in,
    the 8 fp16 centroids out (``$0``-``$7``)."""
    centroids = lloyd_max_codebook(d, bits).centroids
    regs = [r & 0xFFFFFFFF for r in prmt_registers(centroids)]
    table = np.asarray(centroids, np.float16).view(np.uint16)
    asm = PRMT4 if bits == 4 else PRMT2
    rng = np.random.default_rng(d + bits)
    for _ in range(200):
        codes = rng.integers(0, 2**bits, 8)
        group = sum(int(x) << (bits * i) for i, x in enumerate(codes))
        operands = {"$8": group} | {f"${9 + i}": r for i, r in enumerate(regs)}
        got = run_ptx(asm, operands)
        assert [got[f"${i}"] for i in range(8)] == [int(table[x]) for x in codes]


def test_prmt_registers_need_a_symmetric_codebook():
    assert prmt_registers([float(i) for i in range(16)]) is None  # not symmetric: gathers
    assert prmt_registers([0.5] * 8) is None  # 3 bits: gathers
