"""Timing and peak-memory helpers shared by the benchmarks (run in one process, side by side)."""

from __future__ import annotations

import gc
import os
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
    name: str
    seconds: float
    peak_mib: float


def measure(name: str, fn: Callable[[], object], repeats: int = 3) -> Measurement:
    """Best-of-``repeats`` wall time, and the peak resident memory above the starting level.

    Memory is sampled every 0.5 ms from /proc/self/statm while ``fn`` runs; large tensors are
    mmapped and returned to the OS when freed, so the peak is that of ``fn`` alone.
    """
    fn()  # warm-up
    best = float("inf")
    peak_extra = 0
    for _ in range(repeats):
        gc.collect()
        start_rss = _rss()
        peak = start_rss
        done = threading.Event()

        def sample(done: threading.Event = done) -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        done.set()
        sampler.join()
        peak_extra = max(peak_extra, max(peak, _rss()) - start_rss)
        del out
    return Measurement(name, best, peak_extra / 2**20)


def print_table(rows: list[Measurement], baseline: str) -> None:
    base = next(r for r in rows if r.name == baseline)
    print(f"{'':42s} {'seconds':>9s} {'x ' + baseline[:14]:>18s} {'peak MiB':>10s}")
    for r in rows:
        print(f"{r.name:42s} {r.seconds:9.3f} {r.seconds / base.seconds:17.2f}x {r.peak_mib:10.1f}")


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


def threads() -> int:
    return torch.get_num_threads()
