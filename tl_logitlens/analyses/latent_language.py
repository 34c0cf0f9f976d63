"""The latent-language analysis of Wendler et al. (2024, "Do Llamas Work in English?").

Each prompt ends where the model is to write a word in the *answer* language (a translation prompt,
``Français: "fleur" - 中文: "``, or a cloze prompt, ``A "___" is used to buy things. Answer: "``). At
every layer the lens reads the prompt's last position and measures two masses: the probability of
the answer word's token set and of the same word's token set in the *latent* language (English in
the paper; :func:`~tl_logitlens.core.token_sets.token_set`: every first token of its spellings).
Wendler et al. found the latent language's mass rising in the middle layers before the answer
language's takes over near the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from jaxtyping import Float

from tl_logitlens.analyses.directions import bootstrap_mean
from tl_logitlens.analyses.predictions import DEFAULT_CHUNK_SIZE, logit_lens
from tl_logitlens.core.results import BootstrapInterval, ResultBase, check_bootstrap, interval_fields
from tl_logitlens.core.token_sets import DEFAULT_VARIANTS, TokenSet, stack_targets, token_set

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

LANGUAGES = ("answer", "latent")


def _grid(shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Index tensors over every cell of a grid of ``shape`` (two or more dims), row-major."""
    return torch.cartesian_prod(*(torch.arange(n) for n in shape)).unbind(-1)


@dataclass(frozen=True, kw_only=True, repr=False)
class LatentLanguageResult(BootstrapInterval, ResultBase):
    """Per site: the probability of each prompt's answer-language and latent-language token sets.

    - ``labels``: the sites read (``"0_pre"``, ..., ``"final_post"``), shallow to deep.
    - ``probs``: ``[site, batch, language]``, language 0 the answer's set, 1 the latent word's; the
      probability (summed over the set's tokens) at each prompt's last token.
    - ``mean``, ``low``, ``high``: ``[site, language]``, the mean over prompts and its percentile
      bootstrap interval (prompts resampled with replacement, ``n_bootstrap`` times, ``confidence``
      coverage, seeded with ``seed``).
    - ``names``: what to call the two languages in tables and figures (e.g. ``("zh", "en")``).
    - ``answer_sets``, ``latent_sets``: each prompt's two :class:`~tl_logitlens.TokenSet`.
    """

    labels: tuple[str, ...]
    probs: Float[torch.Tensor, "site batch language"]
    names: tuple[str, str]
    answer_sets: tuple[TokenSet, ...]
    latent_sets: tuple[TokenSet, ...]
    norm: str

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per site × prompt × language, with the set and its probability."""
        import pandas as pd

        s, b, g = _grid(self.probs.shape)
        sets = (self.answer_sets, self.latent_sets)
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                "prompt": b.numpy(),
                "language": [self.names[i] for i in g.tolist()],
                "role": [LANGUAGES[i] for i in g.tolist()],
                "words": [sets[i][p].label for i, p in zip(g.tolist(), b.tolist())],
                "prob": self.probs.cpu()[s, b, g].numpy(),
                "lens": self.lens_name,
            }
        )

    def summary_dataframe(self) -> pd.DataFrame:
        """One row per site × language: the mean over prompts and its bootstrap interval."""
        import pandas as pd

        s, g = _grid(self.mean.shape)
        return pd.DataFrame(
            {
                "site": [self.labels[i] for i in s.tolist()],
                "site_index": s.numpy(),
                "language": [self.names[i] for i in g.tolist()],
                "role": [LANGUAGES[i] for i in g.tolist()],
                "mean": self.mean.cpu()[s, g].numpy(),
                "low": self.low.cpu()[s, g].numpy(),
                "high": self.high.cpu()[s, g].numpy(),
                "n_prompts": self.probs.shape[1],
                "confidence": self.confidence,
            }
        )

    def plot(self, **kwargs: Any) -> go.Figure:
        """Two curves over depth with their bands, as in Wendler et al.'s figures; see
        :func:`tl_logitlens.plotting.latent_language.latent_language_figure`."""
        from tl_logitlens.plotting.latent_language import latent_language_figure

        return latent_language_figure(self, **kwargs)


def _sets(model: Any, words: object, n: int, what: str, variants: Sequence[str]) -> list[TokenSet]:
    """One token set per prompt from ``words``: one entry per prompt, each a word, a list of words
    (pooled into one set) or a :class:`TokenSet`."""
    if isinstance(words, (str, TokenSet)):
        words = [words]
    if not isinstance(words, Sequence) or isinstance(words, (bytes, bytearray)):
        raise TypeError(f"{what} must be a list with one word (or list of words, or TokenSet) per prompt")
    if len(words) != n:
        raise ValueError(
            f"{what} has {len(words)} entries for {n} prompts; give one word (or TokenSet) per prompt"
        )
    return [w if isinstance(w, TokenSet) else token_set(model, w, variants=variants) for w in words]


@no_type_check  # checks its own arguments (see logit_lens)
def latent_language(
    model: Any,
    prompts: str | Sequence[str],
    answer_words: Any,
    latent_words: Any,
    *,
    lens: Any = None,
    sites: str | Sequence[str] | None = None,
    norm: str = "recompute",
    names: tuple[str, str] = ("answer", "latent"),
    variants: Sequence[str] = DEFAULT_VARIANTS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LatentLanguageResult:
    """Per layer, the probability of the answer word and of its latent-language counterpart
    (Wendler et al., 2024): the latent-language curve.

    At each prompt's last token the lens (``lens``: the logit lens by default, or any lens
    :func:`~tl_logitlens.logit_lens` takes) reads every site; the probability of a word is the
    summed probability of its token set (:func:`~tl_logitlens.token_set`). Both curves are means over
    prompts with percentile bootstrap intervals over prompts.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer.
        prompts: translation or cloze prompts, each ending just before the answer word (a string or
            a list).
        answer_words: per prompt the expected answer, in the prompt's output language: a word, a
            list of words (synonyms, pooled into one set) or a :class:`~tl_logitlens.TokenSet`.
        latent_words: per prompt the same word in the language tested as latent (English in the paper).
        lens, sites, norm, chunk_size: as in :func:`~tl_logitlens.logit_lens`.
        names: the two languages' names for tables and figures, e.g. ``("zh", "en")``.
        variants: the spellings whose first tokens make a word's set (see :func:`~tl_logitlens.token_set`).
        n_bootstrap, confidence, seed: the bootstrap over prompts.

    Returns:
        A :class:`LatentLanguageResult` (``probs [site, batch, language]``, ``mean``/``low``/``high``
        ``[site, language]``, ``.plot()``, ``.to_dataframe()``, ``.summary_dataframe()``).

    Raises:
        ValueError, TypeError: a count of words that is not one per prompt, an empty word list, a word
            with no sensible first token, a prompt whose two sets share a token (its mass would count
            for both languages: drop that prompt or choose other words), non-finite values in the
            model or the lens (named where they first appear), and what :func:`~tl_logitlens.logit_lens`
            refuses.

    Example:
        >>> res = tl.latent_language(model, ['Français: "fleur" - 中文: "'], ["花"], ["flower"], names=("zh", "en"))
        >>> res.plot()
    """
    settings = check_bootstrap(n_bootstrap, confidence, seed, min_replicates=1)
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)) or len(texts) == 0:
        raise ValueError("prompts must be a prompt or a non-empty list of prompts")
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"names must be two non-empty strings, e.g. ('zh', 'en'), got {names!r}")
    answer = _sets(model, answer_words, len(texts), "answer_words", variants)
    latent = _sets(model, latent_words, len(texts), "latent_words", variants)
    for b, (a, z) in enumerate(zip(answer, latent)):
        shared = sorted(set(a.ids) & set(z.ids))
        if shared:
            raise ValueError(
                f"prompt {b}: the {names[0]} set {a.label} and the {names[1]} set {z.label} share tokens "
                f"{shared} ({[a.tokens[a.ids.index(i)] for i in shared]}), so their mass would count for both; "
                "drop this prompt or choose words that start differently (Wendler et al. drop such words too)"
            )
    targets = stack_targets([[a, z] for a, z in zip(answer, latent)], 1, model.cfg.device)
    res = logit_lens(
        model,
        list(texts),
        lens=lens,
        sites=sites,
        norm=norm,
        top_k=1,
        targets=targets,
        positions="last",
        chunk_size=chunk_size,
    )
    probs = res.target_logprobs[:, :, 0, :].exp()  # [site, batch, language]
    mean, low, high = bootstrap_mean(probs[:, :, None, :], res.valid, settings)
    base = {f.name: getattr(res, f.name) for f in fields(ResultBase)}  # the inputs, positions, model, lens
    return LatentLanguageResult(
        **base,
        labels=res.labels,
        probs=probs,
        names=names,
        answer_sets=tuple(answer),
        latent_sets=tuple(latent),
        norm=res.norm,
        **interval_fields(mean[:, 0], low[:, 0], high[:, 0], settings),
    )
