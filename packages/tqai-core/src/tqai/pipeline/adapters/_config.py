"""Reading model configs for the adapters: the first present key wins, with a clear error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["config_int"]


def config_int(config: Mapping[str, Any], *keys: str, who: str) -> int:
    """The first of ``keys`` present in ``config`` (a ``to_dict()`` of a model config).

    Raises:
        KeyError: none of the keys is present; the message names the adapter and the keys.
        ValueError: the value is not a positive integer.
    """
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{who} adapter: config[{key!r}] must be a positive int, got {value!r}"
            )
        return value
    raise KeyError(f"{who} adapter: the model config has none of {', '.join(map(repr, keys))}")
