"""The fidelity options through a transformers model: centering, split widths, balancing,
per-layer widths; save/load keeps them; bad settings fail at patch time."""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai_torch
from tqai_torch.cache import TqaiCache

OPTIONS = {
    "center_keys": True,
    "center_values": True,
    "balance_keys": True,
    "bits_k": 3.5,
    "bits_v": 2.5,
    "residual_window": 3,
}


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(0))


def test_options_run_save_and_load_exactly(tmp_path):
    model = build("llama")
    ids = _ids(24)
    cache = tqai_torch.patch(model, **OPTIONS, layer_bits={0: (8, 4)})
    with torch.no_grad():
        model(ids[:, :20], **cache_kw(cache))
        first, second = cache.layers[0], cache.layers[1]
        assert (first.config.bits_k, first.config.bits_v) == (8, 4)
        assert (second.config.bits_k, second.config.bits_v) == (3.5, 2.5)
        assert second.store.key_coding.scale is not None  # fitted from the prompt's queries
        assert len(second.store.key_parts) == 2  # the outlier split
        path = tmp_path / "prompt.tqai"
        cache.save(path)
        loaded = TqaiCache.load(path, model)
        a = model(ids[:, 20:], **cache_kw(cache)).logits
        b = model(ids[:, 20:], **cache_kw(loaded)).logits
    assert torch.equal(a, b)
    tqai_torch.patch(model, **OPTIONS)  # other layer widths: the file is refused
    with pytest.raises(ValueError, match="another tqai config"):
        TqaiCache.load(path, model)
    tqai_torch.unpatch(model)


def test_eight_bit_options_stay_close_to_the_uncompressed_model():
    model = build("llama")
    ids = _ids(30)
    with torch.no_grad():
        exact = model(ids).logits[:, -5:]
        cache = tqai_torch.patch(
            model, bits_k=7.5, bits_v=7.5, center_keys=True, center_values=True
        )
        model(ids[:, :25], **cache_kw(cache))
        coded = model(ids[:, 25:], **cache_kw(cache)).logits
    tqai_torch.unpatch(model)
    assert torch.allclose(coded, exact, atol=2e-2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bits_k": 4.01}, r"bits_k=4\.01 on head_dim"),
        ({"layer_bits": [(4, 2)]}, r"one .* pair per layer"),
        ({"layer_bits": {0: (4, 0)}}, "bits_v"),
        ({"balance_keys": True, "cache_strategy": "full"}, "balance_keys"),
        ({"layer_bits": {0: (4, 2)}, "pipeline": {"monitor": "stability"}}, "layer_bits"),
    ],
)
def test_bad_settings_fail_at_patch_time(options, match):
    model = build("llama")
    with pytest.raises(ValueError, match=match):
        tqai_torch.patch(model, **options)
