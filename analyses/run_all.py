"""Regenerate every figure and table of the paper on the embedded model.

Results come from the cache in figures/cache/ when present; with --recompute everything is computed again
(about 1 h 10 min on 2 CPU cores).

    python analyses/run_all.py            # SmolLM2 → figures/
    python analyses/run_all.py --quick    # tiny random model → figures/quick/ (seconds)

Extra arguments are passed to every script (e.g. ``--recompute``, ``--model PATH``).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCRIPTS = (
    "fig1_three_factors",
    "fig3_perplexity",
    "fig5_ablation",
    "table2_passkey",
    "table3_generation",
    "efficiency",
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for name in SCRIPTS:
        started = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(name).run(argv)
        print(f"=== {name}: {time.perf_counter() - started:.0f} s ===", flush=True)


if __name__ == "__main__":
    main()
