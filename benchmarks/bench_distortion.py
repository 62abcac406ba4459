"""TurboQuant distortion at d=128, b=1..4, every rotation: measured vs exact theory vs the paper.

Writes benchmarks/results/distortion.json as a list of rows
{"quantizer", "rotation", "d", "bits", "measured", "theory", "paper", "lower_bound"} and prints the
table, then checks the acceptance of the Foundation issue: mse within 2% of theory and no worse
than the Gaussian-limit Lloyd-Max values by more than 2%; prod within 7% of theory.

    python benchmarks/bench_distortion.py [--n-vectors 20000] [--d 128]
"""

from __future__ import annotations

import argparse
import sys

from _common import machine, print_table, write_json

from tqai.distortion import distortion_rows

GAUSSIAN_LIMIT_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def check(row: dict) -> str:
    rel = row["measured"] / row["theory"] - 1
    if row["quantizer"] == "mse":
        ok = abs(rel) <= 0.02 and row["measured"] <= GAUSSIAN_LIMIT_MSE[row["bits"]] * 1.02
    else:
        ok = abs(rel) <= 0.07
    return "ok" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-vectors", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    rows = distortion_rows(args.d, range(1, 5), ("haar", "hadamard", "rotor"), args.n_vectors)
    for row in rows:
        row["check"] = check(row)
    print_table(
        f"TurboQuant distortion, d={args.d}, {args.n_vectors} random unit vectors",
        ["quantizer", "rotation", "bits", "measured", "theory", "vs theory", "paper", "4^-b", ""],
        [
            [
                r["quantizer"],
                r["rotation"],
                r["bits"],
                r["measured"],
                r["theory"],
                f"{100 * (r['measured'] / r['theory'] - 1):+.2f}%",
                r["paper"],
                r["lower_bound"],
                r["check"],
            ]
            for r in rows
        ],
    )
    write_json(
        "distortion.json",
        {"machine": machine(), "n_vectors": args.n_vectors, "rows": rows},
    )
    failed = [r for r in rows if r["check"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows within the acceptance tolerances")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
