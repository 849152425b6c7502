"""What capturing the three OOD factors costs, against a plain SDPA forward of the same window.

Each case runs in its own subprocess so that peak memory (the process's peak RSS) of one does not leak into
the other. Both load SmolLM2-135M and one window of the python-docs corpus; "plain" runs the model's own
SDPA attention with ``logits_to_keep=1``; "capture" runs :func:`oodlens.capture.diagnose` with the default
configuration (all layers: logits by distance for ~256 sampled queries, entropy and sink mass for every
query; hidden states of layers 1, 2, 5, 10 and 29; the position probe).

Usage::

    python benchmarks/capture_cost.py                 # 16,384 tokens (plain forward: ~140 s on 2 cores)
    python benchmarks/capture_cost.py --length 4096   # a quick try
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = ("plain", "capture")
BYTES_PER_FLOAT32 = 4


def run_case(case: str, length: int, save: str | None = None) -> dict[str, float]:
    """Load the model and one window, run ``case`` once; seconds and bytes of the forward (or capture).

    With ``save``, the capture's diagnosis is written there (after the timing).
    """
    import torch

    from oodlens import kernel
    from oodlens.capture import diagnose
    from oodlens.data import load_corpus, token_windows
    from oodlens.memory import resident_gib
    from oodlens.models import load_model

    loaded = load_model("smollm2", device="cpu")
    ids = token_windows(load_corpus(), loaded.tokenizer, length, n_windows=1)
    kernel.compiled()  # built (or found in torch's extension cache) before the clock starts, like the model
    rss_loaded = resident_gib()[0] * 2**30
    start = time.perf_counter()
    if case == "plain":
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    else:
        diagnosis = diagnose(loaded.model, ids, name="smollm2")
    seconds = time.perf_counter() - start
    peak = resident_gib()[1] * 2**30  # the process's lifetime peak: no reset, loading included
    if case == "capture" and save:
        diagnosis.save(save)
    info = loaded.info
    return {
        "case": case,
        "seconds": seconds,
        "peak_rss": peak,
        "rss_after_load": rss_loaded,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "threads": torch.get_num_threads(),
    }


def _child(case: str, length: int, save: str | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--case", case, "--length", str(length)]
    if save:
        command += ["--save", save]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def report(length: int, save: str | None) -> None:
    """Run both cases in subprocesses and print them side by side with ratios."""
    results = {case: _child(case, length, save) for case in CASES}
    plain, captured = results["plain"], results["capture"]
    print(f"SmolLM2-135M, {length} tokens of python-docs, {plain['threads']} CPU threads")
    print(f"{'':18}{'plain SDPA':>14}{'capture':>14}{'ratio':>8}")
    print(
        f"{'time':18}{plain['seconds']:>13.1f}s{captured['seconds']:>13.1f}s"
        f"{captured['seconds'] / plain['seconds']:>8.2f}"
    )
    print(
        f"{'peak RSS':18}{_gib(plain['peak_rss']):>14}{_gib(captured['peak_rss']):>14}"
        f"{captured['peak_rss'] / plain['peak_rss']:>8.2f}"
    )
    print(f"{'RSS after load':18}{_gib(plain['rss_after_load']):>14}{_gib(captured['rss_after_load']):>14}")
    dense = plain["n_layers"] * plain["n_heads"] * length**2 * BYTES_PER_FLOAT32
    print(
        f"output_attentions=True would hold {plain['n_layers']} layers × {plain['n_heads']} heads × "
        f"{length}² × 4 bytes = {dense / 1e9:.0f} GB of attention weights"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384, help="tokens in the window")
    parser.add_argument(
        "--case", choices=CASES, help="run one case in this process and print JSON (internal)"
    )
    parser.add_argument("--save", help="also write the capture's Diagnosis to this folder")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.length, args.save)))
    else:
        report(args.length, args.save)


if __name__ == "__main__":
    main()
