"""The fragment-lookup decode path (K4/V2, K4/V4, K3/V2; head_dim 128) matches the core reference.

The kernel is PTX, so its parity tests need a CUDA GPU (marked ``gpu``: skipped in CI). Its
byte-permute lookups are also interpreted here instruction by instruction on the CPU, and its
refusals are checked on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_parity import check_kernel_output
from ptx_model import run_ptx, word_smem

from tqai import TurboQuantMSE
from tqai.attention import compressed_attention
from tqai.container import QuantizedTensor
from tqai_torch.kernels.triton import decode_mma_ptx as ptx

CASES = [
    # (B, Hq, Hkv, T, sinks, window)
    (1, 32, 8, 4096, 4, 0),  # the benchmark's shape
    (3, 32, 8, 1000, 4, 7),  # batch 3, a length no step divides
    (2, 8, 8, 77, 0, 2),  # G = 1, fewer tokens than one step
    (1, 16, 2, 3001, 2, 3),  # G = 8
    (2, 24, 8, 700, 1, 1),  # G = 3
    (3, 24, 8, 1001, 0, 0),  # no segments: the kernel merges the splits itself
    (1, 16, 2, 2048, 0, 0),  # the same, G = 8
    (1, 32, 8, 2000, 4, 37),  # a window longer than several rounds of the segments' program
    (2, 32, 8, 600, 0, 5),  # a window and no sinks
    (1, 32, 8, 1200, 4, 120),  # more segment tokens than the segments' programs take at most
]


def _in_capacity(qt, multiple=8):
    """``qt`` as views into buffers whose token capacity is a multiple of ``multiple`` (as the
    caches hold them), the spare tokens filled with garbage the kernel must not read."""
    arrays = {}
    for name, a in qt.arrays().items():
        cap = -(-a.shape[2] // multiple) * multiple + multiple
        buf = torch.full((*a.shape[:2], cap, *a.shape[3:]), 0x7B, dtype=a.dtype, device=a.device)
        buf[:, :, : a.shape[2]] = a
        arrays[name] = buf[:, :, : a.shape[2]]
    return QuantizedTensor(spec=qt.spec, shape=qt.shape, dtype=qt.dtype, **arrays)


BITS = [(4, 2), (4, 4), (3, 2)]  # (key bits, value bits) the path serves


def _inputs(case, dtype, seed, capacity=True, bits=(4, 2)):
    b, hq, hkv, t, s, w = case
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, 1, 128, device="cuda", generator=gen).to(dtype)
    k = torch.randn(b, hkv, t, 128, device="cuda", generator=gen).to(dtype) * 2.0
    v = torch.randn(b, hkv, t, 128, device="cuda", generator=gen).to(dtype)
    kq, vq = TurboQuantMSE(128, bits[0], seed=seed), TurboQuantMSE(128, bits[1], seed=seed + 1)
    keys, values = kq.quantize(k[:, :, s : t - w]), vq.quantize(v[:, :, s : t - w])
    if capacity:
        keys, values = _in_capacity(keys), _in_capacity(values)
    segments = {
        "prefix": (k[:, :, :s], v[:, :, :s]),
        "suffix": (k[:, :, t - w :], v[:, :, t - w :]),
    }
    return q, keys, values, kq, vq, {"scale": 128**-0.5, **segments}


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("index", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_partials_match_reference(index, dtype, bits):
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    # odd cases: contiguous histories (odd lengths give norm rows off 4-byte boundaries)
    q, keys, values, kq, vq, kwargs = _inputs(
        CASES[index], dtype, seed=index + 5, capacity=index % 2 == 0, bits=bits
    )
    from tqai_torch.kernels.triton.decode_partials_mma import serves_mma

    assert serves_mma(q, keys, values, kq, vq)
    ref = compressed_attention(q.float(), keys, values, kq, vq, **kwargs)
    for split in (None, 128, 1 << 20):
        for warps in (4, 8):
            out = decode_attention_triton(
                q, keys, values, kq, vq, partials="mma", tokens_per_split=split,
                num_warps=warps, **kwargs,
            )  # fmt: skip
            check_kernel_output(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("segments", "last_start"),
    [((4, 3), 700), ((0, 0), 700), ((4, 3), 1497), ((4, 30), 700), ((4, 30), 1497)],
)  # 1497: the third sees only window tokens (with a window of 30, those of two programs)
def test_mma_partials_left_padded_batch(segments, last_start, bits):
    """``valid_from`` / ``valid_until`` hide what the reference's mask hides, in the history and
    in the sink and window segments."""
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    case = (3, 32, 8, 1500, *segments)
    q, keys, values, kq, vq, kwargs = _inputs(case, torch.bfloat16, seed=21, bits=bits)
    starts = torch.tensor([0, 2, last_start], device="cuda")
    until = torch.tensor([1500, 1400, 1499], device="cuda")
    pos = torch.arange(1500, device="cuda")[None, :]
    mask = ((pos >= starts[:, None]) & (pos < until[:, None]))[:, None, None, :]
    ref = compressed_attention(q.float(), keys, values, kq, vq, mask=mask, **kwargs)
    for split in (64, None):
        out = decode_attention_triton(
            q, keys, values, kq, vq, valid_from=starts, valid_until=until, partials="mma",
            tokens_per_split=split, **kwargs,
        )  # fmt: skip
        check_kernel_output(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_mma_calls_back_to_back_each_read_their_own_inputs(graph):
    """Calls queued one after another with nothing between them (eager, and captured in one
    CUDA graph) overlap through programmatic dependent launch: each must still read its own
    query, cache, tickets and workspace only after the call before it has finished."""
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    cases = [
        ((1, 32, 8, 4096, 4, 3), 31),
        ((2, 32, 8, 1000, 0, 5), 32),
        ((1, 32, 8, 300, 4, 0), 33),
    ]
    inputs = [_inputs(case, torch.bfloat16, seed=seed) for case, seed in cases]
    refs = [
        compressed_attention(q.float(), keys, values, kq, vq, **kw)
        for q, keys, values, kq, vq, kw in inputs
    ]

    def calls():
        return [
            decode_attention_triton(q, keys, values, kq, vq, partials="mma", **kw)
            for q, keys, values, kq, vq, kw in inputs * 3
        ]

    outs = calls()  # compiles, and eager back to back
    if graph:
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            outs = calls()
        for q, *_ in inputs:  # new queries after the capture: the replay must read them
            q.copy_(torch.randn_like(q))
        refs = [
            compressed_attention(q.float(), keys, values, kq, vq, **kw)
            for q, keys, values, kq, vq, kw in inputs
        ]
        captured.replay()
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        check_kernel_output(out, refs[i % len(refs)], torch.bfloat16)


DRAWN = [  # (case, tokens per split, warps): programs of 8 steps, which draw their chunks
    ((1, 32, 8, 9001, 4, 3), 2048, 8),
    ((3, 32, 8, 5000, 0, 0), 1024, 4),  # batch 3, no segments
    ((1, 16, 2, 20000, 2, 3), 2048, 8),  # G = 8
    ((2, 24, 8, 7000, 1, 1), 1024, 4),  # G = 3
]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("graph", [False, True])
def test_mma_drawn_chunks_match_reference_call_after_call(bits, graph, monkeypatch):
    """Programs of many steps draw their chunks from per-KV-head pools at run time: every
    chunk is walked once (whichever warp draws it), and the pools start from zero again for
    the next call, eager or replayed from a CUDA graph."""
    from tqai_torch.kernels.triton import decode_partials_mma as dpm
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    drawn = []
    rule = ptx.draws_at_run_time
    monkeypatch.setattr(dpm, "draws_at_run_time", lambda *a: drawn.append(rule(*a)) or drawn[-1])
    inputs = [
        (_inputs(case, torch.bfloat16, seed=40 + i, bits=bits), split, warps)
        for i, (case, split, warps) in enumerate(DRAWN)
    ]

    def calls():
        return [
            decode_attention_triton(
                q, keys, values, kq, vq, partials="mma", tokens_per_split=split,
                num_warps=warps, **kw,
            )
            for (q, keys, values, kq, vq, kw), split, warps in inputs * 2
        ]  # fmt: skip

    outs = calls()
    assert drawn
    assert all(drawn)
    runs = [outs, calls()]
    if graph:
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            outs = calls()
        for _ in range(2):
            captured.replay()
            torch.cuda.synchronize()
            runs.append([o.clone() for o in outs])
    torch.cuda.synchronize()
    for run in runs:
        for i, out in enumerate(run):
            q, keys, values, kq, vq, kw = inputs[i % len(inputs)][0]
            ref = compressed_attention(q.float(), keys, values, kq, vq, **kw)
            check_kernel_output(out, ref, torch.bfloat16)


@pytest.mark.gpu
def test_mma_deterministic_algorithms_keep_the_static_splits(monkeypatch):
    """With torch's deterministic algorithms on, no chunk is drawn at run time: two calls give
    the same bits."""
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    case, split, warps = DRAWN[0]
    q, keys, values, kq, vq, kw = _inputs(case, torch.bfloat16, seed=40)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    outs = [
        decode_attention_triton(
            q, keys, values, kq, vq, partials="mma", tokens_per_split=split, num_warps=warps, **kw
        )
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])
    check_kernel_output(
        outs[0], compressed_attention(q.float(), keys, values, kq, vq, **kw), torch.bfloat16
    )


def test_outgrown_counters_stay_allocated_for_captured_graphs():
    """A CUDA graph captured with the counters keeps their address: a larger call's new
    counters must not free them."""
    pytest.importorskip("triton")
    import gc
    import weakref

    from tqai_torch.kernels.triton import decode_partials_mma as dpm

    device = torch.device("cpu")
    dpm._COUNTERS.pop(device, None)
    first = dpm._counters(device, 10)
    assert dpm._counters(device, 1000) is first
    gone = weakref.ref(first)
    del first
    larger = dpm._counters(device, 5000)
    gc.collect()
    assert gone() is not None
    assert larger.numel() >= 5000
    assert not larger.any()
    dpm._COUNTERS.pop(device)


def test_chunks_are_drawn_only_for_long_splits_in_one_wave():
    from tqai_torch.kernels.triton.decode_mma_ptx import DYNAMIC_MIN_STEPS, draws_at_run_time

    steps = DYNAMIC_MIN_STEPS
    assert draws_at_run_time(False, steps, 264, 264)
    assert not draws_at_run_time(False, steps - 1, 264, 264)  # too few steps a program
    assert not draws_at_run_time(False, steps, 265, 264)  # a second wave
    assert not draws_at_run_time(True, steps, 8, 264)  # per-sequence bounds


@pytest.mark.gpu
def test_mma_and_block_partials_agree_on_a_history_view():
    """A view into a larger buffer is read in place; both partials kernels agree."""
    from tqai.attention import slice_tokens
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    q, keys, values, kq, vq, kwargs = _inputs((2, 32, 8, 900, 0, 1), torch.float16, seed=3)
    keys, values = slice_tokens(keys, 0, 650), slice_tokens(values, 0, 650)
    assert not keys.packed.is_contiguous()
    fast = decode_attention_triton(q, keys, values, kq, vq, partials="mma", **kwargs)
    blocks = decode_attention_triton(q, keys, values, kq, vq, partials="blocks", **kwargs)
    check_kernel_output(
        fast, compressed_attention(q.float(), keys, values, kq, vq, **kwargs), torch.float16
    )
    assert ((fast.float() - blocks.float()).norm() / blocks.float().norm()).item() < 5e-3


@pytest.mark.gpu
def test_mma_partials_take_four_bit_values_only_with_the_keys_codebook():
    """4-bit values are looked up in the key pair table: a value codebook of its own goes to the
    block kernel."""
    import dataclasses
    import types

    from tqai_torch.kernels.triton.decode_partials_mma import serves_mma

    q, keys, values, kq, vq, _ = _inputs((1, 32, 8, 300, 0, 0), torch.float16, 1, bits=(4, 4))
    assert serves_mma(q, keys, values, kq, vq)
    other = dataclasses.replace(vq.codebook, centroids=vq.codebook.centroids * 1.01)
    assert not serves_mma(q, keys, values, kq, types.SimpleNamespace(spec=vq.spec, codebook=other))
    q, keys, values, kq, vq, _ = _inputs((1, 32, 8, 300, 0, 0), torch.float16, 1, bits=(3, 4))
    assert not serves_mma(q, keys, values, kq, vq)  # K3/V4: two codebooks


@pytest.mark.gpu
def test_mma_launch_skips_the_jit_after_the_first_call(monkeypatch):
    """Once a specialization is compiled, a call goes straight to its launcher (the JIT's
    binder is most of an eager call's host time); with a launch hook set it takes the JIT."""
    from triton import knobs

    from tqai_torch.kernels.triton import decode_partials_mma as dpm
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    q, keys, values, kq, vq, kwargs = _inputs((1, 32, 8, 700, 4, 3), torch.float16, seed=5)
    first = decode_attention_triton(q, keys, values, kq, vq, partials="mma", **kwargs)
    jit_calls = []
    run = dpm._mma_decode_kernel.run
    monkeypatch.setattr(
        dpm._mma_decode_kernel, "run", lambda *a, **k: jit_calls.append(1) or run(*a, **k)
    )
    again = decode_attention_triton(q, keys, values, kq, vq, partials="mma", **kwargs)
    assert not jit_calls
    assert torch.equal(first, again)
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        decode_attention_triton(q, keys, values, kq, vq, partials="mma", **kwargs)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert jit_calls
    assert seen


def test_mma_partials_refuse_what_they_do_not_serve():
    pytest.importorskip("triton")
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton
    from tqai_torch.kernels.triton.decode_partials_mma import serves_mma

    kq, vq = TurboQuantMSE(128, 4, seed=1), TurboQuantMSE(128, 2, seed=2)
    keys = kq.quantize(torch.randn(1, 2, 40, 128))
    values = vq.quantize(torch.randn(1, 2, 40, 128))
    q = torch.randn(1, 4, 1, 128)
    assert not serves_mma(q, keys, values, kq, vq)  # CPU tensors
    with pytest.raises(ValueError, match="partials='mma' needs CUDA"):
        decode_attention_triton(q, keys, values, kq, vq, scale=0.1, partials="mma")
    with pytest.raises(ValueError, match="partials must be"):
        decode_attention_triton(q, keys, values, kq, vq, scale=0.1, partials="fast")


def test_pair_table_holds_both_codes_of_a_byte():
    centroids = np.sort(np.random.default_rng(3).standard_normal(16)) / 11
    table = np.asarray(centroids, np.float16).view(np.uint16)
    words = [w & 0xFFFFFFFF for w in ptx.pair_table(centroids)]
    for e in range(256):
        assert [words[e] & 0xFFFF, words[e] >> 16] == [int(table[e & 15]), int(table[e >> 4])]


def _table_smem(
    centroids, base: int, lane: int, key_bits: int = 4
) -> tuple[np.ndarray, dict[int, int]]:
    """The codebook's fp16 bits and the lane's copy of its pair table in shared memory."""
    words = [w & 0xFFFFFFFF for w in ptx.pair_table(centroids)]
    stride = ptx.lut_stride(key_bits)
    smem = word_smem({base + stride * e + 4 * lane: words[e] for e in range(256)})
    return np.asarray(centroids, np.float16).view(np.uint16), smem


def _assert_pairs(got: dict[str, int], out: list[str], table: np.ndarray, codes) -> None:
    """Register ``out[k]`` holds the fp16 entries of codes ``2 k`` (low) and ``2 k + 1``."""
    for k, reg in enumerate(out):
        pair = got[reg]
        assert [pair & 0xFFFF, pair >> 16] == [
            int(table[codes[2 * k]]),
            int(table[codes[2 * k + 1]]),
        ]


def test_key_lookup_gives_the_table_entries():
    """Each fp16 pair is (code 2k, code 2k+1) of the group, read from the lane's own copy of
    the pair table (any 16-entry codebook: no symmetry is assumed)."""
    rng = np.random.default_rng(0)
    centroids = np.sort(rng.standard_normal(16)) / 11
    base = 0x400  # wherever shared memory starts: only offsets from it are laid out
    out = [f"o{k}" for k in range(4)]
    lines = ptx.key_lookup_lines("x", "lane", out)
    for lane in (0, 5, 31):
        table, smem = _table_smem(centroids, base, lane)
        for _ in range(100):
            codes = rng.integers(0, 16, 8)
            regs = {"x": sum(int(c) << (4 * i) for i, c in enumerate(codes))}
            got = run_ptx(lines, regs | {"lane": 4 * lane, "base": base}, smem)
            _assert_pairs(got, out, table, codes)


def test_three_bit_key_lookup_gives_the_table_entries():
    """3-bit groups (3 bytes each, 4 of them in 3 words): each 6-bit pair, in one word or
    straddling two, indexes the 64-entry pair table."""
    rng = np.random.default_rng(5)
    centroids = np.sort(rng.standard_normal(8)) / 11
    assert ptx.pair_table(centroids)[64:] == [0] * 192
    base, lane = 0x400, 22
    table, smem = _table_smem(centroids, base, lane, key_bits=3)
    out = [f"o{k}" for k in range(16)]
    lines = ptx.key3_lookup_lines(["w0", "w1", "w2"], "lane", out)
    for _ in range(100):
        codes = rng.integers(0, 8, 32)
        stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
        regs = {f"w{i}": (stream >> (32 * i)) & 0xFFFFFFFF for i in range(3)}
        got = run_ptx(lines, regs | {"lane": 4 * lane, "base": base}, smem)
        _assert_pairs(got, out, table, codes)


def test_value_lookup_pairs_two_tokens_per_dim():
    rng = np.random.default_rng(1)
    centroids = np.array([-1.51, -0.453, 0.453, 1.51]) / 11
    table = np.asarray(centroids, np.float16).view(np.uint16)
    lo, hi = (w[0] & 0xFFFFFFFF for w in ptx.table_words(centroids))
    out = [f"o{k}" for k in range(16)]
    lines = ptx.value_lookup_lines("a", "b", "L", "H", out)
    for _ in range(200):
        ca, cb = rng.integers(0, 4, 16), rng.integers(0, 4, 16)
        regs = {"L": lo, "H": hi}
        regs["a"] = sum(int(c) << (2 * i) for i, c in enumerate(ca))
        regs["b"] = sum(int(c) << (2 * i) for i, c in enumerate(cb))
        got = run_ptx(lines, regs)
        for chunk in range(2):
            for s in range(4):
                for k, dim in ((0, 8 * chunk + s), (1, 8 * chunk + 4 + s)):
                    pair = got[out[8 * chunk + 2 * s + k]]
                    assert [pair & 0xFFFF, pair >> 16] == [int(table[ca[dim]]), int(table[cb[dim]])]


def test_value_products_rescale_without_a_branch_for_two_bit_values():
    """V2's rescale multiplies every accumulator by alpha with no branch, so that its loop step
    stays one basic block (measured faster: NOTES, session 17); V4 skips an unmoved rescale
    behind a warp vote. Both multiply each accumulator by its head's alpha exactly once."""
    for bits, branches in ((2, False), (4, True)):
        text = ptx.value_asm(True, bits)
        assert ("bra.uni" in text) is branches
        alpha = 44 if bits == 2 else 48
        for i in range(32):
            assert text.count(f"mul.f32 r{i}, r{i}, ${alpha + i % 2};") == 1
        assert "bra" not in ptx.value_asm(False, bits)


def test_four_bit_value_lookup_pairs_two_tokens_per_dim():
    """V4 words are looked up in the key pair table (one codebook), then each dim's entries of
    the two tokens are paired, in :func:`value_lookup_lines`'s order."""
    rng = np.random.default_rng(2)
    centroids = np.sort(rng.standard_normal(16)) / 11
    base, lane = 0x400, 9
    table, smem = _table_smem(centroids, base, lane)
    out = [f"o{k}" for k in range(16)]
    lines = ptx.pair_value_lookup_lines(["a0", "a1", "b0", "b1"], "lane", out)
    for _ in range(100):
        ca, cb = rng.integers(0, 16, 16), rng.integers(0, 16, 16)
        regs = {"lane": 4 * lane, "base": base}
        for name, codes in (("a", ca), ("b", cb)):
            for w in range(2):
                regs[f"{name}{w}"] = sum(
                    int(c) << (4 * i) for i, c in enumerate(codes[8 * w :][:8])
                )
        got = run_ptx(lines, regs, smem)
        for chunk in range(2):
            for s in range(4):
                for k, dim in ((0, 8 * chunk + s), (1, 8 * chunk + 4 + s)):
                    pair = got[out[8 * chunk + 2 * s + k]]
                    assert [pair & 0xFFFF, pair >> 16] == [int(table[ca[dim]]), int(table[cb[dim]])]


def _assert_in_stage(
    written, which: int, stage: int, threads: int, key_bits: int, value_bits: int
) -> None:
    """Every byte address in ``written`` lies in stage ``which``'s own bytes (from ``stage``)
    or, for 4-bit keys, in the odd halves of the pair table's 256-byte entries (never in the
    table's words): stage 0's in entries 128-255, clear of the query rotation staged in the
    first 32 KB while its copies fly; stage 1's in entries 0-127."""
    own = range(stage, stage + ptx.stage_bytes(threads, value_bits, key_bits))
    for at in written:
        if at in own:
            continue
        assert key_bits == 4, at
        assert 0 <= at < 256 * 256, (which, at)
        assert at % 256 >= 128, (which, at)
        assert (at >= 128 * 256) == (which == 0), (which, at)


@pytest.mark.parametrize(("key_bits", "value_bits"), [(4, 2), (4, 4), (3, 2)])
@pytest.mark.parametrize("threads", [128, 256])
def test_stage_copies_of_all_threads_stay_apart_and_in_their_bytes(threads, key_bits, value_bits):
    """copy_asm for every thread of a program: each stage byte is written by one thread only,
    within the stage's bytes (K4 keys: its half of the pair table's odd halves), so the table,
    the other stage and the other threads' blocks are never overwritten; the program's shared
    memory holds both stages."""
    tokens = threads  # a warp step of 32 tokens a warp
    krow, vrow = 16 * key_bits, 16 * value_bits
    memory = bytes(tokens * (krow + vrow) + 4 * tokens + 64)
    knbase = tokens * (krow + vrow)
    copy = ptx.copy_asm(threads, False, value_bits, key_bits)
    sb = ptx.stage_bytes(threads, value_bits, key_bits)
    for which in (0, 1):
        stage = ptx.lut_bytes(key_bits) + which * sb
        owner: dict[int, int] = {}
        for tid in range(threads):
            lane, w = tid % 32, tid // 32
            smem: dict[int, int] = {}
            ops = {"$4": 16 * lane, "$8": tokens * krow + 16 * lane, "$12": 32 * w}
            ops["$16"] = tokens
            ops |= {
                "$20": lane // 4,
                "$24": stage,
                "$28": knbase,
                "$32": ptx.key_stage_offset(which),
            }
            run_ptx(copy, ops, smem, memory, tid)
            for at in smem:
                assert owner.setdefault(at, tid) == tid, (which, at, owner[at], tid)
        _assert_in_stage(owner, which, stage, threads, key_bits, value_bits)
    assert 2 * ptx.program_smem(threads, value_bits, key_bits, 2) <= ptx.SMEM_PER_SM  # 2 an SM
    with pytest.raises(ValueError, match="stage must be 0 or 1"):  # the halves hold two stages
        ptx.key_stage_offset(2)


@pytest.mark.parametrize(("key_bits", "value_bits"), [(4, 2), (4, 4), (3, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_pipeline_copies_each_thread_exactly_its_fragment_words(masked, key_bits, value_bits):
    """copy_asm for every lane of a warp, then stage_load_asm for one thread: its words are what
    the fragment lookups expect (key groups 4t..4t+3 of tokens g, g+8, g+16, g+24; the value
    bytes of dims 16g..16g+15 of tokens 2t, 2t+1, 2t+8, 2t+9 and those + 16; the key and value
    norms of tokens g, g+8, g+16, g+24 from rows at any even address), tokens from ``stop`` on
    zero-filled."""
    rng = np.random.default_rng(4)
    tokens, threads = 96, 128
    vrow, vbytes = 16 * value_bits, 2 * value_bits  # a row; a thread's bytes of a token
    krow, kbytes = 16 * key_bits, 4 * key_bits
    keys = rng.integers(0, 256, (tokens, krow), dtype=np.uint8)
    values = rng.integers(0, 256, (tokens, vrow), dtype=np.uint8)
    knorms = rng.integers(0, 1 << 16, tokens, dtype=np.uint16)
    vnorms = rng.integers(0, 1 << 16, tokens, dtype=np.uint16)
    kbase, vbase = 0, tokens * krow
    # norm rows off 16-byte boundaries (as a cache of any capacity holds them)
    knbase = vbase + tokens * vrow + 6
    vnbase = knbase + 2 * tokens + 10
    memory = keys.tobytes() + values.tobytes() + bytes(6) + knorms.tobytes() + bytes(10)
    memory += vnorms.tobytes() + bytes(16)
    copy = ptx.copy_asm(threads, masked, value_bits, key_bits)
    load = ptx.stage_load_asm(threads, value_bits, key_bits)
    cases = ((0, 32, 96), (37, 0, 21), (101, 64, 77), (127, 32, 50))
    for index, (tid, tb, stop) in enumerate(cases):
        if not masked:
            stop = tokens  # unmasked copies need the whole step before stop
        which = index % 2  # stages 0 and 1 in turn
        stage = ptx.lut_bytes(key_bits) + which * ptx.stage_bytes(threads, value_bits, key_bits)
        kso = ptx.key_stage_offset(which)
        smem: dict[int, int] = {}
        for other in range(tid - tid % 32, tid - tid % 32 + 32):  # the warp's lanes
            lane = other % 32
            g, t = lane // 4, lane % 4
            ops = {"$4": kbase + 16 * lane, "$8": vbase + 16 * lane}
            ops |= {"$12": tb, "$16": stop, "$20": g, "$24": stage, "$32": kso}
            ops["$28"] = knbase if lane < 8 else vnbase
            run_ptx(copy, ops, smem, memory, other)
        _assert_in_stage(smem, which, stage, threads, key_bits, value_bits)
        lane = tid % 32
        g, t = lane // 4, lane % 4
        blocks = ptx.stage_blocks(value_bits, key_bits)
        nrd = 256 * (tid // 32) + 2 * g
        ops = {f"${4 * blocks + 8}": stage, f"${4 * blocks + 16}": kso}
        ops |= {
            f"${4 * blocks + 12}": nrd + knbase % 16,
            f"${4 * blocks + 13}": nrd + 128 + vnbase % 16,
        }
        got = run_ptx(load, ops, smem, memory, tid)
        words = [got[f"${k}"] for k in range(4 * blocks)]
        norms = [got[f"${4 * blocks + k}"] for k in range(8)]
        for tile in range(2):
            toks = [tb + 16 * tile + g, tb + 16 * tile + g + 8]
            expect = [int(n[k]) if k < stop else 0 for n in (knorms, vnorms) for k in toks]
            assert norms[4 * tile : 4 * tile + 4] == expect, (tid, tile)

        def word(row: np.ndarray, tok: int, byte: int, stop: int = stop) -> int:
            if tok >= stop:
                return 0
            return int.from_bytes(row[tok, byte : byte + 4].tobytes(), "little")

        per_tok = kbytes // 4  # key words of a token
        for j, off in enumerate((0, 8, 16, 24)):
            expect = [word(keys, tb + g + off, kbytes * t + 4 * k) for k in range(per_tok)]
            assert words[per_tok * j : per_tok * (j + 1)] == expect, (tid, j)
        per_tile = 2 * value_bits  # value words of a tile
        for tile in range(2):
            toks = [tb + 16 * tile + 2 * t + d for d in (0, 1, 8, 9)]
            expect = [
                word(values, tok, vbytes * g + 4 * k) for tok in toks for k in range(vbytes // 4)
            ]
            at = 4 * key_bits + per_tile * tile
            assert words[at : at + per_tile] == expect, (tid, tile)
