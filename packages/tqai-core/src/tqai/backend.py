"""The object a backend package registers under the ``tqai.backends`` entry-point group.

A backend (tqai-torch, tqai-mlx, tqai-diffusers) exposes one ``Backend`` value. The core uses it
to describe the installation (``tqai info``) and to route a model or array to the backend that
owns it, without importing any backend library: ``detects`` looks only at the module names in
the object's type MRO, so asking "is this a torch model?" never imports torch.

Example:
    >>> from tqai.backend import Backend, module_detector
    >>> numpy_backend = Backend(
    ...     name="numpy",
    ...     package="numpy",
    ...     array_namespace="numpy",
    ...     info=lambda: {},
    ...     detects=module_detector("numpy"),
    ... )
    >>> import numpy as np
    >>> numpy_backend.detects(np.zeros(3))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backend", "module_detector"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Backend:
    """A backend plugin: what it is, how to describe it, which objects it owns.

    Attributes:
        name: Entry-point name, e.g. ``"torch"``.
        package: Distribution that provides it, e.g. ``"tqai-torch"``.
        array_namespace: Array namespace its arrays use, e.g. ``"torch"`` or ``"mlx.core"``.
        info: Returns library versions and devices; may import the backend library.
        detects: Whether an object (a model or an array) belongs to this backend. Must not import
            anything: it inspects ``type(obj).__mro__`` module names only.
        patch: ``patch(model, **options) -> cache`` behind :func:`tqai.patch`, or None while the
            backend has none; it may import the backend library (only when called).
        unpatch: ``unpatch(model) -> None`` behind :func:`tqai.unpatch`, or None.
    """

    name: str
    package: str
    array_namespace: str
    info: Callable[[], dict[str, object]]
    detects: Callable[[object], bool]
    patch: Callable[..., object] | None = None
    unpatch: Callable[[object], None] | None = None


def module_detector(*packages: str) -> Callable[[object], bool]:
    """Build a ``detects`` function matching objects whose type comes from given packages.

    An object matches when any class in ``type(obj).__mro__`` is defined in one of ``packages``
    or a submodule of one (``"torch"`` matches ``torch.nn.modules.linear`` but not
    ``torchvision``). Nothing is imported.

    Args:
        *packages: Top-level package names, e.g. ``"torch", "transformers"``.

    Returns:
        A predicate ``detects(obj) -> bool``.
    """
    roots = frozenset(packages)

    def detects(obj: object) -> bool:
        for cls in type(obj).__mro__:
            module = getattr(cls, "__module__", None) or ""
            if module.partition(".")[0] in roots:
                return True
        return False

    detects.__qualname__ = f"module_detector({', '.join(map(repr, packages))})"
    return detects
