"""Timing and peak-memory helpers shared by the benchmarks (run in one process, side by side)."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@dataclass
class Measurement:
    """A function's best wall time, its best CPU time (see :func:`cpu_clock`) and its peak memory."""

    name: str
    seconds: float
    peak_mib: float
    cpu_seconds: float = float("nan")


def cpu_clock() -> float:
    """CPU seconds of this thread when torch runs on 1 thread (torch's work, and autograd's backward on
    the CPU, then run on the calling thread; a memory sampler's thread is not counted), else of the
    process. On a shared machine the wall time counts the time other processes held the cores; with 1
    thread, the CPU time is close to the wall time on an idle machine."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def fix_mmap_threshold() -> None:
    """Re-run this script with glibc's mmap threshold fixed at 1 MiB (call first thing in main).

    glibc raises its mmap threshold after large frees, after which freed chunks stay in the heap and
    later calls show no resident growth; a fixed threshold keeps every large block mmapped, so each
    call's peak is measured alike.
    """
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def mmap_large_blocks(threshold: int = 2**20) -> None:
    """From now on, have glibc mmap every block of ``threshold`` bytes or more (so freeing it returns it to
    the OS and resident memory follows what is live), and return the heap's free memory to the OS now:
    the runtime form of :func:`fix_mmap_threshold`, for a script that times with glibc's default first
    (which keeps large freed blocks in the heap and reuses them) and measures peak memory after."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, threshold)
    libc.malloc_trim(0)


def _peak_rss_above_start(fn: Callable[[], object]) -> int:
    """Run ``fn`` once while a thread samples resident memory every 0.5 ms; the peak above the start."""
    return _timed_peak(fn)[1]


def _timed_peak(fn: Callable[[], object]) -> tuple[float, int, float]:
    """Run ``fn`` once while a thread samples resident memory every 0.5 ms: its wall time, the
    peak resident memory above the start and its CPU time (:func:`cpu_clock`)."""
    gc.collect()
    start_rss = _rss()
    peak = start_rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    c0, t0 = cpu_clock(), time.perf_counter()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, cpu_clock() - c0
    done.set()
    sampler.join()
    del out
    return seconds, max(peak, _rss()) - start_rss, cpu


def measure(name: str, fn: Callable[[], object], repeats: int = 3) -> Measurement:
    """Best-of-``repeats`` wall time, then the peak resident memory above the starting level.

    Timed runs have no sampler beside them (its wake-ups would slow code that makes many small
    calls more than code that makes a few large ones); one more run, sampled from /proc/self/statm,
    gives the peak. Large tensors are mmapped and returned to the OS when freed, so the peak is that
    of ``fn`` alone.
    """
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return Measurement(name, best, _peak_rss_above_start(fn) / 2**20)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 3,
    *,
    warmup: bool = True,
    sample_timed: bool = False,
    before_peaks: Callable[[], None] | None = None,
) -> list[Measurement]:
    """Best-of-``repeats`` wall time of each function, run round-robin (one warm-up round, then
    ``repeats`` rounds of every function in turn), so load from other processes on a shared machine
    falls on all of them alike; then each one's peak resident memory, as :func:`measure` takes it.

    For calls of minutes, ``warmup=False`` skips the warm-up round and ``sample_timed=True`` samples
    memory during the timed runs (the sampler's wake-ups cost nothing next to them) instead of one
    more run of each. ``before_peaks`` runs before each memory run (e.g. :func:`mmap_large_blocks`, which
    also returns the heap's free pages to the OS, so that no run's peak is hidden by heap an earlier one
    freed).
    """
    if warmup:
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    best_cpu = dict.fromkeys(fns, float("inf"))
    peak = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            if sample_timed:
                seconds, peak_bytes, cpu = _timed_peak(fn)
                best[name], peak[name] = min(best[name], seconds), max(peak[name], peak_bytes)
                best_cpu[name] = min(best_cpu[name], cpu)
                continue
            gc.collect()
            c0, t0 = cpu_clock(), time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            best_cpu[name] = min(best_cpu[name], cpu_clock() - c0)
            del out
    if not sample_timed:
        peak = {}
        for name, fn in fns.items():
            if before_peaks is not None:  # before each: a run must not reuse heap freed by the one before
                before_peaks()
            peak[name] = _peak_rss_above_start(fn)
    return [Measurement(name, best[name], peak[name] / 2**20, best_cpu[name]) for name in fns]


def cpu_line() -> str:
    """The CPU's model name, thread count and the vector/matrix extensions that decide matmul speed
    (AVX2, AVX-512, AVX-512 BF16, AMX), so a reader can tell which machine a figure belongs to."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    marks = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX-512 BF16": "avx512_bf16", "AMX": "amx_tile"}
    have = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in marks.items())
    return f"CPU: {model}, {os.cpu_count()} cores; {have}; torch {torch.__version__}, {threads()} threads"


def print_table(rows: list[Measurement], baseline: str) -> None:
    """Wall seconds, CPU seconds (:func:`cpu_clock`), each as a multiple of ``baseline``'s, and peak memory."""
    base = next(r for r in rows if r.name == baseline)
    print(f"{'':44s} {'wall s':>8s} {'x base':>7s} {'CPU s':>8s} {'x base':>7s} {'peak MiB':>9s}   (base: {baseline})")
    for r in rows:
        print(f"{r.name:44s} {r.seconds:8.3f} {r.seconds / base.seconds:6.2f}x {r.cpu_seconds:8.3f} "
              f"{r.cpu_seconds / base.cpu_seconds:6.2f}x {r.peak_mib:9.1f}")


def gpt2_small_config(**overrides):
    """GPT-2 small's shape (12 layers, d_model 768, 12 heads, d_vocab 50257), random weights
    (a ``HookedTransformerConfig``: TransformerLens 3.x only)."""
    from transformer_lens import HookedTransformerConfig

    kwargs = dict(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LNPre", device="cpu", seed=0,
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def load_line() -> str:
    """The machine's load (1-, 5- and 15-minute averages, as ``uptime`` prints them) beside its cores:
    timings taken with the load above the core count are shared with other work."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def threads() -> int:
    return torch.get_num_threads()
