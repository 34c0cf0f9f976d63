"""Vocabulary scale: the lens over every site of a model with Gemma's 256k vocabulary never holds the
logits of a site, so its peak memory stays a few tiles above the start, far below the full logits.
(The cache is computed before the measurement: a ``TransformerBridge``'s forward pass computes its own
``[batch, pos, d_vocab]`` logits whatever ``return_type`` says, and that memory is the model's.)

Measured in a fresh process with glibc's mmap threshold fixed at 1 MiB (every large block is mmapped
and returned to the OS when freed, so resident memory follows what is live), by a thread sampling
``/proc/self/statm`` every 0.5 ms during the call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D_VOCAB = 256_000  # Gemma's
N_LAYERS, BATCH, SEQ = 8, 2, 64
N_SITES = N_LAYERS + 1  # resid_pre of every block, and final_post
FULL_LOGITS_MIB = N_SITES * BATCH * SEQ * D_VOCAB * 4 / 2**20  # float32 [site, batch, pos, d_vocab]: 1.1 GiB
# Measured 12.9 MiB above the start: one tile's logits of all 9 sites from one matmul ([9 x 128, 2048]
# float32, 9 MiB), two [128, 2048] float32 blocks, the states and the [site, row, k] results. The bound,
# 32 MiB, is 3% of the full logits; one site's logits alone ([128, 256000] float32) would be 125 MiB.
PEAK_BOUND_MIB = 32

SCRIPT = textwrap.dedent(
    f"""
    import os, sys, threading, time
    import torch
    torch.set_num_threads(1)
    import tl_logitlens as tl
    from transformer_lens.config import TransformerBridgeConfig
    from tl_logitlens.core import compat

    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    cfg = TransformerBridgeConfig(
        n_layers={N_LAYERS}, d_model=16, n_heads=2, d_head=8, d_mlp=64, d_vocab={D_VOCAB}, n_ctx={SEQ},
        act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary", device="cpu",
        dtype=torch.float32, default_prepend_bos=False, model_name="tiny-256k",
    )
    model = compat.TransformerBridge.boot_native(cfg, device="cpu", dtype=torch.float32, model_name="tiny-256k")
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model.eval()
    tokens = torch.randint(0, {D_VOCAB}, ({BATCH}, {SEQ}), generator=torch.Generator().manual_seed(0))
    tl.logit_lens(model, tokens[:1, :8])  # warm-up: first-call allocations are not the lens's
    # the cache first: a bridge's forward computes the logits whatever return_type says, and that is
    # the model's memory, not the lens's
    _, cache = model.run_with_cache(tokens)
    peak = start = rss()
    done = threading.Event()
    def sample():
        global peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.0005)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = tl.logit_lens(model, tokens, sites="resid_pre", top_k=5, cache=cache)
    done.set()
    thread.join()
    peak = max(peak, rss())
    assert result.top_ids.shape == ({N_SITES}, {BATCH}, {SEQ}, 5), result.top_ids.shape
    assert bool(torch.isfinite(result.entropy).all())
    print((peak - start) / 2**20)
    """
)


def test_the_lens_over_a_256k_vocabulary_stays_far_below_the_full_logits():
    assert FULL_LOGITS_MIB > 1000  # what a lens that materialised the logits would hold
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak_mib = float(done.stdout.split()[-1])
    assert peak_mib < PEAK_BOUND_MIB, (
        f"the lens over {N_SITES} sites of a {D_VOCAB}-token vocabulary peaked {peak_mib:.1f} MiB above the start "
        f"(bound {PEAK_BOUND_MIB} MiB; the full logits are {FULL_LOGITS_MIB:.0f} MiB)"
    )
