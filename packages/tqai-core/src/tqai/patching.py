"""``tqai.patch`` / ``tqai.unpatch``: one call for every backend, routed through the registry.

Why it is shaped like this: the core must not import a backend (SPEC.md "The shape"), yet users
write ``tqai.patch(model)`` whatever framework the model comes from. Each backend registers a
:class:`~tqai.backend.Backend` under the ``tqai.backends`` entry-point group; its ``detects``
recognises the model by module names alone and its ``patch``/``unpatch`` do the work (they import
the backend library only when called). So this module only picks a backend and forwards.

Example:
    >>> import tqai
    >>> cache = tqai.patch(model, bits_k=4, bits_v=2)  # doctest: +SKIP
    >>> tqai.unpatch(model)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from tqai.backend import Backend
from tqai.registry import registry

__all__ = ["patch", "resolve_backend", "unpatch"]

_GROUP = "tqai.backends"


def resolve_backend(model: object, backend: str | None = None) -> Backend:
    """The backend that owns ``model``: the one named, or the most specific one that detects it.

    Detection walks ``type(model).__mro__`` and returns the first backend named after a class's
    top-level package (``diffusers``, ``mlx``, ``torch``) whose ``detects`` accepts the model; only
    if none does are all backends loaded and asked.

    Args:
        model: a model object (torch ``nn.Module``, mlx-lm model, ...).
        backend: a backend name (``"torch"``, ``"mlx"``, ``"diffusers"``) or None to detect.

    Raises:
        PluginNotFoundError: no backend has that name (the message lists the installed ones).
        TypeError: no installed backend recognises the model.
        ValueError: several backends recognise it; pass ``backend=``.
    """
    backends = registry(_GROUP)
    if backend is not None:
        return backends.get(backend)
    # Most specific first, loading as few plugins as possible: walk the class MRO and try the
    # backend named after each class's top-level package (diffusers before torch for a
    # diffusers model; mlx for an mlx-lm model without loading the torch plugin).
    names = set(backends.available())
    for cls in type(model).__mro__:
        root = (getattr(cls, "__module__", None) or "").partition(".")[0]
        if root in names:
            candidate = backends.get(root)
            if candidate.detects(model):
                return candidate
    found = [b for b in backends.load_all().values() if b.detects(model)]
    if not found:
        installed = ", ".join(backends.available()) or "none"
        raise TypeError(
            f"no installed tqai backend handles a {type(model).__module__}."
            f"{type(model).__name__} (installed backends: {installed}); install the matching "
            "package (pip install tqai-torch, tqai-mlx or tqai-diffusers) or pass backend="
        )
    if len(found) > 1:
        names_found = ", ".join(repr(b.name) for b in found)
        raise ValueError(
            f"several tqai backends handle a {type(model).__name__} ({names_found}); pass backend="
        )
    return found[0]


def patch(model: object, *, backend: str | None = None, **kwargs: Any) -> Any:
    """Compress ``model``'s KV cache with TurboQuant through its backend's ``patch``.

    Args:
        model: the model to patch.
        backend: backend name, or None to detect it from the model's type.
        **kwargs: the backend's options (e.g. ``bits_k=4, bits_v=2``).

    Returns:
        Whatever the backend's ``patch`` returns (a cache to pass to generation).

    Raises:
        NotImplementedError: the backend exists but has no ``patch`` in this version.
    """
    chosen = resolve_backend(model, backend)
    if chosen.patch is None:
        raise NotImplementedError(
            f"the {chosen.name} backend's patch() is not available in this version "
            f"({chosen.package})"
        )
    return chosen.patch(model, **kwargs)


def unpatch(model: object, *, backend: str | None = None) -> None:
    """Undo :func:`patch` on ``model`` (its backend's ``unpatch``)."""
    chosen = resolve_backend(model, backend)
    if chosen.unpatch is None:
        raise NotImplementedError(
            f"the {chosen.name} backend's unpatch() is not available in this version "
            f"({chosen.package})"
        )
    chosen.unpatch(model)
