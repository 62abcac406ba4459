"""Plugin discovery through fake entry points (the fsspec ``tests/test_registry.py`` pattern).

``importlib.metadata.entry_points`` is patched to return fake entry points whose targets are real
modules written to a temporary folder, so the tests see exactly when a module gets imported.
"""

from __future__ import annotations

import importlib.metadata
import sys
import threading
import time
import types
import uuid
import warnings
from dataclasses import dataclass, field

import pytest

from tqai.registry import (
    GROUPS,
    PluginLoadError,
    PluginNotFoundError,
    Registry,
    registry,
)

GROUP = "tqai.test_plugins"


@dataclass(frozen=True)
class FakeDist:
    name: str
    version: str


@dataclass(frozen=True)
class FakeEntryPoint:
    """The parts of ``importlib.metadata.EntryPoint`` the registry reads."""

    name: str
    value: str
    group: str = GROUP
    dist: FakeDist | None = field(default_factory=lambda: FakeDist("tqai-fake", "1.2.3"))


class FakeEntryPoints:
    """Stands in for ``importlib.metadata.entry_points``; counts calls per group."""

    def __init__(self) -> None:
        self.by_group: dict[str, list[FakeEntryPoint]] = {}
        self.calls: dict[str, int] = {}
        self.delay = 0.0

    def __call__(self, *, group: str) -> list[FakeEntryPoint]:
        self.calls[group] = self.calls.get(group, 0) + 1
        if self.delay:
            time.sleep(self.delay)
        return list(self.by_group.get(group, []))

    def set(self, *eps: FakeEntryPoint) -> None:
        self.by_group[GROUP] = list(eps)


@pytest.fixture
def fake_eps(monkeypatch: pytest.MonkeyPatch) -> FakeEntryPoints:
    fake = FakeEntryPoints()
    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    return fake


@pytest.fixture
def plugin_module(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Write a uniquely named module to a folder on sys.path; return a factory for its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str) -> str:
        name = f"tqai_fake_plugin_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(source)
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


GOOD_SOURCE = "class GoodPlugin:\n    pass\n\n\ndef other():\n    return 42\n"
BROKEN_SOURCE = "raise RuntimeError('boom at import')\n"


def test_registry_discovery_imports_nothing(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    fake_eps.set(FakeEntryPoint("good", f"{module}:GoodPlugin"))
    reg = Registry(GROUP)

    assert reg.available() == ["good"]
    assert reg.plugins["good"] == f"{module}:GoodPlugin"
    assert [e.status for e in reg.entries()] == ["not loaded"]
    assert module not in sys.modules

    plugin = reg.get("good")

    assert module in sys.modules
    assert plugin is sys.modules[module].GoodPlugin
    assert reg.plugins["good"] is plugin
    assert [e.status for e in reg.entries()] == ["ok"]


def test_registry_reads_entry_points_once(fake_eps, plugin_module):
    fake_eps.set(FakeEntryPoint("good", f"{plugin_module(GOOD_SOURCE)}:GoodPlugin"))
    reg = Registry(GROUP)

    reg.available()
    reg.get("good")
    reg.entries()
    assert "good" in reg

    assert fake_eps.calls == {GROUP: 1}


def test_registry_constructor_reads_nothing(fake_eps):
    Registry(GROUP)

    assert fake_eps.calls == {}


def test_registry_broken_plugin_warns_and_others_work(fake_eps, plugin_module):
    good = plugin_module(GOOD_SOURCE)
    broken = plugin_module(BROKEN_SOURCE)
    fake_eps.set(
        FakeEntryPoint("broken", f"{broken}:Plugin"),
        FakeEntryPoint("good", f"{good}:GoodPlugin"),
        FakeEntryPoint("missing_attr", f"{good}:NoSuchThing"),
    )
    reg = Registry(GROUP)

    with pytest.warns(RuntimeWarning) as record:
        loaded = reg.load_all()

    assert list(loaded) == ["good"]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "'broken'" in messages[0]
    assert "boom at import" in messages[0]
    assert "'missing_attr'" in messages[1]
    assert reg.get("good") is sys.modules[good].GoodPlugin
    status = {e.name: e.status for e in reg.entries()}
    assert status["good"] == "ok"
    assert status["broken"] == "error: RuntimeError: boom at import"
    assert status["missing_attr"].startswith("error: AttributeError")


def test_registry_get_broken_plugin_names_plugin_and_cause(fake_eps, plugin_module):
    broken = plugin_module(BROKEN_SOURCE)
    fake_eps.set(FakeEntryPoint("broken", f"{broken}:Plugin"))
    reg = Registry(GROUP)

    with pytest.raises(PluginLoadError, match=r"'broken'.*tqai-fake.*boom at import") as info:
        reg.get("broken")

    assert isinstance(info.value.__cause__, RuntimeError)


def test_registry_entries_load_warns_for_broken_plugin(fake_eps, plugin_module):
    fake_eps.set(
        FakeEntryPoint("broken", f"{plugin_module(BROKEN_SOURCE)}:Plugin"),
        FakeEntryPoint("good", f"{plugin_module(GOOD_SOURCE)}:GoodPlugin"),
    )
    reg = Registry(GROUP)

    with pytest.warns(RuntimeWarning, match="'broken'"):
        entries = reg.entries(load=True)

    assert [(e.name, e.status.split(":")[0]) for e in entries] == [
        ("broken", "error"),
        ("good", "ok"),
    ]


def test_registry_import_error_shows_install_hint():
    reg = Registry(GROUP)
    reg.register("absent", "tqai_no_such_module_xyz:Thing", hint="pip install tqai-xyz")

    with pytest.raises(PluginLoadError, match=r"ModuleNotFoundError.*pip install tqai-xyz"):
        reg.get("absent")


def test_registry_duplicate_entry_points_warn_and_keep_first(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    fake_eps.set(
        FakeEntryPoint("dup", f"{module}:GoodPlugin", dist=FakeDist("first-pkg", "1.0")),
        FakeEntryPoint("dup", f"{module}:other", dist=FakeDist("second-pkg", "2.0")),
    )
    reg = Registry(GROUP)

    with pytest.warns(RuntimeWarning, match=r"'dup'.*more than once.*first-pkg.*second-pkg"):
        names = reg.available()

    assert names == ["dup"]
    assert reg.get("dup") is sys.modules[module].GoodPlugin
    (entry,) = reg.entries()
    assert (entry.package, entry.version) == ("first-pkg", "1.0")


def test_registry_register_duplicate_warns_and_keeps_first(fake_eps):
    reg = Registry(GROUP)
    first, second = object(), object()
    reg.register("thing", first)

    with pytest.warns(RuntimeWarning, match=r"'thing'.*already registered.*clobber=True"):
        reg.register("thing", second)

    assert reg.get("thing") is first


def test_registry_register_clobber_replaces_silently(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    fake_eps.set(FakeEntryPoint("good", f"{module}:GoodPlugin"))
    reg = Registry(GROUP)
    replacement = object()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.register("good", replacement, clobber=True)

    assert reg.get("good") is replacement
    assert module not in sys.modules


def test_registry_register_dotted_path_loads_lazily(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    reg = Registry(GROUP)
    reg.register("colon", f"{module}:other")
    reg.register("dotted", f"{module}.GoodPlugin")

    assert module not in sys.modules
    assert reg.get("colon")() == 42
    assert reg.get("dotted") is sys.modules[module].GoodPlugin


def test_registry_unknown_name_lists_available(fake_eps):
    reg = Registry(GROUP)
    reg.register("alpha", object())
    reg.register("beta", object())

    with pytest.raises(PluginNotFoundError) as info:
        reg.get("gamma")

    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.startswith("no tqai plugin named 'gamma'")
    assert "'alpha', 'beta'" in message
    assert GROUP in message


def test_registry_unknown_name_with_no_plugins(fake_eps):
    with pytest.raises(KeyError, match="none installed"):
        Registry(GROUP).get("anything")


def test_registry_refresh_rereads_entry_points(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    fake_eps.set(FakeEntryPoint("old", f"{module}:GoodPlugin"))
    reg = Registry(GROUP)
    manual = object()
    reg.register("manual", manual)
    assert reg.available() == ["manual", "old"]

    fake_eps.set(FakeEntryPoint("new", f"{module}:other"))
    assert reg.available() == ["manual", "old"]  # cached until refresh
    reg.refresh()

    assert reg.available() == ["manual", "new"]
    assert reg.get("manual") is manual
    assert fake_eps.calls == {GROUP: 2}


def test_registry_entries_report_package_version_and_target(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    fake_eps.set(FakeEntryPoint("good", f"{module}:GoodPlugin", dist=None))
    fake_eps.by_group[GROUP].append(
        FakeEntryPoint("pkg", f"{module}:other", dist=FakeDist("tqai-plugin-x", "0.4.0"))
    )
    reg = Registry(GROUP)
    reg.register("manual", Registry)

    entries = {e.name: e for e in reg.entries()}

    assert entries["pkg"].group == GROUP
    assert entries["pkg"].target == f"{module}:other"
    assert (entries["pkg"].package, entries["pkg"].version) == ("tqai-plugin-x", "0.4.0")
    assert (entries["good"].package, entries["good"].version) == (None, None)
    assert entries["manual"].target == "tqai.registry:Registry"
    assert entries["manual"].status == "ok"
    assert entries["manual"].package is None


def test_registry_plugins_view_is_read_only(fake_eps):
    reg = Registry(GROUP)
    reg.register("alpha", object())

    assert isinstance(reg.plugins, types.MappingProxyType)
    with pytest.raises(TypeError):
        reg.plugins["beta"] = object()  # type: ignore[index]


def test_registry_first_use_is_thread_safe(fake_eps, plugin_module):
    module = plugin_module(GOOD_SOURCE)
    fake_eps.set(*(FakeEntryPoint(f"p{i}", f"{module}:GoodPlugin") for i in range(20)))
    fake_eps.delay = 0.05
    reg = Registry(GROUP)
    barrier = threading.Barrier(8)
    results: list[object] = []

    def worker() -> None:
        barrier.wait()
        results.append((reg.available(), reg.get("p7")))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert fake_eps.calls == {GROUP: 1}
    expected = (sorted(f"p{i}" for i in range(20)), sys.modules[module].GoodPlugin)
    assert results == [expected] * 8


def test_registry_function_returns_one_instance_per_group():
    assert registry("tqai.rotations") is registry("tqai.rotations")
    assert registry("tqai.rotations") is not registry("tqai.quantizers")
    assert registry("tqai.backends").group == "tqai.backends"


def test_registry_function_rejects_unknown_group():
    with pytest.raises(ValueError, match=r"'tqai.rotation'.*tqai\.backends.*tqai\.adapters"):
        registry("tqai.rotation")


def test_registry_groups_are_the_spec_groups():
    """SPEC.md's groups, plus ``tqai.commands`` (CLI commands a backend adds, e.g. ``run``)."""
    assert GROUPS == (
        "tqai.backends",
        "tqai.commands",
        "tqai.kernels",
        "tqai.quantizers",
        "tqai.rotations",
        "tqai.codebooks",
        "tqai.scorers",
        "tqai.strategies",
        "tqai.monitors",
        "tqai.adapters",
    )


def test_registry_builtins_are_declared_by_tqai_core():
    entries = {e.name: e for e in Registry("tqai.rotations").entries()}

    assert {"haar", "hadamard", "rotor"} <= set(entries)
    assert entries["haar"].target == "tqai.rotations:HaarRotation"
    assert entries["haar"].package == "tqai-core"
