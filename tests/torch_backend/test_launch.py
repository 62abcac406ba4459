"""FastLaunch: the JIT once a key (or while a launch hook is set), the compiled launcher after.

Runs on the CPU with stand-ins for the jitted function and its compiled kernel (needs triton
importable for its hook chains; the CUDA launches themselves are covered by the GPU tests of
the decode and encode kernels)."""

from __future__ import annotations

import types

import pytest

triton = pytest.importorskip("triton")

from tqai_torch.kernels.triton import launch  # noqa: E402


class _Param:
    def __init__(self, name: str, constexpr: bool) -> None:
        self.name, self.is_constexpr = name, constexpr


class _Jitted:
    """A jitted function's stand-in: ``fn[grid](*args, **kw)`` records the call and returns a
    compiled kernel's stand-in whose ``run`` records the direct launches."""

    def __init__(self, names: list[tuple[str, bool]]) -> None:
        self.params = [_Param(n, c) for n, c in names]
        self.jit_calls: list = []
        self.runs: list = []
        jitted = self

        class Compiled:
            function, packed_metadata = "function", "metadata"

            def run(self, *args):
                jitted.runs.append(args)

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.jit_calls.append((grid, args, kw))
            return self.compiled

        return call


@pytest.fixture
def stream(monkeypatch):
    """A stream from a stand-in driver, the direct launch on (as on Triton 3.6) and no hooks."""
    fake = types.SimpleNamespace(active=types.SimpleNamespace(get_current_stream=lambda i: 7))
    monkeypatch.setattr(launch, "driver", fake)
    monkeypatch.setattr(launch, "_DIRECT", True)
    hooks = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(launch, "knobs", types.SimpleNamespace(runtime=hooks))
    return hooks


def test_fast_launch_takes_the_jit_once_per_key(stream):
    fn = _Jitted([("x_ptr", False), ("n", False), ("B", True), ("A", True)])
    fast = launch.FastLaunch(fn)
    fast("k1", 0, (3,), ("x", 5), {"A": 2, "B": 1}, num_warps=4)
    assert fn.jit_calls == [((3,), ("x", 5), {"A": 2, "B": 1, "num_warps": 4})]
    fast("k1", 0, (3,), ("y", 6), {"A": 2, "B": 1}, num_warps=4)
    # grid padded to 3, the stream, the kernel, no hooks, then args and constexprs in order
    assert fn.runs == [(3, 1, 1, 7, "function", "metadata", None, None, None, "y", 6, 1, 2)]
    fast("k2", 0, (3, 2), ("z", 16), {"A": 2, "B": 1}, num_warps=4)
    assert len(fn.jit_calls) == 2
    assert len(fn.runs) == 1


def test_fast_launch_takes_the_jit_while_a_launch_hook_is_set(stream):
    fn = _Jitted([("x_ptr", False), ("A", True)])
    fast = launch.FastLaunch(fn)
    fast("k", 0, (1,), ("x",), {"A": 1})
    for empty in (None, types.SimpleNamespace(calls=[])):  # older Triton / 3.6's empty chain
        stream.launch_enter_hook = empty
        assert not launch.launch_hooks_set()
    stream.launch_enter_hook = types.SimpleNamespace(calls=[print])  # a chain holding a hook
    assert launch.launch_hooks_set()
    fast("k", 0, (1,), ("x",), {"A": 1})
    stream.launch_enter_hook = None
    stream.launch_exit_hook = print  # a hook set as a plain callable
    assert launch.launch_hooks_set()
    fast("k", 0, (1,), ("x",), {"A": 1})
    assert len(fn.jit_calls) == 3
    assert not fn.runs


def test_fast_launch_takes_the_jit_on_every_call_without_the_direct_launch(stream, monkeypatch):
    """Triton versions whose launcher was not checked (before 3.6) launch through the JIT."""
    monkeypatch.setattr(launch, "_DIRECT", False)
    fn = _Jitted([("x_ptr", False), ("A", True)])
    fast = launch.FastLaunch(fn)
    for _ in range(3):
        fast("k", 0, (1,), ("x",), {"A": 1})
    assert len(fn.jit_calls) == 3
    assert not fn.runs


def test_triton_holds_no_launch_hook_by_default():
    """What the installed Triton keeps when no profiler is attached reads as no hook (3.6: empty
    hook chains); before 3.4 (no ``triton.knobs``) hooks cannot be read and count as set."""
    assert launch.launch_hooks_set() is (launch.knobs is None)


def test_fast_launch_refuses_constexprs_before_other_parameters():
    with pytest.raises(ValueError, match="constexpr parameters must come last"):
        launch.FastLaunch(_Jitted([("A", True), ("x_ptr", False)]))


def test_keys_tell_apart_what_triton_specializes_on():
    import torch

    assert launch.ints_key((16, 32, 1, 3)) == (
        (True, True, False, False),
        (False, False, True, False),
    )
    assert launch.int_types_key((16, 2**31 - 1, -(2**31))) is True
    assert launch.int_types_key((16, 2**31, -(2**31) - 1)) == (True, False, False)
    assert launch.int_types_key(()) is True
    base = torch.zeros(64, dtype=torch.float32)
    dtypes, aligned = launch.pointers_key((base, base[1:], base.to(torch.float16)))
    assert dtypes == (torch.float32, torch.float32, torch.float16)
    assert aligned == (base.data_ptr() % 16 == 0, False, True)
