"""Why TurboQuant_prod (QJL) keys lose to TurboQuant_mse keys inside softmax attention.

Real queries and keys of SmolLM2-135M (one forward pass over Shakespeare, recorded by an
attention function registered in transformers' AttentionInterface). For each key quantizer at
the same total width, over every layer and KV head: the bias of the scores (slope of the least-
squares fit of coded scores on exact ones: TurboQuant_mse shrinks scores by a constant factor,
TurboQuant_prod is unbiased), their error's standard deviation relative to the spread of the
exact scores, and the relative error of the attention output with exact values (only the keys
are coded, causal softmax, last 256 queries). Softmax is convex in the scores: zero-mean score
noise of variance s^2 inflates each weight by about exp(s^2 / 2) and reshuffles the largest
weights, while a uniform shrink only acts as a slightly higher temperature. Writes
benchmarks/results/qjl.json rows {"quantizer", "bits", "score_slope", "score_noise",
"attention_error"}.

    python benchmarks/bench_qjl.py [--tokens 1024]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import machine, print_table, write_json
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tqai.assets import shakespeare_text
from tqai.attention import attention_reference
from tqai.quantizers import TurboQuantMSE, TurboQuantProd
from tqai_torch.models import load_model

RECORDED: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


def _record(module, query, key, value, attention_mask, **kwargs):
    RECORDED.append(tuple(t[0].float().numpy() for t in (query, key, value)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    ids = tokenizer(shakespeare_text(), return_tensors="pt", add_special_tokens=False).input_ids
    AttentionInterface.register("tqai_record", _record)
    model.set_attn_implementation("tqai_record")
    model(ids[:, : args.tokens])
    d = RECORDED[0][1].shape[-1]
    quantizers = {
        ("mse", 3): TurboQuantMSE(d, 3),
        ("prod", 3): TurboQuantProd(d, 3),
        ("mse", 4): TurboQuantMSE(d, 4),
        ("prod", 4): TurboQuantProd(d, 4),
    }
    n, t = args.queries, args.tokens
    mask = np.tril(np.ones((n, t), bool), t - n)[None, None]
    rows = []
    for (kind, bits), quantizer in quantizers.items():
        slopes, noise, errors = [], [], []
        for q, k, v in RECORDED:
            k_hat = quantizer.dequantize(quantizer.quantize(k))
            group = q.shape[0] // k.shape[0]
            for h in range(k.shape[0]):
                qh = q[h * group : (h + 1) * group, t - n :]
                exact = (qh @ k[h].T)[mask[0, 0][None].repeat(group, 0)]
                coded = (qh @ k_hat[h].T)[mask[0, 0][None].repeat(group, 0)]
                centered = exact - exact.mean()
                slope = float(centered @ (coded - coded.mean()) / (centered @ centered))
                slopes.append(slope)
                noise.append(float(np.std(coded - exact) / np.std(exact)))
            scale = d**-0.5
            ref = attention_reference(q[None, :, t - n :], k[None], v[None], scale=scale, mask=mask)
            out = attention_reference(
                q[None, :, t - n :], k_hat[None], v[None], scale=scale, mask=mask
            )
            errors.append(float(np.sum((out - ref) ** 2) / np.sum(ref**2)))
        rows.append(
            {
                "quantizer": f"TurboQuant_{kind}",
                "bits": bits,
                "score_slope": float(np.mean(slopes)),
                "score_noise": float(np.mean(noise)),
                "attention_error": float(np.mean(errors)),
            }
        )
    print_table(
        f"SmolLM2-135M keys coded, values exact: {len(RECORDED)} layers, {args.tokens} tokens, "
        f"last {n} queries",
        ["keys", "bits", "score slope", "score noise / spread", "attention output error"],
        [
            [
                r["quantizer"],
                r["bits"],
                f"{r['score_slope']:.4f}",
                f"{r['score_noise']:.4f}",
                f"{r['attention_error']:.5f}",
            ]
            for r in rows
        ],
    )
    write_json("qjl.json", {"machine": machine(), "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
