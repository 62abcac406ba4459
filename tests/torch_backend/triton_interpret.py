"""Running the Triton kernel tests on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Tests import ``INTERPRET`` / ``DEVICE`` / ``MARKS`` from here: with the interpreter the tensors
live on the CPU and the tests are not marked ``gpu``; otherwise they need CUDA.
"""

from __future__ import annotations

import os

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
MARKS = [] if INTERPRET else [pytest.mark.gpu]


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar into ``int(array of shape (1,))``, which numpy
    >= 2.4 refuses ("only 0-dimensional arrays can be converted"); loops over run-time bounds
    need it. Re-register ``__index__`` on the interpreted tensor with a 0-d reshape."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_tqai_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patched._tqai_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_index_fix()
