"""The numbers a report shows: every analysis run once, kept in :class:`ReportData` or :class:`MaskedReportData`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union, no_type_check

from tl_logitlens.analyses.attribution import AttributionResult, direct_logit_attribution
from tl_logitlens.analyses.directions import DirectionResult, logit_diff
from tl_logitlens.analyses.lens_comparison import LensComparison, compare_lenses
from tl_logitlens.analyses.masked import MaskedLensResult, SlidingMaskResult, masked_lens, sliding_mask_lens
from tl_logitlens.analyses.predictions import LensResult, logit_lens
from tl_logitlens.analyses.profile import DepthProfile, depth_profile
from tl_logitlens.core import compat as _compat
from tl_logitlens.core.inputs import check_length_before_tokenising, resolve_token
from tl_logitlens.core.models import load_model
from tl_logitlens.core.run import plan_forwards
from tl_logitlens.core.token_sets import TokenSet, resolve_target
from tl_logitlens.core.tokens import display_tokens, visible_token
from tl_logitlens.lenses import LOGIT_LENS, named_lenses, resolve_lens, sites_or_default

EVOLUTION_N = 10

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReportData:
    """What a causal-LM report shows: the lens on every prompt and, given a comparison token, its attributions.

    - ``lens``: :func:`logit_lens` over all prompts and positions (``targets``: the target and the
      comparison token, when given).
    - ``evolution``: the lens on prompt 0's last token with ``targets`` = the final layer's top
      ``EVOLUTION_N`` tokens there (for :func:`~tl_logitlens.plotting.top_token_evolution`).
    - ``logit_diff``, ``attribution`` (components), ``head_attribution``: at each prompt's last
      token, for ``target`` minus ``versus``; None without ``versus``.
    - ``lens_name``: which lens read the sites (``"logit lens"``, or the ``name`` of the ``lens=`` given;
      with several lenses, the first one's).
    - ``padding_fraction``: the share of the token slots the lens's forward passes computed that were
      padding (prompts are batched by length, so it stays small).
    - ``comparison``: with several lenses (``lens=[...]``), :func:`~tl_logitlens.compare_lenses` of all of
      them over every prompt, at the sites they all read (by default the first of their default sites
      that every one reads: ``resid_post`` when a Jacobian lens is among them); None with one lens.
    """

    prompts: tuple[str, ...]
    model_name: str
    lens: LensResult
    evolution: LensResult
    target: str | None
    versus: str | None
    logit_diff: DirectionResult | None
    attribution: AttributionResult | None
    head_attribution: AttributionResult | None
    sites: tuple[str, ...]
    norm: str
    top_k: int
    lens_name: str = LOGIT_LENS.name
    padding_fraction: float = 0.0
    comparison: LensComparison | None = None


@dataclass(frozen=True)
class MaskedReportData:
    """What a masked-LM report shows, one entry per prompt.

    - ``masked[b]``: :func:`masked_lens` of prompt ``b`` at its holes: the mask tokens in the text,
      else ``mask_positions``, else its last word (``notes[b]`` says which).
    - ``profiles[b]``: :func:`depth_profile` of those holes (the original token's log-prob by depth).
    - ``sliding[i]``, ``sliding_profiles[i]``: :func:`sliding_mask_lens` (every token masked in turn)
      of the first ``len(sliding)`` prompts, and its depth profile.
    """

    prompts: tuple[str, ...]
    model_name: str
    masked: tuple[MaskedLensResult, ...]
    profiles: tuple[DepthProfile, ...]
    sliding: tuple[SlidingMaskResult, ...]
    sliding_profiles: tuple[DepthProfile, ...]
    notes: tuple[str, ...]
    target: str | None
    top_k: int
    sites: tuple[str, ...]
    lens_name: str = "logit lens through the masked-LM head"


AnyReportData = Union[ReportData, MaskedReportData]


def _as_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        out = list(prompts)
        if not out:
            raise ValueError("no prompts were given; pass a prompt or a list of prompts")
        return out
    raise TypeError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")


def _token_text(model: Any, token: str | int | None, what: str) -> str | None:
    if token is None:
        return None
    tid = resolve_token(model, token, what)
    return display_tokens(getattr(model, "tokenizer", None), [tid])[0]


@no_type_check  # checks its own arguments (see lens.logit_lens)
def compute_report(
    model: Any,
    prompts: str | Sequence[str],
    *,
    target: str | int | None = None,
    versus: str | int | None = None,
    top_k: int = 5,
    sites: str | Sequence[str] | None = None,
    norm: str = "recompute",
    batch_size: int = 16,
    progress: Progress | None = None,
    lens: Any = None,
    mask_positions: Any = None,
) -> AnyReportData:
    """Run every analysis a report shows. ``progress(done, total)`` is called after each batch of prompts.

    ``model`` is a model object or anything :func:`~tl_logitlens.load_model` takes. A masked LM gets
    a :class:`MaskedReportData` (see :func:`compute_masked_report`), a causal LM a :class:`ReportData`.
    ``lens``: None (the logit lens) or a lens object, passed to the analyses that read sites; or several,
    a list (``None`` is the logit lens) or a dict ``{name: lens}``: the first is read by every analysis
    as one lens is, and :func:`~tl_logitlens.compare_lenses` reads all of them side by side
    (``ReportData.comparison``, the report's "lenses side by side" section). Lenses are shown by name,
    so their names must differ (set ``lens.name`` on one, or pass a dict).
    ``sites``: default (``None``): the lens's ``default_sites`` (``"resid_pre"`` for the logit and tuned
    lenses, ``"resid_post"`` for the Jacobian lens), and for the comparison the first default every
    lens reads; sites given are read as given, by every lens.

    Example:
        >>> data = compute_report("demo", "The dog was very", lens=[None, tl.load_lens("demo", model)])  # doctest: +SKIP
        >>> data.comparison.site_table()                                                            # doctest: +SKIP
    ``mask_positions``: masked LMs only, where to put the hole in prompts without a mask token.
    """
    model = load_model(model)
    prompts = _as_prompts(prompts)
    check_report_arguments(model, target, versus, sites, norm, lens, batch_size, mask_positions)
    if _compat.is_encoder(model):
        return compute_masked_report(
            model, prompts, target=target, top_k=top_k, mask_positions=mask_positions, progress=progress
        )
    return _compute_causal(model, prompts, target, versus, top_k, sites, norm, batch_size, progress, lens)


def check_report_arguments(
    model: Any, target: Any, versus: Any, sites: Any, norm: Any, lens: Any, batch_size: Any, mask_positions: Any
) -> None:
    """The checks :func:`compute_report` makes of its arguments for ``model`` (a masked LM or a causal LM).

    Raises:
        ValueError: an argument that does not apply to this kind of model, versus without a target, a
            batch size that is not a positive int.
    """
    if _compat.is_encoder(model):
        if versus is not None:
            raise ValueError(
                "the logit difference and its attribution are for causal LMs; a masked-LM report takes a "
                "target only (drop versus)"
            )
        # the command line passes its default as a list (--sites takes several)
        default_sites = sites in (None, "resid_pre") or (isinstance(sites, (list, tuple)) and list(sites) == ["resid_pre"])
        if not default_sites or norm != "recompute" or lens is not None:
            raise ValueError(
                "a masked LM's lens reads every block's input through its own MLM head: sites, norm and lens "
                "do not apply; leave them at their defaults"
            )
        return
    if mask_positions is not None:
        raise ValueError("mask_positions is for masked LMs (BERT, RoBERTa); this model predicts the next token")
    if versus is not None and target is None:
        raise ValueError("a comparison token (versus) needs a target token too: give both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@dataclass(frozen=True)
class CausalSettings:
    """A causal-LM report's settings, resolved once for every batch: the tokens (``targets``: the target
    and the comparison token, as :func:`logit_lens` takes them), how the sites are read (``read``), and
    with several lenses the ones compared (``compared``) and the first one's name (``main_name``)."""

    target: Any
    versus: Any
    target_text: str | None
    versus_text: str | None
    targets: list | None
    top_k: int
    sites: Any
    norm: str
    lens: Any
    compared: Mapping[str, Any] | None
    compared_sites: Any
    main_name: str | None

    @property
    def read(self) -> dict[str, Any]:
        """How the sites are read: the keywords :func:`logit_lens` and :func:`logit_diff` take."""
        return {"sites": self.sites, "norm": self.norm, "lens": self.lens}


def causal_settings(
    model: Any,
    target: str | int | None,
    versus: str | int | None,
    top_k: int,
    sites: str | Sequence[str] | None,
    norm: str,
    lens: Any,
) -> CausalSettings:
    """The settings of :func:`compute_report` for a causal LM, its arguments checked, resolved for ``model``."""
    if target is not None and versus is None:  # a multi-token target is read as its first token's set
        target = resolve_target(model, target)
    if isinstance(target, TokenSet):
        target_text, versus_text = target.label, None
    else:  # the logit difference needs two single tokens
        target_text, versus_text = _token_text(model, target, "target"), _token_text(model, versus, "versus")
    compared, main_name, asked_sites = None, None, sites
    if isinstance(lens, (list, tuple, Mapping)):  # several lenses: the first reads every section
        named = named_lenses(model, lens)
        compared = named if len(named) > 1 else None
        main_name, lens = next(iter(named.items()))
    sites = sites_or_default(model, sites, [resolve_lens(model, lens)])  # the lens's own default sites
    return CausalSettings(
        target=target,
        versus=versus,
        target_text=target_text,
        versus_text=versus_text,
        targets=[t for t in (target, versus) if t is not None] or None,
        top_k=top_k,
        sites=sites,
        norm=norm,
        lens=lens,
        compared=compared,
        compared_sites=asked_sites,
        main_name=main_name,
    )


@dataclass(frozen=True)
class PromptResults:
    """Every per-prompt number of a causal-LM report for some prompts: the lens (``lens``) and, with a
    comparison token, the logit difference and the attributions (components, heads) at each prompt's
    last token; ``n_real``/``n_slots``: the real tokens and the token slots the lens's forward passes ran."""

    lens: LensResult
    logit_diff: DirectionResult | None
    attribution: AttributionResult | None
    head_attribution: AttributionResult | None
    n_real: int
    n_slots: int

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.n_slots == 0 else 1.0 - self.n_real / self.n_slots

    @classmethod
    def concat(cls, parts: Sequence[PromptResults]) -> PromptResults:
        """Results of disjoint batches joined along the batch, in the order given."""

        def join(name: str) -> Any:
            first = getattr(parts[0], name)
            return None if first is None else type(first).concat([getattr(p, name) for p in parts])

        return cls(
            *(join(name) for name in ("lens", "logit_diff", "attribution", "head_attribution")),
            n_real=sum(p.n_real for p in parts),
            n_slots=sum(p.n_slots for p in parts),
        )

    def select_prompts(self, order: Sequence[int]) -> PromptResults:
        """The prompts ``order[0], order[1], ...`` in that order (the padding counts stay the whole run's)."""

        def take(r: Any) -> Any:
            return None if r is None else r.select_prompts(order)

        return replace(
            self,
            lens=take(self.lens),
            logit_diff=take(self.logit_diff),
            attribution=take(self.attribution),
            head_attribution=take(self.head_attribution),
        )


def causal_batch(model: Any, prompts: list[str], settings: CausalSettings) -> PromptResults:
    """One batch of prompts through every per-prompt analysis of the report, each run once."""
    s = settings
    lens = logit_lens(model, prompts, top_k=s.top_k, targets=s.targets, **s.read)
    plan = plan_forwards(lens.valid.sum(-1).tolist(), causal=True)  # the plan logit_lens's forward ran
    diff = attribution = heads = None
    if s.versus is not None:
        diff = logit_diff(model, prompts, s.target, s.versus, **s.read)
        attribution = direct_logit_attribution(model, prompts, s.target, s.versus)
        heads = direct_logit_attribution(model, prompts, s.target, s.versus, unit="head")
    return PromptResults(lens, diff, attribution, heads, plan.n_real, plan.n_slots)


def causal_block(
    model: Any,
    prompts: list[str],
    settings: CausalSettings,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> PromptResults:
    """:func:`causal_batch` over ``prompts`` in batches of similar length (little padding), put back into
    the order given. ``progress(done)`` is called after each batch with the prompts done so far."""
    # a prompt too long for the context is refused before any is tokenised (as logit_lens would refuse it)
    check_length_before_tokenising(prompts, getattr(model, "tokenizer", None), int(model.cfg.n_ctx))
    lengths = [int(model.to_tokens(p).shape[-1]) for p in prompts] if len(prompts) > batch_size else [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    parts = []
    for start in range(0, len(prompts), batch_size):
        parts.append(causal_batch(model, [prompts[i] for i in order[start : start + batch_size]], settings))
        if progress is not None:
            progress(min(start + batch_size, len(prompts)))
    result = PromptResults.concat(parts)
    if order == sorted(order):
        return result
    back = [0] * len(order)
    for place, i in enumerate(order):
        back[i] = place
    return result.select_prompts(back)


def report_data(model: Any, prompts: list[str], settings: CausalSettings, results: PromptResults) -> ReportData:
    """The :class:`ReportData` of ``prompts`` from their :func:`causal_block` results: the evolution view
    of prompt 0 and, with several lenses, their comparison over the prompts added."""
    s = settings
    # the final layer's top tokens at prompt 0's last token, then the lens again with them as targets
    first = logit_lens(model, prompts[0], top_k=EVOLUTION_N, positions="last", **s.read)
    finals = first.top_ids[-1, 0, 0].tolist()
    evolution = logit_lens(model, prompts[0], top_k=EVOLUTION_N, positions="last", targets=finals, **s.read)
    comparison = None
    if s.compared is not None:
        comparison = compare_lenses(model, prompts, lenses=s.compared, sites=s.compared_sites, top_k=s.top_k)
    lens = results.lens
    return ReportData(
        prompts=tuple(prompts),
        model_name=getattr(model.cfg, "model_name", ""),
        lens=lens,
        evolution=evolution,
        target=s.target_text,
        versus=s.versus_text,
        logit_diff=results.logit_diff,
        attribution=results.attribution,
        head_attribution=results.head_attribution,
        sites=lens.labels,
        norm=s.norm,
        top_k=s.top_k,
        lens_name=lens.lens_name if s.main_name is None else s.main_name,
        padding_fraction=results.padding_fraction,
        comparison=comparison,
    )


def _compute_causal(
    model: Any,
    prompts: list[str],
    target: str | int | None,
    versus: str | int | None,
    top_k: int,
    sites: str | Sequence[str] | None,
    norm: str,
    batch_size: int,
    progress: Progress | None,
    lens: Any,
) -> ReportData:
    """:func:`compute_report` for a causal LM, its arguments checked."""
    settings = causal_settings(model, target, versus, top_k, sites, norm, lens)
    n = len(prompts)
    done = None if progress is None else (lambda k: progress(k, n))
    results = causal_block(model, prompts, settings, batch_size, done)
    return report_data(model, prompts, settings, results)


def _last_word_position(model: Any, prompt: str) -> tuple[int, str]:
    """The token position of the prompt's last word piece (letters or digits, not a special token)."""
    tok = model.tokenizer
    ids = tok(prompt)["input_ids"]
    special = set(getattr(tok, "all_special_ids", []) or [])
    shown = display_tokens(tok, ids)
    for pos in range(len(ids) - 1, -1, -1):
        if ids[pos] not in special and any(ch.isalnum() for ch in shown[pos]):
            return pos, shown[pos]
    raise ValueError(f"prompt {prompt!r} has no word to mask; put {tok.mask_token} where the hole should be")


def _holes(model: Any, prompt: str, mask_positions: Any) -> tuple[Any, str]:
    """Where a masked-LM report masks ``prompt`` (``masked_lens``'s ``mask_positions``) and a note saying why."""
    mask = model.tokenizer.mask_token
    if mask and mask in prompt:
        return None, f"the {mask} token(s) in the text"
    if mask_positions is not None:
        return mask_positions, f"mask_positions={mask_positions!r}"
    pos, word = _last_word_position(model, prompt)
    return pos, f"no {mask} in the text: its last word {visible_token(word)!r} (position {pos})"


@no_type_check
def compute_masked_report(
    model: Any,
    prompts: str | Sequence[str],
    *,
    target: str | int | None = None,
    top_k: int = 5,
    mask_positions: Any = None,
    n_sliding: int = 3,
    progress: Progress | None = None,
) -> MaskedReportData:
    """Run the masked-LM analyses a report shows (see :class:`MaskedReportData`).

    Each prompt's holes: the mask tokens in its text; in a prompt without one, ``mask_positions``
    (as :func:`~tl_logitlens.masked_lens` takes it) or, by default, its last word. The sliding mask
    runs on the first ``n_sliding`` prompts (it runs the model once per token).
    """
    model = load_model(model)
    prompts = _as_prompts(prompts)
    if isinstance(n_sliding, bool) or not isinstance(n_sliding, int) or n_sliding < 0:
        raise ValueError(f"n_sliding must be a non-negative int, got {n_sliding!r}")
    target_text, targets = masked_targets(model, target)
    results = []
    for b, prompt in enumerate(prompts):
        results.append(masked_prompt(model, prompt, b, targets, top_k, mask_positions))
        if progress is not None:
            progress(b + 1, len(prompts))
    return masked_report_data(model, prompts, results, target_text, top_k, n_sliding)


MaskedPrompt = tuple[MaskedLensResult, DepthProfile, str]


def masked_targets(model: Any, target: str | int | None) -> tuple[str | None, list | None]:
    """A masked-LM report's target as text, and as :func:`masked_lens` takes it."""
    return _token_text(model, target, "target"), None if target is None else [target]


def masked_prompt(model: Any, prompt: str, b: int, targets: list | None, top_k: int, mask_positions: Any) -> MaskedPrompt:
    """Prompt ``b`` of a masked-LM report: :func:`masked_lens` at its holes, their depth profile and a
    note saying where the holes are."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt {b} is a {type(prompt).__name__}; a masked-LM report takes text")
    where, note = _holes(model, prompt, mask_positions)
    res = masked_lens(model, prompt, mask_positions=where, targets=targets, top_k=top_k)
    # a hole the text already held has no original token: profile the top token instead
    known = bool((res.original_ids[res.valid] >= 0).all())
    return res, depth_profile(res) if known else depth_profile(res, "max"), note


def masked_report_data(
    model: Any, prompts: Sequence[str], results: Sequence[MaskedPrompt], target_text: str | None, top_k: int, n_sliding: int = 3
) -> MaskedReportData:
    """The :class:`MaskedReportData` of ``prompts`` from their :func:`masked_prompt` results, the sliding
    mask of the first ``n_sliding`` added."""
    sliding = tuple(sliding_mask_lens(model, p) for p in prompts[:n_sliding])
    return MaskedReportData(
        prompts=tuple(prompts),
        model_name=getattr(model.cfg, "model_name", ""),
        masked=tuple(r[0] for r in results),
        profiles=tuple(r[1] for r in results),
        sliding=sliding,
        sliding_profiles=tuple(depth_profile(s) for s in sliding),
        notes=tuple(r[2] for r in results),
        target=target_text,
        top_k=top_k,
        sites=results[0][0].labels,
    )
