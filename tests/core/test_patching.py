"""tqai.patch / tqai.unpatch: picking the backend that owns a model, with fake backends."""

from __future__ import annotations

import pytest

import tqai
from tqai import patching
from tqai.backend import Backend, module_detector
from tqai.registry import PluginNotFoundError, Registry


def _backend(name, *roots, patch=True):
    calls = []

    def do_patch(model, **kwargs):
        calls.append(("patch", model, kwargs))
        return f"{name}-cache"

    def do_unpatch(model):
        calls.append(("unpatch", model))

    backend = Backend(
        name=name,
        package=f"tqai-{name}",
        array_namespace=name,
        info=dict,
        detects=module_detector(*(roots or (name,))),
        patch=do_patch if patch else None,
        unpatch=do_unpatch if patch else None,
    )
    return backend, calls


def _model_of(*modules):
    """An instance whose class MRO runs through classes defined in ``modules`` (in order)."""
    bases: tuple[type, ...] = (object,)
    for module in reversed(modules):
        bases = (type("C", bases, {"__module__": module}),)
    return bases[0]()


@pytest.fixture
def backends(monkeypatch):
    reg = Registry("tqai.backends.fake")
    monkeypatch.setattr(reg, "_discovered", True)  # only what the test registers
    monkeypatch.setattr(patching, "registry", lambda group: reg)
    return reg


def test_patch_routes_to_the_named_backend(backends):
    fake, calls = _backend("fakelib")
    backends.register("fakelib", fake)
    model = _model_of("elsewhere.models")
    assert tqai.patch(model, backend="fakelib", bits_k=3) == "fakelib-cache"
    tqai.unpatch(model, backend="fakelib")
    assert calls == [("patch", model, {"bits_k": 3}), ("unpatch", model)]
    with pytest.raises(PluginNotFoundError, match="nope"):
        tqai.patch(model, backend="nope")


def test_detection_prefers_the_most_specific_backend(backends):
    outer, _ = _backend("outer", "outer", "inner")  # like torch: also claims a sub-library
    inner, inner_calls = _backend("inner")  # like diffusers
    backends.register("outer", outer)
    backends.register("inner", inner)
    model = _model_of("inner.models.block", "outer.nn.module")
    assert tqai.patch(model) == "inner-cache"
    assert inner_calls[0][0] == "patch"
    assert patching.resolve_backend(_model_of("outer.nn")) is outer


def test_detection_errors_are_clear(backends):
    a, _ = _backend("a", "shared")
    b, _ = _backend("b", "shared")
    backends.register("a", a)
    backends.register("b", b)
    with pytest.raises(ValueError, match="several tqai backends"):
        tqai.patch(_model_of("shared.models"))
    with pytest.raises(TypeError, match="no installed tqai backend handles"):
        tqai.patch(_model_of("unknown.models"))


def test_backend_without_patch_says_so(backends):
    bare, _ = _backend("bare", patch=False)
    backends.register("bare", bare)
    model = _model_of("bare.models")
    with pytest.raises(NotImplementedError, match=r"the bare backend's patch\(\) is not available"):
        tqai.patch(model)
    with pytest.raises(NotImplementedError, match="unpatch"):
        tqai.unpatch(model)
