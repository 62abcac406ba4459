"""PTX of :mod:`.decode_partials_mma` as plain Python strings (no triton import, so the CPU
tests interpret the byte-permute lookups instruction by instruction): the centroid lookups
straight into ``mma.m16n8k16`` fragments, the scores, the online-softmax step and the value
product of one 16-token tile, for ``inline_asm_elementwise`` with ``pack=4``."""

from __future__ import annotations

import numpy as np

__all__ = [
    "SMEM_PER_SM",
    "STEP_TOKENS",
    "copy_asm",
    "dense_blocks",
    "key3_lookup_lines",
    "key_asm",
    "key_lookup_lines",
    "key_stage_offset",
    "lane_sum_asm",
    "lut_bytes",
    "lut_stride",
    "pair_table",
    "pair_value_lookup_lines",
    "program_rows",
    "program_smem",
    "softmax_asm",
    "stage_blocks",
    "stage_bytes",
    "stage_load_asm",
    "table_words",
    "value_asm",
    "value_lookup_lines",
]

STEP_TOKENS = 32  # tokens per warp and loop step (two tiles of 16)


def lut_stride(key_bits: int) -> int:
    """Bytes between entries of the key pair table, which lies at the start of shared memory,
    one copy per lane (entry ``e`` of lane ``l`` at byte ``stride * e + 4 l``: a warp's reads
    hit 32 banks). 4-bit keys: 256, so that one byte permute of a packed byte and the lane's
    offset is the address (:func:`key_lookup_lines`); the odd 128 bytes of each entry, unused
    by the table, hold the pipeline stages' key blocks (:func:`key_stage_offset`). 3-bit
    keys: 128 (a pair's 6 bits are not a whole byte; shift and mask)."""
    return 256 if key_bits == 4 else 128


def lut_bytes(key_bits: int) -> int:
    """Bytes of the key pair table's region: 256 entries (K4: 64 KB, K3: 32 KB)."""
    return 256 * lut_stride(key_bits)


def key_stage_offset(stage: int) -> int:
    """4-bit keys: the byte offset of pipeline stage ``stage``'s (0 or 1) key blocks in the
    pair table's region. Block ``j`` of thread ``r`` lies in the odd half of table entry
    ``128 (1 - stage) + j * threads / 8 + r / 8``, at ``16 (r % 8)`` in it (8 threads' blocks a
    half: 16-byte copies and loads without bank conflicts), so two stages of at most 256
    threads fill the halves: stage 0 those of entries 128-255 (its copies fly while the query
    rotation is staged in the region's first 32 KB), stage 1 those of entries 0-127."""
    if stage not in (0, 1):
        raise ValueError(f"stage must be 0 or 1 (the table's halves hold two), got {stage}")
    return 128 + 128 * 256 * (1 - stage)


_NEG = "0fF149F2CA"  # -1e30: the score of a token outside the visible range

# _OUTPUTS_LAST: Triton's inline PTX declares no early clobbers, so an output may take the
# register of an input that dies at the call; each `asm` here reads all its inputs (or copies
# them) before it writes any output. (A build that broke this rule computed a running sum from
# an output written just before: wrong only from a warp's second step on.)


def key_lookup_lines(x: str, lane: str, out: list[str]) -> list[str]:
    """PTX turning one packing group ``x`` (8 four-bit codes) into 4 fp16 pairs ``out`` (codes
    0-1, 2-3, 4-5, 6-7) read from the pair table in shared memory: entry ``e`` (a byte of
    ``x``: two codes) of lane ``l`` lies at byte ``256 e + 4 l`` from the table's start
    (:func:`lut_stride`), so one byte permute makes the address: byte ``k`` of ``x`` above the
    low byte of ``lane`` (``4 l``, whose other bytes are 0). ``base``: the table's address."""
    lines = []
    for k in range(4):
        lines += [
            f"prmt.b32 u, {x}, {lane}, 0x65{k}4;",
            "add.u32 u, u, base;",
            f"ld.shared.b32 {out[k]}, [u];",
        ]
    return lines


def pair_table(centroids: np.ndarray) -> list[int]:
    """The 256 words of the key pair table (int32): entry ``e`` holds the fp16 centroids of the
    two codes of ``e`` (low half: code ``e % n``, high half: ``e // n`` for ``n`` centroids),
    i.e. of a packed byte (4 bits) or of a pair's 6 bits (3 bits; entries from 64 on are 0)."""
    n = len(centroids)
    bits = np.asarray(centroids, dtype=np.float16).view(np.uint16).astype(np.int64)
    e = np.arange(n * n)
    words = np.zeros(256, dtype=np.int64)
    words[: n * n] = bits[e % n] | bits[e // n] << 16
    return [int(w) - (1 << 32) if w >= 1 << 31 else int(w) for w in words]


def key3_lookup_lines(words: list[str], lane: str, out: list[str]) -> list[str]:
    """PTX turning the 3 words of 4 packing groups of 3-bit codes (32 codes, 96 bits) into 16
    fp16 pairs ``out`` (codes 0-1, 2-3, ...): pair ``p`` is the 6 bits at stream bit ``6 p``
    (one word, or two by a funnel shift), the index of a pair-table entry as in
    :func:`key_lookup_lines` (``128 e + 4 l``)."""
    lines = []
    for p in range(16):
        word, shift = divmod(6 * p, 32)
        if shift > 26:  # the pair straddles two words
            lines.append(f"shf.r.wrap.b32 u, {words[word]}, {words[word + 1]}, {shift - 7};")
        elif shift >= 7:
            lines.append(f"shr.b32 u, {words[word]}, {shift - 7};")
        else:
            lines.append(f"shl.b32 u, {words[word]}, {7 - shift};")
        lines += [
            "and.b32 u, u, 0x1F80;",
            f"or.b32 u, u, {lane};",
            "add.u32 u, u, base;",
            f"ld.shared.b32 {out[p]}, [u];",
        ]
    return lines


def value_lookup_lines(wa: str, wb: str, lo: str, hi: str, out: list[str]) -> list[str]:
    """PTX turning the value words of two tokens ``wa``, ``wb`` (16 two-bit codes each) into 16
    fp16 pairs (token a, token b) ``out``: ``out[8 c + 2 s]`` is dim ``8 c + s`` and
    ``out[8 c + 2 s + 1]`` dim ``8 c + 4 + s`` (``c`` = 0, 1; ``s`` = 0..3); ``lo`` / ``hi``:
    the 4-entry table's low and high bytes."""
    lines = []
    for chunk, pattern in enumerate(("0x5140", "0x7362")):
        lines.append(f"prmt.b32 x, {wa}, {wb}, {pattern};")  # bytes of the two tokens
        for s in range(4):
            if s:
                lines += [f"shr.b32 z, x, {2 * s};", "and.b32 z, z, 0x03030303;"]
            else:
                lines.append("and.b32 z, x, 0x03030303;")
            o = 8 * chunk + 2 * s
            lines += [
                "mad.lo.u32 sel, z, 0x11, 0x40404040;",
                f"prmt.b32 {out[o]}, {lo}, {hi}, sel;",
                "shr.b32 sh, sel, 16;",
                f"prmt.b32 {out[o + 1]}, {lo}, {hi}, sh;",
            ]
    return lines


def pair_value_lookup_lines(words: list[str], lane: str, out: list[str]) -> list[str]:
    """PTX turning the 4-bit value words of two tokens (``words``: token a's dims 0-7 and
    8-15, then token b's) into 16 fp16 pairs (token a, token b) ``out``, laid out as
    :func:`value_lookup_lines` lays them. Each word is looked up as keys are (the key pair
    table: values of 4 bits share the keys' codebook), giving pairs of neighbouring dims of
    one token; byte permutes then pair the two tokens' entries of each dim."""
    a0, a1, b0, b1 = words
    lines = []
    for chunk, (wa, wb) in enumerate(((a0, b0), (a1, b1))):
        pa, pb = [f"pa{k}" for k in range(4)], [f"pb{k}" for k in range(4)]
        lines += key_lookup_lines(wa, lane, pa) + key_lookup_lines(wb, lane, pb)
        for s in range(4):
            half = "0x5410" if s % 2 == 0 else "0x7632"  # low halves, or high halves
            o = 8 * chunk + 2 * s
            lines.append(f"prmt.b32 {out[o]}, {pa[s // 2]}, {pb[s // 2]}, {half};")
            lines.append(f"prmt.b32 {out[o + 1]}, {pa[2 + s // 2]}, {pb[2 + s // 2]}, {half};")
    return lines


def stage_blocks(value_bits: int, key_bits: int = 4) -> int:
    """16-byte blocks a thread copies per pipeline stage: 4 (K4) or 3 (K3) of key groups, and 2
    (V2) or 4 (V4) of value bytes."""
    return key_bits + value_bits


def _dense_keys(key_bits: int) -> int:
    """Key blocks a thread has in a stage's own bytes: 3 (K3); K4 keys lie in the pair table's
    odd halves (:func:`key_stage_offset`)."""
    return 0 if key_bits == 4 else key_bits


def dense_blocks(value_bits: int, key_bits: int = 4) -> int:
    """16-byte blocks a thread has in a stage's own bytes (the rest: :func:`_dense_keys`)."""
    return _dense_keys(key_bits) + value_bits


NORM_BYTES = 256  # per warp and stage: the superset of the key norms (128), of the values' (128)


def stage_bytes(threads: int, value_bits: int, key_bits: int = 4) -> int:
    """Bytes of a pipeline stage's own region: its dense blocks (:func:`dense_blocks`), then the
    warps' norms."""
    return dense_blocks(value_bits, key_bits) * 16 * threads + NORM_BYTES * (threads // 32)


SMEM_PER_SM = 227 * 1024  # sm_90: shared memory a multiprocessor's blocks may hold together
_OPERAND_EXCHANGE = 2048  # bytes: the query's B operand, through shared memory to the mma layout


def program_rows(threads: int, value_bits: int, key_bits: int, stages: int) -> int:
    """Rows of ``16 * threads`` bytes in the kernel's one shared allocation: the pair table's
    region (whose bytes first hold the staged query rotation), then ``stages`` pipeline
    stages."""
    row = 16 * threads
    n_stages = -(-stages * stage_bytes(threads, value_bits, key_bits) // row)
    return lut_bytes(key_bits) // row + n_stages


# the history's chunks are drawn at run time (DYNAMIC) once a program's share is this many steps
# (and the call's programs fit one wave): draws_at_run_time
DYNAMIC_MIN_STEPS = 8


def draws_at_run_time(has_bounds: bool, steps: int, programs: int, wave: int) -> bool:
    """Whether the decode kernel's history programs draw their chunks at run time (its
    ``DYNAMIC`` build): without per-sequence bounds, when a program's share is at least
    ``DYNAMIC_MIN_STEPS`` steps and all ``programs`` fit one ``wave``. Measured on the H200
    (benchmarks/NOTES.md, session 18): at batch 1 it pays from 64K tokens (8 steps a program),
    costs at 32K (4 steps), and where the segments' programs wait for a second wave (batch 8)."""
    return not has_bounds and steps >= DYNAMIC_MIN_STEPS and programs <= wave


def program_smem(threads: int, value_bits: int, key_bits: int, stages: int) -> int:
    """Bytes of shared memory a program of ``threads`` takes: the kernel's one allocation
    (:func:`program_rows`), and the compiler's exchange of the query rotation's operand beyond
    it."""
    rows = program_rows(threads, value_bits, key_bits, stages)
    return rows * 16 * threads + _OPERAND_EXCHANGE


def _key_slot_lines(stage: str) -> list[str]:
    """PTX setting ``kh`` to this thread's first 4-bit key block of a stage (``stage``: the
    operand holding :func:`key_stage_offset`); block ``j`` lies ``32 j * threads`` further."""
    return [
        "shr.b32 kh, tid, 3;",
        "and.b32 k7, tid, 7;",
        "mul.lo.u32 kh, kh, 256;",
        "mad.lo.u32 kh, k7, 16, kh;",
        "mov.u32 k7, global_smem;",
        "add.u32 kh, kh, k7;",
        f"add.u32 kh, kh, {stage};",
    ]


def copy_asm(threads: int, masked: bool, value_bits: int = 2, key_bits: int = 4) -> str:
    """Asynchronous copies of one warp step (32 tokens from ``tb``) into this warp's part of a
    pipeline stage, then one commit (pack=4; one dummy output ``$0-$3``). In: ``$4`` / ``$8``
    the thread's key / value base at token 0 (K4: the key row of token ``g``; K3 keys and all
    values: the row bytes' chunk ``L`` = the lane), ``$12`` ``tb``, ``$16`` ``stop``, ``$20``
    ``g``, ``$24`` the stage's byte offset, ``$28`` the norm row's address (key norms for lanes
    0-7, value norms for lanes 8-15), ``$32`` the stage's :func:`key_stage_offset` (K4; else
    unused). Blocks: first the keys (K4: key groups ``4 t .. 4 t + 3`` of tokens ``g, g + 8,
    g + 16, g + 24``, 16 bytes each, blocks 0-3 in the pair table's odd halves; K3: the warp's
    32 rows of 48 bytes, contiguous, 1536 bytes a warp in blocks 0-2, lane ``L`` copying 16-byte
    chunks ``L, L + 32, L + 64``); then the values, the warp's 32 rows in 16-byte chunks, lane
    ``L`` copying chunks ``L + 32 k`` (``k < value_bits``) into value block ``k`` (V2 rows
    ``r`` and ``r ^ 1`` swapped where ``r`` has bit 2 set; V4 chunk positions ``^ 2 *`` bits 1
    and 2 of the row in its block of 8, so reads hit 32 banks); then the 64 bytes of each
    kind's 32 norms as 5 aligned 16-byte chunks (rows need not be aligned), 256 bytes a warp.
    Lanes copy each other's bytes: :func:`stage_load_asm` syncs the warp. ``masked``: tokens
    (rows) from ``stop`` on are not read (zero-filled; the norm chunks clamped to the bytes
    before ``stop``); else the whole step must lie before ``stop``."""
    blk = 16 * threads
    dense_keys = _dense_keys(key_bits)
    lines = [
        "{",
        ".reg .pred p;",
        ".reg .b32 tid, r, tk, sz, sk, w, kh, k7;",
        ".reg .b64 ka, va;",
        "mov.u32 tid, %tid.x;",
        # lanes copy each other's bytes: every lane of the warp is done reading the stage
        # these copies overwrite
        "bar.warp.sync 0xffffffff;",
        f"mad.wide.s32 ka, $12, {16 * key_bits}, $4;",
        f"mad.wide.s32 va, $12, {16 * value_bits}, $8;",
    ]
    if masked:
        lines.append("sub.s32 r, $16, $12;")

    def copy(dst: str, src: str, tok: str) -> None:
        if not masked:
            lines.append(f"cp.async.cg.shared.global [{dst}], [{src}], 16;")
            return
        # whole or nothing: the token is before stop
        lines.extend([f"add.s32 tk, {tok};", "setp.lt.s32 p, tk, r;", "selp.b32 sz, 16, 0, p;"])
        lines.append(f"cp.async.cg.shared.global [{dst}], [{src}], 16, sz;")

    krow = 16 * key_bits  # bytes per packed key row
    if key_bits == 4:
        lines += _key_slot_lines("$32")
        for j, off in enumerate((0, 8, 16, 24)):
            copy(f"kh+{32 * threads * j}", f"ka+{off * krow}", f"$20, {off}")
    else:
        # the warp's rows, contiguous: lane L's chunk k at 1536 w + 16 L + 512 k (row (L + 32 k)
        # // 3, i.e. * 43 >> 7 for L + 32 k < 96)
        lines += [
            "shr.b32 w, tid, 5;",
            "and.b32 tk, tid, 31;",
            "mov.u32 sk, global_smem;",
            "add.u32 sk, sk, $24;",
            "mad.lo.u32 sk, w, 1536, sk;",
            "mad.lo.u32 sk, tk, 16, sk;",
        ]
        for k in range(3):
            if not masked:
                lines.append(f"cp.async.cg.shared.global [sk+{512 * k}], [ka+{512 * k}], 16;")
                continue
            lines += [
                "and.b32 tk, tid, 31;",
                f"add.s32 tk, tk, {32 * k};",
                "mul.lo.u32 tk, tk, 43;",
                "shr.b32 tk, tk, 7;",
                "setp.lt.s32 p, tk, r;",
                "selp.b32 sz, 16, 0, p;",
                f"cp.async.cg.shared.global [sk+{512 * k}], [ka+{512 * k}], 16, sz;",
            ]
    # the warp's 32 value rows in 16-byte chunks, lane L's chunks L + 32 k (k < value_bits; a
    # chunk k holds 32 / value_bits rows, the warp's 512 bytes of value block k), its position
    # swizzled so that the reads hit 32 banks: V2 rows r and r ^ 1 swapped where r has bit 2
    # set; V4 chunk positions ^ 2 * (row bit 1, 2 of the block's 8 rows)
    lines += [
        "and.b32 tk, tid, 31;",
        f"shr.b32 w, tk, {3 if value_bits == 2 else 2};",
        f"and.b32 w, w, {1 if value_bits == 2 else 6};",
        *(["shl.b32 w, w, 1;"] if value_bits == 2 else []),
        "xor.b32 w, w, tk;",
        "mov.u32 sk, global_smem;",
        "add.u32 sk, sk, $24;",
        "shr.b32 tk, tid, 5;",
        "mad.lo.u32 sk, tk, 512, sk;",
        "mad.lo.u32 sk, w, 16, sk;",
    ]
    row_shift = 1 if value_bits == 2 else 2  # a row is 2 (V2) or 4 (V4) chunks
    for k in range(value_bits):
        dst, src = f"sk+{(dense_keys + k) * blk}", f"va+{512 * k}"
        if not masked:
            lines.append(f"cp.async.cg.shared.global [{dst}], [{src}], 16;")
            continue
        lines += [
            "and.b32 tk, tid, 31;",
            f"add.s32 tk, tk, {32 * k};",
            f"shr.b32 tk, tk, {row_shift};",  # the chunk's row
            "setp.lt.s32 p, tk, r;",
            "selp.b32 sz, 16, 0, p;",
            f"cp.async.cg.shared.global [{dst}], [{src}], 16, sz;",
        ]
    # the norms: the 16-byte chunks holding the 64 bytes of each kind's 32 norms from the row
    # address ``$28`` + 2 tb (key rows for lanes 0-7, value rows for lanes 8-15; rows need not
    # be aligned, so 5 chunks a kind), each copy clamped to the bytes before ``stop`` (never
    # past a row's visible tokens, never before an allocation's aligned start)
    n_blocks = dense_blocks(value_bits, key_bits)
    lines += [
        "{",
        ".reg .pred pn;",
        ".reg .b32 j, kd, nz;",
        ".reg .b64 na, ne, nd, jj;",
        "and.b32 tk, tid, 31;",
        "and.b32 j, tk, 7;",
        "shr.b32 kd, tk, 3;",
        "setp.lt.u32 pn, j, 5;",
        "setp.lt.and.u32 pn, kd, 2, pn;",
        "mad.wide.s32 na, $12, 2, $28;",
        "and.b64 na, na, -16;",
        "mul.wide.u32 jj, j, 16;",
        "add.s64 na, na, jj;",
        "mad.wide.s32 ne, $16, 2, $28;",
        "sub.s64 nd, ne, na;",
        "max.s64 nd, nd, 0;",
        "min.s64 nd, nd, 16;",
        "cvt.u32.u64 nz, nd;",
        "mov.u32 sk, global_smem;",
        "add.u32 sk, sk, $24;",
        "shr.b32 w, tid, 5;",
        f"mad.lo.u32 sk, w, {NORM_BYTES}, sk;",
        "mad.lo.u32 sk, kd, 128, sk;",
        "mad.lo.u32 sk, j, 16, sk;",
        f"@pn cp.async.cg.shared.global [sk+{n_blocks * blk}], [na], 16, nz;",
        "}",
    ]
    lines += ["cp.async.commit_group;", *[f"mov.b32 ${i}, 0;" for i in range(4)], "}"]
    return "\n".join(lines)


def stage_load_asm(threads: int, value_bits: int = 2, key_bits: int = 4) -> str:
    """This thread's words of a pipeline stage (pack=4), once its copies have landed: out
    ``$0 ..`` blocks ``0 .. stage_blocks - 1`` (see :func:`copy_asm`), then 8 norms (fp16 bits
    in 32-bit registers: key g, g + 8, value g, g + 8 of tile 0, then of tile 1); in the
    stage's byte offset, the thread's offsets of its key and value norms in its warp's norm bytes
    (``256 w + mis + 2 g``, ``+ 128`` for values; ``mis``: the row's address mod 16), then the
    stage's :func:`key_stage_offset` (K4; else unused). The warp syncs first (its lanes copied
    each other's bytes). K3: each lane reads its 12 bytes of rows ``g, g + 8, g + 16, g + 24``
    (words ``3 j .. 3 j + 2`` of token ``j``; a warp's reads of a word hit 32 banks: ``12 g +
    3 t`` differ mod 32). V2: word ``g`` of rows ``2t, 2t+1, 2t+8, 2t+9`` (and those + 16).
    V4: the 8 bytes of dims ``16 g .. 16 g + 15`` of the same rows, row ``2t + e`` of a block at
    chunk ``8t + 4e + g / 2`` (position ``^ 2t``). Every read hits 32 banks."""
    blk = 16 * threads
    n = stage_blocks(value_bits, key_bits)
    dense_keys = _dense_keys(key_bits)
    # operands after the outputs (blocks, 8 norms)
    soff, nrd, kso = 4 * n + 8, 4 * n + 12, 4 * n + 16
    lines = [
        "{",
        ".reg .b32 tid, rb, w, l, s, be, bo, x, h, kh, k7, soff, nrd<2>, kso;",
        # the inputs first (_OUTPUTS_LAST)
        f"mov.u32 soff, ${soff};",
        f"mov.u32 nrd0, ${nrd};",
        f"mov.u32 nrd1, ${nrd + 1};",
        f"mov.u32 kso, ${kso};",
        "bar.warp.sync 0xffffffff;",  # the lanes' copies are each other's
        "mov.u32 tid, %tid.x;",
        "shr.b32 w, tid, 5;",
        "and.b32 l, tid, 31;",
    ]
    if key_bits == 3:
        lines += [
            "mov.u32 rb, global_smem;",
            "add.u32 rb, rb, soff;",
            "mad.lo.u32 rb, w, 1536, rb;",
            "mad.lo.u32 rb, l, 12, rb;",  # 48 g + 12 t = 12 (4 g + t)
        ]
        for j in range(4):
            for i in range(3):
                lines.append(f"ld.shared.b32 ${3 * j + i}, [rb+{384 * j + 4 * i}];")
    else:
        lines += _key_slot_lines("kso")
        for j in range(4):
            regs = ", ".join(f"${4 * j + i}" for i in range(4))
            lines.append(f"ld.shared.v4.b32 {{{regs}}}, [kh+{32 * threads * j}];")
    lines += ["and.b32 s, l, 3;", "shr.b32 rb, l, 2;"]  # t, g
    if value_bits == 2:
        lines += [
            "mov.u32 be, global_smem;",
            "add.u32 be, be, soff;",
            "mad.lo.u32 be, w, 512, be;",
            "mad.lo.u32 be, s, 64, be;",
            "mad.lo.u32 be, rb, 4, be;",
            "shr.b32 s, s, 1;",
            "mad.lo.u32 be, s, 32, be;",  # even rows 2t + d: 32 (2t + d + s)
            "mul.lo.u32 s, s, 64;",
            "sub.u32 bo, be, s;",
            "add.u32 bo, bo, 32;",  # odd rows: 32 (2t + d - s)
        ]
        out = 4 * key_bits
        for tile in range(2):
            for k, (base, d) in enumerate((("be", 0), ("bo", 0), ("be", 256), ("bo", 256))):
                at = (dense_keys + tile) * blk + d
                lines.append(f"ld.shared.b32 ${out + 4 * tile + k}, [{base}+{at}];")
    else:
        # row 2t + e of a block (e = 0, 1): chunk 8t + 4e + g / 2 at position ^ 2t, the 8 bytes
        # of dims 16g .. 16g + 15 in its half g % 2
        lines += [
            "mov.u32 h, global_smem;",
            "add.u32 h, h, soff;",
            "mad.lo.u32 h, w, 512, h;",
            "mad.lo.u32 h, s, 128, h;",
            "and.b32 x, rb, 1;",
            "mad.lo.u32 h, x, 8, h;",  # the block's rows 2t, 2t + 1 and the half g % 2
            "shl.b32 s, s, 1;",  # 2t
            "shr.b32 x, rb, 1;",  # g / 2
            "xor.b32 x, x, s;",
            "mad.lo.u32 be, x, 16, h;",  # even row 2t
            "xor.b32 x, x, 4;",
            "mad.lo.u32 bo, x, 16, h;",  # odd row 2t + 1
        ]
        out = 4 * key_bits
        for tile in range(2):
            for k, (base, blk_k) in enumerate((("be", 0), ("bo", 0), ("be", 1), ("bo", 1))):
                at = (dense_keys + 2 * tile + blk_k) * blk
                regs = f"${out + 8 * tile + 2 * k}, ${out + 8 * tile + 2 * k + 1}"
                lines.append(f"ld.shared.v2.b32 {{{regs}}}, [{base}+{at}];")
    # the norms: tokens g + 8 j, j = 0..3 (tiles 0 and 1), keys then values
    lines += ["mov.u32 h, global_smem;", "add.u32 h, h, soff;"]
    for kind in range(2):
        lines.append(f"add.u32 x, h, nrd{kind};")
        for j in range(4):
            reg = 4 * n + 4 * (j // 2) + 2 * kind + j % 2
            at = dense_blocks(value_bits, key_bits) * blk + 16 * j
            lines.append(f"ld.shared.u16 ${reg}, [x+{at}];")
    lines.append("}")
    return "\n".join(lines)


def key_asm(masked: bool, key_bits: int = 4, tile: int = 0) -> str:
    """Scores of one tile (pack=4 operands): out ``$0-$3`` x (f32, C fragment: tokens g / g+8 x
    heads 2t, 2t+1); in the key groups, the lane's offset in the pair table
    (:func:`key_lookup_lines`), the query B fragments (16 registers) and the norms ``(kn_g,
    kn_g8, vn_g, vn_g8)`` (``vn < 0``: token not visible, when ``masked``). K4: ``$4-$7``
    groups of token g, ``$8-$11`` of token g+8, ``$12`` the lane's offset (``$13-$15``
    unused), ``$16-$31`` query, ``$32-$35`` norms. K3: ``$4-$15`` the 12 words of the stage's
    4 tokens (3 each; this ``tile`` takes tokens ``2 tile`` and ``2 tile + 1``), ``$16`` the
    lane's offset, ``$20-$35`` query, ``$36-$39`` norms."""
    q, nrm = (16, 32) if key_bits == 4 else (20, 36)
    lines = ["{", ".reg .b32 u, base, h<32>;", ".reg .f32 c<4>, d<4>;"]
    lines.append("mov.u32 base, global_smem;")
    for tok, first in ((0, 4), (1, 8)):
        if key_bits == 4:
            for j in range(4):
                o = 16 * tok + 4 * j
                out = [f"h{o + k}" for k in range(4)]
                lines += key_lookup_lines(f"${first + j}", "$12", out)
        else:
            w = 4 + 3 * (2 * tile + tok)
            words = [f"${w + i}" for i in range(3)]
            lines += key3_lookup_lines(words, "$16", [f"h{16 * tok + k}" for k in range(16)])
    # two accumulator chains of 4 products each (half the dependent-product latency), summed
    lines += [f"mov.f32 {a}{i}, 0f00000000;" for a in "cd" for i in range(4)]
    for j in range(4):
        for e in range(2):
            sigma = 2 * j + e
            a = [f"h{4 * j + 2 * e}", f"h{16 + 4 * j + 2 * e}"]
            a += [f"h{4 * j + 2 * e + 1}", f"h{16 + 4 * j + 2 * e + 1}"]
            acc = ", ".join(f"{'cd'[e]}{i}" for i in range(4))
            lines.append(
                f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{acc}}}, "
                f"{{{', '.join(a)}}}, {{${q + 2 * sigma}, ${q + 1 + 2 * sigma}}}, {{{acc}}};"
            )
    lines += [f"add.f32 c{i}, c{i}, d{i};" for i in range(4)]
    lines += [f"mul.f32 c0, c0, ${nrm};", f"mul.f32 c1, c1, ${nrm};"]
    lines += [f"mul.f32 c2, c2, ${nrm + 1};", f"mul.f32 c3, c3, ${nrm + 1};"]
    if masked:
        lines += [".reg .pred bad;", f"setp.lt.f32 bad, ${nrm + 2}, 0f00000000;"]
        lines += [f"@bad mov.f32 c0, {_NEG};", f"@bad mov.f32 c1, {_NEG};"]
        lines += [f"setp.lt.f32 bad, ${nrm + 3}, 0f00000000;"]
        lines += [f"@bad mov.f32 c2, {_NEG};", f"@bad mov.f32 c3, {_NEG};"]
    lines += [f"mov.f32 ${i}, c{i};" for i in range(4)]  # last: see _OUTPUTS_LAST
    lines.append("}")
    return "\n".join(lines)


def softmax_asm() -> str:
    """Online softmax step over two tiles (pack=4): out ``$0-$3`` m, ``$4-$7`` l, ``$8-$11``
    alpha, ``$12-$15`` / ``$16-$19`` the value product's B fragments of tiles 0 / 1 (two fp16
    pairs, then zeros); in ``$20-$27`` the tiles' scores, ``$28-$35`` their norms, ``$36-$39`` m,
    ``$40-$43`` l. Columns are heads ``(2t, 2t+1, 2t, 2t+1)``; l is per lane (tokens g, g+8)."""
    lines = ["{", ".reg .f32 u, v, w, z, m0, m1, a0, a1, p<8>, q<8>;", ".reg .b32 r, b<4>;"]
    lines += ["max.f32 u, $20, $22;", "max.f32 w, $24, $26;", "max.f32 u, u, w;"]
    lines += ["max.f32 v, $21, $23;", "max.f32 w, $25, $27;", "max.f32 v, v, w;"]
    for lane_mask in (4, 8, 16):
        for reg in ("u", "v"):
            lines += [
                f"shfl.sync.bfly.b32 z, {reg}, {lane_mask}, 0x1f, 0xffffffff;",
                f"max.f32 {reg}, {reg}, z;",
            ]
    lines += ["max.f32 m0, $36, u;", "max.f32 m1, $37, v;"]
    lines += ["sub.f32 a0, $36, m0;", "ex2.approx.ftz.f32 a0, a0;"]
    lines += ["sub.f32 a1, $37, m1;", "ex2.approx.ftz.f32 a1, a1;"]
    for i in range(8):
        lines += [f"sub.f32 p{i}, ${20 + i}, m{i % 2};", f"ex2.approx.ftz.f32 p{i}, p{i};"]
    lines += ["mul.f32 u, $40, a0;", "mul.f32 v, $41, a1;"]
    lines += [f"add.f32 u, u, p{i};" for i in (0, 2, 4, 6)]
    lines += [f"add.f32 v, v, p{i};" for i in (1, 3, 5, 7)]
    frags = []
    for tile, nb in ((0, 28), (1, 32)):
        o = 4 * tile
        lines += [
            f"mul.f32 q{o}, p{o}, ${nb + 2};",
            f"mul.f32 q{o + 1}, p{o + 1}, ${nb + 2};",
            f"mul.f32 q{o + 2}, p{o + 2}, ${nb + 3};",
            f"mul.f32 q{o + 3}, p{o + 3}, ${nb + 3};",
            f"cvt.rn.f16x2.f32 r, q{o + 1}, q{o};",
            f"movmatrix.sync.aligned.m8n8.trans.b16 b{2 * tile}, r;",
            f"cvt.rn.f16x2.f32 r, q{o + 3}, q{o + 2};",
            f"movmatrix.sync.aligned.m8n8.trans.b16 b{2 * tile + 1}, r;",
        ]
        frags += [f"b{2 * tile}", f"b{2 * tile + 1}", "0", "0"]
    # the outputs last (_OUTPUTS_LAST)
    outs = ("m0", "m1", "m0", "m1", "u", "v", "u", "v", "a0", "a1", "a0", "a1")
    lines += [f"mov.f32 ${col}, {reg};" for col, reg in enumerate(outs)]
    lines += [f"mov.b32 ${12 + col}, {reg};" for col, reg in enumerate(frags)]
    lines.append("}")
    return "\n".join(lines)


def value_asm(rescale: bool, value_bits: int = 2) -> str:
    """``O^T += V^T P^T`` for one tile (pack=4): out ``$0-$31`` the 8 accumulators (16 dims x
    8 heads each); in the value bytes of tokens 2t, 2t+1, 2t+8, 2t+9, dims 16g..16g+15 (V2:
    ``$32-$35``, a word each, then ``$36-$39`` the table: low bytes, high bytes, -, -; V4:
    ``$32-$39``, two words each, then ``$40`` the lane's offset in the pair table), P's B
    fragment, then (when ``rescale``) alpha (heads 2t, 2t+1, 2t, 2t+1), then the accumulators.
    Accumulator ``j`` rows g / g+8 are dims ``16 g + 8 (j // 4) + j % 4`` and that + 4.
    ``rescale``: the accumulators are first multiplied by alpha; V4 skips that (a warp-uniform
    branch) when no lane's running max moved, i.e. every alpha is 1, V2 always multiplies: its
    loop step is then one basic block, which ptxas schedules better than the 32 multiplies
    cost (NOTES, session 17)."""
    p = 40 if value_bits == 2 else 44  # P's B fragment
    alpha = p + 4
    acc = alpha + 4 if rescale else alpha
    lines = ["{", ".reg .b32 x, z, sel, sh, bp<2>, f<32>;", ".reg .f32 r<32>;"]
    # the inputs the products read, first: the products write the outputs one by one
    # (_OUTPUTS_LAST)
    lines += [f"mov.f32 r{i}, ${acc + i};" for i in range(32)]
    lines += [f"mov.b32 bp0, ${p};", f"mov.b32 bp1, ${p + 1};"]
    skip_unmoved = rescale and value_bits == 4  # V2: no branch, see above
    if skip_unmoved:
        lines += [
            ".reg .pred moved, other;",
            f"setp.neu.f32 moved, ${alpha}, 0f3F800000;",
            f"setp.neu.f32 other, ${alpha + 1}, 0f3F800000;",
            "or.pred moved, moved, other;",
            "vote.sync.any.pred moved, moved, 0xffffffff;",
            "@!moved bra.uni TQAI_KEEP${:uid};",
        ]
    if rescale:
        lines += [f"mul.f32 r{i}, r{i}, ${alpha + i % 2};" for i in range(32)]
    if skip_unmoved:
        lines.append("TQAI_KEEP${:uid}:")
    if value_bits == 2:
        for pair, (wa, wb) in enumerate((("$32", "$33"), ("$34", "$35"))):
            out = [f"f{16 * pair + k}" for k in range(16)]
            lines += value_lookup_lines(wa, wb, "$36", "$37", out)
    else:
        lines += [".reg .b32 u, base, pa<4>, pb<4>;", "mov.u32 base, global_smem;"]
        for pair in range(2):
            out = [f"f{16 * pair + k}" for k in range(16)]
            words = [f"${32 + 4 * pair + k}" for k in range(4)]
            lines += pair_value_lookup_lines(words, "$40", out)
    for j in range(8):
        chunk, s = divmod(j, 4)
        o = 8 * chunk + 2 * s
        a = f"f{o}, f{o + 1}, f{16 + o}, f{16 + o + 1}"
        d = ", ".join(f"${4 * j + i}" for i in range(4))
        c = ", ".join(f"r{4 * j + i}" for i in range(4))
        lines.append(
            f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d}}}, {{{a}}}, "
            f"{{bp0, bp1}}, {{{c}}};"
        )
    lines.append("}")
    return "\n".join(lines)


def lane_sum_asm() -> str:
    """Sum over the 8 lanes ``g`` that share ``t`` (butterfly shuffles), pack=1."""
    lines = ["{", ".reg .f32 z, u;", "mov.f32 u, $1;"]
    for lane_mask in (4, 8, 16):
        lines += [f"shfl.sync.bfly.b32 z, u, {lane_mask}, 0x1f, 0xffffffff;", "add.f32 u, u, z;"]
    return "\n".join([*lines, "mov.f32 $0, u;", "}"])


def table_words(centroids: np.ndarray) -> tuple[list[int], list[int]]:
    """A codebook's fp16 table as int32 words of low bytes and of high bytes (4 entries each)."""
    bits = np.asarray(centroids, dtype=np.float16).view(np.uint16).astype(np.int64)

    def words(b: np.ndarray) -> list[int]:
        out = []
        for i in range(0, b.size, 4):
            v = int(b[i] | b[i + 1] << 8 | b[i + 2] << 16 | b[i + 3] << 24)
            out.append(v - (1 << 32) if v >= 1 << 31 else v)
        return out

    return words(bits & 0xFF), words(bits >> 8)
