"""Offline Fisher calibration (``calibrate_fisher``, ``tqai calibrate``) on tiny and real models.

The tiny model is a random-weight ``LlamaForCausalLM`` built from a config (2 layers, 4 query
heads sharing 2 K/V heads), so nothing is downloaded. The defining property is checked by
making the model itself insensitive to one head: scaling down the ``o_proj`` columns that read a
K/V head's values shrinks ``dL/dV`` of that head (a value's gradient is its consumer's weight
times the upstream gradient), and scaling down the query rows of a K/V head's group makes its
attention nearly uniform, which shrinks ``dL/dK``. Note that scaling ``v_proj`` itself would not
do: the gradient with respect to a value does not depend on the value's own scale.
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tqai.pipeline.scorers.fisher_static import (  # noqa: E402
    FORMAT,
    FisherCalibration,
    FisherStaticScorer,
)
from tqai_torch.calibrate import calibrate_fisher, register  # noqa: E402

LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 2, 4, 2, 64, 128
HEAD_DIM = HIDDEN // HEADS
GROUP = HEADS // KV_HEADS


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger random weights than the 0.02 init, so gradients are not tiny
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model


def fake_prompts(n: int = 3, length: int = 24) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (length,), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory) -> tuple[FisherCalibration, object]:
    path = tmp_path_factory.mktemp("fisher") / "fisher.json"
    return calibrate_fisher(model, None, fake_prompts(), path, max_tokens=512), path


def test_writes_a_file_fisher_static_loads(baseline) -> None:
    cal, path = baseline
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT
    assert data["version"] == 1
    assert (data["num_layers"], data["num_kv_heads"]) == (LAYERS, KV_HEADS)
    loaded = FisherCalibration.load(path)
    assert FisherCalibration.from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()
    np.testing.assert_array_equal(loaded.k, cal.k)
    np.testing.assert_array_equal(loaded.v, cal.v)
    assert loaded.meta["prompts"] == 3
    assert loaded.meta["tokens"] == 72
    for w in (loaded.k, loaded.v):
        assert w.shape == (LAYERS, KV_HEADS)
        assert np.all(np.isfinite(w))
        assert np.all(w > 0)
    scorer = FisherStaticScorer(path)
    x = np.ones((1, KV_HEADS, 5, HEAD_DIM))
    for layer in range(LAYERS):
        for stream in ("k", "v"):
            s = scorer.score(x, layer=layer, stream=stream)
            assert s.shape == (1, KV_HEADS, 5)
            assert np.all(s > 0)


def _reference_by_projection_hooks(model, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: squared gradients at the k_proj / v_proj outputs (pre-RoPE)."""
    outs: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for name in ("k", "v"):

            def hook(_m, _a, out, key=(name, i)):
                out.retain_grad()
                outs[key] = out

            handles.append(getattr(layer.self_attn, f"{name}_proj").register_forward_hook(hook))
    sums = {key: np.zeros(KV_HEADS) for key in [("k", i) for i in range(LAYERS)]}
    sums.update({("v", i): np.zeros(KV_HEADS) for i in range(LAYERS)})
    count = 0
    try:
        for ids in prompts:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids[None]).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").backward()
            for key, out in outs.items():
                g = out.grad[0].view(len(ids), KV_HEADS, HEAD_DIM).double()
                sums[key] += g.pow(2).sum(dim=(0, 2)).numpy()
            count += len(ids) * HEAD_DIM
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    k = np.stack([sums[("k", i)] for i in range(LAYERS)]) / count
    v = np.stack([sums[("v", i)] for i in range(LAYERS)]) / count
    return k, v


def test_matches_projection_hooks_reference(model, baseline) -> None:
    # RoPE rotates each key pair orthogonally, so per-head squared gradient norms are equal
    # before (k_proj output) and after (the tensor passed to the cache) it.
    cal, _ = baseline
    k, v = _reference_by_projection_hooks(model, fake_prompts())
    np.testing.assert_allclose(cal.k, k, rtol=1e-4)
    np.testing.assert_allclose(cal.v, v, rtol=1e-4)


def test_head_the_model_ignores_gets_lower_weight() -> None:
    layer, head, other = 1, 0, 1
    prompts = fake_prompts()
    base = calibrate_fisher(tiny_llama(), None, prompts, None)

    damped_v = tiny_llama()
    attn = damped_v.model.layers[layer].self_attn
    cols = slice(head * GROUP * HEAD_DIM, (head + 1) * GROUP * HEAD_DIM)  # its query heads' outputs
    with torch.no_grad():
        attn.o_proj.weight[:, cols] *= 0.01
    cal_v = calibrate_fisher(damped_v, None, prompts, None)
    assert cal_v.v[layer, head] < 0.01 * cal_v.v[layer, other]
    assert cal_v.v[layer, head] < 0.01 * base.v[layer, head]
    assert base.v[layer, head] > 0.1 * base.v[layer, other]  # it was not low to begin with

    damped_k = tiny_llama()
    attn = damped_k.model.layers[layer].self_attn
    with torch.no_grad():
        attn.q_proj.weight[cols, :] *= 0.01  # the queries that read K/V head `head`
    cal_k = calibrate_fisher(damped_k, None, prompts, None)
    assert cal_k.k[layer, head] < 0.01 * cal_k.k[layer, other]
    assert cal_k.k[layer, head] < 0.01 * base.k[layer, head]
    assert base.k[layer, head] > 0.1 * base.k[layer, other]

    # The scorer turns this into a lower score for the damped head's tokens.
    s = FisherStaticScorer(calibration=cal_v).score(np.ones((KV_HEADS, 3, 8)), layer=1, stream="v")
    assert s[head].max() < s[other].min()


class _FakeTokenizer:
    """Maps each character to an id (no download)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor([ord(c) % VOCAB for c in text])
        return SimpleNamespace(input_ids=ids[None])


def test_string_prompts_tokenizer_truncation_and_frozen_params(model) -> None:
    texts = ["To be, or not to be, that is the question", "Now is the winter of our discontent"]
    tok = _FakeTokenizer()
    ids = [tok(t).input_ids for t in texts]  # (1, T) tensors are accepted too
    from_text = calibrate_fisher(model, tok, texts, None, max_tokens=16)
    from_ids = calibrate_fisher(model, None, [i[0, :16] for i in ids], None)
    np.testing.assert_allclose(from_text.k, from_ids.k, rtol=1e-6)
    np.testing.assert_allclose(from_text.v, from_ids.v, rtol=1e-6)
    assert from_text.meta["tokens"] == 32

    frozen = tiny_llama().requires_grad_(False)
    frozen.train()
    cal = calibrate_fisher(frozen, None, [i[0, :16] for i in ids], None)
    assert frozen.training  # mode restored
    assert all(p.grad is None for p in frozen.parameters())
    np.testing.assert_allclose(cal.k, from_ids.k, rtol=1e-6)
    np.testing.assert_allclose(cal.v, from_ids.v, rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients kept


def test_rejects_bad_prompts(model) -> None:
    with pytest.raises(ValueError, match="no prompt"):
        calibrate_fisher(model, None, [torch.tensor([3])], None)
    with pytest.raises(ValueError, match="need a tokenizer"):
        calibrate_fisher(model, None, ["text"], None)
    with pytest.raises(ValueError, match="integers"):
        calibrate_fisher(model, None, [torch.rand(8)], None)


class _CountingTokenizer:
    """Token ids 0, 1, 2, ... one per character: positions in the text are the ids."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return SimpleNamespace(input_ids=torch.arange(len(text))[None])


def test_shakespeare_windows_can_skip_the_scored_text() -> None:
    from tqai_torch.calibrate import shakespeare_windows

    tok = _CountingTokenizer()
    windows = shakespeare_windows(tok, samples=4, tokens=64, skip_tokens=10_000)
    assert len(windows) == 4
    assert min(int(w[0]) for w in windows) == 10_000
    assert all(len(w) == 64 for w in windows)
    assert int(shakespeare_windows(tok, samples=4, tokens=64)[0][0]) == 0
    with pytest.raises(ValueError, match="skip_tokens must be >= 0"):
        shakespeare_windows(tok, skip_tokens=-1)
    with pytest.raises(ValueError, match="leaves nothing"):
        shakespeare_windows(tok, skip_tokens=10**9)


def test_cli_on_a_tiny_local_folder(tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    import typer
    from typer.testing import CliRunner

    text = "to be or not to be that is the question\n\nnow is the winter of our\n"
    words = sorted(set(text.split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    fast.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root, so that ``calibrate`` stays a subcommand."""

    register(app)
    out = tmp_path / "cal.json"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        ["calibrate", "--model", str(folder), "--output", str(out), "--prompts", str(prompts)],
    )
    assert result.exit_code == 0, result.output
    cal = FisherCalibration.load(out)
    assert (cal.num_layers, cal.num_kv_heads) == (LAYERS, KV_HEADS)
    assert cal.meta["prompts"] == 2
    assert cal.model == str(folder)
    assert "K mean" in result.output
    assert "V mean" in result.output
    both = ["--prompts", str(prompts), "--plays", "twelfth_night"]
    result = CliRunner().invoke(app, ["calibrate", "--output", str(out), *both])
    assert result.exit_code != 0
    assert "--prompts or --plays" in result.output
    refused = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        [
            "calibrate",
            "--model",
            str(folder),
            "--output",
            str(out),
            "--prompts",
            str(prompts),
            "--skip-tokens",
            "5",
        ],
    )
    assert refused.exit_code != 0
    assert "skip-tokens" in refused.output


@pytest.mark.slow
@pytest.mark.integration
def test_real_smollm2(tmp_path) -> None:
    pytest.importorskip("gguf")
    from tqai_torch.calibrate import shakespeare_windows
    from tqai_torch.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    prompts = shakespeare_windows(tokenizer, samples=2, tokens=128)
    assert [len(p) for p in prompts] == [128, 128]
    seconds: list[float] = []
    start = time.perf_counter()
    cal = calibrate_fisher(
        model,
        tokenizer,
        prompts,
        tmp_path / "smollm2.json",
        on_sample=lambda i, info: seconds.append(info["seconds"]),
    )
    elapsed = time.perf_counter() - start
    loaded = FisherCalibration.load(tmp_path / "smollm2.json")
    assert (loaded.num_layers, loaded.num_kv_heads) == (30, 3)
    assert np.all(np.isfinite(loaded.k))
    assert np.all(loaded.k > 0)
    assert np.all(loaded.v > 0)
    assert math.isfinite(loaded.meta["mean_nll"])
    assert loaded.meta["mean_nll"] < 6
    FisherStaticScorer(tmp_path / "smollm2.json")
    print(
        f"\nSmolLM2 calibration: {elapsed:.2f} s total, per sample {seconds}, "
        f"nll {loaded.meta['mean_nll']:.3f}"
    )
    print("K per layer:", np.round(cal.k.mean(1) / cal.k.mean(), 3).tolist())
    print("V per layer:", np.round(cal.v.mean(1) / cal.v.mean(), 3).tolist())
