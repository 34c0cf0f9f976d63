"""The toolkit on a GPU: the lens, evaluate_lenses, the J-lens fit and a short tuned-lens training on CUDA,
each compared with the CPU, timed against the GPU's own matmul floor, its peak memory recorded; then a
model split over CUDA and the CPU compared with the single-device model.

    python benchmarks/gpu_check.py [--device cuda] [--size full|ci] [--out gpu_check.json] [--table gpu_check.md]

Models: random weights in two shapes, GPT-2 small (12 layers, d_model 768, LayerNorm, GELU, 50257 tokens)
and Llama-shaped (8 layers, d_model 1024, RMSNorm, rotary, gated SiLU MLP, 16 query / 4 key-value heads,
32000 tokens), each in float32 and bfloat16. ``--size ci`` (the default with ``--device cpu``) uses
the same shapes with 2 layers, d_model 64 and a 4096-token vocabulary, so the whole script runs in
about a minute on a laptop CPU; ``tests/test_gpu_check.py`` runs it that way.

For each model, dtype and task it records, in one JSON file and a Markdown table:

- ``equal``: the run on ``--device`` against the same call on the CPU in float32 with the same weights
  (a bfloat16 model's weights are the rounded ones, cast up), as the largest difference (``diff``: nats
  for the lens and the evaluation, relative Frobenius error for the lens maps) and whether it is within
  the tolerance stated per dtype (``tol``: float32 runs must agree to float32 rounding; bfloat16 runs
  differ by bfloat16's own rounding);
- ``peak_mib``: the peak GPU memory the call allocated above what was allocated before it
  (``torch.cuda.max_memory_allocated``; None on the CPU);
- ``seconds`` and ``x_floor``: the wall time (CUDA synchronised) and its ratio to the *floor*, the
  call's dominant matmul FLOPs (the unembedding of every site; the forward and backward passes; the
  streamed KL) divided by this device's own measured dense matmul rate in that dtype
  (``matmul_tflops``, a ``[4096, 4096] @ [4096, 4096]`` product).

Sized for a GPU session of under 8 minutes (the float32 CPU references take most of it); written and
tested on CPUs only so far (no GPU was lent to the session that wrote it): a first GPU run may need fixes.

The split check (CUDA only): the GPT-2-shaped float32 model with its embedding and first half of blocks
on CUDA and the rest, the final norm and the unembedding on the CPU (each block's inputs moved to its
device by a forward pre-hook, as accelerate's device maps do), against the same model all on the CPU:
the lens, the evaluation, the J-lens fit, one tuned-lens step and a steering hook, each within 1e-5.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tl_logitlens as tl
from tl_logitlens.core import compat

SHAPES = {
    "gpt2-small": dict(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=256,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
    ),
    "llama-shaped": dict(
        n_layers=8,
        d_model=1024,
        n_heads=16,
        d_head=64,
        d_mlp=2816,
        d_vocab=32000,
        n_ctx=256,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=4,
        final_rms=True,
    ),
}
CI_OVERRIDES = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=4096)
# Agreement with the float32 CPU run: float32 on another device rounds differently (1e-4 nats on a 50k
# vocabulary: its sums run in another order); bfloat16 rounds every activation to 8 bits of mantissa.
TOLERANCE = {"float32": {"nats": 1e-3, "relative": 1e-3}, "bfloat16": {"nats": 0.5, "relative": 0.1}}
SPLIT_TOLERANCE = 1e-5


def build(shape: str, size: str, dtype: torch.dtype, device: str, tokenizer: Any, seed: int = 0) -> Any:
    """A random model of ``shape`` (HookedTransformer on TransformerLens 3.x, a native TransformerBridge
    on 4.x), weights drawn from ``seed``."""
    spec = dict(SHAPES[shape])
    if size == "ci":
        spec.update(CI_OVERRIDES)
        if "n_key_value_heads" in spec:
            spec["n_key_value_heads"] = 2
    spec.pop("final_rms", None)
    common = dict(seed=seed, device=device, dtype=dtype, default_prepend_bos=True)
    if compat.HookedTransformer is not None:
        from transformer_lens import HookedTransformerConfig

        return compat.HookedTransformer(HookedTransformerConfig(**spec, **common), tokenizer).eval()
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(**spec, **common, model_name=f"random-{shape}")
    bridge = compat.TransformerBridge.boot_native(
        cfg, tokenizer=tokenizer, device=device, dtype=dtype, model_name=f"random-{shape}"
    )
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return bridge.eval()


def twin(model: Any, shape: str, size: str, dtype: torch.dtype, device: str, tokenizer: Any) -> Any:
    """``model``'s weights in a new model of ``dtype`` on ``device`` (rounded, or cast up exactly)."""
    out = build(shape, size, dtype, device, tokenizer)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out.load_state_dict(state)
    return out.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], device: str, repeats: int = 1) -> tuple[Any, float, float | None]:
    """``fn()``'s result, its best wall time over ``repeats`` (synchronised) and its peak GPU memory (MiB
    above what was allocated before; None off CUDA)."""
    cuda = device.startswith("cuda")
    best, out = math.inf, None
    for _ in range(repeats):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return out, best, peak


def matmul_tflops(dtype: torch.dtype, device: str, n: int = 4096) -> float:
    """This device's dense matmul rate in ``dtype`` (TFLOP/s), best of 5 ``[n, n] @ [n, n]`` products."""
    if device == "cpu":
        n = 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def block_params(model: Any) -> int:
    return sum(p.numel() for p in model.blocks.parameters())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    keep = torch.isfinite(a) & torch.isfinite(b)  # padding cells are NaN on both sides
    if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return math.inf
    return float((a - b)[keep].abs().max()) if bool(keep.any()) else 0.0


def tasks(size: str) -> dict[str, dict[str, Any]]:
    """Each task's workload: prompts and lengths small enough that the float32 CPU references fit the
    time budget (the CPU runs each task once per shape)."""
    if size == "ci":
        return {
            "lens": dict(batch=2, seq=16),
            "evaluate": dict(texts=4, seq_len=32),
            "jlens": dict(texts=4, seq_len=24, skip_first=4),
            "tuned": dict(steps=2, tokens=256, seq_len=32),
        }
    return {
        "lens": dict(batch=8, seq=128),
        "evaluate": dict(texts=32, seq_len=128),
        "jlens": dict(texts=4, seq_len=48, skip_first=8),
        "tuned": dict(steps=3, tokens=2048, seq_len=128),
    }


def run_task(name: str, model: Any, work: dict[str, Any], texts: list[str], tokens: torch.Tensor) -> Any:
    if name == "lens":
        res = tl.logit_lens(model, tokens.to(model.W_U.device), top_k=5)
        return {"top_logprobs": res.top_logprobs, "kl_to_final": res.kl_to_final, "top_ids": res.top_ids}
    if name == "evaluate":
        ev = tl.evaluate_lenses(
            model, texts[: work["texts"]], seq_len=work["seq_len"], progress=False, n_bootstrap=0
        )
        return {"mean": ev.mean, "n_tokens": ev.n_tokens}
    if name == "jlens":
        lens = tl.fit_jacobian_lens(
            model,
            texts[: work["texts"]],
            seq_len=work["seq_len"],
            skip_first=work["skip_first"],
            progress=False,
        )
        return {"maps": torch.stack([lens.jacobians[k] for k in sorted(lens.jacobians)])}
    lens = tl.train_tuned_lens(
        model,
        texts,
        steps=work["steps"],
        tokens_per_step=work["tokens"],
        seq_len=work["seq_len"],
        progress=False,
    )
    return {
        "maps": torch.cat([lens.weight.detach().flatten(1), lens.bias.detach()], 1),
        "loss": torch.tensor(lens.meta["training"]["loss_per_step"]),
    }


def compare(name: str, got: dict[str, Any], ref: dict[str, Any]) -> tuple[float, str]:
    """The largest difference of a task's outputs and its unit."""
    if name == "lens":
        return max(
            max_diff(got["top_logprobs"][..., 0], ref["top_logprobs"][..., 0]),
            max_diff(got["kl_to_final"], ref["kl_to_final"]),
        ), "nats"
    if name == "evaluate":
        if got["n_tokens"] != ref["n_tokens"]:
            return math.inf, "nats"
        return max_diff(got["mean"][..., :4], ref["mean"][..., :4]), "nats"  # the statistics in nats
    return relative(got["maps"], ref["maps"]), "relative"


def floor_flops(
    name: str, model: Any, work: dict[str, Any], tokens: torch.Tensor, n_eval_tokens: int
) -> float:
    """The task's dominant matmul FLOPs: 2·(block parameters)·tokens per forward pass (as much per
    input-gradient backward pass), 2·d_model·d_vocab per site and token for the unembedding."""
    cfg = model.cfg
    d, v, n_layers, params = cfg.d_model, cfg.d_vocab, cfg.n_layers, block_params(model)
    if name == "lens":
        return 2.0 * tokens.numel() * (n_layers + 1) * d * v
    if name == "evaluate":
        return 2.0 * n_eval_tokens * (params + (n_layers + 1) * d * v)
    if name == "jlens":
        n_tok = work["texts"] * work["seq_len"]
        k = max(1, math.ceil(512 / n_tok))
        passes = math.ceil(d / k)
        return 2.0 * params * n_tok * k * (1 + passes)
    n_tok = work["steps"] * work["tokens"]
    return n_tok * (2.0 * params + (n_layers + 1) * 4.0 * d * v + n_layers * 6.0 * d * v)


class _ToDevice:
    """A forward pre-hook that moves a module's tensor inputs to its own device (what accelerate's
    ``AlignDevicesHook`` does for a device map)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        move = lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def split_model(model: Any, first: str, second: str) -> Any:
    """A copy of ``model`` with its embeddings and first half of blocks on ``first``, the rest, the final
    norm and the unembedding on ``second``; every block and the final norm and unembedding move their
    inputs to their own device."""
    out = copy.deepcopy(model)
    half = out.cfg.n_layers // 2
    for name in ("embed", "pos_embed"):
        module = getattr(out, name, None)
        if module is not None:  # TransformerLens sends the tokens to cfg.device: bring them here
            module.to(first)
            module.register_forward_pre_hook(_ToDevice(torch.device(first)), with_kwargs=True)
    for i, block in enumerate(out.blocks):
        device = torch.device(first if i < half else second)
        block.to(device)
        block.register_forward_pre_hook(_ToDevice(device), with_kwargs=True)
    for name in ("ln_final", "unembed"):
        module = getattr(out, name, None)
        if module is not None:
            module.to(second)
            module.register_forward_pre_hook(_ToDevice(torch.device(second)), with_kwargs=True)
    return out.eval()


def split_check(
    model: Any, texts: list[str], tokens: torch.Tensor, first: str, second: str
) -> dict[str, Any]:
    """The lens, evaluation, J-lens fit, one tuned-lens step and a steering hook of ``model`` (all on the
    CPU) against its split copy: the largest difference of each (nats, or relative for the lens maps)."""
    spread = split_model(model, first, second)
    blocks = sorted({str(next(b.parameters()).device) for b in spread.blocks})
    out: dict[str, Any] = {
        "devices": blocks,
        "readout_device": str(spread.W_U.device),
        "tolerance": SPLIT_TOLERANCE,
    }
    work = tasks("ci")
    for name in ("lens", "evaluate", "jlens", "tuned"):
        diff, unit = compare(
            name,
            run_task(name, spread, work[name], texts, tokens),
            run_task(name, model, work[name], texts, tokens),
        )
        out[name] = {"diff": diff, "unit": unit, "equal": diff <= SPLIT_TOLERANCE}

    def hook(m: Any) -> Any:
        return tl.steer(m, None, f"{m.cfg.n_layers // 2}_pre", " the", 4.0)

    prompt = model.to_tokens(texts[0])[:, :16]
    with model.hooks(fwd_hooks=[hook(model)]):
        want = model(prompt)
    with spread.hooks(fwd_hooks=[hook(spread)]):
        got = spread(prompt)
    diff = max_diff(got.float(), want.float())
    out["steer"] = {"diff": diff, "unit": "logits", "equal": diff <= SPLIT_TOLERANCE}
    out["equal"] = all(out[k]["equal"] for k in ("lens", "evaluate", "jlens", "tuned", "steer"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda", help="the device to check (cuda, cuda:1, or cpu for the CI form)"
    )
    parser.add_argument(
        "--size", choices=["full", "ci"], default=None, help="default: full on CUDA, ci on the CPU"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    parser.add_argument("--table", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {device}: torch {torch.__version__} sees no CUDA device; pass --device cpu for the CI form"
        )
    size = args.size or ("full" if device.startswith("cuda") else "ci")
    torch.manual_seed(0)
    tokenizer = tl.load_model("demo").tokenizer
    texts = tl.demo_texts()
    work = tasks(size)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformer_lens": compat.TL_VERSION,
        "size": size,
        "tolerance": TOLERANCE,
        "matmul_tflops": {},
        "runs": [],
        "split": None,
    }
    started = time.perf_counter()
    for dtype_name in args.dtypes:
        report["matmul_tflops"][dtype_name] = matmul_tflops(getattr(torch, dtype_name), device)
    for shape in args.shapes:
        reference = build(shape, size, torch.float32, "cpu", tokenizer)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(
            0,
            min(len(tokenizer), reference.cfg.d_vocab),
            (work["lens"]["batch"], work["lens"]["seq"]),
            generator=gen,
        )
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            model = twin(reference, shape, size, dtype, device, tokenizer)
            cpu32 = twin(model, shape, size, torch.float32, "cpu", tokenizer)  # the rounded weights, cast up
            tl.logit_lens(model, tokens[:1, :8].to(model.W_U.device))  # warm-up: kernels, allocator
            for name in ("lens", "evaluate", "jlens", "tuned"):
                got, seconds, peak = measure(
                    lambda n=name, m=model, t=tokens: run_task(n, m, work[n], texts, t),
                    device,
                    repeats=2 if name == "lens" else 1,
                )
                ref = run_task(name, cpu32, work[name], texts, tokens)
                diff, unit = compare(name, got, ref)
                n_eval = int(got["n_tokens"]) if name == "evaluate" else 0
                floor = floor_flops(name, model, work[name], tokens, n_eval) / (
                    report["matmul_tflops"][dtype_name] * 1e12
                )
                tol = TOLERANCE[dtype_name][unit]
                report["runs"].append(
                    {
                        "shape": shape,
                        "dtype": dtype_name,
                        "task": name,
                        "diff": diff,
                        "unit": unit,
                        "tol": tol,
                        "equal": diff <= tol,
                        "seconds": seconds,
                        "floor_seconds": floor,
                        "x_floor": seconds / floor,
                        "peak_mib": peak,
                    }
                )
                print(
                    f"{shape:12s} {dtype_name:8s} {name:8s} diff {diff:.2e} {unit} (tol {tol:g})  "
                    f"{seconds:7.3f} s  {seconds / floor:6.2f}x floor  peak {peak if peak is None else round(peak, 1)} MiB",
                    flush=True,
                )
            del model, cpu32
    if device.startswith("cuda"):
        model = build("gpt2-small", size, torch.float32, "cpu", tokenizer)
        tokens = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(2))
        report["split"] = split_check(model, texts, tokens, device, "cpu")
    else:
        model = build("gpt2-small", "ci", torch.float32, "cpu", tokenizer)
        tokens = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(2))
        report["split"] = split_check(model, texts, tokens, "cpu", "cpu")  # the harness, on one device
        report["split"]["note"] = "no CUDA: both halves on the CPU (checks the harness, not a real split)"
    report["seconds_total"] = time.perf_counter() - started
    report["all_equal"] = all(r["equal"] for r in report["runs"]) and report["split"]["equal"]
    table = render(report)
    print(table)
    tmp = Path(f"{args.out}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, args.out)
    if args.table:
        Path(args.table).write_text(table + "\n", encoding="utf-8")
    return 0 if report["all_equal"] else 1


def render(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row per model, dtype and task) and the split check's line."""
    lines = [
        f"{report['device']}, torch {report['torch']}, TransformerLens {report['transformer_lens']}, size "
        f"{report['size']}; matmul floor "
        + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in report["matmul_tflops"].items()),
        "",
        "| model | dtype | task | vs CPU float32 | equal | seconds | x floor | peak MiB |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['task']} | {r['diff']:.1e} {r['unit']} | "
            f"{'yes' if r['equal'] else 'NO'} | {r['seconds']:.3f} | {r['x_floor']:.2f} | {peak} |"
        )
    split = report["split"]
    if split is not None:
        parts = ", ".join(
            f"{k} {split[k]['diff']:.1e}" for k in ("lens", "evaluate", "jlens", "tuned", "steer")
        )
        lines += [
            "",
            f"Split {split['devices']} -> readout on {split['readout_device']}: {parts} "
            f"(tolerance {split['tolerance']:g}): {'equal' if split['equal'] else 'NOT EQUAL'}",
        ]
    lines.append(f"\ntotal {report['seconds_total']:.0f} s; all equal: {report['all_equal']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
