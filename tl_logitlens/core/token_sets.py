"""Word-level targets: the first tokens of a word's spellings, and the one parser of ``targets=``.

A model does not predict words, it predicts tokens, and the same word starts with different tokens
depending on what comes before it: ``" park"`` after a space, ``"park"`` after a quote or a line
break, ``" Park"`` at the start of a sentence. Following Wendler et al. (2024, "Do Llamas Work in
English?"), the probability of a *word* is the mass of every distinct first token of its variants
(:func:`token_set`); a :class:`TokenSet` holds those tokens.

Each variant is tokenised as it would read *after a line break* (``"\\n" + variant``, the line
break's own tokens removed), so a SentencePiece tokenizer's dummy prefix (which turns ``"park"`` at
the start of a text into ``"▁park"``) does not make the no-space variant a space variant; byte-level
BPE and WordPiece tokenise a word after a line break as at the start of a text. A first token that is
only whitespace (SentencePiece's bare ``"▁"``, GPT-2's ``"Ġ"``) or a special token (BOS, [UNK]) says
nothing about the word and is left out; a word none of whose variants has another first token is an
error.

:func:`resolve_targets` is the one parser of every analysis's ``targets=`` (the logit lens, lens
comparisons, the patchscope): a token string, an id, a :class:`TokenSet`, or a list of them, or a
``[batch, 1]``/``[batch, pos]`` tensor of ids. A set's log-probability is the log-sum-exp of its
tokens' log-probs (the sum of their probabilities) and its rank the best rank among them
(:meth:`Targets.reduce`). A string that is several tokens becomes the set of its first token with a
:class:`MultiTokenTargetWarning`; :func:`single_token` keeps the old error for code that needs exactly
one token.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, no_type_check

import torch
from jaxtyping import Float, Int

from tl_logitlens.core.inputs import is_integer, resolve_token
from tl_logitlens.core.tokens import display_tokens

# how each variant spells a word; the defaults are Wendler et al.'s
VARIANTS = {
    "word": lambda w: w,
    " word": lambda w: " " + w,
    "Word": lambda w: w[:1].upper() + w[1:],
    " Word": lambda w: " " + w[:1].upper() + w[1:],
    "WORD": lambda w: w.upper(),
    " WORD": lambda w: " " + w.upper(),
}
DEFAULT_VARIANTS = ("word", " word", "Word", " Word")
# texts put before a variant so that it is tokenised as it reads inside a text; the first whose own
# tokens come out unchanged in front of the variant's is used
_ANCHORS = ("\n", "🍐", "|")


class MultiTokenTargetWarning(UserWarning):
    """A target string was several tokens and is scored as the set of its first token instead."""


@dataclass(frozen=True)
class TokenSet:
    """The distinct first tokens of some words' variants: one target whose probability is their sum.

    ``ids`` are the token ids (in the order first met: word by word, variant by variant),
    ``tokens`` their readable strings (:func:`~tl_logitlens.core.tokens.display_tokens`), ``words``
    and ``variants`` what they were made from. ``label`` names the set in tables and figures
    (``{park}``, ``{park, garden}``). Build one with :func:`token_set`.
    """

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    words: tuple[str, ...]
    variants: tuple[str, ...]

    @property
    def label(self) -> str:
        """``{word}`` or ``{word, word, ...}`` (the first three words, then how many more)."""
        shown = list(self.words[:3]) + ([f"+{len(self.words) - 3}"] if len(self.words) > 3 else [])
        return "{" + ", ".join(shown) + "}"

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.ids

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"TokenSet({self.label}: {list(self.tokens)!r}, ids {list(self.ids)})"


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    tok = (
        getattr(model_or_tokenizer, "tokenizer", None)
        if hasattr(model_or_tokenizer, "cfg")
        else model_or_tokenizer
    )
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        raise ValueError(
            "token sets need a tokenizer: pass a model that has one (model.tokenizer) or a Hugging Face tokenizer"
        )
    return tok


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def tokens_in_text(tok: Any, text: str) -> list[int]:
    """The tokens of ``text`` as it reads after a line break inside a text (not at the start of one).

    ``text`` is tokenised behind an anchor (a line break; ``🍐`` or ``|`` where the line break's tokens
    would merge with it) and the anchor's tokens are cut off; a ``ValueError`` if every anchor merges.
    """
    for anchor in _ANCHORS:
        head = _encode(tok, anchor)
        ids = _encode(tok, anchor + text)
        if ids[: len(head)] == head:
            return ids[len(head) :]
    raise ValueError(f"cannot tokenise {text!r} apart from the text before it with this tokenizer")


def _sensible(tok: Any, token_id: int, text: str) -> bool:
    """A first token that says something about the word: not a special token, not only whitespace."""
    special = set(getattr(tok, "all_special_ids", None) or ())
    return token_id not in special and text.strip() != ""


def _check_variants(variants: object) -> tuple[str, ...]:
    if isinstance(variants, str):
        variants = (variants,)
    if not isinstance(variants, Sequence) or len(variants) == 0:
        raise ValueError(f"variants must be a non-empty tuple of {tuple(VARIANTS)}, got {variants!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown!r} are not understood; pick from {tuple(VARIANTS)}")
    return tuple(dict.fromkeys(variants))


def _check_words(words: object) -> tuple[str, ...]:
    if isinstance(words, str):
        words = [words]
    if isinstance(words, (bytes, bytearray)) or not isinstance(words, Sequence):
        raise TypeError(f"words must be a string or a list of strings, not {type(words).__name__}")
    if len(words) == 0:
        raise ValueError("words is empty; pass at least one word, e.g. ['park']")
    for w in words:
        if not isinstance(w, str):
            raise TypeError(f"words must be strings, got {w!r} ({type(w).__name__})")
        if not w.strip():
            raise ValueError(f"word {w!r} is empty or only whitespace; pass a word such as 'park'")
    return tuple(words)


@no_type_check  # checks its own arguments (see logit_lens)
def token_set(
    model: Any, words: str | Sequence[str], *, variants: Sequence[str] = DEFAULT_VARIANTS
) -> TokenSet:
    """Every distinct first token of each word's variants, as one target (Wendler et al., 2024).

    Each word is spelled in each of ``variants`` (``"word"``, ``" word"``, ``"Word"``, ``" Word"``,
    ``"WORD"``, ``" WORD"``), each spelling tokenised as it reads inside a text (after a line break,
    so SentencePiece's dummy prefix does not turn ``"park"`` into ``"▁park"``), and its first token
    kept unless it is only whitespace (a bare ``"▁"``/``"Ġ"``) or a special token. The result is
    deduplicated in the order met. With ``variants=("word", " word")`` it equals nnterp's
    ``get_first_tokens`` on a tokenizer loaded with ``add_prefix_space=False``.

    Args:
        model: a model with a tokenizer (``model.tokenizer``), or a Hugging Face tokenizer.
        words: a word or a list of words (several words pool into one target, e.g. synonyms).
        variants: the spellings to take the first token of.

    Returns:
        A frozen :class:`TokenSet` (``ids``, ``tokens``, ``words``, ``variants``, ``label``).

    Raises:
        ValueError: an empty word list, an empty or whitespace word, an unknown variant, or a word
            none of whose variants starts with a sensible token (the message shows each variant's
            tokens).
        TypeError: words that are not strings.

    Example:
        >>> park = tl.token_set(model, ["park"])
        >>> park.tokens            # e.g. ('p', ' p', 'P') on a small SentencePiece vocabulary
        >>> tl.logit_lens(model, "She played in the", targets=[park])
    """
    words = _check_words(words)
    variants = _check_variants(variants)
    tok = _tokenizer_of(model)
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    ids: list[int] = []
    for word in words:
        found, tried = [], []
        for spelled in dict.fromkeys(VARIANTS[v](word) for v in variants):
            pieces = tokens_in_text(tok, spelled)
            shown = display_tokens(tok, pieces)
            tried.append(f"{spelled!r} → {shown}")
            if pieces and _sensible(tok, pieces[0], shown[0]):
                found.append(pieces[0])
        if not found:
            raise ValueError(
                f"word {word!r} has no sensible first token with this tokenizer: "
                + "; ".join(tried)
                + " (a first token that is only whitespace or a special token says nothing about the word); "
                "pick another spelling or word, or pass token ids"
            )
        ids.extend(found)
    unique = tuple(dict.fromkeys(ids))
    if d_vocab is not None and any(i >= d_vocab for i in unique):
        raise ValueError(
            f"token ids {[i for i in unique if i >= d_vocab]} are outside the model's vocabulary [0, {d_vocab})"
        )
    return TokenSet(
        ids=unique, tokens=tuple(display_tokens(tok, list(unique))), words=words, variants=variants
    )


@no_type_check
def single_token(model: Any, token: object, what: str = "target") -> int:
    """The id of ``token`` when it is exactly one token (a token string or an id), else the error.

    Where ``targets=`` turns a multi-token string into the set of its first token (with a
    :class:`MultiTokenTargetWarning`), this keeps the strict reading: pass
    ``targets=[tl.single_token(model, " park")]`` to be stopped at a target that is not one token.

    Raises:
        ValueError: a string that is not exactly one token (the message lists its pieces), an empty
            string, an id outside the vocabulary.
        TypeError: anything but a string or an integer.

    Example:
        >>> tl.single_token(model, " Paris")    # an int; " Parisian" raises, listing its pieces
    """
    return resolve_token(model, token, what)


@dataclass(frozen=True)
class Targets:
    """The targets of every read cell, as the metric kernel asks about them.

    ``ids[b, j, t]`` is target ``t``'s token at read cell ``(b, j)`` (a token set's first token);
    ``members[b, j, t, m]`` every token of target ``t`` there (-1 pads sets of different sizes);
    ``sets[t]`` the :class:`TokenSet` of target ``t``, or None for a single token.
    """

    ids: Int[torch.Tensor, "batch pos target"]
    members: Int[torch.Tensor, "batch pos target member"]
    sets: tuple[TokenSet | None, ...]

    @property
    def n_targets(self) -> int:
        return self.ids.shape[-1]

    @property
    def n_queries(self) -> int:
        """How many ids :meth:`query` asks about per row (targets × the largest set)."""
        return self.n_targets * self.members.shape[-1]

    def query(self, b: torch.Tensor, j: torch.Tensor) -> Int[torch.Tensor, "row q"]:
        """The token ids to ask the kernel about at read cells ``(b[r], j[r])``, ``target × member``
        per row (pads asked as token 0 and dropped again by :meth:`reduce`)."""
        return self.members[b, j].clamp(min=0).flatten(-2)

    def reduce(
        self,
        logprobs: Float[torch.Tensor, "site row q"],
        ranks: Int[torch.Tensor, "site row q"],
        b: torch.Tensor,
        j: torch.Tensor,
    ) -> tuple[Float[torch.Tensor, "site row target"], Int[torch.Tensor, "site row target"]]:
        """Each target's log-prob (log-sum-exp over its tokens: the log of their summed probability)
        and rank (the best of its tokens' ranks) from the kernel's answers to :meth:`query`."""
        n_members = self.members.shape[-1]
        if n_members == 1:
            return logprobs, ranks
        shape = (*logprobs.shape[:-1], self.n_targets, n_members)
        pad = (self.members[b, j] < 0)[None]  # [1, row, target, member]
        lp = logprobs.reshape(shape).masked_fill(pad, float("-inf")).logsumexp(-1)
        worst = torch.iinfo(ranks.dtype).max
        return lp, ranks.reshape(shape).masked_fill(pad, worst).amin(-1)


_OWN_FRAMES = ("tl_logitlens", "jaxtyping", "beartype", "typeguard")


def _warn_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointed at the first frame outside this package (the user's call), past the
    run-time type checkers' wrappers (jaxtyping's under pytest), however deep the call came from."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(_OWN_FRAMES):
        frame = frame.f_back
    registry = frame.f_globals.setdefault("__warningregistry__", {})
    module = frame.f_globals.get("__name__", "<string>")
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno, module, registry)


def _multi_token_set(model: Any, text: str, ids: list[int]) -> TokenSet:
    """The set of a multi-token string's first token, with the one-line note saying so."""
    tok = model.tokenizer
    shown = display_tokens(tok, ids)
    first = shown[0]
    if not _sensible(tok, ids[0], first):
        raise ValueError(
            f"target {text!r} splits into {len(ids)} tokens {shown} and its first token {first!r} is only "
            "whitespace or a special token, so it says nothing about the word; pass "
            "tl.token_set(model, [...]) with the word itself, or a token id"
        )
    _warn_caller(
        f"target {text!r} is {len(ids)} tokens {shown}; scoring its first token {first!r} "
        "(tl.token_set: every spelling; tl.single_token: an error)",
        MultiTokenTargetWarning,
    )
    return TokenSet(ids=(int(ids[0]),), tokens=(first,), words=(text,), variants=("first token",))


def resolve_target(model: Any, item: object) -> int | TokenSet:
    """A shared target: an id, a one-token string, a :class:`TokenSet`, or a longer string (its first token's set)."""
    if isinstance(item, TokenSet):
        d_vocab = model.cfg.d_vocab
        if any(not 0 <= i < d_vocab for i in item.ids):
            raise ValueError(
                f"token set {item.label} holds ids outside the vocabulary [0, {d_vocab}); build it with this model"
            )
        return item
    if isinstance(item, str) and item != "":
        if getattr(model, "tokenizer", None) is None:
            return resolve_token(model, item)  # its error says to pass ids
        ids = model.to_tokens(item, prepend_bos=False, truncate=False)[0].tolist()
        if len(ids) > 1:
            return _multi_token_set(model, item, ids)
    return resolve_token(model, item)


def stack_targets(
    per_row: Sequence[Sequence[int | TokenSet]], n_pos: int, device: torch.device | str
) -> Targets:
    """:class:`Targets` with each prompt's own targets (``per_row[b]``, the same number per prompt),
    shared by its ``n_pos`` read positions."""
    n_t = len(per_row[0])
    width = max(len(t) if isinstance(t, TokenSet) else 1 for row in per_row for t in row)
    members = torch.full((len(per_row), n_t, width), -1, dtype=torch.long)
    for b, row in enumerate(per_row):
        for t, target in enumerate(row):
            ids = list(target.ids) if isinstance(target, TokenSet) else [int(target)]
            members[b, t, : len(ids)] = torch.tensor(ids)
    members = members.to(device)[:, None].expand(-1, n_pos, -1, -1)
    # a target is named by its set where every prompt has the same one
    sets = tuple(
        t if isinstance(t, TokenSet) and all(row[i] == t for row in per_row) else None
        for i, t in enumerate(per_row[0])
    )
    return Targets(ids=members[..., 0], members=members, sets=sets)


def resolve_targets(model: Any, targets: object, n_batch: int, n_pos: int) -> Targets | None:
    """Every analysis's ``targets=``, read one way.

    Shared targets, the same at every read cell: a token string, an id, a :class:`TokenSet`, or a
    list of them (a string that is several tokens becomes the set of its first token, with a
    :class:`MultiTokenTargetWarning`). Or one id per prompt or per read cell: a ``[batch, 1]`` or
    ``[batch, pos]`` integer tensor. None: no targets.

    Raises:
        ValueError, TypeError: an empty list, a 1-D tensor (ambiguous), a tensor of the wrong shape or
            dtype, an id outside the vocabulary, a string whose first token is only whitespace.
    """
    if targets is None:
        return None
    device = model.cfg.device
    if isinstance(targets, Targets):  # already read (e.g. each prompt's own sets, by stack_targets)
        if tuple(targets.ids.shape[:2]) != (n_batch, n_pos):
            raise ValueError(
                f"Targets for {list(targets.ids.shape[:2])} read cells given to [batch, pos] = [{n_batch}, {n_pos}]"
            )
        return targets
    if isinstance(targets, torch.Tensor) and targets.ndim >= 1:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"target ids must be integers, not {targets.dtype}")
        if targets.ndim == 1:
            raise ValueError(
                f"a 1-D target tensor ({targets.shape[0]} ids) is ambiguous: pass a list of ids for "
                f"targets shared by every prompt, or a [batch, 1] tensor (here [{n_batch}, 1]) for one "
                f"id per prompt, or [batch, pos] = [{n_batch}, {n_pos}] for one per read position"
            )
        if targets.ndim == 2 and targets.shape[1] == 1 and targets.shape[0] == n_batch:
            targets = targets.expand(n_batch, n_pos)
        if targets.ndim != 2 or tuple(targets.shape) != (n_batch, n_pos):
            raise ValueError(
                f"per-row targets must be [batch, 1] = [{n_batch}, 1] or [batch, pos] = [{n_batch}, {n_pos}], "
                f"got {list(targets.shape)}"
            )
        bad = (targets < 0) | (targets >= model.cfg.d_vocab)
        if bool(bad.any()):
            raise ValueError(
                f"target id {int(targets[bad][0])} is outside the vocabulary [0, {model.cfg.d_vocab})"
            )
        ids = targets.to(device).long()[..., None]
        return Targets(ids=ids, members=ids[..., None], sets=(None,))
    if isinstance(targets, (str, TokenSet)) or is_integer(targets) or isinstance(targets, torch.Tensor):
        targets = [targets]
    if not isinstance(targets, Sequence) or len(targets) == 0:
        raise ValueError("targets must be a token, a token set, a non-empty list of them, or a tensor of ids")
    shared = stack_targets([[resolve_target(model, t) for t in targets]], n_pos, device)
    members = shared.members.expand(n_batch, -1, -1, -1)
    return Targets(ids=members[..., 0], members=members, sets=shared.sets)
