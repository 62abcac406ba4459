"""A model of the few PTX instructions the kernels' byte-permute lookups, pipeline copies and
stage loads use, so the CPU tests can run that PTX instruction by instruction (Triton's
interpreter cannot run inline PTX)."""

from __future__ import annotations

_M32 = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte k of the result is byte ``c[4k:4k+3] & 7`` of
    ``{b, a}``, or the replicated sign of that byte when ``c[4k+3]`` is set."""
    src, out = (b << 32) | a, 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * k)
    return out


def _s32(x: int) -> int:
    """``x`` wrapped to a signed 32-bit value."""
    return ((x + (1 << 31)) & _M32) - (1 << 31)


# register-to-register instructions: 32-bit results wrap as PTX's types say; the 64-bit ones
# (addresses) are exact
_OPS = {
    "and.b32": lambda x, y: x & y & _M32,
    "or.b32": lambda x, y: (x | y) & _M32,
    "xor.b32": lambda x, y: (x ^ y) & _M32,
    "shl.b32": lambda x, y: (x << y) & _M32,
    "shr.b32": lambda x, y: (x & _M32) >> y,
    "add.u32": lambda x, y: (x + y) & _M32,
    "sub.u32": lambda x, y: (x - y) & _M32,
    "add.s32": lambda x, y: _s32(x + y),
    "sub.s32": lambda x, y: _s32(x - y),
    "mul.lo.u32": lambda x, y: (x * y) & _M32,
    "mad.lo.u32": lambda x, y, z: (x * y + z) & _M32,
    "prmt.b32": prmt,
    "shf.r.wrap.b32": lambda lo, hi, n: ((hi << 32 | lo) >> (n & 31)) & _M32,
    "mad.wide.s32": lambda x, y, z: x * y + z,
    "mul.wide.u32": lambda x, y: x * y,
    "and.b64": lambda x, y: x & y,
    "add.s64": lambda x, y: x + y,
    "sub.s64": lambda x, y: x - y,
    "max.s64": max,
    "min.s64": min,
    "cvt.u32.u64": lambda x: x & _M32,
    "mov.u32": lambda x: x,
    "mov.b32": lambda x: x,
}
_NO_OPS = ("bar.warp.sync", "cp.async.commit_group")


def run_ptx(
    text: str | list[str],
    regs: dict[str, int],
    smem: dict[int, int] | None = None,
    memory: bytes = b"",
    tid: int = 0,
) -> dict[str, int]:
    """Run PTX for one thread: ``regs`` maps registers (and operands ``$k``) to their values,
    ``smem`` is shared memory, byte address -> byte (``global_smem`` at 0), ``memory`` global
    memory from address 0, ``tid`` is ``%tid.x``. Returns the registers. A ``cp.async`` copies
    its ``src-size`` bytes and zero-fills the rest at once; ``mov.b32 {a, b}, r`` splits ``r``
    into its 16-bit halves. Anything else raises."""
    regs = dict(regs)
    smem = {} if smem is None else smem
    preds: dict[str, bool] = {}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0)

    def addr(tok: str) -> int:
        base, _, off = tok.strip("[] ").partition("+")
        return val(base) + (int(off) if off else 0)

    def word(at: int) -> int:
        return int.from_bytes(bytes(smem[at + i] for i in range(4)), "little")

    lines = text.splitlines() if isinstance(text, str) else text
    for line in lines:
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        if line.startswith("@"):  # a predicated instruction
            guard, _, line = line.partition(" ")
            if not preds[guard[1:]]:
                continue
        op, _, rest = line.partition(" ")
        if op == "mov.b32" and rest.startswith("{"):
            halves, src = rest.split("},")
            lo, hi = (h.strip() for h in halves.strip("{ ").split(","))
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16 & 0xFFFF
            continue
        if op in ("ld.shared.v2.b32", "ld.shared.v4.b32"):
            outs = [r.strip("{} ") for r in rest.split("}")[0].split(",")]
            at = addr(rest.split("}")[1].strip(" ,"))
            for k, reg in enumerate(outs):
                regs[reg] = word(at + 4 * k)
            continue
        args = [a.strip() for a in rest.split(",")] if rest else []
        if op in _NO_OPS:
            continue
        if op == "mov.u32" and args[1] == "global_smem":
            regs[args[0]] = 0
        elif op == "mov.u32" and args[1] == "%tid.x":
            regs[args[0]] = tid
        elif op in _OPS:
            regs[args[0]] = _OPS[op](*(val(a) for a in args[1:]))
        elif op in ("setp.lt.s32", "setp.lt.u32"):
            preds[args[0]] = val(args[1]) < val(args[2])
        elif op == "setp.lt.and.u32":
            preds[args[0]] = val(args[1]) < val(args[2]) and preds[args[3]]
        elif op == "selp.b32":
            regs[args[0]] = val(args[1]) if preds[args[3]] else val(args[2])
        elif op.startswith("cp.async.c") and op.endswith(".shared.global"):
            dst, src, size = addr(args[0]), addr(args[1]), val(args[2])
            n = val(args[3]) if len(args) > 3 else size
            for i in range(size):
                smem[dst + i] = memory[src + i] if i < n else 0
        elif op == "ld.shared.u16":
            at = addr(args[1])
            regs[args[0]] = smem[at] | smem[at + 1] << 8
        elif op == "ld.shared.b32":
            regs[args[0]] = word(addr(args[1]))
        else:
            raise ValueError(f"not modelled: {line}")
    return regs


def word_smem(words: dict[int, int]) -> dict[int, int]:
    """Shared memory (byte address -> byte) holding 32-bit ``words`` (byte address -> word)."""
    return {at + i: (w >> (8 * i)) & 0xFF for at, w in words.items() for i in range(4)}
