"""Plugin registry: one ``Registry`` class for every kind of tqai plugin.

Every plugin kind (backends, kernels, quantizers, rotations, codebook solvers, scorers, strategies,
monitors, adapters) is one entry-point group. Built-ins are declared in tqai-core's own
``pyproject.toml`` under the same groups a third-party package uses, so both take one path.

The design follows xarray's backend plugins and fsspec's registry:

- Entry points are read once per group, on first use, and cached; ``refresh()`` clears the cache.
  Discovery records only each entry point's ``"module:attr"`` path: nothing is imported until
  ``get`` asks for that plugin, so ``import tqai`` stays light and backend-free.
- The registry keeps a private dict of ``name -> object or "module:attr" path`` behind a read-only
  ``types.MappingProxyType`` view.
- A plugin that fails to load never breaks the others: bulk operations (``load_all``,
  ``entries(load=True)``) turn the failure into a ``RuntimeWarning`` naming it, and ``get`` raises
  an error that names the plugin and the original exception.
- Duplicate names warn and keep the first registration; ``clobber=True`` replaces explicitly.

Example:
    >>> from tqai.registry import registry
    >>> "haar" in registry("tqai.rotations").available()
    True
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "GROUPS",
    "PluginInfo",
    "PluginLoadError",
    "PluginNotFoundError",
    "Registry",
    "registry",
]

GROUPS: tuple[str, ...] = (
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
"""Entry-point group names, one per plugin kind."""

_STATUS_OK = "ok"
_STATUS_NOT_LOADED = "not loaded"


class PluginNotFoundError(KeyError):
    """Raised by ``Registry.get`` for a name no plugin has; the message lists the known names."""

    def __str__(self) -> str:
        # KeyError quotes its argument with repr(); a readable sentence is more useful here.
        return str(self.args[0]) if self.args else ""


class PluginLoadError(RuntimeError):
    """Raised by ``Registry.get`` when importing a plugin's target fails.

    The message names the group, the plugin and its target path; the original exception is
    chained as ``__cause__``.
    """


@dataclass(frozen=True, kw_only=True, slots=True)
class PluginInfo:
    """One plugin as ``Registry.entries`` reports it (what ``tqai plugins`` prints).

    Attributes:
        group: Entry-point group, e.g. ``"tqai.rotations"``.
        name: Plugin name within the group.
        target: ``"module:attr"`` path of the plugin object.
        package: Distribution that declared it, or ``None`` for a ``register`` call at run time.
        version: That distribution's version, or ``None``.
        status: ``"ok"`` (loaded), ``"not loaded"`` or ``"error: <exception>"``.
    """

    group: str
    name: str
    target: str
    package: str | None
    version: str | None
    status: str


@dataclass(kw_only=True, slots=True)
class _Meta:
    """What the registry knows about a name besides its value (kept out of the public dict)."""

    target: str
    package: str | None = None
    version: str | None = None
    hint: str | None = None
    from_entry_point: bool = False
    error: str | None = None


def _target_path(obj: object) -> str:
    """Return ``"module:qualname"`` for an object registered directly (for display only)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return repr(obj)


def _import_target(path: str) -> object:
    """Import ``"pkg.module:attr.sub"`` (entry-point form) or ``"pkg.module.attr"`` (fsspec form)."""
    if ":" in path:
        module_name, _, attrs = path.partition(":")
    else:
        module_name, _, attrs = path.rpartition(".")
    if not module_name or not attrs:
        raise ValueError(f"expected a 'module:attr' path, got {path!r}")
    obj: object = importlib.import_module(module_name)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


def _describe(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {ex}"


class Registry:
    """Plugins of one kind: entry-point discovery, lazy loading and run-time registration.

    Values are either a loaded object or a ``"module:attr"`` path that ``get`` imports on first
    use and then caches. All methods are thread-safe.

    Args:
        group: Entry-point group to discover, e.g. ``"tqai.rotations"``. ``registry(group)``
            returns the shared instance for a known group; build a ``Registry`` directly only for
            tests or private plugin kinds.

    Example:
        >>> reg = Registry("tqai.example")
        >>> reg.register("identity", "builtins:id")
        >>> reg.get("identity") is id
        True
    """

    def __init__(self, group: str) -> None:
        self.group = group
        self._plugins: dict[str, object] = {}
        self._meta: dict[str, _Meta] = {}
        self._view = types.MappingProxyType(self._plugins)
        self._discovered = False
        # Re-entrant: a plugin module may itself use this registry while it is being imported.
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Registry({self.group!r})"

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._plugins

    @property
    def plugins(self) -> Mapping[str, object]:
        """Read-only view of ``name -> loaded object or "module:attr" path`` (after discovery)."""
        self._discover()
        return self._view

    def _discover(self) -> None:
        """Read this group's entry points once; record paths only, import nothing."""
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            # Looked up through the module at call time so tests can patch it.
            found = importlib.metadata.entry_points(group=self.group)
            for ep in found:
                dist = getattr(ep, "dist", None)
                package = getattr(dist, "name", None) if dist is not None else None
                version = getattr(dist, "version", None) if dist is not None else None
                if ep.name in self._plugins:
                    kept = self._meta[ep.name]
                    if kept.from_entry_point:
                        warnings.warn(
                            f"tqai plugin {ep.name!r} in group {self.group!r} is declared more "
                            f"than once: keeping {kept.target!r} from {kept.package or '?'}, "
                            f"ignoring {ep.value!r} from {package or '?'}",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                    # A run-time registration that survived refresh() wins over an entry point.
                    continue
                self._plugins[ep.name] = ep.value
                self._meta[ep.name] = _Meta(
                    target=ep.value, package=package, version=version, from_entry_point=True
                )
            self._discovered = True

    def register(
        self,
        name: str,
        target: object,
        *,
        clobber: bool = False,
        hint: str | None = None,
    ) -> None:
        """Add a plugin under ``name``.

        Args:
            name: Plugin name within this group.
            target: The plugin object, or a ``"module:attr"`` path imported on first ``get``.
            clobber: Replace an existing plugin of that name. Without it a duplicate gives a
                ``RuntimeWarning`` and the first registration is kept.
            hint: Text appended to the error when importing ``target`` fails with an
                ``ImportError``, e.g. ``"pip install tqai-torch"``.
        """
        self._discover()
        with self._lock:
            if name in self._plugins and not clobber:
                warnings.warn(
                    f"tqai plugin {name!r} in group {self.group!r} is already registered "
                    f"({self._meta[name].target!r}); keeping it. Pass clobber=True to replace it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            path = target if isinstance(target, str) else _target_path(target)
            self._plugins[name] = target
            self._meta[name] = _Meta(target=path, hint=hint)

    def get(self, name: str) -> object:
        """Return the plugin ``name``, importing its target on first use.

        Raises:
            PluginNotFoundError: No plugin has that name (a ``KeyError``); the message lists the
                available names.
            PluginLoadError: Importing the target failed; the message names the plugin and the
                original exception, which is chained.
        """
        self._discover()
        with self._lock:
            try:
                value = self._plugins[name]
            except KeyError:
                available = ", ".join(repr(n) for n in self.available()) or "none installed"
                raise PluginNotFoundError(
                    f"no tqai plugin named {name!r} in group {self.group!r}; available: {available}"
                ) from None
            if not isinstance(value, str):
                return value
            meta = self._meta[name]
            try:
                obj = _import_target(value)
            except Exception as ex:
                meta.error = _describe(ex)
                message = (
                    f"tqai plugin {name!r} in group {self.group!r} ({value}"
                    f"{f' from {meta.package}' if meta.package else ''}) failed to load: "
                    f"{meta.error}"
                )
                if meta.hint and isinstance(ex, ImportError):
                    message += f". {meta.hint}"
                raise PluginLoadError(message) from ex
            meta.error = None
            self._plugins[name] = obj
            return obj

    def available(self) -> list[str]:
        """Return the sorted names of all plugins in this group (loaded or not)."""
        self._discover()
        return sorted(self._plugins)

    def load_all(self) -> dict[str, object]:
        """Load every plugin; a broken one gives a ``RuntimeWarning`` and is left out.

        Returns:
            ``name -> object`` for the plugins that loaded.
        """
        loaded: dict[str, object] = {}
        for name in self.available():
            try:
                loaded[name] = self.get(name)
            except PluginLoadError as ex:
                warnings.warn(str(ex), RuntimeWarning, stacklevel=2)
        return loaded

    def entries(self, *, load: bool = False) -> list[PluginInfo]:
        """Describe every plugin: target path, providing package and version, load status.

        Args:
            load: Try to load each plugin first, so status is ``"ok"`` or ``"error: ..."``
                rather than ``"not loaded"``. Failures also give a ``RuntimeWarning``.

        Returns:
            One ``PluginInfo`` per plugin, sorted by name.
        """
        if load:
            self.load_all()
        with self._lock:
            infos = []
            for name in self.available():
                meta = self._meta[name]
                if meta.error is not None:
                    status = f"error: {meta.error}"
                elif isinstance(self._plugins[name], str):
                    status = _STATUS_NOT_LOADED
                else:
                    status = _STATUS_OK
                infos.append(
                    PluginInfo(
                        group=self.group,
                        name=name,
                        target=meta.target,
                        package=meta.package,
                        version=meta.version,
                        status=status,
                    )
                )
            return infos

    def refresh(self) -> None:
        """Forget discovered entry points so the next use reads them again.

        Plugins added with ``register`` at run time are kept. Call it after installing or
        removing a plugin package in a running process.
        """
        with self._lock:
            for name in [n for n, m in self._meta.items() if m.from_entry_point]:
                del self._plugins[name]
                del self._meta[name]
            self._discovered = False


_registries: dict[str, Registry] = {}
_registries_lock = threading.Lock()


def registry(group: str) -> Registry:
    """Return the shared ``Registry`` for an entry-point group (one instance per group).

    Args:
        group: One of ``GROUPS``, e.g. ``"tqai.backends"``.

    Raises:
        ValueError: ``group`` is not a tqai entry-point group; the message lists them.

    Example:
        >>> registry("tqai.rotations") is registry("tqai.rotations")
        True
    """
    if group not in GROUPS:
        raise ValueError(
            f"unknown tqai plugin group {group!r}; expected one of: {', '.join(GROUPS)}"
        )
    with _registries_lock:
        try:
            return _registries[group]
        except KeyError:
            reg = _registries[group] = Registry(group)
            return reg
