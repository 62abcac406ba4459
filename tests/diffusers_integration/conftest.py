"""A network guard for the diffusers tests: every socket connection fails.

The tiny pipelines (``tiny_video_models``) are built from configs and pass ``prompt_embeds``, so
nothing needs a model hub; a test that tried to reach one would error here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("the diffusers tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the tensors here are tiny, and on a busy 2-core machine the thread
    pool's wake-ups made each generation ~30x slower (measured: 1.5 s vs 0.05 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
