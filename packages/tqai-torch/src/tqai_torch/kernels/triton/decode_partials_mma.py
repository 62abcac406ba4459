"""Decode attention for K4/V2, K4/V4 and K3/V2 at head_dim 128 with lookups straight into
tensor-core fragments (Gluon + PTX), in one launch: the fast path of :mod:`.decode_attention`,
which falls back to its own block kernel (and combine) for every other configuration.

Reference: :func:`tqai.attention.compressed_attention` (the same parity tests cover this path).

Grid ``(B * Hkv, parts)``: each KV head's history is split across programs, plus one program
for the full-precision segments (sinks, recent window, staged tokens) when the call has any; the
program that finishes a KV head last (an atomic ticket) merges its parts and writes the output.

Per history program, each warp walks its own tokens, 32 per step (two tiles of 16), and keeps
its own running max, sum and value accumulator in registers; the warps merge once at the end
through shared memory, and the program stores its partial (the sums divided by their softmax
sum, as fp16). Long splits (:func:`.decode_mma_ptx.draws_at_run_time`) are not fixed ranges:
each warp takes one chunk of 32 tokens of its own, then draws the next from one of the KV
head's pools (an atomic counter, a step ahead) until the pool is empty, so that the two
programs an SM holds, which the warp schedulers do not serve alike, and SMs of unequal speed
all end together; the order in which chunks are walked then varies between calls (not under
torch's deterministic algorithms). Every tensor is a *per-thread* register tensor
(``(32 * W, 4)``, row = thread), so each lane loads exactly the packed words its
``mma.m16n8k16`` fragments need, and PTX does the rest:

* The program first rotates and scales the query heads of its KV head itself, on the tensor
  cores (the fp16 rotation copied into shared memory by ``cp.async`` first), and hands each
  lane its B-fragment words through shared memory, while its first copies are in flight.
* Operands arrive by a software pipeline, ``STAGES - 1`` (one) steps ahead (``cp.async``): for
  4-bit keys each thread copies exactly the bytes its fragments need into its own blocks (in
  the odd halves of the pair table's 256-byte entries, which the table leaves free); 3-bit
  keys and 2-bit values are copied by each warp as its 32 rows whole, in 16-byte chunks, and
  read back after a warp sync (the layouts keep the reads free of bank conflicts); no block
  barrier in the loop. The norms are copied the same way (the chunks holding a warp step's,
  each copy clamped at the visible tokens).
* Scores ``S^T (16 tokens x 8 heads)``: A = key centroids (fp16), B = the rotated query. Lane
  ``(g, t) = (lane // 4, lane % 4)`` takes packing groups ``4 t .. 4 t + 3`` (16 bytes) of
  tokens ``g`` and ``g + 8``; each byte (two codes) indexes a 256-entry table of fp16 pairs in
  shared memory, one copy per lane (bank-conflict free), and the words read are A-fragment
  registers as they stand (one byte permute, the byte above the lane's offset, is the address:
  entries 256 bytes apart; one shared load per pair). 3-bit keys: the lane takes the same
  groups (12 bytes a token), every 6 bits (a pair of codes, in one word or across two by a
  funnel shift) index a 64-entry table of entries 128 bytes apart (shift, mask). The query
  fragments are then simply dims ``32 t .. 32 t + 31`` of head ``g``. Heads ``>= G`` are zero
  columns (G <= 8).
* Online softmax in base 2 per head (lanes ``t`` hold heads ``2 t, 2 t + 1``; the max reduces
  over the 8 lanes ``g`` by butterfly shuffles), ``p * ||v||`` to fp16 and transposed by
  ``movmatrix`` into the B fragment of the value product.
* Values ``O^T (16 dims x 8 heads) += V^T P^T``, 8 products for 128 dims: lane ``(g, t)`` loads
  the value bytes of dims ``16 g .. 16 g + 15`` of tokens ``2 t, 2 t + 1, 2 t + 8, 2 t + 9``.
  V2: byte permutes of the 4-entry value table give fp16 pairs of two tokens, the A-fragment
  registers. V4: each word is looked up in the key pair table (one codebook for both), then
  byte permutes pair the two tokens' entries of each dim.

The segments are scored in the original domain (fp32 FMAs); the merge joins them with the
history in one softmax and rotates the history's normalized share back on the tensor cores (as
fp16 high and low parts). Scores and values of the history use fp16 operands with fp32
accumulation, as the block kernel does, and both rotations fp16 matrices: the same parity
bounds hold. Served: TurboQuant_mse keys of 4 bits (any 16-entry codebook) and values of 2 bits
(any codebook) or 4 bits (the keys' codebook), or keys of 3 bits and values of 2; fp16 norms,
head_dim 128, at most 8 query heads per KV head, packed rows stored whole and 16-byte aligned;
CUDA only (PTX; the interpreter runs the block kernel); Triton >= 3.6 (Gluon's API moves
between releases; older versions take the block kernel). Shared memory: the table (K4: 64 KB,
whose odd halves hold both stages' keys; K3: 32 KB; its first 32 KB first hold the staged
query rotation), ``STAGES`` stages of ``32 * 32 * W`` bytes of value rows (K4/V4:
``64 * 32 * W``, K3/V2: ``80 * 32 * W`` of key and value rows) and ``256 * W`` of norms, and 2 KB
for the rotation's operand exchange (8 warps: 86, 102 and 78 KB; two programs per SM, which the
registers allow).

The kernel is launched with programmatic dependent launch: a program stages its constants (the
query rotation, the tables) before ``griddepcontrol.wait`` and reads nothing else before it,
and each merging program lets the next such launch begin once its loads have landed, so that
back-to-back calls overlap one call's staging with the previous call's merge. After a kernel
that does not signal its dependents early (a model's own kernels) it runs as a plain launch.
Measurements and the design history: ``benchmarks/NOTES.md`` (v9-v12).
"""

from __future__ import annotations

import math
import weakref
from operator import itemgetter
from typing import Any

import numpy as np
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from tqai_torch.kernels.triton.decode_mma_ptx import (
    SMEM_PER_SM,
    STEP_TOKENS,
    copy_asm,
    draws_at_run_time,
    key_asm,
    key_stage_offset,
    lane_sum_asm,
    lut_bytes,
    lut_stride,
    pair_table,
    program_rows,
    program_smem,
    softmax_asm,
    stage_blocks,
    stage_bytes,
    stage_load_asm,
    table_words,
    value_asm,
)
from tqai_torch.kernels.triton.launch import FastLaunch, int_types_key, ints_key, pointers_key

__all__ = ["launch_mma_decode", "serves_mma"]

# (key bits, value bits) this path serves; V4 needs the keys' codebook (one pair table)
SERVED_BITS = ((4, 2), (4, 4), (3, 2))
_SOFTMAX = gl.constexpr(softmax_asm())
_SOFTMAX_CONS = gl.constexpr(",".join(["=f"] * 12 + ["=r"] * 8) + ",f" * 24)
_VALUE = gl.constexpr(value_asm(False))
_VALUE_RESCALED = gl.constexpr(value_asm(True))
_VALUE_RESCALED_CONS = gl.constexpr(",".join(["=f"] * 32) + ",r" * 12 + ",f" * 36)
_VALUE_CONS = gl.constexpr(",".join(["=f"] * 32) + ",r" * 12 + ",f" * 32)
_VALUE4 = gl.constexpr(value_asm(False, 4))
_VALUE4_RESCALED = gl.constexpr(value_asm(True, 4))
_VALUE4_RESCALED_CONS = gl.constexpr(",".join(["=f"] * 32) + ",r" * 16 + ",f" * 36)
_VALUE4_CONS = gl.constexpr(",".join(["=f"] * 32) + ",r" * 16 + ",f" * 32)
# the PTX of the score products (by masked, key bits, tile), of the copies (by warps, masked,
# key bits, value bits) and of the stage reads (by warps, key bits, value bits)
_KEY_TEXTS = {
    (masked, kb, tile): key_asm(masked, kb, tile)
    for masked in (False, True)
    for kb, tiles in ((4, (0,)), (3, (0, 1)))  # a K4 tile's words are its own operands
    for tile in tiles
}
_COPY_TEXTS = {
    (w, masked, kb, vb): copy_asm(32 * w, masked, vb, kb)
    for w in (4, 8)
    for masked in (False, True)
    for kb, vb in SERVED_BITS
}
_LOAD_TEXTS = {
    (w, kb, vb): stage_load_asm(32 * w, vb, kb) for w in (4, 8) for kb, vb in SERVED_BITS
}
_STAGE_BLOCKS = {(kb, vb): stage_blocks(vb, kb) for kb, vb in SERVED_BITS}
_STAGE_BYTES = {(w, kb, vb): stage_bytes(32 * w, vb, kb) for w in (4, 8) for kb, vb in SERVED_BITS}
_LUT_BYTES = {kb: lut_bytes(kb) for kb, _ in SERVED_BITS}
_LUT_STRIDES = {kb: lut_stride(kb) for kb, _ in SERVED_BITS}


@gluon.constexpr_function
def _stage_bytes(W, KB, VB):
    """Bytes of a pipeline stage (:func:`.decode_mma_ptx.stage_bytes`: rows, then norms)."""
    return _STAGE_BYTES[(W, KB, VB)]


@gluon.constexpr_function
def _program_rows(W, KB, VB):
    """Rows of ``512 * W`` bytes of the kernel's one shared allocation
    (:func:`.decode_mma_ptx.program_rows`, which the launcher's budget counts too)."""
    return _PROGRAM_ROWS[(W, KB, VB)]


@gluon.constexpr_function
def _lut(KB):
    """Bytes of the pair table's region (:func:`.decode_mma_ptx.lut_bytes`): the stages follow."""
    return _LUT_BYTES[KB]


@gluon.constexpr_function
def _lut_stride(KB):
    """Bytes between the pair table's entries (:func:`.decode_mma_ptx.lut_stride`)."""
    return _LUT_STRIDES[KB]


@gluon.constexpr_function
def _key_text(MASKED, KB, TILE):
    return _KEY_TEXTS[(bool(MASKED), KB, TILE if KB == 3 else 0)]


@gluon.constexpr_function
def _key_cons(KB):
    """Out: 4 scores; in: key words (K4: 2 x 4, K3: 3 x 4), the lane offset (4), the query (16),
    then 4 norms."""
    return "=f,=f,=f,=f" + ",r" * (28 if KB == 4 else 32) + ",f,f,f,f"


@gluon.constexpr_function
def _copy_text(W, MASKED, KB, VB):
    return _COPY_TEXTS[(W, bool(MASKED), KB, VB)]


@gluon.constexpr_function
def _load_text(W, KB, VB):
    return _LOAD_TEXTS[(W, KB, VB)]


@gluon.constexpr_function
def _load_cons(KB, VB):
    """Out: the stage's blocks (4 words each) and 8 norms; in: the stage's offset, the thread's
    norm offsets, the stage's key offset."""
    return ",".join(["=r"] * (4 * _STAGE_BLOCKS[(KB, VB)] + 8)) + ",r" * 12


_LANE_SUM = gl.constexpr(lane_sum_asm())
_REGISTERS_PER_SM = 65536  # sm_90: 32-bit registers of a multiprocessor
# 16 warps per SM (2 programs of 8 warps, 4 of 4) need at most 128 registers a thread; without the
# cap ptxas takes ~200 for the builds with segments (their cold code) and one program fits
_MAX_REGISTERS = 128
SEG_PROGRAMS = 8  # the most programs a call's segments take per KV head
_SEG_PROGRAMS = gl.constexpr(SEG_PROGRAMS)
SEG_TOKENS_PER_PROGRAM = 8  # segment tokens a program takes (2 rounds), while the wave has room
STAGES = 2  # pipeline depth: a thread's copies run one step ahead of its compute (3: no faster)
_STAGES = gl.constexpr(STAGES)
_PROGRAM_ROWS = {
    (w, kb, vb): program_rows(32 * w, vb, kb, STAGES) for w in (4, 8) for kb, vb in SERVED_BITS
}
# K4: the stages' key blocks in the pair table's odd halves, which hold two stages (a deeper
# pipeline fails here, at import)
_KEY_STAGES = [key_stage_offset(s) for s in range(STAGES)]
_KEY_STAGE0 = gl.constexpr(_KEY_STAGES[0])
_KEY_STAGE_STEP = gl.constexpr(_KEY_STAGES[1] - _KEY_STAGES[0])
_STORE = gl.constexpr("mov.u32 $0, global_smem;\nadd.u32 $0, $0, $1;\nst.shared.b32 [$0], $2;")
_STORE_HALF = gl.constexpr("mov.u32 $0, global_smem;\nadd.u32 $0, $0, $1;\nst.shared.b16 [$0], $2;")
_LOAD_WORD = gl.constexpr("mov.u32 $0, global_smem;\nadd.u32 $0, $0, $1;\nld.shared.b32 $0, [$0];")
_COPY_CONS = gl.constexpr("=r,=r,=r,=r" + ",l" * 8 + ",r" * 16 + ",l" * 4 + ",r" * 4)
# wait until a stage's copies have landed: all but the STAGES - 1 newest groups
_WAIT = gl.constexpr(
    f"cp.async.wait_group {STAGES - 1};\n" + "".join(f"mov.b32 ${i}, 0;\n" for i in range(4))
)
_WAIT_ALL = gl.constexpr("cp.async.wait_all;\nmov.b32 $0, 0;")
_WAIT_OLDER = gl.constexpr("cp.async.wait_group 1;\nmov.b32 $0, 0;")
# programmatic dependent launch (the kernel is launched with it): a program reads nothing an
# earlier kernel may still write (query, cache, bounds, tickets, workspace) before
# _GRID_WAIT, which returns once the stream's earlier kernels have completed (the constants
# it reads before, tables and rotations, are written once by blocking copies). _GRID_LAUNCH
# by each KV head's merging program, once the merge's loads have landed (the other programs
# have exited), lets a next kernel launched the same way start on the SMs this call freed
# while the merge ends (only its staging: it waits for this call before reading anything)
_GRID_WAIT = gl.constexpr("griddepcontrol.wait;\nmov.b32 $0, 0;")
_GRID_LAUNCH = gl.constexpr("griddepcontrol.launch_dependents;\nmov.b32 $0, 0;")
# the history's chunks drawn at run time (DYNAMIC): a KV head's chunks in one pool per warp
# index (warp w of every program draws from pool w: one counter each, on its own 128-byte line,
# so that no counter takes more than ~1/W of the draws: one counter for all measured ~15 ns
# a draw, slower than the warps draw). Lane 0 of a warp adds one to its pool's counter (a
# relaxed atomic: the counter orders nothing, the tickets publish the partials) and holds the
# old value, the other lanes 0; _BROADCAST, a step later, hands it to the warp, so that the
# atomic's round trip hides behind a step of compute
_DRAW = gl.constexpr(
    "{\n.reg .pred first;\n.reg .b32 lane, tid, wid;\n.reg .b64 at;\n"
    "mov.u32 lane, %laneid;\nsetp.eq.u32 first, lane, 0;\nmov.u32 tid, %tid.x;\n"
    "shr.u32 wid, tid, 5;\nmad.wide.u32 at, wid, 128, $1;\nmov.b32 $0, 0;\n"
    "@first atom.global.add.u32 $0, [at], 1;\n}"
)
_WARP_INDEX = gl.constexpr("mov.u32 $0, %tid.x;\nshr.u32 $0, $0, 5;")
_BROADCAST = gl.constexpr("shfl.sync.idx.b32 $0, $1, 0, 0x1f, 0xffffffff;")

# the (128, 128) fp16 rotations in shared memory, read as tensor-core A operands (ldmatrix):
# rows of 256 bytes, their 16-byte chunks swizzled by row % 8
_ROTATION_SMEM = gl.constexpr(gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))


@gluon.constexpr_function
def _rotation_mma(W):
    """The tensor-core layout of a rotation's product ``(128 dims, 8 heads)``: ``mma.m16n8k16``
    tiles, the dims over the warps."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])


@gluon.jit
def _copy_rotation(mat, rot_ptr, W: gl.constexpr):
    """Start copying a ``(128, 128)`` fp16 rotation (row ``j``: output dim ``j``'s weights)
    from global memory into ``mat`` (:data:`_ROTATION_SMEM`), as one commit group."""
    CL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [W, 1], [1, 0])
    cr = gl.arange(0, 128, layout=gl.SliceLayout(1, CL))[:, None]
    cc = gl.arange(0, 128, layout=gl.SliceLayout(0, CL))[None, :]
    async_copy.async_copy_global_to_shared(mat, rot_ptr + cr * 128 + cc)
    async_copy.commit_group()


@gluon.jit
def _rotate(mat, xt_hi, xt_lo, W: gl.constexpr):
    """``mat (128, 128) @ xt (128, 8)`` on the tensor cores: ``(128, 8)`` float32 in
    :func:`_rotation_mma`. ``mat``: fp16 in shared memory; ``xt`` as fp16 ``xt_hi`` (and
    ``xt_lo``, the rest, when not None; its product runs as a second chain), any layout."""
    MMA: gl.constexpr = _rotation_mma(W)
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    a = mat.load(A)
    out = mma_v2(a, gl.convert_layout(xt_hi, B), gl.zeros([128, 8], gl.float32, layout=MMA))
    if xt_lo is not None:
        out += mma_v2(a, gl.convert_layout(xt_lo, B), gl.zeros([128, 8], gl.float32, layout=MMA))
    return out


@gluon.jit
def _copy_step(
    bases, tb, stop, g, soff, kso, W: gl.constexpr, MASKED: gl.constexpr, KB: gl.constexpr,
    VB: gl.constexpr,
):  # fmt: skip
    """Start the asynchronous copies of one warp step (tokens ``tb .. tb + 31``; ``MASKED``:
    nothing from ``stop`` on, else the whole step lies before it) into the stage at byte offset
    ``soff`` (K4 keys: at ``kso``, :func:`.decode_mma_ptx.key_stage_offset`); ``bases``: the 3
    per-thread byte addresses of :func:`.decode_mma_ptx.copy_asm`."""
    kb, vb, nb = bases
    gl.inline_asm_elementwise(
        _copy_text(W, MASKED, KB, VB), _COPY_CONS, [kb, vb, tb, stop, g, soff, nb, kso],
        dtype=gl.int32, is_pure=False, pack=4,
    )  # fmt: skip


@gluon.jit
def _draw(pools_ptr):
    """Start a warp's draw from its pool's counter (int32, at ``pools_ptr`` + 32 x the warp's
    index): lane 0 holds the count drawn once the atomic returns, the other lanes 0;
    :func:`_broadcast` reads it."""
    return gl.inline_asm_elementwise(
        _DRAW, "=r,l", [pools_ptr], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _warp_index(any_scalar):
    """The warp's index in its program, as a scalar (the same in a warp; ``any_scalar``: an
    input the asm needs, not read)."""
    return gl.inline_asm_elementwise(
        _WARP_INDEX, "=r,r", [any_scalar], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _broadcast(drawn):
    """Lane 0's value of ``drawn`` (a :func:`_draw`), the same in every lane of the warp."""
    return gl.inline_asm_elementwise(
        _BROADCAST, "=r,r", [drawn], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _norms(bits):
    """The fp16 norms (f32) of a thread's tokens from their bits (the low 16 of each word)."""
    return (bits & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)


@gluon.jit
def _step(
    soff, kso, nrd, tok0, g, t, c, lo, stop,
    q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7,
    W: gl.constexpr, MASKED: gl.constexpr, KB: gl.constexpr, VB: gl.constexpr,
):  # fmt: skip
    """32 tokens of one warp (tiles at tok0 and tok0 + 16), read from the pipeline stage at
    byte offsets ``soff`` / ``kso`` (K4 keys) once its copies have landed (``nrd``: the thread's
    norm offsets, see :func:`.decode_mma_ptx.stage_load_asm`), folded into the warp's running
    state."""
    gl.inline_asm_elementwise(
        _WAIT, "=r,=r,=r,=r,r,r,r,r", [soff], dtype=gl.int32, is_pure=False, pack=4
    )
    load: gl.constexpr = _load_text(W, KB, VB)
    load_cons: gl.constexpr = _load_cons(KB, VB)
    # the stage's blocks: keys (K4: tokens g, g+8 | g+16, g+24 in ka0, kb0 | ka1, kb1; K3: the
    # 12 words of the 4 tokens in ka0, kb0, ka1), then values (V4: two blocks a tile)
    if KB == 3:
        ka0, kb0, ka1, v0, v1, n0, n1 = gl.inline_asm_elementwise(
            load, load_cons, [soff, nrd, kso], dtype=(gl.int32,) * 7, is_pure=False, pack=4
        )
        kb1 = ka1
    elif VB == 4:
        ka0, kb0, ka1, kb1, v0, v0b, v1, v1b, n0, n1 = gl.inline_asm_elementwise(
            load, load_cons, [soff, nrd, kso], dtype=(gl.int32,) * 10, is_pure=False, pack=4
        )
    else:
        ka0, kb0, ka1, kb1, v0, v1, n0, n1 = gl.inline_asm_elementwise(
            load, load_cons, [soff, nrd, kso], dtype=(gl.int32,) * 8, is_pure=False, pack=4
        )
    nb0 = _norms(n0)
    nb1 = _norms(n1)
    if MASKED:  # value norm -1: the token is not visible (its score becomes -1e30)
        ntok = (tok0 + g)[:, None] + 8 * (c % 2)[None, :]
        ok0 = (ntok < stop) & (ntok >= lo)
        ok1 = (ntok + 16 < stop) & (ntok + 16 >= lo)
        nb0 = gl.where(ok0 | (c < 2)[None, :], nb0, -1.0)
        nb1 = gl.where(ok1 | (c < 2)[None, :], nb1, -1.0)
    key_cons: gl.constexpr = _key_cons(KB)
    if KB == 3:
        x0 = gl.inline_asm_elementwise(
            _key_text(MASKED, KB, 0), key_cons, [ka0, kb0, ka1, lane4, q0, q1, q2, q3, nb0],
            dtype=gl.float32, is_pure=True, pack=4,
        )  # fmt: skip
        x1 = gl.inline_asm_elementwise(
            _key_text(MASKED, KB, 1), key_cons, [ka0, kb0, ka1, lane4, q0, q1, q2, q3, nb1],
            dtype=gl.float32, is_pure=True, pack=4,
        )  # fmt: skip
    else:
        x0 = gl.inline_asm_elementwise(
            _key_text(MASKED, KB, 0), key_cons, [ka0, kb0, lane4, q0, q1, q2, q3, nb0],
            dtype=gl.float32, is_pure=True, pack=4,
        )  # fmt: skip
        x1 = gl.inline_asm_elementwise(
            _key_text(MASKED, KB, 0), key_cons, [ka1, kb1, lane4, q0, q1, q2, q3, nb1],
            dtype=gl.float32, is_pure=True, pack=4,
        )  # fmt: skip
    m, l_sum, alpha, p0, p1 = gl.inline_asm_elementwise(
        _SOFTMAX, _SOFTMAX_CONS, [x0, x1, nb0, nb1, m, l_sum],
        dtype=(gl.float32, gl.float32, gl.float32, gl.int32, gl.int32), is_pure=True, pack=4,
    )  # fmt: skip
    if VB == 4:  # the values' lookups read the key pair table (lane4: the lane's offset)
        a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
            _VALUE4_RESCALED, _VALUE4_RESCALED_CONS,
            [v0, v0b, lane4, p0, alpha, a0, a1, a2, a3, a4, a5, a6, a7],
            dtype=(gl.float32,) * 8, is_pure=True, pack=4,
        )  # fmt: skip
        a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
            _VALUE4, _VALUE4_CONS, [v1, v1b, lane4, p1, a0, a1, a2, a3, a4, a5, a6, a7],
            dtype=(gl.float32,) * 8, is_pure=True, pack=4,
        )  # fmt: skip
    else:
        a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
            _VALUE_RESCALED, _VALUE_RESCALED_CONS,
            [v0, vtab, p0, alpha, a0, a1, a2, a3, a4, a5, a6, a7],
            dtype=(gl.float32,) * 8, is_pure=True, pack=4,
        )  # fmt: skip
        a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
            _VALUE, _VALUE_CONS, [v1, vtab, p1, a0, a1, a2, a3, a4, a5, a6, a7],
            dtype=(gl.float32,) * 8, is_pure=True, pack=4,
        )  # fmt: skip
    return m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7


@gluon.jit
def _pipelined_step(
    i, n_full, start, bases, nrd, tw, stop4, g4, w, g, t, c, lo, stop,
    q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7,
    W: gl.constexpr, MASKED: gl.constexpr, KB: gl.constexpr, VB: gl.constexpr,
):  # fmt: skip
    """Step ``i`` of a program: start the copies of step ``i + STAGES - 1`` (unmasked while it
    is a whole step, i.e. before ``n_full``; always masked in a ``MASKED`` step, which lies
    past them, and always for V2: one copy path keeps its loop step one basic block, which
    measured faster than the unmasked copies' fewer instructions behind a branch), fold step
    ``i`` into the warp's state."""
    STEP: gl.constexpr = 32 * W
    STAGE_BYTES: gl.constexpr = _stage_bytes(W, KB, VB)
    LUT: gl.constexpr = _lut(KB)
    ahead = i + _STAGES - 1
    at = tw + (start + ahead * STEP)
    soff = tw * 0 + (LUT + (ahead % _STAGES) * STAGE_BYTES)
    kso = tw * 0 + (_KEY_STAGE0 + (ahead % _STAGES) * _KEY_STAGE_STEP)
    if MASKED or VB == 2:
        _copy_step(bases, at, stop4, g4, soff, kso, W, True, KB, VB)
    elif ahead < n_full:
        _copy_step(bases, at, stop4, g4, soff, kso, W, False, KB, VB)
    else:
        _copy_step(bases, at, stop4, g4, soff, kso, W, True, KB, VB)
    tok = start + i * STEP + w * 32
    m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _step(
        tw * 0 + (LUT + (i % _STAGES) * STAGE_BYTES),
        tw * 0 + (_KEY_STAGE0 + (i % _STAGES) * _KEY_STAGE_STEP), nrd, tok, g, t, c, lo, stop,
        q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7, W, MASKED, KB,
        VB,
    )  # fmt: skip
    return m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7


@gluon.jit
def _merge_column(buf, j: gl.constexpr, wts, W: gl.constexpr, ML: gl.constexpr):
    """Register ``j`` of every warp's ``(32, 4)`` block, as ``(W, 128)``, summed over the warps
    with their weights ``wts``: the merged column, ``(128,)``."""
    return gl.sum(buf.index(j).reshape([W, 128]).load(ML) * wts, axis=0)


@gluon.jit
def _segment_scan(
    q, k_ptr, v_ptr, k_st, v_st, n, lo, m, l_sum, acc,
    SEG_N: gl.constexpr, K3: gl.constexpr,
):  # fmt: skip
    """Fold the visible tokens ``[lo, n)`` of a full-precision segment (``(n, 128)`` rows at
    token strides ``k_st`` / ``v_st``) into the running state of all heads: ``q (8, 1, 128)``
    scaled queries, ``m`` / ``l_sum (8, 1, 1)``, ``acc (8, 1, 128)``; fp32, base 2, ``SEG_N``
    tokens a round. Original (unrotated) domain."""
    TL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, K3))
    DL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, K3))
    tt = gl.arange(0, SEG_N, layout=TL)[None, :, None]
    dd = gl.arange(0, 128, layout=DL)[None, None, :]
    for t0 in range(gl.maximum(lo, 0), n, SEG_N):
        tok = t0 + tt
        ok = (tok < n) & (tok >= lo)
        k = gl.load(k_ptr + tok * k_st + dd, mask=ok, other=0.0).to(gl.float32)
        s = gl.sum(q * k, axis=2, keep_dims=True)  # (8, SEG_N, 1)
        s = gl.where(ok, s, -1.0e30)
        m_new = gl.maximum(m, gl.max(s, axis=1, keep_dims=True))
        alpha = gl.exp2(m - m_new)
        p = gl.where(ok, gl.exp2(s - m_new), 0.0)
        v = gl.load(v_ptr + tok * v_st + dd, mask=ok, other=0.0).to(gl.float32)
        l_sum = l_sum * alpha + gl.sum(p, axis=1, keep_dims=True)
        acc = acc * alpha + gl.sum(p * v, axis=1, keep_dims=True)
        m = m_new
    return m, l_sum, acc


@gluon.jit
def _segment_partial(
    query_ptr, stride_qb, stride_qh, qscale, b, h, bs, ws_ptr, m_off, l_off, acc_off, part,
    pk_ptr, pv_ptr, n_pre, pk_sb, pk_sh, pk_st, pv_sb, pv_sh, pv_st,
    sk_ptr, sv_ptr, n_suf, sk_sb, sk_sh, sk_st, sv_sb, sv_sh, sv_st,
    bounds_ptr, T, seg_from, seg_until,
    G: gl.constexpr, W: gl.constexpr, HAS_BOUNDS: gl.constexpr,
):  # fmt: skip
    """The partial of the full-precision segments (sinks before the history, the recent window
    and staged tokens after it) for the query heads of one KV head, in the original domain, at
    workspace part ``part`` (m / l rows as the history's, ``G x 128`` sums): one of the
    programs a call with segments adds to each KV head, beside the history's splits. It takes
    tokens ``[seg_from, seg_until)`` of the segments as one sequence (the prefix, then the
    suffix): a few rounds each, so that the segments' latency-bound rounds run side by side."""
    SEG_N: gl.constexpr = 4
    K3: gl.constexpr = gl.BlockedLayout([8 // W, SEG_N, 4], [1, 1, 32], [W, 1, 1], [2, 1, 0])
    HL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, K3))
    DL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, K3))
    hh = gl.arange(0, 8, layout=HL)[:, None, None]
    dd = gl.arange(0, 128, layout=DL)[None, None, :]
    gl.inline_asm_elementwise(_GRID_WAIT, "=r,r", [hh], dtype=gl.int32, is_pure=False, pack=1)
    q = gl.load(
        query_ptr + b * stride_qb + (h * G + hh) * stride_qh + dd, mask=hh < G, other=0.0
    ).to(gl.float32)
    q = q * qscale
    # this program's tokens of the prefix [pre_lo, pre_n) and of the suffix [suf_lo, suf_n)
    pre_lo = seg_from
    pre_n = gl.minimum(n_pre, seg_until)
    suf_lo = seg_from - n_pre
    suf_n = gl.minimum(n_suf, seg_until - n_pre)
    if HAS_BOUNDS:  # and of those the visible ones
        first = gl.load(bounds_ptr + 2 * b)
        until = gl.load(bounds_ptr + 2 * b + 1)
        pre_lo = gl.maximum(pre_lo, first)
        pre_n = gl.minimum(pre_n, until)
        suf_lo = gl.maximum(suf_lo, first - n_pre - T)
        suf_n = gl.minimum(suf_n, until - n_pre - T)
    m = gl.full([8, 1, 1], -1.0e30, gl.float32, layout=K3)
    l_sum = gl.zeros([8, 1, 1], gl.float32, layout=K3)
    acc = gl.zeros([8, 1, 128], gl.float32, layout=K3)
    m, l_sum, acc = _segment_scan(
        q, pk_ptr + bs * pk_sb + h * pk_sh, pv_ptr + bs * pv_sb + h * pv_sh, pk_st, pv_st,
        pre_n, pre_lo, m, l_sum, acc, SEG_N, K3,
    )  # fmt: skip
    m, l_sum, acc = _segment_scan(
        q, sk_ptr + bs * sk_sb + h * sk_sh, sv_ptr + bs * sv_sb + h * sv_sh, sk_st, sv_st,
        suf_n, suf_lo, m, l_sum, acc, SEG_N, K3,
    )  # fmt: skip
    real = hh < G
    gl.store(ws_ptr + m_off + part * 16 + hh, m, mask=real)
    gl.store(ws_ptr + l_off + part * 16 + hh, l_sum, mask=real)
    gl.store(ws_ptr + acc_off + (part * G + hh) * 128 + dd, acc, mask=real)


@gluon.jit
def _merge_segments(
    ws_ptr, m_off, l_off, acc_off, seg0, n_segp,
    G: gl.constexpr, GP: gl.constexpr, W: gl.constexpr,
):  # fmt: skip
    """The ``n_segp`` segment partials from workspace part ``seg0`` on, loaded at once and
    merged: ``m``, ``l`` ``(GP,)`` and the weighted sums ``(GP, 128)``, original domain."""
    JPT: gl.constexpr = 128 // (4 * W)
    P3: gl.constexpr = gl.BlockedLayout(
        [1, GP, JPT], [_SEG_PROGRAMS, 1, 32 // _SEG_PROGRAMS], [1, 1, W], [2, 1, 0]
    )
    ML: gl.constexpr = gl.SliceLayout(2, P3)  # (SEG_PROGRAMS, GP)
    js = gl.arange(0, _SEG_PROGRAMS, layout=gl.SliceLayout(1, ML))[:, None]
    hs = gl.arange(0, GP, layout=gl.SliceLayout(0, ML))[None, :]
    ok = (js < n_segp) & (hs < G)
    rows = (seg0 + js) * 16 + hs
    m_j = gl.load(ws_ptr + m_off + rows, mask=ok, other=-1.0e30)
    l_j = gl.load(ws_ptr + l_off + rows, mask=ok, other=0.0)
    d3 = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, P3)))[None, None, :]
    a_j = gl.load(
        ws_ptr + acc_off + ((seg0 + js) * G + hs)[:, :, None] * 128 + d3,
        mask=ok[:, :, None], other=0.0,
    )  # fmt: skip
    m_s = gl.max(m_j, axis=0)
    w_j = gl.exp2(m_j - m_s[None, :])
    l_s = gl.sum(w_j * l_j, axis=0)
    a_s = gl.sum(w_j[:, :, None] * a_j, axis=0)
    return m_s, l_s, a_s


@gluon.jit
def _partial_sums(ws_ptr, acc_off):
    """The history partials' sums: fp16, normalized (divided by their ``l``), at the byte offset
    of ``acc_off`` float32 words, in parts of ``G x 256`` halves (the float32 parts' bytes: the
    segments' partials keep float32 sums)."""
    return (ws_ptr + acc_off).to(gl.pointer_type(gl.float16), bitcast=True)


@gluon.constexpr_function
def _merge_shape(GQ, W):
    """How the merge spreads a round of split partials ``(SC, GQ, 128)`` over its threads:
    heads over warps, 8 value dims a thread, the rest of a warp's lanes over the splits, so
    that a thread holds 64 partial sums and only ``64 / 8`` of the splits' weights. Returns
    ``(SC, splits a thread, lanes along the splits, warps along the heads)``."""
    wh = min(GQ, W)
    wd = W // wh
    lanes_d = 128 // (8 * wd)
    lanes_s = 32 // lanes_d
    spt = max(1, 8 // (GQ // wh))
    return spt * lanes_s, spt, lanes_s, wh


@gluon.constexpr_function
def _merge_split_round(GQ, W):
    """Splits the merge folds per round (:func:`_merge_shape`)."""
    return _merge_shape(GQ, W)[0]


@gluon.constexpr_function
def _merge_layout(GQ, W):
    """The ``(SC, GQ, 128)`` layout of a round of split partials (:func:`_merge_shape`)."""
    _, spt, lanes_s, wh = _merge_shape(GQ, W)
    return gl.BlockedLayout([spt, 1, 8], [lanes_s, 1, 32 // lanes_s], [1, wh, W // wh], [2, 1, 0])


@gluon.jit
def _split_round(
    ws_ptr, m_off, l_off, acc_off, first, s0, n_hist,
    G: gl.constexpr, GQ: gl.constexpr, W: gl.constexpr,
):  # fmt: skip
    """Split partials ``s0 .. s0 + SC - 1`` of a KV head (parts from ``first``), loaded: ``m``,
    ``l`` ``(SC, GQ)`` and the sums ``(SC, GQ, 128)`` in :func:`_merge_layout`; splits past
    ``n_hist`` and heads past ``G`` read as empty."""
    SC: gl.constexpr = _merge_split_round(GQ, W)
    S3: gl.constexpr = _merge_layout(GQ, W)
    MS: gl.constexpr = gl.SliceLayout(2, S3)
    sp = gl.arange(0, SC, layout=gl.SliceLayout(1, MS))
    hm = gl.arange(0, GQ, layout=gl.SliceLayout(0, MS))
    s3 = gl.arange(0, SC, layout=gl.SliceLayout(1, MS))[:, None, None]
    h3 = gl.arange(0, GQ, layout=gl.SliceLayout(0, MS))[None, :, None]
    d3 = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, S3)))[None, None, :]
    ok = ((s0 + sp) < n_hist)[:, None] & (hm < G)[None, :]
    rows = (first + s0 + sp)[:, None] * 16 + hm[None, :]
    m_c = gl.load(ws_ptr + m_off + rows, mask=ok, other=-1.0e30)
    l_c = gl.load(ws_ptr + l_off + rows, mask=ok, other=0.0)
    a_c = gl.load(
        _partial_sums(ws_ptr, acc_off) + ((first + s0 + s3) * G + h3) * 256 + d3,
        mask=((s0 + s3) < n_hist) & (h3 < G), other=0.0,
    )  # fmt: skip
    return m_c, l_c, a_c


@gluon.jit
def _fold_round(m_run, l_run, acc, m_c, l_c, a_c, S3: gl.constexpr):
    """The running merge (max ``m_run``, sum ``l_run`` ``(GQ,)``, sums ``acc`` ``(GQ, 128)``)
    with a round of split partials folded in (online softmax over the splits)."""
    m_new = gl.maximum(m_run, gl.max(m_c, axis=0))
    scale = gl.exp2(m_run - m_new)
    w = gl.exp2(m_c - m_new[None, :]) * l_c  # (SC, GQ); the sums come divided by l
    l_run = l_run * scale + gl.sum(w, axis=0)
    scale_a = gl.convert_layout(scale, gl.SliceLayout(1, gl.SliceLayout(0, S3)))
    acc = acc * scale_a[:, None] + gl.sum(w[:, :, None] * a_c.to(gl.float32), axis=0)
    return m_new, l_run, acc


@gluon.jit
def _merge_splits(
    ws_ptr, m_off, l_off, acc_off, bh, n_hist, n_segp, unrot_ptr, out_ptr, row0,
    G: gl.constexpr, GQ: gl.constexpr, W: gl.constexpr, HAS_SEG: gl.constexpr,
    SEG_SPLIT: gl.constexpr,
):  # fmt: skip
    """The last program of a KV head: the history's ``n_hist`` split partials merged (online
    softmax over the splits, a round of them at once, the split axis in registers), joined
    with the segments' ``n_segp`` partials (the parts after the history's, when ``HAS_SEG``)
    in one softmax, the history's share rotated back on the tensor cores (``unrot``: the fp16
    rotation, row ``j`` the weights of output dim ``j``; the normalized sums as fp16 high and
    low parts), and stored as output rows ``row0 .. row0 + G - 1``. Heads are padded to ``GQ``
    (a power of two) in registers and to 8 in the rotation's product."""
    SC: gl.constexpr = _merge_split_round(GQ, W)
    S3: gl.constexpr = _merge_layout(GQ, W)
    MS: gl.constexpr = gl.SliceLayout(2, S3)  # (SC, GQ)
    AL: gl.constexpr = gl.SliceLayout(0, S3)  # (GQ, 128)
    HL: gl.constexpr = gl.SliceLayout(0, MS)  # (GQ,)
    first = bh * (n_hist + n_segp)  # the KV head's parts: the history's, the segments'
    # the rotation back into shared memory, while the partials load
    mat = gl.allocate_shared_memory(gl.float16, [128, 128], _ROTATION_SMEM)
    _copy_rotation(mat, unrot_ptr, W)
    # the first round of split partials, then the segments' partials, all loads in flight
    # before any reduction waits (plain loads: the ticket's acquire invalidated L1)
    m_c, l_c, a_c = _split_round(ws_ptr, m_off, l_off, acc_off, first, 0, n_hist, G, GQ, W)
    if HAS_SEG:
        seg = first + n_hist
        if not SEG_SPLIT:  # one: loaded as it is (long contexts leave no room for more)
            hs = gl.arange(0, GQ, layout=HL)
            m_s = gl.load(ws_ptr + m_off + seg * 16 + hs, mask=hs < G, other=-1.0e30)
            l_s = gl.load(ws_ptr + l_off + seg * 16 + hs, mask=hs < G, other=0.0)
            ha = gl.arange(0, GQ, layout=gl.SliceLayout(1, AL))[:, None]
            da = gl.arange(0, 128, layout=gl.SliceLayout(0, AL))[None, :]
            a_s = gl.load(ws_ptr + acc_off + (seg * G + ha) * 128 + da, mask=ha < G, other=0.0)
        else:
            m_j, l_j, a_j = _merge_segments(ws_ptr, m_off, l_off, acc_off, seg, n_segp, G, GQ, W)
            m_s = gl.convert_layout(m_j, HL)
            l_s = gl.convert_layout(l_j, HL)
            a_s = gl.convert_layout(a_j, AL)
    m_run = gl.full([GQ], -1.0e30, gl.float32, layout=HL)
    l_run = gl.zeros([GQ], gl.float32, layout=HL)
    acc = gl.zeros([GQ, 128], gl.float32, layout=AL)
    m_run, l_run, acc = _fold_round(m_run, l_run, acc, m_c, l_c, a_c, S3)
    for s0 in range(SC, n_hist, SC):
        m_c, l_c, a_c = _split_round(ws_ptr, m_off, l_off, acc_off, first, s0, n_hist, G, GQ, W)
        m_run, l_run, acc = _fold_round(m_run, l_run, acc, m_c, l_c, a_c, S3)
    # one softmax over the history's and the segments' parts: each side's weight per head,
    # applied before the rotation back (the normalized history fits fp16)
    RL: gl.constexpr = gl.SliceLayout(1, AL)
    if HAS_SEG:
        m_all = gl.maximum(m_run, m_s)
        w_h = gl.exp2(m_run - m_all)
        w_s = gl.exp2(m_s - m_all)
        den = l_run * w_h + l_s * w_s
        x = acc * gl.convert_layout(w_h / den, RL)[:, None]
        y = a_s * gl.convert_layout(w_s / den, RL)[:, None]
    else:
        x = acc / gl.convert_layout(l_run, RL)[:, None]
    # through shared memory as (8, 128), heads past GQ zero, read back transposed
    ZL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [W, 1], [1, 0])
    xs = gl.allocate_shared_memory(gl.float32, [8, 128], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    if GQ < 8:
        xs.store(gl.zeros([8, 128], gl.float32, layout=ZL))
        gl.thread_barrier()
    xs.slice(0, GQ, dim=0).store(x)
    if HAS_SEG:
        ys = gl.allocate_shared_memory(
            gl.float32, [8, 128], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        )
        if GQ < 8:
            ys.store(gl.zeros([8, 128], gl.float32, layout=ZL))
            gl.thread_barrier()
        ys.slice(0, GQ, dim=0).store(y)
    async_copy.wait_group(0)
    gl.thread_barrier()
    # the merge's loads have landed: the next kernel's programs may start (see _GRID_LAUNCH)
    hs = gl.arange(0, GQ, layout=HL)
    gl.inline_asm_elementwise(_GRID_LAUNCH, "=r,r", [hs], dtype=gl.int32, is_pure=False, pack=1)
    QL: gl.constexpr = gl.BlockedLayout([8, 1], [4, 8], [W, 1], [0, 1])  # (128 dims, 8 heads)
    xt = xs.permute((1, 0)).load(QL)
    hi = xt.to(gl.float16)
    out = _rotate(mat, hi, (xt - hi.to(gl.float32)).to(gl.float16), W)  # (128, 8)
    MMA: gl.constexpr = _rotation_mma(W)
    if HAS_SEG:
        out += ys.permute((1, 0)).load(MMA)
    jo = gl.arange(0, 128, layout=gl.SliceLayout(1, MMA))[:, None]
    ho = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))[None, :]
    gl.store(out_ptr + (row0 + ho) * 128 + jo, out.to(out_ptr.dtype.element_ty), mask=ho < G)


@gluon.jit
def _rotated_query(
    query_ptr, stride_qb, stride_qh, qscale, mat, b, h, g, t, c,
    G: gl.constexpr, W: gl.constexpr,
):  # fmt: skip
    """The B-fragment words of the scaled query rotated into the keys' domain (fp16 pairs,
    int32 ``(32 W, 4)`` x 4: head ``g``, dims ``32 t .. 32 t + 31``; 0 for heads ``>= G``),
    computed by the program itself on the tensor cores (the query scaled and rounded to fp16,
    the rotation ``mat`` staged in the pair table's bytes) and handed to the lanes through the
    first 2 KB of shared memory (the table's, filled after: the caller puts a barrier before
    it)."""
    QL: gl.constexpr = gl.BlockedLayout([8, 1], [4, 8], [W, 1], [0, 1])  # (128 dims, 8 heads)
    dq = gl.arange(0, 128, layout=gl.SliceLayout(1, QL))[:, None]
    hq = gl.arange(0, 8, layout=gl.SliceLayout(0, QL))[None, :]
    qt = gl.load(
        query_ptr + b * stride_qb + (h * G + hq) * stride_qh + dq, mask=hq < G, other=0.0
    ).to(gl.float32)
    rq = _rotate(mat, (qt * qscale).to(gl.float16), None, W).to(gl.float16)  # (128, 8)
    gl.thread_barrier()  # every warp has read the staged rotation (its first 2 KB are reused)
    MMA: gl.constexpr = _rotation_mma(W)
    jo = gl.arange(0, 128, layout=gl.SliceLayout(1, MMA))[:, None]
    ho = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))[None, :]
    gl.inline_asm_elementwise(
        _STORE_HALF, "=r,r,h", [ho * 256 + 2 * jo, rq], dtype=gl.int32, is_pure=False, pack=1
    )
    gl.thread_barrier()
    addr = (g * 256 + 64 * t)[:, None] + 4 * c[None, :]
    ok = (g < G)[:, None]
    q0 = gl.inline_asm_elementwise(
        _LOAD_WORD, "=r,r", [addr], dtype=gl.int32, is_pure=False, pack=1
    )
    q1 = gl.inline_asm_elementwise(
        _LOAD_WORD, "=r,r", [addr + 16], dtype=gl.int32, is_pure=False, pack=1
    )
    q2 = gl.inline_asm_elementwise(
        _LOAD_WORD, "=r,r", [addr + 32], dtype=gl.int32, is_pure=False, pack=1
    )
    q3 = gl.inline_asm_elementwise(
        _LOAD_WORD, "=r,r", [addr + 48], dtype=gl.int32, is_pure=False, pack=1
    )
    return gl.where(ok, q0, 0), gl.where(ok, q1, 0), gl.where(ok, q2, 0), gl.where(ok, q3, 0)


@gluon.jit
def _history_partial(
    query_ptr, stride_qb, stride_qh, rot_ptr, qscale, ws_ptr, m_off, l_off, acc_off, part,
    kp_ptr, kn_ptr, vp_ptr, vn_ptr, ktab_ptr, vtab_ptr, b, h, bs, start, stop, bounds_ptr,
    n_pre, kp_sb, kp_sh, kn_sb, kn_sh, vp_sb, vp_sh, vn_sb, vn_sh, split, n_static, dyn_ptr,
    G: gl.constexpr, GQ: gl.constexpr, W: gl.constexpr, HAS_BOUNDS: gl.constexpr,
    KB: gl.constexpr, VB: gl.constexpr, DYNAMIC: gl.constexpr,
):  # fmt: skip
    """The partial of history tokens ``[start, stop)`` (of them the visible ones, when
    ``HAS_BOUNDS``) for the query heads of one KV head: the program's walk, then its warps
    merged and stored at workspace part ``part`` (m / l: 16 rows; the sums divided by l: fp16,
    ``G x 128`` in the values' rotated domain, :func:`_partial_sums`). Before the grid wait it
    only stages the constants (the query rotation, the tables).

    ``DYNAMIC`` (no bounds; ``start`` 0, ``stop`` the history's length): the history in chunks
    of 32 tokens, the last ``n_static`` one per warp (warp ``w`` of program ``split``: chunk
    ``n_chunks - 1 - (split * W + w)``, in a first, masked step: the tail's partial chunk is
    among them), the others in ``W`` pools (pool ``j``: chunks ``j, j + W, ...``), drawn one
    at a time by warp ``j`` of every program of the KV head from its pool's counter at
    ``dyn_ptr`` + 32 j: each warp walks until its pool runs out, so that the programs end
    together whatever their share of an SM (NOTES, session 18)."""
    L: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [W, 1], [1, 0])
    r = gl.arange(0, 32 * W, layout=gl.SliceLayout(1, L))
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, L))
    lane = r % 32
    w = r // 32
    g = lane // 4
    t = lane % 4
    # per-thread byte addresses at token 0 (copy_asm): byte 16 lane of the key rows (K4: group
    # 4t of token g; K3: chunk lane of the warp's rows) and of the value rows (chunk lane of
    # the warp's rows)
    kn_row = kn_ptr + bs * kn_sb + h * kn_sh
    vn_row = vn_ptr + bs * vn_sb + h * vn_sh
    zero = gl.zeros([32 * W, 4], gl.int64, layout=L)
    kp_row = (kp_ptr + bs * kp_sb + h * kp_sh).to(gl.int64)
    vp_row = (vp_ptr + bs * vp_sb + h * vp_sh).to(gl.int64)
    # the norms' rows (key rows for lanes 0-7, value rows for lanes 8-15: copy_asm), and where
    # a thread's key and value norms lie in its warp's norm bytes (rows need not be aligned)
    kn_a = kn_row.to(gl.int64)
    vn_a = vn_row.to(gl.int64)
    nrow = gl.where(lane < 8, kn_a, vn_a)
    bases = (
        kp_row + (16 * lane)[:, None] + zero,
        vp_row + (16 * lane)[:, None] + zero,
        nrow[:, None] + zero,
    )
    nbase = w * 256 + 2 * g
    nrd = gl.where(
        (c == 0)[None, :],
        (nbase + (kn_a % 16).to(gl.int32))[:, None],
        (nbase + 128 + (vn_a % 16).to(gl.int32))[:, None],
    )
    g4 = g[:, None] + 0 * c[None, :]
    tw = (w * 32)[:, None] + 0 * c[None, :]
    STEP: gl.constexpr = 32 * W
    STAGE_BYTES: gl.constexpr = _stage_bytes(W, KB, VB)
    LUT: gl.constexpr = _lut(KB)
    # software pipeline: the operands are copied STAGES - 1 steps ahead (K4 keys: each thread
    # its own words into its own blocks, in the pair table's odd halves; K3 keys, V2 values and
    # the norms: each warp its rows whole, read back after a warp sync; no block barriers); the
    # first copies fly while the program rotates its query and fills the table
    # the kernel's one allocation: the pair table's bytes (the staged query rotation first, in
    # the first 32 KB), the pipeline's stages, the warps' merge at the end
    buf = gl.allocate_shared_memory(
        gl.float32,
        [_program_rows(W, KB, VB), 32 * W, 4],
        gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
    )
    # the query rotation first (its own commit group), into the table's bytes
    mat = buf._reinterpret(gl.float16, [128, 128], _ROTATION_SMEM)
    _copy_rotation(mat, rot_ptr, W)
    # the tables' loads are issued before the query's rotation, to overlap their latency:
    # the key pair table goes into shared memory, one copy per lane (entry e of lane l at byte
    # stride * e + 4 l; thread (warp w, lane l) writes entries w, w + W, ... of column l)
    FL: gl.constexpr = gl.BlockedLayout([1, 256 // W], [32, 1], [W, 1], [1, 0])
    fr = gl.arange(0, 32 * W, layout=gl.SliceLayout(1, FL))
    fe = (fr // 32)[:, None] + W * gl.arange(0, 256 // W, layout=gl.SliceLayout(0, FL))[None, :]
    pairs = gl.load(ktab_ptr + fe)
    # V2: the value table per lane: distinct addresses keep it in ordinary registers (from a
    # uniform load the compiler would move it out of uniform registers before every permute);
    # V4 values are looked up in the key pair table
    if VB == 2:
        vtab = gl.load(vtab_ptr + (lane * 4)[:, None] + c[None, :])
    else:
        vtab = (lane * 4)[:, None] + 0 * c[None, :]
    # the constants are staged: from here on the program reads what earlier kernels wrote
    gl.inline_asm_elementwise(_GRID_WAIT, "=r,r", [lane], dtype=gl.int32, is_pure=False, pack=1)
    lo = 0
    if HAS_BOUNDS:
        lo = gl.load(bounds_ptr + 2 * b) - n_pre
        stop = gl.minimum(stop, gl.load(bounds_ptr + 2 * b + 1) - n_pre)
    stop4 = tw * 0 + stop
    if DYNAMIC:
        wq = _warp_index(split)
        drawn = _draw(dyn_ptr)  # the chunk of the second step
        n_chunks = (stop + 31) // 32
        n_dyn = n_chunks - n_static
        first = n_chunks - 1 - (split * W + w)
        tok_first = gl.where(first >= 0, first * 32, n_chunks * 32)  # none left: all masked
        _copy_step(
            bases, tok_first[:, None] + 0 * c[None, :], stop4, g4, tw * 0 + LUT,
            tw * 0 + _KEY_STAGE0, W, True, KB, VB,
        )  # fmt: skip
    else:
        for s in gl.static_range(_STAGES - 1):
            _copy_step(
                bases,
                tw + (start + s * STEP),
                stop4,
                g4,
                tw * 0 + (LUT + s * STAGE_BYTES),  # the stages follow the pair table
                tw * 0 + (_KEY_STAGE0 + s * _KEY_STAGE_STEP),
                W,
                True,
                KB,
                VB,
            )
    # the staged rotation has landed (the first stage's copies, newer, may still fly)
    gl.inline_asm_elementwise(_WAIT_OLDER, "=r,r", [lane], dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()
    q0, q1, q2, q3 = _rotated_query(
        query_ptr, stride_qb, stride_qh, qscale, mat, b, h, g, t, c, G, W
    )
    gl.thread_barrier()  # every lane has its query words before the table overwrites them
    gl.inline_asm_elementwise(
        _STORE, "=r,r,r", [fe * _lut_stride(KB) + ((fr % 32) * 4)[:, None], pairs],
        dtype=gl.int32, is_pure=False, pack=1,
    )  # fmt: skip
    gl.thread_barrier()
    lane4 = (lane * 4)[:, None] + 0 * c[None, :]
    m = gl.full([32 * W, 4], -1.0e30, gl.float32, layout=L)
    l_sum = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a0 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a1 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a2 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a3 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a4 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a5 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a6 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a7 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    if DYNAMIC:
        # the first, static step (masked), then the drawn chunks while the counter lasts; a
        # warp's copies run a step ahead of its compute and its draws two
        nxt = wq + _broadcast(drawn) * W
        drawn = _draw(dyn_ptr)
        _copy_step(
            bases, tw * 0 + nxt * 32, stop4, g4, tw * 0 + (LUT + STAGE_BYTES),
            tw * 0 + (_KEY_STAGE0 + _KEY_STAGE_STEP), W, True, KB, VB,
        )  # fmt: skip
        m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _step(
            tw * 0 + LUT, tw * 0 + _KEY_STAGE0, nrd, tok_first, g, t, c, lo, stop,
            q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7, W, True, KB,
            VB,
        )  # fmt: skip
        # the two stages' offsets, swapped each step by an exclusive or
        SWAP: gl.constexpr = LUT ^ (LUT + STAGE_BYTES)
        KSWAP: gl.constexpr = _KEY_STAGE0 ^ (_KEY_STAGE0 + _KEY_STAGE_STEP)
        here = split * 0 + (LUT + STAGE_BYTES)
        khere = split * 0 + (_KEY_STAGE0 + _KEY_STAGE_STEP)
        cur = nxt
        while cur < n_dyn:
            nxt = wq + _broadcast(drawn) * W
            drawn = _draw(dyn_ptr)
            at = tw * 0 + nxt * 32
            soff = tw * 0 + (here ^ SWAP)
            kso = tw * 0 + (khere ^ KSWAP)
            if VB == 2:
                _copy_step(bases, at, stop4, g4, soff, kso, W, True, KB, VB)
            elif nxt < n_dyn:
                _copy_step(bases, at, stop4, g4, soff, kso, W, False, KB, VB)
            else:
                _copy_step(bases, at, stop4, g4, soff, kso, W, True, KB, VB)
            m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _step(
                tw * 0 + here, tw * 0 + khere, nrd, w * 0 + cur * 32, g, t, c, lo, stop,
                q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7, W, False,
                KB, VB,
            )  # fmt: skip
            cur = nxt
            here = here ^ SWAP
            khere = khere ^ KSWAP
    else:
        n_steps = (gl.maximum(stop - start, 0) + STEP - 1) // STEP
        # whole steps need no masks (no bounds); the rest of the split takes one masked step
        n_full = 0
        if not HAS_BOUNDS:
            n_full = (stop - start) // STEP
        for i in range(n_full):
            m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _pipelined_step(
                i, n_full, start, bases, nrd, tw, stop4, g4, w, g, t, c, lo,
                stop, q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7,
                W, False, KB, VB,
            )  # fmt: skip
        for i in range(n_full, n_steps):
            m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _pipelined_step(
                i, n_full, start, bases, nrd, tw, stop4, g4, w, g, t, c, lo,
                stop, q0, q1, q2, q3, lane4, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7,
                W, True, KB, VB,
            )  # fmt: skip
    # the copies beyond the split (zero-fill) land, and every warp is done with the table and
    # its stages, before the buffer is reused below
    gl.inline_asm_elementwise(_WAIT_ALL, "=r,f", [m], dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()
    # merge the warps through shared memory; one partial per program
    l_lanes = gl.inline_asm_elementwise(
        _LANE_SUM, "=f,f", [l_sum], dtype=gl.float32, is_pure=True, pack=1
    )
    buf.index(0).store(a0)
    buf.index(1).store(a1)
    buf.index(2).store(a2)
    buf.index(3).store(a3)
    buf.index(4).store(a4)
    buf.index(5).store(a5)
    buf.index(6).store(a6)
    buf.index(7).store(a7)
    buf.index(8).store(m)
    buf.index(9).store(l_lanes)
    gl.thread_barrier()
    # column k of a warp's (32, 4) block: lane k // 4, register k % 4
    ML: gl.constexpr = gl.BlockedLayout([W, 1], [1, 32], [1, W], [1, 0])
    mw = buf.index(8).reshape([W, 128]).load(ML)
    m_tot = gl.max(mw, axis=0)
    wts = gl.exp2(mw - m_tot[None, :])
    col = gl.arange(0, 128, layout=gl.SliceLayout(0, ML))
    cl = col // 4
    cr = col % 4
    head = 2 * (cl % 4) + cr % 2
    real = head < G
    once = (cl < 4) & (cr < 2) & real
    gl.store(ws_ptr + m_off + part * 16 + head, m_tot, mask=once)
    l_tot = _merge_column(buf, 9, wts, W, ML)
    gl.store(ws_ptr + l_off + part * 16 + head, l_tot, mask=once)
    # the sums divided by l as fp16 (the merge's loads halved; the weighted average of the
    # values' centroids scaled by their norms: fp16's range and precision hold it)
    inv = gl.where(l_tot > 0.0, 1.0 / l_tot, 0.0)
    out = _partial_sums(ws_ptr, acc_off) + (part * G + head) * 256 + 16 * (cl // 4) + 4 * (cr // 2)
    gl.store(out + 0, (_merge_column(buf, 0, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 1, (_merge_column(buf, 1, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 2, (_merge_column(buf, 2, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 3, (_merge_column(buf, 3, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 8, (_merge_column(buf, 4, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 9, (_merge_column(buf, 5, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 10, (_merge_column(buf, 6, wts, W, ML) * inv).to(gl.float16), mask=real)
    gl.store(out + 11, (_merge_column(buf, 7, wts, W, ML) * inv).to(gl.float16), mask=real)


# run-time values the kernel is never specialized on (each call has its own); the other integer
# arguments are, on divisibility by 16 (see _launch)
_RUNTIME_INTS = ("T", "split_len", "n_pre", "n_suf", "n_segp", "seg_span")


@gluon.jit(do_not_specialize=list(_RUNTIME_INTS))
def _mma_decode_kernel(
    query_ptr,  # (B, Hq, 1, 128), last stride 1
    stride_qb,
    stride_qh,
    qscale,  # scale * log2(e)
    rot_ptr,  # (128, 128) fp16 Pi_K: the query into the keys' domain, q_rot = rot @ q
    unrot_ptr,  # (128, 128) fp16 Pi_V^T: the values' rotation back, out = unrot @ o_rot
    ws_ptr,  # float32 workspace: partials at m_off / l_off / acc_off
    m_off,
    l_off,
    acc_off,
    cnt_ptr,  # int32, zero between calls: B * Hkv tickets, then (DYNAMIC) the pools' counters
    out_ptr,  # (B, Hq, 1, 128) contiguous, the query dtype
    kp_ptr,  # packed key rows, 64 bytes each (16-byte aligned)
    kn_ptr,  # key norms, fp16, unit token stride
    vp_ptr,  # packed value rows, 16 * VB bytes each
    vn_ptr,  # value norms, fp16
    ktab_ptr,  # (256,) int32: the key pair table (pair_table)
    vtab_ptr,  # (32, 4) int32: per lane, the value table's low bytes, high bytes, 0, 0 (V2)
    T,
    split_len,  # tokens per program, a multiple of 32 * W
    n_kv,
    rows_per_seq,
    bounds_ptr,  # (B, 2) int32 visible positions [from, until), read when HAS_BOUNDS
    kp_sb,  # strides in bytes (packed rows) and elements (norms)
    kp_sh,
    kn_sb,
    kn_sh,
    vp_sb,
    vp_sh,
    vn_sb,
    vn_sh,
    pk_ptr,  # prefix (sink) keys / values (B, Hkv, n_pre, 128), last stride 1 (HAS_SEG)
    pv_ptr,
    n_pre,
    pk_sb,
    pk_sh,
    pk_st,
    pv_sb,
    pv_sh,
    pv_st,
    sk_ptr,  # suffix (window, staged) keys / values (B, Hkv, n_suf, 128) (HAS_SEG)
    sv_ptr,
    n_suf,
    sk_sb,
    sk_sh,
    sk_st,
    sv_sb,
    sv_sh,
    sv_st,
    n_segp,  # programs per KV head for the segments (HAS_SEG), the last parts
    seg_span,  # segment tokens per such program
    G: gl.constexpr,
    GQ: gl.constexpr,  # G padded to a power of two
    W: gl.constexpr,
    HAS_BOUNDS: gl.constexpr,
    HAS_SEG: gl.constexpr,  # the last n_segp programs of each KV head take the segments
    SEG_SPLIT: gl.constexpr,  # n_segp > 1 (a build apart: the merge's code for one stays lean)
    KB: gl.constexpr,  # key bits: 4, or 3 (values of 2 bits)
    VB: gl.constexpr,  # value bits: 2, or 4 (looked up in the key pair table: one codebook)
    DYNAMIC: gl.constexpr,  # the history's chunks drawn at run time (no bounds): _history_partial
):
    bh = gl.program_id(0)
    split = gl.program_id(1)
    n_parts = gl.num_programs(1)
    b = bh // n_kv
    h = bh % n_kv
    bs = (b // rows_per_seq).to(gl.int64)  # offsets of big caches pass 2**31 bytes
    part = bh * n_parts + split
    start = split * split_len
    stop = gl.minimum(start + split_len, T)
    # DYNAMIC: every history program walks the whole history's drawn chunks (after its own
    # static one), from the KV head's W pools, lines of 32 counters after the tickets (cnt_ptr:
    # 32 (W + 1) B * Hkv)
    n_static = (n_parts - n_segp) * W
    dyn_ptr = cnt_ptr + 32 * (gl.num_programs(0) + W * bh)
    if DYNAMIC:
        start = 0
        stop = T
    if HAS_SEG:
        if split >= n_parts - n_segp:
            seg_from = 0  # a lone program takes them all (a constant: no spill in this build)
            if SEG_SPLIT:
                seg_from = (split - (n_parts - n_segp)) * seg_span
            _segment_partial(
                query_ptr, stride_qb, stride_qh, qscale, b, h, bs, ws_ptr, m_off, l_off,
                acc_off, part, pk_ptr, pv_ptr, n_pre, pk_sb, pk_sh, pk_st, pv_sb, pv_sh, pv_st,
                sk_ptr, sv_ptr, n_suf, sk_sb, sk_sh, sk_st, sv_sb, sv_sh, sv_st, bounds_ptr, T,
                seg_from, seg_from + seg_span, G, W, HAS_BOUNDS,
            )  # fmt: skip
        else:
            _history_partial(
                query_ptr, stride_qb, stride_qh, rot_ptr, qscale, ws_ptr, m_off, l_off,
                acc_off, part, kp_ptr, kn_ptr, vp_ptr, vn_ptr, ktab_ptr, vtab_ptr, b, h, bs,
                start, stop, bounds_ptr, n_pre, kp_sb, kp_sh, kn_sb, kn_sh, vp_sb, vp_sh, vn_sb,
                vn_sh, split, n_static, dyn_ptr,
                G, GQ, W, HAS_BOUNDS, KB, VB, DYNAMIC,
            )  # fmt: skip
    else:
        _history_partial(
            query_ptr, stride_qb, stride_qh, rot_ptr, qscale, ws_ptr, m_off, l_off,
            acc_off, part, kp_ptr, kn_ptr, vp_ptr, vn_ptr, ktab_ptr, vtab_ptr, b, h, bs,
            start, stop, bounds_ptr, n_pre, kp_sb, kp_sh, kn_sb, kn_sh, vp_sb, vp_sh, vn_sb,
            vn_sh, split, n_static, dyn_ptr,
            G, GQ, W, HAS_BOUNDS, KB, VB, DYNAMIC,
        )  # fmt: skip
    # take a ticket: the program that takes the last one merges the KV head's parts. The
    # barrier orders every thread's stores of this partial before the ticket, whose release
    # (gpu scope, cumulative) publishes them; its acquire makes the others' partials visible
    # to the merge (as a cooperative grid sync does: no fence by every thread)
    gl.thread_barrier()
    ticket = gl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
    if ticket == n_parts - 1:
        _merge_splits(
            ws_ptr, m_off, l_off, acc_off, bh, n_parts - n_segp, n_segp, unrot_ptr, out_ptr,
            bh * G, G, GQ, W, HAS_SEG, SEG_SPLIT,
        )  # fmt: skip
        gl.store(cnt_ptr + bh, 0)
        if DYNAMIC:  # every program has taken its ticket: no warp draws any more
            PL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
            pool = gl.arange(0, 32 * W, layout=PL)
            gl.store(dyn_ptr + pool, 0, mask=pool % 32 == 0)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tables(key_q: Any, value_q: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The constants of a quantizer pair on a device, built once: the key pair table ``(256,)``
    (:func:`.decode_mma_ptx.pair_table`), the per-lane value table ``(32, 4)`` (2-bit values;
    4-bit ones share the key pair table, and this is the key table again), and the two
    rotations as the tensor cores' A operands, fp16 ``(128, 128)`` with row ``j`` the weights
    of output dim ``j``: the query's into the keys' domain (``Pi_K``: ``q_rot = Pi_K q``) and
    the values' back (``Pi_V^T``: ``out = Pi_V^T o_rot``)."""
    per_key = _TABLES.get(key_q)
    if per_key is None:
        per_key = _TABLES[key_q] = weakref.WeakKeyDictionary()
    per_value = per_key.get(value_q)
    if per_value is None:
        per_value = per_key[value_q] = {}
    found = per_value.get(device)
    if found is None:
        ktab = torch.tensor(pair_table(key_q.codebook.centroids), dtype=torch.int32, device=device)
        vtab = ktab
        if value_q.spec.n_bits == 2:
            vlo, vhi = table_words(value_q.codebook.centroids)
            vtab = torch.tensor([vlo + vhi + [0, 0]] * 32, dtype=torch.int32, device=device)

        def fp16(a: np.ndarray) -> torch.Tensor:  # rounded once from float64, row-major
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float16), device=device)

        kmat = fp16(key_q.rotation.matrix())
        vmat = fp16(value_q.rotation.matrix().T)
        found = per_value[device] = (ktab, vtab, kmat, vmat)
    return found


def _aligned(qt: Any, row_bytes: int) -> bool:
    """Whole packed rows on 16-byte boundaries (the copies are 16-byte key groups and 4- or
    8-byte value words) and norms of unit token stride."""
    p, n = qt.packed, qt.norms
    if p.dim() != 4:
        return False
    sb, sh, st, sd = p.stride()
    return (
        p.shape[-1] == row_bytes
        and sd == 1
        and st == row_bytes
        and p.data_ptr() % 16 == 0
        and sb % 16 == 0
        and sh % 16 == 0
        and n.stride(2) == 1
    )


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: assume current
        return True
    return found >= (major, minor)


# Gluon's API moves between Triton releases; this path is built and tested with 3.6
_GLUON_OK = _triton_at_least(3, 6)


def serves_mma(query: torch.Tensor, keys: Any, values: Any, key_q: Any, value_q: Any) -> bool:
    """Whether this path serves the call (else the block kernel does): Triton >= 3.6, CUDA
    tensors, K4/V2, K3/V2, or K4/V4 with one codebook for keys and values (the 4-bit lookups
    share the key pair table), head_dim 128, at most 8 query heads per KV head, aligned rows."""
    g = query.shape[1] // keys.shape[1]
    kbits, vbits = key_q.spec.n_bits, value_q.spec.n_bits
    # V4 reads the keys' pair table (codebooks are cached per width: mostly the same object)
    kc, vc = key_q.codebook, value_q.codebook
    values_ok = vbits == 2 or kc is vc or np.array_equal(kc.centroids, vc.centroids)
    return (
        _GLUON_OK
        and query.is_cuda
        and query.shape[-1] == 128
        and 1 <= g <= 8
        and (kbits, vbits) in SERVED_BITS
        and values_ok
        and _aligned(keys, 16 * kbits)
        and _aligned(values, 16 * vbits)
    )


_COUNTERS: dict = {}
_OUTGROWN: list = []  # counters a larger call replaced: CUDA graphs may still use them


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-KV-head tickets of the fused merge, then (``DYNAMIC``) the KV heads' pools of drawn
    chunks, zero between calls (the last program of a KV head resets its own). A larger call
    gets a new tensor (at least twice the size); the old one stays allocated, since a CUDA
    graph captured with it still reads and writes it on every replay."""
    found = _COUNTERS.get(device)
    if found is None or found.numel() < n:
        if found is not None:
            _OUTGROWN.append(found)
        size = max(n, 1024 if found is None else 2 * found.numel())
        found = _COUNTERS[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return found


def launch_mma_decode(
    query, keys, values, key_q, value_q, qscale, out, prefix, suffix, *,
    rows_per_seq, bounds, tokens_per_split, num_warps, sm_count, workspace,
):  # fmt: skip
    """One launch: the history's split partials, the segments' partial (``prefix`` / ``suffix``:
    the argument lists of :func:`.decode_attention._segment_args`; one more program per KV head
    when either holds tokens), and the merge by the last program of each KV head into ``out``
    (``(B, Hq, 1, 128)`` contiguous). The rotations come from the quantizers
    (:func:`_tables`)."""
    b, hq, _, d = query.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    g = hq // n_kv
    bh = b * n_kv
    device = query.device
    step = STEP_TOKENS * num_warps
    # a whole wave: as many programs per SM as shared memory and the register file hold (K3/V2's
    # 74 KB would let three 8-warp programs in by shared memory; the registers hold two)
    kbits, vbits = key_q.spec.n_bits, value_q.spec.n_bits
    by_smem = SMEM_PER_SM // program_smem(32 * num_warps, vbits, kbits, STAGES)
    per_sm = max(1, min(by_smem, _REGISTERS_PER_SM // (_MAX_REGISTERS * 32 * num_warps)))
    if tokens_per_split is None:
        tokens_per_split = math.ceil(t / max(1, per_sm * sm_count // bh))
    split_len = max(step, math.ceil(tokens_per_split / step) * step)
    splits = math.ceil(t / split_len)
    n_seg = prefix[2] + suffix[2]
    has_seg = n_seg > 0
    # the segments' rounds are latency-bound: a few per program and the programs side by side,
    # as many as the wave has room for beside the history's (at least one)
    room = max(1, (per_sm * sm_count - bh * splits) // bh)
    n_segp = min(SEG_PROGRAMS, math.ceil(n_seg / SEG_TOKENS_PER_PROGRAM), room)
    seg_span = math.ceil(n_seg / max(n_segp, 1) / 4) * 4
    slots = splits + n_segp  # parts per KV head: the splits, then the segments' programs
    m_off, l_off, acc_off = 0, bh * slots * 16, 2 * bh * slots * 16
    ws = workspace(device, acc_off + bh * slots * g * d)
    ktab, vtab, kmat, vmat = _tables(key_q, value_q, device)
    kp, kn, vp, vn = keys.packed, keys.norms, values.packed, values.norms
    args = (
        query, *query.stride()[:2], qscale, kmat, vmat,
        ws, m_off, l_off, acc_off, _counters(device, 32 * (num_warps + 1) * bh), out,
        kp, kn, vp, vn, ktab, vtab,
        t, split_len, n_kv, rows_per_seq, query if bounds is None else bounds,
        *kp.stride()[:2], *kn.stride()[:2], *vp.stride()[:2], *vn.stride()[:2],
        *prefix, *suffix, n_segp, seg_span,
    )  # fmt: skip
    # drawn chunks are walked in an order that varies from call to call (so do the sums'
    # roundings): not under torch's deterministic algorithms
    dynamic = not torch.are_deterministic_algorithms_enabled() and draws_at_run_time(
        bounds is not None, split_len // step, bh * slots, per_sm * sm_count
    )
    constexprs = (
        g, 1 << (g - 1).bit_length(), num_warps, bounds is not None, has_seg, n_segp > 1,
        kbits, vbits, dynamic,
    )  # fmt: skip
    _launch(device, (bh, slots, 1), args, constexprs)


# the kernel's run-time arguments by kind: the pointers (``*_ptr``, tensors), the integers
# (all but those and the float ``qscale``), of those the ones Triton specializes on (all but
# ``_RUNTIME_INTS``)
_NAMES = [p.name for p in _mma_decode_kernel.params if not p.is_constexpr]
_pointers = itemgetter(*(i for i, name in enumerate(_NAMES) if name.endswith("_ptr")))
_INTS = [i for i, name in enumerate(_NAMES) if not name.endswith("_ptr") and name != "qscale"]
_ints = itemgetter(*_INTS)
_specialized = itemgetter(*(i for i in _INTS if _NAMES[i] not in _RUNTIME_INTS))


_LAUNCHES = FastLaunch(_mma_decode_kernel)


def _launch(device: torch.device, grid: tuple, args: tuple, constexprs: tuple) -> None:
    """Launch ``_mma_decode_kernel`` (:class:`.launch.FastLaunch`: through Triton's JIT once a
    specialization, then straight through its compiled launcher), keyed on what Triton 3.6
    specializes it on: the constexprs, each pointer's dtype and alignment, each integer's
    divisibility (but ``_RUNTIME_INTS``, which change every call) and each integer's type."""
    key = (
        device.index,
        constexprs,
        pointers_key(_pointers(args)),
        ints_key(_specialized(args)),
        int_types_key(_ints(args)),
    )
    g, gq, w, has_bounds, has_seg, seg_split, kb, vb, dynamic = constexprs
    names = {"G": g, "GQ": gq, "W": w, "HAS_BOUNDS": has_bounds, "HAS_SEG": has_seg}
    names |= {"SEG_SPLIT": seg_split, "KB": kb, "VB": vb, "DYNAMIC": dynamic}
    _LAUNCHES(
        key, device.index, grid[:2], args, names,
        num_warps=w, maxnreg=_MAX_REGISTERS, launch_pdl=True,
    )  # fmt: skip
