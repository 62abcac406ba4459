"""A model of the few PTX integer instructions the kernels' byte-permute lookups use, so the
CPU tests can run the lookup code instruction by instruction (Triton's interpreter cannot run
inline PTX)."""

from __future__ import annotations


def prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte k of the result is byte ``c[4k:4k+3] & 7`` of
    ``{b, a}``, or the replicated sign of that byte when ``c[4k+3]`` is set."""
    src, out = (b << 32) | a, 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * k)
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX ``lop3.b32``: bit k of the result is bit ``(a_k << 2) | (b_k << 1) | c_k`` of the
    truth table ``lut``."""
    out = 0
    for bit in range(32):
        idx = ((a >> bit & 1) << 2) | ((b >> bit & 1) << 1) | (c >> bit & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_copy_and_load(
    text: str, operands: dict[str, int], memory: bytes, smem: dict[int, int], tid: int
) -> dict[str, int]:
    """Run the copy / stage-load PTX of the fast path for one thread: ``operands`` maps ``$k`` to
    its value, ``memory`` is global memory from address 0, ``smem`` byte address -> byte
    (``global_smem`` at 0), ``tid`` is ``%tid.x``. Returns the registers, ``$k`` included; a
    ``cp.async`` copies its ``src-size`` bytes and zero-fills the rest at once."""
    regs: dict[str, int] = dict(operands)
    preds: dict[str, bool] = {}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0)

    def word(at: int) -> int:
        return int.from_bytes(bytes(smem[at + i] for i in range(4)), "little")

    def addr(tok: str) -> int:
        base, _, off = tok.strip("[] ").partition("+")
        return val(base) + (int(off) if off else 0)

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        if line.startswith("@"):  # a predicated instruction
            guard, _, line = line.partition(" ")
            if not preds[guard[1:]]:
                continue
        op, _, rest = line.partition(" ")
        args = [a.strip() for a in rest.split(",")] if rest else []
        if op == "mov.u32" and args[1] == "global_smem":
            regs[args[0]] = 0
        elif op == "mov.u32" and args[1] == "%tid.x":
            regs[args[0]] = tid
        elif op in ("mov.u32", "mov.b32"):
            regs[args[0]] = val(args[1])
        elif op in ("add.u32", "add.s32"):
            regs[args[0]] = val(args[1]) + val(args[2])
        elif op in ("sub.s32", "sub.u32"):
            regs[args[0]] = val(args[1]) - val(args[2])
        elif op == "shl.b32":
            regs[args[0]] = val(args[1]) << val(args[2])
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "xor.b32":
            regs[args[0]] = val(args[1]) ^ val(args[2])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "mul.lo.u32":
            regs[args[0]] = val(args[1]) * val(args[2])
        elif op == "bar.warp.sync":  # the callers run a warp's lanes one after another
            pass
        elif op in ("mad.lo.u32", "mad.wide.s32"):
            regs[args[0]] = val(args[1]) * val(args[2]) + val(args[3])
        elif op in ("setp.lt.s32", "setp.lt.u32"):
            preds[args[0]] = val(args[1]) < val(args[2])
        elif op == "setp.lt.and.u32":
            preds[args[0]] = val(args[1]) < val(args[2]) and preds[args[3]]
        elif op == "and.b64":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "mul.wide.u32":
            regs[args[0]] = val(args[1]) * val(args[2])
        elif op == "add.s64":
            regs[args[0]] = val(args[1]) + val(args[2])
        elif op == "sub.s64":
            regs[args[0]] = val(args[1]) - val(args[2])
        elif op == "max.s64":
            regs[args[0]] = max(val(args[1]), val(args[2]))
        elif op == "min.s64":
            regs[args[0]] = min(val(args[1]), val(args[2]))
        elif op == "cvt.u32.u64":
            regs[args[0]] = val(args[1]) & 0xFFFFFFFF
        elif op == "selp.b32":
            regs[args[0]] = val(args[1]) if preds[args[3]] else val(args[2])
        elif op.startswith("cp.async.c") and op.endswith(".shared.global"):
            dst, src, size = addr(args[0]), addr(args[1]), val(args[2])
            n = val(args[3]) if len(args) > 3 else size
            for i in range(size):
                smem[dst + i] = memory[src + i] if i < n else 0
        elif op == "cp.async.commit_group":
            pass
        elif op == "ld.shared.u16":
            at = addr(args[1])
            regs[args[0]] = smem[at] | smem[at + 1] << 8
        elif op == "ld.shared.b32":
            regs[args[0]] = word(addr(args[1]))
        elif op in ("ld.shared.v2.b32", "ld.shared.v4.b32"):
            outs = [r.strip("{} ") for r in rest.split("}")[0].split(",")]
            at = addr(rest.split("}")[1].strip(" ,"))
            for k, reg in enumerate(outs):
                regs[reg] = word(at + 4 * k)
        else:
            raise ValueError(f"not modelled: {line}")
    return regs
