"""Launching compiled Triton kernels without Triton's JIT on every call.

Decode calls each kernel once per layer and token, and Triton's JIT binds and specializes the
arguments of every call in Python before it launches (most of an eager call's host time). A
:class:`FastLaunch` keeps each compiled kernel under a key the caller builds from exactly what
Triton specializes that kernel on, and launches it through the compiled kernel's own launcher
afterwards. What Triton 3.6 specializes on: the constexprs, each pointer's dtype and 16-byte
alignment, each integer's divisibility by 16 (not for ``do_not_specialize`` arguments) and
type (int32, or int64 past its range); :func:`ints_key` also keys on ``== 1`` (older versions
specialized it; one more key never launches a kernel on values it was not compiled for). The
keys are built by C-level ``map`` over the arguments: a decode call has ~17 pointers and ~30
integers, and a Python loop over them cost more host time than the launch saved.

The compiled launcher's arguments (grid, stream, function, metadata, launch metadata, the two
hooks, then every parameter in signature order) are those of Triton 3.6, where this was checked;
with an older Triton every call takes the JIT, as before.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, methodcaller, mod, not_
from typing import Any

import triton
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # Triton < 3.4
    knobs = None

__all__ = ["FastLaunch", "int_types_key", "ints_key", "launch_hooks_set", "pointers_key"]

_INT32 = (-(2**31), 2**31 - 1)
_dtype = attrgetter("dtype")
_data_ptr = methodcaller("data_ptr")
_DIRECT = knobs is not None and tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 6)


def launch_hooks_set() -> bool:
    """Whether a Triton launch hook (a profiler's) is set: then every call takes the JIT, which
    calls it. Triton 3.6 keeps empty hook chains (``HookChain``, its hooks in ``.calls``) where
    older versions kept None. Without ``triton.knobs`` (before 3.4) the hooks cannot be read
    here: True, so those versions keep the JIT."""
    if knobs is None:
        return True
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def ints_key(values: tuple[int, ...]) -> tuple:
    """The specialized integer arguments' part of a key: which are divisible by 16 and which
    equal 1."""
    return tuple(map(not_, map(mod, values, repeat(16)))), tuple(map((1).__eq__, values))


def int_types_key(values: tuple[int, ...]) -> Any:
    """Every integer argument's type: True when all fit int32, else which do."""
    if not values or (min(values) >= _INT32[0] and max(values) <= _INT32[1]):
        return True
    return tuple(_INT32[0] <= v <= _INT32[1] for v in values)


def pointers_key(tensors: tuple[Any, ...]) -> tuple:
    """The pointer arguments' part of a key: their dtypes and which are 16-byte aligned."""
    aligned = map(not_, map(mod, map(_data_ptr, tensors), repeat(16)))
    return tuple(map(_dtype, tensors)), tuple(aligned)


class FastLaunch:
    """The compiled kernels of one ``@triton.jit`` (or Gluon) function, by caller-built keys.

    ``fn``'s constexpr parameters must come after all its other parameters (the compiled
    launcher takes the arguments in signature order)."""

    def __init__(self, fn: Any) -> None:
        # (under TRITON_INTERPRET the function has none, and never reaches a compiled launcher)
        params = list(getattr(fn, "params", ()))
        self.constexprs = [p.name for p in params if p.is_constexpr]
        if any(p.is_constexpr for p in params[: len(params) - len(self.constexprs)]):
            raise ValueError(f"{fn}: constexpr parameters must come last")
        self.fn = fn
        self.kernels: dict[Any, Any] = {}

    def __call__(
        self, key: Any, device_index: int, grid: tuple, args: tuple, constexprs: dict, **options
    ) -> None:
        """Launch ``fn[grid](*args, **constexprs, **options)``: through the JIT the first time
        for ``key`` (or while a launch hook is set), then through the kernel compiled then.
        ``key`` must hold every argument's specialization (:func:`pointers_key`,
        :func:`ints_key`, :func:`int_types_key`), the constexprs and the options."""
        kernel = self.kernels.get(key)
        if kernel is None or not _DIRECT or launch_hooks_set():
            kernel = self.fn[grid](*args, **constexprs, **options)
            if hasattr(kernel, "packed_metadata"):  # a compiled kernel (not the interpreter)
                self.kernels[key] = kernel
            return
        x, y, z = (*grid, 1, 1)[:3]
        kernel.run(
            x, y, z, driver.active.get_current_stream(device_index), kernel.function,
            kernel.packed_metadata, None, None, None, *args,
            *(constexprs[name] for name in self.constexprs),
        )  # fmt: skip
