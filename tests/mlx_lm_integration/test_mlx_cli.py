"""``tqai run / compare / eval ppl --backend mlx`` on a tiny random-weight mlx-lm llama folder.

The folder is what ``mlx_lm.load`` reads: ``config.json`` (model_type llama, 2 layers, hidden 64,
4 heads, 2 KV heads, head dim 32), ``model.safetensors`` from a seeded ``mx.random`` init, and a
byte-level BPE tokenizer trained offline on a few sentences and saved with
``PreTrainedTokenizerFast.save_pretrained``. The commands are the ones tqai-torch registers on
``tqai.cli.app`` through the ``tqai.commands`` entry point; ``--backend mlx`` sends them to
:mod:`tqai_mlx.cli`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("tqai_torch.cli")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import base, llama  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import tqai.cli  # noqa: E402

pytestmark = pytest.mark.integration

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich wraps no cell
ORIGINAL_SDPA = base.scaled_dot_product_attention

SENTENCES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles and by opposing end them.",
    "The quick brown fox jumps over the lazy dog.",
    "All the world's a stage, and all the men and women merely players.",
]


@pytest.fixture(scope="module")
def app():
    """``tqai.cli.app`` with the backend commands added (and removed again afterwards)."""
    app = tqai.cli.app
    commands, groups = list(app.registered_commands), list(app.registered_groups)
    tqai.cli.add_backend_commands(app)
    yield app
    app.registered_commands[:], app.registered_groups[:] = commands, groups


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mlx-llama")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(SENTENCES * 8), encoding="utf-8")
    return path


def _rows(output: str) -> dict[str, list[str]]:
    """A rich table's body lines, keyed by their first cell."""
    rows = {}
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│ ").split("│")]
            rows.setdefault(cells[0], cells)
    return rows


def _invoke(app, *args: str):
    """``tqai ARGS --backend mlx``."""
    return runner.invoke(app, [*args, "--backend", "mlx"])


def test_run_streams_text_and_reports_speed(app, tiny_folder: Path):
    result = _invoke(
        app, "run", "To be, or not", "--model", str(tiny_folder), "--max-new-tokens", "12"
    )

    assert result.exit_code == 0, result.output
    stats = re.search(r"\[(\d+) tokens, ([\d.]+) tokens/s, KV cache ([\d.]+) KiB\]", result.output)
    assert stats is not None, result.output
    assert int(stats[1]) > 0
    assert float(stats[2]) > 0
    assert float(stats[3]) > 0
    assert result.output[: stats.start()].strip()  # some generated text came before it
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA  # unpatched afterwards


def test_run_without_tqai_counts_the_tokens_held(app, tiny_folder: Path):
    result = _invoke(
        app, "run", "To be", "--model", str(tiny_folder), "--max-new-tokens", "6", "--no-tqai"
    )

    assert result.exit_code == 0, result.output
    kib = float(re.search(r"KV cache ([\d.]+) KiB", result.output)[1])
    # float32 K and V of 2 layers x 2 heads x 32 dims: exactly 1 KiB a token, no preallocation
    assert kib == int(kib) > 0


def test_compare_prints_the_table(app, tiny_folder: Path):
    result = _invoke(
        app, "compare", "To be, or not", "--model", str(tiny_folder),
        "--bits-k", "8", "--bits-v", "8", "--max-new-tokens", "8",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert "baseline vs tqai K8/V8" in result.output
    assert {"text", "tokens/s", "KV bytes", "first divergent token"} <= set(rows)
    base_kv = int(rows["KV bytes"][1].replace(",", ""))
    assert base_kv > 0
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA


def test_eval_ppl_k8v8_matches_the_baseline(app, tiny_folder: Path, text_file: Path):
    result = _invoke(
        app, "eval", "ppl", "K8/V8", "K4/V2", "--model", str(tiny_folder),
        "--text", str(text_file), "--context", "64", "--windows", "2", "--chunk", "16",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert {"baseline", "K8/V8", "K4/V2"} <= set(rows), result.output
    base_ppl, k8_ppl = float(rows["baseline"][1]), float(rows["K8/V8"][1])
    assert base_ppl > 1
    assert abs(k8_ppl / base_ppl - 1) < 0.01
    # bits per coordinate of what the cache holds: at a 64-token context its full-precision
    # sinks and window and the history's spare capacity (>= 128 tokens, a multiple of 16)
    # weigh as much as the codes (K4/V2 ~10.8 bits, K8/V8 ~23, fp16 32)
    k4, k8, base_bits = (float(rows[name][3]) for name in ("K4/V2", "K8/V8", "baseline"))
    assert k4 < k8 < base_bits
    assert k4 < base_bits / 2.5
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA


def test_perplexity_function_matches_a_plain_forward_for_the_baseline(tiny_folder: Path):
    """The chunked cache evaluation equals one forward pass when the cache is exact."""
    import tqai_mlx.cli as mlx_cli

    model, _ = mlx_cli.load(tiny_folder)
    ids = list(range(3, 3 + 48))
    got = mlx_cli.perplexity(model, ids, "baseline", context=48, chunk=7)
    logits = model(mx.array(ids)[None])[0, 23:-1].astype(mx.float32)
    target = mx.array(ids[24:])
    nll = (mx.logsumexp(logits, axis=-1) - logits[mx.arange(24), target]).sum().item()
    assert got["tokens"] == 24
    assert got["nll"] == pytest.approx(nll, rel=1e-4)


def test_bad_model_is_a_usage_error(app, tmp_path: Path):
    result = runner.invoke(app, ["run", "hi", "--backend", "mlx", "--model", str(tmp_path)])

    assert result.exit_code == 2
    assert "config.json" in result.output

    result = runner.invoke(app, ["run", "hi", "--backend", "mlx", "--model", "no-such-model"])
    assert result.exit_code == 2
    assert "not a local folder" in result.output


def test_missing_tqai_mlx_is_a_usage_error(app, monkeypatch: pytest.MonkeyPatch, tiny_folder):
    import sys

    monkeypatch.setitem(sys.modules, "tqai_mlx.cli", None)  # import fails as if not installed
    result = runner.invoke(app, ["run", "hi", "--backend", "mlx", "--model", str(tiny_folder)])

    assert result.exit_code == 2
    assert "tqai-mlx" in result.output


def test_convert_writes_a_folder_mlx_patch_starts_from(app, tiny_folder: Path, tmp_path: Path):
    import numpy as np

    import tqai_mlx
    import tqai_mlx.cli as mlx_cli
    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    fisher = FisherCalibration(k=np.ones((2, 2)), v=np.ones((2, 2))).save(tmp_path / "f.json")
    out = tmp_path / "converted"
    pipeline = '{"monitor": "stability", "skip_layers": [0]}'
    result = _invoke(
        app, "convert", "--model", str(tiny_folder), "--output", str(out), "--bits-k", "3",
        "--residual-window", "0", "--calibration", str(fisher), "--pipeline", pipeline,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2/2 layers compressed" in result.output
    assert "calibration: tqai_calibration.json (2 layers x 2 K/V heads)" in result.output
    doc = json.loads((out / "tqai_config.json").read_text())
    assert doc["backend"] == "mlx"
    assert doc["options"]["pipeline"] == json.loads(pipeline)
    model, _ = mlx_cli.load(tiny_folder)
    ids = mx.array([[5, 9, 17, 30, 41, 7, 12, 3, 60, 22]])
    want = np.array(
        model(ids, cache=tqai_mlx.patch(model, bits_k=3, pipeline=json.loads(pipeline)))
    )
    tqai_mlx.unpatch(model)
    got = np.array(model(ids, cache=tqai_mlx.patch(model, from_pretrained=out)))
    tqai_mlx.unpatch(model)
    assert np.array_equal(got, want)


def test_convert_refuses_what_the_mlx_backend_cannot_store(app, tiny_folder: Path, tmp_path):
    import numpy as np

    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    out = tmp_path / "converted"
    result = _invoke(
        app, "convert", "--model", str(tiny_folder), "--output", str(out), "--calibrate"
    )
    assert result.exit_code == 2
    assert "with --backend mlx run `tqai calibrate" in " ".join(result.output.split())
    assert not out.exists()
    ones = np.ones((2, 2)).tolist()
    meta = {"k_energy": ones, "v_energy": ones}
    fisher = FisherCalibration(k=np.ones((2, 2)), v=np.ones((2, 2)), meta=meta)
    fisher.save(tmp_path / "f.json")
    result = _invoke(
        app, "convert", "--model", str(tiny_folder), "--output", str(out),
        "--calibration", str(tmp_path / "f.json"), "--fisher-layer-bits",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "tqai_config.json").read_text())
    assert len(doc["options"]["layer_bits"]) == 2


@pytest.mark.slow
def test_run_on_the_real_smollm2_folder(app):
    models = pytest.importorskip("tqai_torch.models")
    try:
        models.local_model_dir("smollm2-135m")  # resolved again by name in the command
    except Exception as ex:  # no network and nothing cached: nothing to test against
        pytest.skip(f"SmolLM2 folder not available: {ex}")
    result = _invoke(
        app, "run", "What is the capital of France?", "--model", "smollm2-135m",
        "--max-new-tokens", "8",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s, KV cache [\d.]+ KiB\]", result.output)
    print(result.output)
