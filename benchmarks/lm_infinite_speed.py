"""Time and peak memory of one forward pass, vanilla against LM-Infinite, side by side in one run.

Each (method, length) case runs in its own subprocess so that peak RSS is measured per case. Prints a table
with the average time per token (total / n), the marginal time per token (the cost of the tokens added since
the previous length: flat for an O(n) method), and the ratios LM-Infinite / vanilla.

    python benchmarks/lm_infinite_speed.py                      # SmolLM2, 8k/16k/32k
    python benchmarks/lm_infinite_speed.py --lengths 131072 --methods lm-infinite   # the 128k run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run_case(model_name: str, method: str, length: int, threads: int | None) -> dict:
    """One forward of ``length`` corpus tokens under ``method``; returns seconds and peak RSS in GiB."""
    from oodlens.data import load_corpus, token_windows
    from oodlens.models import load_model
    from oodlens.policies import apply_policy, policy_by_name

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model_name)
    ids = token_windows(load_corpus("python-docs"), loaded.tokenizer, length, join_documents=True)
    policy = policy_by_name(method)
    with torch.no_grad(), apply_policy(loaded.model, policy, train_length=loaded.info.train_length):
        start = time.perf_counter()
        loaded.model(ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"method": method, "length": length, "seconds": seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--methods", default="vanilla,lm-infinite")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        method, length = args.case.split(":")
        print(json.dumps(run_case(args.model, method, int(length), args.threads)))
        return

    lengths = [int(n) for n in args.lengths.split(",")]
    methods = args.methods.split(",")
    results: dict[tuple[str, int], dict] = {}
    for length in lengths:
        for method in methods:
            command = [sys.executable, __file__, "--model", args.model, "--case", f"{method}:{length}"]
            if args.threads:
                command += ["--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[(method, length)] = json.loads(out)
            row = results[(method, length)]
            print(f"  {method:12s} {length:7d}: {row['seconds']:8.1f} s  {row['peak_gib']:.2f} GiB", flush=True)

    print(f"\n{'method':12s} {'length':>7s} {'seconds':>8s} {'ms/token':>9s} {'marginal':>9s} {'peak GiB':>8s}")
    for method in methods:
        previous = None
        for length in lengths:
            row = results[(method, length)]
            marginal = "" if previous is None else (
                f"{1000 * (row['seconds'] - previous['seconds']) / (length - previous['length']):9.2f}"
            )
            print(f"{method:12s} {length:7d} {row['seconds']:8.1f} {1000 * row['seconds'] / length:9.2f} "
                  f"{marginal:>9s} {row['peak_gib']:8.2f}")
            previous = row
    if len(methods) == 2:
        base, other = methods
        print(f"\nratios {other} / {base}:")
        for length in lengths:
            a, b = results[(base, length)], results[(other, length)]
            print(f"  {length:7d}: time {b['seconds'] / a['seconds']:.2f}x  peak memory {b['peak_gib'] / a['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
