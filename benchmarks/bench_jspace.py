"""J-space decomposition at the GPT-2-small shape: ``tl.decompose`` against TransformerLens 4.3's
``JacobianLens.decompose`` (run in the TransformerLens 4.x venv).

    python benchmarks/bench_jspace.py [--repeats 5] [--k 8] [--threads N]

One raw bridge over a random ``GPT2LMHeadModel`` of GPT-2 small's width (``d_model`` 768, ``d_vocab`` 50257;
2 layers: only ``W_U``, the final norm and one ``J`` take part), one random ``J`` (``I + 0.1 N(0, 1/768)``)
at layer 0 for both lenses, one random activation; both sides decompose it with ``k`` atoms by
nonnegative OMP under ``convention="transformer_lens"`` (the same numbers: supports and coordinates are
checked equal). Rows, interleaved in one process, best of ``--repeats``:

- *cold*: the first call on a model, each side's cache emptied first: TransformerLens builds and caches the
  ``[d_vocab, d_model]`` dictionary (and a snapshot copy of ``W_U`` to detect edits); ours computes the
  atom norms in vocabulary tiles and caches those (``d_vocab`` floats);
- *warm*: a later call, caches in place.

Peak memory is resident memory above the level before each call (``_measure.py``; glibc set to mmap every
block of 1 MiB or more, so freed blocks return to the OS); "kept" is what each side's cache holds after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import cpu_line, load_line, measure_interleaved, mmap_large_blocks, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "gpt2"


def build():
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tl_logitlens.core import compat as _compat

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2)
    hf = GPT2LMHeadModel(config).eval()
    folder = tempfile.mkdtemp(prefix="bench_jspace_")  # the bridge reads the config from a folder: offline
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(folder)
    bridge = _compat.TransformerBridge.boot_transformers(
        folder, hf_model=hf, device="cpu", dtype=torch.float32
    ).eval()
    d = bridge.cfg.d_model
    gen = torch.Generator().manual_seed(1)
    jacobian = torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen) / d**0.5
    x = torch.randn(d, generator=gen) * 10
    return bridge, jacobian, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens
    except ImportError:
        sys.exit("this benchmark compares with TransformerLens 4.3's JacobianLens: run it in the 4.x venv")

    import tl_logitlens as tl
    from tl_logitlens.analyses import lens_dictionary as dictionary_module

    bridge, jacobian, x = build()
    theirs = TLJacobianLens(
        {0: jacobian}, n_prompts=1, d_model=bridge.cfg.d_model, metadata={"model_name": bridge.cfg.model_name}
    )
    ours = tl.JacobianLens(
        {0: jacobian}, n_prompts=1, d_model=bridge.cfg.d_model, n_layers=bridge.cfg.n_layers
    )
    k = args.k

    def tl_warm():
        return theirs.decompose(bridge, x, 0, k=k)

    def tl_cold():
        theirs.clear_device_cache()
        return tl_warm()

    def ours_warm():
        return tl.decompose(bridge, ours, "0_post", x, k=k, convention="transformer_lens")

    def ours_cold():
        dictionary_module._NORMS_CACHE.clear()
        return ours_warm()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = tl_cold(), ours_cold()
    assert a.support.tolist() == b.support.tolist(), (a.support, b.support)
    worst = float((a.coordinates - b.coordinates).abs().max())
    print(
        f"J-space decomposition, d_vocab {bridge.cfg.d_vocab} x d_model {bridge.cfg.d_model}, k={k}; "
        f"same support ({len(b.support)} atoms), coordinates differ by {worst:.1e} at most"
    )
    print(cpu_line())
    print(load_line())
    rows = measure_interleaved(
        {
            "TL 4.3 decompose, cold": tl_cold,
            "ours, cold": ours_cold,
            "TL 4.3 decompose, warm": tl_warm,
            "ours, warm": ours_warm,
        },
        repeats=args.repeats,
        before_peaks=mmap_large_blocks,
    )
    print_table(rows, "TL 4.3 decompose, cold")
    for name in ("TL 4.3 decompose, cold", "TL 4.3 decompose, warm"):
        ours_name = name.replace("TL 4.3 decompose", "ours")
        r_ours, r_tl = next(r for r in rows if r.name == ours_name), next(r for r in rows if r.name == name)
        print(
            f"{ours_name:12s}: {r_ours.seconds / r_tl.seconds:.2f}x TL's wall time, "
            f"{r_ours.peak_mib:.1f} MiB peak vs {r_tl.peak_mib:.1f} MiB"
        )
    tl_cold()
    ours_cold()
    kept_tl = sum(
        t.numel() * t.element_size()
        for t in [*theirs._dictionary_cache.values(), *theirs._unembedding_snapshots.values()]
    )
    kept_ours = sum(t.numel() * t.element_size() for t in dictionary_module._NORMS_CACHE.values())
    print(
        f"kept after a call: TL 4.3 {kept_tl / 2**20:.1f} MiB (dictionary + W_U snapshot), ours {kept_ours / 2**20:.2f} MiB (norms)"
    )


if __name__ == "__main__":
    main()
