"""The measures of a lens against the model over a corpus: their names, units, titles and definition.

Both the evaluator (:mod:`tl_logitlens.analyses.evaluate`) and its figures and tables name these, so they live
below both: a figure reads a measure's title and unit here instead of importing the analysis.
"""

from __future__ import annotations

STATISTICS: tuple[str, ...] = ("kl_to_final", "cross_entropy", "entropy", "top1_agreement")
# statistics that have a bits-per-byte form (a sum of nats over the bytes of the text)
BPB_STATISTICS: tuple[str, ...] = ("kl_to_final", "cross_entropy", "entropy")
# the last axis of LensEvaluation's mean/low/high: the statistics, then the bits-per-byte forms
MEASURES: tuple[str, ...] = STATISTICS + tuple(f"{s}_bpb" for s in BPB_STATISTICS)
UNITS: dict[str, str] = {
    "kl_to_final": "nats",
    "cross_entropy": "nats",
    "entropy": "nats",
    "top1_agreement": "fraction",
    **{f"{s}_bpb": "bits per byte" for s in BPB_STATISTICS},
}
TITLES: dict[str, str] = {
    "kl_to_final": "KL(final ‖ site)",
    "cross_entropy": "next-token cross-entropy",
    "entropy": "entropy",
    "top1_agreement": "top-1 agreement with final",
}
DEFINITION = (
    "Each document is tokenised with the model's BOS and its tokens after BOS are cut into windows "
    "of at most seq_len tokens, each led by BOS. Every position of every window is scored: "
    "KL(final || site) and the entropy of the site's distribution (nats), and whether the site's "
    "top-1 token equals the final layer's; the next-token cross-entropy (nats) wherever the window "
    "holds a next token, so every token of a document is predicted exactly once. Means are "
    "token-weighted over the whole corpus. Bits per byte are sums of nats / ln 2 over the UTF-8 "
    "bytes of the decoded documents. Intervals are 95% percentile intervals of a Poisson bootstrap "
    "over documents (each document's weight in each replicate is Poisson(1), seeded by the seed "
    "and the document's index, so a sharded run draws exactly the same replicates)."
)
