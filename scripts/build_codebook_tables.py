"""Write packages/tqai-core/src/tqai/_tables/lloyd_max.json: shipped Lloyd-Max codebooks.

Solves the codebook of every shipped head dim (tqai.codebooks.SHIPPED_HEAD_DIMS) at 1..8 bits with
tqai.codebooks.solve_lloyd_max and stores the centroids (float64, repr-exact). Run after changing
the solver; tests/core/test_codebooks.py checks the shipped file against the solver.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqai.codebooks import MAX_BITS, SHIPPED_HEAD_DIMS, solve_lloyd_max

OUT = Path(__file__).resolve().parents[1] / "packages/tqai-core/src/tqai/_tables/lloyd_max.json"


def main() -> None:
    centroids = {
        f"{d}/{b}": [float(c) for c in solve_lloyd_max(d, b)]
        for d in SHIPPED_HEAD_DIMS
        for b in range(1, MAX_BITS + 1)
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {"solver": "tqai.codebooks.solve_lloyd_max", "format": 1, "centroids": centroids}
    OUT.write_text(json.dumps(doc, indent=0) + "\n")
    print(f"wrote {len(centroids)} codebooks to {OUT}")


if __name__ == "__main__":
    main()
