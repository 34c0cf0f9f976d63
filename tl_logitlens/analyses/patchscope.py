"""Patchscopes: decode a hidden state with the model itself (Ghandeharioun et al., 2024).

The logit, tuned and Jacobian lenses read a state through a fixed map and the model's unembedding. A
patchscope asks the model instead: the source state is written into a *target prompt* (by default the
identity prompt ``"king king\\n1135 1135\\nhello hello\\n?"``) at one position and one site of the
residual stream, the model runs on from there, and its next-token distribution at the end of the target
prompt is the decode.

- :func:`patchscope`: every source site patched into the target prompt, the distributions reduced by the
  same metric kernel as :func:`~tl_logitlens.logit_lens` into a :class:`~tl_logitlens.LensResult` (top-k,
  entropy, ``KL(final ‖ site)``, next-token and target log-probs and ranks). All sites and prompts run in
  one forward pass over a stacked batch (``batch_size`` rows at a time): a row per (site, read cell), each
  target site's hook writing its own rows.
- :class:`PatchscopeLens`: the same decode as a lens object (``translate`` returns the patched run's
  last-layer state, which the model's own final norm and unembedding then read), so a patchscope sits
  beside the logit, tuned and Jacobian lenses in :func:`~tl_logitlens.compare_lenses`, the report and
  the command line (``--lens patchscope``).
- :func:`patchscope_generate`: a few greedy or sampled tokens of the patched target prompt per site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.analyses.predictions import DEFAULT_CHUNK_SIZE, LensResult, _lens
from tl_logitlens.core import compat
from tl_logitlens.core.devices import key_value_cache, to_device
from tl_logitlens.core.frames import position_columns
from tl_logitlens.core.inputs import (
    Batch,
    Inputs,
    PositionSpec,
    Targets,
    check_count,
    check_flag,
    check_real,
    is_integer,
    prepare_inputs,
    resolve_positions,
)
from tl_logitlens.core.readout import (
    Readout,
    Site,
    check_model,
    final_site,
    has_final_norm,
    resolve_sites,
    unembed,
)
from tl_logitlens.core.results import ResultBase, common_fields, labels_summary, nested_token_strings
from tl_logitlens.core.run import Run, execute
from tl_logitlens.core.token_sets import resolve_targets
from tl_logitlens.core.tokens import display_tokens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

PATCHSCOPE_NAME = "patchscope"
# the identity prompt of the Patchscopes paper (and nnterp's repeat_prompt()): few-shot "x x" pairs,
# then a placeholder whose state is replaced, so the model's next token says what the state encodes
IDENTITY_WORDS = ("king", "1135", "hello")
# rows (site × read cell) patched in one forward pass of the target prompt
DEFAULT_BATCH_SIZE = 256
# the sites a patchscope reads by default: every block's output, as the paper and nnterp do
DEFAULT_SOURCE_SITES = "resid_post"


@dataclass(frozen=True)
class TargetPrompt:
    """A target prompt and the position in it that the source state replaces.

    ``prompt`` is text (tokenised by the model, with its BOS rule) or a 1-D tensor of token ids;
    ``position`` counts from 0, or from the end when negative (``-1``: the last token, the placeholder of
    the identity prompt). The decode is read at the prompt's last token.
    """

    prompt: str | torch.Tensor
    position: int = -1


def identity_prompt(
    words: Sequence[str] = IDENTITY_WORDS, *, rel: str = " ", sep: str = "\n", placeholder: str = "?"
) -> TargetPrompt:
    """The identity target prompt: ``"w rel w"`` for each word, one per line, then ``placeholder`` to patch.

    The default is the Patchscopes paper's ``"king king\\n1135 1135\\nhello hello\\n?"``, the prompt
    nnterp's ``repeat_prompt()`` builds, patched at its last token.

    Example:
        >>> identity_prompt().prompt
        'king king\\n1135 1135\\nhello hello\\n?'
    """
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise TypeError(f"words must be a non-empty list of strings, not {words!r}")
    if not all(isinstance(w, str) and w for w in words):
        raise TypeError(f"words must be non-empty strings, got {list(words)!r}")
    for name, value in (("rel", rel), ("sep", sep), ("placeholder", placeholder)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    return TargetPrompt(sep.join(f"{w}{rel}{w}" for w in words) + sep + placeholder, -1)


@dataclass(frozen=True)
class _Target:
    """A target prompt tokenised for one model: ``tokens`` ``[pos]`` and the patched position (the decode is
    read at the last token)."""

    tokens: Int[torch.Tensor, " pos"]
    patch_position: int


def _resolve_target(model: Any, target: object, target_position: object, prepend_bos: bool | None) -> _Target:
    """The target prompt as tokens with its patch position checked against its length."""
    if isinstance(target, str) and target == "identity":
        target = identity_prompt()
    if isinstance(target, TargetPrompt):
        if target_position is not None and target_position != target.position:
            raise ValueError(
                f"target_position={target_position!r} contradicts the TargetPrompt's position {target.position}; "
                "give the position in one place"
            )
        prompt, position = target.prompt, target.position
    elif isinstance(target, (str, torch.Tensor)):
        prompt, position = target, -1 if target_position is None else target_position
    else:
        raise TypeError(
            f"target must be 'identity', a prompt string, a 1-D token tensor or a tl.TargetPrompt, not "
            f"{type(target).__name__}"
        )
    if isinstance(position, bool) or not is_integer(position):
        raise TypeError(f"target_position must be an int (negative counts from the end), not {position!r}")
    if isinstance(prompt, torch.Tensor) and prompt.ndim != 1:
        raise ValueError(f"a target token tensor must be 1-D [pos], got shape {list(prompt.shape)}")
    batch = prepare_inputs(model, prompt, prepend_bos=prepend_bos)
    tokens = batch.tokens[0]
    n = tokens.shape[0]
    position = int(position)
    if not -n <= position < n:
        raise ValueError(
            f"target_position={position} is outside the target prompt, which has {n} tokens "
            f"{list(batch.str_tokens[0])}; use a position in [-{n}, {n - 1}]"
        )
    return _Target(tokens=tokens, patch_position=position % n)


def _one_site(model: Any, site: object, name: str) -> Site:
    if not isinstance(site, str):
        raise TypeError(
            f"{name} must be 'same' or one site label such as '2_post' or 'final_post', not {site!r}"
        )
    sites = resolve_sites(model, [site])
    if len(sites) != 1 or sites[0].label != site:
        raise ValueError(
            f"{name} must be 'same' or one site label such as '2_post' or 'final_post', not the kind {site!r}"
        )
    return sites[0]


class PatchscopeLens:
    """A patchscope as a lens: a site's states patched into a target prompt of the model, read at its end.

    ``translate(site, states)`` writes each row of ``states`` into its own copy of the target prompt at
    ``target_position`` and at ``site`` (or at ``target_site``), runs the model on, and returns the
    last block's output at the target prompt's last token: the state the model's final norm and
    unembedding read. Analyses that take ``lens=`` then read it like any lens, so the patchscope stands
    beside the logit, tuned and Jacobian lenses in :func:`~tl_logitlens.compare_lenses`, the report and
    ``tl-logitlens run ... --lens patchscope``. Each ``translate`` is one forward pass per ``batch_size``
    rows (and, on a ``HookedTransformer``, one of the target's tokens before the patch position);
    :func:`patchscope` runs all sites together, in two forward passes.

    As for every lens, the ``final_post`` row of those analyses *is* the model's own output. With
    ``target_site="same"`` that is also what the patch gives there (the final state written in place and
    read back); with another ``target_site`` it is not, and :func:`patchscope` reports the patch itself.

    Args:
        model: the model that is patched and read (a ``HookedTransformer`` or ``TransformerBridge``).
        target: ``"identity"`` (:func:`identity_prompt`), a prompt string, a 1-D token tensor or a
            :class:`TargetPrompt`.
        target_site: ``"same"`` (each source site into the same site of the target) or one site label.
        target_position: the patched position of a string or tensor target (default -1, the last token).
        batch_size: rows patched per forward pass.
        prepend_bos: tokenise the target with or without BOS (default: the model's rule).

    Raises:
        ValueError, TypeError: a target position outside the target prompt; an unknown target site; a
            non-positive batch size.

    Example:
        >>> cmp = tl.compare_lenses(model, "The dog was very", lenses=[None, tl.PatchscopeLens(model)])
    """

    default_sites = DEFAULT_SOURCE_SITES

    @no_type_check  # checks its own arguments, with messages that say what to pass
    def __init__(
        self,
        model: Any,
        target: str | TargetPrompt | torch.Tensor = "identity",
        *,
        target_site: str = "same",
        target_position: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prepend_bos: bool | None = None,
    ) -> None:
        check_model(model)
        self.model = model
        self.name = PATCHSCOPE_NAME
        self.target = _resolve_target(model, target, target_position, prepend_bos)
        self.target_site = None if target_site == "same" else _one_site(model, target_site, "target_site")
        self.batch_size = check_count(batch_size, "batch_size", 1)

    def __repr__(self) -> str:
        where = "same" if self.target_site is None else self.target_site.label
        return (
            f"PatchscopeLens(target of {self.target.tokens.shape[0]} tokens, position {self.target.patch_position}, "
            f"target_site={where!r})"
        )

    def check_model(self, model: Any) -> None:
        if model is not self.model:
            raise ValueError(
                "this PatchscopeLens patches the model it was made with, not this one; make one for this model, "
                "tl.PatchscopeLens(model), or patch across models with tl.patchscope(..., target_model=..., "
                "allow_cross_model=True)"
            )

    def hook_for(self, site: str) -> str:
        """The hook of the target site that a state of source site ``site`` is written into."""
        if self.target_site is not None:
            return self.target_site.hook
        return resolve_sites(self.model, [site])[0].hook

    def translate(
        self, site: str, states: Float[torch.Tensor, "row d_model"]
    ) -> Float[torch.Tensor, "row d_model"]:
        """The last block's output at the target's last token, with ``states`` patched in at ``site``."""
        if site == "final_post" and self.target_site is None:
            return states  # written into the last block's output and read back: itself
        return self.patch([(self.hook_for(site), states)])[0]

    def patch(
        self, jobs: Sequence[tuple[str, Float[torch.Tensor, "row d_model"]]], prefix: Any = None
    ) -> list[Float[torch.Tensor, "row d_model"]]:
        """For each ``(hook, states)``: the last block's output at the target's last token of the target
        prompt with each row of ``states`` written at ``hook`` and the patch position. All jobs' rows run
        stacked, ``batch_size`` rows per forward pass. ``prefix``: the target's key-value cache before the
        patch position, when it was computed in this call already (see :func:`patched_states`)."""
        return patched_states(self.model, self.target, jobs, self.batch_size, prefix=prefix)


@torch.inference_mode()
def patched_states(
    model: Any,
    target: _Target,
    jobs: Sequence[tuple[str, torch.Tensor]],
    batch_size: int,
    suffix: Int[torch.Tensor, "row new"] | None = None,
    prefix: Any = None,
) -> list[torch.Tensor]:
    """See :meth:`PatchscopeLens.patch`; ``model`` runs the target prompt. ``suffix``: tokens appended to
    each row's copy of the target prompt (a generation so far), read at the last of them instead.
    ``prefix``: :func:`_prefix_cache` of the target, already computed in this call (else it is, here).

    The target's tokens before the patch position are the same in every row and no patch reaches them (the
    model is causal): a ``HookedTransformer`` runs them once into a frozen key-value cache, and each row
    runs only its tokens from the patch position on (for the identity prompt: one token instead of 24).
    A bridge runs every row whole.
    """
    d_model = model.cfg.d_model
    for hook, states in jobs:
        if states.ndim != 2 or states.shape[-1] != d_model:
            raise ValueError(f"states patched at {hook} must be [row, {d_model}], got {list(states.shape)}")
    sizes = [int(states.shape[0]) for _, states in jobs]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    n_rows = sum(sizes)
    final_hook = final_site(model).hook
    out = torch.empty(n_rows, d_model, dtype=model.W_U.dtype, device=target.tokens.device)
    if prefix is None:
        prefix = _prefix_cache(model, target.tokens[: target.patch_position])
    first = 0 if prefix is None else target.patch_position  # the first token each row runs
    pos = target.patch_position - first
    for lo in range(0, n_rows, batch_size):
        hi = min(lo + batch_size, n_rows)
        # each hook writes its jobs' rows of this slice of the stacked batch
        writes: dict[str, list[tuple[int, int, torch.Tensor]]] = {final_hook: []}
        for (name, states), start, size in zip(jobs, starts, sizes):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                writes.setdefault(name, []).append((a - lo, b - lo, states[a - start : b - start]))
        tokens = target.tokens[first:][None].expand(hi - lo, -1)
        if suffix is not None:
            tokens = torch.cat([tokens, suffix[lo:hi].to(tokens.device)], dim=1)

        def make(name: str, parts: list[tuple[int, int, torch.Tensor]], lo: int = lo, hi: int = hi) -> Any:
            def write(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
                for a, b, values in parts:
                    activation[a:b, pos] = values.to(device=activation.device, dtype=activation.dtype)
                if name == final_hook:  # written first where the patch is at the last block's output
                    out[lo:hi] = activation[:, -1]
                return activation

            return write

        kwargs: dict[str, Any] = {}
        if prefix is not None:  # an explicit mask: TransformerLens would otherwise mask pad-id tokens
            kwargs = {"past_kv_cache": _expanded(prefix, hi - lo), "attention_mask": torch.ones_like(tokens)}
        _forward(model, tokens, [(n, make(n, parts)) for n, parts in writes.items()], **kwargs)
    return list(out.split(sizes))


def _forward(model: Any, tokens: torch.Tensor, hooks: list[tuple[str, Any]], **kwargs: Any) -> None:
    """One forward pass with ``hooks`` (no logits). A ``HookedTransformer`` gets them on the few hook points
    they name, removed from those alone afterwards (``run_with_hooks`` resets every hook point of the model,
    which costs a tiny model as much as a block); a bridge runs ``run_with_hooks`` (its legacy names are
    aliases)."""
    if not compat.is_hooked_transformer(model):
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks, **kwargs)
        return
    points = [model.hook_dict[name] for name, _ in hooks]
    try:
        for point, (_, fn) in zip(points, hooks):
            point.add_hook(fn)
        model(tokens, return_type=None, **kwargs)
    finally:
        for point in points:
            point.remove_hooks("fwd")


def _prefix_cache(model: Any, prefix: Int[torch.Tensor, " pos"]) -> Any:
    """A frozen key-value cache of ``prefix`` (one row), or None where it cannot be used: an empty prefix,
    or a model that is not a ``HookedTransformer``."""
    if prefix.shape[0] == 0 or not compat.is_hooked_transformer(model):
        return None
    cache = key_value_cache(model, 1)
    model(prefix[None], return_type=None, past_kv_cache=cache, attention_mask=torch.ones_like(prefix[None]))
    cache.freeze()
    return cache


def _frozen(keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> Any:
    """A frozen TransformerLens key-value cache of these per-layer ``(keys, values)`` and attention mask."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(past_keys=k, past_values=v, frozen=True) for k, v in keys_values]
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)


def _expanded(cache: Any, n: int) -> Any:
    """``cache`` (frozen, one row) seen by ``n`` rows, without copying it."""
    pairs = [(e.past_keys.expand(n, -1, -1, -1), e.past_values.expand(n, -1, -1, -1)) for e in cache.entries]
    return _frozen(pairs, cache.previous_attention_mask.expand(n, -1))


def _check_finite_states(states: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(states).all()):
        row = int((~torch.isfinite(states)).flatten(1).any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{what} holds NaN or inf (row {row}); a patchscope of a non-finite state means nothing, so none is "
            "computed: check where the states came from"
        )


class _Patched:
    """The readout of states a patchscope already produced: the identity, under the patchscope's name."""

    name = PATCHSCOPE_NAME

    def check_model(self, model: Any) -> None:
        return None

    def translate(self, site: str, states: torch.Tensor) -> torch.Tensor:
        return states


def _latent_sites(
    model: Any, latents: object, source_sites: object
) -> tuple[tuple[Site, ...], list[torch.Tensor]]:
    """Sites and ``[batch, d_model]`` states of ``latents``: a dict ``{label: states}`` or a
    ``[site, batch, d_model]`` tensor with ``source_sites`` naming its sites."""
    d_model = model.cfg.d_model
    if isinstance(latents, Mapping):
        if source_sites is not None:
            raise ValueError("latents as a dict names its own sites; leave source_sites out")
        labels, values = list(latents), list(latents.values())
    elif isinstance(latents, torch.Tensor):
        if latents.ndim != 3:
            raise ValueError(f"latents must be [site, batch, d_model], got shape {list(latents.shape)}")
        labels = [
            s.label
            for s in resolve_sites(model, DEFAULT_SOURCE_SITES if source_sites is None else source_sites)
        ]
        if len(labels) != latents.shape[0]:
            raise ValueError(
                f"latents hold {latents.shape[0]} sites but source_sites names {len(labels)} ({labels}); pass "
                "source_sites with one label per latent, or a dict {label: [batch, d_model] states}"
            )
        values = list(latents)
    else:
        raise TypeError(
            f"latents must be a dict {{site label: [batch, d_model] tensor}} or a tensor, not {type(latents).__name__}"
        )
    if not labels:
        raise ValueError("latents is empty; pass at least one site's states")
    sites = resolve_sites(model, labels)
    shapes = {tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values}
    if None in shapes:
        raise TypeError("every latent must be a tensor [batch, d_model]")
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[1] != d_model:
        raise ValueError(
            f"every latent must be [batch, d_model] with d_model={d_model} and one batch size, got {sorted(shapes)}"
        )
    for site, value in zip(sites, values):
        if not value.dtype.is_floating_point:
            raise TypeError(f"latents of {site.label} must be floating point, not {value.dtype}")
        _check_finite_states(value, f"latents[{site.label!r}]")
    return sites, [v.to(model.W_U.device) for v in values]


def _latent_batch(n: int, device: Any) -> Batch:
    """A stand-in batch for ``n`` latents: one read cell each, no next token."""
    return Batch(
        tokens=torch.zeros(n, 1, dtype=torch.long, device=device),
        mask=torch.ones(n, 1, dtype=torch.bool, device=device),
        str_tokens=(("<latent>",),) * n,
    )


def _setup(
    model: Any,
    target_model: Any,
    allow_cross_model: object,
    target: object,
    target_site: object,
    target_position: object,
    batch_size: object,
    prepend_bos: bool | None,
) -> tuple[Any, PatchscopeLens]:
    """The model that runs the target prompt and the patchscope on it, every argument checked."""
    check_model(model)
    runner = _target_model(model, target_model, allow_cross_model)
    lens = PatchscopeLens(
        runner,
        target,
        target_site=target_site,
        target_position=target_position,
        batch_size=batch_size,
        prepend_bos=prepend_bos,
    )
    return runner, lens


def _target_model(model: Any, target_model: Any, allow_cross_model: object) -> Any:
    """The model that runs the target prompt: ``model``, or another of the same width with the flag."""
    check_flag(allow_cross_model, "allow_cross_model")
    if target_model is None or target_model is model:
        return model
    check_model(target_model)
    if not allow_cross_model:
        raise ValueError(
            "target_model is another model than the source model; patching states of one model into another is "
            "an explicit choice: pass allow_cross_model=True (the models must have the same d_model)"
        )
    if target_model.cfg.d_model != model.cfg.d_model:
        raise ValueError(
            f"the source model has d_model={model.cfg.d_model} but target_model has d_model="
            f"{target_model.cfg.d_model}; a state can only be patched into a stream of the same width"
        )
    if target_model.cfg.d_vocab != model.cfg.d_vocab:
        raise ValueError(
            f"the source model has d_vocab={model.cfg.d_vocab} but target_model has {target_model.cfg.d_vocab}; "
            "next-token and target ids would name other tokens: use models that share a tokenizer"
        )
    return target_model


# Entry points check their own arguments (see predictions.logit_lens).
@no_type_check
def patchscope(
    model: Any,
    source_inputs: Inputs | None = None,
    *,
    target: str | TargetPrompt | torch.Tensor = "identity",
    source_sites: str | Sequence[str] | None = None,
    target_site: str = "same",
    source_position: PositionSpec = -1,
    target_position: int | None = None,
    top_k: int = 5,
    targets: Targets = None,
    final_top_k: int = 0,
    latents: Any = None,
    cache: Any = None,
    target_model: Any = None,
    allow_cross_model: bool = False,
    keep_logprobs: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    include_bias: bool = True,
    prepend_bos: bool | None = None,
) -> LensResult:
    """Decode each source site's state with the model itself: patch it into a target prompt, read the next token.

    For every source site and read position, the source state replaces the target prompt's state at
    ``target_position`` and ``target_site`` (``"same"``: the source's own site), the model runs on, and its
    next-token distribution at the target prompt's last token is reduced by the lens's metric kernel: top-k
    tokens and log-probs, entropy (nats), ``KL(final ‖ site)`` (nats) against the patchscope of the last
    layer's state (with ``target_site="same"`` on one model: the model's own output at the source position,
    exactly), the log-prob and rank of the source's next token and of ``targets``. One forward pass of the
    source prompts (on a ``HookedTransformer`` with the target's tokens before the patch position as one
    more row, kept as a key-value cache), then one of the target prompt stacked ``site × read cell`` times
    (``batch_size`` rows per pass; from the patch position on where there is that cache), every target
    site's hook writing its own rows.

    Args:
        model: the source model (``HookedTransformer`` or ``TransformerBridge``), also the target model
            unless ``target_model`` is given.
        source_inputs: a string, a list of strings or a token tensor (``None`` with ``latents``).
        target: ``"identity"`` (:func:`identity_prompt`, the paper's and nnterp's default), a prompt string,
            a 1-D token tensor or a :class:`TargetPrompt` (prompt and patch position).
        source_sites: the sites decoded (kinds or labels as :func:`~tl_logitlens.logit_lens` takes them);
            default ``"resid_post"``, every block's output.
        target_site: ``"same"`` or one site label of the target model, e.g. ``"0_pre"``.
        source_position: the read positions of the sources (``-1``: each prompt's last token; ``None``:
            all; an int or a list).
        target_position: the patched position of a string or tensor target (default -1).
        targets: token strings, ids or word-level token sets (:func:`~tl_logitlens.token_set`) whose
            log-prob and rank are reported at every site, read as :func:`~tl_logitlens.logit_lens` reads them.
        latents: precomputed states instead of ``source_inputs``: ``{label: [batch, d_model]}`` or a
            ``[site, batch, d_model]`` tensor labelled by ``source_sites``. ``KL`` is then against the
            ``final_post`` latent's patchscope, NaN when there is none; there is no next token.
        cache: an ``ActivationCache`` of the source inputs (checked as in ``logit_lens``).
        target_model: run the target prompt on another model with the same ``d_model`` and vocabulary;
            only with ``allow_cross_model=True``.
        keep_logprobs: keep the whole log-softmax as ``full_logprobs``.
        batch_size: patched rows per forward pass of the target prompt.
        Other arguments as :func:`~tl_logitlens.logit_lens`.

    Returns:
        A :class:`~tl_logitlens.LensResult` (``lens_name="patchscope"``) over the source sites and read
        positions, with every table and figure of ``logit_lens``.

    Raises:
        ValueError, TypeError: a target position outside the target prompt; a site the model lacks; a
            ``target_model`` without ``allow_cross_model=True`` or of another ``d_model``; NaN or inf in
            ``latents``; both or neither of ``source_inputs`` and ``latents``.

    Example:
        >>> res = tl.patchscope(model, "Once upon a time, there was a little", targets=[" girl"])
        >>> res.top_tokens()[0][0][0]     # what the first block's output says, in the model's words
    """
    runner, lens = _setup(
        model, target_model, allow_cross_model, target, target_site, target_position, batch_size, prepend_bos
    )
    check_flag(include_bias, "include_bias")
    check_flag(keep_logprobs, "keep_logprobs")
    d_vocab = runner.cfg.d_vocab
    check_count(top_k, "top_k", 1, d_vocab)
    check_count(final_top_k, "final_top_k", 0, d_vocab)
    check_count(chunk_size, "chunk_size", 1)
    source = _sources(
        model, runner, lens, source_inputs, latents, source_sites, source_position, cache, prepend_bos
    )
    # the patchscope of the last layer's state is what every site is compared with; with target_site="same"
    # it is the last layer's state itself (written into the last block's output and read back)
    exact_final = lens.target_site is None
    labels = [s.label for s in source.sites]
    jobs = [label for label in labels if not (exact_final and label == "final_post")]
    reference = source.states.get("final_post")
    if reference is not None and not exact_final and "final_post" not in jobs:
        jobs.append("final_post")
    patches = [(lens.hook_for(label), source.states[label]) for label in jobs]
    decoded = dict(zip(jobs, lens.patch(patches, prefix=source.prefix)))
    if exact_final and reference is not None:
        decoded["final_post"] = reference
    batch, run = source.batch, source.run
    rows = run.valid_rows()

    def grid(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((*batch.tokens.shape, values.shape[-1]), dtype=values.dtype, device=values.device)
        full[rows.b, rows.p] = values
        return full

    # the decoded states laid out as a cache over the source tokens, read by the lens's own kernel
    reference_key = "patchscope.final_post"
    read_cache = {f"patchscope.{label}": grid(decoded[label]) for label in labels if label != "final_post"}
    read_cache[reference_key] = grid(decoded["final_post"] if reference is not None else decoded[labels[0]])
    read_sites = [
        Site(label, reference_key if label == "final_post" else f"patchscope.{label}") for label in labels
    ]
    target_ids = resolve_targets(runner, targets, *run.positions.shape)
    result = _lens(
        Run(batch=batch, positions=run.positions, valid=run.valid, cache=read_cache),
        Readout(runner, _Patched(), "recompute", include_bias),
        read_sites,
        Site("final_post", reference_key),
        target_ids,
        top_k,
        final_top_k,
        keep_logprobs,
        chunk_size,
    )
    if reference is None:  # latents without a last-layer state: nothing to compare with
        result = replace(result, kl_to_final=torch.full_like(result.kl_to_final, float("nan")))
    return result


@dataclass(frozen=True)
class _Sources:
    """The source states to decode: per site label ``[row, d_model]`` over the run's valid read cells."""

    batch: Batch
    run: Run
    sites: tuple[Site, ...]
    states: dict[str, torch.Tensor]
    prefix: Any = None  # the target's key-value cache before the patch position, made in the same forward


def _sources(
    model: Any,
    runner: Any,
    lens: PatchscopeLens,
    source_inputs: object,
    latents: object,
    source_sites: object,
    source_position: object,
    cache: Any,
    prepend_bos: bool | None,
) -> _Sources:
    """The states of ``source_sites`` at ``source_position`` of ``source_inputs`` (one forward pass, or
    ``cache``), and the last layer's; or the ``latents`` given."""
    prefix = None
    if latents is not None:
        if source_inputs is not None or cache is not None:
            raise ValueError("pass either source_inputs (and cache) or latents, not both")
        sites, values = _latent_sites(model, latents, source_sites)
        batch = _latent_batch(values[0].shape[0], runner.W_U.device)
        positions, valid = resolve_positions(None, batch)
        run = Run(batch=batch, positions=positions, valid=valid, cache=None)
        states = {s.label: v for s, v in zip(sites, values)}
    else:
        if source_inputs is None:
            raise ValueError("pass source_inputs (the prompts whose states are decoded) or latents")
        sites = resolve_sites(model, DEFAULT_SOURCE_SITES if source_sites is None else source_sites)
        batch = prepare_inputs(model, source_inputs, prepend_bos=prepend_bos)
        positions, valid = resolve_positions(source_position, batch)
        final = final_site(model)
        hooks = sorted({s.hook for s in (*sites, final)})
        if cache is None and runner is model:  # the target's prefix rides along with the sources
            run, prefix = _with_prefix(model, batch, positions, valid, hooks, lens.target)
        else:
            run = execute(model, batch, positions, valid, hooks, cache)
        rows = run.valid_rows()
        states = {s.label: run.cache[s.hook][rows.b, rows.p] for s in (*sites, final)}
        for label, value in states.items():
            _check_finite_states(value, f"the source state at {label}")
    if runner is not model and lens.target_site is None:
        resolve_sites(
            runner, [s.label for s in sites]
        )  # "same": every source site must exist in the target model
    return _Sources(batch=batch, run=run, sites=sites, states=states, prefix=prefix)


@torch.inference_mode()
def _with_prefix(
    model: Any, batch: Batch, positions: torch.Tensor, valid: torch.Tensor, hooks: Sequence[str], target: _Target
) -> tuple[Run, Any]:
    """The sources' run and the target's prefix cache (:func:`_prefix_cache`) from one forward pass: the
    target's tokens before the patch position are one more row of the source batch, right-padded and masked
    (no real token sees a pad, so every real state is the unpadded prompt's). ``(execute(...), None)`` where
    there is no prefix or the model is not a ``HookedTransformer``."""
    p = target.patch_position
    if p == 0 or not compat.is_hooked_transformer(model):
        return execute(model, batch, positions, valid, hooks), None
    n, width = batch.tokens.shape
    tokens = torch.zeros(n + 1, max(width, p), dtype=batch.tokens.dtype, device=batch.tokens.device)
    mask = torch.zeros_like(tokens)
    tokens[:n, :width], mask[:n, :width] = batch.tokens, batch.mask
    tokens[n, :p], mask[n, :p] = target.tokens[:p].to(tokens.device), 1
    kv = key_value_cache(model, n + 1)
    wanted = set(hooks)
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name in wanted, return_type=None, past_kv_cache=kv, attention_mask=mask
    )
    kept = {name: cache[name][:n, :width] for name in cache.keys()}
    prefix = _frozen(
        [(e.past_keys[n : n + 1, :p], e.past_values[n : n + 1, :p]) for e in kv.entries], mask[n : n + 1, :p]
    )
    run = Run(batch=batch, positions=positions, valid=valid, cache=compat.ActivationCache(kept, model))
    return run, prefix


@dataclass(frozen=True, kw_only=True, repr=False)
class PatchscopeGeneration(ResultBase):
    """Continuations of the patched target prompt: per source site, prompt and read position, the
    ``max_new_tokens`` tokens the model writes after the target prompt with that state patched in.

    ``generated_ids`` is ``[site, batch, pos, new]`` (``-1`` in padding cells); ``temperature`` is None for
    greedy decoding, else the sampling temperature, drawn from a generator seeded with ``seed``.
    """

    labels: tuple[str, ...]
    generated_ids: Int[torch.Tensor, "site batch pos new"]
    target_text: str
    temperature: float | None
    seed: int | None

    def texts(self) -> list[list[list[str]]]:
        """The continuations decoded to text, ``[site][batch][pos]`` (padding: ``""``)."""
        pieces = nested_token_strings(self.tokenizer, self.generated_ids)
        return [[["".join(toks) for toks in row] for row in site] for site in pieces]

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        out["sites"] = labels_summary(self.labels)
        out["new tokens"] = str(self.generated_ids.shape[-1])
        out["decoding"] = (
            "greedy"
            if self.temperature is None
            else f"sampled (temperature {self.temperature:g}, seed {self.seed})"
        )
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per site × prompt × read position: ``site``, ``site_index``, ``prompt``, ``position``,
        ``input_token``, ``continuation`` (text), ``token_ids`` (a list), ``lens``. Padding is left out."""
        import pandas as pd

        b, j = self.valid.cpu().nonzero(as_tuple=True)
        texts = self.texts()
        ids = self.generated_ids.cpu()
        frames = []
        for s, label in enumerate(self.labels):
            frames.append(
                pd.DataFrame(
                    {
                        "site": label,
                        "site_index": s,
                        **position_columns(self.positions, self.str_tokens, b, j),
                        "continuation": [texts[s][x][y] for x, y in zip(b.tolist(), j.tolist())],
                        "token_ids": [ids[s, x, y].tolist() for x, y in zip(b.tolist(), j.tolist())],
                        "lens": self.lens_name,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def plot(self, **kwargs: Any) -> go.Figure:
        """A table of the continuations, one row per site; see
        :func:`tl_logitlens.plotting.patchscope.generation_table` (``prompt=``, ``position=``)."""
        from tl_logitlens.plotting.patchscope import generation_table

        return generation_table(self, **kwargs)


def _next_tokens(
    model: Any, final_states: torch.Tensor, temperature: float | None, generator: torch.Generator | None
) -> Int[torch.Tensor, " row"]:
    """The next token of each row from its last block's output: the model's own final norm and unembedding,
    then the argmax or a draw at ``temperature`` (drawn on the CPU by ``generator``, so the draws do not
    depend on the device)."""
    normed = model.ln_final(final_states[None])[0] if has_final_norm(model) else final_states
    logits = unembed(model, normed, include_bias=True)
    if temperature is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]


# Entry points check their own arguments (see predictions.logit_lens).
@no_type_check
def patchscope_generate(
    model: Any,
    source_inputs: Inputs | None = None,
    *,
    target: str | TargetPrompt | torch.Tensor = "identity",
    source_sites: str | Sequence[str] | None = None,
    target_site: str = "same",
    source_position: PositionSpec = -1,
    target_position: int | None = None,
    max_new_tokens: int = 5,
    temperature: float | None = None,
    seed: int = 0,
    latents: Any = None,
    cache: Any = None,
    target_model: Any = None,
    allow_cross_model: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prepend_bos: bool | None = None,
) -> PatchscopeGeneration:
    """Continue the patched target prompt for a few tokens per source site: multi-token decodes.

    Each source state is patched into the target prompt exactly as :func:`patchscope` does it, and the model
    writes ``max_new_tokens`` tokens after the prompt: greedily (``temperature=None``), or drawn at
    ``temperature`` from a generator seeded with ``seed`` (the same call draws the same tokens). The patch
    stays in place at every step, so each token sees the patched state as a cached key and value would.
    Every step is one forward pass over all sites and prompts together (``batch_size`` rows per pass).

    Args:
        max_new_tokens: tokens written per site and read position.
        temperature: None for greedy decoding, else a positive temperature to sample at.
        seed: the sampling generator's seed.
        Other arguments as :func:`patchscope`.

    Returns:
        A :class:`PatchscopeGeneration`: ``generated_ids`` ``[site, batch, pos, new]``, ``texts()``, a table.

    Raises:
        ValueError, TypeError: as :func:`patchscope`; a temperature that is not a positive number; a
            target prompt and continuation longer than the model's context.

    Example:
        >>> gen = tl.patchscope_generate(model, "Once upon a time, there was a little", max_new_tokens=3)
        >>> gen.texts()[-1][0][0]
    """
    runner, lens = _setup(
        model, target_model, allow_cross_model, target, target_site, target_position, batch_size, prepend_bos
    )
    check_count(max_new_tokens, "max_new_tokens", 1)
    check_count(seed, "seed", 0)
    if temperature is not None:
        check_real(temperature, "temperature", 0.0, low_open=True)
        temperature = float(temperature)
    n_target = lens.target.tokens.shape[0]
    if n_target + max_new_tokens - 1 > runner.cfg.n_ctx:
        raise ValueError(
            f"the target prompt ({n_target} tokens) and {max_new_tokens} new tokens exceed the model's context of "
            f"{runner.cfg.n_ctx}; ask for fewer tokens or use a shorter target prompt"
        )
    source = _sources(
        model, runner, lens, source_inputs, latents, source_sites, source_position, cache, prepend_bos
    )
    labels = [s.label for s in source.sites]
    jobs = [(lens.hook_for(label), source.states[label]) for label in labels]
    n_rows = sum(int(states.shape[0]) for _, states in jobs)
    device = lens.target.tokens.device
    generator = None
    if temperature is not None:
        generator = torch.Generator().manual_seed(seed)
    new = torch.empty(n_rows, 0, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        finals = torch.cat(patched_states(runner, lens.target, jobs, lens.batch_size, suffix=new, prefix=source.prefix))
        step = to_device(_next_tokens(runner, finals, temperature, generator), device)
        new = torch.cat([new, step[:, None]], dim=1)
    run = source.run
    rows = run.valid_rows()
    per_site = new.reshape(len(labels), -1, max_new_tokens)
    generated = torch.full(
        (len(labels), *run.positions.shape, max_new_tokens), -1, dtype=torch.long, device=device
    )
    generated[:, rows.b, rows.j] = per_site
    return PatchscopeGeneration(
        **common_fields(runner, source.batch, run.positions, run.valid, PATCHSCOPE_NAME),
        labels=tuple(labels),
        generated_ids=generated,
        target_text=_target_text(runner, lens.target),
        temperature=temperature,
        seed=None if temperature is None else seed,
    )


def _target_text(model: Any, target: _Target) -> str:
    """The target prompt as text, with its patched token marked ``[[...]]``."""
    pieces = display_tokens(getattr(model, "tokenizer", None), target.tokens.tolist())
    pieces[target.patch_position] = f"[[{pieces[target.patch_position]}]]"
    return "".join(pieces)
