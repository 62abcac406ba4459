"""``patch_mps_compatibility``: no float64 anywhere in a pipeline's models (Apple MPS has none).

Why it is shaped like this: MPS refuses float64 tensors, and video DiTs reach for float64 in two
ways. (1) RoPE modules that compute their frequencies in double precision on every call: LTX-2's
``LTX2AudioVideoRotaryPosEmbed`` and its text connectors have a ``double_precision`` switch
(default on), which makes the LTX-2 pipeline crash on MPS. (2) float64 parameters or buffers left
by a checkpoint or by a model built where float64 was available. This turns every
``double_precision`` switch off (the frequencies are then computed in float32, as the models do
on MPS by design) and casts float64 parameters and buffers to float32. What it does not change:
numpy-side float64 in schedulers (``FlowMatchEulerDiscreteScheduler`` builds its sigmas in numpy
and casts them to float32 on the way to the device).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["patch_mps_compatibility"]


def _modules_of(pipe_or_model: Any) -> dict[str, torch.nn.Module]:
    if isinstance(pipe_or_model, torch.nn.Module):
        return {"": pipe_or_model}
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            "expected a diffusers pipeline or a torch.nn.Module, got "
            f"{type(pipe_or_model).__name__}"
        )
    return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}


def patch_mps_compatibility(pipe_or_model: Any) -> dict[str, list[str]]:
    """Remove float64 from a pipeline's (or a model's) computation, in place.

    Args:
        pipe_or_model: a diffusers pipeline (every ``torch.nn.Module`` component is patched) or
            one model.

    Returns:
        ``{"double_precision_off": [...], "cast_to_float32": [...]}``: qualified names of the
        modules whose ``double_precision`` was switched off and of the float64 parameters and
        buffers cast to float32 (``component.module.name``).

    Raises:
        TypeError: neither a pipeline nor a module.

    Example:
        >>> pipe = LTX2Pipeline(...)  # doctest: +SKIP
        >>> patch_mps_compatibility(pipe)  # doctest: +SKIP
        {'double_precision_off': ['transformer.rope', ...], 'cast_to_float32': []}
        >>> pipe.to("mps")  # doctest: +SKIP
    """
    report: dict[str, list[str]] = {"double_precision_off": [], "cast_to_float32": []}
    for component, model in _modules_of(pipe_or_model).items():
        prefix = f"{component}." if component else ""
        for name, module in model.named_modules():
            qualified = f"{prefix}{name}".rstrip(".")
            if getattr(module, "double_precision", None) is True:
                module.double_precision = False
                report["double_precision_off"].append(qualified)
            for pname, param in module.named_parameters(recurse=False):
                if param.dtype == torch.float64:
                    param.data = param.data.to(torch.float32)
                    report["cast_to_float32"].append(f"{qualified}.{pname}".lstrip("."))
            for bname, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.dtype == torch.float64:
                    setattr(module, bname, buffer.to(torch.float32))
                    report["cast_to_float32"].append(f"{qualified}.{bname}".lstrip("."))
    return report
