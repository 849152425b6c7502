"""The paper's decoding claim on this machine: time per generated token and cache memory after 8k–64k tokens
of context, every method measured side by side in one run (:func:`oodlens.evaluate.decode_speed`).

Methods: vanilla (the model's own attention), LM-Infinite and StreamingLLM with their bounded caches,
Self-Extend (every key, through the engine). Modes: ``eager`` as the evaluations decode (vanilla and
Self-Extend with transformers' dynamic cache), and ``static`` with preallocated caches written in place
(vanilla: transformers' ``StaticCache``; the bounded methods: oodlens' static bounded cache), each step a
replayed CUDA graph on a GPU; Self-Extend has no static cache. Each cache is filled to the context with random
keys and values (a decoding step's cost does not depend on them), so no prefill is paid. Interleaved: every
method and mode at one context, then the next context; ``--repeats`` sweeps again and pools the steps.

Prints the table and the goals: LM-Infinite's time per token flat within 10 % from the shortest to the
longest context (static mode when it ran), at least 2.7× faster than vanilla at 32k (the paper's 2.72×, in the
first mode asked for, eager by default), its cache constant.

    python benchmarks/decode_speed.py                          # SmolLM2, 8k–64k: about 10 minutes
    python benchmarks/decode_speed.py --model tiny:llama --contexts 256,512 --steps 2   # seconds
"""

from __future__ import annotations

import argparse

from oodlens.evaluate import decode_speed
from oodlens.models import load_model

METHODS = ("vanilla", "lm-infinite", "streaming-llm", "self-extend")
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
    parser.add_argument("--modes", default="eager,static", help="eager and/or static")
    parser.add_argument("--steps", type=int, default=8, help="timed decoding steps per case")
    parser.add_argument("--repeats", type=int, default=2, help="sweeps over every case, interleaved")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device=args.device)
    contexts = [int(part) for part in args.contexts.split(",")]
    methods, modes = args.methods.split(","), args.modes.split(",")
    result = decode_speed(
        loaded.model, methods, contexts, modes=modes, steps=args.steps, repeats=args.repeats
    )
    frame = result.to_dataframe()
    print(frame.to_string(index=False, float_format=lambda value: f"{value:.2f}"))
    if "lm-infinite" not in methods or "vanilla" not in methods:
        return
    flat_mode = "static" if "static" in modes else modes[0]
    chosen = frame[(frame["method"] == "lm-infinite") & (frame["mode"] == flat_mode)]
    times = chosen.set_index("context")["ms_per_token"]
    drift = times.max() / times.min() - 1
    print(
        f"\nLM-Infinite ({flat_mode}) ms/token from {contexts[0]} to {contexts[-1]}: "
        f"{times.min():.1f}–{times.max():.1f} ({100 * drift:.1f} % spread; goal ≤ {100 * FLAT_WITHIN:.0f} %: "
        f"{'met' if drift <= FLAT_WITHIN else 'not met'})"
    )
    for context in contexts:
        ratios = ", ".join(
            f"vanilla {mode} {result.ratio('lm-infinite', 'vanilla', context, mode):.2f}×" for mode in modes
        )
        print(f"at {context}: LM-Infinite faster than {ratios} (each in the same mode)")
    at = 32768 if 32768 in contexts else contexts[-1]
    speedup = result.ratio("lm-infinite", "vanilla", at, modes[0])
    print(
        f"goal ≥ {PAPER_SPEEDUP}× vanilla at {at} ({modes[0]}): {speedup:.2f}× "
        f"({'met' if speedup >= PAPER_SPEEDUP else 'not met'})"
    )

if __name__ == "__main__":
    main()
