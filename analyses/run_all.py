"""Regenerate every figure and table of the paper on the embedded model.

Results come from the cache in figures/cache/ when present; with --recompute everything is computed again
(30 minutes from empty caches on 2 CPU cores, docs/results.md). Each script runs in its own process. The
figure scripts run ``--jobs`` at a time (default: 2 where there are at least 2 cores), one thread each: on 2
cores two 1-thread jobs get as much done as one 2-thread job at a time, or up to 14 % more, depending on
the machine, and keep both cores busy through each script's single-threaded stretches. The efficiency
benchmark, the method comparison and the million-token stream measure speed or memory, so they run last,
alone, on every core (from an empty cache the comparison adds about 2 hours, the stream about 3 h 20 min).

    python analyses/run_all.py            # SmolLM2 → figures/
    python analyses/run_all.py --jobs 1   # one script at a time
    python analyses/run_all.py --quick    # tiny random model → figures/quick/ (seconds)

Other arguments are passed to every script (e.g. ``--recompute``, ``--model PATH``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Longest first (on SmolLM2 from scratch), so that the last job to start is a short one.
FIGURE_SCRIPTS = (
    "fig3_perplexity",
    "table2_passkey",
    "fig5_ablation",
    "fig1_three_factors",
    "table3_generation",
)
TIMED_ALONE = ("efficiency", "compare_methods", "streaming_1m")  # time or memory: one by one, every core
SCRIPTS = (*FIGURE_SCRIPTS, *TIMED_ALONE)


def _run_script(name: str, argv: list[str], threads: int | None) -> tuple[str, float, int, str]:
    """Run ``analyses/<name>.py`` in a child process; its name, seconds, exit status and output."""
    paths = [str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in paths if path))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads for this job
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / f"{name}.py"), *argv], env=env, capture_output=True, text=True
    )
    return name, time.perf_counter() - started, done.returncode, done.stdout + done.stderr


def _report(name: str, seconds: float, status: int, output: str) -> None:
    print(f"\n=== {name} ===\n{output.rstrip()}", flush=True)
    print(f"=== {name}: {seconds:.0f} s{'' if status == 0 else f', FAILED (exit {status})'} ===", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python analyses/run_all.py",
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to every script (see python analyses/<script>.py --help).",
    )
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--jobs", type=int, default=2 if cores >= 2 else 1, help="figure scripts at a time (cores are shared)"
    )
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    threads = max(1, cores // args.jobs) if args.jobs > 1 else None
    started = time.perf_counter()
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = [pool.submit(_run_script, name, rest, threads) for name in FIGURE_SCRIPTS]
        for job in as_completed(jobs):
            results.append(job.result())
            _report(*results[-1])
    for name in TIMED_ALONE:
        results.append(_run_script(name, rest, None))
        _report(*results[-1])
    failed = [name for name, _, status, _ in results if status != 0]
    print(f"\nall scripts: {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their output is above)")


if __name__ == "__main__":
    main()
