"""The paper's decoding claim on this machine: time per generated token and cache memory after 8k–64k tokens
of context, every method measured side by side in one run (:func:`oodlens.evaluate.decode_speed`).

Methods: vanilla with transformers' dynamic cache (the model's own attention), vanilla with a static cache
(so the comparison is not only about the dynamic cache's copying), LM-Infinite and StreamingLLM with their
bounded caches, Self-Extend (every key, through the engine). Each cache is filled to the context with random
keys and values (a decoding step's cost does not depend on them), so no prefill is paid. Interleaved:
every method at one context, then the next context; ``--repeats`` sweeps again and pools the steps.

Prints the table and the goals: LM-Infinite's time per token flat within 10 % from the shortest to the
longest context, at least 2.7× faster than vanilla at 32k (the paper's 2.72×), its cache constant.

    python benchmarks/decode_speed.py                          # SmolLM2, 8k–64k: about 10 minutes
    python benchmarks/decode_speed.py --model tiny:llama --contexts 256,512 --steps 2   # seconds
"""

from __future__ import annotations

import argparse

from oodlens.evaluate import decode_speed
from oodlens.models import load_model

METHODS = ("vanilla", "vanilla-static", "lm-infinite", "streaming-llm", "self-extend")
FLAT_WITHIN = 0.10
PAPER_SPEEDUP = 2.7


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/decode_speed.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--contexts", default="8192,16384,32768,65536", help="comma-separated context lengths"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=8, help="timed decoding steps per case")
    parser.add_argument("--repeats", type=int, default=2, help="sweeps over every case, interleaved")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device=args.device)
    contexts = [int(part) for part in args.contexts.split(",")]
    methods = args.methods.split(",")
    result = decode_speed(loaded.model, methods, contexts, steps=args.steps, repeats=args.repeats)
    frame = result.to_dataframe()
    print(frame.to_string(index=False, float_format=lambda value: f"{value:.2f}"))
    if "lm-infinite" not in methods or "vanilla" not in methods:
        return
    times = frame[frame["method"] == "lm-infinite"].set_index("context")["ms_per_token"]
    drift = times.max() / times.min() - 1
    print(
        f"\nLM-Infinite ms/token from {contexts[0]} to {contexts[-1]}: {times.min():.1f}–{times.max():.1f} "
        f"({100 * drift:.1f} % spread; goal ≤ {100 * FLAT_WITHIN:.0f} %: "
        f"{'met' if drift <= FLAT_WITHIN else 'not met'})"
    )
    for context in contexts:
        ratios = ", ".join(
            f"{reference} {result.ratio('lm-infinite', reference, context):.2f}×"
            for reference in ("vanilla", "vanilla-static")
            if reference in methods
        )
        print(f"at {context}: LM-Infinite faster than {ratios}")
    at = 32768 if 32768 in contexts else contexts[-1]
    speedup = result.ratio("lm-infinite", "vanilla", at)
    print(
        f"goal ≥ {PAPER_SPEEDUP}× vanilla at {at}: {speedup:.2f}× "
        f"({'met' if speedup >= PAPER_SPEEDUP else 'not met'})"
    )


if __name__ == "__main__":
    main()
