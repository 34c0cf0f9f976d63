"""Fitting a :class:`~tl_logitlens.lenses.jacobian.JacobianLens`: the reference estimator, exactly, with
the cotangents batched.

The estimator (Gurnee et al., 2026; TransformerLens 4.3's ``JacobianLens.fit`` computes the same). Each
text is one prompt, tokenised with BOS and cut to ``seq_len`` tokens; call its length ``n`` and its valid
positions ``V = [skip_first, n - 1)``. For a source layer ``l`` (the output of block ``l``,
``blocks.{l}.hook_resid_post``) and the target ``h_f`` (the last block's output, before the final norm),
row ``i`` of the prompt's matrix is::

    J_l[i, :] = mean over t in V of  d( sum over t' in V of h_f[t', i] ) / d h_l[t]

that is one vector-Jacobian product with a one-hot cotangent at output dimension ``i`` planted at every
valid target position (causal attention makes it the sum over ``t' >= t``). ``J_l`` is the mean of the
prompts' matrices; a prompt with ``n <= skip_first + 1`` has no valid position and is skipped.

How it is computed here (the numbers are the estimator's; only the schedule differs from TL's):

- prompts of equal length share one forward pass (no padding), stopped after the last block; its graph
  is shared by every source layer and every cotangent;
- in that forward pass each prompt is repeated ``dims_per_pass`` times, so one backward pass carries
  ``dims_per_pass`` cotangents of every prompt at once (copy ``j`` the one-hot of output dimension
  ``start + j``), as TransformerLens's ``dim_batch`` does for one prompt: ``d_model / dims_per_pass``
  backward passes per batch of prompts instead of per prompt, each of plain autograd kernels on a wider
  batch (``torch.autograd.grad(is_grads_batched=True)`` was measured slower on small models: its
  ``vmap`` loops over the cotangents in the softmax and activation backward kernels);
- gradients are averaged over positions and summed over prompts in float64, on the model's device;
  the model's parameters are frozen for the fit (their ``requires_grad`` flags restored after, also on
  error), so no weight gradient is ever computed or stored.

The result is deterministic: the same texts and settings give the same bits, also when a fit is
resumed from a checkpoint. Under ``torch.distributed`` prompt ``i`` goes to rank ``i % world size`` and
the float64 sums are added in rank order, so every rank returns the same lens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.compat import is_bridge, normalization_type
from tl_logitlens.core.corpus import HashedTexts, corpus_length, first_tokens
from tl_logitlens.core.distributed import World, broadcast_error, current_world, sum_over_ranks
from tl_logitlens.core.files import (
    Checkpoint,
    check_path_argument,
    field_int,
    field_str,
    field_tensor,
    weights_sha256,
)
from tl_logitlens.core.readout import check_model as check_causal_model
from tl_logitlens.lenses.fingerprint import model_record
from tl_logitlens.lenses.jacobian import NAME, JacobianLens

ESTIMATOR = "jacobian_lens"
CHECKPOINT_JOB = "Jacobian lens fit"
# Prompts are grouped by length within blocks of this many batches' worth of texts (per rank); a
# checkpoint is written only at a block's end, so a resumed fit forms exactly the same batches.
BLOCK_BATCHES = 4
# The default dims_per_pass (see default_dims_per_pass): rows per backward matmul, and a cap on the
# replicated forward pass's saved activations.
ROWS_PER_PASS = 512
FORWARD_BUDGET_BYTES = 2**30


class _Stop(Exception):
    """Raised from the target's hook: nothing after the last block is needed."""


def _int_setting(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> int:
    """``value`` when it is an int (not a bool) in ``[low, high]``; ValueError naming the setting if not."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise ValueError(f"{name} must be an int {bound}{why}, not {value!r}")
    return value


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, not {value!r}")


def _source_layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    """The source layers, checked: ints from 0 to ``n_layers - 2``, none twice; every one by default."""
    if layers is None:
        return tuple(range(n_layers - 1))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of ints (block indices) or None, not {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers is empty; pass block indices from 0 to {n_layers - 2}, or None for all of them")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers - 2:
            raise ValueError(
                f"layer {layer!r} is not a source layer of this {n_layers}-layer model: pass block indices from 0 "
                f"to {n_layers - 2} (the last block, {n_layers - 1}, is the target and reads with the identity)"
            )
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(f"layers lists {repeated} more than once; pass each source layer once")
    return tuple(sorted(layers))


def resid_post_hook(model: Any, layer: int) -> str:
    """The hook name of block ``layer``'s output: ``blocks.{layer}.hook_resid_post`` (HookedTransformer, a
    bridge in compatibility mode, and a raw 4.x bridge, where it aliases ``hook_out``), or the raw
    bridge's own ``blocks.{layer}.hook_out`` where the alias is missing."""
    hooks = getattr(model, "hook_dict", {})
    for name in (f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_out"):
        if name in hooks:
            return name
    raise ValueError(
        f"this model has no hook on the output of block {layer} (blocks.{layer}.hook_resid_post or "
        f"blocks.{layer}.hook_out), so the Jacobian lens cannot read it"
    )


def _check_fittable(model: Any) -> None:
    """Refuse what the estimator does not apply to: not a causal TransformerLens model, a module in
    training mode. 16-bit weights are fitted (see :func:`fit_jacobian_lens`'s precision contract)."""
    check_causal_model(model)  # TypeError: not a TL model, an encoder; ValueError: training mode
    training = [name for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(
            f"{len(training)} of the model's modules are in training mode (e.g. {training[0]!r}), where dropout "
            "changes the Jacobians; call model.eval() first"
        )
    direction = getattr(model.cfg, "attention_dir", "causal")
    if direction != "causal":
        raise ValueError(
            f"the Jacobian lens needs causal attention (the estimator sums over later target positions), and "
            f"this model's attention_dir is {direction!r}"
        )


def _check_finite_sums(sums: torch.Tensor, dtype: torch.dtype, n_prompts: int) -> None:
    """Refuse Jacobian sums that hold NaN or inf: only the model's own forward or backward in a 16-bit
    dtype puts them there (float16 overflows above 65504), and a lens must never be made from them."""
    if bool(torch.isfinite(sums).all()):
        return
    name = str(dtype).removeprefix("torch.")
    hint = (
        "float16 holds values up to 65504 and this model's activations or gradients overflow it; fit in "
        "bfloat16 (tl.load_model(..., dtype='bfloat16'): float32's range) or float32"
        if dtype == torch.float16
        else "check the model's weights (a broken checkpoint) and the texts"
    )
    raise ValueError(
        f"the Jacobian sums hold NaN or inf after {n_prompts} prompts: the model's {name} forward or backward "
        f"pass produced non-finite values, so no lens is returned. {hint}"
    )


def weights_basis(model: Any, stream_centred: bool | None) -> str:
    """Which weights the residual stream was computed with: ``"raw"`` (the checkpoint's, as Hugging Face
    computes it) or ``"processed by TransformerLens (...)"`` naming what is detected: ``fold_ln`` and
    ``center_unembed`` leave the stream unchanged; ``center_writing_weights`` (LayerNorm models) removes
    its mean, so a lens fitted on it reads the centred stream (``stream_centred``)."""
    if is_bridge(model) and not getattr(model, "_weights_processed", False):
        return "raw"  # the bridge runs the checkpoint's own modules, whatever its weights look like
    done = []
    if normalization_type(model) in ("LNPre", "RMSPre"):
        done.append("fold_ln")
    if stream_centred:
        done.append("center_writing_weights")
    with torch.no_grad():
        w_u = model.W_U.detach().float()
        if bool((w_u.mean(-1).abs() <= 1e-6 * w_u.abs().mean() + 1e-12).all()):
            done.append("center_unembed")
    return "raw" if not done else f"processed by TransformerLens ({', '.join(done)})"


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Every parameter's ``requires_grad`` off for the block (the graph then starts at the residual
    stream and no weight gradient is computed), each flag restored after, also on error."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def default_dims_per_pass(model: Any, n_prompts: int, n_tokens: int) -> int:
    """Copies of each prompt (output dimensions per backward pass) for a batch of ``n_prompts`` prompts of
    ``n_tokens``: enough that every backward matmul has ``ROWS_PER_PASS`` rows (the rows of
    TransformerLens's default, ``dim_batch=8`` copies of a 64-token prompt: a batch of prompts needs
    fewer copies, so the same memory goes further), at most what keeps the replicated forward pass's
    saved activations under ``FORWARD_BUDGET_BYTES``; then balanced, so the last pass is not mostly
    empty."""
    cfg = model.cfg
    d_model = int(cfg.d_model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    n_heads = int(getattr(cfg, "n_heads", None) or 1)
    k = max(1, math.ceil(ROWS_PER_PASS / (n_prompts * n_tokens)))
    # per copy of one prompt, each block keeps a few residual-wide, MLP-wide and attention-pattern tensors
    size = torch.finfo(model.W_U.dtype).bits // 8
    per_copy = size * n_prompts * n_tokens * int(cfg.n_layers) * (8 * d_model + 3 * d_mlp + 3 * n_heads * n_tokens)
    k = max(1, min(k, d_model, FORWARD_BUDGET_BYTES // max(per_copy, 1)))
    return math.ceil(d_model / math.ceil(d_model / k))


def prompt_jacobian_sums(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    hooks: dict[int, str],
    target_hook: str,
    skip_first: int,
    dims_per_pass: int,
    accumulate_on: torch.device,
    into: Float[torch.Tensor, "layer d_model d_model"] | None = None,
) -> Float[torch.Tensor, "layer d_model d_model"]:
    """``Σ_prompts J_l`` (float64, ``[layer, d_model, d_model]`` in the order of ``hooks``) for a batch of
    prompts of one length, added to ``into`` (a float64 tensor on ``accumulate_on``, returned) when given:
    a fit's running sums take the batch's rows directly, with no second ``[layer, d_model, d_model]``
    float64 buffer (49.5 MiB on GPT-2 small).

    One forward pass of every prompt repeated ``dims_per_pass`` times (the model stopped after the last
    block), then ``ceil(d_model / dims_per_pass)`` backward passes through it: in a pass, copy ``j`` of
    every prompt carries the one-hot cotangent of output dimension ``start + j`` at every valid
    position, so one pass gives rows ``start .. start + dims_per_pass`` of every prompt's matrix at
    every source layer. Plain autograd on a wider batch: every operation's own backward kernel runs,
    with no per-cotangent loop."""
    layers = list(hooks)
    root = hooks[layers[0]]
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Any:
        # keyed by the name asked for: a bridge calls its hooks by their canonical names (hook_out)
        def hook_fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if name == root:  # the graph starts here: nothing before the first source layer is needed
                act = act.detach().requires_grad_(True)
            captured[name] = act
            if name == target_hook:
                raise _Stop
            return act

        return hook_fn

    batch, n = tokens.shape
    copies = dims_per_pass
    fwd_hooks = [(name, capture(name)) for name in dict.fromkeys([*hooks.values(), target_hook])]
    with torch.inference_mode(False), torch.enable_grad():
        with model.hooks(fwd_hooks=fwd_hooks):
            try:
                model(tokens.repeat_interleave(copies, dim=0), return_type=None)  # prompt b's copies together
            except _Stop:
                pass
        missing = [name for name in (*hooks.values(), target_hook) if name not in captured]
        if missing:
            raise RuntimeError(f"the forward pass never reached hooks {missing}")
        target = captured[target_hook]
        sources = [captured[hooks[layer]] for layer in layers]
        if not target.requires_grad:
            raise RuntimeError(f"{target_hook} does not depend on {root}; the model's hooks do not form one stream")
        d_model = target.shape[-1]
        n_valid = n - 1 - skip_first
        if into is None:
            into = torch.zeros(len(layers), d_model, d_model, dtype=torch.float64, device=accumulate_on)
        sums = into
        cotangent = torch.zeros(batch, copies, n, d_model, dtype=target.dtype, device=target.device)
        copy = torch.arange(copies, device=target.device)
        for start in range(0, d_model, copies):
            k = min(copies, d_model - start)  # the last pass may leave copies k.. without a cotangent
            cotangent.zero_()
            cotangent[:, copy[:k], skip_first : n - 1, start + copy[:k]] = 1.0  # at every valid target position
            grads = torch.autograd.grad(
                target, sources, cotangent.view(batch * copies, n, d_model), retain_graph=start + k < d_model
            )
            for index, grad in enumerate(grads):
                # [batch, copy, pos, d]: mean over valid source positions, summed over prompts, in float64
                valid = grad.view(batch, copies, n, d_model)[:, :k].narrow(2, skip_first, n_valid)
                valid = valid.to(device=accumulate_on, dtype=torch.float64)
                sums[index, start : start + k] += valid.sum(dim=2).sum(dim=0) / n_valid
            del grads
    return sums


def _describe_texts(texts: Any) -> str:
    if isinstance(texts, (str, os.PathLike)):
        return str(Path(texts))
    n = corpus_length(texts)
    kind = type(texts).__name__
    return f"{kind} of {n} texts" if n is not None else kind


@no_type_check  # checks its own arguments, with messages that say what to pass
def fit_jacobian_lens(
    model: Any,
    texts: Any,
    *,
    seq_len: int = 128,
    skip_first: int = 16,
    layers: Any = None,
    max_prompts: int | None = None,
    batch_size: int = 8,
    dims_per_pass: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 256,
    name: str = NAME,
) -> JacobianLens:
    """Fit a Jacobian lens for ``model`` on ``texts``: for each source layer ``l``, ``J_l``, the mean over
    prompts of the mean over valid source positions of the Jacobian of the summed last-block output (at
    valid positions) with respect to block ``l``'s output. Exact (no sampled cotangents), accumulated
    in float64, deterministic; the reference estimator of Gurnee et al. (2026) and TransformerLens 4.3's
    ``JacobianLens.fit``, computed with batched cotangents (see the module's docstring).

    Args:
        model: a causal ``HookedTransformer`` (TransformerLens 3.x) or ``TransformerBridge`` (raw or in
            compatibility mode), in eval mode, in any floating dtype (see *Precision* below). Its
            parameters are frozen for the fit and their ``requires_grad`` flags restored after; nothing
            else changes. Its blocks may sit on several devices (TransformerLens 3.9's ``n_devices``, a
            bridge booted with ``device_map``): each source layer's gradients are moved to ``W_U``'s
            device, where the sums are kept.
            Weight processing: ``fold_ln`` and ``center_unembed`` leave the residual stream unchanged, so
            a lens fitted on either loading reads both exactly; ``center_writing_weights`` (LayerNorm
            models) removes the stream's mean, and the lens records which stream it read
            (``meta["stream_centred"]``, ``meta["weights_basis"]``): ``check_model`` refuses the other.
        texts: what :func:`~tl_logitlens.lenses.tuned_training.train_tuned_lens` takes: a list or
            iterable of strings, a ``.txt``/``.json``/``.jsonl`` file, or a ``datasets`` split. Each
            text is one prompt (no packing): BOS + its tokens, cut to ``seq_len`` tokens.
        seq_len: tokens per prompt at most (BOS included), 2 to ``n_ctx``.
        skip_first: leading positions left out of the sources and targets; a prompt of ``n`` tokens
            has valid positions ``[skip_first, n - 1)`` and is skipped when ``n <= skip_first + 1``.
        layers: the source layers (block indices, 0 to ``n_layers - 2``); default every block below
            the last.
        max_prompts: use only the first ``max_prompts`` texts (skipped ones included); default all.
        batch_size: prompts of equal length per forward pass.
        dims_per_pass: copies of each prompt in the forward pass, i.e. output dimensions per backward
            pass, 1 to ``d_model`` (TransformerLens's ``dim_batch``); default from the batch's size
            (:func:`default_dims_per_pass`: 512 rows per backward matmul, as TransformerLens's default
            for a 64-token prompt, so a batch of 8 such prompts needs no copies; the replicated
            forward's saved activations under about 1 GiB).
        progress: show a progress bar (prompts/s, ETA where the number of texts is known, skipped).
        checkpoint_dir: a folder to save the running sums in (``checkpoint.pt``, every
            ``checkpoint_every`` texts and at the end) and to resume from: a fit started again with
            the same texts and settings continues where it stopped and returns the same bits as one
            that never stopped. Under torch.distributed each rank keeps its own, in
            ``rank{r}-of-{n}/``.
        checkpoint_every: texts between checkpoints (rounded up to whole blocks of
            ``4 · batch_size`` texts per rank).
        name: the lens's display name.

    Precision (bf16 and fp16 models): the forward and backward passes run in the model's own dtype
    (that is what makes a 16-bit fit fit in memory: a 7B model in float32 needs 28 GB), so each
    vector-Jacobian product carries that dtype's rounding; everything after it is float64: the mean
    over positions, the sums over prompts and the checkpoint, and the returned matrices are float32.
    Measured against the float32 fit of the same model (relative Frobenius error per layer,
    ``docs/half-precision.md``): about 1e-3 in bfloat16 and 5e-5 in float16 on the demo model; the
    error of each prompt's matrix is larger and averages down over prompts. A float16 forward or
    backward pass that overflows is refused (``ValueError``) rather than averaged.

    Returns:
        The :class:`~tl_logitlens.lenses.jacobian.JacobianLens`, its matrices float32 on the CPU, with
        ``n_prompts`` the prompts averaged. ``meta`` records the model (name, shapes, normalisation,
        readout fingerprint, ``stream_centred``, ``weights_basis``), the fit settings in
        ``meta["fit"]`` (what :meth:`JacobianLens.merge` compares), the texts (``meta["texts"]``,
        ``meta["texts_read"]``) and the prompts skipped as too short (``meta["skipped_prompts"]``,
        also reported in a ``UserWarning`` and the progress bar).

    Raises:
        ValueError: no prompt long enough; layers out of range or repeated; a model in training mode
            or with non-causal attention; Jacobian sums that are not finite (a float16 overflow); a setting of the wrong type or out of range;
            a checkpoint saved with other settings.
        TypeError: not a TransformerLens model, or a masked language model (an encoder); ``texts`` of
            the wrong type.

    Example:
        >>> model = tl.load_model("demo")                                        # doctest: +SKIP
        >>> jlens = tl.fit_jacobian_lens(model, tl.demo_texts()[:64], seq_len=64)  # doctest: +SKIP
        >>> tl.logit_lens(model, "The cat sat on the", lens=jlens, sites="resid_post")  # doctest: +SKIP
    """
    _check_fittable(model)
    cfg = model.cfg
    n_layers, d_model, n_ctx = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_ctx)
    if n_layers < 2:
        raise ValueError("the Jacobian lens needs at least two blocks (sources below the last one)")
    _int_setting("seq_len", seq_len, 2, n_ctx, f" (the model's n_ctx is {n_ctx})")
    _int_setting("skip_first", skip_first, 0, seq_len - 2, f" (a prompt of seq_len={seq_len} tokens needs a valid position)")
    sources = _source_layers(layers, n_layers)
    if max_prompts is not None:
        _int_setting("max_prompts", max_prompts, 1)
    _int_setting("batch_size", batch_size, 1)
    if dims_per_pass is not None:
        _int_setting("dims_per_pass", dims_per_pass, 1, d_model, f" (d_model is {d_model})")
    _int_setting("checkpoint_every", checkpoint_every, 1)
    _check_flag("progress", progress)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, not {name!r}")

    hooks = {layer: resid_post_hook(model, layer) for layer in sources}
    target_hook = resid_post_hook(model, n_layers - 1)
    world = current_world()
    fit = {
        "estimator": ESTIMATOR,
        "seq_len": seq_len,
        "skip_first": skip_first,
        "layers": list(sources),
        "target": f"blocks.{n_layers - 1}.hook_resid_post",
    }
    record = model_record(model)
    meta: dict[str, Any] = {
        **record,
        "weights_basis": weights_basis(model, record["stream_centred"]),
        "fit": fit,
        "fit_dtype": str(model.W_U.dtype).removeprefix("torch."),
        "texts": _describe_texts(texts),
    }
    checkpoint = None
    if checkpoint_dir is not None:
        folder = check_path_argument(checkpoint_dir, "checkpoint_dir", "a folder path")
        if world.size > 1:
            folder = folder / f"rank{world.rank}-of-{world.size}"
        settings = {
            "fit": fit, "model": {k: record[k] for k in ("model_name", "fingerprint", "stream_centred")},
            "max_prompts": max_prompts, "batch_size": batch_size, "dims_per_pass": dims_per_pass,
            "world": [world.rank, world.size], "dtype": meta["fit_dtype"],
            # every weight, not only the readout: two models that read alike give other Jacobians
            "model_sha256": weights_sha256(model),
        }
        checkpoint = Checkpoint(
            folder, settings, job=CHECKPOINT_JOB, validate=_state_checker(len(sources), d_model, max_prompts)
        )

    run = _Run(model, hooks, target_hook, skip_first, dims_per_pass, world, checkpoint, checkpoint_every)
    error = None
    try:
        run.go(texts, seq_len, max_prompts, batch_size, progress, name)
    except Exception as err:  # every rank must reach the collectives below, or the others wait forever
        if world.size == 1:
            raise
        error = err
    shared = broadcast_error(None if error is None else f"rank {world.rank}: {type(error).__name__}: {error}", world)
    if error is not None:
        raise error
    if shared is not None:
        raise RuntimeError(f"the Jacobian lens fit failed on another rank ({shared})")

    sums = sum_over_ranks(run.sums.cpu(), world)
    counts = sum_over_ranks(torch.tensor([run.n_prompts, run.skipped], dtype=torch.float64), world)
    n_prompts, skipped = int(counts[0]), int(counts[1])
    _check_finite_sums(sums, model.W_U.dtype, n_prompts)
    if n_prompts == 0:
        raise ValueError(
            f"no prompt was long enough: each needs more than skip_first + 1 = {skip_first + 1} tokens (BOS "
            f"included) and all {skipped} were shorter; pass longer texts or a smaller skip_first"
        )
    if skipped and world.is_main:
        warnings.warn(
            f"{skipped} of {n_prompts + skipped} prompts had no valid position (at most skip_first + 1 = "
            f"{skip_first + 1} tokens) and were skipped; lens.meta['skipped_prompts'] records it",
            UserWarning,
            stacklevel=2,
        )
    jacobians = {layer: (sums[i] / n_prompts).float() for i, layer in enumerate(sources)}
    meta.update(n_prompts=n_prompts, skipped_prompts=skipped, texts_read=run.position)
    return JacobianLens(jacobians, n_prompts=n_prompts, d_model=d_model, n_layers=n_layers, meta=meta, name=name)


class _Run:
    """One rank's share of a fit: its float64 sums, its counts and how far into the texts it is,
    restored from and saved to the checkpoint."""

    def __init__(
        self,
        model: Any,
        hooks: dict[int, str],
        target_hook: str,
        skip_first: int,
        dims_per_pass: int | None,
        world: World,
        checkpoint: Checkpoint | None,
        checkpoint_every: int,
    ) -> None:
        self.model, self.hooks, self.target_hook = model, hooks, target_hook
        self.skip_first, self.dims_per_pass, self.world = skip_first, dims_per_pass, world
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        d_model = int(model.cfg.d_model)
        self.device = model.W_U.device
        self.accumulate_on = self.device if self.device.type != "mps" else torch.device("cpu")  # MPS: no float64
        state = None if checkpoint is None else checkpoint.load()
        self.resumed_from = None if state is None else (int(state["position"]), str(state["texts_sha256"]))
        if state is None:
            state = {"sums": torch.zeros(len(hooks), d_model, d_model, dtype=torch.float64),
                     "n_prompts": 0, "skipped": 0, "position": 0}
        self.sums = state["sums"].to(self.accumulate_on)
        self.n_prompts, self.skipped = int(state["n_prompts"]), int(state["skipped"])
        self.position = self.start = int(state["position"])
        self.corpus: HashedTexts | None = None

    def save(self) -> None:
        if self.checkpoint is not None:
            assert self.corpus is not None and self.corpus.count == self.position  # the texts read so far
            self.checkpoint.save({"sums": self.sums.cpu(), "n_prompts": self.n_prompts, "skipped": self.skipped,
                                  "position": self.position, "texts_sha256": self.corpus.digest()})

    def go(self, texts: Any, seq_len: int, max_prompts: int | None, batch_size: int, progress: bool, name: str) -> None:
        """Read the texts from ``self.position`` on, block by block, fitting this rank's prompts."""
        from tqdm.auto import tqdm

        world = self.world
        total = None if isinstance(texts, (str, os.PathLike)) else corpus_length(texts)
        if max_prompts is not None:
            total = max_prompts if total is None else min(total, max_prompts)
        block_texts = BLOCK_BATCHES * batch_size * world.size
        self.corpus = HashedTexts(texts, "text")
        if self.resumed_from is not None and self.checkpoint is not None:
            self.corpus.expect(*self.resumed_from, self.checkpoint.path)
        bar = tqdm(total=total, initial=self.start, desc=name, unit="prompt", disable=not progress or not world.is_main)
        try:
            with frozen_parameters(self.model):
                blocks = _blocks(self.model, self.corpus, self.start, max_prompts, block_texts, world, seq_len)
                for block, end in blocks:
                    for tokens, skipped in _batches(block, self.skip_first, batch_size):
                        self.skipped += skipped
                        if tokens is not None:
                            self._add(tokens)
                        done = skipped if tokens is None else tokens.shape[0]
                        bar.update(min(done * world.size, end - bar.n))  # other ranks' share, estimated
                    bar.update(end - bar.n)
                    bar.set_postfix(skipped=self.skipped * world.size, refresh=True)
                    previous, self.position = self.position, end
                    if end // self.checkpoint_every > previous // self.checkpoint_every:
                        self.save()
        finally:
            bar.close()
        self.corpus.check_complete()
        if self.position > self.start:
            self.save()

    def _add(self, tokens: torch.Tensor) -> None:
        k = self.dims_per_pass or default_dims_per_pass(self.model, *tokens.shape)
        prompt_jacobian_sums(
            self.model, tokens.to(self.device), self.hooks, self.target_hook, self.skip_first, k, self.accumulate_on,
            into=self.sums,
        )
        self.n_prompts += tokens.shape[0]


def _blocks(
    model: Any, texts: Any, start: int, max_prompts: int | None, block_texts: int, world: World, seq_len: int
) -> Iterator[tuple[list[torch.Tensor], int]]:
    """This rank's prompts (token ids, BOS first, cut to ``seq_len``) in blocks of ``block_texts`` texts,
    with the index of the text after each block; blocks are aligned on multiples of ``block_texts``
    from the corpus's start, and the texts before ``start`` are passed over without tokenising."""
    block: list[torch.Tensor] = []
    index = -1
    # islice: the text after the last one used is never read (nor hashed into the checkpoint's digest)
    for index, text in enumerate(itertools.islice(iter(texts), max_prompts)):
        if index < start:
            continue
        if world.owns(index):
            # only the first seq_len tokens are used: a prefix is tokenised, not a whole long document
            block.append(torch.tensor(first_tokens(model, text, seq_len), dtype=torch.long))
        if (index + 1) % block_texts == 0:
            yield block, index + 1
            block = []
    if index + 1 > start and (index + 1) % block_texts:
        yield block, index + 1


def _state_checker(n_sources: int, d_model: int, max_prompts: int | None) -> Any:
    """The checker of a fit checkpoint's fields: the float64 sums' shape and finiteness, whole-number
    counts that are not negative and add up to no more than the texts read, the texts' digest."""

    def check(state: dict[str, Any]) -> None:
        position = field_int(state, "position", 0, max_prompts if max_prompts is not None else 2**53)
        n_prompts = field_int(state, "n_prompts", 0, 2**53)
        skipped = field_int(state, "skipped", 0, 2**53)
        if n_prompts + skipped > position:
            raise ValueError(
                f"fields 'n_prompts' + 'skipped' ({n_prompts} + {skipped}) exceed the {position} texts read"
            )
        field_str(state, "texts_sha256", "[0-9a-f]{64}")
        field_tensor(state, "sums", (n_sources, d_model, d_model), torch.float64)
        if n_prompts == 0 and bool(state["sums"].any()):
            raise ValueError("field 'sums' is not zero, but no prompt was added (field 'n_prompts')")

    return check


def _batches(
    block: list[torch.Tensor], skip_first: int, batch_size: int
) -> Iterator[tuple[torch.Tensor | None, int]]:
    """The block's prompts stacked into batches of one length (lengths in order of first appearance, at
    most ``batch_size`` each), with the number of prompts skipped as too short (yielded first)."""
    short = sum(1 for ids in block if ids.shape[0] <= skip_first + 1)
    if short:
        yield None, short
    by_length: dict[int, list[torch.Tensor]] = {}
    for ids in block:
        if ids.shape[0] > skip_first + 1:
            by_length.setdefault(ids.shape[0], []).append(ids)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            yield torch.stack(group[i : i + batch_size]), 0
