"""Regenerate every figure and table of the paper on the embedded model.

Results come from the cache in figures/cache/ when present; with --recompute everything is computed again
(hours on 2 CPU cores at the committed sample sizes: Table 2 alone, 20 prompts per length to 24k, takes 3 h 13
min; docs/results.md, "Time to regenerate"). Each script runs in its own process. The
figure scripts run ``--jobs`` at a time (default: 2 where there are at least 2 cores), one thread each: on 2
cores two 1-thread jobs get as much done as one 2-thread job at a time, or up to 14 % more, depending on
the machine, and keep both cores busy through each script's single-threaded stretches. The efficiency
benchmark, the method comparison and the million-token stream measure speed or memory, so they run last,
alone, on every core (from an empty cache the comparison adds about 5 h 15 min, 3 h 35 min of it its five
RULER-style tasks, and the stream about 3 h 20 min).

    python analyses/run_all.py            # SmolLM2 → figures/
    python analyses/run_all.py --jobs 1   # one script at a time
    python analyses/run_all.py --quick    # tiny random model → figures/quick/ (seconds)

Other arguments are passed to every script (e.g. ``--recompute``, ``--model PATH``). Each script's wall time,
exit status, arguments and threads go to ``timings.json`` in the scripts' figure folder (``--out``), rewritten
after every script so an interrupted run keeps what finished.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oodlens.storage import git_commit, write_json

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "figures"  # the scripts' default --out (common.parse)

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


def _figure_folder(argv: list[str]) -> Path:
    """The folder the scripts write their figures to under ``argv``: common.parse's rule, repeated so that
    run_all does not import the scripts' heavy dependencies."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    known, _ = parser.parse_known_args(argv)
    return known.out or (FIGURES / "quick" if known.quick else FIGURES)


def _cpu_model() -> str:
    """The processor's name: /proc/cpuinfo on Linux (platform.processor() there often says only x86_64)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
    timings_path = _figure_folder(rest) / "timings.json"
    timings: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cores": cores},
        "oodlens_commit": git_commit(),
        "jobs": args.jobs,
        "total_seconds": 0.0,
        "scripts": [],
    }
    started = time.perf_counter()
    results = []

    def finished(result: tuple[str, float, int, str], lane: str, script_threads: int | None) -> None:
        results.append(result)
        _report(*result)
        name, seconds, status, _ = result
        # OMP_NUM_THREADS as the script saw it; None: unset, so torch took every core
        omp_threads = str(script_threads) if script_threads is not None else os.environ.get("OMP_NUM_THREADS")
        timings["scripts"].append(
            {
                "name": name,
                "seconds": round(seconds, 3),
                "status": status,
                "arguments": rest,
                "lane": lane,
                "omp_num_threads": omp_threads,
            }
        )
        timings["total_seconds"] = round(time.perf_counter() - started, 3)
        write_json(timings_path, timings)  # after every script: an interrupted run keeps what finished

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = [pool.submit(_run_script, name, rest, threads) for name in FIGURE_SCRIPTS]
        for job in as_completed(jobs):
            finished(job.result(), "shared" if args.jobs > 1 else "one at a time", threads)
    for name in TIMED_ALONE:
        finished(_run_script(name, rest, None), "alone", None)
    failed = [name for name, _, status, _ in results if status != 0]
    print(f"\nall scripts: {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their output is above)")


if __name__ == "__main__":
    main()
