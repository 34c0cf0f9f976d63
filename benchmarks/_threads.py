"""OpenMP's wait policy under a busy machine: the same work in fresh processes, side by side.

``OMP_WAIT_POLICY`` is read once, when torch's OpenMP runtime loads, so each configuration runs in a
process of its own, started with its environment. While they run, :func:`busy_load` keeps every core
busy with a plain Python loop per core (started and stopped here, each bounded in time), as other
jobs would on a shared machine.

No torch import here: the parent only starts processes and reads their one-line JSON answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

# (label, OMP_WAIT_POLICY or None for the runtime's default, torch threads)
CONFIGS: tuple[tuple[str, str | None, int], ...] = (
    ("2 threads, default wait policy", None, 2),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", "PASSIVE", 2),
    ("1 thread", None, 1),
)
_BUSY = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_load(n: int | None = None, max_seconds: float = 1800.0) -> Iterator[int]:
    """``n`` (default: one per core) busy-loop processes for the duration of the block; each also stops
    by itself after ``max_seconds``, so none outlives a benchmark killed half-way."""
    n = (os.cpu_count() or 1) if n is None else n
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUSY, str(max_seconds)], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]
    try:
        time.sleep(0.5)  # let them reach the loop
        yield n
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def add_under_load(parser: argparse.ArgumentParser, what: str) -> None:
    """``--under-load ROUNDS`` (the comparison of :data:`CONFIGS`, ``what`` in each configuration) and the
    hidden ``--load-child`` that each configuration's process runs with."""
    parser.add_argument(
        "--under-load",
        type=int,
        metavar="ROUNDS",
        help=f"{what} under a busy-loop process per core: 2 threads with OpenMP's default wait policy, 2 threads "
        "with OMP_WAIT_POLICY=PASSIVE, 1 thread, each in a fresh process, ROUNDS interleaved",
    )
    parser.add_argument("--load-child", action="store_true", help=argparse.SUPPRESS)


def child_env(policy: str | None) -> dict[str, str]:
    """The environment of a configuration's process: OMP_WAIT_POLICY set or removed, nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return env


def compare_under_load(
    child_argv: Sequence[str], rounds: int, *, timeout: float = 300.0, load: bool = True
) -> list[tuple[str, list[dict]]]:
    """Run ``child_argv + ["--threads", N]`` once per configuration per round, interleaved, each in a
    fresh process, under :func:`busy_load`; each child prints one JSON object as its last line
    (``seconds``, ``cpu_seconds``). A child still running after ``timeout`` seconds is stopped and
    recorded as not done (infinite seconds). Returns each configuration's answers, in :data:`CONFIGS` order."""
    answers: dict[str, list[dict]] = {label: [] for label, _, _ in CONFIGS}
    bound = rounds * len(CONFIGS) * (timeout + 5)
    with busy_load(max_seconds=bound) if load else contextlib.nullcontext(0) as n:
        print(f"background load: {n} busy-loop processes (one per core)" if load else "no background load", flush=True)
        for r in range(rounds):
            for label, policy, n_threads in CONFIGS:
                argv = [sys.executable, *child_argv, "--threads", str(n_threads)]
                t0 = time.perf_counter()
                try:
                    done = subprocess.run(argv, env=child_env(policy), capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:  # a collapse is a result too: recorded as "over the limit"
                    answers[label].append({"seconds": float("inf"), "cpu_seconds": float("nan"), "timeout": timeout})
                    print(f"  round {r + 1}, {label}: not done in {timeout:.0f} s", flush=True)
                    continue
                if done.returncode != 0:
                    raise SystemExit(f"{label}: the child failed:\n{done.stderr[-3000:]}")
                answer = json.loads(done.stdout.strip().splitlines()[-1])
                answer["process_seconds"] = time.perf_counter() - t0
                answers[label].append(answer)
                print(f"  round {r + 1}, {label}: {answer['seconds']:.2f} s wall, {answer['cpu_seconds']:.2f} s CPU",
                      flush=True)
    return [(label, answers[label]) for label, _, _ in CONFIGS]


def print_comparison(title: str, results: list[tuple[str, list[dict]]]) -> None:
    """Best, worst and median wall time per configuration, its CPU time, and the ratio to the default."""
    print(f"\n{title}; load {os.getloadavg()[0]:.1f} (1-minute average) at the end")
    print(f"{'':40} {'best s':>8} {'median s':>9} {'worst s':>8} {'CPU s':>7} {'default / this':>15}")
    base = None
    for label, answers in results:
        walls = sorted(a["seconds"] for a in answers)
        cpus = [a["cpu_seconds"] for a in answers if a["cpu_seconds"] == a["cpu_seconds"]]
        median = walls[len(walls) // 2]
        base = median if base is None else base
        speed = "" if median == float("inf") else f"{base / median:14.2f}x"
        print(f"{label:40} {walls[0]:8.2f} {median:9.2f} {walls[-1]:8.2f} {min(cpus, default=float('nan')):7.2f} {speed}")
    print("(inf: not done within the child's time limit; the ratio is the default's median over this one's)")
