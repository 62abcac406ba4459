"""``tqai run`` / ``compare`` / ``eval ppl`` (torch backend) on a tiny local model folder.

The folder holds a random-weight LlamaForCausalLM (save_pretrained) and a byte-level BPE tokenizer
trained here on a few sentences, so nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from typer.testing import CliRunner

import tqai.cli

pytestmark = pytest.mark.integration

runner = CliRunner(env={"COLUMNS": "200"})
SENTENCES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles and by opposing end them.",
    "All the world's a stage, and all the men and women merely players.",
]


@pytest.fixture(scope="module")
def app():
    app = tqai.cli.app
    commands, groups = list(app.registered_commands), list(app.registered_groups)
    tqai.cli.add_backend_commands(app)
    yield app
    app.registered_commands[:], app.registered_groups[:] = commands, groups


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-hf-llama")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_run_generates_and_reports(app, tiny_folder: Path):
    result = runner.invoke(
        app, ["run", "To be, or not", "--model", str(tiny_folder), "--max-new-tokens", "10"]
    )
    assert result.exit_code == 0, result.output
    stats = re.search(r"\[(\d+) tokens, ([\d.]+) tokens/s, KV cache ([\d.]+) KiB\]", result.output)
    assert stats is not None, result.output
    assert int(stats[1]) > 0


def test_compare_prints_the_table(app, tiny_folder: Path):
    result = runner.invoke(
        app,
        ["compare", "To be", "--model", str(tiny_folder), "--bits-k", "8", "--bits-v", "8",
         "--max-new-tokens", "8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for row in ("text", "tokens/s", "KV bytes", "first divergent token"):
        assert row in result.output


def test_eval_ppl_eight_bits_matches_baseline(app, tiny_folder: Path, tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 10), encoding="utf-8")
    result = runner.invoke(
        app,
        ["eval", "ppl", "K8/V8", "K4/V2", "--model", str(tiny_folder), "--text", str(text),
         "--context", "64", "--windows", "2", "--chunk", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ppl = {
        m[1]: float(m[2])
        for m in re.finditer(r"│\s*(baseline|K8/V8|K4/V2)\s*│\s*([\d.]+)", result.output)
    }
    assert set(ppl) == {"baseline", "K8/V8", "K4/V2"}, result.output
    assert abs(ppl["K8/V8"] / ppl["baseline"] - 1) < 0.01


def test_bad_options_are_usage_errors(app, tiny_folder: Path):
    result = runner.invoke(app, ["run", "x", "--model", str(tiny_folder), "--bits-k", "9"])
    assert result.exit_code == 2
    assert "1..8" in result.output
    result = runner.invoke(app, ["run", "x", "--model", "/no/such/folder"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["eval", "ppl", "K9/X", "--model", str(tiny_folder)])
    assert result.exit_code == 2


def test_run_with_a_named_config_compresses_activations(app, tiny_folder: Path, monkeypatch):
    import tqai_torch.patching

    applied = []
    original = tqai_torch.patching.apply_activation_compression
    monkeypatch.setattr(
        tqai_torch.patching,
        "apply_activation_compression",
        lambda model, config: applied.append(config) or original(model, config),
    )
    result = runner.invoke(
        app,
        ["run", "To be", "--model", str(tiny_folder), "--config", "aggressive",
         "--max-new-tokens", "6"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [(c.hidden_bits, c.ffn_bits) for c in applied] == [(6, 6)]


def test_named_config_usage_errors(app, tiny_folder: Path):
    result = runner.invoke(app, ["run", "x", "--model", str(tiny_folder), "--config", "all4"])
    assert result.exit_code == 2
    assert "kv+hidden8" in result.output
    result = runner.invoke(
        app, ["run", "x", "--model", str(tiny_folder), "--config", "aggressive", "--bits-k", "4"]
    )
    assert result.exit_code == 2
    assert "contradicts" in result.output


def test_eval_ppl_accepts_named_configs(app, tiny_folder: Path, tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 10), encoding="utf-8")
    result = runner.invoke(
        app,
        ["eval", "ppl", "kv-only", "all8", "--model", str(tiny_folder), "--text", str(text),
         "--context", "64", "--windows", "1", "--chunk", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = re.findall(r"│\s*(baseline|kv-only|all8)\s*│\s*([\d.]+)", result.output)
    assert [r[0] for r in rows] == ["baseline", "kv-only", "all8"], result.output


def test_convert_writes_a_folder_patch_can_start_from(app, tiny_folder: Path, tmp_path: Path):
    import json

    import tqai_torch

    out = tmp_path / "converted"
    result = runner.invoke(
        app, ["convert", "--model", str(tiny_folder), "--output", str(out), "--config", "all8"]
    )
    assert result.exit_code == 0, result.output
    assert "2/2 layers compressed" in result.output
    doc = json.loads((out / "tqai_config.json").read_text())
    assert doc["options"]["config"] == "all8"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder)
    cache = tqai_torch.patch(model, from_pretrained=out)
    assert cache.tqai_config.bits_k == 4
    tqai_torch.unpatch(model)
    result = runner.invoke(app, ["convert", "--model", str(tiny_folder)])
    assert result.exit_code == 2  # --output is required


def test_convert_calibrates_on_the_shipped_text_and_stores_fisher_widths(
    app, tiny_folder: Path, tmp_path: Path
):
    import json

    import tqai_torch
    from tqai.layer_bits import fisher_layer_bits
    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    out = tmp_path / "converted"
    result = runner.invoke(
        app,
        ["convert", "--model", str(tiny_folder), "--output", str(out), "--calibrate",
         "--calibration-samples", "2", "--calibration-tokens", "24", "--fisher-layer-bits",
         "--bits-k", "4", "--bits-v", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "calibration: tqai_calibration.json (2 layers x 2 K/V heads)" in result.output
    doc = json.loads((out / "tqai_config.json").read_text())
    cal = FisherCalibration.load(out / "tqai_calibration.json")
    assert cal.meta["prompts"] == 2
    assert cal.meta["max_tokens"] == 24
    pairs = fisher_layer_bits(cal, 4, 2)
    assert doc["options"]["layer_bits"] == [list(p) for p in pairs]
    assert f"per-layer K/V bits: {' '.join(f'{k}/{v}' for k, v in pairs)}" in result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert tqai_torch.patch(model, from_pretrained=out).layer_bits == pairs
    tqai_torch.unpatch(model)

    again = tmp_path / "from-file"
    result = runner.invoke(
        app,
        ["convert", "--model", str(tiny_folder), "--output", str(again), "--calibration",
         str(out / "tqai_calibration.json"), "--fisher-layer-bits", "--config", "aggressive"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((again / "tqai_config.json").read_text())
    assert doc["options"]["layer_bits"] == [list(p) for p in fisher_layer_bits(cal, 3, 2)]


def test_convert_stores_a_pipeline_given_inline_or_as_a_file(
    app, tiny_folder: Path, tmp_path: Path
):
    import json

    pipeline = {"monitor": "stability", "skip_layers": [1]}
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(pipeline))
    for value in (json.dumps(pipeline), str(path)):
        out = tmp_path / "converted"
        result = runner.invoke(
            app,
            ["convert", "--model", str(tiny_folder), "--output", str(out), "--pipeline", value],
        )
        assert result.exit_code == 0, result.output
        doc = json.loads((out / "tqai_config.json").read_text())
        assert doc["options"]["pipeline"] == pipeline


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fisher-layer-bits"], "needs a calibration: --calibration FILE or --calibrate"),
        (["--calibrate", "--calibration", "{fisher}"], "--calibration FILE or --calibrate, not"),
        (["--calibration", "{fisher}"], "calibration has 3 layers x 1 K/V heads, the model 2 x 2"),
        (["--pipeline", "[1, 2]"], "must be a JSON object, got list"),
        (["--pipeline", "no-such.json"], "not a JSON object and not a readable file"),
        (["--pipeline", '{"monitor": "nope"}'], "is not a tqai.monitors plugin"),
        (["--pipeline", '{"monitor": "stability"}', "--fisher-layer-bits", "--calibrate"],
         "layer_bits cannot be combined with pipeline="),
    ],
)  # fmt: skip
def test_convert_refuses_bad_calibration_and_pipeline_options(
    app, tiny_folder: Path, tmp_path: Path, args: list[str], message: str
):
    import numpy as np

    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    fisher = FisherCalibration(k=np.ones((3, 1)), v=np.ones((3, 1))).save(tmp_path / "f.json")
    args = [a.replace("{fisher}", str(fisher)) for a in args]
    out = tmp_path / "converted"
    result = runner.invoke(
        app,
        ["convert", "--model", str(tiny_folder), "--output", str(out), "--calibration-tokens",
         "8", "--calibration-samples", "1", *args],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()
